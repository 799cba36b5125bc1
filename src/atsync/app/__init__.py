"""Apps: a contract (models + actions) over a ModelDB, with a signed action log.

contract = Contract(models={"notes": {"id": "primary", "title": "string"}})

@contract.action
def create_note(ctx, title):
    key = ctx.tid()
    ctx.db.set("notes", {"id": key, "title": title})
    return key

with App.open("notes.db", contract) as app:
    app.actions.create_note("hello")

Changes applied from a repository (the sync layer's pulls) are logged as ``REMOTE_ACTION``
entries attributed to the repository's DID, and replayed by ``rebuild()``.

``key_path_for(db_path)`` is where an app's signing key lives: ``<db_path>.key``.
"""

from ._app import REMOTE_ACTION, Actions, App, ReadOnlyDB, RemoteChange, writer_lock
from ._contract import ActionContext, ActionResult, Contract
from ._log import ActionLog, LogEntry
from ._signers import ATPSigner, LocalSigner, Signer, key_path_for

__all__ = [
    "REMOTE_ACTION",
    "ATPSigner",
    "ActionContext",
    "ActionLog",
    "ActionResult",
    "Actions",
    "App",
    "Contract",
    "LocalSigner",
    "LogEntry",
    "ReadOnlyDB",
    "RemoteChange",
    "Signer",
    "key_path_for",
    "writer_lock",
]

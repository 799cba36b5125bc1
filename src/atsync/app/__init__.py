"""Apps: a contract (models + actions) over a ModelDB, with a signed action log.

contract = Contract(models={"notes": {"id": "primary", "title": "string"}})

@contract.action
def create_note(ctx, title):
    key = ctx.tid()
    ctx.db.set("notes", {"id": key, "title": title})
    return key

with App.open("notes.db", contract) as app:
    app.actions.create_note("hello")
"""

from ._app import Actions, App, ReadOnlyDB
from ._contract import ActionContext, ActionResult, Contract
from ._log import ActionLog, LogEntry
from ._signers import ATPSigner, LocalSigner, Signer

__all__ = [
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
    "Signer",
]

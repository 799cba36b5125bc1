"""atsync — local-first Python apps whose data syncs with the user's AT Protocol repository.

The layers (each usable on its own, dependencies pointing down):

    atsync.app      Contract (models + actions), App, action log, signers
    atsync.atproto  identity, sessions, XRPC, CAR/MST/commit verification, dev PDS
    atsync.db       ModelDB: schema language, SQLite backend, live queries

The names most apps need are re-exported here.
"""

from ._errors import (
    ActionError,
    AtsyncError,
    AuthError,
    ClosedError,
    NetworkError,
    NotFoundError,
    PermanentError,
    RateLimitedError,
    RecordError,
    SchemaError,
    SignerError,
    TransactionError,
    TransientError,
    UnknownModelError,
    ValidationError,
    VerificationError,
)
from .app import ActionContext, ActionResult, App, ATPSigner, Contract, LocalSigner, Signer
from .db import ModelDB, Subscription, UpgradeAPI

__version__ = "0.1.0.dev0"

__all__ = [
    "ATPSigner",
    "ActionContext",
    "ActionError",
    "ActionResult",
    "App",
    "AtsyncError",
    "AuthError",
    "ClosedError",
    "Contract",
    "LocalSigner",
    "ModelDB",
    "NetworkError",
    "NotFoundError",
    "PermanentError",
    "RateLimitedError",
    "RecordError",
    "SchemaError",
    "Signer",
    "SignerError",
    "Subscription",
    "TransactionError",
    "TransientError",
    "UnknownModelError",
    "UpgradeAPI",
    "ValidationError",
    "VerificationError",
    "__version__",
]

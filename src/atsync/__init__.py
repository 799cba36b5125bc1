"""atsync — local-first Python apps whose data syncs with the user's AT Protocol repository.

The layers (each usable on its own, dependencies pointing down):

    atsync.app      Contract (models + actions), App, action log, signers
    atsync.atproto  identity, sessions, XRPC, CAR/MST/commit verification, dev PDS
    atsync.db       ModelDB: schema language, SQLite backend, live queries
    atsync.lexicon  Lexicon documents and record validation
    atsync.sync     ATSync / SyncThread: bindings, outbox, push, strategies, status

The names most apps need are re-exported here.
"""

from ._errors import (
    ActionError,
    AtsyncError,
    AuthError,
    BadSignature,
    ClosedError,
    DevPDSError,
    InvalidSyntaxError,
    MissingBlock,
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
from .db import BlobRef, ModelDB, Subscription, UpgradeAPI
from .sync import (
    ATSync,
    Batch,
    Binding,
    Debounce,
    Immediate,
    Interval,
    Live,
    Manual,
    OnStart,
    Poll,
    Strategy,
    SyncStatus,
    SyncThread,
    Transform,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "ATPSigner",
    "ATSync",
    "ActionContext",
    "ActionError",
    "ActionResult",
    "App",
    "AtsyncError",
    "AuthError",
    "BadSignature",
    "Batch",
    "Binding",
    "BlobRef",
    "ClosedError",
    "Contract",
    "Debounce",
    "DevPDSError",
    "Immediate",
    "Interval",
    "InvalidSyntaxError",
    "Live",
    "LocalSigner",
    "Manual",
    "MissingBlock",
    "ModelDB",
    "NetworkError",
    "NotFoundError",
    "OnStart",
    "PermanentError",
    "Poll",
    "RateLimitedError",
    "RecordError",
    "SchemaError",
    "Signer",
    "SignerError",
    "Strategy",
    "Subscription",
    "SyncStatus",
    "SyncThread",
    "TransactionError",
    "Transform",
    "TransientError",
    "UnknownModelError",
    "UpgradeAPI",
    "ValidationError",
    "VerificationError",
    "__version__",
]

"""The one exception tree of atsync.

Every error atsync raises on purpose is an ``AtsyncError``; catch that to catch them all.
An operation that raises has written nothing (its transaction is rolled back).

    AtsyncError
    ├── SchemaError               a model schema or an upgrade step is malformed
    ├── UnknownModelError         a model name that the schema does not define
    ├── NotFoundError             update()/merge() of a record that does not exist
    ├── ValidationError           a value does not fit the schema (type, null, primary key)
    │   └── RecordError           a record breaks the atproto data model or its Lexicon
    ├── ClosedError               the database or app was used after close()
    ├── TransactionError          a doomed or misused transaction; the writer lock is taken
    ├── ActionError               an action is unknown or was called wrongly
    ├── SignerError               a key cannot be created, loaded, or used
    ├── InvalidSyntaxError        a handle, DID, NSID, AT URI, TID or record key is malformed
    ├── VerificationError         a signature, CID, CAR, or MST proof does not check out
    │   ├── BadSignature          a commit is not signed by the key it must be signed by
    │   └── MissingBlock          a block a comparison needs is in none of its sources
    ├── DevPDSError               the local reference PDS could not be installed or started
    └── NetworkError              a call to a PDS or another service failed
        ├── TransientError        worth retrying after a backoff (network, 5xx, timeouts)
        │   └── RateLimitedError  wait until ``reset_at`` and retry
        ├── AuthError             credentials missing, expired beyond refresh, or revoked
        └── PermanentError        the server rejected the request; retrying cannot help

Network errors keep the server's error name (``error``) and ``message`` when there is one.
"""

from __future__ import annotations

__all__ = [
    "ActionError",
    "AtsyncError",
    "AuthError",
    "BadSignature",
    "ClosedError",
    "DevPDSError",
    "InvalidSyntaxError",
    "MissingBlock",
    "NetworkError",
    "NotFoundError",
    "PermanentError",
    "RateLimitedError",
    "RecordError",
    "SchemaError",
    "SignerError",
    "TransactionError",
    "TransientError",
    "UnknownModelError",
    "ValidationError",
    "VerificationError",
]


class AtsyncError(Exception):
    """Base class of every error atsync raises on purpose."""


class SchemaError(AtsyncError):
    """A model schema, or a schema upgrade step, is malformed."""


class UnknownModelError(AtsyncError, KeyError):
    """A model name that the database schema does not define."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown model"


class NotFoundError(AtsyncError, KeyError):
    """``update()`` or ``merge()`` named a record that does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class ValidationError(AtsyncError, ValueError):
    """A value does not fit the schema: wrong type, null where not nullable, bad key."""


class RecordError(ValidationError):
    """A record breaks the atproto data model or its Lexicon."""


class ClosedError(AtsyncError):
    """The database or the app was used after it was closed."""


class TransactionError(AtsyncError):
    """A transaction was doomed or misused, or another App holds the writer lock."""


class ActionError(AtsyncError):
    """An action is unknown, or was registered or called wrongly."""


class SignerError(AtsyncError):
    """A signing key could not be created, loaded or used."""


class InvalidSyntaxError(AtsyncError, ValueError):
    """An atproto identifier (handle, DID, NSID, AT URI, TID, record key...) is malformed."""


class VerificationError(AtsyncError):
    """A signature, CID, CAR file or MST proof does not check out."""


class BadSignature(VerificationError):
    """A commit is not signed by the key it must be signed by (the account's signing key as
    its DID document names it now). Right after an account moved to another host, its head
    commit is still signed with the old key until the new host makes a commit."""


class MissingBlock(VerificationError):
    """A block that a comparison of two repository versions needs (``diff_trees``) is in
    none of its sources: the changes since a rev left it out. Read the whole repository."""


class DevPDSError(AtsyncError):
    """The local reference PDS could not be installed or started."""


class NetworkError(AtsyncError):
    """A call to a PDS or another service failed.

    ``error`` and ``message`` are the server's own error name and message, when it sent one;
    ``status`` is the HTTP status, or ``None`` when no response arrived.
    """

    def __init__(
        self,
        message: str,
        *,
        error: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.error = error
        self.message = message
        self.status = status


class TransientError(NetworkError):
    """Worth retrying after a backoff: connection failures, timeouts, 5xx."""


class RateLimitedError(TransientError):
    """The server asked us to slow down; ``reset_at`` is when to try again (Unix time)."""

    def __init__(
        self,
        message: str,
        *,
        reset_at: float | None = None,
        error: str | None = None,
        status: int | None = 429,
    ) -> None:
        super().__init__(message, error=error, status=status)
        self.reset_at = reset_at


class AuthError(NetworkError):
    """Credentials are missing, expired beyond refresh, or revoked: the user must log in."""


class PermanentError(NetworkError):
    """The server rejected the request itself; sending it again cannot succeed."""

"""Sync status: one immutable snapshot, replaced whenever anything in it changes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["INACTIVE_ERRORS", "RowState", "State", "SyncStatus", "WaitReason"]

# What a PDS answers about an account that is not active there (deactivated, taken down,
# or moved to another host).
INACTIVE_ERRORS = frozenset(
    {"RepoDeactivated", "RepoTakendown", "RepoSuspended", "AccountDeactivated", "AccountTakedown"}
)


class State(StrEnum):
    """What the engine is doing. A string enum: ``status.state == "idle"`` works too.

    ``waiting`` means writes are queued but held back on purpose — ``status.waiting_reason``
    says why (a ``WaitReason``) and ``status.resumes_at`` until when; it is never shown as
    ``idle``.
    """

    STOPPED = "stopped"  # no engine task runs (writes are still queued by the app)
    NEEDS_AUTH = "needs_auth"  # no session, or the session was revoked: log in
    IDLE = "idle"  # nothing queued, nothing to do
    WAITING = "waiting"  # queued writes held back: see waiting_reason and resumes_at
    PUSHING = "pushing"
    PULLING = "pulling"
    OFFLINE = "offline"  # the PDS did not answer; probed again every few seconds
    ERROR = "error"  # the last attempt failed (upload_error says how); retried with backoff


class WaitReason(StrEnum):
    """Why queued writes are held back (``SyncStatus.waiting_reason``)."""

    DEBOUNCE = "debounce"  # the push strategy waits for changes to pause or a batch to fill
    MANUAL = "manual"  # a Manual() strategy: pushed on push_now()
    RATE_LIMITED = "rate_limited"  # the PDS's RateLimit-*/429, or the rate budget
    BACKOFF = "backoff"  # retrying after a failure
    OFFLINE = "offline"  # the PDS did not answer
    NEEDS_AUTH = "needs_auth"  # log in (again)
    WRONG_ACCOUNT = "wrong_account"  # the session's account is not the database's


class RowState(StrEnum):
    """Where one row stands (``sync.row_state(model, key)``), for user interfaces."""

    LOCAL = "local"  # only on this device: never synced (or its record left the repository)
    PENDING = "pending"  # a change is queued for the PDS
    SYNCED = "synced"  # the PDS holds what this device holds
    FAILED = "failed"  # the PDS refused the change (a dead letter; see `atsync outbox`)
    CONFLICT = "conflict"  # the repository holds a different record that was not merged


@dataclass(frozen=True, slots=True)
class SyncStatus:
    """Where sync stands.

    ``pending``: writes queued for the PDS; ``failed``: dead letters; ``conflicts``: recorded
    conflicts; times are Unix seconds; ``has_synced``: a push or pull has completed at least
    once for this database (persisted); ``waiting_reason`` / ``resumes_at``: why and until when
    queued writes are held back (``resumes_at`` None: until something happens, e.g. a login);
    ``rate_limited_until``: writes are held back until then by the server or the rate budget;
    ``last_pulled_at`` / ``rev`` / ``download_error``: the last pull; ``rejected``: pulled
    records that were not applied (listed in ``_atsync_rejected``); ``blobs_missing`` /
    ``blob_error``: blobs rows reference that the store lacks, and why a fetch failed.
    """

    state: State = State.STOPPED
    pending: int = 0
    failed: int = 0
    conflicts: int = 0
    last_pushed_at: float | None = None
    last_pulled_at: float | None = None
    has_synced: bool = False
    upload_error: str | None = None
    download_error: str | None = None
    rate_limited_until: float | None = None
    did: str | None = None
    waiting_reason: WaitReason | None = None
    resumes_at: float | None = None
    rejected: int = 0  # pulled records not applied (forged, damaged, breaking the binding)
    rev: str | None = None  # the repository revision the local state includes
    pull_progress: tuple[int, int] | None = None  # (changes applied, total) of a long pull
    live: bool = False  # the PDS's event stream is connected (pull=Live())
    blobs_missing: int = 0  # blobs bound rows reference that the store lacks (not fetched yet)
    blob_error: str | None = None  # why the last fetch of a blob failed (tried again later)

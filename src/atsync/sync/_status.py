"""Sync status: one immutable snapshot, replaced whenever anything in it changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["State", "SyncStatus"]

State = Literal[
    "offline", "connecting", "needs_auth", "idle", "pushing", "pulling", "error", "stopped"
]


@dataclass(frozen=True, slots=True)
class SyncStatus:
    """Where sync stands.

    ``pending``: writes queued for the PDS; ``failed``: dead letters; ``conflicts``: recorded
    conflicts; times are Unix seconds; ``has_synced``: a push or pull has completed at least
    once for this database (persisted); ``rate_limited_until``: writes are held back until
    then by the rate budget or by the server.
    """

    state: State = "stopped"
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

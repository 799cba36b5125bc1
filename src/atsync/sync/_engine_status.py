"""The engine's status: one immutable ``SyncStatus``, replaced on every change, its
listeners and waiters, and the copy kept in the database for ``atsync status``."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import anyio

from .._errors import PermanentError
from ._outbox import Outbox
from ._status import State, SyncStatus

__all__ = ["StatusKeeper", "as_dict", "float_or_none"]

log = logging.getLogger("atsync.sync")


class StatusKeeper:
    """Mixed into ``ATSync``: everything about its ``status``."""

    outbox: Outbox
    _status: SyncStatus
    _status_changed: anyio.Event
    _listeners: list[Callable[[SyncStatus], None]]
    _persisted: tuple[Any, ...] | None
    _work_due: Callable[[], bool]

    def _init_status(self) -> None:
        self._listeners = []
        self._status_changed = anyio.Event()
        self._status = SyncStatus()
        self._persisted = None

    @property
    def _running(self) -> bool:
        raise NotImplementedError

    @property
    def status(self) -> SyncStatus:
        if self.outbox.db.closed:
            return self._status
        if not self._running:
            self._refresh_status()  # stopped: the app may have queued more since
            return self._status
        # Running: the engine counts when it wakes, which may be a moment after an action
        # returned; the counts are read now, so `pending` includes what was just queued.
        current = self._status
        pending, failed, conflicts = self.outbox.counts()
        if (pending, failed, conflicts) == (current.pending, current.failed, current.conflicts):
            return current
        return replace(current, pending=pending, failed=failed, conflicts=conflicts)

    def on_status(self, callback: Callable[[SyncStatus], None]) -> Callable[[], None]:
        """Call ``callback(status)`` on every change; returns a function that unsubscribes."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    async def status_changes(self) -> AsyncIterator[SyncStatus]:
        """Every status from now on (the current one first)."""
        while True:
            changed = self._status_changed
            yield self._status
            await changed.wait()

    async def wait_for_idle(self) -> SyncStatus:
        """Wait until the queue is empty and the engine idle — nothing it will start by
        itself left to do: the start-up comparison of the rows with what was synced has run,
        and no pull of the user's repository is due (a new device's first pull, a live
        event's); returns the status then. Followed repositories are not waited for:
        ``wait_pulled()`` does.

        Bound the wait with ``anyio.fail_after(seconds)`` around the call.
        """
        async for status in self.status_changes():
            if status.pending == 0 and status.state in (State.IDLE, State.STOPPED):
                pending, _, _ = self.outbox.counts()
                if pending == 0 and not self._work_due():
                    return status
        raise AssertionError("unreachable")

    async def wait_pushed(self, action_id: str) -> None:
        """Wait until the writes of action ``action_id`` are on the PDS.

        Raises ``PermanentError`` if one of them was rejected (it is in the dead letters).
        """
        async for _ in self.status_changes():
            pushed = self.outbox.is_pushed(action_id)
            if pushed is None:
                raise PermanentError(
                    f"a write of action {action_id} was rejected by the PDS; see "
                    "`atsync outbox` (dead letters)"
                )
            if pushed:
                return

    def _refresh_status(self, **changes: Any) -> None:
        pending, failed, conflicts = self.outbox.counts()
        rejected = self.outbox.rejected_count()
        fields: dict[str, Any] = dict(
            pending=pending,
            failed=failed,
            conflicts=conflicts,
            rejected=rejected,
            last_pushed_at=float_or_none(self.outbox.get_state("last_pushed_at")),
            last_pulled_at=float_or_none(self.outbox.get_state("last_pulled_at")),
            rev=self.outbox.get_state("pulled_rev"),
            has_synced=self.outbox.get_state("has_synced") == "1",
        )
        fields.update(changes)
        current = self._status
        new = SyncStatus(**{**as_dict(current), **fields})
        if new == current:
            return
        self._status = new
        self._persist(new)
        changed, self._status_changed = self._status_changed, anyio.Event()
        changed.set()
        for listener in list(self._listeners):
            try:
                listener(new)
            except Exception:
                log.exception("sync status listener raised")

    def _persist(self, status: SyncStatus) -> None:
        """Keep what another process (``atsync status``) needs to say why the queue waits."""
        shown = (
            status.state, status.waiting_reason, status.resumes_at, status.upload_error,
            status.blobs_missing, status.blob_error,
        )  # fmt: skip
        if shown == self._persisted:
            return
        self._persisted = shown
        value = json.dumps(
            {
                "state": str(status.state),
                "waiting_reason": status.waiting_reason and str(status.waiting_reason),
                "resumes_at": status.resumes_at,
                "upload_error": status.upload_error,
                "blobs_missing": status.blobs_missing,
                "blob_error": status.blob_error,
                "pid": os.getpid(),
                "at": time.time(),
            }
        )
        try:
            self.outbox.set_state("engine", value)
        except Exception:  # the status must never take the engine down
            log.exception("could not record the engine's status")


def float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def as_dict(status: SyncStatus) -> dict[str, Any]:
    return {name: getattr(status, name) for name in SyncStatus.__slots__}

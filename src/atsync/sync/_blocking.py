"""``SyncThread``: the sync engine for blocking code (scripts, notebooks, the CLI).

    with SyncThread(app, bindings={"notes": Binding("com.example.note")}) as sync:
        app.actions.create_note("hello")
        sync.wait_for_idle(timeout=30)

The engine runs on a private event loop in a background thread (``atsync._blocking.Portal``),
started by ``start()`` / ``with`` and stopped by ``stop()``; each method forwards to the
async ``ATSync``. Status callbacks run on that thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

import anyio

from .._blocking import Portal
from ..app import App
from ..db import BlobRef
from ._engine import ATSync
from ._follows import Origin
from ._status import RowState, SyncStatus

__all__ = ["SyncThread"]


class SyncThread:
    """Runs an ``ATSync`` on a background thread; takes the same arguments."""

    def __init__(self, app: App, **options: Any) -> None:
        self.engine = ATSync(app, **options)
        self._portal = Portal()
        self._task: Future[None] | None = None

    def start(self) -> SyncThread:
        if self._task is None:
            self._portal.start()
            self._task, _ = self._portal.portal.start_task(self.engine.run)
        return self

    def stop(self) -> None:
        """Stop the engine (queued writes stay queued for the next start)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(CancelledError):
                task.result()
        self._portal.close()

    def close(self) -> None:
        """Stop, and stop capturing local writes."""
        self.stop()
        self.engine.close()

    def __enter__(self) -> SyncThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def status(self) -> SyncStatus:
        return self.engine.status

    def on_status(self, callback: Callable[[SyncStatus], None]) -> Callable[[], None]:
        return self.engine.on_status(callback)

    def push_now(self) -> None:
        self.engine.push_now()

    def wait_for_idle(self, timeout: float | None = None) -> SyncStatus:
        """Block until the queue is empty and the engine idle (``ATSync.wait_for_idle``;
        ``TimeoutError`` after ``timeout`` seconds)."""

        async def wait() -> SyncStatus:
            with anyio.fail_after(timeout):
                return await self.engine.wait_for_idle()

        return self._portal.call(wait)

    def wait_pushed(self, action_id: str, timeout: float | None = None) -> None:
        """Block until the action's writes are on the PDS."""

        async def wait() -> None:
            with anyio.fail_after(timeout):
                await self.engine.wait_pushed(action_id)

        self._portal.call(wait)

    def retry_dead_letters(self) -> int:
        return self.engine.retry_dead_letters()

    def row_state(self, model: str, key: str) -> RowState:
        return self.engine.row_state(model, key)

    def pull_now(self) -> None:
        self.engine.pull_now()

    def wait_pulled(self, timeout: float | None = None) -> SyncStatus:
        """Pull, and block until the local state includes the repository's head as of now."""

        async def wait() -> SyncStatus:
            with anyio.fail_after(timeout):
                return await self.engine.wait_pulled()

        return self._portal.call(wait)

    def follow(self, who: str) -> str:
        """Follow a repository by DID or handle (``ATSync.follow``); returns its DID."""
        return self._portal.call(self.engine.follow, who)

    def unfollow(self, who: str) -> bool:
        """Stop following (``ATSync.unfollow``), on the engine's thread."""

        async def unfollow() -> bool:
            return self.engine.unfollow(who)

        return self._portal.call(unfollow)

    def fetch_blob(
        self, ref: BlobRef, *, did: str | None = None, timeout: float | None = None
    ) -> bytes:
        """The blob's bytes, downloaded if the store lacks them (``ATSync.fetch_blob``)."""

        async def fetch() -> bytes:
            with anyio.fail_after(timeout):
                return await self.engine.fetch_blob(ref, did=did)

        return self._portal.call(fetch)

    @property
    def follow_errors(self) -> dict[str, str]:
        """DID -> the last failure of its pull (``ATSync.follow_errors``)."""
        return dict(self.engine.follow_errors)

    @property
    def following(self) -> list[str]:
        return self.engine.following

    def origin(self, model: str, key: str) -> Origin | None:
        return self.engine.origin(model, key)

    def start_fresh(self) -> None:
        self.engine.start_fresh()

"""The engine's pull bookkeeping: when the next pull is due, and what the event stream
tells it (mixed into ``ATSync``; see ``_live`` and ``_steps.StepRunner.pull``)."""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from ..atproto import FirehoseFrame
from ..db import ModelDB
from ._outbox import Outbox
from ._puller import Puller
from ._strategies import Live, Manual, PullStrategy

if TYPE_CHECKING:
    from ._engine import SessionLike
    from ._steps import StepRunner

__all__ = ["MAX_EVENTS", "PullEvents"]

log = logging.getLogger("atsync.sync")
MAX_EVENTS = 1000  # #commit events held for the next pull; beyond, it reads the whole repo


class PullEvents:
    """Mixed into ``ATSync``: pull scheduling and the event stream's callbacks."""

    outbox: Outbox
    pull_strategy: PullStrategy
    _db: ModelDB
    _puller: Puller | None
    _runner: StepRunner | None
    _last_pull: float | None
    _stream_up: bool
    _pull_forced: bool
    _resync_due: bool
    _clock: Callable[[], float]
    _current_session: Callable[[], SessionLike | None]
    _events: deque[FirehoseFrame]
    _events_lost: bool
    _account_inactive: str | None
    _on_host_stream: Callable[[str, bool], None]
    _on_other: Callable[[str | None, str, str], None]
    _wake: Callable[[], None]
    _refresh_status: Callable[..., None]

    async def _checkpoint_if_due(self) -> None:
        """After a whole repository's rows were applied and their waiters told: the WAL its
        load left (``ModelDB.checkpoints_deferred``) moves into the file in a worker thread,
        once no other load is running. Shielded: bounded work, and an engine stopped right
        after should not leave it to the app's next write."""
        db = self._db
        if db.checkpoint_due and not db.checkpoints_are_deferred:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(db.checkpoint)

    def _work_due(self) -> bool:
        """Whether the running engine will start work by itself now: the start-up comparison
        (``_resync_due``), or a pull of the user's repository that is asked for or due."""
        runner = self._runner
        if runner is None or self._current_session() is None:
            return False  # stopped, or nothing can start before a login (needs_auth says so)
        if self._resync_due:
            return True
        return self._pulls() and (self._pull_forced or self._pull_at(runner) <= self._clock())

    def _pulls(self) -> bool:
        return self._puller is not None and bool(self._puller.collections)

    def _pull_at(self, runner: StepRunner) -> float:
        if not self._pulls():
            return math.inf
        at = self.pull_strategy.pull_at(self._last_pull, self._stream_up)
        if runner.pull_retry_at is not None:
            at = max(at, runner.pull_retry_at) if at < math.inf else runner.pull_retry_at
        return at

    def _stream_session(self) -> SessionLike | None:
        runner = self._runner
        return runner.session if runner is not None and not runner.wrong_account else None

    def _on_repo_event(self, frame: FirehoseFrame | None) -> None:
        runner = self._runner
        if frame is not None and frame.type == "#identity" and runner is not None:
            runner.forget_identity()  # a new signing key or PDS: resolve afresh
        if frame is not None and frame.type == "#account":
            active = frame.body.get("active")
            self._account_inactive = (
                None if active is True else str(frame.body.get("status") or "inactive")
            )
        if frame is None or frame.type != "#commit" or len(self._events) >= MAX_EVENTS:
            self._events_lost = True  # the next pull reads the whole repository
        else:
            self._events.append(frame)
        self._pull_forced = True
        self._wake()

    def _on_bad_frame(self, reason: str) -> None:
        runner, puller = self._runner, self._puller
        did = runner.session.did if runner is not None and runner.session else None
        try:
            self.outbox.set_state("stream_cursor", None)
            if puller is not None and did is not None:
                puller.reject_all(did, "MalformedFrame", reason)
        except Exception:  # a hint failed: the next pull still reads the repository
            log.exception("could not record a malformed frame")
        self._refresh_status()

    def _pulls_after_login(self) -> bool:
        """A login pulls: every strategy but Manual, unless the stream resumes from its cursor."""
        return not isinstance(self.pull_strategy, Manual) and not self._resumes_stream()

    def _resumes_stream(self) -> bool:
        """Live, with a stored stream position: the stream replays what was missed."""
        return isinstance(self.pull_strategy, Live) and self._stream_cursor() is not None

    def _stream_cursor(self) -> int | None:
        value = self.outbox.get_state("stream_cursor")
        if value is None:
            return None
        # A position counts one host's events: after the account moved, resumed at the new
        # host it would skip whatever that host sent below it.
        kept_for, host = self.outbox.get_state("stream_host"), self._own_host()
        if kept_for is not None and host is not None and kept_for != host:
            return None
        try:
            return int(value)
        except ValueError:
            return None  # damaged: read the whole repository once instead

    def _on_stream(self, up: bool) -> None:
        self._stream_up = up
        host = self._own_host()
        if up and host is not None and self.outbox.get_state("stream_host") != host:
            # Connected to another host (or the first time): positions stored from now on
            # are its. Events still held from the old host would store theirs, so they go;
            # the connect without a position makes the next pull read what they carried.
            self._events.clear()
            self.outbox.set_state("stream_host", host)
        if host is not None:
            self._on_host_stream(host, up)  # it carries followed accounts on this host too
        self._refresh_status(live=up)
        self._wake()

    def _own_host(self) -> str | None:
        session = self._stream_session()
        return None if session is None else str(session.pds_url).rstrip("/")

    def _on_own_host_event(self, did: str | None, kind: str) -> None:
        host = self._own_host()
        if host is not None:
            self._on_other(did, host, kind)

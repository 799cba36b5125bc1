"""Live queries told of pulled rows at a pace their re-runs can afford.

A whole read or a catch-up applies its rows in chunks of 1,000, one commit each, and many
followed repositories are read at once. Told after every commit, a live query over the whole
model re-reads every row so far each time: a backfill of 20 followed repositories re-read the
table 20 times and took twice the CPU of the backfill alone (quadratic in the rows). So a
telling is followed by a pause ``COST_FACTOR`` times as long as it took (re-running the
queries and their callbacks): changes committed by pulls meanwhile are held, and told when
it is over, all in one go — by the engine's task (``run``), and in full before
``wait_pulled()`` returns and when the engine stops. The re-runs then
take at most about a tenth of the time. A cheap query (a filter, a ``limit``) pauses for
next to nothing, so its rows are told as they land, one live event at a time; an expensive
one is told less often during a burst. Live events applied from the stream, and every other
write, are told at once, as ever.

One per engine, shared by the pulls of the user's repository and of those followed, all on
the event loop's thread. Without ``run`` (a puller used alone) each pull ends with a flush.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import anyio

from .._errors import ClosedError
from ..db import ModelDB

__all__ = ["COST_FACTOR", "PacedDelivery"]

COST_FACTOR = 9  # after a telling, a pause this many times as long as it took

log = logging.getLogger("atsync.sync")


class PacedDelivery:
    """Changes held back from live queries (``ModelDB.changes_held``), told when due."""

    def __init__(self, db: ModelDB, clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._clock = clock
        self._held: list[object] = []
        self._due = 0.0  # nothing told yet: the first changes go at once
        self._wake: anyio.Event | None = None  # set while ``run`` is running

    def add(self, changes: list[object]) -> None:
        """Changes a pull committed: told now if the pace allows, else when due."""
        self._held.extend(changes)
        if self._clock() >= self._due:
            self.flush()
        elif self._held and self._wake is not None:
            self._wake.set()

    def pull_ended(self) -> None:
        """A pull is over: without ``run``, nothing would tell what it left held."""
        if self._wake is None:
            self.flush()

    def flush(self) -> None:
        """Tell every held change now."""
        held, self._held = self._held, []
        if not held:
            return
        start = self._clock()
        try:
            self._db.deliver(held)
        finally:
            end = self._clock()
            self._due = end + COST_FACTOR * (end - start)

    async def run(self) -> None:
        """Until cancelled (in the engine's task group): tell held changes when due; at the
        end, whatever is still held."""
        try:
            while True:
                self._wake = anyio.Event()
                if not self._held:
                    await self._wake.wait()
                    continue
                await anyio.sleep(max(0.0, self._due - self._clock()))
                try:
                    self.flush()
                except Exception:
                    # A query that cannot be re-run now (the disk failing under it): said,
                    # and the engine goes on; the next change re-runs it.
                    log.exception("telling live queries of pulled rows failed")
        finally:
            self._wake = None
            with contextlib.suppress(ClosedError):  # the app closed its database first
                self.flush()

"""The rate budget: pace writes below the hosted PDS's limits.

Bluesky's hosted PDSes allow 5,000 points an hour and 35,000 a day per account; a create
costs 3, an update 2, a delete 1, and applyWrites costs the sum of its writes. With this
budget the engine spends before each push and holds writes back (state ``waiting``, reason
``rate_limited``) when a push would overrun it. Spending is persisted, so a restart does not
reset it.

By default (``ATSync(budget=None)``) the engine paces itself with ``RateBudget.hosted()``
only when the session's PDS is one of Bluesky's hosts (``is_hosted``); any other PDS is not
paced by us. Whatever the budget, the PDS's own answers are obeyed: its ``RateLimit-*``
headers and a 429's ``Retry-After``.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["COSTS", "HOSTED_SUFFIXES", "RateBudget", "is_hosted"]

COSTS = {"create": 3, "update": 2, "delete": 1}
HOUR, DAY = 3600.0, 86400.0
# Bluesky's PDS hosts (the entryway and its *.host.bsky.network PDSes).
HOSTED_SUFFIXES = ("bsky.social", "bsky.network")


def is_hosted(pds_url: str) -> bool:
    """Whether ``pds_url`` is one of Bluesky's hosted PDSes (whose limits are published)."""
    host = (urlsplit(pds_url).hostname or "").lower().rstrip(".")
    return any(host == s or host.endswith("." + s) for s in HOSTED_SUFFIXES)


@dataclass
class RateBudget:
    """Points per hour and per day (``None``: unlimited). ``RateBudget.off()`` disables it."""

    per_hour: int | None = 5000
    per_day: int | None = 35000
    clock: Callable[[], float] = field(default=time.time, repr=False)
    _spent: deque[tuple[float, int]] = field(default_factory=deque, repr=False)

    @classmethod
    def off(cls) -> RateBudget:
        return cls(per_hour=None, per_day=None)

    @classmethod
    def hosted(cls) -> RateBudget:
        """The published limits of Bluesky's hosted PDSes: 5,000 points/hour, 35,000/day."""
        return cls(per_hour=5000, per_day=35000)

    @staticmethod
    def cost(ops: Iterable[str]) -> int:
        return sum(COSTS[op] for op in ops)

    def _prune(self, now: float) -> None:
        while self._spent and self._spent[0][0] <= now - DAY:
            self._spent.popleft()

    def _used(self, now: float, window: float) -> int:
        return sum(points for t, points in self._spent if t > now - window)

    def wait_for(self, points: int) -> float:
        """Seconds until ``points`` can be spent within both windows (0: now)."""
        now = self.clock()
        self._prune(now)
        wait = 0.0
        for limit, window in ((self.per_hour, HOUR), (self.per_day, DAY)):
            if limit is None:
                continue
            points = min(points, limit)  # a batch larger than a window waits for a full one
            excess = self._used(now, window) + points - limit
            for t, spent in self._spent:
                if excess <= 0:
                    break
                if t > now - window:
                    excess -= spent
                    wait = max(wait, t + window - now)
        return wait

    def spend(self, points: int) -> None:
        self._spent.append((self.clock(), points))

    def dumps(self) -> str:
        return json.dumps(list(self._spent))

    def loads(self, data: str | None) -> None:
        """Restore what ``dumps`` saved; damaged data is dropped (counted as nothing spent:
        the PDS's own headers still hold the engine back if that was too optimistic)."""
        if not data:
            return
        try:
            self._spent = deque((float(t), int(p)) for t, p in json.loads(data))
        except (ValueError, TypeError):
            self._spent = deque()
        self._prune(self.clock())

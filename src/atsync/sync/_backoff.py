"""One retry schedule for the whole engine: capped exponential backoff with full jitter.

Every failing stream (push, pull, the watchdog) shares it, so a PDS that is down sees one
client backing off, not several retrying on their own clocks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 60.0
    failures: int = 0
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """Record a failure and return how long to wait: uniform in [0, min(cap, base*2^n)]."""
        ceiling = min(self.cap, self.base * (2 ** min(self.failures, 30)))
        self.failures += 1
        return self._random.uniform(0, ceiling)

    def succeeded(self) -> None:
        self.failures = 0

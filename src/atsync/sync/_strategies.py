"""Strategies: when queued writes go out (push), and when the repository is read (pull).

Push (``ATSync(push=...)``, ``Binding(strategy=...)``):

    Immediate()             as soon as a change is committed
    Debounce(seconds)       once changes have paused for ``seconds`` (default: 0.5)
    Batch(n, max_delay)     when ``n`` writes are queued, or ``max_delay`` after the first
    Interval(seconds)       every ``seconds`` while anything is queued
    Manual()                only on ``push_now()``

Whatever the strategy, a push also starts on login and on reconnect, and a queue that is not
empty is retried on the engine's backoff schedule without waiting for a new local change.

Pull (``ATSync(pull=...)``):

    Live(fallback=5.0)      as soon as the PDS's event stream says the repository changed;
                            every ``fallback`` seconds while the stream is down
    Poll(seconds)           every ``seconds`` (a cheap ``getLatestCommit`` when nothing moved)
    OnStart()               once when the engine starts
    Manual()                only on ``pull_now()`` / ``wait_pulled()``

Every strategy pulls once at start (Manual excepted), and after a login.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._errors import ValidationError

__all__ = [
    "Batch",
    "Debounce",
    "Immediate",
    "Interval",
    "Live",
    "Manual",
    "OnStart",
    "Poll",
    "PullStrategy",
    "Queue",
    "Strategy",
]


@dataclass(frozen=True, slots=True)
class Queue:
    """What a strategy decides on, for one collection (times are ``time.monotonic()``)."""

    first_change: float  # the oldest local change not pushed yet
    last_change: float  # the newest one
    last_push: float  # when this collection was last pushed (0: never)
    pending: int  # writes waiting


class Strategy:
    """Decides when the next push is due; the engine asks after every change and wake-up."""

    def due_at(self, queue: Queue) -> float:
        """Monotonic time at which to push (``math.inf``: not until something happens)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Immediate(Strategy):
    def due_at(self, queue: Queue) -> float:
        return queue.first_change


@dataclass(frozen=True)
class Debounce(Strategy):
    seconds: float = 0.5

    def __post_init__(self) -> None:
        _positive("Debounce(seconds)", self.seconds, allow_zero=True)

    def due_at(self, queue: Queue) -> float:
        return queue.last_change + self.seconds


@dataclass(frozen=True)
class Batch(Strategy):
    n: int = 50
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValidationError(f"Batch(n) must be a positive integer, got {self.n!r}")
        _positive("Batch(max_delay)", self.max_delay, allow_zero=True)

    def due_at(self, queue: Queue) -> float:
        if queue.pending >= self.n:
            return queue.first_change
        return queue.first_change + self.max_delay


@dataclass(frozen=True)
class Interval(Strategy):
    seconds: float = 10.0

    def __post_init__(self) -> None:
        _positive("Interval(seconds)", self.seconds)

    def due_at(self, queue: Queue) -> float:
        return max(queue.first_change, queue.last_push + self.seconds)


class PullStrategy:
    """Decides when the next pull is due."""

    def pull_at(self, last_pull: float | None, stream_up: bool) -> float:
        """Monotonic time of the next pull, given the last one (None: not yet in this run)
        and whether the event stream is up (``math.inf``: not until asked)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Manual(Strategy, PullStrategy):
    def due_at(self, queue: Queue) -> float:
        return math.inf

    def pull_at(self, last_pull: float | None, stream_up: bool) -> float:
        return math.inf


@dataclass(frozen=True)
class Live(PullStrategy):
    fallback: float = 5.0

    def __post_init__(self) -> None:
        _positive("Live(fallback)", self.fallback)

    def pull_at(self, last_pull: float | None, stream_up: bool) -> float:
        if last_pull is None:
            return 0.0
        return math.inf if stream_up else last_pull + self.fallback


@dataclass(frozen=True)
class Poll(PullStrategy):
    seconds: float = 30.0

    def __post_init__(self) -> None:
        _positive("Poll(seconds)", self.seconds)

    def pull_at(self, last_pull: float | None, stream_up: bool) -> float:
        return 0.0 if last_pull is None else last_pull + self.seconds


@dataclass(frozen=True)
class OnStart(PullStrategy):
    def pull_at(self, last_pull: float | None, stream_up: bool) -> float:
        return 0.0 if last_pull is None else math.inf


def _positive(what: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValidationError(f"{what} must be a positive number of seconds, got {value!r}")

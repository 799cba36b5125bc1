"""The engine's one decision: given what it knows and the time, what to do next.

    decide(now, facts) -> Resync() | Pull() | Push(collections) | Reconcile() | Fence()
                          | Wait(until, reason)

A pure function of its arguments (no I/O, no clock of its own), so the whole schedule can be
checked in microseconds with made-up facts; the engine gathers the facts, runs the step, and
folds its outcome back into the facts. ``Wait(until=inf, reason=None)`` is the idle state:
nothing queued, nothing to do until an event (a local change, a login, a write from another
process, the repository's event stream) wakes the engine, or the next pull is due.

The order of the checks is the policy: compare local state first (no network); nothing goes
out before an unknown outcome is settled; a due pull comes before a push, so that another
device's edits are merged locally before ours go out (and the push is sent against the
pulled commit instead of failing with ``InvalidSwap``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._status import WaitReason
from ._strategies import Queue, Strategy

__all__ = ["Facts", "Fence", "Pull", "Push", "Reconcile", "Resync", "Step", "Wait", "decide"]


@dataclass(frozen=True, slots=True)
class Resync:
    """Compare the bound models with what was last synced; queue what differs."""


@dataclass(frozen=True, slots=True)
class Pull:
    """Bring the bound models up to the repository's head (merging queued local edits)."""


@dataclass(frozen=True, slots=True)
class Push:
    """Send queued writes: of these collections, or all (None)."""

    collections: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Reconcile:
    """Settle an unknown outcome against the PDS before anything is sent again."""


@dataclass(frozen=True, slots=True)
class Fence:
    """Move the repo with an empty commit so a late copy of an unheard request cannot land."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep until ``until`` (monotonic; ``inf``: until woken). ``reason`` None is idle."""

    until: float
    reason: WaitReason | None = None


Step = Resync | Pull | Push | Reconcile | Fence | Wait


@dataclass(frozen=True, slots=True)
class Facts:
    """What the engine knows when it decides (times are monotonic seconds)."""

    logged_in: bool = False
    wrong_account: bool = False  # the session's DID is not the one this database syncs with
    auth_failed: bool = False  # the PDS refused the session: wait for a login or retry_at
    resync_due: bool = False  # at start: the local state was not compared yet
    queues: Mapping[str, Queue] = field(default_factory=dict)  # pending, per collection
    strategies: Mapping[str, Strategy] = field(default_factory=dict)  # per collection
    default_strategy: Strategy | None = None
    forced: bool = False  # push_now(): everything, whatever the strategies say
    # A login, a start with writes left from before, writes queued by another process: what
    # any strategy would push at all goes now (a Manual() collection still waits).
    eager: bool = False
    retry_at: float | None = None  # after a failure or a rate limit: not before then
    retry_reason: WaitReason = WaitReason.BACKOFF
    retry_collections: frozenset[str] | None = None  # what the failed push carried
    needs_reconcile: bool = False
    fence_needed: bool = False
    pull_at: float = math.inf  # when the pull strategy wants the next pull
    pull_forced: bool = False  # pull_now(), wait_pulled(), the event stream, a login


def decide(now: float, facts: Facts) -> Step:
    """The next step. See the module docstring; the order of the checks is the policy."""
    if facts.resync_due:
        return Resync()  # needs no network: runs before login, too
    if not facts.logged_in:
        return Wait(math.inf, WaitReason.NEEDS_AUTH)
    if facts.auth_failed and (facts.retry_at is None or facts.retry_at > now):
        # Refused by the PDS: a new login wakes us; the same session is tried again rarely.
        return Wait(facts.retry_at if facts.retry_at is not None else math.inf,
                    WaitReason.NEEDS_AUTH)  # fmt: skip
    if facts.wrong_account:
        return Wait(math.inf, WaitReason.WRONG_ACCOUNT)
    pull_due = facts.pull_forced or facts.pull_at <= now
    if not (facts.queues or facts.fence_needed or facts.needs_reconcile or pull_due):
        return Wait(facts.pull_at)  # idle until the next pull
    if facts.retry_at is not None and facts.retry_at > now:
        return Wait(facts.retry_at, facts.retry_reason)
    if facts.needs_reconcile:
        return Reconcile()
    if pull_due:
        return Pull()
    if not facts.queues:
        return Fence() if facts.fence_needed else Wait(facts.pull_at)
    if facts.forced:
        return Push()
    if facts.retry_at is not None:
        return Push(facts.retry_collections)
    earliest, due = math.inf, set()
    for collection, queue in facts.queues.items():
        strategy = facts.strategies.get(collection, facts.default_strategy)
        at = math.inf if strategy is None else strategy.due_at(queue)
        if facts.eager and at < math.inf:
            at = now
        earliest = min(earliest, at)
        if at <= now:
            due.add(collection)
    if due:
        return Push(frozenset(due))
    reason = WaitReason.MANUAL if earliest == math.inf else WaitReason.DEBOUNCE
    return Wait(min(earliest, facts.pull_at), reason)

"""Push strategies, the shared backoff and the rate budget: pure scheduling decisions."""

from __future__ import annotations

import math
import random

import pytest

from atsync._errors import ValidationError
from atsync.sync import Backoff, Batch, Debounce, Immediate, Interval, Manual, RateBudget
from atsync.sync._strategies import Queue


def q(first: float = 10.0, last: float = 12.0, last_push: float = 0.0, pending: int = 3) -> Queue:
    return Queue(first, last, last_push, pending)


def test_strategies_decide_when_a_push_is_due() -> None:
    assert Immediate().due_at(q()) == 10.0
    assert Debounce(0.5).due_at(q()) == 12.5  # half a second after the last change
    assert Batch(3, 5.0).due_at(q(pending=3)) == 10.0  # full: now
    assert Batch(4, 5.0).due_at(q(pending=3)) == 15.0  # else max_delay after the first
    assert Interval(10).due_at(q(last_push=8.0)) == 18.0
    assert Interval(10).due_at(q(last_push=-50.0)) == 10.0
    assert Manual().due_at(q()) == math.inf


@pytest.mark.parametrize(
    "make",
    [
        lambda: Debounce(-1),
        lambda: Batch(0),
        lambda: Batch(2, math.nan),
        lambda: Interval(0),
        lambda: Batch(True),
    ],  # type: ignore[arg-type]
)
def test_bad_strategy_parameters_are_refused(make: object) -> None:
    with pytest.raises(ValidationError):
        make()  # type: ignore[operator]


def test_backoff_is_full_jitter_exponential_capped_and_resets() -> None:
    backoff = Backoff(base=0.5, cap=8.0, _random=random.Random(7))
    ceilings = [0.5, 1, 2, 4, 8, 8, 8]
    delays = [backoff.next_delay() for _ in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    backoff.succeeded()
    assert backoff.next_delay() <= 0.5


def test_rate_budget_paces_within_the_hour_and_persists() -> None:
    now = [1_000_000.0]
    budget = RateBudget(per_hour=100, per_day=1000, clock=lambda: now[0])
    assert budget.cost(["create", "update", "delete"]) == 6
    assert budget.wait_for(90) == 0
    budget.spend(90)
    now[0] += 60
    assert budget.wait_for(10) == 0
    assert budget.wait_for(11) == pytest.approx(3600 - 60)  # the first spend must age out
    restored = RateBudget(per_hour=100, per_day=1000, clock=lambda: now[0])
    restored.loads(budget.dumps())
    assert restored.wait_for(11) == pytest.approx(3600 - 60)
    now[0] += 3600
    assert restored.wait_for(100) == 0
    assert RateBudget.off().wait_for(10**9) == 0

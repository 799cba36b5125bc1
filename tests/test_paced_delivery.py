"""Live queries told of pulled rows at a pace (atsync.sync._paced): at once when the pace
allows, else when due — at most every 0.25 s or nine times the last telling's cost — by the
engine's task, and everything when it stops (or, without it, at the end of a pull). A clock
the test moves stands in for time where it can; the database is real."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from atsync.db import ModelDB
from atsync.sync._paced import COST_FACTOR, MIN_INTERVAL, PacedDelivery


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Iterator[ModelDB]:
    with ModelDB.open(tmp_path / "paced.db", {"notes": {"id": "primary", "n": "integer"}}) as db:
        yield db


def commit(db: ModelDB, first: int, count: int) -> list[object]:
    """Rows written as a pull writes them: committed, their changes held back."""
    held: list[object] = []
    with db.changes_held(held), db.transaction():
        db.set_many("notes", [{"id": f"r{i:05d}", "n": i} for i in range(first, first + count)])
    return held


def test_the_first_changes_go_at_once_then_at_most_every_interval_and_all_at_flush(
    db: ModelDB,
) -> None:
    clock = Clock()
    seen: list[int] = []
    db.subscribe("notes", lambda rows: seen.append(len(rows)), initial=False)
    paced = PacedDelivery(db, clock)
    paced.add(commit(db, 0, 10))
    assert seen == [10]  # the first chunk: a screen shows rows arriving
    clock.now += MIN_INTERVAL / 2
    paced.add(commit(db, 10, 10))
    paced.add(commit(db, 20, 10))
    assert seen == [10]  # not due: held
    clock.now += MIN_INTERVAL
    paced.add(commit(db, 30, 10))
    assert seen == [10, 40]  # due: everything held, one re-run
    paced.add(commit(db, 40, 10))
    assert seen == [10, 40]
    paced.pull_ended()  # no engine task runs it: the pull's end tells what is held
    assert seen == [10, 40, 50]
    paced.flush()  # nothing held: nothing told
    assert seen == [10, 40, 50]


def test_a_costly_query_is_told_less_often(db: ModelDB) -> None:
    clock = Clock()
    seen: list[int] = []

    def slow_screen(rows: list[object]) -> None:
        seen.append(len(rows))
        clock.now += 1.0  # re-running and drawing took a second

    db.subscribe("notes", slow_screen, initial=False)
    paced = PacedDelivery(db, clock)
    paced.add(commit(db, 0, 5))
    assert seen == [5]
    clock.now += COST_FACTOR * 1.0 - 0.01  # not yet nine times the telling's cost
    paced.add(commit(db, 5, 5))
    assert seen == [5]
    clock.now += 0.02
    paced.add(commit(db, 10, 5))
    assert seen == [5, 15]


def test_changes_no_query_watches_cost_nothing_and_writes_outside_are_told_at_once(
    db: ModelDB,
) -> None:
    clock = Clock()
    paced = PacedDelivery(db, clock)
    held = commit(db, 0, 100)
    assert held == []  # no live query on the model: no change is even recorded
    paced.add(held)
    seen: list[int] = []
    db.subscribe("notes", lambda rows: seen.append(len(rows)), initial=False)
    paced.add(commit(db, 100, 1))
    assert seen == [101]
    paced.add(commit(db, 101, 1))  # held: not due
    db.set("notes", {"id": "app", "n": -1})  # the app's own write, outside: told at once
    assert seen == [101, 103]  # with the committed rows the pull has not told yet
    paced.flush()  # nothing new for the query: its results are the same, no call
    assert seen == [101, 103]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_engines_task_tells_what_is_held_when_due_and_the_rest_when_it_stops(
    db: ModelDB,
) -> None:
    seen: list[int] = []
    told = [anyio.Event()]

    def screen(rows: list[object]) -> None:
        seen.append(len(rows))
        told[-1].set()

    db.subscribe("notes", screen, initial=False)
    paced = PacedDelivery(db)  # the real clock: the task sleeps until due
    async with anyio.create_task_group() as tg:
        tg.start_soon(paced.run)
        await anyio.wait_all_tasks_blocked()
        paced.add(commit(db, 0, 5))
        assert seen == [5]  # the pace was free: at once
        told.append(anyio.Event())
        paced.add(commit(db, 5, 5))
        paced.pull_ended()  # the engine's task tells it, when due
        assert seen == [5]
        with anyio.fail_after(10):
            await told[-1].wait()
        assert seen == [5, 10]
        paced.add(commit(db, 10, 5))  # not due for MIN_INTERVAL at least
        assert seen == [5, 10]
        tg.cancel_scope.cancel()  # the engine stops
    assert seen == [5, 10, 15]

"""Live queries told of pulled rows at a pace (atsync.sync._paced): after a telling, a pause
nine times as long as it took; changes committed meanwhile are held and told when it is
over — by the engine's task, and everything when it stops (or, without it, at the end of a
pull). A clock the test moves stands in for time; the database is real."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync.db import ModelDB
from atsync.sync._paced import COST_FACTOR, PacedDelivery


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Iterator[ModelDB]:
    with ModelDB.open(tmp_path / "paced.db", {"notes": {"id": "primary", "n": "integer"}}) as db:
        yield db


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def commit(db: ModelDB, first: int, count: int) -> list[object]:
    """Rows written as a pull writes them: committed, their changes held back."""
    held: list[object] = []
    with db.changes_held(held), db.transaction():
        db.set_many("notes", [{"id": f"r{i:05d}", "n": i} for i in range(first, first + count)])
    return held


def screen(
    clock: Clock, seen: list[int], cost: float, told: list[anyio.Event] | None = None
) -> Callable[[list[dict[str, Any]]], None]:
    """A live query's callback whose re-run and drawing take ``cost`` seconds; it sets the
    last of ``told`` (append a new one to await the next call)."""

    def draw(rows: list[dict[str, Any]]) -> None:
        seen.append(len(rows))
        clock.now += cost
        if told:
            told[-1].set()

    return draw


@asynccontextmanager
async def engine_task(
    db: ModelDB, cost: float
) -> AsyncIterator[tuple[PacedDelivery, list[int], list[anyio.Event], anyio.abc.TaskGroup]]:
    """A screen whose re-run takes ``cost`` seconds, and the pacing with its engine task
    running (cancel the task group to stop the engine): (paced, seen, told, task group)."""
    clock = Clock()
    seen: list[int] = []
    told = [anyio.Event()]
    db.subscribe("notes", screen(clock, seen, cost, told), initial=False)
    paced = PacedDelivery(db, clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(paced.run)
        await anyio.wait_all_tasks_blocked()
        paced.add(commit(db, 0, 5))
        assert seen == [5]  # at once
        yield paced, seen, told, tg


def test_a_cheap_query_is_told_of_every_chunk_as_it_lands(db: ModelDB) -> None:
    clock = Clock()
    seen: list[int] = []
    db.subscribe("notes", screen(clock, seen, 0.0), initial=False)
    paced = PacedDelivery(db, clock)
    for n in range(3):
        paced.add(commit(db, 10 * n, 10))
    assert seen == [10, 20, 30]  # one live event at a time, without delay


def test_a_costly_query_pauses_for_nine_times_its_cost_and_then_hears_of_all_held(
    db: ModelDB,
) -> None:
    clock = Clock()
    seen: list[int] = []
    db.subscribe("notes", screen(clock, seen, 1.0), initial=False)  # a second to redraw
    paced = PacedDelivery(db, clock)
    paced.add(commit(db, 0, 5))
    assert seen == [5]  # nothing told before: at once
    clock.now += COST_FACTOR * 1.0 - 0.01
    paced.add(commit(db, 5, 5))
    paced.add(commit(db, 10, 5))
    assert seen == [5]  # within the pause: held
    clock.now += 0.02
    paced.add(commit(db, 15, 5))
    assert seen == [5, 20]  # over: everything held, one re-run
    paced.add(commit(db, 20, 5))
    assert seen == [5, 20]
    paced.pull_ended()  # no engine task runs it: the pull's end tells what is held
    assert seen == [5, 20, 25]
    paced.flush()  # nothing held: nothing told
    assert seen == [5, 20, 25]


def test_changes_no_query_watches_cost_nothing_and_writes_outside_are_told_at_once(
    db: ModelDB,
) -> None:
    clock = Clock()
    paced = PacedDelivery(db, clock)
    held = commit(db, 0, 100)
    assert held == []  # no live query on the model: no change is even recorded
    paced.add(held)
    seen: list[int] = []
    db.subscribe("notes", screen(clock, seen, 1.0), initial=False)
    paced.add(commit(db, 100, 1))
    assert seen == [101]
    paced.add(commit(db, 101, 1))  # held: within the pause
    db.set("notes", {"id": "app", "n": -1})  # the app's own write, outside: told at once
    assert seen == [101, 103]  # with the committed rows the pull has not told yet
    paced.flush()  # nothing new for the query: its results are the same, no call
    assert seen == [101, 103]


@pytest.mark.anyio
async def test_the_engines_task_tells_what_is_held_when_due_and_the_rest_when_it_stops(
    db: ModelDB,
) -> None:
    # the task sleeps 9 x 0.02 s after each telling
    async with engine_task(db, 0.02) as (paced, seen, told, tg):
        told.append(anyio.Event())
        paced.add(commit(db, 5, 5))
        paced.pull_ended()  # the engine's task tells it, when due
        assert seen == [5]
        with anyio.fail_after(10):
            await told[-1].wait()
        assert seen == [5, 10]
        paced.add(commit(db, 10, 5))  # within the pause again
        assert seen == [5, 10]
        tg.cancel_scope.cancel()  # the engine stops
    assert seen == [5, 10, 15]


@pytest.mark.anyio
async def test_a_query_failing_in_the_engines_task_is_logged_and_the_task_goes_on(
    db: ModelDB, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with engine_task(db, 0.01) as (paced, seen, told, tg):
        real_run_query = db.run_query
        failed = anyio.Event()

        def broken(query: object) -> object:
            failed.set()
            raise OSError("disk I/O error, as it were")

        monkeypatch.setattr(db, "run_query", broken)
        paced.add(commit(db, 5, 5))  # held; the task's telling fails
        with anyio.fail_after(10):
            await failed.wait()
            await anyio.wait_all_tasks_blocked()
        assert "telling live queries of pulled rows failed" in caplog.text
        monkeypatch.setattr(db, "run_query", real_run_query)
        paced.add(commit(db, 10, 5))  # due (the failed telling cost no time): told at once
        assert seen == [5, 15]
        told.append(anyio.Event())
        paced.add(commit(db, 15, 5))  # within the pause: for the task, which is still there
        assert seen == [5, 15]
        with anyio.fail_after(10):
            await told[-1].wait()
        assert seen == [5, 15, 20]
        tg.cancel_scope.cancel()

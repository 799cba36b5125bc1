"""Live queries fire with fresh results after a commit that changes them, and only then."""

from __future__ import annotations

from pathlib import Path

import pytest

from atsync.db import ModelDB

MODELS = {
    "tasks": {"id": "primary", "title": "string", "done": "boolean", "tags": "@tags[]"},
    "tags": {"id": "primary"},
}


@pytest.fixture
def db(tmp_path: Path) -> ModelDB:
    database = ModelDB.open(tmp_path / "s.db", MODELS)
    yield database
    database.close()


def task(key: str, done: bool = False, **extra: object) -> dict:
    return {"id": key, "title": key.upper(), "done": done, **extra}


def test_fires_initially_and_after_a_relevant_commit(db: ModelDB) -> None:
    seen: list[list[str]] = []
    db.subscribe("tasks", lambda rows: seen.append([r["id"] for r in rows]), where={"done": False})
    db.set("tasks", task("a"))
    db.set("tasks", task("b"))
    db.set("tasks", task("a", done=True))  # leaves the result set
    db.delete("tasks", "b")
    assert seen == [[], ["a"], ["a", "b"], ["b"], []]


def test_does_not_fire_for_writes_that_cannot_change_the_results(db: ModelDB) -> None:
    seen: list[list[dict]] = []
    db.subscribe("tasks", seen.append, where={"done": False}, initial=False)
    db.set("tasks", task("x", done=True))  # outside the filter
    db.set("tags", {"id": "t1"})  # another model
    db.set("tasks", task("x", done=True))  # same again
    assert seen == []
    db.set("tasks", task("y"))
    db.set("tasks", task("y"))  # identical rewrite: results unchanged
    assert len(seen) == 1


def test_fires_once_per_transaction_and_never_for_a_rollback(db: ModelDB) -> None:
    seen: list[list[dict]] = []
    db.subscribe("tasks", seen.append, initial=False)
    with db.transaction():
        for key in "abc":
            db.set("tasks", task(key))
    assert len(seen) == 1 and len(seen[0]) == 3
    with pytest.raises(RuntimeError), db.transaction():
        db.set("tasks", task("d"))
        raise RuntimeError
    with db.transaction():
        with pytest.raises(RuntimeError), db.transaction():
            db.set("tasks", task("e"))
            raise RuntimeError
    assert len(seen) == 1


def test_limit_offset_order_and_relations_are_respected(db: ModelDB) -> None:
    seen: list[list[str]] = []
    db.subscribe(
        "tasks",
        lambda rows: seen.append([r["id"] for r in rows]),
        order_by={"title": "desc"},
        limit=2,
        offset=1,
        initial=False,
    )
    for key in "abcd":
        db.set("tasks", task(key))
    assert seen[-1] == ["c", "b"]
    tag_seen: list[list] = []
    db.subscribe(
        "tasks", lambda r: tag_seen.append(r), where={"id": "a"}, select=["tags"], initial=False
    )
    db.update("tasks", {"id": "a", "tags": ["t1"]})
    assert tag_seen == [[{"id": "a", "tags": ["t1"]}]]


def test_cancel_stops_callbacks_and_a_failing_callback_does_not_break_writes(db: ModelDB) -> None:
    calls: list[int] = []

    def broken(rows: list[dict]) -> None:
        calls.append(len(rows))
        raise RuntimeError("subscriber bug")

    sub = db.subscribe("tasks", broken, initial=False)
    db.set("tasks", task("a"))
    assert db.get("tasks", "a") is not None
    sub.cancel()
    db.set("tasks", task("b"))
    assert calls == [1]
    assert not sub.active


def test_clear_notifies(db: ModelDB) -> None:
    db.set("tasks", task("a"))
    seen: list[list[dict]] = []
    with db.subscribe("tasks", seen.append, initial=False):
        db.clear("tasks")
    assert seen == [[]]


def test_changes_held_in_a_worker_thread_are_told_in_the_thread_that_delivers_them(
    db: ModelDB,
) -> None:
    import threading

    seen: list[tuple[list[str], str]] = []

    def callback(rows: list[dict]) -> None:
        seen.append(([r["id"] for r in rows], threading.current_thread().name))

    db.subscribe("tasks", callback, initial=False)
    held: list[object] = []

    def worker() -> None:
        with db.changes_held(held):
            with db.transaction():
                db.set("tasks", task("a"))
            db.set("tasks", task("b"))  # a transaction of its own: held too

    thread = threading.Thread(target=worker, name="applier")
    thread.start()
    thread.join()
    assert seen == [] and len(held) == 2  # committed, not told yet
    assert {r["id"] for r in db.query("tasks")} == {"a", "b"}
    db.deliver(held)
    assert seen == [(["a", "b"], threading.current_thread().name)]
    db.set("tasks", task("c"))  # outside changes_held: told at once, as always
    assert seen[-1][0] == ["a", "b", "c"]


def test_set_many_on_a_watched_model_fires_once_with_what_left_and_entered_the_results(
    tmp_path: Path,
) -> None:
    """One statement for the batch, live query or not: the rows before are read in one go,
    so a row that leaves the filter is still noticed."""
    with ModelDB.open(tmp_path / "m.db", {"notes": {"id": "primary", "done": "boolean"}}) as db:
        seen: list[list[str]] = []
        db.subscribe(
            "notes", lambda rows: seen.append([r["id"] for r in rows]), where={"done": False},
            initial=False,
        )  # fmt: skip
        assert db.set_many("notes", [{"id": "a", "done": False}, {"id": "b", "done": False}]) == 2
        assert seen == [["a", "b"]]
        db.set_many("notes", [{"id": "a", "done": True}])  # leaves the results
        assert seen[-1] == ["b"]
        # The same key twice: the second write is the row's state.
        db.set_many("notes", [{"id": "c", "done": True}, {"id": "c", "done": False}])
        assert seen[-1] == ["b", "c"] and len(seen) == 3
        db.set_many("notes", [{"id": "b", "done": True}, {"id": "x", "done": True}])
        assert seen[-1] == ["c"] and len(seen) == 4
        with pytest.raises(RuntimeError), db.transaction():
            db.set_many("notes", [{"id": "d", "done": False}])
            raise RuntimeError
        assert len(seen) == 4 and db.get("notes", "d") is None

"""Contracts and actions: one transaction per action, its log entry, batches, replay."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from atsync._errors import ActionError, TransactionError, ValidationError
from atsync.app import ActionContext, App, Contract

contract = Contract(
    models={
        "notes": {"id": "primary", "title": "string", "author": "string", "at": "integer"},
        "counters": {"id": "primary", "value": "integer"},
    }
)


@contract.action
def create_note(ctx: ActionContext, title: str) -> str:
    key = ctx.tid()
    ctx.db.set("notes", {"id": key, "title": title, "author": ctx.did, "at": ctx.timestamp})
    return key


@contract.action
def bump(ctx: ActionContext, name: str, by: int = 1) -> int:
    current = ctx.db.get("counters", name)
    value = (current["value"] if current else 0) + by
    ctx.db.set("counters", {"id": name, "value": value})
    return value


@contract.action(name="fail_after_write")
def _fail(ctx: ActionContext, title: str) -> None:
    ctx.db.set("notes", {"id": "doomed", "title": title, "author": ctx.did, "at": 0})
    raise RuntimeError("action failed")


@contract.action
def bad_write(ctx: ActionContext) -> None:
    ctx.db.set("notes", {"id": "x", "title": 5, "author": "a", "at": 0})


@pytest.fixture
def app(tmp_path: Path) -> App:
    opened = App.open(tmp_path / "app.db", contract)
    yield opened
    opened.close()


def test_action_writes_and_logs_in_one_transaction(app: App) -> None:
    result = app.actions.create_note("hello")
    note = app.db.get("notes", result.result)
    assert note is not None and note["title"] == "hello" and note["author"] == app.did
    entry = app.log.get(result.id)
    assert entry is not None
    assert (entry.name, entry.args, entry.kwargs, entry.author) == (
        "create_note",
        ["hello"],
        {},
        app.did,
    )
    assert app.did.startswith("did:key:z")


def test_context_ids_sort_and_tids_are_unique(app: App) -> None:
    results = [app.actions.create_note(f"n{i}") for i in range(50)]
    ids = [r.id for r in results]
    keys = [r.result for r in results]
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert len(set(ids) | set(keys)) == 100  # record keys never collide with action ids
    assert all(len(k) == 13 for k in keys)


def test_failing_action_rolls_back_writes_and_log_entry(app: App) -> None:
    app.actions.bump("c")
    with pytest.raises(RuntimeError, match="action failed"):
        app.actions.fail_after_write("t")
    with pytest.raises(ValidationError):
        app.actions.bad_write()
    assert app.db.get("notes", "doomed") is None
    assert [e.name for e in app.log] == ["bump"]
    assert app.actions.bump("c").result == 2


def test_batch_commits_all_or_none(app: App) -> None:
    with app.batch():
        app.actions.bump("a")
        app.actions.bump("a", by=10)
    assert app.db.get("counters", "a") == {"id": "a", "value": 11}
    with pytest.raises(RuntimeError), app.batch():
        app.actions.bump("a")
        app.actions.fail_after_write("t")
    assert app.db.get("counters", "a") == {"id": "a", "value": 11}
    # Even when the action's exception is caught inside the batch, the batch is undone.
    with pytest.raises(TransactionError, match="fail_after_write"), app.batch():
        app.actions.bump("a")
        try:
            app.actions.fail_after_write("t")
        except RuntimeError:
            pass
    assert app.db.get("counters", "a") == {"id": "a", "value": 11}
    assert len(app.log) == 2


def test_app_db_is_read_only(app: App) -> None:
    with pytest.raises(ActionError, match="read-only"):
        app.db.set("notes", {"id": "x"})
    with pytest.raises(ActionError, match="read-only"):
        app.db.delete("notes", "x")


def test_unknown_actions_bad_arguments_and_nesting_are_refused(app: App) -> None:
    with pytest.raises(AttributeError, match="no action named 'nope'"):
        app.actions.nope()
    with pytest.raises(ActionError, match="no action named 'nope'"):
        app.actions["nope"]
    with pytest.raises(ActionError, match="must be JSON values"):
        app.actions.create_note(object())
    nested = Contract(models={"m": {"id": "primary"}})

    @nested.action
    def outer(ctx: ActionContext) -> None:
        inner_app.actions.inner()

    @nested.action
    def inner(ctx: ActionContext) -> None:
        pass

    with App.open(":memory:", nested) as inner_app:
        with pytest.raises(ActionError, match="inside another action"):
            inner_app.actions.outer()
        assert len(inner_app.log) == 0


def test_contract_rejects_bad_actions() -> None:
    c = Contract(models={"m": {"id": "primary"}})
    with pytest.raises(ActionError, match="context as its first parameter"):
        c.action(name="no_ctx")(lambda: None)
    with pytest.raises(ActionError, match="is async"):

        @c.action
        async def later(ctx: Any) -> None: ...

    @c.action
    def same(ctx: Any) -> None: ...

    with pytest.raises(ActionError, match="already registered"):
        c.action(name="same")(lambda ctx: None)
    with pytest.raises(ActionError, match="Python identifier"):
        c.action(name="no-dash")(lambda ctx: None)


def test_rebuild_reproduces_the_same_state(app: App, tmp_path: Path) -> None:
    for i in range(20):
        app.actions.create_note(f"n{i}")
        app.actions.bump("k", by=i)
    with app.batch():
        app.actions.bump("batch")
        app.actions.create_note("in batch")

    def dump() -> dict[str, list[dict]]:
        return {m: app.db.query(m) for m in ("notes", "counters")}

    before = dump()
    raw = sqlite3.connect(tmp_path / "app.db")
    raw.execute("delete from counters where id = 'k'")  # state drifts from the log
    raw.commit()
    assert dump() != before
    assert app.rebuild() == 42
    assert dump() == before


def test_clock_is_monotonic_when_the_wall_clock_steps_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = time.time_ns()
    now = [real]
    monkeypatch.setattr(time, "time_ns", lambda: now[0])
    with App.open(tmp_path / "c.db", contract) as app:
        first = app.actions.create_note("a").id
        now[0] = real - 3_600 * 10**9  # an hour back
        second = app.actions.create_note("b").id
        assert second > first
    with App.open(tmp_path / "c.db", contract) as app:  # and after a restart
        third = app.actions.create_note("c").id
        assert third > second


def test_state_and_log_survive_reopening(tmp_path: Path) -> None:
    with App.open(tmp_path / "r.db", contract) as app:
        did = app.did
        app.actions.bump("x")
    with App.open(tmp_path / "r.db", contract) as app:
        assert app.did == did  # the same key, from the key file
        assert app.actions.bump("x").result == 2
        assert app.log.verify() == 2


def test_one_app_at_a_time_appends_to_a_database(tmp_path: Path) -> None:
    from atsync._errors import TransactionError
    from atsync.db import ModelDB

    first = App.open(tmp_path / "w.db", contract)
    with pytest.raises(TransactionError, match=r"already open in an App \(pid \d+\)"):
        App.open(tmp_path / "w.db", contract)
    with ModelDB.open_existing(tmp_path / "w.db") as reader:  # readers need no lock
        assert reader.count("notes") == 0
    first.close()
    with App.open(tmp_path / "w.db", contract) as second:
        assert second.actions.bump("x").result == 1

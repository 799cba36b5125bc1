"""Transactions: all or nothing, savepoints for nesting, one writer at a time across threads."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from atsync._errors import TransactionError
from atsync.db import ModelDB

MODELS = {"items": {"id": "primary", "n": "integer"}}


@pytest.fixture
def db(tmp_path: Path) -> ModelDB:
    database = ModelDB.open(tmp_path / "t.db", MODELS)
    yield database
    database.close()


def keys(db: ModelDB) -> list[str]:
    return [r["id"] for r in db.query("items")]


def test_exception_rolls_back_every_write_of_the_transaction(db: ModelDB) -> None:
    with pytest.raises(RuntimeError), db.transaction():
        db.set("items", {"id": "a", "n": 1})
        db.set("items", {"id": "b", "n": 2})
        raise RuntimeError("boom")
    assert keys(db) == []


def test_nested_transactions_are_savepoints(db: ModelDB) -> None:
    with db.transaction():
        db.set("items", {"id": "outer", "n": 1})
        with pytest.raises(ValueError), db.transaction():
            db.set("items", {"id": "inner", "n": 2})
            raise ValueError
        with db.transaction():
            db.set("items", {"id": "kept", "n": 3})
        assert keys(db) == ["kept", "outer"]
    assert keys(db) == ["kept", "outer"]


def test_uncommitted_writes_are_invisible_to_other_connections(db: ModelDB, tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "t.db")
    with db.transaction():
        db.set("items", {"id": "a", "n": 1})
        assert other.execute("select count(*) from items").fetchone() == (0,)
    assert other.execute("select count(*) from items").fetchone() == (1,)


def test_a_transaction_is_seen_whole_by_other_threads(db: ModelDB) -> None:
    inside = threading.Event()
    counts: list[int] = []

    def reader() -> None:
        inside.wait(timeout=10)
        counts.append(db.count("items"))  # blocks until the writer commits

    thread = threading.Thread(target=reader)
    thread.start()
    with db.transaction():
        db.set("items", {"id": "a", "n": 1})
        inside.set()
        db.set("items", {"id": "b", "n": 2})
    thread.join(timeout=10)
    assert counts == [2]


def test_concurrent_writers_from_threads_lose_nothing(db: ModelDB) -> None:
    def writer(prefix: str) -> None:
        for i in range(200):
            with db.transaction():
                db.set("items", {"id": f"{prefix}{i}", "n": i})

    threads = [threading.Thread(target=writer, args=(p,)) for p in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert db.count("items") == 800


def test_doomed_transaction_rolls_back_at_its_end(db: ModelDB) -> None:
    with pytest.raises(TransactionError, match="rolled back because step 2 failed"):
        with db.transaction():
            db.set("items", {"id": "a", "n": 1})
            db.fail_transaction("step 2 failed")
    assert keys(db) == []
    with pytest.raises(TransactionError):
        db.fail_transaction("outside")


def test_before_commit_hook_failure_rolls_back(db: ModelDB) -> None:
    def refuse() -> None:
        raise RuntimeError("hook says no")

    db.before_commit.append(refuse)
    with pytest.raises(RuntimeError, match="hook says no"), db.transaction():
        db.set("items", {"id": "a", "n": 1})
    db.before_commit.remove(refuse)
    assert keys(db) == []
    db.set("items", {"id": "b", "n": 1})
    assert keys(db) == ["b"]

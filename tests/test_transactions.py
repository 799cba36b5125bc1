"""Transactions: all or nothing, savepoints for nesting, one writer at a time across threads."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from atsync._errors import TransactionError
from atsync.db import ModelDB, _transactions
from atsync.db._transactions import BULK_WAL_BYTES

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


def _pages(path: Path) -> tuple[int, int]:
    """(pages in the database file, pages in its WAL): what a checkpoint has moved shows as
    the file's growth."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size // 4096, (wal.stat().st_size if wal.exists() else 0) // 4096


def test_checkpoints_deferred_leave_bulk_writes_in_the_wal_until_checkpoint(
    db: ModelDB, tmp_path: Path
) -> None:
    def autocheckpoint() -> int:
        (value,) = db.connection.execute("PRAGMA wal_autocheckpoint").fetchone()
        return int(value)

    bound = BULK_WAL_BYTES // 4096
    assert autocheckpoint() == 1000
    rows = [{"id": f"k{i:05}" + "x" * 200, "n": i} for i in range(20_000)]  # ~2,000 pages
    with db.checkpoints_deferred():
        assert autocheckpoint() == bound and db.checkpoints_are_deferred
        with db.checkpoints_deferred():  # nested (or a concurrent bulk load): one restore
            pass
        assert autocheckpoint() == bound and not db.checkpoint_due
        for start in range(0, len(rows), 1000):
            db.set_many("items", rows[start : start + 1000])  # a commit each
    assert autocheckpoint() == 1000
    assert db.checkpoint_due and not db.checkpoints_are_deferred
    in_file, in_wal = _pages(tmp_path / "t.db")
    assert in_wal > 1000  # past the automatic threshold, and none of it moved yet
    assert in_file < 100
    assert db.count("items") == 20_000  # readers see the rows all the same
    db.checkpoint()  # from another connection, so it may run on another thread
    in_file, _ = _pages(tmp_path / "t.db")
    assert in_file > 1000
    assert not db.checkpoint_due


def test_a_bulk_load_below_the_automatic_threshold_leaves_no_checkpoint_due(db: ModelDB) -> None:
    """SQLite would not have checkpointed it either: the next automatic checkpoint will."""
    with db.checkpoints_deferred():
        db.set_many("items", [{"id": f"k{i}", "n": i} for i in range(100)])
    assert not db.checkpoint_due and not db.checkpoints_are_deferred


def test_checkpoints_deferred_still_checkpoint_a_wal_past_the_bulk_bound(
    db: ModelDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However long a bulk load runs, its WAL does not grow without bound."""
    monkeypatch.setattr(_transactions, "BULK_WAL_BYTES", 1500 * 4096)
    rows = [{"id": f"k{i:05}" + "x" * 200, "n": i} for i in range(20_000)]  # ~2,000 pages
    with db.checkpoints_deferred():
        for start in range(0, len(rows), 1000):
            db.set_many("items", rows[start : start + 1000])
        in_file, _ = _pages(tmp_path / "t.db")
        assert in_file > 1000  # checkpointed once the WAL passed 1,500 pages


def test_checkpoint_of_a_database_in_memory_does_nothing() -> None:
    with ModelDB.open(":memory:", MODELS) as memory:
        with memory.checkpoints_deferred():
            memory.set("items", {"id": "a", "n": 1})
        memory.checkpoint()
        assert memory.count("items") == 1


def test_checkpoint_does_not_create_a_database_that_is_gone(db: ModelDB, tmp_path: Path) -> None:
    (tmp_path / "t.db").rename(tmp_path / "moved.db")
    db.checkpoint()
    assert not (tmp_path / "t.db").exists()


def test_waiting_threads_counts_the_threads_waiting_for_the_database(db: ModelDB) -> None:
    """A long job done in chunks asks it, to pause between two only while someone waits."""
    started, done = threading.Event(), threading.Event()

    def other() -> None:
        started.set()
        with db.transaction():  # waits for this thread's transaction
            db.set("items", {"id": "theirs", "n": 2})
        done.set()

    with db.transaction():
        db.set("items", {"id": "mine", "n": 1})
        assert db.waiting_threads == 0
        with db.transaction():  # this thread's own lock, taken again: nobody waits
            assert db.waiting_threads == 0
        thread = threading.Thread(target=other)
        thread.start()
        started.wait(5)
        deadline = time.monotonic() + 5
        while db.waiting_threads == 0 and time.monotonic() < deadline:
            time.sleep(0.001)  # polling a counter another thread sets: no event to await
        assert db.waiting_threads == 1 and not done.is_set()
    thread.join(5)
    assert done.is_set() and db.waiting_threads == 0
    assert keys(db) == ["mine", "theirs"]

"""Captured puts are held and queued many per statement, with nothing observable changed.

Capture holds a transaction's puts in memory and ModelDB writes them (``ModelDB.defer``)
before the commit, before a savepoint, and before anything reads or writes the sync tables
in that transaction. These tests check that the tables come out exactly as when every put
is queued at once (``_CHUNK = 1``), for any mix of writes, deletes, rolled-back savepoints,
pushes, dead letters and remote states; and that reads inside the transaction see the
held puts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atsync.app import ActionContext, App, Contract
from atsync.atproto._cbor import cid_for_record
from atsync.sync import ATSync, Binding, Manual, _capture
from atsync.sync._outbox import DEAD, OUTBOX, RECORDS

COLLECTION = "test.atsync.held"
TID_COLLECTION = "test.atsync.heldtid"

contract = Contract(
    models={
        "notes": {"id": "primary", "title": "string", "n": "integer"},
        "drafts": {"id": "primary", "title": "string"},
    }
)


@contract.action
def put(ctx: ActionContext, key: str, title: str) -> None:
    ctx.db.set("notes", {"id": key, "title": title, "n": len(title)})


@contract.action
def drop(ctx: ActionContext, key: str) -> None:
    ctx.db.delete("notes", key)


@contract.action
def draft(ctx: ActionContext, key: str, title: str) -> None:
    ctx.db.set("drafts", {"id": key, "title": title})


def attach(app: App) -> ATSync:
    return ATSync(
        app,
        bindings={
            "notes": Binding(COLLECTION),
            "drafts": Binding(TID_COLLECTION, rkey="tid"),
        },
        push=Manual(),
    )


def snapshot(app: App) -> tuple[list[Any], list[Any], list[Any]]:
    # seq values may differ (an upsert may use up an AUTOINCREMENT value): compare the order.
    db = app.model_db
    outbox = db.execute(
        f"SELECT collection, rkey, op, record, cid, model, key, version, attempted, attempts, "
        f"sent_op, sent_cid FROM {OUTBOX} ORDER BY seq"
    ).fetchall()
    records = db.execute(f"SELECT collection, rkey, model, key, cid FROM {RECORDS} ORDER BY 1, 2")
    dead = db.execute(f"SELECT collection, rkey, op, record, cid FROM {DEAD} ORDER BY seq")
    return outbox, records.fetchall(), dead.fetchall()


TITLES = ["a", "b", "c"]
KEYS = ["k0", "k1", "k2", "k3"]
write = st.tuples(
    st.sampled_from(["put", "put", "put", "drop", "draft"]),
    st.sampled_from(KEYS),
    st.sampled_from(TITLES),
)
# A batch of writes, a savepoint inside it (rolled back or not), or a step of the push side.
batch = st.tuples(
    st.just("batch"), st.lists(write, max_size=12), st.lists(write, max_size=4), st.booleans()
)
push_side = st.tuples(
    st.sampled_from(["attempt", "land", "dead", "remote"]),
    st.sampled_from(KEYS),
    st.sampled_from(TITLES),
)
programs = st.lists(st.one_of(batch, push_side), max_size=12)


def run_write(app: App, step: tuple[str, str, str]) -> None:
    what, key, title = step
    getattr(app.actions, what)(*((key,) if what == "drop" else (key, title)))


def run(app: App, sync: ATSync, program: list[Any]) -> None:
    outbox = sync.outbox
    for step in program:
        if step[0] == "batch":
            _, writes, inner, rolled_back = step
            with app.batch():
                for w in writes:
                    run_write(app, w)
                # A savepoint (ModelDB writes, not actions: an action that raises inside a
                # batch dooms the whole batch) that may roll back.
                try:
                    with app.model_db.transaction():
                        for what, key, title in inner:
                            if what == "drop":
                                app.model_db.delete("notes", key)
                            else:
                                app.model_db.set("notes", {"id": key, "title": title, "n": 0})
                        if rolled_back:
                            raise KeyError("roll back the savepoint")
                except KeyError:
                    pass
                for w in writes[::-1]:
                    run_write(app, w)
            continue
        what, key, title = step
        queued = [w for w in outbox.next_batch() if w.rkey == key]
        if what == "attempt" and queued:
            outbox.mark_attempted(queued)
        elif what == "land" and queued:
            outbox.mark_attempted(queued)
            outbox.complete(queued)
        elif what == "dead" and queued:
            outbox.dead_letter(queued[0], "InvalidRecord", "refused")
        elif what == "remote":
            # The PDS holds this very state (the CID capture computes for it).
            cid = cid_for_record({"$type": COLLECTION, "title": title, "n": len(title)})
            with app.model_db.transaction():
                app.model_db.connection.execute(
                    f"INSERT INTO {RECORDS} (collection, rkey, model, key, cid) "
                    "VALUES (?, ?, 'notes', ?, ?) "
                    "ON CONFLICT (collection, rkey) DO UPDATE SET cid = excluded.cid",
                    (COLLECTION, key, key, cid),
                )


def _enqueue_each(self: _capture.Capture) -> None:
    """The reference: each held put through Outbox.enqueue, the path test_outbox_capture
    checks against the coalescing rules (with _CHUNK = 1, as each put is made)."""
    held, self._held[:] = self._held[:], []
    for put in held:
        self._outbox.enqueue(*put)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs, chunk=st.sampled_from([1, 2, 3, 100]))
def test_held_puts_leave_what_immediate_puts_leave(
    tmp_path_factory: pytest.TempPathFactory, program: list[Any], chunk: int
) -> None:
    results = []
    for size in (0, chunk):  # 0: the reference, every put queued as it is made
        path = tmp_path_factory.mktemp("held") / "app.db"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_capture, "_CHUNK", max(size, 1))
            if size == 0:
                patch.setattr(_capture.Capture, "_write_held", _enqueue_each)
            with App.open(path, contract) as app:
                sync = attach(app)
                run(app, sync, program)
                # tid record keys differ between the two runs: compare which rows got one.
                outbox, records, dead = snapshot(app)
                outbox = [
                    r if r[0] == COLLECTION else (r[0], "tid", *r[2:4], "", *r[5:]) for r in outbox
                ]
                results.append((outbox, records, dead))
                sync.close()
    assert results[0] == results[1]


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with App.open(tmp_path / "app.db", contract) as app:
        yield app


def test_reads_inside_the_transaction_see_the_held_puts(app: App) -> None:
    sync = attach(app)
    with app.batch():
        app.actions.put("k1", "a")
        app.actions.put("k2", "b")
        assert sync.outbox.counts() == (2, 0, 0)
        # Queued by key: a tid-keyed row keeps the record key of its first write.
        app.actions.draft("d1", "x")
        app.actions.draft("d1", "y")
        assert sync.outbox.counts() == (3, 0, 0)
        app.actions.drop("k1")  # a create never sent: dropped, in order
        assert [w.rkey for w in sync.outbox.next_batch()][:1] == ["k2"]
    assert sync.outbox.counts() == (2, 0, 0)
    sync.close()


def test_a_rolled_back_savepoint_drops_only_its_own_puts(app: App) -> None:
    sync = attach(app)
    db = app.model_db
    with app.batch():
        app.actions.put("k1", "a")
        with pytest.raises(KeyError), db.transaction():
            db.set("notes", {"id": "k2", "title": "b", "n": 1})
            # Written inside the savepoint by this read: k1, from before it, must survive.
            assert sync.outbox.counts() == (2, 0, 0)
            raise KeyError("undo")
        db.set("notes", {"id": "k3", "title": "c", "n": 1})
    assert sorted(w.rkey for w in sync.outbox.next_batch()) == ["k1", "k3"]
    sync.close()


def test_a_failed_batch_queues_nothing(app: App) -> None:
    sync = attach(app)
    with pytest.raises(RuntimeError), app.batch():
        for i in range(250):  # some already written in chunks of 100
            app.actions.put(f"k{i}", "a")
        raise RuntimeError("give up")
    assert sync.outbox.counts() == (0, 0, 0)
    app.actions.put("k1", "a")
    assert sync.outbox.counts() == (1, 0, 0)
    sync.close()


def test_closing_sync_inside_a_transaction_queues_what_is_held(app: App) -> None:
    sync = attach(app)
    with app.batch():
        app.actions.put("k1", "a")
        sync.close()
        app.actions.put("k2", "b")  # no longer captured
    rows = app.model_db.execute(f"SELECT rkey FROM {OUTBOX}").fetchall()
    assert rows == [("k1",)]


def test_closing_sync_waits_for_another_threads_transaction(app: App) -> None:
    sync = attach(app)
    started, release = threading.Event(), threading.Event()

    def writer() -> None:
        with app.batch():
            app.actions.put("k1", "a")
            started.set()
            release.wait(5)

    thread = threading.Thread(target=writer)
    thread.start()
    started.wait(5)
    closer = threading.Thread(target=sync.close)
    closer.start()
    release.set()
    thread.join(5)
    closer.join(5)
    rows = app.model_db.execute(f"SELECT rkey FROM {OUTBOX}").fetchall()
    assert rows == [("k1",)]


def test_a_capture_attached_inside_a_rolled_back_transaction_queues_nothing_of_it(
    app: App,
) -> None:
    attach(app).close()  # the sync tables exist before the transaction
    with pytest.raises(RuntimeError), app.batch():
        sync = attach(app)
        app.actions.put("k1", "a")
        raise RuntimeError("undo")
    app.actions.put("k2", "b")
    assert [w.rkey for w in sync.outbox.next_batch()] == ["k2"]
    sync.close()

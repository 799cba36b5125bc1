"""The state syncs, not only the changes: rows the sync tables do not know are queued.

Every test works on real SQLite files: rows are written by an App with no engine attached
(or while one was detached), then an ``ATSync`` is attached and the scan run. Pushes are
simulated by marking queued writes as landed (``Outbox.mark_attempted`` + ``complete``).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from atsync import RecordError
from atsync.app import ActionContext, App, Contract
from atsync.atproto._cbor import cid_for_record
from atsync.atproto._syntax import is_valid_tid
from atsync.sync import ATSync, Binding, Manual, Transform
from atsync.sync._outbox import OUTBOX, Outbox
from atsync.sync._resync import ResyncScan, queue_unsynced

NOTES = "test.atsync.resync.note"
TAGS = "test.atsync.resync.tag"

contract = Contract(
    models={
        "notes": {"id": "primary", "title": "string", "n": "integer", "done": "boolean"},
        "tags": {"id": "primary", "label": "string"},
        "other": {"id": "primary", "v": "integer"},
    }
)


@contract.action
def put_note(ctx: ActionContext, key: str, title: str, n: int = 0, done: bool = False) -> None:
    ctx.db.set("notes", {"id": key, "title": title, "n": n, "done": done})


@contract.action
def put_notes(ctx: ActionContext, first: int, count: int) -> None:
    for i in range(first, first + count):
        ctx.db.set("notes", {"id": f"n{i:06}", "title": f"title {i}", "n": i, "done": False})


@contract.action
def drop_note(ctx: ActionContext, key: str) -> None:
    ctx.db.delete("notes", key)


@contract.action
def put_tag(ctx: ActionContext, key: str, label: str) -> None:
    ctx.db.set("tags", {"id": key, "label": label})


@contract.action
def put_other(ctx: ActionContext, key: str, v: int) -> None:
    ctx.db.set("other", {"id": key, "v": v})


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "app.db"


def attach(app: App, **bindings: Binding) -> ATSync:
    return ATSync(app, bindings=bindings or {"notes": Binding(NOTES)}, push=Manual())


def scan(sync: ATSync, **options: Any) -> ResyncScan:
    app = sync.app
    assert app is not None
    return queue_unsynced(app, sync.outbox, sync.bindings, **options)


def land_everything(outbox: Outbox) -> None:
    """What a push does once the PDS answered: every queued write is on the PDS."""
    while batch := outbox.next_batch():
        outbox.mark_attempted(batch)
        outbox.complete(batch)


def queued(sync: ATSync) -> dict[str, tuple[str, str, str | None]]:
    """The outbox by model key: (rkey, op, cid)."""
    rows = sync.outbox._db.execute(f"SELECT key, rkey, op, cid FROM {OUTBOX} ORDER BY seq")
    return {key: (rkey, op, cid) for key, rkey, op, cid in rows}


def expected_cid(sync: ATSync, model: str, row: Mapping[str, Any]) -> str:
    return cid_for_record(sync.bindings[model].to_record(row))


# -- an app that adds sync later, a newly bound model ---------------------------------------


def test_an_app_that_adds_sync_later_queues_every_row_once(path: Path) -> None:
    with App.open(path, contract) as app:
        for i in range(20):
            app.actions.put_note(f"k{i}", f"title {i}", i, i % 2 == 0)
    with App.open(path, contract) as app:
        sync = attach(app)
        first = scan(sync)
        assert (first.queued, first.deletes, first.failures) == (20, 0, [])
        found = queued(sync)
        assert len(found) == 20
        for row in app.db.query("notes"):
            rkey, op, cid = found[row["id"]]
            # Encoded exactly as capture encodes a local write: the same CID.
            assert (rkey, op, cid) == (row["id"], "create", expected_cid(sync, "notes", row))
        assert scan(sync).queued == 0  # a second start: everything is queued already
        land_everything(sync.outbox)
        assert scan(sync).queued == 0  # and once pushed, everything is on the PDS
        sync.close()
    with App.open(path, contract) as app:  # a later run of the app
        sync = attach(app)
        assert scan(sync).queued == 0
        assert sync.outbox.counts()[0] == 0
        sync.close()


def test_a_newly_bound_model_has_its_rows_queued(path: Path) -> None:
    with App.open(path, contract) as app:
        sync = attach(app)
        app.actions.put_note("k1", "synced from the start")
        app.actions.put_tag("t1", "one")
        app.actions.put_tag("t2", "two")
        land_everything(sync.outbox)
        sync.close()
        # The next release binds tags too.
        sync = attach(app, notes=Binding(NOTES), tags=Binding(TAGS))
        result = scan(sync)
        assert result.queued == 2
        assert {k: op for k, (_, op, _) in queued(sync).items()} == {"t1": "create", "t2": "create"}
        sync.close()


def test_only_pushed_bindings_are_scanned(path: Path) -> None:
    with App.open(path, contract) as app:
        app.actions.put_note("k1", "x")
        app.actions.put_tag("t1", "y")
        sync = attach(
            app, notes=Binding(NOTES, direction="pull"), tags=Binding(TAGS, direction="push")
        )
        assert scan(sync).queued == 1
        assert list(queued(sync)) == ["t1"]
        sync.close()


# -- changes made while no engine was attached ---------------------------------------------


def test_a_row_changed_while_detached_is_queued_as_an_update(path: Path) -> None:
    with App.open(path, contract) as app:
        sync = attach(app)
        app.actions.put_note("k1", "first")
        app.actions.put_note("k2", "same")
        land_everything(sync.outbox)
        sync.close()
        app.actions.put_note("k1", "changed while no engine ran")
        app.actions.put_note("k2", "same")  # saved unchanged: nothing to push
        sync = attach(app)
        assert scan(sync).queued == 1
        row = app.db.get("notes", "k1")
        assert row is not None
        assert queued(sync) == {"k1": ("k1", "update", expected_cid(sync, "notes", row))}
        sync.close()


def test_a_queued_write_changed_while_detached_takes_the_new_state(path: Path) -> None:
    with App.open(path, contract) as app:
        sync = attach(app)
        app.actions.put_note("k1", "queued, never pushed")
        sync.close()
        app.actions.put_note("k1", "changed while no engine ran")
        sync = attach(app)
        assert scan(sync).queued == 1
        row = app.db.get("notes", "k1")
        assert row is not None
        assert queued(sync) == {"k1": ("k1", "create", expected_cid(sync, "notes", row))}
        assert scan(sync).queued == 0
        sync.close()


def test_a_change_to_local_fields_only_queues_nothing(path: Path) -> None:
    with App.open(path, contract) as app:
        sync = attach(app, notes=Binding(NOTES, local=["done"]))
        app.actions.put_note("k1", "title", 1, False)
        land_everything(sync.outbox)
        sync.close()
        app.actions.put_note("k1", "title", 1, True)
        sync = attach(app, notes=Binding(NOTES, local=["done"]))
        assert scan(sync).queued == 0
        sync.close()


def test_rows_deleted_while_detached_are_queued_as_deletes(path: Path) -> None:
    with App.open(path, contract) as app:
        sync = attach(app)
        app.actions.put_note("landed", "on the PDS")
        app.actions.put_note("kept", "stays")
        land_everything(sync.outbox)
        app.actions.put_note("unsent", "queued, never sent")
        app.actions.put_note("in-flight", "sent, outcome unknown")
        in_flight = [w for w in sync.outbox.next_batch() if w.rkey == "in-flight"]
        sync.outbox.mark_attempted(in_flight)
        sync.close()
        for key in ("landed", "unsent", "in-flight"):
            app.actions.drop_note(key)
        sync = attach(app)
        result = scan(sync)
        assert (result.queued, result.deletes) == (3, 3)
        # On the PDS, or maybe on it: deleted there. Never sent: nothing to do.
        assert queued(sync) == {
            "in-flight": ("in-flight", "delete", None),
            "landed": ("landed", "delete", None),
        }
        assert scan(sync).queued == 0
        land_everything(sync.outbox)
        assert scan(sync).queued == 0
        sync.close()


def test_a_dead_letter_is_not_requeued_unless_the_row_changed(path: Path) -> None:
    with App.open(path, contract) as app:
        sync = attach(app)
        app.actions.put_note("k1", "refused by the PDS")
        app.actions.put_note("k2", "refused too")
        for write in sync.outbox.next_batch():
            sync.outbox.dead_letter(write, "InvalidRecord", "no")
        sync.close()
        app.actions.put_note("k2", "fixed while detached")
        sync = attach(app)
        assert scan(sync).queued == 1
        assert list(queued(sync)) == ["k2"]
        assert [d.rkey for d in sync.outbox.dead_letters()] == ["k1"]
        sync.close()


# -- record keys ---------------------------------------------------------------------------


def test_tid_bindings_get_fresh_tids_once_and_keep_them(path: Path) -> None:
    binding = Binding(NOTES, rkey="tid")
    with App.open(path, contract) as app:
        for i in range(5):
            app.actions.put_note(f"local key {i}", f"title {i}")  # not record keys
        sync = attach(app, notes=binding)
        assert scan(sync).queued == 5
        first = queued(sync)
        rkeys = {rkey for rkey, _, _ in first.values()}
        assert len(rkeys) == 5 and all(is_valid_tid(rkey) for rkey in rkeys)
        assert scan(sync).queued == 0
        land_everything(sync.outbox)
        sync.close()
        app.actions.put_note("local key 3", "changed while detached")
        app.actions.drop_note("local key 4")
        sync = attach(app, notes=binding)
        assert scan(sync).queued == 2
        after = queued(sync)
        assert after["local key 3"][:2] == (first["local key 3"][0], "update")
        assert after["local key 4"][:2] == (first["local key 4"][0], "delete")
        sync.close()


# -- rows that cannot become records --------------------------------------------------------


def test_a_row_that_breaks_its_record_rules_is_reported_and_the_scan_goes_on(path: Path) -> None:
    with App.open(path, contract) as app:
        app.actions.put_note("good1", "fine")
        app.actions.put_note("not a record key", "fine")
        app.actions.put_note("bad-lexicon", "forbidden")
        app.actions.put_note("bad-transform", "fine", -1)
        app.actions.put_note("good2", "fine")

        def lexicon(collection: str, rkey: str, record: Mapping[str, Any]) -> None:
            if record.get("title") == "forbidden":
                raise RecordError(f"{collection}/{rkey}: title: forbidden value")

        def count(n: int) -> str:
            if n < 0:
                raise ValueError("negative")
            return str(n)

        sync = attach(app, notes=Binding(NOTES, transforms={"n": Transform(count, int)}))
        result = scan(sync, validate=lexicon, chunk_size=2)
        assert result.queued == 2
        assert sorted(queued(sync)) == ["good1", "good2"]
        failures = {f.key: (f.error, f.message) for f in result.failures}
        assert set(failures) == {"not a record key", "bad-lexicon", "bad-transform"}
        assert "not a valid atproto record key" in failures["not a record key"][1]
        assert failures["bad-lexicon"] == (
            "RecordError",
            f"{NOTES}/bad-lexicon: title: forbidden value",
        )
        assert "transform to the record failed" in failures["bad-transform"][1]
        sync.close()


# -- a large table, in chunks --------------------------------------------------------------

BIG = 100_000


@pytest.fixture(scope="module")
def big_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database with 100,000 notes written before sync was added (copied per test)."""
    path = tmp_path_factory.mktemp("big") / "app.db"
    with App.open(path, contract) as app, app.batch():
        for first in range(0, BIG, 10_000):
            app.actions.put_notes(first, 10_000)
    return path


def copy_db(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    key = Path(f"{target}.key")
    key.write_bytes(Path(f"{source}.key").read_bytes())
    key.chmod(0o600)
    return target


def test_a_large_table_is_scanned_in_chunks_between_which_the_app_writes(
    big_db: Path, tmp_path: Path
) -> None:
    with App.open(copy_db(big_db, tmp_path / "app.db"), contract) as app:
        sync = attach(app)
        scan = ResyncScan(app, sync.outbox, sync.bindings, chunk_size=1_000)
        steps = ahead = 0
        while scan.step():
            steps += 1
            # Between two chunks the app is free to write, bound models included.
            app.actions.put_other(f"o{steps}", steps)
            if steps % 10 == 0 and steps < 90:
                # Ahead of the scan: queued by capture, so the scan finds it queued already.
                app.actions.put_note(f"n{steps * 1000 + 5:06}", "written mid-scan")
                ahead += 1
        assert steps >= BIG // 1_000
        assert scan.done and scan.queued == BIG - ahead and not scan.failures
        assert sync.outbox.counts()[0] == BIG
        assert app.db.count("other") == steps
        row = app.db.get("notes", "n050005")
        assert row is not None and row["title"] == "written mid-scan"
        assert queued(sync)["n050005"][2] == expected_cid(sync, "notes", row)
        sync.close()


@contextlib.contextmanager
def app_writing(app: App) -> Iterator[list[tuple[float, float]]]:
    """An app thread writing a row every 2 ms while the block runs; yields (when, how long)
    of each write as they happen."""
    stop = threading.Event()
    waits: list[tuple[float, float]] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            start = time.perf_counter()
            app.actions.put_other(f"o{i}", i)
            waits.append((start, time.perf_counter() - start))
            i += 1
            stop.wait(0.002)  # the workload's pace (a write every ~2 ms), not a synchronisation

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        yield waits
    finally:
        stop.set()
        thread.join()


def assert_writes_went_through(
    waits: list[tuple[float, float]], began: float, ended: float
) -> None:
    """Writes went through all along the scan, each waiting at most about one chunk."""
    during = [wait for when, wait in waits if began <= when and when + wait <= ended]
    assert len(during) >= 20, (len(during), ended - began)
    assert max(during) < 0.5, sorted(during)[-5:]


def test_app_threads_are_not_blocked_for_long_by_a_scan(big_db: Path, tmp_path: Path) -> None:
    with App.open(copy_db(big_db, tmp_path / "app.db"), contract) as app:
        sync = attach(app)
        with app_writing(app) as waits:
            began = time.perf_counter()
            result = scan(sync, chunk_size=500)
            ended = time.perf_counter()
        assert result.queued == BIG
        assert_writes_went_through(waits, began, ended)
        sync.close()


@pytest.mark.anyio
async def test_app_threads_are_not_blocked_for_long_by_an_engines_scan(
    big_db: Path, tmp_path: Path
) -> None:
    """The engine's scan (``run_async``, on the event loop) lets an app thread's writes
    through all along, each waiting at most about one chunk."""
    with App.open(copy_db(big_db, tmp_path / "app.db"), contract) as app:
        sync = attach(app)
        resync = ResyncScan(app, sync.outbox, sync.bindings, chunk_size=500)
        with app_writing(app) as waits:
            began = time.perf_counter()
            await resync.run_async()
            ended = time.perf_counter()
        assert resync.queued == BIG
        assert_writes_went_through(waits, began, ended)
        sync.close()


def test_a_scan_nobody_waits_for_does_not_pause(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sleeping between chunks with no thread waiting would be most of the scan's time."""
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    with App.open(path, contract) as app:
        app.actions.put_notes(0, 2_000)
        sync = attach(app)
        assert scan(sync, chunk_size=100).queued == 2_000
        assert slept == []
        sync.close()


@pytest.mark.anyio
async def test_the_engine_can_await_between_chunks(path: Path) -> None:
    with App.open(path, contract) as app:
        app.actions.put_notes(0, 50)
        sync = attach(app)
        resync = ResyncScan(app, sync.outbox, sync.bindings, chunk_size=10)
        ticks = 0

        async def other_task() -> None:
            nonlocal ticks
            while not resync.done:
                ticks += 1
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(other_task)
            await resync.run_async()
        assert resync.queued == 50 and ticks >= 5
        sync.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- shared bindings: stamped like capture, never plain ----------------------------------------


@contract.action
def drop_tag(ctx: ActionContext, key: str) -> None:
    ctx.db.delete("tags", key)


def queued_record(sync: ATSync, key: str) -> dict[str, Any] | None:
    row = sync.outbox._db.execute(f"SELECT record FROM {OUTBOX} WHERE key = ?", (key,)).fetchone()
    return None if row is None else json.loads(row[0])


def shared_scan(sync: ATSync) -> ResyncScan:
    app, capture = sync.app, sync._capture
    assert app is not None and capture is not None
    scan = ResyncScan(app, sync.outbox, sync.bindings, write_shared=capture.write_shared_row)
    return scan.run()


def test_shared_rows_are_compared_with_their_merge_and_written_stamped(path: Path) -> None:
    shared = {"tags": Binding(TAGS, shared=True)}
    with App.open(path, contract) as app:
        sync = attach(app, **shared)
        app.actions.put_tag("t1", "first")  # captured: the record carries its stamps
        stamped = queued_record(sync, "t1")
        assert stamped is not None and set(stamped["syncClocks"]) == {"label"}
        # A start-up comparison leaves it as capture wrote it (a plain record would drop the
        # stamps, and the other participants could no longer merge it).
        assert shared_scan(sync).queued == 0 and queued_record(sync, "t1") == stamped
        land_everything(sync.outbox)
        sync.close()
    with App.open(path, contract) as app:  # changed while no engine was attached
        app.actions.put_tag("t1", "second")
    with App.open(path, contract) as app:
        sync = attach(app, **shared)
        assert shared_scan(sync).queued == 1
        again = queued_record(sync, "t1")
        assert again is not None and again["label"] == "second"
        assert again["syncClocks"]["label"] > stamped["syncClocks"]["label"]
        land_everything(sync.outbox)
        sync.close()
    with App.open(path, contract) as app:  # deleted while no engine was attached
        app.actions.drop_tag("t1")
    with App.open(path, contract) as app:
        sync = attach(app, **shared)
        found = shared_scan(sync)
        assert (found.queued, found.deletes) == (1, 1)
        tombstone = queued_record(sync, "t1")
        assert tombstone is not None and "syncDeleted" in tombstone  # a record, not a delete
        assert queued(sync)["t1"][1] == "update"
        land_everything(sync.outbox)
        assert shared_scan(sync).queued == 0  # the merge has it deleted too: nothing more
        sync.close()

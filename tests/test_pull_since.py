"""A later pull reads what changed since the pulled rev, not the whole repository.

``getRepo?since=REV`` gives the commit and the nodes and records written since; compared
with the MST nodes held from the last read (``_atsync_tree``), it yields every create,
update and delete. These tests run against the real PDS and watch the requests.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync.atproto import CID, IdentityResolver, Session, XrpcClient
from atsync.sync import Poll
from atsync.sync._repo import OWN
from atsync.sync._tree import TreeNodes
from fault_proxy import Answer, FaultProxy, Rewrite, proxied_session
from sync_devices import as_rows, remote, rows, wait_status
from test_sync_pull import alice, collection_for, counting, device, put_record, settle

pytestmark = pytest.mark.anyio

GET_REPO = "com.atproto.sync.getRepo"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def change_elsewhere(session: Session, collection: str) -> None:
    """Another device: three creates (one the exact content of k00: the PDS leaves its block
    out of the delta, as it had it before), an update and two deletes, straight to the PDS."""
    await put_record(session, collection, "new1", title="new 1", n=101)
    await put_record(session, collection, "twin", title="k00", n=0)
    await put_record(session, collection, "new2", title="new 2", n=102)
    async with XrpcClient(session=session) as client:
        await client.put_record(
            session.did, collection, "k03", {"$type": collection, "title": "k03 edited", "n": 3}
        )
        await client.delete_record(session.did, collection, "k05")
        await client.delete_record(session.did, collection, "k17")


async def seed(session: Session, collection: str, count: int) -> None:
    """``count`` records written straight to the repository: k00, k01, …"""
    for i in range(count):
        await put_record(session, collection, f"k{i:02d}", title=f"k{i:02d}", n=i)


async def test_a_later_pull_reads_only_what_changed_since(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    session = await alice(dev_pds)
    await seed(session, collection, 30)
    seen, options = counting(GET_REPO)
    async with device(tmp_path / "b.db", collection, session, resolver, **options) as (b, sync):
        await settle(sync)
        assert len(rows(b)) == 30 and len(seen) == 1 and "since=" not in seen[0]
        await change_elsewhere(session, collection)
        await settle(sync)
        assert len(seen) == 2 and "since=" in seen[1], seen
        assert rows(b) == as_rows(await remote(session, collection))
        assert {"new1", "new2", "twin"} <= set(rows(b)) and not {"k05", "k17"} & set(rows(b))
        assert rows(b)["k03"]["title"] == "k03 edited"
        # Nothing changed: no download at all.
        await settle(sync)
        assert len(seen) == 2
    # A later start goes on from what the database holds.
    await put_record(session, collection, "new3", title="new 3", n=103)
    seen.clear()
    async with device(tmp_path / "b.db", collection, session, resolver, **options) as (b, sync):
        await settle(sync)
        assert len(seen) == 1 and "since=" in seen[0]
        assert rows(b) == as_rows(await remote(session, collection))


async def test_a_record_this_device_wrote_and_another_deleted_is_deleted_here(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """Written here after the last pull, so in no tree this device holds; deleted by another
    device before the next pull, so in no node of the new tree either: the delta must still
    delete it (found by the vault example's test)."""
    collection = collection_for(request)
    session = await alice(dev_pds)
    await put_record(session, collection, "old", title="old", n=0)
    seen, options = counting(GET_REPO)
    async with device(tmp_path / "b.db", collection, session, resolver, **options) as (b, sync):
        await settle(sync)  # pulled: the held tree has "old" only
        b.actions.put("mine", "written here")
        b.actions.put("kept", "written here too")
        with anyio.fail_after(30):
            await sync.wait_for_idle()
        async with XrpcClient(session=session) as other_device:
            await other_device.delete_record(session.did, collection, "mine")
        await settle(sync)
        assert "since=" in seen[-1], seen
        assert set(rows(b)) == {"old", "kept"}
        assert rows(b) == as_rows(await remote(session, collection))


async def test_poll_catches_up_by_what_changed(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """As the docs show Poll: no pull_now, no wait_pulled — the change arrives by itself,
    within a poll interval and the delta's own time (timed against a generous 3 s)."""
    collection = collection_for(request)
    session = await alice(dev_pds)
    await put_record(session, collection, "a", title="a", n=1)
    seen, options = counting(GET_REPO)
    async with device(
        tmp_path / "b.db", collection, session, resolver, pull=Poll(0.2), **options
    ) as (b, sync):
        await wait_status(sync, lambda s: "a" in rows(b), 30)
        await put_record(session, collection, "b", title="b", n=2)
        written = time.monotonic()
        await wait_status(sync, lambda s: "b" in rows(b), 30)
        assert time.monotonic() - written < 3.0
        assert len(seen) == 2 and "since=" in seen[1], seen


async def test_without_the_held_tree_the_whole_repository_is_read(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """A tree held in part (a damaged file, an older release's database) is never taken for
    whole: the delta cannot be compared, and the repository is read as on a first start."""
    collection = collection_for(request)
    session = await alice(dev_pds)
    await seed(session, collection, 20)
    seen, options = counting(GET_REPO)
    async with device(tmp_path / "b.db", collection, session, resolver, **options) as (b, sync):
        await settle(sync)
        db = b.model_db
        tree = TreeNodes(db, OWN)
        root = tree.root()
        assert root is not None
        nodes = {bytes(cid): tree[cid] for cid in tree}
        # Its root node: every delta reads it (whatever changed, the root did).
        del nodes[bytes(CID.parse(root))]
        with db.transaction():
            tree.replace(root, nodes.items())
        await change_elsewhere(session, collection)
        await settle(sync)
        assert rows(b) == as_rows(await remote(session, collection))
        # The delta, found incomplete, then the whole repository (which holds the tree again).
        assert len(seen) == 3 and "since=" in seen[1] and "since=" not in seen[2], seen
        await put_record(session, collection, "again", title="again", n=9)
        await settle(sync)
        assert len(seen) == 4 and "since=" in seen[3]
        assert rows(b) == as_rows(await remote(session, collection))


async def test_a_tampered_delta_is_rejected_and_nothing_of_it_applied(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    session = await alice(dev_pds)
    await put_record(session, collection, "a", title="a", n=1)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        proxied = proxied_session(session, proxy.url)
        async with device(tmp_path / "b.db", collection, proxied, resolver) as (b, sync):
            await settle(sync)
            proxy.add(
                Rewrite(lambda body: body.replace(b"the real title", b"the fake title")),
                nsid=GET_REPO,
                when=lambda r: "since=" in r.target,
                nth=1,
            )
            await put_record(session, collection, "b", title="the real title", n=2)
            sync.pull_now()
            refused = await wait_status(sync, lambda s: s.download_error is not None, 30)
            assert "failed verification" in (refused.download_error or "")
            assert set(rows(b)) == {"a"}
            with anyio.fail_after(30):
                await sync.wait_pulled()
            assert rows(b)["b"]["title"] == "the real title"


def test_a_database_of_the_previous_release_upgrades_with_its_queue_intact(
    tmp_path: Path,
) -> None:
    """Sync tables version 4 (before ``_atsync_tree``): the table is added, the queue kept."""
    from atsync.app import App
    from atsync.sync import ATSync, Binding, Manual
    from atsync.sync._migrate import TABLES_VERSION
    from test_sync_pull import contract

    path = tmp_path / "old.db"
    with App.open(path, contract) as app:
        sync = ATSync(app, bindings={"notes": Binding("test.atsync.old")}, pull=Manual())
        app.actions.put("q", "queued offline")
        sync.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE _atsync_tree")
        conn.execute("UPDATE _atsync_sync_state SET value = '4' WHERE key = 'tables_version'")
    with App.open(path, contract) as app:
        sync = ATSync(app, bindings={"notes": Binding("test.atsync.old")}, pull=Manual())
        db = app.model_db
        assert db.execute("SELECT count(*) FROM _atsync_tree").fetchone() == (0,)
        version = db.execute(
            "SELECT value FROM _atsync_sync_state WHERE key = 'tables_version'"
        ).fetchone()
        assert version == (str(TABLES_VERSION),)
        assert [w.rkey for w in sync.outbox.next_batch()] == ["q"]
        sync.close()


def test_version_5_keeps_one_unpulled_row_per_record_the_latest(tmp_path: Path) -> None:
    """Version 5 noted a row per write in ``_atsync_unpulled``; 6 keeps each record's latest
    (the pull's mark compares ids), and adds its index."""
    from atsync.app import App
    from atsync.sync import ATSync, Binding, Manual
    from test_sync_pull import contract

    path = tmp_path / "v5.db"
    with App.open(path, contract) as app:
        ATSync(app, bindings={"notes": Binding("test.atsync.v5")}, pull=Manual()).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP INDEX _atsync_unpulled__by__record")
        conn.executemany(
            "INSERT INTO _atsync_unpulled (id, collection, rkey) VALUES (?, 'c.o.l', ?)",
            [(1, "a"), (2, "b"), (3, "a"), (4, "a")],
        )
        conn.execute("UPDATE _atsync_sync_state SET value = '5' WHERE key = 'tables_version'")
    with App.open(path, contract) as app:
        sync = ATSync(app, bindings={"notes": Binding("test.atsync.v5")}, pull=Manual())
        db = app.model_db
        kept = db.execute("SELECT id, rkey FROM _atsync_unpulled ORDER BY id").fetchall()
        assert kept == [(2, "b"), (4, "a")]
        plan = db.execute(
            "EXPLAIN QUERY PLAN DELETE FROM _atsync_unpulled WHERE collection = ? AND rkey = ?",
            ("c.o.l", "a"),
        ).fetchall()
        assert "_atsync_unpulled__by__record" in str(plan)
        sync.close()


async def test_a_refused_delta_reads_the_whole_repository(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """A PDS that refuses ``since`` (an older implementation, or a rev its history no longer
    has after a ``#sync``): the pull reads everything instead of failing again and again."""
    collection = collection_for(request)
    session = await alice(dev_pds)
    await put_record(session, collection, "a", title="a", n=1)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        refusal = proxy.add(
            Answer(400, "InvalidRequest", "since is not supported"),
            nsid=GET_REPO,
            when=lambda r: "since=" in r.target,
        )
        proxied = proxied_session(session, proxy.url)
        async with device(tmp_path / "b.db", collection, proxied, resolver) as (b, sync):
            await settle(sync)
            await put_record(session, collection, "b", title="b", n=2)
            await settle(sync)
            assert refusal.fired == 1
            assert rows(b) == as_rows(await remote(session, collection))
            assert sync.status.download_error is None


def test_the_list_of_unpulled_writes_stays_bounded(tmp_path: Path, monkeypatch: Any) -> None:
    """An engine that pushes and never pulls: past the bound the list is dropped, and with
    it the held tree it completes (so the next pull reads everything; nothing is missed)."""
    from atsync.db import ModelDB
    from atsync.sync import _outbox
    from atsync.sync._outbox import Outbox

    monkeypatch.setattr(_outbox, "UNPULLED_MAX", 5)
    with ModelDB.open(tmp_path / "u.db", {"notes": {"id": "primary"}}) as db:
        outbox = Outbox(db)
        outbox.create_tables()
        with db.transaction():
            TreeNodes(db, OWN).replace("bafyroot", [(b"cid", b"node")])
        for i in range(5):
            with db.transaction():
                outbox.enqueue("c", f"k{i}", "notes", f"k{i}", "{}", f"cid{i}", None)
            (write,) = outbox.next_batch()
            outbox.complete([write])
        assert db.execute("SELECT count(*) FROM _atsync_unpulled").fetchone() == (5,)
        assert TreeNodes(db, OWN).root() == "bafyroot"
        for n in range(12):  # many writes of records already noted: still 5 records
            with db.transaction():
                outbox.enqueue("c", "k0", "notes", "k0", "{}", f"again{n}", None)
            outbox.complete(outbox.next_batch())
        assert db.execute("SELECT count(*) FROM _atsync_unpulled").fetchone() == (5,)
        assert TreeNodes(db, OWN).root() == "bafyroot"
        with db.transaction():
            outbox.enqueue("c", "k5", "notes", "k5", "{}", "cid5", None)
        outbox.complete(outbox.next_batch())
        assert db.execute("SELECT count(*) FROM _atsync_unpulled").fetchone() == (0,)
        assert TreeNodes(db, OWN).root() is None


async def test_a_record_edited_here_and_put_back_before_the_next_pull_stays(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """Written here since the last pull, yet unchanged in the new tree (an edit and its undo
    both pushed): in no changed node, but still in the repository — not gone."""
    collection = collection_for(request)
    session = await alice(dev_pds)
    reads, options = counting("com.atproto.sync.getRepo")
    async with device(tmp_path / "a.db", collection, session, resolver, **options) as (a, sync):
        a.actions.put("x", "as it was", None, 1)
        a.actions.put("y", "another", None, 2)
        await settle(sync)  # pushed, then pulled: the tree held has x as it is
        a.actions.put("x", "an edit", None, 1)
        with anyio.fail_after(30):
            await sync.wait_for_idle()
        a.actions.put("x", "as it was", None, 1)  # undone: the record as at the last pull
        await settle(sync)
        assert "since=" in reads[-1]  # the catch-up read only what changed
        assert set(rows(a)) == {"x", "y"}
        assert rows(a) == as_rows(await remote(session, collection))


async def test_a_tree_grown_past_the_bound_by_catch_ups_is_no_longer_held(
    dev_pds: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    resolver: IdentityResolver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bound on the held tree (a whole read keeps none past it, so its memory stays
    bounded) holds for a tree that catch-ups grow too: past it, the tree is dropped, and
    the next pull after a gap reads the repository whole, as for one that was always large."""
    from atsync.sync import _puller

    collection = collection_for(request)
    session = await alice(dev_pds)
    await seed(session, collection, 30)
    seen, options = counting(GET_REPO)
    async with device(tmp_path / "b.db", collection, session, resolver, **options) as (b, sync):
        await settle(sync)
        tree = TreeNodes(b.model_db, OWN)
        assert tree.root() is not None
        held = len(tree)
        monkeypatch.setattr(_puller, "TREE_NODES_MAX", held)  # the tree is at the bound
        for i in range(60):  # a tree of 90 records has more nodes than one of 30
            await put_record(session, collection, f"m{i:02d}", title=f"m{i:02d}", n=i)
        await settle(sync)
        assert len(seen) == 2 and "since=" in seen[1], seen  # a catch-up...
        assert rows(b) == as_rows(await remote(session, collection))
        assert tree.root() is None  # ...that grew the tree past the bound: not held
        await put_record(session, collection, "again", title="again", n=9)
        await settle(sync)
        assert len(seen) == 3 and "since=" not in seen[2], seen  # so: a whole read
        assert rows(b) == as_rows(await remote(session, collection))
        assert tree.root() is None  # and one past the bound keeps none either


async def test_a_catch_up_is_read_off_the_event_loop(
    dev_pds: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    resolver: IdentityResolver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a whole read: a catch-up's verification and comparison (large after a long
    absence) run in a worker thread, so the app's tasks on the loop go on meanwhile."""
    import threading

    from atsync.sync import _puller

    threads: list[int] = []
    read_since = _puller.Puller._read_since

    def recording(self: Any, *args: Any) -> Any:
        threads.append(threading.get_ident())
        return read_since(self, *args)

    monkeypatch.setattr(_puller.Puller, "_read_since", recording)
    collection = collection_for(request)
    session = await alice(dev_pds)
    await seed(session, collection, 5)
    seen, options = counting(GET_REPO)
    async with device(tmp_path / "b.db", collection, session, resolver, **options) as (b, sync):
        await settle(sync)
        await change_elsewhere(session, collection)
        await settle(sync)
        assert "since=" in seen[-1], seen
        assert threads and threading.get_ident() not in threads
        assert rows(b) == as_rows(await remote(session, collection))

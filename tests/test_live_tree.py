"""The held tree follows live events: after a gap, a device that was following the event
stream reads only what changed since (``getRepo?since=``), not the whole repository.

A live ``#commit`` carries the tree's new nodes; the engine moves the held tree
(``_atsync_tree``) by them, writing the few nodes that changed to ``_atsync_tree_delta``
(folded into a new blob past a quarter of it). The held nodes must be exactly the tree's:
a node left over from an older version would hide a subtree that comes back. These tests
run against the real PDS and compare the held nodes with the PDS's own tree.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atsync.atproto import CID, IdentityResolver, MstDiff, RepoFile, Session, XrpcClient
from atsync.db import ModelDB
from atsync.sync import ATSync, Live, Manual
from atsync.sync import _tree as tree_module
from atsync.sync._migrate import TABLES_VERSION
from atsync.sync._outbox import Outbox
from atsync.sync._repo import OWN
from atsync.sync._tree import TreeNodes
from sync_devices import as_rows, remote, rows, wait_status
from test_pull_since import seed
from test_sync_pull import alice, collection_for, counting, device, put_record, settle

pytestmark = pytest.mark.anyio

GET_REPO = "com.atproto.sync.getRepo"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def head_nodes(session: Session, tmp_path: Path) -> tuple[str, set[bytes]]:
    """The PDS's tree now: its root and every node's CID."""
    path = tmp_path / "head.car"
    async with XrpcClient(session=session) as client:
        await client.sync_get_repo(session.did, path)
    nodes: set[bytes] = set()
    with RepoFile(path, did=session.did) as repo:
        for _ in repo.leaves(lambda cid: nodes.add(bytes(cid))):
            pass
        return str(repo.commit.data), nodes


def pulled(db: ModelDB, name: str) -> str | None:
    row = db.execute("SELECT value FROM _atsync_sync_state WHERE key = ?", (name,)).fetchone()
    return None if row is None else str(row[0])


async def caught_up(sync: ATSync, session: Session) -> None:
    """Until the device's pulled state is the repository's head (its own writes included:
    they come back as events)."""
    async with XrpcClient(session=session) as client:
        head = (await client.sync_get_latest_commit(session.did)).rev
    await wait_status(sync, lambda s: s.rev == head, 15)


async def following(sync: ATSync, app: Any, session: Session, collection: str, seeded: int) -> None:
    """Until the device follows the stream: the ``seeded`` records read, then an event
    applied (from here on, events only)."""
    await wait_status(sync, lambda s: s.live and len(rows(app)) == seeded, 30)
    await put_record(session, collection, "warm", title="warm", n=0)
    await caught_up(sync, session)


@pytest.mark.parametrize("fold_at", [4, 10_000], ids=["folding", "delta"])
async def test_after_live_events_a_gap_reads_only_what_changed_since(
    dev_pds: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    resolver: IdentityResolver,
    monkeypatch: pytest.MonkeyPatch,
    fold_at: int,
) -> None:
    monkeypatch.setattr(tree_module, "DELTA_MIN", fold_at)
    if fold_at < 10_000:  # whatever the size of the account's tree (other tests write to it)
        monkeypatch.setattr(tree_module, "DELTA_SHARE", 0.0)
    collection = f"{collection_for(request)}{fold_at}"  # the name alone is cut short
    session = await alice(dev_pds)
    await seed(session, collection, 12)
    seen, options = counting(GET_REPO)
    db_path = tmp_path / "b.db"
    async with device(db_path, collection, session, resolver, pull=Live(), **options) as (
        b,
        sync,
    ):
        await following(sync, b, session, collection, 12)
        assert "since=" not in seen[0]  # the first read: whole
        reads = len(seen)
        (blob_root,) = b.model_db.execute("SELECT root FROM _atsync_tree").fetchone()
        # Live events: another device's writes, and this device's own coming back.
        for i in range(6):
            await put_record(session, collection, f"live{i}", title=f"live {i}", n=i)
        # Their events applied first: a push before then meets a head it has not seen yet
        # (``InvalidSwap``) and rightly catches up by a read, which is not what is tested here.
        await caught_up(sync, session)
        b.actions.put("mine", "written here")
        b.actions.put("also", "written here too")
        with anyio.fail_after(30):
            await sync.wait_for_idle()
        async with XrpcClient(session=session) as client:
            await client.delete_record(session.did, collection, "k02")
        await caught_up(sync, session)
        assert len(seen) == reads  # events only
        root, nodes = await head_nodes(session, tmp_path)
        held = TreeNodes(b.model_db, OWN)
        assert held.root() == root == pulled(b.model_db, "pulled_data")
        assert {bytes(cid) for cid in held} == nodes  # exactly the tree: nothing left over
        # This device's writes came back in events that put them in the held tree: their
        # notes (what a catch-up must look for beside the tree) are let go.
        assert b.model_db.execute("SELECT rkey FROM _atsync_unpulled").fetchall() == []
        (now_blob_root,) = b.model_db.execute("SELECT root FROM _atsync_tree").fetchone()
        if fold_at == 10_000:  # the events went to the delta, the blob stayed
            (delta,) = b.model_db.execute("SELECT count(*) FROM _atsync_tree_delta").fetchone()
            assert delta > 0 and now_blob_root == blob_root
        else:  # folded into a new blob as the delta grew
            assert now_blob_root != blob_root
    # While the device is off: edits and deletes, of records it saw live and of its own.
    async with XrpcClient(session=session) as client:
        for rkey in ("live1", "mine", "k05"):
            await client.delete_record(session.did, collection, rkey)
        await client.put_record(
            session.did, collection, "live2", {"$type": collection, "title": "edited", "n": 2}
        )
    await put_record(session, collection, "new", title="new", n=99)
    seen.clear()
    async with device(db_path, collection, session, resolver, pull=Manual(), **options) as (
        b,
        sync,
    ):
        await settle(sync)
        assert len(seen) == 1 and "since=" in seen[0], seen  # the gap: only what changed
        assert rows(b) == as_rows(await remote(session, collection))
        assert not {"live1", "mine", "k05", "k02"} & set(rows(b))
        assert rows(b)["live2"]["title"] == "edited" and "also" in rows(b)
        root, nodes = await head_nodes(session, tmp_path)
        held = TreeNodes(b.model_db, OWN)
        assert held.root() == root and {bytes(cid) for cid in held} == nodes


async def test_a_write_in_no_held_tree_deleted_elsewhere_is_deleted_by_the_catch_up(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """Over a tree moved by live events: this device's write lands while no event of it
    arrives (the device does not listen), so it is in no tree held here. Deleted elsewhere
    meanwhile, the catch-up must still delete it: its note stays until an event or a pull
    puts it in the held tree."""
    collection = collection_for(request)
    session = await alice(dev_pds)
    await seed(session, collection, 3)
    seen, options = counting(GET_REPO)
    db_path = tmp_path / "b.db"
    async with device(db_path, collection, session, resolver, pull=Live(), **options) as (
        b,
        sync,
    ):
        await following(sync, b, session, collection, 3)  # the held tree moved by an event
    # The device pushes without listening (Manual): its write is in no tree it holds.
    async with device(db_path, collection, session, resolver, pull=Manual(), **options) as (
        b,
        sync,
    ):
        b.actions.put("orphan", "written here")
        with anyio.fail_after(30):
            await sync.wait_for_idle()
        (noted,) = b.model_db.execute(
            "SELECT count(*) FROM _atsync_unpulled WHERE rkey = 'orphan'"
        ).fetchone()
        assert noted == 1
    async with XrpcClient(session=session) as client:
        await client.delete_record(session.did, collection, "orphan")
    seen.clear()
    async with device(db_path, collection, session, resolver, pull=Manual(), **options) as (
        b,
        sync,
    ):
        await settle(sync)
        assert len(seen) == 1 and "since=" in seen[0], seen
        assert "orphan" not in rows(b)
        assert rows(b) == as_rows(await remote(session, collection))


def test_a_delta_left_by_a_release_that_replaced_the_tree_is_ignored(tmp_path: Path) -> None:
    """A release that does not know the delta writes the tree row whole (``moved_root``
    NULL): the delta rows it left behind are not applied to that tree, and the next update
    clears them. That release sees the blob's own root, not the pulled one, while a delta
    is in use: it reads the whole repository."""
    with ModelDB.open(tmp_path / "t.db", {"notes": {"id": "primary"}}) as db:
        Outbox(db).create_tables()
        a, b, c = (CID.for_data(x) for x in (b"a", b"b", b"c"))
        with db.transaction():
            TreeNodes(db, OWN).replace("root1", [(bytes(a), b"node a")])
            db.connection.execute(
                "INSERT INTO _atsync_tree_delta (repo, cid, node) VALUES ('', ?, ?), ('', ?, NULL)",
                (bytes(b), b"node b", bytes(a)),
            )
            db.connection.execute("UPDATE _atsync_tree SET moved_root = 'root2'")
        tree = TreeNodes(db, OWN)
        assert tree.root() == "root2" and set(tree) == {b}  # blob, then the delta
        assert db.execute("SELECT root FROM _atsync_tree").fetchone() == ("root1",)
        with sqlite3.connect(tmp_path / "t.db") as old_release:
            old_release.execute(
                "INSERT OR REPLACE INTO _atsync_tree (repo, root, nodes) VALUES ('', ?, ?)",
                ("root3", db.execute("SELECT nodes FROM _atsync_tree").fetchone()[0]),
            )
        tree = TreeNodes(db, OWN)
        assert tree.root() == "root3" and set(tree) == {a}  # the delta left is not applied
        with db.transaction():
            tree.update("root4", MstDiff(new_nodes={c: b"node c"}), 100)
        assert db.execute("SELECT cid FROM _atsync_tree_delta").fetchall() == [(bytes(c),)]
        assert TreeNodes(db, OWN).root() == "root4" and set(TreeNodes(db, OWN)) == {a, c}


def test_a_version_6_database_keeps_its_held_tree(tmp_path: Path) -> None:
    """Sync tables version 6 had no delta: the column and the table are added, and the tree
    held stays held (its next catch-up reads only what changed)."""
    path = tmp_path / "v6.db"
    with ModelDB.open(path, {"notes": {"id": "primary"}}) as db:
        Outbox(db).create_tables()
        with db.transaction():
            TreeNodes(db, OWN).replace("root6", [(b"cid", b"node")])
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE _atsync_tree_delta")
        conn.execute("ALTER TABLE _atsync_tree DROP COLUMN moved_root")
        conn.execute("UPDATE _atsync_sync_state SET value = '6' WHERE key = 'tables_version'")
    with ModelDB.open(path, {"notes": {"id": "primary"}}) as db:
        Outbox(db).create_tables()
        columns = {r[1] for r in db.execute("PRAGMA table_info(_atsync_tree)")}
        assert "moved_root" in columns
        assert db.execute("SELECT count(*) FROM _atsync_tree_delta").fetchone() == (0,)
        tree = TreeNodes(db, OWN)
        assert tree.root() == "root6" and dict(tree._loaded()) == {b"cid": b"node"}
        version = db.execute(
            "SELECT value FROM _atsync_sync_state WHERE key = 'tables_version'"
        ).fetchone()
        assert version == (str(TABLES_VERSION),)


node_ids = st.integers(min_value=0, max_value=40)
moves = st.lists(
    st.tuples(st.sets(node_ids, max_size=6), st.sets(node_ids, max_size=6)), max_size=30
)


@given(start=st.sets(node_ids, max_size=20), steps=moves, fold_at=st.sampled_from([1, 3, 256]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_delta_holds_exactly_the_nodes_of_every_update(
    tmp_path_factory: pytest.TempPathFactory,
    start: set[int],
    steps: list[tuple[set[int], set[int]]],
    fold_at: int,
) -> None:
    """Any sequence of updates (nodes gone, nodes new: again after going, gone after coming,
    through folds): the held nodes are exactly what the updates leave, read back afresh."""
    cid = {n: CID.for_data(n.to_bytes(2, "big")) for n in range(41)}
    path = tmp_path_factory.mktemp("delta") / "t.db"
    original = tree_module.DELTA_MIN
    tree_module.DELTA_MIN = fold_at
    try:
        with ModelDB.open(path, {"notes": {"id": "primary"}}) as db:
            Outbox(db).create_tables()
            with db.transaction():
                TreeNodes(db, OWN).replace("r0", [(bytes(cid[n]), b"%d" % n) for n in start])
            held, tree = set(start), TreeNodes(db, OWN)
            for i, (gone, new) in enumerate(steps, 1):
                gone_now = gone & held  # a diff names nodes of the held tree as gone
                diff = MstDiff(
                    new_nodes={cid[n]: b"%d" % n for n in new - (held - gone_now)},
                    gone_nodes=[cid[n] for n in gone_now],
                )
                assert tree.root() == f"r{i - 1}"
                with db.transaction():
                    tree.update(f"r{i}", diff, 10_000, keep=i % 2 == 0)
                held = (held - gone_now) | new
                fresh = TreeNodes(db, OWN)
                assert fresh.root() == f"r{i}"
                assert {bytes(c): fresh[c] for c in fresh} == {
                    bytes(cid[n]): b"%d" % n for n in held
                }
    finally:
        tree_module.DELTA_MIN = original

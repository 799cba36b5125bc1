"""The pull half against the real PDS: a fresh device restores, devices of one account
converge, concurrent edits merge field by field, deletes arrive, bad records are rejected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync import TransientError
from atsync.app import REMOTE_ACTION, ActionContext, App, Contract
from atsync.atproto import Identity, IdentityResolver, Session, XrpcClient, login
from atsync.sync import ATSync, Binding, Immediate, Live, Manual, OnStart, Poll, SyncStatus
from sync_devices import ForgetfulResolver, as_rows, remote, rows, session_of, wait_status
from sync_devices import collection_for as shared_collection_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


contract = Contract(
    models={
        "notes": {"id": "primary", "title": "string", "body": "string?", "n": "integer"},
    }
)


@contract.action
def put(ctx: ActionContext, key: str, title: str, body: str | None = None, n: int = 0) -> None:
    ctx.db.set("notes", {"id": key, "title": title, "body": body, "n": n})


@contract.action
def edit(ctx: ActionContext, key: str, **fields: Any) -> None:
    ctx.db.update("notes", {"id": key, **fields})


@contract.action
def drop(ctx: ActionContext, key: str) -> None:
    ctx.db.delete("notes", key)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atsync", *args], capture_output=True, text=True, timeout=60
    )


def collection_for(request: pytest.FixtureRequest) -> str:
    return shared_collection_for(request, "test.atsync.pull")


async def alice(dev_pds: Any) -> Session:
    return await session_of(dev_pds, "alice.test")


@asynccontextmanager
async def device(
    path: Path,
    collection: str,
    session: Session,
    resolver: IdentityResolver,
    **options: Any,
) -> AsyncIterator[tuple[App, ATSync]]:
    """One device of the account: its own database, an engine running on it."""
    options.setdefault("push", Immediate())
    options.setdefault("pull", Manual())
    with App.open(path, contract) as app:
        sync = ATSync(
            app,
            bindings={"notes": Binding(collection)},
            session=session,
            **{"identity": resolver, **options},
        )
        async with sync:
            yield app, sync
        sync.close()


async def settle(*syncs: ATSync, within: float = 30) -> None:
    """Every device pushed what it has, then pulled what the others pushed."""
    with anyio.fail_after(within):
        for sync in syncs:
            await sync.wait_for_idle()
        for sync in syncs:
            await sync.wait_pulled()
            await sync.wait_for_idle()


async def put_record(session: Session, collection: str, rkey: str, **fields: Any) -> None:
    """A record written straight to the repository (by another app, or by hand)."""
    async with XrpcClient(session=session) as client:
        record = {"$type": collection, **fields}
        await client.create_record(session.did, collection, record, rkey=rkey)


async def written_elsewhere(
    path: Path, collection: str, session: Session, resolver: IdentityResolver, count: int
) -> None:
    """Another device of the account (its database at ``path``) writes notes k000, k001, …
    and pushes them."""
    async with device(path, collection, session, resolver) as (a, sync_a):
        with a.batch():
            for i in range(count):
                a.actions.put(f"k{i:03d}", f"note {i}", None, i)
        await settle(sync_a)


def counting(nsid: str) -> tuple[list[str], dict[str, Any]]:
    """A list that records every request to ``nsid``, and the ATSync options that fill it."""
    seen: list[str] = []

    async def count(req: Any) -> None:
        if req.url.path.endswith(nsid):
            seen.append(str(req.url))

    return seen, {"client_options": {"event_hooks": {"request": [count]}}}


async def test_a_fresh_device_restores_what_was_written_elsewhere(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    session = await alice(dev_pds)
    await written_elsewhere(tmp_path / "a.db", collection, session, resolver, 1_000)
    progress: list[tuple[int, int]] = []
    async with device(tmp_path / "b.db", collection, session, resolver, pull=Live()) as (
        b,
        sync_b,
    ):
        sync_b.on_status(lambda s: progress.append(s.pull_progress) if s.pull_progress else None)
        with anyio.fail_after(30):
            status = await sync_b.wait_pulled()
        assert len(rows(b)) == 1_000
        assert rows(b) == as_rows(await remote(session, collection))
        assert status.download_error is None and status.rev is not None
        assert status.last_pulled_at is not None and status.pending == 0  # no echo
        assert progress and progress[-1] == (1_000, 1_000)
    # The restored rows are not pushed back.
    assert sync_b.status.pending == 0


@pytest.mark.parametrize(
    ("strategy", "old_row"), [("live", False), ("poll", False), ("live", True)]
)
async def test_wait_for_idle_on_a_new_device_includes_its_first_pull_and_its_old_rows(
    dev_pds: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    resolver: IdentityResolver,
    strategy: str,
    old_row: bool,
) -> None:
    """Right after the start, nothing has run yet: "idle" waits for what the engine will
    start by itself — the first pull of the account's records, and the rows the database
    held before sync was attached — not only for what is queued so far."""
    collection = collection_for(request) + strategy + str(old_row).lower()
    session = await alice(dev_pds)
    await written_elsewhere(tmp_path / "a.db", collection, session, resolver, 50)
    if old_row:
        with App.open(tmp_path / "b.db", contract) as b:
            b.actions.put("mine", "written before sync was attached", None, 0)
    pull = Live() if strategy == "live" else Poll(seconds=3600)
    async with device(tmp_path / "b.db", collection, session, resolver, pull=pull) as (
        b,
        sync_b,
    ):
        with anyio.fail_after(30):
            status = await sync_b.wait_for_idle()
        assert len(rows(b)) == 50 + old_row  # the account's 50 notes, pulled
        if old_row:
            assert "mine" in await remote(session, collection)  # and the old row, pushed
        assert status.pending == 0 and status.last_pulled_at is not None


async def test_a_bulk_restore_checkpoints_once_after_the_rows_are_in(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """A whole read whose rows pass SQLite's checkpoint threshold (1,000 pages) writes them
    without WAL checkpoints (each would sync the file) and runs one afterwards; the automatic
    checkpoints come back."""
    collection = collection_for(request)
    session = await alice(dev_pds)
    async with device(tmp_path / "a.db", collection, session, resolver) as (a, sync_a):
        with a.batch():
            for i in range(1_200):
                a.actions.put(f"k{i:04d}", f"note {i} " + "x" * 2_000, None, i)
        await settle(sync_a)
    path = tmp_path / "b.db"
    with App.open(path, contract) as b:
        sync_b = ATSync(
            b, bindings={"notes": Binding(collection)}, session=session, identity=resolver,
            pull=Manual(),
        )  # fmt: skip
        async with sync_b:
            with anyio.fail_after(30):
                await sync_b.wait_pulled()
            assert len(rows(b)) == 1_200
        # The engine has stopped, the app is open: its checkpoint ran, the setting is back.
        (setting,) = b.model_db.connection.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert setting == 1000
        assert path.stat().st_size > 1_200 * 2_000  # the rows are in the file, not the WAL
        sync_b.close()


async def test_a_repository_larger_than_memory_is_read_from_a_temporary_file_then_removed(
    dev_pds: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    resolver: IdentityResolver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CAR that fits is never written to disk; one past the memory limit goes to a
    temporary file from the moment it passes it (what was held first), for the whole read
    and for a catch-up alike, and the file is gone afterwards."""
    from atsync.sync import _puller, _spill

    collection = collection_for(request)
    session = await alice(dev_pds)
    spills: list[int] = []
    real_start = _spill.Spill.start

    def start(self: _spill.Spill, held: bytearray) -> None:
        spills.append(len(held))
        real_start(self, held)

    monkeypatch.setattr(_spill.Spill, "start", start)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(_spill.tempfile, "tempdir", str(temp))
    await written_elsewhere(tmp_path / "a.db", collection, session, resolver, 200)
    async with device(tmp_path / "b.db", collection, session, resolver) as (b, sync_b):
        with anyio.fail_after(30):
            await sync_b.wait_pulled()
        assert spills == []  # it fitted: nothing written
        assert len(rows(b)) == 200
    monkeypatch.setattr(_puller, "CAR_MEMORY_LIMIT", 2_000)
    reads, options = counting("com.atproto.sync.getRepo")
    async with device(tmp_path / "c.db", collection, session, resolver, **options) as (
        c,
        sync_c,
    ):
        with anyio.fail_after(30):
            await sync_c.wait_pulled()
        assert len(spills) == 1 and spills[0] <= 2_000
        assert rows(c) == as_rows(await remote(session, collection))
        assert list(temp.iterdir()) == []
        async with device(tmp_path / "a.db", collection, session, resolver) as (a, sync_a):
            with a.batch():
                for i in range(200, 260):
                    a.actions.put(f"k{i:03d}", "x" * 200, None, i)
                a.actions.drop("k000")
            await settle(sync_a)
        spills.clear()  # device a's own catch-up spilled too
        with anyio.fail_after(30):
            sync_c.pull_now()
            await sync_c.wait_pulled()
        assert len(reads) == 2 and "since=" in reads[1]  # a catch-up, not a whole read
        assert len(spills) == 1  # its CAR passed the limit too
        assert rows(c) == as_rows(await remote(session, collection))
        assert len(rows(c)) == 259
        assert list(temp.iterdir()) == []


async def test_a_full_disk_while_spilling_fails_the_pull_clearly_and_the_next_one_restores(
    dev_pds: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    resolver: IdentityResolver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A repository past the memory limit needs a temporary file: with no room for it, the
    pull fails with the system's reason in the status, applies nothing, and a later pull
    (room made) restores everything."""
    import errno

    from atsync.sync import _puller, _spill

    collection = collection_for(request)
    session = await alice(dev_pds)
    await written_elsewhere(tmp_path / "a.db", collection, session, resolver, 50)

    def no_space(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_puller, "CAR_MEMORY_LIMIT", 2_000)
    monkeypatch.setattr(_spill.tempfile, "mkstemp", no_space)
    async with device(tmp_path / "b.db", collection, session, resolver) as (b, sync_b):
        sync_b.pull_now()
        failed = await wait_status(sync_b, lambda s: s.download_error is not None, 30)
        assert "No space left on device" in (failed.download_error or "")
        assert rows(b) == {}
        monkeypatch.undo()  # room made (and the limit as shipped)
        with anyio.fail_after(30):
            sync_b.pull_now()
            await sync_b.wait_pulled()
        assert rows(b) == as_rows(await remote(session, collection))
        assert len(rows(b)) == 50


async def test_two_devices_converge_and_merge_field_by_field(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    session = await alice(dev_pds)
    async with (
        device(tmp_path / "a.db", collection, session, resolver, push=Manual()) as (a, sync_a),
        device(tmp_path / "b.db", collection, session, resolver, push=Manual()) as (b, sync_b),
    ):
        a.actions.put("n1", "first", "body", 1)
        a.actions.put("n2", "second", None, 2)
        sync_a.push_now()
        await settle(sync_a, sync_b)
        assert rows(a) == rows(b)
        # Offline on both: different fields of n1, the same field of n2, a new note each.
        a.actions.edit("n1", title="title from a")
        b.actions.edit("n1", body="body from b")
        a.actions.edit("n2", n=20)
        b.actions.edit("n2", n=200)
        a.actions.put("a1", "only on a")
        b.actions.put("b1", "only on b")
        sync_a.push_now()
        with anyio.fail_after(30):
            await sync_a.wait_for_idle()
        # b pulls a's edits while its own are still queued: merged, then pushed.
        with anyio.fail_after(30):
            merged = await sync_b.wait_pulled()
        assert merged.conflicts == 1  # n2.n: changed on both sides
        sync_b.push_now()
        await settle(sync_b, sync_a)
        assert rows(a) == rows(b) == as_rows(await remote(session, collection))
        n1, n2 = rows(a)["n1"], rows(a)["n2"]
        assert (n1["title"], n1["body"]) == ("title from a", "body from b")
        assert n2["n"] == 200  # conflicts="local": b merged last and pushed its value
        assert set(rows(a)) == {"n1", "n2", "a1", "b1"}
        conflict = b.model_db.execute(
            "select key, fields, resolution, base, local, remote from _atsync_conflicts"
        ).fetchall()
        assert [(c[0], c[1], c[2]) for c in conflict] == [("n2", "n", "local")]
        assert '"n":2' in conflict[0][3] and '"n":200' in conflict[0][4]
        assert '"n":20' in conflict[0][5]
    listed = cli("conflicts", "--db", str(tmp_path / "b.db"), "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (entry["key"], entry["fields"], entry["resolution"]) == ("n2", "n", "local")


async def test_pulled_changes_are_in_the_action_log_and_a_rebuild_reproduces_them(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    session = await alice(dev_pds)
    async with (
        device(tmp_path / "a.db", collection, session, resolver) as (a, sync_a),
        device(tmp_path / "b.db", collection, session, resolver, push=Manual()) as (b, sync_b),
    ):
        for i in range(3):
            a.actions.put(f"n{i}", f"note {i}", None, i)
        await settle(sync_a, sync_b)
        b.actions.edit("n1", body="body from b")  # queued on b, not pushed yet
        a.actions.edit("n1", title="title from a")
        a.actions.drop("n2")
        await settle(sync_a)
        with anyio.fail_after(30):
            await sync_b.wait_pulled()  # merges n1, deletes n2
        state = rows(b)
        assert (state["n1"]["title"], state["n1"]["body"]) == ("title from a", "body from b")
        assert set(state) == {"n0", "n1"}
        remote_entries = [e for e in b.log if e.name == REMOTE_ACTION]
        assert remote_entries and {e.author for e in remote_entries} == {session.did}
        changes = [tuple(change[:2]) for e in remote_entries for change in e.args[0]]
        assert ("notes", "n0") in changes and ("notes", "n2") in changes
        deleted = [c for e in remote_entries for c in e.args[0] if c[2] is None]
        assert deleted == [["notes", "n2", None]]
        assert b.log.verify() == len(b.log)
        # The log alone gives the same state back: local actions and pulled rows, in order.
        assert b.rebuild() == len(b.log)
        assert rows(b) == state
        assert sync_b.status.pending == 1  # the rebuild queued nothing more


async def test_the_remote_policy_and_a_callable_decide_conflicts(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    session = await alice(dev_pds)
    seen: list[tuple[Any, Any, Any]] = []

    def longest(base: Any, local: Any, remote: Any) -> dict[str, Any]:
        seen.append((base, local, remote))
        return max(local, remote, key=lambda r: len(r["title"]))

    async with (
        device(tmp_path / "a.db", collection, session, resolver, push=Manual()) as (a, sync_a),
        device(tmp_path / "b.db", collection, session, resolver, push=Manual(),
               conflicts="remote") as (b, sync_b),
        device(tmp_path / "c.db", collection, session, resolver, push=Manual(),
               conflicts=longest) as (c, sync_c),
    ):  # fmt: skip
        a.actions.put("n", "start")
        sync_a.push_now()
        await settle(sync_a, sync_b, sync_c)
        a.actions.edit("n", title="from a, the longest")
        b.actions.edit("n", title="from b")
        c.actions.edit("n", title="from c")
        sync_a.push_now()
        await settle(sync_a)
        with anyio.fail_after(30):
            await sync_b.wait_pulled()
            await sync_c.wait_pulled()
        assert rows(b)["n"]["title"] == "from a, the longest"  # remote won, nothing to push
        assert sync_b.status.pending == 0
        assert rows(c)["n"]["title"] == "from a, the longest"
        (base, local, remote_row) = seen[0]
        assert (base["title"], local["title"], remote_row["title"]) == (
            "start",
            "from c",
            "from a, the longest",
        )


async def test_deletes_made_while_a_device_was_off_reach_it(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    session = await alice(dev_pds)
    async with device(tmp_path / "a.db", collection, session, resolver) as (a, sync_a):
        for key in ("x", "y", "z"):
            a.actions.put(key, key)
        await settle(sync_a)
        async with device(tmp_path / "b.db", collection, session, resolver) as (b, sync_b):
            await settle(sync_b)
            assert set(rows(b)) == {"x", "y", "z"}
        # b is off; a deletes y and edits z.
        a.actions.drop("y")
        a.actions.edit("z", title="z2")
        await settle(sync_a)
        async with device(tmp_path / "b.db", collection, session, resolver) as (b, sync_b):
            await settle(sync_b)
            assert set(rows(b)) == {"x", "z"} and rows(b)["z"]["title"] == "z2"
            assert sync_b.status.pending == 0


two_models = Contract(
    models={
        "notes": {"id": "primary", "title": "string", "body": "string?", "n": "integer"},
        "tasks": {"id": "primary", "title": "string"},
    }
)


async def test_a_binding_added_later_brings_the_collections_existing_records(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """Version 2 of an app binds a second collection: its records already on the PDS arrive,
    although the repository has not changed since the last pull."""
    notes, tasks = collection_for(request) + ".notes", collection_for(request) + ".tasks"
    session = await alice(dev_pds)
    await put_record(session, notes, "n1", title="a note", n=1)
    await put_record(session, tasks, "t1", title="a task")
    common: dict[str, Any] = {"session": session, "identity": resolver, "pull": OnStart()}
    with App.open(tmp_path / "app.db", two_models) as app:
        async with ATSync(app, bindings={"notes": Binding(notes)}, **common) as sync:
            with anyio.fail_after(30):
                await sync.wait_pulled()
        assert [r["id"] for r in app.db.query("notes")] == ["n1"]
        assert app.db.query("tasks") == []
        bindings = {"notes": Binding(notes), "tasks": Binding(tasks)}
        async with ATSync(app, bindings=bindings, **common) as sync:
            with anyio.fail_after(30):
                await sync.wait_pulled()
        assert [(r["id"], r["title"]) for r in app.db.query("tasks")] == [("t1", "a task")]


async def test_live_pull_sees_another_devices_write_quickly(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    session = await alice(dev_pds)
    async with (
        device(tmp_path / "a.db", collection, session, resolver) as (a, _),
        device(tmp_path / "b.db", collection, session, resolver, pull=Live()) as (b, sync_b),
    ):
        await settle(sync_b)
        await wait_status(sync_b, lambda s: s.live, 10)  # the stream is open
        started = time.monotonic()
        a.actions.put("live", "from a")
        await wait_status(sync_b, lambda s: "live" in rows(b), 10)
        assert time.monotonic() - started < 2  # not a 5 s poll: the stream said so at once
        assert rows(b)["live"]["title"] == "from a"


async def test_a_record_breaking_the_binding_is_rejected_with_its_reason(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    session = await alice(dev_pds)
    await put_record(session, collection, "bad", title=42, n=1)
    await put_record(session, collection, "good", title="fine", n=1)
    async with device(tmp_path / "b.db", collection, session, resolver) as (b, sync_b):
        with anyio.fail_after(30):
            status: SyncStatus = await sync_b.wait_pulled()
        assert set(rows(b)) == {"good"}
        assert status.rejected == 1
        (reason,) = b.model_db.execute(
            "select rkey, reason, detail from _atsync_rejected"
        ).fetchall()
        assert reason[0] == "bad" and reason[1] and "title" in reason[2]
    listed = cli("rejected", "--db", str(tmp_path / "b.db"))
    assert listed.returncode == 0, listed.stderr
    assert f"{collection}/bad" in listed.stdout and "title" in listed.stdout
    shown = cli("status", "--db", str(tmp_path / "b.db"), "--json",
                "--session-dir", str(tmp_path / "s"))  # fmt: skip
    assert json.loads(shown.stdout)["rejected"] == 1


def note_lexicon(collection: str) -> dict[str, Any]:
    """A Lexicon the notes fit, stricter than the model: short titles, no negative n."""
    fields = {
        "title": {"type": "string", "maxLength": 12},
        "body": {"type": "string"},
        "n": {"type": "integer", "minimum": 0},
    }
    record = {"type": "object", "required": ["title", "n"], "properties": fields}
    main = {"type": "record", "key": "any", "record": record}
    return {"lexicon": 1, "id": collection, "defs": {"main": main}}


async def test_a_pulled_record_breaking_the_lexicon_is_rejected_with_its_reason(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    session = await alice(dev_pds)
    # Written with plain XRPC, as another app or a script would: nothing checks the Lexicon.
    # Each breaks only the Lexicon; the binding and the model would take it.
    await put_record(session, collection, "long", title="a title too long", n=1)
    await put_record(session, collection, "good", title="fine", n=1)
    lexicons = [note_lexicon(collection)]
    reads, options = counting("com.atproto.sync.getRepo")
    async with device(tmp_path / "b.db", collection, session, resolver, lexicons=lexicons,
                      pull=Live(), **options) as (b, sync_b):  # fmt: skip
        with anyio.fail_after(30):
            status: SyncStatus = await sync_b.wait_pulled()  # the whole repository
        assert set(rows(b)) == {"good"} and status.rejected == 1
        # One arriving as a #commit event on the live stream is refused the same way.
        await wait_status(sync_b, lambda s: s.live, 10)
        await put_record(session, collection, "negative", title="ok", n=-1)
        await put_record(session, collection, "later", title="later", n=2)
        await wait_status(sync_b, lambda s: "later" in rows(b), 10)
        assert set(rows(b)) == {"good", "later"}
        assert sync_b.status.rejected == 2 and sync_b.status.download_error is None
        assert len(reads) == 1  # the second came on the stream, not by reading it all again
        rejected = b.model_db.execute(
            "select rkey, reason, detail from _atsync_rejected order by id"
        ).fetchall()
        assert rejected == [
            ("long", "RecordError", "$.title: string longer than maxLength 12 (16 UTF-8 bytes)"),
            ("negative", "RecordError", "$.n: integer -1 below minimum 0"),
        ]
    listed = cli("rejected", "--db", str(tmp_path / "b.db"))
    assert listed.returncode == 0, listed.stderr
    assert f"{collection}/long  RecordError: $.title" in listed.stdout
    assert f"{collection}/negative  RecordError: $.n" in listed.stdout
    shown = cli("status", "--db", str(tmp_path / "b.db"), "--json",
                "--session-dir", str(tmp_path / "s"))  # fmt: skip
    assert json.loads(shown.stdout)["rejected"] == 2


async def test_a_tampered_repository_is_rejected_and_nothing_applied(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    from fault_proxy import FaultProxy, Rewrite, proxied_session

    collection = collection_for(request)
    session = await alice(dev_pds)
    await put_record(session, collection, "t1", title="the original title", n=1)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        # The record's block altered on the way: its hash no longer matches its CID.
        proxy.add(
            Rewrite(lambda body: body.replace(b"the original title", b"the tampered title")),
            nsid="com.atproto.sync.getRepo",
            nth=1,
        )
        proxied = proxied_session(session, proxy.url)
        async with device(tmp_path / "b.db", collection, proxied, resolver) as (b, sync_b):
            sync_b.pull_now()
            refused = await wait_status(sync_b, lambda s: s.download_error is not None, 30)
            assert "failed verification" in (refused.download_error or "")
            assert rows(b) == {} and refused.rejected == 1
            (entry,) = b.model_db.execute("select reason from _atsync_rejected").fetchall()
            assert entry == ("VerificationError",)
            # The next pull reads the real repository.
            with anyio.fail_after(30):
                status = await sync_b.wait_pulled()
            assert rows(b)["t1"]["title"] == "the original title"
            assert status.download_error is None


async def test_a_commit_signed_by_another_key_is_rejected(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    from dataclasses import replace

    from atsync.atproto import generate_keypair

    collection = collection_for(request)
    session = await alice(dev_pds)
    await put_record(session, collection, "s1", title="signed by alice", n=1)
    impostor = generate_keypair("k256").did

    class WrongKey:
        """The DID document as an attacker would have it: another key for alice's DID."""

        async def resolve(self, did: str, **options: Any) -> Any:
            return replace(await resolver.resolve(did, **options), signing_key=impostor)

    async with device(tmp_path / "b.db", collection, session, resolver, identity=WrongKey()) as (
        b,
        sync_b,
    ):
        sync_b.pull_now()
        refused = await wait_status(sync_b, lambda s: s.download_error is not None, 30)
        assert "signature" in (refused.download_error or "")
        assert rows(b) == {} and refused.rejected == 1


async def test_live_events_are_applied_without_reading_the_repository(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """Each #commit about the account is verified and its operations applied directly; the
    whole repository is read only at the start (and after a gap)."""

    collection = collection_for(request)
    session = await alice(dev_pds)
    downloads, counted = counting("com.atproto.sync.getRepo")
    async with (
        device(tmp_path / "a.db", collection, session, resolver) as (a, _),
        device(tmp_path / "b.db", collection, session, resolver, pull=Live(), **counted) as (
            b,
            sync_b,
        ),
    ):
        await wait_status(sync_b, lambda s: s.live, 10)
        a.actions.put("warm", "up")
        await wait_status(sync_b, lambda s: "warm" in rows(b), 10)
        before = len(downloads)
        for i in range(5):
            a.actions.put(f"e{i}", f"event {i}")
            await wait_status(sync_b, lambda s, i=i: f"e{i}" in rows(b), 10)
        a.actions.edit("e0", title="edited")
        a.actions.drop("e1")
        await wait_status(
            sync_b, lambda s: "e1" not in rows(b) and rows(b)["e0"]["title"] == "edited", 10
        )
        assert len(downloads) == before  # events only: no repository read
        assert rows(b) == rows(a)
        assert sync_b.status.rejected == 0


async def test_fields_the_binding_does_not_map_survive_a_round_trip(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """A record written by a newer app version carries a field this binding does not map:
    editing the row here pushes it back unchanged, and a restart sends nothing."""

    collection = collection_for(request)
    session = await alice(dev_pds)
    async with XrpcClient(session=session) as client:
        record = {"$type": collection, "title": "t", "n": 1, "mood": "sunny", "tags": ["x"]}
        await client.create_record(session.did, collection, record, rkey="r1")
    applied, counted = counting("com.atproto.repo.applyWrites")
    async with device(tmp_path / "b.db", collection, session, resolver, **counted) as (b, sync_b):
        with anyio.fail_after(30):
            await sync_b.wait_pulled()
        assert rows(b)["r1"] == {"id": "r1", "title": "t", "body": None, "n": 1}
        b.actions.edit("r1", title="edited here")
        with anyio.fail_after(30):
            await sync_b.wait_for_idle()
    after = (await remote(session, collection))["r1"]
    assert after == {**record, "title": "edited here"}
    # A restart compares the rows with what was synced: nothing to send.
    applied.clear()
    async with device(tmp_path / "b.db", collection, session, resolver, **counted) as (b, sync_b):
        with anyio.fail_after(30):
            await sync_b.wait_pulled()
            status = await sync_b.wait_for_idle()
        assert status.pending == 0
    assert applied == []


async def test_an_inactive_account_is_not_pulled_until_it_is_active_again(
    make_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pds = make_pds()  # deactivating an account is not for the shared PDS
    collection = collection_for(request)
    session = await alice(pds)
    async with (
        IdentityResolver(plc_url=pds.plc_url, allow_insecure_localhost=True) as resolver,
        device(tmp_path / "b.db", collection, session, resolver, pull=Live()) as (b, sync_b),
    ):
        await wait_status(sync_b, lambda s: s.live, 10)
        async with XrpcClient(session=session) as client:
            await client.procedure("com.atproto.server.deactivateAccount", {}, auth=True)
        held = await wait_status(sync_b, lambda s: "not active" in (s.download_error or ""), 10)
        assert "nothing is pulled until it is active again" in (held.download_error or "")
        async with XrpcClient(session=session) as client:
            await client.procedure("com.atproto.server.activateAccount", None, auth=True)
            record = {"$type": collection, "title": "back", "n": 1}
            await client.create_record(session.did, collection, record, rkey="back")
        back = await wait_status(
            sync_b, lambda s: "back" in rows(b) and s.download_error is None, 15
        )
        assert back.live and rows(b)["back"]["title"] == "back"


SPEC = """
from atsync import Binding, Contract

contract = Contract(models={{
    "notes": {{"id": "primary", "title": "string", "body": "string?", "n": "integer"}},
}})
bindings = {{"notes": Binding({collection!r})}}
"""


async def test_atsync_pull_pulls_once_through_the_apps_bindings(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    from atsync.app import ATPSigner
    from atsync.atproto import FileSessionStore

    collection = collection_for(request)
    session = await alice(dev_pds)
    async with device(tmp_path / "a.db", collection, session, resolver) as (a, sync_a):
        for key in ("p1", "p2"):
            a.actions.put(key, f"from the shell {key}")
        await settle(sync_a)
    (tmp_path / "notes_spec.py").write_text(SPEC.format(collection=collection))
    sessions = tmp_path / "sessions"
    signer = ATPSigner(store=FileSessionStore(sessions))
    with App.open(tmp_path / "shell.db", contract, signer=signer):
        account = dev_pds.accounts["alice.test"]
        await signer.login_async("alice.test", account.password, dev_pds.pds_url)
    run = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "atsync", "pull", "--db", str(tmp_path / "shell.db"),
             "--session-dir", str(sessions), "--app", "notes_spec"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
            env={**os.environ, "ATSYNC_PLC_URL": dev_pds.plc_url},
        )
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "pulled rev" in run.stdout and "0 rejected" in run.stdout
    with App.open(tmp_path / "shell.db", contract) as shell:
        assert sorted(rows(shell)) == ["p1", "p2"]
    with App.open(tmp_path / "shell.db", contract):
        beside = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "atsync", "pull", "--db", str(tmp_path / "shell.db"),
                 "--session-dir", str(sessions), "--app", "notes_spec"],
                capture_output=True, text=True, timeout=60, cwd=tmp_path,
            )
        )  # fmt: skip
    assert beside.returncode != 0 and "already open" in beside.stderr


async def test_live_resumes_from_its_cursor_after_a_restart(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """The stream position is stored with what it delivered: a restarted device replays the
    events it missed instead of reading the whole repository again."""

    collection = collection_for(request)
    session = await alice(dev_pds)
    downloads, counted = counting("com.atproto.sync.getRepo")
    b_options: dict[str, Any] = {"pull": Live(), **counted}
    async with device(tmp_path / "a.db", collection, session, resolver) as (a, sync_a):
        async with device(tmp_path / "b.db", collection, session, resolver, **b_options) as (
            b,
            sync_b,
        ):
            await wait_status(sync_b, lambda s: s.live, 10)
            a.actions.put("first", "seen live")

            def cursor() -> int:
                (value,) = b.model_db.execute(
                    "select coalesce(max(value), 0) from _atsync_sync_state "
                    "where key = 'stream_cursor'"
                ).fetchone()
                return int(value)

            # The row comes with its event, or first with the whole read b makes as its
            # stream comes up without a position; then the event, already included, moves
            # the position past it all the same.
            await wait_status(sync_b, lambda s: "first" in rows(b) and cursor() > 0, 10)
        for key in ("m1", "m2", "m3"):  # while b is off
            a.actions.put(key, "missed")
        with anyio.fail_after(30):
            await sync_a.wait_for_idle()
        downloads.clear()
        async with device(tmp_path / "b.db", collection, session, resolver, **b_options) as (
            b,
            sync_b,
        ):
            await wait_status(sync_b, lambda s: {"m1", "m2", "m3"} <= set(rows(b)), 15)
            assert downloads == []  # replayed from the cursor, not read whole


class PlcDown(IdentityResolver):
    """An identity resolver whose PLC directory does not answer until ``up`` is set."""

    up = False

    async def resolve(self, identifier: str, **options: Any) -> Identity:
        if not self.up:
            raise TransientError("the PLC directory did not answer (test)")
        return await super().resolve(identifier, **options)


class PlcDownOnceDownloading(PlcDown):
    """The PLC directory fails only once the repository's download is being held back."""

    downloading: anyio.Event | None = None

    async def resolve(self, identifier: str, **options: Any) -> Identity:
        if not self.up and self.downloading is not None:
            await self.downloading.wait()
        return await super().resolve(identifier, **options)


async def test_a_signing_key_that_cannot_be_resolved_stops_the_download(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # The DID document is asked for while the repository downloads (one round trip to
    # another host less before the first byte): here the directory fails once the download
    # is under way. Without the key nothing is verified, so nothing is applied, and the
    # download (a whole getRepo on a new device) stops at once instead of going on for
    # nothing — here it would never end, its answer is held back. It is no fault of the
    # repository, so nothing is rejected; once the directory answers, the next pull
    # restores the records.
    from fault_proxy import FaultProxy, Hold, proxied_session

    collection = collection_for(request)
    session = await alice(dev_pds)
    await put_record(session, collection, "k1", title="before", n=1)
    held = Hold()
    async with FaultProxy(dev_pds.pds_url) as proxy:
        proxy.add(held, nsid="com.atproto.sync.getRepo", nth=1)
        proxied = proxied_session(session, proxy.url)
        plc = PlcDownOnceDownloading(plc_url=dev_pds.plc_url, allow_insecure_localhost=True)
        plc.downloading = held.reached
        async with plc, device(tmp_path / "b.db", collection, proxied, plc) as (b, sync_b):
            sync_b.pull_now()
            status = await wait_status(
                sync_b,
                lambda s: "cannot resolve the account's signing key" in (s.download_error or ""),
                10,
            )
            assert "PLC directory did not answer" in (status.download_error or "")
            assert not held.gate.is_set(), "the pull ended while its download was held"
            assert (status.rejected, rows(b)) == (0, {})
            held.release()
            plc.up = True
            with anyio.fail_after(30):
                await sync_b.wait_pulled()
            assert rows(b)["k1"]["title"] == "before"


async def test_a_login_under_manual_pull_pulls_only_when_asked(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    # Manual() pulls on pull_now() / wait_pulled() alone: a login pushes at once, and reads
    # nothing. A pull asked for before the login is made once the session is there.
    from atsync.app import ATPSigner
    from atsync.atproto import MemorySessionStore

    collection = collection_for(request)
    session = await alice(dev_pds)
    await put_record(session, collection, "r1", title="remote", n=1)
    downloads, counted = counting("com.atproto.sync.getRepo")
    for name, asked_before_login in (("b.db", False), ("c.db", True)):
        downloads.clear()
        signer = ATPSigner(store=MemorySessionStore())
        with App.open(tmp_path / name, contract, signer=signer) as app:
            sync = ATSync(
                app,
                bindings={"notes": Binding(collection)},
                identity=resolver,
                push=Immediate(),
                pull=Manual(),
                **counted,
            )
            async with sync:
                app.actions.put(f"local-{name}", "written here", None, 0)
                if asked_before_login:
                    sync.pull_now()
                signer.session = session
                with anyio.fail_after(30):
                    await sync.wait_for_idle()
                if asked_before_login:
                    await wait_status(sync, lambda s: "r1" in rows(app), 30)
                else:
                    assert downloads == [] and "r1" not in rows(app)
                    with anyio.fail_after(30):
                        await sync.wait_pulled()
                assert downloads and rows(app)["r1"]["title"] == "remote"
            sync.close()


async def test_a_cursor_older_than_the_replay_window_reads_the_repository(
    make_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # A replay window of 0: any cursor with an event after it is already outdated.
    pds = make_pds(replay_window_ms=0)
    collection = collection_for(request)
    session = await alice(pds)
    downloads, counted = counting("com.atproto.sync.getRepo")
    async with (
        IdentityResolver(plc_url=pds.plc_url, allow_insecure_localhost=True) as resolver,
        device(tmp_path / "a.db", collection, session, resolver) as (a, sync_a),
    ):
        b_options: dict[str, Any] = {"pull": Live(), **counted}
        async with device(tmp_path / "b.db", collection, session, resolver, **b_options) as (
            b,
            sync_b,
        ):
            await wait_status(sync_b, lambda s: s.live, 10)
            a.actions.put("seen", "live")
            await wait_status(sync_b, lambda s: "seen" in rows(b), 10)
        a.actions.put("missed", "while b was off")
        with anyio.fail_after(30):
            await sync_a.wait_for_idle()
        downloads.clear()
        async with device(tmp_path / "b.db", collection, session, resolver, **b_options) as (
            b,
            sync_b,
        ):
            await wait_status(sync_b, lambda s: "missed" in rows(b), 15)
            assert len(downloads) == 1  # OutdatedCursor: read whole, once
            assert rows(b) == rows(a)


async def test_binding_directions_are_honoured(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    session = await alice(dev_pds)
    await put_record(session, collection, "remote", title="written elsewhere", n=1)
    common = {"session": session, "identity": resolver, "push": Immediate()}
    with App.open(tmp_path / "pull-only.db", contract) as app:
        sync = ATSync(app, bindings={"notes": Binding(collection, direction="pull")}, **common)
        async with sync:
            app.actions.put("local", "never pushed")
            with anyio.fail_after(30):
                status = await sync.wait_pulled()
            assert status.pending == 0 and set(rows(app)) == {"remote", "local"}
        sync.close()
    with App.open(tmp_path / "push-only.db", contract) as app:
        sync = ATSync(app, bindings={"notes": Binding(collection, direction="push")}, **common)
        async with sync:
            app.actions.put("pushed", "from the push-only device")
            with anyio.fail_after(30):
                await sync.wait_pulled()  # nothing to pull: returns at once
                await sync.wait_for_idle()
            assert set(rows(app)) == {"pushed"}  # "remote" never pulled in
        sync.close()
    assert set(await remote(session, collection)) == {"remote", "pushed"}


async def test_on_pds_action_sees_every_pulled_change_in_its_transaction(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """The seed's onPDSAction: bound records beside their rows, and a watched collection
    with no binding at all; an exception in the hook rejects that record alone."""
    from atsync.sync import RemoteRecord

    collection = collection_for(request)
    likes = collection + "like"
    session = await alice(dev_pds)
    await put_record(session, collection, "n1", title="bound", n=1)
    await put_record(session, likes, "l1", subject="n1")
    await put_record(session, collection, "boom", title="the hook refuses this", n=2)
    seen: list[RemoteRecord] = []

    def hook(remote: RemoteRecord) -> None:
        if remote.rkey == "boom":
            raise ValueError("not this one")
        seen.append(remote)

    async with device(
        tmp_path / "b.db", collection, session, resolver, on_pds_action=hook, watch=[likes]
    ) as (b, sync_b):
        with anyio.fail_after(30):
            status = await sync_b.wait_pulled()
        assert sorted((r.collection, r.rkey, r.op) for r in seen) == [
            (collection, "n1", "create"),
            (likes, "l1", "create"),
        ]
        like = next(r for r in seen if r.collection == likes)
        assert like.record == {"$type": likes, "subject": "n1"} and like.did == session.did
        assert like.rev == status.rev and like.cid
        assert set(rows(b)) == {"n1"} and status.rejected == 1  # "boom": not applied
        (detail,) = b.model_db.execute("select detail from _atsync_rejected").fetchone()
        assert "not this one" in detail
        seen.clear()
        async with XrpcClient(session=session) as client:
            await client.delete_record(session.did, likes, "l1")
        with anyio.fail_after(30):
            await sync_b.wait_pulled()
        assert [(r.rkey, r.op, r.record) for r in seen] == [("l1", "delete", None)]


async def test_a_push_refused_by_another_devices_commit_merges_instead_of_overwriting(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """b pushes without having pulled a's edit of another field of the same note: the PDS
    refuses (InvalidSwap); b pulls, merges field by field, and pushes the merge."""
    collection = collection_for(request)
    session = await alice(dev_pds)
    async with (
        device(tmp_path / "a.db", collection, session, resolver, push=Manual()) as (a, sync_a),
        device(tmp_path / "b.db", collection, session, resolver, push=Manual()) as (b, sync_b),
    ):
        a.actions.put("n", "title", "body", 1)
        sync_a.push_now()
        await settle(sync_a, sync_b)
        a.actions.edit("n", title="a's title")
        b.actions.edit("n", body="b's body")
        sync_a.push_now()
        with anyio.fail_after(30):
            await sync_a.wait_for_idle()
        sync_b.push_now()  # b has not pulled: its swapCommit is stale
        with anyio.fail_after(30):
            status = await sync_b.wait_for_idle()
        merged = (await remote(session, collection))["n"]
        assert (merged["title"], merged["body"]) == ("a's title", "b's body")
        assert rows(b)["n"]["title"] == "a's title" and status.conflicts == 0
        await settle(sync_a)
        assert rows(a) == rows(b)


async def test_an_identity_event_drops_the_cached_key_and_pulling_goes_on(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = collection_for(request)
    account = dev_pds.accounts["bob.test"]
    session = await login(account.did, account.password, dev_pds.pds_url)
    async with ForgetfulResolver(plc_url=dev_pds.plc_url, allow_insecure_localhost=True) as r:
        async with device(tmp_path / "b.db", collection, session, r, pull=Live()) as (b, sync):
            await wait_status(sync, lambda s: s.live, within=30)
            async with XrpcClient(session=session) as client:
                try:
                    before = len(r.forgotten)
                    # A new handle: the PDS emits #identity for the account.
                    await client.procedure(
                        "com.atproto.identity.updateHandle", {"handle": "bob-renamed.test"},
                        auth=True,
                    )  # fmt: skip
                    with anyio.fail_after(30):
                        await r.forgets(account.did, since=before)
                    # Commits after it are verified against the key resolved afresh.
                    await put_record(session, collection, "after", title="after", n=1)
                    status = await wait_status(sync, lambda _: "after" in rows(b), within=30)
                    assert status.rejected == 0
                finally:
                    await client.procedure(
                        "com.atproto.identity.updateHandle", {"handle": "bob.test"}, auth=True
                    )

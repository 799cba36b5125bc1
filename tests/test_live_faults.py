"""``pull=Live()`` under a faulty event stream, against the real PDS: device A writes (pushing
directly), device B follows the PDS's ``subscribeRepos`` through the fault proxy, which cuts,
drops, delays, repeats, swaps and rewrites frames (tests/ws_fault_proxy.py). Each test ends
with B's rows equal to A's and to the PDS's records, one sync entry per record (nothing
applied twice).

An outdated cursor: the reference PDS replays events sequenced within
``PDS_REPO_BACKFILL_LIMIT_MS`` (a day by default); a cursor whose next event is older gets
``#info OutdatedCursor`` and no replay of it. ``DevPDS`` does not pass ``PDS_*`` variables
through, so the tests here age the stopped PDS's events instead (``age_events``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync.app import ActionContext, App, Contract
from atsync.atproto import IdentityResolver, Session, XrpcClient
from atsync.sync import ATSync, Binding, Immediate, Live, Manual
from fault_proxy import (
    Cut,
    Delay,
    DelayFrame,
    DropFrame,
    DuplicateFrame,
    ErrorFrame,
    FaultProxy,
    Hold,
    ReorderFrame,
    RewriteFrame,
    StreamFrame,
    corrupt_cbor,
    proxied_session,
    replace_in_blocks,
    rewrite_body,
)
from sync_devices import as_rows, remote, rows, session_of, wait_status
from sync_devices import collection_for as shared_collection_for

pytestmark = pytest.mark.anyio

GET_REPO = "com.atproto.sync.getRepo"
LATEST = "com.atproto.sync.getLatestCommit"
STREAM = "com.atproto.sync.subscribeRepos"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


contract = Contract(
    models={"notes": {"id": "primary", "title": "string", "body": "string?", "n": "integer"}}
)


@contract.action
def put(ctx: ActionContext, key: str, title: str, n: int = 0) -> None:
    ctx.db.set("notes", {"id": key, "title": title, "body": None, "n": n})


@contract.action
def edit(ctx: ActionContext, key: str, **fields: Any) -> None:
    ctx.db.update("notes", {"id": key, **fields})


@contract.action
def drop(ctx: ActionContext, key: str) -> None:
    ctx.db.delete("notes", key)


# --- devices ------------------------------------------------------------------------------------


def collection_for(request: pytest.FixtureRequest) -> str:
    return shared_collection_for(request, "test.atsync.livefaults")


async def alice(pds: Any) -> Session:
    return await session_of(pds, "alice.test")


@asynccontextmanager
async def device(
    path: Path, collection: str, session: Session, resolver: Any, **options: Any
) -> AsyncIterator[tuple[App, ATSync]]:
    """One device of the account: its own database and engine (A: push at once, pull on
    request; B passes ``pull=Live()``)."""
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


class PLCOf:
    """Resolves through the PLC directory a dev PDS runs now: it moves to another port when
    the PDS restarts, while the PDS keeps its own."""

    def __init__(self, pds: Any) -> None:
        self.pds = pds
        self._resolvers: dict[str, IdentityResolver] = {}
        self._url = pds.plc_url

    async def resolve(self, did: str, **options: Any) -> Any:
        if self.pds.running:  # while it is stopped, the old one: refused, the pull retried
            self._url = self.pds.plc_url
        url = self._url
        if url not in self._resolvers:
            self._resolvers[url] = IdentityResolver(plc_url=url, allow_insecure_localhost=True)
        return await self._resolvers[url].resolve(did, **options)

    async def aclose(self) -> None:
        for resolver in self._resolvers.values():
            await resolver.aclose()


@asynccontextmanager
async def live_pair(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> AsyncIterator[tuple[FaultProxy, Session, str, App, ATSync, App, ATSync]]:
    """The set-up of most tests here: device A writing straight to the PDS, device B
    following it live through the fault proxy."""
    collection = collection_for(request)
    session = await alice(dev_pds)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        b_session = proxied_session(session, proxy.url)
        async with (
            device(tmp_path / "a.db", collection, session, resolver) as (a, sync_a),
            device(tmp_path / "b.db", collection, b_session, resolver, pull=Live()) as (
                b,
                sync_b,
            ),
        ):
            yield proxy, session, collection, a, sync_a, b, sync_b


async def write_each(app: App, sync: ATSync, keys: list[str], title: str = "note") -> None:
    """A writes one record per commit: each put is pushed before the next."""
    for i, key in enumerate(keys):
        app.actions.put(key, f"{title} {key}", i)
        with anyio.fail_after(30):
            await sync.wait_for_idle()


async def converged(
    a: App, b: App, sync_b: ATSync, session: Session, collection: str, within: float = 30
) -> None:
    """B reaches A's rows (awaited on B's status), which are the PDS's records; one sync
    entry per row (nothing applied twice)."""
    expected = rows(a)
    await wait_status(sync_b, lambda s: rows(b) == expected, within)
    assert rows(b) == expected == as_rows(await remote(session, collection))
    (entries,) = b.model_db.execute(
        "select count(*) from _atsync_records where collection = ?", (collection,)
    ).fetchone()
    assert entries == len(expected)


def stored_for(db: Path, proxy: FaultProxy) -> None:
    """Mark B's stored stream position as read through ``proxy``: a position counts the
    events of the host it was read from (by URL), and the proxy is the same PDS under
    another one. Without this, B would not resume from it there but read what changed."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT OR REPLACE INTO _atsync_sync_state (key, value) VALUES ('stream_host', ?)",
            (proxy.url,),
        )


def stream_cursor(app: App) -> int | None:
    row = app.model_db.execute(
        "select value from _atsync_sync_state where key = 'stream_cursor'"
    ).fetchone()
    return int(row[0]) if row is not None else None


def rejected(app: App) -> list[tuple[str | None, str, str]]:
    return [
        tuple(r) for r in app.model_db.execute("select rkey, reason, detail from _atsync_rejected")
    ]


async def live_and_warm(a: App, sync_a: ATSync, b: App, sync_b: ATSync) -> None:
    """B's stream is open and B applied an event from it (so it holds a stream cursor). A
    write can land in the whole read B makes when its stream first opens, and then its
    event is not applied: write another."""
    await wait_status(sync_b, lambda s: s.live and s.has_synced, 30)
    for attempt in range(3):
        key = f"warm{attempt}"
        a.actions.put(key, "up")
        with anyio.fail_after(30):
            await sync_a.wait_for_idle()
        await wait_status(sync_b, lambda s, key=key: key in rows(b), 15)
        if stream_cursor(b) is not None:
            return
    raise AssertionError("B applied no event from its stream")


# --- (a) cuts ----------------------------------------------------------------------------------


async def test_cut_streams_resume_from_the_stored_cursor(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """The stream is cut three times while A writes 50 records: B reconnects each time from
    the last event it applied, the PDS replays the rest, and nothing is read whole."""
    async with live_pair(dev_pds, tmp_path, request, resolver) as pair:
        proxy, session, collection, a, sync_a, b, sync_b = pair
        await live_and_warm(a, sync_a, b, sync_b)
        reads = len(proxy.requests(GET_REPO))
        assert reads >= 1  # the first start reads the repository
        cuts = proxy.add_frame(
            Cut(), type="#commit", repo=session.did, path=f"{collection}/", nth={5, 15, 30}
        )
        await write_each(a, sync_a, [f"k{i:02d}" for i in range(50)])
        await converged(a, b, sync_b, session, collection, within=60)

        assert cuts.fired == 3 and proxy.frame_counts["cut"] == 3
        assert len(proxy.requests(GET_REPO)) == reads  # replays covered everything
        streams = proxy.streams
        assert len(streams) >= 4 and all(s.status == 101 for s in streams)
        cut_frames = [f for s in streams for f in s.frames if f.fault == "cut"]
        for cut in cut_frames:
            after = streams[cut.stream + 1 :]
            # Reconnected from a stored cursor, before the cut event: it was replayed.
            assert after and after[0].cursor is not None and after[0].cursor < (cut.seq or 0)
            assert any(f.seq == cut.seq and f.forwarded for s in after for f in s.frames)
        last = max(f.seq or 0 for f in proxy.frames("#commit") if f.forwarded)
        assert stream_cursor(b) == last
        assert rejected(b) == []


# --- (b) a gap ---------------------------------------------------------------------------------


async def test_a_dropped_event_is_a_gap_and_the_repository_is_read_once(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    async with live_pair(dev_pds, tmp_path, request, resolver) as pair:
        proxy, session, collection, a, sync_a, b, sync_b = pair
        await live_and_warm(a, sync_a, b, sync_b)
        reads = len(proxy.requests(GET_REPO))
        gap = proxy.add_frame(
            DropFrame(), type="#commit", repo=session.did, path=f"{collection}/", nth=3
        )
        await write_each(a, sync_a, [f"g{i}" for i in range(6)])
        a.actions.drop("g0")  # a delete after the gap: found by the whole read
        with anyio.fail_after(30):
            await sync_a.wait_for_idle()
        await converged(a, b, sync_b, session, collection)
        assert gap.fired == 1
        assert len(proxy.requests(GET_REPO)) == reads + 1  # read once, at the gap
        assert len(proxy.streams) == 1  # detected in the stream, not by a reconnect

        # Then it follows the stream again: events only.
        await write_each(a, sync_a, ["after1", "after2"])
        await converged(a, b, sync_b, session, collection)
        assert len(proxy.requests(GET_REPO)) == reads + 1
        assert rejected(b) == []


# --- (c) malformed and tampered frames ---------------------------------------------------------


async def test_malformed_and_tampered_frames_are_not_applied(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    async with live_pair(dev_pds, tmp_path, request, resolver) as pair:
        proxy, session, collection, a, sync_a, b, sync_b = pair
        await live_and_warm(a, sync_a, b, sync_b)
        reads = len(proxy.requests(GET_REPO))

        # A frame that is not CBOR: ignored as malformed (the stream is reopened from the
        # stored cursor, and the PDS sends the event again).
        proxy.add_frame(RewriteFrame(corrupt_cbor), path=f"{collection}/c2", times=1)
        await write_each(a, sync_a, ["c1", "c2", "c3"])
        await converged(a, b, sync_b, session, collection)
        assert proxy.frame_counts["rewrite"] == 1
        assert len(proxy.streams) == 2
        (bad,) = [f for f in proxy.streams[0].frames if f.fault == "rewrite"]
        assert proxy.streams[0].ended == "client closed"  # B dropped it
        resumed = proxy.streams[1]
        assert resumed.cursor is not None and resumed.cursor < (bad.seq or 0)
        assert any(f.seq == bad.seq and f.fault == "pass" for f in resumed.frames)
        assert len(proxy.requests(GET_REPO)) == reads
        assert rejected(b) == []

        # A #commit whose record block was altered on the way: rejected with the reason,
        # not applied, and the repository is read instead (held here to look at B).
        tamper = replace_in_blocks(b"the original title", b"the tampered title")
        proxy.add_frame(RewriteFrame(tamper), path=f"{collection}/t1", times=1)
        read = Hold(after_forward=False)
        proxy.add(read, nsid=GET_REPO, times=1)
        a.actions.put("t1", "the original title")
        with anyio.fail_after(30):
            await sync_a.wait_for_idle()
            await read.reached.wait()
        assert "t1" not in rows(b)
        ((rkey, reason, detail),) = rejected(b)
        assert rkey is None and reason == "VerificationError" and "#commit event" in detail
        read.release()
        await converged(a, b, sync_b, session, collection)
        await wait_status(sync_b, lambda s: s.rejected == 1, 10)
        assert rows(b)["t1"]["title"] == "the original title"
        assert len(proxy.requests(GET_REPO)) == reads + 1

        await write_each(a, sync_a, ["t2"])  # and events apply again
        await converged(a, b, sync_b, session, collection)
        assert len(proxy.requests(GET_REPO)) == reads + 1


# --- (d) delays --------------------------------------------------------------------------------


async def test_delayed_frames_lose_nothing_and_keep_their_order(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    session = await alice(dev_pds)
    async with FaultProxy(dev_pds.pds_url, seed=3) as proxy:
        b_session = proxied_session(session, proxy.url)
        async with (
            device(tmp_path / "a.db", collection, session, resolver) as (a, sync_a),
            device(tmp_path / "b.db", collection, b_session, resolver, pull=Live()) as (
                b,
                sync_b,
            ),
        ):
            await live_and_warm(a, sync_a, b, sync_b)
            reads = len(proxy.requests(GET_REPO))
            late = proxy.add_frame(
                DelayFrame(1.0, up_to=2.0),
                type="#commit",
                repo=session.did,
                path=f"{collection}/",
                nth={1, 3, 4, 8, 10},
            )
            await write_each(a, sync_a, [f"d{i}" for i in range(8)])
            a.actions.edit("d1", title="edited")
            with anyio.fail_after(30):
                await sync_a.wait_for_idle()
            a.actions.drop("d2")
            with anyio.fail_after(30):
                await sync_a.wait_for_idle()
            await converged(a, b, sync_b, session, collection)
            assert late.fired == 5
            delayed = [f for f in proxy.frames("#commit") if f.fault == "delay"]
            assert all((f.sent_at or 0) - f.at >= 1.0 for f in delayed)
            sent = [f for f in proxy.frames("#commit") if f.forwarded]
            assert [f.seq for f in sent] == sorted(f.seq or 0 for f in sent)  # order kept
            # Every event followed the one before it: applied directly, nothing read whole,
            # the stream never dropped.
            assert len(proxy.requests(GET_REPO)) == reads
            assert len(proxy.streams) == 1 and proxy.streams[0].open
            assert stream_cursor(b) == sent[-1].seq
            assert rows(b)["d1"]["title"] == "edited" and "d2" not in rows(b)


# --- (e) the PDS restarts ------------------------------------------------------------------------


async def test_b_reconnects_after_a_pds_restart_and_converges(
    restartable_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pds = restartable_pds
    collection = collection_for(request)
    session = await alice(pds)
    plc = PLCOf(pds)
    try:
        async with FaultProxy(pds.pds_url) as proxy:
            b_session = proxied_session(session, proxy.url)
            async with (
                device(tmp_path / "a.db", collection, session, plc) as (a, sync_a),
                device(tmp_path / "b.db", collection, b_session, plc, pull=Live()) as (
                    b,
                    sync_b,
                ),
            ):
                await live_and_warm(a, sync_a, b, sync_b)
                await write_each(a, sync_a, [f"before{i}" for i in range(5)])
                await converged(a, b, sync_b, session, collection)

                await pds.stop_async()
                await wait_status(sync_b, lambda s: not s.live, 15)
                with anyio.fail_after(10):
                    await proxy.wait_until(lambda p: p.streams[0].closed_at is not None)
                assert (proxy.streams[0].ended or "").startswith("upstream closed")
                for i in range(5):  # queued on A while the PDS is down
                    a.actions.put(f"during{i}", "written while the PDS was down", i)
                a.actions.drop("before0")
                await pds.start_async()
                with anyio.fail_after(60):
                    await sync_a.wait_for_idle()
                await wait_status(sync_b, lambda s: s.live, 60)
                await converged(a, b, sync_b, session, collection, within=60)
                # (live_and_warm wrote one to three "warm" rows, as the timing went.)
                written = {k for k in rows(b) if not k.startswith("warm")}
                assert written == {*(f"before{i}" for i in range(1, 5)),
                                   *(f"during{i}" for i in range(5))}  # fmt: skip

                reopened = [s for s in proxy.streams if s.status == 101][1:]
                assert reopened and reopened[0].cursor is not None  # resumed from its cursor
                assert all(s.status in (101, 502) for s in proxy.streams)
                # (B may also have polled, and read the repository, before the stream was
                # back: not asserted.)
    finally:
        await plc.aclose()


# --- (f) an outdated cursor ----------------------------------------------------------------------


def age_events(pds: Any, days: float = 2) -> int:
    """Make every event the stopped PDS has sequenced look ``days`` old: past its replay
    window (``PDS_REPO_BACKFILL_LIMIT_MS``, a day by default), so a cursor among them is
    answered with ``#info OutdatedCursor`` and no replay of them."""
    (db_path,) = Path(pds._data_dir).rglob("sequencer.sqlite")
    old = (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    with sqlite3.connect(db_path) as db:
        changed = db.execute("update repo_seq set sequencedAt = ?", (old,)).rowcount
    return changed


async def test_a_restart_with_an_outdated_cursor_reads_the_repository(
    restartable_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """B is off while A edits and deletes; meanwhile the PDS's replay window passes B's
    cursor. B starts again: the PDS says OutdatedCursor, B reads the repository and
    converges, deletes included."""
    pds = restartable_pds
    collection = collection_for(request)
    session = await alice(pds)
    plc = PLCOf(pds)
    try:
        async with device(tmp_path / "a.db", collection, session, plc) as (a, sync_a):
            async with FaultProxy(pds.pds_url) as proxy:
                b_session = proxied_session(session, proxy.url)
                async with device(tmp_path / "b.db", collection, b_session, plc, pull=Live()) as (
                    b,
                    sync_b,
                ):
                    await live_and_warm(a, sync_a, b, sync_b)
                    await write_each(a, sync_a, ["x1", "x2", "x3"])
                    await converged(a, b, sync_b, session, collection)
                    cursor = stream_cursor(b)
            # B is off: A edits, deletes, adds.
            a.actions.edit("x1", title="edited while b was off")
            a.actions.drop("x2")
            a.actions.put("x4", "new while b was off")
            with anyio.fail_after(30):
                await sync_a.wait_for_idle()
            await pds.stop_async()
            assert age_events(pds) > 0
            await pds.start_async()

            async with FaultProxy(pds.pds_url) as proxy:
                b_session = proxied_session(session, proxy.url)
                stored_for(tmp_path / "b.db", proxy)
                async with device(tmp_path / "b.db", collection, b_session, plc, pull=Live()) as (
                    b,
                    sync_b,
                ):
                    await converged(a, b, sync_b, session, collection)
                    with anyio.fail_after(15):
                        await proxy.wait_until(lambda p: bool(p.frames("#info")))
                    assert proxy.streams[0].cursor == cursor
                    (info,) = proxy.frames("#info")
                    assert info.forwarded
                    assert len(proxy.requests(GET_REPO)) >= 1
                    assert rows(b)["x1"]["title"] == "edited while b was off"
                    assert "x2" not in rows(b) and "x4" in rows(b)
                    await wait_status(sync_b, lambda s: s.live, 15)
                    await write_each(a, sync_a, ["x5"])  # and it follows the stream again
                    await converged(a, b, sync_b, session, collection)
    finally:
        await plc.aclose()


async def test_a_reconnect_with_an_outdated_cursor_reads_the_repository(
    restartable_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The same without restarting B (whose start reads the repository anyway): its stream
    is down (reconnects held, polling off) while A writes and the window passes its cursor;
    when the stream comes back with OutdatedCursor, B reads the repository because of it."""
    pds = restartable_pds
    collection = collection_for(request)
    session = await alice(pds)
    plc = PLCOf(pds)
    try:
        async with FaultProxy(pds.pds_url) as proxy:
            b_session = proxied_session(session, proxy.url)
            async with (
                device(tmp_path / "a.db", collection, session, plc) as (a, sync_a),
                device(tmp_path / "b.db", collection, b_session, plc, pull=Live(fallback=3600)) as (
                    b,
                    sync_b,
                ),
            ):
                await live_and_warm(a, sync_a, b, sync_b)
                await write_each(a, sync_a, ["y1", "y2"])
                await converged(a, b, sync_b, session, collection)
                cursor = stream_cursor(b)
                # The next handshake is held; the stream is cut on the next event.
                handshake = Hold(after_forward=False)
                proxy.add(handshake, nsid=STREAM, times=1)
                proxy.add_frame(Cut(), type="#commit", repo=session.did, times=1)
                a.actions.drop("y1")
                a.actions.put("y3", "while the stream was down")
                with anyio.fail_after(30):
                    await sync_a.wait_for_idle()
                    await handshake.reached.wait()
                assert "y1" in rows(b) and "y3" not in rows(b)
                reads = len(proxy.requests(GET_REPO))

                await pds.stop_async()
                assert age_events(pds) > 0
                await pds.start_async()
                handshake.release()
                await converged(a, b, sync_b, session, collection, within=60)
                outdated = [s for s in proxy.streams if any(f.type == "#info" for f in s.frames)]
                assert outdated and outdated[0].cursor == cursor
                assert len(proxy.requests(GET_REPO)) == reads + 1
                read = proxy.requests(GET_REPO)[-1]
                (info,) = [f for f in outdated[0].frames if f.type == "#info"]
                assert info.sent_at is not None and read.received_at > info.sent_at
    finally:
        await plc.aclose()


# --- more hostile and unusual streams ------------------------------------------------------------


async def test_duplicated_and_reordered_events_are_applied_once(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """At-least-once delivery: a repeated event changes nothing; two events swapped are a gap
    (the second arrives first), so the repository is read once."""
    async with live_pair(dev_pds, tmp_path, request, resolver) as pair:
        proxy, session, collection, a, sync_a, b, sync_b = pair
        await live_and_warm(a, sync_a, b, sync_b)
        reads = len(proxy.requests(GET_REPO))
        mine = {"type": "#commit", "repo": session.did, "path": f"{collection}/"}
        proxy.add_frame(DuplicateFrame(copies=2), **mine, nth={1, 2})
        await write_each(a, sync_a, ["u1", "u2"])
        a.actions.edit("u1", title="edited once")
        with anyio.fail_after(30):
            await sync_a.wait_for_idle()
        await converged(a, b, sync_b, session, collection)
        assert len(proxy.requests(GET_REPO)) == reads  # repeats are not gaps
        assert proxy.frame_counts["duplicate"] == 2
        # Skipped repeats never move the stream position back: it is the last event's.
        seqs = [f.seq for f in proxy.frames("#commit") if f.repo == session.did and f.seq]
        assert stream_cursor(b) == max(seqs)

        proxy.add_frame(ReorderFrame(), **mine, nth=2)
        await write_each(a, sync_a, ["v1", "v2", "v3", "v4"])
        await converged(a, b, sync_b, session, collection)
        assert proxy.frame_counts["reorder"] == 1
        assert len(proxy.requests(GET_REPO)) == reads + 1
        assert rejected(b) == []


async def test_a_forged_since_hiding_a_gap_is_caught_by_the_inversion(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """An event is dropped and the next one's unsigned ``since`` and ``prevData`` are forged
    to follow B's state: its operations inverted do not give ``prevData``, so it is
    rejected, and the repository is read."""
    async with live_pair(dev_pds, tmp_path, request, resolver) as pair:
        proxy, session, collection, a, sync_a, b, sync_b = pair
        await live_and_warm(a, sync_a, b, sync_b)
        reads = len(proxy.requests(GET_REPO))
        seen: list[tuple[Any, Any]] = []

        def remember(frame: StreamFrame) -> bool:
            assert frame.body is not None
            seen.append((frame.body["since"], frame.body["prevData"]))
            return True

        def follow_the_dropped_one(body: dict[str, Any]) -> dict[str, Any]:
            since, prev_data = seen[-2]
            return {**body, "since": since, "prevData": prev_data}

        mine = {"type": "#commit", "repo": session.did, "path": f"{collection}/"}
        proxy.add_frame(DropFrame(), **mine, when=remember, nth=2)
        proxy.add_frame(RewriteFrame(rewrite_body(follow_the_dropped_one)), **mine, nth=3)
        await write_each(a, sync_a, ["f1", "f2", "f3", "f4"])
        await converged(a, b, sync_b, session, collection)
        ((_, reason, detail),) = rejected(b)
        assert reason == "VerificationError" and "#commit event" in detail
        assert len(proxy.requests(GET_REPO)) == reads + 1


async def test_a_commit_whose_ops_hide_a_delete_is_rejected(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """The ops list is not signed: one that leaves a delete out does not invert to
    ``prevData``; B rejects the event, reads the repository, and the delete arrives."""
    async with live_pair(dev_pds, tmp_path, request, resolver) as pair:
        proxy, session, collection, a, sync_a, b, sync_b = pair
        await live_and_warm(a, sync_a, b, sync_b)
        await write_each(a, sync_a, ["h1"])
        await converged(a, b, sync_b, session, collection)
        reads = len(proxy.requests(GET_REPO))

        def without_deletes(body: dict[str, Any]) -> dict[str, Any]:
            return {**body, "ops": [op for op in body["ops"] if op["action"] != "delete"]}

        hide = proxy.add_frame(
            RewriteFrame(rewrite_body(without_deletes)), path=f"{collection}/h1", times=1
        )
        with a.batch():
            a.actions.drop("h1")
            a.actions.put("h2", "beside the delete")
        with anyio.fail_after(30):
            await sync_a.wait_for_idle()
        await converged(a, b, sync_b, session, collection)
        assert hide.fired == 1 and "h1" not in rows(b)
        ((_, reason, detail),) = rejected(b)
        assert reason == "VerificationError" and "#commit event" in detail
        assert len(proxy.requests(GET_REPO)) == reads + 1


async def test_a_transient_error_frame_reconnects_from_the_cursor(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    async with live_pair(dev_pds, tmp_path, request, resolver) as pair:
        proxy, session, collection, a, sync_a, b, sync_b = pair
        await live_and_warm(a, sync_a, b, sync_b)
        reads = len(proxy.requests(GET_REPO))
        proxy.add_frame(
            ErrorFrame("ConsumerTooSlow", "injected"),
            type="#commit",
            path=f"{collection}/",
            nth=2,
        )
        await write_each(a, sync_a, ["s1", "s2", "s3"])
        await converged(a, b, sync_b, session, collection)
        assert proxy.streams[0].ended == "error frame"
        assert len(proxy.streams) == 2 and proxy.streams[1].cursor is not None
        assert len(proxy.requests(GET_REPO)) == reads


async def test_a_future_cursor_is_dropped_and_the_repository_read(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """A stored cursor the PDS has never reached (FutureCursor: e.g. the PDS lost its data, or
    the database came from elsewhere): B connects without it, reads the repository, and
    stores a real cursor with the next event."""
    collection = collection_for(request)
    session = await alice(dev_pds)
    async with device(tmp_path / "a.db", collection, session, resolver) as (a, sync_a):
        async with device(tmp_path / "b.db", collection, session, resolver, pull=Live()) as (
            b,
            sync_b,
        ):
            await live_and_warm(a, sync_a, b, sync_b)
        with sqlite3.connect(tmp_path / "b.db") as db:
            db.execute("update _atsync_sync_state set value = ? where key = 'stream_cursor'",
                       (str(10**12),))  # fmt: skip
        await write_each(a, sync_a, ["p1", "p2"])
        async with FaultProxy(dev_pds.pds_url) as proxy:
            b_session = proxied_session(session, proxy.url)
            stored_for(tmp_path / "b.db", proxy)
            async with device(tmp_path / "b.db", collection, b_session, resolver, pull=Live()) as (
                b,
                sync_b,
            ):
                await converged(a, b, sync_b, session, collection)
                await wait_status(sync_b, lambda s: s.live, 15)
                first, second = proxy.streams[:2]
                assert first.cursor == 10**12 and first.frames[0].type == "error"
                assert second.cursor is None and second.status == 101
                await write_each(a, sync_a, ["p3"])
                await converged(a, b, sync_b, session, collection)
                assert (stream_cursor(b) or 0) < 10**12


async def test_a_restart_replays_through_a_slow_handshake_and_a_cut(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """B restarts after A wrote 20 records: its stream opens a second late and is cut in the
    middle of the replay; B still catches up from its cursor, reading nothing whole."""
    collection = collection_for(request)
    session = await alice(dev_pds)
    async with device(tmp_path / "a.db", collection, session, resolver) as (a, sync_a):
        async with device(tmp_path / "b.db", collection, session, resolver, pull=Live()) as (
            b,
            sync_b,
        ):
            await live_and_warm(a, sync_a, b, sync_b)
        await write_each(a, sync_a, [f"m{i:02d}" for i in range(20)])
        async with FaultProxy(dev_pds.pds_url) as proxy:
            proxy.add(Delay(1.0), nsid=STREAM, nth=1)
            proxy.add_frame(Cut(), type="#commit", repo=session.did, nth=8)
            b_session = proxied_session(session, proxy.url)
            stored_for(tmp_path / "b.db", proxy)
            async with device(tmp_path / "b.db", collection, b_session, resolver, pull=Live()) as (
                b,
                sync_b,
            ):
                await converged(a, b, sync_b, session, collection)
                assert proxy.frame_counts["cut"] == 1 and len(proxy.streams) == 2
                assert all(s.cursor is not None for s in proxy.streams)
                assert proxy.requests(GET_REPO) == []


async def test_a_frame_that_never_decodes_does_not_stop_live_following(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    async with live_pair(dev_pds, tmp_path, request, resolver) as pair:
        proxy, session, collection, a, sync_a, b, sync_b = pair
        await live_and_warm(a, sync_a, b, sync_b)
        # Every copy of one event is damaged (the replays after a reconnect too).
        proxy.add_frame(RewriteFrame(corrupt_cbor), path=f"{collection}/poison")
        await write_each(a, sync_a, ["poison", "next"])
        await converged(a, b, sync_b, session, collection)  # (by polling: it does)
        reads = len(proxy.requests(GET_REPO))
        await write_each(a, sync_a, ["later1", "later2"])
        await converged(a, b, sync_b, session, collection)
        # Followed from the stream again: nothing read whole, the cursor past the poison.
        assert len(proxy.requests(GET_REPO)) == reads
        poison = max(f.seq or 0 for f in proxy.frames("#commit") if f.fault == "rewrite")
        assert (stream_cursor(b) or 0) > poison
        reasons = {r for (r,) in b.model_db.execute("select reason from _atsync_rejected")}
        assert "MalformedFrame" in reasons  # said, with its reason


async def test_a_write_whose_event_is_lost_then_deleted_elsewhere_is_deleted_by_the_catch_up(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """B follows the stream (its held tree moves with each event). B's own write x lands,
    but the event of it is lost; another device deletes x. The next event is a gap: B
    catches up by what changed since the last event it applied, where x is in neither
    tree — its note of the write must delete it."""
    async with live_pair(dev_pds, tmp_path, request, resolver) as pair:
        proxy, session, collection, a, sync_a, b, sync_b = pair
        await live_and_warm(a, sync_a, b, sync_b)
        lost = proxy.add_frame(DropFrame(), type="#commit", path=f"{collection}/x", times=1)
        b.actions.put("x", "from B")
        with anyio.fail_after(30):
            await sync_b.wait_for_idle()
        noted = "SELECT rkey FROM _atsync_unpulled WHERE rkey = 'x'"
        assert b.model_db.execute(noted).fetchall() == [("x",)]
        reads = len(proxy.requests(GET_REPO))
        async with XrpcClient(session=session) as other_device:
            await other_device.delete_record(session.did, collection, "x")
        await wait_status(sync_b, lambda s: "x" not in rows(b), 15)
        assert lost.fired == 1
        assert rows(b) == as_rows(await remote(session, collection))
        gap_reads = proxy.requests(GET_REPO)[reads:]
        assert len(gap_reads) == 1 and "since=" in gap_reads[0].target  # only what changed
        assert b.model_db.execute(noted).fetchall() == []  # the catch-up let go of it

"""Pull throughput and live latency on a local reference PDS: atsync vs hand-written baselines.

    .venv/bin/python benchmarks/pull.py [--n 20000] [--rounds 3] [--live 50] [--live-big 20]

One run, one PDS. A repository of ``n`` records (``applyWrites`` batches of 200), then:

(i) backfill, records/s (median of ``--rounds``, each into a fresh local database):

    atsync  a fresh device: ``ATSync(..., pull=Manual(), push=Manual())``, timed from entering
            ``async with sync`` to ``wait_pulled()`` returning — getRepo streamed to a file,
            the commit's signature checked against the account's key, every block's hash and
            the MST, every record applied as a row. (Stopping the engine afterwards, with
            the WAL checkpoint it began once the rows landed, is shown apart.) Run in a child
            process, which also measures its peak RSS growth (VmHWM, reset through
            /proc/self/clear_refs when the kernel allows it). From a PDS on loopback the CAR
            is asked for uncompressed (``XrpcClient``: compressing it costs both ends CPU
            and holds back its first byte, for bytes that cross no wire).
    (a)     the ``atproto`` SDK: a ``com.atproto.repo.listRecords`` loop (limit 100, cursor),
            each record inserted into a plain ``sqlite3`` table (WAL, synchronous=NORMAL, as
            atsync's default; one transaction per page), timed to its last commit. No
            verification. The SDK's own HTTP settings (it accepts gzip).
    (b)     the floor: ``getRepo`` downloaded into memory, uncompressed as atsync asks for
            it, and decoded with ``libipld.decode_car``; nothing verified, nothing written.

(ii) live latency: device A (``push=Immediate()``) does an action; device B (``pull=Live()``)
    has the row — p50 and p99 (nearest rank: with 50 writes, p99 is the slowest) over
    ``--live`` writes, after 3 warm-up writes. Beside it, when the PDS answered A's
    ``applyWrites``, and when a raw ``FirehoseSubscription`` on the same PDS (in a process of
    its own) received the ``#commit`` frame carrying the record, so the table shows what
    atsync adds over the stream itself. Measured on an account with a small repository,
    and (``--live-big``, 0 to skip) on the ``n``-record account with B restored from (i).

(iii) catch-up: the device restored in (i), running; another device commits 100 changes
    (creates, updates, deletes); timed from ``wait_pulled()`` to its return
    (``getRepo?since=`` compared with the MST nodes it kept), against a whole read (i) and
    (a) the SDK's listRecords loop (it has no way to ask for changes only). Then the same
    for the device of (ii)'s ``--live-big`` part, whose held tree followed the live events.

Targets (issue #9): atsync >= 2x (a) and >= 0.5x (b) in records/s, peak RSS growth < 150 MB;
live p50 < 300 ms, p99 < 1 s.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
from _keys import create_all

from atsync.app import App, Contract
from atsync.atproto import (
    Create,
    Delete,
    DevPDS,
    FirehoseSubscription,
    IdentityResolver,
    TidClock,
    Update,
    Write,
    XrpcClient,
    login,
)
from atsync.sync import ATSync, Binding, Immediate, Live, Manual

TARGET_SDK, TARGET_FLOOR, TARGET_RSS_MB = 2.0, 0.5, 150.0
TARGET_P50, TARGET_P99 = 0.300, 1.0
CATCH_UP = 100  # changes another device makes before (iii)
PASSWORD = "bench-pw-1"
BIG, SMALL = "bench.test", "live.test"
COLLECTION = "bench.pull.post"
TEXT = "a post of a typical length, written on one device and read back on another: "

contract = Contract(models={"posts": {"id": "primary", "text": "string", "n": "integer"}})


@contract.action
def post(ctx, key, n):  # type: ignore[no-untyped-def]
    ctx.db.set("posts", {"id": key, "text": f"{TEXT}{n}", "n": n})


def record(n: int) -> dict[str, Any]:
    return {"$type": COLLECTION, "text": f"{TEXT}{n}", "n": n}


# -- the repository ---------------------------------------------------------------------------


async def fill(pds: DevPDS, did: str, n: int) -> tuple[float, list[str]]:
    """``n`` records in ``applyWrites`` batches of 200; returns the seconds it took and the
    record keys."""
    clock = TidClock()
    rkeys: list[str] = []
    start = time.perf_counter()
    async with XrpcClient(session=await login(did, PASSWORD, pds.pds_url)) as client:
        for first in range(0, n, 200):
            batch = [record(i) for i in range(first, min(n, first + 200))]
            rkeys += await create_all(client, did, COLLECTION, batch, clock)
    return time.perf_counter() - start, rkeys


async def change_some(pds: DevPDS, did: str, rkeys: list[str], count: int) -> int:
    """Another device's commit: ``count`` changes, half creates, 30% updates, 20% deletes
    spread over the repository. Returns how many records there are now more."""
    clock = TidClock()
    creates, updates = count // 2, count * 3 // 10
    deletes = count - creates - updates
    step = max(1, len(rkeys) // (updates + deletes + 1))
    spread = rkeys[::step]
    writes: list[Write] = [
        Create(COLLECTION, record(-i), rkey=clock.next()) for i in range(creates)
    ]
    writes += [Update(COLLECTION, k, record(-1_000 - i)) for i, k in enumerate(spread[:updates])]
    writes += [Delete(COLLECTION, k) for k in spread[updates : updates + deletes]]
    async with XrpcClient(session=await login(did, PASSWORD, pds.pds_url)) as client:
        await client.apply_writes(did, writes)
    return creates - deletes


# -- (i) atsync backfill, in a child process ------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def manual_device(app: App, session: Any, resolver: IdentityResolver, **options: Any) -> ATSync:
    """The device of (i) and (iii): posts bound, nothing pulled or pushed unless asked."""
    return ATSync(
        app,
        bindings={"posts": Binding(COLLECTION)},
        session=session,
        pull=Manual(),
        push=Manual(),
        identity=resolver,
        **options,
    )


def child_backfill(pds_url: str, plc_url: str, did: str, db: str) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        session = await login(did, PASSWORD, pds_url)
        async with IdentityResolver(plc_url=plc_url, allow_insecure_localhost=True) as resolver:
            with App.open(db, contract) as app:
                sync = manual_device(app, session, resolver)
                # When the first chunk of rows is applied: download and verification are done.
                first_chunk: list[float] = []
                sync.on_status(
                    lambda s: first_chunk.append(time.perf_counter()) if s.pull_progress else None
                )
                before = proc_status()
                reset = reset_peak()
                start = time.perf_counter()
                async with sync:
                    status = await sync.wait_pulled()
                    seconds = time.perf_counter() - start
                # Stopping the engine: it finishes the WAL checkpoint it began after the rows
                # landed (the SDK's loop leaves its WAL as it is). Shown, not counted.
                stop = time.perf_counter() - start - seconds
                after = proc_status()
                sync.close()
                rows = app.model_db.execute("SELECT count(*) FROM posts").fetchone()[0]
        return {
            "seconds": seconds,
            "stop": stop,
            "to_first_chunk": (first_chunk[0] - start) if first_chunk else None,
            "rows": rows,
            "rss_before": before["VmRSS"],
            "hwm_before": before["VmHWM"],
            "hwm_after": after["VmHWM"],
            "peak_reset": reset,
            "download_error": status.download_error,
            "rejected": status.rejected,
            "pending": status.pending,
        }

    return anyio.run(run, backend="asyncio")


def atsync_backfill(pds: DevPDS, did: str, db: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child-backfill", pds.pds_url, pds.plc_url, did, str(db)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def running_catch_up(pds: DevPDS, did: str, rkeys: list[str], db: Path) -> tuple[float, int]:
    """(iii): the device of (i), running; another device commits ``CATCH_UP`` changes; the
    seconds from ``pull_now()`` to ``wait_pulled()`` returning, and the rows after. Fails
    unless it read only what changed (``getRepo?since=``)."""
    session = await login(did, PASSWORD, pds.pds_url)
    reads: list[str] = []

    async def count(request: httpx.Request) -> None:
        if request.url.path.endswith("com.atproto.sync.getRepo"):
            reads.append(str(request.url))

    hooks = {"event_hooks": {"request": [count]}}
    async with IdentityResolver(plc_url=pds.plc_url, allow_insecure_localhost=True) as resolver:
        with App.open(db, contract) as app:
            sync = manual_device(app, session, resolver, client_options=hooks)
            async with sync:
                await sync.wait_pulled()  # up to date, as (i) left it
                more = await change_some(pds, did, rkeys, CATCH_UP)
                before = app.model_db.execute("SELECT count(*) FROM posts").fetchone()[0]
                start = time.perf_counter()
                status = await sync.wait_pulled()
                seconds = time.perf_counter() - start
                assert status.download_error is None, status
                if len(reads) != 1 or "since=" not in reads[0]:
                    raise SystemExit(f"the catch-up did not read only what changed: {reads}")
            sync.close()
            rows = app.model_db.execute("SELECT count(*) FROM posts").fetchone()[0]
            assert rows == before + more, (rows, before, more)
    return seconds, int(rows)


# -- (a) the atproto SDK, (b) the floor ------------------------------------------------------


def sdk_list_records(pds: DevPDS, did: str, db: Path) -> tuple[float, int]:
    from atproto import Client  # the Python AT Protocol SDK

    client = Client(base_url=pds.pds_url)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE posts (id TEXT PRIMARY KEY, text TEXT NOT NULL, n INTEGER NOT NULL)")
    start = time.perf_counter()
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"repo": did, "collection": COLLECTION, "limit": 100}
        if cursor:
            params["cursor"] = cursor
        page = client.com.atproto.repo.list_records(params)
        conn.execute("BEGIN")
        for r in page.records:
            value = r.value
            conn.execute(
                "INSERT OR REPLACE INTO posts (id, text, n) VALUES (?, ?, ?)",
                (r.uri.rsplit("/", 1)[1], value["text"], value["n"]),
            )
        conn.execute("COMMIT")
        cursor = page.cursor
        if not cursor or not page.records:
            break
    seconds = time.perf_counter() - start
    (rows,) = conn.execute("SELECT count(*) FROM posts").fetchone()
    conn.close()
    return seconds, rows


def floor_get_repo(pds: DevPDS, did: str) -> tuple[float, int]:
    import libipld

    # Asked for as atsync asks a PDS on loopback: uncompressed (see XrpcClient).
    headers = {"Accept-Encoding": "identity"}
    with httpx.Client(base_url=pds.pds_url, timeout=120, headers=headers) as http:
        start = time.perf_counter()
        answer = http.get("/xrpc/com.atproto.sync.getRepo", params={"did": did})
        answer.raise_for_status()
        _, blocks = libipld.decode_car(answer.content)
        seconds = time.perf_counter() - start
    return seconds, len(blocks)


# -- (ii) live latency -------------------------------------------------------------------------


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def live_latency(
    pds: DevPDS, did: str, writes: int, b_db: Path, a_db: Path
) -> dict[str, list[float]]:
    """Seconds from device A's action to: the PDS's answer to A's applyWrites, the #commit
    frame on a raw subscriber, and the row in device B's database."""
    seen = Arrivals()
    ws = "ws://" + pds.pds_url.removeprefix("http://") + "/xrpc/com.atproto.sync.subscribeRepos"
    # The raw subscriber is a process of its own: on the devices' event loop, or on a thread
    # of this process (the GIL), a frame would wait while device B's engine works, and be
    # timed late. Its times are CLOCK_MONOTONIC, as ours.
    child = subprocess.Popen(
        [sys.executable, __file__, "--child-firehose", ws, did],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        line = child.stdout.readline()
        assert line.strip() == "ready", line

        def read_frames() -> None:
            assert child.stdout is not None
            for line in child.stdout:
                rkey, at = line.split()
                seen.note(seen.frames, rkey, float(at))

        reader = threading.Thread(target=read_frames, daemon=True)
        reader.start()
        return anyio.run(_live, pds, did, writes, b_db, a_db, seen, backend="asyncio")
    finally:
        child.terminate()
        child.wait(10)


def child_firehose(ws: str, did: str) -> None:
    """Print ``rkey time`` for every record op of ``did``'s #commit frames, as they arrive."""

    async def run() -> None:
        async with FirehoseSubscription(ws) as stream:
            print("ready", flush=True)
            async for frame in stream:
                if frame.type == "#commit" and frame.body.get("repo") == did:
                    at = now()
                    for op in frame.body.get("ops", []):
                        print(op["path"].rsplit("/", 1)[1], repr(at), flush=True)

    anyio.run(run, backend="asyncio")


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class Arrivals:
    """When each record's frame reached the raw subscriber and its row reached device B,
    noted from whichever thread saw it; ``wait`` blocks until both are in."""

    def __init__(self) -> None:
        self.frames: dict[str, float] = {}
        self.rows: dict[str, float] = {}
        self._changed = threading.Condition()

    def note(self, where: dict[str, float], key: str, at: float) -> None:
        with self._changed:
            where.setdefault(key, at)
            self._changed.notify_all()

    def wait(self, key: str, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: key in self.rows and key in self.frames, timeout)


async def _live(
    pds: DevPDS,
    did: str,
    writes: int,
    b_db: Path,
    a_db: Path,
    seen: Arrivals,
) -> dict[str, list[float]]:
    session = await login(did, PASSWORD, pds.pds_url)
    answers: list[float] = []

    async def answered(response: httpx.Response) -> None:
        if response.request.url.path.endswith("com.atproto.repo.applyWrites"):
            answers.append(now())

    async with IdentityResolver(plc_url=pds.plc_url, allow_insecure_localhost=True) as resolver:
        with App.open(a_db, contract) as a, App.open(b_db, contract) as b:
            sync_a = ATSync(
                a,
                bindings={"posts": Binding(COLLECTION, direction="push")},
                session=session,
                push=Immediate(),
                pull=Manual(),
                identity=resolver,
                client_options={"event_hooks": {"response": [answered]}},
            )
            sync_b = ATSync(
                b,
                bindings={"posts": Binding(COLLECTION)},
                session=session,
                push=Manual(),
                pull=Live(),
                identity=resolver,
            )
            async with sync_a, sync_b:
                with anyio.fail_after(120):
                    await sync_b.wait_pulled()
                    async for status in sync_b.status_changes():
                        if status.live:
                            break
                clock = TidClock()
                results: dict[str, list[float]] = {"row": [], "frame": [], "added": [], "push": []}
                for i in range(writes + 3):
                    key = clock.next()

                    def row_in(found: list[Any], key: str = key) -> None:
                        if found:
                            seen.note(seen.rows, key, now())

                    sub = b.db.subscribe("posts", row_in, where={"id": key}, initial=False)
                    start = now()
                    a.actions.post(key, i)
                    # The times are taken where the events happen (the row's in the
                    # subscription's callback, the frame's in the reader thread): a worker
                    # thread only waits for both.
                    arrived = await anyio.to_thread.run_sync(seen.wait, key, 30.0)
                    assert arrived, f"{key}: no row on B or no frame within 30 s"
                    sub.cancel()
                    if i >= 3:  # three warm-up writes
                        row_at, frame_at = seen.rows[key], seen.frames[key]
                        results["row"].append(row_at - start)
                        results["frame"].append(frame_at - start)
                        results["added"].append(row_at - frame_at)
                        results["push"].append(min(t for t in answers if t >= start) - start)
                    with anyio.fail_after(30):  # A settled before the next write
                        await sync_a.wait_for_idle()
            for sync in (sync_a, sync_b):
                sync.close()
    return results


# -- the run -----------------------------------------------------------------------------------


def median_of(runs: list[float]) -> float:
    return statistics.median(runs)


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--live", type=int, default=50)
    parser.add_argument("--live-big", type=int, default=20)
    parser.add_argument("--child-backfill", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--child-firehose", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_firehose:
        child_firehose(*args.child_firehose)
        return 0
    if args.child_backfill:
        print(json.dumps(child_backfill(*args.child_backfill)))
        return 0

    say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    accounts = [(BIG, PASSWORD), (SMALL, PASSWORD)]
    with tempfile.TemporaryDirectory() as tmp_, DevPDS(accounts=accounts) as pds:
        tmp = Path(tmp_)
        did, small_did = pds.accounts[BIG].did, pds.accounts[SMALL].did
        say(f"filling the repository with {args.n:,} records …")
        filled, rkeys = anyio.run(fill, pds, did, args.n, backend="asyncio")
        say(f"  {filled:.1f} s")
        rates: dict[str, list[float]] = {"atsync": [], "sdk": [], "floor": []}
        backfills: list[dict[str, Any]] = []
        for r in range(args.rounds):
            say(f"round {r + 1}/{args.rounds}: atsync backfill …")
            got = atsync_backfill(pds, did, tmp / f"atsync-{r}.db")
            assert got["rows"] == args.n, got
            assert got["download_error"] is None, got
            assert (got["rejected"], got["pending"]) == (0, 0), got
            backfills.append(got)
            rates["atsync"].append(args.n / got["seconds"])
            say("  (a) SDK listRecords loop …")
            seconds, rows = sdk_list_records(pds, did, tmp / f"sdk-{r}.db")
            assert rows == args.n, rows
            rates["sdk"].append(args.n / seconds)
            say("  (b) getRepo + decode_car …")
            seconds, blocks = floor_get_repo(pds, did)
            assert blocks > args.n, blocks
            rates["floor"].append(args.n / seconds)
        say(f"catch-up after {CATCH_UP} changes …")
        catch_up, rows = anyio.run(
            running_catch_up, pds, did, rkeys, tmp / "atsync-0.db", backend="asyncio"
        )
        catch_up_sdk, sdk_rows = sdk_list_records(pds, did, tmp / "sdk-catch-up.db")
        assert rows == sdk_rows, (rows, sdk_rows)
        live: dict[str, list[float]] | None = None
        if args.live:
            say(f"live latency, {args.live} writes (small repository) …")
            live = live_latency(pds, small_did, args.live, tmp / "live-b.db", tmp / "live-a.db")
        live_big: dict[str, list[float]] | None = None
        after_live: float | None = None
        if args.live_big:
            say(f"live latency, {args.live_big} writes ({args.n:,}-record repository) …")
            live_big = live_latency(pds, did, args.live_big, tmp / "atsync-0.db", tmp / "big-a.db")
            say("catch-up of the device that followed the stream …")
            # Other records than the first catch-up's (it deleted some of those).
            after_live, _ = anyio.run(
                running_catch_up, pds, did, rkeys[1:], tmp / "atsync-0.db", backend="asyncio"
            )

    atsync, sdk, floor = (median_of(rates[k]) for k in ("atsync", "sdk", "floor"))
    vs_sdk, vs_floor = atsync / sdk, atsync / floor
    growth = [(b["hwm_after"] - b["rss_before"]) / 2**20 for b in backfills]
    rss = max(growth)
    checks = {
        "sdk": vs_sdk >= TARGET_SDK,
        "floor": vs_floor >= TARGET_FLOOR,
        "rss": rss < TARGET_RSS_MB,
    }
    if live is not None:  # --live 0: not measured, not judged
        p50, p99 = nearest_rank(live["row"], 0.5), nearest_rank(live["row"], 0.99)
        checks["p50"], checks["p99"] = p50 < TARGET_P50, p99 < TARGET_P99

    def runs(k: str) -> str:
        return ", ".join(f"{v:,.0f}" for v in rates[k])

    print(f"local reference PDS, a repository of {args.n:,} records (filled in {filled:.1f} s)")
    print(f"(i) backfill, records/s, median of {args.rounds} (runs)")
    print(f"  atsync, verified, into its database  : {atsync:>8,.0f}   ({runs('atsync')})")
    print(f"  (a) atproto SDK listRecords + sqlite3: {sdk:>8,.0f}   ({runs('sdk')})")
    print(f"  (b) getRepo + libipld.decode_car     : {floor:>8,.0f}   ({runs('floor')})")
    print(f"  atsync / (a) = {vs_sdk:5.2f}x   target >= {TARGET_SDK}x    {mark(checks['sdk'])}")
    print(
        f"  atsync / (b) = {vs_floor:5.2f}x   target >= {TARGET_FLOOR}x   {mark(checks['floor'])}"
    )
    firsts = [b["to_first_chunk"] for b in backfills if b["to_first_chunk"] is not None]
    if firsts:
        to_first = statistics.median(firsts)
        whole = statistics.median(b["seconds"] for b in backfills)
        print(
            f"  atsync's time: {to_first:.2f} s to the first applied chunk (download, "
            f"verification, the first chunk of rows), {whole - to_first:.2f} s applying the rest "
            "(medians)"
        )
        stop = statistics.median(b["stop"] for b in backfills)
        print(f"  then stopping the engine (its WAL checkpoint), not counted: {stop:.2f} s")
    reset = "reset via clear_refs" if all(b["peak_reset"] for b in backfills) else "not reset"
    print(
        f"  peak RSS growth during the backfill: {rss:.1f} MB (max of "
        f"{', '.join(f'{g:.1f}' for g in growth)}; VmHWM {reset})   target < "
        f"{TARGET_RSS_MB:.0f} MB   {mark(checks['rss'])}"
    )

    def line(name: str, values: list[float]) -> str:
        p50_, p99_ = nearest_rank(values, 0.5), nearest_rank(values, 0.99)
        return f"  {name:<40}: p50 {p50_ * 1000:7.1f} ms   p99 {p99_ * 1000:7.1f} ms"

    if live is not None:
        print(f"(ii) live: an action on A (Immediate) -> the row on B (Live), {args.live} writes")
        print(line("action -> row on B (atsync)", live["row"]))
        print(line("action -> A's applyWrites answered", live["push"]))
        print(line("action -> #commit frame (raw websocket)", live["frame"]))
        print(line("frame -> row (what atsync adds)", live["added"]))
        print(
            f"  targets: p50 < {TARGET_P50 * 1000:.0f} ms {mark(checks['p50'])}, "
            f"p99 < {TARGET_P99 * 1000:.0f} ms {mark(checks['p99'])}"
        )
    if live_big is not None:
        print(f"  the same on the {args.n:,}-record repository ({args.live_big} writes):")
        print(line("action -> row on B (atsync)", live_big["row"]))
        print(line("action -> A's applyWrites answered", live_big["push"]))
        print(line("action -> #commit frame (raw websocket)", live_big["frame"]))
        print(line("frame -> row (what atsync adds)", live_big["added"]))
    whole_read = statistics.median(b["seconds"] for b in backfills)
    print(f"(iii) catch-up: another device's commit of {CATCH_UP} changes (creates, updates,")
    print("  deletes) to the repository; a device that pulled it before pulls again")
    print(
        f"  atsync (getRepo?since= against the MST nodes it kept): {catch_up * 1000:.0f} ms;"
        f" reading it all again (i): {whole_read * 1000:.0f} ms ({whole_read / catch_up:.0f}x)"
    )
    print(
        f"  (a) the SDK, which can only list every record again: {catch_up_sdk * 1000:.0f} ms "
        f"({catch_up_sdk / catch_up:.0f}x atsync's time)"
    )
    if after_live is not None:
        print(
            f"  atsync, the device of (ii) after following {args.live_big} live events (its tree"
            f" moved with them): {after_live * 1000:.0f} ms"
        )

    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

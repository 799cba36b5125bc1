"""Local write throughput: atsync actions vs raw sqlite3 doing the same inserts.

    .venv/bin/python benchmarks/local_writes.py [--n 20000] [--durability full|normal|both]

Each action sets one row; atsync also appends the action's log entry (hash-chained, and
signed once per transaction with the app's ed25519 key). The raw baseline inserts the
same rows into a table of the same shape, with the same journal mode (WAL) and
``synchronous`` setting, in the same run. Targets (issue #2):

- one action per transaction >= 0.30x raw one-insert-per-commit
- many actions in one transaction >= 0.15x raw execute-per-row in one transaction
- p99 latency of a one-row action < 1 ms

With an ``ATSync`` attached (issue #8), each action also checks its record, encodes it
(DAG-CBOR, CID) and queues it in the outbox in the same transaction. Targets, same run:

- one action per transaction >= 0.30x raw one-insert-per-commit
- many actions in one transaction >= 0.10x raw execute-per-row in one transaction, and
  >= 0.50x a hand-written capture baseline in one transaction: per row the same upsert, the
  record encoded with libipld's DAG-CBOR, its CID (CIDv1, dag-cbor, sha256) and an upsert of
  (collection, rkey, op, DAG-CBOR bytes, CID) into an outbox table keyed by (collection,
  rkey) — no action log, no checks, no coalescing rules

Durability "normal" is the default (WAL, synchronous=NORMAL); "full" adds an fsync per
commit on both sides.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import libipld

from atsync.app import App, Contract
from atsync.sync import ATSync, Binding, Manual

TARGET_SINGLE = 0.30
TARGET_BATCH = 0.15
TARGET_P99_MS = 1.0
TARGET_SYNC_SINGLE = 0.30  # of raw sqlite3, one per commit
TARGET_SYNC_BATCH = 0.10  # of raw sqlite3, one transaction
TARGET_SYNC_BASELINE = 0.50  # of the hand-written capture baseline, one transaction
COLLECTION = "bench.local.items"

contract = Contract(models={"items": {"id": "primary", "title": "string", "n": "integer"}})


@contract.action
def put(ctx, key, title, n):  # type: ignore[no-untyped-def]
    ctx.db.set("items", {"id": key, "title": title, "n": n})


def _raw(path: Path, durability: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {durability.upper()}")
    conn.execute(
        'CREATE TABLE items ("id" TEXT PRIMARY KEY NOT NULL, "title" TEXT NOT NULL, '
        '"n" INTEGER NOT NULL)'
    )
    return conn


_INSERT = (
    'INSERT INTO items ("id", "title", "n") VALUES (?, ?, ?) '
    'ON CONFLICT ("id") DO UPDATE SET "title" = excluded."title", "n" = excluded."n"'
)


def raw_per_commit(path: Path, n: int, durability: str) -> float:
    conn = _raw(path, durability)
    start = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(_INSERT, (f"k{i}", f"title {i}", i))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def raw_one_transaction(path: Path, n: int, durability: str) -> float:
    conn = _raw(path, durability)
    start = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    for i in range(n):
        conn.execute(_INSERT, (f"k{i}", f"title {i}", i))
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def atsync_per_commit(path: Path, n: int, durability: str) -> tuple[float, list[float]]:
    latencies = []
    with App.open(path, contract, durability=durability) as app:  # type: ignore[arg-type]
        run = app.actions.put
        clock = time.perf_counter
        start = clock()
        for i in range(n):
            t0 = clock()
            run(f"k{i}", f"title {i}", i)
            latencies.append(clock() - t0)
        elapsed = clock() - start
        assert app.db.count("items") == n
    return n / elapsed, latencies


def atsync_one_transaction(path: Path, n: int, durability: str) -> float:
    with App.open(path, contract, durability=durability) as app:  # type: ignore[arg-type]
        run = app.actions.put
        start = time.perf_counter()
        with app.batch():
            for i in range(n):
                run(f"k{i}", f"title {i}", i)
        elapsed = time.perf_counter() - start
        assert app.db.count("items") == n
        assert app.log.verify() == n
    return n / elapsed


_OUTBOX = (
    "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, collection TEXT NOT NULL, "
    "rkey TEXT NOT NULL, op TEXT NOT NULL, record BLOB NOT NULL, cid TEXT NOT NULL, "
    "UNIQUE (collection, rkey))"
)
_QUEUE = (
    "INSERT INTO outbox (collection, rkey, op, record, cid) VALUES (?, ?, 'create', ?, ?) "
    "ON CONFLICT (collection, rkey) DO UPDATE SET record = excluded.record, cid = excluded.cid"
)
_CID_PREFIX = bytes((1, 0x71, 0x12, 32))  # CIDv1, dag-cbor, sha2-256, 32 bytes


def baseline_capture(path: Path, n: int, durability: str, per_commit: bool) -> float:
    """The hand-written baseline: the essential work of capturing a write, and nothing else."""
    conn = _raw(path, durability)
    conn.execute(_OUTBOX)
    execute, encode, multibase, sha256 = (
        conn.execute,
        libipld.encode_dag_cbor,
        libipld.encode_multibase,
        hashlib.sha256,
    )
    start = time.perf_counter()
    if not per_commit:
        execute("BEGIN IMMEDIATE")
    for i in range(n):
        if per_commit:
            execute("BEGIN IMMEDIATE")
        key, title = f"k{i}", f"title {i}"
        execute(_INSERT, (key, title, i))
        data = encode({"$type": COLLECTION, "title": title, "n": i})
        cid = multibase("b", _CID_PREFIX + sha256(data).digest())
        execute(_QUEUE, (COLLECTION, key, data, cid))
        if per_commit:
            execute("COMMIT")
    if not per_commit:
        execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def atsync_sync_per_commit(path: Path, n: int, durability: str) -> float:
    """One action per transaction with an ATSync attached (capture only: Manual push)."""
    with App.open(path, contract, durability=durability) as app:  # type: ignore[arg-type]
        sync = ATSync(app, bindings={"items": Binding(COLLECTION)}, push=Manual())
        run = app.actions.put
        start = time.perf_counter()
        for i in range(n):
            run(f"k{i}", f"title {i}", i)
        elapsed = time.perf_counter() - start
        assert sync.outbox.counts()[0] == n
        sync.close()
    return n / elapsed


def atsync_sync_one_transaction(path: Path, n: int, durability: str) -> float:
    with App.open(path, contract, durability=durability) as app:  # type: ignore[arg-type]
        sync = ATSync(app, bindings={"items": Binding(COLLECTION)}, push=Manual())
        run = app.actions.put
        start = time.perf_counter()
        with app.batch():
            for i in range(n):
                run(f"k{i}", f"title {i}", i)
        elapsed = time.perf_counter() - start
        assert sync.outbox.counts()[0] == n
        sync.close()
    return n / elapsed


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _spread(results: dict[str, list[float]], num: str, den: str) -> str:
    """The ratio in each round (both sides measured back to back), lowest to highest: how
    much of a verdict is noise on a shared machine."""
    ratios = [a / b for a, b in zip(results[num], results[den], strict=True)]
    return f"rounds {min(ratios):.2f}-{max(ratios):.2f}"


def measure(n: int, durability: str, rounds: int) -> bool:
    keys = ("raw1", "at1", "rawN", "atN", "base1", "baseN", "sync1", "syncN")
    results: dict[str, list[float]] = {k: [] for k in keys}
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            # Alternate the order so drift (page cache, CPU boost) favours neither side.
            steps = [
                ("raw1", lambda p: raw_per_commit(p, n, durability)),
                ("rawN", lambda p: raw_one_transaction(p, n, durability)),
                ("base1", lambda p: baseline_capture(p, n, durability, True)),
                ("baseN", lambda p: baseline_capture(p, n, durability, False)),
                ("atN", lambda p: atsync_one_transaction(p, n, durability)),
                ("sync1", lambda p: atsync_sync_per_commit(p, n, durability)),
                ("syncN", lambda p: atsync_sync_one_transaction(p, n, durability)),
            ]
            for key, fn in steps if r % 2 == 0 else reversed(steps):
                results[key].append(fn(Path(tmp, f"{key}-{r}.db")))
            rate, lat = atsync_per_commit(Path(tmp, f"at1-{r}.db"), n, durability)
            results["at1"].append(rate)
            latencies.extend(lat)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio1 = med["at1"] / med["raw1"]
    ratio_n = med["atN"] / med["rawN"]
    sync1 = med["sync1"] / med["raw1"]
    sync_n = med["syncN"] / med["rawN"]
    sync_base = med["syncN"] / med["baseN"]
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    ok1, ok_n, ok_p = ratio1 >= TARGET_SINGLE, ratio_n >= TARGET_BATCH, p99 < TARGET_P99_MS
    ok_s1, ok_sn = sync1 >= TARGET_SYNC_SINGLE, sync_n >= TARGET_SYNC_BATCH
    ok_sb = sync_base >= TARGET_SYNC_BASELINE
    print(f"\nsynchronous={durability.upper()}, {n:,} actions, median of {rounds} rounds")
    print(f"  raw sqlite3, one insert per commit : {med['raw1']:>10,.0f} rows/s")
    print(f"  atsync, one action per transaction : {med['at1']:>10,.0f} actions/s")
    print(f"    ratio {ratio1:.2f}x (target >= {TARGET_SINGLE}x)  {_verdict(ok1)}")
    print(f"  raw sqlite3, one transaction       : {med['rawN']:>10,.0f} rows/s")
    print(f"  atsync, many actions in one batch  : {med['atN']:>10,.0f} actions/s")
    print(f"    ratio {ratio_n:.2f}x (target >= {TARGET_BATCH}x)  {_verdict(ok_n)}")
    print(
        f"  one-action latency p50 {p50:.3f} ms, p99 {p99:.3f} ms "
        f"(target p99 < {TARGET_P99_MS} ms)  {_verdict(ok_p)}"
    )
    print("  with an ATSync attached (each write checked, encoded and queued in the outbox):")
    print(f"  baseline capture, one per commit   : {med['base1']:>10,.0f} rows/s")
    print(f"  atsync + sync, one per transaction : {med['sync1']:>10,.0f} actions/s")
    print(
        f"    ratio {sync1:.2f}x of raw (target >= {TARGET_SYNC_SINGLE}x)  {_verdict(ok_s1)}; "
        f"{med['sync1'] / med['base1']:.2f}x of the baseline (no target); "
        f"{_spread(results, 'sync1', 'raw1')}"
    )
    print(f"  baseline capture, one transaction  : {med['baseN']:>10,.0f} rows/s")
    print(f"  atsync + sync, one batch           : {med['syncN']:>10,.0f} actions/s")
    print(
        f"    ratio {sync_n:.2f}x of raw (target >= {TARGET_SYNC_BATCH}x)  {_verdict(ok_sn)}; "
        f"{_spread(results, 'syncN', 'rawN')}"
    )
    print(
        f"    ratio {sync_base:.2f}x of the baseline (target >= {TARGET_SYNC_BASELINE}x)  "
        f"{_verdict(ok_sb)}; {_spread(results, 'syncN', 'baseN')}"
    )
    return ok1 and ok_n and ok_p and ok_s1 and ok_sn and ok_sb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--durability", choices=["full", "normal", "both"], default="both")
    args = parser.parse_args()
    print(
        f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs"
    )
    modes = ["full", "normal"] if args.durability == "both" else [args.durability]
    ok = all([measure(args.n, mode, args.rounds) for mode in modes])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

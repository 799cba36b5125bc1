"""Local write throughput: atsync actions vs raw sqlite3 doing the same inserts.

    .venv/bin/python benchmarks/local_writes.py [--n 20000] [--durability full|normal|both]

Each action sets one row; atsync also appends the action's log entry (hash-chained, and
signed once per transaction with the app's ed25519 key). The raw baseline inserts the
same rows into a table of the same shape, with the same journal mode (WAL) and
``synchronous`` setting, in the same run. Targets (issue #2):

- one action per transaction >= 0.30x raw one-insert-per-commit
- many actions in one transaction >= 0.15x raw execute-per-row in one transaction
- p99 latency of a one-row action < 1 ms

Durability "normal" is the default (WAL, synchronous=NORMAL); "full" adds an fsync per
commit on both sides. A last, informational line shows the cost of sync capture.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from atsync.app import App, Contract

TARGET_SINGLE = 0.30
TARGET_BATCH = 0.15
TARGET_P99_MS = 1.0

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


def atsync_with_sync_capture(path: Path, n: int, durability: str) -> tuple[float, float]:
    """Informational: the same actions with an ATSync attached, so each one also checks and
    encodes its record (data model, DAG-CBOR, CID) and queues it in the outbox."""
    from atsync.sync import ATSync, Binding, Manual

    with App.open(path, contract, durability=durability) as app:  # type: ignore[arg-type]
        sync = ATSync(app, bindings={"items": Binding("bench.local.items")}, push=Manual())
        run = app.actions.put
        start = time.perf_counter()
        for i in range(n // 4):
            run(f"s{i}", f"title {i}", i)
        single = (n // 4) / (time.perf_counter() - start)
        start = time.perf_counter()
        with app.batch():
            for i in range(n):
                run(f"k{i}", f"title {i}", i)
        batch = n / (time.perf_counter() - start)
        assert sync.outbox.counts()[0] == n + n // 4
        sync.close()
    return single, batch


def measure(n: int, durability: str, rounds: int) -> bool:
    results: dict[str, list[float]] = {k: [] for k in ("raw1", "at1", "rawN", "atN")}
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            # Alternate the order so drift (page cache, CPU boost) favours neither side.
            pairs = [("raw1", raw_per_commit), ("rawN", raw_one_transaction)]
            for key, fn in pairs if r % 2 == 0 else reversed(pairs):
                results[key].append(fn(Path(tmp, f"{key}-{r}.db"), n, durability))
            rate, lat = atsync_per_commit(Path(tmp, f"at1-{r}.db"), n, durability)
            results["at1"].append(rate)
            latencies.extend(lat)
            results["atN"].append(atsync_one_transaction(Path(tmp, f"atN-{r}.db"), n, durability))
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio1 = med["at1"] / med["raw1"]
    ratio_n = med["atN"] / med["rawN"]
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    ok1, ok_n, ok_p = ratio1 >= TARGET_SINGLE, ratio_n >= TARGET_BATCH, p99 < TARGET_P99_MS
    print(f"\nsynchronous={durability.upper()}, {n:,} actions, median of {rounds} rounds")
    print(f"  raw sqlite3, one insert per commit : {med['raw1']:>10,.0f} rows/s")
    print(f"  atsync, one action per transaction : {med['at1']:>10,.0f} actions/s")
    print(f"    ratio {ratio1:.2f}x (target >= {TARGET_SINGLE}x)  {'PASS' if ok1 else 'FAIL'}")
    print(f"  raw sqlite3, one transaction       : {med['rawN']:>10,.0f} rows/s")
    print(f"  atsync, many actions in one batch  : {med['atN']:>10,.0f} actions/s")
    print(f"    ratio {ratio_n:.2f}x (target >= {TARGET_BATCH}x)  {'PASS' if ok_n else 'FAIL'}")
    print(
        f"  one-action latency p50 {p50:.3f} ms, p99 {p99:.3f} ms "
        f"(target p99 < {TARGET_P99_MS} ms)  {'PASS' if ok_p else 'FAIL'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        single, batch = atsync_with_sync_capture(Path(tmp, "sync.db"), n, durability)
    print("  with an ATSync attached, each action also validates, encodes (DAG-CBOR, CID) and")
    print(
        f"  queues its record (no target): {single:,.0f}/s one per transaction "
        f"({single / med['raw1']:.2f}x), {batch:,.0f}/s in one batch ({batch / med['rawN']:.2f}x)"
    )
    return ok1 and ok_n and ok_p


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

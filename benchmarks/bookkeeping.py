"""Sync bookkeeping after 100,000 pushed actions: every ``_atsync_*`` table, before and after
pruning.

    .venv/bin/python benchmarks/bookkeeping.py [--n 100000] [--keys 20000] [--push-every 1000]

The app runs ``--n`` actions on a bound model, each creating, updating or (one in five)
deleting one of ``--keys`` notes, and pushes after every ``--push-every`` actions, in batches
of 200 — so most records are pushed several times over their life.

The PDS side is simulated: 100,000 real pushes to the reference PDS would take many
minutes, so each batch does what the pusher does with a batch that landed, directly on the
outbox — ``next_batch``, ``mark_attempted`` (which remembers every CID sent in
``_atsync_sent``), ``complete`` with a new commit — and no request is left unheard (nothing
to fence). At the end, with the queue empty, ``Outbox.prune_settled()`` runs as the engine
runs it, and the tables are measured again: rows, and bytes with their indexes (SQLite's
``dbstat``; pages of 4 KiB).

What should stay bounded: the outbox (pending writes only), the sent CIDs (pruned once
settled), the sync state (a few keys). What grows by design: the action log (the history,
one entry per action) and ``_atsync_records`` (one row per record ever synced, deleted ones
included, so a record key is never reused for another row).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from atsync.app import ActionContext, App, Contract
from atsync.sync import ATSync, Binding, Manual, Outbox

contract = Contract(
    models={"notes": {"id": "primary", "title": "string", "n": "integer", "done": "boolean"}}
)


@contract.action
def edit(ctx: ActionContext, key: str, version: int, delete: bool) -> None:
    if delete:
        ctx.db.delete("notes", key)
    else:
        title = f"note {key}, version {version}"
        ctx.db.set("notes", {"id": key, "title": title, "n": version, "done": False})


def land_all(outbox: Outbox, batch_size: int, commits: int) -> tuple[int, int]:
    """Push every queued write as a landed batch (simulated PDS); returns (writes, commits)."""
    pushed = 0
    while batch := outbox.next_batch(batch_size):
        outbox.mark_attempted(batch)
        commits += 1
        pushed += outbox.complete(batch, commit=(f"bafyfakecommit{commits}", f"rev{commits:010}"))
    return pushed, commits


def table_sizes(conn: sqlite3.Connection) -> dict[str, tuple[int, int | None]]:
    """Rows and bytes (table and its indexes) of every table atsync keeps."""
    tables = [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND "
            "(name LIKE '\\_atsync\\_%' ESCAPE '\\' OR name = 'notes') ORDER BY name"
        )
    ]
    try:
        owner = dict(conn.execute("SELECT name, tbl_name FROM sqlite_schema"))
        pages: dict[str, int] = {}
        for name, size in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            table = owner.get(name, name)
            pages[table] = pages.get(table, 0) + int(size)
    except sqlite3.OperationalError:  # SQLite built without dbstat
        pages = {}
    return {
        t: (conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0], pages.get(t)) for t in tables
    }


def show(title: str, sizes: dict[str, tuple[int, int | None]]) -> None:
    print(f"\n{title}")
    print(f"  {'table':<24} {'rows':>10} {'bytes':>14}")
    for table, (rows, size) in sizes.items():
        shown = "n/a" if size is None else f"{size:,}"
        print(f"  {table:<24} {rows:>10,} {shown:>14}")


def run(args: argparse.Namespace, tmp: str, *, prune_each_push: bool) -> bool:
    with App.open(Path(tmp, f"app-{prune_each_push}.db"), contract) as app:
        sync = ATSync(app, bindings={"notes": Binding("bench.bookkeeping.note")}, push=Manual())
        pushed = commits = most_sent = 0
        prune_time = 0.0
        started = time.perf_counter()
        for first in range(0, args.n, args.push_every):
            with app.batch():
                for i in range(first, min(args.n, first + args.push_every)):
                    # Note j's v-th edit; each note is deleted in one of five rounds (and
                    # created again in the next).
                    j, v = i % args.keys, i // args.keys
                    app.actions.edit(f"k{j}", v, (v + j) % 5 == 4)
            landed, commits = land_all(sync.outbox, args.batch, commits)
            pushed += landed
            if prune_each_push:
                # As the engine does once a push round has settled (nothing in flight).
                tick = time.perf_counter()
                most_sent = max(most_sent, sync.outbox.prune_settled())
                prune_time += time.perf_counter() - tick
        elapsed = time.perf_counter() - started
        conn = app.model_db.connection
        print(
            f"\n{args.n:,} actions on {args.keys:,} notes, {pushed:,} writes pushed in "
            f"{commits:,} simulated applyWrites ({elapsed:.1f} s); queue now "
            f"{sync.outbox.counts()[0]} pending"
        )
        if prune_each_push:
            sent = table_sizes(conn)["_atsync_sent"][0]
            print(
                f"pruned after every push: at most {most_sent:,} sent CIDs kept at a time, "
                f"{sent} at the end; pruning took {prune_time * 1000:.0f} ms in all"
            )
            sync.close()
            return sent == 0
        before = table_sizes(conn)
        show("before pruning", before)
        started = time.perf_counter()
        pruned = sync.outbox.prune_settled()
        took = time.perf_counter() - started
        conn.execute("VACUUM")  # so that freed pages leave the page counts
        after = table_sizes(conn)
        show(
            f"after Outbox.prune_settled() ({pruned:,} rows, {took * 1000:.0f} ms) and VACUUM",
            after,
        )
        sync.close()
        return after["_atsync_sent"][0] == 0 and after["_atsync_outbox"][0] == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="actions")
    parser.add_argument("--keys", type=int, default=20_000, help="distinct notes")
    parser.add_argument("--push-every", type=int, default=1_000, help="actions between pushes")
    parser.add_argument("--batch", type=int, default=200, help="writes per applyWrites")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}")
    with tempfile.TemporaryDirectory() as tmp:
        once = run(args, tmp, prune_each_push=False)
        each = run(args, tmp, prune_each_push=True)
    print(f"\nsent CIDs pruned to 0 and the outbox empty: {'PASS' if once and each else 'FAIL'}")
    return 0 if once and each else 1


if __name__ == "__main__":
    sys.exit(main())

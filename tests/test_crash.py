"""The crash test: SIGKILL a process running actions, 50 times, on the same database file.

A child process opens an ``App`` and runs actions forever: single actions and batches of
2-5, each action writing one ``items`` row (created, replaced, updated or deep-merged) and
one ``audit`` row, plus actions and batches that raise and must leave nothing behind. It
prints a line after every transaction that committed or rolled back. The parent kills it
with SIGKILL at a random moment, then checks the database:

- ``PRAGMA integrity_check`` and ``quick_check`` say "ok" (plain sqlite3);
- ``App.open`` succeeds with no repair step, and ``app.log.verify()`` passes;
- the log only grew: every entry seen after an earlier kill is still there, unchanged;
- every transaction the child saw commit is in the log, every one it saw roll back is not,
  and every batch is in the log whole or not at all;
- the tables are exactly what replaying the log with a plain-Python model of the actions
  gives: every logged action's writes are there, and every row was written by one;
- ``app.rebuild()`` reproduces exactly the same tables.

Children alternate ``durability="full"`` (an fsync per commit, so kills often land inside a
commit) and the default ``"normal"``; every fifth signs every transaction
(``seal_interval=0``). Each child paces itself to ``ACTIONS_PER_SECOND`` and half of its
batches pause between their actions, so many kills land inside an open write transaction
while the log, replayed in full after every kill, stays small enough for 50 rounds in
under a minute. The only sleep in the parent is the random delay before the kill; it
waits for the child's "running" line rather than sleeping through its start-up.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from atsync.app import App, Contract

ITERATIONS = 50
ACTIONS_PER_SECOND = 400  # the children's pace (see pace() in the child)

# The contract, shared by the child (as source text) and the parent (exec'd below).
CONTRACT_SOURCE = r'''
import hashlib

from atsync.app import Contract

MODELS = {
    "items": {
        "id": "primary",
        "value": "integer",
        "version": "integer",
        "last": "string",
        "payload": "bytes",
        "tags": "json?",
        "$indexes": ["last"],
    },
    "audit": {
        "id": "primary",
        "item": "@items",
        "action": "string",
        "op": "string",
        "amount": "integer?",
        "batch": "json?",
    },
}
contract = Contract(models=MODELS)


def payload(tok):
    digest = hashlib.sha256(tok.encode()).digest()
    return digest * (1 + digest[0] % 16)


def _audit(ctx, key, tok, op, amount, batch):
    ctx.db.set(
        "audit",
        {"id": tok, "item": key, "action": ctx.id, "op": op, "amount": amount, "batch": batch},
    )


@contract.action
def put(ctx, key, tok, amount, batch=None):
    """Create or replace an item."""
    old = ctx.db.get("items", key)
    version = 1 if old is None else old["version"] + 1
    ctx.db.set(
        "items",
        {"id": key, "value": amount, "version": version, "last": ctx.id,
         "payload": payload(tok), "tags": None},
    )
    _audit(ctx, key, tok, "put", amount, batch)


@contract.action
def add(ctx, key, tok, amount, batch=None):
    """Add to an existing item's value (shallow update), or create it."""
    old = ctx.db.get("items", key)
    if old is None:
        put(ctx, key, tok, amount, batch)
        return
    ctx.db.update(
        "items",
        {"id": key, "value": old["value"] + amount, "version": old["version"] + 1,
         "last": ctx.id},
    )
    _audit(ctx, key, tok, "add", amount, batch)


@contract.action
def tag(ctx, key, tok, label, batch=None):
    """Deep-merge a tag into an existing item's json, or create the item."""
    old = ctx.db.get("items", key)
    if old is None:
        put(ctx, key, tok, 0, batch)
        return
    ctx.db.merge(
        "items",
        {"id": key, "tags": {"labels": {label: tok}}, "version": old["version"] + 1,
         "last": ctx.id},
    )
    _audit(ctx, key, tok, "tag", None, batch)


class Boom(Exception):
    pass


@contract.action
def boom(ctx, key, tok, batch=None):
    """Writes both models, then raises: must leave nothing behind."""
    put(ctx, key, tok, -1, batch)
    raise Boom(tok)
'''

CHILD_SOURCE = r"""
import random
import sys
import time

from atsync._errors import TransactionError
from atsync.app import App

path, run, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
durability, seal_interval, rate = sys.argv[4], float(sys.argv[5]), float(sys.argv[6])
rng = random.Random(seed)
keys = [f"k{i}" for i in range(24)] + ["ключ", "😀", "a b"]
app = App.open(path, contract, durability=durability, seal_interval=seal_interval)
out = sys.stdout
out.write("running\n")
out.flush()
started = time.monotonic()
counter = 0
actions_run = 0


def token():
    global counter
    counter += 1
    return f"{run}.{counter}"


def pace():
    # At most `rate` actions a second, like an app between user actions (the parent
    # replays the whole log after every kill, so it must not grow too fast). Half the
    # batches pace between their actions, so many kills land inside a write transaction.
    ahead = actions_run / rate - (time.monotonic() - started)
    if ahead > 0:
        time.sleep(ahead)


def run_action(name, *args, **kwargs):
    global actions_run
    actions_run += 1
    return app.run(name, *args, **kwargs)


def random_action(tok):
    name = rng.choice(["put", "add", "add", "tag"])
    key = rng.choice(keys)
    if name == "tag":
        return name, (key, tok, rng.choice(["red", "green", "blue"]))
    return name, (key, tok, rng.randint(-1000, 1000))


while True:
    pace()
    r = rng.random()
    slow = rng.random() < 0.5
    if r < 0.45:
        tok = token()
        name, args = random_action(tok)
        run_action(name, *args)
        out.write(f"c {tok}\n")
    elif r < 0.88:
        btok = token()
        size = rng.randint(2, 5)
        with app.batch():
            for i in range(size):
                if i and slow:
                    pace()
                name, args = random_action(f"{btok}/{i}")
                run_action(name, *args, batch=[btok, i, size])
        out.write(f"c {btok}\n")
    elif r < 0.94:
        tok = token()
        try:
            run_action("boom", rng.choice(keys), tok)
        except Boom:
            out.write(f"r {tok}\n")
        else:
            raise AssertionError("boom did not raise")
    else:
        btok = token()
        size = rng.randint(2, 5)
        doomed = rng.randrange(size)
        try:
            with app.batch():
                for i in range(size):
                    if i and slow:
                        pace()
                    batch = [btok, i, size]
                    if i == doomed:
                        try:
                            run_action("boom", rng.choice(keys), f"{btok}/{i}", batch=batch)
                        except Boom:
                            pass
                    else:
                        name, args = random_action(f"{btok}/{i}")
                        run_action(name, *args, batch=batch)
        except TransactionError:
            out.write(f"r {btok}\n")
        else:
            raise AssertionError("a batch with a failed action committed")
    out.flush()
"""

# -- the plain-Python model of the actions ----------------------------------------------------

Tables = dict[str, dict[str, dict[str, Any]]]


def contract_namespace() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "crash_contract"}
    exec(CONTRACT_SOURCE, namespace)
    return namespace


def replay(entries: list[Any], payload: Any) -> Tables:
    """What the tables must hold after the logged actions, computed without atsync."""
    items: dict[str, dict[str, Any]] = {}
    audit: dict[str, dict[str, Any]] = {}

    def put(action: str, key: str, tok: str, amount: int, batch: Any, op: str = "put") -> None:
        old = items.get(key)
        items[key] = {
            "id": key,
            "value": amount,
            "version": 1 if old is None else old["version"] + 1,
            "last": action,
            "payload": payload(tok),
            "tags": None,
        }
        audit[tok] = {
            "id": tok,
            "item": key,
            "action": action,
            "op": op,
            "amount": amount,
            "batch": batch,
        }

    for entry in entries:
        key, tok, arg = entry.args
        batch = entry.kwargs.get("batch")
        old = items.get(key)
        if entry.name == "put" or old is None:
            assert entry.name in ("put", "add", "tag"), entry
            put(entry.id, key, tok, arg if entry.name != "tag" else 0, batch)
            continue
        row = {**old, "version": old["version"] + 1, "last": entry.id}
        if entry.name == "add":
            row["value"] = old["value"] + arg
            amount = arg
        else:  # tag: deep merge into the json
            tags = dict(old["tags"] or {})
            tags["labels"] = {**tags.get("labels", {}), arg: tok}
            row["tags"] = tags
            amount = None
        items[key] = row
        audit[tok] = {
            "id": tok,
            "item": key,
            "action": entry.id,
            "op": entry.name,
            "amount": amount,
            "batch": batch,
        }
    return {"items": items, "audit": audit}


def tables(app: App) -> Tables:
    return {
        model: {row["id"]: row for row in app.db.iterate(model)} for model in ("items", "audit")
    }


# -- the parent --------------------------------------------------------------------------------


class Child:
    """One child process: started, waited for until it runs, killed."""

    def __init__(self, script: Path, db_path: Path, run: int, seed: int, err: Path) -> None:
        # Odd runs fsync every commit, so the kill often lands in a commit; even runs use
        # the default. Every fifth run signs every transaction.
        durability = "full" if run % 2 else "normal"
        seal_interval = 0.0 if run % 5 == 0 else [0.1, 0.02][run % 2]
        self.err_path = err
        self._err = err.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(db_path),
                str(run),
                str(seed),
                durability,
                str(seal_interval),
                str(ACTIONS_PER_SECOND),
            ],
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            encoding="utf-8",
        )
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()  # blocks until the child has opened the app
        if first != "running\n":
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"child {run} did not start: {first!r} {self.stderr()}")
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stderr(self) -> str:
        return self.err_path.read_text()

    def kill(self) -> None:
        still_running = self.proc.poll() is None
        if still_running:
            self.proc.send_signal(signal.SIGKILL)
        code = self.proc.wait()
        self._drain.join()
        self._err.close()
        assert still_running, f"the child died by itself (exit {code}): {self.stderr()}"
        assert code == -signal.SIGKILL
        assert self.stderr() == "", self.stderr()

    def outcomes(self) -> tuple[set[str], set[str]]:
        committed, rolled_back = set(), set()
        for line in self.lines:
            if not line.endswith("\n"):
                continue  # cut off by the kill
            kind, tok = line.split()
            (committed if kind == "c" else rolled_back).add(tok)
        return committed, rolled_back


def check_sqlite(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


def entry_key(entry: Any) -> tuple[Any, ...]:
    return (entry.id, entry.name, json.dumps([entry.args, entry.kwargs]), entry.author)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_breaks_the_database(tmp_path: Path) -> None:
    namespace = contract_namespace()
    contract: Contract = namespace["contract"]
    script = tmp_path / "child.py"
    script.write_text(CONTRACT_SOURCE + CHILD_SOURCE)
    db_path = tmp_path / "crash.db"
    rng = random.Random(20240611)

    seen: list[tuple[Any, ...]] = []  # log entries seen after earlier kills
    links: dict[str, bytes] = {}  # the hash of every link seen so far
    all_committed: set[str] = set()
    all_rolled_back: set[str] = set()
    batches_logged = 0

    for run in range(ITERATIONS):
        child = Child(script, db_path, run, rng.randrange(2**32), tmp_path / f"child{run}.err")
        try:
            time.sleep(rng.uniform(0.05, 0.6))  # the random moment of the kill
        finally:
            child.kill()
        committed, rolled_back = child.outcomes()
        all_committed |= committed
        all_rolled_back |= rolled_back
        where = f"after kill {run + 1}"

        check_sqlite(db_path)
        app = App.open(db_path, contract)  # no repair step: it must just open
        try:
            entries = list(app.log.entries())
            assert app.log.verify() == len(entries), where
            ids = [entry.id for entry in entries]
            assert ids == sorted(set(ids)), f"{where}: log ids not unique and ordered"
            assert {entry.author for entry in entries} <= {app.did}

            # The log only grows: what an earlier check saw is still there, unchanged.
            keys = [entry_key(entry) for entry in entries]
            assert keys[: len(seen)] == seen, f"{where}: earlier log entries changed or vanished"
            seen = keys
            for entry in entries:
                if entry.hash is not None:
                    assert links.setdefault(entry.id, entry.hash) == entry.hash, where
            # Every transaction ends in a link, and App.open sealed the newest one.
            assert not entries or entries[-1].signature is not None, where

            # Transactions the child saw commit are logged; those it saw fail are not.
            logged_toks: set[str] = set()
            batches: dict[str, tuple[int, list[int]]] = {}  # size, indexes logged
            for entry in entries:
                assert entry.name in ("put", "add", "tag"), f"{where}: {entry.name} logged"
                tok = entry.args[1]
                logged_toks.add(tok)
                batch = entry.kwargs.get("batch")
                if batch is not None:
                    btok, index, size = batch
                    assert tok == f"{btok}/{index}"
                    batches.setdefault(btok, (size, []))[1].append(index)
            for btok, (size, indexes) in batches.items():
                assert indexes == list(range(size)), f"{where}: batch {btok} is partial"
            logged_txns = logged_toks | set(batches)
            missing = all_committed - logged_txns
            assert not missing, f"{where}: committed transactions lost: {sorted(missing)[:5]}"
            resurrected = all_rolled_back & logged_txns
            assert not resurrected, f"{where}: rolled back but logged: {sorted(resurrected)}"
            batches_logged = len(batches)

            # The tables hold exactly what replaying the log implies.
            actual = tables(app)
            expected = replay(entries, namespace["payload"])
            ids_by_entry = {entry.id: entry for entry in entries}
            for tok, row in actual["audit"].items():
                writer = ids_by_entry.get(row["action"])
                assert writer is not None and writer.args[1] == tok, f"{where}: stray {row}"
            for key, row in actual["items"].items():
                writer = ids_by_entry.get(row["last"])
                assert writer is not None and writer.args[0] == key, f"{where}: stray {key}"
            for model in ("items", "audit"):
                assert actual[model] == expected[model], f"{where}: {model} differs from replay"

            # Replaying the log through the contract gives the same tables again.
            assert app.rebuild() == len(entries)
            assert tables(app) == actual, f"{where}: rebuild changed the tables"
            assert len(app.log) == len(entries), f"{where}: rebuild changed the log"
        finally:
            app.close()

    # The test exercised what it claims to: many actions, batches, and rollbacks.
    assert len(seen) > 300
    assert batches_logged > 30
    assert len(all_rolled_back) > 10
    assert len(all_committed) > 100

"""The state syncs, not only the changes: queue what the sync tables do not know.

Capture queues every local write made while an ``ATSync`` is attached. Rows written with no
engine attached never pass through it: an app that adds sync later, a model bound for the
first time, rows changed or deleted while the app ran without an engine. On start, the
engine compares each bound model (direction "push" or "both") with the sync tables, in one
pass, and queues the difference through the same coalescing rules as capture:

- a row whose record (encoded exactly as capture encodes it, so CIDs match) differs from
  what is queued for it, or — nothing queued — from what the PDS holds (``_atsync_records``),
  or that the sync tables do not know at all, is queued; a record the PDS already refused in
  exactly this state (a dead letter) is left to ``retry_dead_letters``;
- a record the PDS holds, or a queued write, whose row no longer exists is queued as a
  delete (or dropped, if it never left the device);
- a row of an ``rkey="tid"`` binding keeps the record key it was given; one the sync tables
  have never seen gets a fresh TID;
- a row whose record cannot be made (bad record key, data model, Lexicon) is reported in
  ``failures`` and the scan goes on;
- a row that came from a followed repository (its key an AT URI) is someone else's record:
  never queued;
- a row of a ``shared`` binding is compared with the merge of its records (its own, queued
  or synced, and the followed ones): one that differs — or is gone while the merge still
  holds it — is written as capture writes it (``write_shared``: stamped, a delete as a
  tombstone), never as a plain record, which would drop the stamps.

The scan works in chunks of ``chunk_size`` rows, each in its own short transaction, so the
app's writes interleave with it; ``step()`` does one chunk, ``run_async()`` yields to other
tasks between chunks:

    scan = ResyncScan(app, outbox, bindings, validate=validate)
    await scan.run_async()        # or: while scan.step(): ...
    scan.queued, scan.failures
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel

from .._errors import AtsyncError
from ..app import App
from ..atproto import TidClock
from ..db import quote_identifier as quote
from ._binding import BoundBinding
from ._capture import Validator, encode_record, encode_trusted
from ._migrate import FOLLOWED
from ._outbox import DEAD, OUTBOX, RECORDS, Outbox
from ._repo import split_followed_key
from ._shared import merge_shared, shared_records

__all__ = ["ResyncFailure", "ResyncScan", "queue_unsynced"]

DEFAULT_CHUNK = 500  # rows per transaction: a few milliseconds
PAUSE = 0.001  # seconds between two chunks, for the app's writes
Queued = tuple[str, str | None, str]  # a queued write: rkey, cid, op
Known = tuple[str, str | None]  # a synced record or a dead letter: rkey, cid
# Capture's write of a shared row (None: deleted), stamped: see Capture.write_shared_row.
WriteShared = Callable[[BoundBinding, str, dict[str, Any] | None], None]


@dataclass(frozen=True, slots=True)
class ResyncFailure:
    """A row whose record could not be made (it stays local until fixed)."""

    model: str
    key: str
    error: str  # the exception's class name
    message: str


class ResyncScan:
    """One pass over the bound models, comparing them with the sync tables (see module)."""

    def __init__(
        self,
        app: App,
        outbox: Outbox,
        bindings: Mapping[str, BoundBinding],
        *,
        validate: Validator | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        write_shared: WriteShared | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self._db = app.model_db
        self._outbox = outbox
        self._bindings = [
            b
            for b in bindings.values()
            if b.direction != "pull" and (write_shared is not None or not b.shared)
        ]
        self._validate = validate
        self._write_shared = write_shared
        self._chunk = chunk_size
        # Record keys of rkey="tid" rows first seen here; its own clock id (random) keeps
        # them apart from the TIDs capture hands out.
        self._clock = TidClock()
        self.scanned = 0  # rows and sync-table entries looked at
        self.queued = 0  # writes queued, deletes included
        self.deletes = 0  # of which deletes
        self.failures: list[ResyncFailure] = []
        self.done = False
        self._chunks = self._all_chunks()

    # -- driving ------------------------------------------------------------------------

    def step(self) -> bool:
        """Scan one chunk in its own transaction; False once the scan is complete."""
        if not self.done and not next(self._chunks, False):
            self.done = True
        return not self.done

    def run(self, *, pause: float = PAUSE) -> ResyncScan:
        """Every chunk, with a pause of ``pause`` seconds between two while another thread
        waits for the database.

        The database lock is not fair: a thread that takes it again at once keeps a thread
        waiting for it waiting (measured: not one app write got through a 100,000-row scan
        run back to back). The pause lets waiting writers in; with none waiting, pausing
        anyway would be most of a scan's time (~2 ms a sleep against ~3 ms a chunk).
        """
        while self.step():
            if self._db.waiting_threads:
                time.sleep(pause)
        return self

    async def run_async(self, *, pause: float = PAUSE) -> ResyncScan:
        """Every chunk, yielding between two: the app's tasks on this event loop write
        meanwhile; while its threads wait for the database, it sleeps ``pause`` seconds."""
        while True:
            if not self.step():
                return self
            if self._db.waiting_threads:
                await anyio.sleep(pause)
            else:
                await anyio.lowlevel.checkpoint()

    # -- the passes -----------------------------------------------------------------------

    def _all_chunks(self) -> Iterator[bool]:
        for binding in self._bindings:
            after: str | None = None
            while True:
                with self._db.transaction():
                    next_after = self._rows_chunk(binding, after)
                yield True
                if next_after is None:
                    break
                after = next_after
            last = ""
            while True:
                with self._db.transaction():
                    next_key = self._gone_records_chunk(binding, last)
                yield True
                if next_key is None:
                    break
                last = next_key
            seq = 0
            while True:
                with self._db.transaction():
                    next_seq = self._gone_queued_chunk(binding, seq)
                yield True
                if next_seq is None:
                    break
                seq = next_seq

    def _rows_chunk(self, binding: BoundBinding, after: str | None) -> str | None:
        """Queue the rows after key ``after`` that differ from the sync tables; returns the
        last key scanned (None: no more rows)."""
        model = binding.model
        pk = model.primary_key
        rows = self._db.query(
            model.name,
            where=None if after is None else {pk: {"gt": after}},
            order_by={pk: "asc"},
            limit=self._chunk,
        )
        if not rows:
            return None
        self.scanned += len(rows)
        lo, hi = rows[0][pk], rows[-1][pk]
        queued, records, dead = self._known(binding, lo, hi)
        # A shared binding's rows are everyone's: none is skipped.
        followed = set() if binding.shared else self._followed(binding, [r[pk] for r in rows])
        for row in rows:
            key = row[pk]
            if key in followed:
                continue  # someone else's record, read-only here: never ours to push
            self._check_row(binding, key, row, queued.get(key), records.get(key), dead.get(key))
        return str(hi) if len(rows) == self._chunk else None

    def _followed(self, binding: BoundBinding, keys: list[str]) -> set[str]:
        """Which of these row keys of a binding that is not shared came from a followed
        repository: AT URIs, looked up by the primary key they name."""
        rkeys: dict[tuple[str, str], list[str]] = {}
        for key in keys:
            where = split_followed_key(key) if isinstance(key, str) else None
            if where is not None:
                rkeys.setdefault((where[0], where[1]), []).append(where[2])
        found: set[str] = set()
        conn = self._db.connection
        for (did, collection), some in rkeys.items():
            for start in range(0, len(some), 500):
                chunk = some[start : start + 500]
                found.update(
                    key
                    for (key,) in conn.execute(
                        f"SELECT key FROM {FOLLOWED} WHERE did = ? AND collection = ? "
                        f"AND rkey IN ({', '.join('?' * len(chunk))}) AND model = ?",
                        (did, collection, *chunk, binding.model.name),
                    )
                )
        return found

    def _known(
        self, binding: BoundBinding, lo: str, hi: str
    ) -> tuple[dict[str, Queued], dict[str, Known], dict[str, Known]]:
        """What the sync tables hold for the rows with keys in [lo, hi], by key."""
        conn = self._db.connection
        name, collection = binding.model.name, binding.collection
        if binding.by_primary_key:
            # rkey == key: the (collection, rkey) index finds them.
            rows = conn.execute(
                f"SELECT key, rkey, cid, op FROM {OUTBOX} WHERE collection = ? AND "
                "rkey >= ? AND rkey <= ? AND model = ?",
                (collection, lo, hi, name),
            )
        else:
            rows = conn.execute(
                f"SELECT key, rkey, cid, op FROM {OUTBOX} WHERE model = ? AND key >= ? AND "
                "key <= ?",
                (name, lo, hi),
            )
        queued = {k: (r, c, op) for k, r, c, op in rows}
        records = {
            k: (r, c)
            for k, r, c in conn.execute(
                f"SELECT key, rkey, cid FROM {RECORDS} WHERE model = ? AND key >= ? AND key <= ?",
                (name, lo, hi),
            )
        }
        dead = {
            k: (r, c)
            for k, r, c in conn.execute(
                f"SELECT key, rkey, cid FROM {DEAD} WHERE model = ? AND key >= ? AND key <= ? "
                "ORDER BY seq",
                (name, lo, hi),
            )
        }
        return queued, records, dead

    def _check_row(
        self,
        binding: BoundBinding,
        key: str,
        row: dict[str, Any],
        queued: Queued | None,
        record: Known | None,
        dead: Known | None,
    ) -> None:
        collection = binding.collection
        if binding.shared:
            self._check_shared(binding, key, row)
            return
        try:
            if binding.by_primary_key:
                rkey = binding.rkey_of(key)
            else:
                known = queued or record or dead
                rkey = known[0] if known is not None else self._clock.next()
            encode = encode_trusted if binding.trusted else encode_record
            record_json, cid = encode(collection, rkey, binding.to_record(row), self._validate)
        except (AtsyncError, ValueError) as exc:
            self.failures.append(
                ResyncFailure(binding.model.name, key, type(exc).__name__, str(exc))
            )
            return
        if queued is not None:
            if queued[2] != "delete" and queued[1] == cid:
                return  # this very state is queued already
        elif dead is not None and dead[1] == cid:
            return  # refused in this very state: retry_dead_letters() sends it again
        elif record is not None and record[1] == cid:
            return  # the PDS holds this very state
        self._outbox.enqueue(collection, rkey, binding.model.name, key, record_json, cid, None)
        self.queued += 1

    def _check_shared(self, binding: BoundBinding, key: str, row: dict[str, Any] | None) -> None:
        """A shared row (None: gone) against the merge of its records: written, stamped, only
        where they differ."""
        try:
            rkey = binding.rkey_of(key)
            records = shared_records(
                self._db.connection, binding.model.name, binding.collection, rkey
            )
            merged, _ = merge_shared(records, binding.data_fields)
            if row is None:
                if merged is None:
                    return  # deleted here by the merge (a tombstone): nothing of ours
            elif merged is not None:
                mine = binding.to_record(row)
                if all(mine.get(f) == merged.get(f) for f in binding.data_fields):
                    return
            assert self._write_shared is not None  # shared bindings are scanned only then
            self._write_shared(binding, key, row)
        except (AtsyncError, ValueError) as exc:
            self.failures.append(
                ResyncFailure(binding.model.name, key, type(exc).__name__, str(exc))
            )
            return
        self.queued += 1
        self.deletes += row is None

    def _gone_records_chunk(self, binding: BoundBinding, after: str) -> str | None:
        """Queue deletes for records on the PDS whose row is gone (keys after ``after``)."""
        name = binding.model.name
        table, pk = quote(name), quote(binding.model.primary_key)
        rows = self._db.connection.execute(
            f"SELECT r.key, r.collection, r.rkey, r.cid, "
            f"EXISTS (SELECT 1 FROM {table} t WHERE t.{pk} = r.key), "
            f"(SELECT op FROM {OUTBOX} o WHERE o.collection = r.collection AND o.rkey = r.rkey) "
            f"FROM {RECORDS} r WHERE r.model = ? AND r.key > ? ORDER BY r.key LIMIT ?",
            (name, after, self._chunk),
        ).fetchall()
        self.scanned += len(rows)
        for key, collection, rkey, cid, present, queued_op in rows:
            if present or queued_op == "delete" or (queued_op is None and cid is None):
                continue
            if binding.shared:
                self._check_shared(binding, key, None)
                continue
            self._queue_delete(collection, rkey, name, key)
        return str(rows[-1][0]) if len(rows) == self._chunk else None

    def _gone_queued_chunk(self, binding: BoundBinding, after: int) -> int | None:
        """Queue deletes for queued writes whose row is gone and that the PDS may not hold
        (the records pass handled those it does): a create never sent is dropped."""
        name = binding.model.name
        table, pk = quote(name), quote(binding.model.primary_key)
        rows = self._db.connection.execute(
            f"SELECT o.seq, o.key, o.collection, o.rkey, o.model = ?1 AND o.op != 'delete' "
            f"AND NOT EXISTS (SELECT 1 FROM {table} t WHERE t.{pk} = o.key) "
            f"FROM {OUTBOX} o WHERE o.seq > ?2 ORDER BY o.seq LIMIT ?3",
            (name, after, self._chunk),
        ).fetchall()
        self.scanned += len(rows)
        for _, key, collection, rkey, gone in rows:
            if gone and binding.shared:
                self._check_shared(binding, key, None)
            elif gone:
                self._queue_delete(collection, rkey, name, key)
        return int(rows[-1][0]) if len(rows) == self._chunk else None

    def _queue_delete(self, collection: str, rkey: str, model: str, key: str) -> None:
        self._outbox.enqueue(collection, rkey, model, key, None, None, None)
        self.queued += 1
        self.deletes += 1


def queue_unsynced(
    app: App,
    outbox: Outbox,
    bindings: Mapping[str, BoundBinding],
    *,
    validate: Validator | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    pause: float = PAUSE,
) -> ResyncScan:
    """Run a whole scan (chunk after chunk, each its own transaction) and return it."""
    scan = ResyncScan(app, outbox, bindings, validate=validate, chunk_size=chunk_size)
    return scan.run(pause=pause)

"""Turning local writes into outbox entries, inside the transaction that makes them.

Every write to a bound model (direction "push" or "both") becomes the record's new state in
the outbox; the seed hook ``on_action(call) -> [RecordWrite, ...]`` adds writes for apps
that map actions rather than models. A record that breaks the data model, the size limit,
the record-key syntax or its Lexicon raises ``RecordError`` here, so the action fails and
rolls back instead of dying later on the PDS. Writes made while applying remote records, and
replays of the log, are not captured (no echo).

A record's new state is checked and encoded as it is written, then held (``ModelDB.defer``)
and queued with the transaction's other puts, many per statement: before the transaction
commits, before a savepoint, and before anything in it reads or writes the sync tables, so
nothing can see the outbox without them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

from .._errors import ActionError, RecordError
from .._json import compact_json
from ..app import ActionContext, App
from ..atproto import (
    TidClock,
    check_data_model,
    cid_for_dag_cbor,
    data_to_json,
    encode_dag_cbor,
    is_valid_nsid,
    is_valid_record_key,
)
from ._binding import MAX_RECORD_BYTES, BoundBinding
from ._outbox import _ENQUEUE_PUT, DEAD, OUTBOX, RECORDS, Outbox
from ._shared import CLOCKS, DELETED, Hlc, merge_shared, shared_records, stamp_record

__all__ = ["DEFAULT_BLOB_LIMIT", "ActionCall", "Capture", "RecordWrite"]

DEFAULT_BLOB_LIMIT = 5 * 1024 * 1024  # the reference PDS's default; no PDS says its own


@dataclass(frozen=True, slots=True)
class RecordWrite:
    """A record write produced by an ``on_action`` hook (``record`` None: delete)."""

    collection: str
    rkey: str
    record: Mapping[str, Any] | None
    op: Literal["put", "delete"] = "put"


@dataclass(frozen=True, slots=True)
class ActionCall:
    """What ``on_action`` receives: the action's name, arguments and context."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    ctx: ActionContext


OnAction = Callable[[ActionCall], Sequence[RecordWrite] | None]
Validator = Callable[[str, str, Mapping[str, Any]], None]  # (collection, rkey, record)


def encode_record(
    collection: str, rkey: str, record: Mapping[str, Any], validate: Validator | None
) -> tuple[str, str]:
    """Check a record and return (its JSON form, its CID)."""
    if record.get("$type") != collection:
        raise RecordError(f"{collection}: the record's $type must be {collection!r}")
    plain = check_data_model(record)
    if validate is not None:
        validate(collection, rkey, record)
    data = encode_dag_cbor(record, plain=plain)
    if len(data) > MAX_RECORD_BYTES:
        raise _too_big(collection, data)
    as_json = compact_json(record if plain else data_to_json(record))
    return as_json, cid_for_dag_cbor(data)


def encode_trusted(
    collection: str, rkey: str, record: Mapping[str, Any], validate: Validator | None
) -> tuple[str, str]:
    """``encode_record`` for a record of a trusted binding (``BoundBinding.trusted``).

    Its values were checked by ModelDB as they were written (see ``_TRUSTED_KINDS``) and
    hold no bytes or links, so the data-model walk is skipped and libipld's encoder — exact
    for such values — replaces ours. The Lexicon, if any, is still checked.
    """
    if validate is not None:
        validate(collection, rkey, record)
    data = encode_dag_cbor(record, plain=True)
    if len(data) > MAX_RECORD_BYTES:
        raise _too_big(collection, data)
    return compact_json(record), cid_for_dag_cbor(data)


def _too_big(collection: str, data: bytes) -> RecordError:
    return RecordError(
        f"{collection}: record of {len(data):,} bytes is over the {MAX_RECORD_BYTES:,}-byte limit"
    )


# is_valid_record_key in one regex call (it runs for every captured write): 1-512 of the
# allowed characters, and neither "." nor "..".
_is_record_key = re.compile(r"(?!\.\.?\Z)[a-zA-Z0-9_~.:-]{1,512}").fullmatch

# A record's new state, as Outbox.enqueue takes it: (collection, rkey, model, key, record
# JSON, CID, action id).
_Put = tuple[str, str, str, str, str, str, str | None]
# Puts held back per statement: SQLite's per-statement cost (and AUTOINCREMENT's update of
# sqlite_sequence, once per statement) was most of the cost of queueing a write. 100 rows
# are 700 variables, under the 999 of the oldest SQLite builds.
_CHUNK = 100
_PUTS: dict[int, str] = {}


def _enqueue_puts(count: int) -> str:
    """Outbox.enqueue's one-statement path (``_ENQUEUE_PUT``) for ``count`` puts in order.

    INSERT ... SELECT inserts the rows one at a time in the order of the VALUES (the left
    side of a LEFT JOIN is never reordered), each resolving its conflict against the rows
    before it, and its WHERE reads only the records and dead letters, which none of the rows
    changes: so it leaves exactly what ``count`` single statements would. The conflict rules
    are _ENQUEUE_PUT's own text.
    """
    sql = _PUTS.get(count)
    if sql is None:
        values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * count)
        sql = _PUTS[count] = (
            f"INSERT INTO {OUTBOX} (collection, rkey, op, record, cid, model, key, "
            "first_action, last_action) SELECT v.column1, v.column2, "
            "CASE WHEN r.cid IS NULL THEN 'create' ELSE 'update' END, v.column5, v.column6, "
            "v.column3, v.column4, v.column7, v.column7 "
            f"FROM (VALUES {values}) AS v LEFT JOIN {RECORDS} r "
            "ON r.collection = v.column1 AND r.rkey = v.column2 "
            "WHERE r.cid IS NOT v.column6 AND NOT EXISTS "
            f"(SELECT 1 FROM {DEAD} d WHERE d.collection = v.column1 AND d.rkey = v.column2) "
            + _ENQUEUE_PUT[_ENQUEUE_PUT.index("ON CONFLICT") :]
        )
    return sql


_ENQUEUE_ONE = _enqueue_puts(1)


class Capture:
    """The write listener and action hook that fill the outbox."""

    def __init__(
        self,
        app: App,
        outbox: Outbox,
        bindings: Mapping[str, BoundBinding],
        *,
        on_action: OnAction | None = None,
        validate: Validator | None = None,
        on_queued: Callable[[set[str]], None] | None = None,
    ) -> None:
        self._app = app
        self._db = app.model_db
        self._outbox = outbox
        # (model, key) -> the DID of the followed repository the row came from, or None:
        # such rows are read-only (set by the engine; see _engine_follow).
        self.read_only: Callable[[str, str], str | None] | None = None
        self.hlc: Hlc | None = None  # the clock of shared bindings' stamps (engine's)
        self.blob_limit = DEFAULT_BLOB_LIMIT  # the largest blob the PDS takes (engine's)
        self._bindings = {m: b for m, b in bindings.items() if b.direction != "pull"}
        self._on_action = on_action
        self._validate = validate
        self._on_queued = on_queued
        self._remote = threading.local()
        # Threads inside applying_remote(): checked before the thread-local on every write.
        self._remote_threads = 0
        self._remote_lock = threading.Lock()
        self._queued_in_txn: set[str] = set()
        self._fallback_clock = TidClock()
        # Puts of this transaction not written yet: ModelDB writes them (_write_held) before
        # the transaction commits, before a savepoint, and before this thread reads or
        # writes the sync tables; a rollback drops them with the writes they belong to.
        self._held: list[_Put] = []
        self._release_held: Callable[[], None] | None = None

    def attach(self) -> None:
        db = self._app.model_db
        self._release_held = db.defer(self._held, self._write_held)
        db.write_listeners.append(self.on_write)
        db.after_transaction.append(self._after_transaction)
        if self._on_action is not None:
            self._app.after_action.append(self.after_action)

    def detach(self) -> None:
        db = self._app.model_db
        if self._release_held is not None:
            self._release_held()
            self._release_held = None
        for hooks, hook in (
            (db.write_listeners, self.on_write),
            (db.after_transaction, self._after_transaction),
            (self._app.after_action, self.after_action),
        ):
            if hook in hooks:
                hooks.remove(hook)  # type: ignore[arg-type]

    @contextmanager
    def applying_remote(self) -> Iterator[None]:
        """Writes inside come from the PDS: they must not be pushed back (no echo)."""
        depth = getattr(self._remote, "depth", 0)
        self._remote.depth = depth + 1
        with self._remote_lock:
            self._remote_threads += 1
        try:
            yield
        finally:
            self._remote.depth = depth
            with self._remote_lock:
                self._remote_threads -= 1

    def _skipping(self) -> bool:
        return self._app.replaying or (
            self._remote_threads > 0 and getattr(self._remote, "depth", 0) > 0
        )

    def _action_id(self) -> str | None:
        ctx = self._app.current_action
        return None if ctx is None else ctx.id

    def on_write(self, model: str, key: str, row: dict[str, Any] | None) -> None:
        # Runs for every local write to every model. A put is encoded and checked here (a
        # bad record fails its action) and held for _write_held; the rest is rare.
        binding = self._bindings.get(model)
        if binding is None or self._app.replaying:
            return
        if self._remote_threads and getattr(self._remote, "depth", 0) > 0:
            return
        if key.startswith("at://") and self.read_only is not None:
            owner = self.read_only(model, key)
            if owner is not None:
                raise ActionError(
                    f"{model}/{key} came from {owner}'s repository, which this device "
                    "follows: it is read-only here (nobody writes into someone else's "
                    "repository); the action was not applied and nothing was queued"
                )
        collection = binding.collection
        if row is not None and binding.blob_fields:
            self._check_blobs(binding, key, row)
        if binding.shared:
            self._write_shared(binding, model, key, row)
            return
        if not binding.by_primary_key:
            known = self._outbox.rkey_for(collection, model, key)
            if known is None and row is None:
                return
            rkey = known or self._new_tid()
        elif _is_record_key(key) is not None:
            rkey = key
        elif row is None:
            return  # never queued: its key could not be a record key
        else:
            rkey = binding.rkey_of(key)  # raises RecordError
        ctx = self._app.current_action
        action_id = None if ctx is None else ctx.id
        if row is None:
            # Through the connection, which writes the held puts first: order is kept.
            self._outbox.enqueue(collection, rkey, model, key, None, None, action_id)
            self._queued_in_txn.add(collection)
            return
        if binding.trusted:
            record, record_json = binding.to_record_json(row)
            if self._validate is not None:
                self._validate(collection, rkey, record)
            data = encode_dag_cbor(record, plain=True)
            if len(data) > MAX_RECORD_BYTES:
                raise _too_big(collection, data)
            cid = cid_for_dag_cbor(data)
        else:
            record_json, cid = encode_record(
                collection, rkey, binding.to_record(row), self._validate
            )
        held = self._held
        held.append((collection, rkey, model, key, record_json, cid, action_id))
        self._queued_in_txn.add(collection)
        if len(held) >= _CHUNK:
            self._write_held()

    def _check_blobs(self, binding: BoundBinding, key: str, row: Mapping[str, Any]) -> None:
        """Refuse (in the action) a blob the PDS would refuse, or that cannot be uploaded:
        over the size limit, or neither in the store nor already in this record on the PDS."""
        store = self._db.blobs
        for prop, _ in binding.blob_fields:
            ref = row.get(prop)
            if ref is None:
                continue
            where = f"{binding.model.name}/{key}.{prop}"
            if ref.size > self.blob_limit:
                raise RecordError(
                    f"{where}: the blob is {ref.size:,} bytes, over the PDS's limit of "
                    f"{self.blob_limit:,} (ATSync(max_blob_size=…) if your PDS takes more)"
                )
            size = store.size(ref)
            if size is None and not self._on_pds(binding, key, ref.cid):
                raise RecordError(
                    f"{where}: blob {ref.cid} is not in this database's blob store "
                    "(ctx.db.blobs.put(data, mime_type) stores one; a pulled blob not fetched "
                    "yet comes with sync.fetch_blob(ref))"
                )
            if size is not None and size != ref.size:
                raise RecordError(
                    f"{where}: the BlobRef says {ref.size:,} bytes, blob {ref.cid} has {size:,}"
                )

    def _on_pds(self, binding: BoundBinding, key: str, cid: str) -> bool:
        # The record as last synced with the user's repository references it: the PDS has it.
        row = self._db.connection.execute(
            f"SELECT record FROM {RECORDS} WHERE model = ? AND key = ?",
            (binding.model.name, key),
        ).fetchone()
        return row is not None and isinstance(row[0], str) and cid in row[0]

    def write_shared_row(self, binding: BoundBinding, key: str, row: dict[str, Any] | None) -> None:
        """Queue a shared row as a local write of it would (the start-up comparison's way in,
        for rows changed while no engine was attached)."""
        self._write_shared(binding, binding.model.name, key, row)

    def _write_shared(
        self, binding: BoundBinding, model: str, key: str, row: dict[str, Any] | None
    ) -> None:
        """A write to a shared row: the whole merged row goes into the user's repository, each
        field changed here stamped anew and the others with the stamps they won with; a
        delete goes as a record too (its tombstone stamp), so the others see it."""
        collection, rkey = binding.collection, binding.rkey_of(key)
        hlc = self.hlc
        assert hlc is not None, "the engine gives a shared binding its clock"
        self._write_held()  # this key's queued record must be in the outbox to be read
        conn = self._db.connection
        records = shared_records(conn, binding.model.name, collection, rkey)
        for record in records:  # the clock never runs behind a stamp it has seen
            for stamp in [*(record.get(CLOCKS) or {}).values(), record.get(DELETED)]:
                if isinstance(stamp, str):
                    hlc.observe(stamp)
        fields = binding.data_fields
        merged, stamps = merge_shared(records, fields)
        after = binding.to_record(row) if row is not None else None
        author = self._app.did
        record = stamp_record(
            after if after is not None else {"$type": collection}, after, merged, stamps,
            fields, lambda: hlc.now(author),
        )  # fmt: skip
        record_json, cid = encode_record(collection, rkey, record, self._validate)
        self._queue(collection, rkey, model, key, record_json, cid)
        self._outbox._set_state(conn, "hlc", hlc.state)

    def _write_held(self) -> None:
        """Queue the held puts (in the open transaction), ``_CHUNK`` per statement."""
        held = self._held
        rows = held[:]
        held.clear()  # first: the connection below would write them again
        try:
            conn = self._db.connection
            if len(rows) == 1:  # one action per transaction
                if not conn.execute(_ENQUEUE_ONE, rows[0]).rowcount:
                    self._outbox.enqueue(*rows[0])  # the general path (nothing was written)
                return
            for start in range(0, len(rows), _CHUNK):
                chunk = rows[start : start + _CHUNK]
                if len(chunk) > 1:
                    conn.execute("SAVEPOINT atsync_capture")
                    params = list(chain.from_iterable(chunk))
                    if conn.execute(_enqueue_puts(len(chunk)), params).rowcount == len(chunk):
                        conn.execute("RELEASE atsync_capture")
                        continue
                    # A put the one-statement rules leave to the general path (the PDS
                    # holds this very CID, or a dead letter waits): undo the chunk and
                    # queue it put by put, exactly as at the time of each write.
                    conn.execute("ROLLBACK TO atsync_capture")
                    conn.execute("RELEASE atsync_capture")
                for put in chunk:
                    self._outbox.enqueue(*put)
        except BaseException as exc:
            # The puts are gone from memory: the transaction must not commit without them.
            if self._db.in_transaction:
                self._db.fail_transaction(f"queueing local writes for sync failed: {exc!r}")
            raise

    def after_action(
        self, ctx: ActionContext, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._on_action is None or self._skipping():
            return
        for write in self._on_action(ActionCall(name, args, kwargs, ctx)) or ():
            if not is_valid_nsid(write.collection):
                raise RecordError(f"on_action: {write.collection!r} is not a valid NSID")
            if not is_valid_record_key(write.rkey):
                raise RecordError(f"on_action: {write.rkey!r} is not a valid record key")
            model = f"@{write.collection}"  # writes not tied to a model
            if write.op == "delete" or write.record is None:
                self._queue(write.collection, write.rkey, model, write.rkey, None, None)
                continue
            record = {"$type": write.collection, **write.record}
            record_json, cid = encode_record(write.collection, write.rkey, record, self._validate)
            self._queue(write.collection, write.rkey, model, write.rkey, record_json, cid)

    def _queue(
        self,
        collection: str,
        rkey: str,
        model: str,
        key: str,
        record_json: str | None,
        cid: str | None,
    ) -> None:
        self._outbox.enqueue(collection, rkey, model, key, record_json, cid, self._action_id())
        self._queued_in_txn.add(collection)

    def _new_tid(self) -> str:
        # Not ctx.tid(): that would shift the TIDs the action itself gets after this write,
        # and replays (which are not captured) would then hand out different ones.
        return self._fallback_clock.next()

    def _after_transaction(self, committed: bool) -> None:
        if not self._queued_in_txn:
            return  # no write to a bound model in this transaction
        queued, self._queued_in_txn = self._queued_in_txn, set()
        if committed and self._on_queued is not None:
            self._on_queued(queued)

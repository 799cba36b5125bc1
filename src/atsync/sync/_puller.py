"""One pull: the repository's state, verified, into the bound models — merged with local edits.

    repo CAR (getRepo, streamed to a temporary file)
      -> commit signature checked against the account's key, every block's hash, the MST
      -> the records of bound collections (direction "pull" or "both")
      -> compared with what was last synced (``_atsync_records``: CID and content per record)
      -> applied: new and changed records become rows, records gone from the repo delete
         their rows (deletes are found by comparing the whole set, never missed) — each
         merged three-way with a local edit still queued (``_merge``)

Rows written here are not captured (no echo). A record this device pushed is recognised by
its CID (what we last synced, or anything we ever sent) and not applied again. A record that
breaks its binding or Lexicon is not applied: it is kept in ``_atsync_rejected`` with the
reason. After a pull the stored ``swapCommit`` moves to the pulled commit, so the next push
does not pay an ``InvalidSwap`` for another device's commit. A crash in the middle leaves
the pulled commit unrecorded: the next pull applies what is still different (idempotent by
CID).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from .._errors import AtsyncError, RecordError, VerificationError
from .._json import compact_json
from ..app import RemoteChange
from ..atproto import (
    CarStream,
    RepoFile,
    VerifiedCommit,
    XrpcClient,
    check_data_model,
    data_from_json,
    data_to_json,
    decode_dag_cbor,
    decode_plain_record,
)
from ..db import ModelDB
from ..lexicon import LexiconSet
from ._binding import BoundBinding
from ._capture import Validator, encode_record
from ._merge import ConflictPolicy, merge_rows
from ._migrate import REJECTED
from ._outbox import CONFLICTS, OUTBOX, RECORDS, Outbox

__all__ = ["OnPdsAction", "PullResult", "Puller", "RemoteRecord"]

CHUNK = 1000  # remote changes applied per transaction


@dataclass
class PullResult:
    commit: str | None = None  # the pulled commit's CID and rev
    rev: str | None = None
    unchanged: bool = False  # the repo had not moved since the last pull
    applied: int = 0  # rows created or updated from the repo
    deleted: int = 0  # rows deleted because their record left the repo
    merged: int = 0  # remote changes merged with a queued local edit
    conflicts: int = 0  # merges with a field changed on both sides
    rejected: int = 0  # records not applied (see _atsync_rejected)


@dataclass(frozen=True, slots=True)
class RemoteRecord:
    """What ``on_pds_action`` receives: one change in the repository, verified, in the
    transaction that applies it. ``op`` is create, update or delete (``record`` and ``cid``
    None); ``lexicon`` is the collection's Lexicon document when ``lexicons=`` has it."""

    did: str
    collection: str
    rkey: str
    op: str
    cid: str | None
    rev: str
    record: dict[str, Any] | None
    lexicon: Any = None


OnPdsAction = Callable[[RemoteRecord], None]


@dataclass(frozen=True, slots=True)
class _Known:
    model: str
    key: str
    cid: str | None
    record: str | None  # JSON, as last synced


@dataclass(frozen=True, slots=True)
class _Queued:
    seq: int
    op: str
    record: str | None
    cid: str | None
    first_action: str | None
    last_action: str | None


Progress = Callable[[int, int], None]
# One change to apply: collection, rkey, CID and record (None: deleted), and the record's
# JSON when decode_plain_record proved its data model (None: not yet checked).
Change = tuple[str, str, str | None, dict[str, Any] | None, str | None]


_Note = tuple[str, str, str, str, str, str | None]  # a row of _atsync_records
_UPSERT_RECORD = (
    f"INSERT INTO {RECORDS} (collection, rkey, model, key, cid, record) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (collection, rkey) DO UPDATE SET "
    "cid = excluded.cid, record = excluded.record"
)


_NOT_HELD = object()


def _nothing_queued(collection: str, rkey: str) -> None:
    return None


class Puller:
    """Pulls one account's repository into the bound models of one database."""

    def __init__(
        self,
        db: ModelDB,
        outbox: Outbox,
        bindings: Mapping[str, BoundBinding],
        *,
        applying_remote: Callable[[], AbstractContextManager[None]],
        validate: Validator | None,
        policy: ConflictPolicy,
        on_pds_action: OnPdsAction | None = None,
        watch: Iterable[str] = (),
        lexicons: LexiconSet | None = None,
        log_remote: Callable[[str, list[RemoteChange]], object] | None = None,
    ) -> None:
        self._db = db
        # The app's action log takes the rows written, per transaction, attributed to the
        # repository's DID: a rebuild reproduces them (App.log_remote).
        self._log_remote = log_remote
        self._written: list[RemoteChange] = []
        # While a chunk is applied all or nothing: the rows that exist, the records to note.
        self._rows_present: set[tuple[str, str]] | None = None
        self._notes: list[_Note] | None = None
        self._creates: dict[str, list[dict[str, Any]]] | None = None
        self._outbox = outbox
        self._by_collection = {b.collection: b for b in bindings.values() if b.direction != "push"}
        # Collections read for on_pds_action alone (no binding, no rows).
        self._watched = set(watch) - set(self._by_collection) if on_pds_action else set()
        self._on_pds_action = on_pds_action
        self._lexicons = lexicons
        self._pushes = {b.collection for b in bindings.values() if b.direction != "pull"}
        self._applying_remote = applying_remote
        self._validate = validate
        self._policy = policy

    @property
    def collections(self) -> set[str]:
        return set(self._by_collection) | self._watched

    async def pull(
        self,
        did: str,
        client: XrpcClient,
        signing_key: str | None,
        progress: Progress | None = None,
    ) -> PullResult:
        """Bring the bound models up to the repository's head. Raises network errors and
        ``VerificationError`` (then nothing of this pull is applied)."""
        result = PullResult()
        latest = await client.sync_get_latest_commit(did)
        if latest.cid == self._outbox.get_state("pulled_commit"):
            result.commit, result.rev, result.unchanged = latest.cid, latest.rev, True
            return result
        known = self._known()
        known_cids = {key: was.cid for key, was in known.items()}
        with tempfile.TemporaryDirectory(prefix="atsync-pull-") as tmp:
            path = Path(tmp) / "repo.car"
            # Blocks are hash-checked and decoded as they arrive, while the network is slow.
            stream = CarStream(decode=self.collections)
            await client.sync_get_repo(did, path, on_chunk=stream.feed)
            commit, rev, data, changes = await anyio.to_thread.run_sync(
                self._read, path, did, signing_key, known_cids, stream
            )
        result.commit, result.rev = commit, rev
        await self._apply(did, rev, changes, known, result, progress)
        self._finish(commit, rev, data)
        return result

    def position(self) -> tuple[str | None, str | None]:
        """The rev and MST root (``data``) the local state includes."""
        return self._outbox.get_state("pulled_rev"), self._outbox.get_state("pulled_data")

    def apply_commit(self, did: str, event: VerifiedCommit) -> PullResult:
        """Apply one verified ``#commit`` that directly follows ``position()`` — its
        operations only, no download — in one transaction with the new position and the
        stream cursor (at most 200 operations: no need to yield in between)."""
        result = PullResult(commit=str(event.commit), rev=event.rev)
        # Only the records the event touches: a live event costs the same in a repository
        # of twenty records or twenty thousand.
        known = self._known([(op.collection, op.rkey) for op in event.ops])
        changes: list[Change] = []
        for op in event.ops:
            if op.collection not in self.collections:
                continue
            was = known.get((op.collection, op.rkey))
            if op.cid is None:
                if was is not None and was.cid is not None:
                    changes.append((op.collection, op.rkey, None, None, None))
            elif was is None or was.cid != str(op.cid):
                changes.append((op.collection, op.rkey, str(op.cid), op.record, None))
        with self._db.transaction():
            self._apply_chunk(did, event.rev, changes, known, result)
            self._finish(str(event.commit), event.rev, str(event.data), cursor=event.seq)
        return result

    # -- reading ----------------------------------------------------------------------------

    def _read(
        self,
        path: Path,
        did: str,
        signing_key: str | None,
        known: Mapping[tuple[str, str], str | None],
        stream: CarStream,
    ) -> tuple[str, str, str, list[Change]]:
        """Verify the CAR (memory bounded whatever its size) and list the changes: records of
        bound collections whose CID differs from what we hold, and records we hold that the
        repository no longer has (a whole comparison: no delete is missed)."""
        changes: list[Change] = []
        seen: set[tuple[str, str]] = set()  # of the records we hold: few on a new device
        collections = self.collections
        with RepoFile(path, did=did, signing_key=signing_key, stream=stream) as repo:
            blocks = repo.blocks
            for collection, rkey, cid in repo.leaves():
                if collection not in collections:
                    continue
                text = str(cid)
                if known:
                    key = (collection, rkey)
                    held = known.get(key, _NOT_HELD)
                    if held is not _NOT_HELD:
                        seen.add(key)
                        if held == text:
                            continue  # unchanged, or our own write coming back: not read
                decoded = repo.decoded_record(cid)
                if decoded is not None:
                    changes.append((collection, rkey, text, decoded[0], decoded[1]))
                    continue
                data = blocks[cid]
                if not cid.matches(data):
                    raise VerificationError(f"{collection}/{rkey}: block does not match {text}")
                # Plain records (most) decode fast, their data model proven, with their JSON.
                plain = decode_plain_record(data)
                if plain is not None:
                    changes.append((collection, rkey, text, plain[0], plain[1]))
                    continue
                record = decode_dag_cbor(data)
                if not isinstance(record, dict):
                    raise VerificationError(f"{collection}/{rkey}: the record is not a map")
                changes.append((collection, rkey, text, record, None))
            commit = repo.commit
            for (collection, rkey), cid_held in known.items():
                if cid_held is not None and (collection, rkey) not in seen:
                    changes.append((collection, rkey, None, None, None))  # gone from the repo
            return str(commit.cid), commit.rev, str(commit.data), changes

    # -- applying ---------------------------------------------------------------------------

    async def _apply(
        self,
        did: str,
        rev: str,
        changes: list[Change],
        known: dict[tuple[str, str], _Known],
        result: PullResult,
        progress: Progress | None,
    ) -> None:
        total = len(changes)
        for start in range(0, total, CHUNK):
            with self._db.transaction():
                self._apply_chunk(did, rev, changes[start : start + CHUNK], known, result)
            if progress is not None:
                progress(min(total, start + CHUNK), total)
            await anyio.lowlevel.checkpoint()  # the app's writes go between two chunks

    def _apply_chunk(
        self,
        did: str,
        rev: str,
        changes: list[Change],
        known: dict[tuple[str, str], _Known],
        result: PullResult,
    ) -> None:
        """Apply changes inside the caller's transaction and log the rows written as one
        entry attributed to ``did``. First all in one savepoint; if one of them fails, again
        one savepoint per change, so that one alone is rejected."""
        if self._on_pds_action is not None:
            # The app's hook sees each change once: no attempt that might be rolled back.
            self._apply_changes(did, rev, changes, known, result, savepoints=True)
        else:
            before = dataclasses.replace(result)
            try:
                with self._db.transaction():
                    self._apply_changes(did, rev, changes, known, result, savepoints=False)
            except AtsyncError:
                for field in dataclasses.fields(result):
                    setattr(result, field.name, getattr(before, field.name))
                self._apply_changes(did, rev, changes, known, result, savepoints=True)
        if self._written and self._log_remote is not None:
            self._log_remote(did, self._written)

    def _apply_changes(
        self,
        did: str,
        rev: str,
        changes: list[Change],
        known: dict[tuple[str, str], _Known],
        result: PullResult,
        *,
        savepoints: bool,
    ) -> None:
        written = self._written = []
        # Nothing queued at all (a restore, a device that is up to date): no lookup per record.
        queued = self._queued if self._outbox_has_rows() else _nothing_queued
        if not savepoints:
            # All or nothing: which rows exist is asked once, and the records table is written
            # in one statement at the end (a failure discards both with the savepoint).
            self._rows_present = self._present_rows(changes, known)
            notes: list[_Note] = []
            creates: dict[str, list[dict[str, Any]]] = {}
            self._notes, self._creates = notes, creates
            try:
                # No on_pds_action here (its writes are the app's own): every write of the
                # chunk comes from the PDS.
                with self._applying_remote():
                    for collection, rkey, change_cid, change, change_json in changes:
                        self._apply_one(
                            did, rev, collection, rkey, change_cid, change, change_json,
                            known.get((collection, rkey)), queued(collection, rkey), result,
                        )  # fmt: skip
                    for model, rows in creates.items():
                        self._db.set_many(model, rows)
            finally:
                self._notes = self._rows_present = self._creates = None
            self._db.connection.executemany(_UPSERT_RECORD, notes)
            return
        for collection, rkey, change_cid, change, change_json in changes:
            key = (collection, rkey)
            mark = len(written)
            try:
                with self._db.transaction():  # a savepoint: a bad record alone is undone
                    self._apply_one(
                        did, rev, collection, rkey, change_cid, change, change_json,
                        known.get(key), queued(collection, rkey), result,
                    )  # fmt: skip
            except AtsyncError as exc:
                del written[mark:]  # undone with the savepoint
                # The row the record makes does not fit the model (its type, a required
                # local-only property): not applied, kept with the reason.
                self._reject(
                    did, rev, collection, rkey, change_cid or "", type(exc).__name__, str(exc),
                    change,
                )  # fmt: skip
                result.rejected += 1

    def _present_rows(
        self, changes: list[Change], known: dict[tuple[str, str], _Known]
    ) -> set[tuple[str, str]]:
        """Which rows the changes would write already exist: ``(model, key)``."""
        keys: dict[str, list[str]] = {}
        for collection, rkey, *_ in changes:
            binding = self._by_collection.get(collection)
            if binding is not None:
                was = known.get((collection, rkey))
                keys.setdefault(binding.model.name, []).append(was.key if was else rkey)
        present: set[tuple[str, str]] = set()
        for model, model_keys in keys.items():
            for key, row in zip(model_keys, self._db.get_many(model, model_keys), strict=True):
                if row is not None:
                    present.add((model, key))
        return present

    def _outbox_has_rows(self) -> bool:
        return self._db.connection.execute(f"SELECT 1 FROM {OUTBOX} LIMIT 1").fetchone() is not None

    def _known(self, keys: list[tuple[str, str]] | None = None) -> dict[tuple[str, str], _Known]:
        """What was last synced, per record of the pulled collections (or of ``keys``)."""
        if keys is not None:
            found: dict[tuple[str, str], _Known] = {}
            for collection, rkey in keys:
                row = self._db.execute(
                    f"SELECT model, key, cid, record FROM {RECORDS} "
                    "WHERE collection = ? AND rkey = ?",
                    (collection, rkey),
                ).fetchone()
                if row is not None:
                    found[(collection, rkey)] = _Known(*row)
            return found
        collections = sorted(self.collections)
        if not collections:
            return {}
        marks = ", ".join("?" * len(collections))
        return {
            (c, r): _Known(m, k, cid, rec)
            for c, r, m, k, cid, rec in self._db.execute(
                f"SELECT collection, rkey, model, key, cid, record FROM {RECORDS} "
                f"WHERE collection IN ({marks})",
                collections,
            ).fetchall()
        }

    def _queued(self, collection: str, rkey: str) -> _Queued | None:
        """The local edit queued for a record now — read inside the applying transaction,
        since the app may have queued one while the repository was downloading."""
        row = self._db.connection.execute(
            f"SELECT seq, op, record, cid, first_action, last_action FROM {OUTBOX} "
            "WHERE collection = ? AND rkey = ?",
            (collection, rkey),
        ).fetchone()
        return None if row is None else _Queued(*row)

    def _apply_one(
        self,
        did: str,
        rev: str,
        collection: str,
        rkey: str,
        cid: str | None,
        record: dict[str, Any] | None,
        record_json: str | None,
        was: _Known | None,
        mine: _Queued | None,
        result: PullResult,
    ) -> None:
        """One change; ``record_json`` is the record's JSON when its data model is proven."""
        if self._on_pds_action is not None:
            self._tell_app(did, rev, collection, rkey, cid, record, was)
        binding = self._by_collection.get(collection)
        if binding is None:  # watched for on_pds_action only
            if cid is not None and record is not None:
                self._check_record(collection, rkey, record, record_json is not None)
            self._note(collection, rkey, f"@{collection}", rkey, cid, record, record_json)
            return
        model = binding.model.name
        key = was.key if was is not None else rkey
        remote_row: dict[str, Any] | None = None
        if record is not None and cid is not None:
            try:
                self._check_record(collection, rkey, record, record_json is not None)
                remote_row = binding.from_record(record, key)
            except AtsyncError as exc:
                self._reject(did, rev, collection, rkey, cid, type(exc).__name__, str(exc), record)
                result.rejected += 1
                return
        if mine is not None and cid is not None and self._outbox.ever_sent(collection, rkey, cid):
            # Our own earlier write, landed: the new base. The queued edit stays queued —
            # unless it is exactly what landed (its answer never reached us): then it is done.
            self._note(collection, rkey, model, key, cid, record)
            if mine.cid == cid and mine.op != "delete":
                self._db.connection.execute(f"DELETE FROM {OUTBOX} WHERE seq = ?", (mine.seq,))
                return
            self._db.connection.execute(
                f"UPDATE {OUTBOX} SET op = CASE op WHEN 'delete' THEN 'delete' ELSE 'update' "
                "END, attempted = 0 WHERE seq = ?",
                (mine.seq,),
            )
            return
        if mine is None:
            self._write_row(model, key, remote_row)
            self._note(collection, rkey, model, key, cid, record, record_json, defer=True)
            if remote_row is None:
                result.deleted += 1
            else:
                result.applied += 1
            return
        self._merge(did, binding, collection, rkey, key, cid, record, remote_row, was, mine, result)

    def _tell_app(
        self,
        did: str,
        rev: str,
        collection: str,
        rkey: str,
        cid: str | None,
        record: dict[str, Any] | None,
        was: _Known | None,
    ) -> None:
        """The seed's ``onPDSAction``: the app sees the record in the applying transaction
        (an exception rejects the record, and nothing of it is applied)."""
        assert self._on_pds_action is not None
        op = "delete" if cid is None else ("update" if was is not None else "create")
        doc = None
        if self._lexicons is not None and collection in self._lexicons:
            doc = self._lexicons.get(collection)
        try:
            self._on_pds_action(RemoteRecord(did, collection, rkey, op, cid, rev, record, doc))
        except AtsyncError:
            raise
        except Exception as exc:
            raise RecordError(f"on_pds_action raised {exc!r}") from exc

    def _check_record(
        self, collection: str, rkey: str, record: dict[str, Any], data_model_checked: bool
    ) -> None:
        """Its ``$type``, the data model, the binding's Lexicon (``VerificationError`` or
        ``RecordError`` saying which)."""
        if record.get("$type") != collection:
            raise VerificationError(
                f"$type is {record.get('$type')!r}, not the collection {collection!r}"
            )
        if not data_model_checked:
            check_data_model(record)
        if self._validate is not None:
            self._validate(collection, rkey, record)

    def _merge(
        self,
        did: str,
        binding: BoundBinding,
        collection: str,
        rkey: str,
        key: str,
        cid: str | None,
        record: dict[str, Any] | None,
        remote_row: dict[str, Any] | None,
        was: _Known | None,
        mine: _Queued,
        result: PullResult,
    ) -> None:
        model = binding.model.name
        key_field = binding.model.primary_key
        base = _row_of(binding, was.record if was is not None else None, key)
        local = _row_of(binding, mine.record if mine.op != "delete" else None, key)
        outcome = merge_rows(base, local, remote_row, self._policy, key_field)
        result.merged += 1
        conn = self._db.connection
        # The remote version is the new base; the merged row is the local state, queued
        # against that base (nothing, if it equals the remote version).
        self._note(collection, rkey, model, key, cid, record)
        conn.execute(f"DELETE FROM {OUTBOX} WHERE seq = ?", (mine.seq,))
        self._write_row(model, key, outcome.merged)
        if binding.collection in self._pushes:
            self._queue(binding, collection, rkey, model, key, outcome.merged, mine)
        if outcome.conflicted:
            result.conflicts += 1
            local_cid = mine.cid if mine.op != "delete" else None
            conn.execute(
                f"INSERT INTO {CONFLICTS} (collection, rkey, model, key, base_cid, local_cid, "
                "remote_cid, resolution, detected_at, base, local, remote, merged, fields) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    collection, rkey, model, key, was.cid if was is not None else None,
                    local_cid, cid, self._policy if isinstance(self._policy, str) else "callable",
                    time.time(), _dump(base), _dump(local), _dump(remote_row),
                    _dump(outcome.merged), ",".join(outcome.conflicted),
                ),
            )  # fmt: skip

    def _queue(
        self,
        binding: BoundBinding,
        collection: str,
        rkey: str,
        model: str,
        key: str,
        row: dict[str, Any] | None,
        mine: _Queued,
    ) -> None:
        """Queue ``row`` (None: deleted) as capture would, keeping the queued edit's actions
        (``wait_pushed`` waits for the merged state)."""
        if row is None:
            self._outbox.enqueue(collection, rkey, model, key, None, None, None)
        else:
            record_json, cid = encode_record(
                collection, rkey, binding.to_record(row), self._validate
            )
            self._outbox.enqueue(collection, rkey, model, key, record_json, cid, None)
        self._db.connection.execute(
            f"UPDATE {OUTBOX} SET first_action = ?, last_action = ? "
            "WHERE collection = ? AND rkey = ?",
            (mine.first_action, mine.last_action, collection, rkey),
        )

    def _write_row(self, model: str, key: str, row: dict[str, Any] | None) -> None:
        present = self._rows_present
        if present is None:
            with self._applying_remote():
                self._write(model, key, row, self._db.get(model, key) is not None)
            return
        # Applying a chunk all or nothing, already inside applying_remote().
        self._write(model, key, row, (model, key) in present)
        if row is None:
            present.discard((model, key))
        else:
            present.add((model, key))

    def _write(self, model: str, key: str, row: dict[str, Any] | None, exists: bool) -> None:
        if row is None:
            if exists:
                self._db.delete(model, key)
                self._written.append((model, key, None))
            return
        self._written.append((model, key, row))
        if exists:
            self._db.update(model, row)  # local-only properties stay as they are
        elif self._creates is not None:
            self._creates.setdefault(model, []).append(row)  # one statement per chunk
        else:
            self._db.set(model, row)

    def _note(
        self,
        collection: str,
        rkey: str,
        model: str,
        key: str,
        cid: str | None,
        record: dict[str, Any] | None,
        record_json: str | None = None,
        *,
        defer: bool = False,
    ) -> None:
        """Record what was last synced; ``defer``: with the chunk's other notes, at its end
        (only where nothing in between reads it: the outbox compares a queued record with
        it, so a merge notes at once)."""
        conn = self._db.connection
        if cid is None:
            conn.execute(
                f"DELETE FROM {RECORDS} WHERE collection = ? AND rkey = ?", (collection, rkey)
            )
            return
        values = (collection, rkey, model, key, cid, record_json or _dump_record(record))
        if defer and self._notes is not None:
            self._notes.append(values)
        else:
            conn.execute(_UPSERT_RECORD, values)

    def _reject(
        self,
        did: str,
        rev: str,
        collection: str,
        rkey: str,
        cid: str,
        reason: str,
        detail: str,
        record: dict[str, Any] | None,
    ) -> None:
        self._db.connection.execute(
            f"INSERT INTO {REJECTED} (did, collection, rkey, cid, rev, reason, detail, record, "
            "seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (did, collection, rkey, cid, rev, reason, detail, _dump_record(record), time.time()),
        )

    def reject_all(self, did: str, reason: str, detail: str) -> None:
        """The whole pull was refused (a forged or damaged repository): say so once."""
        with self._db.transaction():
            self._db.connection.execute(
                f"INSERT INTO {REJECTED} (did, reason, detail, seen_at) VALUES (?, ?, ?, ?)",
                (did, reason, detail, time.time()),
            )

    def _finish(self, commit: str, rev: str, data: str, *, cursor: int | None = None) -> None:
        with self._db.transaction():
            conn = self._db.connection
            if cursor is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO _atsync_sync_state (key, value) "
                    "VALUES ('stream_cursor', ?)",
                    (str(cursor),),
                )
            for key, value in (
                ("pulled_commit", commit),
                ("pulled_rev", rev),
                ("pulled_data", data),
                ("last_pulled_at", repr(time.time())),
                ("has_synced", "1"),
                # The next push is sent against the commit we now include: another device's
                # commit costs no InvalidSwap and no record-by-record reconcile.
                ("commit_cid", commit),
                ("commit_rev", rev),
            ):
                conn.execute(
                    "INSERT OR REPLACE INTO _atsync_sync_state (key, value) VALUES (?, ?)",
                    (key, value),
                )


def _row_of(binding: BoundBinding, record_json: str | None, key: str) -> dict[str, Any] | None:
    if record_json is None:
        return None
    return binding.from_record(data_from_json(json.loads(record_json)), key)


def _dump(row: Mapping[str, Any] | None) -> str | None:
    return None if row is None else compact_json(data_to_json(dict(row)))


def _dump_record(record: Mapping[str, Any] | None) -> str | None:
    return None if record is None else compact_json(data_to_json(dict(record)))

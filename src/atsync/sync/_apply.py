"""Applying pulled changes to the bound models: one chunk per transaction, merged with local
edits, logged, with bad records rejected one by one.

A chunk is applied all or nothing first — which rows exist asked once, new rows created in one
statement, the records table written once — and only if one change fails is it applied again
one savepoint per change, so that change alone is rejected (kept in ``_atsync_rejected`` with
the reason). A change that meets a local edit still queued is merged three-way (``_merge``)
and the merged row queued against the pulled version. Rows written here are not captured (no
echo); they are logged as one ``$remote`` entry per chunk, attributed to the repository's DID.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from .._errors import AtsyncError, RecordError, VerificationError
from .._gc import gc_paused
from .._json import compact_json
from ..app import RemoteChange
from ..atproto import check_data_model, data_from_json, data_to_json
from ..db import BlobRef, ModelDB
from ..lexicon import LexiconSet
from ._binding import BoundBinding
from ._capture import Validator, encode_record
from ._changes import Change, Known, Note, OnPdsAction, PullResult, Queued, RemoteRecord
from ._merge import ConflictPolicy, merge_rows
from ._migrate import REJECTED
from ._outbox import CONFLICTS, OUTBOX, Outbox
from ._repo import OWN, Repo
from ._shared import CLOCKS, DELETED, Hlc, merge_shared, shared_records

__all__ = ["Applier", "Change", "Known", "OnPdsAction", "PullResult", "RemoteRecord"]


def _nothing_queued(collection: str, rkey: str) -> None:
    return None


class Applier:
    """Applies changes pulled from one repository to the bound models of one database."""

    def __init__(
        self,
        db: ModelDB,
        outbox: Outbox,
        by_collection: Mapping[str, BoundBinding],
        pushes: set[str],
        *,
        applying_remote: Callable[[], AbstractContextManager[None]],
        validate: Validator | None,
        policy: ConflictPolicy,
        on_pds_action: OnPdsAction | None,
        lexicons: LexiconSet | None,
        log_remote: Callable[[str, list[RemoteChange]], object] | None,
        repo: Repo = OWN,
        hlc: Hlc | None = None,
    ) -> None:
        self._db = db
        self._repo = repo
        self._hlc = hlc  # shared bindings' clock (the engine's, shared with capture)
        self._outbox = outbox
        self._by_collection = by_collection  # pulled collections; others: watched only
        self._pushes = pushes
        self._applying_remote = applying_remote
        self._validate = validate
        self._policy = policy
        self._on_pds_action = on_pds_action
        self._lexicons = lexicons
        # The app's action log takes the rows written, per transaction, attributed to the
        # repository's DID: a rebuild reproduces them (App.log_remote).
        self._log_remote = log_remote
        self._written: list[RemoteChange] = []
        # While a chunk is applied all or nothing: the rows that exist, the records to note.
        self._rows_present: set[tuple[str, str]] | None = None
        self._notes: list[Note] | None = None
        self._creates: dict[str, list[dict[str, Any]]] | None = None
        self._fresh: frozenset[str] = frozenset()  # see restoring()

    @property
    def has_hook(self) -> bool:
        """Whether an ``on_pds_action`` hook (the app's code) sees each change."""
        return self._on_pds_action is not None

    def apply_chunk(
        self,
        did: str,
        rev: str,
        changes: list[Change],
        known: dict[tuple[str, str], Known],
        result: PullResult,
    ) -> None:
        """Apply changes inside the caller's transaction and log the rows written as one
        entry attributed to ``did``. First all in one savepoint; if one of them fails, again
        one savepoint per change, so that one alone is rejected."""
        with gc_paused():  # rows, records and log entries: containers that all last
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
        known: dict[tuple[str, str], Known],
        result: PullResult,
        *,
        savepoints: bool,
    ) -> None:
        written = self._written = []
        # Nothing queued at all (a restore, a device that is up to date): no lookup per record.
        # (A followed repository's rows are never edited here: nothing of it is queued.)
        queued = self._queued if self._repo.own and self._outbox_has_rows() else _nothing_queued
        if not savepoints:
            # All or nothing: which rows exist is asked once, and the records table is written
            # in one statement at the end (a failure discards both with the savepoint).
            fresh = self._fresh if queued is _nothing_queued else frozenset()
            self._rows_present = self._present_rows(changes, known, fresh)
            notes: list[Note] = []
            creates: dict[str, list[dict[str, Any]]] = {}
            self._notes, self._creates = notes, creates
            try:
                # No on_pds_action here (its writes are the app's own): every write of the
                # chunk comes from the PDS.
                with self._applying_remote():
                    created = 0
                    for collection, rkey, change_cid, change, change_json in changes:
                        was = known.get((collection, rkey))
                        if (
                            fresh
                            and was is None
                            and self._created(
                                collection, rkey, change_cid, change, change_json, fresh
                            )
                        ):
                            created += 1
                            continue
                        self._apply_one(
                            did, rev, collection, rkey, change_cid, change, change_json,
                            was, queued(collection, rkey), result,
                        )  # fmt: skip
                    result.applied += created
                    for model, rows in creates.items():
                        self._db.set_many(model, rows)
            finally:
                self._notes = self._rows_present = self._creates = None
            self._db.connection.executemany(self._repo.upsert, notes)
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

    def _created(
        self,
        collection: str,
        rkey: str,
        cid: str | None,
        record: dict[str, Any] | None,
        record_json: str | None,
        fresh: frozenset[str],
    ) -> bool:
        """``_apply_one`` for the bulk of a first pull, in short: a record never seen, its
        data model proven, into a model that was empty when the pull began, with nothing
        queued — a create, nothing to compare or merge. False: not such a change (or its
        row cannot be made), for ``_apply_one`` to handle as usual."""
        binding = self._by_collection.get(collection)
        if (
            binding is None or binding.shared or cid is None or record is None
            or record_json is None or binding.model.name not in fresh
            or self._on_pds_action is not None
        ):  # fmt: skip
            return False
        model = binding.model.name
        key = self._repo.key(collection, rkey)
        try:
            self._check_record(collection, rkey, record, True)
            row = binding.from_record(record, key)
        except AtsyncError:
            return False  # rejected the usual way, with the reason
        creates, notes = self._creates, self._notes
        assert creates is not None
        assert notes is not None
        self._written.append((model, key, row))
        creates.setdefault(model, []).append(row)
        notes.append(self._repo.upsert_values(collection, rkey, model, key, cid, record_json))
        return True

    def restoring(self, models: frozenset[str]) -> None:
        """``models`` were empty when this pull began (frozenset(): over): until it ends, a
        chunk applied with nothing queued can only meet rows this pull created itself, under
        other keys, so which rows exist need not be asked. Only models whose local writes
        are queued (not ``direction="pull"``): any row the app adds meanwhile shows."""
        self._fresh = frozenset(
            m for m in models if any(
                b.model.name == m and b.direction != "pull" for b in self._by_collection.values()
            )
        )  # fmt: skip

    def _present_rows(
        self, changes: list[Change], known: dict[tuple[str, str], Known], fresh: frozenset[str]
    ) -> set[tuple[str, str]]:
        """Which rows the changes would write already exist: ``(model, key)``."""
        if all(b.model.name in fresh for b in self._by_collection.values()):
            return set()  # every model was empty when the pull began: none to ask about
        keys: dict[str, list[str]] = {}
        for collection, rkey, *_ in changes:
            binding = self._by_collection.get(collection)
            if binding is not None and binding.model.name not in fresh:
                was = known.get((collection, rkey))
                if binding.shared:
                    key = rkey  # one row per key, whoever wrote it
                else:
                    key = was.key if was else self._repo.key(collection, rkey)
                keys.setdefault(binding.model.name, []).append(key)
        present: set[tuple[str, str]] = set()
        for model, model_keys in keys.items():
            for key, row in zip(model_keys, self._db.get_many(model, model_keys), strict=True):
                if row is not None:
                    present.add((model, key))
        return present

    def _outbox_has_rows(self) -> bool:
        return self._db.connection.execute(f"SELECT 1 FROM {OUTBOX} LIMIT 1").fetchone() is not None

    def _queued(self, collection: str, rkey: str) -> Queued | None:
        """The local edit queued for a record now — read inside the applying transaction,
        since the app may have queued one while the repository was downloading."""
        row = self._db.connection.execute(
            f"SELECT seq, op, record, cid, first_action, last_action FROM {OUTBOX} "
            "WHERE collection = ? AND rkey = ?",
            (collection, rkey),
        ).fetchone()
        return None if row is None else Queued(*row)

    def _apply_one(
        self,
        did: str,
        rev: str,
        collection: str,
        rkey: str,
        cid: str | None,
        record: dict[str, Any] | None,
        record_json: str | None,
        was: Known | None,
        mine: Queued | None,
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
        if binding.shared:
            change = (collection, rkey, cid, record, record_json)
            self._apply_shared(did, rev, binding, change, result)
            return
        model = binding.model.name
        key = was.key if was is not None else self._repo.key(collection, rkey)
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

    def _apply_shared(
        self,
        did: str,
        rev: str,
        binding: BoundBinding,
        change: Change,
        result: PullResult,
    ) -> None:
        """A shared binding's record: kept as this repository's version of the key, and the
        row made again from every repository's version (``_shared.merge_shared``)."""
        collection, rkey, cid, record, record_json = change
        model = binding.model.name
        if record is not None and cid is not None:
            try:
                self._check_record(collection, rkey, record, record_json is not None)
            except AtsyncError as exc:
                self._reject(did, rev, collection, rkey, cid, type(exc).__name__, str(exc), record)
                result.rejected += 1
                return
        self._note(collection, rkey, model, rkey, cid, record, record_json)
        records = shared_records(self._db.connection, model, collection, rkey)
        hlc = self._hlc
        if hlc is not None:  # an edit here must order after what was seen
            for held in records:
                for stamp in [*(held.get(CLOCKS) or {}).values(), held.get(DELETED)]:
                    if isinstance(stamp, str):
                        hlc.observe(stamp)
            self._db.connection.execute(
                "INSERT OR REPLACE INTO _atsync_sync_state (key, value) VALUES ('hlc', ?)",
                (hlc.state,),
            )
        merged, _ = merge_shared(records, binding.data_fields)
        row = None if merged is None else binding.from_record({"$type": collection, **merged}, rkey)
        self._write_row(model, rkey, row)
        if row is None:
            result.deleted += 1
        else:
            result.applied += 1

    def _tell_app(
        self,
        did: str,
        rev: str,
        collection: str,
        rkey: str,
        cid: str | None,
        record: dict[str, Any] | None,
        was: Known | None,
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
        was: Known | None,
        mine: Queued,
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
        mine: Queued,
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
        repo = self._repo
        if cid is None:
            sql, params = repo.delete()
            conn.execute(sql, (*params, collection, rkey))
            return
        values = repo.upsert_values(
            collection, rkey, model, key, cid, record_json or _dump_record(record)
        )
        if defer and self._notes is not None:
            self._notes.append(values)
        else:
            conn.execute(repo.upsert, values)

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


def _row_of(binding: BoundBinding, record_json: str | None, key: str) -> dict[str, Any] | None:
    if record_json is None:
        return None
    return binding.from_record(data_from_json(json.loads(record_json)), key)


def _dump(row: Mapping[str, Any] | None) -> str | None:
    """A row as JSON for the conflicts table (a ``BlobRef`` as its JSON form)."""
    if row is None:
        return None
    plain = {k: v.to_json() if isinstance(v, BlobRef) else v for k, v in row.items()}
    return compact_json(data_to_json(plain))


def _dump_record(record: Mapping[str, Any] | None) -> str | None:
    return None if record is None else compact_json(data_to_json(dict(record)))

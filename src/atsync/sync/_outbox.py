"""The transactional outbox: record writes waiting for the PDS, in the app's own database.

    _atsync_outbox        one row per record with a pending write (coalesced), in push order
    _atsync_records       every synced record: model/key <-> collection/rkey, CID on the PDS
    _atsync_dead_letters  writes the PDS rejected for good, with its reason
    _atsync_sync_state    key/value: the account, the last commit seen, has_synced, times

Records are stored in atproto's JSON form (``$link``/``$bytes``), readable with sqlite3,
with the CID of their DAG-CBOR encoding. A row enters the outbox in the same transaction as
the local change it describes, so a crash at any instant loses nothing and duplicates
nothing. Writes to one record coalesce:

    create + update(s)  -> one create of the latest state
    create + delete     -> nothing (if the create was never sent)
    update + update     -> the last update
    delete + put        -> an update (or a create if the record is not on the PDS)

``version`` grows with every coalesced change, so a push that finishes while the record
changed again leaves the newer state queued. ``first_action`` is the oldest action whose
effect the row carries: an action is pushed once no row has ``first_action <= its id``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from ..db import ModelDB
from ._outbox_views import (
    BLOBS,
    CONFLICTS,
    DEAD,
    OUTBOX,
    RECORDS,
    REJECTED,
    SENT,
    STATE,
    TREE,
    TREE_DELTA,
    UNPULLED,
    DeadLetter,
    OutboxViews,
    QueuedWrite,
)

__all__ = [
    "BLOBS",
    "CONFLICTS",
    "DEAD",
    "OUTBOX",
    "RECORDS",
    "REJECTED",
    "SENT",
    "STATE",
    "DeadLetter",
    "Outbox",
    "PendingWrite",
    "QueuedWrite",
    "create_sync_tables",
]

Op = Literal["create", "update", "delete"]
UNPULLED_MAX = 100_000  # records written since the last pull, noted at most (see complete)


def create_sync_tables(conn: sqlite3.Connection) -> None:
    """Create the sync tables (and upgrade older ones) in the caller's transaction."""
    from ._migrate import create_and_upgrade  # it reads this module's table names

    create_and_upgrade(conn)


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """One coalesced write waiting in the outbox, as read for a push."""

    seq: int
    collection: str
    rkey: str
    op: Op
    record: str | None  # the record in atproto JSON form; None for deletes
    cid: str | None
    version: int
    attempted: bool
    attempts: int
    first_action: str | None
    sent_op: str | None = None  # what the last attempt sent
    # Every CID sent for this record while queued ("-" for a delete), space-separated: any
    # of them may land late, and finding one on the PDS is our own write, not a conflict.
    sent_cid: str | None = None

    def sent(self, current: str | None) -> bool:
        """Whether ``current`` (a CID on the PDS, None: absent) is something we sent."""
        sent = (self.sent_cid or "").split()
        return ("-" in sent) if current is None else (current in sent)

    @property
    def size(self) -> int:
        return len(self.record or b"") + len(self.rkey) + len(self.collection) + 64


_COLUMNS = (
    "seq, collection, rkey, op, record, cid, version, attempted, attempts, first_action, "
    "sent_op, sent_cid"
)


# The record's CID on the PDS (?1) and, when known, its content (?3: the base of a later
# three-way merge; NULL when the PDS holds something we have not seen whole).
_NOTE_REMOTE = (
    f"INSERT INTO {RECORDS} (collection, rkey, model, key, cid, record) "
    f"SELECT collection, rkey, model, key, ?1, ?3 FROM {OUTBOX} WHERE seq = ?2 "
    "ON CONFLICT (collection, rkey) DO UPDATE SET cid = ?1, record = ?3"
)

# Outbox.enqueue of a record's new state, in one statement for the common cases: a first
# write (create, or update of a record on the PDS) or a change to a queued write (same op
# rules as the general path). Nothing happens — and the general path decides — when the PDS
# holds this very CID or the record has a dead letter.
_ENQUEUE_PUT = (
    f"INSERT INTO {OUTBOX} (collection, rkey, op, record, cid, model, key, first_action, "
    "last_action) SELECT ?1, ?2, CASE WHEN r.cid IS NULL THEN 'create' ELSE 'update' END, "
    f"?3, ?4, ?5, ?6, ?7, ?7 FROM (SELECT 1) LEFT JOIN {RECORDS} r "
    "ON r.collection = ?1 AND r.rkey = ?2 WHERE r.cid IS NOT ?4 AND NOT EXISTS "
    f"(SELECT 1 FROM {DEAD} WHERE collection = ?1 AND rkey = ?2) "
    "ON CONFLICT (collection, rkey) DO UPDATE SET op = CASE WHEN op = 'create' THEN 'create' "
    "WHEN op = 'update' OR excluded.op = 'update' THEN 'update' ELSE 'create' END, "
    "record = excluded.record, cid = excluded.cid, version = version + 1, "
    "last_action = coalesce(excluded.last_action, last_action), "
    "first_action = coalesce(first_action, excluded.first_action)"
)


def _present(conn: sqlite3.Connection, seqs: Sequence[int]) -> set[int]:
    """Which of these outbox rows still exist."""
    found: set[int] = set()
    for start in range(0, len(seqs), 500):
        chunk = seqs[start : start + 500]
        rows = conn.execute(
            f"SELECT seq FROM {OUTBOX} WHERE seq IN ({', '.join('?' * len(chunk))})", chunk
        )
        found.update(seq for (seq,) in rows)
    return found


def _pending(row: Sequence[object]) -> PendingWrite:
    seq, collection, rkey, op, record, cid, version, attempted, attempts, first, sop, scid = row
    return PendingWrite(
        seq,  # type: ignore[arg-type]
        collection,  # type: ignore[arg-type]
        rkey,  # type: ignore[arg-type]
        op,  # type: ignore[arg-type]
        record,  # type: ignore[arg-type]
        cid,  # type: ignore[arg-type]
        version,  # type: ignore[arg-type]
        bool(attempted),
        attempts,  # type: ignore[arg-type]
        first,  # type: ignore[arg-type]
        sop,  # type: ignore[arg-type]
        scid,  # type: ignore[arg-type]
    )


class Outbox(OutboxViews):
    """Reads and writes the outbox tables of one database."""

    def __init__(self, db: ModelDB) -> None:
        self._db = db

    @property
    def db(self) -> ModelDB:
        return self._db

    # -- inside the local transaction ---------------------------------------------------

    def rkey_for(self, collection: str, model: str, key: str) -> str | None:
        """The record key already assigned to a row, if it was ever queued or synced."""
        row = self._db.connection.execute(
            f"SELECT rkey FROM {RECORDS} WHERE model = ?1 AND key = ?2 UNION ALL "
            f"SELECT rkey FROM {OUTBOX} WHERE model = ?1 AND key = ?2 UNION ALL "
            f"SELECT rkey FROM {DEAD} WHERE model = ?1 AND key = ?2 LIMIT 1",
            (model, key),
        ).fetchone()
        return None if row is None else str(row[0])

    def enqueue(
        self,
        collection: str,
        rkey: str,
        model: str,
        key: str,
        record: str | None,
        cid: str | None,
        action_id: str | None,
    ) -> None:
        """Queue the record's new state (``record`` None: deleted), coalescing per record.

        Runs inside the caller's transaction (the local change being made).
        """
        conn = self._db.connection
        if (
            record is not None
            and conn.execute(
                _ENQUEUE_PUT, (collection, rkey, record, cid, model, key, action_id)
            ).rowcount
        ):
            return
        # One read for both: is the record on the PDS, and is a write to it queued already?
        on_pds_cid, seq, queued_op, attempted = conn.execute(
            f"SELECT (SELECT cid FROM {RECORDS} WHERE collection = ?1 AND rkey = ?2), "
            f"o.seq, o.op, o.attempted FROM (SELECT 1) "
            f"LEFT JOIN {OUTBOX} o ON o.collection = ?1 AND o.rkey = ?2",
            (collection, rkey),
        ).fetchone()
        on_pds = on_pds_cid is not None
        # A newer state of the record supersedes a write of it that the PDS refused.
        conn.execute(f"DELETE FROM {DEAD} WHERE collection = ? AND rkey = ?", (collection, rkey))
        if record is not None and cid == on_pds_cid and not attempted:
            # The PDS holds exactly this already (saved unchanged, or edited and back):
            # an update would only make an empty commit.
            if seq is not None:
                conn.execute(f"DELETE FROM {OUTBOX} WHERE seq = ?", (seq,))
            return
        if seq is None:
            if record is None and not on_pds:
                return  # deleting what never reached the PDS: nothing to do
            op: Op = "delete" if record is None else ("update" if on_pds else "create")
            conn.execute(
                f"INSERT INTO {OUTBOX} (collection, rkey, op, record, cid, model, key, "
                "first_action, last_action) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (collection, rkey, op, record, cid, model, key, action_id, action_id),
            )
            return
        if record is None:
            if queued_op == "create" and not attempted and not on_pds:
                conn.execute(f"DELETE FROM {OUTBOX} WHERE seq = ?", (seq,))
                return
            op = "delete"
        elif queued_op == "create":
            op = "create"  # still the first write of this record (or its outcome unknown)
        else:
            op = "update" if on_pds or queued_op == "update" else "create"
        conn.execute(
            f"UPDATE {OUTBOX} SET op = ?, record = ?, cid = ?, version = version + 1, "
            "last_action = coalesce(?, last_action), first_action = coalesce(first_action, ?) "
            "WHERE seq = ?",
            (op, record, cid, action_id, action_id, seq),
        )

    def _note_remote(self, conn: sqlite3.Connection, seq: int, cid: str | None) -> None:
        """Remember the CID the PDS now holds for the record of outbox row ``seq``."""
        conn.execute(_NOTE_REMOTE, (cid, seq, None))

    # -- the push side ------------------------------------------------------------------

    def next_batch(
        self,
        max_writes: int = 200,
        max_bytes: int = 900_000,
        collections: Iterable[str] | None = None,
    ) -> list[PendingWrite]:
        """The oldest pending writes (of ``collections``, or all), up to ``max_writes`` and
        about ``max_bytes``."""
        where, params = "", []
        if collections is not None:
            chosen = sorted(collections)
            where = f" WHERE collection IN ({', '.join('?' * len(chosen))})"
            params = chosen
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM {OUTBOX}{where} ORDER BY seq LIMIT ?", (*params, max_writes)
        ).fetchall()
        batch: list[PendingWrite] = []
        size = 0
        for row in rows:
            write = _pending(row)
            if batch and size + write.size > max_bytes:
                break
            batch.append(write)
            size += write.size
        return batch

    def attempted_writes(self, limit: int = 10_000) -> list[PendingWrite]:
        """Queued writes that were sent at least once and may have landed unheard."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM {OUTBOX} WHERE attempted = 1 ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [_pending(row) for row in rows]

    def mark_attempted(self, writes: Sequence[PendingWrite]) -> list[PendingWrite]:
        """Record, before sending, that these writes may reach the PDS (and what they are).

        Returns those still queued: a batch is read, then made ready over the network, and
        meanwhile the app may have deleted a record whose create was never sent — its row
        left the queue, and its write must not go."""
        with self._db.transaction():
            present = _present(self._db.connection, [w.seq for w in writes])
            writes = [w for w in writes if w.seq in present]
            # What the batch sends, as read: the row may hold a newer state by now.
            self._db.connection.executemany(
                f"UPDATE {OUTBOX} SET attempted = 1, attempts = attempts + 1, sent_op = ?, "
                "sent_cid = trim(coalesce(sent_cid, '') || ' ' || ?) WHERE seq = ?",
                [(w.op, w.cid or "-", w.seq) for w in writes],
            )
            # Every version ever sent: one may land long after its row left the queue, and
            # finding it on the PDS later is our own write, not another writer's.
            self._db.connection.executemany(
                f"INSERT OR IGNORE INTO {SENT} (collection, rkey, cid) VALUES (?, ?, ?)",
                [(w.collection, w.rkey, w.cid) for w in writes if w.cid is not None],
            )
        return writes

    def complete(
        self, writes: Iterable[PendingWrite], *, commit: tuple[str, str] | None = None
    ) -> int:
        """These writes are on the PDS: drop them (unless changed meanwhile), note CIDs.

        Returns how many rows left the outbox.
        """
        done = 0
        writes = list(writes)
        with self._db.transaction():
            conn = self._db.connection
            # The common case in two statements for the whole batch: note every CID, drop
            # every row that did not change while in flight; the rest is handled one by one.
            conn.executemany(
                _NOTE_REMOTE,
                [
                    (None, w.seq, None) if w.op == "delete" else (w.cid, w.seq, w.record)
                    for w in writes
                ],
            )
            conn.executemany(
                f"DELETE FROM {OUTBOX} WHERE seq = ? AND version = ?",
                [(w.seq, w.version) for w in writes],
            )
            left = _present(conn, [w.seq for w in writes])
            done = len(writes) - len(left)
            for w in writes:
                if w.seq not in left:
                    continue
                gone = 0
                if w.op != "delete":
                    # Changed while in flight, but back to what just landed: nothing to send.
                    gone = conn.execute(
                        f"DELETE FROM {OUTBOX} WHERE seq = ? AND cid IS ? AND op != 'delete'",
                        (w.seq, w.cid),
                    ).rowcount
                if gone:
                    done += 1
                elif w.op != "delete":
                    # Changed while in flight: the newer state now updates what we wrote.
                    conn.execute(
                        f"UPDATE {OUTBOX} SET op = CASE op WHEN 'delete' THEN 'delete' "
                        "ELSE 'update' END, attempted = 0 WHERE seq = ?",
                        (w.seq,),
                    )
                else:
                    conn.execute(
                        f"UPDATE {OUTBOX} SET op = CASE op WHEN 'delete' THEN 'delete' "
                        "ELSE 'create' END, attempted = 0 WHERE seq = ?",
                        (w.seq,),
                    )
            # On the PDS now, and in no tree this device pulled: see _puller._read_since.
            _note_unpulled(conn, [(w.collection, w.rkey) for w in writes if w.op != "delete"])
            self._bound_unpulled(conn)
            if commit is not None:
                self._set_state(conn, "commit_cid", commit[0])
                self._set_state(conn, "commit_rev", commit[1])
            self._set_state(conn, "last_pushed_at", repr(time.time()))
            self._set_state(conn, "has_synced", "1")
        return done

    @staticmethod
    def _bound_unpulled(conn: sqlite3.Connection) -> None:
        """An engine that pushes and never pulls would let the list grow without end: past
        ``UNPULLED_MAX`` it is dropped with the trees it completes (the next pull of the
        user's repository then reads it whole)."""
        (span,) = conn.execute(f"SELECT max(id) - min(id) FROM {UNPULLED}").fetchone()
        # The ids span the writes; only when they could hold the bound are records counted.
        if span is not None and span >= UNPULLED_MAX:
            (held,) = conn.execute(f"SELECT count(*) FROM {UNPULLED}").fetchone()
            if held <= UNPULLED_MAX:
                return
            conn.execute(f"DELETE FROM {UNPULLED}")
            conn.execute(f"DELETE FROM {TREE} WHERE repo = ''")
            conn.execute(f"DELETE FROM {TREE_DELTA} WHERE repo = ''")

    def rebase(self, write: PendingWrite, *, remote_cid: str | None) -> None:
        """The PDS holds ``remote_cid`` for this record (None: absent): resend on top of it."""
        with self._db.transaction():
            conn = self._db.connection
            self._note_remote(conn, write.seq, remote_cid)
            if remote_cid is not None:  # on the PDS, maybe in no tree pulled: as complete()
                _note_unpulled(conn, [(write.collection, write.rkey)])
            # A delete found done is done — unless the record was put again while we looked
            # (then it goes on as a create, below).
            if (
                write.op == "delete"
                and remote_cid is None
                and conn.execute(
                    f"DELETE FROM {OUTBOX} WHERE seq = ? AND version = ?",
                    (write.seq, write.version),
                ).rowcount
            ):
                return
            conn.execute(
                f"UPDATE {OUTBOX} SET op = CASE WHEN op = 'delete' THEN 'delete' "
                "WHEN ? IS NULL THEN 'create' ELSE 'update' END, attempted = 0 WHERE seq = ?",
                (remote_cid, write.seq),
            )

    def record_conflict(
        self,
        write: PendingWrite,
        *,
        base_cid: str | None,
        remote_cid: str | None,
        resolution: str = "local",
    ) -> None:
        """Note that another writer changed a record we were about to push."""
        with self._db.transaction():
            self._db.connection.execute(
                f"INSERT INTO {CONFLICTS} (collection, rkey, model, key, base_cid, local_cid, "
                f"remote_cid, resolution, detected_at) SELECT collection, rkey, model, key, "
                f"?, cid, ?, ?, ? FROM {OUTBOX} WHERE seq = ?",
                (base_cid, remote_cid, resolution, time.time(), write.seq),
            )

    def set_commit(self, cid: str, rev: str) -> None:
        """The repo's latest commit, as last read from the PDS (the next swapCommit)."""
        with self._db.transaction():
            self._set_state(self._db.connection, "commit_cid", cid)
            self._set_state(self._db.connection, "commit_rev", rev)

    def note_error(self, writes: Iterable[PendingWrite], error: str) -> None:
        with self._db.transaction():
            self._db.connection.executemany(
                f"UPDATE {OUTBOX} SET last_error = ? WHERE seq = ?",
                [(error, w.seq) for w in writes],
            )

    def forget_everything(self) -> None:
        """Drop every sync table's content (see ``ATSync.start_fresh``)."""
        with self._db.transaction():
            for table in (
                OUTBOX,
                RECORDS,
                DEAD,
                STATE,
                CONFLICTS,
                SENT,
                BLOBS,
                TREE,
                TREE_DELTA,
                UNPULLED,
            ):
                self._db.connection.execute(f"DELETE FROM {table}")

    def dead_letter(self, write: PendingWrite, error: str | None, message: str) -> None:
        """Move a write the PDS rejected for good out of the queue, keeping its reason."""
        with self._db.transaction():
            conn = self._db.connection
            conn.execute(
                f"INSERT INTO {DEAD} (collection, rkey, op, record, cid, model, key, "
                "first_action, last_action, error, message, failed_at) "
                f"SELECT collection, rkey, op, record, cid, model, key, first_action, "
                f"last_action, ?, ?, ? FROM {OUTBOX} WHERE seq = ?",
                (error, message, time.time(), write.seq),
            )
            conn.execute(f"DELETE FROM {OUTBOX} WHERE seq = ?", (write.seq,))

    def retry_dead_letters(self) -> int:
        """Put every dead letter back at the end of the queue; returns how many."""
        with self._db.transaction():
            conn = self._db.connection
            rows = conn.execute(
                f"SELECT seq, collection, rkey, op, record, cid, model, key, first_action, "
                f"last_action FROM {DEAD} ORDER BY seq"
            ).fetchall()
            for seq, collection, rkey, op, record, cid, model, key, first, last in rows:
                conn.execute(f"DELETE FROM {DEAD} WHERE seq = ?", (seq,))
                if conn.execute(
                    f"SELECT 1 FROM {OUTBOX} WHERE collection = ? AND rkey = ?",
                    (collection, rkey),
                ).fetchone():
                    continue  # a newer local change is queued already; it supersedes this
                conn.execute(
                    f"INSERT INTO {OUTBOX} (collection, rkey, op, record, cid, model, key, "
                    "first_action, last_action) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (collection, rkey, op, record, cid, model, key, first, last),
                )
        return len(rows)

    # -- reading ------------------------------------------------------------------------

    def create_tables(self) -> None:
        """Create the sync tables if the database has none yet (a tool opening any file)."""
        with self._db.transaction():
            create_sync_tables(self._db.connection)

    def base_records(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[str | None, str]]:
        """(CID, content) as last synced, for those of ``keys`` whose content is known."""
        found: dict[tuple[str, str], tuple[str | None, str]] = {}
        for start in range(0, len(keys), 250):
            chunk = keys[start : start + 250]
            where = " OR ".join("(collection = ? AND rkey = ?)" for _ in chunk)
            params = [part for key in chunk for part in key]
            for collection, rkey, cid, record in self._db.execute(
                f"SELECT collection, rkey, cid, record FROM {RECORDS} "
                f"WHERE record IS NOT NULL AND ({where})",
                params,
            ):
                found[(collection, rkey)] = (cid, record)
        return found

    def replace_record(self, write: PendingWrite, record: str, cid: str) -> bool:
        """Rewrite a queued write's record (unless it changed since it was read)."""
        with self._db.transaction():
            changed = self._db.connection.execute(
                f"UPDATE {OUTBOX} SET record = ?, cid = ? WHERE seq = ? AND version = ?",
                (record, cid, write.seq, write.version),
            ).rowcount
        return changed == 1

    def is_pushed(self, action_id: str) -> bool | None:
        """True once the action's writes are on the PDS; None if one was dead-lettered."""
        if self._db.execute(
            f"SELECT 1 FROM {DEAD} WHERE first_action <= ? AND last_action >= ? LIMIT 1",
            (action_id, action_id),
        ).fetchone():
            return None
        pending = self._db.execute(
            f"SELECT 1 FROM {OUTBOX} WHERE first_action <= ? LIMIT 1", (action_id,)
        ).fetchone()
        return pending is None

    def ever_sent(self, collection: str, rkey: str, cid: str) -> bool:
        row = self._db.execute(
            f"SELECT 1 FROM {SENT} WHERE collection = ? AND rkey = ? AND cid = ?",
            (collection, rkey, cid),
        ).fetchone()
        return row is not None

    def prune_settled(self, limit: int | None = None) -> int:
        """Forget the CIDs sent for records that have nothing queued; returns how many.

        ``_atsync_sent`` exists to recognise a late landing of one of our own requests. Call
        this only when none can still land: no push in flight and no fence pending
        (``Pusher.fence_needed`` false). Then every request ever sent was answered, or the
        repo's commit moved past its ``swapCommit`` (a fence, or a later commit of ours), so
        it can never apply; a record with no outbox row has nothing on its way. With
        ``limit``, at most that many rows go (one short transaction: call again while it
        returns ``limit``).
        """
        bound = "" if limit is None else f" LIMIT {int(limit)}"
        with self._db.transaction():
            return self._db.connection.execute(
                f"DELETE FROM {SENT} WHERE (collection, rkey, cid) IN (SELECT collection, "
                f"rkey, cid FROM {SENT} s WHERE NOT EXISTS (SELECT 1 FROM {OUTBOX} o WHERE "
                f"o.collection = s.collection AND o.rkey = s.rkey){bound})"
            ).rowcount

    def remote_cid(self, collection: str, rkey: str) -> str | None:
        row = self._db.execute(
            f"SELECT cid FROM {RECORDS} WHERE collection = ? AND rkey = ?", (collection, rkey)
        ).fetchone()
        return None if row is None else row[0]

    def get_state(self, key: str) -> str | None:
        row = self._db.execute(f"SELECT value FROM {STATE} WHERE key = ?", (key,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def set_state(self, key: str, value: str | None) -> None:
        with self._db.transaction():
            self._set_state(self._db.connection, key, value)

    @staticmethod
    def _set_state(conn: sqlite3.Connection, key: str, value: str | None) -> None:
        conn.execute(f"INSERT OR REPLACE INTO {STATE} (key, value) VALUES (?, ?)", (key, value))


def _note_unpulled(conn: sqlite3.Connection, keys: list[tuple[str, str]]) -> None:
    """Note records written since the last pull: once each, as their latest write (a new
    row id, so a pull that began before this write leaves it for the next one)."""
    conn.executemany(f"DELETE FROM {UNPULLED} WHERE collection = ? AND rkey = ?", keys)
    conn.executemany(f"INSERT INTO {UNPULLED} (collection, rkey) VALUES (?, ?)", keys)

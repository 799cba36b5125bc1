"""What the outbox tables hold, as people and the engine's decisions read it (mixed into
``Outbox``): counts, listings, dead letters, conflicts, rejected input, one row's state; and
the sync tables' names."""

from __future__ import annotations

from dataclasses import dataclass

from ..db import ModelDB

__all__ = [
    "BLOBS",
    "CONFLICTS",
    "DEAD",
    "FOLLOWED",
    "FOLLOWED_SHARED_KEY",
    "FOLLOWS",
    "OUTBOX",
    "RECORDS",
    "REJECTED",
    "SENT",
    "STATE",
    "TREE",
    "TREE_DELTA",
    "UNPULLED",
    "DeadLetter",
    "OutboxViews",
    "QueuedWrite",
]

OUTBOX = "_atsync_outbox"
RECORDS = "_atsync_records"
DEAD = "_atsync_dead_letters"
STATE = "_atsync_sync_state"
CONFLICTS = "_atsync_conflicts"
SENT = "_atsync_sent"
REJECTED = "_atsync_rejected"  # created by _migrate (tables version 2)
BLOBS = "_atsync_blobs"  # created by _migrate (tables version 4), kept by _blobsync
FOLLOWS = "_atsync_follows"  # created by _migrate (tables version 3), kept by _follows
TREE = "_atsync_tree"  # created by _migrate (tables version 5), kept by _tree
TREE_DELTA = "_atsync_tree_delta"  # version 7, kept by _tree
# Records this device wrote since its last pull (version 5): what the held tree cannot show.
UNPULLED = "_atsync_unpulled"
FOLLOWED = "_atsync_followed"
# The rows of ``FOLLOWED`` its ``(model, key)`` index holds: those of shared bindings (their
# key is the record key). Every other row's key is its AT URI, found by the primary key
# (``split_followed_key``): indexed too, they made a fifth of what a followed record writes.
# A query that uses the index repeats this term word for word (SQLite's rule for partial
# indexes).
FOLLOWED_SHARED_KEY = "substr(key, 1, 5) <> 'at://'"


@dataclass(frozen=True, slots=True)
class QueuedWrite:
    """A pending write as listed for people: what, where, how often tried, the last error."""

    seq: int
    op: str
    collection: str
    rkey: str
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    collection: str
    rkey: str
    op: str
    error: str | None
    message: str | None
    failed_at: float


class OutboxViews:
    """The read-only queries of ``Outbox``."""

    _db: ModelDB

    def row_state(self, model: str, key: str) -> str:
        """``local``, ``pending``, ``synced``, ``failed`` or ``conflict`` (see ``RowState``)."""
        row = self._db.execute(
            f"SELECT (SELECT error FROM {DEAD} WHERE model = ?1 AND key = ?2 "
            f"ORDER BY seq DESC LIMIT 1), "
            f"EXISTS (SELECT 1 FROM {OUTBOX} WHERE model = ?1 AND key = ?2), "
            f"(SELECT cid FROM {RECORDS} WHERE model = ?1 AND key = ?2)",
            (model, key),
        ).fetchone()
        dead, queued, cid = row
        if dead is not None:
            return "conflict" if dead == "Conflict" else "failed"
        if queued:
            return "pending"
        return "synced" if cid is not None else "local"

    def blobs_uploaded(self) -> int:
        """Blobs this database knows its account's PDS holds (``_blobsync``)."""
        (count,) = self._db.execute(f"SELECT count(*) FROM {BLOBS}").fetchone()
        return int(count)

    def rejected_count(self) -> int:
        (count,) = self._db.execute(f"SELECT count(*) FROM {REJECTED}").fetchone()
        return int(count)

    def conflicts(self, limit: int = 100) -> list[dict[str, object]]:
        """Recorded conflicts, newest first, as ``atsync conflicts`` shows them."""
        return self._newest(
            CONFLICTS, "collection, rkey, model, key, fields, resolution, base, local, remote, "
            "merged, detected_at", limit,
        )  # fmt: skip

    def rejected(self, limit: int = 100) -> list[dict[str, object]]:
        """Pulled input that was not applied, newest first, with the reason."""
        return self._newest(
            REJECTED, "did, collection, rkey, cid, rev, reason, detail, seen_at", limit
        )

    def _newest(self, table: str, columns: str, limit: int) -> list[dict[str, object]]:
        cursor = self._db.execute(
            f"SELECT id, {columns} FROM {table} ORDER BY id DESC LIMIT ?", (limit,)
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def counts_by_op(self) -> dict[str, int]:
        rows = self._db.execute(f"SELECT op, count(*) FROM {OUTBOX} GROUP BY op").fetchall()
        return {str(op): int(n) for op, n in rows}

    def listing(self, limit: int = 50) -> list[QueuedWrite]:
        """The oldest pending writes, as ``atsync outbox`` shows them."""
        rows = self._db.execute(
            f"SELECT seq, op, collection, rkey, attempts, last_error FROM {OUTBOX} "
            "ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [QueuedWrite(*row) for row in rows]

    def counts(self) -> tuple[int, int, int]:
        """(pending writes, dead letters, recorded conflicts)."""
        row = self._db.execute(
            f"SELECT (SELECT count(*) FROM {OUTBOX}), (SELECT count(*) FROM {DEAD}), "
            f"(SELECT count(*) FROM {CONFLICTS})"
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def pending_by_collection(self) -> dict[str, int]:
        rows = self._db.execute(
            f"SELECT collection, count(*) FROM {OUTBOX} GROUP BY collection"
        ).fetchall()
        return {str(c): int(n) for c, n in rows}

    def dead_letters(self) -> list[DeadLetter]:
        rows = self._db.execute(
            f"SELECT seq, collection, rkey, op, error, message, failed_at FROM {DEAD} ORDER BY seq"
        ).fetchall()
        return [DeadLetter(*row) for row in rows]

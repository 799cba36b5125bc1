"""Following other people's repositories: who is followed, and where a row came from.

    await sync.follow("dan.test")        # or a DID; kept in the database
    sync.following                       # ["did:plc:…"]
    sync.origin("notes", key)            # Origin(did, uri, cid)
    sync.unfollow("dan.test")            # its rows and its pull position go

A followed repository is pulled like the user's own (verified against *its* key, deletes by
whole comparison), into the same bound models; its rows are keyed by their AT URI, since a
record key is unique only within one repository, and are read-only (``Capture`` refuses an
action that edits or deletes one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from ..app import RemoteChange
from ..db import ModelDB
from ._binding import BoundBinding
from ._migrate import FOLLOWED, FOLLOWS
from ._outbox import RECORDS, STATE
from ._outbox_views import FOLLOWED_SHARED_KEY, TREE, TREE_DELTA
from ._repo import split_followed_key
from ._shared import merge_shared, shared_records

__all__ = ["FollowedRepo", "Follows", "Origin", "followed_repositories"]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a row came from: the repository's DID, the record's AT URI and its CID (as
    last synced)."""

    did: str
    uri: str
    cid: str | None


@dataclass(frozen=True, slots=True)
class FollowedRepo:
    """One followed repository as the database holds it (``atsync status`` shows these)."""

    did: str
    handle: str | None
    rev: str | None  # the revision last pulled
    last_pulled_at: float | None
    records: int  # its records held in the bound models


def followed_repositories(db: ModelDB) -> list[FollowedRepo]:
    """The repositories a database follows, read straight from its tables (no engine needed;
    empty for a database from before following existed)."""
    present = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (FOLLOWS,)
    ).fetchone()
    if present is None:
        return []
    out = []
    rows = db.execute(f"SELECT did, handle FROM {FOLLOWS} ORDER BY added_at").fetchall()
    for did, handle in rows:
        state = dict(
            db.execute(f"SELECT key, value FROM {STATE} WHERE key LIKE ?", (f"follow:{did}:%",))
        )
        (count,) = db.execute(f"SELECT count(*) FROM {FOLLOWED} WHERE did = ?", (did,)).fetchone()
        pulled_at = state.get(f"follow:{did}:last_pulled_at")
        out.append(
            FollowedRepo(
                did,
                handle,
                state.get(f"follow:{did}:pulled_rev"),
                float(pulled_at) if pulled_at else None,
                int(count),
            )
        )
    return out


class Follows:
    """The followed repositories of one database (``_atsync_follows``)."""

    def __init__(self, db: ModelDB) -> None:
        self._db = db

    def dids(self) -> list[str]:
        return [did for (did,) in self._db.execute(f"SELECT did FROM {FOLLOWS} ORDER BY added_at")]

    def did_for(self, who: str) -> str | None:
        """The DID of a followed repository named by its DID or by the handle it was
        followed by."""
        row = self._db.execute(
            f"SELECT did FROM {FOLLOWS} WHERE did = ? OR handle = ?", (who, who.lower())
        ).fetchone()
        return None if row is None else str(row[0])

    def add(self, did: str, handle: str | None) -> bool:
        """Follow ``did``; False if it already was."""
        with self._db.transaction():
            cursor = self._db.connection.execute(
                f"INSERT OR IGNORE INTO {FOLLOWS} (did, handle, added_at) VALUES (?, ?, ?)",
                (did, handle.lower() if handle else None, time.time()),
            )
            return cursor.rowcount > 0

    def remove(
        self,
        did: str,
        applying_remote: Callable[[], AbstractContextManager[None]],
        log_remote: Callable[[str, list[RemoteChange]], object] | None,
        shared: Mapping[str, BoundBinding],
    ) -> int:
        """Stop following ``did``: delete its rows (a row of a ``shared`` binding is made
        again from the repositories still held instead), what was synced of it and its pull
        position, in one transaction (logged like a pull). Returns the rows written."""
        db = self._db
        with db.transaction():
            conn = db.connection
            rows = conn.execute(
                f"SELECT model, key, collection, rkey FROM {FOLLOWED} WHERE did = ?", (did,)
            ).fetchall()
            conn.execute(f"DELETE FROM {FOLLOWED} WHERE did = ?", (did,))
            conn.execute(f"DELETE FROM {TREE} WHERE repo = ?", (did,))
            conn.execute(f"DELETE FROM {TREE_DELTA} WHERE repo = ?", (did,))
            written: list[RemoteChange] = []
            with applying_remote():
                for model, key, collection, rkey in rows:
                    if model not in db.schema.models:
                        continue
                    binding = shared.get(model)
                    if binding is not None:
                        # A shared row stays, made again from the repositories still held.
                        merged, _ = merge_shared(
                            shared_records(conn, model, collection, rkey), binding.data_fields
                        )
                        if merged is not None:
                            row = binding.from_record({"$type": collection, **merged}, key)
                            db.update(model, row)
                            written.append((model, key, row))
                            continue
                    if db.get(model, key) is not None:
                        db.delete(model, key)
                        written.append((model, key, None))
            if written and log_remote is not None:
                log_remote(did, written)
            conn.execute(f"DELETE FROM {STATE} WHERE key LIKE ?", (f"follow:{did}:%",))
            conn.execute(f"DELETE FROM {FOLLOWS} WHERE did = ?", (did,))
        return len(written)

    def followed_row(self, model: str, key: str) -> str | None:
        """The DID whose repository the row ``model``/``key`` came from, if followed."""
        row = self._first(model, key, "did")
        return None if row is None else str(row[0])

    def _first(self, model: str, key: str, columns: str) -> tuple[Any, ...] | None:
        """``columns`` of the followed record the row ``model``/``key`` was made from (of a
        shared row: the first repository's, by DID)."""
        where = split_followed_key(key)
        row: tuple[Any, ...] | None
        if where is not None:  # by its AT URI: the primary key
            row = self._db.connection.execute(
                f"SELECT {columns} FROM {FOLLOWED} WHERE did = ? AND collection = ? "
                "AND rkey = ? AND model = ? AND key = ?",
                (*where, model, key),
            ).fetchone()
        else:
            row = self._db.connection.execute(
                f"SELECT {columns} FROM {FOLLOWED} WHERE model = ? AND key = ? "
                f"AND {FOLLOWED_SHARED_KEY} ORDER BY did LIMIT 1",
                (model, key),
            ).fetchone()
        return row

    def origin(self, model: str, key: str, own_did: str | None) -> Origin | None:
        """A followed row's record, by its AT URI key; any other row's own record (a shared
        row's too, once this device wrote it), else the first followed repository's."""
        own = None
        if own_did is not None and not key.startswith("at://"):
            own = self._db.execute(
                f"SELECT collection, rkey, cid FROM {RECORDS} WHERE model = ? AND key = ?",
                (model, key),
            ).fetchone()
        if own is not None and own[2] is not None:
            collection, rkey, cid = own
            return Origin(str(own_did), f"at://{own_did}/{collection}/{rkey}", cid)
        row = self._first(model, key, "did, collection, rkey, cid")
        if row is None:
            return None  # not synced (yet): it has no record
        did, collection, rkey, cid = row
        return Origin(did, f"at://{did}/{collection}/{rkey}", cid)

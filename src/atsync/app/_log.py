"""The action log: every action in clock order, hash-chained per transaction, and sealed.

    CREATE TABLE _atsync_log (
      id     TEXT PRIMARY KEY,  -- a TID from the app's hybrid logical clock: sorts by time
      name   TEXT NOT NULL,     -- the action's name
      args   TEXT NOT NULL,     -- JSON [positional args, keyword args]
      author TEXT NOT NULL,     -- the DID the action is attributed to
      hash   BLOB,              -- on the last entry of each transaction (a "link"):
                                --   sha256(previous link's hash || every entry since)
      signer TEXT,              -- on sealed links: the did:key that signed
      sig    BLOB               -- on sealed links: the signature over `hash`
    ) WITHOUT ROWID

Each transaction ends in a link whose hash covers its entries and, through the previous
link, the whole log before it. One signature over a link therefore vouches for every
earlier entry, so the app need not sign per action: it seals (signs the newest link) at
the end of a transaction once the previous seal is older than ``seal_interval`` (0: every
transaction), when it closes, and when it opens after a crash left the tail unsealed.
``verify()`` recomputes the chain and checks every seal.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

from .._errors import ActionError, VerificationError
from .._json import compact_json
from ..atproto import verify_signature
from ..db import ModelDB

__all__ = [
    "AUTHORIZATIONS",
    "LOG_TABLE",
    "ActionLog",
    "LogEntry",
    "create_log_table",
    "encode_args",
]

LOG_TABLE = "_atsync_log"
GENESIS = bytes(32)
_COLUMNS = "id, name, args, author, hash, signer, sig"
_INSERT = f"INSERT INTO {LOG_TABLE} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
# The entries of a batch before its link, many rows per statement: SQLite's per-statement
# overhead is most of the cost of a small row. 200 rows are 800 variables, well under the
# 32,766 SQLite 3.32+ allows (and under the 999 of older builds).
_CHUNK = 200
_LAST_LINK = (
    f"SELECT id, hash, sig FROM {LOG_TABLE} WHERE hash IS NOT NULL ORDER BY id DESC LIMIT 1"
)

Pending = tuple[str, str, str, str]  # id, name, args, author


AUTHORIZATIONS = "_atsync_authorizations"


def create_log_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {LOG_TABLE} ("
        "id TEXT PRIMARY KEY NOT NULL, name TEXT NOT NULL, args TEXT NOT NULL, "
        "author TEXT NOT NULL, hash BLOB, signer TEXT, sig BLOB"
        ") WITHOUT ROWID"
    )
    # Session keys an account authorized (ATPSigner.login): the proof is the getRecord CAR.
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {AUTHORIZATIONS} ("
        "session_key TEXT PRIMARY KEY NOT NULL, account TEXT NOT NULL, "
        "collection TEXT NOT NULL, proof BLOB NOT NULL, authorized_at REAL NOT NULL)"
    )


def encode_args(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The JSON stored for an action's arguments; replay passes them back (tuples as lists)."""
    try:
        return compact_json([args, kwargs])
    except (TypeError, ValueError, RecursionError) as exc:
        raise ActionError(
            f"action {name!r}: arguments must be JSON values (str, int, float, bool, None, "
            f"list, dict) so the action can be logged and replayed: {exc}"
        ) from None


def _entry_bytes(entry_id: str, name: str, args: str, author: str) -> bytes:
    # NUL cannot occur in any field (JSON escapes it; ids, names and DIDs exclude it), and
    # each entry ends with one, so the concatenation is unambiguous.
    return f"{entry_id}\0{name}\0{args}\0{author}\0".encode()


def link_hash(previous: bytes, entries: list[Pending]) -> bytes:
    """The hash of a link: the previous link's hash, then each entry since, in order."""
    # The entries' bytes are their fields, each followed by NUL (``_entry_bytes``): one join
    # and one encode for the whole transaction instead of one per entry.
    h = hashlib.sha256(previous)
    h.update(("\0".join(chain.from_iterable(entries)) + "\0").encode())
    return h.digest()


_INSERTS: dict[int, str] = {}


def _insert_entries(count: int) -> str:
    """INSERT of ``count`` entries that are not links (hash, signer, sig stay NULL)."""
    sql = _INSERTS.get(count)
    if sql is None:
        values = ", ".join(["(?, ?, ?, ?)"] * count)
        sql = _INSERTS[count] = f"INSERT INTO {LOG_TABLE} (id, name, args, author) VALUES {values}"
    return sql


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One logged action (``hash``/``signer``/``signature`` are set on links and seals)."""

    id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    author: str
    hash: bytes | None
    signer: str | None
    signature: bytes | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> LogEntry:
        entry_id, name, args, author, digest, signer, sig = row
        positional, keywords = json.loads(args)
        return cls(entry_id, name, positional, keywords, author, digest, signer, sig)


class ActionLog:
    """Reads and appends the action log of one database.

    Entries appended during a transaction are held in memory and written together just
    before it commits (a few multi-row INSERTs): a rollback of the transaction, or of a
    savepoint inside it, drops them together with the writes they belong to.
    """

    def __init__(self, db: ModelDB, sealer: Callable[[], object] | None = None) -> None:
        self._db = db
        self._sealer = sealer  # the app's seal(): lets verify() seal a fresh tail first
        self._pending: list[Pending] = []
        db.stage(self._pending)
        # (db.generation, hash) of the newest link, valid while no rollback undid it. Only
        # this connection appends to the log (App.open holds the database's writer lock), so
        # the cache outlives transactions and saves a read per action.
        self._head: tuple[int, bytes] | None = None

    @property
    def pending(self) -> list[Pending]:
        """Entries of the open transaction, not yet written (``append`` adds to it)."""
        return self._pending

    def append(self, entry_id: str, name: str, args: str, author: str) -> None:
        """Append inside the caller's transaction; written by ``flush`` before it commits."""
        self._pending.append((entry_id, name, args, author))

    def flush(
        self, signer: str | None = None, sign: Callable[[bytes], bytes] | None = None
    ) -> bool:
        """Write the pending entries, ending in a link; with ``sign``, seal it.

        Returns whether it signed.
        """
        pending = self._pending
        if not pending:
            return False
        digest = link_hash(self._last_link_hash(), pending)
        sig = None if sign is None else sign(digest)
        conn = self._db.connection
        last = len(pending) - 1
        for start in range(0, last, _CHUNK):
            rows = pending[start : min(start + _CHUNK, last)]
            conn.execute(_insert_entries(len(rows)), list(chain.from_iterable(rows)))
        conn.execute(_INSERT, (*pending[last], digest, signer if sig is not None else None, sig))
        self._head = (self._db.generation, digest)
        pending.clear()
        return sig is not None

    def _last_link_hash(self) -> bytes:
        cached = self._head
        if cached is not None and cached[0] == self._db.generation:
            return cached[1]
        row = self._db.connection.execute(_LAST_LINK).fetchone()
        return GENESIS if row is None else bytes(row[1])

    def seal(self, signer: str, sign: Callable[[bytes], bytes]) -> bool:
        """Sign the newest link if it is unsigned (inside the caller's transaction)."""
        if self.flush(signer, sign):
            return True
        row = self._db.connection.execute(_LAST_LINK).fetchone()
        if row is None or row[2] is not None:
            return False
        self._db.connection.execute(
            f"UPDATE {LOG_TABLE} SET signer = ?, sig = ? WHERE id = ?",
            (signer, sign(row[1]), row[0]),
        )
        return True

    def _read(self, sql: str, params: Any = ()) -> Any:
        # Reading inside the writing transaction: write what is pending so it is seen.
        if self._pending and self._db.in_transaction:
            self.flush()
        return self._db.execute(sql, params)

    def head_id(self) -> str | None:
        """The id of the newest entry."""
        head = self._read(f"SELECT id FROM {LOG_TABLE} ORDER BY id DESC LIMIT 1").fetchone()
        return None if head is None else str(head[0])

    def __len__(self) -> int:
        count: int = self._read(f"SELECT count(*) FROM {LOG_TABLE}").fetchone()[0]
        return count

    def __iter__(self) -> Iterator[LogEntry]:
        return self.entries()

    def entries(
        self, *, after: str | None = None, limit: int | None = None, name: str | None = None
    ) -> Iterator[LogEntry]:
        """Entries in clock order, optionally after an id, of one action name, up to a limit.

        Reads a page at a time, so a long log streams in constant memory.
        """
        remaining = limit
        while remaining is None or remaining > 0:
            page = 500 if remaining is None else min(500, remaining)
            clauses, params = [], []
            if after is not None:
                clauses.append("id > ?")
                params.append(after)
            if name is not None:
                clauses.append("name = ?")
                params.append(name)
            where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
            sql = f"SELECT {_COLUMNS} FROM {LOG_TABLE}{where} ORDER BY id LIMIT {page}"
            rows = self._read(sql, params).fetchall()
            for row in rows:
                yield LogEntry.from_row(row)
            if len(rows) < page:
                return
            after = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

    def get(self, entry_id: str) -> LogEntry | None:
        row = self._read(f"SELECT {_COLUMNS} FROM {LOG_TABLE} WHERE id = ?", (entry_id,))
        found = row.fetchone()
        return None if found is None else LogEntry.from_row(found)

    def verify(self) -> int:
        """Recompute the hash chain and check every seal; return the entries checked.

        Raises ``VerificationError`` naming the first entry that fails, and when the newest
        entries are not covered by a link or by a seal. The log of an open app seals its
        newest entries first (they may wait up to ``seal_interval`` for their seal).
        """
        if self._sealer is not None and not self._db.in_transaction:
            self._sealer()
        h = hashlib.sha256(GENESIS)
        unsealed_since: str | None = None
        open_since: str | None = None
        count = 0
        cursor = self._read(f"SELECT {_COLUMNS} FROM {LOG_TABLE} ORDER BY id")
        for entry_id, name, args, author, digest, signer, sig in cursor:
            count += 1
            h.update(_entry_bytes(entry_id, name, args, author))
            open_since = open_since or entry_id
            unsealed_since = unsealed_since or entry_id
            if digest is None:
                continue
            if h.digest() != digest:
                raise VerificationError(
                    f"action log: the hash of the link at {entry_id} does not match the "
                    f"entries from {open_since} on (the log was altered)"
                )
            if sig is not None:
                if signer is None or not verify_signature(signer, digest, sig):
                    raise VerificationError(f"action log: bad signature on the seal at {entry_id}")
                unsealed_since = None
            open_since = None
            h = hashlib.sha256(digest)
        if open_since is not None:
            raise VerificationError(f"action log entries from {open_since} on have no link")
        if unsealed_since is not None:
            raise VerificationError(
                f"action log entries from {unsealed_since} on are not covered by a seal"
            )
        return count

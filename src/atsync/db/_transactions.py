"""One SQLite connection shared by threads: savepoint transactions, and the hooks and
held-back writes of the layers above (the base of ``ModelDB``).

The connection is guarded by a re-entrant lock: a transaction holds the lock until it
ends, so it is seen whole or not at all by other threads; nested transactions are
savepoints.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from threading import get_ident
from typing import Any, Generic, Self, TypeVar

from .._errors import ClosedError, TransactionError

__all__ = ["Transactions", "file_uri"]

# Staged lists and their lengths when a transaction or savepoint began; None: all were
# empty (the usual start of a transaction), so a rollback empties them all.
_Marks = list[tuple[list[Any], int]] | None
_DB = TypeVar("_DB", bound="Transactions")
# Inside checkpoints_deferred(): the WAL is checkpointed when it passes this size, not 1,000
# pages (SQLite's default), so that no bulk load, however long, grows it without bound.
BULK_WAL_BYTES = 64 * 1024 * 1024


def file_uri(path: str | Path, mode: str) -> str:
    """The SQLite URI of the database file at ``path`` opened with ``mode`` (``ro``: read
    only; ``rw``: a missing file is an error, not created)."""
    return f"file:{urllib.parse.quote(Path(path).resolve().as_posix())}?mode={mode}"


class _CountingLock:
    """The connection's reentrant lock, knowing how many threads wait for it. The lock is
    not fair: a thread that takes it again at once keeps one waiting for it waiting, so a
    long job that takes it chunk after chunk pauses between chunks — only while someone
    waits (``Transactions.waiting_threads``)."""

    __slots__ = ("_counting", "_lock", "waiting")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._counting = threading.Lock()
        self.waiting = 0

    def acquire(self) -> None:
        if self._lock.acquire(blocking=False):
            return
        with self._counting:
            self.waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._counting:
                self.waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class Transactions:
    """Transactions on one connection; ``ModelDB`` adds models, reads and live queries."""

    def __init__(self, conn: sqlite3.Connection, path: str, changes: list[Any]) -> None:
        """``changes``: what the open transaction changed, appended to by the subclass and
        handed to ``_committed`` after it commits (dropped with what a rollback undoes)."""
        self._conn = conn
        # Model writes and transaction statements go through one cursor: conn.execute()
        # would create one per statement.
        self._cursor = conn.cursor()
        self.path = path
        self._deferrals = 0  # checkpoints_deferred() blocks running now
        # The last of them ended: the WAL holds their writes until checkpoint() runs.
        self.checkpoint_due = False
        self._autocheckpoint = 1000  # SQLite's default, until one saves the connection's own
        self._page_size = 4096
        self._lock = _CountingLock()
        self._depth = 0
        self._owner: int | None = None  # thread id holding the open transaction
        self._failure: str | None = None  # why the open transaction may not commit
        self._closed = False
        # Bumped on every rollback: a cache of what this connection wrote (the action log's
        # head) is valid while this stays the same.
        self.generation = 0
        self._changes = changes
        # Hooks of the layer above (the app's action log): run inside the outermost
        # transaction just before COMMIT (an exception there rolls it back), and after
        # that transaction ended either way.
        self.before_commit: list[Callable[[], None]] = []
        self.after_transaction: list[Callable[[bool], None]] = []
        # Lists that grow during a transaction and must shrink back with its savepoints.
        self._staged: list[list[Any]] = [changes]
        # Writes a layer above holds back and writes in bulk (see ``defer``).
        self._deferred: list[tuple[list[Any], Callable[[], None]]] = []
        self._holding = threading.local()  # per thread: where changes_held() gathers

    def close(self) -> None:
        """Close the database; later calls raise ``ClosedError``. Safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting_threads(self) -> int:
        """How many other threads wait for this database right now (its transactions and
        statements take turns): a long job done in chunks pauses between two while any do."""
        return self._lock.waiting

    @property
    def in_transaction(self) -> bool:
        """Whether the calling thread is inside ``transaction()``."""
        return self._depth > 0 and self._owner == get_ident()

    def transaction(self) -> _Transaction[Self]:
        """All writes inside commit together or not at all; nesting uses savepoints.

        ``with db.transaction(): ...`` — the block's exception rolls back its writes.
        """
        return _Transaction(self)

    def _begin(self) -> tuple[int, _Marks]:
        self._lock.acquire()
        try:
            if self._closed:
                self._check_open()  # raises
            depth = self._depth
            if depth and self._deferred:
                # Held-back writes belong to the enclosing level: written before the
                # savepoint, a rollback to it cannot take them along.
                self._flush_deferred()
            staged = self._staged
            marks = list(zip(staged, map(len, staged), strict=True)) if any(staged) else None
            self._cursor.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT atsync_{depth}")
        except BaseException:
            self._lock.release()
            raise
        if depth == 0:
            self._failure = None
            self._owner = get_ident()
        self._depth = depth + 1
        return depth, marks

    def _end(self, depth: int, marks: _Marks, ok: bool) -> None:
        changes: list[Any] = []
        try:
            if not ok:
                self._rollback(depth, marks)
                return
            try:
                if depth:
                    self._conn.execute(f"RELEASE atsync_{depth}")
                    return
                if self._failure is not None:
                    raise TransactionError(
                        f"the transaction was rolled back because {self._failure}"
                    )
                for hook in self.before_commit:
                    hook()
                for buffer, flush in self._deferred:
                    if buffer:
                        flush()
                self._cursor.execute("COMMIT")
                if self._changes:
                    changes = self._changes[:]
                    self._changes.clear()  # the same list stays staged
                for end in self.after_transaction:
                    end(True)
            except BaseException:
                self._rollback(depth, marks)
                raise
        finally:
            self._depth = depth
            if depth == 0:
                self._owner = None
            self._lock.release()
        if changes:
            held = getattr(self._holding, "changes", None)
            if held is not None:
                held.extend(changes)
            else:
                self._committed(changes)  # outside the lock: callbacks may use the database

    def fail_transaction(self, reason: str) -> None:
        """Doom the open transaction: its end rolls it back and raises ``TransactionError``.

        For a failure inside a transaction that left partial writes behind without a
        savepoint to undo them (an action that raised inside a batch).
        """
        self.require_transaction()
        if self._failure is None:
            self._failure = reason

    def stage(self, buffer: list[Any]) -> None:
        """Register a list that the layer above appends to during transactions (e.g. log
        entries written at commit): a rollback truncates it to its length at the start
        of the savepoint or transaction being rolled back."""
        self._staged.append(buffer)

    def defer(self, buffer: list[Any], flush: Callable[[], None]) -> Callable[[], None]:
        """Let a layer above hold writes back in ``buffer`` and write them in bulk.

        ``flush()`` writes what ``buffer`` holds and empties it. The database calls it
        before the transaction commits, before a savepoint begins, and before the thread
        that holds the transaction reads or writes through ``execute``, ``executemany`` or
        ``connection`` — so the held-back rows are seen wherever they could be read. A
        rollback empties ``buffer``: written before every savepoint, what it holds belongs
        to the savepoint or transaction being rolled back (even when ``defer`` was called
        inside it). Model tables are not read this way: held-back writes may only go to the
        layer's own tables.

        Returns a function that writes what is held (inside this thread's transaction)
        and unregisters the buffer.
        """
        entry = (buffer, flush)
        with self._lock:
            self._deferred.append(entry)

        def cancel() -> None:
            # The lock waits out another thread's transaction (which flushes or drops
            # the buffer as it ends); in this thread's own, what is held is written now.
            with self._lock:
                if buffer and self.in_transaction:
                    flush()
                if entry in self._deferred:
                    self._deferred.remove(entry)

        return cancel

    def _flush_deferred(self) -> None:
        for buffer, flush in self._deferred:
            if buffer:
                flush()

    def _rollback(self, depth: int, marks: _Marks) -> None:
        self.generation += 1
        if marks is None:
            for staged in self._staged:
                staged.clear()
        else:
            for staged, mark in marks:
                del staged[mark:]
        for buffer, _ in self._deferred:
            buffer.clear()
        if depth > 0:
            self._conn.execute(f"ROLLBACK TO atsync_{depth}")
            self._conn.execute(f"RELEASE atsync_{depth}")
            return
        # SQLite may already have rolled back by itself (e.g. on SQLITE_FULL).
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        for end in self.after_transaction:
            end(False)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        # A lone write outside a transaction gets a transaction of its own.
        if self.in_transaction:
            yield
        else:
            with self.transaction():
                yield

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"the database {self.path!r} is closed")

    def _committed(self, changes: list[Any]) -> None:
        """Called with the committed transaction's changes, after the lock is released."""

    @contextmanager
    def changes_held(self, into: list[Any]) -> Iterator[None]:
        """What the transactions this thread commits inside change is added to ``into``
        instead of being told to live queries; ``deliver(into)`` tells them later, from any
        thread. For work done in a worker thread whose callbacks belong to another (the sync
        engine applies followed repositories off its event loop)."""
        previous = getattr(self._holding, "changes", None)
        self._holding.changes = into
        try:
            yield
        finally:
            self._holding.changes = previous

    def deliver(self, changes: list[Any]) -> None:
        """Tell live queries about committed changes that ``changes_held`` kept back."""
        if changes:
            self._committed(changes)

    # -- raw access for the layers above ------------------------------------------------

    def execute(
        self, sql: str, params: Sequence[object] | Mapping[str, object] = ()
    ) -> sqlite3.Cursor:
        """Run raw SQL on the database's connection (for atsync's own ``_atsync_*`` tables).

        Writes belong inside ``transaction()``; model tables should be written through
        ``set``/``update``/``delete`` so that live queries see the change.
        """
        with self._lock:
            self._check_open()
            if self._deferred:
                self._flush_deferred()  # holding the lock: any open transaction is ours
            return self._conn.execute(sql, params)

    @property
    def connection(self) -> sqlite3.Connection:
        """The SQLite connection, for atsync's own layers while they hold a transaction."""
        if self._closed:
            self._check_open()  # raises
        if self._deferred and self._owner == get_ident():
            for buffer, flush in self._deferred:
                if buffer:
                    flush()
        return self._conn

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        with self._lock:
            self._check_open()
            if self._deferred:
                self._flush_deferred()
            self._conn.executemany(sql, rows)

    def require_transaction(self) -> None:
        if not self.in_transaction:
            raise TransactionError("this operation must run inside db.transaction()")

    @contextmanager
    def checkpoints_deferred(self) -> Iterator[None]:
        """Bulk writes inside: a WAL checkpoint only every ``BULK_WAL_BYTES`` while they run.
        SQLite checkpoints whenever the WAL passes 1,000 pages, each time syncing the
        database file — many times in one bulk load, a large part of its commits' cost; a
        page rewritten by several commits is copied once per checkpoint. Readers see the
        writes all the same. Blocks may overlap (several repositories loaded at once): the
        bound holds until the last one ends; then ``checkpoint_due`` says whether the WAL
        grew past SQLite's own threshold, for the caller to tell whoever waits for the writes
        first and ``checkpoint()`` afterwards."""
        with self._lock:
            self._check_open()
            if self._deferrals == 0:  # nested or concurrent bulk writes: the first saves it
                (self._autocheckpoint,) = self._conn.execute("PRAGMA wal_autocheckpoint").fetchone()
                (page_size,) = self._conn.execute("PRAGMA page_size").fetchone()
                self._page_size = int(page_size)
                bulk = max(int(self._autocheckpoint), BULK_WAL_BYTES // self._page_size)
                self._conn.execute(f"PRAGMA wal_autocheckpoint = {bulk}")
            self._deferrals += 1
        try:
            yield
        finally:
            with self._lock:
                self._deferrals -= 1
                if self._deferrals == 0 and not self._closed:
                    self._conn.execute(f"PRAGMA wal_autocheckpoint = {int(self._autocheckpoint)}")
                    # A load that left less than SQLite would have checkpointed anyway: its
                    # next automatic checkpoint, as usual.
                    threshold = int(self._autocheckpoint) * self._page_size
                    self.checkpoint_due = threshold > 0 and self._wal_bytes() > threshold

    def _wal_bytes(self) -> int:
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:  # in memory, or no WAL (yet)
            return 0

    @property
    def checkpoints_are_deferred(self) -> bool:
        """Whether a ``checkpoints_deferred()`` block is running now."""
        return self._deferrals > 0

    def checkpoint(self) -> None:
        """Move what the WAL holds into the database file, without waiting for or blocking
        anyone (a passive checkpoint, on a connection of its own: safe to call from another
        thread while this one is used). Nothing to do for a database in memory."""
        self.checkpoint_due = False
        if self._closed or self.path == ":memory:" or self.path.startswith("file::memory:"):
            return
        # mode=rw: a database file gone meanwhile is not created empty.
        try:
            conn = sqlite3.connect(file_uri(self.path, "rw"), uri=True, timeout=0)
        except sqlite3.OperationalError:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.OperationalError:
            pass  # busy or gone: the next automatic checkpoint does it
        finally:
            conn.close()


class _Transaction(Generic[_DB]):
    """The context manager of ``transaction()`` (a class: it is on the hot path)."""

    __slots__ = ("_db", "_depth", "_marks")

    def __init__(self, db: _DB) -> None:
        self._db = db

    def __enter__(self) -> _DB:
        self._depth, self._marks = self._db._begin()
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db._end(self._depth, self._marks, exc_type is None)

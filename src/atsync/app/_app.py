"""App: a ModelDB whose data changes only through logged, signed actions.

app = App.open("notes.db", contract)          # LocalSigner key kept in notes.db.key
app.actions.create_note("hello")              # one transaction: writes + log entry
with app.batch():                             # several actions, all or none
    ...
app.log.verify()                              # hash chain + signatures
app.rebuild()                                 # replay the log into empty tables
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._errors import ActionError, TransactionError
from ..atproto import Tid, format_tid
from ..db import BlobRef, BlobStore, Durability, Model, ModelDB, Row, Subscription
from ._contract import ActionContext, ActionResult, Contract
from ._log import AUTHORIZATIONS, ActionLog, LogEntry, create_log_table, encode_args
from ._signers import LocalSigner, Signer

__all__ = ["REMOTE_ACTION", "Actions", "App", "ReadOnlyDB", "RemoteChange", "writer_lock"]

_B32 = "234567abcdefghijklmnopqrstuvwxyz"  # the TID alphabet (base32-sortable)
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)  # two characters (10 bits) at a time
# ActionResult(id, result) without NamedTuple's Python-level __new__ (one per action).
_new_tuple = tuple.__new__


class ReadOnlyDB:
    """The app's database for reading; data changes only through actions (``ctx.db``)."""

    def __init__(self, db: ModelDB) -> None:
        self._db = db

    @property
    def schema(self) -> Any:
        return self._db.schema

    @property
    def path(self) -> str:
        return self._db.path

    @property
    def blobs(self) -> BlobStore:
        """The blobs beside the database: ``read(ref)``/``open(ref)`` give a ``BlobRef``'s
        bytes back; an action stores them with ``ctx.db.blobs.put(data, mime_type)``."""
        return self._db.blobs

    def get(self, model: str, key: str) -> Row | None:
        return self._db.get(model, key)

    def get_many(self, model: str, keys: Sequence[str]) -> list[Row | None]:
        return self._db.get_many(model, keys)

    def query(self, model: str, **options: Any) -> list[Row]:
        return self._db.query(model, **options)

    def count(self, model: str, *, where: Mapping[str, Any] | None = None) -> int:
        return self._db.count(model, where=where)

    def iterate(self, model: str, **options: Any) -> Iterator[Row]:
        return self._db.iterate(model, **options)

    def subscribe(
        self, model: str, callback: Callable[[list[Row]], None], **options: Any
    ) -> Subscription:
        return self._db.subscribe(model, callback, **options)

    def _read_only(self, *args: object, **kwargs: object) -> None:
        raise ActionError(
            "app.db is read-only: change data inside an action, through ctx.db, so the "
            "change is logged, signed and synced"
        )

    set = update = merge = delete = _read_only


class Actions:
    """``app.actions.NAME(*args, **kwargs)`` runs the action NAME."""

    def __init__(self, app: App) -> None:
        self._app = app

    def __getattr__(self, name: str) -> Callable[..., ActionResult]:
        if name.startswith("__") or name not in self._app.contract.actions:
            known = ", ".join(sorted(self._app.contract.actions)) or "none"
            raise AttributeError(f"no action named {name!r} (actions: {known})")
        call = self._app._call

        def run(*args: Any, **kwargs: Any) -> ActionResult:
            return call(name, args, kwargs)

        run.__name__ = run.__qualname__ = name
        setattr(self, name, run)  # later lookups skip __getattr__
        return run

    def __getitem__(self, name: str) -> Callable[..., ActionResult]:
        try:
            return getattr(self, name)  # type: ignore[no-any-return]
        except AttributeError as exc:
            raise ActionError(str(exc)) from None

    def __dir__(self) -> list[str]:
        return sorted(self._app.contract.actions)


class App:
    """An opened app: contract + database + signer + action log."""

    def __init__(
        self, db: ModelDB, contract: Contract, signer: Signer, *, seal_interval: float = 0.1
    ) -> None:
        self._db = db
        self.contract = contract
        self.signer = signer
        self.log = ActionLog(db, sealer=self.seal)
        self._log_pending = self.log.pending  # appended to directly on the hot path
        self.db = ReadOnlyDB(db)
        self.actions = Actions(self)
        # The action clock: a hybrid logical clock read only inside transactions (so under
        # the database's lock). Its id is fixed per signing key, so a device's TIDs do not
        # change between runs; it starts after the newest logged action.
        self._clock_id = int.from_bytes(hashlib.sha256(signer.key_did.encode()).digest()[:2]) & 1023
        self._last_us = -1
        # A TID's first 7 characters change about once a second (timestamp_us >> 20) and its
        # last two are the clock id's: only the middle four are formatted per action.
        self._id_high: tuple[int, str] = (-1, "")
        self._id_low = _B32_PAIRS[self._clock_id]
        head = self.log.head_id()
        if head is not None:
            self._last_us = Tid.parse(head).timestamp_us
        self._in_action = False
        self._writer_lock: int | None = None
        # The action running now (None outside actions) and whether rebuild() is replaying:
        # the sync layer reads both to attribute writes and to leave replays out of the outbox.
        self.current_action: ActionContext | None = None
        self.replaying = False
        # Called inside the action's transaction after it ran: (ctx, name, args, kwargs).
        self.after_action: list[
            Callable[[ActionContext, str, tuple[Any, ...], dict[str, Any]], None]
        ] = []
        self.seal_interval = seal_interval
        self._last_seal = 0.0
        db.before_commit.append(self._seal_before_commit)

    @classmethod
    def open(
        cls,
        path: str | Path,
        contract: Contract,
        *,
        signer: Signer | None = None,
        durability: Durability = "normal",
        seal_interval: float = 0.1,
    ) -> App:
        """Open (or create) the app's database at ``path``.

        Without a ``signer``, a ``LocalSigner`` key is created beside the database
        (``<path>.key``, mode 0600) on first open and reused afterwards.
        ``durability="normal"`` survives a killed process (power loss may drop the last
        commits); ``"full"`` also survives power loss at the cost of an fsync per commit.
        ``seal_interval`` (seconds) bounds how long the newest log entries stay unsigned;
        0 signs every transaction.
        """
        signer = signer if signer is not None else LocalSigner()
        lock = _writer_lock(path)
        try:
            signer.attach(path)
            db = ModelDB.open(
                path,
                contract.schema,
                version=contract.version,
                upgrade=contract.upgrade,
                durability=durability,
                setup=create_log_table,
            )
            app = cls(db, contract, signer, seal_interval=seal_interval)
        except BaseException:
            _release(lock)
            raise
        app._writer_lock = lock
        try:
            signer.opened(app)  # first: a signer that needs its session has it back
            app.seal()  # entries a crash left unsealed
        except BaseException:
            app.close()
            raise
        return app

    @property
    def did(self) -> str:
        """The DID actions are attributed to now."""
        return self.signer.did

    @property
    def path(self) -> str:
        return self._db.path

    @property
    def blobs(self) -> BlobStore:
        """The blobs beside the database: ``read(ref)``/``open(ref)`` give a ``BlobRef``'s
        bytes back; an action stores them with ``ctx.db.blobs.put(data, mime_type)``."""
        return self._db.blobs

    @property
    def model_db(self) -> ModelDB:
        """The underlying ModelDB (writes here bypass the log: for atsync's own layers)."""
        return self._db

    def close(self) -> None:
        """Seal the log and close the database. Safe to call twice."""
        if not self._db.closed:
            try:
                self.seal()
            finally:
                self._db.close()
                _release(self._writer_lock)
                self._writer_lock = None

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<App {self.path!r} did={self.did!r} actions={sorted(self.contract.actions)}>"

    # -- running actions ----------------------------------------------------------------

    def run(self, name: str, *args: Any, **kwargs: Any) -> ActionResult:
        """Run action ``name`` in one transaction and log it; its exception rolls back both.

        Inside ``batch()`` an action that raises dooms the whole batch (all or none): the
        batch rolls back when it ends, even if the exception was caught.
        """
        return self._call(name, args, kwargs)

    def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ActionResult:
        fn = self.contract.actions.get(name)
        if fn is None:
            known = ", ".join(sorted(self.contract.actions)) or "none"
            raise ActionError(f"no action named {name!r} (actions: {known})")
        args_json = encode_args(name, args, kwargs)
        db = self._db
        if not db.in_transaction:
            with db.transaction():
                return self._run_logged(fn, name, args_json, args, kwargs)
        try:
            return self._run_logged(fn, name, args_json, args, kwargs)
        except BaseException as exc:
            # No savepoint per action inside a batch (it would halve batch throughput):
            # its partial writes are undone with the whole batch instead.
            db.fail_transaction(f"action {name!r} raised {exc!r}")
            raise

    def _run_logged(
        self,
        fn: Callable[..., Any],
        name: str,
        args_json: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> ActionResult:
        if self._in_action:
            raise ActionError(
                f"action {name!r} was called from inside another action; call its "
                "function directly instead (nested actions would replay twice)"
            )
        now, action_id = self._next_id()
        did = self.signer.did
        ctx = ActionContext(self._db, did, now, self._clock_id, action_id)
        # Logged before it runs, so entries are appended in id order.
        self._log_pending.append((action_id, name, args_json, did))
        self._in_action = True
        self.current_action = ctx
        try:
            result = fn(ctx, *args, **kwargs)
            if self.after_action:
                for hook in self.after_action:
                    hook(ctx, name, args, kwargs)
        finally:
            self._in_action = False
            self.current_action = None
            if ctx.tids_used:
                # ctx.tid() handed out timestamps after the action's own: skip past them.
                self._last_us = max(self._last_us, now + ctx.tids_used)
        return _new_tuple(ActionResult, (action_id, result))

    def _next_id(self) -> tuple[int, str]:
        """The next (timestamp in µs, TID) of the action clock; called inside a transaction."""
        # time.time_ns looked up per call, so tests can patch it.
        now = time.time_ns() // 1000
        now = now if now > self._last_us else self._last_us + 1
        self._last_us = now
        high = self._id_high
        if high[0] != now >> 20:
            high = self._id_high = (now >> 20, format_tid(now, self._clock_id)[:7])
        return now, high[1] + _B32_PAIRS[(now >> 10) & 1023] + _B32_PAIRS[now & 1023] + self._id_low

    def log_remote(self, author: str, changes: Sequence[RemoteChange]) -> str | None:
        """Log changes that came from outside this app's actions — rows the sync layer applied
        from a repository — as one ``$remote`` entry attributed to ``author`` (the
        repository's DID), in the caller's transaction; returns its id (None: no changes).

        Each change is ``(model, key, row)``: the values written (``None``: the row was
        deleted). ``rebuild()`` writes them again at their place in the log, so a rebuild
        reproduces the state the pull left.
        """
        if not changes:
            return None
        db = self._db
        if not db.in_transaction:
            raise TransactionError("log_remote() runs inside the transaction that applied them")
        models = db.schema.models
        binary: dict[str, list[str]] = {}  # bytes and blob properties, per model: asked once
        for model, _, _ in changes:
            if model not in binary:
                binary[model] = [
                    p.name for p in models[model].properties if p.kind in ("bytes", "blob")
                ]
        encoded = [
            (model, key, None if row is None else _row_to_json(binary[model], row))
            for model, key, row in changes
        ]
        _, entry_id = self._next_id()
        self._log_pending.append(
            (entry_id, REMOTE_ACTION, encode_args(REMOTE_ACTION, (encoded,), {}), author)
        )
        return entry_id

    @contextmanager
    def batch(self) -> Iterator[App]:
        """Run several actions in one transaction: all of them commit, or none."""
        with self._db.transaction():
            yield self

    def seal(self) -> bool:
        """Sign the newest log entry now if it is unsigned; returns whether it signed."""
        with self._db.transaction():
            sealed = self.log.seal(self.signer.key_did, self.signer.sign)
        self._last_seal = time.monotonic()
        return sealed

    def _seal_before_commit(self) -> None:
        # One signature covers every earlier entry through the hash chain, so sealing
        # at most every seal_interval keeps signing off the per-action cost.
        now = time.monotonic()
        if now - self._last_seal < self.seal_interval:
            self.log.flush()
        elif self.log.flush(self.signer.key_did, self.signer.sign):
            self._last_seal = now

    # -- authorship --------------------------------------------------------------------------

    def record_authorization(
        self, session_key: str, account: str, collection: str, proof: bytes
    ) -> None:
        """Remember that ``account`` authorized ``session_key`` (with the proof CAR)."""
        with self._db.transaction():
            self._db.connection.execute(
                f"INSERT OR REPLACE INTO {AUTHORIZATIONS} (session_key, account, collection, "
                "proof, authorized_at) VALUES (?, ?, ?, ?, ?)",
                (session_key, account, collection, proof, time.time()),
            )

    def authorization(self, session_key: str) -> tuple[str, str, bytes] | None:
        """(account, collection, proof) for a session key the account authorized."""
        row = self._db.execute(
            f"SELECT account, collection, proof FROM {AUTHORIZATIONS} WHERE session_key = ?",
            (session_key,),
        ).fetchone()
        return None if row is None else (row[0], row[1], bytes(row[2]))

    def author_of(self, entry: LogEntry) -> str:
        """Who an action is attributed to: its author, or — for an action signed by a
        session key before login — the account that later authorized that key."""
        if entry.author.startswith("did:key:"):
            found = self.authorization(entry.author)
            if found is not None:
                return found[0]
        return entry.author

    # -- replay ---------------------------------------------------------------------------

    def rebuild(self) -> int:
        """Empty every model table and replay the whole log; returns the actions replayed.

        Actions must be deterministic (use ``ctx.id``, ``ctx.timestamp``, ``ctx.tid()``
        rather than the wall clock or random numbers) for the state to come out the same.
        """
        db = self._db
        with db.transaction():
            replayed = 0
            self._in_action = True
            # Set before the tables are emptied: a replay changes nothing the sync layer
            # has not seen, so neither the clearing nor the replayed writes are captured.
            self.replaying = True
            try:
                for model in db.schema.models:
                    db.clear(model)
                for entry in self.log.entries():
                    if entry.name == REMOTE_ACTION:
                        _replay_remote(db, entry.args[0])
                        replayed += 1
                        continue
                    fn = self.contract.actions.get(entry.name)
                    if fn is None:
                        raise ActionError(
                            f"the log holds action {entry.name!r} ({entry.id}) that this "
                            "contract does not define"
                        )
                    tid = Tid.parse(entry.id)
                    ctx = ActionContext(db, entry.author, tid.timestamp_us, tid.clock_id)
                    fn(ctx, *entry.args, **entry.kwargs)
                    replayed += 1
            finally:
                self._in_action = False
                self.replaying = False
        return replayed


REMOTE_ACTION = (
    "$remote"  # the log entry of changes applied from a repository (never an action name)
)
RemoteChange = tuple[str, str, Mapping[str, Any] | None]  # model, key, row written (None: deleted)


def _row_to_json(binary: list[str], row: Mapping[str, Any]) -> Mapping[str, Any]:
    """A row as JSON values: its ``binary`` properties' bytes as ``{"$bytes": base64}``, a
    ``BlobRef`` as its JSON form."""
    if not binary:
        return row
    out = dict(row)
    for name in binary:
        value = row.get(name)
        if isinstance(value, bytes):
            out[name] = {"$bytes": base64.b64encode(value).decode("ascii")}
        elif isinstance(value, BlobRef):
            out[name] = value.to_json()
    return out


def _row_from_json(model: Model, row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for name, value in row.items():
        prop = model.by_name.get(name)
        if prop is not None and prop.kind == "bytes" and isinstance(value, dict):
            out[name] = base64.b64decode(value["$bytes"])
        elif prop is not None and prop.kind == "blob" and isinstance(value, dict):
            out[name] = BlobRef.from_json(value)
    return out


def _replay_remote(db: ModelDB, changes: list[Any]) -> None:
    """Write a ``$remote`` entry's rows again as the pull wrote them: a row that exists is
    updated (its local-only properties stay), a new one created, a ``None`` one deleted."""
    for model_name, key, row in changes:
        if row is None:
            db.delete(model_name, key)
        elif db.get(model_name, key) is not None:
            db.update(model_name, _row_from_json(db.schema.models[model_name], row))
        else:
            db.set(model_name, _row_from_json(db.schema.models[model_name], row))


def _writer_lock(path: str | Path) -> int | None:
    """Hold ``<path>.lock`` exclusively while the app is open: one process appends actions.

    The action log is hash-chained in append order; two processes appending at once would
    interleave their entries. Readers (other connections, the CLI) need no lock. The kernel
    drops the lock when the process dies, so a crash never leaves it behind.
    """
    if str(path) == ":memory:":
        return None
    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise TransactionError(
            f"{path} is already open in an App (pid {holder}); one process at a time writes "
            "actions. Read it with ModelDB.open_existing() or the atsync CLI meanwhile."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


@contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """Hold the database's writer lock (``<path>.lock``) for a tool that writes it without
    an ``App`` (``atsync push``); raises ``TransactionError`` naming the process that holds
    it when an app has the database open."""
    fd = _writer_lock(path)
    try:
        yield
    finally:
        _release(fd)


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock

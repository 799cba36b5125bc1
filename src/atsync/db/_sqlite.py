"""ModelDB on SQLite: plain tables, savepoint transactions, live queries.

One connection, guarded by a re-entrant lock: a transaction holds the lock until it ends,
so it is seen whole or not at all by other threads; nested transactions are savepoints
(``_transactions``: the connection, its transactions and the hooks of the layers above).
Durability follows SQLite's settings: WAL with ``synchronous=NORMAL`` by default (survives a
killed process; a power loss may drop the last commits but never corrupts), or ``FULL``
(an fsync per commit: survives power loss too).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from threading import get_ident
from typing import Any, Literal

from .._errors import (
    ClosedError,
    NotFoundError,
    SchemaError,
    UnknownModelError,
    ValidationError,
)
from ._blobs import BlobStore
from ._migrations import META_TABLE, Upgrade, prepare_schema
from ._query import Query, compile_query, quote
from ._schema import Model, Property, Schema, parse_schema, relation_table
from ._subscriptions import Change, Subscription, SubscriptionHub
from ._transactions import Transactions, file_uri
from ._values import column_encoder, decode_column, reads_as_stored, validate_key

__all__ = ["Durability", "ModelDB"]

Durability = Literal["full", "normal"]
# A page cache large enough that a big transaction does not spill pages to the WAL
# before it commits (the default is 2 MiB).
CACHE_KIB = 32 * 1024
Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Plan:
    """Per-model SQL and codecs, prepared once when the database opens."""

    model: Model
    name: str
    has_relations: bool
    columns: tuple[Property, ...]
    names: tuple[str, ...]
    name_set: frozenset[str]
    encoders: tuple[tuple[str, Callable[[object], object]], ...]
    key_index: int
    upsert: str
    select_one: str
    delete: str
    decoders: tuple[Callable[[object], Any], ...]
    stored_as_is: bool  # every column reads back as stored: a row is dict(zip(names, values))
    # A dict that set() got with every column is itself the row as get() returns it: every
    # column reads back as stored, no encoder replaces the value it is given (bytes columns
    # may turn a bytearray into bytes), and there are no relations to add.
    passes_through: bool


def _plan(model: Model) -> _Plan:
    columns = model.columns
    names = tuple(p.name for p in columns)
    table, pk = quote(model.name), quote(model.primary_key)
    cols = ", ".join(quote(n) for n in names)
    updates = ", ".join(
        f"{quote(n)} = excluded.{quote(n)}" for n in names if n != model.primary_key
    )
    conflict = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
    return _Plan(
        model=model,
        name=model.name,
        has_relations=bool(model.relations),
        columns=columns,
        names=names,
        name_set=frozenset(model.by_name),
        encoders=tuple((p.name, column_encoder(model, p)) for p in columns),
        key_index=names.index(model.primary_key),
        upsert=(
            f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT ({pk}) {conflict}"
        ),
        select_one=f"SELECT {cols} FROM {table} WHERE {pk} = ?",
        delete=f"DELETE FROM {table} WHERE {pk} = ?",
        decoders=tuple(decode_column(p) for p in columns),
        stored_as_is=all(reads_as_stored(p) for p in columns),
        passes_through=not model.relations
        and all(reads_as_stored(p) and p.kind != "bytes" for p in columns),
    )


class ModelDB(Transactions):
    """A local database of models, on SQLite. Open with ``ModelDB.open(path, models)``."""

    def __init__(
        self, conn: sqlite3.Connection, schema: Schema, path: str, durability: Durability
    ) -> None:
        self._hub = SubscriptionHub()
        # The transaction's row changes (for live queries) are the changes it publishes.
        super().__init__(conn, path, self._hub.pending)
        self.schema = schema
        self.durability: Durability = durability
        # Blob properties hold references; the bytes live here, beside the database file.
        in_memory = path == ":memory:" or path.startswith("file::memory:")
        self.blobs = BlobStore(None if in_memory else Path(f"{path}.blobs"))
        self._plans = {name: _plan(model) for name, model in schema.models.items()}
        self._watched = self._hub.watched  # models with live queries
        # Called inside the transaction for every record written: (model, key, row) where
        # row is the record as ``get`` would return it, or None when it was deleted (it may
        # be the very dict given to ``set``: read it, do not keep or change it). The sync
        # layer turns these into outbox entries in the same transaction.
        self.write_listeners: list[Callable[[str, str, Row | None], None]] = []

    # -- opening and closing ----------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        models: Mapping[str, Mapping[str, Any]] | Schema,
        *,
        version: int = 1,
        upgrade: Upgrade | None = None,
        durability: Durability = "normal",
        timeout: float = 5.0,
        setup: Callable[[sqlite3.Connection], None] | None = None,
    ) -> ModelDB:
        """Open (or create) a database and bring its tables to ``models`` at ``version``.

        ``setup`` runs inside the opening transaction; the app layer creates its own
        ``_atsync_*`` tables there.
        """
        schema = models if isinstance(models, Schema) else parse_schema(models)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValidationError(f"version must be a positive integer, got {version!r}")
        if durability not in ("full", "normal"):
            raise ValidationError(f"durability must be 'full' or 'normal', got {durability!r}")
        path_str = str(path)
        conn = sqlite3.connect(
            path_str, isolation_level=None, check_same_thread=False, timeout=timeout
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            if path_str != ":memory:":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {durability.upper()}")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                prepare_schema(conn, schema, version, upgrade)
                if setup is not None:
                    setup(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        return cls(conn, schema, path_str, durability)

    @classmethod
    def open_existing(cls, path: str | Path, *, timeout: float = 5.0) -> ModelDB:
        """Open an existing atsync database with the schema stored in it (tools, the CLI)."""
        if not Path(path).is_file():
            raise ClosedError(f"no database at {path}")
        probe = sqlite3.connect(file_uri(path, "ro"), uri=True)
        try:
            rows = dict(probe.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())
        except sqlite3.DatabaseError as exc:
            raise SchemaError(f"{path} is not an atsync database ({exc})") from None
        finally:
            probe.close()
        if "schema" not in rows:
            raise SchemaError(f"{path} is not an atsync database (no stored schema)")
        return cls.open(
            path, json.loads(rows["schema"]), version=int(rows["version"]), timeout=timeout
        )

    def __enter__(self) -> ModelDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ModelDB {self.path!r} models={list(self.schema.models)}>"

    def _committed(self, changes: list[Any]) -> None:
        self._hub.notify(self, changes)

    def _plan(self, model: str) -> _Plan:
        try:
            return self._plans[model]
        except (KeyError, TypeError):
            known = ", ".join(self._plans) or "none"
            raise UnknownModelError(f"unknown model {model!r} (models: {known})") from None

    # -- writes -------------------------------------------------------------------------

    def set(self, model: str, value: Mapping[str, Any]) -> None:
        """Create or replace a record; properties left out are null (if nullable) or []."""
        try:
            plan = self._plans[model]
        except (KeyError, TypeError):
            plan = self._plan(model)  # raises UnknownModelError
        params = self._encode(plan, value)
        relations = self._encode_relations(plan.model, value) if plan.has_relations else []
        # The listeners' row without building it again (see _Plan.passes_through).
        given = (
            value
            if plan.passes_through and type(value) is dict and len(value) == len(params)
            else None
        )
        if self._depth and self._owner == get_ident():
            self._write(plan, params, relations, given)
        else:
            with self.transaction():
                self._write(plan, params, relations, given)

    def set_many(self, model: str, values: Iterable[Mapping[str, Any]]) -> int:
        """``set`` each value, all in one transaction; returns how many. The same checks,
        listeners and live queries as ``set``, with one statement for the whole batch unless
        the model has relations (then one ``set`` each)."""
        plan = self._plan(model)
        with self.transaction():
            if plan.has_relations:
                count = 0
                for value in values:
                    self.set(model, value)
                    count += 1
                return count
            rows = [value if type(value) is dict else dict(value) for value in values]
            batch = [self._encode(plan, row) for row in rows]
            key_index = plan.key_index
            # A live query on the model: the rows before, read in one go (set() reads each).
            before = (
                self._stored_many(plan, [params[key_index] for params in batch])
                if model in self._watched
                else None
            )
            try:
                self._cursor.executemany(plan.upsert, batch)
            except UnicodeEncodeError as exc:
                raise ValidationError(
                    f"{model}: a string is not valid Unicode ({exc.reason}): {exc.object!r}"
                ) from None
            if before is not None:
                pending, names = self._hub.pending, plan.names
                for params in batch:
                    new = dict(zip(names, params, strict=True))
                    key = params[key_index]
                    pending.append(Change(model, before.get(key), new))
                    before[key] = new  # a key given twice: its second write follows the first
            listeners = self.write_listeners
            if listeners:
                for row, params in zip(rows, batch, strict=True):
                    if not (plan.passes_through and len(row) == len(params)):
                        row = (
                            dict(zip(plan.names, params, strict=True))
                            if plan.stored_as_is
                            else self._decode(plan, params, plan.names, ())
                        )
                    for listener in listeners:
                        listener(model, str(params[key_index]), row)
            return len(batch)

    def update(self, model: str, value: Mapping[str, Any]) -> None:
        """Change some properties of an existing record (shallow); ``NotFoundError`` if none."""
        self._modify(model, value, deep=False)

    def merge(self, model: str, value: Mapping[str, Any]) -> None:
        """Like ``update`` but merges nested objects in json properties (deep)."""
        self._modify(model, value, deep=True)

    def delete(self, model: str, key: str) -> None:
        """Delete a record (and its relation rows); deleting a missing record is a no-op."""
        plan = self._plan(model)
        validate_key(plan.model, key)
        with self._writing():
            old = self._stored(plan, key) if self._hub.watches(model) else None
            self._conn.execute(plan.delete, (key,))
            for rel in plan.model.relations:
                self._conn.execute(
                    f'DELETE FROM {quote(relation_table(model, rel.name))} WHERE "_source" = ?',
                    (key,),
                )
            if old is not None:
                self._hub.pending.append(Change(model, old, None))
            for listener in self.write_listeners:
                listener(model, key, None)

    def clear(self, model: str) -> None:
        """Delete every record of a model (and its relation rows)."""
        plan = self._plan(model)
        with self._writing():
            if self.write_listeners:
                pk = quote(plan.model.primary_key)
                keys = [k for (k,) in self._conn.execute(f"SELECT {pk} FROM {quote(model)}")]
                for listener in self.write_listeners:
                    for key in keys:
                        listener(model, key, None)
            self._conn.execute(f"DELETE FROM {quote(model)}")
            for rel in plan.model.relations:
                self._conn.execute(f"DELETE FROM {quote(relation_table(model, rel.name))}")
            if self._hub.watches(model):
                self._hub.pending.append(Change(model, None, None))

    def _modify(self, model: str, value: Mapping[str, Any], *, deep: bool) -> None:
        plan = self._plan(model)
        if not isinstance(value, Mapping):
            raise ValidationError(f"{model}: expected a mapping, got {type(value).__name__}")
        key = validate_key(plan.model, value.get(plan.model.primary_key))
        with self._writing():
            current = self.get(model, key)
            if current is None:
                raise NotFoundError(f"{model}/{key} does not exist; use set() to create it")
            merged = _deep_merge(current, value, plan.model) if deep else {**current, **value}
            params = self._encode(plan, merged)
            relations = self._encode_relations(plan.model, merged)
            self._write(plan, params, relations)

    def _encode(self, plan: _Plan, value: Mapping[str, Any]) -> list[object]:
        model = plan.model
        if type(value) is not dict and not isinstance(value, Mapping):
            raise ValidationError(f"{model.name}: expected a mapping, got {type(value).__name__}")
        if not value.keys() <= plan.name_set:
            unknown = sorted(k for k in value if k not in plan.name_set)
            raise ValidationError(f"{model.name}: unknown properties {unknown!r}")
        try:
            return [encode(value[name]) for name, encode in plan.encoders]
        except KeyError:
            pass
        params: list[object] = []
        for prop, (name, encode) in zip(plan.columns, plan.encoders, strict=True):
            if name in value:
                params.append(encode(value[name]))
            elif prop.nullable:
                params.append(None)
            elif prop.kind == "primary":
                raise ValidationError(f"{model.name}.{name}: the primary key is missing") from None
            else:
                raise ValidationError(f"{model.name}.{name}: missing (not nullable)") from None
        return params

    def _encode_relations(
        self, model: Model, value: Mapping[str, Any]
    ) -> list[tuple[Property, list[str]]]:
        out = []
        for prop in model.relations:
            targets = value.get(prop.name, [])
            if isinstance(targets, str | bytes) or not isinstance(targets, Iterable):
                raise ValidationError(
                    f"{model.name}.{prop.name}: expected a list of {prop.target} keys"
                )
            keys = list(targets)
            for key in keys:
                if not isinstance(key, str) or not key:
                    raise ValidationError(
                        f"{model.name}.{prop.name}: {key!r} is not a {prop.target} key"
                    )
                validate_key(self._plan(prop.target or "").model, key)
            out.append((prop, keys))
        return out

    def _write(
        self,
        plan: _Plan,
        params: list[object],
        relations: list[tuple[Property, list[str]]],
        row: Row | None = None,
    ) -> None:
        model = plan.name
        # The row before the write is read only for a live query on this model.
        watched = model in self._watched
        key = params[plan.key_index]
        old = self._stored(plan, key) if watched else None
        try:
            self._cursor.execute(plan.upsert, params)
            for prop, keys in relations:
                table = quote(relation_table(model, prop.name))
                self._conn.execute(f'DELETE FROM {table} WHERE "_source" = ?', (key,))
                self._conn.executemany(
                    f'INSERT INTO {table} ("_source", "_index", "_target") VALUES (?, ?, ?)',
                    [(key, i, target) for i, target in enumerate(keys)],
                )
        except UnicodeEncodeError as exc:
            raise ValidationError(
                f"{model}: a string is not valid Unicode ({exc.reason}): {exc.object!r}"
            ) from None
        if watched:
            new = dict(zip(plan.names, params, strict=True))
            new.update({prop.name: tuple(keys) for prop, keys in relations})
            self._hub.pending.append(Change(model, old, new))
        listeners = self.write_listeners
        if listeners:
            if row is not None:
                pass  # the dict set() was given: every column, as get() would return it
            elif plan.stored_as_is:
                row = dict(zip(plan.names, params, strict=True))
            else:
                row = self._decode(plan, params, plan.names, ())
            if plan.has_relations:
                for prop, keys in relations:
                    row[prop.name] = list(keys)
                for prop in plan.model.relations:
                    row.setdefault(prop.name, [])
            for listener in listeners:
                listener(model, str(key), row)

    def _stored(self, plan: _Plan, key: object) -> Row | None:
        row = self._conn.execute(plan.select_one, (key,)).fetchone()
        if row is None:
            return None
        stored = dict(zip(plan.names, row, strict=True))
        for prop in plan.model.relations:
            stored[prop.name] = tuple(self._relation(plan.model.name, prop.name, key))
        return stored

    def _stored_many(self, plan: _Plan, keys: Sequence[object]) -> dict[object, Row]:
        """``_stored`` of several keys at once, by key (a model without relations)."""
        names, key_index = plan.names, plan.key_index
        return {
            row[key_index]: dict(zip(names, row, strict=True)) for row in self._rows_of(plan, keys)
        }

    def _rows_of(self, plan: _Plan, keys: Sequence[object]) -> Iterator[tuple[Any, ...]]:
        """The stored rows (every column, as stored) with these keys, 500 keys a query."""
        pk, cols = quote(plan.model.primary_key), ", ".join(quote(n) for n in plan.names)
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            yield from self._conn.execute(
                f"SELECT {cols} FROM {quote(plan.name)} WHERE {pk} IN ({marks})", chunk
            )

    # -- reads --------------------------------------------------------------------------

    def get(self, model: str, key: str) -> Row | None:
        """The record with this primary key, or ``None``."""
        plan = self._plan(model)
        validate_key(plan.model, key)
        with self._lock:
            self._check_open()
            row = self._conn.execute(plan.select_one, (key,)).fetchone()
            return None if row is None else self._decode(plan, row, plan.names)

    def get_many(self, model: str, keys: Sequence[str]) -> list[Row | None]:
        """Records for each key, in the order given (``None`` where missing)."""
        plan = self._plan(model)
        for key in keys:
            validate_key(plan.model, key)
        found: dict[str, Row] = {}
        pk = plan.model.primary_key
        with self._lock:
            self._check_open()
            for row in self._rows_of(plan, keys):
                record = self._decode(plan, row, plan.names)
                found[record[pk]] = record
        return [found.get(key) for key in keys]

    def query(
        self,
        model: str,
        *,
        where: Mapping[str, Any] | None = None,
        order_by: object = None,
        limit: int | None = None,
        offset: int = 0,
        select: object = None,
    ) -> list[Row]:
        """Records matching ``where``, sorted by ``order_by`` (then by primary key)."""
        plan = self._plan(model)
        query = compile_query(
            plan.model, where=where, order_by=order_by, limit=limit, offset=offset, select=select
        )
        return self.run_query(query)

    def count(self, model: str, *, where: Mapping[str, Any] | None = None) -> int:
        """How many records match ``where``."""
        plan = self._plan(model)
        sql, params = compile_query(plan.model, where=where).select_sql(count=True)
        with self._lock:
            self._check_open()
            result: int = self._conn.execute(sql, params).fetchone()[0]
            return result

    def iterate(
        self,
        model: str,
        *,
        where: Mapping[str, Any] | None = None,
        order_by: object = None,
        select: object = None,
        batch_size: int = 256,
    ) -> Iterator[Row]:
        """Stream matching records in constant memory.

        Outside a transaction it reads a consistent snapshot through a second, read-only
        connection (WAL lets it run beside writers); inside one, it reads what the
        transaction sees. An in-memory database is read into memory first.
        """
        plan = self._plan(model)
        query = compile_query(plan.model, where=where, order_by=order_by, select=select)
        sql, params = query.select_sql()
        if self.in_transaction:
            yield from self._stream(self._conn, plan, query, sql, params, batch_size)
        elif self.path == ":memory:" or self.path.startswith("file::memory:"):
            yield from self.run_query(query)
        else:
            self._check_open()
            reader = sqlite3.connect(file_uri(self.path, "ro"), uri=True, check_same_thread=False)
            try:
                reader.execute("BEGIN")  # one snapshot for the whole iteration
                yield from self._stream(reader, plan, query, sql, params, batch_size)
            finally:
                reader.close()

    def _stream(
        self,
        conn: sqlite3.Connection,
        plan: _Plan,
        query: Query,
        sql: str,
        params: list[Any],
        batch_size: int,
    ) -> Iterator[Row]:
        cursor = conn.execute(sql, params)
        while rows := cursor.fetchmany(batch_size):
            for row in rows:
                yield self._decode(plan, row, query.columns, query.relations, conn)

    def run_query(self, query: Query) -> list[Row]:
        """Run a compiled query (used by ``query`` and by live subscriptions)."""
        plan = self._plans[query.model.name]
        sql, params = query.select_sql()
        with self._lock:
            self._check_open()
            rows = self._conn.execute(sql, params).fetchall()
            return [self._decode(plan, row, query.columns, query.relations) for row in rows]

    def _decode(
        self,
        plan: _Plan,
        row: Sequence[object],
        names: Sequence[str],
        relations: Sequence[str] | None = None,
        conn: sqlite3.Connection | None = None,
    ) -> Row:
        if names is plan.names:
            record = {n: dec(v) for n, dec, v in zip(names, plan.decoders, row, strict=True)}
        else:
            by_name = plan.model.by_name
            record = {n: decode_column(by_name[n])(v) for n, v in zip(names, row, strict=True)}
        wanted = (p.name for p in plan.model.relations) if relations is None else relations
        for name in wanted:
            record[name] = self._relation(
                plan.model.name, name, record[plan.model.primary_key], conn
            )
        return record

    def _relation(
        self, model: str, prop: str, key: object, conn: sqlite3.Connection | None = None
    ) -> list[str]:
        sql = (
            f'SELECT "_target" FROM {quote(relation_table(model, prop))} WHERE "_source" = ? '
            'ORDER BY "_index"'
        )
        return [target for (target,) in (conn or self._conn).execute(sql, (key,))]

    # -- live queries -------------------------------------------------------------------

    def subscribe(
        self,
        model: str,
        callback: Callable[[list[Row]], None],
        *,
        where: Mapping[str, Any] | None = None,
        order_by: object = None,
        limit: int | None = None,
        offset: int = 0,
        select: object = None,
        initial: bool = True,
    ) -> Subscription:
        """Call ``callback(results)`` now (if ``initial``) and after each commit that changes
        the results of this query. Returns a ``Subscription``; ``cancel()`` it when done."""
        plan = self._plan(model)
        query = compile_query(
            plan.model, where=where, order_by=order_by, limit=limit, offset=offset, select=select
        )
        with self._lock:
            sub = Subscription(query, callback, self.run_query(query))
            self._hub.add(sub)
        if initial:
            callback(sub.results)
        return sub


def _deep_merge(current: Mapping[str, Any], patch: Mapping[str, Any], model: Model) -> Row:
    merged = dict(current)
    for name, value in patch.items():
        prop = model.by_name.get(name)
        if prop is not None and prop.kind == "json":
            merged[name] = _merge_json(current.get(name), value)
        else:
            merged[name] = value
    return merged


def _merge_json(old: object, new: object) -> object:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = dict(old)
        for key, value in new.items():
            out[key] = _merge_json(old.get(key), value)
        return out
    return new

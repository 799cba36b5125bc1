"""Tables for a schema, the stored schema, and versioned upgrades.

The declared schema and its version are stored in ``_atsync_meta``. Opening a database:

- empty database          -> create every table, store schema and version;
- same version            -> the stored schema must equal the declared one;
- older stored version    -> run ``upgrade(api, old_version, new_version)`` in the opening
                             transaction; afterwards the schema must equal the declared one;
- newer stored version    -> refuse (a newer app wrote this database).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

from .._errors import SchemaError
from ._query import quote
from ._schema import Model, Property, Schema, parse_model, parse_property_type, relation_table
from ._values import encode_column, sql_type

__all__ = ["META_TABLE", "Upgrade", "UpgradeAPI", "create_model_tables", "prepare_schema"]

META_TABLE = "_atsync_meta"


def _column_ddl(prop: Property) -> str:
    if prop.kind == "primary":
        return f"{quote(prop.name)} TEXT PRIMARY KEY NOT NULL"
    null = "" if prop.nullable else " NOT NULL"
    declared = f" {sql_type(prop)}" if sql_type(prop) else ""
    return f"{quote(prop.name)}{declared}{null}"


def _index_ddl(model: Model, columns: tuple[str, ...]) -> str:
    name = quote(f"{model.name}__by__{'__'.join(columns)}")
    cols = ", ".join(quote(c) for c in columns)
    return f"CREATE INDEX IF NOT EXISTS {name} ON {quote(model.name)} ({cols})"


def _relation_ddl(model: Model, prop: Property) -> list[str]:
    table = relation_table(model.name, prop.name)
    return [
        f"CREATE TABLE IF NOT EXISTS {quote(table)} ("
        '"_source" TEXT NOT NULL, "_index" INTEGER NOT NULL, "_target" TEXT NOT NULL, '
        'PRIMARY KEY ("_source", "_index")) WITHOUT ROWID',
        f'CREATE INDEX IF NOT EXISTS {quote(table + "__by__target")} ON {quote(table)} ("_target")',
    ]


def create_model_tables(conn: sqlite3.Connection, model: Model) -> None:
    columns = ", ".join(_column_ddl(p) for p in model.columns)
    conn.execute(f"CREATE TABLE {quote(model.name)} ({columns})")
    for prop in model.relations:
        for statement in _relation_ddl(model, prop):
            conn.execute(statement)
    for index in model.indexes:
        conn.execute(_index_ddl(model, index))


class UpgradeAPI:
    """What an upgrade step may do; each call changes the tables and the stored schema."""

    def __init__(self, conn: sqlite3.Connection, models: dict[str, Model]) -> None:
        self._conn = conn
        self._models = models

    @property
    def models(self) -> Mapping[str, Model]:
        """The schema as it stands at this point of the upgrade."""
        return dict(self._models)

    def add_model(self, name: str, spec: Mapping[str, Any]) -> None:
        if name in self._models:
            raise SchemaError(f"upgrade: model {name!r} already exists")
        model = parse_model(name, spec)
        for prop in model.properties:
            if prop.target is not None and prop.target not in self._models | {name: model}:
                raise SchemaError(f"upgrade: {name}.{prop.name} refers to a missing model")
        create_model_tables(self._conn, model)
        self._models[name] = model

    def add_property(
        self, model_name: str, name: str, type_string: str, *, default: Any = None
    ) -> None:
        """Add a property; existing rows get ``default`` (required unless nullable)."""
        model = self._model(model_name)
        if name in model.by_name:
            raise SchemaError(f"upgrade: {model_name}.{name} already exists")
        prop = parse_property_type(model_name, name, type_string)
        if prop.kind == "primary":
            raise SchemaError(f"upgrade: {model_name} already has a primary key")
        if prop.target is not None and prop.target not in self._models:
            raise SchemaError(f"upgrade: {model_name}.{name} refers to a missing model")
        if prop.kind == "relation":
            for statement in _relation_ddl(model, prop):
                self._conn.execute(statement)
        else:
            if default is None and not prop.nullable:
                raise SchemaError(
                    f"upgrade: {model_name}.{name} is not nullable, so existing rows need a "
                    "default= value"
                )
            stored = encode_column(model, prop, default)
            # ALTER TABLE needs a constant default for NOT NULL: add the column with a
            # neutral one of its type, then set the real default with a bound parameter (a
            # literal in SQL text would mangle inf, -0.0, NUL characters...).
            null = "" if prop.nullable else " NOT NULL"
            declared = f" {sql_type(prop)}" if sql_type(prop) else ""
            placeholder = "NULL" if prop.nullable else _PLACEHOLDERS[sql_type(prop)]
            self._conn.execute(
                f"ALTER TABLE {quote(model_name)} ADD COLUMN {quote(name)}{declared}{null} "
                f"DEFAULT {placeholder}"
            )
            if stored is not None:
                self._conn.execute(f"UPDATE {quote(model_name)} SET {quote(name)} = ?", (stored,))
        self._models[model_name] = _rebuild(model, (*model.properties, prop), model.indexes)

    def add_index(self, model_name: str, index: str | tuple[str, ...]) -> None:
        model = self._model(model_name)
        columns = tuple(index.split("/")) if isinstance(index, str) else tuple(index)
        spec = model.to_spec()
        spec["$indexes"] = [*spec.get("$indexes", []), "/".join(columns)]
        updated = parse_model(model_name, spec)
        self._conn.execute(_index_ddl(updated, columns))
        self._models[model_name] = updated

    def _model(self, name: str) -> Model:
        model = self._models.get(name)
        if model is None:
            raise SchemaError(f"upgrade: no model {name!r}")
        return model


def _rebuild(
    model: Model, props: tuple[Property, ...], indexes: tuple[tuple[str, ...], ...]
) -> Model:
    return Model(model.name, props, indexes, {p.name: p for p in props})


_PLACEHOLDERS = {"TEXT": "''", "INTEGER": "0", "BLOB": "X''", "": "0.0"}


Upgrade = Callable[[UpgradeAPI, int, int], None]


def prepare_schema(
    conn: sqlite3.Connection, schema: Schema, version: int, upgrade: Upgrade | None
) -> None:
    """Create or check the tables; the caller holds an open write transaction."""
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {META_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
    )
    rows = dict(conn.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())
    declared = schema.to_spec()
    if "schema" not in rows:
        for model in schema.models.values():
            create_model_tables(conn, model)
        _store(conn, declared, version)
        return
    stored_version = int(rows["version"])
    stored: dict[str, Any] = json.loads(rows["schema"])
    if stored_version > version:
        raise SchemaError(
            f"the database is at schema version {stored_version}, newer than this app's "
            f"version {version}; open it with the newer app"
        )
    if stored_version == version:
        if stored != declared:
            raise SchemaError(
                f"the models differ from those stored at schema version {version}: "
                f"{_difference(stored, declared)}; raise version= and give an upgrade= step"
            )
        return
    if upgrade is None:
        raise SchemaError(
            f"the database is at schema version {stored_version} and the app declares "
            f"{version}, but no upgrade= step was given"
        )
    models = {name: parse_model(name, spec) for name, spec in stored.items()}
    api = UpgradeAPI(conn, models)
    upgrade(api, stored_version, version)
    upgraded = {name: model.to_spec() for name, model in api.models.items()}
    if upgraded != declared:
        raise SchemaError(
            f"after upgrading from version {stored_version} to {version} the models still "
            f"differ from the declared ones: {_difference(upgraded, declared)}"
        )
    _store(conn, declared, version)


def _store(conn: sqlite3.Connection, spec: dict[str, Any], version: int) -> None:
    conn.executemany(
        f"INSERT OR REPLACE INTO {META_TABLE} (key, value) VALUES (?, ?)",
        [("schema", json.dumps(spec, sort_keys=True)), ("version", str(version))],
    )


def _difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    notes = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            notes.append(f"model {name!r} is stored but not declared")
        elif name not in old:
            notes.append(f"model {name!r} is declared but not stored")
        elif old[name] != new[name]:
            notes.append(f"model {name!r}: stored {old[name]} != declared {new[name]}")
    return "; ".join(notes)

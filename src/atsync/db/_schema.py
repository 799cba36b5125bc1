"""The ModelDB schema language (Canvas ModelDB), parsed into frozen descriptions.

    {"notes": {"id": "primary", "title": "string", "body": "string?", "n": "integer",
               "author": "@users", "tags": "@tags[]", "$indexes": ["title", "author/n"]}}

Parsing is pure: it checks the whole schema and raises ``SchemaError`` naming the model and
property at fault, before any table is touched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .._errors import SchemaError

__all__ = ["Kind", "Model", "Property", "Schema", "parse_property_type", "parse_schema"]

Kind = Literal[
    "primary",
    "string",
    "integer",
    "float",
    "number",
    "boolean",
    "json",
    "bytes",
    "blob",
    "reference",
    "relation",
]

_SCALAR_KINDS: frozenset[str] = frozenset(
    {"string", "integer", "float", "number", "boolean", "json", "bytes", "blob"}
)
# Names become SQL identifiers (always quoted) and Python keys; keeping them to this
# alphabet makes raw SQL on the database pleasant and rules out quoting surprises.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_RESERVED_PREFIXES = ("_atsync", "sqlite_")


@dataclass(frozen=True, slots=True)
class Property:
    """One property of a model: its name, kind, nullability and reference target."""

    name: str
    kind: Kind
    nullable: bool = False
    target: str | None = None  # the referenced model, for "reference" and "relation"

    @property
    def type_string(self) -> str:
        """The property written back in the schema language (``"@users[]"``, ``"string?"``)."""
        if self.kind == "reference":
            base = f"@{self.target}"
        elif self.kind == "relation":
            return f"@{self.target}[]"
        else:
            base = self.kind
        return base + "?" if self.nullable else base

    @property
    def is_column(self) -> bool:
        """Relations live in their own table; every other kind is a column of the model."""
        return self.kind != "relation"


@dataclass(frozen=True, slots=True)
class Model:
    """A model: a table with one string primary key, its properties and indexes."""

    name: str
    properties: tuple[Property, ...]
    indexes: tuple[tuple[str, ...], ...] = ()
    by_name: Mapping[str, Property] = field(default_factory=dict, compare=False, repr=False)
    # Derived once: the write path reads them for every record.
    primary_key: str = field(init=False, compare=False, repr=False)
    columns: tuple[Property, ...] = field(init=False, compare=False, repr=False)
    relations: tuple[Property, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        keys = [p.name for p in self.properties if p.kind == "primary"]
        object.__setattr__(self, "primary_key", keys[0] if keys else "")
        object.__setattr__(self, "columns", tuple(p for p in self.properties if p.is_column))
        object.__setattr__(
            self, "relations", tuple(p for p in self.properties if p.kind == "relation")
        )

    def to_spec(self) -> dict[str, Any]:
        """The model written back in the schema language (round-trips through parsing)."""
        spec: dict[str, Any] = {p.name: p.type_string for p in self.properties}
        if self.indexes:
            spec["$indexes"] = ["/".join(index) for index in self.indexes]
        return spec


@dataclass(frozen=True, slots=True)
class Schema:
    """All models of a database, by name, in declaration order."""

    models: Mapping[str, Model]

    def to_spec(self) -> dict[str, dict[str, Any]]:
        return {name: model.to_spec() for name, model in self.models.items()}


def parse_property_type(model: str, name: str, type_string: object) -> Property:
    """Parse one ``"name": "type"`` entry; the reference target is checked later."""
    where = f"{model}.{name}"
    if not isinstance(type_string, str):
        raise SchemaError(f"{where}: a property type must be a string, got {type_string!r}")
    if not _NAME.match(name):
        raise SchemaError(
            f"{where}: property names must match {_NAME.pattern} "
            "(letters, digits and '_', not starting with a digit)"
        )
    text = type_string.strip()
    if text.startswith("@"):
        if text.endswith("[]"):
            target = text[1:-2]
            if target.endswith("?"):
                raise SchemaError(f"{where}: a relation {type_string!r} cannot be nullable")
            kind: Kind = "relation"
            nullable = False
        else:
            nullable = text.endswith("?")
            target = text[1:-1] if nullable else text[1:]
            kind = "reference"
        if not _NAME.match(target):
            raise SchemaError(f"{where}: {type_string!r} does not name a model")
        return Property(name, kind, nullable, target)
    nullable = text.endswith("?")
    base = text[:-1] if nullable else text
    if base == "primary":
        if nullable:
            raise SchemaError(f"{where}: the primary key cannot be nullable")
        return Property(name, "primary")
    if base not in _SCALAR_KINDS:
        known = ", ".join(sorted(_SCALAR_KINDS | {"primary", "@model", "@model[]"}))
        raise SchemaError(f"{where}: unknown type {type_string!r} (known: {known})")
    return Property(name, base, nullable)  # type: ignore[arg-type]


def _parse_indexes(
    model: str, raw: object, properties: Mapping[str, Property]
) -> tuple[tuple[str, ...], ...]:
    if not isinstance(raw, list | tuple):
        raise SchemaError(f"{model}.$indexes must be a list of strings like 'a' or 'a/b'")
    indexes: list[tuple[str, ...]] = []
    for entry in raw:
        if isinstance(entry, str):
            columns = tuple(entry.split("/"))
        elif isinstance(entry, list | tuple) and all(isinstance(c, str) for c in entry):
            columns = tuple(entry)
        else:
            raise SchemaError(f"{model}.$indexes: {entry!r} is not 'a' or 'a/b'")
        for column in columns:
            prop = properties.get(column)
            if prop is None:
                raise SchemaError(f"{model}.$indexes: {column!r} is not a property of {model}")
            if not prop.is_column:
                raise SchemaError(f"{model}.$indexes: relation {column!r} cannot be indexed")
        if len(set(columns)) != len(columns) or not columns:
            raise SchemaError(f"{model}.$indexes: {entry!r} repeats a property or is empty")
        if columns not in indexes:
            indexes.append(columns)
    return tuple(indexes)


def parse_model(name: str, spec: object) -> Model:
    """Parse one model's spec; references to other models are checked by ``parse_schema``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise SchemaError(
            f"model name {name!r} must match {_NAME.pattern} "
            "(letters, digits and '_', not starting with a digit)"
        )
    if name.lower().startswith(_RESERVED_PREFIXES):
        raise SchemaError(f"model name {name!r} is reserved (prefixes {_RESERVED_PREFIXES})")
    if not isinstance(spec, Mapping):
        raise SchemaError(f"model {name!r}: its spec must be a mapping of property -> type")
    properties: dict[str, Property] = {}
    raw_indexes: object = []
    for key, value in spec.items():
        if not isinstance(key, str):
            raise SchemaError(f"model {name!r}: property names must be strings, got {key!r}")
        if key.startswith("$"):
            if key != "$indexes":
                raise SchemaError(f"model {name!r}: unknown reserved key {key!r}")
            raw_indexes = value
            continue
        if key.lower() in (p.lower() for p in properties):
            # SQLite column names are case-insensitive.
            raise SchemaError(f"{name}.{key}: a property with that name (ignoring case) exists")
        properties[key] = parse_property_type(name, key, value)
    primaries = [p.name for p in properties.values() if p.kind == "primary"]
    if len(primaries) != 1:
        raise SchemaError(
            f"model {name!r} must have exactly one 'primary' property, has {len(primaries)}"
        )
    indexes = _parse_indexes(name, raw_indexes, properties)
    return Model(name, tuple(properties.values()), indexes, properties)


def parse_schema(models: Mapping[str, object]) -> Schema:
    """Parse and check a whole schema: names, types, one primary key, references, indexes."""
    if not isinstance(models, Mapping):
        raise SchemaError("models must be a mapping of model name -> model spec")
    parsed: dict[str, Model] = {}
    for name, spec in models.items():
        if isinstance(name, str) and name.lower() in (m.lower() for m in parsed):
            raise SchemaError(f"model {name!r}: a model with that name (ignoring case) exists")
        parsed[name] = parse_model(name, spec)
    for model in parsed.values():
        for prop in model.properties:
            if prop.target is not None and prop.target not in parsed:
                raise SchemaError(
                    f"{model.name}.{prop.name}: {prop.type_string!r} refers to a missing model "
                    f"{prop.target!r}"
                )
        for relation in model.relations:
            table = relation_table(model.name, relation.name)
            if table.lower() in (m.lower() for m in parsed):
                raise SchemaError(f"{model.name}.{relation.name}: table {table!r} is a model")
    return Schema(parsed)


def relation_table(model: str, prop: str) -> str:
    """The table that stores a relation: one row per (source key, target key), in order."""
    return f"{model}__{prop}"

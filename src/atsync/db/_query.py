"""Queries: ``where`` / ``order_by`` / ``select`` compiled once to SQL, and matched in Python.

The Python matcher (``Query.matches``) decides whether a changed row can affect a live
subscription; it follows the same semantics as the SQL:

- ``{"p": v}`` is equality; ``{"p": None}`` matches null.
- ``{"p": {"neq": v}}`` matches every row whose value is not ``v``, nulls included.
- ``gt``/``gte``/``lt``/``lte`` never match null; ``{"in": [...]}`` may list ``None``.
- ``order_by={"p": "asc"|"desc"}``: nulls sort first ascending, last descending; the primary
  key always breaks ties, so results are deterministic.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import ValidationError
from ._schema import Model, Property
from ._values import encode_column

__all__ = ["Query", "compile_query", "quote"]

_OPS: dict[str, tuple[str, Callable[[Any, Any], bool]]] = {
    "gt": (">", operator.gt),
    "gte": (">=", operator.ge),
    "lt": ("<", operator.lt),
    "lte": ("<=", operator.le),
}
_FILTER_OPS = frozenset({"eq", "neq", "in", *_OPS})


def quote(identifier: str) -> str:
    """Quote an SQL identifier (schema names are already restricted to ``[A-Za-z0-9_]``)."""
    return '"' + identifier.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class _Condition:
    column: str
    op: str  # "eq", "neq", "in", "gt", "gte", "lt", "lte"
    value: Any  # the stored (encoded) form
    values: tuple[Any, ...] = ()

    def sql(self) -> tuple[str, list[Any]]:
        col = quote(self.column)
        if self.op == "eq":
            if self.value is None:
                return f"{col} IS NULL", []
            return f"{col} = ?", [self.value]
        if self.op == "neq":
            return f"{col} IS NOT ?", [self.value]
        if self.op == "in":
            present = [v for v in self.values if v is not None]
            parts = []
            if present:
                parts.append(f"{col} IN ({', '.join('?' * len(present))})")
            if len(present) != len(self.values):
                parts.append(f"{col} IS NULL")
            if not parts:
                return "0", []
            return "(" + " OR ".join(parts) + ")", present
        return f"{col} {_OPS[self.op][0]} ?", [self.value]

    def matches(self, stored: Any) -> bool:
        if self.op == "eq":
            return bool(stored == self.value) if self.value is not None else stored is None
        if self.op == "neq":
            return (
                stored is None or stored != self.value
                if self.value is not None
                else (stored is not None)
            )
        if self.op == "in":
            return stored in self.values
        if stored is None:
            return False
        return _OPS[self.op][1](stored, self.value)


@dataclass(frozen=True, slots=True)
class Query:
    """A compiled query over one model."""

    model: Model
    conditions: tuple[_Condition, ...]
    order: tuple[tuple[str, bool], ...]  # (column, descending)
    columns: tuple[str, ...]  # selected columns (always includes the primary key)
    relations: tuple[str, ...]  # selected relations
    limit: int | None
    offset: int

    def where_sql(self) -> tuple[str, list[Any]]:
        if not self.conditions:
            return "", []
        parts, params = [], []
        for condition in self.conditions:
            sql, args = condition.sql()
            parts.append(sql)
            params.extend(args)
        return " WHERE " + " AND ".join(parts), params

    def order_sql(self) -> str:
        return " ORDER BY " + ", ".join(
            f"{quote(column)} {'DESC' if desc else 'ASC'}" for column, desc in self.order
        )

    def select_sql(self, count: bool = False) -> tuple[str, list[Any]]:
        where, params = self.where_sql()
        table = quote(self.model.name)
        if count:
            inner = f"SELECT 1 FROM {table}{where}{self._limit_sql()}"
            return f"SELECT count(*) FROM ({inner})", params
        cols = ", ".join(quote(c) for c in self.columns)
        return f"SELECT {cols} FROM {table}{where}{self.order_sql()}{self._limit_sql()}", params

    def _limit_sql(self) -> str:
        if self.limit is None and not self.offset:
            return ""
        limit = -1 if self.limit is None else self.limit
        return f" LIMIT {limit} OFFSET {self.offset}"

    def matches(self, stored_row: Mapping[str, Any] | None) -> bool:
        """Whether a row, in its stored column encoding, passes every condition."""
        if stored_row is None:
            return False
        return all(c.matches(stored_row.get(c.column)) for c in self.conditions)


def _check_filterable(model: Model, name: str) -> Property:
    prop = model.by_name.get(name)
    if prop is None:
        raise ValidationError(f"{model.name}: no property {name!r} to filter or sort on")
    if prop.kind == "relation":
        raise ValidationError(f"{model.name}.{name}: relations cannot be filtered or sorted")
    if prop.kind == "json":
        raise ValidationError(
            f"{model.name}.{name}: json properties cannot be filtered or sorted "
            "(use raw SQL with json_extract for that)"
        )
    return prop


def _encode_operand(model: Model, prop: Property, value: object) -> object:
    # Operands are checked like stored values, but null is always a legal operand.
    if value is None:
        return None
    nullable = Property(prop.name, prop.kind, True, prop.target)
    if prop.kind == "primary":
        nullable = Property(prop.name, "string", True)
    return encode_column(model, nullable, value)


def _conditions(model: Model, where: Mapping[str, Any] | None) -> tuple[_Condition, ...]:
    if where is None:
        return ()
    if not isinstance(where, Mapping):
        raise ValidationError(f"{model.name}: where must be a mapping, got {where!r}")
    out: list[_Condition] = []
    for name, expr in where.items():
        prop = _check_filterable(model, name)
        if not isinstance(expr, Mapping):
            out.append(_Condition(name, "eq", _encode_operand(model, prop, expr)))
            continue
        if not expr:
            raise ValidationError(f"{model.name}.{name}: empty filter {{}}")
        for op, operand in expr.items():
            if op not in _FILTER_OPS:
                raise ValidationError(
                    f"{model.name}.{name}: unknown filter {op!r} "
                    f"(known: {', '.join(sorted(_FILTER_OPS))})"
                )
            if op == "in":
                if isinstance(operand, str | bytes) or not isinstance(operand, Iterable):
                    raise ValidationError(f"{model.name}.{name}: 'in' needs a list of values")
                values = tuple(_encode_operand(model, prop, v) for v in operand)
                out.append(_Condition(name, "in", None, values))
                continue
            if op in _OPS and operand is None:
                raise ValidationError(f"{model.name}.{name}: {op!r} cannot compare with null")
            out.append(_Condition(name, op, _encode_operand(model, prop, operand)))
    return tuple(out)


def _order(model: Model, order_by: object) -> tuple[tuple[str, bool], ...]:
    pairs: list[tuple[str, bool]] = []
    if order_by is None:
        items: Sequence[tuple[object, object]] = []
    elif isinstance(order_by, str):
        items = [(order_by.removeprefix("-"), "desc" if order_by.startswith("-") else "asc")]
    elif isinstance(order_by, Mapping):
        items = list(order_by.items())
    else:
        raise ValidationError(
            f"{model.name}: order_by must be {{'prop': 'asc'|'desc'}} or 'prop' / '-prop'"
        )
    for name, direction in items:
        if not isinstance(name, str):
            raise ValidationError(f"{model.name}: order_by key {name!r} is not a property")
        _check_filterable(model, name)
        if direction not in ("asc", "desc"):
            raise ValidationError(f"{model.name}.{name}: order must be 'asc' or 'desc'")
        pairs.append((name, direction == "desc"))
    if model.primary_key not in (name for name, _ in pairs):
        pairs.append((model.primary_key, False))
    return tuple(pairs)


def _select(model: Model, select: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if select is None:
        names = [p.name for p in model.properties]
    elif isinstance(select, Mapping):
        names = [name for name, wanted in select.items() if wanted]
    elif isinstance(select, Iterable) and not isinstance(select, str | bytes):
        names = list(select)
    else:
        raise ValidationError(f"{model.name}: select must be a list of property names")
    for name in names:
        if name not in model.by_name:
            raise ValidationError(f"{model.name}: cannot select unknown property {name!r}")
    columns = [model.primary_key] + [
        n for n in names if model.by_name[n].is_column and n != model.primary_key
    ]
    relations = [n for n in names if not model.by_name[n].is_column]
    return tuple(columns), tuple(relations)


def compile_query(
    model: Model,
    *,
    where: Mapping[str, Any] | None = None,
    order_by: object = None,
    limit: int | None = None,
    offset: int = 0,
    select: object = None,
) -> Query:
    """Check a query against the model and compile it; raises ``ValidationError``."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValidationError(f"{model.name}: limit must be a non-negative integer, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValidationError(f"{model.name}: offset must be a non-negative integer")
    columns, relations = _select(model, select)
    return Query(
        model,
        _conditions(model, where),
        _order(model, order_by),
        columns,
        relations,
        limit,
        offset,
    )

"""Queries against a plain-Python reference implementation, on random rows and filters.

The reference follows the semantics documented at the top of ``atsync/db/_query.py`` and in
docs/modeldb.md:

- ``{"p": v}`` / ``{"p": {"eq": v}}`` is equality, ``None`` matching null;
- ``neq`` matches every value that is not the operand, nulls included;
- ``gt``/``gte``/``lt``/``lte`` never match null; ``in`` may list ``None``;
- several conditions are combined with AND;
- nulls sort first ascending and last descending; the primary key (ascending) breaks ties;
- ``select`` returns the selected properties plus the primary key.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atsync.db import ModelDB

MODEL = "rows"
COLUMNS = ["s", "i", "f", "b", "y"]
MODELS = {
    MODEL: {
        "id": "primary",
        "s": "string?",
        "i": "integer?",
        "f": "float?",
        "b": "boolean?",
        "y": "bytes?",
        "$indexes": ["s", "i/f", "y"],
    }
}
PK = "id"

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- strategies: small domains so that filters hit and sort keys tie -----------------------

VALUES: dict[str, st.SearchStrategy[Any]] = {
    PK: st.sampled_from(["a", "b", "B", "ab", "a\x00", "é", "😀", "z"])
    | st.text(alphabet="abB\x00é😀", min_size=1, max_size=3),
    "s": st.sampled_from(["", "a", "A", "b", "ab", "a\x00", "\x00", "é", "😀", "z"])
    | st.text(max_size=3),
    "i": st.sampled_from([-(2**63), -1, 0, 1, 2, 3, 2**63 - 1]) | st.integers(-4, 4),
    "f": st.sampled_from([-math.inf, -1.5, -0.0, 0.0, 5e-324, 0.5, 1.0, 2.0, math.inf])
    | st.floats(-4, 4, allow_nan=False),
    "b": st.booleans(),
    "y": st.sampled_from([b"", b"\x00", b"a", b"ab", b"b", b"\xff"]) | st.binary(max_size=2),
}
# Float columns also accept int operands (compared as floats).
OPERANDS = {**VALUES, "f": VALUES["f"] | st.integers(-3, 3)}


def nullable(column: str, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategy if column == PK else st.none() | strategy


@st.composite
def rows(draw: st.DrawFn) -> list[dict[str, Any]]:
    keys = draw(st.lists(VALUES[PK], max_size=25, unique=True))
    out = []
    for key in keys:
        row: dict[str, Any] = {PK: key}
        for column in COLUMNS:
            row[column] = draw(nullable(column, VALUES[column]))
        out.append(row)
    return out


@st.composite
def conditions(draw: st.DrawFn, column: str) -> Any:
    """One column's filter: a plain value, or a mapping of one to three operators."""
    operand = OPERANDS[column]
    if draw(st.booleans()):
        return draw(st.none() | operand)
    ops = draw(
        st.lists(
            st.sampled_from(["eq", "neq", "gt", "gte", "lt", "lte", "in"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    expr: dict[str, Any] = {}
    for op in ops:
        if op in ("eq", "neq"):
            expr[op] = draw(st.none() | operand)
        elif op == "in":
            expr[op] = draw(st.lists(st.none() | operand, max_size=4))
        else:
            expr[op] = draw(operand)
    return expr


@st.composite
def wheres(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.integers(0, 5)) == 0:
        return None
    columns = draw(st.lists(st.sampled_from([PK, *COLUMNS]), max_size=3, unique=True))
    return {column: draw(conditions(column)) for column in columns}


@st.composite
def orders(draw: st.DrawFn) -> tuple[Any, list[tuple[str, bool]]]:
    """An ``order_by`` argument in one of its accepted forms, and its meaning."""
    columns = draw(st.lists(st.sampled_from([PK, *COLUMNS]), max_size=2, unique=True))
    pairs = [(column, draw(st.booleans())) for column in columns]
    if not pairs:
        return draw(st.sampled_from([None, {}])), pairs
    if len(pairs) == 1 and draw(st.booleans()):
        column, desc = pairs[0]
        return ("-" if desc else "") + column, pairs
    return {column: "desc" if desc else "asc" for column, desc in pairs}, pairs


selects = st.none() | st.lists(st.sampled_from([PK, *COLUMNS]), max_size=4, unique=True)

# -- the reference implementation -----------------------------------------------------------

COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}


def condition_holds(value: Any, op: str, operand: Any) -> bool:
    if op == "eq":
        return value is None if operand is None else value is not None and value == operand
    if op == "neq":
        return value is not None if operand is None else value is None or value != operand
    if op == "in":
        return any(
            value is None if item is None else value is not None and value == item
            for item in operand
        )
    return value is not None and COMPARE[op](value, operand)


def matches(row: dict[str, Any], where: dict[str, Any] | None) -> bool:
    for column, expr in (where or {}).items():
        pairs = expr.items() if isinstance(expr, dict) else [("eq", expr)]
        if not all(condition_holds(row[column], op, operand) for op, operand in pairs):
            return False
    return True


def _compare_values(a: Any, b: Any) -> int:
    """SQLite's order within one column: NULL first, then by value."""
    if a is None or b is None:
        return (a is not None) - (b is not None)
    return (a > b) - (a < b)


def reference_sort(
    found: list[dict[str, Any]], pairs: list[tuple[str, bool]]
) -> list[dict[str, Any]]:
    order = list(pairs)
    if PK not in (column for column, _ in order):
        order.append((PK, False))

    def compare(x: dict[str, Any], y: dict[str, Any]) -> int:
        for column, desc in order:
            c = _compare_values(x[column], y[column])
            if c:
                return -c if desc else c
        return 0

    return sorted(found, key=functools.cmp_to_key(compare))


def project(row: dict[str, Any], select: list[str] | None) -> dict[str, Any]:
    if select is None:
        return dict(row)
    return {k: row[k] for k in row if k == PK or k in select}


def reference_query(
    table: list[dict[str, Any]],
    where: dict[str, Any] | None,
    pairs: list[tuple[str, bool]],
    limit: int | None = None,
    offset: int = 0,
    select: list[str] | None = None,
) -> list[dict[str, Any]]:
    found = reference_sort([r for r in table if matches(r, where)], pairs)
    end = None if limit is None else offset + limit
    return [project(r, select) for r in found[offset:end]]


# -- the tests --------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[ModelDB]:
    database = ModelDB.open(tmp_path / "query.db", MODELS)
    yield database
    database.close()


def load(db: ModelDB, table: list[dict[str, Any]]) -> None:
    with db.transaction():
        db.clear(MODEL)
        for row in table:
            db.set(MODEL, row)


def same_rows(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> bool:
    # Same rows, same order, same keys. == on floats is right here: -0.0 == 0.0 (the
    # sign of zero is test_roundtrip's business).
    return actual == expected


@SETTINGS
@given(
    table=rows(),
    where=wheres(),
    order=orders(),
    limit=st.none() | st.integers(0, 30),
    offset=st.integers(0, 30),
    select=selects,
)
def test_query_count_iterate_match_the_reference(
    db: ModelDB,
    table: list[dict[str, Any]],
    where: dict[str, Any] | None,
    order: tuple[Any, list[tuple[str, bool]]],
    limit: int | None,
    offset: int,
    select: list[str] | None,
) -> None:
    load(db, table)
    order_by, pairs = order
    expected = reference_query(table, where, pairs, limit, offset, select)
    actual = db.query(
        MODEL, where=where, order_by=order_by, limit=limit, offset=offset, select=select
    )
    assert same_rows(actual, expected), f"query: got {actual!r}, expected {expected!r}"

    everything = reference_query(table, where, pairs, select=select)
    assert db.count(MODEL, where=where) == len(everything)
    streamed = list(db.iterate(MODEL, where=where, order_by=order_by, select=select))
    assert same_rows(streamed, everything), f"iterate: got {streamed!r}"
    # Inside a transaction iterate reads through the writing connection instead.
    with db.transaction():
        inside = list(db.iterate(MODEL, where=where, order_by=order_by, select=select))
    assert same_rows(inside, everything)
    # Paging through with limit/offset visits the same rows as one query.
    paged: list[dict[str, Any]] = []
    page = 7
    while len(paged) <= len(everything):
        chunk = db.query(
            MODEL, where=where, order_by=order_by, limit=page, offset=len(paged), select=select
        )
        paged += chunk
        if len(chunk) < page:
            break
    assert same_rows(paged, everything)


@SETTINGS
@given(
    table=rows(),
    where=wheres(),
    order=orders(),
    limit=st.none() | st.integers(0, 6),
    writes=st.lists(
        st.tuples(st.sampled_from(["set", "update", "delete"]), rows()), min_size=1, max_size=6
    ),
)
def test_live_query_results_follow_the_reference(
    db: ModelDB,
    table: list[dict[str, Any]],
    where: dict[str, Any] | None,
    order: tuple[Any, list[tuple[str, bool]]],
    limit: int | None,
    writes: list[tuple[str, list[dict[str, Any]]]],
) -> None:
    """A live query is re-run whenever a committed write can change its results."""
    load(db, table)
    order_by, pairs = order
    state = {row[PK]: dict(row) for row in table}
    delivered: list[list[dict[str, Any]]] = []
    sub = db.subscribe(MODEL, delivered.append, where=where, order_by=order_by, limit=limit)
    try:
        assert same_rows(delivered[-1], reference_query(table, where, pairs, limit))
        for kind, batch in writes:
            with db.transaction():
                for row in batch[:3]:
                    if kind == "set":
                        db.set(MODEL, row)
                        state[row[PK]] = dict(row)
                    elif kind == "delete":
                        db.delete(MODEL, row[PK])
                        state.pop(row[PK], None)
                    elif row[PK] in state:
                        change = {PK: row[PK], "s": row["s"], "f": row["f"]}
                        db.update(MODEL, change)
                        state[row[PK]].update(change)
            expected = reference_query(list(state.values()), where, pairs, limit)
            assert same_rows(db.query(MODEL, where=where, order_by=order_by, limit=limit), expected)
            assert same_rows(sub.results, expected), (
                f"live query went stale after {kind} {batch[:3]!r}: "
                f"has {sub.results!r}, expected {expected!r}"
            )
            assert same_rows(delivered[-1], expected)
    finally:
        sub.cancel()

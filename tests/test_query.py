"""Queries: filters, ordering, paging, selection, count and streaming iteration."""

from __future__ import annotations

from pathlib import Path

import pytest

from atsync._errors import ValidationError
from atsync.db import ModelDB

MODELS = {
    "items": {
        "id": "primary",
        "name": "string",
        "n": "integer?",
        "x": "float?",
        "flag": "boolean?",
        "meta": "json?",
        "tags": "@tags[]",
        "$indexes": ["n", "name/n"],
    },
    "tags": {"id": "primary"},
}
ROWS = [
    {"id": "a", "name": "apple", "n": 3, "x": 1.5, "flag": True},
    {"id": "b", "name": "banana", "n": None, "x": -2.0, "flag": False},
    {"id": "c", "name": "cherry", "n": 1, "x": None, "flag": None},
    {"id": "d", "name": "apple", "n": 7, "x": 0.0, "flag": True},
    {"id": "e", "name": "date", "n": 3, "x": 9.25, "flag": False},
]


@pytest.fixture
def db(tmp_path: Path) -> ModelDB:
    database = ModelDB.open(tmp_path / "q.db", MODELS)
    with database.transaction():
        for row in ROWS:
            database.set("items", {**row, "tags": ["t"] if row["id"] in "ab" else []})
    yield database
    database.close()


def ids(rows: list[dict]) -> list[str]:
    return [r["id"] for r in rows]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"name": "apple"}, ["a", "d"]),
        ({"n": None}, ["b"]),
        ({"n": {"neq": 3}}, ["b", "c", "d"]),
        ({"n": {"neq": None}}, ["a", "c", "d", "e"]),
        ({"n": {"gt": 1}}, ["a", "d", "e"]),
        ({"n": {"gte": 3, "lt": 7}}, ["a", "e"]),
        ({"n": {"lte": 3}}, ["a", "c", "e"]),
        ({"n": {"in": [1, 7, None]}}, ["b", "c", "d"]),
        ({"n": {"in": []}}, []),
        ({"name": {"in": ["date", "apple"]}, "n": {"gt": 3}}, ["d"]),
        ({"x": {"lt": 0}}, ["b"]),
        ({"flag": True}, ["a", "d"]),
        ({"flag": {"neq": True}}, ["b", "c", "e"]),
        ({"id": {"gte": "c"}}, ["c", "d", "e"]),
        ({"name": {"gt": "b", "lt": "d"}}, ["b", "c"]),
    ],
)
def test_filters(db: ModelDB, where: dict, expected: list[str]) -> None:
    assert ids(db.query("items", where=where)) == expected
    assert db.count("items", where=where) == len(expected)


def test_order_by_nulls_first_ascending_last_descending_ties_by_key(db: ModelDB) -> None:
    assert ids(db.query("items", order_by={"n": "asc"})) == ["b", "c", "a", "e", "d"]
    assert ids(db.query("items", order_by={"n": "desc"})) == ["d", "a", "e", "c", "b"]
    assert ids(db.query("items", order_by="-n")) == ["d", "a", "e", "c", "b"]
    assert ids(db.query("items", order_by={"name": "asc", "n": "desc"})) == [
        "d",
        "a",
        "b",
        "c",
        "e",
    ]


def test_limit_offset_and_select(db: ModelDB) -> None:
    assert ids(db.query("items", order_by="name", limit=2, offset=1)) == ["d", "b"]
    assert ids(db.query("items", offset=3)) == ["d", "e"]
    assert db.query("items", limit=0) == []
    assert db.query("items", where={"id": "a"}, select=["name"]) == [{"id": "a", "name": "apple"}]
    assert db.query("items", where={"id": "a"}, select={"tags": True, "n": False}) == [
        {"id": "a", "tags": ["t"]}
    ]
    assert db.count("items", where={"name": "apple"}) == 2


def test_iterate_streams_all_matches_in_order(db: ModelDB) -> None:
    with db.transaction():
        for i in range(1000):
            db.set("items", {"id": f"z{i:04d}", "name": "bulk", "n": i})
    streamed = db.iterate("items", where={"name": "bulk"}, order_by="-n", batch_size=64)
    first = next(streamed)
    assert first["n"] == 999
    # A write while the iterator is open does not disturb its snapshot.
    db.set("items", {"id": "z9999", "name": "bulk", "n": 5000})
    rest = list(streamed)
    assert len(rest) == 999
    assert [r["n"] for r in rest] == list(range(998, -1, -1))


def test_iterate_inside_a_transaction_sees_its_writes(db: ModelDB) -> None:
    with db.transaction():
        db.set("items", {"id": "new", "name": "fresh"})
        assert [r["id"] for r in db.iterate("items", where={"name": "fresh"})] == ["new"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"where": {"nope": 1}}, "no property 'nope'"),
        ({"where": {"n": {"like": 1}}}, "unknown filter 'like'"),
        ({"where": {"n": {"gt": None}}}, "cannot compare with null"),
        ({"where": {"n": "three"}}, "expected an integer"),
        ({"where": {"n": {"in": 3}}}, "needs a list"),
        ({"where": {"meta": {}}}, "json properties cannot be filtered"),
        ({"where": {"tags": "t"}}, "relations cannot be filtered"),
        ({"where": {"n": {}}}, "empty filter"),
        ({"order_by": {"n": "up"}}, "'asc' or 'desc'"),
        ({"order_by": 3}, "order_by must be"),
        ({"limit": -1}, "limit must be"),
        ({"offset": -2}, "offset must be"),
        ({"select": ["ghost"]}, "unknown property 'ghost'"),
    ],
)
def test_bad_queries_raise_validation_error(db: ModelDB, options: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        db.query("items", **options)

"""ModelDB reads and writes on a real SQLite file: CRUD, errors that write nothing, raw SQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from atsync._errors import ClosedError, NotFoundError, UnknownModelError, ValidationError
from atsync.db import ModelDB

MODELS: dict[str, Any] = {
    "notes": {
        "id": "primary",
        "title": "string",
        "body": "string?",
        "n": "integer",
        "score": "float?",
        "ok": "boolean",
        "meta": "json?",
        "raw": "bytes?",
        "author": "@users?",
        "tags": "@tags[]",
        "$indexes": ["title", "author/n"],
    },
    "users": {"id": "primary", "name": "string"},
    "tags": {"id": "primary"},
}


@pytest.fixture
def db(tmp_path: Path) -> ModelDB:
    database = ModelDB.open(tmp_path / "app.db", MODELS)
    yield database
    database.close()


def note(key: str = "n1", **fields: Any) -> dict[str, Any]:
    return {"id": key, "title": "hello", "n": 1, "ok": True, **fields}


def test_set_then_get_returns_every_property(db: ModelDB) -> None:
    db.set("notes", note(meta={"a": [1, "x"]}, raw=b"\x00\xff", author="u1", tags=["t2", "t1"]))
    assert db.get("notes", "n1") == {
        "id": "n1",
        "title": "hello",
        "body": None,
        "n": 1,
        "score": None,
        "ok": True,
        "meta": {"a": [1, "x"]},
        "raw": b"\x00\xff",
        "author": "u1",
        "tags": ["t2", "t1"],
    }
    assert db.get("notes", "missing") is None


def test_set_replaces_the_whole_record(db: ModelDB) -> None:
    db.set("notes", note(body="old", tags=["a"]))
    db.set("notes", note(title="new"))
    record = db.get("notes", "n1")
    assert record is not None
    assert (record["title"], record["body"], record["tags"]) == ("new", None, [])


def test_update_is_shallow_and_merge_is_deep(db: ModelDB) -> None:
    db.set("notes", note(meta={"a": {"x": 1, "y": 2}, "b": 1}))
    db.update("notes", {"id": "n1", "meta": {"a": {"x": 9}}})
    assert db.get("notes", "n1")["meta"] == {"a": {"x": 9}}  # type: ignore[index]
    db.merge("notes", {"id": "n1", "meta": {"a": {"y": 3}, "c": None}, "n": 5})
    record = db.get("notes", "n1")
    assert record is not None
    assert record["meta"] == {"a": {"x": 9, "y": 3}, "c": None}
    assert (record["n"], record["title"]) == (5, "hello")


def test_update_and_merge_of_a_missing_record_raise_not_found(db: ModelDB) -> None:
    with pytest.raises(NotFoundError, match="notes/ghost does not exist"):
        db.update("notes", {"id": "ghost", "title": "x"})
    with pytest.raises(NotFoundError):
        db.merge("notes", {"id": "ghost", "meta": {}})
    assert db.count("notes") == 0


def test_delete_removes_record_and_relation_rows_and_is_idempotent(
    db: ModelDB, tmp_path: Path
) -> None:
    db.set("notes", note(tags=["a", "b"]))
    db.delete("notes", "n1")
    db.delete("notes", "n1")
    assert db.get("notes", "n1") is None
    raw = sqlite3.connect(tmp_path / "app.db")
    assert raw.execute("select count(*) from notes__tags").fetchone() == (0,)


def test_get_many_keeps_order_and_reports_missing(db: ModelDB) -> None:
    for key in ("a", "b", "c"):
        db.set("notes", note(key, n=ord(key)))
    records = db.get_many("notes", ["c", "x", "a", "c"])
    assert [r and r["id"] for r in records] == ["c", None, "a", "c"]
    many = [f"k{i}" for i in range(1200)]
    with db.transaction():
        for key in many:
            db.set("notes", note(key))
    assert [r["id"] for r in db.get_many("notes", many)] == many  # type: ignore[index]


def test_tables_are_plain_and_readable_with_raw_sql(db: ModelDB, tmp_path: Path) -> None:
    db.set("notes", note(title="from sql", meta={"k": "v"}, author="u1", tags=["t1", "t2"]))
    raw = sqlite3.connect(tmp_path / "app.db")
    assert raw.execute("select title, n, ok from notes").fetchall() == [("from sql", 1, 1)]
    assert raw.execute("select json_extract(meta, '$.k') from notes").fetchone() == ("v",)
    rows = raw.execute("select _target from notes__tags where _source = ? order by _index", ("n1",))
    assert rows.fetchall() == [("t1",), ("t2",)]
    indexes = {r[0] for r in raw.execute("select name from sqlite_master where type = 'index'")}
    assert {"notes__by__title", "notes__by__author__n"} <= indexes
    assert raw.execute("pragma journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize(
    ("model", "value", "message"),
    [
        ("nope", {"id": "x"}, "unknown model 'nope'"),
        ("notes", {"title": "x", "n": 1, "ok": True}, "the primary key is missing"),
        ("notes", note(""), "must not be empty"),
        ("notes", note(7), "primary key must be a string"),
        ("notes", note(n="1"), "expected an integer"),
        ("notes", note(n=True), "expected an integer"),
        ("notes", note(n=2**63), "does not fit in 64 bits"),
        ("notes", note(ok=1), "expected a bool"),
        ("notes", note(score="high"), "expected a number"),
        ("notes", note(score=float("nan")), "NaN"),
        ("notes", note(title=None), "null is not allowed"),
        ("notes", {"id": "n1", "n": 1, "ok": True}, "title: missing"),
        ("notes", note(extra=1), "unknown properties"),
        ("notes", note(meta={1: "x"}), "keys must be strings"),
        ("notes", note(meta={"x": object()}), "is not a JSON value"),
        ("notes", note(meta=float("inf")), "JSON cannot hold"),
        ("notes", note(raw="text"), "expected bytes"),
        ("notes", note(tags="t1"), "expected a list"),
        ("notes", note(tags=[""]), "is not a tags key"),
        ("notes", note(title="\ud800"), "not valid Unicode"),
        ("notes", note(tags=["\udc00"]), "not valid Unicode"),
        ("notes", ["not", "a", "mapping"], "expected a mapping"),
    ],
)
def test_bad_input_raises_and_writes_nothing(
    db: ModelDB, model: str, value: Any, message: str
) -> None:
    db.set("notes", note("keep", title="kept", tags=["k"]))
    error = UnknownModelError if model == "nope" else ValidationError
    with pytest.raises(error, match=message):
        db.set(model, value)
    assert db.count("notes") == 1
    assert db.get("notes", "keep")["tags"] == ["k"]  # type: ignore[index]


def test_unknown_model_error_lists_the_models(db: ModelDB) -> None:
    with pytest.raises(UnknownModelError) as caught:
        db.get("nope", "x")
    assert str(caught.value) == "unknown model 'nope' (models: notes, users, tags)"


def test_closed_database_raises_closed_error(tmp_path: Path) -> None:
    database = ModelDB.open(tmp_path / "x.db", MODELS)
    database.close()
    database.close()
    with pytest.raises(ClosedError):
        database.get("notes", "n1")
    with pytest.raises(ClosedError):
        database.set("notes", note())


def test_data_survives_reopening(tmp_path: Path) -> None:
    with ModelDB.open(tmp_path / "x.db", MODELS) as first:
        first.set("notes", note(body="persisted"))
    with ModelDB.open(tmp_path / "x.db", MODELS) as second:
        assert second.get("notes", "n1")["body"] == "persisted"  # type: ignore[index]


def test_in_memory_database_works_for_every_operation() -> None:
    with ModelDB.open(":memory:", MODELS) as mem:
        mem.set("notes", note())
        assert [r["id"] for r in mem.iterate("notes")] == ["n1"]
        assert mem.count("notes") == 1


@pytest.mark.parametrize("model", ["users", "notes"])  # one statement / one set() per row
def test_set_many_is_set_for_each_all_or_nothing(tmp_path: Path, model: str) -> None:
    def rows(prefix: str) -> list[dict[str, Any]]:
        if model == "users":
            return [{"id": f"{prefix}{i}", "name": f"user {i}"} for i in range(5)]
        return [note(f"{prefix}{i}", n=i, meta={"i": i}, raw=b"\x01") for i in range(5)]

    with (
        ModelDB.open(tmp_path / "a.db", MODELS) as one,
        ModelDB.open(tmp_path / "b.db", MODELS) as many,
    ):
        seen: dict[str, list[tuple[str, str, Any]]] = {"one": [], "many": []}
        one.write_listeners.append(lambda m, k, row: seen["one"].append((m, k, row)))
        many.write_listeners.append(lambda m, k, row: seen["many"].append((m, k, row)))
        for row in rows("k"):
            one.set(model, row)
        assert many.set_many(model, rows("k")) == 5
        assert many.query(model) == one.query(model)
        assert seen["many"] == seen["one"] and len(seen["one"]) == 5
        bad = [*rows("x"), {"id": "bad", "name": 5, "title": 5}]
        with pytest.raises(ValidationError):
            many.set_many(model, bad)
        assert many.count(model) == 5  # the good rows before it were not written either

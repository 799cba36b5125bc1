"""The ModelDB schema language: what parses, and the errors for what does not."""

from __future__ import annotations

import pytest

from atsync._errors import SchemaError
from atsync.db import parse_schema

FULL = {
    "notes": {
        "id": "primary",
        "title": "string",
        "body": "string?",
        "n": "integer",
        "score": "float",
        "weight": "number?",
        "ok": "boolean",
        "meta": "json",
        "raw": "bytes?",
        "author": "@users",
        "editor": "@users?",
        "tags": "@tags[]",
        "$indexes": ["title", "author/n"],
    },
    "users": {"did": "primary", "name": "string"},
    "tags": {"id": "primary"},
}


def test_every_kind_parses_and_round_trips_to_the_same_spec() -> None:
    schema = parse_schema(FULL)
    notes = schema.models["notes"]
    assert notes.primary_key == "id"
    kinds = {p.name: (p.kind, p.nullable, p.target) for p in notes.properties}
    assert kinds["body"] == ("string", True, None)
    assert kinds["weight"] == ("number", True, None)
    assert kinds["author"] == ("reference", False, "users")
    assert kinds["editor"] == ("reference", True, "users")
    assert kinds["tags"] == ("relation", False, "tags")
    assert notes.indexes == (("title",), ("author", "n"))
    assert [p.name for p in notes.relations] == ["tags"]
    assert parse_schema(schema.to_spec()).to_spec() == schema.to_spec()
    assert users_spec_is_kept(schema)


def users_spec_is_kept(schema: object) -> bool:
    return parse_schema(FULL).models["users"].to_spec() == {"did": "primary", "name": "string"}


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"notes": {"title": "string"}}, "exactly one 'primary'"),
        ({"notes": {"a": "primary", "b": "primary"}}, "exactly one 'primary'"),
        ({"notes": {"id": "primary?"}}, "cannot be nullable"),
        ({"notes": {"id": "primary", "x": "text"}}, "unknown type 'text'"),
        ({"notes": {"id": "primary", "x": 3}}, "must be a string"),
        ({"notes": {"id": "primary", "u": "@users"}}, "missing model 'users'"),
        ({"notes": {"id": "primary", "t": "@tags[]"}}, "missing model 'tags'"),
        ({"notes": {"id": "primary", "1x": "string"}}, "property names must match"),
        ({"notes": {"id": "primary", "a-b": "string"}}, "property names must match"),
        ({"no tes": {"id": "primary"}}, "model name"),
        ({"_atsync_log": {"id": "primary"}}, "reserved"),
        ({"sqlite_master2": {"id": "primary"}}, "reserved"),
        ({"notes": {"id": "primary", "$unique": []}}, "unknown reserved key"),
        ({"notes": {"id": "primary", "$indexes": ["nope"]}}, "not a property"),
        ({"notes": {"id": "primary", "$indexes": "id"}}, "must be a list"),
        ({"notes": {"id": "primary", "a": "string", "$indexes": ["a/a"]}}, "repeats"),
        ({"notes": {"id": "primary", "Title": "string", "title": "string"}}, "ignoring case"),
        ({"notes": {"id": "primary"}, "Notes": {"id": "primary"}}, "ignoring case"),
        ({"notes": "id"}, "must be a mapping"),
        (
            {
                "notes": {"id": "primary", "t": "@tags[]", "$indexes": ["t"]},
                "tags": {"id": "primary"},
            },
            "relation 't' cannot be indexed",
        ),
        ({"notes": {"id": "primary", "t": "@tags?[]"}, "tags": {"id": "primary"}}, "nullable"),
    ],
)
def test_bad_schemas_raise_schema_error_naming_the_fault(models: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message.replace("(", r"\(").replace("$", r"\$")):
        parse_schema(models)

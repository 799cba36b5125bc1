"""Schema versions and upgrade steps: add model, add property, add index."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from atsync._errors import SchemaError
from atsync.db import ModelDB, UpgradeAPI

V1 = {"notes": {"id": "primary", "title": "string"}}
V2 = {
    "notes": {
        "id": "primary",
        "title": "string",
        "pinned": "boolean",
        "body": "string?",
        "tags": "@tags[]",
        "$indexes": ["title"],
    },
    "tags": {"id": "primary", "label": "string"},
}


def upgrade_1_to_2(api: UpgradeAPI, old: int, new: int) -> None:
    assert (old, new) == (1, 2)
    api.add_model("tags", {"id": "primary", "label": "string"})
    api.add_property("notes", "pinned", "boolean", default=False)
    api.add_property("notes", "body", "string?")
    api.add_property("notes", "tags", "@tags[]")
    api.add_index("notes", "title")


def test_upgrade_keeps_data_and_fills_defaults(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with ModelDB.open(path, V1) as db:
        db.set("notes", {"id": "n1", "title": "old"})
    with ModelDB.open(path, V2, version=2, upgrade=upgrade_1_to_2) as db:
        assert db.get("notes", "n1") == {
            "id": "n1",
            "title": "old",
            "pinned": False,
            "body": None,
            "tags": [],
        }
        db.set("tags", {"id": "t", "label": "T"})
        db.update("notes", {"id": "n1", "tags": ["t"]})
    with ModelDB.open(path, V2, version=2) as db:  # no upgrade needed any more
        assert db.get("notes", "n1")["tags"] == ["t"]  # type: ignore[index]
    raw = sqlite3.connect(path)
    names = {r[0] for r in raw.execute("select name from sqlite_master where type='index'")}
    assert "notes__by__title" in names


def test_failed_upgrade_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with ModelDB.open(path, V1) as db:
        db.set("notes", {"id": "n1", "title": "old"})

    def half_upgrade(api: UpgradeAPI, old: int, new: int) -> None:
        api.add_model("tags", {"id": "primary", "label": "string"})
        api.add_property("notes", "pinned", "boolean", default=False)
        # forgets body, tags and the index

    with pytest.raises(SchemaError, match="still differ from the declared ones"):
        ModelDB.open(path, V2, version=2, upgrade=half_upgrade)
    with ModelDB.open(path, V1) as db:  # still version 1, untouched
        assert db.get("notes", "n1") == {"id": "n1", "title": "old"}


@pytest.mark.parametrize(
    ("models", "version", "upgrade", "message"),
    [
        (V2, 1, None, "differ from those stored at schema version 1"),
        (V2, 2, None, "no upgrade= step was given"),
        (V1, 0, None, "version must be a positive integer"),
    ],
)
def test_version_mismatches_are_refused(
    tmp_path: Path, models: dict, version: int, upgrade: object, message: str
) -> None:
    path = tmp_path / "m.db"
    ModelDB.open(path, V1).close()
    with pytest.raises(Exception, match=message):
        ModelDB.open(path, models, version=version, upgrade=upgrade)  # type: ignore[arg-type]


def test_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    ModelDB.open(path, V2, version=2, upgrade=upgrade_1_to_2).close()
    with pytest.raises(SchemaError, match="newer than this app's version 1"):
        ModelDB.open(path, V1)


def test_upgrade_api_rejects_bad_steps(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    ModelDB.open(path, V1).close()
    for step, message in [
        (lambda api: api.add_property("notes", "n", "integer"), "need a default"),
        (lambda api: api.add_property("notes", "title", "string?"), "already exists"),
        (lambda api: api.add_model("notes", {"id": "primary"}), "already exists"),
        (lambda api: api.add_property("ghost", "x", "string?"), "no model 'ghost'"),
        (lambda api: api.add_index("notes", "nope"), "not a property"),
    ]:
        with pytest.raises(SchemaError, match=message):
            ModelDB.open(path, V1, version=2, upgrade=lambda api, o, n, s=step: s(api))

"""The followed records' table (``_atsync_followed``) is found by the right index.

A followed row's key is its record's AT URI, which names the table's primary key; only the
rows of shared bindings (keyed by record key) are in the ``(model, key)`` index. Sync tables
of version 7 indexed every row: they upgrade in place, and every lookup still answers.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from atsync.db import ModelDB
from atsync.sync import Origin
from atsync.sync._follows import Follows
from atsync.sync._migrate import TABLES_VERSION
from atsync.sync._outbox import Outbox

DAN, FAY = "did:plc:dan", "did:plc:fay"
URI = f"at://{DAN}/app.note/n1"
NOTE = "INSERT INTO _atsync_followed VALUES (?, ?, ?, ?, ?, ?, ?)"
ROWS = [
    (DAN, "app.note", "n1", "notes", URI, "bafynote", '{"$type":"app.note"}'),
    (FAY, "app.doc", "k1", "docs", "k1", "bafyfay", '{"$type":"app.doc"}'),
    (DAN, "app.doc", "k1", "docs", "k1", "bafydan", '{"$type":"app.doc"}'),
]
MODELS = {"notes": {"id": "primary"}, "docs": {"id": "primary"}}


def indexes(db: ModelDB) -> set[str]:
    return {
        name
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = '_atsync_followed'"
        )
    }


def plan(conn: sqlite3.Connection, sql: str, params: tuple[str, ...]) -> str:
    return " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))


def test_a_version_7_database_indexes_shared_rows_only_and_answers_as_before(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v7.db"
    with ModelDB.open(path, MODELS) as db:
        Outbox(db).create_tables()
        with db.transaction():
            db.connection.executemany(NOTE, ROWS)
    with sqlite3.connect(path) as conn:  # as version 7 left it: every row in the index
        conn.execute("DROP INDEX _atsync_followed__by__model_shared_key")
        conn.execute(
            "CREATE INDEX _atsync_followed__by__model_key ON _atsync_followed (model, key)"
        )
        conn.execute("UPDATE _atsync_sync_state SET value = '7' WHERE key = 'tables_version'")
    with ModelDB.open(path, MODELS) as db:
        Outbox(db).create_tables()
        assert indexes(db) == {"_atsync_followed__by__model_shared_key"}
        (version,) = db.execute(
            "SELECT value FROM _atsync_sync_state WHERE key = 'tables_version'"
        ).fetchone()
        assert version == str(TABLES_VERSION)
        follows = Follows(db)
        assert follows.followed_row("notes", URI) == DAN
        assert follows.followed_row("docs", URI) is None  # another model's key
        assert follows.followed_row("notes", f"at://{DAN}/app.note/gone") is None
        assert follows.origin("notes", URI, None) == Origin(DAN, URI, "bafynote")
        # A shared row: the first repository's record, by DID.
        assert follows.origin("docs", "k1", None) == Origin(
            DAN, f"at://{DAN}/app.doc/k1", "bafydan"
        )
        (count,) = db.execute(
            "SELECT count(*) FROM _atsync_followed "
            "INDEXED BY _atsync_followed__by__model_shared_key "
            "WHERE model = 'docs' AND substr(key, 1, 5) <> 'at://'"
        ).fetchone()
        assert count == 2  # the shared rows, and only they


def test_lookups_by_uri_use_the_primary_key_and_shared_keys_the_index() -> None:
    from atsync.sync._migrate import create_and_upgrade
    from atsync.sync._outbox_views import FOLLOWED_SHARED_KEY

    conn = sqlite3.connect(":memory:", isolation_level=None)
    create_and_upgrade(conn)
    conn.executemany(NOTE, ROWS)
    by_uri = plan(
        conn,
        "SELECT did FROM _atsync_followed WHERE did = ? AND collection = ? AND rkey = ? "
        "AND model = ? AND key = ?",
        (DAN, "app.note", "n1", "notes", URI),
    )
    assert "USING PRIMARY KEY" in by_uri, by_uri
    shared = plan(
        conn,
        f"SELECT did FROM _atsync_followed WHERE model = ? AND key = ? AND {FOLLOWED_SHARED_KEY}",
        ("docs", "k1"),
    )
    assert "_atsync_followed__by__model_shared_key" in shared, shared

"""The sync tables carry a version and upgrade in place, queue intact.

    1  the push half: outbox, records, dead letters, sync state, conflicts, sent CIDs
    2  the pull half: each synced record's content (the base of a three-way merge), the three
       versions of every conflict, and ``_atsync_rejected`` (remote input not applied, and why)
    3  following: ``_atsync_follows`` (the repositories followed) and ``_atsync_followed``
       (what was last pulled from each: the ``_atsync_records`` of other people's records)
    4  blobs: ``_atsync_blobs`` (the blobs each account's PDS holds, as far as this device
       knows: uploaded, so not uploaded again)
    5  ``_atsync_tree``: the MST nodes of each repository as last pulled (one blob per
       repository), so that the next pull reads only what changed since (``getRepo?since=``);
       ``_atsync_unpulled``: the records this device wrote since its last pull (a delete of
       one of them by another device shows in neither tree)
    6  ``_atsync_unpulled`` holds each record once (its latest write), found by an index on
       (collection, rkey): it grew by one row per write, so an app that pushes often and
       pulls rarely filled it up and lost its next catch-up to a whole read
    7  ``_atsync_tree_delta`` and ``_atsync_tree.moved_root``: a live ``#commit`` moves the
       held tree by the few nodes it changes, so the next gap reads only what changed since
       (the tree was dropped by every live event, and the next gap read the whole repository)

``upgrade_sync_tables`` runs inside the caller's transaction after ``create_sync_tables``;
it only adds (columns, tables), so a database written by an older release keeps every
queued write and can still be read by it.
"""

from __future__ import annotations

import sqlite3

from ._blobsync import create_blob_table
from ._outbox_views import (
    CONFLICTS,
    DEAD,
    FOLLOWED,
    FOLLOWED_SHARED_KEY,
    FOLLOWS,
    OUTBOX,
    RECORDS,
    REJECTED,
    SENT,
    STATE,
    TREE,
    TREE_DELTA,
    UNPULLED,
)

__all__ = [
    "FOLLOWED",
    "FOLLOWS",
    "REJECTED",
    "TABLES_VERSION",
    "create_and_upgrade",
    "upgrade_sync_tables",
]

TABLES_VERSION = 8

_ADDED_COLUMNS = {
    RECORDS: ("record TEXT",),
    CONFLICTS: ("base TEXT", "local TEXT", "remote TEXT", "merged TEXT", "fields TEXT"),
}


def upgrade_sync_tables(conn: sqlite3.Connection) -> None:
    row = conn.execute(f"SELECT value FROM {STATE} WHERE key = 'tables_version'").fetchone()
    try:
        version = int(row[0]) if row is not None else 1
    except (TypeError, ValueError):
        version = 1  # damaged: re-running the (idempotent) upgrade is safe
    if version >= TABLES_VERSION:
        return
    for table, columns in _ADDED_COLUMNS.items():
        present = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column.split()[0] not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {REJECTED} (
            id INTEGER PRIMARY KEY,
            did TEXT NOT NULL, collection TEXT, rkey TEXT, cid TEXT, rev TEXT,
            reason TEXT NOT NULL, detail TEXT, record TEXT, seen_at REAL NOT NULL
        )"""
    )
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {FOLLOWS} (
            did TEXT PRIMARY KEY NOT NULL, handle TEXT, added_at REAL NOT NULL
        )"""
    )
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {FOLLOWED} (
            did TEXT NOT NULL, collection TEXT NOT NULL, rkey TEXT NOT NULL,
            model TEXT NOT NULL, key TEXT NOT NULL, cid TEXT, record TEXT,
            PRIMARY KEY (did, collection, rkey)
        ) WITHOUT ROWID"""
    )
    # Version 8: the index holds shared rows only (see FOLLOWED_SHARED_KEY); version 3-7's
    # held every row. (An older release opening the database builds its own again.)
    conn.execute(f"DROP INDEX IF EXISTS {FOLLOWED}__by__model_key")
    conn.execute(
        f"CREATE INDEX IF NOT EXISTS {FOLLOWED}__by__model_shared_key ON {FOLLOWED} (model, key) "
        f"WHERE {FOLLOWED_SHARED_KEY}"
    )
    create_blob_table(conn)
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {TREE} (
            repo TEXT PRIMARY KEY NOT NULL, root TEXT NOT NULL, nodes BLOB NOT NULL,
            moved_root TEXT
        )"""
    )
    if "moved_root" not in {r[1] for r in conn.execute(f"PRAGMA table_info({TREE})")}:
        conn.execute(f"ALTER TABLE {TREE} ADD COLUMN moved_root TEXT")
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {TREE_DELTA} (
            repo TEXT NOT NULL, cid BLOB NOT NULL, node BLOB,
            PRIMARY KEY (repo, cid)
        ) WITHOUT ROWID"""
    )
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {UNPULLED} (
            id INTEGER PRIMARY KEY, collection TEXT NOT NULL, rkey TEXT NOT NULL
        )"""
    )
    # Not UNIQUE: an older release, which inserts a row per write, can still write here.
    conn.execute(
        f"DELETE FROM {UNPULLED} WHERE id NOT IN "
        f"(SELECT max(id) FROM {UNPULLED} GROUP BY collection, rkey)"
    )
    conn.execute(
        f"CREATE INDEX IF NOT EXISTS {UNPULLED}__by__record ON {UNPULLED} (collection, rkey)"
    )
    conn.execute(
        f"INSERT OR REPLACE INTO {STATE} (key, value) VALUES ('tables_version', ?)",
        (str(TABLES_VERSION),),
    )


def create_and_upgrade(conn: sqlite3.Connection) -> None:
    """The sync tables of version 1 if missing, then every upgrade since."""
    # Statement by statement: executescript() would commit the caller's transaction.
    for statement in _DDL.split(";"):
        if statement.strip():
            conn.execute(statement)
    upgrade_sync_tables(conn)


# The outbox's CHECK spells out its values: ``op IN (...)`` made SQLite build a temporary
# table on every insert (databases created before keep their table as it was). Every
# queued write looks for a dead letter of its record: the index keeps that a lookup, not a
# scan of every dead letter.
_DDL = f"""
        CREATE TABLE IF NOT EXISTS {OUTBOX} (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            collection TEXT NOT NULL, rkey TEXT NOT NULL,
            op TEXT NOT NULL CHECK (op = 'create' OR op = 'update' OR op = 'delete'),
            record TEXT, cid TEXT,
            model TEXT NOT NULL, key TEXT NOT NULL,
            version INTEGER NOT NULL DEFAULT 1,
            attempted INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            sent_op TEXT, sent_cid TEXT,
            first_action TEXT, last_action TEXT,
            last_error TEXT,
            UNIQUE (collection, rkey)
        );
        CREATE TABLE IF NOT EXISTS {RECORDS} (
            collection TEXT NOT NULL, rkey TEXT NOT NULL,
            model TEXT NOT NULL, key TEXT NOT NULL,
            cid TEXT,
            PRIMARY KEY (collection, rkey)
        ) WITHOUT ROWID;
        CREATE UNIQUE INDEX IF NOT EXISTS {RECORDS}__by__model_key ON {RECORDS} (model, key);
        CREATE TABLE IF NOT EXISTS {DEAD} (
            seq INTEGER PRIMARY KEY,
            collection TEXT NOT NULL, rkey TEXT NOT NULL, op TEXT NOT NULL,
            record TEXT, cid TEXT, model TEXT NOT NULL, key TEXT NOT NULL,
            first_action TEXT, last_action TEXT,
            error TEXT, message TEXT, failed_at REAL NOT NULL
        );
        CREATE INDEX IF NOT EXISTS {DEAD}__by__record ON {DEAD} (collection, rkey);
        CREATE TABLE IF NOT EXISTS {STATE} (key TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE IF NOT EXISTS {SENT} (
            collection TEXT NOT NULL, rkey TEXT NOT NULL, cid TEXT NOT NULL,
            PRIMARY KEY (collection, rkey, cid)
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS {CONFLICTS} (
            id INTEGER PRIMARY KEY,
            collection TEXT NOT NULL, rkey TEXT NOT NULL, model TEXT, key TEXT,
            base_cid TEXT, local_cid TEXT, remote_cid TEXT,
            resolution TEXT NOT NULL, detected_at REAL NOT NULL
        );
"""

"""The sync tables carry a version and upgrade in place, queue intact.

    1  the push half: outbox, records, dead letters, sync state, conflicts, sent CIDs
    2  the pull half: each synced record's content (the base of a three-way merge), the three
       versions of every conflict, and ``_atsync_rejected`` (remote input not applied, and why)
    3  following: ``_atsync_follows`` (the repositories followed) and ``_atsync_followed``
       (what was last pulled from each: the ``_atsync_records`` of other people's records)
    4  blobs: ``_atsync_blobs`` (the blobs each account's PDS holds, as far as this device
       knows: uploaded, so not uploaded again)
    5  ``_atsync_tree``: the MST nodes of each repository as last pulled (by the CID's
       bytes), so that the next pull reads only what changed since (``getRepo?since=``)

``upgrade_sync_tables`` runs inside the caller's transaction after ``create_sync_tables``;
it only adds (columns, tables), so a database written by an older release keeps every
queued write and can still be read by it.
"""

from __future__ import annotations

import sqlite3

from ._blobsync import create_blob_table
from ._outbox import CONFLICTS, RECORDS, REJECTED, STATE
from ._outbox_views import FOLLOWED, FOLLOWS, TREE

__all__ = ["FOLLOWED", "FOLLOWS", "REJECTED", "TABLES_VERSION", "upgrade_sync_tables"]

TABLES_VERSION = 5

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
    conn.execute(f"CREATE INDEX IF NOT EXISTS {FOLLOWED}__by__model_key ON {FOLLOWED} (model, key)")
    create_blob_table(conn)
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {TREE} (
            repo TEXT NOT NULL, cid BLOB NOT NULL, node BLOB NOT NULL,
            PRIMARY KEY (repo, cid)
        ) WITHOUT ROWID"""
    )
    conn.execute(
        f"INSERT OR REPLACE INTO {STATE} (key, value) VALUES ('tables_version', ?)",
        (str(TABLES_VERSION),),
    )

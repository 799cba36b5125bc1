"""The MST nodes of each pulled repository as last read, so that the next pull reads only
what changed since (``getRepo?since=``, compared with ``diff_trees``).

    _atsync_tree   repo ('' for the user's own, else the followed DID), the node's CID (its
                   bytes: no text encoding for thousands of nodes), the node's bytes

The nodes are the tree whose root the state key ``tree_root`` names; they are used only
while that root is still the pulled ``pulled_data`` (a live ``#commit`` moves the pulled
state without them: the next gap then reads the whole repository, which keeps them again).
Their root is written in the transaction that writes them: a crash between leaves a root
that no longer matches, never a partial tree taken for whole.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping

from ..atproto import CID, MstDiff
from ..db import ModelDB
from ._outbox_views import STATE, TREE
from ._repo import Repo

__all__ = ["TreeNodes"]


class TreeNodes(Mapping[CID, bytes]):
    """One repository's held nodes (a mapping by CID, read on access)."""

    def __init__(self, db: ModelDB, repo: Repo) -> None:
        self._db = db
        self._repo = repo.did or ""
        self._root_key = repo.state("tree_root")

    def root(self) -> str | None:
        """The MST root the held nodes make up (None: none held)."""
        row = self._db.execute(
            f"SELECT value FROM {STATE} WHERE key = ?", (self._root_key,)
        ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def __getitem__(self, cid: CID) -> bytes:
        row = self._db.execute(
            f"SELECT node FROM {TREE} WHERE repo = ? AND cid = ?", (self._repo, bytes(cid))
        ).fetchone()
        if row is None:
            raise KeyError(cid)
        return bytes(row[0])

    def __contains__(self, cid: object) -> bool:
        if not isinstance(cid, CID):
            return False
        return (
            self._db.execute(
                f"SELECT 1 FROM {TREE} WHERE repo = ? AND cid = ?", (self._repo, bytes(cid))
            ).fetchone()
            is not None
        )

    def __iter__(self) -> Iterator[CID]:
        for (cid,) in self._db.execute(f"SELECT cid FROM {TREE} WHERE repo = ?", (self._repo,)):
            yield CID(bytes(cid))

    def __len__(self) -> int:
        (count,) = self._db.execute(
            f"SELECT count(*) FROM {TREE} WHERE repo = ?", (self._repo,)
        ).fetchone()
        return int(count)

    def replace(self, root: str, nodes: Iterable[tuple[bytes, bytes]]) -> None:
        """Hold ``nodes`` (every node of the tree at ``root``) instead of what was held.
        Runs in the caller's transaction."""
        conn = self._db.connection
        conn.execute(f"DELETE FROM {TREE} WHERE repo = ?", (self._repo,))
        conn.executemany(
            f"INSERT OR REPLACE INTO {TREE} (repo, cid, node) VALUES (?, ?, ?)",
            ((self._repo, cid, node) for cid, node in nodes),
        )
        self._set_root(conn, root)

    def update(self, root: str, diff: MstDiff) -> None:
        """Move the held tree to ``root`` by ``diff``. Runs in the caller's transaction."""
        conn = self._db.connection
        conn.executemany(
            f"DELETE FROM {TREE} WHERE repo = ? AND cid = ?",
            ((self._repo, bytes(cid)) for cid in diff.gone_nodes),
        )
        conn.executemany(
            f"INSERT OR REPLACE INTO {TREE} (repo, cid, node) VALUES (?, ?, ?)",
            ((self._repo, bytes(cid), node) for cid, node in diff.new_nodes.items()),
        )
        self._set_root(conn, root)

    def _set_root(self, conn: sqlite3.Connection, root: str) -> None:
        conn.execute(
            f"INSERT OR REPLACE INTO {STATE} (key, value) VALUES (?, ?)", (self._root_key, root)
        )

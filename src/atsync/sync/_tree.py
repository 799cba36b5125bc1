"""The MST nodes of each pulled repository as last read, so that the next pull reads only
what changed since (``getRepo?since=``, compared with ``diff_trees``).

    _atsync_tree   repo ('' for the user's own, else the followed DID), the root of the tree
                   held, and its nodes in one blob: per node, the CID's length (one byte),
                   the CID, the node's length (four bytes, big-endian), the node

One row per repository: a whole read writes one blob, not a row per node (a thousand
followed repositories of a few hundred nodes each cost a thousand inserts, not hundreds of
thousands). The nodes are used only while their root is still the pulled ``pulled_data`` (a
live ``#commit`` moves the pulled state without them: the next gap then reads the whole
repository, which keeps them again). Root and nodes are one row, written in the
transaction that records the pull: never a partial tree taken for whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from ..atproto import CID, MstDiff
from ..db import ModelDB
from ._outbox_views import TREE
from ._repo import Repo

__all__ = ["TreeNodes", "pack_nodes", "unpack_nodes"]


def pack_nodes(nodes: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``(CID bytes, node bytes)`` pairs as one blob."""
    parts: list[bytes] = []
    for cid, node in nodes:
        parts += (bytes((len(cid),)), cid, len(node).to_bytes(4, "big"), node)
    return b"".join(parts)


def unpack_nodes(blob: bytes) -> dict[bytes, bytes]:
    nodes: dict[bytes, bytes] = {}
    pos, end = 0, len(blob)
    while pos < end:
        size = blob[pos]
        cid = blob[pos + 1 : pos + 1 + size]
        pos += 1 + size
        length = int.from_bytes(blob[pos : pos + 4], "big")
        nodes[cid] = blob[pos + 4 : pos + 4 + length]
        pos += 4 + length
    return nodes


class TreeNodes(Mapping[CID, bytes]):
    """One repository's held nodes (a mapping by CID, read from the database once)."""

    def __init__(self, db: ModelDB, repo: Repo) -> None:
        self._db = db
        self._repo = repo.did or ""
        self._nodes: dict[bytes, bytes] | None = None  # loaded on first use

    def root(self) -> str | None:
        """The MST root the held nodes make up (None: none held)."""
        self._nodes = None  # a new pull: read afresh
        row = self._db.execute(f"SELECT root FROM {TREE} WHERE repo = ?", (self._repo,)).fetchone()
        return None if row is None else str(row[0])

    def _loaded(self) -> dict[bytes, bytes]:
        if self._nodes is None:
            row = self._db.execute(
                f"SELECT nodes FROM {TREE} WHERE repo = ?", (self._repo,)
            ).fetchone()
            self._nodes = unpack_nodes(bytes(row[0])) if row is not None else {}
        return self._nodes

    def __getitem__(self, cid: CID) -> bytes:
        return self._loaded()[bytes(cid)]

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, CID) and bytes(cid) in self._loaded()

    def __iter__(self) -> Iterator[CID]:
        return (CID(cid) for cid in list(self._loaded()))

    def __len__(self) -> int:
        return len(self._loaded())

    def replace(self, root: str | None, nodes: Iterable[tuple[bytes, bytes]]) -> None:
        """Hold ``nodes`` (every node of the tree at ``root``; None: hold nothing) instead of
        what was held. Runs in the caller's transaction."""
        conn = self._db.connection
        self._nodes = None
        if root is None:
            conn.execute(f"DELETE FROM {TREE} WHERE repo = ?", (self._repo,))
            return
        conn.execute(
            f"INSERT OR REPLACE INTO {TREE} (repo, root, nodes) VALUES (?, ?, ?)",
            (self._repo, root, pack_nodes(nodes)),
        )

    def update(self, root: str, diff: MstDiff, limit: int) -> None:
        """Move the held tree to ``root`` by ``diff``; a tree grown past ``limit`` nodes is
        no longer held (as a whole read of it would not). Runs in the caller's
        transaction."""
        nodes = dict(self._loaded())
        for cid in diff.gone_nodes:
            nodes.pop(bytes(cid), None)
        nodes.update((bytes(cid), node) for cid, node in diff.new_nodes.items())
        self.replace(root if len(nodes) <= limit else None, nodes.items())

"""The MST nodes of each pulled repository as last read, so that the next pull reads only
what changed since (``getRepo?since=``, compared with ``diff_trees``).

    _atsync_tree        repo ('' for the user's own, else the followed DID), the root of the
                        tree the blob holds, and its nodes in one blob: per node, the CID's
                        length (one byte), the CID, the node's length (four bytes,
                        big-endian), the node; ``moved_root``: where the changes since (below)
                        take it (NULL: none)
    _atsync_tree_delta  the nodes a live ``#commit`` added to the blob's tree (``node``) or
                        took away from it (``node`` NULL), per repository

One row per repository: a whole read writes one blob, not a row per node (a thousand
followed repositories of a few hundred nodes each cost a thousand inserts, not hundreds of
thousands). A live ``#commit`` changes a few nodes: they go to the delta, so that an event
costs the same in a repository of twenty records or twenty thousand; past a quarter of the
blob the delta is folded into a new blob. The nodes are used only while their root is still
the pulled ``pulled_data``. Root, nodes and delta are written in the transaction that
records the pull or the event: never a partial tree taken for whole.

A release that does not know the delta reads ``root``, the blob's own root: it no longer is
the pulled ``pulled_data``, so that release reads the whole repository, as it did after a
live event (and what it writes leaves ``moved_root`` NULL, so the delta it left is ignored).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from ..atproto import CID, MstDiff
from ..db import ModelDB
from ._outbox_views import TREE, TREE_DELTA
from ._repo import Repo

__all__ = ["TreeNodes", "pack_nodes", "unpack_nodes"]

DELTA_MIN = 256  # rows of delta allowed before folding, whatever the tree's size
DELTA_SHARE = 0.25  # ... and beyond that, up to this share of the blob's nodes


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
    """One repository's held nodes (a mapping by CID, read from the database once, and
    kept while the held root stays the same)."""

    def __init__(self, db: ModelDB, repo: Repo) -> None:
        self._db = db
        self._repo = repo.did or ""
        self._nodes: dict[bytes, bytes] | None = None  # loaded on first use
        self._nodes_root: str | None = None  # the root ``_nodes`` make up
        self._blob_size = 0  # nodes in the blob (the delta is folded past a quarter of it)

    def root(self) -> str | None:
        """The MST root the held nodes make up (None: none held)."""
        row = self._db.execute(
            f"SELECT coalesce(moved_root, root) FROM {TREE} WHERE repo = ?", (self._repo,)
        ).fetchone()
        root = None if row is None else str(row[0])
        if root is None or root != self._nodes_root:
            self._nodes = self._nodes_root = None  # changed since they were read (or never)
        return root

    def _loaded(self) -> dict[bytes, bytes]:
        if self._nodes is None:
            row = self._db.execute(
                f"SELECT root, moved_root, nodes FROM {TREE} WHERE repo = ?", (self._repo,)
            ).fetchone()
            if row is None:
                return {}
            root, moved, blob = row
            nodes = unpack_nodes(bytes(blob))
            self._blob_size = len(nodes)
            if moved is not None:
                for cid, node in self._db.execute(
                    f"SELECT cid, node FROM {TREE_DELTA} WHERE repo = ?", (self._repo,)
                ):
                    if node is None:
                        nodes.pop(bytes(cid), None)
                    else:
                        nodes[bytes(cid)] = bytes(node)
            self._nodes, self._nodes_root = nodes, str(moved or root)
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
        self._nodes = self._nodes_root = None
        conn.execute(f"DELETE FROM {TREE_DELTA} WHERE repo = ?", (self._repo,))
        if root is None:
            conn.execute(f"DELETE FROM {TREE} WHERE repo = ?", (self._repo,))
            return
        conn.execute(
            f"INSERT OR REPLACE INTO {TREE} (repo, root, nodes, moved_root) VALUES (?, ?, ?, NULL)",
            (self._repo, root, pack_nodes(nodes)),
        )

    def update(self, root: str, diff: MstDiff, limit: int, *, keep: bool = False) -> None:
        """Move the held tree to ``root`` by ``diff`` (against the held root); a tree grown
        past ``limit`` nodes is no longer held (as a whole read of it would not). ``keep``:
        keep the nodes in memory for the next update (live events). Runs in the caller's
        transaction."""
        nodes = dict(self._loaded())
        gone = [bytes(cid) for cid in diff.gone_nodes]
        new = [(bytes(cid), node) for cid, node in diff.new_nodes.items()]
        for cid in gone:
            nodes.pop(cid, None)
        nodes.update(new)
        if len(nodes) > limit:
            self.replace(None, ())
            return
        conn = self._db.connection
        row = conn.execute(
            f"SELECT moved_root FROM {TREE} WHERE repo = ?", (self._repo,)
        ).fetchone()
        if row is None:  # dropped meanwhile: what is held is not a whole tree
            self.replace(None, ())
            return
        if row[0] is None:  # left by a release that wrote no delta
            conn.execute(f"DELETE FROM {TREE_DELTA} WHERE repo = ?", (self._repo,))
        (held,) = conn.execute(
            f"SELECT count(*) FROM {TREE_DELTA} WHERE repo = ?", (self._repo,)
        ).fetchone()
        if held + len(gone) + len(new) > max(DELTA_MIN, int(self._blob_size * DELTA_SHARE)):
            self.replace(root, nodes.items())  # folded into a new blob
            self._blob_size = len(nodes)
        else:
            repo = self._repo
            conn.executemany(
                f"INSERT OR REPLACE INTO {TREE_DELTA} (repo, cid, node) VALUES (?, ?, NULL)",
                [(repo, cid) for cid in gone],
            )
            conn.executemany(
                f"INSERT OR REPLACE INTO {TREE_DELTA} (repo, cid, node) VALUES (?, ?, ?)",
                [(repo, cid, node) for cid, node in new],
            )
            conn.execute(f"UPDATE {TREE} SET moved_root = ? WHERE repo = ?", (root, repo))
        if keep:
            self._nodes, self._nodes_root = nodes, root
        else:
            self._nodes = self._nodes_root = None

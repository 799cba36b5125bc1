"""Walk a repository's MST while its CAR downloads (``CarStream(walk=True)``).

A whole-repository CAR names its commit as its root; the commit names the MST's root node.
The reference PDS sends blocks newest first, so a node usually arrives before the nodes and
records below it. ``StreamWalk`` starts at the commit's tree as soon as the commit block is
in, and goes down each node as it arrives, with the same checks as ``iter_leaves`` (layers,
key ranges, ASCII keys) and the record paths' syntax — work that otherwise waits for the
download's end, done while the network is slow.

It proves nothing on its own: the commit is not verified here. ``RepoFile`` takes its result
only when the commit it verified names the same tree root, every node expected arrived and
was walked, and nothing was wrong; any doubt (a malformed node, a block the fast decoder
left alone, a key that is not a record path) and ``RepoFile`` walks the tree itself, which
says what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping

import libipld

from atsync._errors import InvalidSyntaxError, VerificationError

from ._mst import CompactNode, check_node
from ._verify import _split_path

__all__ = ["StreamWalk"]

# A subtree to visit: its node's CID bytes, the layer it must be at (None: the root), and
# the key range its keys must lie in.
_Item = tuple[bytes, int | None, bytes | None, bytes | None]


class StreamWalk:
    """The MST below the CAR's root commit, walked as its nodes arrive. ``leaves``:
    ``(key, collection, rkey, record CID bytes)`` in the order found (sort them for key
    order); ``nodes``: the CID bytes of every node walked; ``root``: the tree root the commit
    block named (unverified)."""

    def __init__(self, nodes: Mapping[bytes, CompactNode], layers: Mapping[bytes, int]) -> None:
        self._nodes = nodes  # the stream's decoded nodes and their key heights, as they grow
        self._layers = layers
        self.root: bytes | None = None
        self.leaves: list[tuple[str, str, str, bytes]] = []
        self.nodes: list[bytes] = []
        self.failed = False
        self._waiting: dict[bytes, list[_Item]] = {}

    @property
    def complete(self) -> bool:
        """Every node below the root arrived and was walked, and nothing was wrong."""
        return self.root is not None and not self._waiting and not self.failed

    def commit_arrived(self, data: bytes) -> None:
        """The root commit block's bytes: its ``data`` names the tree to walk."""
        try:
            commit = libipld.decode_dag_cbor(data)
        except (ValueError, RecursionError):
            commit = None
        root = commit.get("data") if type(commit) is dict else None
        if type(root) is not bytes or len(root) != 36:
            self.failed = True  # RepoFile's own check of the commit says why
            return
        self.root = root
        self._visit([(root, None, None, None)], arrived={})

    def block_arrived(self, raw: bytes, arrived: Mapping[bytes, object]) -> None:
        """A block came in (``arrived``: every block so far, by CID bytes): if a walked node
        points at it, go down from it."""
        expected = self._waiting.pop(raw, None)
        if expected is not None and not self.failed:
            self._visit(expected, arrived)

    def _visit(self, todo: list[_Item], arrived: Mapping[bytes, object]) -> None:
        nodes, leaves, waiting = self._nodes, self.leaves, self._waiting
        while todo and not self.failed:
            raw, layer, lo, hi = todo.pop()
            compact = nodes.get(raw)
            if compact is None:
                if raw in arrived:
                    self.failed = True  # arrived, but the fast decoder left it: not here
                else:
                    waiting.setdefault(raw, []).append((raw, layer, lo, hi))
                continue
            left, entries = compact
            keys = [e[0] for e in entries]
            subtrees = left is not None or any(e[2] is not None for e in entries)
            try:
                layer = check_node(
                    raw, keys, left is not None, subtrees, layer, lo, hi, layer is None,
                    self._layers.get(raw),
                )  # fmt: skip
                for key, value, _ in entries:
                    text = key.decode("ascii")
                    leaves.append((text, *_split_path(text), value))
            except (VerificationError, InvalidSyntaxError, UnicodeDecodeError):
                self.failed = True
                return
            self.nodes.append(raw)
            if left is not None:
                todo.append((left, layer - 1, lo, keys[0] if keys else hi))
            for i, (key, _, right) in enumerate(entries):
                if right is not None:
                    todo.append((right, layer - 1, key, keys[i + 1] if i + 1 < len(keys) else hi))

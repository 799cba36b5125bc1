"""What changed between two versions of a repository's MST, reading only what changed.

A subtree is named by its root node's CID: a subtree both versions reference is the same
subtree, holding the same records, so neither walk enters it. The new tree is walked over
the blocks written since the old version (``getRepo?since=``: the commit, the new nodes and
the new records), never entering a subtree the old version already had; the old tree is
walked over its own nodes (kept by the caller since it was read), never entering a subtree
the new version kept. So a delta costs what changed, not the repository's size.

The new nodes get every check ``iter_leaves`` makes on a whole tree (layers, key order,
ranges); kept subtrees were checked when they were read. A node the new tree needs and
neither source has raises ``MissingBlock``: the caller reads the whole repository instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .._errors import MissingBlock, VerificationError
from ._cbor import CID
from ._mst import Blocks, _Walker

__all__ = ["MissingBlock", "MstDiff", "diff_trees"]


@dataclass
class MstDiff:
    """``added``: every leaf under a node new in this version (key -> record CID) — changed
    records, and unchanged ones whose node changed (compare CIDs); ``removed``: every leaf
    under a node the new version dropped (the keys in it and not in ``added`` are gone);
    ``new_nodes``: the new version's nodes the old one lacked (CID -> bytes);
    ``gone_nodes``: the old version's nodes the new one no longer has."""

    added: dict[str, CID] = field(default_factory=dict)
    removed: dict[str, CID] = field(default_factory=dict)
    new_nodes: dict[CID, bytes] = field(default_factory=dict)
    gone_nodes: list[CID] = field(default_factory=list)


_Item = tuple[CID, int | None, bytes | None, bytes | None]


def diff_trees(new_root: CID, blocks: Blocks, old_root: CID | None, old_nodes: Blocks) -> MstDiff:
    """Compare the tree at ``new_root`` (its new nodes in ``blocks``, hash-checked by the
    caller) with the tree at ``old_root`` (every node of it in ``old_nodes``)."""
    diff = MstDiff()
    if old_root is not None and new_root == old_root:
        return diff
    kept: set[CID] = set()

    def enter_new(cid: CID) -> bool:
        if cid in old_nodes:
            kept.add(cid)
            return False
        return True

    def load_new(cid: CID) -> bytes:
        try:
            data = blocks[cid]
        except KeyError:
            raise MissingBlock(f"MST node {cid} is not in the delta") from None
        diff.new_nodes[cid] = data
        return data

    _walk(new_root, enter_new, load_new, diff.added)
    if old_root is not None:

        def load_old(cid: CID) -> bytes:
            try:
                data = old_nodes[cid]
            except KeyError:
                raise MissingBlock(f"MST node {cid} of the old tree is not held") from None
            diff.gone_nodes.append(cid)
            return data

        _walk(old_root, lambda cid: cid not in kept, load_old, diff.removed)
    return diff


def _walk(
    root: CID,
    enter: Callable[[CID], bool],
    load: Callable[[CID], bytes],
    leaves: dict[str, CID],
) -> None:
    """``iter_leaves`` over the subtrees ``enter`` lets in, collecting their leaves."""
    if not enter(root):
        return
    walker = _Walker(_Loader(load))
    stack: list[_Item] = [(root, None, None, None)]
    while stack:
        cid, layer, lo, hi = stack.pop()
        node, layer = walker.load(cid, layer, lo, hi, layer is None)
        entries = node.entries
        if node.left is not None and enter(node.left):
            stack.append((node.left, layer - 1, lo, entries[0].key if entries else hi))
        for i, e in enumerate(entries):
            try:
                leaves[e.key.decode("ascii")] = e.value
            except UnicodeDecodeError:
                raise VerificationError(f"malformed node {cid}: non-ASCII key {e.key!r}") from None
            if e.right is not None and enter(e.right):
                upper = entries[i + 1].key if i + 1 < len(entries) else hi
                stack.append((e.right, layer - 1, e.key, upper))


class _Loader(Mapping[CID, bytes]):
    """The walker's block source: each node through ``load`` (which notes it)."""

    def __init__(self, load: Callable[[CID], bytes]) -> None:
        self._load = load

    def __getitem__(self, cid: CID) -> bytes:
        return self._load(cid)

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise TypeError("a node source is not iterable")

    def __len__(self) -> int:
        raise TypeError("a node source has no length")

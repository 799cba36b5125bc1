"""Insert, update and delete on a *partial* MST: the tree a firehose ``#commit`` carries.

A commit's ``blocks`` hold only the MST nodes that changed (plus the few neighbours sync 1.1
asks producers to add); every other subtree is known by its CID alone. ``PartialMst`` loads a
node only when an operation has to look inside it, and keeps untouched subtrees as CID stubs,
so the root it computes at the end is the root of the *whole* tree, exactly as if every block
had been there. An operation that needs a node the slice does not carry fails with
``VerificationError`` ("missing block"), never with a wrong root.

The operations keep the tree canonical (atproto.com/specs/repository): a key sits in the layer
of its height; a node at layer n has subtrees at layer n-1 only; a node with nothing in it
disappears from its parent; a node holding only a subtree stays where it fills a skipped layer,
but not at the top, where the tree is trimmed down to the first node holding a key.

Each node read is hash-checked and checked like the full walks of ``_mst`` (keys in order, at
their own height, inside the range the parent allows).
"""

from __future__ import annotations

from collections.abc import Mapping

from atsync._errors import VerificationError

from ._cbor import CID
from ._mst import MstEntry, MstNode, _Walker, encode_node, key_height

__all__ = ["EMPTY_TREE", "PartialMst"]

Blocks = Mapping[CID, bytes]

# The CID of the empty tree, {"l": null, "e": []}: a repository's data before its first record.
EMPTY_TREE = CID.for_data(encode_node(MstNode(None, ())))


class _Leaf:
    __slots__ = ("key", "value")

    def __init__(self, key: bytes, value: CID) -> None:
        self.key = key
        self.value = value


class _Tree:
    """A node: loaded (``items`` set) or a stub known by ``cid`` only.

    ``items`` interleave subtrees and leaves in key order (never two subtrees side by side).
    ``cid`` is the node's CID while it is unchanged, ``None`` once modified (re-encoded at the
    end). ``lo``/``hi`` are the bounds its keys had to respect where it was found: kept so a
    stub loaded late is checked against the place it came from.
    """

    __slots__ = ("cid", "hi", "items", "layer", "lo")

    def __init__(
        self,
        cid: CID | None,
        items: list[_Leaf | _Tree] | None,
        layer: int,
        lo: bytes | None = None,
        hi: bytes | None = None,
    ) -> None:
        self.cid = cid
        self.items = items
        self.layer = layer
        self.lo = lo
        self.hi = hi


def _first_gte(items: list[_Leaf | _Tree], key: bytes) -> int:
    """Index of the first leaf whose key is >= ``key`` (``len(items)`` if none)."""
    for i, item in enumerate(items):
        if isinstance(item, _Leaf) and item.key >= key:
            return i
    return len(items)


class PartialMst:
    """A mutable view of the tree at ``root`` over ``blocks`` (any CID → bytes mapping).

    ``add``/``update``/``delete`` change it in place; ``root_cid()`` is the resulting root.
    ``context`` names the operation under way, for "missing block" messages.
    """

    def __init__(self, blocks: Blocks, root: CID) -> None:
        self._blocks = blocks
        self._walker = _Walker(blocks)
        self.context = ""
        # The root is read on first use: a commit that changes nothing needs no node at all.
        self._root = _Tree(root, None, 0)
        self._root_read = False

    # --- loading -----------------------------------------------------------------------------

    def _read(
        self, cid: CID, layer: int | None, lo: bytes | None, hi: bytes | None, *, is_root: bool
    ) -> tuple[MstNode, int]:
        if cid not in self._blocks:
            needed = f" to {self.context}" if self.context else ""
            raise VerificationError(
                f"missing block {cid}: the MST node is needed{needed}, "
                "but the commit's blocks do not include it"
            )
        return self._walker.load(cid, layer, lo, hi, is_root)

    def _fill(self, tree: _Tree, node: MstNode) -> None:
        below = tree.layer - 1
        items: list[_Leaf | _Tree] = []
        lo = tree.lo
        if node.left is not None:
            hi = node.entries[0].key if node.entries else tree.hi
            items.append(_Tree(node.left, None, below, lo, hi))
        for i, e in enumerate(node.entries):
            items.append(_Leaf(e.key, e.value))
            if e.right is not None:
                hi = node.entries[i + 1].key if i + 1 < len(node.entries) else tree.hi
                items.append(_Tree(e.right, None, below, e.key, hi))
        tree.items = items

    def _top(self) -> _Tree:
        if not self._root_read:
            assert self._root.cid is not None
            node, self._root.layer = self._read(self._root.cid, None, None, None, is_root=True)
            self._fill(self._root, node)
            self._root_read = True
        return self._root

    def _load(self, tree: _Tree) -> list[_Leaf | _Tree]:
        if tree.items is None:
            assert tree.cid is not None  # a stub always has its CID
            node, _ = self._read(tree.cid, tree.layer, tree.lo, tree.hi, is_root=False)
            self._fill(tree, node)
            assert tree.items is not None
        return tree.items

    # --- reading -----------------------------------------------------------------------------

    def get(self, key: str | bytes) -> CID | None:
        k = key.encode() if isinstance(key, str) else key
        tree: _Tree | None = self._top()
        while tree is not None:
            items = self._load(tree)
            i = _first_gte(items, k)
            if i < len(items):
                found = items[i]
                if isinstance(found, _Leaf) and found.key == k:
                    return found.value
            prev = items[i - 1] if i > 0 else None
            tree = prev if isinstance(prev, _Tree) else None
        return None

    # --- changes -----------------------------------------------------------------------------

    def add(self, key: str | bytes, value: CID) -> None:
        """Insert a key that must not be in the tree yet."""
        k = key.encode() if isinstance(key, str) else key
        height = key_height(k)
        root = self._top()
        items = self._load(root)
        if not items:  # the empty tree (its layer is whatever it was before it emptied)
            self._root = _Tree(None, [_Leaf(k, value)], height)
            return
        if height <= root.layer:
            self._add(root, k, value, height)
            return
        # The key goes above the current top: everything splits around it and moves down,
        # with empty nodes filling any layer skipped between the old top and the new one.
        left, right = self._split(root, k)
        for layer in range(root.layer + 1, height):
            left = _Tree(None, [left], layer) if left is not None else None
            right = _Tree(None, [right], layer) if right is not None else None
        new: list[_Leaf | _Tree] = [] if left is None else [left]
        new.append(_Leaf(k, value))
        if right is not None:
            new.append(right)
        self._root = _Tree(None, new, height)

    def _add(self, tree: _Tree, key: bytes, value: CID, height: int) -> None:
        items = self._load(tree)
        i = _first_gte(items, key)
        if i < len(items):
            found = items[i]
            if isinstance(found, _Leaf) and found.key == key:
                raise VerificationError(
                    f"key {key.decode(errors='replace')} is already in the tree"
                )
        prev = items[i - 1] if i > 0 else None
        if height == tree.layer:
            if isinstance(prev, _Tree):
                # The subtree between the new key's neighbours straddles it: split it in two.
                left, right = self._split(prev, key)
                middle: list[_Leaf | _Tree] = [] if left is None else [left]
                middle.append(_Leaf(key, value))
                if right is not None:
                    middle.append(right)
                items[i - 1 : i] = middle
            else:
                items.insert(i, _Leaf(key, value))
        elif isinstance(prev, _Tree):
            self._add(prev, key, value, height)
        else:
            child = _Tree(None, [], tree.layer - 1)
            self._add(child, key, value, height)
            items.insert(i, child)
        tree.cid = None

    def _split(self, tree: _Tree, key: bytes) -> tuple[_Tree | None, _Tree | None]:
        """The parts of ``tree`` below and above ``key`` (not in it), ``None`` when empty."""
        items = self._load(tree)
        i = _first_gte(items, key)
        left_items, right_items = items[:i], items[i:]
        last = left_items[-1] if left_items else None
        if isinstance(last, _Tree):
            left_items.pop()
            sub_left, sub_right = self._split(last, key)
            if sub_left is not None:
                left_items.append(sub_left)
            if sub_right is not None:
                right_items.insert(0, sub_right)
        left = _Tree(None, left_items, tree.layer) if left_items else None
        right = _Tree(None, right_items, tree.layer) if right_items else None
        return left, right

    def update(self, key: str | bytes, value: CID) -> CID:
        """Point an existing key at ``value``; returns the value it had."""
        k = key.encode() if isinstance(key, str) else key
        return self._update(self._top(), k, value)

    def _update(self, tree: _Tree, key: bytes, value: CID) -> CID:
        items = self._load(tree)
        i = _first_gte(items, key)
        if i < len(items):
            found = items[i]
            if isinstance(found, _Leaf) and found.key == key:
                old = found.value
                items[i] = _Leaf(key, value)
                tree.cid = None
                return old
        prev = items[i - 1] if i > 0 else None
        if not isinstance(prev, _Tree):
            raise VerificationError(f"key {key.decode(errors='replace')} is not in the tree")
        old = self._update(prev, key, value)
        tree.cid = None
        return old

    def delete(self, key: str | bytes) -> CID:
        """Remove an existing key; returns the value it had."""
        k = key.encode() if isinstance(key, str) else key
        old = self._delete(self._top(), k)
        self._trim_top()
        return old

    def _delete(self, tree: _Tree, key: bytes) -> CID:
        items = self._load(tree)
        i = _first_gte(items, key)
        if i < len(items):
            found = items[i]
            if isinstance(found, _Leaf) and found.key == key:
                prev = items[i - 1] if i > 0 else None
                nxt = items[i + 1] if i + 1 < len(items) else None
                if isinstance(prev, _Tree) and isinstance(nxt, _Tree):
                    # The subtrees on both sides of the key now touch: they become one.
                    items[i - 1 : i + 2] = [self._merge(prev, nxt)]
                else:
                    del items[i]
                tree.cid = None
                return found.value
        prev = items[i - 1] if i > 0 else None
        if not isinstance(prev, _Tree):
            raise VerificationError(f"key {key.decode(errors='replace')} is not in the tree")
        old = self._delete(prev, key)
        if not self._load(prev):
            del items[i - 1]  # an empty node disappears from its parent
        tree.cid = None
        return old

    def _merge(self, left: _Tree, right: _Tree) -> _Tree:
        """One node of the same layer holding everything in ``left`` then ``right``."""
        a, b = self._load(left), self._load(right)
        if a and b and isinstance(a[-1], _Tree) and isinstance(b[0], _Tree):
            return _Tree(None, [*a[:-1], self._merge(a[-1], b[0]), *b[1:]], left.layer)
        return _Tree(None, [*a, *b], left.layer)

    def _trim_top(self) -> None:
        # The top must hold a key (or be the empty tree): a top left holding only a subtree
        # hands its place down. A stub the slice does not carry is taken as it is: the tree
        # above it was the only part that changed, and the root compared afterwards decides.
        root = self._root
        while root.items is not None and len(root.items) == 1:
            only = root.items[0]
            if not isinstance(only, _Tree):
                break
            root = only
            if root.items is None and root.cid is not None and root.cid not in self._blocks:
                break
            self._load(root)
        self._root = root

    # --- result ------------------------------------------------------------------------------

    def root_cid(self) -> CID:
        """The CID of the tree's root now (unchanged subtrees keep their CIDs)."""
        return self._cid(self._root)

    def _cid(self, tree: _Tree) -> CID:
        if tree.cid is not None:
            return tree.cid
        assert tree.items is not None  # only loaded nodes are ever modified
        left: CID | None = None
        entries: list[MstEntry] = []
        for item in tree.items:
            if isinstance(item, _Leaf):
                entries.append(MstEntry(item.key, item.value, None))
            elif entries:
                last = entries[-1]
                entries[-1] = MstEntry(last.key, last.value, self._cid(item))
            else:
                left = self._cid(item)
        cid = CID.for_data(encode_node(MstNode(left, tuple(entries))))
        tree.cid = cid
        return cid

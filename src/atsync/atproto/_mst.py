"""The Merkle Search Tree of an atproto repository (atproto.com/specs/repository).

A key's height is the number of leading zero bits of sha256(key), counted in 2-bit chunks; a
key lives in the node of its height, and each child sits exactly one layer below its parent
(empty nodes fill skipped layers). The tree is therefore a pure function of its key set,
which this module checks while reading: every node read is fetched by CID and hash-checked,
keys must be in order and inside the bounds set by the parent, and every key must sit at its
own height. That is what makes a path from the root a proof of presence *or* absence.

Nodes are ``{"l": CID | null, "e": [{"p": int, "k": bytes, "v": CID, "t": CID | null}]}``,
keys prefix-compressed against the previous entry of the same node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import libipld

from atsync._errors import VerificationError

from ._cbor import CID, CODEC_DAG_CBOR, decode_dag_cbor, encode_dag_cbor

__all__ = [
    "CompactNode",
    "MstEntry",
    "MstNode",
    "build_mst",
    "common_prefix_len",
    "compact_node_from_libipld",
    "covering_proof",
    "decode_node",
    "encode_node",
    "expand_node",
    "get_block",
    "iter_leaves",
    "key_height",
    "mst_lookup",
    "node_from_libipld",
]

MAX_KEY_BYTES = 1024
_NODE_KEYS = frozenset({"e", "l"})
_ENTRY_KEYS = frozenset({"k", "p", "t", "v"})
# CIDv1, sha2-256, of dag-cbor (nodes, records) or raw data (what a record link may name).
_SHA256_PREFIXES = (bytes((1, CODEC_DAG_CBOR, 0x12, 32)), bytes((1, 0x55, 0x12, 32)))
Blocks = Mapping[CID, bytes]


def _b(key: str | bytes) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key


def key_height(key: str | bytes) -> int:
    """Leading zero bits of sha256(key), in 2-bit chunks (a fanout of 4)."""
    return _height(hashlib.sha256(_b(key)).digest())


def _height(digest: bytes) -> int:
    first = digest[0]
    if first >= 4:  # all but 1 in 64 keys: the height is in the first byte
        return 0 if first >= 64 else 1 if first >= 16 else 2
    return (256 - int.from_bytes(digest, "big").bit_length()) // 2


def common_prefix_len(a: str | bytes, b: str | bytes) -> int:
    """Length of the common prefix, in bytes of the UTF-8 encoding."""
    ab, bb = _b(a), _b(b)
    n = min(len(ab), len(bb))
    for i in range(n):
        if ab[i] != bb[i]:
            return i
    return n


@dataclass(frozen=True)
class MstEntry:
    key: bytes
    value: CID
    right: CID | None


@dataclass(frozen=True)
class MstNode:
    left: CID | None
    entries: tuple[MstEntry, ...]


def get_block(blocks: Blocks, cid: CID, what: str = "block") -> bytes:
    """Fetch a block and re-check its hash: ``blocks`` may be any mapping, trusted or not."""
    data = blocks.get(cid)
    if data is None:
        raise VerificationError(f"missing block {cid} ({what})")
    if not cid.matches(data):
        raise VerificationError(f"CID mismatch at block {cid} ({what})")
    return data


def _node_link(value: Any, cid: CID | None, field: str) -> CID | None:
    if value is None:
        return None
    if not isinstance(value, CID) or value.codec != CODEC_DAG_CBOR:
        raise VerificationError(f"malformed node {cid}: {field} is not a dag-cbor CID or null")
    return value


def _decode_node_fast(data: bytes) -> MstNode | None:
    """The node decoded with libipld, when it is certainly what the strict path would give;
    otherwise None (the strict path then decodes it or says what is wrong).

    libipld returns links as plain bytes, but re-encodes bytes that parse as a CID as a
    link: so when the re-encoding equals ``data`` (which also proves it canonical), a value
    that looks like a CID was a link and one that does not was bytes. A key that could look
    like one (a CID starts with a byte below 0x20: 0x01, or 0x12 for v0; keys are printable
    ASCII) and links other than the usual sha2-256 CIDs take the strict path.
    """
    try:
        raw = libipld.decode_dag_cbor(data)
    except (ValueError, RecursionError):
        return None
    return node_from_libipld(raw, data)


def node_from_libipld(raw: Any, data: bytes) -> MstNode | None:
    """The node ``data`` holds, given ``libipld.decode_dag_cbor(data)`` — for a reader that
    decoded a block once to learn what it is (see ``_decode_node_fast``)."""
    compact = compact_node_from_libipld(raw, data)
    return None if compact is None else expand_node(compact)


# A node as plain tuples of bytes: (left, ((key, value, right), ...)), CIDs as their bytes.
# Tuples of bytes are untracked by the cyclic GC, so holding thousands of them (a repository
# being read) costs no full collections, as MstNode/CID objects would.
CompactNode = tuple[bytes | None, tuple[tuple[bytes, bytes, bytes | None], ...]]


def compact_node_from_libipld(raw: Any, data: bytes) -> CompactNode | None:
    """``node_from_libipld``, as a ``CompactNode`` (``expand_node`` makes it an ``MstNode``)."""
    if type(raw) is not dict or raw.keys() != _NODE_KEYS or type(raw["e"]) is not list:
        return None
    left = raw["l"]
    if left is not None and not _is_node_link(left):
        return None
    entries: list[tuple[bytes, bytes, bytes | None]] = []
    prev = b""
    for item in raw["e"]:
        if type(item) is not dict or item.keys() != _ENTRY_KEYS:
            return None
        p, k, v, t = item["p"], item["k"], item["v"], item["t"]
        if type(p) is not int or not 0 <= p <= len(prev) or (not entries and p != 0):
            return None
        if type(k) is not bytes or k[:1] < b" " or type(v) is not bytes or len(v) != 36:
            return None
        if v[:4] not in _SHA256_PREFIXES or (t is not None and not _is_node_link(t)):
            return None
        key = prev[:p] + k
        if not key or len(key) > MAX_KEY_BYTES or key <= prev:
            return None
        entries.append((key, v, t))
        prev = key
    if libipld.encode_dag_cbor(raw) != data:
        return None
    return left, tuple(entries)


def expand_node(compact: CompactNode) -> MstNode:
    left, entries = compact
    return MstNode(
        None if left is None else CID.from_raw(left),
        tuple(
            MstEntry(key, CID.from_raw(v), None if t is None else CID.from_raw(t))
            for key, v, t in entries
        ),
    )


def _is_node_link(value: object) -> bool:
    return type(value) is bytes and len(value) == 36 and value[:4] == _SHA256_PREFIXES[0]


def decode_node(data: bytes, cid: CID | None = None) -> MstNode:
    """Decode one MST node strictly; ``VerificationError`` "malformed node" otherwise."""
    fast = _decode_node_fast(data)
    return fast if fast is not None else _decode_node_strict(data, cid)


def _decode_node_strict(data: bytes, cid: CID | None) -> MstNode:
    try:
        raw = decode_dag_cbor(data)
    except VerificationError as e:
        raise VerificationError(f"malformed node {cid}: {e}") from e
    if not isinstance(raw, dict) or set(raw) != {"e", "l"}:
        raise VerificationError(f"malformed node {cid}: must be a map of exactly 'l' and 'e'")
    left = _node_link(raw["l"], cid, "'l'")
    if not isinstance(raw["e"], list):
        raise VerificationError(f"malformed node {cid}: 'e' is not a list")
    entries = []
    prev = b""
    for i, item in enumerate(raw["e"]):
        if not isinstance(item, dict) or set(item) != {"k", "p", "t", "v"}:
            raise VerificationError(f"malformed node {cid}: entry {i} needs exactly k, p, t, v")
        p, k, v = item["p"], item["k"], item["v"]
        if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p <= len(prev):
            raise VerificationError(f"malformed node {cid}: entry {i} has a bad prefix length")
        if i == 0 and p != 0:
            raise VerificationError(f"malformed node {cid}: first entry has a prefix length")
        if not isinstance(k, bytes) or not isinstance(v, CID):
            raise VerificationError(f"malformed node {cid}: entry {i} k/v have wrong types")
        key = prev[:p] + k
        if not key or len(key) > MAX_KEY_BYTES:
            raise VerificationError(f"malformed node {cid}: entry {i} key length {len(key)}")
        if key <= prev:
            raise VerificationError(f"malformed node {cid}: keys out of order at entry {i}")
        entries.append(MstEntry(key, v, _node_link(item["t"], cid, f"entry {i} 't'")))
        prev = key
    return MstNode(left, tuple(entries))


def encode_node(node: MstNode) -> bytes:
    entries = []
    prev = b""
    for e in node.entries:
        p = common_prefix_len(prev, e.key)
        entries.append({"p": p, "k": e.key[p:], "v": e.value, "t": e.right})
        prev = e.key
    return encode_dag_cbor({"l": node.left, "e": entries})


def build_mst(items: Mapping[str, CID] | Mapping[bytes, CID]) -> tuple[CID, dict[CID, bytes]]:
    """The canonical tree for ``items``: its root CID and all of its node blocks."""
    blocks: dict[CID, bytes] = {}
    ordered = sorted((_b(k), v) for k, v in items.items())
    heights = [key_height(k) for k, _ in ordered]

    def put(node: MstNode) -> CID:
        data = encode_node(node)
        cid = CID.for_data(data)
        blocks[cid] = data
        return cid

    def build(lo: int, hi: int, layer: int) -> CID | None:
        # Items lo..hi-1 all have height <= layer; this returns the node for them at `layer`.
        if lo == hi:
            return None
        here = [i for i in range(lo, hi) if heights[i] == layer]
        left = build(lo, here[0] if here else hi, layer - 1)
        entries = []
        for j, i in enumerate(here):
            end = here[j + 1] if j + 1 < len(here) else hi
            entries.append(MstEntry(ordered[i][0], ordered[i][1], build(i + 1, end, layer - 1)))
        return put(MstNode(left, tuple(entries)))

    root = build(0, len(ordered), max(heights, default=0))
    if root is None:
        root = put(MstNode(None, ()))
    return root, blocks


class _Walker:
    """Shared checks for lookups and full walks; ``nodes`` holds nodes already decoded from
    these blocks (by CID bytes)."""

    def __init__(self, blocks: Blocks, nodes: Mapping[bytes, CompactNode] | None = None) -> None:
        self.blocks = blocks
        self.nodes = nodes or {}

    def load(
        self, cid: CID, layer: int | None, lo: bytes | None, hi: bytes | None, is_root: bool
    ) -> tuple[MstNode, int]:
        """Load a node expected at ``layer`` (None: the root, layer taken from its keys) whose
        keys must lie strictly between ``lo`` and ``hi``. Returns the node and its layer."""
        compact = self.nodes.get(bytes(cid))
        if compact is not None:
            node = expand_node(compact)
        else:
            node = decode_node(get_block(self.blocks, cid, "MST node"), cid)
        keys = [e.key for e in node.entries]
        subtrees = node.left is not None or any(e.right is not None for e in node.entries)
        layer = check_node(cid, keys, node.left is not None, subtrees, layer, lo, hi, is_root)
        return node, layer


def check_node(
    cid: CID | bytes,
    keys: Sequence[bytes],
    has_left: bool,
    has_subtrees: bool,
    layer: int | None,
    lo: bytes | None,
    hi: bytes | None,
    is_root: bool,
    keys_layer: int | None = None,
) -> int:
    """The checks a node's place in a tree makes (see ``_Walker.load``); returns its layer.
    ``keys_layer``: the height all of ``keys`` are known to have (computed ahead, e.g. while
    downloading), so they need not be hashed again."""
    if not keys:
        if is_root and has_left:
            raise VerificationError(
                f"malformed node {_cid(cid)}: root has no entries but a subtree"
            )
        if not is_root and not has_left:
            raise VerificationError(f"malformed node {_cid(cid)}: empty node inside the tree")
        if layer is None:  # the empty tree: a lone root with nothing in it
            layer = 0
    elif keys_layer is not None:
        if layer is None:
            layer = keys_layer
        elif keys_layer != layer:
            raise VerificationError(
                f"malformed node {_cid(cid)}: key {keys[0]!r} has height {keys_layer} but sits "
                f"at layer {layer}"
            )
    else:
        for key in keys:
            h = key_height(key)
            if layer is None:
                layer = h
            if h != layer:
                raise VerificationError(
                    f"malformed node {_cid(cid)}: key {key!r} has height {h} but sits at layer "
                    f"{layer}"
                )
    if keys:
        if lo is not None and keys[0] <= lo:
            raise VerificationError(
                f"malformed node {_cid(cid)}: key {keys[0]!r} is outside the range its parent "
                "allows"
            )
        if hi is not None and keys[-1] >= hi:
            raise VerificationError(
                f"malformed node {_cid(cid)}: key {keys[-1]!r} is outside the range its parent "
                "allows"
            )
    assert layer is not None
    if layer < 0 or (layer == 0 and has_subtrees):
        raise VerificationError(f"malformed node {_cid(cid)}: subtree below layer 0")
    return layer


def compact_layer(compact: CompactNode) -> int | None:
    """The height every key of a node has, or None (no keys, or keys of several heights:
    then ``check_node`` says which is wrong)."""
    sha256 = hashlib.sha256  # the keys are bytes: key_height's conversion is not needed
    heights = {_height(sha256(key).digest()) for key, _, _ in compact[1]}
    return heights.pop() if len(heights) == 1 else None


def _cid(cid: CID | bytes) -> CID:
    return CID.from_raw(cid) if isinstance(cid, bytes) else cid


def mst_lookup(blocks: Blocks, root: CID, key: str | bytes) -> tuple[CID | None, list[CID]]:
    """Walk from ``root`` to ``key``: (its value CID or None if provably absent, nodes visited).

    Only the nodes on the path are needed, so this works on a proof CAR from ``getRecord``.
    """
    k = _b(key)
    walker = _Walker(blocks)
    path: list[CID] = []
    cid: CID | None = root
    layer: int | None = None
    lo: bytes | None = None
    hi: bytes | None = None
    while cid is not None:
        path.append(cid)
        node, layer = walker.load(cid, None if len(path) == 1 else layer, lo, hi, len(path) == 1)
        nxt = node.left
        for e in node.entries:
            if e.key == k:
                return e.value, path
            if e.key > k:
                hi = e.key
                break
            lo, nxt = e.key, e.right
        cid = nxt
        layer -= 1
    return None, path


def iter_leaves(
    blocks: Blocks,
    root: CID,
    nodes: Mapping[bytes, CompactNode] | None = None,
    on_node: Callable[[CID], object] | None = None,
    layers: Mapping[bytes, int] | None = None,
) -> Iterator[tuple[str, CID]]:
    """Every ``(key, value CID)`` in key order, checking the whole tree's structure
    (``nodes``: nodes already decoded from ``blocks``, by CID bytes; ``layers``: the height
    of every key of some of those nodes, computed ahead; ``on_node`` sees each node's CID as
    it is read)."""
    nodes = nodes or {}
    layers = layers or {}
    # An explicit stack rather than recursion: a leaf then passes through no chain of
    # generators (a tree of 20,000 keys is five levels deep). Items are a subtree to visit
    # (cid bytes, layer, lo, hi) or a leaf to yield (key, value CID bytes). Nodes are walked
    # in their compact form (tuples of bytes): no object per entry.
    stack: list[tuple[bytes, int | None, bytes | None, bytes | None] | tuple[str, bytes]] = [
        (bytes(root), None, None, None)
    ]
    pop, push = stack.pop, stack.append
    from_raw = CID.from_raw
    while stack:
        item = pop()
        if len(item) == 2:
            yield item[0], from_raw(item[1])
            continue
        raw, layer, lo, hi = item
        compact = nodes.get(raw)
        if compact is None:
            cid = from_raw(raw)
            node = decode_node(get_block(blocks, cid, "MST node"), cid)
            compact = (
                None if node.left is None else bytes(node.left),
                tuple(
                    (e.key, bytes(e.value), None if e.right is None else bytes(e.right))
                    for e in node.entries
                ),
            )
        left, entries = compact
        keys = [e[0] for e in entries]
        has_subtrees = left is not None or any(e[2] is not None for e in entries)
        layer = check_node(
            raw, keys, left is not None, has_subtrees, layer, lo, hi, layer is None, layers.get(raw)
        )
        if on_node is not None:
            on_node(from_raw(raw))
        # Pushed in reverse: the left subtree first, then each key and the subtree after it.
        for i in range(len(entries) - 1, -1, -1):
            key, value, right = entries[i]
            if right is not None:
                push((right, layer - 1, key, keys[i + 1] if i + 1 < len(keys) else hi))
            try:
                push((key.decode("ascii"), value))
            except UnicodeDecodeError:
                raise VerificationError(
                    f"malformed node {from_raw(raw)}: non-ASCII key {key!r}"
                ) from None
        if left is not None:
            push((left, layer - 1, lo, keys[0] if keys else hi))


def covering_proof(blocks: Blocks, root: CID, key: str | bytes) -> set[CID]:
    """The nodes a commit touching ``key`` must carry so a reader can invert the operation.

    That is the path to the key's position, plus, when the key is present, the rightmost
    spine of the subtree just left of it and the leftmost spine of its right subtree: the
    nodes that would merge if the key were removed (the firehose's "MST inversion" rule).
    """
    k = _b(key)
    value, path = mst_lookup(blocks, root, k)
    out = set(path)
    if value is None:
        return out
    node = decode_node(get_block(blocks, path[-1], "MST node"), path[-1])
    for i, e in enumerate(node.entries):
        if e.key == k:
            out |= _spine(blocks, node.left if i == 0 else node.entries[i - 1].right, True)
            out |= _spine(blocks, e.right, False)
    return out


def _spine(blocks: Blocks, cid: CID | None, rightmost: bool) -> set[CID]:
    out = set()
    while cid is not None:
        out.add(cid)
        node = decode_node(get_block(blocks, cid, "MST node"), cid)
        cid = node.entries[-1].right if rightmost and node.entries else node.left
    return out

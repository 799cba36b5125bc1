"""MST heights, prefixes and canonical roots against the interop mst/ and firehose/ vectors."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from atsync._errors import VerificationError
from atsync.atproto._cbor import CID, decode_dag_cbor, encode_dag_cbor
from atsync.atproto._mst import (
    MstEntry,
    MstNode,
    _decode_node_fast,
    _decode_node_strict,
    build_mst,
    common_prefix_len,
    covering_proof,
    decode_node,
    encode_node,
    iter_leaves,
    key_height,
    mst_lookup,
)

INTEROP = Path(__file__).parent / "interop"


def _load(rel: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((INTEROP / rel).read_text())
    return data


HEIGHTS = _load("mst/key_heights.json")
PREFIXES = _load("mst/common_prefix.json")
PROOFS = _load("firehose/commit-proof-fixtures.json")
EXAMPLE_KEYS = (INTEROP / "mst" / "example_keys.txt").read_text().split()
LEAF = CID.for_data(encode_dag_cbor({"leaf": True}))


@pytest.mark.parametrize("fx", HEIGHTS, ids=lambda fx: fx["key"] or "<empty>")
def test_key_height(fx: dict[str, Any]) -> None:
    assert key_height(fx["key"]) == fx["height"]


@pytest.mark.parametrize("fx", PREFIXES, ids=lambda fx: f"{fx['left']!r}-{fx['right']!r}")
def test_common_prefix(fx: dict[str, Any]) -> None:
    assert common_prefix_len(fx["left"], fx["right"]) == fx["len"]


def test_example_keys_encode_their_height() -> None:
    # The example keys are named <letter><height>/<n>; the name doubles as a vector.
    assert len(EXAMPLE_KEYS) == 156
    for key in EXAMPLE_KEYS:
        assert key_height(key) == int(key[1]), key


def _apply(fx: dict[str, Any]) -> tuple[dict[str, CID], dict[str, CID]]:
    leaf = CID.parse(fx["leafValue"])
    before = dict.fromkeys(fx["keys"], leaf)
    after = dict(before)
    for k in fx["adds"]:
        after[k] = leaf
    for k in fx["dels"]:
        del after[k]
    return before, after


@pytest.mark.parametrize("fx", PROOFS, ids=lambda fx: fx["comment"])
def test_commit_proof_roots(fx: dict[str, Any]) -> None:
    before, after = _apply(fx)
    root_before, _ = build_mst(before)
    root_after, blocks = build_mst(after)
    assert str(root_before) == fx["rootBeforeCommit"]
    assert str(root_after) == fx["rootAfterCommit"]
    assert [k for k, _ in iter_leaves(blocks, root_after)] == sorted(after)


@pytest.mark.parametrize("fx", PROOFS, ids=lambda fx: fx["comment"])
def test_commit_proof_blocks(fx: dict[str, Any]) -> None:
    _, after = _apply(fx)
    root, blocks = build_mst(after)
    proof: set[CID] = set()
    for key in fx["adds"] + fx["dels"]:
        proof |= covering_proof(blocks, root, key)
    assert {str(c) for c in proof} == set(fx["blocksInProof"])
    # The proof alone is enough to look up every changed key.
    only_proof = {c: blocks[c] for c in proof}
    for key in fx["adds"]:
        assert mst_lookup(only_proof, root, key)[0] == CID.parse(fx["leafValue"])
    for key in fx["dels"]:
        assert mst_lookup(only_proof, root, key)[0] is None


def test_empty_tree() -> None:
    root, blocks = build_mst({})
    # The well-known CID of the empty MST node {"l": null, "e": []}.
    assert str(root) == "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
    assert list(iter_leaves(blocks, root)) == []
    assert mst_lookup(blocks, root, "a/b") == (None, [root])


def test_example_keys_round_trip_and_absence() -> None:
    items = {k: CID.for_data(k.encode(), 0x55) for k in EXAMPLE_KEYS}
    root, blocks = build_mst(items)
    assert list(iter_leaves(blocks, root)) == sorted(items.items())
    for k, v in items.items():
        found, path = mst_lookup(blocks, root, k)
        assert found == v
        assert path[0] == root
    for missing in ("A0/000000", "Z9/999999", "", "M5/5"):
        assert mst_lookup(blocks, root, missing)[0] is None


def test_root_is_independent_of_insertion_order() -> None:
    rng = random.Random(7)
    keys = [f"com.example.note/{rng.getrandbits(40):010x}" for _ in range(300)]
    a = {k: LEAF for k in keys}
    rng.shuffle(keys)
    b = {k: LEAF for k in keys}
    assert build_mst(a)[0] == build_mst(b)[0]
    del b[keys[0]]
    assert build_mst(a)[0] != build_mst(b)[0]


def test_node_encoding_round_trips_with_prefix_compression() -> None:
    node = MstNode(None, (MstEntry(b"abc/1", LEAF, None), MstEntry(b"abc/2", LEAF, LEAF)))
    data = encode_node(node)
    assert decode_node(data) == node
    raw = decode_dag_cbor(data)
    assert raw["e"][1]["p"] == 4
    assert raw["e"][1]["k"] == b"2"


def _raw_node(entries: list[dict[str, Any]], left: CID | None = None) -> bytes:
    return encode_dag_cbor({"l": left, "e": entries})


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (encode_dag_cbor({"e": []}), "exactly 'l' and 'e'"),
        (encode_dag_cbor({"l": None, "e": [], "x": 1}), "exactly 'l' and 'e'"),
        (encode_dag_cbor({"l": None, "e": {}}), "not a list"),
        (encode_dag_cbor({"l": b"x", "e": []}), "'l' is not"),
        (_raw_node([{"p": 1, "k": b"a", "v": LEAF, "t": None}]), "prefix length"),
        (_raw_node([{"p": 0, "k": b"a", "v": LEAF}]), "exactly k, p, t, v"),
        (_raw_node([{"p": 0, "k": "a", "v": LEAF, "t": None}]), "wrong types"),
        (_raw_node([{"p": 0, "k": b"", "v": LEAF, "t": None}]), "key length"),
        (
            _raw_node(
                [
                    {"p": 0, "k": b"b", "v": LEAF, "t": None},
                    {"p": 0, "k": b"a", "v": LEAF, "t": None},
                ]
            ),
            "out of order",
        ),
        (
            _raw_node(
                [
                    {"p": 0, "k": b"ab", "v": LEAF, "t": None},
                    {"p": 3, "k": b"c", "v": LEAF, "t": None},
                ]
            ),
            "prefix length",
        ),
        (b"\xff", "malformed node"),
    ],
)
def test_decode_node_rejects(data: bytes, why: str) -> None:
    with pytest.raises(VerificationError, match=why):
        decode_node(data)


def _tree_with_keys_at_wrong_layer() -> tuple[CID, dict[CID, bytes]]:
    # "A0/374913" has height 0; putting it beside "B1/986427" (height 1) in one node is wrong.
    node = MstNode(None, (MstEntry(b"A0/374913", LEAF, None), MstEntry(b"B1/986427", LEAF, None)))
    data = encode_node(node)
    cid = CID.for_data(data)
    return cid, {cid: data}


def test_walk_rejects_keys_at_the_wrong_height() -> None:
    root, blocks = _tree_with_keys_at_wrong_layer()
    with pytest.raises(VerificationError, match="height"):
        list(iter_leaves(blocks, root))
    with pytest.raises(VerificationError, match="height"):
        mst_lookup(blocks, root, "B1/986427")


def test_walk_rejects_keys_outside_parent_bounds() -> None:
    # A child holding a key that sorts before its parent's left boundary: a lookup that
    # trusted it could "prove" absence of a key that is in the tree elsewhere.
    child = MstNode(None, (MstEntry(b"A0/374913", LEAF, None),))
    child_data = encode_node(child)
    child_cid = CID.for_data(child_data)
    root = MstNode(None, (MstEntry(b"B1/986427", LEAF, child_cid),))
    root_data = encode_node(root)
    root_cid = CID.for_data(root_data)
    blocks = {child_cid: child_data, root_cid: root_data}
    with pytest.raises(VerificationError, match="outside the range"):
        list(iter_leaves(blocks, root_cid))
    with pytest.raises(VerificationError, match="outside the range"):
        mst_lookup(blocks, root_cid, "C0/451630")


def test_walk_reports_missing_and_corrupt_blocks() -> None:
    items = {k: LEAF for k in EXAMPLE_KEYS[:40]}
    root, blocks = build_mst(items)
    some_child = next(c for c in blocks if c != root)
    missing = {c: d for c, d in blocks.items() if c != some_child}
    with pytest.raises(VerificationError, match=f"missing block {some_child}"):
        list(iter_leaves(missing, root))
    corrupt = dict(blocks)
    corrupt[some_child] = blocks[some_child][:-1] + b"\x00"
    with pytest.raises(VerificationError, match=f"CID mismatch at block {some_child}"):
        list(iter_leaves(corrupt, root))


def test_root_with_only_a_subtree_is_not_canonical() -> None:
    inner_root, blocks = build_mst({"A0/374913": LEAF})
    wrapper = encode_node(MstNode(inner_root, ()))
    wrapper_cid = CID.for_data(wrapper)
    blocks[wrapper_cid] = wrapper
    with pytest.raises(VerificationError, match="root has no entries"):
        list(iter_leaves(blocks, wrapper_cid))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_fast_node_decoder_agrees_with_the_strict_one(data: st.DataObject) -> None:
    keys = data.draw(
        st.lists(
            st.from_regex(r"\Acom\.example\.[a-z]{1,3}/[a-z0-9]{1,12}\Z"), min_size=1, max_size=40
        )
    )
    _, blocks = build_mst({k: CID.for_data(k.encode()) for k in keys})
    node = bytearray(data.draw(st.sampled_from(sorted(blocks.values()))))
    for _ in range(data.draw(st.integers(0, 3))):  # hostile: bytes changed
        node[data.draw(st.integers(0, len(node) - 1))] = data.draw(st.integers(0, 255))
    fast = _decode_node_fast(bytes(node))
    event("fast path" if fast is not None else "strict path")
    if fast is not None:
        assert fast == _decode_node_strict(bytes(node), None)

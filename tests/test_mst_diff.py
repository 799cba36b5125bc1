"""diff_trees: what changed between two MSTs, reading only the changed paths.

Trees are built with ``build_mst`` from random key sets; the "delta" is what a
``getRepo?since=`` CAR holds: the new tree's blocks the old one lacks.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atsync.atproto import CID, MissingBlock, diff_trees, encode_dag_cbor
from atsync.atproto._mst import build_mst


def value(n: int) -> CID:
    return CID.for_data(encode_dag_cbor({"n": n}))


def keys(count: int, rng: random.Random) -> list[str]:
    return [f"com.example.note/{rng.getrandbits(40):010x}" for _ in range(count)]


def changed(old: dict[str, CID], new: dict[str, CID]) -> tuple[dict[str, CID], set[str]]:
    """What a diff must report, from the whole key sets: changed or new keys, and gone keys."""
    upserts = {k: v for k, v in new.items() if old.get(k) != v}
    return upserts, set(old) - set(new)


def check(old: dict[str, CID], new: dict[str, CID]) -> None:
    old_root, old_nodes = build_mst(old)
    new_root, new_nodes = build_mst(new)
    delta = {cid: data for cid, data in new_nodes.items() if cid not in old_nodes}
    diff = diff_trees(new_root, delta, old_root, old_nodes)
    upserts, gone = changed(old, new)
    # Every change is among the leaves of new nodes, with its new value...
    assert {k: diff.added[k] for k in upserts} == upserts
    # ...and nothing there is a change it does not report (the rest are unchanged leaves).
    assert all(old.get(k) == v for k, v in diff.added.items() if k not in upserts)
    assert set(diff.removed) - set(diff.added) == gone
    # Only the changed paths are read, and the held tree moves exactly to the new one.
    assert set(diff.new_nodes) == set(delta)
    held = {cid: data for cid, data in old_nodes.items() if cid not in set(diff.gone_nodes)}
    held.update(diff.new_nodes)
    assert held == new_nodes


def test_a_few_changes_in_a_large_tree_read_a_few_nodes() -> None:
    rng = random.Random(1)
    old = {k: value(i) for i, k in enumerate(keys(3000, rng))}
    new = dict(old)
    some = sorted(old)
    new[some[10]] = value(-1)  # updated
    del new[some[2000]]  # deleted
    new[keys(1, rng)[0]] = value(-2)  # created
    check(old, new)
    old_root, old_nodes = build_mst(old)
    new_root, new_nodes = build_mst(new)
    delta = {cid: data for cid, data in new_nodes.items() if cid not in old_nodes}
    diff = diff_trees(new_root, delta, old_root, old_nodes)
    assert len(diff.new_nodes) < 20 and len(diff.gone_nodes) < 20 < len(old_nodes)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 300),
    st.integers(0, 40),
    st.integers(0, 40),
    st.integers(0, 40),
    st.integers(0, 2**32),
)
def test_any_change_is_found(size: int, adds: int, drops: int, edits: int, seed: int) -> None:
    rng = random.Random(seed)
    old = {k: value(i) for i, k in enumerate(keys(size, rng))}
    new = dict(old)
    for k in rng.sample(sorted(old), min(drops, len(old))):
        del new[k]
    for k in rng.sample(sorted(new), min(edits, len(new))):
        new[k] = value(rng.getrandbits(30))
    for k in keys(adds, rng):
        new[k] = value(rng.getrandbits(30))
    check(old, new)


def test_the_same_root_is_no_change_and_a_first_tree_is_all_new() -> None:
    rng = random.Random(2)
    items = {k: value(i) for i, k in enumerate(keys(100, rng))}
    root, nodes = build_mst(items)
    diff = diff_trees(root, {}, root, nodes)
    assert not diff.added and not diff.removed and not diff.new_nodes
    diff = diff_trees(root, nodes, None, {})
    assert diff.added == items and not diff.removed


def test_a_node_in_neither_source_is_a_missing_block() -> None:
    rng = random.Random(3)
    old = {k: value(i) for i, k in enumerate(keys(500, rng))}
    new = dict(old)
    new[keys(1, rng)[0]] = value(-1)
    old_root, old_nodes = build_mst(old)
    new_root, new_nodes = build_mst(new)
    delta = {cid: data for cid, data in new_nodes.items() if cid not in old_nodes}
    delta.pop(next(iter(c for c in delta if c != new_root)))
    with pytest.raises(MissingBlock):
        diff_trees(new_root, delta, old_root, old_nodes)
    # The old tree not held whole: also a missing block, never a silent partial answer.
    held = dict(old_nodes)
    held.pop(old_root)
    with pytest.raises(MissingBlock):
        diff_trees(new_root, new_nodes, old_root, held)

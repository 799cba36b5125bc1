"""Sync 1.1 verification of firehose ``#commit`` events: operation inversion on a partial MST
against the interop vectors and random trees, commits built and tampered here, and every live
frame of the real reference PDS."""

from __future__ import annotations

import io
import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync._errors import VerificationError
from atsync.atproto import (
    CID,
    Create,
    Delete,
    FirehoseFrame,
    FirehoseSubscription,
    IdentityResolver,
    RepoOp,
    Update,
    VerifiedCommit,
    XrpcClient,
    is_valid_nsid,
    is_valid_record_key,
    login,
    verify_commit_event,
)
from atsync.atproto._car import CarWriter, read_car, write_car
from atsync.atproto._cbor import decode_dag_cbor, encode_dag_cbor
from atsync.atproto._crypto import Keypair, generate_keypair, load_keypair
from atsync.atproto._devpds import DevPDS
from atsync.atproto._mst import build_mst, covering_proof
from atsync.atproto._mst_ops import EMPTY_TREE, PartialMst
from atsync.atproto._syntax import TidClock
from atsync.atproto._verify import sign_commit
from pds_fixtures import ACCOUNTS, MakePDS

VECTORS = json.loads(
    (Path(__file__).parent / "interop" / "firehose" / "commit-proof-fixtures.json").read_text()
)
DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
KEY = load_keypair(
    "k256", bytes.fromhex("9085d2bef69286a6cbb51623c8fa258629945cd55ca705cc4e66700396894e0c")
)
COLL = "com.example.note"


def _apply_vector(fx: dict[str, Any]) -> tuple[dict[str, CID], dict[str, CID]]:
    leaf = CID.parse(fx["leafValue"])
    before = dict.fromkeys(fx["keys"], leaf)
    after = dict(before)
    for k in fx["adds"]:
        after[k] = leaf
    for k in fx["dels"]:
        del after[k]
    return before, after


# --- the interop vectors: inversion on the proof blocks alone, in every order ------------------


@pytest.mark.parametrize("fx", VECTORS, ids=lambda fx: fx["comment"])
def test_vector_inverts_to_the_root_before_in_every_order(fx: dict[str, Any]) -> None:
    leaf = CID.parse(fx["leafValue"])
    _, after = _apply_vector(fx)
    root, blocks = build_mst(after)
    assert str(root) == fx["rootAfterCommit"]
    proof = {CID.parse(c): blocks[CID.parse(c)] for c in fx["blocksInProof"]}
    undo: list[Callable[[PartialMst], object]] = [
        *(lambda t, k=k: t.delete(k) for k in fx["adds"]),
        *(lambda t, k=k: t.add(k, leaf) for k in fx["dels"]),
    ]
    orders = list(itertools.permutations(undo))
    for order in orders:
        tree = PartialMst(proof, root)
        for step in order:
            step(tree)
        assert str(tree.root_cid()) == fx["rootBeforeCommit"]


def _is_repo_path(key: str) -> bool:
    collection, _, rkey = key.partition("/")
    return is_valid_nsid(collection) and is_valid_record_key(rkey)


PATH_VECTORS = [
    fx for fx in VECTORS if all(_is_repo_path(k) for k in fx["keys"] + fx["adds"] + fx["dels"])
]


@pytest.mark.parametrize("fx", PATH_VECTORS, ids=lambda fx: fx["comment"])
def test_vector_as_a_signed_commit_event(fx: dict[str, Any]) -> None:
    # The same key sets and tree shape, with a real record behind every key, so the event's
    # record blocks are checked too (the roots then differ from the vector's). Only vectors
    # whose keys are repository paths (collection/rkey) can be events.
    before, _ = _apply_vector(fx)
    repo = SimRepo(dict.fromkeys(before, NOTE))
    writes: list[Write] = [("create", k, NOTE) for k in fx["adds"]]
    writes += [("delete", k, None) for k in fx["dels"]]
    body = repo.commit(writes)
    got = verify_commit_event(body, KEY.did, did=DID)
    assert got.prev_data == build_mst(dict.fromkeys(before, NOTE_CID))[0]
    assert [(op.action, op.path) for op in got.ops] == [(a, p) for a, p, _ in writes]
    # Leave out any one op: the inversion no longer lands on prevData.
    for i in range(len(body["ops"])):
        short = dict(body, ops=body["ops"][:i] + body["ops"][i + 1 :])
        with pytest.raises(VerificationError, match="inversion does not give prevData"):
            verify_commit_event(short, KEY.did)


def test_vector_proof_without_a_needed_block_says_which() -> None:
    fx = next(fx for fx in VECTORS if fx["comment"] == "merge and split in multi-op commit")
    leaf = CID.parse(fx["leafValue"])
    _, after = _apply_vector(fx)
    root, blocks = build_mst(after)
    proof = {CID.parse(c): blocks[CID.parse(c)] for c in fx["blocksInProof"]}
    for dropped in proof:
        if dropped == root:
            continue
        tree = PartialMst({c: d for c, d in proof.items() if c != dropped}, root)
        tree.context = "undo the test ops"
        with pytest.raises(VerificationError, match=f"missing block {dropped}.*undo the test ops"):
            tree.delete("C2/014073")
            tree.add("B2/827649", leaf)
            tree.add("D2/269196", leaf)
            tree.root_cid()


# --- random trees: the inversion equals a rebuild, on covering proofs, in any order ------------


def _random_case(rng: random.Random) -> tuple[dict[str, CID], dict[str, CID], list[Op]]:
    values = [CID.for_data(encode_dag_cbor({"n": i})) for i in range(4)]
    n = rng.choice([0, 1, 2, 3, 8, 40, 200])
    before = {f"{COLL}/{rng.getrandbits(40):010x}": rng.choice(values) for _ in range(n)}
    after = dict(before)
    ops: list[Op] = []
    touched: set[str] = set()
    for _ in range(rng.choice([1, 1, 2, 4, 9])):
        present = sorted(k for k in after if k not in touched)
        kind = rng.random()
        if kind < 0.4 or not present:
            key = f"{COLL}/{rng.getrandbits(40):010x}"
            if key in after or key in touched:
                continue
            after[key] = rng.choice(values)
            ops.append(("create", key, after[key], None))
        elif kind < 0.7:
            key = rng.choice(present)
            new = rng.choice([v for v in values if v != after[key]])
            ops.append(("update", key, new, after[key]))
            after[key] = new
        else:
            key = rng.choice(present)
            ops.append(("delete", key, None, after.pop(key)))
        touched.add(key)
    return before, after, ops


Op = tuple[str, str, CID | None, CID | None]


def _undo(tree: PartialMst, ops: list[Op]) -> None:
    for action, key, cid, prev in ops:
        if action == "create":
            assert tree.delete(key) == cid
        elif action == "update":
            assert prev is not None
            assert tree.update(key, prev) == cid
        else:
            assert prev is not None and tree.get(key) is None
            tree.add(key, prev)


def test_random_commits_invert_on_their_covering_proofs() -> None:
    rng = random.Random(20250601)
    for _ in range(400):
        before, after, ops = _random_case(rng)
        root_before, _ = build_mst(before)
        root_after, blocks = build_mst(after)
        proof: set[CID] = set()
        for _, key, _, _ in ops:
            proof |= covering_proof(blocks, root_after, key)
        rng.shuffle(ops)
        for available in (blocks, {c: blocks[c] for c in proof}):
            tree = PartialMst(available, root_after)
            _undo(tree, ops)
            assert tree.root_cid() == root_before


EXAMPLE_KEYS = (Path(__file__).parent / "interop" / "mst" / "example_keys.txt").read_text().split()


def test_random_commits_over_keys_of_every_height() -> None:
    # The interop example keys are named for their heights (A0/…, B1/…, C2/…, …), so random
    # sets of them make trees with skipped layers and nodes holding only a subtree.
    rng = random.Random(7)
    values = [CID.for_data(encode_dag_cbor({"n": i})) for i in range(3)]
    for _ in range(300):
        before = {k: rng.choice(values) for k in rng.sample(EXAMPLE_KEYS, rng.randint(0, 40))}
        after = dict(before)
        ops: list[Op] = []
        for key in rng.sample(EXAMPLE_KEYS, rng.randint(1, 6)):
            if key not in after:
                after[key] = rng.choice(values)
                ops.append(("create", key, after[key], None))
            elif rng.random() < 0.5:
                ops.append(("delete", key, None, after.pop(key)))
            else:
                new = rng.choice([v for v in values if v != after[key]])
                ops.append(("update", key, new, after[key]))
                after[key] = new
        root_before, _ = build_mst(before)
        root_after, blocks = build_mst(after)
        proof: set[CID] = set()
        for _, key, _, _ in ops:
            proof |= covering_proof(blocks, root_after, key)
        tree = PartialMst({c: blocks[c] for c in proof}, root_after)
        _undo(tree, ops)
        assert tree.root_cid() == root_before


def test_a_top_left_with_one_unloaded_subtree_is_not_opened() -> None:
    # Undoing the create of the only top-layer key leaves the top holding one subtree, which
    # becomes the root. It need not be in the slice: it did not change, and the root compared
    # afterwards decides (the reference implementation does the same).
    lower = {k: NOTE_CID for k in ("A0/374913", "B0/601692")}  # all below B2/827649
    root_before, blocks_before = build_mst(lower)
    root_after, blocks_after = build_mst({**lower, "B2/827649": NOTE_CID})
    only_new = {c: d for c, d in blocks_after.items() if c not in blocks_before}
    assert root_before not in only_new
    tree = PartialMst(only_new, root_after)
    tree.delete("B2/827649")
    assert tree.root_cid() == root_before


def test_partial_tree_basics() -> None:
    tree = PartialMst({EMPTY_TREE: encode_dag_cbor({"l": None, "e": []})}, EMPTY_TREE)
    assert tree.get("a/b") is None
    tree.add("a/b", NOTE_CID)
    assert tree.get("a/b") == NOTE_CID
    with pytest.raises(VerificationError, match="already in the tree"):
        tree.add("a/b", NOTE_CID)
    with pytest.raises(VerificationError, match="not in the tree"):
        tree.delete("a/c")
    with pytest.raises(VerificationError, match="not in the tree"):
        tree.update("a/c", NOTE_CID)
    assert tree.root_cid() == build_mst({"a/b": NOTE_CID})[0]
    assert tree.delete("a/b") == NOTE_CID
    assert tree.root_cid() == EMPTY_TREE
    # Emptied at a high layer, then refilled lower: the top is the new key's own layer.
    for key in ("F1/085263", "A0/374913"):
        tree.add(key, NOTE_CID)
    assert tree.root_cid() == build_mst(dict.fromkeys(("F1/085263", "A0/374913"), NOTE_CID))[0]


# --- events built here ---------------------------------------------------------------------------

NOTE = {"$type": COLL, "text": "hello"}
NOTE_CID = CID.for_data(encode_dag_cbor(NOTE))
Write = tuple[str, str, dict[str, Any] | None]


class SimRepo:
    """A repository that emits ``#commit`` bodies the way the reference PDS does: the new MST
    nodes, each op's covering proof in the new tree, the new records, the signed commit."""

    def __init__(
        self, records: dict[str, dict[str, Any]] | None = None, *, key: Keypair = KEY
    ) -> None:
        self.key = key
        self.clock = TidClock(clock_id=0, now_us=_ticker())
        self.records: dict[str, dict[str, Any]] = {}
        self.rev: str | None = None
        self.data = EMPTY_TREE
        self.seq = 0
        if records:
            self.commit([("create", k, v) for k, v in records.items()])

    def leaves(self) -> dict[str, CID]:
        return {k: CID.for_data(encode_dag_cbor(v)) for k, v in self.records.items()}

    def commit(self, writes: list[Write]) -> dict[str, Any]:
        before = self.leaves()
        prev_data, since = self.data, self.rev
        ops, new_records = [], {}
        for action, path, record in writes:
            prev = before.get(path)
            if action == "delete":
                del self.records[path]
                ops.append({"action": "delete", "path": path, "cid": None, "prev": prev})
                continue
            assert record is not None
            self.records[path] = record
            data = encode_dag_cbor(record)
            cid = CID.for_data(data)
            new_records[cid] = data
            op: dict[str, Any] = {"action": action, "path": path, "cid": cid}
            if prev is not None:
                op["prev"] = prev
            ops.append(op)
        _, old_nodes = build_mst(before)
        root, nodes = build_mst(self.leaves())
        blocks = {c: d for c, d in nodes.items() if c not in old_nodes}
        for _, path, _ in writes:
            for c in covering_proof(nodes, root, path):
                blocks[c] = nodes[c]
        blocks.update(new_records)
        self.rev = self.clock.next()
        commit_cid, commit_block = sign_commit(self.key, DID, root, self.rev)
        self.data = root
        self.seq += 1
        body: dict[str, Any] = {
            "seq": self.seq,
            "repo": DID,
            "rev": self.rev,
            "since": since,
            "commit": commit_cid,
            "blocks": write_car([commit_cid], [(commit_cid, commit_block), *blocks.items()]),
            "ops": ops,
            "rebase": False,
            "tooBig": False,
            "blobs": [],
            "time": "2024-05-01T12:00:00.000Z",
        }
        if since is not None:
            body["prevData"] = prev_data
        return body


def _ticker() -> Callable[[], int]:
    at = iter(itertools.count(1_700_000_000_000_000, 1_000_000))
    return lambda: next(at)


def _note(i: int) -> dict[str, Any]:
    return {"$type": COLL, "text": f"note {i}", "n": i}


def _note_cid(i: int) -> CID:
    return CID.for_data(encode_dag_cbor(_note(i)))


def _paths(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"{COLL}/3l{rng.getrandbits(50):011x}"[: len(COLL) + 14] for _ in range(n)]


BASE = {p: _note(i) for i, p in enumerate(_paths(60))}


def _mixed_commit() -> tuple[SimRepo, dict[str, Any]]:
    repo = SimRepo(BASE)
    paths = sorted(BASE)
    body = repo.commit(
        [
            ("create", f"{COLL}/3kzzzzzzzzzz2", _note(1000)),
            ("update", paths[3], _note(1003)),
            ("delete", paths[10], None),
            ("delete", paths[11], None),
            ("create", f"com.example.other/{'a' * 12}", _note(1001)),
        ]
    )
    return repo, body


def test_a_mixed_commit_verifies_and_says_what_it_did() -> None:
    repo, body = _mixed_commit()
    got = verify_commit_event(body, KEY.did, did=DID, prev_rev="2222222222222")
    assert isinstance(got, VerifiedCommit)
    assert (got.did, got.rev, got.commit, got.data, got.seq) == (
        DID,
        repo.rev,
        body["commit"],
        repo.data,
        body["seq"],
    )
    assert got.prev_data == body["prevData"] and got.since == body["since"]
    paths = sorted(BASE)
    was = {p: CID.for_data(encode_dag_cbor(r)) for p, r in BASE.items()}
    assert got.ops[0] == RepoOp("create", COLL, "3kzzzzzzzzzz2", _note_cid(1000), None, _note(1000))
    assert got.ops[1].action == "update" and got.ops[1].path == paths[3]
    assert got.ops[1].prev == was[paths[3]] and got.ops[1].record == _note(1003)
    rkey = paths[10].split("/")[1]
    assert got.ops[2] == RepoOp("delete", COLL, rkey, None, was[paths[10]], None)
    assert got.ops[4].collection == "com.example.other"
    # A FirehoseFrame is taken as it is.
    assert verify_commit_event(FirehoseFrame("#commit", body), KEY.did) == got


def test_a_chain_of_commits_links_since_and_prev_data() -> None:
    repo = SimRepo()
    first = verify_commit_event(repo.commit([]), KEY.did)  # the first commit: empty tree
    assert first.since is None and first.prev_data is None and first.data == EMPTY_TREE
    last = first
    rng = random.Random(5)
    paths = _paths(300, seed=2)
    for i in range(0, 300, 30):
        writes: list[Write] = [("create", p, _note(j)) for j, p in enumerate(paths[i : i + 30])]
        for p in rng.sample(sorted(repo.records), min(5, len(repo.records))):
            writes.append(("delete", p, None) if rng.random() < 0.5 else ("update", p, _note(-1)))
        got = verify_commit_event(repo.commit(writes), KEY.did, prev_rev=last.rev)
        assert got.since == last.rev and got.prev_data == last.data
        last = got


def test_a_first_commit_with_records_inverts_to_the_empty_tree() -> None:
    repo = SimRepo()
    body = repo.commit([("create", p, _note(i)) for i, p in enumerate(_paths(20))])
    assert body["since"] is None and "prevData" not in body
    assert len(verify_commit_event(body, KEY.did).ops) == 20
    body["ops"] = body["ops"][1:]  # one record left unaccounted for
    with pytest.raises(VerificationError, match="the empty tree"):
        verify_commit_event(body, KEY.did)


def test_without_prev_data_only_when_allowed() -> None:
    _, body = _mixed_commit()
    del body["prevData"]
    with pytest.raises(VerificationError, match="no prevData"):
        verify_commit_event(body, KEY.did)
    got = verify_commit_event(body, KEY.did, require_prev_data=False)
    assert got.prev_data is None and len(got.ops) == 5
    bad = dict(body, ops=[dict(body["ops"][0], cid=_note_cid(7))])
    with pytest.raises(VerificationError, match="CID mismatch"):
        verify_commit_event(bad, KEY.did, require_prev_data=False)


# --- tampered events -----------------------------------------------------------------------------


def _blocks(body: dict[str, Any]) -> dict[CID, bytes]:
    return read_car(body["blocks"]).blocks


def _with_blocks(body: dict[str, Any], blocks: dict[CID, bytes], *, check: bool = True) -> bytes:
    out = io.BytesIO()
    writer = CarWriter(out, [body["commit"]])
    for cid, data in blocks.items():
        writer.write_block(cid, data, check=check)
    return out.getvalue()


def _record_cid(body: dict[str, Any], i: int) -> CID:
    cid = body["ops"][i]["cid"]
    assert isinstance(cid, CID)
    return cid


def _mst_nodes(body: dict[str, Any]) -> list[CID]:
    ops_cids = {op["cid"] for op in body["ops"]}
    return [c for c in _blocks(body) if c != body["commit"] and c not in ops_cids]


def _flip_byte(body: dict[str, Any]) -> dict[str, Any]:
    blocks = _blocks(body)
    target = _record_cid(body, 0)
    blocks[target] = blocks[target][:-1] + bytes([blocks[target][-1] ^ 1])
    return dict(body, blocks=_with_blocks(body, blocks, check=False))


def _drop(body: dict[str, Any], cid: CID) -> dict[str, Any]:
    return dict(
        body, blocks=_with_blocks(body, {c: d for c, d in _blocks(body).items() if c != cid})
    )


def _op(body: dict[str, Any], i: int, **change: Any) -> dict[str, Any]:
    ops = [dict(op) for op in body["ops"]]
    ops[i].update(change)
    return dict(body, ops=ops)


def _resigned(body: dict[str, Any], change: dict[str, Any], key: Keypair = KEY) -> dict[str, Any]:
    blocks = _blocks(body)
    raw = decode_dag_cbor(blocks.pop(body["commit"]))
    raw.update(change)
    unsigned = {k: v for k, v in raw.items() if k != "sig"}
    block = encode_dag_cbor(dict(unsigned, sig=key.sign(encode_dag_cbor(unsigned))))
    cid = CID.for_data(block)
    blocks = {cid: block, **blocks}
    return dict(body, commit=cid, blocks=_with_blocks(dict(body, commit=cid), blocks))


OTHER_KEY = generate_keypair("p256")

ELSEWHERE = f"{COLL}/3zzzzzzzzzzz2"
NO_PREV = "does not give prevData"


def _ops(body: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(body, ops=ops)


TAMPERED: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str]] = [
    ("flipped byte in a record", _flip_byte, "CID mismatch at block"),
    ("record block dropped", lambda b: _drop(b, _record_cid(b, 0)), "missing block .*record"),
    ("commit block dropped", lambda b: _drop(b, b["commit"]), "missing block .*commit"),
    ("MST root dropped", lambda b: _drop(b, _data(b)), "missing block"),
    ("create names another CID", lambda b: _op(b, 0, cid=_note_cid(99)), "CID mismatch"),
    ("update names another CID", lambda b: _op(b, 1, cid=_record_cid(b, 0)), "CID mismatch"),
    ("update's prev changed", lambda b: _op(b, 1, prev=_note_cid(99)), NO_PREV),
    ("delete's prev changed", lambda b: _op(b, 2, prev=_note_cid(99)), NO_PREV),
    ("delete made an update", lambda b: _op(b, 2, action="update", cid=_note_cid(9)), "not hold"),
    ("a delete left out", lambda b: _ops(b, b["ops"][:2] + b["ops"][3:]), NO_PREV),
    (
        "an extra delete",
        lambda b: _ops(b, [*b["ops"], {**b["ops"][2], "path": ELSEWHERE}]),
        NO_PREV,
    ),
    (
        "an extra create",
        lambda b: _ops(b, [*b["ops"], {**b["ops"][0], "path": ELSEWHERE}]),
        "not hold",
    ),
    ("prevData changed", lambda b: dict(b, prevData=_note_cid(1)), NO_PREV),
    ("signed by another key", lambda b: _resigned(b, {}, OTHER_KEY), "bad signature"),
    ("commit for another DID", lambda b: _resigned(b, {"did": "did:plc:" + "a" * 24}), "wrong DID"),
    ("event rev not the commit's", lambda b: dict(b, rev="3kzzzzzzzzzz2"), "rev mismatch"),
    ("since not before rev", lambda b: dict(b, since="3zzzzzzzzzzz2"), "'since' .* not before"),
    ("CAR rooted elsewhere", lambda b: dict(b, commit=_note_cid(1)), "is not the commit"),
    ("truncated blocks", lambda b: dict(b, blocks=b["blocks"][:-3]), "truncated CAR"),
    ("ops not a list", lambda b: dict(b, ops={}), "'ops' is missing"),
    ("no commit", lambda b: {k: v for k, v in b.items() if k != "commit"}, "'commit' is missing"),
    ("blocks not bytes", lambda b: dict(b, blocks="x"), "'blocks' is missing"),
    ("repo not a DID", lambda b: dict(b, repo="alice"), "malformed #commit event"),
    ("unknown action", lambda b: _op(b, 0, action="upsert"), "action 'upsert'"),
    ("path without rkey", lambda b: _op(b, 0, path=COLL), "not collection/rkey"),
    ("bad rkey", lambda b: _op(b, 0, path=f"{COLL}/.."), "not collection/rkey"),
    ("update without prev", lambda b: _op(b, 1, prev=None), "no 'prev'"),
    ("delete without prev", lambda b: _op(b, 2, prev=None), "no 'prev'"),
    ("delete with a record CID", lambda b: _op(b, 2, cid=_note_cid(1)), "names a record CID"),
    ("create without a CID", lambda b: _op(b, 0, cid=None), "no record CID"),
    ("cid not a link", lambda b: _op(b, 0, cid=str(_note_cid(1))), "not a CID"),
    ("same path twice", lambda b: _ops(b, [*b["ops"], b["ops"][2]]), "more than one op"),
    ("too many ops", lambda b: _ops(b, b["ops"] * 41), "over the limit of 200"),
    ("blocks over 2 MB", lambda b: dict(b, blocks=b["blocks"] + bytes(2_000_000)), "over the 2"),
]


def _data(body: dict[str, Any]) -> CID:
    data = decode_dag_cbor(_blocks(body)[body["commit"]])["data"]
    assert isinstance(data, CID)
    return data


@pytest.mark.parametrize(("name", "tamper", "why"), TAMPERED, ids=[t[0] for t in TAMPERED])
def test_tampered_events_are_rejected(
    name: str, tamper: Callable[[dict[str, Any]], dict[str, Any]], why: str
) -> None:
    _, body = _mixed_commit()
    verify_commit_event(body, KEY.did, did=DID)  # the untouched event is fine
    with pytest.raises(VerificationError, match=why):
        verify_commit_event(tamper(body), KEY.did, did=DID)


def test_an_mst_node_the_inversion_needs_is_missing() -> None:
    _, body = _mixed_commit()
    for node in _mst_nodes(body):
        if node == _data(body):
            continue
        with pytest.raises(VerificationError, match=f"missing block {node}"):
            verify_commit_event(_drop(body, node), KEY.did)


def test_did_and_rev_order_and_clock() -> None:
    repo, body = _mixed_commit()
    with pytest.raises(VerificationError, match="wrong DID"):
        verify_commit_event(body, KEY.did, did="did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
    for prev_rev in (repo.rev, "3zzzzzzzzzzzz"):
        with pytest.raises(VerificationError, match="stale rev"):
            verify_commit_event(body, KEY.did, prev_rev=prev_rev)
    # The fixed clock behind SimRepo says late 2023: a verifier living a day earlier sees it as
    # from the future; ten minutes of drift is still too much, the default five minutes is not.
    with pytest.raises(VerificationError, match="in the future"):
        verify_commit_event(body, KEY.did, now=1_700_000_000.0 - 86_400)
    assert verify_commit_event(body, KEY.did, now=1_700_000_000.0)
    with pytest.raises(VerificationError, match="in the future"):
        verify_commit_event(body, KEY.did, now=1_700_000_000.0, max_clock_skew=0)


def test_a_frame_of_another_type_is_refused() -> None:
    with pytest.raises(VerificationError, match="#identity, not #commit"):
        verify_commit_event(FirehoseFrame("#identity", {"did": DID}), KEY.did)


def test_an_oversized_record_is_refused() -> None:
    repo = SimRepo(BASE)
    body = repo.commit(
        [("create", f"{COLL}/3kzzzzzzzzzz2", {"$type": COLL, "b": b"x" * 1_000_001})]
    )
    with pytest.raises(VerificationError, match="over 1000000"):
        verify_commit_event(body, KEY.did)


# --- the real reference PDS: every live frame verifies -------------------------------------------

PDS_COLL = "com.example.atsync.commitEvent"


async def _signing_key(pds: DevPDS, did: str) -> str:
    resolver = IdentityResolver(
        plc_url=pds.plc_url,
        use_dns=False,
        web_origin=lambda host: pds.pds_url,
        allow_test_handles=True,
    )
    return (await resolver.resolve(did)).signing_key


def _pds_note(text: str) -> dict[str, Any]:
    return {"$type": PDS_COLL, "text": text, "createdAt": "2024-05-01T12:00:00.000Z"}


async def _write_everything(client: XrpcClient, did: str) -> int:
    """Creates, updates, deletes, multi-op applyWrites; returns the number of commits made."""
    clock = TidClock()
    commits = 0
    rkeys = []
    for i in range(30):
        rkeys.append(clock.next())
        await client.create_record(did, PDS_COLL, _pds_note(f"single {i}"), rkey=rkeys[-1])
        commits += 1
    for i, rkey in enumerate(rkeys[:10]):
        await client.put_record(did, PDS_COLL, rkey, _pds_note(f"updated {i}"))
        commits += 1
    for rkey in rkeys[10:20]:
        await client.delete_record(did, PDS_COLL, rkey)
        commits += 1
    batch = [clock.next() for _ in range(150)]
    await client.apply_writes(did, [Create(PDS_COLL, _pds_note(f"b{k}"), rkey=k) for k in batch])
    mixed = [clock.next() for _ in range(40)]
    await client.apply_writes(
        did,
        [
            *(Create(PDS_COLL, _pds_note("mixed"), rkey=k) for k in mixed),
            *(Update(PDS_COLL, k, _pds_note("mixed update")) for k in batch[:40]),
            *(Delete(PDS_COLL, k) for k in batch[40:140]),
            *(Delete(PDS_COLL, k) for k in rkeys[20:]),
        ],
    )
    # Every remaining record of the collection goes, so upper layers of the tree empty out.
    rest = rkeys[:10] + batch[:40] + batch[140:] + mixed
    await client.apply_writes(did, [Delete(PDS_COLL, k) for k in rest])
    return commits + 3


async def _verify_stream(
    sub: FirehoseSubscription, keys: dict[str, str], want: int, did: str
) -> list[VerifiedCommit]:
    """Verify every #commit frame, checking each repo's chain (``since``/``prevData`` equal
    the last verified ``rev``/``data``); stop after ``want`` commits of ``did``."""
    last: dict[str, VerifiedCommit] = {}
    mine: list[VerifiedCommit] = []
    async for frame in sub:
        if frame.type != "#commit":
            continue
        repo = frame.body["repo"]
        before = last.get(repo)
        got = verify_commit_event(
            frame, keys[repo], did=repo, prev_rev=before.rev if before else None
        )
        if before is not None:
            assert (got.since, got.prev_data) == (before.rev, before.data)
        last[repo] = got
        if repo == did:
            mine.append(got)
            if len(mine) == want:
                return mine
    raise AssertionError("the stream ended")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_every_frame_of_the_reference_pds_verifies(make_pds: MakePDS) -> None:
    pds = make_pds()
    handle, password = ACCOUNTS[0]
    did = pds.accounts[handle].did
    keys = {a.did: await _signing_key(pds, a.did) for a in pds.accounts.values()}
    session = await login(handle, password, pds.pds_url)
    async with XrpcClient(session=session) as client:
        # Live: subscribed before writing, every frame checked as it comes.
        made: list[int] = []

        async def write() -> None:
            made.append(await _write_everything(client, did))

        async with client.subscribe_repos() as sub, anyio.create_task_group() as tg:
            tg.start_soon(write)
            with anyio.fail_after(120):
                live = await _verify_stream(sub, keys, 53, did)
        assert made == [53]
        kinds = [tuple(sorted({op.action for op in c.ops})) for c in live]
        assert kinds.count(("create",)) == 31 and kinds.count(("update",)) == 10
        assert kinds.count(("delete",)) == 11 and ("create", "delete", "update") in kinds
        assert [len(c.ops) for c in live[-3:]] == [150, 190, 100]
        assert all(op.record is not None for c in live for op in c.ops if op.action != "delete")

        # Replayed from the start: each account's creation (its first commit, from the empty
        # tree), then everything above, every repo's chain unbroken.
        async with client.subscribe_repos(cursor=0) as sub:
            with anyio.fail_after(120):
                replay = await _verify_stream(sub, keys, 54, did)
        assert replay[0].since is None and replay[0].prev_data is None
        assert replay[0].data == replay[1].prev_data
        assert [c.commit for c in replay[1:]] == [c.commit for c in live]

        # A real multi-op frame, tampered: an op left out, or checked with another's key.
        mixed = live[-2]
        async with client.subscribe_repos(cursor=(mixed.seq or 0) - 1) as sub:
            with anyio.fail_after(30):
                frame = await sub.next_frame()
                while frame.seq != mixed.seq:
                    frame = await sub.next_frame()
        assert verify_commit_event(frame, keys[did]) == mixed
        short = dict(frame.body, ops=frame.body["ops"][1:])
        with pytest.raises(VerificationError, match="inversion does not give prevData"):
            verify_commit_event(short, keys[did])
        bob = pds.accounts[ACCOUNTS[1][0]].did
        with pytest.raises(VerificationError, match="bad signature"):
            verify_commit_event(frame, keys[bob])

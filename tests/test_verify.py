"""Commit signatures, record proofs and full-repo walks over CARs built and tampered here."""

from __future__ import annotations

import io
from typing import Any

import pytest

from atsync._errors import InvalidSyntaxError, VerificationError
from atsync.atproto._car import CarWriter, read_car, write_car
from atsync.atproto._cbor import CID, decode_dag_cbor, encode_dag_cbor
from atsync.atproto._crypto import Keypair, generate_keypair, load_keypair
from atsync.atproto._mst import build_mst, mst_lookup
from atsync.atproto._syntax import TidClock
from atsync.atproto._verify import (
    RepoRecord,
    iter_repo_records,
    sign_commit,
    verify_commit,
    verify_record_proof,
)

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
KEY = load_keypair(
    "k256", bytes.fromhex("9085d2bef69286a6cbb51623c8fa258629945cd55ca705cc4e66700396894e0c")
)
CLOCK = TidClock(clock_id=0, now_us=lambda: 1_700_000_000_000_000)
COLL = "com.example.note"


def _records(n: int) -> dict[str, dict[str, Any]]:
    return {
        f"{COLL}/{CLOCK.next()}": {"$type": COLL, "text": f"note {i}", "n": i} for i in range(n)
    }


RECORDS = _records(60)


class Repo:
    """A signed repo held as blocks, so tests can cut proofs out of it and tamper with them."""

    def __init__(
        self, records: dict[str, dict[str, Any]], key: Keypair = KEY, did: str = DID
    ) -> None:
        self.records = records
        self.record_blocks: dict[CID, bytes] = {}
        leaves: dict[str, CID] = {}
        for path, rec in records.items():
            data = encode_dag_cbor(rec)
            cid = CID.for_data(data)
            self.record_blocks[cid] = data
            leaves[path] = cid
        self.leaves = leaves
        self.data_root, self.mst_blocks = build_mst(leaves)
        self.commit_cid, self.commit_block = sign_commit(key, did, self.data_root, CLOCK.next())

    def all_blocks(self) -> dict[CID, bytes]:
        return {self.commit_cid: self.commit_block, **self.mst_blocks, **self.record_blocks}

    def car(self) -> bytes:
        return write_car([self.commit_cid], self.all_blocks().items())

    def proof_car(self, path: str) -> bytes:
        """What getRecord returns: commit, the MST path, and the record if present."""
        value, nodes = mst_lookup(self.mst_blocks, self.data_root, path)
        blocks = [(self.commit_cid, self.commit_block)]
        blocks += [(c, self.mst_blocks[c]) for c in nodes]
        if value is not None:
            blocks.append((value, self.record_blocks[value]))
        return write_car([self.commit_cid], blocks)


REPO = Repo(RECORDS)


def _resign(raw: dict[str, Any], key: Keypair = KEY) -> tuple[CID, bytes]:
    unsigned = {k: v for k, v in raw.items() if k != "sig"}
    block = encode_dag_cbor(dict(unsigned, sig=key.sign(encode_dag_cbor(unsigned))))
    return CID.for_data(block), block


# --- commits -----------------------------------------------------------------------------------


def test_verify_commit() -> None:
    commit = verify_commit(REPO.all_blocks(), REPO.commit_cid, DID, KEY.did)
    assert commit.did == DID
    assert commit.version == 3
    assert commit.data == REPO.data_root
    assert commit.prev is None
    assert commit.cid == REPO.commit_cid
    assert len(commit.sig) == 64
    # The (alg, public key) form and the string CID are accepted too.
    pair = (KEY.alg, KEY.public_bytes_compressed())
    assert verify_commit(REPO.all_blocks(), str(REPO.commit_cid), DID, pair) == commit


@pytest.mark.parametrize("alg", ["p256", "k256"])
def test_commits_signed_with_either_curve_verify(alg: str) -> None:
    key = generate_keypair(alg)  # type: ignore[arg-type]
    repo = Repo(_records(3), key=key)
    assert verify_commit(repo.all_blocks(), repo.commit_cid, DID, key.did).data == repo.data_root


def test_wrong_did() -> None:
    with pytest.raises(VerificationError, match="wrong DID"):
        verify_commit(REPO.all_blocks(), REPO.commit_cid, "did:plc:someoneelse", KEY.did)


def test_wrong_key() -> None:
    other = generate_keypair("k256")
    with pytest.raises(VerificationError, match="bad signature"):
        verify_commit(REPO.all_blocks(), REPO.commit_cid, DID, other.did)


def test_high_s_commit_signature_is_rejected() -> None:
    raw = decode_dag_cbor(REPO.commit_block)
    n = 0xFFFFFFFF_FFFFFFFF_FFFFFFFF_FFFFFFFE_BAAEDCE6_AF48A03B_BFD25E8C_D0364141
    s = int.from_bytes(raw["sig"][32:], "big")
    raw["sig"] = raw["sig"][:32] + (n - s).to_bytes(32, "big")
    block = encode_dag_cbor(raw)
    cid = CID.for_data(block)
    with pytest.raises(VerificationError, match="bad signature"):
        verify_commit({cid: block}, cid, DID, KEY.did)


def test_edited_commit_field_breaks_the_signature() -> None:
    raw = decode_dag_cbor(REPO.commit_block)
    raw["rev"] = "3zzzzzzzzzzzz"  # keep the old signature
    block = encode_dag_cbor(raw)
    cid = CID.for_data(block)
    with pytest.raises(VerificationError, match="bad signature"):
        verify_commit({cid: block}, cid, DID, KEY.did)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"version": 2}, "unsupported version 2"),
        ({"version": True}, "unsupported version"),
        ({"did": 5}, "must be strings"),
        ({"did": "not a did"}, "invalid DID"),
        ({"rev": "nope"}, "invalid TID"),
        ({"data": "bafy"}, "'data' is not"),
        ({"prev": b"x"}, "'prev'"),
        ({"sig": None}, "'sig'"),
    ],
)
def test_malformed_commits(change: dict[str, Any], why: str) -> None:
    raw = decode_dag_cbor(REPO.commit_block)
    raw.update(change)
    if "sig" in change:
        block = encode_dag_cbor(raw)
        cid = CID.for_data(block)
    else:
        cid, block = _resign(raw)
    with pytest.raises(VerificationError, match=why):
        verify_commit({cid: block}, cid, DID, KEY.did)


def test_commit_that_is_not_a_map_or_not_cbor() -> None:
    for block in (encode_dag_cbor([1, 2]), b"\xff\x00"):
        cid = CID.for_data(block)
        with pytest.raises(VerificationError, match="malformed commit"):
            verify_commit({cid: block}, cid, DID, KEY.did)


def test_missing_commit_block() -> None:
    with pytest.raises(VerificationError, match=f"missing block {REPO.commit_cid}"):
        verify_commit(REPO.mst_blocks, REPO.commit_cid, DID, KEY.did)


def test_extra_commit_fields_are_covered_by_the_signature() -> None:
    raw = decode_dag_cbor(REPO.commit_block)
    raw["extra"] = "signed too"
    cid, block = _resign(raw)
    assert verify_commit({cid: block}, cid, DID, KEY.did).cid == cid
    raw2 = decode_dag_cbor(block)
    raw2["extra"] = "changed after signing"
    block2 = encode_dag_cbor(raw2)
    cid2 = CID.for_data(block2)
    with pytest.raises(VerificationError, match="bad signature"):
        verify_commit({cid2: block2}, cid2, DID, KEY.did)


# --- record proofs -----------------------------------------------------------------------------


def test_record_proof_for_every_record() -> None:
    for path, rec in RECORDS.items():
        collection, rkey = path.split("/")
        cid, record = verify_record_proof(REPO.proof_car(path), DID, KEY.did, collection, rkey)
        assert record == rec
        assert cid == REPO.leaves[path]


def test_record_proof_of_absence() -> None:
    path = f"{COLL}/3zzzzzzzzzzzz"
    assert verify_record_proof(REPO.proof_car(path), DID, KEY.did, COLL, "3zzzzzzzzzzzz") == (
        None,
        None,
    )


def test_record_proof_accepts_a_file_object_and_a_parsed_car() -> None:
    path = next(iter(RECORDS))
    rkey = path.split("/")[1]
    car = REPO.proof_car(path)
    assert verify_record_proof(io.BytesIO(car), DID, KEY.did, COLL, rkey)[1] == RECORDS[path]
    assert verify_record_proof(read_car(car), DID, KEY.did, COLL, rkey)[1] == RECORDS[path]


def test_proof_without_the_record_block_fails() -> None:
    path = next(iter(RECORDS))
    car = read_car(REPO.proof_car(path))
    del car.blocks[REPO.leaves[path]]
    with pytest.raises(VerificationError, match=f"missing block {REPO.leaves[path]}"):
        verify_record_proof(car, DID, KEY.did, COLL, path.split("/")[1])


def test_proof_missing_an_mst_node_fails() -> None:
    # The deepest record makes the proof cover the most nodes.
    path = max(RECORDS, key=lambda p: len(mst_lookup(REPO.mst_blocks, REPO.data_root, p)[1]))
    car = read_car(REPO.proof_car(path))
    _, nodes = mst_lookup(REPO.mst_blocks, REPO.data_root, path)
    assert len(nodes) >= 2
    del car.blocks[nodes[-1]]
    with pytest.raises(VerificationError, match=f"missing block {nodes[-1]}"):
        verify_record_proof(car, DID, KEY.did, COLL, path.split("/")[1])


def test_proof_with_swapped_record_content_fails_at_the_car_layer() -> None:
    path = next(iter(RECORDS))
    cid = REPO.leaves[path]
    forged = encode_dag_cbor({"$type": COLL, "text": "forged"})
    buf = io.BytesIO()
    w = CarWriter(buf, [REPO.commit_cid])
    w.write_block(REPO.commit_cid, REPO.commit_block)
    for node in mst_lookup(REPO.mst_blocks, REPO.data_root, path)[1]:
        w.write_block(node, REPO.mst_blocks[node])
    w.write_block(cid, forged, check=False)
    with pytest.raises(VerificationError, match=f"CID mismatch at block {cid}"):
        verify_record_proof(buf.getvalue(), DID, KEY.did, COLL, path.split("/")[1])


def test_proof_with_swapped_record_in_an_unchecked_mapping_fails_too() -> None:
    # Callers may hand over their own block mapping; it is re-hashed on every read.
    path = next(iter(RECORDS))
    car = read_car(REPO.proof_car(path))
    car.blocks[REPO.leaves[path]] = encode_dag_cbor({"$type": COLL, "text": "forged"})
    with pytest.raises(VerificationError, match="CID mismatch at block"):
        verify_record_proof(car, DID, KEY.did, COLL, path.split("/")[1])


def test_proof_from_a_different_signer_fails() -> None:
    intruder = generate_keypair("k256")
    forged = Repo({f"{COLL}/3jzfcijpj2z2a": {"$type": COLL, "text": "hi"}}, key=intruder)
    with pytest.raises(VerificationError, match="bad signature"):
        verify_record_proof(
            forged.proof_car(f"{COLL}/3jzfcijpj2z2a"), DID, KEY.did, COLL, "3jzfcijpj2z2a"
        )


def test_proof_with_a_truncated_car() -> None:
    path = next(iter(RECORDS))
    car = REPO.proof_car(path)
    with pytest.raises(VerificationError, match="truncated CAR"):
        verify_record_proof(car[:-10], DID, KEY.did, COLL, path.split("/")[1])


def test_proof_rejects_bad_collection_or_rkey_from_the_caller() -> None:
    with pytest.raises(InvalidSyntaxError):
        verify_record_proof(REPO.car(), DID, KEY.did, "not-an-nsid", "abc")
    with pytest.raises(InvalidSyntaxError):
        verify_record_proof(REPO.car(), DID, KEY.did, COLL, "..")


def test_record_block_breaking_the_data_model_is_reported() -> None:
    bad = {f"{COLL}/3jzfcijpj2z2a": {"$type": "", "text": "x"}}
    repo = Repo(bad)
    with pytest.raises(VerificationError, match=r"record com\.example\.note/3jzfcijpj2z2a"):
        verify_record_proof(
            repo.proof_car(f"{COLL}/3jzfcijpj2z2a"), DID, KEY.did, COLL, "3jzfcijpj2z2a"
        )


# --- full repositories ---------------------------------------------------------------------------


def test_iter_repo_records_yields_everything_in_order() -> None:
    out = list(iter_repo_records(REPO.car(), did=DID, signing_key=KEY.did))
    assert [f"{r.collection}/{r.rkey}" for r in out] == sorted(RECORDS)
    for r in out:
        assert isinstance(r, RepoRecord)
        assert r.record == RECORDS[f"{r.collection}/{r.rkey}"]
        assert r.cid == REPO.leaves[f"{r.collection}/{r.rkey}"]


def test_iter_repo_records_several_collections_and_empty_repo() -> None:
    recs = {
        "app.bsky.feed.post/3jzfcijpj2z2a": {"$type": "app.bsky.feed.post", "text": "a"},
        "app.bsky.actor.profile/self": {"$type": "app.bsky.actor.profile"},
        f"{COLL}/3jzfcijpj2z2b": {"$type": COLL, "text": "b"},
    }
    got = {(r.collection, r.rkey) for r in iter_repo_records(Repo(recs).car())}
    assert got == {tuple(p.split("/")) for p in recs}
    assert list(iter_repo_records(Repo({}).car(), did=DID, signing_key=KEY.did)) == []


def test_iter_repo_records_checks_signature_and_did_when_asked() -> None:
    with pytest.raises(VerificationError, match="bad signature"):
        list(iter_repo_records(REPO.car(), did=DID, signing_key=generate_keypair("k256").did))
    with pytest.raises(VerificationError, match="wrong DID"):
        list(iter_repo_records(REPO.car(), did="did:plc:other"))
    with pytest.raises(VerificationError, match="needs its DID"):
        list(iter_repo_records(REPO.car(), signing_key=KEY.did))


def test_iter_repo_records_reports_a_missing_record() -> None:
    car = read_car(REPO.car())
    victim = list(REPO.leaves.values())[5]
    del car.blocks[victim]
    with pytest.raises(VerificationError, match=f"missing block {victim}"):
        list(iter_repo_records(car))


def test_iter_repo_records_reports_a_missing_mst_node() -> None:
    car = read_car(REPO.car())
    victim = next(c for c in REPO.mst_blocks if c != REPO.data_root)
    del car.blocks[victim]
    with pytest.raises(VerificationError, match=f"missing block {victim}"):
        list(iter_repo_records(car))


def test_iter_repo_records_rejects_keys_that_are_not_repo_paths() -> None:
    repo = Repo({"no-slash-here": {"$type": COLL}})
    with pytest.raises(VerificationError, match="malformed repo path"):
        list(iter_repo_records(repo.car()))
    repo = Repo({"Not_An_NSID/abc": {"$type": COLL}})
    with pytest.raises(VerificationError, match="malformed repo path"):
        list(iter_repo_records(repo.car()))


def test_a_partial_car_from_a_since_diff_is_not_a_full_repo() -> None:
    # A getRepo?since= CAR carries only changed blocks: walking it as a full repo must fail
    # loudly rather than yield a silently partial record set.
    blocks = [
        (REPO.commit_cid, REPO.commit_block),
        (REPO.data_root, REPO.mst_blocks[REPO.data_root]),
    ]
    with pytest.raises(VerificationError, match="missing block"):
        list(iter_repo_records(write_car([REPO.commit_cid], blocks)))

"""Real proofs from the reference PDS, tampered in every way a proof can be: all rejected."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from atsync._errors import VerificationError
from atsync.atproto._car import CarWriter, read_car
from atsync.atproto._cbor import CID, decode_dag_cbor, encode_dag_cbor
from atsync.atproto._crypto import did_key_from_verification_method
from atsync.atproto._devpds import DevPDS
from atsync.atproto._verify import verify_record_proof
from pds_fixtures import ACCOUNTS

pytestmark = pytest.mark.pds

COLL = "com.example.atsync.tamperTest"


@pytest.fixture(scope="module")
def proof(dev_pds: DevPDS) -> dict[str, Any]:
    handle, password = ACCOUNTS[1]
    session = httpx.post(
        f"{dev_pds.pds_url}/xrpc/com.atproto.server.createSession",
        json={"identifier": handle, "password": password},
    ).json()
    did = session["did"]
    auth = {"Authorization": f"Bearer {session['accessJwt']}"}
    for i in range(40):  # enough records for a proof with several MST nodes
        httpx.post(
            f"{dev_pds.pds_url}/xrpc/com.atproto.repo.putRecord",
            headers=auth,
            json={
                "repo": did,
                "collection": COLL,
                "rkey": f"r{i:03d}",
                "record": {"$type": COLL, "text": f"record {i}"},
            },
        ).raise_for_status()
    car = httpx.get(
        f"{dev_pds.pds_url}/xrpc/com.atproto.sync.getRecord",
        params={"did": did, "collection": COLL, "rkey": "r007"},
    ).content
    doc = httpx.get(f"{dev_pds.plc_url}/{did}").json()
    [method] = [m for m in doc["verificationMethod"] if m["id"].endswith("#atproto")]
    key = did_key_from_verification_method(method["type"], method["publicKeyMultibase"])
    return {"car": car, "did": did, "key": key}


def check(car: bytes, proof: dict[str, Any], did: str | None = None) -> Any:
    return verify_record_proof(car, did or proof["did"], proof["key"], COLL, "r007")


def rebuild(
    car: bytes,
    change: Callable[[CID, bytes, dict[str, Any]], bytes | None],
    *,
    recompute: bool = False,
) -> bytes:
    """Re-write the CAR with ``change`` applied to each block (None drops it). With
    ``recompute`` a changed block gets its true CID (and becomes the root if it was)."""
    parsed = read_car(car)
    commit = decode_dag_cbor(parsed.blocks[parsed.root])
    out = io.BytesIO()
    blocks: list[tuple[CID, bytes]] = []
    root = parsed.root
    for cid, data in parsed.blocks.items():
        kind = "commit" if cid == parsed.root else ("record" if _is_record(data) else "node")
        new = change(cid, data, {"kind": kind, "commit": commit})
        if new is None:
            continue
        if recompute and new != data:
            new_cid = CID.for_data(new)
            root = new_cid if cid == parsed.root else root
            cid = new_cid
        blocks.append((cid, new))
    writer = CarWriter(out, [root])
    for cid, data in blocks:
        writer.write_block(cid, data, check=False)
    return out.getvalue()


def _is_record(data: bytes) -> bool:
    value = decode_dag_cbor(data)
    return isinstance(value, dict) and value.get("$type") == COLL


def flip(kind: str) -> Callable[[CID, bytes, dict[str, Any]], bytes]:
    def change(cid: CID, data: bytes, info: dict[str, Any]) -> bytes:
        if info["kind"] != kind:
            return data
        mutable = bytearray(data)
        mutable[len(mutable) // 2] ^= 0x01
        return bytes(mutable)

    return change


def test_the_untouched_proof_verifies(proof: dict[str, Any]) -> None:
    cid, record = check(proof["car"], proof)
    assert cid is not None and record == {"$type": COLL, "text": "record 7"}


@pytest.mark.parametrize("kind", ["record", "node", "commit"])
def test_a_flipped_byte_in_any_block_is_rejected(proof: dict[str, Any], kind: str) -> None:
    with pytest.raises(VerificationError, match=r"CID|hash|does not match"):
        check(rebuild(proof["car"], flip(kind)), proof)


def test_a_flipped_signature_byte_is_rejected_even_with_a_consistent_cid(
    proof: dict[str, Any],
) -> None:
    def bad_sig(cid: CID, data: bytes, info: dict[str, Any]) -> bytes:
        if info["kind"] != "commit":
            return data
        commit = dict(info["commit"])
        sig = bytearray(commit["sig"])
        sig[5] ^= 0x01
        commit["sig"] = bytes(sig)
        return encode_dag_cbor(commit)

    with pytest.raises(VerificationError, match="signature"):
        check(rebuild(proof["car"], bad_sig, recompute=True), proof)


def test_a_rewritten_record_is_rejected(proof: dict[str, Any]) -> None:
    def forged(cid: CID, data: bytes, info: dict[str, Any]) -> bytes:
        if info["kind"] != "record":
            return data
        return encode_dag_cbor({"$type": COLL, "text": "forged"})

    with pytest.raises(VerificationError):
        check(rebuild(proof["car"], forged, recompute=True), proof)


def test_a_missing_block_is_rejected(proof: dict[str, Any]) -> None:
    dropped = rebuild(proof["car"], lambda c, d, i: None if i["kind"] == "node" else d)
    with pytest.raises(VerificationError, match="missing"):
        check(dropped, proof)


def test_a_wrong_did_and_a_wrong_key_are_rejected(proof: dict[str, Any]) -> None:
    with pytest.raises(VerificationError):
        check(proof["car"], proof, did="did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
    other = {**proof, "key": "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme"}
    with pytest.raises(VerificationError, match="signature"):
        check(proof["car"], other)


@pytest.mark.parametrize("cut", [1, 10, 100, -1])
def test_a_truncated_file_is_rejected(proof: dict[str, Any], cut: int) -> None:
    car = proof["car"]
    truncated = car[:cut]
    with pytest.raises(VerificationError):
        check(truncated, proof)

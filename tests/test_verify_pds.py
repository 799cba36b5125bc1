"""The pure protocol core against CARs, CIDs and keys from the real reference PDS."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from atsync._errors import VerificationError
from atsync.atproto._car import read_car
from atsync.atproto._cbor import CID, cid_for_record, data_from_json
from atsync.atproto._crypto import did_key_from_verification_method
from atsync.atproto._devpds import DevPDS
from atsync.atproto._syntax import TidClock
from atsync.atproto._verify import iter_repo_records, verify_commit, verify_record_proof
from pds_fixtures import ACCOUNTS

pytestmark = pytest.mark.pds

COLL = "com.example.atsync.proofTest"
CLOCK = TidClock()


def _session(pds: DevPDS) -> dict[str, str]:
    handle, password = ACCOUNTS[0]
    resp = httpx.post(
        f"{pds.pds_url}/xrpc/com.atproto.server.createSession",
        json={"identifier": handle, "password": password},
    )
    assert resp.status_code == 200, resp.text
    session: dict[str, str] = resp.json()
    return session


def _put(pds: DevPDS, session: dict[str, str], rkey: str, record: dict[str, Any]) -> str:
    resp = httpx.post(
        f"{pds.pds_url}/xrpc/com.atproto.repo.putRecord",
        headers={"Authorization": f"Bearer {session['accessJwt']}"},
        json={"repo": session["did"], "collection": COLL, "rkey": rkey, "record": record},
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["cid"])


def _signing_key(pds: DevPDS, did: str) -> str:
    doc = httpx.get(f"{pds.plc_url}/{did}").json()
    [method] = [m for m in doc["verificationMethod"] if m["id"].endswith("#atproto")]
    return did_key_from_verification_method(method["type"], method["publicKeyMultibase"])


def _record(text: str) -> dict[str, Any]:
    # Links and bytes exercise the CID-vs-bytes distinction that libipld blurs.
    return {
        "$type": COLL,
        "text": text,
        "n": -42,
        "nested": {"list": [1, None, True, "x"], "empty": {}},
        "link": {"$link": "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a"},
        "raw": {"$bytes": "AXESIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
        "createdAt": "2024-05-01T12:00:00.000Z",
    }


def test_local_cid_equals_the_pds_cid(dev_pds: DevPDS) -> None:
    session = _session(dev_pds)
    for i in range(3):
        record = _record(f"cid check {i} ✓")
        pds_cid = _put(dev_pds, session, CLOCK.next(), record)
        assert cid_for_record(data_from_json(record)) == pds_cid


def test_get_record_proof_verifies(dev_pds: DevPDS) -> None:
    session = _session(dev_pds)
    did = session["did"]
    rkey = CLOCK.next()
    record = _record("proof")
    pds_cid = _put(dev_pds, session, rkey, record)
    key = _signing_key(dev_pds, did)
    resp = httpx.get(
        f"{dev_pds.pds_url}/xrpc/com.atproto.sync.getRecord",
        params={"did": did, "collection": COLL, "rkey": rkey},
    )
    assert resp.status_code == 200, resp.text
    cid, got = verify_record_proof(resp.content, did, key, COLL, rkey)
    assert str(cid) == pds_cid
    assert got == data_from_json(record)
    # The same proof under another DID or key must fail.
    with pytest.raises(VerificationError, match="wrong DID"):
        verify_record_proof(resp.content, "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", key, COLL, rkey)
    other = _signing_key(dev_pds, dev_pds.accounts[ACCOUNTS[1][0]].did)
    with pytest.raises(VerificationError, match="bad signature"):
        verify_record_proof(resp.content, did, other, COLL, rkey)


def test_get_repo_walks_and_matches_latest_commit(dev_pds: DevPDS) -> None:
    session = _session(dev_pds)
    did = session["did"]
    written = {}
    for i in range(5):
        rkey = CLOCK.next()
        written[rkey] = _put(dev_pds, session, rkey, _record(f"repo {i}"))
    key = _signing_key(dev_pds, did)
    resp = httpx.get(f"{dev_pds.pds_url}/xrpc/com.atproto.sync.getRepo", params={"did": did})
    assert resp.status_code == 200, resp.text
    car = read_car(resp.content)
    latest = httpx.get(
        f"{dev_pds.pds_url}/xrpc/com.atproto.sync.getLatestCommit", params={"did": did}
    ).json()
    assert str(car.root) == latest["cid"]
    commit = verify_commit(car.blocks, car.root, did, key)
    assert commit.rev == latest["rev"]
    records = {(r.collection, r.rkey): r for r in iter_repo_records(car, did=did, signing_key=key)}
    for rkey, cid in written.items():
        assert str(records[(COLL, rkey)].cid) == cid
    listed = httpx.get(
        f"{dev_pds.pds_url}/xrpc/com.atproto.repo.listRecords",
        params={"repo": did, "collection": COLL, "limit": 100},
    ).json()["records"]
    assert {r["uri"].rsplit("/", 1)[1] for r in listed} <= {k[1] for k in records}
    assert all(
        CID.parse(r["cid"]) == records[(COLL, r["uri"].rsplit("/", 1)[1])].cid for r in listed
    )


def test_get_record_proof_of_absence_verifies(dev_pds: DevPDS) -> None:
    session = _session(dev_pds)
    did = session["did"]
    _put(dev_pds, session, CLOCK.next(), _record("neighbour"))
    missing = CLOCK.next()  # minted after every written key, so certainly never written
    resp = httpx.get(
        f"{dev_pds.pds_url}/xrpc/com.atproto.sync.getRecord",
        params={"did": did, "collection": COLL, "rkey": missing},
    )
    assert resp.status_code == 200, resp.text
    key = _signing_key(dev_pds, did)
    assert verify_record_proof(resp.content, did, key, COLL, missing) == (None, None)

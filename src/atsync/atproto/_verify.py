"""Verify signed repository commits, record proofs and whole repositories from CARs.

A commit (repo format v3) is ``{did, version: 3, data, rev, prev, sig}``; ``sig`` signs the
DAG-CBOR of the commit without ``sig``, with the key named in the DID document as
``#atproto`` (atproto.com/specs/repository). Everything here raises ``VerificationError``
saying what failed: bad signature, wrong DID, CID mismatch at a block, missing block,
truncated CAR, malformed node or commit, a record that breaks the data model.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from atsync._errors import BadSignature, InvalidSyntaxError, RecordError, VerificationError

from ._car import Car, read_car
from ._cbor import CID, CODEC_DAG_CBOR, check_data_model, decode_dag_cbor, encode_dag_cbor
from ._crypto import Alg, Keypair, verify_signature
from ._mst import get_block, iter_leaves, mst_lookup
from ._syntax import validate_did, validate_nsid, validate_record_key, validate_tid

__all__ = [
    "Commit",
    "RepoRecord",
    "iter_repo_records",
    "sign_commit",
    "verify_commit",
    "verify_record_proof",
]

Blocks = Mapping[CID, bytes]
SigningKey = str | tuple[Alg, bytes]
CarSource = Car | bytes | bytearray | memoryview | BinaryIO


@dataclass(frozen=True)
class Commit:
    cid: CID
    did: str
    version: int
    data: CID
    rev: str
    prev: CID | None
    sig: bytes


@dataclass(frozen=True)
class RepoRecord:
    collection: str
    rkey: str
    cid: CID
    record: dict[str, Any]


def _decode_commit(cid: CID, data: bytes) -> tuple[Commit, dict[str, Any]]:
    try:
        raw = decode_dag_cbor(data)
    except VerificationError as e:
        raise VerificationError(f"malformed commit {cid}: {e}") from e
    if not isinstance(raw, dict):
        raise VerificationError(f"malformed commit {cid}: not a map")
    version = raw.get("version")
    if version != 3 or isinstance(version, bool):
        raise VerificationError(f"malformed commit {cid}: unsupported version {version!r}")
    did, data_cid, rev = raw.get("did"), raw.get("data"), raw.get("rev")
    prev, sig = raw.get("prev"), raw.get("sig")
    if not isinstance(did, str) or not isinstance(rev, str):
        raise VerificationError(f"malformed commit {cid}: 'did' and 'rev' must be strings")
    try:
        validate_did(did)
        validate_tid(rev)
    except InvalidSyntaxError as e:
        raise VerificationError(f"malformed commit {cid}: {e}") from e
    if not isinstance(data_cid, CID) or data_cid.codec != CODEC_DAG_CBOR:
        raise VerificationError(f"malformed commit {cid}: 'data' is not a dag-cbor CID")
    if prev is not None and not isinstance(prev, CID):
        raise VerificationError(f"malformed commit {cid}: 'prev' is not a CID or null")
    if not isinstance(sig, bytes):
        raise VerificationError(f"malformed commit {cid}: 'sig' is missing or not bytes")
    return Commit(cid, did, 3, data_cid, rev, prev, sig), raw


def verify_commit(blocks: Blocks, root_cid: CID | str, did: str, signing_key: SigningKey) -> Commit:
    """Decode the commit at ``root_cid`` and check it is ``did``'s, signed by ``signing_key``
    (a ``did:key`` or ``(alg, public key)``), low-S only."""
    root = CID.parse(root_cid) if isinstance(root_cid, str) else root_cid
    commit, raw = _decode_commit(root, get_block(blocks, root, "commit"))
    if commit.did != did:
        raise VerificationError(f"wrong DID: commit {root} is for {commit.did}, expected {did}")
    unsigned = encode_dag_cbor({k: v for k, v in raw.items() if k != "sig"})
    if not verify_signature(signing_key, unsigned, commit.sig):
        shown = signing_key if isinstance(signing_key, str) else signing_key[0] + " key"
        raise BadSignature(f"bad signature: commit {root} is not signed by {shown}")
    return commit


def sign_commit(
    keypair: Keypair, did: str, data: CID, rev: str, prev: CID | None = None
) -> tuple[CID, bytes]:
    """Build and sign a v3 commit block: ``(cid, block bytes)``."""
    unsigned: dict[str, Any] = {"did": did, "version": 3, "data": data, "rev": rev, "prev": prev}
    signed = dict(unsigned, sig=keypair.sign(encode_dag_cbor(unsigned)))
    block = encode_dag_cbor(signed)
    return CID.for_data(block), block


def _as_car(car: CarSource) -> Car:
    return car if isinstance(car, Car) else read_car(car)


def _decode_record_block(blocks: Blocks, cid: CID, path: str) -> dict[str, Any]:
    data = get_block(blocks, cid, f"record {path}")
    try:
        value = decode_dag_cbor(data)
        if not isinstance(value, dict):
            raise VerificationError("not a map")
        check_data_model(value)
    except (VerificationError, RecordError) as e:
        raise VerificationError(f"record {path} ({cid}) is malformed: {e}") from e
    return value


def verify_record_proof(
    car: CarSource, did: str, signing_key: SigningKey, collection: str, rkey: str
) -> tuple[CID | None, dict[str, Any] | None]:
    """Check a ``getRecord`` proof CAR: the signed commit, then every MST node from ``data``
    down to ``collection/rkey``. Returns ``(record CID, record)``, or ``(None, None)`` when
    the proof shows the record is absent."""
    path = f"{validate_nsid(collection)}/{validate_record_key(rkey)}"
    c = _as_car(car)
    commit = verify_commit(c.blocks, c.root, did, signing_key)
    value, _ = mst_lookup(c.blocks, commit.data, path)
    if value is None:
        return None, None
    return value, _decode_record_block(c.blocks, value, path)


@functools.lru_cache(maxsize=256)
def _valid_collection(collection: str) -> str:
    # A repository has few collections and many records: each is checked once.
    return validate_nsid(collection)


def _split_path(key: str) -> tuple[str, str]:
    collection, sep, rkey = key.partition("/")
    try:
        if not sep:
            raise InvalidSyntaxError("no '/'")
        _valid_collection(collection)
        validate_record_key(rkey)
    except InvalidSyntaxError as e:
        raise VerificationError(f"malformed repo path {key!r} in the MST: {e}") from e
    return collection, rkey


def iter_repo_records(
    car: CarSource, *, did: str | None = None, signing_key: SigningKey | None = None
) -> Iterator[RepoRecord]:
    """Every record of a full-repo CAR (``getRepo``), in key order, each block hash-checked
    and the whole MST structure checked. With ``did`` and ``signing_key`` the commit is
    verified too; without them only its shape is (the caller then trusts the transport).
    Every block is held in memory: for a repository in a file, ``RepoFile`` reads the same
    records with memory that does not grow with the repository."""
    c = _as_car(car)
    if signing_key is not None:
        if did is None:
            raise VerificationError("verifying a repo's signature needs its DID")
        commit = verify_commit(c.blocks, c.root, did, signing_key)
    else:
        commit, _ = _decode_commit(c.root, get_block(c.blocks, c.root, "commit"))
        if did is not None and commit.did != did:
            raise VerificationError(f"wrong DID: commit {c.root} is for {commit.did}, not {did}")
    for key, cid in iter_leaves(c.blocks, commit.data):
        collection, rkey = _split_path(key)
        yield RepoRecord(collection, rkey, cid, _decode_record_block(c.blocks, cid, key))

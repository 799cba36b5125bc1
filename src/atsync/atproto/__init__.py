"""AT Protocol, client side: usable on its own, without atsync's database or apps.

    async with XrpcClient(session=await login("alice.example.com", pw, pds_url)) as client:
        await client.create_record(client.session.did, "com.example.note", {...})

- identifiers: ``validate_*``/``is_valid_*``, ``Tid``/``TidClock``, ``parse_at_uri``
- keys and signatures: ``generate_keypair``, ``load_keypair``, ``verify_signature``,
  ``parse_did_key`` (ed25519, p256, k256; low-S only)
- data: ``encode_dag_cbor``/``decode_dag_cbor``, ``CID``, ``cid_for_record``,
  ``check_data_model``, ``read_car``/``CarReader``/``write_car``
- proofs: ``verify_commit``, ``verify_record_proof``, ``iter_repo_records``, ``verify_session``
- network: ``IdentityResolver``, ``login``/``Session`` with stores, ``XrpcClient`` and the
  firehose, blocking facades (``BlockingXrpcClient``, ``BlockingIdentityResolver``)
- development: ``DevPDS`` (the reference PDS on loopback)
"""

from ._authorization import SessionAuthorization, verify_session
from ._blocking_client import BlockingXrpcClient, blocking_login, blocking_logout
from ._car import Car, CarReader, read_car, write_car
from ._cbor import CID, check_data_model, cid_for_record, decode_dag_cbor, encode_dag_cbor
from ._crypto import Keypair, generate_keypair, load_keypair, parse_did_key, verify_signature
from ._devpds import DevPDS
from ._firehose import FirehoseFrame, FirehoseSubscription
from ._identity import BlockingIdentityResolver, Identity, IdentityResolver
from ._session import FileSessionStore, MemorySessionStore, Session, SessionStore, login
from ._syntax import (
    AtUri,
    Tid,
    TidClock,
    is_valid_did,
    is_valid_handle,
    is_valid_nsid,
    is_valid_record_key,
    parse_at_uri,
    validate_did,
    validate_handle,
    validate_nsid,
    validate_record_key,
)
from ._verify import iter_repo_records, verify_commit, verify_record_proof
from ._xrpc import Create, Delete, RecordView, Update, XrpcClient, outcome_unknown

__all__ = [
    "CID",
    "AtUri",
    "BlockingIdentityResolver",
    "BlockingXrpcClient",
    "Car",
    "CarReader",
    "Create",
    "Delete",
    "DevPDS",
    "FileSessionStore",
    "FirehoseFrame",
    "FirehoseSubscription",
    "Identity",
    "IdentityResolver",
    "Keypair",
    "MemorySessionStore",
    "RecordView",
    "Session",
    "SessionAuthorization",
    "SessionStore",
    "Tid",
    "TidClock",
    "Update",
    "XrpcClient",
    "blocking_login",
    "blocking_logout",
    "check_data_model",
    "cid_for_record",
    "decode_dag_cbor",
    "encode_dag_cbor",
    "generate_keypair",
    "is_valid_did",
    "is_valid_handle",
    "is_valid_nsid",
    "is_valid_record_key",
    "iter_repo_records",
    "load_keypair",
    "login",
    "outcome_unknown",
    "parse_at_uri",
    "parse_did_key",
    "read_car",
    "validate_did",
    "validate_handle",
    "validate_nsid",
    "validate_record_key",
    "verify_commit",
    "verify_record_proof",
    "verify_session",
    "verify_signature",
    "write_car",
]

"""AT Protocol, client side: usable on its own, without atsync's database or apps.

    async with XrpcClient(session=await login("alice.example.com", pw, pds_url)) as client:
        await client.create_record(client.session.did, "com.example.note", {...})

The layer is async first: async objects and functions have the plain names (``XrpcClient``,
``IdentityResolver``, ``login``); their blocking facades carry a ``Blocking``/``blocking_``
prefix (``BlockingXrpcClient``, ``BlockingIdentityResolver``, ``blocking_login``). See
docs/api.md.

- identifiers: ``validate_<kind>`` (the normalized value, or ``InvalidSyntaxError``) and
  ``is_valid_<kind>`` for handle, did, nsid, record_key, tid, at_identifier, at_uri, cid,
  datetime, language, uri; ``parse_at_uri``/``AtUri``; ``Tid``, ``TidClock``, ``format_tid``
- keys and signatures: ``generate_keypair``, ``load_keypair``, ``Keypair``, ``KeyAlgorithm``,
  ``verify_signature``, ``parse_did_key`` (ed25519, p256, k256; low-S only)
- data: ``check_data_model`` (whose answer ``encode_dag_cbor(value, plain=...)`` may reuse),
  ``encode_dag_cbor``/``decode_dag_cbor`` (``decode_plain_record``: libipld's speed where it
  provably agrees), ``data_from_json``/``data_to_json`` (the JSON form
  with ``$link``/``$bytes``), ``CID``, ``cid_for_record``, ``cid_for_dag_cbor`` (of encoded
  bytes), ``read_car``/``CarReader``/``write_car``
- proofs: ``verify_commit`` (→ ``Commit``), ``verify_record_proof``, ``iter_repo_records``
  (→ ``RepoRecord``, from a CAR in memory); ``RepoFile``, the same for a ``getRepo`` CAR in a
  file, in bounded memory whatever the repository's size (``CarStream`` indexes and decodes
  it while it downloads: ``sync_get_repo(..., on_chunk=stream.feed)``; it holds a CAR of up
  to ``CAR_MEMORY_LIMIT`` bytes in memory, ``RepoFile(None, stream=...)`` reads that);
  ``diff_trees`` (→ ``MstDiff``): what changed between two versions of a repository's MST,
  reading only the changed paths (over a ``getRepo?since=`` CAR; ``MissingBlock`` if it lacks
  one); a firehose ``#commit`` checked as sync 1.1 defines it (signature, records, ops
  inverted back to ``prevData``): ``verify_commit_event`` → ``VerifiedCommit`` of
  ``RepoOp``; a session key's authorization record: ``authorize_session_key``,
  ``revoke_session_key``, ``verify_session``
- identity: ``IdentityResolver`` → ``Identity``; ``parse_did_document`` → ``DidDocument``;
  ``validate_atproto_did`` (a did:plc or did:web a resolver can take, by syntax alone)
- sessions: ``login``, ``Session`` (``SessionData``), stores (``SessionStore``,
  ``FileSessionStore``, ``MemorySessionStore``); OAuth: ``oauth_login`` (browser, PAR, PKCE,
  DPoP; ``loopback_client_id``, ``DEFAULT_OAUTH_SCOPE``, ``granular_scope``) → ``OAuthSession``
  (``OAuthSessionData``); ``resume_session`` resumes either kind
- XRPC: ``XrpcClient``, writes for ``apply_writes`` (``Create``/``Update``/``Delete``, any of
  them a ``Write``), results (``WriteResult``, ``CommitMeta``, ``ApplyWritesResult``,
  ``RecordView``, ``RecordPage``, ``LatestCommit``, ``RepoDescription``, ``Download``,
  ``RateLimitInfo``), ``outcome_unknown``; the firehose (``FirehoseSubscription``,
  ``FirehoseFrame``)
- blocking facades: ``BlockingXrpcClient``, ``BlockingFirehoseSubscription``,
  ``BlockingIdentityResolver``, ``blocking_login``, ``blocking_logout``; they run the async
  code on a ``Portal`` (an event loop on a background thread), their own or one they share
- development: ``DevPDS`` (the reference PDS on loopback; ``DevAccount``), ``ensure_installed``
  (into ``default_cache_dir()``)
"""

from .._blocking import Portal
from ._authorization import (
    SessionAuthorization,
    authorize_session_key,
    revoke_session_key,
    verify_session,
)
from ._blocking_client import (
    BlockingFirehoseSubscription,
    BlockingXrpcClient,
    blocking_login,
    blocking_logout,
)
from ._car import Car, CarReader, read_car, write_car
from ._car_file import RepoFile
from ._car_stream import MEMORY_LIMIT as CAR_MEMORY_LIMIT
from ._car_stream import CarStream
from ._cbor import (
    CID,
    check_data_model,
    cid_for_dag_cbor,
    cid_for_record,
    data_from_json,
    data_to_json,
    decode_dag_cbor,
    decode_plain_record,
    encode_dag_cbor,
)
from ._commit_event import RepoOp, VerifiedCommit, verify_commit_event
from ._crypto import Alg as KeyAlgorithm
from ._crypto import Keypair, generate_keypair, load_keypair, parse_did_key, verify_signature
from ._devpds import DevAccount, DevPDS, default_cache_dir, ensure_installed
from ._did_doc import DidDocument, parse_did_document, validate_atproto_did
from ._firehose import FirehoseFrame, FirehoseSubscription
from ._identity import DEFAULT_PLC_URL, BlockingIdentityResolver, Identity, IdentityResolver
from ._mst import mst_lookup
from ._mst_diff import MissingBlock, MstDiff, diff_trees
from ._oauth_flow import DEFAULT_OAUTH_SCOPE, granular_scope, loopback_client_id, oauth_login
from ._oauth_session import OAuthSession, OAuthSessionData, resume_session
from ._session import (
    FileSessionStore,
    MemorySessionStore,
    Session,
    SessionData,
    SessionStore,
    login,
)
from ._stream_walk import StreamWalk
from ._syntax import (
    AtUri,
    Tid,
    TidClock,
    format_tid,
    is_valid_at_identifier,
    is_valid_at_uri,
    is_valid_cid,
    is_valid_datetime,
    is_valid_did,
    is_valid_handle,
    is_valid_language,
    is_valid_nsid,
    is_valid_record_key,
    is_valid_tid,
    is_valid_uri,
    parse_at_uri,
    validate_at_identifier,
    validate_at_uri,
    validate_cid,
    validate_datetime,
    validate_did,
    validate_handle,
    validate_language,
    validate_nsid,
    validate_record_key,
    validate_tid,
    validate_uri,
)
from ._verify import Commit, RepoRecord, iter_repo_records, verify_commit, verify_record_proof
from ._xrpc import (
    ApplyWritesResult,
    CommitMeta,
    Create,
    Delete,
    Download,
    LatestCommit,
    RateLimitInfo,
    RecordPage,
    RecordView,
    RepoDescription,
    Update,
    Write,
    WriteResult,
    XrpcClient,
    outcome_unknown,
)

__all__ = [
    "CAR_MEMORY_LIMIT",
    "CID",
    "DEFAULT_OAUTH_SCOPE",
    "DEFAULT_PLC_URL",
    "ApplyWritesResult",
    "AtUri",
    "BlockingFirehoseSubscription",
    "BlockingIdentityResolver",
    "BlockingXrpcClient",
    "Car",
    "CarReader",
    "CarStream",
    "Commit",
    "CommitMeta",
    "Create",
    "Delete",
    "DevAccount",
    "DevPDS",
    "DidDocument",
    "Download",
    "FileSessionStore",
    "FirehoseFrame",
    "FirehoseSubscription",
    "Identity",
    "IdentityResolver",
    "KeyAlgorithm",
    "Keypair",
    "LatestCommit",
    "MemorySessionStore",
    "MissingBlock",
    "MstDiff",
    "OAuthSession",
    "OAuthSessionData",
    "Portal",
    "RateLimitInfo",
    "RecordPage",
    "RecordView",
    "RepoDescription",
    "RepoFile",
    "RepoOp",
    "RepoRecord",
    "Session",
    "SessionAuthorization",
    "SessionData",
    "SessionStore",
    "StreamWalk",
    "Tid",
    "TidClock",
    "Update",
    "VerifiedCommit",
    "Write",
    "WriteResult",
    "XrpcClient",
    "authorize_session_key",
    "blocking_login",
    "blocking_logout",
    "check_data_model",
    "cid_for_dag_cbor",
    "cid_for_record",
    "data_from_json",
    "data_to_json",
    "decode_dag_cbor",
    "decode_plain_record",
    "default_cache_dir",
    "diff_trees",
    "encode_dag_cbor",
    "ensure_installed",
    "format_tid",
    "generate_keypair",
    "granular_scope",
    "is_valid_at_identifier",
    "is_valid_at_uri",
    "is_valid_cid",
    "is_valid_datetime",
    "is_valid_did",
    "is_valid_handle",
    "is_valid_language",
    "is_valid_nsid",
    "is_valid_record_key",
    "is_valid_tid",
    "is_valid_uri",
    "iter_repo_records",
    "load_keypair",
    "login",
    "loopback_client_id",
    "mst_lookup",
    "oauth_login",
    "outcome_unknown",
    "parse_at_uri",
    "parse_did_document",
    "parse_did_key",
    "read_car",
    "resume_session",
    "revoke_session_key",
    "validate_at_identifier",
    "validate_at_uri",
    "validate_atproto_did",
    "validate_cid",
    "validate_datetime",
    "validate_did",
    "validate_handle",
    "validate_language",
    "validate_nsid",
    "validate_record_key",
    "validate_tid",
    "validate_uri",
    "verify_commit",
    "verify_commit_event",
    "verify_record_proof",
    "verify_session",
    "verify_signature",
    "write_car",
]

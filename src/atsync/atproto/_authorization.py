"""Session-key authorization: a record in the user's repo that vouches for a local key.

After login, the app writes, in a collection of its own (``<app NSID>.session`` by default,
never a public post), a record naming its local signing key:

    at://<did>/<collection>/<rkey>    rkey = the key's multibase part (z6Mk…)
    {"$type": <collection>, "key": "did:key:z6Mk…", "app": <app NSID>, "createdAt": …}

The record's proof — ``com.atproto.sync.getRecord``: the signed commit plus the MST path to
the record — lets anyone check offline that the account authorized the key, given the
account's ``#atproto`` signing key from its DID document: ``verify_session(proof, …)``.
Deleting the record revokes the key; a fresh proof then shows its absence.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .._errors import VerificationError
from ._car import read_car
from ._syntax import validate_did, validate_nsid
from ._verify import verify_record_proof
from ._xrpc import XrpcClient

__all__ = [
    "SessionAuthorization",
    "authorization_record",
    "authorization_rkey",
    "authorize_session_key",
    "revoke_session_key",
    "verify_session",
]


def authorization_rkey(session_key: str) -> str:
    """The record key for a session key: its multibase part, unique per key."""
    if not session_key.startswith("did:key:z"):
        raise VerificationError(f"{session_key!r} is not a did:key")
    return session_key.rsplit(":", 1)[-1]


def authorization_record(collection: str, session_key: str, app: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "$type": validate_nsid(collection),
        "key": session_key,
        "createdAt": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if app is not None:
        record["app"] = app
    return record


@dataclass(frozen=True, slots=True)
class SessionAuthorization:
    """A verified authorization: ``account`` vouched for ``session_key`` in its repo."""

    account: str
    session_key: str
    collection: str
    rkey: str
    record_cid: str
    created_at: str | None


async def authorize_session_key(
    client: XrpcClient, did: str, collection: str, session_key: str, app: str | None = None
) -> bytes:
    """Write (idempotently) the authorization record and return its proof CAR."""
    rkey = authorization_rkey(session_key)
    existing = await _current(client, did, collection, rkey)
    if existing is None or existing.get("key") != session_key:
        await client.put_record(
            did, collection, rkey, authorization_record(collection, session_key, app)
        )
    return await client.sync_get_record(did, collection, rkey)


async def revoke_session_key(
    client: XrpcClient, did: str, collection: str, session_key: str
) -> None:
    """Delete the authorization record (a no-op if there is none)."""
    rkey = authorization_rkey(session_key)
    if await _current(client, did, collection, rkey) is not None:
        await client.delete_record(did, collection, rkey)


async def _current(
    client: XrpcClient, did: str, collection: str, rkey: str
) -> dict[str, Any] | None:
    from .._errors import PermanentError

    try:
        view = await client.get_record(did, collection, rkey)
    except PermanentError as exc:
        if exc.error == "RecordNotFound":
            return None
        raise
    return view.value


def verify_session(
    proof: bytes,
    *,
    account: str,
    signing_key: str,
    session_key: str,
    collection: str,
) -> SessionAuthorization:
    """Check offline that ``account`` authorized ``session_key``.

    ``signing_key`` is the account's ``#atproto`` key (a did:key) from its DID document,
    resolved by the verifier. Raises ``VerificationError`` naming what failed: the commit
    signature, the MST path, a record that is absent (revoked) or names another key.
    """
    validate_did(account)
    rkey = authorization_rkey(session_key)
    try:
        cid, record = verify_record_proof(read_car(proof), account, signing_key, collection, rkey)
    except VerificationError as e:
        if "missing block" not in str(e):
            raise
        # A proof made for another record: it holds another path through the tree.
        raise VerificationError(
            f"the proof shows no authorization of {session_key} by {account} in {collection}: "
            f"it does not cover that record ({e})"
        ) from e
    if cid is None or record is None:
        raise VerificationError(
            f"the proof shows no authorization of {session_key} by {account} in {collection} "
            "(never authorized, or revoked)"
        )
    if record.get("$type") != collection:
        raise VerificationError(f"the authorization record's $type is not {collection!r}")
    if record.get("key") != session_key:
        raise VerificationError(
            f"the authorization record at {collection}/{rkey} names {record.get('key')!r}, "
            f"not {session_key}"
        )
    created = record.get("createdAt")
    return SessionAuthorization(
        account,
        session_key,
        collection,
        rkey,
        str(cid),
        created if isinstance(created, str) else None,
    )

"""OAuthSession's rules, fast and offline: against an in-process fake authorization server +
PDS (httpx.MockTransport) that checks every DPoP proof and rotates refresh tokens like the
reference provider. The same paths run against the real provider in test_oauth_e2e.py;
here the corners are provoked on purpose: nonce rotation, a failed save during a refresh,
concurrent refreshes, a refused refresh, another process's rotation (docs/oauth.md).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import anyio
import httpx
import pytest

from atsync._errors import AuthError, TransientError
from atsync.atproto import MemorySessionStore, OAuthSession, OAuthSessionData, XrpcClient
from atsync.atproto._oauth_crypto import DpopKey, b64url
from test_oauth_crypto import verify_es256

pytestmark = pytest.mark.anyio

PDS = "https://pds.example"
DID = "did:plc:alice"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeServer:
    """Authorization server and PDS in one origin, like a PDS without an entryway."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)
        self.access = "at-0"
        self.refresh = "rt-0"
        self.nonce = "nonce-0"
        self.expired = False  # the PDS says the access token expired
        self.revoked = False
        self.token_requests = 0
        self.nonce_every_time = False
        self.expires_in = 3600
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    def rotate_nonce(self) -> None:
        self.nonce = f"nonce-{next(self.counter)}"

    def _check_proof(self, request: httpx.Request, token: str | None) -> str | None:
        """None if the proof is good, else the error to answer."""
        header, claims = verify_es256(request.headers["dpop"])
        assert header["typ"] == "dpop+jwt"
        assert claims["htm"] == request.method
        assert claims["htu"] == str(request.url).split("?")[0]
        if token is not None:
            assert claims["ath"] == b64url(hashlib.sha256(token.encode()).digest())
        if self.nonce_every_time:
            self.rotate_nonce()
        if claims.get("nonce") != self.nonce:
            return "use_dpop_nonce"
        return None

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        headers = {"DPoP-Nonce": self.nonce}
        if request.url.path == "/oauth/token":
            problem = self._check_proof(request, None)
            headers = {"DPoP-Nonce": self.nonce}
            if problem:
                return httpx.Response(400, headers=headers, json={"error": problem})
            self.token_requests += 1
            form = dict(parse_qsl(request.content.decode()))
            if self.revoked or form.get("refresh_token") != self.refresh:
                return httpx.Response(400, json={"error": "invalid_grant"})
            n = next(self.counter)
            self.access, self.refresh, self.expired = f"at-{n}", f"rt-{n}", False
            body = {
                "access_token": self.access,
                "refresh_token": self.refresh,
                "token_type": "DPoP",
                "scope": "atproto transition:generic",
                "sub": DID,
                "expires_in": self.expires_in,
            }
            return httpx.Response(200, headers=headers, json=body)
        if request.url.path == "/oauth/revoke":
            self.revoked = True
            return httpx.Response(200, headers=headers)
        auth = request.headers.get("authorization", "")
        token = auth.removeprefix("DPoP ")
        problem = self._check_proof(request, token)
        headers = {"DPoP-Nonce": self.nonce}
        if problem:
            headers["WWW-Authenticate"] = f'DPoP error="{problem}"'
            return httpx.Response(401, headers=headers, json={"error": problem, "message": "n"})
        if token != self.access or self.expired or self.revoked:
            headers["WWW-Authenticate"] = 'DPoP error="invalid_token"'
            return httpx.Response(
                401, headers=headers, json={"error": "invalid_token", "message": "expired"}
            )
        return httpx.Response(200, headers=headers, json={"did": DID})

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport)


def make_session(
    server: FakeServer,
    store: Any = None,
    expires_at: float = 1e12,
    issued_at: float | None = None,
    **options: Any,
) -> OAuthSession:
    data = OAuthSessionData(
        did=DID,
        handle="alice.test",
        pds_url=PDS,
        issuer=PDS,
        client_id="http://localhost",
        scope="atproto",
        token_endpoint=f"{PDS}/oauth/token",
        revocation_endpoint=f"{PDS}/oauth/revoke",
        access_token=server.access,
        refresh_token=server.refresh,
        expires_at=expires_at,
        dpop_jwk=DpopKey.generate().private_jwk(),
        issued_at=issued_at,
    )
    store = store if store is not None else MemorySessionStore()
    store.save(DID, data.to_dict())
    return OAuthSession(data, store=store, http=server.http, **options)


async def get_session(session: OAuthSession, server: FakeServer) -> Any:
    async with XrpcClient(session=session, transport=server.transport) as client:
        return await client.query("com.atproto.server.getSession", auth=True)


async def test_a_new_nonce_is_learned_once_and_reused() -> None:
    server = FakeServer()
    session = make_session(server)
    assert await get_session(session, server) == {"did": DID}
    assert len(server.requests) == 2  # use_dpop_nonce, then with the nonce
    await get_session(session, server)
    assert len(server.requests) == 3
    server.rotate_nonce()  # the server moves on: one resend, no error
    await get_session(session, server)
    assert len(server.requests) == 5


async def test_a_nonce_that_keeps_moving_is_transient_not_a_logout() -> None:
    server = FakeServer()
    server.nonce_every_time = True
    session = make_session(server)
    with pytest.raises(TransientError, match="nonce twice"):
        await get_session(session, server)
    assert session.alive


async def test_invalid_token_refreshes_once_persists_then_resends() -> None:
    server = FakeServer()
    store = MemorySessionStore()
    session = make_session(server, store)
    await get_session(session, server)
    server.expired = True
    assert await get_session(session, server) == {"did": DID}
    assert server.token_requests == 1
    assert session.data.access_token == server.access
    saved = store.load(DID)
    assert saved is not None and saved["refresh_token"] == server.refresh


async def test_refresh_ahead_of_expiry_without_a_failed_call() -> None:
    server = FakeServer()
    session = make_session(server, expires_at=1000.0, clock=lambda: 900.0)  # 100 s left
    await get_session(session, server)
    assert server.token_requests == 1
    paths = [r.url.path for r in server.requests]
    assert paths.count("/xrpc/com.atproto.server.getSession") == 1  # never sent stale


async def test_short_lived_tokens_are_refreshed_a_quarter_of_their_life_ahead() -> None:
    # A server whose tokens live 60 s, under the 300 s margin: with a fixed margin every
    # request would refresh first. A quarter of the lifetime (15 s) is kept instead.
    server = FakeServer()
    server.expires_in = 60
    now = [1000.0]
    session = make_session(server, expires_at=1060.0, issued_at=1000.0, clock=lambda: now[0])
    for now[0] in (1000.0, 1030.0, 1044.0):
        await get_session(session, server)
    assert server.token_requests == 0
    now[0] = 1046.0  # 14 s left
    await get_session(session, server)
    assert server.token_requests == 1
    data = session.data  # the new pair's lifetime is known, and saved with it
    assert (data.issued_at, data.expires_at) == (1046.0, 1106.0)
    assert OAuthSessionData.from_dict(data.to_dict()) == data
    for now[0] in (1050.0, 1090.0):
        await get_session(session, server)
    assert server.token_requests == 1
    now[0] = 1092.0
    await get_session(session, server)
    assert server.token_requests == 2


async def test_a_session_stored_without_issued_at_keeps_the_fixed_margin() -> None:
    server = FakeServer()
    stored = make_session(server, expires_at=1060.0, issued_at=1000.0).data.to_dict()
    del stored["issued_at"]  # stored before the lifetime was kept
    old = OAuthSessionData.from_dict(stored)
    assert old.issued_at is None
    session = OAuthSession(old, http=server.http, clock=lambda: 1000.0)
    await get_session(session, server)
    assert server.token_requests == 1  # 60 s left < 300 s: due at once


class FailingStore(MemorySessionStore):
    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def save(self, key: str, data: Mapping[str, Any]) -> None:
        if self.fail:
            raise OSError("disk full")
        super().save(key, data)


async def test_a_rotation_that_cannot_be_saved_is_not_used() -> None:
    server = FakeServer()
    store = FailingStore()
    session = make_session(server, store)
    before = session.data
    store.fail = True
    with pytest.raises(OSError, match="disk full"):
        await session.refresh()
    assert session.data == before  # the unsaved pair was dropped
    assert store.load(DID)["refresh_token"] == before.refresh_token  # type: ignore[index]


async def test_concurrent_refreshes_share_one_token_request() -> None:
    server = FakeServer()
    session = make_session(server)
    stale = session.data.access_token
    results: list[str] = []

    async def one() -> None:
        results.append(await session.refresh(stale_access=stale))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
    assert server.token_requests == 1 and set(results) == {server.access}


async def test_another_process_rotation_is_adopted() -> None:
    server = FakeServer()
    store = MemorySessionStore()
    mine = make_session(server, store)
    stored = store.load(DID)
    assert stored is not None
    theirs = OAuthSession(OAuthSessionData.from_dict(stored), store=store, http=server.http)
    await theirs.refresh()
    await theirs.refresh()
    assert server.token_requests == 2
    # Mine holds a spent pair; told its token is invalid, it reads the store before
    # refreshing, finds the other process's live pair and uses it: no token request.
    assert await get_session(mine, server) == {"did": DID}
    assert server.token_requests == 2
    assert mine.data.refresh_token == server.refresh and mine.alive


async def test_a_refused_refresh_kills_the_session_without_more_requests() -> None:
    server = FakeServer()
    session = make_session(server)
    server.revoked = True
    with pytest.raises(AuthError, match="can no longer be refreshed") as exc:
        await get_session(session, server)
    assert exc.value.error == "invalid_grant" and not session.alive
    count = len(server.requests)
    with pytest.raises(AuthError, match="log in again"):
        await get_session(session, server)
    assert len(server.requests) == count


async def test_logout_revokes_and_forgets() -> None:
    server = FakeServer()
    store = MemorySessionStore()
    session = make_session(server, store)
    await session.logout()
    assert server.revoked and store.load(DID) is None and not session.alive
    revoke = next(r for r in server.requests if r.url.path == "/oauth/revoke")
    assert dict(parse_qsl(revoke.content.decode()))["token"] == "rt-0"

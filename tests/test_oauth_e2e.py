"""OAuth end to end: a real browser, the reference PDS's own OAuth provider (docs/oauth.md).

Headless Chromium (Debian's ``chromium``, installed by the first test that needs it, like
the PDS) is driven through playwright (oauth_browser.py): it opens the authorization URL,
fills in the password on the PDS's sign-in page and clicks Authorize (or Deny access) on its
consent page; the provider then redirects it to the app's loopback listener. Nothing in the
flow is faked: PAR, PKCE, DPoP nonces, the code exchange, refresh and revocation are the
provider's own. The negative tests change one thing each (the callback's ``state`` or
``iss`` rewritten in the browser, a PKCE verifier that does not match, a replayed code, a
DPoP proof for another method, URL or token, or replayed) and check that it is refused.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import httpx
import pytest

from atsync._errors import AuthError, NetworkError, PermanentError
from atsync.app import ActionContext, App, ATPSigner, Contract
from atsync.atproto import (
    DEFAULT_OAUTH_SCOPE,
    FileSessionStore,
    Identity,
    IdentityResolver,
    MemorySessionStore,
    OAuthSession,
    OAuthSessionData,
    Portal,
    XrpcClient,
    _oauth_flow,
    granular_scope,
    oauth_login,
    resume_session,
)
from atsync.atproto._oauth_crypto import DpopKey, dpop_proof, pkce_challenge, pkce_verifier
from atsync.atproto._oauth_server import NonceCache, oauth_http_client, post_form
from atsync.db import BlobRef
from atsync.sync import ATSync, Binding, Immediate, Manual, RateBudget
from oauth_browser import BrowserUser
from pds_fixtures import ACCOUNTS
from sync_devices import wait_status

pytestmark = [pytest.mark.pds, pytest.mark.anyio]

PASSWORDS = dict(ACCOUNTS)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- logging in through the browser (oauth_browser.py: BrowserUser, the chromium fixture) -----


def login_in_browser(signer: ATPSigner, pds: Any, user: BrowserUser) -> OAuthSession:
    """``signer.login_oauth_async("alice.test")`` from blocking code, the browser driven by
    ``user`` (the caller joins it)."""

    async def login() -> OAuthSession:
        async with resolver_for(pds) as identity:
            return await signer.login_oauth_async(
                "alice.test", identity=identity, open_browser=user.open, show_url=print
            )

    with Portal() as portal:
        return portal.call(login)


def resolver_for(pds: Any, http: httpx.AsyncClient | None = None) -> IdentityResolver:
    """Resolves the dev PDS's ``.test`` handles (its well-known answers by Host) and DIDs."""
    return IdentityResolver(
        plc_url=pds.plc_url,
        http_client=http,
        use_dns=False,
        web_origin=lambda host: pds.pds_url,
        allow_test_handles=True,
        allow_insecure_localhost=True,
    )


async def browser_login(
    pds: Any, chromium: Path, handle: str = "alice.test", **options: Any
) -> tuple[OAuthSession, BrowserUser]:
    user_options = {k: options.pop(k) for k in ("consent", "rewrite_callback") if k in options}
    user = BrowserUser(chromium, PASSWORDS[handle], **user_options)
    async with resolver_for(pds) as identity:
        try:
            session = await oauth_login(
                handle,
                identity=identity,
                open_browser=user.open,
                show_url=None,
                login_timeout=60,
                **options,
            )
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(user.join)
    return session, user


def replace_param(url: str, name: str, value: str) -> str:
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query))
    params[name] = value
    return urlunsplit(parts._replace(query=urlencode(params)))


contract = Contract(models={"notes": {"id": "primary", "text": "string"}}, nsid="test.oauth.notes")


@contract.action
def note(ctx: ActionContext, key: str, text: str) -> str:
    ctx.db.set("notes", {"id": key, "text": text})
    return ctx.did


def collection_for(request: pytest.FixtureRequest) -> str:
    name = "".join(c for c in request.node.name if c.isalnum())[:40].lower()
    return f"test.oauth.{name}"


# --- the happy path ---------------------------------------------------------------------------


def test_deferred_login_with_oauth_pushes_earlier_work_as_the_account(
    dev_pds: Any, chromium: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from atsync.sync import SyncThread

    alice = dev_pds.accounts["alice.test"]
    collection = collection_for(request)
    store = FileSessionStore(tmp_path / "sessions")
    signer = ATPSigner(store=store)
    user = BrowserUser(chromium, alice.password)
    with (
        App.open(tmp_path / "n.db", contract, signer=signer) as app,
        # The README's path: the default push strategy, nothing forced after the login.
        SyncThread(app, bindings={"notes": Binding(collection)}, pull=Manual()) as sync,
    ):
        offline = app.actions.note("a", "written offline")
        assert offline.result == signer.key_did

        session = login_in_browser(signer, dev_pds, user)
        logged_in = time.monotonic()
        sync.wait_pushed(offline.id, timeout=30)
        # The login wakes the engine: the offline note goes at once, not at the next poll.
        assert time.monotonic() - logged_in < 2.0
        user.join()
        assert isinstance(session, OAuthSession)
        assert session.did == alice.did and app.did == alice.did
        # Asked for only what the engine writes: its collection and the key's authorization.
        granted = session.data.scope.split()
        assert f"repo:{collection}" in granted and "repo:test.oauth.notes.session" in granted
        assert "transition:generic" not in granted
        assert app.actions.note("b", "written after login").result == alice.did
        status = sync.wait_for_idle(timeout=60)
        assert status.pending == 0 and status.failed == 0

        async def write_elsewhere() -> None:
            async with XrpcClient(session=session) as client:
                await client.create_record(alice.did, f"{collection}x", {"text": "no"})

        with Portal() as portal, pytest.raises(NetworkError, match=r"(?i)scope|permission"):
            portal.call(write_elsewhere)  # the PDS holds the token to its scope
        # Everything, the offline note too, is attributed to alice (via the key's proof).
        assert [app.author_of(e) for e in app.log] == [alice.did, alice.did]

    async def records() -> dict[str, Any]:
        async with XrpcClient(dev_pds.pds_url) as client:
            return {r.rkey: r.value async for r in client.iter_records(alice.did, collection)}

    remote = anyio.run(records)
    assert {k: v["text"] for k, v in remote.items()} == {
        "a": "written offline",
        "b": "written after login",
    }
    # The session (and its DPoP key) is stored 0600, without the password; it resumes.
    path = store.path_for(f"atsync-session-{signer.key_did}")
    assert path.stat().st_mode & 0o777 == 0o600
    stored = path.read_text()
    assert alice.password not in stored and '"dpop_jwk"' in stored and '"type": "oauth"' in stored
    again = ATPSigner(store=store)
    with App.open(tmp_path / "n.db", contract, signer=again) as app:
        assert isinstance(again.session, OAuthSession) and app.did == alice.did
        again.logout()
        assert not again.authenticated
    assert not path.exists()


pictures = Contract(
    models={"photos": {"id": "primary", "caption": "string", "image": "blob"}},
    nsid="test.oauth.photos",
)


@pictures.action
def photo(ctx: ActionContext, key: str, caption: str, image: dict[str, Any]) -> None:
    ctx.db.set("photos", {"id": key, "caption": caption, "image": BlobRef.from_json(image)})


def test_an_image_goes_up_under_the_granular_scope_an_oauth_login_asks_for(
    dev_pds: Any, chromium: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from atsync.sync import SyncThread

    alice = dev_pds.accounts["alice.test"]
    collection = collection_for(request)
    signer = ATPSigner(store=FileSessionStore(tmp_path / "sessions"))
    user = BrowserUser(chromium, alice.password)
    data = bytes(range(256)) * 64  # 16 KiB
    with (
        App.open(tmp_path / "p.db", pictures, signer=signer) as app,
        SyncThread(app, bindings={"photos": Binding(collection)}, pull=Manual()) as sync,
    ):
        ref = app.blobs.put(data, "image/png")
        app.actions.photo("p1", "taken offline", ref.to_json())

        session = login_in_browser(signer, dev_pds, user)
        user.join()
        # Records that hold blobs: the login asked for blob uploads, and nothing general.
        granted = session.data.scope.split()
        assert f"repo:{collection}" in granted
        assert any(scope.startswith("blob:") for scope in granted)
        assert "transition:generic" not in granted
        status = sync.wait_for_idle(timeout=60)
        assert (status.pending, status.failed) == (0, 0)

    async def on_pds() -> tuple[dict[str, Any], bytes]:
        async with XrpcClient(dev_pds.pds_url) as client:
            record = await client.get_record(alice.did, collection, "p1")
            got = io.BytesIO()
            await client.sync_get_blob(alice.did, ref.cid, got)  # checked against its CID
            return record.value, got.getvalue()

    value, stored = anyio.run(on_pds)
    assert value["caption"] == "taken offline"
    assert str(value["image"]["ref"]) == ref.cid
    assert stored == data


def test_the_blocking_login_oauth_returns_the_adopted_session(
    dev_pds: Any, chromium: Path, tmp_path: Path
) -> None:
    # The form scripts and notebooks call: it blocks this thread until the user is done at
    # the browser (BrowserUser works in a thread of its own meanwhile).
    alice = dev_pds.accounts["alice.test"]
    store = FileSessionStore(tmp_path / "sessions")
    signer = ATPSigner(store=store)
    user = BrowserUser(chromium, alice.password)
    # login_oauth runs the resolver on a loop of its own that ends with the call: no
    # connection may outlive its request, so nothing is left open on that dead loop.
    http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0))
    with App.open(tmp_path / "b.db", contract, signer=signer) as app:
        offline = app.actions.note("a", "before the login")
        assert offline.result == signer.key_did
        session = signer.login_oauth(
            "alice.test",
            identity=resolver_for(dev_pds, http),
            open_browser=user.open,
            show_url=None,
            login_timeout=60,
        )
        user.join()
        assert isinstance(session, OAuthSession) and signer.session is session
        assert session.did == alice.did and app.did == alice.did
        # No engine attached: the general scope; the key's authorization record was written.
        assert session.data.scope.split() == DEFAULT_OAUTH_SCOPE.split()
        assert app.actions.note("b", "after the login").result == alice.did
        assert [app.author_of(e) for e in app.log] == [alice.did, alice.did]
        stored = resume_session(store, f"atsync-session-{signer.key_did}")
        assert isinstance(stored, OAuthSession)
        assert stored.data.refresh_token == session.data.refresh_token
        signer.logout()  # the blocking logout: revoked, and forgotten here
        assert not session.alive and signer.session is None
        assert store.load(f"atsync-session-{signer.key_did}") is None
    anyio.run(http.aclose)


async def test_a_server_refusing_granular_scopes_is_asked_for_the_general_one(
    dev_pds: Any, chromium: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reference PDS takes granular scopes; one that does not answers the pushed request
    # with invalid_scope, as this stand-in for its PAR endpoint does.
    real = _oauth_flow._push_request
    asked: list[str] = []

    async def refusing(*args: Any) -> tuple[str, dict[str, Any]]:
        scope = args[4]
        asked.append(scope)
        if "repo:" in scope:
            raise PermanentError("PAR: HTTP 400 invalid_scope", error="invalid_scope", status=400)
        return await real(*args)

    monkeypatch.setattr(_oauth_flow, "_push_request", refusing)
    session, _ = await browser_login(dev_pds, chromium, scope=granular_scope(["a.b.c"]))
    assert asked == ["atproto repo:a.b.c", DEFAULT_OAUTH_SCOPE]
    assert "transition:generic" in session.data.scope.split()
    await session.logout()


async def test_login_gives_a_dpop_session_that_writes_and_resumes(
    dev_pds: Any, chromium: Path, request: pytest.FixtureRequest
) -> None:
    alice = dev_pds.accounts["alice.test"]
    store = MemorySessionStore()
    session, user = await browser_login(dev_pds, chromium, store=store)
    assert session.did == alice.did and session.handle == "alice.test"
    assert session.issuer == dev_pds.pds_url and session.pds_url == dev_pds.pds_url
    assert "atproto" in session.data.scope.split()
    (callback,) = user.callback_urls
    assert dict(parse_qsl(urlsplit(callback).query))["iss"] == dev_pds.pds_url
    sent: list[httpx.Request] = []

    async def keep(req: httpx.Request) -> None:
        sent.append(req)

    async with XrpcClient(session=session, event_hooks={"request": [keep]}) as client:
        written = await client.create_record(
            alice.did, collection_for(request), {"text": "hi"}, rkey="r1"
        )
    assert written.uri.endswith("/r1")
    (req,) = sent  # the nonce from the login was reused: no use_dpop_nonce round trip
    assert req.headers["authorization"] == f"DPoP {session.data.access_token}"
    assert req.headers["dpop"].count(".") == 2
    # A resumed copy starts without nonces: its first request is answered use_dpop_nonce
    # and sent once more with the server's nonce; the second needs no retry.
    resumed = resume_session(store, alice.did)
    assert isinstance(resumed, OAuthSession)
    statuses: list[int] = []

    async def status(resp: httpx.Response) -> None:
        statuses.append(resp.status_code)

    async with XrpcClient(session=resumed, event_hooks={"response": [status]}) as client:
        await client.put_record(alice.did, collection_for(request), "r1", {"text": "1"})
        await client.put_record(alice.did, collection_for(request), "r1", {"text": "2"})
    assert statuses == [401, 200, 200]
    await resumed.logout()
    assert store.load(alice.did) is None


# --- the flow's checks, each refused ----------------------------------------------------------


async def test_refused_consent_is_an_auth_error(dev_pds: Any, chromium: Path) -> None:
    store = MemorySessionStore()
    with pytest.raises(AuthError, match="access_denied") as exc:
        await browser_login(dev_pds, chromium, consent=False, store=store)
    assert exc.value.error == "access_denied"
    assert store.load(dev_pds.accounts["alice.test"].did) is None


async def test_a_callback_from_another_issuer_is_refused(dev_pds: Any, chromium: Path) -> None:
    def forge(url: str) -> str:
        return replace_param(url, "iss", "http://localhost:1")

    with pytest.raises(AuthError, match="issuer 'http://localhost:1'"):
        await browser_login(dev_pds, chromium, rewrite_callback=forge)


async def test_a_callback_with_another_state_is_refused(dev_pds: Any, chromium: Path) -> None:
    def forge(url: str) -> str:
        return replace_param(url, "state", "forged")

    with pytest.raises(AuthError, match="state"):
        await browser_login(dev_pds, chromium, rewrite_callback=forge)


async def test_a_code_redeemed_without_the_pkce_verifier_is_refused(
    dev_pds: Any, chromium: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pushed challenge is of another verifier than the one the exchange sends.
    monkeypatch.setattr(_oauth_flow, "pkce_challenge", lambda v: pkce_challenge(pkce_verifier()))
    with pytest.raises(AuthError, match="code_verifier") as exc:
        await browser_login(dev_pds, chromium)
    assert exc.value.error == "invalid_grant"


async def test_tokens_for_another_account_than_the_handle_are_refused(
    dev_pds: Any, chromium: Path
) -> None:
    bob = dev_pds.accounts["bob.test"]

    class Misdirected(IdentityResolver):
        # The handle alice.test "resolves" to bob: the user signs in as alice, so the
        # token's sub (alice) is not the DID the login was for.
        async def resolve(self, identifier: str, *, strict: bool = False) -> Identity:
            found = await super().resolve(bob.did)
            return Identity(found.did, "alice.test", found.pds, found.signing_key)

    user = BrowserUser(chromium, PASSWORDS["alice.test"])
    resolver = Misdirected(
        plc_url=dev_pds.plc_url,
        use_dns=False,
        web_origin=lambda host: dev_pds.pds_url,
        allow_test_handles=True,
        allow_insecure_localhost=True,
    )
    async with resolver:
        with pytest.raises(AuthError, match=f"not {bob.did}"):
            await oauth_login(
                "alice.test", identity=resolver, open_browser=user.open, show_url=None
            )
    await anyio.to_thread.run_sync(user.join)


async def test_a_replayed_code_is_refused_and_revokes_what_it_gave(
    dev_pds: Any, chromium: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = dev_pds.accounts["alice.test"]
    redeemed: list[tuple[_oauth_flow.PushedRequest, str]] = []
    exchange = _oauth_flow.exchange_code

    async def keep(
        http: httpx.AsyncClient, pushed: _oauth_flow.PushedRequest, code: str, **kw: Any
    ) -> OAuthSession:
        redeemed.append((pushed, code))
        return await exchange(http, pushed, code, **kw)

    monkeypatch.setattr(_oauth_flow, "exchange_code", keep)
    session, _ = await browser_login(dev_pds, chromium)
    ((pushed, code),) = redeemed
    assert session.dpop_key.public_jwk == pushed.dpop.public_jwk
    # The same redemption once more: same code, PKCE verifier, redirect URI, client_id and
    # DPoP key (only the proof's jti is new, as a client's would be), so the one thing
    # refused is that the code was used already.
    async with oauth_http_client() as http:
        with pytest.raises(AuthError, match="Invalid code") as exc:
            await exchange(http, pushed, code, did=alice.did, handle="alice.test",
                           pds_url=dev_pds.pds_url)  # fmt: skip
    assert exc.value.error == "invalid_grant"
    # The provider treats a replayed code as stolen: the tokens it gave are revoked.
    async with XrpcClient(session=session) as client:
        with pytest.raises(AuthError, match="can no longer be refreshed"):
            await client.create_record(alice.did, collection_for(request), {"text": "x"})
    assert not session.alive


# --- DPoP proofs the PDS refuses --------------------------------------------------------------


async def test_the_pds_refuses_proofs_for_another_method_url_or_token_and_replays(
    dev_pds: Any, chromium: Path
) -> None:
    session, _ = await browser_login(dev_pds, chromium)
    token = session.data.access_token
    key = session.dpop_key
    url = f"{dev_pds.pds_url}/xrpc/com.atproto.server.getSession"

    async with httpx.AsyncClient() as http:

        async def get(proof: str) -> httpx.Response:
            return await http.get(url, headers={"Authorization": f"DPoP {token}", "DPoP": proof})

        # Without a nonce the PDS hands one out (use_dpop_nonce): the retry path's trigger.
        first = await get(dpop_proof(key, "GET", url, access_token=token))
        assert first.status_code == 401
        assert "use_dpop_nonce" in first.headers["www-authenticate"]
        nonce = first.headers["dpop-nonce"]

        good = dpop_proof(key, "GET", url, nonce=nonce, access_token=token)
        ok = await get(good)
        assert ok.status_code == 200 and ok.json()["did"] == session.did
        refusals = {
            "htm": dpop_proof(key, "POST", url, nonce=nonce, access_token=token),
            "htu": dpop_proof(
                key, "GET", url.replace("getSession", "getAccount"), nonce=nonce, access_token=token
            ),
            "ath": dpop_proof(key, "GET", url, nonce=nonce, access_token=token + "x"),
            "replayed": good,  # the same jti again
        }
        for why, proof in refusals.items():
            answer = await get(proof)
            assert answer.status_code == 401, why
            assert why in answer.json()["message"], (why, answer.json())
        # A proof signed by another key than the one the token is bound to.
        other = dpop_proof(DpopKey.generate(), "GET", url, nonce=nonce, access_token=token)
        assert (await get(other)).status_code == 401
    await session.logout()


# --- tokens that keep working, and the end of them --------------------------------------------


async def test_an_expired_access_token_is_refreshed_and_the_rotation_persisted(
    make_pds: Any, chromium: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ttl_s = 3
    pds = make_pds(oauth_token_ttl_ms=ttl_s * 1000)
    alice = pds.accounts["alice.test"]
    store = FileSessionStore(tmp_path / "sessions")
    login, _ = await browser_login(pds, chromium, store=store)
    before = login.data
    assert before.expires_at - time.time() <= ttl_s
    # Waiting for a time, not an event: the token must be expired on the server's clock.
    await anyio.sleep(max(0.0, before.expires_at - time.time()) + 1.0)
    # A client whose clock runs an hour behind does not know the token expired: the PDS
    # itself must say so.
    session = OAuthSession.resume(store, alice.did, clock=lambda: time.time() - 3600)
    assert session is not None
    statuses: list[tuple[int, str]] = []

    async def status(resp: httpx.Response) -> None:
        await resp.aread()
        why = resp.json().get("message", "") if resp.status_code == 401 else ""
        statuses.append((resp.status_code, why))

    collection = collection_for(request)
    async with XrpcClient(session=session, event_hooks={"response": [status]}) as client:
        await client.create_record(alice.did, collection, {"text": "after expiry"}, rkey="e1")
    # A resumed session has no nonce yet (one resend), then the token is found expired
    # (one refresh, one resend).
    assert [s for s, _ in statuses] == [401, 401, 200]
    assert "nonce" in statuses[0][1]
    # The PDS words an expired token two ways, by which of its checks sees it first: the JWT
    # library's ('"exp" claim timestamp check failed') or its own ('Token expired at …').
    assert re.search(r'"exp" claim|Token expired', statuses[1][1]), statuses
    after = session.data
    assert after.refresh_token != before.refresh_token  # rotated
    assert after.access_token != before.access_token
    stored = store.load(alice.did)
    assert stored is not None and stored["refresh_token"] == after.refresh_token
    # Ahead of expiry (as in normal operation): a refresh before the call, no 401 at all.
    ahead = OAuthSession.resume(store, alice.did, clock=lambda: time.time() + 3600)
    assert ahead is not None
    statuses.clear()
    async with XrpcClient(session=ahead, event_hooks={"response": [status]}) as client:
        await client.put_record(alice.did, collection, "e1", {"text": "refreshed ahead"})
    assert [s for s, _ in statuses] == [200] and ahead.data.refresh_token != after.refresh_token
    assert store.load(alice.did)["refresh_token"] == ahead.data.refresh_token  # type: ignore[index]


async def test_a_revoked_grant_makes_the_engine_ask_for_login(
    dev_pds: Any, chromium: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    session, _ = await browser_login(dev_pds, chromium)
    with App.open(tmp_path / "r.db", contract) as app:
        sync = ATSync(
            app,
            bindings={"notes": Binding(collection_for(request))},
            session=session,
            pull=Manual(),
            push=Immediate(),
            budget=RateBudget.off(),
        )
        async with sync:
            app.actions.note("a", "pushed with the grant")
            with anyio.fail_after(30):
                status = await sync.wait_for_idle()
            assert status.pending == 0 and status.failed == 0
            # The user revokes the app's grant elsewhere (another copy of the session).
            await OAuthSession(session.data, store=MemorySessionStore()).logout()
            app.actions.note("b", "after the revocation")
            status = await wait_status(sync, lambda s: s.state == "needs_auth", within=30)
            assert status.pending == 1
    assert not session.alive


async def test_logout_revokes_the_grant_on_the_server(dev_pds: Any, chromium: Path) -> None:
    store = MemorySessionStore()
    session, _ = await browser_login(dev_pds, chromium, store=store)
    data = session.data
    await session.logout()
    assert store.load(session.did) is None and not session.alive
    with pytest.raises(AuthError, match="logged out"):
        await session.access_token(XrpcClient(dev_pds.pds_url))
    # The refresh token is dead on the server too.
    form = {
        "grant_type": "refresh_token",
        "refresh_token": data.refresh_token,
        "client_id": data.client_id,
    }
    async with oauth_http_client() as http:
        with pytest.raises(AuthError) as exc:
            await post_form(
                http,
                data.token_endpoint,
                form,
                DpopKey.from_jwk(data.dpop_jwk),
                NonceCache(),
            )
    assert exc.value.error == "invalid_grant"


# --- the command ------------------------------------------------------------------------------


def test_cli_login_with_oauth_stores_a_session_that_status_push_and_logout_use(
    dev_pds: Any,
    chromium: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    from click.testing import CliRunner

    from atsync.cli import _login_oauth, main
    from atsync.cli._devpds import announced

    alice = dev_pds.accounts["alice.test"]
    db = tmp_path / "c.db"
    with App.open(db, contract) as app:  # creates the database and its session key
        ATSync(app, bindings={"notes": Binding(collection_for(request))}, pull=Manual())
        app.actions.note("c1", "queued before the CLI login")
    user = BrowserUser(chromium, alice.password)
    monkeypatch.setattr(_login_oauth, "_open_browser", user.open)
    # The command as written: neither --service nor ATSYNC_PLC_URL; the dev PDS is
    # found where `atsync dev-pds` lists itself (this process stands in for it).
    monkeypatch.delenv("ATSYNC_PLC_URL", raising=False)
    monkeypatch.setenv("ATSYNC_CACHE_DIR", str(tmp_path / "cache"))
    sessions = str(tmp_path / "sessions")
    runner = CliRunner()
    args = ["--db", str(db), "--session-dir", sessions]
    with announced(dev_pds.pds_url, dev_pds.plc_url):
        result = runner.invoke(main, ["login", "--oauth", "alice.test", *args])
    user.join()
    assert result.exit_code == 0, result.output
    assert f"logged in as {alice.did} (alice.test) at {dev_pds.pds_url}" in result.stdout
    assert "/oauth/authorize?" in result.stderr  # the URL is printed for a headless machine
    status = runner.invoke(main, ["status", *args, "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["account"] == alice.did
    pushed = runner.invoke(main, ["push", *args, "--timeout", "30"])
    assert pushed.exit_code == 0, pushed.output
    assert "pushed 1 writes; 0 pending" in pushed.stdout
    stored = FileSessionStore(Path(sessions)).load(f"atsync-session-{app.signer.key_did}")
    assert stored is not None
    data = OAuthSessionData.from_dict(stored)
    out = runner.invoke(main, ["logout", *args])
    assert out.exit_code == 0, out.output
    assert f"logged out {alice.did} (alice.test)" in out.stdout
    assert json.loads(runner.invoke(main, ["status", *args, "--json"]).stdout)["account"] is None
    # The grant is revoked on the server: its refresh token is refused.
    form = {
        "grant_type": "refresh_token",
        "refresh_token": data.refresh_token,
        "client_id": data.client_id,
    }

    async def refresh() -> None:
        async with oauth_http_client() as http:
            dpop = DpopKey.from_jwk(data.dpop_jwk)
            await post_form(http, data.token_endpoint, form, dpop, NonceCache())

    with pytest.raises(AuthError) as exc:
        anyio.run(refresh)
    assert exc.value.error == "invalid_grant"
    again = runner.invoke(main, ["logout", *args])
    assert again.exit_code == 0 and "not logged in" in again.stdout


async def test_a_write_beyond_the_granted_scope_waits_for_a_new_login_and_is_kept(
    dev_pds: Any, chromium: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The user logged in when the app wrote another collection (the grant names only that
    one); this version binds a new one. The PDS refuses with 403 ScopeMissingError: the
    engine asks for a new login and keeps the write queued (it used to dead-letter it, and,
    batch by batch, every write of that collection). The new login asks for the engine's
    collections and wakes it: the write goes."""
    alice = dev_pds.accounts["alice.test"]
    collection = collection_for(request)
    signer = ATPSigner(store=FileSessionStore(tmp_path / "sessions"))
    with App.open(tmp_path / "s.db", contract, signer=signer) as app:
        sync = ATSync(app, bindings={"notes": Binding(collection)}, pull=Manual())
        async with sync, resolver_for(dev_pds) as identity:

            async def log_in(scope: str | None) -> OAuthSession:
                user = BrowserUser(chromium, alice.password)
                try:
                    return await signer.login_oauth_async(
                        "alice.test", scope=scope, identity=identity, open_browser=user.open,
                        show_url=print,
                    )  # fmt: skip
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(user.join)

            before = granular_scope([f"{collection}.before", f"{contract.nsid}.session"])
            await log_in(before)  # the grant of the app's earlier version
            app.actions.note("a", "beyond the grant")
            status = await wait_status(sync, lambda s: s.state == "needs_auth", within=30)
            assert "ScopeMissingError" in (status.upload_error or ""), status
            assert f"repo:{collection}" in (status.upload_error or ""), status
            assert (status.pending, status.failed) == (1, 0)

            again = await log_in(None)  # asks for what the engine writes now
            assert f"repo:{collection}" in again.data.scope.split()
            status = await wait_status(sync, lambda s: s.pending == 0, within=30)
            assert (status.failed, status.upload_error) == (0, None)
        sync.close()
    async with XrpcClient(dev_pds.pds_url) as client:
        written = {r.rkey: r.value async for r in client.iter_records(alice.did, collection)}
    assert {k: v["text"] for k, v in written.items()} == {"a": "beyond the grant"}

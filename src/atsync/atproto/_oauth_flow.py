"""Logging in with atproto OAuth from a native app: ``oauth_login`` (docs/oauth.md).

The steps, each with the check the spec asks for:

1. resolve the handle (or DID) to its DID and PDS; discover the PDS's authorization server
   and check its metadata (``_oauth_server.discover``);
2. open a one-shot listener on ``127.0.0.1`` (``_oauth_listener``): its URL is the
   redirect URI;
3. push the authorization request (PAR) with PKCE (S256), a random ``state`` and a DPoP
   proof from a fresh P-256 key that will be the session's;
4. open the browser at the authorization URL (and show it, for a headless machine);
5. receive the callback: ``state`` must be ours, ``iss`` must be the issuer, an ``error``
   (the user refused) is an ``AuthError``;
6. exchange the code (with the PKCE verifier and a DPoP proof) and check the token: DPoP,
   the ``atproto`` scope, and ``sub`` equal to the DID the handle resolved to.

``client_id`` is by default the loopback form the spec allows for development
(``http://localhost?redirect_uri=…&scope=…``, no metadata document); a shipped app passes
the https URL of its client metadata (``application_type: "native"``, registering
``http://127.0.0.1/callback`` as a redirect URI; any port is then accepted).
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
import webbrowser
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import anyio
import anyio.to_thread
import httpx

from atsync._errors import AuthError, PermanentError

from ._identity import IdentityResolver
from ._oauth_crypto import DpopKey, pkce_challenge, pkce_verifier
from ._oauth_listener import CallbackListener
from ._oauth_server import AuthServer, NonceCache, discover, oauth_http_client, post_form
from ._oauth_session import OAuthSession, OAuthSessionData, tokens_from_response
from ._session import DEFAULT_REFRESH_MARGIN, SessionStore

__all__ = ["DEFAULT_OAUTH_SCOPE", "granular_scope", "loopback_client_id", "oauth_login"]

DEFAULT_OAUTH_SCOPE = "atproto transition:generic"
# Permission families (the atproto permission spec): parameterised, so a server does not list
# them in scopes_supported; it says whether it takes them by accepting the request or not.
_PERMISSIONS = ("repo:", "blob:", "rpc:", "account:", "identity:", "include:")
DEFAULT_TIMEOUT = 300.0  # the reference server forgets a pushed request after 5 minutes


def granular_scope(collections: Iterable[str], *, blobs: bool = False) -> str:
    """The least an app that writes ``collections`` needs: ``atproto``, ``repo:<nsid>`` for
    each (create, update, delete), and with ``blobs`` the right to upload blobs of any type
    (``blob:*/*``) — instead of ``transition:generic``, everything an app password allows."""
    scope = ["atproto", *(f"repo:{c}" for c in sorted(set(collections)))]
    if blobs:
        scope.append("blob:*/*")
    return " ".join(scope)


def loopback_client_id(redirect_uri: str, scope: str = DEFAULT_OAUTH_SCOPE) -> str:
    """The development ``client_id``: ``http://localhost`` with the redirect URI and scope
    as query parameters; servers derive the client's metadata from it."""
    return "http://localhost?" + urlencode({"redirect_uri": redirect_uri, "scope": scope})


def _show_url(url: str) -> None:
    print(f"Log in in your browser; if it did not open, open this URL:\n  {url}", file=sys.stderr)


async def _open(open_browser: Callable[[str], Any] | None, url: str) -> None:
    if open_browser is None:
        return
    # webbrowser.open may block while it starts a browser; a failure is not fatal, the URL
    # was shown.
    try:
        await anyio.to_thread.run_sync(open_browser, url)
    except Exception as e:
        print(f"(could not open a browser: {e})", file=sys.stderr)


def check_callback(params: dict[str, str], state: str, issuer: str) -> str:
    """The code of an authorization response, after checking ``state`` and ``iss``."""
    if params.get("state") != state:
        raise AuthError("the authorization response does not carry our state; refused")
    if params.get("iss") != issuer:
        raise AuthError(
            f"the authorization response comes from issuer {params.get('iss')!r}, "
            f"not {issuer}; refused"
        )
    if "error" in params:
        desc = params.get("error_description") or ""
        raise AuthError(
            f"the authorization was not granted: {params['error']}" + (f": {desc}" if desc else ""),
            error=params["error"],
        )
    code = params.get("code")
    if not code:
        raise AuthError("the authorization response carries no code")
    return code


async def oauth_login(
    identifier: str,
    *,
    scope: str = DEFAULT_OAUTH_SCOPE,
    client_id: str | None = None,
    redirect_path: str = "/callback",
    open_browser: Callable[[str], Any] | None = webbrowser.open,
    show_url: Callable[[str], Any] | None = _show_url,
    identity: IdentityResolver | None = None,
    store: SessionStore | None = None,
    key: str | None = None,
    login_timeout: float = DEFAULT_TIMEOUT,
    refresh_margin: float = DEFAULT_REFRESH_MARGIN,
    clock: Callable[[], float] = time.time,
    fallback_scope: str | None = DEFAULT_OAUTH_SCOPE,
) -> OAuthSession:
    """Log in as ``identifier`` (handle or DID) through the user's browser and return the
    session, saved in ``store`` (default: in memory) under ``key`` (default: the DID).

    ``open_browser(url)`` opens the authorization page (``None``: do not); ``show_url(url)``
    shows it too (default: printed on stderr). ``identity`` resolves the handle (default: a
    resolver for the public network). ``login_timeout``: seconds for the user to finish.
    ``scope`` may hold granular permissions (``granular_scope``); a server that refuses them
    (``invalid_scope``) is asked for ``fallback_scope`` instead (None: the refusal stands).
    """
    if "atproto" not in scope.split():
        raise ValueError("the scope must include 'atproto'")
    own_resolver = identity is None
    resolver = identity if identity is not None else IdentityResolver()
    try:
        who = await resolver.resolve(identifier)
    finally:
        if own_resolver:
            await resolver.aclose()
    # The verified handle; else what was typed (a DID: the DID itself), for display only.
    typed = identifier if not identifier.startswith("did:") else who.did
    handle = who.handle or typed.lower()
    nonces = NonceCache()
    dpop = DpopKey.generate()
    async with oauth_http_client() as http:
        server = await discover(http, who.pds)
        if scope_missing := [
            s for s in scope.split() if s not in server.scopes_supported and not s.startswith(
                _PERMISSIONS
            )
        ]:  # fmt: skip
            raise PermanentError(f"{server.issuer} does not offer the scope {scope_missing}")
        async with CallbackListener(path=redirect_path) as callback:
            redirect_uri = callback.redirect_uri
            verifier, state = pkce_verifier(), secrets.token_urlsafe(24)
            try:
                cid, par = await _push_request(
                    http, server, client_id, redirect_uri, scope, state, verifier, identifier,
                    dpop, nonces,
                )  # fmt: skip
            except PermanentError as refused:
                if refused.error != "invalid_scope" or fallback_scope in (None, scope):
                    raise
                assert fallback_scope is not None
                cid, par = await _push_request(
                    http, server, client_id, redirect_uri, fallback_scope, state, verifier,
                    identifier, dpop, nonces,
                )  # fmt: skip
            request_uri = par.get("request_uri")
            if not isinstance(request_uri, str) or not request_uri:
                raise PermanentError(f"{server.issuer}'s PAR answer lacks a request_uri")
            url = (
                server.authorization_endpoint
                + "?"
                + urlencode({"client_id": cid, "request_uri": request_uri})
            )
            if show_url is not None:
                show_url(url)
            await _open(open_browser, url)
            with anyio.move_on_after(login_timeout) as waited:
                params = await callback.wait()
            if waited.cancelled_caught:
                raise AuthError(f"the login was not completed within {login_timeout:g} s")
        code = check_callback(params, state, server.issuer)
        pushed = PushedRequest(server, cid, redirect_uri, verifier, dpop, nonces)
        session = await exchange_code(
            http,
            pushed,
            code,
            did=who.did,
            handle=handle,
            pds_url=who.pds,
            clock=clock,
            store=store,
            key=key,
            refresh_margin=refresh_margin,
        )
    await session.save()
    return session


async def _push_request(
    http: httpx.AsyncClient,
    server: AuthServer,
    client_id: str | None,
    redirect_uri: str,
    scope: str,
    state: str,
    verifier: str,
    login_hint: str,
    dpop: DpopKey,
    nonces: NonceCache,
) -> tuple[str, dict[str, Any]]:
    """PAR: (the client_id used, the server's answer)."""
    cid = client_id or loopback_client_id(redirect_uri, scope)
    form = {
        "client_id": cid,
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "code_challenge": pkce_challenge(verifier),
        "code_challenge_method": "S256",
        "login_hint": login_hint,
    }
    return cid, await post_form(http, server.par_endpoint, form, dpop, nonces)


@dataclass(frozen=True, repr=False)
class PushedRequest:
    """What the flow keeps from the pushed request to the code exchange."""

    server: AuthServer
    client_id: str
    redirect_uri: str
    verifier: str
    dpop: DpopKey
    nonces: NonceCache


async def exchange_code(
    http: httpx.AsyncClient,
    pushed: PushedRequest,
    code: str,
    *,
    did: str,
    handle: str,
    pds_url: str,
    clock: Callable[[], float] = time.time,
    store: SessionStore | None = None,
    key: str | None = None,
    refresh_margin: float = DEFAULT_REFRESH_MARGIN,
) -> OAuthSession:
    """Trade the code for tokens; the token's ``sub`` must be ``did``."""
    server, client_id, dpop, nonces = pushed.server, pushed.client_id, pushed.dpop, pushed.nonces
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": pushed.redirect_uri,
        "code_verifier": pushed.verifier,
        "client_id": client_id,
    }
    now = clock()
    body = await post_form(http, server.token_endpoint, form, dpop, nonces)
    try:
        access, refresh, granted, expires_at = tokens_from_response(body, did, now)
    except (AuthError, PermanentError):
        # Refused tokens (another account, no DPoP, no atproto scope) are not left alive.
        refused = body.get("refresh_token")
        if server.revocation_endpoint is not None and isinstance(refused, str):
            revoke = {"token": refused, "client_id": client_id}
            with contextlib.suppress(Exception):
                await post_form(http, server.revocation_endpoint, revoke, dpop, nonces)
        raise
    if urlsplit(pds_url).scheme not in ("http", "https"):
        raise PermanentError(f"unusable PDS URL {pds_url!r}")
    data = OAuthSessionData(
        did=did,
        handle=handle,
        pds_url=pds_url.rstrip("/"),
        issuer=server.issuer,
        client_id=client_id,
        scope=granted,
        token_endpoint=server.token_endpoint,
        access_token=access,
        refresh_token=refresh,
        expires_at=expires_at,
        dpop_jwk=dpop.private_jwk(),
        revocation_endpoint=server.revocation_endpoint,
        issued_at=now,
    )
    return OAuthSession(
        data, store=store, key=key, refresh_margin=refresh_margin, clock=clock, nonces=nonces
    )

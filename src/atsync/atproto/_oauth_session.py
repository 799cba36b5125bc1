"""An OAuth session: DPoP-bound tokens that keep working (docs/oauth.md).

``OAuthSession`` is used exactly like a password ``Session``: ``XrpcClient(session=...)``, the
sync engine, ``ATPSigner``. The differences are inside:

- every request to the PDS carries ``Authorization: DPoP <token>`` and a fresh DPoP proof
  (``request_headers``, the client's per-request auth hook) made with the session's own P-256
  key, which is stored with the tokens (a 0600 file with ``FileSessionStore``);
- the server's ``DPoP-Nonce`` is kept per server; a ``use_dpop_nonce`` refusal is answered
  by sending the request once more with the new nonce (``after_response``);
- the tokens are refreshed at the authorization server's token endpoint, ahead of expiry
  (``expires_in``, minus ``refresh_margin`` or, for tokens living less than four margins, a
  quarter of their lifetime) or when the PDS says ``invalid_token``. Every
  refresh rotates the refresh token; the new pair is saved before any use, exactly like
  password sessions do (docs/sessions.md): persist before use, single flight, adopt a pair
  that another process sharing the store rotated, dead is dead (``AuthError`` "log in again"
  without a request once the grant is gone);
- ``logout()`` revokes the grant at the revocation endpoint, then deletes the stored copy.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import anyio
import anyio.to_thread
import httpx

from atsync._errors import AuthError, PermanentError, TransientError

from ._oauth_crypto import DpopKey, dpop_proof
from ._oauth_server import NonceCache, oauth_http_client, post_form
from ._session import DEFAULT_REFRESH_MARGIN, Session, SessionStore, StoredSession
from ._xrpc import XrpcClient
from ._xrpc_errors import parse_error_body

__all__ = ["OAuthSession", "OAuthSessionData", "resume_session", "tokens_from_response"]

SESSION_TYPE = "oauth"
# The share of a short token lifetime kept as refresh margin: with a fixed margin, a server
# whose tokens live less than it would see a refresh before every request.
_SHORT_LIFETIME_MARGIN = 0.25
_STR_FIELDS = (
    "did",
    "handle",
    "pds_url",
    "issuer",
    "client_id",
    "scope",
    "token_endpoint",
    "access_token",
    "refresh_token",
)


@dataclass(frozen=True, repr=False)
class OAuthSessionData:
    """What is persisted for an OAuth session: the account, the authorization server, the
    token pair and its expiry, and the private DPoP key the tokens are bound to."""

    did: str
    handle: str
    pds_url: str
    issuer: str
    client_id: str
    scope: str
    token_endpoint: str
    access_token: str
    refresh_token: str
    expires_at: float
    dpop_jwk: dict[str, str] = field(default_factory=dict)
    revocation_endpoint: str | None = None
    # When the token pair was issued (our clock): with ``expires_at`` it gives the lifetime.
    # None in sessions stored before it was kept; those use the fixed margin.
    issued_at: float | None = None

    def __repr__(self) -> str:  # tokens and the key are secrets
        return (
            f"OAuthSessionData(did={self.did!r}, handle={self.handle!r}, "
            f"pds_url={self.pds_url!r}, issuer={self.issuer!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": SESSION_TYPE}
        out.update({name: getattr(self, name) for name in _STR_FIELDS})
        out["expires_at"] = self.expires_at
        out["dpop_jwk"] = dict(self.dpop_jwk)
        if self.revocation_endpoint is not None:
            out["revocation_endpoint"] = self.revocation_endpoint
        if self.issued_at is not None:
            out["issued_at"] = self.issued_at
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OAuthSessionData:
        if data.get("type") != SESSION_TYPE:
            raise ValueError("not an OAuth session")
        values: dict[str, Any] = {}
        for name in _STR_FIELDS:
            value = data.get(name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"session data lacks a non-empty string {name!r}")
            values[name] = value
        expires_at = data.get("expires_at")
        if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            raise ValueError("session data lacks a numeric 'expires_at'")
        jwk = data.get("dpop_jwk")
        if not isinstance(jwk, dict) or not all(isinstance(v, str) for v in jwk.values()):
            raise ValueError("session data lacks its DPoP key")
        revoke = data.get("revocation_endpoint")
        issued = data.get("issued_at")
        if not isinstance(issued, int | float) or isinstance(issued, bool):
            issued = None
        return cls(
            **values,
            expires_at=float(expires_at),
            dpop_jwk=dict(jwk),
            revocation_endpoint=revoke if isinstance(revoke, str) else None,
            issued_at=float(issued) if issued is not None else None,
        )


def tokens_from_response(
    body: Mapping[str, Any], did: str, now: float
) -> tuple[str, str, str, float]:
    """``(access_token, refresh_token, scope, expires_at)`` from a token response, after the
    checks atproto requires: a DPoP token, for ``did`` (``sub``), with the ``atproto`` scope.
    A response for another account is an ``AuthError``: never act as someone else."""
    sub = body.get("sub")
    if sub != did:
        raise AuthError(f"the authorization server issued tokens for {sub!r}, not {did}")
    if str(body.get("token_type", "")).lower() != "dpop":
        raise PermanentError(f"the token is not DPoP-bound (token_type {body.get('token_type')!r})")
    scope = body.get("scope")
    if not isinstance(scope, str) or "atproto" not in scope.split():
        raise PermanentError(f"the granted scope {scope!r} lacks 'atproto'")
    access, refresh = body.get("access_token"), body.get("refresh_token")
    if not isinstance(access, str) or not access:
        raise TransientError("the token response lacks an access_token")
    if not isinstance(refresh, str) or not refresh:
        raise PermanentError("the token response lacks a refresh_token")
    expires_in = body.get("expires_in")
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
        raise TransientError(f"the token response has no usable expires_in ({expires_in!r})")
    return access, refresh, scope, now + float(expires_in)


class OAuthSession(StoredSession[OAuthSessionData]):
    """A logged-in account through OAuth; give it to ``XrpcClient(session=...)``."""

    def __init__(
        self,
        data: OAuthSessionData,
        *,
        store: SessionStore | None = None,
        key: str | None = None,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        clock: Callable[[], float] = time.time,
        nonces: NonceCache | None = None,
        http: Callable[[], httpx.AsyncClient] = oauth_http_client,
    ) -> None:
        super().__init__(data, store=store, key=key, refresh_margin=refresh_margin, clock=clock)
        self._dpop = DpopKey.from_jwk(data.dpop_jwk)
        self._nonces = nonces if nonces is not None else NonceCache()
        self._http = http

    def __repr__(self) -> str:
        return f"OAuthSession(did={self.did!r}, handle={self.handle!r}, issuer={self.issuer!r})"

    _what: ClassVar[str] = "OAuth session"

    @classmethod
    def _load(cls, stored: Mapping[str, Any]) -> OAuthSessionData:
        return OAuthSessionData.from_dict(stored)

    @property
    def issuer(self) -> str:
        return self._data.issuer

    @property
    def dpop_key(self) -> DpopKey:
        return self._dpop

    def _margin(self, data: OAuthSessionData) -> float:
        """How long before expiry the tokens are refreshed: ``refresh_margin``, or a quarter
        of the lifetime of tokens that live less than four margins."""
        if data.issued_at is None:
            return self.refresh_margin
        lifetime = max(0.0, data.expires_at - data.issued_at)
        return min(self.refresh_margin, lifetime * _SHORT_LIFETIME_MARGIN)

    def _due(self, data: OAuthSessionData) -> bool:
        return data.expires_at - self._clock() < self._margin(data)

    # -- the XRPC client's hooks ------------------------------------------------------------

    async def access_token(self, client: XrpcClient) -> str:
        self._check_alive()
        data = self._data
        if self._due(data):
            return await self.refresh(client, stale_access=data.access_token)
        return data.access_token

    def request_headers(self, method: str, url: str, token: str) -> dict[str, str]:
        """The headers of one request to the PDS: the token and a proof made for it."""
        proof = dpop_proof(self._dpop, method, url, nonce=self._nonces.get(url), access_token=token)
        return {"Authorization": f"DPoP {token}", "DPoP": proof}

    def after_response(
        self, url: str, response: httpx.Response
    ) -> Literal["nonce", "refresh"] | None:
        """Keep the server's nonce; say whether to resend with it, or to refresh first."""
        fresh = self._nonces.observe(url, response.headers)
        if response.status_code != 401:
            return None
        challenge = response.headers.get("www-authenticate", "")
        error, _ = parse_error_body(response.content)
        if "use_dpop_nonce" in challenge or error == "use_dpop_nonce":
            return "nonce" if fresh else None
        if "invalid_token" in challenge or error in ("invalid_token", "InvalidToken"):
            return "refresh"
        return None

    # -- refresh and logout -----------------------------------------------------------------

    async def refresh(
        self, client: XrpcClient | None = None, *, stale_access: str | None = None
    ) -> str:
        """Rotate the tokens at the token endpoint, persist them, return the new access
        token. Single flight: if ``stale_access`` is no longer current, another task
        refreshed meanwhile and its token is returned. ``None`` forces a refresh."""
        async with self._lock:
            self._check_alive()
            current = self._data
            if stale_access is not None and stale_access != current.access_token:
                return current.access_token
            stored = await self._stored()
            if stored is not None and stored.refresh_token != current.refresh_token:
                # Another process rotated the pair: ours is spent, theirs is live.
                self._data = current = stored
                self._dpop = DpopKey.from_jwk(stored.dpop_jwk)
                if stale_access is not None and not self._due(stored):
                    return stored.access_token
            new = await self._rotate(current)
            # Shielded: once the server has rotated, the new pair must reach the store and
            # memory together, whatever happens to the caller.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.store.save, self.key, new.to_dict())
                self._data = new
            return new.access_token

    async def _stored(self) -> OAuthSessionData | None:
        raw = await anyio.to_thread.run_sync(self.store.load, self.key)
        if raw is None:
            return None
        try:
            stored = OAuthSessionData.from_dict(raw)
        except ValueError:
            return None
        return stored if stored.did == self._data.did else None

    async def _rotate(self, current: OAuthSessionData) -> OAuthSessionData:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": current.refresh_token,
            "client_id": current.client_id,
        }
        now = self._clock()
        async with self._http() as http:
            try:
                body = await post_form(http, current.token_endpoint, form, self._dpop, self._nonces)
            except (AuthError, PermanentError) as e:
                raise self._kill("can no longer be refreshed", e) from e
        try:
            access, refresh, scope, expires_at = tokens_from_response(body, current.did, now)
        except AuthError as e:
            raise self._kill("was refreshed as another account", e) from e
        return replace(
            current,
            access_token=access,
            refresh_token=refresh,
            scope=scope,
            expires_at=expires_at,
            issued_at=now,
        )

    async def logout(self, client: XrpcClient | None = None) -> None:
        """Revoke the grant at the authorization server and delete the stored copy. The
        local copy is deleted even if the server cannot be reached (the error is raised
        after); a grant the server already considers gone logs out quietly."""
        del client  # the revocation endpoint is the authorization server's, not the PDS's
        async with self._lock:
            try:
                endpoint = self._data.revocation_endpoint
                if self._dead is None and endpoint is not None:
                    form = {"token": self._data.refresh_token, "client_id": self._data.client_id}
                    async with self._http() as http:
                        # Already revoked or expired: nothing is left to revoke.
                        with contextlib.suppress(AuthError):
                            await post_form(http, endpoint, form, self._dpop, self._nonces)
            finally:
                self._dead = AuthError(
                    f"the OAuth session of {self.handle} ({self.did}) was logged out; log in again"
                )
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.store.delete, self.key)


def resume_session(
    store: SessionStore,
    key: str,
    *,
    refresh_margin: float = DEFAULT_REFRESH_MARGIN,
    clock: Callable[[], float] = time.time,
) -> Session | OAuthSession | None:
    """The session stored under ``key``, whichever way it logged in (no network)."""
    stored = store.load(key)
    if stored is None:
        return None
    if stored.get("type") == SESSION_TYPE:
        return OAuthSession.resume(store, key, refresh_margin=refresh_margin, clock=clock)
    return Session.resume(store, key, refresh_margin=refresh_margin, clock=clock)

"""Talking to an atproto OAuth authorization server: discovery, DPoP nonces, form posts.

- ``discover(pds_url)``: the PDS's protected-resource metadata names its authorization
  server; that server's metadata is fetched and checked against what atproto requires
  (atproto.com/specs/oauth): the ``issuer`` is the URL it was fetched from, PAR, S256 PKCE,
  ES256 DPoP, the ``atproto`` scope, the ``iss`` parameter in authorization responses.
- ``NonceCache``: the last ``DPoP-Nonce`` each server (origin) sent. Servers rotate nonces
  every few minutes and refuse a proof without a current one (``use_dpop_nonce``); keeping
  the last one makes that refusal happen about once per server, not once per request.
- ``post_form``: a DPoP-signed form POST to the authorization server (PAR, token,
  revocation), retried once with the nonce the server asked for.

Errors: no answer, 5xx → ``TransientError``; ``invalid_grant`` (code or refresh token spent,
revoked, expired) and an authorization refused by the user → ``AuthError``; metadata that
breaks the rules and other 4xx → ``PermanentError``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from atsync._errors import AuthError, PermanentError, RateLimitedError, TransientError

from ._oauth_crypto import DpopKey, dpop_proof
from ._tls import is_loopback_url, tls_context
from ._xrpc_errors import retry_at

__all__ = [
    "AuthServer",
    "NonceCache",
    "discover",
    "oauth_http_client",
    "origin_of",
    "post_form",
]

_METADATA_LIMIT = 64 * 1024
DEFAULT_OAUTH_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def oauth_http_client(timeout: httpx.Timeout | float = DEFAULT_OAUTH_TIMEOUT) -> httpx.AsyncClient:
    # No redirects: metadata must be at the URL asked for (the issuer check depends on it).
    return httpx.AsyncClient(
        verify=tls_context(),
        timeout=timeout,
        follow_redirects=False,
        headers={"User-Agent": "atsync (+https://atproto.com)", "Accept": "application/json"},
    )


class NonceCache:
    """The latest ``DPoP-Nonce`` per server origin (thread-safe: blocking facades share it)."""

    def __init__(self) -> None:
        self._nonces: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, url: str) -> str | None:
        with self._lock:
            return self._nonces.get(origin_of(url))

    def observe(self, url: str, headers: Mapping[str, str]) -> bool:
        """Keep the nonce a response carried; True if it is new for that server."""
        nonce = headers.get("dpop-nonce")
        if not nonce:
            return False
        key = origin_of(url)
        with self._lock:
            changed = self._nonces.get(key) != nonce
            self._nonces[key] = nonce
            return changed


@dataclass(frozen=True)
class AuthServer:
    """The parts of an authorization server's metadata that the client uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    par_endpoint: str
    revocation_endpoint: str | None
    scopes_supported: tuple[str, ...]

    @classmethod
    def from_metadata(cls, issuer: str, meta: Mapping[str, Any]) -> AuthServer:
        """Check ``meta`` against the atproto profile; ``PermanentError`` naming the rule."""

        def fail(why: str) -> PermanentError:
            return PermanentError(f"the authorization server {issuer} is unusable: {why}")

        if meta.get("issuer") != issuer:
            raise fail(f"its metadata names the issuer {meta.get('issuer')!r}")

        def endpoint(name: str, required: bool = True) -> str | None:
            value = meta.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str) or origin_of(value) != origin_of(issuer):
                # Same origin as the issuer: a metadata document cannot send the user's
                # credentials or codes to some other host.
                raise fail(f"{name} {value!r} is missing or not on the issuer's origin")
            return value

        def listed(name: str, value: str) -> None:
            values = meta.get(name)
            if not isinstance(values, list) or value not in values:
                raise fail(f"{name} lacks {value!r}")

        listed("code_challenge_methods_supported", "S256")
        listed("dpop_signing_alg_values_supported", "ES256")
        listed("scopes_supported", "atproto")
        listed("token_endpoint_auth_methods_supported", "none")
        listed("grant_types_supported", "authorization_code")
        listed("grant_types_supported", "refresh_token")
        if meta.get("authorization_response_iss_parameter_supported") is not True:
            raise fail("it does not send 'iss' in authorization responses")
        auth = endpoint("authorization_endpoint")
        token = endpoint("token_endpoint")
        par = endpoint("pushed_authorization_request_endpoint")
        revoke = endpoint("revocation_endpoint", required=False)
        assert auth is not None
        assert token is not None
        assert par is not None
        scopes = tuple(s for s in meta.get("scopes_supported") or () if isinstance(s, str))
        return cls(issuer, auth, token, par, revoke, scopes)


def _check_url(url: str, what: str) -> None:
    parts = urlsplit(url)
    secure = parts.scheme == "https" or (parts.scheme == "http" and is_loopback_url(url))
    if secure and parts.path in ("", "/") and not parts.query and not parts.fragment:
        return
    # http only on loopback: the development PDS; anything real is https.
    raise PermanentError(f"{what} {url!r} must be an https origin (http only on loopback)")


async def _get_json(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        response = await http.get(url)
    except httpx.RequestError as e:
        raise TransientError(f"GET {url} failed: {type(e).__name__}: {e}") from e
    if response.status_code >= 500:
        raise TransientError(f"GET {url}: HTTP {response.status_code}", status=response.status_code)
    if response.status_code != 200:
        raise PermanentError(f"GET {url}: HTTP {response.status_code}", status=response.status_code)
    if len(response.content) > _METADATA_LIMIT:
        raise PermanentError(f"GET {url}: the metadata is larger than {_METADATA_LIMIT} bytes")
    try:
        body = response.json()
    except ValueError as e:
        raise PermanentError(f"GET {url}: not JSON ({e})") from e
    if not isinstance(body, dict):
        raise PermanentError(f"GET {url}: not a JSON object")
    return body


async def discover(http: httpx.AsyncClient, pds_url: str) -> AuthServer:
    """The authorization server of the PDS at ``pds_url``, its metadata checked."""
    pds = pds_url.rstrip("/")
    resource = await _get_json(http, f"{pds}/.well-known/oauth-protected-resource")
    if resource.get("resource") not in (pds, pds + "/"):
        named = resource.get("resource")
        raise PermanentError(f"{pds}'s protected-resource metadata is for {named!r}")
    servers = resource.get("authorization_servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], str):
        raise PermanentError(f"{pds} names no authorization server")
    issuer = servers[0].rstrip("/")
    _check_url(issuer, "the issuer")
    meta = await _get_json(http, f"{issuer}/.well-known/oauth-authorization-server")
    return AuthServer.from_metadata(issuer, meta)


def _oauth_error(url: str, response: httpx.Response) -> Exception:
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    desc = body.get("error_description") if isinstance(body, dict) else None
    error = error if isinstance(error, str) else None
    text = f"{url}: HTTP {response.status_code}" + (f" {error}" if error else "")
    text += f": {desc}" if isinstance(desc, str) and desc else ""
    status = response.status_code
    if status == 429:
        return RateLimitedError(
            text, reset_at=retry_at(response.headers, time.time()), error=error, status=status
        )
    if status >= 500 or status == 408:
        return TransientError(text, error=error, status=status)
    if error in ("invalid_grant", "access_denied", "invalid_token"):
        return AuthError(text, error=error, status=status)
    return PermanentError(text, error=error, status=status)


async def post_form(
    http: httpx.AsyncClient,
    url: str,
    form: Mapping[str, str],
    key: DpopKey,
    nonces: NonceCache,
) -> dict[str, Any]:
    """POST ``form`` to the authorization server with a DPoP proof; once more with a fresh
    proof if the server asks for a nonce. The decoded JSON object (``{}`` for no body)."""
    for attempt in (1, 2):
        proof = dpop_proof(key, "POST", url, nonce=nonces.get(url))
        try:
            response = await http.post(url, data=dict(form), headers={"DPoP": proof})
        except httpx.RequestError as e:
            raise TransientError(f"POST {url} failed: {type(e).__name__}: {e}") from e
        fresh = nonces.observe(url, response.headers)
        if response.is_success:
            if not response.content:
                return {}
            try:
                body = response.json()
            except ValueError as e:
                raise TransientError(f"POST {url}: malformed JSON answer ({e})") from e
            if not isinstance(body, dict):
                raise TransientError(f"POST {url}: the answer is not a JSON object")
            return body
        exc = _oauth_error(url, response)
        if attempt == 1 and fresh and getattr(exc, "error", None) == "use_dpop_nonce":
            continue
        raise exc
    raise AssertionError("unreachable")  # pragma: no cover

"""OAuth building blocks without a server: DPoP keys and proofs, JWS, PKCE, the callback
checks (state, iss), the token checks (sub, DPoP, scope), metadata rules, the session's
nonce/refresh verdicts and the loopback listener (docs/oauth.md).

The proofs are verified here by an independent minimal ES256 verifier written with
``cryptography``; the server-side counterparts (a proof for another method, URL or token, or
a replayed one, refused by the real PDS) are in test_oauth_e2e.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import anyio
import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from atsync._errors import AuthError, PermanentError
from atsync.atproto import OAuthSession, OAuthSessionData, loopback_client_id
from atsync.atproto._oauth_crypto import (
    DpopKey,
    b64url,
    b64url_decode,
    dpop_proof,
    htu_of,
    jws_sign,
    pkce_challenge,
    pkce_verifier,
)
from atsync.atproto._oauth_flow import check_callback
from atsync.atproto._oauth_listener import CallbackListener
from atsync.atproto._oauth_server import AuthServer, NonceCache
from atsync.atproto._oauth_session import tokens_from_response
from atsync.atproto._session import MemorySessionStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def verify_es256(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a compact JWS's ES256 signature against the JWK in its own header."""
    head, body, sig = token.split(".")
    header = json.loads(b64url_decode(head))
    payload = json.loads(b64url_decode(body))
    assert header["alg"] == "ES256"
    jwk = header["jwk"]
    numbers = ec.EllipticCurvePublicNumbers(
        int.from_bytes(b64url_decode(jwk["x"]), "big"),
        int.from_bytes(b64url_decode(jwk["y"]), "big"),
        ec.SECP256R1(),
    )
    raw = b64url_decode(sig)
    assert len(raw) == 64
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    numbers.public_key().verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    return header, payload


# --- keys, JWS, PKCE ----------------------------------------------------------------------------


def test_b64url_has_no_padding_and_round_trips() -> None:
    for n in range(6):
        data = bytes(range(250, 250 + n)) if n else b""
        text = b64url(bytes(b % 256 for b in data))
        assert "=" not in text and "+" not in text and "/" not in text
        assert b64url_decode(text) == bytes(b % 256 for b in data)


def test_dpop_key_round_trips_through_its_private_jwk() -> None:
    key = DpopKey.generate()
    jwk = key.private_jwk()
    assert set(jwk) == {"kty", "crv", "x", "y", "d"}
    again = DpopKey.from_jwk(jwk)
    assert again.public_jwk == key.public_jwk and again.thumbprint() == key.thumbprint()
    assert "d" not in key.public_jwk
    assert jwk["d"] not in repr(key)


def test_dpop_key_refuses_a_jwk_whose_public_part_is_not_its_own() -> None:
    jwk = DpopKey.generate().private_jwk()
    jwk["x"] = DpopKey.generate().public_jwk["x"]
    with pytest.raises(ValueError, match="does not match"):
        DpopKey.from_jwk(jwk)
    with pytest.raises(ValueError, match="P-256"):
        DpopKey.from_jwk({"kty": "OKP", "crv": "Ed25519", "d": "AA"})


def test_thumbprint_is_rfc7638_over_the_required_members_in_order() -> None:
    key = DpopKey.generate()
    jwk = key.public_jwk
    canonical = f'{{"crv":"P-256","kty":"EC","x":"{jwk["x"]}","y":"{jwk["y"]}"}}'
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest())
    assert key.thumbprint() == expected.rstrip(b"=").decode()


def test_jws_is_compact_es256_and_verifies() -> None:
    key = DpopKey.generate()
    token = jws_sign({"typ": "x", "alg": "none", "jwk": key.public_jwk}, {"a": 1}, key)
    header, payload = verify_es256(token)
    assert header["alg"] == "ES256"  # whatever the caller asked for
    assert payload == {"a": 1}
    # One flipped payload bit and the signature no longer holds.
    head, _, sig = token.split(".")
    tampered = f"{head}.{b64url(json.dumps({'a': 2}).encode())}.{sig}"
    with pytest.raises(InvalidSignature):
        verify_es256(tampered)


def test_pkce_matches_the_rfc7636_example_and_makes_43_char_verifiers() -> None:
    assert (
        pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
        == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )
    verifiers = {pkce_verifier() for _ in range(20)}
    assert len(verifiers) == 20
    assert all(len(v) == 43 and v.replace("-", "").replace("_", "").isalnum() for v in verifiers)


# --- DPoP proofs --------------------------------------------------------------------------------


def test_dpop_proof_claims() -> None:
    key = DpopKey.generate()
    before = int(time.time())
    proof = dpop_proof(key, "post", "http://LocalHost:9/xrpc/a.b.c?x=1#frag", nonce="n1")
    header, payload = verify_es256(proof)
    assert header["typ"] == "dpop+jwt"
    assert header["jwk"] == key.public_jwk and "d" not in header["jwk"]
    assert payload["htm"] == "POST"
    assert payload["htu"] == "http://localhost:9/xrpc/a.b.c"  # no query, no fragment
    assert payload["nonce"] == "n1"
    assert before <= payload["iat"] <= int(time.time())
    assert "ath" not in payload  # only resource requests carry the token's hash


def test_dpop_proof_binds_the_access_token_with_ath() -> None:
    key = DpopKey.generate()
    _, payload = verify_es256(dpop_proof(key, "GET", "https://pds.example/x", access_token="tok"))
    assert payload["ath"] == b64url(hashlib.sha256(b"tok").digest())
    _, other = verify_es256(dpop_proof(key, "GET", "https://pds.example/x", access_token="tok2"))
    assert other["ath"] != payload["ath"]


def test_every_dpop_proof_has_a_fresh_jti() -> None:
    key = DpopKey.generate()
    jtis = {verify_es256(dpop_proof(key, "GET", "https://a.example/"))[1]["jti"] for _ in range(50)}
    assert len(jtis) == 50


def test_htu_drops_query_and_fragment_only() -> None:
    assert htu_of("https://A.example:8443/p/q?x=y#z") == "https://a.example:8443/p/q"
    assert htu_of("https://a.example") == "https://a.example/"


# --- the callback and token checks --------------------------------------------------------------

ISSUER = "https://auth.example"


def test_callback_with_our_state_and_issuer_yields_the_code() -> None:
    params = {"code": "cod-1", "state": "s", "iss": ISSUER}
    assert check_callback(params, "s", ISSUER) == "cod-1"


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({"code": "c", "state": "other", "iss": ISSUER}, "state"),
        ({"code": "c", "iss": ISSUER}, "state"),
        ({"code": "c", "state": "s", "iss": "https://evil.example"}, "issuer"),
        ({"code": "c", "state": "s"}, "issuer"),
        ({"state": "s", "iss": ISSUER}, "no code"),
    ],
)
def test_callback_checks_refuse(params: dict[str, str], why: str) -> None:
    with pytest.raises(AuthError, match=why):
        check_callback(params, "s", ISSUER)


def test_callback_error_is_an_auth_error_with_its_name() -> None:
    params = {"error": "access_denied", "error_description": "no", "state": "s", "iss": ISSUER}
    with pytest.raises(AuthError, match="not granted: access_denied: no") as exc:
        check_callback(params, "s", ISSUER)
    assert exc.value.error == "access_denied"


def token_body(**over: Any) -> dict[str, Any]:
    body = {
        "access_token": "at",
        "refresh_token": "rt",
        "token_type": "DPoP",
        "scope": "atproto transition:generic",
        "sub": "did:plc:alice",
        "expires_in": 3600,
    }
    body.update(over)
    return body


def test_token_response_is_checked() -> None:
    assert tokens_from_response(token_body(), "did:plc:alice", 100.0) == (
        "at",
        "rt",
        "atproto transition:generic",
        3700.0,
    )
    with pytest.raises(AuthError, match="did:plc:mallory"):
        tokens_from_response(token_body(sub="did:plc:mallory"), "did:plc:alice", 0)
    with pytest.raises(PermanentError, match="DPoP"):
        tokens_from_response(token_body(token_type="Bearer"), "did:plc:alice", 0)
    with pytest.raises(PermanentError, match="atproto"):
        tokens_from_response(token_body(scope="transition:generic"), "did:plc:alice", 0)


def metadata(**over: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "issuer": ISSUER,
        "authorization_endpoint": f"{ISSUER}/oauth/authorize",
        "token_endpoint": f"{ISSUER}/oauth/token",
        "pushed_authorization_request_endpoint": f"{ISSUER}/oauth/par",
        "revocation_endpoint": f"{ISSUER}/oauth/revoke",
        "code_challenge_methods_supported": ["S256"],
        "dpop_signing_alg_values_supported": ["ES256"],
        "scopes_supported": ["atproto", "transition:generic"],
        "token_endpoint_auth_methods_supported": ["none", "private_key_jwt"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "authorization_response_iss_parameter_supported": True,
    }
    meta.update(over)
    return meta


def test_authorization_server_metadata_rules() -> None:
    server = AuthServer.from_metadata(ISSUER, metadata())
    assert server.par_endpoint == f"{ISSUER}/oauth/par"
    cases = [
        ({"issuer": "https://other.example"}, "names the issuer"),
        ({"code_challenge_methods_supported": ["plain"]}, "S256"),
        ({"dpop_signing_alg_values_supported": ["RS256"]}, "ES256"),
        ({"token_endpoint": "https://evil.example/token"}, "token_endpoint"),
        ({"pushed_authorization_request_endpoint": None}, "pushed_authorization"),
        ({"authorization_response_iss_parameter_supported": False}, "'iss'"),
    ]
    for over, why in cases:
        with pytest.raises(PermanentError, match=why):
            AuthServer.from_metadata(ISSUER, metadata(**over))


def test_loopback_client_id_carries_redirect_uri_and_scope() -> None:
    cid = loopback_client_id("http://127.0.0.1:5000/callback", "atproto transition:generic")
    assert cid == (
        "http://localhost?redirect_uri=http%3A%2F%2F127.0.0.1%3A5000%2Fcallback"
        "&scope=atproto+transition%3Ageneric"
    )


# --- the session's verdicts and data ----------------------------------------------------------


def session_data(**over: Any) -> OAuthSessionData:
    values: dict[str, Any] = {
        "did": "did:plc:alice",
        "handle": "alice.test",
        "pds_url": "http://localhost:1",
        "issuer": "http://localhost:1",
        "client_id": "http://localhost",
        "scope": "atproto",
        "token_endpoint": "http://localhost:1/oauth/token",
        "access_token": "secret-access",
        "refresh_token": "secret-refresh",
        "expires_at": 1e10,
        "dpop_jwk": DpopKey.generate().private_jwk(),
    }
    values.update(over)
    return OAuthSessionData(**values)


def test_session_data_round_trips_and_hides_secrets() -> None:
    data = session_data()
    stored = data.to_dict()
    assert stored["type"] == "oauth"
    assert OAuthSessionData.from_dict(json.loads(json.dumps(stored))) == data
    assert "secret" not in repr(data) and data.dpop_jwk["d"] not in repr(data)
    broken = dict(stored)
    del broken["dpop_jwk"]
    with pytest.raises(ValueError, match="DPoP key"):
        OAuthSessionData.from_dict(broken)


def response(status: int, headers: dict[str, str], body: Any = None) -> httpx.Response:
    content = json.dumps(body).encode() if body is not None else b""
    return httpx.Response(status, headers=headers, content=content)


def test_after_response_keeps_nonces_and_says_what_to_do() -> None:
    session = OAuthSession(session_data(), store=MemorySessionStore())
    url = "http://localhost:1/xrpc/a.b.c"
    assert session.after_response(url, response(200, {"DPoP-Nonce": "n1"})) is None
    proof = session.request_headers("GET", url, "tok")["DPoP"]
    assert verify_es256(proof)[1]["nonce"] == "n1"  # the next proof carries it
    nonce_needed = {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "n2"}
    assert session.after_response(url, response(401, nonce_needed)) == "nonce"
    # The same nonce again would be refused again: no resend loop.
    assert session.after_response(url, response(401, nonce_needed)) is None
    expired = {"WWW-Authenticate": 'DPoP error="invalid_token", error_description="expired"'}
    assert session.after_response(url, response(401, expired)) == "refresh"
    assert session.after_response(url, response(400, {}, {"error": "InvalidSwap"})) is None
    headers = session.request_headers("POST", url, "tok")
    assert headers["Authorization"] == "DPoP tok"


def test_nonces_are_kept_per_server() -> None:
    cache = NonceCache()
    cache.observe("https://a.example/x", {"dpop-nonce": "na"})
    cache.observe("https://b.example/y", {"dpop-nonce": "nb"})
    assert cache.get("https://a.example/other?q") == "na"
    assert cache.get("https://b.example/") == "nb"
    assert cache.get("https://c.example/") is None


# --- the loopback listener --------------------------------------------------------------------


async def test_listener_serves_one_callback_and_404s_the_rest() -> None:
    async with CallbackListener() as callback:
        assert callback.redirect_uri.startswith("http://127.0.0.1:")
        base = callback.redirect_uri.rsplit("/", 1)[0]
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{base}/favicon.ico")).status_code == 404
            page = await http.get(callback.redirect_uri, params={"code": "c", "state": "s"})
            assert page.status_code == 200 and "Logged in" in page.text
            with anyio.fail_after(5):
                assert await callback.wait() == {"code": "c", "state": "s"}
            # One-shot: a second callback is not taken.
            again = await http.get(callback.redirect_uri, params={"code": "x"})
            assert again.status_code == 404
    assert await callback.wait() == {"code": "c", "state": "s"}


async def test_listener_refuses_repeated_parameters() -> None:
    async with CallbackListener() as callback, httpx.AsyncClient() as http:
        page = await http.get(callback.redirect_uri + "?state=a&state=b&code=c")
        assert "Not logged in" in page.text
        with anyio.fail_after(5):
            assert (await callback.wait())["error"] == "invalid_request"

"""The cryptography of atproto OAuth: an ES256 DPoP key, JWS, DPoP proofs and PKCE.

Written against RFC 7515 (JWS compact serialization), RFC 7638 (JWK thumbprint), RFC 9449
(DPoP) and RFC 7636 (PKCE), with ``cryptography`` for the curve: the subset used here is a
few lines, so no JOSE library is pulled in. Only what a public (native) client needs: it
signs, the servers verify.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

__all__ = [
    "DpopKey",
    "b64url",
    "b64url_decode",
    "dpop_proof",
    "htu_of",
    "jws_sign",
    "pkce_challenge",
    "pkce_verifier",
]

_P256_BYTES = 32


def b64url(data: bytes) -> str:
    """base64url without padding, as JOSE and PKCE write it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_b64(value: int) -> str:
    return b64url(value.to_bytes(_P256_BYTES, "big"))


class DpopKey:
    """A P-256 key pair that DPoP-binds an OAuth session's tokens (alg ES256).

    Each session has its own; it is stored with the session (``private_jwk``), since the
    tokens are useless without it and worthless with any other key.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("a DPoP key must be on P-256 (ES256)")
        self._key = private_key
        numbers = private_key.public_key().public_numbers()
        self._public = {
            "kty": "EC",
            "crv": "P-256",
            "x": _int_b64(numbers.x),
            "y": _int_b64(numbers.y),
        }

    @classmethod
    def generate(cls) -> DpopKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> DpopKey:
        """Load the private JWK that ``private_jwk`` wrote; ``ValueError`` if it is not one."""
        if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            raise ValueError("not a P-256 EC JWK")
        try:
            d = int.from_bytes(b64url_decode(str(jwk["d"])), "big")
            key = ec.derive_private_key(d, ec.SECP256R1())
        except (KeyError, ValueError) as e:
            raise ValueError(f"unusable private JWK: {e}") from e
        loaded = cls(key)
        if jwk.get("x") not in (None, loaded._public["x"]) or jwk.get("y") not in (
            None,
            loaded._public["y"],
        ):
            raise ValueError("the JWK's public part does not match its private key")
        return loaded

    @property
    def public_jwk(self) -> dict[str, str]:
        return dict(self._public)

    def private_jwk(self) -> dict[str, str]:
        d = self._key.private_numbers().private_value
        return {**self._public, "d": _int_b64(d)}

    def thumbprint(self) -> str:
        """RFC 7638 SHA-256 thumbprint: what the server binds the tokens to (``jkt``)."""
        canonical = json.dumps(
            {k: self._public[k] for k in ("crv", "kty", "x", "y")},
            separators=(",", ":"),
            sort_keys=True,
        )
        return b64url(hashlib.sha256(canonical.encode()).digest())

    def sign(self, data: bytes) -> bytes:
        """ES256: the JWS form of the signature, r || s (64 bytes), not DER."""
        r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")

    def __repr__(self) -> str:  # the private key stays out of logs and tracebacks
        return f"DpopKey(jkt={self.thumbprint()!r})"


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def jws_sign(header: Mapping[str, Any], payload: Mapping[str, Any], key: DpopKey) -> str:
    """A JWS in compact serialization, signed ES256 (``alg`` is forced to ES256)."""
    head = b64url(_compact_json({**header, "alg": "ES256"}))
    body = b64url(_compact_json(payload))
    signing_input = f"{head}.{body}".encode("ascii")
    return f"{head}.{body}.{b64url(key.sign(signing_input))}"


def htu_of(url: str) -> str:
    """The ``htu`` claim for a request URL: the URL without query and fragment (RFC 9449
    section 4.2), scheme and host lower-cased as servers normalize them."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", "", ""))


def dpop_proof(
    key: DpopKey,
    htm: str,
    url: str,
    *,
    nonce: str | None = None,
    access_token: str | None = None,
    iat: int | None = None,
    jti: str | None = None,
) -> str:
    """A DPoP proof for one request: ``htm`` (the method), ``htu`` (``url`` without query),
    a fresh ``jti`` (servers refuse a replayed one), ``iat``, the server's ``nonce`` when it
    sent one, and ``ath`` (hash of the access token) on resource requests."""
    payload: dict[str, Any] = {
        "jti": jti if jti is not None else b64url(secrets.token_bytes(16)),
        "htm": htm.upper(),
        "htu": htu_of(url),
        "iat": int(time.time()) if iat is None else iat,
    }
    if nonce is not None:
        payload["nonce"] = nonce
    if access_token is not None:
        payload["ath"] = b64url(hashlib.sha256(access_token.encode("ascii")).digest())
    return jws_sign({"typ": "dpop+jwt", "jwk": key.public_jwk}, payload, key)


def pkce_verifier() -> str:
    """A PKCE code verifier: 32 random bytes, 43 base64url characters (RFC 7636 4.1)."""
    return b64url(secrets.token_bytes(32))


def pkce_challenge(verifier: str) -> str:
    """The S256 challenge of ``verifier``."""
    return b64url(hashlib.sha256(verifier.encode("ascii")).digest())

"""Keypairs, ``did:key`` and signatures for the atproto curves: p256, k256 and ed25519.

atproto rules (atproto.com/specs/cryptography) enforced here, beyond what ``cryptography``
does by itself:

- ECDSA signatures are the 64-byte compact ``r || s`` form over SHA-256 of the data, never
  DER; signing always emits the low-S form, and verification rejects high-S signatures, so a
  signature cannot be rewritten into a second valid one (malleability).
- Public keys travel as compressed points (33 bytes; ed25519 raw 32 bytes) behind a multicodec
  varint prefix, base58btc-encoded with the multibase ``z``.

base58btc comes from ``libipld``'s multibase functions (pinned, already a dependency).
"""

from __future__ import annotations

from typing import Literal, get_args

import libipld
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from atsync._errors import SignerError, VerificationError

__all__ = [
    "Alg",
    "Keypair",
    "decode_multikey",
    "did_key_from_verification_method",
    "encode_multikey",
    "format_did_key",
    "generate_keypair",
    "load_keypair",
    "multibase_decode",
    "multibase_encode",
    "parse_did_key",
    "verify_signature",
]

Alg = Literal["ed25519", "p256", "k256"]
ALGS: tuple[Alg, ...] = get_args(Alg)

# Multicodec codes as unsigned varints: ed25519-pub 0xed, p256-pub 0x1200, secp256k1-pub 0xe7.
_MULTICODEC: dict[Alg, bytes] = {
    "ed25519": b"\xed\x01",
    "p256": b"\x80\x24",
    "k256": b"\xe7\x01",
}
_CURVES: dict[Alg, ec.EllipticCurve] = {"p256": ec.SECP256R1(), "k256": ec.SECP256K1()}
_ORDER: dict[Alg, int] = {
    "p256": 0xFFFFFFFF_00000000_FFFFFFFF_FFFFFFFF_BCE6FAAD_A7179E84_F3B9CAC2_FC632551,
    "k256": 0xFFFFFFFF_FFFFFFFF_FFFFFFFF_FFFFFFFE_BAAEDCE6_AF48A03B_BFD25E8C_D0364141,
}
# Legacy DID document suites carry the bare compressed key (no multicodec prefix).
_LEGACY_SUITES: dict[str, Alg] = {
    "EcdsaSecp256r1VerificationKey2019": "p256",
    "EcdsaSecp256k1VerificationKey2019": "k256",
}
DID_KEY_PREFIX = "did:key:"


def multibase_encode(data: bytes) -> str:
    """base58btc with the multibase prefix ``z``."""
    return str(libipld.encode_multibase("z", bytes(data)))


def multibase_decode(s: str) -> bytes:
    """Decode a base58btc multibase string; other bases are refused (atproto uses only ``z``)."""
    if not isinstance(s, str) or not s.startswith("z"):
        raise VerificationError(f"multibase value {s!r:.60} is not base58btc ('z' prefix)")
    try:
        _, data = libipld.decode_multibase(s)
    except ValueError as e:
        raise VerificationError(f"multibase value {s!r:.60} is not valid base58btc: {e}") from e
    return bytes(data)


def _check_public_key(alg: Alg, pub: bytes) -> None:
    """Raise VerificationError unless ``pub`` is a well-formed public key of ``alg``."""
    if alg == "ed25519":
        if len(pub) != 32:
            raise VerificationError(f"ed25519 public key must be 32 bytes, got {len(pub)}")
        return
    if len(pub) != 33 or pub[0] not in (2, 3):
        raise VerificationError(f"{alg} public key must be a 33-byte compressed point")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[alg], pub)
    except ValueError as e:
        raise VerificationError(f"{alg} public key is not a point on the curve") from e


def encode_multikey(alg: Alg, public_key: bytes) -> str:
    """The ``publicKeyMultibase`` of a ``Multikey`` verification method."""
    if alg not in _MULTICODEC:
        raise VerificationError(f"unsupported key algorithm {alg!r}")
    _check_public_key(alg, public_key)
    return multibase_encode(_MULTICODEC[alg] + public_key)


def decode_multikey(multikey: str) -> tuple[Alg, bytes]:
    """Inverse of ``encode_multikey``: ``(alg, compressed public key)``."""
    raw = multibase_decode(multikey)
    for alg, prefix in _MULTICODEC.items():
        if raw.startswith(prefix):
            pub = raw[len(prefix) :]
            _check_public_key(alg, pub)
            return alg, pub
    raise VerificationError(f"multikey {multikey!r:.60} has an unsupported multicodec prefix")


def format_did_key(alg: Alg, public_key: bytes) -> str:
    return DID_KEY_PREFIX + encode_multikey(alg, public_key)


def parse_did_key(did: str) -> tuple[Alg, bytes]:
    """``did:key:z…`` to ``(alg, compressed public key)``; ``VerificationError`` if unusable."""
    if not isinstance(did, str) or not did.startswith(DID_KEY_PREFIX):
        raise VerificationError(f"{did!r:.60} is not a did:key")
    return decode_multikey(did[len(DID_KEY_PREFIX) :])


def did_key_from_verification_method(suite: str, public_key_multibase: str) -> str:
    """The ``did:key`` for a DID document verification method (``type`` + multibase key)."""
    if suite == "Multikey":
        return format_did_key(*decode_multikey(public_key_multibase))
    alg = _LEGACY_SUITES.get(suite)
    if alg is None:
        raise VerificationError(f"unsupported verification method type {suite!r}")
    raw = multibase_decode(public_key_multibase)
    if len(raw) == 65:
        # Some legacy documents carry the uncompressed point; it names the same key.
        try:
            point = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[alg], raw)
        except ValueError as e:
            raise VerificationError(f"{alg} public key is not a point on the curve") from e
        raw = point.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
    return format_did_key(alg, raw)


class Keypair:
    """A private key for one of the atproto algorithms. Construct with ``generate_keypair``
    or ``load_keypair``."""

    def __init__(
        self, alg: Alg, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ) -> None:
        self.alg: Alg = alg
        self._key = key
        self._public = self._compute_public()
        self.did = format_did_key(alg, self._public)

    def _compute_public(self) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        return self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )

    def private_bytes(self) -> bytes:
        """32 bytes: the ed25519 seed, or the big-endian ECDSA scalar."""
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        return self._key.private_numbers().private_value.to_bytes(32, "big")

    def public_bytes_compressed(self) -> bytes:
        return self._public

    @property
    def public_key_multibase(self) -> str:
        return encode_multikey(self.alg, self._public)

    def sign(self, data: bytes) -> bytes:
        """64-byte signature; for ECDSA, SHA-256 over ``data``, compact ``r||s``, low-S."""
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        # RFC 6979 nonces: no dependence on the RNG at signing time, and reproducible output.
        der = self._key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        n = _ORDER[self.alg]
        if s > n // 2:
            s = n - s
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def __repr__(self) -> str:  # never show private material
        return f"Keypair({self.alg!r}, {self.did!r})"


def generate_keypair(alg: Alg) -> Keypair:
    if alg == "ed25519":
        return Keypair(alg, ed25519.Ed25519PrivateKey.generate())
    if alg in _CURVES:
        return Keypair(alg, ec.generate_private_key(_CURVES[alg]))
    raise SignerError(f"unsupported key algorithm {alg!r}; expected one of {ALGS}")


def load_keypair(alg: Alg, private_bytes: bytes) -> Keypair:
    if not isinstance(private_bytes, bytes | bytearray) or len(private_bytes) != 32:
        raise SignerError(f"{alg} private key must be 32 bytes")
    if alg == "ed25519":
        return Keypair(alg, ed25519.Ed25519PrivateKey.from_private_bytes(bytes(private_bytes)))
    if alg not in _CURVES:
        raise SignerError(f"unsupported key algorithm {alg!r}; expected one of {ALGS}")
    scalar = int.from_bytes(private_bytes, "big")
    if not 1 <= scalar < _ORDER[alg]:
        raise SignerError(f"{alg} private key is out of range for the curve")
    return Keypair(alg, ec.derive_private_key(scalar, _CURVES[alg]))


def verify_signature(key: str | tuple[Alg, bytes], data: bytes, sig: bytes) -> bool:
    """True only for a valid atproto signature by ``key`` (a did:key or ``(alg, pub)``).

    DER signatures, wrong lengths and high-S ECDSA signatures are False. An unusable key
    (malformed did:key, unknown algorithm, point off the curve) raises ``VerificationError``.
    """
    if isinstance(key, str):
        alg, pub = parse_did_key(key)
    else:
        alg, pub = key
        if alg not in _MULTICODEC:
            raise VerificationError(f"unsupported key algorithm {alg!r}")
        _check_public_key(alg, pub)
    if not isinstance(sig, bytes | bytearray) or len(sig) != 64:
        return False
    try:
        if alg == "ed25519":
            ed25519.Ed25519PublicKey.from_public_bytes(pub).verify(bytes(sig), bytes(data))
            return True
        r = int.from_bytes(sig[:32], "big")
        s = int.from_bytes(sig[32:], "big")
        n = _ORDER[alg]
        if not (1 <= r < n and 1 <= s <= n // 2):
            return False
        point = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[alg], pub)
        point.verify(encode_dss_signature(r, s), bytes(data), ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False

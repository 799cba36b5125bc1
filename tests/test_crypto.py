"""Keys, did:key and signatures against the atproto interop crypto vectors."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from atproto_crypto.verify import verify_signature as sdk_verify

from atsync._errors import SignerError, VerificationError
from atsync.atproto import _crypto as cr

VECTORS = Path(__file__).parent / "interop" / "crypto"


def _b64(s: str) -> bytes:
    return base64.b64decode(s + "=" * (-len(s) % 4))


def _load(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((VECTORS / name).read_text())
    return data


SIGNATURES = _load("signature-fixtures.json")
ALG_OF = {"ES256": "p256", "ES256K": "k256"}


@pytest.mark.parametrize("fx", SIGNATURES, ids=lambda fx: fx["comment"])
def test_signature_fixture(fx: dict[str, Any]) -> None:
    message = _b64(fx["messageBase64"])
    sig = _b64(fx["signatureBase64"])
    did = fx["publicKeyDid"]
    alg, pub = cr.parse_did_key(did)
    assert alg == ALG_OF[fx["algorithm"]]
    assert cr.verify_signature(did, message, sig) is fx["validSignature"]
    assert cr.verify_signature((alg, pub), message, sig) is fx["validSignature"]
    # The DID document form of the same key names the same did:key.
    from_doc = cr.did_key_from_verification_method(fx["didDocSuite"], fx["publicKeyMultibase"])
    assert from_doc == did


def test_fixtures_include_the_rejections_that_matter() -> None:
    tags = [t for fx in SIGNATURES for t in fx["tags"]]
    assert tags.count("high-s") == 2
    assert tags.count("der-encoded") == 2


def test_high_s_fixture_is_otherwise_a_valid_signature() -> None:
    # Flipping s back to n - s must make the high-S vectors verify: this proves the rejection
    # comes from the low-S rule and not from some other defect in the vector.
    for fx in SIGNATURES:
        if "high-s" not in fx["tags"]:
            continue
        alg, _ = cr.parse_did_key(fx["publicKeyDid"])
        sig = _b64(fx["signatureBase64"])
        n = cr._ORDER[alg]
        s = int.from_bytes(sig[32:], "big")
        assert s > n // 2
        low = sig[:32] + (n - s).to_bytes(32, "big")
        assert cr.verify_signature(fx["publicKeyDid"], _b64(fx["messageBase64"]), low)


@pytest.mark.parametrize("fx", _load("w3c_didkey_K256.json"), ids=lambda fx: fx["publicDidKey"])
def test_w3c_k256_did_key(fx: dict[str, str]) -> None:
    kp = cr.load_keypair("k256", bytes.fromhex(fx["privateKeyBytesHex"]))
    assert kp.did == fx["publicDidKey"]
    assert kp.private_bytes().hex() == fx["privateKeyBytesHex"]
    assert cr.parse_did_key(kp.did) == ("k256", kp.public_bytes_compressed())


@pytest.mark.parametrize("fx", _load("w3c_didkey_P256.json"), ids=lambda fx: fx["publicDidKey"])
def test_w3c_p256_did_key(fx: dict[str, str]) -> None:
    private = cr.multibase_decode("z" + fx["privateKeyBytesBase58"])
    kp = cr.load_keypair("p256", private)
    assert kp.did == fx["publicDidKey"]
    assert kp.did.startswith("did:key:zDnae")


@pytest.mark.parametrize("alg", cr.ALGS)
def test_sign_verify_round_trip(alg: cr.Alg) -> None:
    kp = cr.generate_keypair(alg)
    sig = kp.sign(b"hello")
    assert len(sig) == 64
    assert cr.verify_signature(kp.did, b"hello", sig)
    assert not cr.verify_signature(kp.did, b"hellO", sig)
    other = cr.generate_keypair(alg)
    assert not cr.verify_signature(other.did, b"hello", sig)
    again = cr.load_keypair(alg, kp.private_bytes())
    assert again.did == kp.did
    assert cr.verify_signature(kp.did, b"hello", again.sign(b"hello"))


@pytest.mark.parametrize("alg", cr.ALGS)
def test_did_key_prefixes_and_lengths(alg: cr.Alg) -> None:
    kp = cr.generate_keypair(alg)
    expected_prefix = {"ed25519": "did:key:z6Mk", "p256": "did:key:zDn", "k256": "did:key:zQ3s"}
    assert kp.did.startswith(expected_prefix[alg])
    assert len(kp.public_bytes_compressed()) == (32 if alg == "ed25519" else 33)
    assert cr.decode_multikey(kp.public_key_multibase) == (alg, kp.public_bytes_compressed())
    assert cr.did_key_from_verification_method("Multikey", kp.public_key_multibase) == kp.did


@pytest.mark.parametrize("alg", ["p256", "k256"])
def test_signing_always_emits_low_s(alg: cr.Alg) -> None:
    kp = cr.generate_keypair(alg)
    n = cr._ORDER[alg]
    # ~half of raw ECDSA signatures are high-S, so 64 messages would all but surely hit one.
    for i in range(64):
        sig = kp.sign(i.to_bytes(2, "big"))
        assert int.from_bytes(sig[32:], "big") <= n // 2


@pytest.mark.parametrize("alg", ["p256", "k256"])
def test_high_s_and_malformed_signatures_are_rejected(alg: cr.Alg) -> None:
    kp = cr.generate_keypair(alg)
    sig = kp.sign(b"data")
    n = cr._ORDER[alg]
    s = int.from_bytes(sig[32:], "big")
    high = sig[:32] + (n - s).to_bytes(32, "big")
    assert not cr.verify_signature(kp.did, b"data", high)
    assert not cr.verify_signature(kp.did, b"data", sig + b"\x00")
    assert not cr.verify_signature(kp.did, b"data", sig[:63])
    assert not cr.verify_signature(kp.did, b"data", bytes(64))
    assert not cr.verify_signature(kp.did, b"data", sig[:32] + n.to_bytes(32, "big"))


def test_ed25519_wrong_length_rejected() -> None:
    kp = cr.generate_keypair("ed25519")
    sig = kp.sign(b"x")
    assert not cr.verify_signature(kp.did, b"x", sig[:-1])
    assert not cr.verify_signature(kp.did, b"x", sig + b"\x00")


def test_unusable_keys_raise() -> None:
    with pytest.raises(VerificationError, match="not a did:key"):
        cr.parse_did_key("did:plc:abc")
    with pytest.raises(VerificationError, match="base58btc"):
        cr.parse_did_key("did:key:z0OIl")
    with pytest.raises(VerificationError, match="multicodec"):
        cr.parse_did_key(cr.DID_KEY_PREFIX + cr.multibase_encode(b"\x12\x00" + bytes(33)))
    # A 33-byte value with a valid header byte whose x is not on the curve.
    off_curve = b"\x02" + b"\xff" * 32
    with pytest.raises(VerificationError, match="curve"):
        cr.format_did_key("p256", off_curve)
    with pytest.raises(VerificationError, match="compressed"):
        cr.verify_signature(("k256", b"\x04" + bytes(64)), b"", bytes(64))
    with pytest.raises(VerificationError, match="unsupported verification method"):
        cr.did_key_from_verification_method("RsaVerificationKey2018", "zabc")


def test_bad_private_keys_raise_signer_error() -> None:
    with pytest.raises(SignerError):
        cr.load_keypair("k256", bytes(32))
    with pytest.raises(SignerError):
        cr.load_keypair("p256", b"\xff" * 32)
    with pytest.raises(SignerError):
        cr.load_keypair("ed25519", bytes(31))
    with pytest.raises(SignerError):
        cr.generate_keypair("rsa")  # type: ignore[arg-type]


def test_repr_hides_private_key() -> None:
    kp = cr.generate_keypair("k256")
    assert kp.private_bytes().hex() not in repr(kp)
    assert kp.did in repr(kp)


def test_multibase_round_trip_keeps_leading_zeros() -> None:
    for raw in (b"", b"\x00", b"\x00\x00\x01", bytes(range(40))):
        assert cr.multibase_decode(cr.multibase_encode(raw)) == raw
    with pytest.raises(VerificationError):
        cr.multibase_decode("uAAA")


@pytest.mark.parametrize("alg", ["p256", "k256"])
def test_the_sdk_accepts_our_signatures_and_did_keys(alg: cr.Alg) -> None:
    # An independent implementation (atproto SDK 0.0.73) must agree with ours.
    kp = cr.generate_keypair(alg)
    for i in range(10):
        msg = f"message {i}".encode()
        assert sdk_verify(kp.did, msg, kp.sign(msg))
    assert not sdk_verify(kp.did, b"other", kp.sign(b"message"))

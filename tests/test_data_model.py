"""DAG-CBOR, CIDs and the atproto data model against the interop data-model vectors."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import libipld
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from atsync._errors import RecordError, VerificationError
from atsync._json import compact_json
from atsync.atproto._cbor import (
    CID,
    check_data_model,
    cid_for_dag_cbor,
    cid_for_record,
    data_from_json,
    data_to_json,
    decode_dag_cbor,
    decode_plain_record,
    decode_record,
    encode_dag_cbor,
)
from mutations import mutated

VECTORS = Path(__file__).parent / "interop" / "data-model"


def _load(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((VECTORS / name).read_text())
    return data


def _b64(s: str) -> bytes:
    return base64.b64decode(s + "=" * (-len(s) % 4))


FIXTURES = _load("data-model-fixtures.json")
VALID = _load("data-model-valid.json")
INVALID = _load("data-model-invalid.json")


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda fx: fx["cid"])
def test_fixture_json_to_cbor_and_cid(fx: dict[str, Any]) -> None:
    value = data_from_json(fx["json"])
    check_data_model(value)
    assert encode_dag_cbor(value) == _b64(fx["cbor_base64"])
    assert cid_for_record(value) == fx["cid"]


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda fx: fx["cid"])
def test_fixture_cbor_to_json(fx: dict[str, Any]) -> None:
    cbor = _b64(fx["cbor_base64"])
    value = decode_dag_cbor(cbor)
    assert data_to_json(value) == fx["json"]
    assert str(CID.for_data(cbor)) == fx["cid"]
    assert decode_record(cbor) == value


def test_fixture_links_and_bytes_stay_distinct() -> None:
    value = decode_dag_cbor(_b64(FIXTURES[1]["cbor_base64"]))
    assert isinstance(value["a"], CID)
    assert isinstance(value["b"], bytes)
    assert isinstance(value["c"]["ref"], CID)
    assert value["c"]["ref"].codec == 0x55


@pytest.mark.parametrize("fx", VALID, ids=lambda fx: fx["note"])
def test_valid(fx: dict[str, Any]) -> None:
    value = data_from_json(fx["json"])
    check_data_model(value)
    assert decode_dag_cbor(encode_dag_cbor(value)) == value


@pytest.mark.parametrize("fx", INVALID, ids=lambda fx: fx["note"])
def test_invalid(fx: dict[str, Any]) -> None:
    with pytest.raises(RecordError):
        check_data_model(data_from_json(fx["json"]))


def test_bytes_that_look_like_a_cid_stay_bytes() -> None:
    # libipld 3.5 would encode these as a tag-42 link; the record's CID would then be wrong.
    cid_lookalike = bytes((1, 0x71, 0x12, 0x20)) + hashlib.sha256(b"x").digest()
    for raw in (cid_lookalike, b"\x01\x55\x00\x00"):
        encoded = encode_dag_cbor({"b": raw})
        assert encoded[3] >> 5 == 2  # major type 2: a byte string, not tag 6
        assert decode_dag_cbor(encoded) == {"b": raw}


def test_map_keys_are_sorted_length_first() -> None:
    assert encode_dag_cbor({"aa": 1, "b": 2}) == bytes.fromhex("a261620262616101")
    assert list(decode_dag_cbor(bytes.fromhex("a261620262616101"))) == ["b", "aa"]


@pytest.mark.parametrize(
    ("hexdata", "why"),
    [
        ("1801", "minimally"),  # 1 in a one-byte argument
        ("190001", "minimally"),
        ("a2626161016162 02", "canonical order"),  # "aa" before "b"
        ("a2616101616102", "canonical order"),  # duplicate key
        ("9f01ff", "indefinite"),
        ("fb3ff8000000000000", "float"),
        ("f93c00", "float"),
        ("f7", "simple value"),
        ("c101", "tag 1"),
        ("0101", "trailing"),
        ("a10101", "not a string"),
        ("d82a4401550000", "0x00 multibase"),
        ("d82a450000550000", "CID version 0"),
        ("3bffffffffffffffff", "64-bit"),
        ("1bffffffffffffffff", "64-bit"),
        ("a261", "cannot fit"),
        ("5bffffffffffffffff", "runs past"),
        ("9bffffffffffffffff", "cannot fit"),
        ("6180", "UTF-8"),
        ("a16161", "end of data"),
        ("", "end of data"),
    ],
)
def test_strict_decoder_rejects(hexdata: str, why: str) -> None:
    with pytest.raises(VerificationError, match=why):
        decode_dag_cbor(bytes.fromhex(hexdata.replace(" ", "")))


def test_deep_nesting_is_refused_not_a_crash() -> None:
    with pytest.raises(VerificationError, match="nested deeper"):
        decode_dag_cbor(b"\x81" * 100_000 + b"\x01")
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    with pytest.raises(RecordError, match="nested deeper"):
        encode_dag_cbor(deep)


def test_encoder_refuses_non_data_model_values() -> None:
    for bad in ({"a": 1.5}, {1: "x"}, {"a": 1 << 63}, {"a": {1, 2}}, {"a": "\ud800"}):
        with pytest.raises(RecordError):
            encode_dag_cbor(bad)


def test_check_data_model_names_the_path() -> None:
    with pytest.raises(RecordError, match=r"\$\.a\.b\[1\]: float"):
        check_data_model({"a": {"b": [1, 2.5]}})
    with pytest.raises(RecordError, match="top level"):
        check_data_model([1])
    with pytest.raises(RecordError, match="reserved"):
        check_data_model({"x": {"$link": "bafy"}})


def test_decode_record_requires_a_map_and_the_data_model() -> None:
    with pytest.raises(VerificationError, match="not a map"):
        decode_record(encode_dag_cbor([1]))
    with pytest.raises(RecordError, match=r"\$type"):
        decode_record(encode_dag_cbor({"$type": ""}))


def test_integer_limits_round_trip() -> None:
    for n in (0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, -1, -(2**63)):
        assert decode_dag_cbor(encode_dag_cbor(n)) == n


def test_cid_parse_and_format() -> None:
    s = "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a"
    cid = CID.parse(s)
    assert str(cid) == s
    assert cid.codec == 0x71
    assert cid.hash_code == 0x12
    assert len(cid.digest) == 32
    assert CID(bytes(cid)) == cid
    assert hash(CID(bytes(cid))) == hash(cid)
    assert cid.matches(b"x") is False
    assert CID.for_data(b"x").matches(b"x")


@pytest.mark.parametrize(
    "bad",
    [
        "QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR",  # CIDv0
        "BAFYREIDFAYVFUWQA7QLNOPDJIQRXZS6BLMOEU4RUJCJTNCI5BELUDIRZ2A",  # uppercase base32
        "zdj7WWeQ43G6JJvLWQWZpyHuAMq6uYWRjkBXFad11vE2LHhQ7",  # base58 multibase
        "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2",  # truncated digest
        "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2b",  # non-zero pad bits
        "b",
        ".",
        "bafy reid",
    ],
)
def test_cid_parse_rejects(bad: str) -> None:
    with pytest.raises(VerificationError):
        CID.parse(bad)


def test_reserved_keys_have_no_json_form() -> None:
    with pytest.raises(RecordError, match="no JSON form"):
        data_to_json({"a": {"$link": "x"}})
    with pytest.raises(RecordError, match="no JSON form"):
        data_to_json({"$bytes": b"x"})


def test_json_bytes_and_links() -> None:
    assert data_from_json({"$bytes": "AQI"}) == b"\x01\x02"
    assert data_to_json(b"\x01\x02") == {"$bytes": "AQI"}
    assert data_from_json({"a": 2.0}) == {"a": 2}
    with pytest.raises(RecordError):
        data_from_json({"$bytes": "A!=="})
    with pytest.raises(RecordError):
        data_from_json({"a": 0.5})


# --- cross-checks against an independent implementation (libipld) -----------------------------


_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)
_plain = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)
_cids = st.binary(min_size=1, max_size=40).map(CID.for_data)
# "$link" and "$bytes" keys are reserved, and "$type" must be a non-empty string: maps breaking
# that are not data-model values.
_keys = st.text(max_size=8).filter(lambda k: k not in ("$link", "$bytes", "$type"))
_full = st.recursive(
    _scalars | st.binary(max_size=40) | _cids,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_plain)
def test_encoding_matches_libipld_for_link_free_values(value: Any) -> None:
    # Only values without bytes and links: libipld cannot keep those two apart.
    assert encode_dag_cbor(value) == libipld.encode_dag_cbor(value)
    assert decode_dag_cbor(libipld.encode_dag_cbor(value)) == value


@settings(max_examples=300, deadline=None)
@given(_full)
def test_round_trip_with_bytes_and_links(value: Any) -> None:
    encoded = encode_dag_cbor(value)
    assert decode_dag_cbor(encoded) == value
    # JSON form round-trips too, wrapped as a record so the top level is a map.
    record = {"v": value}
    check_data_model(record)
    assert data_from_json(json.loads(json.dumps(data_to_json(record)))) == record


def test_plain_values_encode_identically_with_the_fast_path() -> None:
    """check_data_model's "plain" answer decides when libipld may encode (no bytes, no links)."""
    plain = {"$type": "a.b.c", "s": "é", "n": -(2**63), "l": [1, None, True, {"k": "v"}]}
    assert check_data_model(plain) is True
    assert encode_dag_cbor(plain, plain=True) == encode_dag_cbor(plain)
    looks_like_cid = {"$type": "a.b.c", "raw": b"\x01\x71\x12\x20" + bytes(32)}
    assert check_data_model(looks_like_cid) is False  # must take the exact encoder
    assert encode_dag_cbor(looks_like_cid, plain=False) == encode_dag_cbor(looks_like_cid)


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda fx: fx["cid"])
def test_cid_for_dag_cbor_names_the_block(fx: dict[str, Any]) -> None:
    cbor = _b64(fx["cbor_base64"])
    assert cid_for_dag_cbor(cbor) == fx["cid"] == str(CID.for_data(cbor))


# --- the fast paths (libipld) give the strict decoder's answer, or step aside -----------------

_record_values = st.recursive(
    _scalars | st.binary(max_size=40) | _cids | st.floats(allow_nan=False) | st.integers(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["$type", "$link", "$bytes", "ref", "a", "é", "text"])
            | st.text(max_size=6),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


def _strict_record(data: bytes) -> tuple[dict[str, Any], str] | Exception:
    try:
        value = decode_record(data)
    except (VerificationError, RecordError) as exc:
        return exc
    return value, json.dumps(data_to_json(value), ensure_ascii=False, separators=(",", ":"))


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_decode_plain_record_agrees_with_the_strict_decoder(data: st.DataObject) -> None:
    values = _plain if data.draw(st.booleans()) else _record_values
    value = data.draw(st.dictionaries(st.sampled_from(["$type", "text", "n", "x"]), values))
    try:
        encoded = (
            libipld.encode_dag_cbor(value) if data.draw(st.booleans()) else encode_dag_cbor(value)
        )
    except (ValueError, TypeError, OverflowError, RecordError):
        return
    encoded = data.draw(st.one_of(st.just(encoded), mutated(encoded)))
    fast = decode_plain_record(encoded)
    event("fast path" if fast is not None else "strict path")
    if fast is not None:
        # Whatever the fast path accepts, the strict one decodes to the same value and JSON.
        assert _strict_record(encoded) == fast


def test_decode_plain_record_steps_aside_for_what_it_cannot_prove() -> None:
    plain = {"$type": "a.b.c", "text": "é ; \x1b", "n": -(2**53), "l": [True, None]}
    fast = decode_plain_record(encode_dag_cbor(plain))
    assert fast is not None and fast[0] == plain and json.loads(fast[1]) == plain
    for value in (
        {"$type": "a.b.c", "b": b"\x01\x71\x12\x20" + bytes(32)},  # bytes that look like a link
        {"$type": "a.b.c", "c": CID.for_data(b"x")},
        {"$type": "blob", "ref": CID.for_data(b"x"), "mimeType": "a/b", "size": 1},
        {"$type": ""},
    ):
        assert decode_plain_record(encode_dag_cbor(value)) is None
    assert decode_plain_record(bytes.fromhex("a1616118 01")) is None  # not minimal
    assert decode_plain_record(bytes.fromhex("a16161fb3ff0000000000000")) is None  # float
    assert decode_plain_record(bytes.fromhex("a161613bffffffffffffffff")) is None  # < -2**63
    # 19 digits may not fit in 64 bits: left to the strict decoder, which accepts these.
    for edge in (-(2**63), 2**63 - 1):
        data = encode_dag_cbor({"$type": "a.b.c", "n": edge})
        assert decode_plain_record(data) is None and decode_record(data)["n"] == edge
    # Text that merely looks like a float (a date with milliseconds, a version) stays on the
    # fast path: floats are found by their CBOR head, which UTF-8 text never holds.
    for text in ("version 2.0", "2026-11-30T20:00:00.000Z", "1e5 and 3.14"):
        data = encode_dag_cbor({"$type": "a.b.c", "t": text})
        assert decode_plain_record(data) == (decode_record(data), compact_json(decode_record(data)))
    assert decode_plain_record(encode_dag_cbor({"$type": "a.b.c", "n": 251})) is None  # 0x18 0xfb
    assert decode_plain_record(encode_dag_cbor({"$type": "a.b.c", "n": 2**40})) is not None
    assert decode_plain_record(b"\x81" * 200 + b"\x01") is None  # not a map, deep

"""CIDs, strict DAG-CBOR, and the atproto data model (atproto.com/specs/data-model).

Written by hand rather than on ``libipld`` (see docs/dependencies.md): libipld 3.5
decodes links to plain ``bytes`` and encodes any ``bytes`` that happen to parse as a CID as a
link, so a record's bytes field and a link cannot be told apart and a computed CID can differ
from the PDS's. Here a link is always a ``CID`` object and bytes are always ``bytes``.

Errors: bytes that are not canonical DAG-CBOR within the atproto data model raise
``VerificationError`` (they came from somewhere else and do not check out); a Python value that
breaks the data model raises ``RecordError``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from typing import Any

import libipld

from atsync._errors import RecordError, VerificationError
from atsync._json import compact_json

__all__ = [
    "CID",
    "CODEC_DAG_CBOR",
    "CODEC_RAW",
    "check_data_model",
    "cid_for_dag_cbor",
    "cid_for_record",
    "data_from_json",
    "data_to_json",
    "decode_dag_cbor",
    "decode_dag_cbor_prefix",
    "decode_plain_record",
    "decode_record",
    "encode_dag_cbor",
    "plain_record_from_libipld",
]

CODEC_DAG_CBOR = 0x71
CODEC_RAW = 0x55
HASH_SHA256 = 0x12
_DAG_CBOR_SHA256 = bytes((1, CODEC_DAG_CBOR, HASH_SHA256, 32))
_SHA256_PREFIXES = (_DAG_CBOR_SHA256, bytes((1, CODEC_RAW, HASH_SHA256, 32)))

MAX_DEPTH = 128  # nesting beyond this is hostile, not data (and would exhaust the C stack)
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 63) - 1


# --- varints and CIDs --------------------------------------------------------------------------


def read_uvarint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode a minimal unsigned LEB128 varint (at most 9 bytes) at ``pos``: (value, new pos).

    Raises ``ValueError``; callers turn it into their own error kind.
    """
    value = 0
    for i in range(9):
        if pos + i >= len(data):
            raise ValueError("varint runs past the end of the data")
        b = data[pos + i]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if b == 0 and i > 0:
                raise ValueError("varint is not minimally encoded")
            return value, pos + i + 1
    raise ValueError("varint longer than 9 bytes")


def encode_uvarint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class CID:
    """A CIDv1 (atproto never uses v0). Equal CIDs have equal bytes; ``str()`` is base32."""

    __slots__ = ("_raw", "codec", "digest", "hash_code")

    def __init__(self, raw: bytes) -> None:
        try:
            end = _parse_cid(raw, 0)
        except ValueError as e:
            raise VerificationError(f"malformed CID bytes {bytes(raw[:40]).hex()}: {e}") from e
        if end != len(raw):
            raise VerificationError("malformed CID bytes: trailing data after the digest")
        self._raw = bytes(raw)
        _, p = read_uvarint(self._raw, 0)
        self.codec, p = read_uvarint(self._raw, p)
        self.hash_code, p = read_uvarint(self._raw, p)
        size, p = read_uvarint(self._raw, p)
        self.digest = self._raw[p : p + size]

    @classmethod
    def parse(cls, s: str) -> CID:
        """Parse the base32 multibase string form (``b…``); anything else is refused."""
        if not isinstance(s, str) or len(s) < 2 or not s.startswith("b"):
            raise VerificationError(f"CID {s!r:.70} is not a base32 ('b…') CIDv1 string")
        body = s[1:]
        if not body.isascii() or not body.isalnum() or body != body.lower():
            raise VerificationError(f"CID {s!r:.70} has characters outside lowercase base32")
        try:
            raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
        except ValueError as e:
            raise VerificationError(f"CID {s!r:.70} is not valid base32") from e
        cid = cls(raw)
        if str(cid) != s:  # non-zero padding bits would give two spellings of one CID
            raise VerificationError(f"CID {s!r:.70} is not canonically encoded")
        return cid

    @classmethod
    def from_raw(cls, raw: bytes) -> CID:
        """``CID(raw)``, without parsing when ``raw`` is a CIDv1 of dag-cbor or raw data with
        a sha2-256 digest — what every repository block is named by (walks build one per
        record)."""
        if len(raw) == 36 and raw[:4] in _SHA256_PREFIXES:
            cid = cls.__new__(cls)
            cid._raw = bytes(raw)
            cid.codec, cid.hash_code, cid.digest = raw[1], HASH_SHA256, cid._raw[4:]
            return cid
        return cls(raw)

    @classmethod
    def for_data(cls, data: bytes, codec: int = CODEC_DAG_CBOR) -> CID:
        digest = hashlib.sha256(data).digest()
        if codec >= 0x80:  # multi-byte varint: take the general, checked path
            return cls(bytes((1,)) + encode_uvarint(codec) + bytes((HASH_SHA256, 32)) + digest)
        # Built from known parts, so it needs no parsing back (this is on the push path).
        cid = cls.__new__(cls)
        cid._raw = bytes((1, codec, HASH_SHA256, 32)) + digest
        cid.codec, cid.hash_code, cid.digest = codec, HASH_SHA256, digest
        return cid

    @property
    def version(self) -> int:
        return 1

    def __bytes__(self) -> bytes:
        return self._raw

    def __str__(self) -> str:
        # libipld's base32 is ~20x faster than base64.b32encode (pure Python in 3.11), and a
        # CID string is made for every record queued for push.
        return str(libipld.encode_multibase("b", self._raw))

    def __repr__(self) -> str:
        return f"CID({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CID) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __lt__(self, other: CID) -> bool:
        return self._raw < other._raw

    def matches(self, data: bytes) -> bool:
        """True if ``data`` hashes to this CID (sha256 only; other hashes never match)."""
        return (
            self.hash_code == HASH_SHA256
            and len(self.digest) == 32
            and hashlib.sha256(data).digest() == self.digest
        )


def _parse_cid(data: bytes | memoryview, pos: int) -> int:
    """Validate a binary CIDv1 starting at ``pos``; return the position just after it."""
    version, pos = read_uvarint(data, pos)
    if version != 1:
        raise ValueError(f"CID version {version} (only CIDv1 is allowed)")
    _, pos = read_uvarint(data, pos)
    _, pos = read_uvarint(data, pos)
    size, pos = read_uvarint(data, pos)
    if size > 64:
        raise ValueError(f"multihash digest of {size} bytes")
    if pos + size > len(data):
        raise ValueError("multihash digest runs past the end of the data")
    return pos + size


# --- DAG-CBOR encoding -------------------------------------------------------------------------


def _head(out: bytearray, major: int, n: int) -> None:
    m = major << 5
    if n < 24:
        out.append(m | n)
    elif n < 0x100:
        out += bytes((m | 24, n))
    elif n < 0x10000:
        out.append(m | 25)
        out += n.to_bytes(2, "big")
    elif n < 0x100000000:
        out.append(m | 26)
        out += n.to_bytes(4, "big")
    else:
        out.append(m | 27)
        out += n.to_bytes(8, "big")


def _map_key(k: str) -> bytes:
    return k.encode("utf-8")


def _encode(value: Any, out: bytearray, depth: int, path: str) -> None:
    if depth > MAX_DEPTH:
        raise RecordError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if value is None:
        out.append(0xF6)
    elif value is True:
        out.append(0xF5)
    elif value is False:
        out.append(0xF4)
    elif isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise RecordError(f"{path}: integer {value} outside the signed 64-bit range")
        if value >= 0:
            _head(out, 0, value)
        else:
            _head(out, 1, -1 - value)
    elif isinstance(value, str):
        try:
            b = value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RecordError(f"{path}: string is not valid Unicode ({e.reason})") from e
        _head(out, 3, len(b))
        out += b
    elif isinstance(value, bytes | bytearray | memoryview):
        _head(out, 2, len(value))
        out += value
    elif isinstance(value, CID):
        raw = b"\x00" + bytes(value)
        out += b"\xd8\x2a"
        _head(out, 2, len(raw))
        out += raw
    elif isinstance(value, list | tuple):
        _head(out, 4, len(value))
        for i, item in enumerate(value):
            _encode(item, out, depth + 1, f"{path}[{i}]")
    elif isinstance(value, Mapping):
        keys = []
        for k in value:
            if not isinstance(k, str):
                raise RecordError(f"{path}: map key {k!r} is not a string")
            try:
                keys.append((_map_key(k), k))
            except UnicodeEncodeError as e:
                raise RecordError(f"{path}: map key is not valid Unicode ({e.reason})") from e
        # DAG-CBOR canonical order: shorter encoded keys first, then bytewise.
        keys.sort(key=lambda kv: (len(kv[0]), kv[0]))
        _head(out, 5, len(keys))
        for kb, k in keys:
            _head(out, 3, len(kb))
            out += kb
            _encode(value[k], out, depth + 1, f"{path}.{k}")
    elif isinstance(value, float):
        raise RecordError(f"{path}: float {value!r} is not allowed in the atproto data model")
    else:
        raise RecordError(f"{path}: {type(value).__name__} is not an atproto data-model type")


def encode_dag_cbor(value: Any, *, plain: bool = False) -> bytes:
    """Canonical DAG-CBOR of an atproto data-model value (``RecordError`` if it is not one).

    ``plain=True`` promises what ``check_data_model(value)`` returned ``True`` for — a checked
    value free of bytes and CID links — and encodes it much faster (with libipld, exact for
    such values); nothing is checked again then.
    """
    if plain:
        # libipld mistakes bytes that parse as a CID for a link; without bytes it is exact.
        return bytes(libipld.encode_dag_cbor(value))
    out = bytearray()
    _encode(value, out, 0, "$")
    return bytes(out)


# --- DAG-CBOR decoding -------------------------------------------------------------------------


class _Decoder:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, why: str) -> VerificationError:
        return VerificationError(f"malformed DAG-CBOR at byte {self.pos}: {why}")

    def head(self) -> tuple[int, int, int]:
        data, pos = self.data, self.pos
        if pos >= len(data):
            raise self.fail("unexpected end of data")
        ib = data[pos]
        major, info = ib >> 5, ib & 0x1F
        if info < 24:
            self.pos = pos + 1
            return major, info, info
        if info > 27:
            raise self.fail("indefinite length or reserved header")
        size = 1 << (info - 24)
        end = pos + 1 + size
        if end > len(data):
            raise self.fail("unexpected end of data in a header")
        n = int.from_bytes(data[pos + 1 : end], "big")
        if major == 7:
            self.pos = end
            return major, info, n
        # Canonical DAG-CBOR uses the shortest header that fits.
        if n < (24 if size == 1 else 1 << (4 * size)):
            raise self.fail("integer or length is not minimally encoded")
        self.pos = end
        return major, info, n

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise self.fail(f"length {n} runs past the end of the data")
        b = self.data[self.pos : end]
        self.pos = end
        return b

    def item(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH} levels")
        major, info, n = self.head()
        if major == 0:
            if n > _INT_MAX:
                raise self.fail("integer outside the signed 64-bit range")
            return n
        if major == 1:
            if n > _INT_MAX:
                raise self.fail("integer outside the signed 64-bit range")
            return -1 - n
        if major == 2:
            return self.take(n)
        if major == 3:
            return self.text(n)
        if major == 4:
            if n > len(self.data) - self.pos:
                raise self.fail(f"array of {n} items cannot fit in the remaining data")
            return [self.item(depth + 1) for _ in range(n)]
        if major == 5:
            if 2 * n > len(self.data) - self.pos:
                raise self.fail(f"map of {n} entries cannot fit in the remaining data")
            out: dict[str, Any] = {}
            prev: bytes | None = None
            for _ in range(n):
                kmajor, _, klen = self.head()
                if kmajor != 3:
                    raise self.fail("map key is not a string")
                kb = self.take(klen)
                if prev is not None and (len(prev), prev) >= (len(kb), kb):
                    raise self.fail("map keys are not in canonical order or are repeated")
                prev = kb
                key = self.decode_text(kb)
                out[key] = self.item(depth + 1)
            return out
        if major == 6:
            if n != 42:
                raise self.fail(f"tag {n} (only tag 42, a CID link, is allowed)")
            bmajor, _, blen = self.head()
            if bmajor != 2:
                raise self.fail("tag 42 does not wrap a byte string")
            raw = self.take(blen)
            if not raw or raw[0] != 0:
                raise self.fail("CID link lacks the 0x00 multibase prefix")
            try:
                return CID(raw[1:])
            except VerificationError as e:
                raise self.fail(str(e)) from e
        # major 7
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info in (25, 26, 27):
            raise self.fail("floats are not allowed in the atproto data model")
        raise self.fail(f"simple value {n} is not allowed")

    def text(self, n: int) -> str:
        return self.decode_text(self.take(n))

    def decode_text(self, b: bytes) -> str:
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail("string is not valid UTF-8") from e


def decode_dag_cbor(data: bytes) -> Any:
    """Decode exactly one canonical DAG-CBOR value; ``VerificationError`` on anything else."""
    dec = _Decoder(bytes(data))
    value = dec.item(0)
    if dec.pos != len(dec.data):
        raise dec.fail(f"{len(dec.data) - dec.pos} trailing bytes after the value")
    return value


def decode_dag_cbor_prefix(data: bytes, pos: int = 0) -> tuple[Any, int]:
    """Decode one canonical DAG-CBOR value starting at ``pos``; return it and the offset just
    after it. For concatenated values, e.g. a firehose frame (header, then body): decode the
    first, then the next from the returned offset. Same strictness as ``decode_dag_cbor``."""
    dec = _Decoder(bytes(data))
    if not 0 <= pos <= len(dec.data):
        raise VerificationError(f"offset {pos} is outside the data ({len(dec.data)} bytes)")
    dec.pos = pos
    value = dec.item(0)
    return value, dec.pos


def decode_record(data: bytes) -> dict[str, Any]:
    """Decode a record block: a map obeying the data model (``$type`` and blob shapes too)."""
    value = decode_dag_cbor(data)
    if not isinstance(value, dict):
        raise VerificationError("record block is not a map")
    check_data_model(value)
    return value


# What rules out the fast path of decode_plain_record. In the record's bytes: a float, whose
# DAG-CBOR head is 0xfb — a byte UTF-8 text never holds, so strings (dates with fractions of a
# second, version numbers) do not raise false alarms; an integer's or length's argument byte
# may, which only costs the strict decoder. In its JSON text: the map shapes check_data_model
# looks at ($link/$bytes keys, an empty or non-string $type, a blob), and — only when an 8-byte
# argument (head 0x1b or 0x3b) is there at all — an integer that may not fit in 64 bits (19
# digits or more). Substring tests and one literal-prefixed pattern: this runs for every record.
_FLOAT_HEAD = b"\xfb"
_LONG_HEAD, _LONG_NEGATIVE_HEAD = b"\x1b", b"\x3b"
_REFUSED_SHAPE = re.compile(r'"\$link"|"\$bytes"|"\$type":(?:"blob"|(?!"[^"]))')
_LONG_INT = re.compile(r"\d{19}")


def decode_plain_record(data: bytes) -> tuple[dict[str, Any], str] | None:
    """A record block decoded with libipld, with its JSON text, when the fast path can prove
    what ``decode_record`` would: canonical DAG-CBOR within the data model, and *plain* (no
    bytes, no links: libipld cannot tell those apart, so they take the strict decoder).

    Returns None when it cannot — then call ``decode_record``, which either decodes the
    value or says what is wrong with it. libipld itself refuses non-string or unsorted keys,
    invalid UTF-8, other tags, indefinite lengths and trailing data; the re-encoding below
    refuses non-minimal heads; the checks above ``decode_plain_record`` catch floats, integers
    beyond 64 bits and the map shapes ``check_data_model`` refuses.
    """
    try:
        value = libipld.decode_dag_cbor(data)
    except (ValueError, RecursionError):
        return None
    return plain_record_from_libipld(value, data)


def plain_record_from_libipld(value: Any, data: bytes) -> tuple[dict[str, Any], str] | None:
    """``decode_plain_record(data)``, given ``value = libipld.decode_dag_cbor(data)``."""
    if type(value) is not dict or _FLOAT_HEAD in data or libipld.encode_dag_cbor(value) != data:
        return None
    try:
        text = compact_json(value)
    except (TypeError, ValueError, RecursionError):  # bytes or a link
        return None
    if _REFUSED_SHAPE.search(text) is not None:
        return None
    if (_LONG_HEAD in data or _LONG_NEGATIVE_HEAD in data) and _LONG_INT.search(text):
        return None
    # Nesting is at most the number of opening brackets; beyond MAX_DEPTH, ask the strict one.
    if len(text) > MAX_DEPTH and text.count("[") + text.count("{") > MAX_DEPTH:
        return None
    return value, text


# --- data model --------------------------------------------------------------------------------


def check_data_model(value: Any) -> bool:
    """Raise ``RecordError`` (naming the path) unless ``value`` is an atproto data-model object.

    The top level must be a map. Rejected anywhere: floats, non-string map keys, integers
    outside 64 bits, invalid Unicode, unknown types, ``$link``/``$bytes`` keys (they cannot
    survive a JSON round trip), an empty or non-string ``$type``, malformed blobs.

    Returns whether the value is *plain*: free of bytes and CID links. Plain values encode the
    same with libipld (much faster) as with ``encode_dag_cbor``, and their JSON form is
    themselves.
    """
    if not isinstance(value, Mapping):
        raise RecordError(f"$: top level must be an object, got {type(value).__name__}")
    return not _check(value, 0, "$")


def _check(value: Any, depth: int, path: str) -> bool:
    """Check ``value``; return whether it holds bytes or CID links anywhere."""
    if depth > MAX_DEPTH:
        raise RecordError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, bytes | bytearray | memoryview | CID):
        return True
    binary = False
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise RecordError(f"{path}: integer {value} outside the signed 64-bit range")
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RecordError(f"{path}: string is not valid Unicode ({e.reason})") from e
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            binary = _check(item, depth + 1, f"{path}[{i}]") or binary
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RecordError(f"{path}: map key {k!r} is not a string")
            if k in ("$link", "$bytes"):
                raise RecordError(f"{path}: key {k!r} is reserved for the JSON encoding")
            _check(k, depth + 1, f"{path}.<key>")
            binary = _check(v, depth + 1, f"{path}.{k}") or binary
        if "$type" in value:
            t = value["$type"]
            if not isinstance(t, str) or not t:
                raise RecordError(f"{path}.$type: must be a non-empty string, got {t!r}")
            if t == "blob":
                _check_blob(value, path)
    elif isinstance(value, float):
        raise RecordError(f"{path}: float {value!r} is not allowed in the atproto data model")
    else:
        raise RecordError(f"{path}: {type(value).__name__} is not an atproto data-model type")
    return binary


def _check_blob(value: Mapping[str, Any], path: str) -> None:
    if not isinstance(value.get("ref"), CID):
        raise RecordError(f"{path}: blob needs 'ref' as a CID link")
    mime = value.get("mimeType")
    if not isinstance(mime, str) or not mime:
        raise RecordError(f"{path}: blob needs a non-empty string 'mimeType'")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RecordError(f"{path}: blob needs a non-negative integer 'size', got {size!r}")


def cid_for_record(record: Mapping[str, Any]) -> str:
    """The CID string a PDS computes for ``record`` (CIDv1, dag-cbor, sha256, base32)."""
    check_data_model(record)
    return str(CID.for_data(encode_dag_cbor(record)))


def cid_for_dag_cbor(data: bytes) -> str:
    """The CID string of an encoded DAG-CBOR block: ``str(CID.for_data(data))``, faster.

    For the push path, which names every queued record by its CID: no ``CID`` object is built.
    """
    return str(libipld.encode_multibase("b", _DAG_CBOR_SHA256 + hashlib.sha256(data).digest()))


# --- JSON representation -----------------------------------------------------------------------


def data_from_json(value: Any, _path: str = "$", _depth: int = 0) -> Any:
    """Map the JSON form (``{"$link": …}``, ``{"$bytes": …}``) to data-model values.

    JSON has one number type, so an integral float (``123.0``) becomes an int; any other
    float is refused.
    """
    if _depth > MAX_DEPTH:
        raise RecordError(f"{_path}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        if "$link" in value:
            link = value["$link"]
            if len(value) != 1 or not isinstance(link, str):
                raise RecordError(f"{_path}: a $link object must be exactly {{'$link': str}}")
            try:
                return CID.parse(link)
            except VerificationError as e:
                raise RecordError(f"{_path}: {e}") from e
        if "$bytes" in value:
            b64 = value["$bytes"]
            if len(value) != 1 or not isinstance(b64, str):
                raise RecordError(f"{_path}: a $bytes object must be exactly {{'$bytes': str}}")
            try:
                return base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
            except ValueError as e:
                raise RecordError(f"{_path}: $bytes is not valid base64") from e
        return {k: data_from_json(v, f"{_path}.{k}", _depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [data_from_json(v, f"{_path}[{i}]", _depth + 1) for i, v in enumerate(value)]
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise RecordError(f"{_path}: float {value!r} is not allowed in the atproto data model")
    return value


def data_to_json(value: Any) -> Any:
    """Inverse of ``data_from_json``: JSON-serializable form of a data-model value."""
    if isinstance(value, CID):
        return {"$link": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode().rstrip("=")}
    if isinstance(value, Mapping):
        if "$link" in value or "$bytes" in value:
            # The JSON form would read back as a link or bytes: refuse rather than corrupt.
            raise RecordError("a map with a '$link' or '$bytes' key has no JSON form")
        return {k: data_to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [data_to_json(v) for v in value]
    return value

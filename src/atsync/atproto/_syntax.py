"""Syntax of atproto identifiers and string formats, and TID generation.

Each kind has ``validate_<kind>(s) -> str`` (the normalized value, or ``InvalidSyntaxError``
naming the kind and the reason) and ``is_valid_<kind>(s) -> bool``. The rules follow the atproto
specs (atproto.com/specs: handle, did, nsid, at-uri-scheme, record-key, tid, lexicon string
formats) and are checked against the official interop vectors in ``tests/interop/syntax``.

Validators never strip whitespace: a value with a stray space is malformed, not "fixable".
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from atsync._errors import InvalidSyntaxError

__all__ = [
    "AtUri",
    "Tid",
    "TidClock",
    "is_valid_at_identifier",
    "is_valid_at_uri",
    "is_valid_cid",
    "is_valid_datetime",
    "is_valid_did",
    "is_valid_handle",
    "is_valid_language",
    "is_valid_nsid",
    "is_valid_record_key",
    "is_valid_tid",
    "is_valid_uri",
    "parse_at_uri",
    "validate_at_identifier",
    "validate_at_uri",
    "validate_cid",
    "validate_datetime",
    "validate_did",
    "validate_handle",
    "validate_language",
    "validate_nsid",
    "validate_record_key",
    "validate_tid",
    "validate_uri",
]


def _fail(kind: str, value: str, why: str) -> InvalidSyntaxError:
    shown = value if len(value) <= 80 else value[:77] + "..."
    return InvalidSyntaxError(f"invalid {kind} {shown!r}: {why}")


def _ascii_only(kind: str, s: str) -> None:
    if not s.isascii():
        raise _fail(kind, s, "only ASCII characters are allowed")


# --- handle ----------------------------------------------------------------------------

_HANDLE_LABEL = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
_HANDLE_TLD = re.compile(r"[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")


def validate_handle(s: str) -> str:
    """Return the handle lowercased (case-insensitive), or raise ``InvalidSyntaxError``."""
    kind = "handle"
    if not isinstance(s, str):
        raise InvalidSyntaxError(f"invalid {kind}: expected a string, got {type(s).__name__}")
    _ascii_only(kind, s)
    if len(s) > 253:
        raise _fail(kind, s, f"{len(s)} characters, at most 253 allowed")
    labels = s.split(".")
    if len(labels) < 2:
        raise _fail(kind, s, "needs at least two dot-separated segments")
    for label in labels[:-1]:
        if not _HANDLE_LABEL.fullmatch(label):
            raise _fail(
                kind,
                s,
                f"segment {label!r} must be 1-63 of a-z 0-9 -, not starting or ending with '-'",
            )
    # A TLD starting with a digit would make IPv4 addresses look like handles.
    if not _HANDLE_TLD.fullmatch(labels[-1]):
        raise _fail(
            kind,
            s,
            f"last segment {labels[-1]!r} must start with a letter and be 1-63 of a-z 0-9 -",
        )
    return s.lower()


def is_valid_handle(s: str) -> bool:
    return _is_valid(validate_handle, s)


# --- DID -------------------------------------------------------------------------------

_DID = re.compile(r"did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]")


def validate_did(s: str) -> str:
    """Return the DID unchanged (DIDs are case-sensitive), or raise ``InvalidSyntaxError``."""
    kind = "DID"
    if not isinstance(s, str):
        raise InvalidSyntaxError(f"invalid {kind}: expected a string, got {type(s).__name__}")
    _ascii_only(kind, s)
    if len(s) > 2048:
        raise _fail(kind, s, f"{len(s)} characters, at most 2048 allowed")
    if not s.startswith("did:"):
        raise _fail(kind, s, "must start with 'did:'")
    if not _DID.fullmatch(s):
        raise _fail(
            kind,
            s,
            "must be did:<lowercase method>:<identifier of A-Za-z0-9._:%->, "
            "not ending with ':' or '%'",
        )
    return s


def is_valid_did(s: str) -> bool:
    return _is_valid(validate_did, s)


# --- NSID ------------------------------------------------------------------------------

_NSID_DOMAIN_FIRST = re.compile(r"[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
_NSID_DOMAIN_LABEL = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
_NSID_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9]{0,62}")


def validate_nsid(s: str) -> str:
    """Return the NSID with its domain authority lowercased (the name keeps its case)."""
    kind = "NSID"
    if not isinstance(s, str):
        raise InvalidSyntaxError(f"invalid {kind}: expected a string, got {type(s).__name__}")
    _ascii_only(kind, s)
    if len(s) > 317:
        raise _fail(kind, s, f"{len(s)} characters, at most 317 allowed")
    segments = s.split(".")
    if len(segments) < 3:
        raise _fail(kind, s, "needs at least three dot-separated segments")
    *authority, name = segments
    if not _NSID_DOMAIN_FIRST.fullmatch(authority[0]):
        raise _fail(
            kind,
            s,
            f"first segment {authority[0]!r} must start with a letter and be 1-63 of a-z 0-9 -",
        )
    for label in authority[1:]:
        if not _NSID_DOMAIN_LABEL.fullmatch(label):
            raise _fail(
                kind,
                s,
                f"segment {label!r} must be 1-63 of a-z 0-9 -, not starting or ending with '-'",
            )
    if not _NSID_NAME.fullmatch(name):
        raise _fail(
            kind, s, f"name {name!r} must be 1-63 letters and digits, starting with a letter"
        )
    return ".".join(authority).lower() + "." + name


def is_valid_nsid(s: str) -> bool:
    return _is_valid(validate_nsid, s)


# --- record key, TID ---------------------------------------------------------------------

_RKEY = re.compile(r"[a-zA-Z0-9_~.:-]{1,512}")


def validate_record_key(s: str) -> str:
    kind = "record key"
    if not isinstance(s, str):
        raise InvalidSyntaxError(f"invalid {kind}: expected a string, got {type(s).__name__}")
    if s in (".", ".."):
        raise _fail(kind, s, "'.' and '..' are not allowed")
    if not _RKEY.fullmatch(s):
        raise _fail(kind, s, "must be 1-512 of A-Z a-z 0-9 . - _ : ~")
    return s


def is_valid_record_key(s: str) -> bool:
    return _is_valid(validate_record_key, s)


_B32 = "234567abcdefghijklmnopqrstuvwxyz"
_B32_INDEX = {c: i for i, c in enumerate(_B32)}
# Two base32 digits per lookup: TIDs are minted on every action, so encoding is hot.
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)
# The first character carries the top 5 bits of a 65-bit field whose top bit is always 0.
_TID = re.compile(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}")


def validate_tid(s: str) -> str:
    kind = "TID"
    if not isinstance(s, str):
        raise InvalidSyntaxError(f"invalid {kind}: expected a string, got {type(s).__name__}")
    if len(s) != 13:
        raise _fail(kind, s, f"{len(s)} characters, exactly 13 required")
    if not _TID.fullmatch(s):
        raise _fail(kind, s, "must be base32-sortable (2-7 a-z) with the high bit clear")
    return s


def is_valid_tid(s: str) -> bool:
    return _is_valid(validate_tid, s)


# The spec's syntax lets the first character carry 4 bits, so a parsed TID can hold 54.
_MAX_TIMESTAMP_US = (1 << 54) - 1
_MAX_CLOCK_ID = (1 << 10) - 1


@dataclass(frozen=True, order=True)
class Tid:
    """A timestamp identifier: 53 bits of microseconds since the epoch, 10 bits of clock id."""

    timestamp_us: int
    clock_id: int

    def __post_init__(self) -> None:
        if not 0 <= self.timestamp_us <= _MAX_TIMESTAMP_US:
            raise InvalidSyntaxError(f"invalid TID: timestamp {self.timestamp_us} out of range")
        if not 0 <= self.clock_id <= _MAX_CLOCK_ID:
            raise InvalidSyntaxError(f"invalid TID: clock id {self.clock_id} out of 0..1023")

    def __str__(self) -> str:
        return format_tid(self.timestamp_us, self.clock_id)

    @classmethod
    def parse(cls, s: str) -> Tid:
        validate_tid(s)
        n = 0
        for c in s:
            n = (n << 5) | _B32_INDEX[c]
        return cls(n >> 10, n & _MAX_CLOCK_ID)


def format_tid(timestamp_us: int, clock_id: int) -> str:
    """The 13-character TID for a timestamp and clock id (both assumed in range)."""
    n = (timestamp_us << 10) | clock_id
    pairs = _B32_PAIRS
    return (
        _B32[n >> 60]
        + pairs[(n >> 50) & 1023]
        + pairs[(n >> 40) & 1023]
        + pairs[(n >> 30) & 1023]
        + pairs[(n >> 20) & 1023]
        + pairs[(n >> 10) & 1023]
        + pairs[n & 1023]
    )


class TidClock:
    """Hands out strictly increasing TIDs, even if the wall clock steps backwards.

    ``now_us`` supplies the wall clock in microseconds (``time.time_ns() // 1000`` by default).
    ``observe()`` lets the clock jump past TIDs seen elsewhere (another device, the PDS) so
    that locally minted keys keep sorting after them.
    """

    def __init__(
        self,
        clock_id: int | None = None,
        now_us: Callable[[], int] | None = None,
    ) -> None:
        self.clock_id = secrets.randbelow(_MAX_CLOCK_ID + 1) if clock_id is None else clock_id
        if not 0 <= self.clock_id <= _MAX_CLOCK_ID:
            raise InvalidSyntaxError(f"invalid TID clock id {self.clock_id}: must be in 0..1023")
        self._now_us = now_us
        self._last = -1
        self._lock = threading.Lock()

    def next_timestamp(self) -> int:
        """The next timestamp in microseconds: now, or just after the last one if later."""
        # Called for every action: the default clock is read inline rather than through a
        # lambda (time.time_ns is looked up each call, so tests can still patch it).
        with self._lock:
            ts = time.time_ns() // 1000 if self._now_us is None else self._now_us()
            if ts <= self._last:
                ts = self._last + 1
            self._last = ts
        return ts

    def next_tid(self) -> Tid:
        return Tid(self.next_timestamp(), self.clock_id)

    def next(self) -> str:
        return str(self.next_tid())

    def observe(self, tid: str | Tid) -> None:
        """Make every later TID from this clock sort after ``tid``."""
        t = Tid.parse(tid) if isinstance(tid, str) else tid
        with self._lock:
            self._last = max(self._last, t.timestamp_us)


# --- AT URI, AT identifier ---------------------------------------------------------------


def validate_at_identifier(s: str) -> str:
    """A DID (unchanged) or a handle (lowercased)."""
    if isinstance(s, str) and s.startswith("did:"):
        try:
            return validate_did(s)
        except InvalidSyntaxError as e:
            raise InvalidSyntaxError(f"invalid AT identifier: {e}") from None
    try:
        return validate_handle(s)
    except InvalidSyntaxError as e:
        raise InvalidSyntaxError(f"invalid AT identifier (neither DID nor handle): {e}") from None


def is_valid_at_identifier(s: str) -> bool:
    return _is_valid(validate_at_identifier, s)


@dataclass(frozen=True)
class AtUri:
    """``at://authority[/collection[/rkey]]`` split into parts (normalized)."""

    authority: str
    collection: str | None = None
    rkey: str | None = None

    def __str__(self) -> str:
        parts = [f"at://{self.authority}"]
        if self.collection is not None:
            parts.append(self.collection)
            if self.rkey is not None:
                parts.append(self.rkey)
        return "/".join(parts)


def parse_at_uri(s: str) -> AtUri:
    """Parse the restricted AT URI form used by Lexicon ``at-uri`` fields (no query/fragment)."""
    kind = "AT URI"
    if not isinstance(s, str):
        raise InvalidSyntaxError(f"invalid {kind}: expected a string, got {type(s).__name__}")
    _ascii_only(kind, s)
    if len(s) > 8192:
        raise _fail(kind, s, f"{len(s)} characters, at most 8192 allowed")
    if not s.startswith("at://"):
        raise _fail(kind, s, "must start with 'at://'")
    if "#" in s or "?" in s:
        raise _fail(kind, s, "query and fragment parts are not allowed")
    parts = s[5:].split("/")
    if len(parts) > 3:
        raise _fail(kind, s, "path has more than collection and record key")
    try:
        authority = validate_at_identifier(parts[0])
        collection = validate_nsid(parts[1]) if len(parts) > 1 else None
        rkey = validate_record_key(parts[2]) if len(parts) > 2 else None
    except InvalidSyntaxError as e:
        raise _fail(kind, s, str(e)) from None
    return AtUri(authority, collection, rkey)


def validate_at_uri(s: str) -> str:
    return str(parse_at_uri(s))


def is_valid_at_uri(s: str) -> bool:
    return _is_valid(validate_at_uri, s)


# --- CID (string syntax only), URI ----------------------------------------------------------

_CID_STRING = re.compile(r"[a-zA-Z0-9+=]{8,256}")


def validate_cid(s: str) -> str:
    """Check the loose Lexicon ``cid`` string syntax; ``_cbor.CID.parse`` decodes strictly."""
    kind = "CID"
    if not isinstance(s, str):
        raise InvalidSyntaxError(f"invalid {kind}: expected a string, got {type(s).__name__}")
    if not _CID_STRING.fullmatch(s):
        raise _fail(kind, s, "must be 8-256 of A-Z a-z 0-9 + =")
    # A base58 sha256 CIDv0 is exactly 46 characters starting "Qm"; atproto does not allow it.
    if len(s) == 46 and s.startswith("Qm"):
        raise _fail(kind, s, "CIDv0 is not allowed")
    return s


def is_valid_cid(s: str) -> bool:
    return _is_valid(validate_cid, s)


_URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:(?://)?[^\s/][^\s]*")


def validate_uri(s: str) -> str:
    kind = "URI"
    if not isinstance(s, str):
        raise InvalidSyntaxError(f"invalid {kind}: expected a string, got {type(s).__name__}")
    if len(s) > 8192:
        raise _fail(kind, s, f"{len(s)} characters, at most 8192 allowed")
    if not _URI.fullmatch(s):
        raise _fail(kind, s, "must be scheme:rest with no whitespace")
    return s


def is_valid_uri(s: str) -> bool:
    return _is_valid(validate_uri, s)


# --- datetime --------------------------------------------------------------------------------

_DATETIME = re.compile(
    r"(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})"
    r"T(?P<h>[0-9]{2}):(?P<mi>[0-9]{2}):(?P<s>[0-9]{2})(?:\.[0-9]+)?"
    r"(?:Z|(?P<sign>[+-])(?P<oh>[0-9]{2}):(?P<om>[0-9]{2}))"
)
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def validate_datetime(s: str) -> str:
    """RFC 3339 and ISO 8601 at once: uppercase T and Z, a timezone, no ``-00:00``.

    Year 0000 is allowed (Python's ``datetime`` cannot hold it, hence the hand check), but
    not a time that normalizes to before 0000-01-01T00:00:00Z.
    """
    kind = "datetime"
    if not isinstance(s, str):
        raise InvalidSyntaxError(f"invalid {kind}: expected a string, got {type(s).__name__}")
    if len(s) > 64:
        raise _fail(kind, s, f"{len(s)} characters, at most 64 allowed")
    m = _DATETIME.fullmatch(s)
    if not m or not s.isascii():
        raise _fail(kind, s, "must look like 1985-04-12T23:20:50.123Z (timezone required)")
    year, month, day = int(m["y"]), int(m["mo"]), int(m["d"])
    hour, minute, second = int(m["h"]), int(m["mi"]), int(m["s"])
    if not 1 <= month <= 12:
        raise _fail(kind, s, "month out of range")
    dim = 29 if month == 2 and _is_leap(year) else _DAYS_IN_MONTH[month - 1]
    if not 1 <= day <= dim:
        raise _fail(kind, s, "day out of range for the month")
    if hour > 23 or minute > 59 or second > 59:
        raise _fail(kind, s, "time of day out of range")
    if m["sign"]:
        off_h, off_m = int(m["oh"]), int(m["om"])
        if off_h > 23 or off_m > 59:
            raise _fail(kind, s, "timezone offset out of range")
        offset = (off_h * 60 + off_m) * (1 if m["sign"] == "+" else -1)
        if m["sign"] == "-" and offset == 0:
            raise _fail(kind, s, "'-00:00' (unknown local offset) is not allowed")
        # Only the first day of year 0 can underflow when shifted to UTC.
        if year == 0 and month == 1 and day == 1 and hour * 60 + minute - offset < 0:
            raise _fail(kind, s, "normalizes to a time before year 0")
    return s


def is_valid_datetime(s: str) -> bool:
    return _is_valid(validate_datetime, s)


# --- language (BCP 47) -------------------------------------------------------------------------

_GRANDFATHERED = frozenset(
    t.lower()
    for t in (
        *("en-GB-oed", "i-ami", "i-bnn", "i-default", "i-enochian", "i-hak", "i-klingon"),
        *("i-lux", "i-mingo", "i-navajo", "i-pwn", "i-tao", "i-tay", "i-tsu", "sgn-BE-FR"),
        *("sgn-BE-NL", "sgn-CH-DE", "art-lojban", "cel-gaulish", "no-bok", "no-nyn"),
        *("zh-guoyu", "zh-hakka", "zh-min", "zh-min-nan", "zh-xiang"),
    )
)
_LANGTAG = re.compile(
    r"(?P<language>[a-z]{2,3}(?:-[a-zA-Z]{3}){0,3})"
    r"(?:-(?P<script>[a-zA-Z]{4}))?"
    r"(?:-(?P<region>[a-zA-Z]{2}|[0-9]{3}))?"
    r"(?P<variants>(?:-(?:[a-zA-Z0-9]{5,8}|[0-9][a-zA-Z0-9]{3}))*)"
    r"(?P<extensions>(?:-[0-9a-wyzA-WYZ](?:-[a-zA-Z0-9]{2,8})+)*)"
    r"(?:-[xX](?:-[a-zA-Z0-9]{1,8})+)?"
)
_PRIVATE_USE = re.compile(r"[xX](?:-[a-zA-Z0-9]{1,8})+")


def validate_language(s: str) -> str:
    """A well-formed and valid BCP 47 tag (RFC 5646): no repeated variants or singletons."""
    kind = "language"
    if not isinstance(s, str):
        raise InvalidSyntaxError(f"invalid {kind}: expected a string, got {type(s).__name__}")
    if len(s) > 128 or not s.isascii():
        raise _fail(kind, s, "must be a short ASCII BCP 47 tag")
    if s.lower() in _GRANDFATHERED or _PRIVATE_USE.fullmatch(s):
        return s
    m = _LANGTAG.fullmatch(s)
    if not m:
        raise _fail(kind, s, "not a BCP 47 tag like 'en', 'pt-BR' or 'zh-Hant'")
    variants = [v.lower() for v in m["variants"].split("-") if v]
    if len(set(variants)) != len(variants):
        raise _fail(kind, s, "a variant subtag is repeated")
    singletons = [p.lower() for p in m["extensions"].split("-") if len(p) == 1]
    if len(set(singletons)) != len(singletons):
        raise _fail(kind, s, "an extension singleton is repeated")
    return s


def is_valid_language(s: str) -> bool:
    return _is_valid(validate_language, s)


def _is_valid(validator: Callable[[str], str], s: str) -> bool:
    try:
        validator(s)
    except InvalidSyntaxError:
        return False
    return True

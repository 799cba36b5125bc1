"""Value checks for the Lexicon field types that need no other definition.

Each ``*_check(schema)`` turns a (checked) schema into a function that raises ``Invalid`` for
a value that breaks it. Validation runs for every record pushed or pulled, so the constraints
are read once here and not per value, and a passing value builds no strings: the JSON path of
a failure is collected while ``Invalid`` unwinds through the containers (``_validate``).

Values are in the atproto data model form that ``_cbor`` decodes to: ``CID`` for links,
``bytes`` for bytes, ``int`` (never ``bool``) for integers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from atsync._errors import InvalidSyntaxError
from atsync.atproto import CID, is_valid_cid
from atsync.lexicon._formats import FORMATS
from atsync.lexicon._graphemes import count_graphemes

__all__ = [
    "Check",
    "Invalid",
    "blob_check",
    "boolean_check",
    "bytes_check",
    "cid_link_check",
    "integer_check",
    "kind",
    "mime_accepted",
    "primitive_check",
    "string_check",
    "unknown_check",
]

Check = Callable[[Any], None]
_MISSING: Any = object()


class Invalid(Exception):
    """A value breaks its schema (turned into ``RecordError`` by ``_validate``).

    ``path`` holds the keys and indexes leading to the value, innermost first.
    """

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why
        self.path: list[str | int] = []


def kind(v: Any) -> str:
    """The data-model name of a value's type, for messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, str):
        return "string"
    if isinstance(v, bytes | bytearray | memoryview):
        return "bytes"
    if isinstance(v, CID):
        return "CID link"
    if isinstance(v, Mapping):
        return "blob" if v.get("$type") == "blob" else "object"
    if isinstance(v, list | tuple):
        return "array"
    return type(v).__name__


def _shown(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def boolean_check(d: Mapping[str, Any]) -> Check:
    const = d.get("const", _MISSING)

    def check(v: Any) -> None:
        if not isinstance(v, bool):
            raise Invalid(f"expected a boolean, got {kind(v)}")
        if const is not _MISSING and v is not const:
            raise Invalid(f"must be {str(const).lower()} (const)")

    return check


def integer_check(d: Mapping[str, Any]) -> Check:
    const = d.get("const", _MISSING)
    enum: Sequence[int] | None = d.get("enum")
    allowed = frozenset(enum) if enum is not None else None
    lo: int | None = d.get("minimum")
    hi: int | None = d.get("maximum")

    def check(v: Any) -> None:
        if not isinstance(v, int) or isinstance(v, bool):
            raise Invalid(f"expected an integer, got {kind(v)}")
        if const is not _MISSING and v != const:
            raise Invalid(f"must be {const} (const), got {v}")
        if allowed is not None and v not in allowed:
            raise Invalid(f"integer {v} not in enum {list(enum or ())}")
        if lo is not None and v < lo:
            raise Invalid(f"integer {v} below minimum {lo}")
        if hi is not None and v > hi:
            raise Invalid(f"integer {v} above maximum {hi}")

    return check


def string_check(d: Mapping[str, Any]) -> Check:
    const = d.get("const", _MISSING)
    enum: Sequence[str] | None = d.get("enum")
    allowed = frozenset(enum) if enum is not None else None
    min_len: int | None = d.get("minLength")
    max_len: int | None = d.get("maxLength")
    min_g: int | None = d.get("minGraphemes")
    max_g: int | None = d.get("maxGraphemes")
    # An unknown format only gets past a non-strict document load; it is not checked.
    fmt = FORMATS.get(d.get("format") or "")

    def check(v: Any) -> None:
        if not isinstance(v, str):
            raise Invalid(f"expected a string, got {kind(v)}")
        if const is not _MISSING and v != const:
            raise Invalid(f"must be {const!r} (const), got {_shown(v)}")
        if allowed is not None and v not in allowed:
            raise Invalid(f"string {_shown(v)} not in enum {list(enum or ())}")
        n = len(v)
        # UTF-8 takes 1-4 bytes per code point, so most lengths are decided without encoding.
        if (max_len is not None and n * 4 > max_len) or (min_len is not None and n < min_len):
            size = _utf8_len(v)
            if max_len is not None and size > max_len:
                raise Invalid(f"string longer than maxLength {max_len} ({size} UTF-8 bytes)")
            if min_len is not None and size < min_len:
                raise Invalid(f"string shorter than minLength {min_len} ({size} UTF-8 bytes)")
        # A cluster has at least one code point, so n bounds the grapheme count from above.
        if max_g is not None and n > max_g:
            g = count_graphemes(v)
            if g > max_g:
                raise Invalid(f"string longer than maxGraphemes {max_g} ({g} graphemes)")
        if min_g is not None:
            g = n if n < min_g else count_graphemes(v)
            if g < min_g:
                raise Invalid(f"string shorter than minGraphemes {min_g} ({g} graphemes)")
        if fmt is not None:
            try:
                fmt(v)
            except InvalidSyntaxError as e:
                raise Invalid(str(e)) from None

    return check


def _utf8_len(v: str) -> int:
    if v.isascii():
        return len(v)
    try:
        return len(v.encode("utf-8"))
    except UnicodeEncodeError:
        raise Invalid("string is not valid Unicode (lone surrogate)") from None


def bytes_check(d: Mapping[str, Any]) -> Check:
    min_len: int | None = d.get("minLength")
    max_len: int | None = d.get("maxLength")

    def check(v: Any) -> None:
        if not isinstance(v, bytes | bytearray | memoryview):
            raise Invalid(f"expected bytes, got {kind(v)}")
        n = len(v)
        if max_len is not None and n > max_len:
            raise Invalid(f"bytes longer than maxLength {max_len} ({n} bytes)")
        if min_len is not None and n < min_len:
            raise Invalid(f"bytes shorter than minLength {min_len} ({n} bytes)")

    return check


def cid_link_check(d: Mapping[str, Any]) -> Check:
    def check(v: Any) -> None:
        if not isinstance(v, CID):
            raise Invalid(f"expected a CID link, got {kind(v)}")

    return check


def mime_accepted(mime: str, accept: Sequence[str]) -> bool:
    """Whether a blob's MIME type matches one of ``accept`` (``type/sub``, ``type/*``, ``*/*``).

    MIME types are case-insensitive and parameters (``; charset=...``) do not take part.
    """
    essence = mime.split(";", 1)[0].strip().lower()
    for pattern in accept:
        p = pattern.lower()
        if p == "*/*" or essence == p or (p.endswith("/*") and essence.startswith(p[:-1])):
            return True
    return False


def blob_check(d: Mapping[str, Any], *, legacy: bool) -> Check:
    """A blob reference. With ``legacy``, the old ``{cid, mimeType}`` form passes too (it has
    no size, so ``maxSize`` cannot be checked on it); atsync never writes that form."""
    accept: Sequence[str] | None = d.get("accept")
    max_size: int | None = d.get("maxSize")

    def check(v: Any) -> None:
        if not isinstance(v, Mapping):
            raise Invalid(f"expected a blob, got {kind(v)}")
        if v.get("$type") == "blob":
            if not isinstance(v.get("ref"), CID):
                raise Invalid("blob 'ref' must be a CID link")
            size = v.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise Invalid(f"blob 'size' must be an integer >= 0, got {_shown(size)}")
            if max_size is not None and size > max_size:
                raise Invalid(f"blob larger than maxSize {max_size} ({size} bytes)")
        elif "$type" not in v and "cid" in v and "mimeType" in v:
            if not legacy:
                raise Invalid(
                    "legacy blob {cid, mimeType} is not allowed here: "
                    "use {$type: 'blob', ref, mimeType, size}"
                )
            cid = v["cid"]
            if not isinstance(cid, str) or not is_valid_cid(cid):
                raise Invalid(f"legacy blob 'cid' must be a CID string, got {_shown(cid)}")
        else:
            raise Invalid("expected a blob {$type: 'blob', ref, mimeType, size}")
        mime = v.get("mimeType")
        if not isinstance(mime, str) or not mime:
            raise Invalid(f"blob 'mimeType' must be a non-empty string, got {_shown(mime)}")
        if accept is not None and not mime_accepted(mime, accept):
            raise Invalid(f"blob mimeType {mime!r} not accepted (accept: {list(accept)})")

    return check


def unknown_check(d: Mapping[str, Any]) -> Check:
    def check(v: Any) -> None:
        # In the data-model form links are CID objects and bytes are bytes, so "an object"
        # already excludes them; a blob is a map and needs its own exclusion.
        if not isinstance(v, Mapping):
            raise Invalid(f"expected an object (type unknown), got {kind(v)}")
        if v.get("$type") == "blob":
            raise Invalid("expected an object (type unknown), got a blob")

    return check


def primitive_check(d: Mapping[str, Any], *, legacy_blobs: bool = False) -> Check | None:
    """The check for a field type that references nothing, or ``None`` for the others."""
    t = d.get("type")
    if t == "boolean":
        return boolean_check(d)
    if t == "integer":
        return integer_check(d)
    if t == "string":
        return string_check(d)
    if t == "bytes":
        return bytes_check(d)
    if t == "cid-link":
        return cid_link_check(d)
    if t == "blob":
        return blob_check(d, legacy=legacy_blobs)
    if t == "unknown":
        return unknown_check(d)
    return None

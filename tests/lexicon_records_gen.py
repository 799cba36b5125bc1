"""Hypothesis strategies for records that satisfy a Lexicon, derived from the schema itself.

Built independently of the validator: string lengths are met by construction from characters
that are one grapheme each and never join their neighbours (so the byte and grapheme counts
are known without the segmenter under test), and format values come from the interop syntax
vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from atsync.atproto._cbor import CID, CODEC_RAW
from atsync.lexicon._doc import split_ref
from atsync.lexicon._set import LexiconSet

SYNTAX = Path(__file__).parent / "interop" / "syntax"
_SYNTAX_FILES = {
    "at-identifier": "atidentifier",
    "at-uri": "aturi",
    "cid": "cid",
    "datetime": "datetime",
    "did": "did",
    "handle": "handle",
    "language": "language",
    "nsid": "nsid",
    "record-key": "recordkey",
    "tid": "tid",
    "uri": "uri",
}
# One grapheme each, 1 to 4 UTF-8 bytes, none joins what comes before or after it.
_CHARS = "aZ09 -.é漢字🙂ßΩ"
_MAX_DEPTH = 3


@cache
def valid_values(fmt: str) -> list[str]:
    """The interop vectors' valid values for a string format."""
    text = (SYNTAX / f"{_SYNTAX_FILES[fmt]}_syntax_valid.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def records(lexicons: LexiconSet, nsid: str) -> st.SearchStrategy[dict[str, Any]]:
    """Records of collection ``nsid`` (data-model form) that its Lexicon accepts."""
    main = lexicons.record_def(nsid)
    return _object(lexicons, main["record"], nsid, 0).map(lambda r: {"$type": nsid, **r})


def _field(lexicons: LexiconSet, d: Mapping[str, Any], base: str, depth: int) -> Any:
    t = d["type"]
    if "const" in d:
        return st.just(d["const"])
    if "enum" in d:
        return st.sampled_from(d["enum"])
    if t == "boolean":
        return st.booleans()
    if t == "integer":
        return st.integers(d.get("minimum", -(2**53)), d.get("maximum", 2**53))
    if t == "string":
        return _string(d)
    if t == "bytes":
        lo = d.get("minLength", 0)
        return st.binary(min_size=lo, max_size=d.get("maxLength", lo + 16))
    if t == "cid-link":
        return st.binary(max_size=8).map(CID.for_data)
    if t == "blob":
        return _blob(d)
    if t == "array":
        lo = d.get("minLength", 0)
        hi = max(lo, min(d.get("maxLength", 4), 4)) if depth < _MAX_DEPTH else lo
        return st.lists(_field(lexicons, d["items"], base, depth + 1), min_size=lo, max_size=hi)
    if t == "object":
        return _object(lexicons, d, base, depth)
    if t == "ref":
        nsid, name = split_ref(d["ref"], base)
        target = lexicons.get_def(f"{nsid}#{name}")
        if target["type"] == "record":
            return records(lexicons, nsid)
        return st.deferred(lambda: _field(lexicons, target, nsid, depth + 1))
    if t == "union":
        variants = []
        for ref in d["refs"]:
            nsid, name = split_ref(ref, base)
            type_name = nsid if name == "main" else f"{nsid}#{name}"
            target = lexicons.get_def(f"{nsid}#{name}")
            inner = target["record"] if target["type"] == "record" else target
            variants.append(_object(lexicons, inner, nsid, depth + 1).map(_typed(type_name)))
        if not d.get("closed"):  # open unions also carry types this Lexicon does not know
            variants.append(st.just({"$type": "com.example.future#thing", "n": 1}))
        return st.one_of(variants)
    if t == "unknown":
        return st.dictionaries(
            st.text("abc$", max_size=3).filter(lambda k: k not in ("$link", "$bytes", "$type")),
            st.integers(-(2**63), 2**63 - 1) | st.text(max_size=3) | st.none(),
            max_size=3,
        )
    raise AssertionError(f"no strategy for type {t!r}")


def _typed(type_name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def add(v: dict[str, Any]) -> dict[str, Any]:
        return {"$type": type_name, **v}

    return add


def _string(d: Mapping[str, Any]) -> st.SearchStrategy[str]:
    min_b, max_b = d.get("minLength"), d.get("maxLength")
    if "format" in d:
        values = [
            v
            for v in valid_values(d["format"])
            if (min_b is None or len(v.encode()) >= min_b)
            and (max_b is None or len(v.encode()) <= max_b)
        ]
        return st.sampled_from(values)
    # Each character is one grapheme of 1-4 bytes: bound the count by both, then the bytes.
    lo = max(d.get("minGraphemes", 0), -(-(min_b or 0) // 4))
    hi = min(v for v in (d.get("maxGraphemes"), max_b, 24) if v is not None)
    text = st.lists(st.sampled_from(_CHARS), min_size=lo, max_size=max(lo, hi)).map("".join)
    return text.filter(
        lambda s: (
            (min_b is None or len(s.encode()) >= min_b)
            and (max_b is None or len(s.encode()) <= max_b)
        )
    )


def _blob(d: Mapping[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    accept = d.get("accept") or ["*/*"]
    mimes = [
        "application/octet-stream" if a == "*/*" else a.replace("/*", "/x-generated")
        for a in accept
    ]
    return st.fixed_dictionaries(
        {
            "$type": st.just("blob"),
            "ref": st.binary(max_size=8).map(lambda b: CID.for_data(b, CODEC_RAW)),
            "mimeType": st.sampled_from(mimes),
            "size": st.integers(1, d.get("maxSize", 5_000_000)),
        }
    )


def _object(
    lexicons: LexiconSet, d: Mapping[str, Any], base: str, depth: int
) -> st.SearchStrategy[dict[str, Any]]:
    required = set(d.get("required") or ())
    nullable = set(d.get("nullable") or ())
    must: dict[str, Any] = {}
    may: dict[str, Any] = {}
    for name, sub in d.get("properties", {}).items():
        if name not in required and depth >= _MAX_DEPTH:
            continue  # keeps recursive schemas finite
        s = _field(lexicons, sub, base, depth + 1)
        if name in nullable:
            s = st.none() | s
        (must if name in required else may)[name] = s
    return st.fixed_dictionaries(must, optional=may)

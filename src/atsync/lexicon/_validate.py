"""Validate records against their Lexicon, both ways (atsync's own check, DESIGN.md §5).

A record type's schema is compiled once per ``LexiconSet`` into nested check functions (refs
and unions resolved, constraints read), so validating a record is a walk over its values. On
the first validation of a collection every ref reachable from its schema is resolved, and a
dangling one raises ``SchemaError`` then (see ``_set.py``).

Errors: a record that breaks the data model or its Lexicon raises ``RecordError`` whose
message starts with the JSON path of the offending value, e.g.
``$.embed.images[0].alt: string longer than maxGraphemes 1000 (1003 graphemes)``. A Lexicon
that is missing or not a record type raises ``SchemaError``.

What the spec leaves to implementations, decided here (docs/lexicons.md):

- fields the schema does not name are allowed (and checked only against the data model);
- ``default`` values are not filled in: the record is returned as given, so its CID is the
  CID of what was validated;
- the legacy blob form ``{cid, mimeType}`` is refused unless ``allow_legacy_blobs`` (for
  records read from the network; atsync never writes it);
- a union member's ``$type`` naming a ``#main`` definition must be the bare NSID.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from atsync._errors import InvalidSyntaxError, RecordError, SchemaError
from atsync.atproto import (
    check_data_model,
    data_from_json,
    validate_nsid,
    validate_record_key,
    validate_tid,
)
from atsync.lexicon._checks import Check, Invalid, kind, primitive_check
from atsync.lexicon._rules import split_ref
from atsync.lexicon._set import LexiconSet

__all__ = ["check_record_key", "validate_record", "validate_record_json"]


def validate_record(
    lexicons: LexiconSet,
    nsid: str,
    record: Mapping[str, Any],
    *,
    rkey: str | None = None,
    allow_legacy_blobs: bool = False,
) -> dict[str, Any]:
    """Check a record of collection ``nsid`` (data-model form) and return it unchanged.

    ``$type`` must equal ``nsid``. With ``rkey``, the record key is checked against the
    Lexicon's ``key`` type too. Raises ``RecordError`` (with the JSON path) or, if ``nsid``
    has no record Lexicon in the set or its refs dangle, ``SchemaError``.
    """
    check = _record_check(lexicons, nsid, allow_legacy_blobs)
    check_data_model(record)
    if rkey is not None:
        check_record_key(lexicons, nsid, rkey)
    try:
        check(record)
    except Invalid as e:
        raise RecordError(f"{_path(e.path)}: {e.why}") from None
    return record if isinstance(record, dict) else dict(record)


def validate_record_json(
    lexicons: LexiconSet,
    nsid: str,
    record: Any,
    *,
    rkey: str | None = None,
    allow_legacy_blobs: bool = False,
) -> dict[str, Any]:
    """Check a record in its JSON form (``$link``/``$bytes`` objects, as parsed by ``json``)
    and return its data-model form (``CID`` and ``bytes`` values).

    JSON has one number type, so an integral float such as ``3.0`` counts as the integer 3.
    """
    if not isinstance(record, Mapping):
        raise RecordError(f"$: a record must be a JSON object, got {kind(record)}")
    value: dict[str, Any] = data_from_json(record)
    return validate_record(lexicons, nsid, value, rkey=rkey, allow_legacy_blobs=allow_legacy_blobs)


def check_record_key(lexicons: LexiconSet, nsid: str, rkey: str) -> str:
    """Check ``rkey`` against the ``key`` type of ``nsid``'s record Lexicon; return it.

    ``tid`` needs a TID, ``nsid`` an NSID, ``literal:self`` exactly ``self``, ``any`` any
    valid record key. ``RecordError`` otherwise.
    """
    key = lexicons.record_def(nsid)["key"]
    try:
        validate_record_key(rkey)
        if key == "tid":
            validate_tid(rkey)
        elif key == "nsid":
            validate_nsid(rkey)
        elif key.startswith("literal:") and rkey != key[len("literal:") :]:
            raise InvalidSyntaxError(f"must be {key[len('literal:') :]!r}")
    except InvalidSyntaxError as e:
        raise RecordError(f"record key {rkey!r} of {nsid} (key type {key!r}): {e}") from None
    return rkey


# --- compiling -------------------------------------------------------------------------------


def _record_check(lexicons: LexiconSet, nsid: str, legacy: bool) -> Check:
    cache = lexicons._validators
    key = ("record", nsid, legacy)
    check: Check | None = cache.get(key)
    if check is None:
        lexicons.record_def(nsid)
        lexicons.check_refs(nsid)
        compiler = _Compiler(lexicons, legacy)
        check = compiler.definition(f"{nsid}#main")
        cache.update(compiler.compiled)
        cache[key] = check
    return check


class _Compiler:
    """Builds the checks for one record type; recursive schemas go through an indirection."""

    def __init__(self, lexicons: LexiconSet, legacy: bool) -> None:
        self.lexicons = lexicons
        self.legacy = legacy
        self.compiled: dict[Any, Check] = {}

    def definition(self, target: str) -> Check:
        """The check for a named definition ``nsid#name``."""
        key = ("def", target, self.legacy)
        found: Check | None = self.lexicons._validators.get(key) or self.compiled.get(key)
        if found is not None:
            return found
        cell: list[Check] = []

        def indirect(v: Any) -> None:
            cell[0](v)

        # A definition that refers to itself meets this indirection instead of recursing.
        self.compiled[key] = indirect
        d = self.lexicons.get_def(target)
        nsid = target.partition("#")[0]
        if d.get("type") == "record":
            check = _typed(nsid, self.field(d["record"], nsid))
        else:
            check = self.field(d, nsid)
        cell.append(check)
        self.compiled[key] = check
        return check

    def field(self, d: Mapping[str, Any], base: str) -> Check:
        """The check for a schema written in document ``base`` (for its local refs)."""
        check = primitive_check(d, legacy_blobs=self.legacy)
        if check is not None:
            return check
        t = d.get("type")
        if t == "object":
            nullable = set(d.get("nullable") or ())
            fields = tuple(
                (name, self.field(sub, base), name in nullable)
                for name, sub in d.get("properties", {}).items()
            )
            return _object(fields, tuple(d.get("required") or ()))
        if t == "array":
            return _array(self.field(d["items"], base), d.get("minLength"), d.get("maxLength"))
        if t == "ref":
            nsid, name = split_ref(d["ref"], base)
            return self.definition(f"{nsid}#{name}")
        if t == "union":
            variants: dict[str, Check] = {}
            for ref in d.get("refs") or ():
                nsid, name = split_ref(ref, base)
                # $type names a main definition by its bare NSID.
                variants[nsid if name == "main" else f"{nsid}#{name}"] = self.definition(
                    f"{nsid}#{name}"
                )
            return _union(variants, bool(d.get("closed")))
        raise SchemaError(f"a value cannot be validated against type {t!r}")


def _typed(nsid: str, inner: Check) -> Check:
    """A record: ``$type`` must name its collection, then its object schema applies."""

    def check(v: Any) -> None:
        if not isinstance(v, Mapping):
            raise Invalid(f"expected a {nsid} record (an object), got {kind(v)}")
        t = v.get("$type")
        if t != nsid:
            e = Invalid(
                f"must be {nsid!r}, got {t!r}" if "$type" in v else f"missing; must be {nsid!r}"
            )
            e.path.append("$type")
            raise e
        inner(v)

    return check


def _object(fields: tuple[tuple[str, Check, bool], ...], required: tuple[str, ...]) -> Check:
    def check(v: Any) -> None:
        if not isinstance(v, Mapping):
            raise Invalid(f"expected an object, got {kind(v)}")
        for name in required:
            if name not in v:
                e = Invalid("required field missing")
                e.path.append(name)
                raise e
        for name, sub, nullable in fields:
            if name not in v:
                continue
            x = v[name]
            if x is None:
                if nullable:
                    continue
                e = Invalid("null is not allowed here (the field is not nullable)")
                e.path.append(name)
                raise e
            try:
                sub(x)
            except Invalid as e:
                e.path.append(name)
                raise

    return check


def _array(item: Check, min_len: int | None, max_len: int | None) -> Check:
    def check(v: Any) -> None:
        if not isinstance(v, list | tuple):
            raise Invalid(f"expected an array, got {kind(v)}")
        n = len(v)
        if max_len is not None and n > max_len:
            raise Invalid(f"array longer than maxLength {max_len} ({n} items)")
        if min_len is not None and n < min_len:
            items = "1 item" if n == 1 else f"{n} items"
            raise Invalid(f"array shorter than minLength {min_len} ({items})")
        for i, x in enumerate(v):
            try:
                item(x)
            except Invalid as e:
                e.path.append(i)
                raise

    return check


def _union(variants: Mapping[str, Check], closed: bool) -> Check:
    names = sorted(variants)

    def check(v: Any) -> None:
        if not isinstance(v, Mapping):
            raise Invalid(f"expected an object with a $type (union of {names}), got {kind(v)}")
        t = v.get("$type")
        if not isinstance(t, str):
            raise Invalid(f"union member needs a $type (one of {names})")
        sub = variants.get(t)
        if sub is None:
            if t.endswith("#main"):
                e = Invalid(f"name a main definition by its NSID alone: {t[:-5]!r}, not {t!r}")
                e.path.append("$type")
                raise e
            if closed:
                e = Invalid(f"{t!r} is not one of the closed union's types {names}")
                e.path.append("$type")
                raise e
            return  # an open union admits types this Lexicon version does not know
        sub(v)

    return check


_PLAIN_KEY = re.compile(r"[A-Za-z_$][A-Za-z0-9_$:-]*")


def _path(parts: Sequence[str | int]) -> str:
    out = ["$"]
    for p in reversed(parts):
        if isinstance(p, int):
            out.append(f"[{p}]")
        elif _PLAIN_KEY.fullmatch(p):
            out.append(f".{p}")
        else:
            out.append(f"[{json.dumps(p)}]")
    return "".join(out)

"""The rules of the Lexicon spec (version 1) that one document must follow.

``Checker`` walks a parsed document and raises ``SchemaError`` naming the document and the path
inside it for the first rule broken; ``_doc.parse_lexicon`` is the way in. References to
definitions in the same document are resolved here; the others are collected (``Ref``) for
``LexiconSet`` to resolve, since only the set knows the other documents.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from atsync._errors import InvalidSyntaxError, SchemaError
from atsync.atproto import is_valid_language, is_valid_nsid, validate_record_key
from atsync.lexicon._checks import Invalid, primitive_check
from atsync.lexicon._checks import kind as kind_of
from atsync.lexicon._formats import FORMATS

__all__ = [
    "PRIMARY_TYPES",
    "REF_TARGET_TYPES",
    "UNION_TARGET_TYPES",
    "Checked",
    "Checker",
    "Ref",
    "split_ref",
]

PRIMARY_TYPES = frozenset(("record", "query", "procedure", "subscription", "permission-set"))
# Types a document may name in ``defs`` besides the primary ones. ``params``, ``permission``,
# ``ref``, ``union`` and ``unknown`` only ever appear inside another definition.
_NAMED_TYPES = frozenset(
    ("boolean", "integer", "string", "bytes", "cid-link", "blob", "array", "object", "token")
)
# Types a field (object property, array items) may have. ``token`` is a name, not a value.
_FIELD_TYPES = frozenset(
    (
        *("boolean", "integer", "string", "bytes", "cid-link", "blob"),
        *("array", "object", "ref", "union", "unknown"),
    )
)
_PARAM_TYPES = frozenset(("boolean", "integer", "string"))
# What a ``ref`` may point at (not a token, not an endpoint) and what a union variant may be.
REF_TARGET_TYPES = frozenset((*_NAMED_TYPES - {"token"}, "record"))
UNION_TARGET_TYPES = frozenset(("object", "record"))

# Keys each type may carry, beyond ``type`` and ``description``. In strict mode (the default)
# any other key is refused: a misspelt ``maxLenght`` would otherwise drop a constraint silently.
_KEYS: dict[str, frozenset[str]] = {
    "boolean": frozenset(("default", "const")),
    "integer": frozenset(("default", "const", "enum", "minimum", "maximum")),
    "string": frozenset(
        (
            *("format", "maxLength", "minLength", "maxGraphemes", "minGraphemes"),
            *("knownValues", "enum", "default", "const"),
        )
    ),
    "bytes": frozenset(("minLength", "maxLength")),
    "cid-link": frozenset(),
    "blob": frozenset(("accept", "maxSize")),
    "array": frozenset(("items", "minLength", "maxLength")),
    "object": frozenset(("properties", "required", "nullable")),
    "params": frozenset(("properties", "required")),
    "ref": frozenset(("ref",)),
    "union": frozenset(("refs", "closed")),
    "unknown": frozenset(),
    "token": frozenset(),
    "record": frozenset(("key", "record")),
    "query": frozenset(("parameters", "output", "errors")),
    "procedure": frozenset(("parameters", "input", "output", "errors")),
    "subscription": frozenset(("parameters", "message", "errors")),
    "permission-set": frozenset(("title", "title:lang", "detail", "detail:lang", "permissions")),
}
_DOC_KEYS = frozenset(("lexicon", "id", "description", "defs", "revision", "$type"))
_DEF_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
# MIME type patterns for blob ``accept``: type/subtype, type/*, or */*.
_MIME = re.compile(
    r"\*/\*|[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/(?:\*|[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*)"
)
_REPO_ACTIONS = frozenset(("create", "update", "delete"))


@dataclass(frozen=True)
class Ref:
    """Where a document refers to another definition: ``path`` in ``doc``, inside ``def_name``."""

    doc: str
    def_name: str
    path: str
    kind: str  # "ref" or "union"
    target: str  # fully qualified: "nsid#name" (main included as "nsid#main")


def split_ref(ref: str, base: str) -> tuple[str, str]:
    """``(nsid, def name)`` of a ref written in document ``base``; ``ValueError`` if malformed.

    ``#name`` is local, ``nsid`` means ``nsid#main``, ``nsid#name`` is global.
    """
    if not isinstance(ref, str) or not ref:
        raise ValueError("a ref must be a non-empty string")
    nsid, sep, name = ref.partition("#")
    if not sep:
        name = "main"
    elif not nsid:
        nsid = base
    if not is_valid_nsid(nsid):
        raise ValueError(f"{nsid!r} is not a valid NSID")
    if not _DEF_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid definition name")
    return nsid, name


@dataclass(frozen=True)
class Checked:
    """What a document check yields: its parts, and the refs it makes."""

    id: str
    defs: Mapping[str, Mapping[str, Any]]
    description: str | None
    revision: int | None
    refs: tuple[Ref, ...]


class Checker:
    """Checks one document; collects the refs it makes for the set to resolve."""

    def __init__(self, label: str, doc_id: str, strict: bool) -> None:
        self.label = label
        self.doc_id = doc_id
        self.strict = strict
        self.refs: list[Ref] = []
        self.def_name = ""

    def fail(self, path: str, why: str) -> SchemaError:
        return SchemaError(f"{self.label}: {path}: {why}" if path else f"{self.label}: {why}")

    # --- small typed getters ----------------------------------------------------------------

    def keys(self, node: Mapping[str, Any], path: str, kind: str) -> None:
        if not self.strict:
            return
        allowed = _KEYS[kind] | {"type", "description"}
        extra = sorted(k for k in node if k not in allowed)
        if extra:
            known = ", ".join(sorted(allowed))
            raise self.fail(path, f"unknown key {extra[0]!r} for type {kind!r} (allowed: {known})")

    def obj(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be a JSON object, got {kind_of(value)}")
        return value

    def opt_str(self, node: Mapping[str, Any], key: str, path: str) -> str | None:
        v = node.get(key)
        if v is not None and not isinstance(v, str):
            raise self.fail(f"{path}.{key}", f"must be a string, got {kind_of(v)}")
        return v

    def opt_bool(self, node: Mapping[str, Any], key: str, path: str) -> bool | None:
        v = node.get(key)
        if v is not None and not isinstance(v, bool):
            raise self.fail(f"{path}.{key}", f"must be a boolean, got {kind_of(v)}")
        return v

    def opt_int(
        self, node: Mapping[str, Any], key: str, path: str, lo: int | None = 0
    ) -> int | None:
        v = node.get(key)
        if v is None:
            return None
        if not _is_int(v) or (lo is not None and v < lo):
            need = "an integer" if lo is None else f"an integer >= {lo}"
            raise self.fail(f"{path}.{key}", f"must be {need}, got {v!r}")
        return int(v)

    def str_list(
        self, node: Mapping[str, Any], key: str, path: str, *, required: bool = False
    ) -> list[str] | None:
        v = node.get(key)
        if v is None:
            if required:
                raise self.fail(path, f"missing required key {key!r}")
            return None
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.fail(f"{path}.{key}", "must be a list of strings")
        return v

    def bounds(
        self, node: Mapping[str, Any], path: str, lo_key: str, hi_key: str, *, signed: bool = False
    ) -> None:
        """Two optional integer bounds (lengths are >= 0; ``signed`` for integer values)."""
        floor = None if signed else 0
        lo = self.opt_int(node, lo_key, path, lo=floor)
        hi = self.opt_int(node, hi_key, path, lo=floor)
        if lo is not None and hi is not None and lo > hi:
            raise self.fail(path, f"{lo_key} {lo} is greater than {hi_key} {hi}")

    # --- the document -------------------------------------------------------------------------

    def document(self, data: dict[str, Any]) -> Checked:
        version = data.get("lexicon")
        if not (_is_int(version) and version == 1):
            raise self.fail("lexicon", f"must be the integer 1, got {version!r}")
        doc_id = data.get("id")
        if not isinstance(doc_id, str):
            raise self.fail("id", f"must be an NSID string, got {kind_of(doc_id)}")
        if not is_valid_nsid(doc_id):
            raise self.fail("id", f"{doc_id!r} is not a valid NSID")
        if "$type" in data and data["$type"] != "com.atproto.lexicon.schema":
            raise self.fail("$type", "must be 'com.atproto.lexicon.schema' when present")
        if self.strict:
            extra = sorted(k for k in data if k not in _DOC_KEYS)
            if extra:
                raise self.fail(extra[0], f"unknown top-level key {extra[0]!r}")
        description = self.opt_str(data, "description", "")
        revision = self.opt_int(data, "revision", "")
        defs = data.get("defs")
        if not isinstance(defs, Mapping) or not defs:
            raise self.fail("defs", "must be a non-empty JSON object of definitions")
        primaries = [
            n for n, d in defs.items() if isinstance(d, Mapping) and d.get("type") in PRIMARY_TYPES
        ]
        for name in primaries:
            if name != "main":
                kind = defs[name]["type"]
                raise self.fail(f"defs.{name}", f"{_a(kind)} is a primary type: name it 'main'")
        for name, d in defs.items():
            self.def_name = name
            self.named_def(d, name)
        local = {n: d["type"] for n, d in defs.items()}
        for r in self.refs:
            nsid, _, name = r.target.partition("#")
            if nsid != doc_id:
                continue
            if name not in local:
                raise self.fail(r.path, f"ref {r.target!r} names no definition in this document")
            allowed = REF_TARGET_TYPES if r.kind == "ref" else UNION_TARGET_TYPES
            if local[name] not in allowed:
                raise self.fail(
                    r.path, f"{_a(r.kind)} cannot point at {_a(local[name])} ({r.target!r})"
                )
        return Checked(doc_id, defs, description, revision, tuple(self.refs))

    def named_def(self, d: Any, name: str) -> None:
        path = f"defs.{name}"
        if not _DEF_NAME.fullmatch(name):
            raise self.fail(path, "a definition name must be letters, digits, '_' or '-'")
        d = self.obj(d, path)
        t = d.get("type")
        if t in PRIMARY_TYPES:
            self.primary(d, path, t)
        elif t in _NAMED_TYPES:
            self.field(d, path, named=True)
        elif t in _FIELD_TYPES or t in ("params", "permission"):
            raise self.fail(
                path, f"{_a(t)} cannot be a named definition (only part of another one)"
            )
        else:
            raise self.fail(path, f"unknown type {t!r}")

    # --- primary types -----------------------------------------------------------------------

    def primary(self, d: Mapping[str, Any], path: str, t: str) -> None:
        self.keys(d, path, t)
        self.opt_str(d, "description", path)
        if t == "record":
            key = d.get("key")
            if not isinstance(key, str):
                raise self.fail(
                    f"{path}.key", f"must be a record key type string, got {kind_of(key)}"
                )
            if key.startswith("literal:"):
                try:
                    validate_record_key(key[len("literal:") :])
                except InvalidSyntaxError as e:
                    raise self.fail(f"{path}.key", str(e)) from None
            elif key not in ("tid", "nsid", "any"):
                raise self.fail(
                    f"{path}.key", f"must be 'tid', 'nsid', 'any' or 'literal:<key>', got {key!r}"
                )
            rec = self.obj(d.get("record"), f"{path}.record")
            if rec.get("type") != "object":
                raise self.fail(f"{path}.record", "must be a schema of type 'object'")
            self.field(rec, f"{path}.record")
        elif t == "permission-set":
            self.permission_set(d, path)
        else:
            if "parameters" in d:
                self.params(self.obj(d["parameters"], f"{path}.parameters"), f"{path}.parameters")
            if t == "subscription":
                msg = self.obj(d.get("message"), f"{path}.message")
                self.plain_keys(msg, f"{path}.message", ("description", "schema"))
                schema = self.obj(msg.get("schema"), f"{path}.message.schema")
                if schema.get("type") != "union":
                    raise self.fail(f"{path}.message.schema", "must be a union of refs")
                self.field(schema, f"{path}.message.schema")
            for body in ("input", "output") if t == "procedure" else ("output",):
                if body in d:
                    self.body(self.obj(d[body], f"{path}.{body}"), f"{path}.{body}")
            if t != "procedure" and "input" in d:
                raise self.fail(f"{path}.input", f"a {t} has no input body")
            self.errors(d, path)

    def plain_keys(self, node: Mapping[str, Any], path: str, allowed: tuple[str, ...]) -> None:
        if self.strict:
            extra = sorted(k for k in node if k not in allowed)
            if extra:
                raise self.fail(path, f"unknown key {extra[0]!r} (allowed: {', '.join(allowed)})")

    def body(self, b: Mapping[str, Any], path: str) -> None:
        self.plain_keys(b, path, ("description", "encoding", "schema"))
        self.opt_str(b, "description", path)
        enc = b.get("encoding")
        if not isinstance(enc, str) or not enc or any(c.isspace() for c in enc):
            raise self.fail(f"{path}.encoding", f"must be a MIME type string, got {enc!r}")
        if "schema" in b:
            schema = self.obj(b["schema"], f"{path}.schema")
            if schema.get("type") not in ("object", "ref", "union"):
                raise self.fail(f"{path}.schema", "must be an object, a ref or a union")
            self.field(schema, f"{path}.schema")

    def errors(self, d: Mapping[str, Any], path: str) -> None:
        errs = d.get("errors")
        if errs is None:
            return
        if not isinstance(errs, list):
            raise self.fail(f"{path}.errors", "must be a list of {name, description} objects")
        for i, e in enumerate(errs):
            p = f"{path}.errors[{i}]"
            e = self.obj(e, p)
            self.plain_keys(e, p, ("name", "description"))
            name = e.get("name")
            if not isinstance(name, str) or not name or any(c.isspace() for c in name):
                raise self.fail(
                    f"{p}.name", f"must be a non-empty name without spaces, got {name!r}"
                )
            self.opt_str(e, "description", p)

    def params(self, d: Mapping[str, Any], path: str) -> None:
        if d.get("type") != "params":
            raise self.fail(path, "must be a schema of type 'params'")
        self.keys(d, path, "params")
        self.opt_str(d, "description", path)
        props = self.properties(d, path)
        for name, prop in props.items():
            p = f"{path}.properties.{name}"
            t = prop.get("type")
            items = prop.get("items") if t == "array" else None
            item_t = items.get("type") if isinstance(items, Mapping) else None
            if t not in _PARAM_TYPES and not (t == "array" and item_t in _PARAM_TYPES):
                raise self.fail(
                    p, "a parameter must be a boolean, integer, string, or an array of one"
                )
            self.field(prop, p)
        self.name_list(d, "required", path, props)

    def permission_set(self, d: Mapping[str, Any], path: str) -> None:
        for key in ("title", "detail"):
            self.opt_str(d, key, path)
            langs = d.get(f"{key}:lang")
            if langs is None:
                continue
            langs = self.obj(langs, f"{path}.{key}:lang")
            for lang, text in langs.items():
                if not is_valid_language(lang):
                    raise self.fail(f"{path}.{key}:lang", f"{lang!r} is not a language tag")
                if not isinstance(text, str):
                    raise self.fail(f"{path}.{key}:lang.{lang}", "must be a string")
        perms = d.get("permissions")
        if not isinstance(perms, list):
            raise self.fail(f"{path}.permissions", "must be a list of permission objects")
        for i, perm in enumerate(perms):
            self.permission(self.obj(perm, f"{path}.permissions[{i}]"), f"{path}.permissions[{i}]")

    def permission(self, p: Mapping[str, Any], path: str) -> None:
        # Fields depend on the resource and may grow over time, so unknown keys are not refused.
        if p.get("type") != "permission":
            raise self.fail(path, "must be a schema of type 'permission'")
        resource = p.get("resource")
        if not isinstance(resource, str) or not resource:
            raise self.fail(f"{path}.resource", f"must be a non-empty string, got {resource!r}")
        if resource == "repo":
            cols = self.unique_list(p, "collection", path)
            for c in cols:
                if not is_valid_nsid(c):
                    raise self.fail(
                        f"{path}.collection", f"{c!r} is not an NSID (no wildcards here)"
                    )
            if "action" in p:
                bad = sorted(set(self.unique_list(p, "action", path)) - _REPO_ACTIONS)
                if bad:
                    raise self.fail(f"{path}.action", f"{bad[0]!r} is not create, update or delete")
        elif resource == "rpc":
            lxm = self.unique_list(p, "lxm", path)
            for m in lxm:
                if m != "*" and not is_valid_nsid(m):
                    raise self.fail(f"{path}.lxm", f"{m!r} is not an NSID or '*'")
            aud = self.opt_str(p, "aud", path)
            inherit = self.opt_bool(p, "inheritAud", path)
            if aud is None and not inherit:
                raise self.fail(path, "an rpc permission needs 'aud' or 'inheritAud': true")
            if aud is not None and aud != "*":
                raise self.fail(f"{path}.aud", "a permission set can only name the wildcard '*'")
            if aud == "*" and "*" in lxm:
                raise self.fail(path, "'aud' and 'lxm' cannot both be wildcards")
        # Other resources (blob, account, identity...) are ignored here, as the spec says.

    def unique_list(self, p: Mapping[str, Any], key: str, path: str) -> list[str]:
        v = self.str_list(p, key, path, required=True)
        assert v is not None
        if not v or len(set(v)) != len(v):
            raise self.fail(f"{path}.{key}", "must be a non-empty list of distinct strings")
        return v

    # --- field types -----------------------------------------------------------------------------

    def field(self, d: Any, path: str, *, named: bool = False) -> None:
        d = self.obj(d, path)
        t = d.get("type")
        if t == "token" and named:
            self.keys(d, path, t)
            return
        if t not in _FIELD_TYPES:
            if t == "token":
                raise self.fail(path, "a token can only be a named definition, not a field")
            if t in PRIMARY_TYPES or t in ("params", "permission"):
                raise self.fail(path, f"{_a(t)} cannot be used as a field")
            raise self.fail(path, f"unknown type {t!r}")
        self.keys(d, path, t)
        self.opt_str(d, "description", path)
        if t == "boolean":
            self.constants(d, path, bool, "a boolean")
        elif t == "integer":
            self.bounds(d, path, "minimum", "maximum", signed=True)
            self.constants(d, path, int, "an integer")
        elif t == "string":
            self.string(d, path)
        elif t in ("bytes", "array"):
            self.bounds(d, path, "minLength", "maxLength")
            if t == "array":
                if "items" not in d:
                    raise self.fail(path, "an array needs 'items'")
                self.field(d["items"], f"{path}.items")
        elif t == "blob":
            self.opt_int(d, "maxSize", path)
            for i, pattern in enumerate(self.str_list(d, "accept", path) or ()):
                if not _MIME.fullmatch(pattern):
                    raise self.fail(
                        f"{path}.accept[{i}]",
                        f"{pattern!r} is not a MIME type, 'type/*' or '*/*' (no partial globs)",
                    )
        elif t == "object":
            props = self.properties(d, path)
            for name, prop in props.items():
                self.field(prop, f"{path}.properties.{name}")
            self.name_list(d, "required", path, props)
            self.name_list(d, "nullable", path, props)
        elif t == "ref":
            self.ref(d.get("ref"), f"{path}.ref", "ref")
        elif t == "union":
            refs = d.get("refs")
            if not isinstance(refs, list):
                raise self.fail(f"{path}.refs", f"must be a list of refs, got {kind_of(refs)}")
            for i, r in enumerate(refs):
                self.ref(r, f"{path}.refs[{i}]", "union")
            if self.opt_bool(d, "closed", path) and not refs:
                raise self.fail(path, "a closed union needs at least one ref")

    def properties(self, d: Mapping[str, Any], path: str) -> Mapping[str, Mapping[str, Any]]:
        if "properties" not in d:
            raise self.fail(path, f"{_a(str(d.get('type')))} needs 'properties'")
        props = self.obj(d["properties"], f"{path}.properties")
        for name, prop in props.items():
            self.obj(prop, f"{path}.properties.{name}")
        return props

    def name_list(
        self, d: Mapping[str, Any], key: str, path: str, props: Mapping[str, Any]
    ) -> None:
        names = self.str_list(d, key, path) or []
        for name in names:
            if name not in props:
                raise self.fail(f"{path}.{key}", f"{name!r} is not one of the properties")
        if len(set(names)) != len(names):
            raise self.fail(f"{path}.{key}", "lists a property twice")

    def ref(self, ref: Any, path: str, kind: str) -> None:
        try:
            nsid, name = split_ref(ref, self.doc_id)
        except ValueError as e:
            raise self.fail(path, f"bad ref {ref!r}: {e}") from None
        self.refs.append(Ref(self.doc_id, self.def_name, path, kind, f"{nsid}#{name}"))

    def string(self, d: Mapping[str, Any], path: str) -> None:
        self.bounds(d, path, "minLength", "maxLength")
        self.bounds(d, path, "minGraphemes", "maxGraphemes")
        fmt = self.opt_str(d, "format", path)
        if fmt is not None and self.strict and fmt not in FORMATS:
            raise self.fail(
                f"{path}.format", f"unknown format {fmt!r} (known: {', '.join(sorted(FORMATS))})"
            )
        self.str_list(d, "knownValues", path)
        self.constants(d, path, str, "a string")

    def constants(self, d: Mapping[str, Any], path: str, typ: type, name: str) -> None:
        """``const``, ``default`` and ``enum`` values must have the field's type and meet its
        other constraints (a default longer than ``maxLength`` is a broken document); const
        and default exclude each other."""

        def ok(v: Any) -> bool:
            return _is_int(v) if typ is int else isinstance(v, typ)

        for key in ("const", "default"):
            if key in d and not ok(d[key]):
                raise self.fail(f"{path}.{key}", f"must be {name}, got {d[key]!r}")
        if "const" in d and "default" in d:
            raise self.fail(path, "'const' and 'default' exclude each other")
        if "enum" in d:
            enum = d["enum"]
            if not isinstance(enum, list) or not enum or not all(ok(v) for v in enum):
                raise self.fail(f"{path}.enum", f"must be a non-empty list, each {name}")
        check = primitive_check(d)
        assert check is not None
        values = [(k, d[k]) for k in ("const", "default") if k in d]
        values += [(f"enum[{i}]", v) for i, v in enumerate(d.get("enum") or ())]
        for key, v in values:
            try:
                check(v)
            except Invalid as e:
                raise self.fail(
                    f"{path}.{key}", f"{v!r} breaks the field's own rules: {e.why}"
                ) from None


def _a(word: str) -> str:
    # "a union": the only type name whose vowel sounds like a consonant.
    return ("an " if word[0] in "aeiou" and word != "union" else "a ") + word


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

"""Models derived from record Lexicons, and hand-written models checked against them.

    lexicons = LexiconSet.load("lexicons/")
    contract = Contract(models={"posts": model_from_lexicon(lexicons, "com.example.post")})
    ATSync(app, bindings={"posts": Binding("com.example.post")}, lexicons=lexicons, ...)

The model has the record key as its primary key (``key``, "id" by default) and one property per
field of the record object, named as the field:

    Lexicon type                                  property
    string (any format: datetime, did, uri, …)    string
    integer                                       integer
    boolean                                       boolean
    bytes                                         bytes
    blob                                          blob  (a BlobRef: the bytes in db.blobs,
                                                         uploaded and fetched by the engine)
    cid-link                                      json  (the JSON form: {"$link": …})
    object, ref, union, unknown                   json
    array                                         json  (a list)

A field the record does not require, or declares nullable, is optional (``?``). A property
that is None is left out of the record, except a field the Lexicon both requires and declares
nullable: the engine given the Lexicon (``lexicons=``) writes that one as ``null``, as the
Lexicon wants it there. ``null`` in a pulled record and an absent field both read back as None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from atsync._errors import SchemaError
from atsync.db import Model
from atsync.lexicon._set import LexiconSet

__all__ = ["check_model_against_lexicon", "model_from_lexicon"]

_KINDS = {
    "string": "string",
    "integer": "integer",
    "boolean": "boolean",
    "bytes": "bytes",
    "blob": "blob",
}
# What each property kind can hold, by Lexicon field type (json holds any of them).
_HOLDS = {
    "string": {"string"},
    "integer": {"integer"},
    "boolean": {"boolean"},
    "bytes": {"bytes"},
    "blob": {"blob"},
    "json": {
        "string", "integer", "boolean", "bytes", "cid-link", "blob", "object", "ref", "union",
        "unknown", "array", "null",
    },
    "reference": {"string"},  # another model's key
    "relation": {"array"},  # a list of keys
}  # fmt: skip


def _record_object(lexicons: LexiconSet, nsid: str) -> Mapping[str, Any]:
    main = lexicons.get(nsid).main
    if main is None or main.get("type") != "record":
        raise SchemaError(f"{nsid}: its main definition is not a record")
    record = main.get("record")
    if not isinstance(record, Mapping) or record.get("type") != "object":
        raise SchemaError(f"{nsid}: the record is not an object")
    return record


def _kind(field: Mapping[str, Any]) -> str:
    return _KINDS.get(str(field.get("type")), "json")


def model_from_lexicon(lexicons: LexiconSet, nsid: str, *, key: str = "id") -> dict[str, str]:
    """The model (in the schema language ``Contract(models=…)`` takes) for the records of
    ``nsid``: ``key`` is the primary key (the record key); one property per record field.
    ``SchemaError`` if ``nsid`` is not a record Lexicon, or a field is named ``key`` or
    cannot be a property name."""
    record = _record_object(lexicons, nsid)
    required = set(record.get("required") or ())
    nullable = set(record.get("nullable") or ())
    properties = record.get("properties") or {}
    if key in properties:
        raise SchemaError(
            f"{nsid}: a record field is named {key!r}, the primary key's name: pass key=… "
            "with another name"
        )
    model: dict[str, str] = {key: "primary"}
    for name, field in properties.items():
        if not isinstance(field, Mapping):
            raise SchemaError(f"{nsid}.{name}: not a field definition")
        optional = name not in required or name in nullable
        model[name] = _kind(field) + ("?" if optional else "")
    return model


def check_model_against_lexicon(
    lexicons: LexiconSet,
    nsid: str,
    model: Model,
    fields: Mapping[str, str],
    transformed: frozenset[str] = frozenset(),
) -> None:
    """``SchemaError`` unless ``model`` can hold the records of ``nsid``: every field the
    Lexicon requires is a property (``fields``: property -> record field, as the binding maps
    them), and each property's kind can hold its field's values (a ``transformed`` property
    converts its own, and is not compared)."""
    record = _record_object(lexicons, nsid)
    properties = record.get("properties") or {}
    by_field = {field: prop for prop, field in fields.items()}
    for name in record.get("required") or ():
        if name not in by_field:
            raise SchemaError(
                f"binding {model.name} -> {nsid}: the Lexicon requires field {name!r}, which "
                f"no property of {model.name} maps to (model_from_lexicon({nsid!r}) gives "
                "one that does)"
            )
    for field, prop in by_field.items():
        definition = properties.get(field)
        if prop in transformed:
            continue
        if not isinstance(definition, Mapping):
            continue  # a field the Lexicon does not declare: allowed (open objects)
        kind = model.by_name[prop].kind
        wanted = str(definition.get("type"))
        if wanted not in _HOLDS.get(kind, set()):
            raise SchemaError(
                f"binding {model.name} -> {nsid}: {model.name}.{prop} is {kind}, which "
                f"cannot hold the Lexicon's {wanted} field {field!r} (use "
                f"{_kind(definition)!r})"
            )

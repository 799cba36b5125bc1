"""Bindings: a model <-> a collection of records, and how a row becomes a record and back.

    Binding("com.example.note")                                  # every property, same names
    Binding("com.example.note", fields={"body": "text"},         # rename
            local=["done"],                                      # never leaves the device
            transforms={"score": Transform(str, float)})         # floats cannot be records

The record key is the model's primary key (``rkey="primary"``, checked as an atproto record
key), or a TID chosen when the row is first synced (``rkey="tid"``). ``shared=True``: every
participant writes the whole row into their own repository with a stamp per field, and the
row is their merge (see ``_shared``). Records get ``$type``;
null properties are left out of the record, and absent fields read back as null — except the
fields given as ``nulls`` (those a Lexicon requires and declares nullable: it refuses a record
without them), which are written as ``null``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any, Literal

from .._errors import RecordError, SchemaError
from ..atproto import (
    CID,
    check_data_model,
    data_from_json,
    data_to_json,
    encode_dag_cbor,
    is_valid_nsid,
    is_valid_record_key,
)
from ..db import BlobRef, Model
from ._strategies import Strategy

__all__ = [
    "MAX_RECORD_BYTES",
    "Binding",
    "BoundBinding",
    "Direction",
    "Transform",
    "declare_writes",
]

Direction = Literal["push", "pull", "both"]
_STAMP_FIELDS = ("syncClocks", "syncDeleted")  # a shared binding's own (see _shared)
MAX_RECORD_BYTES = 1_000_000
# Kinds whose values ModelDB has already checked to be atproto data-model values that
# libipld encodes exactly: strings (SQLite refused lone surrogates before any listener
# ran), 64-bit integers, booleans, keys and lists of keys. Not json (it may hold floats or a
# "$bytes" key), bytes (libipld may mistake them for a link), nor floats.
_TRUSTED_KINDS = frozenset({"string", "integer", "boolean", "reference", "relation"})


def _keys_json(keys: Sequence[str]) -> str:
    return f"[{','.join(map(encode_basestring, keys))}]"


# A value of each trusted kind as json.dumps(..., ensure_ascii=False) writes it: the same
# string escaper; int's own repr, as json uses for ints and their subclasses.
_JSON_OF: dict[str, Callable[[Any], str]] = {
    "string": encode_basestring,
    "reference": encode_basestring,
    "integer": int.__repr__,
    "boolean": {True: "true", False: "false"}.__getitem__,
    "relation": _keys_json,
}


@dataclass(frozen=True, slots=True)
class Transform:
    """Convert one property both ways: ``to_record(value)`` and ``from_record(value)``."""

    to_record: Callable[[Any], Any]
    from_record: Callable[[Any], Any]


_JSON_FORM = Transform(data_from_json, data_to_json)


def blob_to_record(ref: BlobRef) -> dict[str, Any]:
    """A ``BlobRef`` as the record's blob object (``ref`` a CID link)."""
    return {"$type": "blob", "ref": CID.parse(ref.cid), "mimeType": ref.mime_type, "size": ref.size}


def blob_from_record(value: Any) -> BlobRef:
    """A record's blob object as a ``BlobRef`` (the legacy ``{cid, mimeType}`` form has no
    size, and is refused)."""
    if isinstance(value, dict) and value.get("$type") == "blob":
        ref = value.get("ref")
        if isinstance(ref, dict):  # the JSON form
            ref = ref.get("$link")
        if isinstance(ref, CID | str):
            return BlobRef.from_json({**value, "cid": str(ref)})
    raise RecordError(f"not a blob object {{$type: 'blob', ref, mimeType, size}}: {value!r}")


_BLOB_FORM = Transform(blob_to_record, blob_from_record)


@dataclass(frozen=True)
class Binding:
    """How one model maps to one collection (an NSID) in the user's repository."""

    collection: str
    model: str | None = None  # defaults to the key under which the binding is given
    rkey: Literal["primary", "tid"] = "primary"
    fields: Mapping[str, str] = field(default_factory=dict)  # property -> record field
    transforms: Mapping[str, Transform] = field(default_factory=dict)
    local: Sequence[str] = ()
    direction: Direction = "both"
    strategy: Strategy | None = None  # a push strategy for this binding; None: the engine's
    # Written by the user and the repositories they follow: merged per field (see _shared).
    shared: bool = False

    def bind(self, model: Model, *, nulls: Collection[str] = ()) -> BoundBinding:
        """Check the binding against the model and compile its conversions. ``nulls``: the
        record fields written as ``null`` when their property is null, not left out."""
        return BoundBinding(self, model, nulls)


class BoundBinding:
    """A binding checked against its model: converts rows to records and back."""

    def __init__(self, binding: Binding, model: Model, nulls: Collection[str] = ()) -> None:
        where = f"binding {model.name} -> {binding.collection}"
        if not is_valid_nsid(binding.collection):
            raise SchemaError(f"{where}: {binding.collection!r} is not a valid NSID")
        if binding.direction not in ("push", "pull", "both"):
            raise SchemaError(f"{where}: direction must be 'push', 'pull' or 'both'")
        if binding.rkey not in ("primary", "tid"):
            raise SchemaError(f"{where}: rkey must be 'primary' or 'tid'")
        named = {*binding.fields, *binding.transforms, *binding.local}
        unknown = sorted(n for n in named if n not in model.by_name)
        if unknown:
            raise SchemaError(f"{where}: {unknown} are not properties of {model.name}")
        if binding.shared and binding.rkey != "primary":
            raise SchemaError(f"{where}: a shared binding's record key is the model's key")
        self.binding = binding
        self.model = model
        self.nulls = frozenset(nulls)
        self.shared = binding.shared
        self.collection = binding.collection
        self.direction = binding.direction
        self.by_primary_key = binding.rkey == "primary"
        pairs: list[tuple[str, str, Callable[[Any], Any] | None, Callable[[Any], Any] | None]]
        pairs = []
        used: dict[str, str] = {}
        for prop in model.properties:
            if prop.kind == "primary" or prop.name in binding.local:
                continue
            name = binding.fields.get(prop.name, prop.name)
            if name.startswith("$") or not name or (binding.shared and name in _STAMP_FIELDS):
                raise SchemaError(f"{where}: {prop.name} cannot become record field {name!r}")
            if name in used:
                raise SchemaError(f"{where}: {used[name]} and {prop.name} both map to {name!r}")
            used[name] = prop.name
            transform = binding.transforms.get(prop.name)
            if prop.kind == "blob" and transform is None:
                transform = _BLOB_FORM  # uploaded before the record, fetched after it
            if transform is None and prop.kind == "json":
                # A json property holds the atproto JSON form: {"$link": …} is a link in the
                # record, {"$bytes": …} bytes (a blob's "ref" too), and back again.
                transform = _JSON_FORM
            if transform is None and prop.kind in ("float", "number"):
                raise SchemaError(
                    f"{where}: {model.name}.{prop.name} is a {prop.kind}, and atproto records "
                    "cannot hold floats: give transforms={"
                    f"{prop.name!r}: Transform(str, float)}} (or scaled integers), or list it "
                    "in local="
                )
            pairs.append(
                (
                    prop.name,
                    name,
                    transform.to_record if transform else None,
                    transform.from_record if transform else None,
                )
            )
        self._fields = tuple(pairs)
        # (property, record field) of each blob property synced as a blob object.
        self.blob_fields = tuple(
            (prop, name)
            for prop, name, to, _ in pairs
            if model.by_name[prop].kind == "blob" and to is blob_to_record
        )
        self._key = model.primary_key
        by_name = model.by_name
        # True when every record of this binding is valid by construction and free of bytes
        # and links: capture then skips the data-model walk and encodes with libipld.
        self.trusted = all(
            to is None and by_name[prop].kind in _TRUSTED_KINDS for prop, _, to, _ in pairs
        )
        self._plain = tuple((prop, name) for prop, name, _, _ in pairs) if self.trusted else None
        # For to_record_json: each field's '"name":' and how its value is written.
        self._json_head = '{"$type":' + encode_basestring(binding.collection)
        self._json_fields = tuple(
            (prop, name, f",{encode_basestring(name)}:", _JSON_OF[by_name[prop].kind])
            for prop, name, _, _ in pairs
            if self.trusted
        )

    @property
    def field_map(self) -> dict[str, str]:
        """Property -> record field, for every property the binding maps."""
        return {prop: name for prop, name, _, _ in self._fields}

    @property
    def transformed(self) -> frozenset[str]:
        return frozenset(self.binding.transforms)

    @property
    def data_fields(self) -> tuple[str, ...]:
        """The record fields this binding maps, ``$type`` left out."""
        return tuple(name for _, name, _, _ in self._fields)

    @property
    def record_fields(self) -> frozenset[str]:
        """The record fields this binding maps (``$type`` included)."""
        return frozenset({"$type", *(name for _, name, _, _ in self._fields)})

    def rkey_for(self, row: Mapping[str, Any]) -> str:
        """The record key of a row, when keys come from the primary key."""
        return self.rkey_of(row[self._key])

    def rkey_of(self, key: str) -> str:
        """The record key for primary key ``key`` (``RecordError`` if it cannot be one)."""
        if not is_valid_record_key(key):
            raise RecordError(
                f"{self.model.name}/{key}: the primary key is not a valid atproto record key "
                "(1-512 of A-Z a-z 0-9 . - _ : ~, not '.' or '..'); use Binding(rkey='tid') "
                "or keys such as ctx.tid()"
            )
        return str(key)

    def to_record(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The record for a row: ``$type`` plus every mapped, non-null property (and the
        ``nulls`` fields, null or not)."""
        record: dict[str, Any] = {"$type": self.collection}
        nulls = self.nulls
        if self._plain is not None:  # no transforms: the hot path of every local write
            for prop, name in self._plain:
                value = row.get(prop)
                if value is not None:
                    record[name] = value
                elif name in nulls:
                    record[name] = None
            return record
        for prop, name, to_record, _ in self._fields:
            value = row.get(prop)
            if value is None:
                if name in nulls:
                    record[name] = None
                continue
            if to_record is not None:
                try:
                    value = to_record(value)
                except Exception as exc:
                    raise RecordError(
                        f"{self.model.name}.{prop}: transform to the record failed: {exc!r}"
                    ) from exc
            record[name] = value
        return record

    def to_record_json(self, row: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """``to_record(row)`` and its JSON text, for a ``trusted`` binding only.

        The text is what ``json.dumps(record, ensure_ascii=False, separators=(",", ":"))``
        gives, written field by field: the kinds of a trusted binding are strings, ints,
        bools and lists of strings, so no general encoder is needed (it was the largest
        cost of capturing a write).
        """
        record: dict[str, Any] = {"$type": self.collection}
        parts = [self._json_head]
        nulls = self.nulls
        for prop, name, name_json, to_json in self._json_fields:
            value = row.get(prop)
            if value is not None:
                record[name] = value
                parts.append(name_json)
                parts.append(to_json(value))
            elif name in nulls:
                record[name] = None
                parts.append(name_json)
                parts.append("null")
        parts.append("}")
        return record, "".join(parts)

    def from_record(self, record: Mapping[str, Any], key: str) -> dict[str, Any]:
        """The row for a record (local-only properties are left out)."""
        row: dict[str, Any] = {self._key: key}
        for prop, name, _, from_record in self._fields:
            value = record.get(name)
            if value is not None and from_record is not None:
                try:
                    value = from_record(value)
                except Exception as exc:
                    raise RecordError(
                        f"{self.collection}/{key}.{name}: transform from the record failed: {exc!r}"
                    ) from exc
            row[prop] = value
        return row

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Check the atproto data model and the size limit; return the DAG-CBOR bytes."""
        check_data_model(record)
        data = encode_dag_cbor(record)
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError(
                f"{self.collection}: record of {len(data):,} bytes is over the "
                f"{MAX_RECORD_BYTES:,}-byte limit"
            )
        return data


def declare_writes(signer: Any, bound: Iterable[BoundBinding], anywhere: bool) -> None:
    """Tell a signer that logs in with OAuth what an engine will write, so that it asks for
    no more (``ATPSigner.oauth_scope``): the pushed collections, and blobs if a record may
    hold one. ``anywhere``: an ``on_action`` hook may write any collection, so nothing
    narrower than the signer's default can be asked."""
    if not hasattr(signer, "oauth_collections"):
        return
    if anywhere:
        signer.oauth_collections = None
        return
    bound = list(bound)
    if signer.oauth_collections is not None:
        signer.oauth_collections.update(b.collection for b in bound if b.direction != "pull")
    if any(b.blob_fields or any(p.kind == "json" for p in b.model.properties) for b in bound):
        signer.oauth_blobs = True

"""Checking Python values against property kinds, and their SQLite column encodings.

Each kind maps to one plain SQLite column type so raw SQL reads naturally:

    primary, string, reference -> TEXT      integer, boolean -> INTEGER (boolean as 0/1)
    float, number              -> (untyped) json            -> TEXT (JSON, json_extract works)
    bytes                      -> BLOB      relation        -> rows of "<model>__<prop>"
    blob                       -> TEXT (the reference as JSON; the bytes in db.blobs)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from .._errors import ValidationError
from ._blobs import BlobRef
from ._schema import Model, Property

__all__ = [
    "column_encoder",
    "decode_column",
    "encode_column",
    "reads_as_stored",
    "sql_type",
    "validate_key",
]

_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_SQL_TYPES = {
    "primary": "TEXT",
    "string": "TEXT",
    "reference": "TEXT",
    "integer": "INTEGER",
    "boolean": "INTEGER",
    # No declared type: REAL affinity would store -0.0 as the integer 0. The values are
    # always SQLite reals all the same (encode_column makes them floats).
    "float": "",
    "number": "",
    "json": "TEXT",
    "bytes": "BLOB",
    "blob": "TEXT",  # the reference as JSON: {"cid", "mimeType", "size"}
}


def sql_type(prop: Property) -> str:
    """The declared type of the column ('' for floats: see _SQL_TYPES)."""
    return _SQL_TYPES[prop.kind]


def _where(model: Model, prop: Property) -> str:
    return f"{model.name}.{prop.name}"


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what}: expected a string, got {type(value).__name__} {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(f"{what}: string is not valid Unicode ({exc.reason})") from None
    return value


def validate_key(model: Model, key: object) -> str:
    """A primary key: a non-empty string (any Unicode; atproto rkeys are stricter)."""
    if type(key) is str and key and key.isascii():
        return key
    what = f"{model.name}.{model.primary_key}"
    if not isinstance(key, str):
        raise ValidationError(
            f"{what}: the primary key must be a string, got {type(key).__name__} {key!r}"
        )
    if not key:
        raise ValidationError(f"{what}: the primary key must not be empty")
    return _check_text(key, what)


def _check_json(value: object, what: str, depth: int = 0) -> object:
    """A JSON value, normalised the way it will be read back (tuples become lists)."""
    if depth > 200:
        raise ValidationError(f"{what}: JSON nested deeper than 200 levels")
    if value is None or isinstance(value, bool | str):
        if isinstance(value, str):
            _check_text(value, what)
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{what}: JSON cannot hold {value!r}")
        return value
    if isinstance(value, list | tuple):
        return [_check_json(item, what, depth + 1) for item in value]
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValidationError(f"{what}: JSON object keys must be strings, got {k!r}")
            out[_check_text(k, what)] = _check_json(v, what, depth + 1)
        return out
    raise ValidationError(f"{what}: {type(value).__name__} {value!r} is not a JSON value")


def encode_column(model: Model, prop: Property, value: object) -> object:
    """Check ``value`` for ``prop`` and return what is stored in its column."""
    if value is None:
        if prop.nullable:
            return None
        raise ValidationError(
            f"{_where(model, prop)}: null is not allowed (type {prop.type_string})"
        )
    kind = prop.kind
    if kind in ("string", "reference", "primary"):
        if kind == "primary":
            return validate_key(model, value)
        if kind == "reference" and value == "":
            raise ValidationError(f"{_where(model, prop)}: a reference must not be empty")
        return _check_text(value, _where(model, prop))
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(
                f"{_where(model, prop)}: expected an integer, got {type(value).__name__} {value!r}"
            )
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValidationError(f"{_where(model, prop)}: {value} does not fit in 64 bits")
        return value
    if kind in ("float", "number"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError(
                f"{_where(model, prop)}: expected a number, got {type(value).__name__} {value!r}"
            )
        try:
            as_float = float(value)
        except OverflowError:
            raise ValidationError(
                f"{_where(model, prop)}: {value} is too large for a float"
            ) from None
        if math.isnan(as_float):
            # SQLite stores NaN as NULL, which would silently lose the value.
            raise ValidationError(f"{_where(model, prop)}: NaN cannot be stored")
        return as_float
    if kind == "boolean":
        if not isinstance(value, bool):
            raise ValidationError(
                f"{_where(model, prop)}: expected a bool, got {type(value).__name__} {value!r}"
            )
        return 1 if value else 0
    if kind == "bytes":
        if not isinstance(value, bytes | bytearray | memoryview):
            raise ValidationError(
                f"{_where(model, prop)}: expected bytes, got {type(value).__name__} {value!r}"
            )
        return bytes(value)
    if kind == "blob":
        if not isinstance(value, BlobRef):
            raise ValidationError(
                f"{_where(model, prop)}: expected a BlobRef (from db.blobs.put), got "
                f"{type(value).__name__} {value!r}"
            )
        return json.dumps(value.to_json(), separators=(",", ":"))
    if kind == "json":
        normal = _check_json(value, _where(model, prop))
        return json.dumps(normal, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    raise ValidationError(f"{_where(model, prop)}: relations are not stored in a column")


def column_encoder(model: Model, prop: Property) -> Callable[[object], object]:
    """``encode_column`` for one property, with a fast path for the common exact types.

    The fast paths skip the check for lone surrogates in strings: SQLite's binding raises
    ``UnicodeEncodeError`` for those, which the database turns into ``ValidationError``.
    """

    def slow(value: object) -> object:
        return encode_column(model, prop, value)

    kind = prop.kind
    if kind == "string":

        def text(value: object) -> object:
            return value if type(value) is str else slow(value)

        return text
    if kind == "reference":

        def reference(value: object) -> object:
            return value if type(value) is str and value else slow(value)

        return reference
    if kind == "primary":

        def key(value: object) -> object:
            return value if type(value) is str and value else slow(value)

        return key
    if kind == "integer":

        def integer(value: object) -> object:
            if type(value) is int and _INT_MIN <= value <= _INT_MAX:
                return value
            return slow(value)

        return integer
    if kind in ("float", "number"):

        def number(value: object) -> object:
            return value if type(value) is float and value == value else slow(value)

        return number
    return slow


def _decode_bool(raw: object) -> object:
    return None if raw is None else bool(raw)


def _decode_json(raw: object) -> object:
    return None if raw is None else json.loads(raw)  # type: ignore[arg-type]


def _decode_float(raw: object) -> object:
    return None if raw is None else float(raw)  # type: ignore[arg-type]


def _identity(raw: object) -> object:
    return raw


def _decode_blob(raw: object) -> object:
    return None if raw is None else BlobRef.from_json(json.loads(raw))  # type: ignore[arg-type]


_DECODERS: dict[str, Callable[[object], object]] = {
    "boolean": _decode_bool,
    "json": _decode_json,
    "blob": _decode_blob,
    "float": _decode_float,
    "number": _decode_float,
}


def decode_column(prop: Property) -> Callable[[object], Any]:
    """The function that turns a stored column value back into its Python value."""
    return _DECODERS.get(prop.kind, _identity)


def reads_as_stored(prop: Property) -> bool:
    """Whether the column's stored value is its Python value (no decoding on read)."""
    return prop.kind not in _DECODERS

"""Compact JSON text, as atsync stores it in its tables: one C encoder, built once.

``json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)`` builds a
new encoder on every call, which was a fifth of the cost of storing a small record (and a
tenth of an action's). This is the same text without that cost, and without the cycle
check: a value that contains itself recurses until ``RecursionError``.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable

__all__ = ["compact_json"]


def _refuse(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _encoder() -> Callable[[object], str]:
    slow = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # not CPython's C accelerator
        return slow
    encode = make(
        None, _refuse, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )

    def encode_json(value: object) -> str:
        return "".join(encode(value, 0))

    return encode_json


compact_json: Callable[[object], str] = _encoder()
"""The compact JSON text of ``value``; ``TypeError`` for what JSON cannot hold, ``ValueError``
for NaN and infinities."""

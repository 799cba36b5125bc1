"""Hostile variants of valid input, for the property tests of decoders."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

__all__ = ["mutated"]


def mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` with up to four bytes changed, inserted or dropped, or cut short."""

    @st.composite
    def build(draw: Any) -> bytes:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            if not out:
                break
            i = draw(st.integers(0, len(out) - 1))
            kind = draw(st.sampled_from(["flip", "insert", "drop", "cut"]))
            if kind == "flip":
                out[i] = draw(st.integers(0, 255))
            elif kind == "insert":
                out.insert(i, draw(st.integers(0, 255)))
            elif kind == "drop":
                del out[i]
            else:
                del out[i:]
        return bytes(out)

    return build()

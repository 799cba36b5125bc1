"""Lexicons: load and check Lexicon documents, validate records, bind models to collections."""

from ._binding import Binding, BoundBinding, Transform

__all__ = ["Binding", "BoundBinding", "Transform"]

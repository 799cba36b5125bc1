"""The ``atsync`` command: a thin layer over the library (see ``atsync --help``)."""

from __future__ import annotations

from ._main import main

__all__ = ["main"]

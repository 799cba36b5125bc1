"""Lexicon documents: parse one and check it against the Lexicon spec (version 1).

Written by hand rather than on the SDK's ``atproto_lexicon`` parser (pydantic models): that
parser rejects a valid document (a named ``integer`` definition), accepts invalid ones (an
``id`` that is no NSID; a ``record`` whose schema lacks ``type: object``), and its errors name
pydantic internals instead of the document's path. See docs/lexicons.md for what is checked.

Every problem raises ``SchemaError`` naming the document and the path inside it, e.g.
``Lexicon 'com.example.note': defs.main.record.properties.title.maxLength: must be an
integer >= 0, got -1``. The rules are in ``_rules.py``.

References to definitions inside the same document are resolved on loading; references to
other documents are resolved by ``LexiconSet`` (``_set.py``), which knows all the documents.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atsync._errors import SchemaError
from atsync.lexicon._rules import PRIMARY_TYPES, Checker, Ref, split_ref

__all__ = [
    "PRIMARY_TYPES",
    "LexiconDoc",
    "Ref",
    "load_lexicon",
    "load_lexicons",
    "parse_lexicon",
    "split_ref",
]


@dataclass(frozen=True, eq=False)
class LexiconDoc:
    """A checked Lexicon document. Treat ``defs`` as read-only: it is the parsed JSON.

    ``source`` says where the document came from (a file path), for messages.
    """

    id: str
    defs: Mapping[str, Mapping[str, Any]]
    description: str | None = None
    revision: int | None = None
    source: str | None = None
    refs: tuple[Ref, ...] = field(default=(), repr=False)

    @property
    def main(self) -> Mapping[str, Any] | None:
        return self.defs.get("main")

    @property
    def primary_type(self) -> str | None:
        """``record``, ``query``... when ``main`` is a primary definition, else ``None``."""
        main = self.main
        t = main.get("type") if main is not None else None
        return t if t in PRIMARY_TYPES else None

    def to_json(self) -> dict[str, Any]:
        """The document as JSON data (a deep copy)."""
        out: dict[str, Any] = {"lexicon": 1, "id": self.id}
        if self.revision is not None:
            out["revision"] = self.revision
        if self.description is not None:
            out["description"] = self.description
        out["defs"] = copy.deepcopy(dict(self.defs))
        return out

    def __repr__(self) -> str:
        return f"LexiconDoc({self.id!r})"


def parse_lexicon(data: Any, *, source: str | None = None, strict: bool = True) -> LexiconDoc:
    """Check ``data`` (a parsed JSON document) and return it as a ``LexiconDoc``.

    ``strict`` (default) also refuses keys the spec does not define and unknown string
    formats; pass ``strict=False`` for third-party documents that may use newer spec fields.
    The document is deep-copied, so later changes to ``data`` do not affect it.
    """
    where = f" (from {source})" if source else ""
    if not isinstance(data, Mapping):
        raise SchemaError(f"Lexicon document{where}: must be a JSON object")
    doc_id = data.get("id")
    label = f"Lexicon {doc_id!r}{where}" if isinstance(doc_id, str) else f"Lexicon document{where}"
    checker = Checker(label, doc_id if isinstance(doc_id, str) else "", strict)
    c = checker.document(copy.deepcopy(dict(data)))
    return LexiconDoc(c.id, c.defs, c.description, c.revision, source, c.refs)


def load_lexicon(path: str | os.PathLike[str], *, strict: bool = True) -> LexiconDoc:
    """Load and check one Lexicon JSON file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise SchemaError(f"Lexicon file {p}: cannot be read ({e.strerror or e})") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise SchemaError(f"Lexicon file {p}: not valid JSON ({e})") from e
    return parse_lexicon(data, source=str(p), strict=strict)


def load_lexicons(path: str | os.PathLike[str], *, strict: bool = True) -> list[LexiconDoc]:
    """Load a Lexicon file, or every ``*.json`` file under a directory (recursively, sorted)."""
    p = Path(path)
    if p.is_dir():
        return [load_lexicon(f, strict=strict) for f in sorted(p.rglob("*.json")) if f.is_file()]
    return [load_lexicon(p, strict=strict)]

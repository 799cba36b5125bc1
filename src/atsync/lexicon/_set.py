"""``LexiconSet``: the catalog of Lexicon documents an app validates against.

Refs between documents are resolved by the set. When a ref is checked:

- a ref to a definition in the same document is checked when the document is loaded;
- a ref into another document is checked when first needed: the first validation of a record
  type checks every ref reachable from it (``check_refs(nsid)``), so a missing document fails
  that record type loudly and does not touch others. ``check_refs()`` with no argument checks
  every ref of every document, for an app that wants all errors at start-up.

Refs are not checked on ``add()`` because documents arrive one at a time in any order, and a
set may hold endpoint Lexicons whose refs into other apps' documents are never needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from atsync._errors import SchemaError
from atsync.lexicon._doc import LexiconDoc, load_lexicons, parse_lexicon
from atsync.lexicon._rules import REF_TARGET_TYPES, UNION_TARGET_TYPES, Ref, split_ref

__all__ = ["LexiconSet"]

_MAX_LISTED = 10


class LexiconSet:
    """Lexicon documents by NSID. Documents are added, never replaced or removed."""

    def __init__(
        self, docs: Iterable[LexiconDoc | Mapping[str, Any]] = (), *, strict: bool = True
    ) -> None:
        self._docs: dict[str, LexiconDoc] = {}
        self._strict = strict
        # Compiled validators, filled and read by ``_validate`` (keyed there). Adding a
        # document cannot change how existing refs resolve, but the cache is cleared anyway
        # so that nothing compiled against an earlier state can linger.
        self._validators: dict[Any, Any] = {}
        for doc in docs:
            self.add(doc)

    @classmethod
    def load(cls, *paths: str | os.PathLike[str], strict: bool = True) -> LexiconSet:
        """A set of the Lexicon files and directories (searched recursively for ``*.json``)."""
        lexicons = cls(strict=strict)
        for path in paths:
            for doc in load_lexicons(path, strict=strict):
                lexicons.add(doc)
        return lexicons

    def add(self, doc: LexiconDoc | Mapping[str, Any]) -> LexiconDoc:
        """Add a document (a ``LexiconDoc`` or its JSON data, checked here) and return it.

        Adding a document whose id is already present is a no-op if the content is the same,
        and a ``SchemaError`` otherwise.
        """
        if not isinstance(doc, LexiconDoc):
            doc = parse_lexicon(doc, strict=self._strict)
        old = self._docs.get(doc.id)
        if old is not None:
            if old.to_json() == doc.to_json():
                return old
            where = " and ".join(s for s in (old.source, doc.source) if s)
            raise SchemaError(
                f"two different Lexicon documents for {doc.id!r}" + (f" ({where})" if where else "")
            )
        self._docs[doc.id] = doc
        self._validators.clear()
        return doc

    def __contains__(self, nsid: object) -> bool:
        return nsid in self._docs

    def __iter__(self) -> Iterator[LexiconDoc]:
        return iter(list(self._docs.values()))

    def __len__(self) -> int:
        return len(self._docs)

    def __repr__(self) -> str:
        return f"LexiconSet({sorted(self._docs)!r})"

    def get(self, nsid: str) -> LexiconDoc:
        """The document for ``nsid``; ``SchemaError`` if the set has none."""
        doc = self._docs.get(nsid)
        if doc is None:
            raise SchemaError(f"no Lexicon document {nsid!r} in the set{self._listing()}")
        return doc

    def get_def(self, ref: str) -> Mapping[str, Any]:
        """The definition a global ref (``nsid`` or ``nsid#name``) names."""
        try:
            nsid, name = split_ref(ref, "")
        except ValueError as e:
            raise SchemaError(f"bad ref {ref!r}: {e}") from None
        doc = self.get(nsid)
        d = doc.defs.get(name)
        if d is None:
            raise SchemaError(f"Lexicon {nsid!r} has no definition {name!r}")
        return d

    def record_def(self, nsid: str) -> Mapping[str, Any]:
        """The ``record`` definition (``main``) of a record collection's document."""
        doc = self.get(nsid)
        if doc.primary_type != "record":
            what = doc.primary_type or "no primary"
            raise SchemaError(f"Lexicon {nsid!r} defines {what} type, not a record type")
        main = doc.main
        assert main is not None
        return main

    def check_refs(self, *roots: str) -> None:
        """Resolve refs; raise one ``SchemaError`` listing every one that dangles.

        With ``roots`` (``nsid`` or ``nsid#name``), the refs reachable from those definitions;
        without, every ref of every document. A ref must name an existing definition, a
        ``ref`` may not point at a token or an endpoint, and union variants must be objects
        or records.
        """
        problems: list[str] = []
        if roots:
            refs = self._reachable(roots, problems)
        else:
            refs = [r for doc in self._docs.values() for r in doc.refs]
        for r in refs:
            why = self._resolve(r)
            if why:
                problems.append(f"Lexicon {r.doc!r}: {r.path}: {why}")
        if problems:
            shown = problems[:_MAX_LISTED]
            more = len(problems) - len(shown)
            tail = f"\n  ... and {more} more" if more else ""
            raise SchemaError("unresolved Lexicon refs:\n  " + "\n  ".join(shown) + tail)

    # --- internals ---------------------------------------------------------------------------

    def _listing(self) -> str:
        names = sorted(self._docs)
        if not names:
            return " (the set is empty)"
        shown = ", ".join(names[:_MAX_LISTED]) + (", ..." if len(names) > _MAX_LISTED else "")
        return f" (it has: {shown})"

    def _resolve(self, r: Ref) -> str | None:
        """Why ``r`` does not resolve to an allowed definition, or ``None`` if it does."""
        nsid, _, name = r.target.partition("#")
        doc = self._docs.get(nsid)
        if doc is None:
            return f"{r.kind} {r.target!r}: no Lexicon document {nsid!r} in the set"
        d = doc.defs.get(name)
        if d is None:
            return f"{r.kind} {r.target!r}: Lexicon {nsid!r} has no definition {name!r}"
        allowed = REF_TARGET_TYPES if r.kind == "ref" else UNION_TARGET_TYPES
        if d.get("type") not in allowed:
            return f"{r.kind} {r.target!r} points at a {d.get('type')}, which it cannot"
        return None

    def _reachable(self, roots: tuple[str, ...], problems: list[str]) -> list[Ref]:
        seen: set[str] = set()
        todo: list[str] = []
        for root in roots:
            try:
                nsid, name = split_ref(root, "")
            except ValueError as e:
                raise SchemaError(f"bad ref {root!r}: {e}") from None
            todo.append(f"{nsid}#{name}")
        root_targets = set(todo)
        out: list[Ref] = []
        while todo:
            target = todo.pop()
            if target in seen:
                continue
            seen.add(target)
            nsid, _, name = target.partition("#")
            doc = self._docs.get(nsid)
            if doc is None or name not in doc.defs:
                if target in root_targets:
                    problems.append(f"{target!r}: no such Lexicon definition{self._listing()}")
                continue  # reported against the ref that led here
            for r in doc.refs:
                if r.def_name == name:
                    out.append(r)
                    todo.append(r.target)
        return out

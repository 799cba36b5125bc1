"""What a pull hands the applier and what it says back: the change tuples, what was last
synced, the local edit queued for a record, the counts, and what ``on_pds_action`` sees."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Change", "Known", "Note", "OnPdsAction", "PullResult", "Queued", "RemoteRecord"]


@dataclass
class PullResult:
    commit: str | None = None  # the pulled commit's CID and rev
    rev: str | None = None
    unchanged: bool = False  # the repo had not moved since the last pull
    applied: int = 0  # rows created or updated from the repo
    deleted: int = 0  # rows deleted because their record left the repo
    merged: int = 0  # remote changes merged with a queued local edit
    conflicts: int = 0  # merges with a field changed on both sides
    rejected: int = 0  # records not applied (see _atsync_rejected)


@dataclass(frozen=True, slots=True)
class RemoteRecord:
    """What ``on_pds_action`` receives: one change in the repository, verified, in the
    transaction that applies it. ``op`` is create, update or delete (``record`` and ``cid``
    None); ``lexicon`` is the collection's Lexicon document when ``lexicons=`` has it."""

    did: str
    collection: str
    rkey: str
    op: str
    cid: str | None
    rev: str
    record: dict[str, Any] | None
    lexicon: Any = None


OnPdsAction = Callable[[RemoteRecord], None]


@dataclass(frozen=True, slots=True)
class Known:
    model: str
    key: str
    cid: str | None
    record: str | None  # JSON, as last synced


@dataclass(frozen=True, slots=True)
class Queued:
    seq: int
    op: str
    record: str | None
    cid: str | None
    first_action: str | None
    last_action: str | None


# One change to apply: collection, rkey, CID and record (None: deleted), and the record's
# JSON when decode_plain_record proved its data model (None: not yet checked).
Change = tuple[str, str, str | None, dict[str, Any] | None, str | None]


Note = tuple[str | None, ...]  # a row of _atsync_records (or _atsync_followed)

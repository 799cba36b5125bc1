"""Shared collections: one row per key, written by several people, merged field by field.

``Binding(nsid, shared=True)``: every participant (the user and the repositories they follow)
writes the *whole* row for a key into their own repository, as a record whose key is the
row's key, carrying a stamp per field:

    {"$type": "com.example.doc", "title": "…", "body": "…",
     "syncClocks": {"title": "01732990000123.00000/did:plc:alice", "body": "…/did:plc:bob"},
     "syncDeleted": "01732990001000.00002/did:plc:carol"}        (only once deleted)

A stamp is ``<hybrid logical clock>/<author DID>``: 14 digits of milliseconds, a dot and a
5-digit counter — so plain string order is time order — and the DID of whoever made that
change (copied unchanged by everyone who writes the field on without changing it). The row
for a key is, for each field, the value whose stamp is greatest among that key's records in
all the repositories; equal clocks fall to the greater DID. The greatest ``syncDeleted``
stamp erases every field stamped before it: with none left the row is deleted (a delete wins
over older edits); a later edit brings the row back with only what was written after the
delete. Every writer carries the latest delete on in its records. The rule only takes maxima,
so every participant holding the same records computes the same row, whatever order they
arrived in.

The clock is hybrid (``Hlc``): it never runs behind a stamp it has seen, so an edit made
after seeing someone else's orders after it even when the device's clock is behind theirs.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..atproto import data_from_json
from ._migrate import FOLLOWED
from ._outbox import OUTBOX, RECORDS
from ._outbox_views import FOLLOWED_SHARED_KEY

__all__ = ["CLOCKS", "DELETED", "Hlc", "merge_shared", "shared_records", "stamp_record"]

CLOCKS = "syncClocks"
DELETED = "syncDeleted"
_ZERO = "00000000000000.00000"
_MAX_MS, _MAX_COUNTER = 10**14 - 1, 10**5 - 1


@dataclass
class Hlc:
    """A hybrid logical clock: ``now()`` gives increasing stamps, ``observe()`` moves it past
    a stamp seen elsewhere. ``state`` ("ms.counter") is what the database keeps between runs."""

    wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000
    state: str = _ZERO

    def __post_init__(self) -> None:
        if not _valid(self.state):  # damaged where it was kept: any stamp seen moves it on
            self.state = _ZERO

    def now(self, did: str) -> str:
        ms, counter = _parse(self.state)
        wall = self.wall_ms()
        if wall > ms:
            self.state = _format(wall, 0)
        elif counter < _MAX_COUNTER:
            self.state = _format(ms, counter + 1)
        elif ms < _MAX_MS:
            # The counter is full (a clock far ahead was seen, and edits went on since): the
            # next millisecond, still after every stamp seen. Five digits again, so it stays
            # a valid stamp, which a sixth digit would not be.
            self.state = _format(ms + 1, 0)
        # else: the largest clock there is; only the DID can order after it
        return f"{self.state}/{did}"

    def observe(self, stamp: str) -> None:
        clock = stamp.partition("/")[0]
        if _valid(clock) and clock > self.state:
            self.state = clock


def _parse(clock: str) -> tuple[int, int]:
    ms, _, counter = clock.partition(".")
    return int(ms), int(counter)


def _format(ms: int, counter: int) -> str:
    return f"{ms:014d}.{counter:05d}"


def _valid(clock: str) -> bool:
    ms, dot, counter = clock.partition(".")
    return bool(dot) and len(ms) == 14 and len(counter) == 5 and (ms + counter).isdigit()


def valid_stamp(stamp: object) -> bool:
    if not isinstance(stamp, str):
        return False
    clock, slash, did = stamp.partition("/")
    return bool(slash) and _valid(clock) and did.startswith("did:")


def merge_shared(
    records: Iterable[Mapping[str, Any]], fields: Iterable[str]
) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The merged row's field values (None: deleted, or no record) and the stamps to write on
    (each live field's winning stamp, and under ``syncDeleted`` the latest delete), from one
    key's records in every repository. A field without a valid stamp in a record does not
    count from that record; one stamped before the latest delete is gone (None)."""
    best: dict[str, tuple[str, Any]] = {}
    deleted = ""
    seen = False
    for record in records:
        seen = True
        clocks = record.get(CLOCKS)
        if isinstance(clocks, Mapping):
            for field in fields:
                stamp = clocks.get(field)
                if not isinstance(stamp, str) or not valid_stamp(stamp):
                    continue
                if field not in best or stamp > best[field][0]:
                    best[field] = (stamp, record.get(field))
        tomb = record.get(DELETED)
        if isinstance(tomb, str) and valid_stamp(tomb) and tomb > deleted:
            deleted = tomb
    # A delete erases every field written before it: they no longer count, nor are copied on.
    live = {field: won for field, won in best.items() if won[0] > deleted}
    stamps = {field: stamp for field, (stamp, _) in live.items()}
    if deleted:
        stamps[DELETED] = deleted  # carried on by every later writer, like a field's
    if not seen or not live:
        return None, stamps
    return {field: value for field, (_, value) in live.items()}, stamps


def stamp_record(
    record: dict[str, Any],
    row: Mapping[str, Any] | None,
    before: Mapping[str, Any] | None,
    stamps: Mapping[str, str],
    fields: Iterable[str],
    stamp: Callable[[], str],
) -> dict[str, Any]:
    """``record`` (the row as a record, or ``{"$type": …}`` for a delete) with its stamps:
    a field that changed from ``before`` (the merged row) gets a new stamp, one that did not
    keeps the stamp it won with (a field never set has none); a delete (``row`` None) gets a
    ``syncDeleted`` stamp."""
    clocks: dict[str, str] = {}
    for field in fields:
        old = stamps.get(field)
        if row is None:  # a delete: the tombstone decides; the fields keep their stamps
            if old is not None:
                clocks[field] = old
        elif (before.get(field) if before is not None else None) != row.get(field):
            clocks[field] = stamp()  # changed here
        elif old is not None:
            clocks[field] = old  # as it won: copied on

    out = dict(record)
    out[CLOCKS] = clocks
    if row is None:
        out[DELETED] = stamp()
    elif DELETED in stamps:
        out[DELETED] = stamps[DELETED]  # the delete this row came back after
    return out


def shared_records(
    conn: sqlite3.Connection, model: str, collection: str, rkey: str
) -> list[dict[str, Any]]:
    """Every repository's record for one shared key as this device holds it: its own (the
    write still queued, if any, else what was last synced) and each followed repository's."""
    found: list[dict[str, Any]] = []
    queued = conn.execute(
        f"SELECT record FROM {OUTBOX} WHERE collection = ? AND rkey = ?", (collection, rkey)
    ).fetchone()
    if queued is not None and queued[0] is not None:
        found.append(_loads(queued[0]))
    else:
        row = conn.execute(
            f"SELECT record FROM {RECORDS} WHERE collection = ? AND rkey = ?", (collection, rkey)
        ).fetchone()
        if row is not None and row[0] is not None:
            found.append(_loads(row[0]))
    # By the model and key (a shared record's row key is its record key): indexed, where
    # collection and record key would scan every followed record.
    for (text,) in conn.execute(
        f"SELECT record FROM {FOLLOWED} WHERE model = ? AND key = ? AND {FOLLOWED_SHARED_KEY} "
        "AND collection = ? AND record IS NOT NULL",
        (model, rkey, collection),
    ):
        found.append(_loads(text))
    return found


def _loads(text: str) -> dict[str, Any]:
    value = data_from_json(json.loads(text))
    return value if isinstance(value, dict) else {}

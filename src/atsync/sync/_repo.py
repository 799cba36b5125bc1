"""Whose repository a pull works on: the user's own, or one they follow.

The same puller and applier serve both; what differs is written here once:

                      own repository                    a followed repository
    row key           the record key (or the key        ``at://<did>/<collection>/<rkey>``
                      it was pushed from)               (record keys are unique only within
                                                        one repository)
    last synced       ``_atsync_records``               ``_atsync_followed`` (with the DID)
    pull position     ``pulled_rev`` …                  ``follow:<did>:pulled_rev`` …
    local edits       merged, pushed                    refused: the rows are read-only
"""

from __future__ import annotations

from dataclasses import dataclass

from ._migrate import FOLLOWED
from ._outbox import RECORDS

__all__ = ["OWN", "Repo", "is_followed_key", "split_followed_key"]

_PREFIX = "at://"


@dataclass(frozen=True)
class Repo:
    """``did`` None: the user's own repository; a DID: a followed one."""

    did: str | None = None

    @property
    def own(self) -> bool:
        return self.did is None

    def key(self, collection: str, rkey: str) -> str:
        """The row key of a record this device has never seen."""
        return rkey if self.did is None else f"{_PREFIX}{self.did}/{collection}/{rkey}"

    def state(self, name: str) -> str:
        """The ``_atsync_sync_state`` key of a pull position value."""
        return name if self.did is None else f"follow:{self.did}:{name}"

    # -- the table of what was last synced ----------------------------------------------------

    @property
    def table(self) -> str:
        return RECORDS if self.did is None else FOLLOWED

    def where(self) -> tuple[str, tuple[str, ...]]:
        """The condition (and its parameters) that picks this repository's rows."""
        return ("1", ()) if self.did is None else ("did = ?", (self.did,))

    @property
    def upsert(self) -> str:
        columns = "collection, rkey, model, key, cid, record"
        if self.did is None:
            return (
                f"INSERT INTO {RECORDS} ({columns}) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (collection, rkey) DO UPDATE SET "
                "cid = excluded.cid, record = excluded.record"
            )
        return (
            f"INSERT INTO {FOLLOWED} (did, {columns}) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (did, collection, rkey) DO UPDATE SET "
            "cid = excluded.cid, record = excluded.record"
        )

    def upsert_values(
        self, collection: str, rkey: str, model: str, key: str, cid: str, record: str | None
    ) -> tuple[str | None, ...]:
        values = (collection, rkey, model, key, cid, record)
        return values if self.did is None else (self.did, *values)

    def delete(self) -> tuple[str, tuple[str, ...]]:
        """``DELETE`` of one record (its parameters end with collection, rkey)."""
        if self.did is None:
            return f"DELETE FROM {RECORDS} WHERE collection = ? AND rkey = ?", ()
        return f"DELETE FROM {FOLLOWED} WHERE did = ? AND collection = ? AND rkey = ?", (self.did,)


OWN = Repo()


def is_followed_key(key: str) -> bool:
    """Whether a row key has the shape of a followed repository's row (an AT URI)."""
    return key.startswith(_PREFIX)


def split_followed_key(key: str) -> tuple[str, str, str] | None:
    """``(did, collection, rkey)`` of a followed row's key, or None."""
    if not key.startswith(_PREFIX):
        return None
    parts = key[len(_PREFIX) :].split("/")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None

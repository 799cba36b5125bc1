"""Helpers shared by the tests that run sync engines: waiting on a status, and reading a
device's notes and the repository's records in one shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from atsync.app import App
from atsync.atproto import Create, IdentityResolver, Session, TidClock, XrpcClient, login
from atsync.sync import ATSync, SyncStatus

__all__ = [
    "ForgetfulResolver",
    "as_rows",
    "collection_for",
    "remote",
    "rows",
    "session_of",
    "wait_status",
]


async def wait_status(
    sync: ATSync, predicate: Callable[[SyncStatus], bool], within: float = 10
) -> SyncStatus:
    """The first status (the current one included) that ``predicate`` accepts."""
    with anyio.fail_after(within):
        async for status in sync.status_changes():
            if predicate(status):
                return status
    raise AssertionError("unreachable")


def collection_for(request: Any, prefix: str) -> str:
    """A collection of the test's own (``prefix.<the test's name>``): tests share a PDS."""
    name = "".join(c for c in request.node.name if c.isalnum())[:40]
    return f"{prefix}.{name.lower()}"


async def session_of(pds: Any, handle: str) -> Session:
    account = pds.accounts[handle]
    return await login(account.did, account.password, pds.pds_url)


def rows(app: App) -> dict[str, dict[str, Any]]:
    """A device's notes, by key."""
    return {r["id"]: dict(r) for r in app.db.query("notes")}


async def remote(session: Session, collection: str) -> dict[str, dict[str, Any]]:
    """The repository's records of ``collection``, by record key."""
    async with XrpcClient(session=session) as client:
        return {v.rkey: v.value async for v in client.iter_records(session.did, collection)}


def as_rows(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Note records in the shape of rows."""
    return {
        k: {"id": k, "title": v["title"], "body": v.get("body"), "n": v["n"]}
        for k, v in records.items()
    }


class ForgetfulResolver(IdentityResolver):
    """An identity resolver that says when the engine drops an account's cached identity."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.forgotten: list[str] = []
        self.forgot = anyio.Event()

    def invalidate(self, identifier: str) -> None:
        super().invalidate(identifier)
        self.forgotten.append(identifier)
        self.forgot.set()

    async def forgets(self, did: str, since: int) -> None:
        """Until ``did`` is forgotten after the first ``since`` entries of ``forgotten`` (a
        login forgets the account's identity too: only what came after counts)."""
        while did not in self.forgotten[since:]:
            self.forgot = anyio.Event()
            await self.forgot.wait()


async def write_many(session: Session, collection: str, count: int) -> None:
    """``count`` records ``{"title": "note <i>", "n": i}`` in the account's repository, 200
    per ``applyWrites`` (TID record keys, in order)."""
    clock = TidClock()
    async with XrpcClient(session=session) as client:
        for first in range(0, count, 200):
            writes = [
                Create(collection, {"$type": collection, "title": f"note {i}", "n": i},
                       rkey=clock.next())
                for i in range(first, min(count, first + 200))
            ]  # fmt: skip
            await client.apply_writes(session.did, writes)

"""Shared collections against the real PDS: three accounts (one on a second host) share a
collection, each following the other two; each edits the same document — different fields and
the same field — before syncing; all three end with one row, equal to the merge rule applied to
the three records on the PDS; a delete reaches everyone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync.app import ActionContext, App, Contract
from atsync.atproto import IdentityResolver, Session, login
from atsync.sync import ATSync, Binding, Manual
from atsync.sync._shared import merge_shared
from pds_fixtures import MakePDS
from sync_devices import remote

contract = Contract(
    models={"docs": {"id": "primary", "title": "string?", "body": "string?", "n": "integer?"}}
)


@contract.action
def create(ctx: ActionContext, key: str, title: str, body: str) -> None:
    ctx.db.set("docs", {"id": key, "title": title, "body": body, "n": 0})


@contract.action
def edit(ctx: ActionContext, key: str, **fields: Any) -> None:
    ctx.db.update("docs", {"id": key, **fields})


@contract.action
def remove(ctx: ActionContext, key: str) -> None:
    ctx.db.delete("docs", key)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def device(
    path: Path,
    collection: str,
    session: Session,
    resolver: IdentityResolver,
    others: list[str],
    *,
    defaults: bool = False,
) -> AsyncIterator[tuple[App, ATSync]]:
    """One account's app: ``push=Manual(), pull=Manual()``, or the engine's defaults."""
    strategies: dict[str, Any] = {} if defaults else {"push": Manual(), "pull": Manual()}
    with App.open(path, contract) as app:
        sync = ATSync(
            app,
            bindings={"docs": Binding(collection, shared=True)},
            session=session,
            identity=resolver,
            follow=others,
            **strategies,
        )
        async with sync:
            yield app, sync
        sync.close()


def row(app: App, key: str) -> dict[str, Any] | None:
    found = app.db.get("docs", key)
    return None if found is None else dict(found)


async def sync_all(devices: list[tuple[App, ATSync]]) -> None:
    """Everyone pushes, then everyone pulls (everyone's repository)."""
    with anyio.fail_after(60):
        for _, sync in devices:
            sync.push_now()
            await sync.wait_for_idle()
        for _, sync in devices:
            await sync.wait_pulled()


@pytest.mark.anyio
async def test_three_accounts_on_two_hosts_converge_on_a_shared_document(
    dev_pds: Any, make_pds: MakePDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = "test.atsync.shared." + "".join(c for c in request.node.name if c.isalnum())[:30]
    second = make_pds(plc_url=dev_pds.plc_url, accounts=[("carol.test", "carol-pw-1")])
    sessions = [
        await login(dev_pds.accounts[h].did, dev_pds.accounts[h].password, dev_pds.pds_url)
        for h in ("alice.test", "bob.test")
    ]
    carol = second.accounts["carol.test"]
    sessions.append(await login(carol.did, carol.password, second.pds_url))
    dids = [s.did for s in sessions]
    async with (
        IdentityResolver(plc_url=dev_pds.plc_url, allow_insecure_localhost=True) as resolver,
        AsyncExitStack() as stack,
    ):
        devices = []
        for i, s in enumerate(sessions):
            others = [d for d in dids if d != s.did]
            path = tmp_path / f"{i}.db"
            devices.append(
                await stack.enter_async_context(device(path, collection, s, resolver, others))
            )
        (a, _), (b, _), (c, _) = devices
        a.actions.create("d1", "first title", "first body")
        await sync_all(devices)
        assert row(a, "d1") == row(b, "d1") == row(c, "d1")
        assert row(c, "d1") == {"id": "d1", "title": "first title", "body": "first body", "n": 0}

        # Offline: alice and carol change the title, bob the body, carol n.
        a.actions.edit("d1", title="alice's title")
        b.actions.edit("d1", body="bob's body")
        c.actions.edit("d1", title="carol's title", n=3)
        await sync_all(devices)
        records = [(await remote(s, collection))["d1"] for s in sessions]
        # The title whose stamp is greater wins: carol's edit came later, but within the same
        # millisecond the two clocks tie and the greater DID decides.
        stamps = {r["title"]: r["syncClocks"]["title"] for r in records}
        title = max(("alice's title", "carol's title"), key=stamps.__getitem__)
        expected = {"id": "d1", "title": title, "body": "bob's body", "n": 3}
        assert row(a, "d1") == row(b, "d1") == row(c, "d1") == expected
        # ... which is the merge rule applied to the three records on the PDS.
        merged, _ = merge_shared(records, ("title", "body", "n"))
        assert merged == {k: v for k, v in expected.items() if k != "id"}
        for _, sync in devices:
            assert sync.status.pending == 0 and sync.status.rejected == 0
        # A shared row's origin is this device's own record once it wrote the row.
        origin = devices[2][1].origin("docs", "d1")
        assert origin is not None and origin.did == dids[2] and origin.uri.endswith("/d1")

        # Carol stops following bob: the document stays, made from alice's and her records.
        (_, sync_c) = devices[2]
        assert sync_c.unfollow(dids[1]) is True
        assert row(c, "d1") == {**expected, "body": "first body"}  # bob's body was his
        await sync_c.follow(dids[1])
        with anyio.fail_after(30):
            await sync_c.wait_pulled()
        assert row(c, "d1") == expected

        # A delete by bob reaches everyone (his record carries the tombstone).
        b.actions.remove("d1")
        await sync_all(devices)
        assert row(a, "d1") is None and row(b, "d1") is None and row(c, "d1") is None
        # An edit after the delete brings the document back, with only what was written since.
        a.actions.create("d1", "again", "from scratch")
        await sync_all(devices)
        again = {"id": "d1", "title": "again", "body": "from scratch", "n": 0}
        assert row(a, "d1") == row(b, "d1") == row(c, "d1") == again


async def until(app: App, predicate: Any, within: float) -> None:
    """Until ``predicate(row(app, "d1"))`` holds, checked after every change to the docs."""
    changed = [anyio.Event()]
    with app.db.subscribe("docs", lambda _rows: changed[0].set()):
        with anyio.fail_after(within):
            while not predicate(row(app, "d1")):
                await changed[0].wait()
                changed[0] = anyio.Event()


@pytest.mark.anyio
async def test_a_shared_document_syncs_with_the_default_strategies(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """As the docs show it — the engine's defaults (Debounce push, Live pull), no push_now, no
    wait_pulled: an edit on one side reaches the other within seconds."""
    collection = "test.atsync.shared.defaults"
    sessions = [
        await login(dev_pds.accounts[h].did, dev_pds.accounts[h].password, dev_pds.pds_url)
        for h in ("alice.test", "bob.test")
    ]
    alice, bob = sessions
    async with (
        IdentityResolver(plc_url=dev_pds.plc_url, allow_insecure_localhost=True) as resolver,
        device(tmp_path / "a.db", collection, alice, resolver, [bob.did], defaults=True) as (a, _),
        device(tmp_path / "b.db", collection, bob, resolver, [alice.did], defaults=True) as (b, _),
    ):
        a.actions.create("d1", "from alice", "her body")
        await until(b, lambda doc: doc is not None and doc["title"] == "from alice", 15)
        b.actions.edit("d1", body="bob's body")
        await until(a, lambda doc: doc is not None and doc["body"] == "bob's body", 15)
        assert row(a, "d1") == row(b, "d1")

"""The push half against the real PDS: offline work, login, push; coalescing; dead letters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync.app import ActionContext, App, Contract
from atsync.atproto._session import Session, login
from atsync.atproto._xrpc import XrpcClient
from atsync.sync import ATSync, Binding, Immediate, Manual, RateBudget

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


contract = Contract(
    models={"notes": {"id": "primary", "title": "string", "body": "string?", "n": "integer"}}
)


@contract.action
def put_note(ctx: ActionContext, key: str, title: str, n: int = 0) -> None:
    ctx.db.set("notes", {"id": key, "title": title, "n": n})


@contract.action
def drop_note(ctx: ActionContext, key: str) -> None:
    ctx.db.delete("notes", key)


def collection_for(request: pytest.FixtureRequest) -> str:
    # Tests share one PDS account: each gets a collection of its own.
    name = "".join(c for c in request.node.name if c.isalnum())[:40]
    return f"test.atsync.{name.lower()}"


async def remote_records(session: Session, collection: str) -> dict[str, dict[str, Any]]:
    async with XrpcClient(session=session) as client:
        return {
            view.rkey: view.value async for view in client.iter_records(session.did, collection)
        }


async def alice(dev_pds: Any) -> Session:
    account = dev_pds.accounts["alice.test"]
    return await login(account.did, account.password, dev_pds.pds_url)


async def test_offline_work_is_pushed_after_login_in_order(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = collection_for(request)
    session_box: list[Session | None] = [None]
    with App.open(tmp_path / "a.db", contract) as app:
        sync = ATSync(
            app,
            pull=Manual(),
            bindings={"notes": Binding(collection)},
            session=lambda: session_box[0],
            push=Immediate(),
            budget=RateBudget.off(),
        )
        async with sync:
            for i in range(5):
                app.actions.put_note(f"n{i}", f"title {i}", i)
            app.actions.put_note("n1", "title 1 edited", 10)
            app.actions.drop_note("n4")
            app.actions.put_note("gone", "x")
            app.actions.drop_note("gone")
            # Coalesced: n0..n3 are queued; n4 and "gone" never reached the PDS, so nothing.
            with anyio.fail_after(10):
                async for status in sync.status_changes():
                    if status.state == "needs_auth" and status.pending == 4:
                        break
            session_box[0] = await alice(dev_pds)
            sync.push_now()
            with anyio.fail_after(30):
                status = await sync.wait_for_idle()
            assert status.has_synced and status.pending == 0 and status.failed == 0
        remote = await remote_records(session_box[0], collection)
        assert sorted(remote) == ["n0", "n1", "n2", "n3"]
        assert remote["n1"] == {"$type": collection, "title": "title 1 edited", "n": 10}
        assert app.db.count("notes") == 4


async def test_bad_record_fails_the_action_and_is_never_queued(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with App.open(tmp_path / "b.db", contract) as app:
        sync = ATSync(
            app, pull=Manual(), bindings={"notes": Binding(collection_for(request))}, push=Manual()
        )
        with pytest.raises(Exception, match="not a valid atproto record key"):
            app.actions.put_note("bad key with spaces", "t")
        assert app.db.count("notes") == 0
        assert sync.outbox.counts() == (0, 0, 0)


def test_blocking_facade_pushes_from_plain_code(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from atsync.app import ATPSigner
    from atsync.atproto._session import MemorySessionStore
    from atsync.sync import SyncThread

    collection = collection_for(request)
    bob = dev_pds.accounts["bob.test"]
    signer = ATPSigner(store=MemorySessionStore())
    with App.open(tmp_path / "c.db", contract, signer=signer) as app:
        with SyncThread(
            app, pull=Manual(), bindings={"notes": Binding(collection)}, push=Immediate()
        ) as sync:
            first = app.actions.put_note("before-login", "offline", 1)
            signer.login("bob.test", bob.password, dev_pds.pds_url)
            sync.push_now()
            sync.wait_pushed(first.id, timeout=30)
            status = sync.wait_for_idle(timeout=30)
            assert status.did == bob.did and status.pending == 0

        async def remote() -> dict[str, dict[str, Any]]:
            assert signer.session is not None
            return await remote_records(signer.session, collection)

        assert anyio.run(remote) == {
            "before-login": {"$type": collection, "title": "offline", "n": 1}
        }


async def test_rebuild_and_replays_do_not_touch_the_outbox(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with App.open(tmp_path / "r.db", contract) as app:
        sync = ATSync(
            app, pull=Manual(), bindings={"notes": Binding(collection_for(request))}, push=Manual()
        )
        for i in range(3):
            app.actions.put_note(f"r{i}", "t", i)
        app.actions.drop_note("r2")
        before = app.model_db.execute("select * from _atsync_outbox order by seq").fetchall()
        assert [row[3] for row in before] == ["create", "create"]
        assert app.rebuild() == 4
        after = app.model_db.execute("select * from _atsync_outbox order by seq").fetchall()
        assert after == before
        sync.close()


async def test_per_binding_strategies(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    two = Contract(
        models={
            "fast": {"id": "primary", "v": "integer"},
            "slow": {"id": "primary", "v": "integer"},
        }
    )

    @two.action
    def both(ctx: ActionContext, key: str, v: int) -> None:
        ctx.db.set("fast", {"id": key, "v": v})
        ctx.db.set("slow", {"id": key, "v": v})

    base = collection_for(request)
    session = await alice(dev_pds)
    with App.open(tmp_path / "s.db", two) as app:
        sync = ATSync(
            app,
            pull=Manual(),
            bindings={
                "fast": Binding(f"{base}.fast"),
                "slow": Binding(f"{base}.slow", strategy=Manual()),
            },
            session=session,
            push=Immediate(),
            budget=RateBudget.off(),
        )
        async with sync:
            app.actions.both("k1", 1)
            with anyio.fail_after(30):
                async for status in sync.status_changes():
                    # Held for push_now(): waiting, never shown as idle.
                    if status.pending == 1 and status.state == "waiting":
                        assert status.waiting_reason == "manual"
                        break
            assert list(sync.outbox.pending_by_collection()) == [f"{base}.slow"]
            assert list(await remote_records(session, f"{base}.fast")) == ["k1"]
            assert await remote_records(session, f"{base}.slow") == {}
            sync.push_now()
            with anyio.fail_after(30):
                await sync.wait_for_idle()
            assert list(await remote_records(session, f"{base}.slow")) == ["k1"]


def note_lexicon(nsid: str) -> dict[str, Any]:
    return {
        "lexicon": 1,
        "id": nsid,
        "defs": {
            "main": {
                "type": "record",
                "key": "any",
                "record": {
                    "type": "object",
                    "required": ["title", "n"],
                    "properties": {
                        "title": {"type": "string", "maxLength": 12},
                        "body": {"type": "string"},
                        "n": {"type": "integer", "minimum": 0},
                    },
                },
            }
        },
    }


async def test_records_are_checked_against_the_lexicon_before_the_outbox(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from atsync._errors import RecordError, SchemaError

    collection = collection_for(request)
    with App.open(tmp_path / "l.db", contract) as app:
        with pytest.raises(SchemaError, match="no Lexicon for it"):
            ATSync(
                app,
                pull=Manual(),
                bindings={"notes": Binding(collection)},
                lexicons=[note_lexicon("a.b.c")],
            )
        sync = ATSync(
            app,
            pull=Manual(),
            bindings={"notes": Binding(collection)},
            lexicons=[note_lexicon(collection)],
            session=await alice(dev_pds),
            push=Immediate(),
            budget=RateBudget.off(),
        )
        app.actions.put_note("ok", "short", 1)
        with pytest.raises(RecordError, match="maxLength"):
            app.actions.put_note("long", "a title far too long", 1)
        with pytest.raises(RecordError, match="minimum"):
            app.actions.put_note("neg", "t", -1)
        assert app.db.get("notes", "long") is None and app.db.get("notes", "neg") is None
        assert sync.outbox.counts() == (1, 0, 0)
        async with sync:
            with anyio.fail_after(30):
                await sync.wait_for_idle()
        assert list(await remote_records(await alice(dev_pds), collection)) == ["ok"]


async def test_logging_in_as_another_account_is_refused(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """One database, one repository: after syncing with alice, a login as bob is refused
    before it is adopted, and alice's session stays — in memory and in the store."""
    from atsync import SignerError
    from atsync.app import ATPSigner
    from atsync.atproto import MemorySessionStore

    collection = collection_for(request)
    store = MemorySessionStore()
    signer = ATPSigner(store=store)
    alice_pw = dev_pds.accounts["alice.test"].password
    bob_pw = dev_pds.accounts["bob.test"].password
    with App.open(tmp_path / "one.db", contract, signer=signer) as app:
        sync = ATSync(app, pull=Manual(), bindings={"notes": Binding(collection)}, push=Immediate())
        async with sync:
            await signer.login_async("alice.test", alice_pw, dev_pds.pds_url)
            app.actions.put_note("a", "for alice")
            with anyio.fail_after(30):
                await sync.wait_for_idle()
            alice_session = signer.session
            with pytest.raises(SignerError, match="syncs with did:plc:"):
                await signer.login_async("bob.test", bob_pw, dev_pds.pds_url)
            assert signer.session is alice_session
            stored = store.load(f"atsync-session-{signer.key_did}")
            assert stored is not None and stored["did"] == alice_session.did
            app.actions.put_note("b", "still alice's")
            with anyio.fail_after(30):
                status = await sync.wait_for_idle()
            assert status.did == alice_session.did
        assert sorted(await remote_records(alice_session, collection)) == ["a", "b"]
        sync.close()

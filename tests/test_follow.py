"""Following other people's repositories, against the real reference PDS: their records arrive
read-only under AT URI keys, with their origin; their edits and deletes follow; an edit here
fails and reaches no repository; a forged repository is refused; unfollow removes the rows; an
account on a second PDS host (sharing the PLC directory) works like one on the first."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync import ActionError, InvalidSyntaxError, VerificationError
from atsync.app import ActionContext, App, Contract
from atsync.atproto import (
    IdentityResolver,
    Session,
    XrpcClient,
    generate_keypair,
)
from atsync.sync import ATSync, Binding, Immediate, Live, Manual, Origin, RemoteRecord
from pds_fixtures import MakePDS
from sync_devices import ForgetfulResolver, remote, session_of, write_many
from sync_devices import collection_for as shared_collection_for

contract = Contract(
    models={"notes": {"id": "primary", "title": "string", "body": "string?", "n": "integer"}}
)


@contract.action
def put(ctx: ActionContext, key: str, title: str) -> None:
    ctx.db.set("notes", {"id": key, "title": title, "n": 0})


@contract.action
def edit(ctx: ActionContext, key: str, title: str) -> None:
    ctx.db.update("notes", {"id": key, "title": title})


@contract.action
def drop(ctx: ActionContext, key: str) -> None:
    ctx.db.delete("notes", key)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def collection_for(request: pytest.FixtureRequest) -> str:
    return shared_collection_for(request, "test.atsync.follow")


async def write(session: Session, collection: str, rkey: str, **fields: Any) -> str:
    async with XrpcClient(session=session) as client:
        result = await client.put_record(
            session.did, collection, rkey, {"$type": collection, "n": 0, **fields}
        )
        return str(result.cid)


async def delete(session: Session, collection: str, rkey: str) -> None:
    async with XrpcClient(session=session) as client:
        await client.delete_record(session.did, collection, rkey)


@asynccontextmanager
async def device(
    path: Path, collection: str, session: Session, identity: Any, **options: Any
) -> AsyncIterator[tuple[App, ATSync]]:
    with App.open(path, contract) as app:
        options.setdefault("pull", Manual())
        sync = ATSync(
            app,
            bindings={"notes": Binding(collection)},
            session=session,
            push=Immediate(),
            identity=identity,
            **options,
        )
        async with sync:
            yield app, sync
        sync.close()


def rows(app: App) -> dict[str, dict[str, Any]]:
    return {r["id"]: dict(r) for r in app.db.query("notes")}


async def pulled(sync: ATSync) -> None:
    """``wait_pulled()`` alone: it includes the followed repositories (as a user writes it)."""
    with anyio.fail_after(30):
        await sync.wait_pulled()


@pytest.mark.anyio
async def test_a_followed_repository_arrives_read_only_and_follows_its_edits(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    erin, dan = await session_of(dev_pds, "erin.test"), await session_of(dev_pds, "dan.test")
    cids = {rkey: await write(dan, collection, rkey, title=f"dan {rkey}") for rkey in ("a", "b")}
    async with device(
        tmp_path / "erin.db", collection, erin, resolver, pull=Live(fallback=60)
    ) as (app, sync):  # fmt: skip
        app.actions.put("mine", "erin's own")
        assert await sync.follow(dan.did) == dan.did
        assert sync.following == [dan.did]
        await pulled(sync)
        uri = f"at://{dan.did}/{collection}/a"
        state = rows(app)
        assert set(state) == {"mine", uri, f"at://{dan.did}/{collection}/b"}
        assert state[uri]["title"] == "dan a"
        assert sync.origin("notes", uri) == Origin(dan.did, uri, cids["a"])
        shown = await anyio.run_process(
            [sys.executable, "-m", "atsync", "status", "--db", str(tmp_path / "erin.db"), "--json"]
        )
        (followed,) = json.loads(shown.stdout)["following"]
        assert (followed["did"], followed["records"]) == (dan.did, 2)
        assert followed["rev"] is not None and followed["last_pulled_at"] is not None

        # Dan edits one, deletes the other: both reach erin's database live (no pull_now()).
        cids["a"] = await write(dan, collection, "a", title="dan a, edited")
        await delete(dan, collection, "b")
        await wait_for(app, lambda state: set(state) == {"mine", uri}, within=15)
        assert rows(app)[uri]["title"] == "dan a, edited"
        assert sync.origin("notes", uri) == Origin(dan.did, uri, cids["a"])

        # Erin cannot edit or delete dan's row: refused in the action, nothing queued.
        for attempt in (lambda: app.actions.edit(uri, "hijacked"), lambda: app.actions.drop(uri)):
            with pytest.raises(ActionError, match="read-only"):
                attempt()
        assert rows(app)[uri]["title"] == "dan a, edited"
        with anyio.fail_after(30):
            await sync.wait_for_idle()  # erin's own note is pushed; nothing else was queued
        assert sync.status.pending == 0
        own = sync.origin("notes", "mine")
        assert own is not None and own.did == erin.did
        assert own.uri == f"at://{erin.did}/{collection}/mine"
        mine = await remote(erin, collection)
        assert set(mine) == {"mine"}  # nothing of dan's went into erin's repository

        # The log holds dan's rows too: a rebuild gives the same state.
        state = rows(app)
        assert app.rebuild() == len(app.log) and rows(app) == state

        assert sync.unfollow(dan.did) is True and sync.following == []
        assert set(rows(app)) == {"mine"}
        assert sync.origin("notes", uri) is None
        assert sync.unfollow(dan.did) is False
        assert app.rebuild() == len(app.log) and set(rows(app)) == {"mine"}


@pytest.mark.anyio
async def test_a_forged_followed_repository_is_refused_and_nothing_applied(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    alice, bob = await session_of(dev_pds, "alice.test"), await session_of(dev_pds, "bob.test")
    await write(bob, collection, "x", title="bob x")
    impostor = generate_keypair("k256").did

    class ImpostorForBob:
        """Bob's DID document as an attacker would serve it: another signing key."""

        async def resolve(self, did: str, **options: Any) -> Any:
            identity = await resolver.resolve(did, **options)
            return replace(identity, signing_key=impostor) if did == bob.did else identity

    async with device(
        tmp_path / "alice.db", collection, alice, ImpostorForBob(), follow=[bob.did]
    ) as (app, sync):
        await pulled(sync)
        assert rows(app) == {}
        assert "verification" in sync.follow_errors[bob.did]
        rejected = app.model_db.execute(
            "select did, reason from _atsync_rejected where did = ?", (bob.did,)
        ).fetchall()
        assert rejected == [(bob.did, "VerificationError")]
        assert sync.status.download_error is None  # alice's own sync is not affected


@pytest.mark.anyio
async def test_a_did_no_resolver_takes_is_refused_at_once_and_one_not_found_is_said(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    alice = await session_of(dev_pds, "alice.test")
    malformed = [
        "did:plc:UPPERCASE0000000000000000",  # not 24 of a-z 2-7
        "did:plc:short",
        "did:web:example.com:user:alice",  # path-based did:web: not in atproto
        "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme",  # not a repository's DID
    ]
    with App.open(tmp_path / "alice.db", contract) as app:
        for did in malformed:
            with pytest.raises(InvalidSyntaxError, match="did:"):
                ATSync(app, bindings={"notes": Binding(collection)}, session=alice, follow=[did])
        followed = app.model_db.execute("select count(*) from _atsync_follows").fetchone()
        assert followed == (0,)  # nothing of a refused list was kept
    missing = "did:plc:" + "a" * 24  # well formed, in no PLC directory
    async with device(tmp_path / "alice.db", collection, alice, resolver) as (app, sync):
        for did in malformed:
            with pytest.raises(InvalidSyntaxError, match="did:"):
                await sync.follow(did)
        assert sync.following == []
        assert await sync.follow(missing) == missing
        await pulled(sync)  # returns: the failure is said, not waited through
        assert sync.follow_errors[missing].startswith("its identity does not resolve: ")
        assert "404" in sync.follow_errors[missing]
        rejected = app.model_db.execute("select count(*) from _atsync_rejected").fetchone()
        assert rejected == (0,)  # no repository was read, so no record of it was refused
        assert sync.status.download_error is None


@pytest.mark.anyio
async def test_unfollow_in_the_middle_of_a_backfill_leaves_nothing_of_that_repository(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    alice, bob = await session_of(dev_pds, "alice.test"), await session_of(dev_pds, "bob.test")
    await write_many(bob, collection, 2400)  # more than one applied chunk
    first_rows = anyio.Event()
    seen: list[int] = []

    def arrived(found: list[Any]) -> None:
        seen.append(len(found))
        if found:
            first_rows.set()

    async with device(tmp_path / "alice.db", collection, alice, resolver) as (app, sync):
        sub = app.db.subscribe("notes", arrived, initial=False)
        await sync.follow(bob.did)
        with anyio.fail_after(30):
            await first_rows.wait()  # the backfill is under way: its first chunk is in
        assert sync.unfollow(bob.did) is True
        await pulled(sync)
        sub.cancel()
        assert 0 < seen[0] < 2400  # it was stopped partway
        assert sync.following == []
        assert rows(app) == {}
        db = app.model_db
        assert db.execute("select count(*) from _atsync_followed").fetchone() == (0,)
        state = db.execute(
            "select count(*) from _atsync_sync_state where key like ?", (f"follow:{bob.did}:%",)
        ).fetchone()
        assert state == (0,)


@pytest.mark.anyio
async def test_a_screen_watching_every_row_sees_a_backfill_arrive_and_all_of_it_at_the_end(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """The live query is told at a pace during a backfill (not after each chunk, which
    re-read the whole table per chunk), and completely before ``wait_pulled()`` returns."""
    collection = collection_for(request)
    alice, bob = await session_of(dev_pds, "alice.test"), await session_of(dev_pds, "bob.test")
    await write_many(bob, collection, 3500)  # four applied chunks
    seen: list[int] = []
    async with device(tmp_path / "alice.db", collection, alice, resolver) as (app, sync):
        app.db.subscribe("notes", lambda found: seen.append(len(found)), initial=False)
        await sync.follow(bob.did)
        await pulled(sync)
        assert seen[0] >= 1000  # the first chunk at once
        assert seen[-1] == 3500  # and every row by the time wait_pulled() returned
        assert 1 <= len(seen) <= 4 and seen == sorted(seen)


@pytest.mark.anyio
async def test_a_screen_watching_every_row_has_all_of_a_new_devices_backfill_when_pulled(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """The same for a new device of the user's own account, waited for as docs/pull.md's
    snippet waits (``wait_pulled()``, the default strategies)."""
    collection = collection_for(request)
    alice = await session_of(dev_pds, "alice.test")
    await write_many(alice, collection, 2500)  # three applied chunks
    seen: list[int] = []
    with App.open(tmp_path / "new-device.db", contract) as app:
        app.db.subscribe("notes", lambda found: seen.append(len(found)), initial=False)
        sync = ATSync(app, bindings={"notes": Binding(collection)}, session=alice,
                      identity=resolver)  # fmt: skip
        async with sync:
            with anyio.fail_after(60):
                await sync.wait_pulled()
            assert len(app.db.query("notes")) == 2500
            assert seen[-1] == 2500  # told of every row by the time wait_pulled() returned
        sync.close()


@pytest.mark.anyio
async def test_a_database_failing_under_a_followed_repository_does_not_end_the_engine(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """The database refuses bob's rows (a trigger stands in for a damaged disk): said for bob,
    while alice's own sync goes on; once the database takes them, the next pull brings them."""
    collection = collection_for(request)
    alice, bob = await session_of(dev_pds, "alice.test"), await session_of(dev_pds, "bob.test")
    await write(bob, collection, "x", title="bob x")
    async with device(tmp_path / "alice.db", collection, alice, resolver) as (app, sync):
        app.model_db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON notes WHEN NEW.id LIKE 'at://%' "
            "BEGIN SELECT RAISE(ABORT, 'disk I/O error, as it were'); END"
        )
        await sync.follow(bob.did)
        await pulled(sync)  # a failed pull counts: it returns
        assert "disk I/O error, as it were" in sync.follow_errors[bob.did]
        assert rows(app) == {}
        app.actions.put("mine", "alice's own")  # the engine is still there
        with anyio.fail_after(30):
            await sync.wait_for_idle()
        assert set(await remote(alice, collection)) == {"mine"}

        app.model_db.execute("DROP TRIGGER refuse")
        await pulled(sync)
        assert set(rows(app)) == {"mine", f"at://{bob.did}/{collection}/x"}
        assert bob.did not in sync.follow_errors


@pytest.mark.anyio
async def test_an_account_on_a_second_host_is_followed_like_one_on_the_first(
    dev_pds: Any,
    make_pds: MakePDS,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    resolver: IdentityResolver,
) -> None:
    collection = collection_for(request)
    second = make_pds(plc_url=dev_pds.plc_url, accounts=[("dan.test", "dan-pw-1")])
    dan = await session_of(second, "dan.test")
    alice = await session_of(dev_pds, "alice.test")
    await write(dan, collection, "d1", title="dan's note")
    async with device(tmp_path / "alice.db", collection, alice, resolver) as (app, sync):
        await sync.follow(dan.did)
        await pulled(sync)
        uri = f"at://{dan.did}/{collection}/d1"
        assert rows(app)[uri]["title"] == "dan's note"
        origin = sync.origin("notes", uri)
        assert origin is not None and origin.did == dan.did
        await write(dan, collection, "d1", title="dan's note, edited")
        sync.pull_now()
        await pulled(sync)
        assert rows(app)[uri]["title"] == "dan's note, edited"


async def wait_for(app: App, predicate: Any, within: float) -> None:
    """Until ``predicate(rows(app))`` holds: checked after every change to the notes."""
    changed = [anyio.Event()]
    with app.db.subscribe("notes", lambda _rows: changed[0].set()):
        with anyio.fail_after(within):
            while not predicate(rows(app)):
                await changed[0].wait()
                changed[0] = anyio.Event()


@pytest.mark.anyio
async def test_followed_repositories_are_live_on_the_users_host_and_on_another(
    dev_pds: Any,
    make_pds: MakePDS,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    resolver: IdentityResolver,
) -> None:
    """With Live(fallback=60) nothing is polled within the test: what arrives, the event
    streams brought — alice's own host's (bob lives there) and the second host's (dan)."""
    collection = collection_for(request)
    second = make_pds(plc_url=dev_pds.plc_url, accounts=[("dan.test", "dan-pw-1")])
    alice, bob = await session_of(dev_pds, "alice.test"), await session_of(dev_pds, "bob.test")
    dan = await session_of(second, "dan.test")
    live = {"pull": Live(fallback=60)}
    for session in (bob, dan):
        await write(session, collection, "before", title="written before the follow")
    async with device(tmp_path / "alice.db", collection, alice, resolver, **live) as (app, sync):
        # As the docs show it: follow(), then the records arrive (no pull_now, no wait_pulled).
        await sync.follow(bob.did)
        await sync.follow(dan.did)
        before = {f"at://{s.did}/{collection}/before" for s in (bob, dan)}
        await wait_for(app, lambda state: before <= set(state), within=15)
        for session, rkey in ((bob, "from-bob"), (dan, "from-dan")):
            await write(session, collection, rkey, title=rkey)
            uri = f"at://{session.did}/{collection}/{rkey}"
            await wait_for(app, lambda state, uri=uri: uri in state, within=15)
        await delete(dan, collection, "from-dan")
        await wait_for(app, lambda state: f"at://{dan.did}/{collection}/from-dan" not in state, 15)


@pytest.mark.anyio
async def test_a_host_that_hangs_delays_only_its_own_repositories(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """A followed account whose host accepts connections and never answers: bob's records
    still arrive, and alice's own writes still reach her repository, meanwhile."""
    collection = collection_for(request)
    alice, bob = await session_of(dev_pds, "alice.test"), await session_of(dev_pds, "bob.test")
    await write(bob, collection, "b1", title="bob's")
    stuck = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"

    async def hold(stream: Any) -> None:
        async with stream:
            await anyio.sleep_forever()  # accepted, never answered

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)

        class StuckHost:
            """Resolves ``stuck`` to the silent host, everyone else as usual."""

            async def resolve(self, did: str, **options: Any) -> Any:
                if did == stuck:
                    bob_identity = await resolver.resolve(bob.did, **options)
                    return replace(bob_identity, did=stuck, pds=f"http://127.0.0.1:{port}")
                return await resolver.resolve(did, **options)

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, hold)
            identity = StuckHost()
            async with device(
                tmp_path / "alice.db", collection, alice, identity, follow=[stuck, bob.did],
                pull=Live(fallback=60),
            ) as (app, sync):  # fmt: skip
                app.actions.put("mine", "alice's own")
                await wait_for(app, lambda state: f"at://{bob.did}/{collection}/b1" in state, 15)
                with anyio.fail_after(15):
                    await sync.wait_for_idle()
                assert set(await remote(alice, collection)) == {"mine"}
                assert stuck not in sync.follow_errors  # still waiting on its host
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_identity_event_of_a_followed_account_is_followed(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Bob changes his handle: alice's engine drops his cached identity (a new key or host
    would be resolved afresh) and goes on pulling him."""
    collection = collection_for(request)
    alice, bob = await session_of(dev_pds, "alice.test"), await session_of(dev_pds, "bob.test")
    async with ForgetfulResolver(plc_url=dev_pds.plc_url, allow_insecure_localhost=True) as r:
        async with device(
            tmp_path / "alice.db", collection, alice, r, pull=Live(fallback=60), follow=[bob.did]
        ) as (app, sync):  # fmt: skip
            await pulled(sync)
            async for status in sync.status_changes():
                if status.live:
                    break
            async with XrpcClient(session=bob) as client:
                try:
                    before = len(r.forgotten)
                    await client.procedure(
                        "com.atproto.identity.updateHandle", {"handle": "bob-moved.test"},
                        auth=True,
                    )  # fmt: skip
                    with anyio.fail_after(15):
                        await r.forgets(bob.did, since=before)
                    await write(bob, collection, "later", title="after the move")
                    uri = f"at://{bob.did}/{collection}/later"
                    await wait_for(app, lambda state: uri in state, within=15)
                finally:
                    await client.procedure(
                        "com.atproto.identity.updateHandle", {"handle": "bob.test"}, auth=True
                    )


@pytest.mark.anyio
async def test_follow_takes_handles_resolved_when_the_engine_starts(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = collection_for(request)
    alice, bob = await session_of(dev_pds, "alice.test"), await session_of(dev_pds, "bob.test")
    await write(bob, collection, "h1", title="by handle")
    handles = IdentityResolver(
        plc_url=dev_pds.plc_url,
        use_dns=False,
        web_origin=lambda _handle: dev_pds.pds_url,
        allow_test_handles=True,
        allow_insecure_localhost=True,
    )
    async with handles:
        follow = ["bob.test", "nobody.test"]
        async with device(tmp_path / "a.db", collection, alice, handles, follow=follow) as (
            app,
            sync,
        ):
            await pulled(sync)
            assert sync.following == [bob.did]
            assert set(rows(app)) == {f"at://{bob.did}/{collection}/h1"}
            assert "nobody.test" in sync.follow_errors
            said = sync.follow_errors["nobody.test"]
            assert "handle nobody.test does not resolve" in said and "HandleNotFound" in said
            with pytest.raises(VerificationError, match=r"nobody\.test does not resolve"):
                await sync.follow("nobody.test")  # the same, asked while running
            assert sync.following == [bob.did]
            assert sync.unfollow("bob.test") is True  # by the handle it was followed by


@pytest.mark.anyio
async def test_followed_rows_are_never_queued_by_a_later_start(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    collection = collection_for(request)
    alice, bob = await session_of(dev_pds, "alice.test"), await session_of(dev_pds, "bob.test")
    await write(bob, collection, "b1", title="bob's")
    async with device(tmp_path / "alice.db", collection, alice, resolver, follow=[bob.did]) as (
        app, sync,
    ):  # fmt: skip
        await pulled(sync)
        assert f"at://{bob.did}/{collection}/b1" in rows(app)
    # The next start compares every row with the sync tables: bob's row is not alice's to push.
    async with device(tmp_path / "alice.db", collection, alice, resolver) as (app, sync):
        status = await pulled(sync)
        with anyio.fail_after(30):
            status = await sync.wait_for_idle()
        assert (status.pending, status.failed, status.upload_error) == (0, 0, None)
        assert sync.outbox.counts() == (0, 0, 0)


@pytest.mark.anyio
async def test_a_followed_repository_is_applied_after_its_hosts_download_slot_is_free(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """The host's slot (``HOST_PULLS`` downloads at once) is held while talking to the PDS
    only: while one repository is verified and applied, the host serves the next."""
    collection = collection_for(request)
    alice, bob = await session_of(dev_pds, "alice.test"), await session_of(dev_pds, "bob.test")
    for rkey in ("s1", "s2"):
        await write(bob, collection, rkey, title=f"bob {rkey}")
    held_while_applying: list[int] = []

    def seen(record: RemoteRecord) -> None:
        if record.did == bob.did:
            (host,) = sync._host_limits.values()
            held_while_applying.append(host.borrowed_tokens)

    async with device(
        tmp_path / "alice.db", collection, alice, resolver, follow=[bob.did], on_pds_action=seen
    ) as (app, sync):
        await pulled(sync)
        assert f"at://{bob.did}/{collection}/s2" in rows(app)
    assert held_while_applying and set(held_while_applying) == {0}


@asynccontextmanager
async def alice_following(
    host: Any, who: str, collection: str, tmp_path: Path
) -> AsyncIterator[tuple[App, ATSync, IdentityResolver, Session]]:
    """alice.test's device on ``host`` (Live(fallback=60): nothing polled within a test)
    following ``who`` there, once its record ``first`` has arrived; its resolver, and ``who``'s
    session."""
    alice, theirs = await session_of(host, "alice.test"), await session_of(host, who)
    await write(theirs, collection, "first", title="before")
    resolver = IdentityResolver(plc_url=host.plc_url, allow_insecure_localhost=True)
    live = {"pull": Live(fallback=60)}
    async with resolver:
        async with device(tmp_path / "a.db", collection, alice, resolver, **live) as (app, sync):
            await sync.follow(theirs.did)
            first = f"at://{theirs.did}/{collection}/first"
            await wait_for(app, lambda state: first in state, within=15)
            yield app, sync, resolver, theirs


@pytest.mark.anyio
async def test_a_followed_account_that_moves_to_another_host_is_followed_there(
    make_pds: MakePDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A real account migration (``DevPDS.move_account``: same DID, records imported, the DID
    document naming the new host and its new key, deactivated on the old one). Live(fallback=60)
    polls nothing within the test: the old host's ``#account`` event is all alice hears, and
    her engine resolves the DID afresh, pulls it from its new host (verified against the new
    key) and listens to that host's stream from then on."""
    collection = collection_for(request)
    old = make_pds(accounts=[("alice.test", "alice-pw-1"), ("mover.test", "mover-pw-1")])
    new = make_pds(plc_url=old.plc_url, accounts=[("dan.test", "dan-pw-1")])
    async with alice_following(old, "mover.test", collection, tmp_path) as (
        app, sync, resolver, mover,
    ):  # fmt: skip
        before = (await resolver.resolve_did(mover.did)).signing_key
        moved = await anyio.to_thread.run_sync(old.move_account, "mover.test", new)
        assert moved.did == mover.did and "mover.test" in new.accounts
        assert "mover.test" not in old.accounts
        mover = await session_of(new, "mover.test")
        await write(mover, collection, "m2", title="written on the new host")
        second = f"at://{mover.did}/{collection}/m2"
        await wait_for(app, lambda state: second in state, within=20)
        # The imported record stays, under the same key.
        assert f"at://{mover.did}/{collection}/first" in rows(app)
        origin = sync.origin("notes", second)
        assert origin is not None and origin.did == mover.did
        assert mover.did not in sync.follow_errors
        # Its new key: the old one no longer signs this repository.
        assert (await resolver.resolve_did(mover.did)).signing_key != before

        # From now on its new host's stream brings its changes.
        await write(mover, collection, "m3", title="live from the new host")
        third = f"at://{mover.did}/{collection}/m3"
        await wait_for(app, lambda state: third in state, within=15)


@pytest.mark.anyio
async def test_a_followed_account_deactivated_on_its_host_is_said_and_back_when_active(
    make_pds: MakePDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = collection_for(request)
    host = make_pds(accounts=[("alice.test", "alice-pw-1"), ("quiet.test", "quiet-pw-1")])
    async with alice_following(host, "quiet.test", collection, tmp_path) as (
        app, sync, _, quiet,
    ):  # fmt: skip
        async with XrpcClient(session=quiet) as client:
            await client.procedure("com.atproto.server.deactivateAccount", {}, auth=True)
            sync.pull_now()
            await pulled(sync)
            error = sync.follow_errors.get(quiet.did, "")
            assert "not active on its PDS" in error and "RepoDeactivated" in error
            # Nothing is taken away while it is paused.
            assert f"at://{quiet.did}/{collection}/first" in rows(app)
            await client.procedure("com.atproto.server.activateAccount", None, auth=True)
        # The #account event of its return brings it back: no pull asked for.
        await write(quiet, collection, "q2", title="after the pause")
        second = f"at://{quiet.did}/{collection}/q2"
        await wait_for(app, lambda state: second in state, within=15)
        sync.pull_now()  # (the error is cleared as that pull ends, after its rows)
        await pulled(sync)
        assert quiet.did not in sync.follow_errors


@pytest.mark.anyio
async def test_a_followed_repository_is_written_off_the_event_loop_and_told_on_it(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest, resolver: IdentityResolver
) -> None:
    """Its rows are written in a worker thread (the loop goes on meanwhile); live queries
    hear of them in the loop's thread, as of every other change."""
    import threading

    collection = collection_for(request)
    alice, bob = await session_of(dev_pds, "alice.test"), await session_of(dev_pds, "bob.test")
    for rkey in ("t1", "t2", "t3"):
        await write(bob, collection, rkey, title=f"bob {rkey}")
    written_in: set[int] = set()
    told_in: list[tuple[int, int]] = []
    async with device(tmp_path / "alice.db", collection, alice, resolver) as (app, sync):
        app.model_db.write_listeners.append(lambda *_: written_in.add(threading.get_ident()))
        app.db.subscribe(
            "notes", lambda found: told_in.append((len(found), threading.get_ident())),
            initial=False,
        )  # fmt: skip
        await sync.follow(bob.did)
        await pulled(sync)
        assert len(rows(app)) == 3
    loop = threading.get_ident()
    assert written_in and loop not in written_in
    assert told_in and {thread for _, thread in told_in} == {loop}
    assert told_in[-1][0] == 3

"""The user's own account moves to another PDS host (a real migration between two dev PDS
hosts sharing a PLC directory, ``DevPDS.move_account``): nothing queued is lost, a login at the
new host pushes what waited, and pulls go on there — its stream, its signing key — by
themselves (``Live(fallback=60)``: nothing is polled within the test). Before, the stream
stayed on the silent old host, the old host's ``#account`` (deactivated) kept pulls off, and
the old signing key refused the new host's commits.

The new host keeps the imported head commit, signed with the old key, until its first commit:
a pull before it asks the host for one (an empty ``applyWrites``) instead of failing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync.app import ActionContext, App, ATPSigner, Contract
from atsync.atproto import FileSessionStore, IdentityResolver, XrpcClient
from atsync.sync import ATSync, Binding, Immediate, Live, State
from pds_fixtures import MakePDS
from sync_devices import collection_for, remote, session_of, wait_status

contract = Contract(models={"notes": {"id": "primary", "title": "string", "n": "integer"}})


@contract.action
def put(ctx: ActionContext, key: str, title: str) -> None:
    ctx.db.set("notes", {"id": key, "title": title, "n": 0})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def alice_device(
    tmp_path: Path, name: str, collection: str, plc_url: str
) -> AsyncIterator[tuple[ATPSigner, App, ATSync]]:
    """One of alice's devices, not logged in yet."""
    signer = ATPSigner(store=FileSessionStore(tmp_path / f"{name}-sessions"))
    async with IdentityResolver(plc_url=plc_url, allow_insecure_localhost=True) as resolver:
        with App.open(tmp_path / f"{name}.db", contract, signer=signer) as app:
            sync = ATSync(
                app, bindings={"notes": Binding(collection)}, identity=resolver,
                push=Immediate(), pull=Live(fallback=60),
            )  # fmt: skip
            async with sync:
                yield signer, app, sync
            sync.close()


@asynccontextmanager
async def alice_before_the_move(
    make_pds: MakePDS, tmp_path: Path, collection: str
) -> AsyncIterator[tuple[Any, Any, ATPSigner, App, ATSync]]:
    """Alice's device on the old host, live, with n1 pushed; a new host beside it."""
    old = make_pds(accounts=[("alice.test", "alice-pw-1")])
    new = make_pds(plc_url=old.plc_url, accounts=[("dan.test", "dan-pw-1")])
    async with alice_device(tmp_path, "a", collection, old.plc_url) as (signer, app, sync):
        await signer.login_async("alice.test", "alice-pw-1", old.pds_url)
        app.actions.put("n1", "before the move")
        with anyio.fail_after(30):
            await sync.wait_for_idle()
        await wait_status(sync, lambda s: s.live)
        yield old, new, signer, app, sync


async def arrives_from_another_device(new: Any, app: App, collection: str) -> None:
    """Another device writes n3 at the new host: the stream brings it, verified against the
    new signing key."""
    moved = await session_of(new, "alice.test")
    async with XrpcClient(session=moved) as client:
        record = {"$type": collection, "title": "from another device", "n": 1}
        await client.put_record(moved.did, collection, "n3", record)
    arrived = anyio.Event()
    with app.db.subscribe("notes", lambda found: found and arrived.set(), where={"id": "n3"}):
        with anyio.fail_after(15):
            await arrived.wait()


def refused(app: App) -> list[tuple[str, str]]:
    return [tuple(r) for r in app.model_db.execute("select reason, detail from _atsync_rejected")]


@pytest.mark.anyio
async def test_the_users_account_moves_to_another_host_and_syncs_there(
    make_pds: MakePDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = collection_for(request, "test.atsync.move")
    async with alice_before_the_move(make_pds, tmp_path, collection) as moving:
        old, new, signer, app, sync = moving
        await anyio.to_thread.run_sync(old.move_account, "alice.test", new)
        app.actions.put("n2", "after the move, before the new login")
        status = await wait_status(sync, lambda s: s.state == State.NEEDS_AUTH, 30)
        assert "AccountDeactivated" in str(status.upload_error)
        assert status.pending == 1 and status.failed == 0  # kept, not dead-lettered

        # The login at the new host wakes the engine: no push_now().
        await signer.login_async("alice.test", "alice-pw-1", new.pds_url)
        with anyio.fail_after(30):
            await sync.wait_for_idle()
        moved = await session_of(new, "alice.test")
        assert set(await remote(moved, collection)) == {"n1", "n2"}

        await arrives_from_another_device(new, app, collection)
        status = await wait_status(sync, lambda s: s.live)
        assert status.download_error is None and status.rejected == 0 == len(refused(app))

        # A logout closes the stream at once, though the host sends nothing meanwhile.
        await signer.logout_async()
        await wait_status(sync, lambda s: not s.live, 5)


@pytest.mark.anyio
async def test_a_new_device_reads_a_moved_account_before_its_new_host_made_a_commit(
    make_pds: MakePDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A device set up after the move, before any write at the new host: its first read
    finds the imported head, signed with the old key. It asks the host for a new commit (an
    empty ``applyWrites``) and reads that, instead of failing until someone writes."""
    collection = collection_for(request, "test.atsync.move")
    async with alice_before_the_move(make_pds, tmp_path, collection) as moving:
        old, new = moving[:2]
        did = old.accounts["alice.test"].did
        async with XrpcClient(old.pds_url) as client:
            before = await client.sync_get_latest_commit(did)
        await anyio.to_thread.run_sync(old.move_account, "alice.test", new)
        async with XrpcClient(new.pds_url) as client:
            imported = await client.sync_get_latest_commit(did)
        assert imported.cid == before.cid  # signed with the old key

        async with alice_device(tmp_path, "laptop", collection, old.plc_url) as laptop:
            signer, app, sync = laptop
            await signer.login_async("alice.test", "alice-pw-1", new.pds_url)
            with anyio.fail_after(30):
                await sync.wait_pulled()
            assert {row["id"] for row in app.db.query("notes")} == {"n1"}
            status = sync.status
            assert status.download_error is None and refused(app) == []
            async with XrpcClient(new.pds_url) as client:
                renewed = await client.sync_get_latest_commit(did)
            assert renewed.cid != imported.cid and renewed.rev == status.rev

            await arrives_from_another_device(new, app, collection)
            status = await wait_status(sync, lambda s: s.live)
            assert status.download_error is None and status.rejected == 0


@pytest.mark.anyio
async def test_the_stream_position_at_the_old_host_is_not_used_at_the_new_one(
    make_pds: MakePDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A stream position counts one host's events only. Alice's device stood at event ~30 of
    the old host; at the new host her records were written at event ~10, and the host had
    passed 30 by the time the device logged in there: resumed from 30, the device would
    never hear of them (no pull on a login that resumes a stream)."""
    collection = collection_for(request, "test.atsync.move")
    async with alice_before_the_move(make_pds, tmp_path, collection) as moving:
        old, new, signer, app, _ = moving
        writer = await session_of(old, "alice.test")
        async with XrpcClient(session=writer) as client:
            for i in range(25):  # each an event of the old host, heard by the device
                record = {"$type": collection, "title": f"old host {i}", "n": i}
                await client.put_record(writer.did, collection, f"o{i:02d}", record)
        heard = anyio.Event()
        with app.db.subscribe("notes", lambda found: len(found) == 26 and heard.set()):
            with anyio.fail_after(15):
                await heard.wait()
        cursor = int(app.model_db.execute(
            "select value from _atsync_sync_state where key = 'stream_cursor'"
        ).fetchone()[0])  # fmt: skip
        assert cursor > 25

        await anyio.to_thread.run_sync(old.move_account, "alice.test", new)
        moved = await session_of(new, "alice.test")
        async with XrpcClient(session=moved) as client:
            record = {"$type": collection, "title": "at the new host", "n": 1}
            await client.put_record(moved.did, collection, "n3", record)
        dan = await session_of(new, "dan.test")
        async with XrpcClient(session=dan) as client:
            for i in range(cursor + 5):  # the new host's stream passes the old position
                record = {"$type": collection, "title": f"dan {i}", "n": i}
                await client.put_record(dan.did, collection, f"d{i:03d}", record)

        await signer.login_async("alice.test", "alice-pw-1", new.pds_url)
        arrived = anyio.Event()
        with app.db.subscribe("notes", lambda found: found and arrived.set(), where={"id": "n3"}):
            with anyio.fail_after(15):
                await arrived.wait()
        assert refused(app) == []

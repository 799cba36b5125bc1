"""The user's own account moves to another PDS host (a real migration between two dev PDS
hosts sharing a PLC directory, ``DevPDS.move_account``): nothing queued is lost, a login at the
new host pushes what waited, and pulls go on there — its stream, its signing key — by
themselves (``Live(fallback=60)``: nothing is polled within the test)."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.anyio
async def test_the_users_account_moves_to_another_host_and_syncs_there(
    make_pds: MakePDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = collection_for(request, "test.atsync.move")
    old = make_pds(accounts=[("alice.test", "alice-pw-1")])
    new = make_pds(plc_url=old.plc_url, accounts=[("dan.test", "dan-pw-1")])
    signer = ATPSigner(store=FileSessionStore(tmp_path / "sessions"))
    resolver = IdentityResolver(plc_url=old.plc_url, allow_insecure_localhost=True)
    async with resolver:
        with App.open(tmp_path / "a.db", contract, signer=signer) as app:
            sync = ATSync(
                app, bindings={"notes": Binding(collection)}, identity=resolver,
                push=Immediate(), pull=Live(fallback=60),
            )  # fmt: skip
            async with sync:
                await signer.login_async("alice.test", "alice-pw-1", old.pds_url)
                app.actions.put("n1", "before the move")
                with anyio.fail_after(30):
                    await sync.wait_for_idle()
                await wait_status(sync, lambda s: s.live)

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

                # Another device writes at the new host: its stream brings it, verified
                # against the new signing key.
                async with XrpcClient(session=moved) as client:
                    record = {"$type": collection, "title": "from another device", "n": 1}
                    await client.put_record(moved.did, collection, "n3", record)
                arrived = anyio.Event()
                with app.db.subscribe(
                    "notes", lambda found: found and arrived.set(), where={"id": "n3"}
                ):
                    with anyio.fail_after(15):
                        await arrived.wait()
                status = await wait_status(sync, lambda s: s.live)
                assert status.download_error is None
                # The new host keeps the imported head commit, signed with the old key, until
                # its first commit: a pull that came before the push of n2 was refused, and
                # said so. Nothing else was.
                refused = app.model_db.execute(
                    "select reason, detail from _atsync_rejected"
                ).fetchall()
                assert all(
                    reason == "VerificationError" and "is not signed by" in detail
                    for reason, detail in refused
                ), refused
                assert status.rejected == len(refused)
            sync.close()

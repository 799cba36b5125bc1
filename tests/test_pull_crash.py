"""SIGKILL in the middle of a backfill: the database stays sound and the next pull completes it.

A child process restores a 3,000-record repository (``pull=OnStart()``) and prints each
chunk it has committed, then waits on its stdin; the parent kills it with SIGKILL after the
first chunk (1,000 records), checks
the database the way ``test_crash`` does (integrity, the log's seals), then pulls again in
process: every record arrives exactly once, nothing is queued for push, nothing rejected,
and a rebuild from the log gives the same rows.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync.app import App, Contract
from atsync.atproto import IdentityResolver, login
from atsync.sync import ATSync, Binding, Manual
from sync_devices import remote, write_many

RECORDS = 3_000
contract = Contract(models={"notes": {"id": "primary", "title": "string", "n": "integer"}})

CHILD = textwrap.dedent(
    """
    import sys, anyio
    from atsync.app import App, Contract
    from atsync.atproto import IdentityResolver, login
    from atsync.sync import ATSync, Binding, Manual, OnStart

    db, collection, pds_url, plc_url, did, password = sys.argv[1:]
    contract = Contract(models={"notes": {"id": "primary", "title": "string", "n": "integer"}})

    async def main():
        session = await login(did, password, pds_url)
        async with IdentityResolver(plc_url=plc_url, allow_insecure_localhost=True) as r:
            with App.open(db, contract) as app:
                sync = ATSync(app, bindings={"notes": Binding(collection)}, session=session,
                              pull=OnStart(), push=Manual(), identity=r)
                def show(status):
                    if status.pull_progress:
                        print("chunk", *status.pull_progress, flush=True)
                        sys.stdin.readline()  # held here, between two chunks, until killed
                sync.on_status(show)
                async with sync:
                    await anyio.sleep_forever()

    anyio.run(main)
    """
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_backfill_killed_midway_completes_on_the_next_pull(
    dev_pds: Any, tmp_path: Path
) -> None:
    account = dev_pds.accounts["alice.test"]
    session = await login(account.did, account.password, dev_pds.pds_url)
    collection = "test.atsync.crash.backfill"
    await write_many(session, collection, RECORDS)
    db = tmp_path / "device.db"
    args = [str(db), collection, dev_pds.pds_url, dev_pds.plc_url, account.did, account.password]
    async with await anyio.open_process([sys.executable, "-c", CHILD, *args]) as child:
        assert child.stdout is not None
        seen = ""
        with anyio.fail_after(60):
            async for chunk in child.stdout:
                seen += chunk.decode()
                if "\n" in seen:
                    break
        if not seen.startswith("chunk "):
            assert child.stderr is not None
            error = b"".join([part async for part in child.stderr]).decode()
            raise AssertionError(f"the child printed {seen!r}; its stderr: {error}")
        child.send_signal(signal.SIGKILL)  # right after its first chunk committed
        assert await child.wait() == -signal.SIGKILL
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    applied = conn.execute("SELECT count(*) FROM notes").fetchone()[0]
    conn.close()
    assert applied == 1_000  # killed after its first chunk, which stays whole

    async with IdentityResolver(plc_url=dev_pds.plc_url, allow_insecure_localhost=True) as r:
        with App.open(db, contract) as app:
            assert app.log.verify() == len(app.log)
            sync = ATSync(
                app, bindings={"notes": Binding(collection)}, session=session,
                pull=Manual(), push=Manual(), identity=r,
            )  # fmt: skip
            async with sync:
                with anyio.fail_after(60):
                    status = await sync.wait_pulled()
            sync.close()
            rows = {row["id"]: dict(row) for row in app.db.query("notes")}
            records = await remote(session, collection)
            assert rows == {
                rkey: {"id": rkey, "title": rec["title"], "n": rec["n"]}
                for rkey, rec in records.items()
            }
            assert (status.pending, status.rejected) == (0, 0)
            assert (
                app.rebuild() == len(app.log)
                and {row["id"]: dict(row) for row in app.db.query("notes")} == rows
            )

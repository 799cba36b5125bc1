"""`atsync status | outbox | login | push | retry` on a database, against the real PDS."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from atsync.app import ActionContext, App, ATPSigner, Contract
from atsync.atproto._session import FileSessionStore
from atsync.sync import ATSync, Binding, Manual

contract = Contract(models={"items": {"id": "primary", "label": "string"}})


@contract.action
def put(ctx: ActionContext, key: str, label: str) -> None:
    ctx.db.set("items", {"id": key, "label": label})


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atsync", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_status_login_push_outbox_retry(
    dev_pds: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    db = tmp_path / "cli.db"
    sessions = tmp_path / "sessions"
    collection = "test.atsync.cli" + "".join(c for c in request.node.name if c.isalnum())[-8:]
    signer = ATPSigner(store=FileSessionStore(sessions))
    with App.open(db, contract, signer=signer) as app:
        sync = ATSync(app, pull=Manual(), bindings={"items": Binding(collection)}, push=Manual())
        for i in range(7):
            app.actions.put(f"k{i}", f"label {i}")
        sync.close()

    # A record the PDS will refuse: its $type does not match the collection.
    raw = sqlite3.connect(db)
    raw.execute(
        "update _atsync_outbox set record = json_set(record, '$.\"$type\"', 'wrong.type.here') "
        "where rkey = 'k3'"
    )
    raw.commit()
    raw.close()

    out = cli("status", "--db", str(db), "--session-dir", str(sessions), "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert (status["pending"], status["account"], status["has_synced"]) == (7, None, False)

    refused = cli("push", "--db", str(db), "--session-dir", str(sessions))
    assert refused.returncode != 0 and "not logged in" in refused.stderr

    alice = dev_pds.accounts["alice.test"]
    logged = cli(
        "login",
        "--db",
        str(db),
        "--session-dir",
        str(sessions),
        "--service",
        dev_pds.pds_url,
        "alice.test",
        env={"ATSYNC_PASSWORD": alice.password},
    )
    assert logged.returncode == 0, logged.stderr
    assert alice.did in logged.stdout

    pushed = cli("push", "--db", str(db), "--session-dir", str(sessions))
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed 6 writes" in pushed.stdout and "1 dead letters" in pushed.stdout

    listing = cli("outbox", "--db", str(db), "--json")
    lines = [json.loads(line) for line in listing.stdout.splitlines()]
    assert len(lines) == 1 and lines[0]["uri"] == f"{collection}/k3"
    assert lines[0]["error"]  # the server's error name is kept

    status = json.loads(
        cli("status", "--db", str(db), "--session-dir", str(sessions), "--json").stdout
    )
    assert (status["pending"], status["failed"], status["has_synced"]) == (0, 1, True)
    assert status["account"] == alice.did

    again = cli("retry", "--db", str(db))
    assert "1 dead letters queued again" in again.stdout
    status = json.loads(
        cli("status", "--db", str(db), "--session-dir", str(sessions), "--json").stdout
    )
    assert (status["pending"], status["failed"]) == (1, 0)
    human = cli("status", "--db", str(db), "--session-dir", str(sessions))
    assert human.returncode == 0, human.stderr
    assert "pending     1 writes (1 create)" in human.stdout
    assert "last push   20" in human.stdout


def test_push_beside_a_running_app_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "busy.db"
    with App.open(db, contract) as app:
        sync = ATSync(
            app, pull=Manual(), bindings={"items": Binding("com.example.cli.item")}, push=Manual()
        )
        app.actions.put("k1", "one")
        refused = cli("push", "--db", str(db), "--session-dir", str(tmp_path / "s"))
        assert refused.returncode != 0
        assert "open in a running app" in refused.stderr and "nothing was sent" in refused.stderr
        assert sync.status.pending == 1  # untouched
        sync.close()
    # Once the app is closed the command goes on to its next check (here: no session).
    free = cli("push", "--db", str(db), "--session-dir", str(tmp_path / "s"))
    assert free.returncode != 0 and "not logged in" in free.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_status_says_why_the_queue_waits(tmp_path: Path, anyio_backend: str) -> None:
    import anyio

    from fake_pds import FakePDS

    pds = FakePDS()
    pds.points_left, pds.reset_at = 0, 4_102_444_800.0  # exhausted until 2100
    db = tmp_path / "held.db"
    with App.open(db, contract) as app:
        sync = ATSync(
            app,
            pull=Manual(),
            bindings={"items": Binding("com.example.cli.item")},
            session=pds.session(),
            client_options={"transport": pds.transport},
        )
        async with sync:
            app.actions.put("k1", "one")
            with anyio.fail_after(10):
                async for status in sync.status_changes():
                    if status.waiting_reason == "rate_limited":
                        break
            shown = await anyio.to_thread.run_sync(
                lambda: cli("status", "--db", str(db), "--session-dir", str(tmp_path / "s"))
            )
            assert shown.returncode == 0, shown.stderr
            line = next(x for x in shown.stdout.splitlines() if x.startswith("engine"))
            assert "waiting (rate_limited), resumes 2100-01-01" in line
            assert f"app running, pid {os.getpid()}" in line
        sync.close()
    after = json.loads(
        cli("status", "--db", str(db), "--session-dir", str(tmp_path / "s"), "--json").stdout
    )
    assert after["engine"]["state"] == "stopped" and after["engine"]["app_running"] is False


def test_empty_listings_say_so_in_words_and_print_nothing_as_json(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    with App.open(db, contract) as app:
        ATSync(app, pull=Manual(), bindings={"items": Binding("test.atsync.empty")}).close()
    said = {"conflicts": "no conflicts recorded", "rejected": "nothing rejected"}
    for command, words in said.items():
        shown = cli(command, "--db", str(db))
        assert (shown.returncode, shown.stdout) == (0, words + "\n"), shown.stderr
        as_json = cli(command, "--db", str(db), "--json")
        assert (as_json.returncode, as_json.stdout) == (0, ""), as_json.stderr

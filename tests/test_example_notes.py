"""The notes example's command line (examples/notes/notes.py) as a user runs it, against a real
PDS of its own: offline first, login pushes everything under the example's Lexicons (records
checked against them), a second device restores notes and images, another person follows and
sees them with their author (read-only), a shared notebook both edit converges, deletes
reach the other devices."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync.atproto import XrpcClient
from atsync.lexicon import LexiconSet, validate_record
from pds_fixtures import MakePDS

EXAMPLE = Path(__file__).parent.parent / "examples" / "notes"
NOTES, DRAFTS = "com.example.notes.note", "com.example.notes.draft"
PASSWORD = "notes-pw-1"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("notes_cli", EXAMPLE / "notes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


notes_cli = _load()


class Device:
    """One installation of the app: its database and its session directory."""

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.db, self.sessions = home / "notes.db", home / "sessions"

    def __call__(self, *argv: str, ok: bool = True) -> str:
        """Run one command in this process (the same ``main`` the script runs)."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = notes_cli.main(
                ["--db", str(self.db), "--session-dir", str(self.sessions), *argv]
            )
        assert (code == 0) is ok, (argv, code, out.getvalue(), err.getvalue())
        return out.getvalue() + err.getvalue()

    def run(self, *argv: str, env: dict[str, str]) -> str:
        """Run one command as a separate process, exactly as a user types it."""
        done = subprocess.run(
            [sys.executable, str(EXAMPLE / "notes.py"), "--db", str(self.db),
             "--session-dir", str(self.sessions), *argv],
            capture_output=True, text=True, timeout=120, env={**os.environ, **env},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    def notes(self) -> dict[str, dict[str, Any]]:
        rows = [json.loads(line) for line in self("ls", "--json").splitlines()]
        return {row["id"]: row for row in rows}

    def blob(self, cid: str) -> bytes:
        return (self.db.parent / "notes.db.blobs" / cid).read_bytes()


async def _records(pds_url: str, did: str, collection: str) -> dict[str, dict[str, Any]]:
    async with XrpcClient(pds_url) as client:
        return {r.rkey: r.value async for r in client.iter_records(did, collection)}


def records(pds: Any, handle: str, collection: str) -> dict[str, dict[str, Any]]:
    return anyio.run(_records, pds.pds_url, pds.accounts[handle].did, collection)


def test_the_notes_app_offline_then_synced_across_devices_and_people(
    make_pds: MakePDS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pds = make_pds(accounts=[("alice.test", PASSWORD), ("bob.test", PASSWORD)])
    alice_did = pds.accounts["alice.test"].did
    env = {"ATSYNC_PLC_URL": pds.plc_url, "ATSYNC_PASSWORD": PASSWORD}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    phone, laptop, bob = (
        Device(tmp_path / "phone"),
        Device(tmp_path / "laptop"),
        Device(tmp_path / "bob"),
    )
    picture = tmp_path / "beach.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)

    # Offline from the first command.
    first = phone("add", "Buy milk").strip()
    holiday = phone("add", "Holiday", "--image", str(picture)).strip()
    assert phone("sync").startswith("not logged in: 2 changes wait")
    mine = phone.notes()
    assert [mine[k]["text"] for k in (first, holiday)] == ["Buy milk", "Holiday"]
    cid = mine[holiday]["image"]
    assert cid is not None and phone.blob(cid) == picture.read_bytes()

    # Login (as its own process, password from the environment): everything goes up, as
    # records of the example's own Lexicons.
    out = phone.run("login", "alice.test", "--service", pds.pds_url, env=env)
    assert f"logged in as {alice_did}" in out and "synced: 0 queued, 0 failed" in out
    on_pds = records(pds, "alice.test", NOTES)
    assert {k: v["title"] for k, v in on_pds.items()} == {first: "Buy milk", holiday: "Holiday"}
    lexicons = LexiconSet.load(EXAMPLE / "lexicons")
    for value in on_pds.values():  # in data-model form: the blob's ref is a CID
        validate_record(lexicons, NOTES, value)
    assert str(on_pds[holiday]["image"]["ref"]) == cid

    # A second device of the same account: notes and image come back.
    laptop("login", "alice.test", "--service", pds.pds_url)
    restored = laptop.notes()
    assert {k: r["text"] for k, r in restored.items()} == {first: "Buy milk", holiday: "Holiday"}
    assert laptop.blob(cid) == picture.read_bytes()

    # Another person follows alice (by handle): her notes, with her as author, read-only.
    bob("login", "bob.test", "--service", pds.pds_url)
    assert f"following {alice_did}" in bob("follow", "alice.test")
    seen = {r["text"]: r for r in bob.notes().values()}
    assert seen["Holiday"]["author"] == alice_did and seen["Holiday"]["image"] == cid
    assert bob.blob(cid) == picture.read_bytes()
    refused = bob("edit", seen["Buy milk"]["id"], "bob was here", ok=False)
    assert "refused" in refused and "read-only" in refused

    # A shared notebook: both invite each other; alice writes, bob edits, both converge.
    phone("invite", "bob.test")
    bob("invite", alice_did)
    plan = phone("add", "--shared", "Trip plan").strip()
    phone("sync")
    bob("sync")
    assert bob.notes()[plan]["shared"] and bob.notes()[plan]["text"] == "Trip plan"
    bob("edit", plan, "Trip plan: Lisbon")
    bob("sync")
    phone("sync")
    assert phone.notes()[plan]["text"] == bob.notes()[plan]["text"] == "Trip plan: Lisbon"
    assert set(records(pds, "bob.test", DRAFTS)) == {plan}  # bob's copy, in bob's repository

    # A delete reaches the other device and the follower.
    phone("rm", first)
    phone("sync", "--wait")
    laptop("sync")
    bob("sync")
    assert first not in laptop.notes() and "Buy milk" not in {
        r["text"] for r in bob.notes().values()
    }
    assert "queued     0 changes for the PDS; 0 failed" in phone("status")

"""The notes example's command line (examples/notes/notes.py) as a user runs it — every command
a process of its own — against a real PDS: offline first, login pushes everything under the
example's Lexicons (records checked against them), a second device restores notes and images
and edits flow both ways, the same note edited on both devices converges, another person
follows and sees them with their author (read-only) until they unfollow, a shared notebook
both edit converges, deletes reach the other devices, logout keeps working offline. The
shell session of examples/notes/README.md runs as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio

from atsync.atproto import XrpcClient
from atsync.lexicon import LexiconSet, validate_record
from pds_fixtures import MakePDS

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "notes"
NOTES, DRAFTS = "com.example.notes.note", "com.example.notes.draft"
PASSWORD = "notes-pw-1"


class Device:
    """One installation of the app: its database and its session directory. Every command
    runs as a separate process, exactly as a user types it."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.db, self.sessions = home / "notes.db", home / "sessions"
        self.env = {**os.environ, **env}

    def __call__(self, *argv: str, ok: bool = True, stdin: str | None = None) -> str:
        done = subprocess.run(
            [sys.executable, str(EXAMPLE / "notes.py"), "--db", str(self.db),
             "--session-dir", str(self.sessions), *argv],
            capture_output=True, text=True, timeout=120, env=self.env, input=stdin,
            start_new_session=True,  # no controlling terminal: a prompt reads standard input
        )  # fmt: skip
        assert (done.returncode == 0) is ok, (argv, done.returncode, done.stdout, done.stderr)
        return done.stdout + done.stderr

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
    make_pds: MakePDS, tmp_path: Path
) -> None:
    pds = make_pds(accounts=[("alice.test", PASSWORD), ("bob.test", PASSWORD)])
    alice_did, bob_did = pds.accounts["alice.test"].did, pds.accounts["bob.test"].did
    plc = {"ATSYNC_PLC_URL": pds.plc_url}
    with_password = {**plc, "ATSYNC_PASSWORD": PASSWORD}
    phone = Device(tmp_path / "phone", with_password)
    laptop = Device(tmp_path / "laptop", with_password)
    bob = Device(tmp_path / "bob", plc)  # types his password at the prompt
    picture = tmp_path / "beach.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    lexicons = LexiconSet.load(EXAMPLE / "lexicons")

    # Offline from the first command.
    first = phone("add", "Buy milk").strip()
    holiday = phone("add", "Holiday", "--image", str(picture)).strip()
    assert phone("sync").startswith("not logged in: 2 changes wait")
    assert "account    not logged in" in phone("status")
    mine = phone.notes()
    assert [mine[k]["text"] for k in (first, holiday)] == ["Buy milk", "Holiday"]
    cid = mine[holiday]["image"]
    assert cid is not None
    assert phone.blob(cid) == picture.read_bytes()

    # Login (password from the environment): everything goes up, as records of the example's
    # own Lexicons.
    out = phone("login", "alice.test", "--service", pds.pds_url)
    assert f"logged in as {alice_did}" in out
    assert "synced: 0 queued, 0 failed" in out
    on_pds = records(pds, "alice.test", NOTES)
    assert {k: v["title"] for k, v in on_pds.items()} == {first: "Buy milk", holiday: "Holiday"}
    for value in on_pds.values():  # in data-model form: the blob's ref is a CID
        validate_record(lexicons, NOTES, value)
    assert str(on_pds[holiday]["image"]["ref"]) == cid
    assert {r["author"] for r in phone.notes().values()} == {alice_did}

    # A second device of the same account: notes and image come back; edits flow both ways.
    laptop("login", "alice.test", "--service", pds.pds_url)
    restored = laptop.notes()
    assert {k: r["text"] for k, r in restored.items()} == {first: "Buy milk", holiday: "Holiday"}
    assert laptop.blob(cid) == picture.read_bytes()
    laptop("edit", holiday, "Holiday in May")
    laptop("sync", "--timeout", "30")
    phone("sync")
    assert phone.notes()[holiday]["text"] == "Holiday in May"

    # The same note edited on both devices between syncs: both end with one value, the
    # later pusher's (the default policy), and the conflict is recorded.
    phone("edit", first, "Buy oat milk")
    laptop("edit", first, "Buy milk and eggs")
    phone("sync")
    laptop("sync")
    phone("sync")
    assert phone.notes()[first]["text"] == laptop.notes()[first]["text"] == "Buy milk and eggs"
    assert "conflicts  1 recorded" in laptop("status")

    # Another person follows alice (by handle): her notes, with her as author, read-only.
    out = bob("login", "bob.test", "--service", pds.pds_url, stdin=PASSWORD + "\n")
    assert f"logged in as {bob_did}" in out
    assert f"following {alice_did}" in bob("follow", "alice.test")
    seen = {r["text"]: r for r in bob.notes().values()}
    assert seen["Holiday in May"]["author"] == alice_did
    assert seen["Holiday in May"]["image"] == cid
    assert bob.blob(cid) == picture.read_bytes()
    listed = bob("ls")
    assert re.search(rf"Holiday in May  \[image {cid[:16]}…\]  — {alice_did}", listed), listed
    refused = bob("edit", seen["Buy milk and eggs"]["id"], "bob was here", ok=False)
    assert "refused" in refused
    assert "read-only" in refused

    # A shared notebook: both invite each other; alice writes, bob edits, both converge.
    phone("invite", "bob.test")
    bob("invite", alice_did)
    plan = phone("add", "--shared", "Trip plan").strip()
    phone("sync")
    bob("sync")
    assert bob.notes()[plan]["shared"]
    assert bob.notes()[plan]["text"] == "Trip plan"
    assert f"{plan}  shared Trip plan" in bob("ls")
    bob("edit", plan, "Trip plan: Lisbon")
    bob("sync")
    phone("sync")
    assert phone.notes()[plan]["text"] == bob.notes()[plan]["text"] == "Trip plan: Lisbon"
    assert set(records(pds, "bob.test", DRAFTS)) == {plan}  # bob's copy, in bob's repository
    for who in ("alice.test", "bob.test"):
        for value in records(pds, who, DRAFTS).values():
            validate_record(lexicons, DRAFTS, value)

    # A delete reaches the other device and the follower.
    phone("rm", first)
    phone("sync", "--wait")
    laptop("sync")
    bob("sync")
    assert first not in laptop.notes()
    assert "Buy milk and eggs" not in {r["text"] for r in bob.notes().values()}
    assert "queued     0 changes for the PDS; 0 failed" in phone("status")

    # Unfollow: alice's own notes leave bob's device; the shared notebook stays.
    assert "their notes are gone from here" in bob("unfollow", "alice.test")
    left = bob.notes()
    assert not [k for k in left if k.startswith(f"at://{alice_did}/")]
    assert left[plan]["text"] == "Trip plan: Lisbon"

    # Logout: the app keeps working offline; notes stay alice's; the next login sends them.
    assert "logged out" in phone("logout")
    later = phone("add", "Written after logout").strip()
    assert phone("sync").startswith("not logged in: 1 changes wait")
    assert "account    not logged in" in phone("status")
    assert {r["author"] for r in phone.notes().values() if not r["shared"]} == {alice_did}
    phone("login", "alice.test", "--service", pds.pds_url)
    assert records(pds, "alice.test", NOTES)[later]["title"] == "Written after logout"


def shell_session(readme: Path) -> str:
    """The README's shell session: its code block that runs the notes app."""
    blocks = re.findall(r"^```\n(.*?)^```", readme.read_text(), flags=re.M | re.S)
    (session,) = [b for b in blocks if "notes.py" in b and "$N add" in b]
    return session


def test_the_readme_session_runs_as_written(make_pds: MakePDS, tmp_path: Path) -> None:
    pds = make_pds(accounts=[("alice.test", "pw1"), ("bob.test", "pw2")])
    session = shell_session(EXAMPLE / "README.md")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", session],
        cwd=ROOT,  # "from the repository's root"
        env={**os.environ, "PDS": pds.pds_url, "PLC": pds.plc_url, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    alice_did = pds.accounts["alice.test"].did
    assert f"logged in as {alice_did}" in out
    assert f"following {alice_did}" in out
    listed = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {(r["text"], r["author"], r["shared"]) for r in listed} == {
        ("Buy milk", alice_did, False),
        ("Holiday", alice_did, False),
    }
    # bob's last `ls`: alice's two notes and the shared one she wrote, each with her DID.
    tail = out.splitlines()[-3:]
    assert [line.split("  ", 1)[1] for line in tail] == [
        f"Buy milk  — {alice_did}",
        f"Holiday  [image {listed[1]['image'][:16]}…]  — {alice_did}",
        f"shared Trip plan  — {alice_did}",
    ], out
    assert set(records(pds, "alice.test", DRAFTS)) == {tail[2].split()[0]}

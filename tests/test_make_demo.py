"""`make demo` runs the whole scenario with no hand step, in under a minute, and leaves both
of alice's devices, bob's device and both repositories on the PDS agreeing.

The demo is run as a newcomer runs it (``make demo``, with ``DEMO_ARGS`` to keep its data);
its narration is checked line by line, then its final state is read independently: the three
databases it leaves, and the PDS started again from the data it left, read with plain XRPC.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from atsync import BlobRef
from atsync.atproto import BlockingXrpcClient, DevPDS
from atsync.db import ModelDB

ROOT = Path(__file__).resolve().parent.parent
NOTES, DRAFTS = "com.example.notes.note", "com.example.notes.draft"
ALICE, BOB, PASSWORD = "alice.test", "bob.test", "demo-password-1"  # examples/notes/demo.py's
PNG_SIZE = 70  # the demo's 1x1 image
UNDER = 60.0  # seconds, after the first install (issue #12)


def run_make_demo(data: Path) -> tuple[str, float]:
    began = time.monotonic()
    done = subprocess.run(
        ["make", "--no-print-directory", "demo", f"DEMO_ARGS=--data {data}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, time.monotonic() - began


def rows(db_path: Path, model: str) -> dict[str, dict[str, Any]]:
    with ModelDB.open_existing(db_path) as db:
        return {r["id"]: r for r in db.query(model)}


def test_make_demo_runs_and_every_device_agrees_with_the_pds(
    tmp_path: Path,
) -> None:
    out, wall = run_make_demo(tmp_path)

    # The narration, step by step.
    assert "state identical: True" in out
    assert "verified 7 entries" in out
    assert "local notes == remote records: True" in out
    assert "has_synced True" in out
    assert "[sync] needs_auth: 3 queued" in out  # before login, everything waits
    assert "laptop restored 4 notes" in out
    assert "rejected: 0" in out
    assert "[laptop] pulling 4/4 records" in out  # a long step shows its progress
    assert "queued: phone 1, laptop 1" in out  # both devices edited offline
    assert out.count("phone == laptop: True") == 3
    assert "laptop: title='Plan the trip to Lisbon', body='book the train'" in out
    assert "conflict on body: laptop 'fly instead' vs phone 'book the train, 2nd class'" in out
    assert "phone == laptop: True; recorded conflicts: 1" in out
    assert "on the laptop, byte-identical: True" in out
    assert "bob sees 4 of alice's notes" in out
    assert "bob edits it: refused, it is read-only here" in out
    draft = "title='Lisbon trip, May', body='day 1: Alfama; day 2: Belem'"
    assert f"alice: {draft}" in out
    assert f"bob: {draft}" in out
    assert "alice == bob: True" in out
    # Every sync step shows the status and what stands on the PDS.
    steps = out.split("\n== ")
    synced = [s for s in steps[steps.index(next(s for s in steps if "real PDS" in s)) :]]
    for section in synced[:-1]:  # all but `atsync status`, which shows its own
        assert "[sync] " in section, section
        assert "[pds]  alice.test: " in section, section
    assert "[pds]  bob.test: 0 notes, 1 drafts" in out
    assert "The same app with your own Bluesky account" in out
    took = re.search(r"The scenario took ([\d.]+) s", out)
    assert took is not None, out[-500:]
    assert float(took[1]) < UNDER, f"the scenario took {took[1]} s ({wall:.0f} s with make)"

    # The state it leaves, read independently.
    phone = rows(tmp_path / "notes.db", "notes")
    laptop = rows(tmp_path / "laptop" / "notes.db", "notes")
    bob_rows = rows(tmp_path / "bob" / "notes.db", "notes")
    with DevPDS(data_dir=tmp_path / "pds", accounts=[(ALICE, PASSWORD), (BOB, PASSWORD)]) as pds:
        alice_did, bob_did = pds.accounts[ALICE].did, pds.accounts[BOB].did
        with BlockingXrpcClient(pds.pds_url) as client:
            on_pds = {
                (who, c): {r.rkey: r.value for r in client.iter_records(did, c)}
                for who, did in (("alice", alice_did), ("bob", bob_did))
                for c in (NOTES, DRAFTS)
            }

    def plain(row: dict[str, Any]) -> tuple[Any, ...]:
        return (row["title"], row.get("body"), row["done"])

    alice_notes = {rkey: plain(v) for rkey, v in on_pds["alice", NOTES].items()}
    assert len(alice_notes) == 4
    assert {k: plain(r) for k, r in phone.items()} == alice_notes
    assert {k: plain(r) for k, r in laptop.items()} == alice_notes
    # Bob holds alice's notes under their AT URIs, and has none of his own.
    prefix = f"at://{alice_did}/{NOTES}/"
    assert {k.removeprefix(prefix): plain(r) for k, r in bob_rows.items()} == alice_notes
    assert on_pds["bob", NOTES] == {}

    # The merged note: one device's title, the other's body, then the policy's pick.
    (trip,) = (r for r in phone.values() if r["title"] == "Plan the trip to Lisbon")
    assert trip["body"] == "fly instead"
    image = laptop[trip["id"]]["image"]
    assert isinstance(image, BlobRef)
    assert (image.mime_type, image.size) == ("image/png", PNG_SIZE)
    assert str(on_pds["alice", NOTES][trip["id"]]["image"]["ref"]) == image.cid
    with ModelDB.open_existing(tmp_path / "laptop" / "notes.db") as db:
        assert len(db.blobs.read(image)) == PNG_SIZE
        (conflicts,) = db.connection.execute("SELECT count(*) FROM _atsync_conflicts").fetchone()
    assert conflicts == 1

    # The shared draft: the same merged row on both; each repository holds its author's
    # last write of it, stamped, from which every participant merges the same row.
    merged = {"title": "Lisbon trip, May", "body": "day 1: Alfama; day 2: Belem"}
    for db_path in (tmp_path / "notes.db", tmp_path / "bob" / "notes.db"):
        assert rows(db_path, "drafts") == {"trip": {"id": "trip", **merged}}
    alices, bobs = on_pds["alice", DRAFTS]["trip"], on_pds["bob", DRAFTS]["trip"]
    assert alices["title"] == merged["title"]
    assert bobs["body"] == merged["body"]
    assert alices["syncClocks"]["title"] > bobs["syncClocks"]["title"]
    assert bobs["syncClocks"]["body"] > alices["syncClocks"]["body"]

"""`make demo`: the notes app, offline first, then synced to a real PDS.

Part 1 (offline, before any login): actions, queries, a live subscription, the action log
with its seals, a replay, and the same data read with plain SQL. Everything done here is
queued for the PDS in the same transactions.

Part 2 (sync): starts the reference PDS on loopback (`atsync dev-pds`; installed on first
use, ~90 s), logs in — deferred auth — and pushes every queued change exactly once. Shows
the records on the PDS; a second device of the same account restoring them, verified; an
edit on each device merged field by field, and the same field edited on both — one value by
the conflict policy, the conflict recorded; a note with an image reaching the other device;
the session-key authorization verified offline; another account following it (read-only
notes with their author), a draft in a shared collection edited by both accounts and
converging, and `atsync status`. Each sync step shows the engine's status and what stands on
the PDS (read with plain XRPC). It ends with how to use the app with a real account.

    python examples/notes/demo.py [--data DIR] [--offline]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import anyio
from notes_app import COLLECTION, DRAFTS, bindings, contract, lexicons

from atsync import ActionError, App, ATPSigner, Debounce, SyncStatus, SyncThread
from atsync.app import REMOTE_ACTION
from atsync.atproto import (
    DevPDS,
    FileSessionStore,
    IdentityResolver,
    XrpcClient,
    ensure_installed,
    verify_session,
)

# A 1x1 PNG: the demo's image.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc000000301010018dd8db40000000049454e44ae426082"
)
REAL_ACCOUNT = """
The same app with your own Bluesky account (records on a PDS are public):
  1. Bluesky > Settings > Privacy and security > App passwords: create one.
  2. .venv/bin/python examples/notes/notes.py --db ~/notes.db add "hello from atsync"
     .venv/bin/python examples/notes/notes.py --db ~/notes.db login you.bsky.social
     .venv/bin/python examples/notes/notes.py --db ~/notes.db ls
     (login asks for the app password)
  See docs/real-pds.md."""
HANDLE, PASSWORD = "alice.test", "demo-password-1"
BOB = "bob.test"
NAMES: dict[str, str] = {}  # DID -> handle, for what the PDS shows
INSTALL = [0.0]  # seconds spent installing the PDS (not part of the scenario's time)


def engine(app: App) -> SyncThread:
    """The app's sync engine: its bindings, its Lexicons (every record is checked against
    them before it is queued), pushes 0.2 s after the last change."""
    return SyncThread(app, bindings=bindings(), lexicons=lexicons(), push=Debounce(0.2))


@contextmanager
def another_install(home: Path) -> Iterator[tuple[App, ATPSigner, SyncThread]]:
    """The app on another device (or of another person): its own database, key and session,
    its engine created (not started) before anything runs, closed at the end."""
    home.mkdir(exist_ok=True)
    signer = ATPSigner(store=FileSessionStore(home / "sessions"))
    with App.open(home / "notes.db", contract, signer=signer) as app:
        sync = engine(app)
        try:
            yield app, signer, sync
        finally:
            sync.close()


def report(sync: SyncThread, pds_url: str | None = None, *dids: str) -> None:
    """The engine's status, and — given a PDS — what stands in each repository there, read
    with plain XRPC."""
    s = sync.status
    print(
        f"   [sync] {s.state}: {s.pending} queued, {s.failed} failed, {s.conflicts} "
        f"conflicts, rev {s.rev or '-'}"
    )
    if pds_url is None:
        return

    async def count(did: str) -> dict[str, int]:
        async with XrpcClient(pds_url) as client:  # no credentials: records are public
            return {
                c: len([r async for r in client.iter_records(did, c)]) for c in (COLLECTION, DRAFTS)
            }

    for did in dids:
        counts = anyio.run(count, did)
        who = NAMES.get(did, did)
        print(f"   [pds]  {who}: {counts[COLLECTION]} notes, {counts[DRAFTS]} drafts")


def waiting(sync: SyncThread, what: str) -> Callable[[], None]:
    """Show a long wait's progress: each new state, and records applied of a large pull.
    Returns the function that stops showing it."""
    shown: list[tuple[str, tuple[int, int] | None]] = []

    def show(status: SyncStatus) -> None:
        now = (status.state, status.pull_progress)
        if shown and shown[-1] == now:
            return
        shown.append(now)
        done = "" if now[1] is None else f" {now[1][0]:,}/{now[1][1]:,} records"
        print(f"   [{what}] {now[0]}{done}", flush=True)

    return sync.on_status(show)


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show_open(rows: list[dict[str, Any]]) -> None:
    shown = [repr(r["title"]) + "".join(f" #{t}" for t in r["tags"]) for r in rows]
    print(f"   [live] open notes: {', '.join(shown) or '(none)'}")


def offline_part(app: App, sync: SyncThread, db_path: Path) -> None:
    step(f"Open the app at {db_path} (no account, no network)")
    print(f"   acting as {app.did}")
    print(f"   signing key stored in {db_path}.key (mode 0600)")

    step("Subscribe to open notes, newest first")
    sub = app.db.subscribe(
        "notes",
        show_open,
        where={"done": False},
        order_by="-id",  # keys are TIDs: they sort by creation time
        select=["title", "tags"],
    )

    step("Create three notes")
    groceries = app.actions.create_note("Groceries", "eggs, flour").result
    talk = app.actions.create_note("Draft the atproto talk").result
    trip = app.actions.create_note("Plan the trip").result

    step("Tag one, edit another (the edit does not touch the live query's fields)")
    app.actions.tag_note(talk, "work")
    app.actions.edit_note(groceries, body="eggs, flour, coffee")

    step("Complete two notes in one batch (all or none)")
    with app.batch():
        app.actions.complete_note(groceries)
        app.actions.complete_note(trip)

    step("An action that fails changes nothing")
    try:
        app.actions.tag_note("no-such-note", "oops")
    except ValueError as exc:
        print(f"   refused: {exc}; notes still {app.db.count('notes')}")

    step("Queries")
    done = app.db.query("notes", where={"done": True}, select=["title"], order_by="title")
    print(f"   done: {[r['title'] for r in done]}")
    print(f"   tagged 'work': {app.db.get('notes', talk)['tags']}")  # type: ignore[index]
    sub.cancel()

    step("History: the action log (hash-chained; 'sealed' = signed by the app's key)")
    verified = app.log.verify()
    for entry in app.log:
        args = [*entry.args, *(f"{k}={v!r}" for k, v in entry.kwargs.items())]
        mark = "sealed" if entry.signature else ("end of txn" if entry.hash else "")
        print(f"   {entry.id}  {entry.name:<14} {str(args)[:44]:<46} {mark}")
    print(f"   verified {verified} entries: chain intact, seals verify from the did:key")

    step("Rebuild: replay the log into empty tables")
    before = app.db.query("notes")
    replayed = app.rebuild()
    print(f"   replayed {replayed} actions; state identical: {app.db.query('notes') == before}")

    step("Plain SQL works on the same file")
    with sqlite3.connect(db_path) as raw:
        for title, done_flag in raw.execute("select title, done from notes order by title"):
            print(f"   sqlite3> {title!r:<28} done={done_flag}")
        (count,) = raw.execute("select count(*) from _atsync_log").fetchone()
        print(f"   sqlite3> {count} actions in _atsync_log")
        queued = raw.execute("select op, rkey from _atsync_outbox order by seq").fetchall()
        print(f"   sqlite3> queued for the PDS, coalesced per record: {queued}")
    print(f"   sync status: {sync.status.state}, {sync.status.pending} pending")


def sync_part(
    app: App, sync: SyncThread, signer: ATPSigner, data: Path, db_path: Path, pds_dir: Path | None
) -> None:
    step("Start a real PDS on loopback (atsync dev-pds)")
    installing = time.monotonic()
    ensure_installed(progress=lambda line: print(f"   {line}", flush=True))
    INSTALL[0] = time.monotonic() - installing  # the first time only: npm, ~90 s
    accounts = [(HANDLE, PASSWORD), (BOB, PASSWORD)]
    with DevPDS(accounts=accounts, data_dir=pds_dir) as pds:
        did, bob_did = pds.accounts[HANDLE].did, pds.accounts[BOB].did
        NAMES.update({did: HANDLE, bob_did: BOB})
        print(f"   PDS {pds.pds_url}, PLC {pds.plc_url}, account {HANDLE} = {did}")
        report(sync, pds.pds_url, did)  # not logged in: everything waits in the queue

        # The dev PDS's DID documents live on its own PLC directory: pulls check every
        # commit's signature against the key published there.
        os.environ["ATSYNC_PLC_URL"] = pds.plc_url

        step("Log in now (deferred auth): everything done offline is pushed, in order")
        signer.login(HANDLE, PASSWORD, pds.pds_url)
        logged_in = time.monotonic()
        status = sync.wait_for_idle(timeout=60)  # the login itself woke the engine
        print(
            f"   status: {status.state}, pending {status.pending}, failed {status.failed}, "
            f"has_synced {status.has_synced}; pushed {time.monotonic() - logged_in:.2f} s "
            "after login() returned"
        )
        report(sync, pds.pds_url, did)

        step("One more change while online: pushed within the debounce")
        result = app.actions.create_note("Written online")
        sync.wait_pushed(result.id, timeout=30)
        print(f"   action {result.id} is on the PDS")
        report(sync, pds.pds_url, did)

        step(f"The records in {did}/{COLLECTION}")

        async def remote() -> dict[str, dict[str, Any]]:
            assert signer.session is not None
            async with XrpcClient(session=signer.session) as client:
                return {v.rkey: v.value async for v in client.iter_records(did, COLLECTION)}

        records = anyio.run(remote)
        for rkey, value in sorted(records.items()):
            print(
                f"   {rkey}  {value['title']!r:<26} done={value['done']} tags={value.get('tags')}"
            )
        local = {r["id"] for r in app.db.query("notes")}
        print(f"   local notes == remote records: {local == set(records)}")
        report(sync, pds.pds_url, did)

        second_device(app, sync, data, pds.pds_url, did)
        another_person(app, sync, data, pds.pds_url, did, bob_did)

        step("The session key's authorization, verified offline from its proof")
        found = app.authorization(signer.key_did)
        assert found is not None
        account, collection, proof = found

        async def signing_key() -> str:
            async with IdentityResolver(plc_url=pds.plc_url, allow_insecure_localhost=True) as r:
                key = (await r.resolve_did(did)).signing_key
                assert key is not None  # resolve_did found the DID's #atproto key
                return key

        auth = verify_session(
            proof,
            account=account,
            signing_key=anyio.run(signing_key),
            session_key=signer.key_did,
            collection=collection,
        )
        print(f"   {auth.account} authorized {auth.session_key}")
        print(f"   at {collection}/{auth.rkey} ({len(proof)}-byte proof: commit + MST path)")
        print(
            f"   earlier offline actions are attributed to: "
            f"{sorted({app.author_of(e) for e in app.log if e.name != REMOTE_ACTION})}"
        )
        report(sync, pds.pds_url, did, bob_did)

        step("atsync status")
        sync.stop()
        cli = [
            sys.executable,
            "-m",
            "atsync",
            "status",
            "--db",
            str(db_path),
            "--session-dir",
            str(data / "sessions"),
        ]
        print("   $ atsync status --db notes.db", flush=True)
        out = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
        print("\n".join("   " + line for line in out.splitlines()))


def second_device(app: App, sync: SyncThread, data: Path, pds_url: str, did: str) -> None:
    step("A second device of the same account: everything comes back, verified")
    with another_install(data / "laptop") as (app2, signer2, sync2):
        with sync2:
            unshow = waiting(sync2, "laptop")
            signer2.login(HANDLE, PASSWORD, pds_url)
            status2 = sync2.wait_pulled(timeout=60)
            unshow()
            titles = sorted(r["title"] for r in app2.db.query("notes"))
            print(f"   laptop restored {len(titles)} notes at rev {status2.rev}: {titles}")
            print(f"   every commit checked against {did}'s signing key; rejected: "
                  f"{status2.rejected}")  # fmt: skip
            print(f"   phone == laptop: {_notes(app) == _notes(app2)}")
            report(sync2, pds_url, did)

        step("Both edit the same note, both offline: merged field by field")
        note = next(r for r in app.db.query("notes") if r["title"] == "Plan the trip")
        sync.stop()  # the phone goes offline too
        app.actions.edit_note(note["id"], title="Plan the trip to Lisbon")  # on the phone
        app2.actions.edit_note(note["id"], body="book the train")  # on the laptop
        print(f"   queued: phone {sync.status.pending}, laptop {sync2.status.pending}")
        both_online(sync, sync2)
        merged, laptop_row = app.db.get("notes", note["id"]), app2.db.get("notes", note["id"])
        assert merged is not None
        assert laptop_row is not None
        print(f"   phone:  title={merged['title']!r}, body={merged['body']!r}")
        print(f"   laptop: title={laptop_row['title']!r}, body={laptop_row['body']!r}")
        print(f"   phone == laptop: {_notes(app) == _notes(app2)}")
        report(sync2, pds_url, did)

        step("Both change the same field offline: the policy picks one, the conflict is kept")
        sync.stop()
        app.actions.edit_note(note["id"], body="book the train, 2nd class")  # on the phone
        app2.actions.edit_note(note["id"], body="fly instead")  # on the laptop
        both_online(sync, sync2)
        (conflict,) = sync2.engine.outbox.conflicts(1)
        local, remote = (json.loads(str(conflict[v]))["body"] for v in ("local", "remote"))
        print(
            f"   conflict on {conflict['fields']}: laptop {local!r} vs phone {remote!r}; "
            f"policy 'local' kept {json.loads(str(conflict['merged']))['body']!r}"
        )
        print(f"   phone == laptop: {_notes(app) == _notes(app2)}; recorded conflicts: "
              f"{sync2.status.conflicts} (`atsync conflicts --db …` lists them)")  # fmt: skip
        report(sync2, pds_url, did)

        step("A note with an image: the blob goes up before its record, the laptop fetches it")
        ref = app.blobs.put(PNG, "image/png")
        app.actions.attach_image(note["id"], ref.to_json())
        sync.wait_for_idle(timeout=30)
        with sync2:
            sync2.wait_pulled(timeout=60)  # the record, then its image (checked by its CID)
            there = app2.db.get("notes", note["id"])
            assert there is not None
            assert there["image"] == ref
            same = app2.blobs.read(ref) == PNG
            print(f"   image {ref.cid[:20]}… ({ref.size} bytes, {ref.mime_type})")
            print(f"   on the laptop, byte-identical: {same}")
            report(sync2, pds_url, did)


def both_online(phone: SyncThread, laptop: SyncThread) -> None:
    """The phone comes back online and pushes; then the laptop: it pulls the phone's edit,
    merges, pushes the result; the phone pulls that."""
    phone.start()
    phone.wait_for_idle(timeout=30)
    with laptop:
        laptop.wait_pulled(timeout=60)
        laptop.wait_for_idle(timeout=30)
        phone.wait_pulled(timeout=60)


def another_person(
    app: App, sync: SyncThread, data: Path, pds_url: str, did: str, bob_did: str
) -> None:
    step(f"{BOB} follows {HANDLE}: her notes arrive in his database, read-only, with their author")
    with another_install(data / "bob") as (bob, bob_signer, bob_sync), bob_sync:
        bob_signer.login(BOB, PASSWORD, pds_url)
        unshow = waiting(bob_sync, "bob")
        bob_sync.follow(did)
        bob_sync.wait_pulled(timeout=60)
        unshow()
        hers = [r for r in bob.db.query("notes") if r["id"].startswith(f"at://{did}/")]
        print(f"   bob sees {len(hers)} of alice's notes, keyed by AT URI, e.g.")
        origin = bob_sync.origin("notes", hers[0]["id"])
        assert origin is not None
        print(f"   {hers[0]['title']!r}: author {origin.did}, cid {origin.cid}")
        try:
            bob.actions.edit_note(hers[0]["id"], title="bob was here")
        except ActionError as exc:
            reason = str(exc).split("follows: ", 1)[-1].split(" (", 1)[0]
            print(f"   bob edits it: refused, {reason}")
        report(bob_sync, pds_url, did, bob_did)

        step("A shared draft: alice and bob both edit it, offline of each other, and converge")
        sync.follow(bob_did)  # alice follows bob back: a shared collection needs both
        app.actions.write_draft("trip", title="Lisbon trip", body="a first outline")
        sync.wait_for_idle(timeout=30)
        bob_sync.wait_pulled(timeout=60)
        bob_sync.stop()  # bob goes offline
        bob.actions.write_draft("trip", body="day 1: Alfama; day 2: Belem")  # bob: the body
        app.actions.write_draft("trip", title="Lisbon trip, May")  # alice: the title
        bob_sync.start()
        for each in (sync, bob_sync):
            each.wait_for_idle(timeout=30)
        for each in (sync, bob_sync):
            each.wait_pulled(timeout=60)
        for name, who in (("alice", app), ("bob", bob)):
            draft = who.db.get("drafts", "trip")
            assert draft is not None
            print(f"   {name}: title={draft['title']!r}, body={draft['body']!r}")
        print(f"   alice == bob: {app.db.get('drafts', 'trip') == bob.db.get('drafts', 'trip')}")
        report(bob_sync, pds_url, did, bob_did)


def _notes(app: App) -> dict[str, tuple[Any, ...]]:
    return {r["id"]: (r["title"], r["body"], r["done"]) for r in app.db.query("notes")}


def run(data: Path, offline: bool, pds_dir: Path | None) -> None:
    db_path = data / "notes.db"
    signer = ATPSigner(store=FileSessionStore(data / "sessions"))
    with App.open(db_path, contract, signer=signer) as app:
        sync = engine(app)
        with sync:
            offline_part(app, sync, db_path)
            if not offline:
                sync_part(app, sync, signer, data, db_path, pds_dir)
        sync.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, help="keep the databases and the PDS's data here (default: temporary)"
    )
    parser.add_argument("--offline", action="store_true", help="skip the PDS part")
    args = parser.parse_args()
    began = time.monotonic()
    if args.data:
        args.data.mkdir(parents=True, exist_ok=True)
        run(args.data, args.offline, args.data / "pds")
        print(f"\nDone. The databases are in {args.data}: open them with sqlite3.")
    else:
        tmp = Path(tempfile.mkdtemp(prefix="atsync-demo-"))
        try:
            run(tmp, args.offline, None)
        finally:
            shutil.rmtree(tmp)
        print("\nDone. Run with --data DIR to keep the databases and open them with sqlite3.")
    took = time.monotonic() - began - INSTALL[0]
    print(f"The scenario took {took:.1f} s (and {INSTALL[0]:.1f} s to check the PDS install).")
    print(REAL_ACCOUNT)


if __name__ == "__main__":
    main()

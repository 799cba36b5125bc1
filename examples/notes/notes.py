"""notes — a shared-notes app on the command line, local-first, synced with your AT Protocol
repository (an atsync example).

    N=".venv/bin/python examples/notes/notes.py --db notes.db"
    $N add "Buy milk"                        # works offline
    $N add "Holiday" --image beach.jpg
    $N ls
    $N login alice.bsky.social               # asks for an app password
    $N sync --wait                           # push, pull, done

Commands: ``add TEXT [--body B] [--image PATH] [--shared]``, ``edit ID TEXT``, ``rm ID``,
``ls [--json]``, ``login HANDLE [--service URL]`` (the password from ``ATSYNC_PASSWORD`` or a
prompt — use an app password), ``logout``, ``follow HANDLE_OR_DID``, ``unfollow
HANDLE_OR_DID``, ``invite HANDLE_OR_DID``, ``sync [--wait] [--timeout S]``, ``status``.

Every change is an action of ``notes_app`` — logged, signed, queued for the PDS in the same
transaction — so the app works offline from the first command; after ``login`` (and at each
``sync``) everything reaches the user's repository as records of the example's own Lexicons
(``lexicons/``). Notes of the people you follow appear (read-only, with their author).
``add --shared`` writes to the shared notebook: every person you ``invite`` — and who
invites you back — can edit those notes; everybody's copies merge field by field.

With ``atsync dev-pds`` (a local PDS), pass ``--service`` to ``login`` and export
``ATSYNC_PLC_URL`` as the dev PDS prints it, so that pulled commits are verified against
its PLC directory.
"""

from __future__ import annotations

import argparse
import getpass
import json
import mimetypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from notes_app import bindings, contract, lexicons

from atsync import ActionError, App, ATPSigner, AtsyncError, Debounce, SyncThread
from atsync.atproto import FileSessionStore

DEFAULT_TIMEOUT = 60.0


@contextmanager
def opened(args: argparse.Namespace) -> Iterator[tuple[App, ATPSigner, SyncThread]]:
    """The app, its signer and its (not yet started) sync engine: attached before any action
    runs, so every change is queued for the PDS in its own transaction."""
    store = FileSessionStore(args.session_dir) if args.session_dir else None
    signer = ATPSigner(store=store)
    with App.open(args.db, contract, signer=signer) as app:
        sync = SyncThread(app, bindings=bindings(), lexicons=lexicons(), push=Debounce(0.2))
        try:
            yield app, signer, sync
        finally:
            sync.close()


def note_rows(app: App, sync: SyncThread, me: str) -> list[dict[str, Any]]:
    """Every note (own, followed, shared) as ``ls`` shows it."""
    shown = []
    for model, shared in (("notes", False), ("drafts", True)):
        for row in app.db.query(model, order_by="id"):
            key = row["id"]
            origin = sync.origin(model, key)
            author = key[5:].split("/", 1)[0] if key.startswith("at://") else me
            if shared and origin is not None:
                author = origin.did
            image = row.get("image")
            shown.append(
                {
                    "id": key,
                    "text": row["title"],
                    "body": row.get("body"),
                    "author": author,
                    "shared": shared,
                    "image": image.cid if image is not None else None,
                }
            )
    return shown


def cmd_add(args: argparse.Namespace) -> int:
    with opened(args) as (app, _, _):
        if args.shared:
            if args.image or args.body:
                raise SystemExit("a shared note has a text only (no --body or --image)")
            key = app.actions.create_draft(args.text).result
        else:
            if args.image and not args.image.is_file():
                raise SystemExit(f"no image file {args.image}")
            with app.batch():  # the note and its image, all or nothing
                key = app.actions.create_note(args.text, args.body).result
                if args.image:
                    mime = mimetypes.guess_type(args.image)[0] or "application/octet-stream"
                    ref = app.blobs.put_file(args.image, mime)
                    app.actions.attach_image(key, ref.to_json())
        print(key)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    with opened(args) as (app, _, _):
        if app.db.get("notes", args.id) is not None:
            app.actions.edit_note(args.id, title=args.text)
        elif app.db.get("drafts", args.id) is not None:
            app.actions.write_draft(args.id, title=args.text)
        else:
            raise SystemExit(f"no note {args.id!r} (see `ls`)")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with opened(args) as (app, _, _):
        if app.db.get("notes", args.id) is not None:
            app.actions.delete_note(args.id)
        elif app.db.get("drafts", args.id) is not None:
            app.actions.delete_draft(args.id)
        else:
            raise SystemExit(f"no note {args.id!r} (see `ls`)")
    return 0


def own_did(signer: ATPSigner, sync: SyncThread) -> str:
    """Whose this device's own notes are: the account it syncs with (after a logout too),
    or before any login the device's own key."""
    if signer.session is not None:
        return signer.session.did
    return sync.engine.outbox.get_state("account") or signer.did


def cmd_ls(args: argparse.Namespace) -> int:
    with opened(args) as (app, signer, sync):
        me = own_did(signer, sync)
        rows = note_rows(app, sync, me)
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        mark = "shared " if row["shared"] else ""
        who = "" if row["author"] == me else f"  — {row['author']}"
        picture = f"  [image {row['image'][:16]}…]" if row["image"] else ""
        print(f"{row['id']}  {mark}{row['text']}{picture}{who}")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    password = os.environ.get("ATSYNC_PASSWORD") or getpass.getpass(
        f"app password for {args.handle}: "
    )
    with opened(args) as (_, signer, sync):
        session = signer.login(args.handle, password, args.service)
        print(f"logged in as {session.did} on {session.pds_url}")
        return sync_round(sync, signer, wait=False, timeout=args.timeout)


def cmd_logout(args: argparse.Namespace) -> int:
    with opened(args) as (_, signer, _):
        signer.logout()
    print("logged out; notes stay here and new ones wait for the next login")
    return 0


def cmd_follow(args: argparse.Namespace, *, invite: bool = False) -> int:
    with opened(args) as (_, signer, sync):
        with sync:
            did = sync.follow(args.who)  # a handle is resolved (and checked) by the engine
        print(f"following {did}")
        if invite:
            print(
                "shared notes: they see and edit yours once they invite you too "
                f"(`notes.py invite {signer.did}`)"
            )
        return sync_round(sync, signer, wait=False, timeout=args.timeout)


def cmd_unfollow(args: argparse.Namespace) -> int:
    with opened(args) as (_, _, sync), sync:
        gone = sync.unfollow(args.who)
    print("unfollowed; their notes are gone from here" if gone else "was not following them")
    return 0


def sync_round(sync: SyncThread, signer: ATPSigner, *, wait: bool, timeout: float) -> int:
    """Push what is queued and pull what is new (own, followed, their images); without
    ``wait``, give up after ``timeout`` seconds (what is left stays queued)."""
    status = sync.status
    if not signer.authenticated:
        print(f"not logged in: {status.pending} changes wait for `login`")
        return 0
    with sync:
        limit = None if wait else timeout
        try:
            sync.push_now()
            sync.wait_for_idle(timeout=limit)  # pushed first: the pull then includes it
            sync.wait_pulled(timeout=limit)
            status = sync.wait_for_idle(timeout=limit)  # and what a merge queued goes up
        except TimeoutError:
            status = sync.status
            print(f"still working after {timeout:.0f} s: {status.state}, {status.pending} queued")
            return 1
    print(
        f"synced: {status.pending} queued, {status.failed} failed, {status.conflicts} "
        f"conflicts, rev {status.rev}"
        + (f", {status.blobs_missing} images not fetched yet" if status.blobs_missing else "")
    )
    return 0 if status.failed == 0 else 1


def cmd_sync(args: argparse.Namespace) -> int:
    with opened(args) as (_, signer, sync):
        return sync_round(sync, signer, wait=args.wait, timeout=args.timeout)


def cmd_status(args: argparse.Namespace) -> int:
    with opened(args) as (app, signer, sync):
        status = sync.status
        print(f"account    {signer.session.did if signer.session else 'not logged in'}")
        print(f"notes      {app.db.count('notes')} ({app.db.count('drafts')} shared)")
        print(f"queued     {status.pending} changes for the PDS; {status.failed} failed")
        print(f"conflicts  {status.conflicts} recorded; {status.rejected} pulled records refused")
        print(f"following  {', '.join(sync.following) or 'nobody'}")
        print(f"synced     {'yes' if status.has_synced else 'never'}; rev {status.rev}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="notes.py", description=__doc__.splitlines()[0])
    top.add_argument("--db", required=True, type=Path, help="the notes database (a file)")
    top.add_argument("--session-dir", type=Path, help="where the login session is kept")
    top.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="sync time limit")
    commands = top.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a note")
    add.add_argument("text")
    add.add_argument("--body")
    add.add_argument("--image", type=Path, help="an image file to attach")
    add.add_argument("--shared", action="store_true", help="in the shared notebook")
    add.set_defaults(run=cmd_add)
    edit = commands.add_parser("edit", help="change a note's text")
    edit.add_argument("id")
    edit.add_argument("text")
    edit.set_defaults(run=cmd_edit)
    rm = commands.add_parser("rm", help="delete a note")
    rm.add_argument("id")
    rm.set_defaults(run=cmd_rm)
    ls = commands.add_parser("ls", help="list the notes")
    ls.add_argument("--json", action="store_true", help="one JSON object per note")
    ls.set_defaults(run=cmd_ls)
    login = commands.add_parser("login", help="log in (deferred: offline notes go up now)")
    login.add_argument("handle")
    login.add_argument("--service", help="the PDS URL (default: found from the handle)")
    login.set_defaults(run=cmd_login)
    commands.add_parser("logout", help="log out").set_defaults(run=cmd_logout)
    for name, helps, run in (
        ("follow", "see someone's notes", cmd_follow),
        ("invite", "share the notebook with someone (they invite you too)",
         lambda a: cmd_follow(a, invite=True)),
        ("unfollow", "stop seeing someone's notes", cmd_unfollow),
    ):  # fmt: skip
        sub = commands.add_parser(name, help=helps)
        sub.add_argument("who", metavar="HANDLE_OR_DID")
        sub.set_defaults(run=run)
    sync = commands.add_parser("sync", help="push and pull now")
    sync.add_argument("--wait", action="store_true", help="as long as it takes (no time limit)")
    # Also after the command (`sync --timeout 5`); SUPPRESS keeps a top-level one otherwise.
    sync.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="time limit")
    sync.set_defaults(run=cmd_sync)
    commands.add_parser("status", help="what is queued, failed, followed").set_defaults(
        run=cmd_status
    )
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ActionError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except AtsyncError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

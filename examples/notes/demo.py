"""`make demo`: a scripted session of the offline notes app.

Shows actions, queries, a live subscription, the action log (history), its verification,
replaying the log, and reading the same data with plain SQL. Everything happens offline,
before any login: the app signs with a did:key created beside its database.

    python examples/notes/demo.py [--data DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from notes_app import contract

from atsync import App


def step(text: str) -> None:
    print(f"\n== {text}")


def show_open(rows: list[dict]) -> None:
    shown = [repr(r["title"]) + "".join(f" #{t}" for t in r["tags"]) for r in rows]
    print(f"   [live] open notes: {', '.join(shown) or '(none)'}")


def run(data: Path) -> None:
    db_path = data / "notes.db"
    step(f"Open the app at {db_path} (no account, no network)")
    with App.open(db_path, contract) as app:
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
        print(f"   tagged 'work': {app.db.get('notes', talk)['tags']}")
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
        for title, done in raw.execute("select title, done from notes order by title"):
            print(f"   sqlite3> {title!r:<28} done={done}")
        (count,) = raw.execute("select count(*) from _atsync_log").fetchone()
        print(f"   sqlite3> {count} actions in _atsync_log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="keep the database here (default: temporary)")
    args = parser.parse_args()
    if args.data:
        args.data.mkdir(parents=True, exist_ok=True)
        run(args.data)
        return
    tmp = Path(tempfile.mkdtemp(prefix="atsync-demo-"))
    try:
        run(tmp)
    finally:
        shutil.rmtree(tmp)
    print("\nDone. Run with --data DIR to keep the database and open it with sqlite3.")


if __name__ == "__main__":
    main()

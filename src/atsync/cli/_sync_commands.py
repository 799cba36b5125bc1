"""``atsync status | outbox | push | retry | login``: the sync state of a database.

They work on the database file alone (no app code needed): the outbox holds complete
records, and the session of the database's key is in the session store.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import click

from .._errors import AtsyncError
from ..app._signers import LocalSigner, key_path_for
from ..atproto._session import FileSessionStore, Session, login
from ..atproto._xrpc import XrpcClient
from ..db import ModelDB
from ..sync._budget import RateBudget
from ..sync._outbox import OUTBOX, Outbox, create_sync_tables
from ..sync._pusher import Pusher, PushResult
from ._main import main

DB_OPTION = click.option(
    "--db",
    "db_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The app's database file.",
)
SESSIONS_OPTION = click.option(
    "--session-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where sessions are stored (default: the user's data directory).",
)


def _open(db_path: Path) -> tuple[ModelDB, Outbox]:
    try:
        db = ModelDB.open_existing(db_path)
    except AtsyncError as exc:
        raise click.ClickException(str(exc)) from None
    with db.transaction():
        create_sync_tables(db.connection)
    return db, Outbox(db)


def _session(db_path: Path, session_dir: Path | None) -> tuple[str, Session | None]:
    key_file = key_path_for(db_path)
    if not key_file.exists():
        raise click.ClickException(
            f"no signing key at {key_file}: was this database opened by an atsync App?"
        )
    key_did = LocalSigner.load_or_create(key_file).key_did
    store = FileSessionStore(session_dir)
    return key_did, Session.resume(store, f"atsync-session-{key_did}")


def _when(value: str | None) -> str:
    if not value:
        return "never"
    at = float(value)
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({time.time() - at:.0f} s ago)"


@main.command()
@DB_OPTION
@SESSIONS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(db_path: Path, session_dir: Path | None, as_json: bool) -> None:
    """What is waiting, failing or in conflict, and when the database last synced."""
    db, outbox = _open(db_path)
    with db:
        pending, failed, conflicts = outbox.counts()
        ops = dict(db.execute(f"SELECT op, count(*) FROM {OUTBOX} GROUP BY op").fetchall())
        key_did, session = _session(db_path, session_dir)
        info: dict[str, Any] = {
            "database": str(db_path),
            "session_key": key_did,
            "account": session.did if session else None,
            "pending": pending,
            "pending_by_op": ops,
            "failed": failed,
            "conflicts": conflicts,
            "last_pushed_at": float(v) if (v := outbox.get_state("last_pushed_at")) else None,
            "has_synced": outbox.get_state("has_synced") == "1",
            "commit": outbox.get_state("commit_rev"),
        }
        last_push = _when(outbox.get_state("last_pushed_at"))
    if as_json:
        click.echo(json.dumps(info))
        return
    by_op = ", ".join(f"{n} {op}" for op, n in sorted(ops.items()))
    click.echo(f"database    {db_path}")
    click.echo(f"account     {info['account'] or 'not logged in'}   (session key {key_did})")
    click.echo(f"pending     {pending} writes" + (f" ({by_op})" if by_op else ""))
    click.echo(
        f"failed      {failed} dead letters" + ("  -> atsync outbox / retry" if failed else "")
    )
    click.echo(f"conflicts   {conflicts}")
    click.echo(f"last push   {last_push}")
    click.echo(f"has synced  {'yes' if info['has_synced'] else 'no'}")


@main.command()
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--limit", default=50, show_default=True, help="Pending writes to list.")
def outbox(db_path: Path, as_json: bool, limit: int) -> None:
    """List pending writes (oldest first) and dead letters with the server's reason."""
    db, box = _open(db_path)
    with db:
        rows = db.execute(
            f"SELECT seq, op, collection, rkey, attempts, last_error FROM {OUTBOX} "
            "ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        dead = box.dead_letters()
    if as_json:
        for seq, op, collection, rkey, attempts, error in rows:
            click.echo(
                json.dumps(
                    {
                        "pending": seq,
                        "op": op,
                        "uri": f"{collection}/{rkey}",
                        "attempts": attempts,
                        "last_error": error,
                    }
                )
            )
        for d in dead:
            click.echo(
                json.dumps(
                    {
                        "dead_letter": d.seq,
                        "op": d.op,
                        "uri": f"{d.collection}/{d.rkey}",
                        "error": d.error,
                        "message": d.message,
                        "failed_at": d.failed_at,
                    }
                )
            )
        return
    click.echo(f"pending ({len(rows)} shown)")
    for seq, op, collection, rkey, attempts, error in rows:
        tail = f"  attempts={attempts}" + (f"  last error: {error}" if error else "")
        click.echo(f"  #{seq:<6} {op:<7} {collection}/{rkey}{tail if attempts else ''}")
    click.echo(f"dead letters ({len(dead)})")
    for d in dead:
        click.echo(f"  #{d.seq:<6} {d.op:<7} {d.collection}/{d.rkey}  {d.error}: {d.message}")


@main.command()
@DB_OPTION
def retry(db_path: Path) -> None:
    """Put every dead letter back into the queue (after fixing what the server refused)."""
    db, box = _open(db_path)
    with db:
        count = box.retry_dead_letters()
    click.echo(f"{count} dead letters queued again")


@main.command()
@DB_OPTION
@SESSIONS_OPTION
@click.argument("identifier")
@click.option("--service", help="The PDS URL (default: resolved from the handle or DID).")
def login_command(
    db_path: Path, session_dir: Path | None, identifier: str, service: str | None
) -> None:
    """Log in for this database's session key (password from $ATSYNC_PASSWORD or a prompt)."""
    password = os.environ.get("ATSYNC_PASSWORD") or getpass.getpass(f"password for {identifier}: ")
    key_did, _ = _session(db_path, session_dir)
    if service is None:
        from ..atproto._identity import IdentityResolver

        async def resolve() -> str:
            async with IdentityResolver() as resolver:
                return (await resolver.resolve(identifier)).pds

        service = anyio.run(resolve)
    store = FileSessionStore(session_dir)
    try:
        session = anyio.run(
            lambda: login(
                identifier, password, service, store=store, key=f"atsync-session-{key_did}"
            )
        )
    except AtsyncError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"logged in as {session.did} ({session.handle}) at {session.pds_url}")


login_command.name = "login"


@main.command()
@DB_OPTION
@SESSIONS_OPTION
def push(db_path: Path, session_dir: Path | None) -> None:
    """Push everything queued now, with the stored session; exits non-zero if some is left."""
    db, box = _open(db_path)
    with db:
        _, session = _session(db_path, session_dir)
        if session is None:
            raise click.ClickException("not logged in: run `atsync login --db ... HANDLE`")
        budget = RateBudget()
        budget.loads(box.get_state("budget"))
        pusher = Pusher(box, budget)
        result = PushResult()

        async def run() -> None:
            async with XrpcClient(session=session) as client:
                while await pusher.push_batch(session.did, client, result):
                    pending, _, _ = box.counts()
                    click.echo(f"\rpushed {result.pushed}, {pending} left", nl=False, err=True)

        try:
            anyio.run(run)
        except AtsyncError as exc:
            raise click.ClickException(f"push stopped: {exc} (the queue is kept)") from None
        click.echo("", err=True)
        pending, failed, _ = box.counts()
    click.echo(
        f"pushed {result.pushed} writes ({result.already_applied} were already on the "
        f"PDS); {pending} pending, {failed} dead letters"
    )
    if result.rate_wait:
        click.echo(f"rate budget: wait {result.rate_wait:.0f} s before pushing the rest")
    sys.exit(0 if pending == 0 else 1)

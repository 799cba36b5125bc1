"""``atsync status | outbox | push | retry | login``: the sync state of a database.

They work on the database file alone (no app code needed): the outbox holds complete
records, and the session of the database's key is in the session store.
"""

from __future__ import annotations

import getpass
import importlib
import json
import os
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import click

from .._errors import AtsyncError, TransactionError
from ..app import App, ATPSigner, LocalSigner, key_path_for, writer_lock
from ..atproto import (
    FileSessionStore,
    IdentityResolver,
    OAuthSession,
    Session,
    login,
    resume_session,
)
from ..db import ModelDB
from ..sync import (
    ATSync,
    Manual,
    Outbox,
    State,
    SyncStatus,
    WaitReason,
    followed_repositories,
)
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
    box = Outbox(db)
    box.create_tables()
    return db, box


def _session(db_path: Path, session_dir: Path | None) -> tuple[str, Session | OAuthSession | None]:
    key_file = key_path_for(db_path)
    if not key_file.exists():
        raise click.ClickException(
            f"no signing key at {key_file}: was this database opened by an atsync App?"
        )
    key_did = LocalSigner.load_or_create(key_file).key_did
    store = FileSessionStore(session_dir)
    return key_did, resume_session(store, f"atsync-session-{key_did}")


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
        ops = outbox.counts_by_op()
        key_did, session = _session(db_path, session_dir)
        info: dict[str, Any] = {
            "database": str(db_path),
            "session_key": key_did,
            "account": session.did if session else None,
            "pending": pending,
            "pending_by_op": ops,
            "failed": failed,
            "conflicts": conflicts,
            "rejected": outbox.rejected_count(),
            "last_pushed_at": float(v) if (v := outbox.get_state("last_pushed_at")) else None,
            "last_pulled_at": float(v) if (v := outbox.get_state("last_pulled_at")) else None,
            "rev": outbox.get_state("pulled_rev"),
            "has_synced": outbox.get_state("has_synced") == "1",
            "commit": outbox.get_state("commit_rev"),
            "engine": _engine_status(db_path, outbox.get_state("engine")),
            "following": [asdict(f) for f in followed_repositories(db)],
            "blobs_uploaded": outbox.blobs_uploaded(),
        }
        last_push = _when(outbox.get_state("last_pushed_at"))
        last_pull = _when(outbox.get_state("last_pulled_at"))
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
    click.echo(f"conflicts   {conflicts}" + ("  -> atsync conflicts" if conflicts else ""))
    click.echo(
        f"rejected    {info['rejected']} pulled records not applied"
        + ("  -> atsync rejected" if info["rejected"] else "")
    )
    click.echo(f"last push   {last_push}")
    click.echo(f"last pull   {last_pull}" + (f"  (rev {info['rev']})" if info["rev"] else ""))
    click.echo(f"has synced  {'yes' if info['has_synced'] else 'no'}")
    click.echo(f"engine      {_describe_engine(info['engine'])}")
    missing, blob_error = info["engine"].get("blobs_missing"), info["engine"].get("blob_error")
    if info["blobs_uploaded"] or missing:
        click.echo(
            f"blobs       {info['blobs_uploaded']} uploaded"
            + (f"; {missing} referenced but not fetched yet" if missing else "")
            + (f" (last error: {blob_error})" if blob_error else "")
        )
    for followed in info["following"]:
        name = followed["handle"] or followed["did"]
        pulled = _when(str(followed["last_pulled_at"]) if followed["last_pulled_at"] else None)
        click.echo(
            f"following   {name}: {followed['records']} records, last pull {pulled}"
            + (f" (rev {followed['rev']})" if followed["rev"] else "")
        )


def _engine_status(db_path: Path, saved: str | None) -> dict[str, Any]:
    """What the engine last said about itself, and whether an app holds the database now."""
    try:
        shown = json.loads(saved) if saved else {}
    except ValueError:
        shown = {}
    if not isinstance(shown, dict):
        shown = {}
    try:
        with writer_lock(db_path):
            running = False
    except TransactionError:
        running = True
    return {**shown, "app_running": running}


def _describe_engine(engine: dict[str, Any]) -> str:
    state = engine.get("state")
    if state is None:
        return "never ran" + ("  (an app has the database open)" if engine["app_running"] else "")
    text = str(state)
    if engine.get("waiting_reason"):
        text += f" ({engine['waiting_reason']})"
    if engine.get("resumes_at"):
        text += f", resumes {_when_future(float(engine['resumes_at']))}"
    if engine.get("upload_error") and state != "idle":
        text += f"; last error: {engine['upload_error']}"
    if engine["app_running"]:
        return f"{text}  (app running, pid {engine.get('pid')})"
    return f"not running; last: {text}"


def _when_future(at: float) -> str:
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} (in {max(0.0, at - time.time()):.0f} s)"


@main.command()
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--limit", default=50, show_default=True, help="Pending writes to list.")
def outbox(db_path: Path, as_json: bool, limit: int) -> None:
    """List pending writes (oldest first) and dead letters with the server's reason."""
    db, box = _open(db_path)
    with db:
        rows = box.listing(limit)
        dead = box.dead_letters()
    if as_json:
        for w in rows:
            click.echo(
                json.dumps(
                    {
                        "pending": w.seq,
                        "op": w.op,
                        "uri": f"{w.collection}/{w.rkey}",
                        "attempts": w.attempts,
                        "last_error": w.last_error,
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
    for w in rows:
        tail = f"  attempts={w.attempts}" + (
            f"  last error: {w.last_error}" if w.last_error else ""
        )
        click.echo(f"  #{w.seq:<6} {w.op:<7} {w.collection}/{w.rkey}{tail if w.attempts else ''}")
    click.echo(f"dead letters ({len(dead)})")
    for d in dead:
        click.echo(f"  #{d.seq:<6} {d.op:<7} {d.collection}/{d.rkey}  {d.error}: {d.message}")


@main.command()
@DB_OPTION
@SESSIONS_OPTION
@click.option(
    "--app",
    "app_ref",
    required=True,
    help="MODULE[:ATTR]: where the app's `contract` and `bindings` are (and, optionally, "
    "`sync_options`, a dict of further ATSync arguments). The current directory is searched.",
)
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for it.")
def pull(db_path: Path, session_dir: Path | None, app_ref: str, timeout: float) -> None:
    """Pull once: bring the database up to the repository's head, through the app's own
    bindings and the same engine as the library (verified, merged, nothing pushed)."""
    spec = _load_app(app_ref)
    contract, bindings = getattr(spec, "contract", None), getattr(spec, "bindings", None)
    if contract is None or bindings is None:
        raise click.ClickException(f"{app_ref} has no `contract` and `bindings`")
    options = dict(getattr(spec, "sync_options", None) or {})
    options.update(push=Manual(), pull=Manual())
    signer = ATPSigner(store=FileSessionStore(session_dir))
    try:
        app = App.open(db_path, contract, signer=signer)
    except AtsyncError as exc:
        raise click.ClickException(str(exc)) from None
    with app:
        if signer.session is None:
            raise click.ClickException("not logged in: run `atsync login --db ... HANDLE`")
        from ._login_oauth import session_resolver

        # An account of a running dev PDS: its commits are verified against that PDS's PLC.
        identity = None if "identity" in options else session_resolver(signer.session)
        if identity is not None:
            options["identity"] = identity
        sync = ATSync(app, bindings=bindings, **options)
        try:
            status = anyio.run(_drive_pull, sync, timeout, identity)
        finally:
            sync.close()
    click.echo(
        f"pulled rev {status.rev}: {status.conflicts} conflicts, {status.rejected} rejected, "
        f"{status.pending} local changes queued"
    )
    if status.download_error:
        click.echo(f"stopped: {status.download_error}", err=True)
        sys.exit(1)


async def _drive_pull(
    sync: ATSync, seconds: float, identity: IdentityResolver | None
) -> SyncStatus:
    try:
        async with sync:
            try:
                with anyio.fail_after(seconds):
                    await sync.wait_pulled()
            except TimeoutError:
                pass  # the status says why
            return sync.status
    finally:
        if identity is not None:  # on this loop, where its connections were made
            await identity.aclose()


def _load_app(ref: str) -> object:
    module_name, _, attr = ref.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.ClickException(f"cannot import {module_name}: {exc}") from None
    finally:
        sys.path.pop(0)
    if not attr:
        return module
    try:
        return getattr(module, attr)
    except AttributeError:
        raise click.ClickException(f"{module_name} has no {attr!r}") from None


@main.command()
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--limit", default=50, show_default=True, help="How many to list.")
def conflicts(db_path: Path, as_json: bool, limit: int) -> None:
    """List merges where a field changed both here and elsewhere: base, local, remote and
    merged versions, and how it was decided (newest first)."""
    db, box = _open(db_path)
    with db:
        found = box.conflicts(limit)
    if not found and not as_json:
        click.echo("no conflicts recorded")
    for c in found:
        if as_json:
            click.echo(json.dumps(c))
            continue
        click.echo(
            f"#{c['id']:<5} {c['model']}/{c['key']}  fields: {c['fields'] or '(record)'}  "
            f"-> {c['resolution']}  ({_when(repr(c['detected_at']))})"
        )
        for side in ("base", "local", "remote", "merged"):
            if c[side] is not None:
                click.echo(f"         {side:<7}{c[side]}")


@main.command()
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--limit", default=50, show_default=True, help="How many to list.")
def rejected(db_path: Path, as_json: bool, limit: int) -> None:
    """List pulled input that was not applied (forged, damaged, breaking the binding or its
    Lexicon), with the reason (newest first)."""
    db, box = _open(db_path)
    with db:
        found = box.rejected(limit)
    if not found and not as_json:
        click.echo("nothing rejected")
    for r in found:
        if as_json:
            click.echo(json.dumps(r))
            continue
        where = f"{r['collection']}/{r['rkey']}" if r["collection"] else "(the repository)"
        click.echo(f"#{r['id']:<5} {where}  {r['reason']}: {r['detail']}")


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
@click.option("--oauth", is_flag=True, help="Log in through the browser (OAuth), no password.")
@click.option("--client-id", help="With --oauth: the app's client-metadata URL (default loopback).")
@click.option("--no-browser", is_flag=True, help="With --oauth: only print the URL to open.")
def login_command(
    db_path: Path,
    session_dir: Path | None,
    identifier: str,
    service: str | None,
    oauth: bool,
    client_id: str | None,
    no_browser: bool,
) -> None:
    """Log in for this database's session key (password from $ATSYNC_PASSWORD or a prompt;
    with --oauth in the browser instead, see docs/oauth.md)."""
    if oauth:
        from ._login_oauth import oauth_login_for

        key_did, _ = _session(db_path, session_dir)
        session: Session | OAuthSession = oauth_login_for(
            key_did,
            identifier,
            session_dir=session_dir,
            service=service,
            client_id=client_id,
            browser=not no_browser,
        )
        click.echo(f"logged in as {session.did} ({session.handle}) at {session.pds_url}")
        return
    password = os.environ.get("ATSYNC_PASSWORD") or getpass.getpass(f"password for {identifier}: ")
    key_did, _ = _session(db_path, session_dir)
    store = FileSessionStore(session_dir)

    async def password_login() -> Session:
        pds = service
        if pds is None:
            from ._login_oauth import login_resolver

            async with await login_resolver(identifier, None) as resolver:
                pds = (await resolver.resolve(identifier)).pds
        return await login(identifier, password, pds, store=store, key=f"atsync-session-{key_did}")

    try:
        session = anyio.run(password_login)
    except AtsyncError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"logged in as {session.did} ({session.handle}) at {session.pds_url}")


login_command.name = "login"


@main.command()
@DB_OPTION
@SESSIONS_OPTION
def logout(db_path: Path, session_dir: Path | None) -> None:
    """End this database's session: revoked on the server (the OAuth grant, or the password
    session) and removed here. An app that has the database open is logged out at its next
    request to the PDS."""
    key_did, session = _session(db_path, session_dir)
    if session is None:
        click.echo(f"not logged in: no session is stored for {db_path} (session key {key_did})")
        return
    who = f"{session.did} ({session.handle}) at {session.pds_url}"
    try:
        anyio.run(session.logout)
    except AtsyncError as exc:
        # The stored copy is gone all the same (logout deletes it whatever the server says).
        raise click.ClickException(
            f"removed the session of {who} here, but the PDS could not be told ({exc}); "
            "revoke it from the account's settings if it matters"
        ) from None
    click.echo(f"logged out {who}")


@main.command()
@DB_OPTION
@SESSIONS_OPTION
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    help="Seconds to keep retrying a PDS that fails or does not answer (the queue is kept).",
)
def push(db_path: Path, session_dir: Path | None, timeout: float) -> None:
    """Push everything queued now, with the stored session; exits non-zero if some is left.

    Runs the library's own engine on the database file (reconcile after an unknown outcome,
    fencing, rate limits), so it may only run while no app has the database open.
    """
    try:
        with writer_lock(db_path):
            _push(db_path, session_dir, timeout)
    except TransactionError as exc:
        raise click.ClickException(
            f"{db_path} is open in a running app, whose own sync engine pushes its queue; "
            f"nothing was sent ({exc})"
        ) from None


def _push(db_path: Path, session_dir: Path | None, timeout: float) -> None:
    db, box = _open(db_path)
    with db:
        _, session = _session(db_path, session_dir)
        if session is None:
            raise click.ClickException("not logged in: run `atsync login --db ... HANDLE`")
        before, failed_before, _ = box.counts()
        sync = ATSync.from_database(db, session=session, push=Manual())
        final = anyio.run(_drive_push, sync, timeout)
        pending, failed, _ = box.counts()
    click.echo("", err=True)
    pushed = before - pending - max(0, failed - failed_before)
    click.echo(f"pushed {pushed} writes; {pending} pending, {failed} dead letters")
    if pending:
        click.echo(f"stopped: {_why(final)} (the queue is kept)")
    sys.exit(0 if pending == 0 else 1)


async def _drive_push(sync: ATSync, seconds: float) -> SyncStatus:
    """Run the engine until the queue is empty, or until it waits for something a command
    cannot wait for (a login, an hour's rate window), or ``seconds`` of failures."""
    last = sync.status
    sync.push_now()  # before the start: its first decision is this push
    async with sync:
        with anyio.move_on_after(seconds):
            async for status in sync.status_changes():
                last = status
                click.echo(f"\r{status.state}: {status.pending} pending   ", nl=False, err=True)
                if status.pending == 0 and status.state is State.IDLE:
                    break
                if status.state is State.NEEDS_AUTH or status.waiting_reason in (
                    WaitReason.RATE_LIMITED,
                    WaitReason.WRONG_ACCOUNT,
                    WaitReason.MANUAL,
                ):
                    break
    return last


def _why(status: SyncStatus) -> str:
    if status.waiting_reason is WaitReason.RATE_LIMITED and status.resumes_at:
        return f"rate limited until {_when_future(status.resumes_at)}"
    if status.state is State.NEEDS_AUTH:
        return f"the PDS refused the session ({status.upload_error}); run `atsync login`"
    return f"{status.state}: {status.upload_error or status.waiting_reason or 'timed out'}"

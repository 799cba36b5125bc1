"""Two-way sync of a folder of Markdown files (an Obsidian vault) with the user's repository.

    python examples/vault/vault.py --db vault.db --dir ~/Notes --login alice.example.com
    python examples/vault/vault.py --db vault.db --dir ~/Notes          # later: session kept
    python examples/vault/vault.py --db vault.db --dir ~/Notes --once   # scan, sync, exit

How it works:

- Each Markdown file is a row of ``files`` (path, front matter kept verbatim, body) and a
  ``com.example.vault.file`` record; every other file is a row of ``attachments`` whose bytes
  are a blob (``com.example.vault.attachment``). Keys are TIDs: a rename keeps the record.
- A polling scanner (every 0.5 s; no dependency) compares each file's (mtime, size, sha256)
  with what this device last saw or wrote (the ``disk`` model) and turns create, edit, rename
  (same content at a new path in one scan) and delete into actions (``vault_disk.Vault.scan``).
- Pulled changes are found in the action log (its ``$remote`` entries since the last pass)
  and written atomically (temporary file + rename), their sha256 recorded so the scanner
  does not send them back (``Vault.apply``); a file edited meanwhile is merged, not lost.
- Conflicts: ``ATSync(conflicts=VaultConflicts(keep))`` merges a pulled version with an
  unpushed local edit field by field and notes line by line; when the same lines changed,
  ``keep`` (a callable, ``--keep``) picks the version that stays and the other is written
  beside it as ``NAME (conflict DEVICE DATE).md``, queued inside the pull's transaction in a
  local-only column and written to disk after it, then synced as a file of its own.
- Collaborators: ``--follow alice.example.com`` mirrors Alice's vault, read-only, into
  ``@alice.example.com/`` (nobody writes into another person's repository).

Sessions are kept in ``<db>.sessions/`` (``--session-dir``); the password comes from
``$ATSYNC_PASSWORD`` or a prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).parent))

from vault_app import NSID, VaultConflicts, bindings, contract, followed_names, lexicons
from vault_disk import Vault
from vault_merge import KEEP_POLICIES, KeepPolicy, device_name, keep_local

from atsync import App, ATPSigner, AtsyncError, Debounce, Immediate, Live, Manual, SyncThread
from atsync.atproto import FileSessionStore, is_valid_did
from atsync.sync import State, SyncStatus, followed_repositories

__all__ = ["Device", "main", "open_device", "sync_once", "watch"]


@dataclass
class Device:
    """One running installation: the app, its sync engine, its vault folder."""

    app: App
    signer: ATPSigner
    sync: SyncThread
    vault: Vault

    @property
    def logged_in(self) -> bool:
        return self.signer.session is not None


@contextlib.contextmanager
def open_device(
    db: Path,
    folder: Path,
    *,
    device: str,
    keep: KeepPolicy = keep_local,
    login: tuple[str, str, str | None] | None = None,
    session_dir: Path | None = None,
    follow: Sequence[str] = (),
    nsid: str = NSID,
    once: bool = False,
    report: Callable[[str], None] = print,
) -> Iterator[Device]:
    """Open the vault's database and start its sync engine; ``login`` = (handle, password,
    service or None). ``once``: pull only when asked and push at once (a single round)."""
    signer = ATPSigner(store=FileSessionStore(session_dir or Path(f"{db}.sessions")))
    with App.open(db, contract, signer=signer) as app:
        sync = SyncThread(
            app,
            bindings=bindings(nsid),
            lexicons=lexicons(nsid),  # every record is checked against them before it queues
            conflicts=VaultConflicts(keep, current=app.db.get),
            push=Immediate() if once else Debounce(1.0),  # a debounce: editors save often
            pull=Manual() if once else Live(),
        )
        try:
            if login is not None:
                signer.login(*login)

            def handles() -> Mapping[str, str | None]:
                held = {r.did: r.handle for r in followed_repositories(sync.engine.db)}
                return held | followed_names(app.db)

            vault = Vault(app, folder, device=device, keep=keep, follows=handles, report=report)
            if not once:
                sync.on_status(_pushed_reporter(report))
            with sync:
                for who in follow:
                    # A handle is resolved by the engine (through the user's own PDS where DNS
                    # cannot); kept in the database, so again is a no-op.
                    did = sync.follow(who)
                    if not is_valid_did(who) and followed_names(app.db).get(did) != who:
                        app.actions.name_followed(did, who)  # the mirror folder's name
                yield Device(app, signer, sync, vault)
        finally:
            sync.close()


def _pushed_reporter(report: Callable[[str], None]) -> Callable[[SyncStatus], None]:
    """Says "up to date" each time the queue drains (on the engine's thread)."""
    busy = False

    def on_status(status: SyncStatus) -> None:
        nonlocal busy
        if status.pending:
            busy = True
        elif busy and status.state == State.IDLE:
            busy = False
            report("up to date: every change is on the PDS")

    return on_status


def sync_once(device: Device, *, timeout: float = 60) -> str:
    """One round: write what earlier runs pulled, scan, pull, write, push — until a pass
    finds nothing more to do (a push can meet another device's commit and merge). Stops
    the engine and returns a one-line summary."""
    vault, sync = device.vault, device.sync
    vault.apply(everything=True)
    vault.scan()
    if device.logged_in:
        sync.wait_pulled(timeout=timeout)
    for who, why in sync.engine.follow_errors.items():
        vault.report(f"cannot follow {who}: {why}")
    waiting = 0
    for _ in range(10):
        applied = vault.apply()
        changes = applied.changes + vault.scan().changes
        waiting = applied.waiting
        if not device.logged_in:
            break
        sync.wait_for_idle(timeout=timeout)
        if not changes:
            break
    sync.stop()  # a stopped engine's status counts the queue afresh
    status = sync.status
    if not device.logged_in:
        return f"not logged in: {status.pending} changes wait (--login HANDLE)"
    line = f"synced: {status.pending} queued, {status.failed} failed"
    return line + (f", {waiting} files wait for their bytes" if waiting else "")


def watch(device: Device, *, interval: float = 0.5, stop: threading.Event | None = None) -> None:
    """Scan and write every ``interval`` seconds until ``stop`` is set (or Ctrl-C)."""
    stop = stop if stop is not None else threading.Event()
    device.vault.apply(everything=True)
    device.vault.report(f"watching {device.vault.root} (Ctrl-C to stop)")
    while not stop.is_set():
        device.vault.scan()
        device.vault.apply()
        _pause(stop, interval)


def _pause(stop: threading.Event, seconds: float) -> None:
    """Sleep until ``seconds`` have passed or ``stop`` is set. Not ``stop.wait()``: the signal
    handler sets ``stop`` in this thread, and when the signal lands while ``wait()`` holds the
    event's lock, ``set()`` waits for that lock forever (a watcher that ignored Ctrl-C)."""
    deadline = time.monotonic() + seconds
    while not stop.is_set():  # is_set() takes no lock
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def _stop_on_signals() -> threading.Event:
    """An event that Ctrl-C or SIGTERM sets, so the loop ends between two passes rather
    than inside an action; a second Ctrl-C interrupts at once."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    return stop


def _password() -> str:
    return os.environ.get("ATSYNC_PASSWORD") or getpass.getpass("password (an app password): ")


def _say(line: str) -> None:
    print(line, flush=True)


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True, help="the vault's database file")
    parser.add_argument("--dir", type=Path, required=True, help="the vault folder")
    parser.add_argument("--login", metavar="HANDLE", help="log in ($ATSYNC_PASSWORD or a prompt)")
    parser.add_argument("--service", metavar="URL", help="the PDS (default: the handle's)")
    parser.add_argument("--once", action="store_true", help="one scan and sync, then exit")
    parser.add_argument(
        "--device",
        default=socket.gethostname().split(".")[0],
        help="this device's short name, used in conflict copies' names (default: hostname)",
    )
    parser.add_argument(
        "--keep",
        choices=sorted(KEEP_POLICIES),
        default="local",
        help="which version stays in a file both devices changed (default: local)",
    )
    parser.add_argument(
        "--follow",
        action="append",
        default=[],
        metavar="HANDLE",
        help="mirror another person's vault, read-only, into @HANDLE/ (repeatable)",
    )
    parser.add_argument("--session-dir", type=Path, help="default: <db>.sessions")
    parser.add_argument("--nsid", default=NSID, help=f"the records' NSID prefix ({NSID})")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between scans")
    parser.add_argument("--timeout", type=float, default=120, help="--once: seconds to wait")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a folder", file=sys.stderr)
        return 2
    login = None if args.login is None else (args.login, _password(), args.service)
    try:
        with open_device(
            args.db, args.dir, device=device_name(args.device), keep=KEEP_POLICIES[args.keep],
            login=login, session_dir=args.session_dir, follow=args.follow, nsid=args.nsid,
            once=args.once, report=_say,
        ) as device:  # fmt: skip
            if device.signer.session is not None:
                _say(f"logged in as {device.signer.session.did}")
            if args.once:
                _say(sync_once(device, timeout=args.timeout))
                return 0
            watch(device, interval=args.interval, stop=_stop_on_signals())
            device.vault.scan()  # what was saved just before the interrupt
            _say("stopped; what is not pushed yet goes at the next start")
            return 0
    except (AtsyncError, OSError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""``atsync dev-pds``: run the reference PDS and a PLC on loopback until told to stop.

While it runs, the command lists itself in ``running_dir()`` (``<pid>.json``: ``pds_url``,
``plc_url``, ``pid``) so that the other commands can resolve the ``.test`` handles it serves
without being told where it is (``running_dev_pds()``; docs/dev-pds.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import click

from atsync._errors import DevPDSError
from atsync.atproto import DevPDS, default_cache_dir

from ._main import main

__all__ = ["RunningDevPDS", "announced", "running_dev_pds", "running_dir"]

_DEFAULT_ACCOUNT = ("alice.test", "hunter22")
# How often to look whether our parent process is still there. There is no portable event
# for that (PR_SET_PDEATHSIG fires when the parent *thread* exits, which a thread pool does
# routinely), so this is a watch interval, not a synchronisation delay.
_PARENT_CHECK_S = 0.2


def _parse_account(value: str) -> tuple[str, str]:
    handle, sep, password = value.partition(":")
    if not sep or not handle or not password:
        raise click.BadParameter(f"expected HANDLE:PASSWORD, got {value!r}", param_hint="--account")
    return handle, password


class _StopDuringStart(Exception):
    pass


@dataclass(frozen=True)
class RunningDevPDS:
    """A dev PDS that an ``atsync dev-pds`` process (``pid``) runs now."""

    pds_url: str
    plc_url: str
    pid: int


def running_dir() -> Path:
    """Where running ``atsync dev-pds`` processes list themselves: in the default cache
    directory of the PDS install (``$ATSYNC_CACHE_DIR``, else the user cache directory),
    whatever ``--cache-dir`` says, since the other commands have no such option."""
    return default_cache_dir() / "running-dev-pds"


@contextlib.contextmanager
def announced(pds_url: str, plc_url: str) -> Iterator[Path]:
    """List this process's dev PDS in ``running_dir()`` while inside; the file is removed on
    the way out (one left by a killed process is ignored, its pid being gone)."""
    directory = running_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{os.getpid()}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"pds_url": pds_url, "plc_url": plc_url, "pid": os.getpid()}))
    tmp.replace(path)  # readers never see half a file
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone's process; whether it is the PDS, resolving will tell
    return True


def running_dev_pds() -> list[RunningDevPDS]:
    """The dev PDS processes listed in ``running_dir()`` whose process is alive, newest
    first; listings of processes that are gone (killed) are removed."""
    try:
        paths = list(running_dir().glob("*.json"))
    except OSError:  # no such directory, or not one
        return []
    found: list[tuple[float, RunningDevPDS]] = []
    for path in paths:
        try:
            listed = path.stat().st_mtime
            data = json.loads(path.read_text())
            entry = RunningDevPDS(str(data["pds_url"]), str(data["plc_url"]), int(data["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # removed meanwhile, or not ours
        if _alive(entry.pid):
            found.append((listed, entry))
        else:
            path.unlink(missing_ok=True)
    return [entry for _, entry in sorted(found, key=lambda f: f[0], reverse=True)]


@main.command("dev-pds")
@click.option(
    "--account",
    "accounts",
    multiple=True,
    metavar="HANDLE:PASSWORD",
    help="Account to create (handle must end in .test); repeatable. Default alice.test:hunter22.",
)
@click.option("--port", type=click.IntRange(1, 65535), help="PDS port (default: a free one).")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep PDS and PLC data here across restarts (default: temporary, removed on exit).",
)
@click.option("--rate-limits", is_flag=True, help="Enable the PDS's own rate limits.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to install the PDS (default: $ATSYNC_CACHE_DIR or the user cache directory).",
)
@click.option("--log", is_flag=True, help="Show the PDS's own log on stderr.")
@click.option(
    "--replay-window-ms",
    type=click.IntRange(0),
    help="How far back the event stream replays from a cursor (default: one day); older "
    "cursors get #info OutdatedCursor.",
)
@click.option(
    "--plc-url",
    metavar="URL",
    help="Join the PLC directory of another dev PDS (its plc_url) instead of running one: "
    "two PDS hosts whose accounts resolve through one directory.",
)
def dev_pds(
    accounts: tuple[str, ...],
    port: int | None,
    data_dir: Path | None,
    rate_limits: bool,
    cache_dir: Path | None,
    log: bool,
    replay_window_ms: int | None,
    plc_url: str | None,
) -> None:
    """Run a real reference PDS (+ PLC) on 127.0.0.1 for development and tests.

    Installs the pinned @atproto/pds on first use (~90 s), then prints one JSON line on
    stdout — pds_url, plc_url, admin_password, accounts — and runs until SIGTERM/SIGINT or
    until the process that started it exits.
    """
    parsed = [_parse_account(a) for a in accounts] or [_DEFAULT_ACCOUNT]
    parent = os.getppid()
    # A plain flag, not a threading.Event: the handler runs in the main thread between two
    # bytecodes, and Event.set() there deadlocks when the signal lands while the main
    # thread's Event.wait() holds the event's lock (seen: a dev PDS that ignored Ctrl-C).
    stopping = False
    started = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if not started:  # abort the install or the start; DevPDS cleans up on the way out
            raise _StopDuringStart

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def say(msg: str) -> None:
        click.echo(msg, err=True)

    try:
        pds = DevPDS(
            port=port,
            data_dir=data_dir,
            rate_limits=rate_limits,
            accounts=parsed,
            cache_dir=cache_dir,
            progress=say,
            log=log,
            replay_window_ms=replay_window_ms,
            plc_url=plc_url,
        )
        try:
            pds.start()
        except _StopDuringStart:
            return
        started = True
        try:
            # Listed before the line is printed: whoever waits for the line finds the listing.
            with announced(pds.pds_url, pds.plc_url):
                click.echo(json.dumps(pds.info()))
                sys.stdout.flush()
                say(
                    f"dev PDS ready at {pds.pds_url} (PLC {pds.plc_url}); "
                    "SIGTERM or Ctrl-C stops it"
                )
                while True:
                    time.sleep(_PARENT_CHECK_S)  # a signal's handler runs, then it sleeps on
                    if stopping:
                        break
                    if os.getppid() != parent:
                        say("parent process exited; stopping")
                        break
                    if not pds.running:
                        raise DevPDSError(
                            f"the PDS process exited unexpectedly\n{pds.stderr_tail()}"
                        )
        finally:
            pds.stop()
    except DevPDSError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""``atsync dev-pds``: run the reference PDS and a PLC on loopback until told to stop."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import click

from atsync._errors import DevPDSError
from atsync.atproto import DevPDS

from ._main import main

_DEFAULT_ACCOUNT = ("alice.test", "hunter22")
# How often to look whether our parent process is still there. There is no portable event
# for that (PR_SET_PDEATHSIG fires when the parent *thread* exits, which a thread pool does
# routinely), so this is a watch interval, not a synchronisation delay.
_PARENT_CHECK_S = 0.5


def _parse_account(value: str) -> tuple[str, str]:
    handle, sep, password = value.partition(":")
    if not sep or not handle or not password:
        raise click.BadParameter(f"expected HANDLE:PASSWORD, got {value!r}", param_hint="--account")
    return handle, password


class _StopDuringStart(Exception):
    pass


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
    stop = threading.Event()
    started = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()
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
            click.echo(json.dumps(pds.info()))
            sys.stdout.flush()
            say(f"dev PDS ready at {pds.pds_url} (PLC {pds.plc_url}); SIGTERM or Ctrl-C stops it")
            while not stop.wait(_PARENT_CHECK_S):
                if os.getppid() != parent:
                    say("parent process exited; stopping")
                    break
                if not pds.running:
                    raise DevPDSError(f"the PDS process exited unexpectedly\n{pds.stderr_tail()}")
        finally:
            pds.stop()
    except DevPDSError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""The README's code runs as written and does what the README says (`make demo`: test_make_demo.py).

Every ```python block of README.md is run, in order, in one script — as a reader would, since
the sync block uses the Quickstart's ``contract``. The sync block runs against a real PDS on
loopback with only the ``login(...)`` call changed: the dev account's handle and password, and
``service=`` the PDS's URL. The script also prints a timestamp after ``login()`` returns and
after ``wait_for_idle()`` returns (lines added, none changed), to check the push's promptness.

Every command of its shell blocks is run by a test named in ``RUN_BY`` (``make test`` is exempt:
it is the test suite itself); ``atsync dev-pds``, which runs until Ctrl-C, here: started as
written from the repository's root, the line it prints compared with the one the README shows,
then stopped with SIGINT.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from atsync.atproto import BlockingXrpcClient
from atsync.atproto._devpds_install import InstallInfo
from atsync.db import ModelDB
from pds_fixtures import ACCOUNTS, MakePDS
from test_docs_code import fenced_blocks, lines_match, read_steps, start_background, stop_background

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

QUICKSTART = "Quickstart"
SYNC = "Syncing with the user's repository"
COLLECTION = "com.example.notes.note"  # the README's Binding
LOGIN = re.compile(r'signer\.login\("[^"]*", "[^"]*"\)')
PUSH_WITHIN = 2.0  # seconds from login() returning to the queue being empty
MARK = "readme-test"


def python_blocks() -> list[tuple[str, str]]:
    """(the section's heading, the code) of every ```python block in README.md, in order."""
    blocks: list[tuple[str, str]] = []
    heading = ""
    lines = README.read_text().splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("```"):
            info = line[3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if info == "python":
                blocks.append((heading, "".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks


def block(heading: str) -> str:
    found = [code for h, code in python_blocks() if h == heading]
    assert len(found) == 1, f"README needs one python block under '## {heading}'"
    return found[0]


def run(script: Path, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_readme_has_the_blocks_these_tests_rely_on() -> None:
    headings = [h for h, _ in python_blocks()]
    assert headings[:2] == [QUICKSTART, SYNC]
    assert len(LOGIN.findall(block(SYNC))) == 1, "the sync block must call signer.login once"


def test_quickstart_runs_as_written_and_history_grows(tmp_path: Path) -> None:
    code = block(QUICKSTART)
    assert len(code.strip().splitlines()) <= 25
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    runs = [run(script, tmp_path, timeout=60) for _ in range(2)]
    first = runs[0].splitlines()
    assert first[0] == "open: []"
    assert "open: ['ship it']" in first
    assert first[-1] == (
        "[('add_note', ['write the README']), ('add_note', ['ship it']), ('finish', ["
        + first[-1].split("('finish', [")[1]
    )
    assert runs[1].splitlines()[-1].count("add_note") == 4
    assert (tmp_path / "notes.db.key").stat().st_mode & 0o777 == 0o600


def with_timestamps(code: str) -> str:
    """``code`` plus a line printing the time after ``login()`` and after ``wait_for_idle()``."""
    out = []
    for line in code.splitlines(keepends=True):
        out.append(line)
        for call, label in ((".login(", "login returned"), (".wait_for_idle(", "idle")):
            if call in line:
                indent = line[: len(line) - len(line.lstrip())]
                out.append(
                    f'{indent}print("{MARK} {label}", __import__("time").monotonic(), flush=True)\n'
                )
    return "".join(out)


@pytest.mark.pds
def test_every_block_runs_in_order_and_the_offline_note_reaches_the_pds(
    make_pds: MakePDS, tmp_path: Path
) -> None:
    pds = make_pds()  # a PDS of its own: the collection holds only what the README wrote
    handle, password = ACCOUNTS[0]
    did = pds.accounts[handle].did
    parts = []
    for heading, code in python_blocks():
        if heading == SYNC:
            code, n = LOGIN.subn(
                f'signer.login("{handle}", "{password}", service="{pds.pds_url}")', code
            )
            assert n == 1
            code = with_timestamps(code)
        parts.append(code)
    script = tmp_path / "readme.py"
    script.write_text("\n".join(parts))
    # The session store (the user's data directory) is the test's own.
    # The dev PDS's DID documents live on its own PLC directory: where pulls check the key.
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "ATSYNC_PLC_URL": pds.plc_url}

    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    out = done.stdout
    stamps = dict(
        line.removeprefix(f"{MARK} ").rsplit(" ", 1)
        for line in out.splitlines()
        if line.startswith(MARK)
    )
    assert done.returncode == 0, (
        f"the README's code failed ({'after' if 'login returned' in stamps else 'before'} "
        f"login() returned):\n{out}\n{done.stderr}"
    )

    # "wait_for_idle: every change is now a record, once" — and print(sync.status) says so.
    status = out.splitlines()[-1]
    assert status.startswith("SyncStatus("), out
    assert re.search(r"\bpending=0\b", status), status
    assert re.search(r"\bfailed=0\b", status), status
    assert re.search(r"\bdownload_error=None\b", status), status  # it pulled, verified

    # The note written offline, before login, is a record on the PDS, exactly once.
    db = ModelDB.open_existing(tmp_path / "notes.db")
    with db:
        rows = [r for r in db.query("notes") if r["title"] == "written offline"]
        local = {r["id"]: (r["title"], r["done"]) for r in db.query("notes")}
    assert len(rows) == 1
    with BlockingXrpcClient(pds.pds_url) as client:
        records = list(client.iter_records(did, COLLECTION))
    offline = [r for r in records if r.value.get("title") == "written offline"]
    assert [r.rkey for r in offline] == [rows[0]["id"]], records
    assert offline[0].value["done"] is False
    # "Rows that were there before sync was attached (the quickstart's notes) are pushed too."
    remote = {r.rkey: (r.value["title"], r.value["done"]) for r in records}
    assert len(local) == 3 and remote == local  # two from the quickstart, one offline

    # "any time later: deferred auth" — the queued write goes out as soon as the user logs in.
    waited = float(stamps["idle"]) - float(stamps["login returned"])
    assert waited <= PUSH_WITHIN, (
        f"the offline note reached the PDS {waited:.1f} s after login() returned "
        f"(the README promises it at once; allowed {PUSH_WITHIN} s)"
    )


# -- the shell blocks --------------------------------------------------------------------------

DEV_PDS = ".venv/bin/atsync dev-pds --account alice.test:hunter22"
# Every command the README's shell blocks show, and the test that runs it.
RUN_BY: dict[str, str | None] = {
    "make demo": "test_make_demo.py",  # as a newcomer runs it, timed; what it leaves is read back
    # `make test` is exempt: it is this test suite (CI runs it); run from inside the suite, it
    # would run the suite within itself.
    "make test": None,
    DEV_PDS: "test_readme.py",  # below
}


def shell_commands() -> dict[str, tuple[str, ...]]:
    """Every command of README's plain ``` blocks, with the output shown after it: lines
    starting with ``$ `` (as in docs/, see test_docs_code.py), or, in a block without any,
    each line (without its ``# comment``)."""
    text = README.read_text()
    commands = {s.code: s.output for s in read_steps(text) if s.kind == "shell"}
    for info, _, body in fenced_blocks(text):
        if info == "" and not any(line.startswith("$ ") for line in body):
            commands.update((line.split("#")[0].strip(), ()) for line in body if line.strip())
    return commands


def test_every_command_the_readme_shows_is_run_by_a_test() -> None:
    assert sorted(shell_commands()) == sorted(RUN_BY), "a command in README.md: add it to RUN_BY"
    demo = (ROOT / "tests" / "test_make_demo.py").read_text()
    assert '["make", "--no-print-directory", "demo"' in demo


def same_shape(shown: Any, printed: Any, where: str = "$") -> None:
    """``printed`` has ``shown``'s keys, and its values: ``…`` stands for anything, a URL's
    port for any port (a free one is taken at each start)."""
    if isinstance(shown, dict):
        assert isinstance(printed, dict) and set(printed) == set(shown), (where, printed)
        for key, value in shown.items():
            same_shape(value, printed[key], f"{where}.{key}")
    elif isinstance(shown, str) and re.fullmatch(r"http://[\w.]+:\d+", shown):
        origin = re.escape(shown.rsplit(":", 1)[0])
        found = isinstance(printed, str) and re.fullmatch(origin + r":\d+", printed)
        assert found, (where, printed)
    elif isinstance(shown, str):
        assert isinstance(printed, str) and lines_match([shown], [printed]), (where, printed)
    else:
        assert printed == shown, (where, printed)


def test_the_dev_pds_command_prints_what_the_readme_shows_and_stops_on_ctrl_c(
    pds_install: InstallInfo,
) -> None:
    (shown,) = shell_commands()[DEV_PDS]
    # As written, from the repository's root; the install is the one the other tests use.
    process, line = start_background(DEV_PDS, "README.md", cwd=ROOT)
    try:
        printed = json.loads(line)
    finally:
        code = stop_background(process, signal.SIGINT)  # "runs until Ctrl-C"
    same_shape(json.loads(shown), printed)
    assert printed["accounts"]["alice.test"]["password"] == "hunter22"
    assert code == 0

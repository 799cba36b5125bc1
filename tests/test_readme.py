"""The README's quickstart runs as written, and `make demo`'s script runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"## Quickstart\n.*?```python\n(.*?)```", text, re.S)
    assert match, "README has no python block under Quickstart"
    return match.group(1)


def test_quickstart_runs_as_written_and_history_grows(tmp_path: Path) -> None:
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart())
    assert len(quickstart().strip().splitlines()) <= 25
    runs = [
        subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first = runs[0].stdout.splitlines()
    assert first[0] == "open: []"
    assert "open: ['ship it']" in first
    assert first[-1] == (
        "[('add_note', ['write the README']), ('add_note', ['ship it']), ('finish', ["
        + first[-1].split("('finish', [")[1]
    )
    assert runs[1].stdout.splitlines()[-1].count("add_note") == 4
    assert (tmp_path / "notes.db.key").stat().st_mode & 0o777 == 0o600


def test_demo_script_runs(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples/notes/demo.py"), "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "state identical: True" in run.stdout
    assert "verified 7 entries" in run.stdout
    assert "local notes == remote records: True" in run.stdout
    assert "has_synced True" in run.stdout
    assert (tmp_path / "notes.db").exists()

"""``atsync lexicon check`` and ``atsync lexicon model``, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

NOTES = Path(__file__).parent / "lexicon_cases" / "notes"
NSID = "com.example.notes.note"


def atsync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atsync", "lexicon", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_check_documents_and_records(tmp_path: Path) -> None:
    done = atsync("check", str(NOTES))
    assert done.returncode == 0, done.stderr
    assert "ok: 2 Lexicon documents" in done.stdout and NSID in done.stdout

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"$type": NSID, "title": "hi", "createdAt": "2026-11-30T12:00:00Z"}))
    done = atsync("check", str(NOTES), "--record", str(good))
    assert done.returncode == 0, done.stderr
    assert f"is a valid {NSID} record" in done.stdout

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"$type": NSID, "title": "hi", "createdAt": "2026-11-30T12:00:00Z",
                               "tags": ["ok", 5]}))  # fmt: skip
    done = atsync("check", str(NOTES), "--record", str(bad))
    assert done.returncode == 1
    assert "$.tags[1]" in done.stderr  # the JSON path of the first error

    broken = tmp_path / "broken"
    broken.mkdir()
    nonsense = {"lexicon": 1, "id": "com.example.x", "defs": {"main": {"type": "nonsense"}}}
    (broken / "x.json").write_text(json.dumps(nonsense))
    done = atsync("check", str(broken))
    assert done.returncode == 1 and "invalid:" in done.stderr


def test_model_prints_the_derived_model() -> None:
    done = atsync("model", str(NOTES), NSID)
    assert done.returncode == 0, done.stderr
    model = json.loads(done.stdout)
    assert model["id"] == "primary" and model["createdAt"] == "string"
    assert model["attachment"] == "blob?" and model["checksum"] == "bytes?"
    done = atsync("model", str(NOTES), NSID, "--key", "title")
    assert done.returncode == 1 and "primary key's name" in done.stderr

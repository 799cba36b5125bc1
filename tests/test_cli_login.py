"""`atsync login` / `logout` with the `.test` handles of a running `atsync dev-pds`, found
without --service or ATSYNC_PLC_URL (docs/dev-pds.md), against a real `atsync dev-pds`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from atsync.app import ActionContext, App, Contract
from atsync.atproto._devpds_install import InstallInfo, default_cache_dir
from atsync.cli import main
from atsync.cli._devpds import running_dir
from atsync.sync import ATSync, Binding, Manual

MODELS = {"items": {"id": "primary", "label": "string"}}
contract = Contract(models=MODELS)

SPEC = """
from atsync import Binding, Contract

contract = Contract(models={models!r})
bindings = {{"items": Binding({collection!r})}}
"""


@contract.action
def put(ctx: ActionContext, key: str, label: str) -> None:
    ctx.db.set("items", {"id": key, "label": label})


def make_db(path: Path, collection: str, writes: int = 0) -> Path:
    with App.open(path, contract) as app:  # the database and its session key
        sync = ATSync(app, pull=Manual(), push=Manual(), bindings={"items": Binding(collection)})
        for i in range(writes):
            app.actions.put(f"k{i}", f"label {i}")
        sync.close()
    return path


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shell where neither ATSYNC_PLC_URL nor --service says where the PDS is; its own
    cache directory, where `atsync dev-pds` lists itself."""
    cache = tmp_path / "cache"
    monkeypatch.delenv("ATSYNC_PLC_URL", raising=False)
    monkeypatch.setenv("ATSYNC_CACHE_DIR", str(cache))
    monkeypatch.setenv("ATSYNC_PASSWORD", "alice-pw")
    monkeypatch.chdir(tmp_path)
    return cache


def test_the_listing_is_in_the_default_cache_directory_of_the_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ATSYNC_CACHE_DIR", str(tmp_path))
    assert running_dir() == default_cache_dir() / "running-dev-pds"
    monkeypatch.delenv("ATSYNC_CACHE_DIR")
    assert running_dir() == default_cache_dir() / "running-dev-pds"


def test_a_test_handle_without_a_running_dev_pds_says_what_to_do(
    shell: Path, tmp_path: Path
) -> None:
    db = make_db(tmp_path / "n.db", "test.cli.login.none")
    # The listing of a dev PDS that was killed (its process is gone): ignored, removed.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    listing = shell / "running-dev-pds" / f"{gone.pid}.json"
    listing.parent.mkdir(parents=True)
    dead = {"pds_url": "http://localhost:9", "plc_url": "http://127.0.0.1:9", "pid": gone.pid}
    listing.write_text(json.dumps(dead))
    args = ["--db", str(db), "--session-dir", str(tmp_path / "sessions")]
    for login in (["login", "alice.test"], ["login", "--oauth", "--no-browser", "alice.test"]):
        out = CliRunner().invoke(main, [*login, *args])
        assert out.exit_code == 1, out.output
        assert "alice.test is a .test handle" in out.stderr
        assert "no `atsync dev-pds` is running" in out.stderr
        assert "(`atsync dev-pds`), or pass --service" in out.stderr
        assert not listing.exists()
    nothing = CliRunner().invoke(main, ["logout", *args])
    assert nothing.exit_code == 0 and "not logged in" in nothing.stdout


def test_login_push_pull_logout_with_the_running_dev_pds(
    pds_install: InstallInfo, shell: Path, tmp_path: Path
) -> None:
    with open(tmp_path / "dev-pds.log", "w") as log:
        dev = subprocess.Popen(
            # The install is where the other tests have it; the listing in this shell's cache.
            [sys.executable, "-m", "atsync", "dev-pds", "--account", "alice.test:alice-pw",
             "--cache-dir", str(pds_install.install_dir.parent)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    try:
        assert dev.stdout is not None
        line = dev.stdout.readline()
        assert line, (tmp_path / "dev-pds.log").read_text()
        info = json.loads(line)
        listing = shell / "running-dev-pds" / f"{dev.pid}.json"
        assert json.loads(listing.read_text()) == {
            "pds_url": info["pds_url"],
            "plc_url": info["plc_url"],
            "pid": dev.pid,
        }
        did = info["accounts"]["alice.test"]["did"]
        collection = "test.cli.login.devpds"
        (tmp_path / "items_spec.py").write_text(SPEC.format(models=MODELS, collection=collection))
        db = make_db(tmp_path / "n.db", collection, writes=2)
        sessions = tmp_path / "sessions"
        args = ["--db", str(db), "--session-dir", str(sessions)]
        runner = CliRunner()

        logged = runner.invoke(main, ["login", "alice.test", *args])  # the password form
        assert logged.exit_code == 0, logged.output
        assert f"logged in as {did} (alice.test) at {info['pds_url']}" in logged.stdout
        pushed = runner.invoke(main, ["push", *args, "--timeout", "30"])
        assert pushed.exit_code == 0, pushed.output
        assert "pushed 2 writes; 0 pending" in pushed.stdout
        # Pulled commits are verified against the dev PDS's PLC, found the same way.
        pulled = runner.invoke(main, ["pull", *args, "--app", "items_spec", "--timeout", "30"])
        assert pulled.exit_code == 0, pulled.output
        assert "pulled rev" in pulled.stdout and "0 rejected" in pulled.stdout

        (stored,) = [json.loads(p.read_text()) for p in sessions.glob("*.json")]
        out = runner.invoke(main, ["logout", *args])
        assert out.exit_code == 0, out.output
        assert f"logged out {did} (alice.test) at {info['pds_url']}" in out.stdout
        assert not list(sessions.glob("*.json"))
        status = runner.invoke(main, ["status", *args, "--json"])
        assert json.loads(status.stdout)["account"] is None
        # Ended on the PDS too: the session's refresh token is refused.
        refresh = httpx.post(
            f"{info['pds_url']}/xrpc/com.atproto.server.refreshSession",
            headers={"Authorization": f"Bearer {stored['refresh_jwt']}"},
        )
        assert refresh.status_code in (400, 401), refresh.text
    finally:
        dev.terminate()
        dev.wait(30)
    assert dev.returncode == 0
    assert not listing.exists()  # unlisted when it stops
    after = runner.invoke(main, ["login", "alice.test", *args])
    assert after.exit_code == 1 and "no `atsync dev-pds` is running" in after.stderr

"""The dev PDS against itself: a real @atproto/pds and PLC on loopback, no mocks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import httpx
import pytest

from atsync._errors import DevPDSError
from atsync.atproto._devpds import PDS_VERSION, DevPDS, ensure_installed
from pds_fixtures import ACCOUNTS, MakePDS

pytestmark = pytest.mark.pds

DEADLINE_S = 20.0


# -- helpers -----------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited already


def _wait_gone(pid: int, timeout: float = DEADLINE_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _readline(stream: IO[str], timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box:
        raise AssertionError(f"no line within {timeout} s")
    return box[0]


def _listening(pid: int) -> list[tuple[str, int]]:
    """(hex local address, port) of every listening TCP socket the process holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue  # closed since the listing (a connection ending): not a listener
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, port = fields[1].split(":")
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                found.append((addr, int(port, 16)))
    return found


def _session(pds: DevPDS, handle: str, password: str) -> dict[str, str]:
    resp = httpx.post(
        f"{pds.pds_url}/xrpc/com.atproto.server.createSession",
        json={"identifier": handle, "password": password},
    )
    assert resp.status_code == 200, resp.text
    session: dict[str, str] = resp.json()
    return session


def _put_note(pds: DevPDS, session: dict[str, str], rkey: str, text: str) -> str:
    resp = httpx.post(
        f"{pds.pds_url}/xrpc/com.atproto.repo.putRecord",
        headers={"Authorization": f"Bearer {session['accessJwt']}"},
        json={
            "repo": session["did"],
            "collection": "com.example.note",
            "rkey": rkey,
            "record": {"$type": "com.example.note", "text": text},
        },
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["cid"])


def _get_note(pds: DevPDS, did: str, rkey: str) -> httpx.Response:
    return httpx.get(
        f"{pds.pds_url}/xrpc/com.atproto.repo.getRecord",
        params={"repo": did, "collection": "com.example.note", "rkey": rkey},
    )


# -- the shared session PDS --------------------------------------------------------------------


def test_health_answers_with_the_pinned_version(dev_pds: DevPDS) -> None:
    resp = httpx.get(f"{dev_pds.pds_url}/xrpc/_health")
    assert resp.status_code == 200
    assert resp.json() == {"version": PDS_VERSION}
    desc = httpx.get(f"{dev_pds.pds_url}/xrpc/com.atproto.server.describeServer").json()
    assert desc["availableUserDomains"] == [".test"]


def test_created_accounts_log_in(dev_pds: DevPDS) -> None:
    assert sorted(dev_pds.accounts) == ["alice.test", "bob.test", "dan.test", "erin.test"]
    for handle, password in ACCOUNTS:
        account = dev_pds.accounts[handle]
        assert account.password == password
        assert account.did.startswith("did:plc:")
        assert _session(dev_pds, handle, password)["did"] == account.did
    wrong = httpx.post(
        f"{dev_pds.pds_url}/xrpc/com.atproto.server.createSession",
        json={"identifier": "alice.test", "password": "not-it"},
    )
    assert wrong.status_code == 401


def test_did_document_in_plc_points_at_the_pds(dev_pds: DevPDS) -> None:
    did = dev_pds.accounts["alice.test"].did
    doc = httpx.get(f"{dev_pds.plc_url}/{did}").json()
    assert doc["alsoKnownAs"] == ["at://alice.test"]
    assert doc["service"][0]["serviceEndpoint"] == dev_pds.pds_url


def test_record_written_reads_back(dev_pds: DevPDS) -> None:
    session = _session(dev_pds, *ACCOUNTS[1])
    cid = _put_note(dev_pds, session, "roundtrip", "hello")
    resp = _get_note(dev_pds, session["did"], "roundtrip")
    assert resp.status_code == 200
    assert resp.json()["cid"] == cid
    assert resp.json()["value"] == {"$type": "com.example.note", "text": "hello"}


def test_listens_on_loopback_only(dev_pds: DevPDS) -> None:
    assert dev_pds.pid is not None
    sockets = _listening(dev_pds.pid)
    plc_port = int(dev_pds.plc_url.rsplit(":", 1)[1])
    assert {port for _, port in sockets} == {dev_pds.port, plc_port}
    assert all(addr == "0100007F" for addr, _ in sockets), sockets  # 127.0.0.1


# -- restarts and data directories -------------------------------------------------------------


def test_restart_with_data_keeps_records_and_logins(restartable_pds: DevPDS) -> None:
    pds = restartable_pds
    url = pds.pds_url
    handle, password = ACCOUNTS[0]
    session = _session(pds, handle, password)
    cid = _put_note(pds, session, "kept", "survives restarts")

    pds.stop()
    assert not pds.running
    pds.start()

    assert pds.pds_url == url
    assert _get_note(pds, session["did"], "kept").json()["cid"] == cid
    assert _session(pds, handle, password)["did"] == session["did"]
    # The PLC is in memory: the DID resolving again shows the replayed operation log.
    doc = httpx.get(f"{pds.plc_url}/{session['did']}").json()
    assert doc["service"][0]["serviceEndpoint"] == url
    # Same JWT secret, so a session from before the restart still works.
    got = httpx.get(
        f"{pds.pds_url}/xrpc/com.atproto.server.getSession",
        headers={"Authorization": f"Bearer {session['accessJwt']}"},
    )
    assert got.status_code == 200, got.text


def test_new_instance_on_same_data_dir(make_pds: MakePDS, tmp_path: Path) -> None:
    data = tmp_path / "shared"
    first = make_pds(data_dir=data)
    port, dids = first.port, {h: a.did for h, a in first.accounts.items()}
    first.stop()

    second = make_pds(data_dir=data, accounts=[*ACCOUNTS, ("carol.test", "carol-pw")])
    assert second.port == port  # the DID documents name this port
    assert {h: second.accounts[h].did for h in dids} == dids
    assert _session(second, "carol.test", "carol-pw")["did"] == second.accounts["carol.test"].did
    second.stop()
    with pytest.raises(DevPDSError, match="was created for port"):
        DevPDS(data_dir=data, port=port + 1 if port < 65535 else port - 1).start()


def test_temporary_data_is_removed_on_stop(make_pds: MakePDS) -> None:
    pds = make_pds(data_dir=None, accounts=[])
    directory = pds.directory
    assert directory is not None
    assert (directory / "pds").is_dir()
    pds.stop()
    assert not directory.exists()


def test_rate_limits_flag(make_pds: MakePDS) -> None:
    pds = make_pds(rate_limits=True, accounts=ACCOUNTS[:1])
    resp = httpx.post(
        f"{pds.pds_url}/xrpc/com.atproto.server.createSession",
        json={"identifier": ACCOUNTS[0][0], "password": ACCOUNTS[0][1]},
    )
    assert resp.status_code == 200
    assert resp.headers["ratelimit-limit"] == "30"


# -- failures ----------------------------------------------------------------------------------


def test_handles_must_end_in_test() -> None:
    with pytest.raises(DevPDSError, match=r"name\.test"):
        DevPDS(accounts=[("alice.example.com", "pw")])


def test_port_in_use_reports_node_stderr(tmp_path: Path) -> None:
    ensure_installed()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        pds = DevPDS(port=port, data_dir=tmp_path / "d", accounts=[])
        with pytest.raises(DevPDSError, match="EADDRINUSE") as info:
            pds.start()
        assert "node stderr" in str(info.value)
        assert not pds.running


# -- processes: CLI, signals, parent death -----------------------------------------------------


def _run_cli(args: list[str], stderr: IO[str]) -> tuple[subprocess.Popen[str], dict[str, object]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "atsync", "dev-pds", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    assert proc.stdout is not None
    line = _readline(proc.stdout, 240.0)  # a cold cache installs first
    assert line, f"dev-pds exited with {proc.wait()} before printing"
    return proc, json.loads(line)


def _stop_cli(proc: subprocess.Popen[str]) -> list[int]:
    nodes = _children(proc.pid)
    assert nodes, "no node child found"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(DEADLINE_S) == 0
    assert time.monotonic() - started < 10.0
    return nodes


def test_cli_prints_json_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "cli-data"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc, info = _run_cli(["--account", "carol.test:carol-pw", "--data", str(data)], err)
        try:
            assert set(info) == {"pds_url", "plc_url", "admin_password", "accounts"}
            accounts = info["accounts"]
            assert isinstance(accounts, dict)
            did = accounts["carol.test"]["did"]
            assert did.startswith("did:plc:")
            assert accounts["carol.test"]["password"] == "carol-pw"
            health = httpx.get(f"{info['pds_url']}/xrpc/_health")
            assert health.status_code == 200
        finally:
            nodes = _stop_cli(proc)
        assert all(_wait_gone(pid) for pid in nodes)

        # --data keeps the account: the next run prints the same DID and URL.
        proc, again = _run_cli(["--account", "carol.test:carol-pw", "--data", str(data)], err)
        _stop_cli(proc)
    assert again["pds_url"] == info["pds_url"]
    assert again["accounts"] == info["accounts"]


_HOLDER = """
import sys
from atsync.atproto._devpds import DevPDS
pds = DevPDS(accounts=[]).start()
print(pds.pid, pds.directory, flush=True)
sys.stdin.read()
"""


def test_sigkill_of_python_parent_stops_node() -> None:
    ensure_installed()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    pid_text, directory_text = _readline(holder.stdout, 120.0).split()
    node_pid, directory = int(pid_text), Path(directory_text)
    assert _alive(node_pid)
    assert directory.is_dir()
    holder.kill()
    holder.wait(DEADLINE_S)
    assert _wait_gone(node_pid), f"node {node_pid} outlived its killed parent"
    assert not directory.exists()  # the orphaned node removed the temporary data


def test_cli_stops_when_its_parent_exits(tmp_path: Path) -> None:
    ensure_installed()
    # bash starts the CLI in the background, reports its pid, and exits when we close stdin.
    shell = subprocess.Popen(
        [
            "bash",
            "-c",
            f'"{sys.executable}" -m atsync dev-pds --account dan.test:dan-pw & echo $!; read',
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert shell.stdout is not None
    assert shell.stdin is not None
    cli_pid = int(_readline(shell.stdout, 30.0))
    json.loads(_readline(shell.stdout, 240.0))
    nodes = _children(cli_pid)
    assert nodes
    shell.stdin.close()
    shell.wait(DEADLINE_S)
    assert _wait_gone(cli_pid), "dev-pds outlived its parent"
    assert all(_wait_gone(pid) for pid in nodes)


def test_a_second_host_joins_the_first_ones_plc_directory(
    dev_pds: DevPDS, make_pds: MakePDS
) -> None:
    second = make_pds(plc_url=dev_pds.plc_url, accounts=[("dan.test", "dan-pw-1")])
    assert second.plc_url == dev_pds.plc_url and second.pds_url != dev_pds.pds_url
    # Both hosts' accounts are in the one directory, each pointing at its own PDS.
    for pds, handle in ((dev_pds, "alice.test"), (second, "dan.test")):
        doc = httpx.get(f"{dev_pds.plc_url}/{pds.accounts[handle].did}").json()
        assert doc["alsoKnownAs"] == [f"at://{handle}"]
        assert doc["service"][0]["serviceEndpoint"] == pds.pds_url
    session = _session(second, "dan.test", "dan-pw-1")
    assert _put_note(second, session, "on-the-second-host", "hi")
    assert second.pid is not None
    assert len(_listening(second.pid)) == 1  # the PDS alone: no PLC of its own


def test_plc_url_must_be_loopback() -> None:
    with pytest.raises(DevPDSError, match="loopback"):
        DevPDS(plc_url="https://plc.directory")


def test_an_account_moves_to_another_host_with_its_did_and_records(make_pds: MakePDS) -> None:
    old = make_pds(accounts=[("mover.test", "mover-pw-1")])
    new = make_pds(plc_url=old.plc_url, accounts=[("dan.test", "dan-pw-1")])
    elsewhere = make_pds(accounts=[("erin.test", "erin-pw-1")])  # a directory of its own
    session = _session(old, "mover.test", "mover-pw-1")
    assert _put_note(old, session, "before-the-move", "hi")
    did = old.accounts["mover.test"].did
    with pytest.raises(DevPDSError, match="share a PLC directory"):
        old.move_account("mover.test", elsewhere)
    with pytest.raises(DevPDSError, match="not an account"):
        old.move_account("nobody.test", new)
    moved = old.move_account("mover.test", new)
    assert moved.did == did and new.accounts["mover.test"] == moved
    assert "mover.test" not in old.accounts
    doc = httpx.get(f"{old.plc_url}/{did}").json()
    assert doc["service"][0]["serviceEndpoint"] == new.pds_url
    latest = "/xrpc/com.atproto.sync.getLatestCommit"
    gone = httpx.get(f"{old.pds_url}{latest}", params={"did": did})
    assert gone.status_code == 400 and gone.json()["error"] == "RepoDeactivated"
    record = httpx.get(
        f"{new.pds_url}/xrpc/com.atproto.repo.getRecord",
        params={"repo": did, "collection": "com.example.note", "rkey": "before-the-move"},
    )
    assert record.status_code == 200, record.text
    # It logs in on its new host with the same password, and writes there.
    assert _put_note(new, _session(new, "mover.test", "mover-pw-1"), "after-the-move", "hi")

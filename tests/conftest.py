"""Shared test configuration.

The ``pds`` marker is on every test that needs the reference PDS, so ``pytest -m "not pds"``
runs on a machine without Node.js. Nobody has to remember it:

- every test that uses a PDS fixture from ``pds_fixtures`` — directly or through another fixture
  — gets the marker at collection;
- the tests that start a PDS in a child process, where no fixture shows it, are listed in
  ``PDS_IN_A_CHILD_PROCESS`` (or carry ``@pytest.mark.pds`` themselves);
- a test without the marker runs with ``ATSYNC_CACHE_DIR`` pointing below ``/dev/null``, so if it
  starts a PDS anyway (in process or in a child) it fails at once, naming the marker, instead of
  installing or starting one. ``tests/test_pds_marker.py`` checks all three.

Only loopback addresses, ever: an audit hook sees every name lookup and connection this
process makes, and a test that reached for another host (say a PLC directory on the
internet, because an engine was built without the test's resolver) fails, naming it.
``tests/test_loopback_only.py`` checks the guard.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Any

import pytest

# The PDS fixtures, and the `chromium` fixture of the OAuth tests (a browser on the PDS's pages).
pytest_plugins = ["pds_fixtures", "oauth_browser"]

# The fixtures in pds_fixtures.py that start a PDS; any fixture that uses one is covered too,
# since a test's fixture closure includes the fixtures its fixtures use.
PDS_FIXTURES = frozenset({"dev_pds", "make_pds", "restartable_pds", "pds_install"})

# (file name, test function name) of tests that start a PDS in a child process.
PDS_IN_A_CHILD_PROCESS = frozenset(
    {
        (
            "test_make_demo.py",
            "test_make_demo_runs_and_every_device_agrees_with_the_pds",
        )
    }
)

# What an unmarked test sees as the PDS cache: not a directory, so no install and no start.
NO_PDS_CACHE = "/dev/null/this-test-starts-a-reference-PDS-so-it-needs-the-pds-marker"


def needs_pds(item: pytest.Item) -> bool:
    if PDS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    name = getattr(item, "originalname", item.name)
    return (item.path.name, name) in PDS_IN_A_CHILD_PROCESS


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("pds") is None and needs_pds(item):
            item.add_marker(pytest.mark.pds)


@pytest.fixture(autouse=True)
def _no_pds_without_the_marker(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if request.node.get_closest_marker("pds") is None:
        monkeypatch.setenv("ATSYNC_CACHE_DIR", NO_PDS_CACHE)


# Hosts this process tried to reach that are not loopback, since the last test ended.
OFF_LOOPBACK: list[str] = []


def is_loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host is None or host == "":
        return True  # the local host (e.g. getaddrinfo(None, port) for a listening socket)
    if not isinstance(host, str):
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # a name other than localhost: a DNS lookup leaves the machine
    return address.is_loopback or address.is_unspecified


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event in ("socket.connect", "socket.sendto") and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return
    if not is_loopback(host):
        OFF_LOOPBACK.append(f"{event} {host!r}")


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _loopback_only() -> Any:
    OFF_LOOPBACK.clear()
    yield
    reached, OFF_LOOPBACK[:] = sorted(set(OFF_LOOPBACK)), []
    assert not reached, f"this test reached beyond loopback: {reached}"

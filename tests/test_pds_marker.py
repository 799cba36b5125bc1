"""Every test that needs the reference PDS carries the ``pds`` marker (see conftest.py), so
``pytest -m "not pds"`` runs without Node.js and never installs or starts a PDS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from atsync.atproto._devpds import DevPDS, ensure_installed
from conftest import NO_PDS_CACHE, PDS_FIXTURES, needs_pds


def test_every_selected_test_that_uses_a_pds_carries_the_marker(
    request: pytest.FixtureRequest,
) -> None:
    # The items of this run, after `-m` selection: under `-m "not pds"` none may need a PDS.
    unmarked = [
        item.nodeid
        for item in request.session.items
        if needs_pds(item) and item.get_closest_marker("pds") is None
    ]
    assert not unmarked, f"need the reference PDS but lack the pds marker: {unmarked}"
    assert set(request.fixturenames).isdisjoint(PDS_FIXTURES)


def test_an_unmarked_test_cannot_install_or_start_a_pds() -> None:
    assert os.environ["ATSYNC_CACHE_DIR"] == NO_PDS_CACHE
    with pytest.raises(NotADirectoryError, match="needs-the-pds-marker"):
        ensure_installed()
    with pytest.raises(NotADirectoryError, match="needs-the-pds-marker"):
        DevPDS(accounts=[]).start()
    # A child process inherits the same environment.
    child = subprocess.run(
        [sys.executable, "-c", "from atsync.atproto._devpds import DevPDS; DevPDS().start()"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode != 0
    assert "needs-the-pds-marker" in child.stderr


@pytest.mark.pds
def test_a_marked_test_sees_the_real_cache() -> None:
    assert os.environ.get("ATSYNC_CACHE_DIR") != NO_PDS_CACHE


@pytest.fixture
def through_another_fixture(dev_pds: DevPDS) -> DevPDS:
    return dev_pds


def test_a_pds_used_through_another_fixture_marks_the_test(
    through_another_fixture: DevPDS, request: pytest.FixtureRequest
) -> None:
    assert request.node.get_closest_marker("pds") is not None
    assert through_another_fixture.running

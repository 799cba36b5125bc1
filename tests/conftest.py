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
"""

from __future__ import annotations

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

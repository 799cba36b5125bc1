"""Pytest fixtures that run the real reference PDS (see docs/dev-pds.md).

- ``dev_pds`` (session): one PDS for the whole run, accounts ``alice.test`` and ``bob.test``
  (passwords in ``ACCOUNTS``). Tests share it: use fresh record keys or collections.
- ``restartable_pds`` (function): a PDS of its own whose data is kept in ``tmp_path``, so
  ``pds.stop(); pds.start()`` comes back on the same URL with the same accounts and records.
- ``make_pds`` (function): a factory, ``make_pds(**DevPDS kwargs)``, for other set-ups (rate
  limits on, other accounts); everything it started is stopped at teardown.

The first use on a machine installs the PDS (~90 s, progress shown on the terminal).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from atsync.atproto import IdentityResolver
from atsync.atproto._devpds import DevPDS, ensure_installed
from atsync.atproto._devpds_install import InstallInfo

ACCOUNTS: tuple[tuple[str, str], ...] = (
    ("alice.test", "alice-pw-1"),
    ("bob.test", "bob-pw-1"),
    ("erin.test", "erin-pw-1"),  # erin follows dan (issue #10's test accounts)
    ("dan.test", "dan-pw-1"),
)

MakePDS = Callable[..., DevPDS]


def _install_visibly(config: pytest.Config) -> InstallInfo:
    # Output is captured while fixtures run; a silent 90 s first install looks like a hang.
    def say(msg: str) -> None:
        print(f"[dev-pds] {msg}", file=sys.stderr, flush=True)

    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        return ensure_installed(progress=say)
    with capman.global_and_fixture_disabled():
        return ensure_installed(progress=say)


@pytest.fixture(scope="session")
def pds_install(request: pytest.FixtureRequest) -> InstallInfo:
    """The reference PDS's install (its ``node`` and ``node_modules``): the official
    TypeScript ``@atproto/*`` packages, for differential tests."""
    return _install_visibly(request.config)


@pytest.fixture(scope="session")
def dev_pds(request: pytest.FixtureRequest) -> Iterator[DevPDS]:
    _install_visibly(request.config)
    pds = DevPDS(accounts=ACCOUNTS)
    pds.start()
    try:
        yield pds
    finally:
        pds.stop()


@pytest.fixture
def make_pds(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakePDS]:
    _install_visibly(request.config)
    started: list[DevPDS] = []

    def make(**kwargs: Any) -> DevPDS:
        kwargs.setdefault("accounts", ACCOUNTS)
        kwargs.setdefault("data_dir", tmp_path / f"pds-{len(started)}")
        pds = DevPDS(**kwargs)
        started.append(pds)
        return pds.start()

    try:
        yield make
    finally:
        for pds in started:
            pds.stop()


@pytest.fixture
def restartable_pds(make_pds: MakePDS) -> DevPDS:
    return make_pds()


@pytest.fixture
async def resolver(dev_pds: Any) -> AsyncIterator[IdentityResolver]:
    """An identity resolver for the dev PDS's PLC directory (DID documents on loopback)."""
    async with IdentityResolver(plc_url=dev_pds.plc_url, allow_insecure_localhost=True) as r:
        yield r

"""A person at a browser, for the OAuth tests: headless Chromium on the PDS's own pages.

Debian's ``chromium`` (installed on first use by the ``chromium`` fixture, like the PDS; this
module is a pytest plugin, loaded by conftest.py) is driven through playwright:
``BrowserUser.open(url)`` opens the authorization URL, fills in the password on the PDS's
sign-in page and clicks Authorize (or Deny access), and the provider redirects it to the
app's loopback listener.

Run as a command, ``python oauth_browser.py URL`` does the same for one URL with the password
in ``$ATSYNC_TEST_BROWSER_PASSWORD``, and exits when the listener's page is shown. Python's
``webbrowser`` runs ``$BROWSER URL``, so with ``BROWSER`` naming this command (through a
one-line wrapper: ``$BROWSER`` must be one executable) the code that opens "the system
browser" — ``login_oauth``, ``atsync login --oauth`` — runs unchanged (tests/test_docs_code.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

__all__ = ["CHROMIUM", "PASSWORD_VARIABLE", "BrowserUser", "browser_command", "chromium"]

CHROMIUM = Path("/usr/bin/chromium")
# The command form's password (the account the browser signs in as).
PASSWORD_VARIABLE = "ATSYNC_TEST_BROWSER_PASSWORD"

_HOW_TO_INSTALL = (
    "these tests drive Debian's chromium ({path}), which is missing, and installing it "
    "failed: {why}. Install it as root (`apt-get install chromium`, or `sudo apt-get "
    "install chromium`), then run the tests again."
)


def _install_chromium() -> None:
    # Like the PDS, the browser is installed on first use; playwright's own browser
    # download is not reachable here, Debian's package is. Not root: sudo without a
    # password prompt (-n), or a failure that says what to do; never a silent skip.
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") is not None:
        prefix = ["sudo", "-n"]
    else:
        why = "not root, and no sudo"
        pytest.fail(_HOW_TO_INSTALL.format(path=CHROMIUM, why=why), pytrace=False)
    print("[browser] installing chromium (apt-get, once)", file=sys.stderr, flush=True)
    for step in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        # `env` carries the variable across sudo, which resets the environment.
        command = [*prefix, "env", "DEBIAN_FRONTEND=noninteractive", *step]
        shown = " ".join(command)
        try:
            code = subprocess.run(command, stdin=subprocess.DEVNULL, check=False).returncode
        except OSError as e:  # no apt-get (not Debian), or no env
            why = f"{shown}: {e}"
        else:
            if code == 0:
                continue
            why = f"`{shown}` exited with {code}"
        pytest.fail(_HOW_TO_INSTALL.format(path=CHROMIUM, why=why), pytrace=False)


@pytest.fixture(scope="session")
def chromium(request: pytest.FixtureRequest) -> Path:
    """Debian's chromium, installed if missing (apt-get's progress shown), and playwright."""
    if not CHROMIUM.exists():
        capman = request.config.pluginmanager.getplugin("capturemanager")
        if capman is None:
            _install_chromium()
        else:
            with capman.global_and_fixture_disabled():
                _install_chromium()
    if not CHROMIUM.exists():
        why = "apt-get succeeded but did not provide it"
        pytest.fail(_HOW_TO_INSTALL.format(path=CHROMIUM, why=why), pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401 - the driver, from requirements.lock
    except ImportError as e:  # pragma: no cover - a venv made without the pinned deps
        raise AssertionError("playwright is missing: `make test` installs it") from e
    return CHROMIUM


def browser_command(directory: Path) -> Path:
    """An executable in ``directory`` that runs this module as a command with this Python:
    what ``$BROWSER`` names (``webbrowser`` runs ``$BROWSER URL``, one executable)."""
    path = directory / "browser"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    path.chmod(0o755)
    return path


class BrowserUser:
    """A person at a browser: ``open(url)`` (the ``open_browser`` of the flow) signs in on
    the PDS's page and clicks Authorize, or Deny access with ``consent=False``.
    ``rewrite_callback`` changes the callback URL before the listener gets it (the negative
    tests). Runs in a thread: the flow waits for the callback meanwhile."""

    def __init__(
        self,
        chromium: Path,
        password: str,
        *,
        consent: bool = True,
        rewrite_callback: Callable[[str], str] | None = None,
    ) -> None:
        self.chromium = chromium
        self.password = password
        self.consent = consent
        self.rewrite_callback = rewrite_callback
        self.callback_urls: list[str] = []
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def open(self, url: str) -> None:
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def join(self) -> None:
        assert self._thread is not None, "the flow never opened the browser"
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the browser is still busy"
        if self.error is not None:
            raise self.error

    def _run(self, url: str) -> None:
        try:
            self._drive(url)
        except BaseException as e:  # re-raised in the test's thread by join()
            self.error = e

    def _drive(self, url: str) -> None:
        from playwright.sync_api import Request, Route, sync_playwright

        server = url.split("/oauth/", 1)[0]

        def is_callback(candidate: str) -> bool:
            return candidate.startswith("http://127.0.0.1:")

        def seen(request: Request) -> None:
            if is_callback(request.url):
                self.callback_urls.append(request.url)

        def forge(route: Route) -> None:
            # The consent page sends the browser to the provider's redirect endpoint with
            # the response's parameters (iss, state, code) in its query; the provider
            # answers with a 303 to the callback carrying them. Redirects cannot be routed,
            # so the parameters are changed on that request.
            assert self.rewrite_callback is not None
            route.continue_(url=self.rewrite_callback(route.request.url))

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(self.chromium), args=["--no-sandbox"])
            try:
                page = browser.new_context().new_page()
                page.set_default_timeout(30_000)
                page.on("request", seen)
                if self.rewrite_callback is not None:
                    # Where the consent page sends the browser; it answers with the 303.
                    page.route(f"{server}/oauth/authorize/redirect*", forge)
                page.goto(url)
                page.get_by_role("textbox", name="Password").fill(self.password)
                page.get_by_role("button", name="Sign in").click()
                button = "Authorize" if self.consent else "Deny access"
                page.get_by_role("button", name=button).click()
                # The flow is over for the browser once the listener's page is shown.
                page.wait_for_url(is_callback)
                page.get_by_role("heading").wait_for()
            finally:
                browser.close()


def main(argv: list[str]) -> int:
    """``oauth_browser.py URL``: sign in and consent; exit 0 once the app has the answer."""
    if len(argv) != 1:
        print("usage: oauth_browser.py URL", file=sys.stderr)
        return 2
    password = os.environ.get(PASSWORD_VARIABLE)
    if not password:
        print(f"oauth_browser.py: ${PASSWORD_VARIABLE} is not set", file=sys.stderr)
        return 2
    user = BrowserUser(CHROMIUM, password)
    user.open(argv[0])
    user.join()
    print(f"[browser] signed in and authorized at {argv[0].split('?')[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

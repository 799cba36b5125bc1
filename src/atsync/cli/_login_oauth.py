"""``atsync login --oauth HANDLE --db PATH``: log in through the browser (docs/oauth.md).

The command half of ``login --oauth``; ``_sync_commands.login_command`` parses the options
and calls ``oauth_login_for`` here. The session is stored exactly where a password login
puts it (the database's session key names it), so ``status``, ``push`` and apps resume it.
"""

from __future__ import annotations

import os
import webbrowser
from pathlib import Path
from typing import Any

import anyio
import click

from atsync._errors import AtsyncError
from atsync.atproto import (
    DEFAULT_PLC_URL,
    FileSessionStore,
    IdentityResolver,
    OAuthSession,
    oauth_login,
)

__all__ = ["oauth_login_for"]


def _resolver(service: str | None) -> IdentityResolver:
    plc_url = os.environ.get("ATSYNC_PLC_URL") or DEFAULT_PLC_URL
    if service is None:
        return IdentityResolver(plc_url=plc_url)
    # Handles that only the given PDS knows (a development or self-hosted PDS without DNS
    # for them): asked at its /.well-known/atproto-did, still checked both ways.
    origin = service.rstrip("/")
    return IdentityResolver(
        plc_url=plc_url,
        use_dns=False,
        web_origin=lambda host: origin,
        allow_test_handles=True,
        allow_insecure_localhost=True,
    )


def _open_browser(url: str) -> Any:
    # Looked up at call time: the tests put a driven browser in its place.
    return webbrowser.open(url)


def oauth_login_for(
    key_did: str,
    identifier: str,
    *,
    session_dir: Path | None,
    service: str | None,
    client_id: str | None,
    browser: bool,
) -> OAuthSession:
    """Log in as ``identifier`` for the session key ``key_did``; the URL is printed on
    stderr and, with ``browser``, opened."""
    store = FileSessionStore(session_dir)

    async def run() -> OAuthSession:
        async with _resolver(service) as identity:
            return await oauth_login(
                identifier,
                client_id=client_id,
                open_browser=_open_browser if browser else None,
                identity=identity,
                store=store,
                key=f"atsync-session-{key_did}",
            )

    try:
        return anyio.run(run)
    except AtsyncError as exc:
        raise click.ClickException(str(exc)) from None

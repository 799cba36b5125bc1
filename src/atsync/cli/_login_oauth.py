"""``atsync login --oauth HANDLE --db PATH``: log in through the browser (docs/oauth.md).

The command half of ``login --oauth``; ``_sync_commands.login_command`` parses the options
and calls ``oauth_login_for`` here. The session is stored exactly where a password login
puts it (the database's session key names it), so ``status``, ``push`` and apps resume it.
``login_resolver`` finds the account for both kinds of login, including the ``.test``
handles of a running ``atsync dev-pds`` (docs/dev-pds.md).
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
    Session,
    oauth_login,
)

from ._devpds import running_dev_pds, running_dir

__all__ = ["login_resolver", "oauth_login_for", "session_resolver"]


def _resolver(service: str | None, plc_url: str) -> IdentityResolver:
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


def _is_test_handle(identifier: str) -> bool:
    return not identifier.startswith("did:") and identifier.lower().endswith(".test")


async def login_resolver(identifier: str, service: str | None) -> IdentityResolver:
    """The resolver a login from the shell finds ``identifier`` with (the caller closes it).

    ``--service`` and ``$ATSYNC_PLC_URL`` when given; else, for a handle under the reserved
    ``.test`` TLD (DNS and the public PLC know none), the running ``atsync dev-pds`` that
    serves it: its PLC directory and PDS, the handle checked both ways against the DID
    document. ``ClickException`` when none does."""
    plc_url = os.environ.get("ATSYNC_PLC_URL")
    if service is not None or plc_url is not None or not _is_test_handle(identifier):
        return _resolver(service, plc_url or DEFAULT_PLC_URL)
    running = running_dev_pds()
    problems: list[str] = []
    for dev in running:
        resolver = _resolver(dev.pds_url, dev.plc_url)
        try:
            await resolver.resolve(identifier, strict=True)  # cached for the login's own
        except AtsyncError as exc:
            problems.append(f"{dev.pds_url}: {exc}")
        except BaseException:  # Ctrl-C, a bug: the resolver is closed all the same
            await resolver.aclose()
            raise
        else:
            return resolver
        await resolver.aclose()
    explicitly = "pass --service http://localhost:PORT with ATSYNC_PLC_URL set to its plc_url"
    if not running:
        raise click.ClickException(
            f"{identifier} is a .test handle, which only a development PDS serves, and no "
            f"`atsync dev-pds` is running (none is listed in {running_dir()}). Start one in "
            f"another terminal (`atsync dev-pds`), or {explicitly}."
        )
    raise click.ClickException(
        f"{identifier} is a .test handle, which only a development PDS serves, and no running "
        f"`atsync dev-pds` has it ({'; '.join(problems)}). Create it (`atsync dev-pds --account "
        f"{identifier}:PASSWORD`), or {explicitly}."
    )


def session_resolver(session: Session | OAuthSession) -> IdentityResolver | None:
    """For a session on a running ``atsync dev-pds`` (a ``.test`` handle, no
    ``$ATSYNC_PLC_URL``): a resolver for that PDS's PLC directory, where pulled commits are
    verified. ``None`` otherwise: the sync engine's own default then applies."""
    if os.environ.get("ATSYNC_PLC_URL") is not None or not _is_test_handle(session.handle):
        return None
    for dev in running_dev_pds():
        if dev.pds_url == session.pds_url.rstrip("/"):
            return _resolver(dev.pds_url, dev.plc_url)
    return None


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
        async with await login_resolver(identifier, service) as identity:
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

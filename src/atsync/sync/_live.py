"""``Live()`` pulls: the PDS's event stream (``subscribeRepos``) tells the engine when the
account's repository changed.

The stream is used as a signal, not as the data: any event about the account (``#commit``,
``#sync``, ``#identity``, ``#account``) asks for a pull, and the pull reads the repository
itself, verified, and compares the whole bound state — so a missed, repeated or reordered
event can never leave a gap or a duplicate, and deletes are never missed. On (re)connect a
pull is asked for too (whatever happened while the stream was down); while it is down the
engine polls (``Live(fallback=...)``). Reconnects follow a capped backoff of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from ..atproto import FirehoseSubscription
from ._backoff import Backoff

if TYPE_CHECKING:
    from ._engine import SessionLike

__all__ = ["listen", "stream_url"]

log = logging.getLogger("atsync.sync")
NSID = "com.atproto.sync.subscribeRepos"


def stream_url(pds_url: str) -> str:
    base = pds_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base.removeprefix("https://") + f"/xrpc/{NSID}"
    return "ws://" + base.removeprefix("http://") + f"/xrpc/{NSID}"


async def listen(
    current_session: Callable[[], SessionLike | None],
    on_change: Callable[[], None],
    on_stream: Callable[[bool], None],
) -> None:
    """Run until cancelled: keep a stream open to the current session's PDS; call
    ``on_change()`` for every event about its account and on every (re)connect, and
    ``on_stream(up)`` when the stream comes up or goes down."""
    backoff = Backoff(base=1.0, cap=30.0)
    while True:
        session = current_session()
        if session is None:
            await anyio.sleep(1.0)
            continue
        try:
            async with FirehoseSubscription(stream_url(session.pds_url)) as stream:
                on_stream(True)
                on_change()  # whatever happened while we were not listening
                async for frame in stream:
                    backoff.succeeded()
                    if current_session() is not session:
                        break  # logged out, or another login: reconnect for it
                    body = frame.body
                    if body.get("repo") == session.did or body.get("did") == session.did:
                        on_change()
        except Exception as exc:  # the stream is a hint: any failure means "poll meanwhile"
            log.info("event stream of %s is down: %s", session.pds_url, exc)
        finally:
            on_stream(False)
        await anyio.sleep(backoff.next_delay())

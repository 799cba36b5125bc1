"""``Live()`` pulls: the PDS's event stream (``subscribeRepos``) tells the engine when the
account's repository changed.

Each ``#commit`` about the account is handed to the engine, which verifies it (signature,
records, its operations inverted on the MST back to ``prevData``) and applies its operations
directly when it follows what the local state includes (``since`` = the stored rev,
``prevData`` = the stored MST root). Anything else — a gap, a repeat out of order, an
event that fails verification, ``#sync``/``#identity``/``#account``, a (re)connect — makes
the next pull read the whole repository instead, so a missed event can never leave a gap
and deletes are never missed. While the stream is down the engine polls
(``Live(fallback=...)``). Reconnects follow a capped backoff of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from ..atproto import FirehoseFrame, FirehoseSubscription
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
    on_event: Callable[[FirehoseFrame | None], None],
    on_stream: Callable[[bool], None],
) -> None:
    """Run until cancelled: keep a stream open to the current session's PDS; call
    ``on_event(frame)`` for every event about its account and ``on_event(None)`` on every
    (re)connect (whatever happened meanwhile is unknown), and ``on_stream(up)`` when the
    stream comes up or goes down."""
    backoff = Backoff(base=1.0, cap=30.0)
    while True:
        session = current_session()
        if session is None:
            await anyio.sleep(1.0)
            continue
        try:
            async with FirehoseSubscription(stream_url(session.pds_url)) as stream:
                on_stream(True)
                on_event(None)  # whatever happened while we were not listening
                async for frame in stream:
                    backoff.succeeded()
                    if current_session() is not session:
                        break  # logged out, or another login: reconnect for it
                    body = frame.body
                    if body.get("repo") == session.did or body.get("did") == session.did:
                        on_event(frame)
        except Exception as exc:  # the stream is a hint: any failure means "poll meanwhile"
            log.info("event stream of %s is down: %s", session.pds_url, exc)
        finally:
            on_stream(False)
        await anyio.sleep(backoff.next_delay())

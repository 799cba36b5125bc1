"""``Live()`` pulls: the PDS's event stream (``subscribeRepos``) tells the engine when the
account's repository changed.

Each ``#commit`` about the account is handed to the engine, which verifies it (signature,
records, its operations inverted on the MST back to ``prevData``) and applies its operations
directly when it follows what the local state includes (``since`` = the stored rev,
``prevData`` = the stored MST root); the event's ``seq`` is stored with it, and a reconnect
resumes from there (the PDS replays what came after). Anything else — a gap, an event that
fails verification, ``#sync``/``#identity``/``#account``, a connect without a cursor, an
``OutdatedCursor`` — makes the next pull read the whole repository instead, so a missed
event can never leave a gap and deletes are never missed. While the stream is down the engine polls
(``Live(fallback=...)``). Reconnects follow a capped backoff of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from .._errors import PermanentError, VerificationError
from ..atproto import FirehoseFrame, FirehoseSubscription
from ._backoff import Backoff

if TYPE_CHECKING:
    from ._engine import SessionLike

__all__ = ["listen", "listen_for_others", "stream_url"]

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
    cursor: Callable[[], int | None],
    on_bad_frame: Callable[[str], None],
    on_other: Callable[[str | None, str], None],
    session_changed: Callable[[], anyio.Event],
) -> None:
    """Run until cancelled: keep a stream open to the current session's PDS, from
    ``cursor()`` (the last applied event) when there is one; call ``on_event(frame)`` for
    every event about its account and ``on_event(None)`` whenever what happened meanwhile is
    unknown (connected without a cursor, the PDS no longer has the cursor's events, or it
    refused the cursor), and ``on_stream(up)`` when the stream comes up or goes down.
    ``on_other(did, kind)``: every event about another account on the same host (followed
    ones are pulled then; ``kind`` is the frame's type, e.g. ``#identity``), and
    ``on_other(None, "")`` at each connect (anything may have changed).
    ``session_changed()``: an event set when the session changes; the stream then moves to
    the new session's host at once (a silent old host — the account moved away — would
    otherwise hold it: the session is compared only when a frame arrives)."""
    backoff = Backoff(base=1.0, cap=30.0)
    refused = False
    failed_at: int | None = None  # the cursor from which a malformed frame came

    async def read(session: SessionLike, since: int | None) -> None:
        nonlocal refused
        url = stream_url(session.pds_url) + (f"?cursor={since}" if since is not None else "")
        async with FirehoseSubscription(url) as stream:
            on_stream(True)
            if since is None:
                on_event(None)  # whatever happened while we were not listening
            on_other(None, "")
            refused = False
            async for frame in stream:
                backoff.succeeded()
                if current_session() is not session:
                    break  # logged out, or another login: reconnect for it
                body = frame.body
                if frame.type == "#info" and body.get("name") == "OutdatedCursor":
                    on_event(None)  # the PDS no longer has all events since the cursor
                elif body.get("repo") == session.did or body.get("did") == session.did:
                    on_event(frame)
                else:
                    other = body.get("repo") or body.get("did")
                    if isinstance(other, str):
                        on_other(other, frame.type or "")

    while True:
        changed = session_changed()  # taken before the look: a login in between sets it
        session = current_session()
        if session is None:
            with anyio.move_on_after(1.0):  # and a look every second, whatever sets it
                await changed.wait()
            continue
        since = None if refused else cursor()
        failure: Exception | None = None
        # Connecting and reading end at once when the session changes: a silent host (the
        # account moved away) would otherwise hold the stream until a frame came.
        async with anyio.create_task_group() as watching:
            watching.start_soon(
                _cancel_on_session_change, session_changed,
                lambda held=session: current_session() is held, watching.cancel_scope,
            )  # fmt: skip
            try:
                await read(session, since)
            except Exception as exc:  # handled as itself below, not wrapped in a group
                failure = exc
            finally:
                on_stream(False)
            watching.cancel_scope.cancel()
        try:
            if failure is not None:
                raise failure
        except PermanentError as exc:
            # E.g. FutureCursor: this cursor will never work; connect without one.
            refused = since is not None
            log.info("event stream of %s refused: %s", session.pds_url, exc)
        except VerificationError as exc:
            # A malformed frame. Damaged on the way, the replay from the same cursor brings
            # it whole; if it fails again from that cursor it would at every replay: say so,
            # forget the cursor and connect without one (the next pull reads the repository;
            # the next applied event stores a cursor past the bad frame).
            log.warning("event stream of %s sent a malformed frame: %s", session.pds_url, exc)
            at = cursor()  # where a reconnect would resume
            if at is not None and at != failed_at:
                failed_at = at
            else:
                refused, failed_at = True, None
                on_bad_frame(str(exc))
        except Exception as exc:  # the stream is a hint: any failure means "poll meanwhile"
            log.info("event stream of %s is down: %s", session.pds_url, exc)
        if current_session() is not session:
            continue  # another login (or a logout): connect for it now, no backoff
        await anyio.sleep(backoff.next_delay())


async def _cancel_on_session_change(
    changed: Callable[[], anyio.Event], unchanged: Callable[[], bool], scope: anyio.CancelScope
) -> None:
    while True:
        event = changed()  # taken before the check: a change in between sets this one
        if not unchanged():
            break
        await event.wait()
    scope.cancel()


async def listen_for_others(
    pds_url: str,
    on_other: Callable[[str | None, str], None],
    on_stream: Callable[[bool], None],
) -> None:
    """Run until cancelled: keep a stream open to another host (one where followed accounts
    live) and call ``on_other(did, kind)`` for every event about an account there,
    ``on_other(None, "")`` at each connect. A hint only: the engine then pulls those
    repositories (verified, whole comparison), so no cursor is kept and nothing here is
    trusted."""
    backoff = Backoff(base=1.0, cap=30.0)
    while True:
        try:
            async with FirehoseSubscription(stream_url(pds_url)) as stream:
                on_stream(True)
                on_other(None, "")  # whatever happened while we were not listening
                async for frame in stream:
                    backoff.succeeded()
                    other = frame.body.get("repo") or frame.body.get("did")
                    if isinstance(other, str):
                        on_other(other, frame.type or "")
        except Exception as exc:  # a hint: any failure means "poll meanwhile"
            log.info("event stream of %s is down: %s", pds_url, exc)
        finally:
            on_stream(False)
        await anyio.sleep(backoff.next_delay())

"""``com.atproto.sync.subscribeRepos``: the repository event stream, over a WebSocket.

Each binary WebSocket message is one frame: a DAG-CBOR header ``{op, t}`` followed by a
DAG-CBOR body (atproto.com/specs/event-stream). ``op == 1`` is a message whose type ``t``
is e.g. ``#commit``, ``#sync``, ``#identity``, ``#account`` or ``#info``; ``op == -1`` is an
error frame ``{error, message}`` after which the server closes the stream. Both parts are
decoded with the strict decoder of ``_cbor`` (links are ``CID`` objects, ``blocks`` stay
bytes: a CAR slice for ``_car.CarReader``).

Uses the pinned ``websockets`` library (asyncio implementation, so this part needs the
asyncio backend of anyio).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
)

from atsync._errors import (
    AuthError,
    ClosedError,
    NetworkError,
    PermanentError,
    TransientError,
    VerificationError,
)

from ._cbor import decode_dag_cbor_prefix
from ._xrpc_errors import AUTH_ERROR_NAMES, classify_response, classify_transport

__all__ = ["FirehoseFrame", "FirehoseSubscription", "decode_frame"]

NSID = "com.atproto.sync.subscribeRepos"
# Commit frames carry up to ~2 MB of blocks; the spec lets relays send 5 MB frames.
DEFAULT_MAX_FRAME_SIZE = 8 * 1024 * 1024
# Error frames after which reconnecting (with the same cursor) can succeed.
_TRANSIENT_FRAME_ERRORS = frozenset({"ConsumerTooSlow", "InternalServerError"})


@dataclass(frozen=True)
class FirehoseFrame:
    """One decoded message frame: ``type`` (``"#commit"``…, or ``None`` if the header has
    none) and its ``body`` (data-model values: ``CID`` links, ``bytes``)."""

    type: str | None
    body: dict[str, Any]

    @property
    def seq(self) -> int | None:
        seq = self.body.get("seq")
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _frame_error(error: str | None, message: str | None) -> NetworkError:
    described = f"{NSID}: error frame {error or '(unnamed)'}" + (f": {message}" if message else "")
    cls: type[NetworkError]
    if error in _TRANSIENT_FRAME_ERRORS:
        cls = TransientError
    elif error in AUTH_ERROR_NAMES:
        cls = AuthError
    else:  # e.g. FutureCursor: the same request will fail the same way
        cls = PermanentError
    exc = cls(described, error=error)
    if message:
        exc.message = message
    return exc


def decode_frame(data: bytes) -> FirehoseFrame:
    """Decode one binary frame. Raises ``VerificationError`` for a malformed frame, and the
    classified ``NetworkError`` for an error frame (``op == -1``)."""
    try:
        header, pos = decode_dag_cbor_prefix(data)
        body, end = decode_dag_cbor_prefix(data, pos)
    except VerificationError as e:
        raise VerificationError(f"malformed firehose frame: {e}") from e
    if end != len(data):
        raise VerificationError(f"malformed firehose frame: {len(data) - end} trailing bytes")
    if not isinstance(header, dict) or not isinstance(body, dict):
        raise VerificationError("malformed firehose frame: header and body must be maps")
    op = header.get("op")
    if op == 1 and not isinstance(op, bool):
        t = header.get("t")
        if t is not None and not isinstance(t, str):
            raise VerificationError(f"malformed firehose frame: type {t!r} is not a string")
        return FirehoseFrame(t, body)
    if op == -1:
        error, message = body.get("error"), body.get("message")
        raise _frame_error(
            error if isinstance(error, str) else None,
            message if isinstance(message, str) else None,
        )
    raise VerificationError(f"malformed firehose frame: unknown op {op!r}")


class FirehoseSubscription:
    """An open ``subscribeRepos`` stream: ``async with`` it, then ``async for frame in it``.

    The stream is endless: when the server closes it or the connection breaks, iteration
    raises ``TransientError`` (reconnect from the last ``seq`` you processed; a replay may
    repeat that event). Only our own ``aclose()`` (leaving ``async with``) ends iteration.
    """

    def __init__(
        self,
        url: str,
        *,
        open_timeout: float = 10.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        user_agent: str | None = None,
    ) -> None:
        self.url = url
        self._open_timeout = open_timeout
        self._max_frame_size = max_frame_size
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._user_agent = user_agent
        self._ws: ClientConnection | None = None
        self._closed = False

    async def open(self) -> Self:
        if self._ws is not None:
            return self
        if self._closed:
            raise ClosedError("this firehose subscription was closed; open a new one")
        try:
            self._ws = await connect(
                self.url,
                open_timeout=self._open_timeout,
                max_size=self._max_frame_size,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
                # The reference PDS does not answer a close frame while it is replaying
                # from a cursor; past this, websockets drops the connection itself.
                close_timeout=1.0,
                user_agent_header=self._user_agent,
                # Frames are CBOR with embedded hashes: compression gains little, costs CPU.
                compression=None,
            )
        except InvalidStatus as e:
            resp = e.response
            raise classify_response(
                NSID, resp.status_code, resp.headers, bytes(resp.body or b""), time.time()
            ) from e
        except (OSError, TimeoutError, InvalidHandshake) as e:
            raise classify_transport(NSID, self.url, e) from e
        return self

    async def next_frame(self) -> FirehoseFrame:
        """The next message frame; raises as described in the class docstring."""
        ws = self._ws
        if ws is None:
            raise ClosedError("the firehose subscription is not open (use `async with`)")
        try:
            data = await ws.recv()
        except ConnectionClosed as e:
            if self._closed:
                raise ClosedError("the firehose subscription was closed") from e
            code = e.rcvd.code if e.rcvd is not None else None
            reason = e.rcvd.reason if e.rcvd is not None else ""
            raise TransientError(
                f"{NSID}: the stream was closed (code {code}{', ' + reason if reason else ''})"
            ) from e
        if isinstance(data, str):
            raise VerificationError("malformed firehose frame: a text WebSocket message")
        return decode_frame(data)

    async def aclose(self) -> None:
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is None:
            return
        # With unread frames queued (a replay backlog), websockets has paused reading the
        # socket, so the server's close frame, queued behind them, would never be read and
        # the close handshake would wait out its timeout. Nothing we sent needs an
        # acknowledgement: drop the connection instead.
        if getattr(getattr(ws, "recv_messages", None), "paused", False):
            ws.transport.abort()
            await ws.wait_closed()
        else:
            await ws.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> FirehoseFrame:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self.next_frame()
        except ClosedError:
            if self._closed:
                raise StopAsyncIteration from None
            raise

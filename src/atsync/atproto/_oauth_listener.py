"""The one-shot loopback listener that receives the authorization response (RFC 8252 7.3).

It listens on ``127.0.0.1`` and an ephemeral port (never ``localhost``: a name can resolve
elsewhere, and the reference server refuses it), answers the browser's first request on the
callback path with a short page, and hands its query parameters over. Any other path (a
favicon, a probe) gets a 404 and the listener keeps waiting; it closes after the callback.
The caller checks ``state`` and ``iss``: the listener only transports.
"""

from __future__ import annotations

import contextlib
import html
from types import TracebackType
from urllib.parse import parse_qsl, urlsplit

import anyio
import anyio.abc

__all__ = ["CallbackListener"]

_MAX_HEAD = 16 * 1024
_HEAD_TIMEOUT = 10.0

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>
<body style="font-family: sans-serif; margin: 3em"><h1>{title}</h1><p>{text}</p></body></html>
"""


class CallbackListener:
    """``async with CallbackListener() as cb``: ``cb.redirect_uri`` to register,
    ``await cb.wait()`` for the callback's query parameters (one value per name; a
    repeated name is refused as a malformed response)."""

    def __init__(self, path: str = "/callback", host: str = "127.0.0.1", port: int = 0) -> None:
        if not path.startswith("/"):
            raise ValueError("the callback path must start with '/'")
        self.path = path
        self.host = host
        self.port = port
        self._listener: anyio.abc.SocketListener | None = None
        self._result: dict[str, str] | None = None
        self._done = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = False
        self._served = anyio.Event()

    @property
    def redirect_uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    async def __aenter__(self) -> CallbackListener:
        multi = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        listener = multi.listeners[0]  # one address, one socket
        assert isinstance(listener, anyio.abc.SocketListener)
        self._listener = listener
        self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._serve)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None
        assert self._listener is not None
        # The pending accept is completed by a connection of our own, not cancelled: a
        # cancelled accept that a browser's connection (a favicon, a preconnect) completes in
        # the same instant makes asyncio (3.11) raise InvalidStateError inside its loop.
        self._stopping = True
        with anyio.move_on_after(5):
            with contextlib.suppress(OSError):
                await (await anyio.connect_tcp(self.host, self.port)).aclose()
            await self._served.wait()
        self._tg.cancel_scope.cancel()  # what is left: handlers of slow clients
        # The body's own exception propagates as it is, not wrapped in a group.
        await self._tg.__aexit__(None, None, None)
        await self._listener.aclose()

    async def wait(self) -> dict[str, str]:
        await self._done.wait()
        assert self._result is not None
        return self._result

    async def _serve(self) -> None:
        assert self._listener is not None
        async with anyio.create_task_group() as tg:
            try:
                while True:
                    stream = await self._listener.accept()
                    if self._stopping:
                        await stream.aclose()
                        break
                    tg.start_soon(self._handle, stream)
            finally:
                self._served.set()  # no accept pending any more

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(_HEAD_TIMEOUT):
                    head = await _read_head(stream)
            except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return
            target = _request_target(head)
            if target is None:
                await _respond(stream, 400, "Bad request", "That was not an HTTP GET request.")
                return
            parts = urlsplit(target)
            if parts.path != self.path or self._done.is_set():
                await _respond(stream, 404, "Not found", "Nothing here.")
                return
            pairs = parse_qsl(parts.query, keep_blank_values=True)
            params = dict(pairs)
            if len(params) != len(pairs):
                params = {"error": "invalid_request", "error_description": "repeated parameter"}
            self._result = params
            self._done.set()
            if "error" in params:
                title, text = "Not logged in", "The authorization was not granted."
            else:
                title, text = "Logged in", "You can close this window and go back to the app."
            await _respond(stream, 200, title, text)


async def _read_head(stream: anyio.abc.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive(4096)
        data += chunk
        if len(data) > _MAX_HEAD:
            break
    return data


def _request_target(head: bytes) -> str | None:
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    fields = line.split(" ")
    if len(fields) != 3 or fields[0] != "GET" or not fields[2].startswith("HTTP/1."):
        return None
    return fields[1]


async def _respond(stream: anyio.abc.SocketStream, status: int, title: str, text: str) -> None:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    body = _PAGE.format(title=html.escape(title), text=html.escape(text)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n"
        "Referrer-Policy: no-referrer\r\n\r\n"
    ).encode()
    with contextlib.suppress(anyio.BrokenResourceError, OSError):
        await stream.send(head + body)

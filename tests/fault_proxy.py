"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1, to sit in front of the real PDS in tests.

    async with FaultProxy(pds.pds_url, seed=1) as proxy:
        proxy.add(DropAfterForward(), nsid="com.atproto.repo.applyWrites", nth=1)
        proxy.add(RateLimited(retry_after=2), nsid="com.atproto.repo.applyWrites", nth=3)
        session = proxied_session(real_session, proxy.url)   # its pds_url is the proxy
        ...
        assert proxy.counts["drop_after_forward"] == 1

The proxy parses just enough HTTP/1.1 to know where each request and response ends
(Content-Length or chunked bodies; responses may also end at EOF). Every request goes to the
PDS on a fresh upstream connection, so a fault on one request never disturbs another; the
client side keeps its connection alive as the PDS would. A WebSocket upgrade (the event
stream, ``subscribeRepos``) is relayed frame by frame with faults of its own: see
ws_fault_proxy.py (``proxy.add_frame(Cut(), type="#commit", nth=3)``, ``proxy.streams``).

Which fault applies to a request is decided by the first ``Rule`` (in the order added) that
matches it — by NSID, method, a predicate on the request, the Nth matching request, a
probability drawn from a seeded RNG, and at most ``times`` firings. No rule: ``Pass``.
Everything that happened is recorded in ``events`` and counted per fault in ``counts``, so a
test can assert that the faults it planned really fired.
"""

from __future__ import annotations

import gzip
import json
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar
from urllib.parse import urlsplit

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.buffered import BufferedByteStream

from atsync.atproto._session import Session, SessionData
from ws_fault_proxy import (
    EVENT_HEADER,
    Cut,
    DelayFrame,
    DropFrame,
    DuplicateFrame,
    ErrorFrame,
    FrameEvent,
    FrameFault,
    FrameRule,
    HoldFrame,
    InjectFrame,
    PassFrame,
    ReorderFrame,
    RewriteFrame,
    StreamEvent,
    StreamFrame,
    StreamRelay,
    alter_blocks,
    corrupt_cbor,
    encode_frame,
    error_frame,
    info_frame,
    replace_in_blocks,
    rewrite_body,
)

__all__ = [
    "Answer",
    "Cut",
    "Delay",
    "DelayFrame",
    "DropAfterForward",
    "DropBeforeForward",
    "DropFrame",
    "DuplicateFrame",
    "Error500",
    "ErrorFrame",
    "Fault",
    "FaultProxy",
    "FrameEvent",
    "FrameFault",
    "FrameRule",
    "Hold",
    "HoldFrame",
    "InjectFrame",
    "Pass",
    "PassFrame",
    "ProxyEvent",
    "ProxyRequest",
    "RateLimited",
    "ReorderFrame",
    "ResetMidResponse",
    "RewriteFrame",
    "Rule",
    "StreamEvent",
    "StreamFrame",
    "Truncate",
    "alter_blocks",
    "corrupt_cbor",
    "encode_frame",
    "error_frame",
    "info_frame",
    "proxied_session",
    "replace_in_blocks",
    "rewrite_body",
]

MAX_HEAD = 64 * 1024
# Errors that mean "the peer went away": a fault may have closed the client, or the client
# gave up (timeout) while the proxy was still busy with its request.
_GONE = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.DelimiterNotFound,
    ConnectionError,
    OSError,
)


# --- faults ----------------------------------------------------------------------------------


class Fault:
    """What the proxy does with one request. ``name`` is the key in ``FaultProxy.counts``."""

    name: ClassVar[str] = "fault"


@dataclass(frozen=True)
class Pass(Fault):
    """Forward the request and the whole response unchanged."""

    name: ClassVar[str] = "pass"


@dataclass(frozen=True)
class Delay(Fault):
    """Wait ``seconds`` before forwarding (``after_forward=False``: the PDS sees the request
    late, possibly after the client gave up) or before answering (``True``: the PDS has
    applied it already)."""

    seconds: float
    after_forward: bool = False
    name: ClassVar[str] = "delay"


@dataclass(eq=False)
class Hold(Fault):
    """Like ``Delay`` but until the test calls ``release()``. ``reached`` is set once a
    request is being held, so a test can act (e.g. edit locally) while it is in flight.
    ``drop``: once released, close the connection without answering — after forwarding (the
    PDS applied the request; the client never learns it) or instead of forwarding it."""

    after_forward: bool = True
    drop: bool = False  # after release, close the connection instead of answering
    gate: anyio.Event = field(default_factory=anyio.Event)
    reached: anyio.Event = field(default_factory=anyio.Event)
    name: ClassVar[str] = "hold"

    def release(self) -> None:
        self.gate.set()


@dataclass(frozen=True)
class DropBeforeForward(Fault):
    """Close the client connection without forwarding: the PDS never sees the request."""

    name: ClassVar[str] = "drop_before_forward"


@dataclass(frozen=True)
class DropAfterForward(Fault):
    """Forward the request, read the PDS's whole answer (so the PDS applied it), then close
    the client connection without answering."""

    name: ClassVar[str] = "drop_after_forward"


@dataclass(frozen=True)
class Answer(Fault):
    """Answer ``status`` with an XRPC JSON error body, without forwarding."""

    status: int = 500
    error: str = "InternalServerError"
    message: str = "injected by the fault proxy"
    headers: tuple[tuple[str, str], ...] = ()
    name: ClassVar[str] = "answer"


@dataclass(frozen=True)
class Error500(Answer):
    """``500 InternalServerError`` without forwarding: the PDS applied nothing."""

    name: ClassVar[str] = "error_500"


@dataclass(frozen=True)
class RateLimited(Fault):
    """``429 RateLimitExceeded`` without forwarding, with ``Retry-After: <retry_after>``
    and/or ``RateLimit-Reset: <now + reset_in>`` (Unix seconds, as the reference PDS sends)."""

    retry_after: float | None = 1.0
    reset_in: float | None = None
    name: ClassVar[str] = "rate_limited"

    def answer(self) -> Answer:
        headers: list[tuple[str, str]] = []
        if self.retry_after is not None:
            headers.append(("Retry-After", _seconds(self.retry_after)))
        if self.reset_in is not None:
            headers += [
                ("RateLimit-Limit", "5000"),
                ("RateLimit-Remaining", "0"),
                ("RateLimit-Reset", str(int(time.time() + self.reset_in + 0.999))),
                ("RateLimit-Policy", "5000;w=3600"),
            ]
        return Answer(429, "RateLimitExceeded", "Rate Limit Exceeded", tuple(headers))


@dataclass(frozen=True)
class Truncate(Fault):
    """Forward, then send only ``keep`` (a fraction) of the response body. ``fix_length``:
    announce the shortened length (a complete but cut-off message, e.g. invalid JSON);
    otherwise announce the full length and close the connection early."""

    keep: float = 0.5
    fix_length: bool = False
    name: ClassVar[str] = "truncate"


@dataclass(frozen=True)
class ResetMidResponse(Fault):
    """Forward, send the head and part of the body, then reset the connection (TCP RST)."""

    keep: float = 0.5
    name: ClassVar[str] = "reset_mid_response"


@dataclass(frozen=True)
class Rewrite(Fault):
    """Forward, then answer with ``change(body)`` instead of the PDS's body (same status and
    headers, the length fixed): tampered or forged data from the network."""

    change: Callable[[bytes], bytes]
    name: ClassVar[str] = "rewrite"


# --- requests, rules, events -------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyRequest:
    """One request as the proxy read it (body de-chunked)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def nsid(self) -> str | None:
        return self.path[len("/xrpc/") :] if self.path.startswith("/xrpc/") else None

    @property
    def websocket(self) -> bool:
        """A WebSocket upgrade (an event stream): relayed frame by frame."""
        return "websocket" in (self.header("upgrade") or "").lower()

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Rule:
    """When ``fault`` applies. Counting (``nth``) is among the requests that match ``nsid``,
    ``method``, ``path`` and ``when``, whether or not an earlier rule fired for them; ``nth`` is
    1-based (an int or a collection of ints); ``probability`` draws from the proxy's seeded
    RNG; ``times`` caps the firings."""

    fault: Fault
    nsid: str | None = None
    method: str | None = None
    path: str | None = None  # a path prefix, for requests that are not XRPC calls
    when: Callable[[ProxyRequest], bool] | None = None
    nth: int | Collection[int] | None = None
    probability: float | None = None
    times: int | None = None
    matched: int = 0
    fired: int = 0

    def _matches(self, request: ProxyRequest) -> bool:
        if self.nsid is not None and request.nsid != self.nsid:
            return False
        if self.method is not None and request.method.upper() != self.method.upper():
            return False
        if self.path is not None and not request.path.startswith(self.path):
            return False
        return self.when is None or bool(self.when(request))

    def _observe(self, request: ProxyRequest) -> bool:
        """Count the request if it matches (every rule counts it, whichever fires)."""
        if not self._matches(request):
            return False
        self.matched += 1
        return True

    def _fires(self, rng: random.Random) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.nth is not None:
            wanted = {self.nth} if isinstance(self.nth, int) else set(self.nth)
            if self.matched not in wanted:
                return False
        # Drawn only for requests that passed the other tests, so a seed replays exactly.
        if self.probability is not None and rng.random() >= self.probability:
            return False
        self.fired += 1
        return True


@dataclass
class ProxyEvent:
    """What happened to one request. Times are ``time.monotonic()``; ``status`` is what the
    client was sent (None: nothing, or not the whole of it); ``upstream_status`` what the PDS
    answered (None: not forwarded, or no answer)."""

    index: int
    method: str
    path: str
    nsid: str | None
    fault: str
    received_at: float
    forwarded: bool = False
    upstream_status: int | None = None
    status: int | None = None
    answered_at: float | None = None
    done: bool = False
    target: str = ""  # the path with its query string


# --- the proxy ---------------------------------------------------------------------------------


class FaultProxy:
    """See the module docstring. Use as ``async with FaultProxy(upstream_url) as proxy``."""

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        # The dev PDS listens on 127.0.0.1 only; "localhost" may resolve to ::1 first.
        host = parts.hostname
        self._upstream = ("127.0.0.1" if host == "localhost" else host, parts.port)
        self._rng = random.Random(seed)
        self.rules: list[Rule] = []
        self.events: list[ProxyEvent] = []
        self.counts: Counter[str] = Counter()
        self._changed = anyio.Event()
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self.port = 0
        # WebSocket upgrades go to the relay (ws_fault_proxy.py), which shares the RNG.
        self._relay = StreamRelay(self._upstream, self._rng, self._notify, self._on_handshake)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- programming ----------------------------------------------------------------------

    def add(
        self,
        fault: Fault,
        *,
        nsid: str | None = None,
        method: str | None = None,
        path: str | None = None,
        when: Callable[[ProxyRequest], bool] | None = None,
        nth: int | Collection[int] | None = None,
        probability: float | None = None,
        times: int | None = None,
    ) -> Rule:
        """Add a rule (checked after the earlier ones); returns it (``fired``, ``matched``).
        A rule counts (``nth``) the requests it sees from when it is added."""
        rule = Rule(fault, nsid, method, path, when, nth, probability, times)
        self.rules.append(rule)
        return rule

    def add_frame(
        self,
        fault: FrameFault,
        *,
        type: str | None = None,
        repo: str | None = None,
        path: str | None = None,
        when: Callable[[StreamFrame], bool] | None = None,
        nth: int | Collection[int] | None = None,
        probability: float | None = None,
        times: int | None = None,
    ) -> FrameRule:
        """Add a rule for the frames the PDS sends on relayed event streams (see
        ws_fault_proxy.py); returns it (``fired``, ``matched``)."""
        return self._relay.add(FrameRule(fault, type, repo, path, when, nth, probability, times))

    def clear(self) -> None:
        """Drop every rule, HTTP and frame: from now on everything passes."""
        self.rules.clear()
        self._relay.rules.clear()

    def _choose(self, request: ProxyRequest) -> Fault:
        chosen: Fault | None = None
        for rule in self.rules:
            if rule._observe(request) and chosen is None and rule._fires(self._rng):
                chosen = rule.fault
        return chosen or Pass()

    # -- observing --------------------------------------------------------------------------

    def requests(self, nsid: str | None = None) -> list[ProxyEvent]:
        return [e for e in self.events if nsid is None or e.nsid == nsid]

    @property
    def streams(self) -> list[StreamEvent]:
        """Every relayed event stream (WebSocket connection), in the order opened."""
        return self._relay.streams

    @property
    def frame_counts(self) -> Counter[str]:
        """Frames from the PDS per frame fault name (``pass``, ``drop``, ``cut``...)."""
        return self._relay.counts

    def frames(self, type: str | None = None) -> list[FrameEvent]:
        """Every frame the PDS sent on relayed streams (of ``type``), in order."""
        return [f for s in self._relay.streams for f in s.frames if type is None or f.type == type]

    def _on_handshake(self, index: int, status: int) -> None:
        if 0 <= index < len(self.events):
            event = self.events[index]
            event.upstream_status = event.status = status
            event.answered_at = time.monotonic()

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def wait_until(self, predicate: Callable[[FaultProxy], bool]) -> None:
        """Wait until ``predicate(proxy)`` holds (re-checked on every request event). Bound
        it with ``anyio.fail_after``."""
        while not predicate(self):
            await self._changed.wait()

    # -- running ----------------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self._listener = listener
        self.port = int(listener.extra(SocketAttribute.local_port))
        await self._relay.start()
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(listener.serve, self._serve_client)
        return self

    async def __aexit__(self, *exc: object) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)
        await self._relay.aclose()
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None

    async def _serve_client(self, client: anyio.abc.SocketStream) -> None:
        stream = BufferedByteStream(client)
        try:
            while True:
                try:
                    request = await _read_request(stream)
                except _GONE:
                    return
                if request is None:
                    return
                if not await self._handle(request, client, stream):
                    return
        finally:
            await _close_quietly(client)

    async def _handle(
        self, request: ProxyRequest, client: anyio.abc.SocketStream, stream: BufferedByteStream
    ) -> bool:
        """Serve one request; False when the client connection must be closed."""
        fault = self._choose(request)
        event = ProxyEvent(
            len(self.events),
            request.method,
            request.path,
            request.nsid,
            fault.name,
            time.monotonic(),
            target=request.target,
        )
        self.events.append(event)
        self.counts[fault.name] += 1
        self._notify()
        try:
            return await self._apply(fault, request, client, stream, event)
        finally:
            event.done = True
            self._notify()

    async def _apply(
        self,
        fault: Fault,
        request: ProxyRequest,
        client: anyio.abc.SocketStream,
        stream: BufferedByteStream,
        event: ProxyEvent,
    ) -> bool:
        if isinstance(fault, DropBeforeForward):
            return False
        if isinstance(fault, RateLimited):
            fault = fault.answer()
        if isinstance(fault, Answer):
            return await self._send(stream, event, *_error_response(fault))
        if isinstance(fault, Delay) and not fault.after_forward:
            await anyio.sleep(fault.seconds)
        if isinstance(fault, Hold) and not fault.after_forward:
            fault.reached.set()
            await fault.gate.wait()
            if fault.drop:
                return False  # dropped before the PDS saw it

        # The PDS sees the request from here on, whatever becomes of the answer.
        event.forwarded = True
        if request.websocket:
            await self._splice(request, client, stream, event)
            return False
        try:
            status, headers, body = await self._forward(request)
        except _GONE:
            return await self._send(stream, event, *_error_response(_BAD_GATEWAY))
        event.upstream_status = status
        keep_alive = (request.header("connection") or "").lower() != "close"

        if isinstance(fault, DropAfterForward):
            return False
        if isinstance(fault, Delay) and fault.after_forward:
            await anyio.sleep(fault.seconds)
        if isinstance(fault, Hold) and fault.after_forward:
            fault.reached.set()
            await fault.gate.wait()
        if isinstance(fault, Hold) and fault.drop:
            return False
        if isinstance(fault, Rewrite):
            encoding = next((v for k, v in headers if k.lower() == "content-encoding"), "")
            if encoding.lower() == "gzip":  # change what the client will read, not the wire
                changed = gzip.compress(fault.change(gzip.decompress(body)))
            else:
                changed = fault.change(body)
            return await self._send(stream, event, status, headers, changed)
        if isinstance(fault, Truncate):
            cut = body[: int(len(body) * fault.keep)]
            if fault.fix_length:
                return await self._send(stream, event, status, headers, cut) and keep_alive
            head = _head(status, headers, len(body), keep_alive=False)
            await _send_quietly(stream, head + cut)
            return False
        if isinstance(fault, ResetMidResponse):
            head = _head(status, headers, len(body), keep_alive=False)
            await _send_quietly(stream, head + body[: int(len(body) * fault.keep)])
            _reset(client)
            return False
        return await self._send(stream, event, status, headers, body) and keep_alive

    async def _send(
        self,
        stream: BufferedByteStream,
        event: ProxyEvent,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> bool:
        if not await _send_quietly(stream, _head(status, headers, len(body)) + body):
            return False
        event.status = status
        event.answered_at = time.monotonic()
        return True

    async def _splice(
        self,
        request: ProxyRequest,
        client: anyio.abc.SocketStream,
        stream: BufferedByteStream,
        event: ProxyEvent,
    ) -> None:
        """Hand a WebSocket upgrade to the relay: its raw bytes both ways until either side
        closes (the relay answers the handshake and applies the frame faults)."""
        lines = [f"{request.method} {request.target} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in request.headers if k.lower() != EVENT_HEADER.lower()]
        lines += [f"{EVENT_HEADER}: {event.index}", "", ""]
        head = "\r\n".join(lines).encode("latin-1")
        try:
            relay = await anyio.connect_tcp("127.0.0.1", self._relay.port)
        except OSError:
            await self._send(stream, event, *_error_response(_BAD_GATEWAY))
            return
        async with relay:
            try:
                await relay.send(head)  # what the client sent after it follows (pump)
            except _GONE:
                return

            async def pump(
                source: anyio.abc.ByteReceiveStream, sink: anyio.abc.ByteSendStream
            ) -> None:
                try:
                    while True:
                        await sink.send(await source.receive())
                except (*_GONE, anyio.EndOfStream):
                    pass
                finally:
                    group.cancel_scope.cancel()  # either side gone: close both

            async with anyio.create_task_group() as group:
                group.start_soon(pump, stream, relay)
                group.start_soon(pump, relay, client)

    async def _forward(self, request: ProxyRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send the request to the PDS on a new connection and read its whole answer."""
        lines = [f"{request.method} {request.target} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in request.headers if k.lower() not in _HOP_HEADERS]
        lines += [f"Content-Length: {len(request.body)}", "Connection: close", "", ""]
        message = "\r\n".join(lines).encode("latin-1") + request.body
        if len(request.body) > _LARGE_BODY:
            # The PDS may answer (413) and close before reading all of it; an asyncio
            # transport then drops the answer with the broken write. A blocking socket keeps it.
            answer = await anyio.to_thread.run_sync(self._exchange_blocking, message)
            reader = BufferedByteStream(_Bytes(answer))
        else:
            upstream = await anyio.connect_tcp(*self._upstream)
            await upstream.send(message)
            reader = BufferedByteStream(upstream)
        async with reader:
            status, headers = _parse_head(await reader.receive_until(b"\r\n\r\n", MAX_HEAD))
            if request.method.upper() == "HEAD" or status in (204, 304) or status < 200:
                return status, headers, b""
            body = await _read_body(reader, headers, until_eof=True)
            return status, headers, body

    def _exchange_blocking(self, message: bytes) -> bytes:
        with socket.create_connection(self._upstream, timeout=60) as sock:
            try:
                sock.sendall(message)
            except OSError:
                pass  # it stopped reading and answered: the answer is still to be read
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        if not chunks:
            raise anyio.BrokenResourceError("the PDS closed without answering")
        return b"".join(chunks)


_LARGE_BODY = 1024 * 1024


class _Bytes(anyio.abc.ByteReceiveStream):
    """A whole answer, already read, as a stream."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._data:
            raise anyio.EndOfStream
        chunk, self._data = self._data[:max_bytes], self._data[max_bytes:]
        return chunk

    async def aclose(self) -> None:
        self._data = b""


# --- HTTP/1.1 framing ---------------------------------------------------------------------------

_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "content-length", "transfer-encoding", "proxy-connection"}
)
_REASONS = {
    200: "OK",
    400: "Bad Request",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
}
_BAD_GATEWAY = Answer(502, "UpstreamFailure", "the fault proxy could not reach the PDS")


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _parse_head(raw: bytes) -> tuple[int, list[tuple[str, str]]]:
    text = raw.decode("latin-1")
    first, *rest = text.split("\r\n")
    parts = first.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise anyio.BrokenResourceError(f"not an HTTP response: {first!r}")
    return int(parts[1]), [_header(line) for line in rest if line]


def _header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip(), value.strip()


def _get(headers: list[tuple[str, str]] | tuple[tuple[str, str], ...], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


async def _read_request(stream: BufferedByteStream) -> ProxyRequest | None:
    try:
        raw = await stream.receive_until(b"\r\n\r\n", MAX_HEAD)
    except (anyio.IncompleteRead, anyio.EndOfStream):
        return None  # the client closed its keep-alive connection between requests
    text = raw.decode("latin-1")
    first, *rest = text.split("\r\n")
    method, target, _version = first.split(" ", 2)
    headers = tuple(_header(line) for line in rest if line)
    body = await _read_body(stream, list(headers), until_eof=False)
    return ProxyRequest(method, target, headers, body)


async def _read_body(
    stream: BufferedByteStream, headers: list[tuple[str, str]], *, until_eof: bool
) -> bytes:
    if "chunked" in (_get(headers, "transfer-encoding") or "").lower():
        body = bytearray()
        while True:
            size_line = await stream.receive_until(b"\r\n", 1024)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers (usually none) end with an empty line.
                while await stream.receive_until(b"\r\n", MAX_HEAD):
                    pass
                return bytes(body)
            body += await stream.receive_exactly(size)
            await stream.receive_exactly(2)
    length = _get(headers, "content-length")
    if length is not None:
        return await stream.receive_exactly(int(length)) if int(length) else b""
    if not until_eof:
        return b""  # a request without a length has no body
    body = bytearray()  # no framing: the body ends when the PDS closes (buffered data first)
    try:
        while True:
            body += await stream.receive()
    except (anyio.EndOfStream, anyio.ClosedResourceError):
        pass
    return bytes(body)


def _head(
    status: int, headers: list[tuple[str, str]], length: int, *, keep_alive: bool = True
) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_HEADERS]
    lines.append(f"Content-Length: {length}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error_response(answer: Answer) -> tuple[int, list[tuple[str, str]], bytes]:
    body = json.dumps({"error": answer.error, "message": answer.message}).encode()
    headers = [("Content-Type", "application/json; charset=utf-8"), *answer.headers]
    return answer.status, headers, body


async def _send_quietly(stream: BufferedByteStream, data: bytes) -> bool:
    try:
        await stream.send(data)
    except _GONE:
        return False  # the client gave up (e.g. its timeout) while we were busy
    return True


def _reset(client: anyio.abc.SocketStream) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    try:
        sock: socket.socket = client.extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, anyio.TypedAttributeLookupError):
        pass


async def _close_quietly(client: anyio.abc.SocketStream) -> None:
    try:
        await client.aclose()
    except _GONE:
        pass


# --- sessions through the proxy -------------------------------------------------------------


def proxied_session(session: Session, proxy_url: str) -> Session:
    """A copy of ``session`` whose PDS is the proxy, so every call of an ``XrpcClient`` built
    on it (including token refreshes) goes through the proxy. The tokens are the same."""
    data: SessionData = replace(session.data, pds_url=proxy_url)
    return Session(data, refresh_margin=session.refresh_margin)

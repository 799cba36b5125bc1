"""The WebSocket half of the fault proxy: relays event streams (``subscribeRepos``) frame by
frame between a client and the PDS, with faults on the frames the PDS sends.

``FaultProxy`` (fault_proxy.py) hands every request carrying ``Upgrade: websocket`` to a
``StreamRelay``: the raw connection is spliced to the relay's own ``websockets`` server on
loopback, which opens a ``websockets`` client connection to the PDS with the same path and
query (``?cursor=``) and relays messages both ways. So one proxy URL serves both halves, and
``proxied_session(session, proxy.url)`` sends an engine's XRPC calls and its event stream
through the proxy (the stream URL is derived from the session's ``pds_url``).

    proxy.add_frame(Cut(), type="#commit", repo=did, nth=5)       # the 5th commit: cut
    proxy.add_frame(DropFrame(), type="#commit", nth=3)           # a gap, silently
    proxy.add_frame(DelayFrame(1.0, up_to=2.0), type="#commit")   # every commit late
    proxy.add_frame(RewriteFrame(corrupt_cbor), nth=1)            # a malformed frame
    proxy.add_frame(RewriteFrame(replace_in_blocks(b"a", b"b")))  # a tampered record block
    proxy.add_frame(ErrorFrame("FutureCursor"), nth=1)            # an error frame, then close
    proxy.add_frame(InjectFrame(info_frame("OutdatedCursor")), nth=1)
    proxy.add_frame(DuplicateFrame(), nth=2)                      # at-least-once delivery
    proxy.add_frame(ReorderFrame(), nth=4)                        # the 4th after the 5th

Frames are relayed one at a time in the order the PDS sent them, so a delayed frame also
delays the ones behind it (as on a real connection: order is kept). Rules work like the HTTP
ones: the first rule (in the order added) that fires decides; ``nth`` counts the frames a
rule matched since it was added, across connections (replays included). Everything is
recorded: ``proxy.streams`` (one ``StreamEvent`` per connection, with its ``frames``) and
``proxy.frame_counts`` (per fault name); ``proxy.wait_until`` wakes on every frame.

Faults on the upgrade request itself are the HTTP rules' (``nsid="com.atproto.sync.
subscribeRepos"``): ``Answer``/``Error500``/``RateLimited`` refuse the handshake with that
status, ``DropBeforeForward`` closes the connection, ``Delay``/``Hold`` before forwarding
hold it; any other fault relays the stream as ``Pass`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.http11 import Request, Response
from websockets.protocol import State

from atsync.atproto._car import CarReader, CarWriter
from atsync.atproto._cbor import decode_dag_cbor_prefix, encode_dag_cbor

__all__ = [
    "Cut",
    "DelayFrame",
    "DropFrame",
    "DuplicateFrame",
    "ErrorFrame",
    "FrameEvent",
    "FrameFault",
    "FrameRule",
    "HoldFrame",
    "InjectFrame",
    "PassFrame",
    "ReorderFrame",
    "RewriteFrame",
    "StreamEvent",
    "StreamFrame",
    "StreamRelay",
    "alter_blocks",
    "corrupt_cbor",
    "encode_frame",
    "error_frame",
    "info_frame",
    "replace_in_blocks",
    "rewrite_body",
]

# The header the HTTP front adds when it splices a connection to the relay, naming its
# ProxyEvent, so the relay can record the handshake's outcome on it.
EVENT_HEADER = "X-Fault-Proxy-Event"


# --- frame faults ------------------------------------------------------------------------------


class FrameFault:
    """What the relay does with one frame from the PDS. ``name`` keys ``frame_counts``."""

    name: ClassVar[str] = "frame_fault"


@dataclass(frozen=True)
class PassFrame(FrameFault):
    """Relay the frame unchanged."""

    name: ClassVar[str] = "pass"


@dataclass(frozen=True)
class DropFrame(FrameFault):
    """Skip the frame silently: the client sees a gap, the connection stays up."""

    name: ClassVar[str] = "drop"


@dataclass(frozen=True)
class DelayFrame(FrameFault):
    """Wait ``seconds`` (or a time drawn from the proxy's seeded RNG between ``seconds`` and
    ``up_to``) before relaying the frame; the frames behind it wait too (order is kept)."""

    seconds: float
    up_to: float | None = None
    name: ClassVar[str] = "delay"


@dataclass(eq=False)
class HoldFrame(FrameFault):
    """Hold the frame (and the stream behind it) until ``release()``; ``reached`` is set
    once a frame is held. ``drop``: once released, skip the frame instead of relaying it."""

    drop: bool = False
    gate: anyio.Event = field(default_factory=anyio.Event)
    reached: anyio.Event = field(default_factory=anyio.Event)
    name: ClassVar[str] = "hold"

    def release(self) -> None:
        self.gate.set()


@dataclass(frozen=True)
class RewriteFrame(FrameFault):
    """Relay ``change(frame bytes)`` instead of the frame (see ``corrupt_cbor``,
    ``replace_in_blocks``, ``alter_blocks``)."""

    change: Callable[[bytes], bytes]
    name: ClassVar[str] = "rewrite"


@dataclass(frozen=True)
class DuplicateFrame(FrameFault):
    """Relay the frame, then ``copies`` more times (at-least-once delivery)."""

    copies: int = 1
    name: ClassVar[str] = "duplicate"


@dataclass(frozen=True)
class ReorderFrame(FrameFault):
    """Hold the frame back and relay it right after the next frame that is relayed (the
    two arrive swapped)."""

    name: ClassVar[str] = "reorder"


@dataclass(frozen=True)
class InjectFrame(FrameFault):
    """Send ``data`` (a whole frame: ``encode_frame``, ``info_frame``, ``error_frame``) before
    the frame (``after=True``: after it); the frame itself is relayed too."""

    data: bytes
    after: bool = False
    name: ClassVar[str] = "inject"


@dataclass(frozen=True)
class ErrorFrame(FrameFault):
    """Send an error frame ``{error, message}`` instead of the frame, then close both sides
    (a normal close, as a PDS does after an error frame)."""

    error: str = "InternalServerError"
    message: str | None = "injected by the fault proxy"
    name: ClassVar[str] = "error_frame"


@dataclass(frozen=True)
class Cut(FrameFault):
    """Cut the connection at this frame, on both sides (the client's and the PDS's), without
    a close handshake (``close=True``: with a close frame, code ``code``). ``forward``: relay
    the frame first, so the cut comes right after it."""

    forward: bool = False
    close: bool = False
    code: int = 1011
    name: ClassVar[str] = "cut"


# --- frames as the relay reads them --------------------------------------------------------


@dataclass(frozen=True)
class StreamFrame:
    """One message from the PDS: its bytes, and its header and body when they decode
    (a frame that does not decode still matches rules that do not look inside)."""

    stream: int  # StreamEvent.index of its connection
    n: int  # 1-based position on its connection
    data: bytes
    header: dict[str, Any] | None
    body: dict[str, Any] | None

    @classmethod
    def read(cls, stream: int, n: int, data: bytes) -> StreamFrame:
        header: Any = None
        body: Any = None
        try:
            header, pos = decode_dag_cbor_prefix(data)
            body, _ = decode_dag_cbor_prefix(data, pos)
        except Exception:
            pass
        return cls(
            stream,
            n,
            data,
            header if isinstance(header, dict) else None,
            body if isinstance(body, dict) else None,
        )

    @property
    def op(self) -> int | None:
        return self.header.get("op") if self.header else None

    @property
    def type(self) -> str | None:
        """``#commit``, ``#sync``, ``#identity``, ``#account``, ``#info``; ``"error"`` for an
        error frame; None if it does not decode."""
        if self.op == -1:
            return "error"
        return self.header.get("t") if self.header else None

    @property
    def seq(self) -> int | None:
        seq = self.body.get("seq") if self.body else None
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    @property
    def repo(self) -> str | None:
        """The account the event is about (``repo`` of #commit, ``did`` of the others)."""
        if not self.body:
            return None
        value = self.body.get("repo", self.body.get("did"))
        return value if isinstance(value, str) else None

    @property
    def paths(self) -> tuple[str, ...]:
        """``collection/rkey`` of each op of a #commit."""
        ops = self.body.get("ops") if self.body else None
        if not isinstance(ops, list):
            return ()
        return tuple(op["path"] for op in ops if isinstance(op, dict) and "path" in op)

    @property
    def name(self) -> str | None:
        """``name`` of an #info frame, ``error`` of an error frame."""
        if not self.body:
            return None
        value = self.body.get("error" if self.op == -1 else "name")
        return value if isinstance(value, str) else None


@dataclass
class FrameRule:
    """When a frame fault applies: by ``type`` (e.g. ``"#commit"``), ``repo`` (the account),
    ``path`` (a prefix of one of a #commit's op paths, e.g. the collection), a predicate on
    the ``StreamFrame``, the Nth matching frame (1-based; an int or a collection), a
    probability from the proxy's seeded RNG, and at most ``times`` firings."""

    fault: FrameFault
    type: str | None = None
    repo: str | None = None
    path: str | None = None
    when: Callable[[StreamFrame], bool] | None = None
    nth: int | Collection[int] | None = None
    probability: float | None = None
    times: int | None = None
    matched: int = 0
    fired: int = 0

    def _observe(self, frame: StreamFrame) -> bool:
        if self.type is not None and frame.type != self.type:
            return False
        if self.repo is not None and frame.repo != self.repo:
            return False
        if self.path is not None and not any(p.startswith(self.path) for p in frame.paths):
            return False
        if self.when is not None and not self.when(frame):
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
        if self.probability is not None and rng.random() >= self.probability:
            return False
        self.fired += 1
        return True


@dataclass
class FrameEvent:
    """What happened to one frame from the PDS. ``forwarded``: the client was sent it (or its
    rewrite); ``at`` is ``time.monotonic()`` when the relay read it."""

    stream: int
    n: int
    type: str | None
    seq: int | None
    repo: str | None
    size: int
    fault: str
    at: float
    forwarded: bool = False
    sent_at: float | None = None


@dataclass
class StreamEvent:
    """One relayed connection. ``status`` is what the client's handshake got (101, or the
    PDS's refusal, 502 if the PDS could not be reached); ``ended`` says how it ended:
    ``"upstream closed (<code>)"``, ``"client closed"``, ``"cut"``, ``"error frame"``,
    ``"proxy closed"``."""

    index: int
    target: str
    cursor: int | None
    opened_at: float
    status: int | None = None
    ended: str | None = None
    closed_at: float | None = None
    upstream_closed: bool = False  # the relay's connection to the PDS is closed too
    frames: list[FrameEvent] = field(default_factory=list)

    @property
    def open(self) -> bool:
        return self.status == 101 and self.closed_at is None


# --- building and changing frames ------------------------------------------------------------


def encode_frame(header: dict[str, Any], body: dict[str, Any]) -> bytes:
    """A frame: the DAG-CBOR header then the DAG-CBOR body."""
    return encode_dag_cbor(header) + encode_dag_cbor(body)


def info_frame(name: str = "OutdatedCursor", message: str | None = None) -> bytes:
    body: dict[str, Any] = {"name": name}
    if message is not None:
        body["message"] = message
    return encode_frame({"op": 1, "t": "#info"}, body)


def error_frame(error: str, message: str | None = None) -> bytes:
    body: dict[str, Any] = {"error": error}
    if message is not None:
        body["message"] = message
    return encode_frame({"op": -1}, body)


def corrupt_cbor(data: bytes) -> bytes:
    """The frame with its body's first byte made a CBOR "break" (0xff) outside any
    indefinite-length item: the header still decodes, the body does not."""
    _, pos = decode_dag_cbor_prefix(data)
    return data[:pos] + b"\xff" + data[pos + 1 :]


def alter_blocks(change: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """A rewrite that passes every block of a #commit's ``blocks`` CAR slice through
    ``change`` and keeps each block's CID as it was (so a changed block no longer matches
    it), then re-encodes the frame. Frames without blocks pass unchanged."""

    def rewrite(data: bytes) -> bytes:
        header, pos = decode_dag_cbor_prefix(data)
        body, _ = decode_dag_cbor_prefix(data, pos)
        if not isinstance(body, dict) or not isinstance(body.get("blocks"), bytes):
            return data
        reader = CarReader(body["blocks"])
        out = io.BytesIO()
        writer = CarWriter(out, reader.roots)
        for cid, block in reader:
            writer.write_block(cid, change(block), check=False)
        return encode_frame(header, {**body, "blocks": out.getvalue()})

    return rewrite


def rewrite_body(change: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[bytes], bytes]:
    """A rewrite that decodes the frame, replaces its body with ``change(body)`` (data-model
    values: ``CID`` links, ``bytes``) and re-encodes it: e.g. a #commit's unsigned ``since``,
    ``prevData`` or ``ops`` forged."""

    def rewrite(data: bytes) -> bytes:
        header, pos = decode_dag_cbor_prefix(data)
        body, _ = decode_dag_cbor_prefix(data, pos)
        return encode_frame(header, change(dict(body)))

    return rewrite


def replace_in_blocks(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    """``alter_blocks`` replacing ``old`` with ``new`` (any lengths) in every block: e.g. a
    record's text, so the record block no longer hashes to the CID the commit names."""
    return alter_blocks(lambda block: block.replace(old, new))


# --- the relay -------------------------------------------------------------------------------


class StreamRelay:
    """The proxy's WebSocket server on loopback and the frame faults. Owned by a
    ``FaultProxy``; ``start()`` and ``aclose()`` run in its event loop."""

    def __init__(
        self,
        upstream: tuple[str, int],
        rng: random.Random,
        notify: Callable[[], None],
        on_handshake: Callable[[int, int], None],
    ) -> None:
        self._upstream = upstream
        self._rng = rng
        self._notify = notify
        self._on_handshake = on_handshake
        self.rules: list[FrameRule] = []
        self.streams: list[StreamEvent] = []
        self.counts: Counter[str] = Counter()
        self._server: Server | None = None
        self._pending: dict[int, tuple[StreamEvent, ClientConnection]] = {}
        self._live: set[tuple[ServerConnection, ClientConnection]] = set()
        self._scopes: set[anyio.CancelScope] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            compression=None,
            max_size=None,
            ping_interval=None,  # the client pings; the relay only answers
            close_timeout=1.0,
            server_header=None,
        )
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])

    async def aclose(self) -> None:
        server, self._server = self._server, None
        for scope in list(self._scopes):
            scope.cancel()
        for client_side, upstream in list(self._live):
            _abort(client_side)
            _abort(upstream)
        for stream, upstream in self._pending.values():
            _abort(upstream)
            self._end(stream, "proxy closed")
        self._pending.clear()
        if server is not None:
            server.close(close_connections=False)
            with anyio.move_on_after(5, shield=True):
                await server.wait_closed()

    # -- programming ----------------------------------------------------------------------

    def add(self, rule: FrameRule) -> FrameRule:
        self.rules.append(rule)
        return rule

    def _choose(self, frame: StreamFrame) -> FrameFault:
        chosen: FrameFault | None = None
        for rule in self.rules:
            if rule._observe(frame) and chosen is None and rule._fires(self._rng):
                chosen = rule.fault
        return chosen or PassFrame()

    # -- relaying ---------------------------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Open the PDS's side before accepting the client's: a PDS that refuses the
        handshake refuses the client the same way."""
        query = parse_qs(urlsplit(request.path).query)
        cursor_text = (query.get("cursor") or [None])[0]
        cursor = int(cursor_text) if cursor_text and cursor_text.lstrip("-").isdigit() else None
        stream = StreamEvent(len(self.streams), request.path, cursor, time.monotonic())
        self.streams.append(stream)
        event_index = request.headers.get(EVENT_HEADER)
        host, port = self._upstream
        try:
            upstream = await connect(
                f"ws://{host}:{port}{request.path}",
                compression=None,
                max_size=None,
                ping_interval=None,
                open_timeout=10,
                close_timeout=1.0,
                proxy=None,
                user_agent_header=request.headers.get("User-Agent"),
            )
        except InvalidStatus as exc:
            response = exc.response
            return self._refused(stream, event_index, response)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            response = connection.respond(502, f"the fault proxy could not reach the PDS: {exc}")
            return self._refused(stream, event_index, response)
        stream.status = 101
        if event_index is not None:
            self._on_handshake(int(event_index), 101)
        self._pending[id(connection)] = (stream, upstream)
        self._notify()
        return None

    def _refused(
        self, stream: StreamEvent, event_index: str | None, response: Response
    ) -> Response:
        stream.status = response.status_code
        self._end(stream, f"refused ({response.status_code})")
        if event_index is not None:
            self._on_handshake(int(event_index), response.status_code)
        return response

    async def _handler(self, client_side: ServerConnection) -> None:
        pending = self._pending.pop(id(client_side), None)
        if pending is None:
            _abort(client_side)
            return
        stream, upstream = pending
        pair = (client_side, upstream)
        self._live.add(pair)
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with anyio.create_task_group() as tg:

                    async def down() -> None:
                        ended = await self._down(stream, client_side, upstream)
                        stream.ended = stream.ended or ended
                        tg.cancel_scope.cancel()

                    async def up() -> None:
                        ended = await self._up(client_side, upstream)
                        stream.ended = stream.ended or ended
                        tg.cancel_scope.cancel()

                    tg.start_soon(down)
                    tg.start_soon(up)
            finally:
                self._scopes.discard(scope)
                self._live.discard(pair)
                if scope.cancel_called and stream.ended is None:
                    stream.ended = "proxy closed"
        if stream.ended in ("cut", "proxy closed") or stream.ended is None:
            _abort(client_side)
            _abort(upstream)
        else:
            with anyio.move_on_after(2, shield=True):
                await upstream.close()
        with anyio.move_on_after(2, shield=True):
            await upstream.wait_closed()
        stream.upstream_closed = upstream.state is State.CLOSED
        self._end(stream, stream.ended or "proxy closed")

    async def _down(
        self, stream: StreamEvent, client_side: ServerConnection, upstream: ClientConnection
    ) -> str:
        """PDS -> client, through the frame faults. Returns how the stream ended."""
        n = 0
        deferred: list[tuple[str | bytes, FrameEvent]] = []  # ReorderFrame: after the next
        while True:
            try:
                message = await upstream.recv()
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                if code is None:
                    _abort(client_side)  # the PDS went away: so does the client's side
                else:
                    with contextlib.suppress(ConnectionClosed):
                        await client_side.close(code, reason)
                return f"upstream closed ({code})"
            n += 1
            message_bytes = message.encode() if isinstance(message, str) else message
            frame = StreamFrame.read(stream.index, n, message_bytes)
            fault = self._choose(frame)
            event = FrameEvent(
                stream.index,
                n,
                frame.type,
                frame.seq,
                frame.repo,
                len(message_bytes),
                fault.name,
                time.monotonic(),
            )
            stream.frames.append(event)
            self.counts[fault.name] += 1
            self._notify()
            try:
                if isinstance(fault, ReorderFrame):
                    deferred.append((message, event))
                    continue
                ended = await self._apply(fault, message, stream, client_side, upstream, event)
                if ended is not None:
                    return ended
                if event.forwarded:
                    while deferred:
                        await self._send(client_side, *deferred.pop(0))
            except ConnectionClosed:
                return "client closed"

    async def _apply(
        self,
        fault: FrameFault,
        message: str | bytes,
        stream: StreamEvent,
        client_side: ServerConnection,
        upstream: ClientConnection,
        event: FrameEvent,
    ) -> str | None:
        """Apply one fault; a string when the stream ends here."""
        if isinstance(fault, DropFrame):
            return None
        if isinstance(fault, DelayFrame):
            seconds = fault.seconds
            if fault.up_to is not None:
                seconds = self._rng.uniform(fault.seconds, fault.up_to)
            await anyio.sleep(seconds)
        if isinstance(fault, HoldFrame):
            fault.reached.set()
            await fault.gate.wait()
            if fault.drop:
                return None
        if isinstance(fault, ErrorFrame):
            stream.ended = "error frame"  # before the client's side sees the close
            await client_side.send(error_frame(fault.error, fault.message))
            with contextlib.suppress(ConnectionClosed):
                await client_side.close(1000)
            return "error frame"
        if isinstance(fault, Cut):
            stream.ended = "cut"
            if fault.forward:
                await self._send(client_side, message, event)
            if fault.close:
                with anyio.move_on_after(2):
                    with contextlib.suppress(ConnectionClosed):
                        await client_side.close(fault.code, "cut by the fault proxy")
            _abort(client_side)
            _abort(upstream)
            return "cut"
        if isinstance(fault, InjectFrame) and not fault.after:
            await client_side.send(fault.data)
        if isinstance(fault, RewriteFrame):
            data = message.encode() if isinstance(message, str) else message
            await self._send(client_side, fault.change(data), event)
        else:
            await self._send(client_side, message, event)
        if isinstance(fault, DuplicateFrame):
            for _ in range(fault.copies):
                await client_side.send(message)
        if isinstance(fault, InjectFrame) and fault.after:
            await client_side.send(fault.data)
        return None

    async def _send(
        self, client_side: ServerConnection, message: str | bytes, event: FrameEvent
    ) -> None:
        await client_side.send(message)
        event.forwarded = True
        event.sent_at = time.monotonic()
        self._notify()

    async def _up(self, client_side: ServerConnection, upstream: ClientConnection) -> str:
        """Client -> PDS (a subscriber sends nothing, but relay it if it does)."""
        try:
            async for message in client_side:
                await upstream.send(message)
        except ConnectionClosed:
            pass
        return "client closed"

    def _end(self, stream: StreamEvent, how: str) -> None:
        if stream.closed_at is None:
            stream.ended = stream.ended or how
            stream.closed_at = time.monotonic()
            self._notify()


def _abort(connection: ServerConnection | ClientConnection) -> None:
    """Drop a connection without a close handshake (both ends see it go away)."""
    transport: asyncio.BaseTransport | None = getattr(connection, "transport", None)
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort()  # a no-op on a transport that is already closed

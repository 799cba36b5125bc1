"""Tiny real servers on 127.0.0.1 for tests: a DNS server (UDP, TXT answers) and an HTTP
server with per-(Host, path) routes. Each runs in a thread, counts what it was asked, and
stops on ``close()`` (a wake-up socket, not a timeout, ends the DNS loop)."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT

SERVFAIL = "SERVFAIL"


class LoopbackDNS:
    """Answers ``TXT`` queries from ``records``: name → list of records, each a list of
    character-strings; a name not listed gets NXDOMAIN, ``SERVFAIL`` a server failure."""

    def __init__(self) -> None:
        self.records: dict[str, list[list[bytes]] | str] = {}
        self.queries: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="loopback-dns", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()
        return str(host), int(port)

    def txt(self, name: str, *records: str | list[bytes]) -> None:
        """Publish TXT records at ``name``: a ``str`` is one string, a list is split strings."""
        self.records[name.lower()] = [
            [r.encode()] if isinstance(r, str) else list(r) for r in records
        ]

    def servfail(self, name: str) -> None:
        self.records[name.lower()] = SERVFAIL

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self._sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            data, peer = self._sock.recvfrom(65535)
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            self._sock.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.queries.append(name)
        entry = self.records.get(name)
        if entry is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif entry == SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif question.rdtype == dns.rdatatype.TXT:
            rrset = response.find_rrset(
                response.answer,
                question.name,
                dns.rdataclass.IN,
                dns.rdatatype.TXT,
                create=True,
            )
            for strings in entry:
                rrset.add(
                    dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings),
                    ttl=60,
                )
        return response

    def close(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join()
        for s in (self._sock, self._wake_r, self._wake_w):
            s.close()

    def __enter__(self) -> LoopbackDNS:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


Route = tuple[int, bytes, dict[str, str]]


class LoopbackHTTP:
    """Serves ``routes[(host, path)]`` where ``host`` is the Host header without its port.

    ``hits`` lists ``(host header, path)`` of every request. ``before_reply``, if set, is
    called in the server thread before answering (tests use it to hold a request open).
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.hits: list[tuple[str, str]] = []
        self.before_reply: Callable[[], None] | None = None
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host_header = self.headers.get("Host", "")
                owner.hits.append((host_header, self.path))
                if owner.before_reply is not None:
                    owner.before_reply()
                host = host_header.rsplit(":", 1)[0].lower()
                status, body, headers = owner.routes.get(
                    (host, self.path), (404, b"not found", {"Content-Type": "text/plain"})
                )
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(
        self,
        host: str,
        path: str,
        body: str | bytes | dict[str, Any],
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        if isinstance(body, dict):
            raw, ctype = json.dumps(body).encode(), "application/json"
        else:
            raw = body.encode() if isinstance(body, str) else body
            ctype = "text/plain"
        self.routes[(host.lower(), path)] = (
            status,
            raw,
            {"Content-Type": ctype, **(headers or {})},
        )

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> LoopbackHTTP:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""The guard in conftest.py: a test that reaches beyond loopback fails, naming the host."""

from __future__ import annotations

import socket

import pytest

from conftest import OFF_LOOPBACK, is_loopback


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        (b"localhost", True),
        ("127.5.6.7", True),
        ("0.0.0.0", True),
        (None, True),
        ("plc.directory", False),
        ("alice.test", False),
        ("192.0.2.1", False),
        ("2001:db8::1", False),
    ],
)
def test_what_counts_as_loopback(host: object, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_a_lookup_beyond_loopback_is_recorded() -> None:
    # An address from TEST-NET-1 (RFC 5737) with AI_NUMERICHOST: nothing leaves the machine,
    # but the lookup is seen, so the guard would fail this test at teardown.
    socket.getaddrinfo("192.0.2.1", 443, flags=socket.AI_NUMERICHOST)
    socket.getaddrinfo("127.0.0.1", 443, flags=socket.AI_NUMERICHOST)
    assert OFF_LOOPBACK == ["socket.getaddrinfo '192.0.2.1'"]
    OFF_LOOPBACK.clear()  # the teardown check passes: this test only checked the recording

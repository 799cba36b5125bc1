"""One TLS context for every HTTP client atsync makes, and which URLs need none (loopback).

httpx builds a context per client, and loading the CA bundle costs ~17 ms each time: an engine
that talks to several hosts (its own PDS, the PLC directory, the hosts of followed accounts)
paid it for every client. Made on first use, with httpx's own defaults (certifi's bundle, or
``SSL_CERT_FILE``/``SSL_CERT_DIR`` as set at that moment).
"""

from __future__ import annotations

import functools
import ssl
from urllib.parse import urlsplit

import httpx

__all__ = ["is_loopback_url", "tls_context"]

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@functools.cache
def tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this machine: plain http is acceptable there (the development
    PDS), and its bytes cross no wire."""
    return (urlsplit(url).hostname or "").lower() in _LOOPBACK_HOSTS

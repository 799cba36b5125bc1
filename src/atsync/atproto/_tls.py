"""One TLS context for every HTTP client atsync makes.

httpx builds a context per client, and loading the CA bundle costs ~17 ms each time: an engine
that talks to several hosts (its own PDS, the PLC directory, the hosts of followed accounts)
paid it for every client. Made on first use, with httpx's own defaults (certifi's bundle, or
``SSL_CERT_FILE``/``SSL_CERT_DIR`` as set at that moment).
"""

from __future__ import annotations

import functools
import ssl

import httpx

__all__ = ["tls_context"]


@functools.cache
def tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()

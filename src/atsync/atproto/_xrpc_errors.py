"""How XRPC failures map onto atsync's error tree, and what ``RateLimit-*`` headers say.

One place decides, for every failed call, which of ``TransientError``, ``RateLimitedError``,
``AuthError`` or ``PermanentError`` it is (see docs/xrpc.md for the table). The server's own
``error`` name and ``message`` (from the XRPC JSON error body) and the HTTP ``status`` are
kept on the exception, so callers can tell cases apart without parsing text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx

from atsync._errors import (
    AuthError,
    NetworkError,
    PermanentError,
    RateLimitedError,
    TransientError,
)

__all__ = [
    "AUTH_ERROR_NAMES",
    "RateLimitInfo",
    "classify_response",
    "classify_transport",
    "outcome_unknown",
    "parse_error_body",
    "parse_rate_limit",
    "retry_at",
]

# Error names that mean "these credentials do not work": the user (or a refresh) must act.
# ExpiredToken and InvalidToken come as HTTP 400 from the reference PDS, so the status alone
# would misfile them as permanent request errors.
AUTH_ERROR_NAMES = frozenset(
    {
        "AuthRequired",
        "AuthenticationRequired",
        "AuthMissing",
        "ExpiredToken",
        "InvalidToken",
        "AccountTakedown",
        "AccountDeactivated",
        "AccountSuspended",
        "AuthFactorTokenRequired",
        "MissingTokenId",
        "MissingJwt",
        "BadJwt",
        "BadJwtAudience",
        "BadJwtSignature",
        "UntrustedIss",
        # An OAuth grant narrower than the call (a binding added after the login): only a new
        # login with a wider scope helps; the writes wait for it instead of failing one by one.
        "ScopeMissingError",
    }
)

# Above this a RateLimit-Reset value is a Unix time (the reference PDS sends epoch seconds);
# below it, seconds from now (the IETF RateLimit header draft).
_EPOCH_THRESHOLD = 1_000_000_000


@dataclass(frozen=True)
class RateLimitInfo:
    """The ``RateLimit-*`` headers of the latest response that carried them.

    ``reset_at`` is a Unix time; ``observed_at`` is when the response arrived (Unix time).
    """

    limit: int | None
    remaining: int | None
    reset_at: float | None
    policy: str | None
    observed_at: float


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def _reset_header(headers: Mapping[str, str], now: float) -> float | None:
    value = headers.get("ratelimit-reset")
    if value is None:
        return None
    try:
        n = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(n) or n < 0:
        return None
    return n if n > _EPOCH_THRESHOLD else now + n


def _retry_after_header(headers: Mapping[str, str], now: float) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        n = float(value)
    except ValueError:
        try:
            return parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError):
            return None
    if not math.isfinite(n) or n < 0:
        return None
    return now + n


def retry_at(headers: Mapping[str, str], now: float) -> float | None:
    """When the server says to try again (Unix time), from ``RateLimit-Reset`` (epoch seconds
    or delta seconds) and ``Retry-After`` (delta seconds or an HTTP date); the later of the
    two when both are present, so that waiting satisfies both. ``None`` if neither says."""
    found = (_reset_header(headers, now), _retry_after_header(headers, now))
    times = [t for t in found if t is not None]
    return max(times) if times else None


def parse_rate_limit(headers: Mapping[str, str], now: float) -> RateLimitInfo | None:
    """The ``RateLimit-*`` headers of a response, or ``None`` when it carries none."""
    limit = _int_header(headers, "ratelimit-limit")
    remaining = _int_header(headers, "ratelimit-remaining")
    reset_at = _reset_header(headers, now)
    policy = headers.get("ratelimit-policy")
    if limit is None and remaining is None and reset_at is None and policy is None:
        return None
    return RateLimitInfo(limit, remaining, reset_at, policy, now)


def parse_error_body(body: bytes) -> tuple[str | None, str | None]:
    """``(error, message)`` from an XRPC JSON error body; ``None`` for what is missing."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    error, message = obj.get("error"), obj.get("message")
    return (
        error if isinstance(error, str) and error else None,
        message if isinstance(message, str) and message else None,
    )


def _with_server_message(exc: NetworkError, message: str | None) -> NetworkError:
    # str(exc) is the full description (call, status, name); .message is the server's own text.
    if message is not None:
        exc.message = message
    return exc


def classify_response(
    nsid: str, status: int, headers: Mapping[str, str], body: bytes, now: float
) -> NetworkError:
    """The exception for a failed (non-2xx) response. See docs/xrpc.md for the table.

    Order matters: a rate limit wins over everything (waiting is the only useful action),
    then credentials, then the status class. A 500 is transient, *including* the reference
    PDS's 500 for a create on an existing record key: the caller that sent a write must read
    the current state before sending it again (see ``outcome_unknown``).
    """
    error, message = parse_error_body(body)
    if message is None and error is None:
        text = body[:200].decode("utf-8", "replace").strip()
        message = text or None
    described = f"{nsid}: HTTP {status}" + (f" {error}" if error else "")
    described += f": {message}" if message else ""
    remaining = _int_header(headers, "ratelimit-remaining")
    if status == 429 or remaining == 0:
        return _with_server_message(
            RateLimitedError(
                described, reset_at=retry_at(headers, now), error=error, status=status
            ),
            message,
        )
    if status == 401 or error in AUTH_ERROR_NAMES:
        return _with_server_message(AuthError(described, error=error, status=status), message)
    if status == 501:  # "not implemented" will not start working by retrying
        return _with_server_message(PermanentError(described, error=error, status=status), message)
    if status >= 500 or status == 408:
        return _with_server_message(TransientError(described, error=error, status=status), message)
    return _with_server_message(PermanentError(described, error=error, status=status), message)


def classify_transport(nsid: str, url: str, exc: Exception) -> TransientError:
    """The exception for a call that got no (complete) response: always transient."""
    kind = "timed out" if isinstance(exc, httpx.TimeoutException | TimeoutError) else "failed"
    detail = str(exc) or type(exc).__name__
    return TransientError(f"{nsid}: request to {url} {kind}: {type(exc).__name__}: {detail}")


def outcome_unknown(exc: BaseException) -> bool:
    """True when a failed *write* may nevertheless have been applied by the server.

    That is the case for any 5xx (including the reference PDS's 500 for create-on-existing)
    and for a connection that broke or timed out after the request could have been sent.
    It is not the case for a refused connection or a connect/pool timeout (nothing was
    sent), nor for 4xx answers. After an unknown outcome, read the record or the latest
    commit and compare CIDs before sending the write again.
    """
    if not isinstance(exc, NetworkError) or isinstance(exc, RateLimitedError):
        return False
    if exc.status is not None:
        return exc.status >= 500
    if not isinstance(exc, TransientError):
        return False
    cause = exc.__cause__
    never_sent = (
        httpx.ConnectError,
        httpx.ConnectTimeout,
        httpx.PoolTimeout,
        ConnectionRefusedError,
    )
    return not isinstance(cause, never_sent)

"""The account's signing key, asked for as a pull begins and awaited where verification needs it.

A pull's first request (``getLatestCommit``, or ``getRepo`` on a new device) and the DID
document's (the PLC directory: a round trip to another host) do not depend on each other: the
key is resolved beside the download instead of before it. Verification awaits it, so nothing
is checked without it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from .._errors import NetworkError, VerificationError

__all__ = ["KeyAhead", "KeySource", "SigningKeyError", "known_key"]

KeySource = Callable[[], Awaitable[str | None]]
"""Resolves the account's signing key (None: the pull is not verified)."""


class SigningKeyError(Exception):
    """The account's signing key could not be resolved (its cause says why): not a fault of
    the repository, so nothing is recorded as rejected."""


def known_key(key: str | None) -> KeySource:
    """A source for a key already at hand."""

    async def source() -> str | None:
        return key

    return source


class KeyAhead:
    """Run ``resolve()`` in a task of the pull's task group; ``await get()`` where needed."""

    def __init__(self, source: KeySource) -> None:
        self._source = source
        self._done = anyio.Event()
        self._key: str | None = None
        self._error: Exception | None = None

    @staticmethod
    async def now(source: KeySource) -> str | None:
        """The key, resolved at once (``SigningKeyError`` as ``get()``)."""
        ahead = KeyAhead(source)
        await ahead.resolve()
        return await ahead.get()

    async def resolve(self) -> None:
        # Never raises: a task group would wrap the error in a group; get() raises it.
        try:
            self._key = await self._source()
        except Exception as exc:
            self._error = exc
        finally:
            self._done.set()

    @property
    def failed(self) -> bool:
        """Resolved, with an error (``get()`` raises it)."""
        return self._done.is_set() and self._error is not None

    async def get(self) -> str | None:
        await self._done.wait()
        error = self._error
        if isinstance(error, VerificationError | NetworkError | OSError):
            raise SigningKeyError(str(error)) from error
        if error is not None:
            raise error
        return self._key

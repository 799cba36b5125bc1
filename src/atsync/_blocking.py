"""The bridge from blocking code (scripts, notebooks, the CLI) to atsync's async core.

A ``Portal`` owns one event loop running in a background thread, started on ``__enter__``
(or ``start()``) and stopped on ``__exit__`` (``close()``); blocking facades call coroutine
functions through it. Each facade is a small hand-written class whose methods forward to
the async object: the async code is the only implementation of the logic.

    with Portal() as portal:
        client = portal.call(SomeAsyncThing.open, ...)
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._errors import ClosedError

__all__ = ["Portal"]

T = TypeVar("T")


class Portal:
    """An event loop in a background thread that blocking code can call into."""

    def __init__(self, backend: str = "asyncio") -> None:
        self._backend = backend
        self._cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._lock = threading.Lock()

    def start(self) -> Portal:
        with self._lock:
            if self._portal is None:
                self._cm = start_blocking_portal(self._backend)
                self._portal = self._cm.__enter__()
        return self

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` on the portal's loop and return its result here."""
        portal = self._portal
        if portal is None:
            raise ClosedError("the blocking portal is not running: use it inside `with`")
        return portal.call(fn, *args)

    @property
    def portal(self) -> BlockingPortal:
        if self._portal is None:
            raise ClosedError("the blocking portal is not running: use it inside `with`")
        return self._portal

    def close(self) -> None:
        with self._lock:
            cm, self._cm, self._portal = self._cm, None, None
        if cm is not None:
            cm.__exit__(None, None, None)

    def __enter__(self) -> Portal:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

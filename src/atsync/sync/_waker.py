"""Waking the engine's task from any thread: a local commit happens in the app's thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import anyio

__all__ = ["Waker"]


class Waker:
    """An event the engine waits on; ``set()`` may be called from any thread.

    Created inside the engine's task, it remembers that task's event loop; from another
    thread it schedules the wake-up on that loop without blocking (the caller may be holding
    the database lock that the engine's task needs next).
    """

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._thread = threading.get_ident()
        self._call_soon = _loop_call_soon()

    def set(self) -> None:
        if threading.get_ident() == self._thread:
            self._event.set()
        else:
            # RuntimeError: the loop has closed, the engine is gone, nothing to wake.
            with contextlib.suppress(RuntimeError):
                self._call_soon(self._event_set)

    def _event_set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = anyio.Event()


def _loop_call_soon() -> Callable[[Callable[[], None]], object]:
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:
        pass
    import trio  # type: ignore[import-not-found]  # anyio's other backend, when it runs

    run_sync_soon: Any = trio.lowlevel.current_trio_token().run_sync_soon
    return run_sync_soon  # type: ignore[no-any-return]

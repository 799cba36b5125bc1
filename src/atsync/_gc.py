"""Pausing the cyclic garbage collector around short bursts that build many lasting objects.

Reading a repository builds tens of thousands of containers that all survive (decoded
records, the changes to apply). CPython's collector runs every 700 container allocations and
now and then walks *every* object in the process, so such a burst pays for several full
collections that find nothing to free — a fifth of a backfill's time, measured. Mercurial
does the same for the same reason (``util.nogc``).

The pause is process-wide, so it is kept to bounded bursts (decoding one downloaded chunk,
walking one repository, applying one chunk of rows; a whole read of a repository while its
CAR is held in memory, at most 32 MiB), nests and works across threads (the
collector comes back when the last pause ends), and never re-enables a collector that the
application had disabled itself. Reference counting still frees everything that is not part
of a cycle meanwhile.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["gc_paused"]

_lock = threading.Lock()
_depth = 0
_restore = False


@contextmanager
def gc_paused() -> Iterator[None]:
    global _depth, _restore
    with _lock:
        if _depth == 0:
            _restore = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _restore:
                gc.enable()

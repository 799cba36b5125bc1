"""Where a downloading repository goes once it outgrows memory.

A ``CarStream`` holds a CAR of up to 32 MiB in memory (most repositories), hash-checked and
indexed as it arrives: writing it to a temporary file as well would only duplicate it, and
the file's writes and fsync cost more than the rest of a small pull. So a pull downloads
with ``sync_get_repo(did, None, on_chunk=...)`` and a ``Spill``:

    with Spill() as spill:
        stream = CarStream(decode=..., on_give_up=spill.start)

        def feed(chunk: bytes) -> None:
            stream.feed(chunk)
            spill.write(chunk)        # nothing while the stream holds the CAR

        await client.sync_get_repo(did, None, on_chunk=feed)
        path = spill.finish()         # None: read the CAR from the stream

Past the limit, the bytes the stream held and every later chunk are written to a temporary
file (plain writes of one chunk each, into the page cache), read afterwards by ``RepoFile``
without holding it in memory. The file is removed when the ``with`` block ends.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

__all__ = ["Spill"]


class Spill:
    def __init__(self) -> None:
        self._file: BinaryIO | None = None
        self._path: Path | None = None

    def start(self, held: bytearray) -> None:
        """The stream gave up holding the CAR: ``held`` is everything it had been fed."""
        fd, name = tempfile.mkstemp(prefix="atsync-pull-", suffix=".car")
        self._path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._file.write(held)

    def write(self, chunk: bytes) -> None:
        if self._file is not None:
            self._file.write(chunk)

    def finish(self) -> Path | None:
        """The download is complete: the file holding the CAR, or None if it fitted in memory."""
        if self._file is not None:
            self._file.close()
        return self._path

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None:
            self._file.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)

"""Where a downloading repository goes once it outgrows memory.

A ``CarStream`` holds a CAR of up to 32 MiB in memory (most repositories), hash-checked and
indexed as it arrives: writing it to a temporary file as well would only duplicate it, and
the file's writes and fsync cost more than the rest of a small pull. So a pull downloads
with ``sync_get_repo(did, None, on_chunk=...)`` into a ``Spill``, which owns the stream:

    with Spill(decode=..., memory_limit=...) as spill:   # the CarStream's options
        await client.sync_get_repo(did, None, on_chunk=spill.feed)
        path = spill.finish()         # None: read the CAR from spill.stream

Past the limit, the bytes the stream held and every later chunk are written to a temporary
file (plain writes of one chunk each, into the page cache), read afterwards by ``RepoFile``
without holding it in memory. The file is removed, and the stream lets go of what it read,
when the ``with`` block ends.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

from ..atproto import CarStream

__all__ = ["Spill"]


class Spill:
    """A download's ``CarStream`` (``options``: its own), and the temporary file the CAR
    continues in once it outgrows the stream's memory."""

    def __init__(self, **options: Any) -> None:
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self.stream = CarStream(on_give_up=self.start, **options)

    def start(self, held: bytearray) -> None:
        """The stream gave up holding the CAR: ``held`` is everything it had been fed."""
        fd, name = tempfile.mkstemp(prefix="atsync-pull-", suffix=".car")
        self._path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._file.write(held)

    def feed(self, chunk: bytes) -> None:
        """The next chunk of the download: checked by the stream, and written to the file
        only past the stream's memory limit."""
        self.stream.feed(chunk)
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
        self.stream.close()
        if self._file is not None:
            self._file.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)

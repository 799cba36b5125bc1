"""Streaming a download's body to a file or a binary stream (``getRepo``, ``getBlob``).

Chunks go straight to the target as they arrive, never the whole body in memory: a path
target is written as ``<name>.part``, fsynced and renamed into place only when complete (and
``finish`` — e.g. a hash check — passed), so a cut download leaves no file behind; ``max_size``
bounds what a server can make us store.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.to_thread
import httpx

from atsync._errors import PermanentError

from ._xrpc_errors import classify_transport
from ._xrpc_types import _CHUNK, Download

__all__ = ["save_body"]


async def save_body(
    nsid: str,
    response: httpx.Response,
    dest: str | os.PathLike[str] | BinaryIO | None,
    max_size: int | None,
    observe: Callable[[bytes], None] | None = None,
    finish: Callable[[], None] | None = None,
) -> Download:
    """Copy a streamed ``response`` into ``dest`` (a path or a binary stream; None: nowhere,
    ``observe`` has it all), then close it; ``observe(chunk)`` sees every chunk, ``finish()``
    runs before a path is put in place."""
    try:
        if isinstance(dest, str | os.PathLike):
            path = Path(dest)
            part = path.with_name(path.name + ".part")
            try:
                async with await anyio.open_file(part, "wb") as fh:
                    size = await _copy(nsid, response, fh.write, max_size, observe)
                    await fh.flush()
                    await anyio.to_thread.run_sync(os.fsync, fh.wrapped.fileno())
                if finish is not None:
                    finish()
                await anyio.to_thread.run_sync(os.replace, part, path)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            return Download(path, size)
        writer = None
        if dest is not None:
            sink = dest

            async def write(chunk: bytes) -> int:
                return await anyio.to_thread.run_sync(sink.write, chunk)

            writer = write
        size = await _copy(nsid, response, writer, max_size, observe)
        if finish is not None:
            finish()
        return Download(None, size)
    finally:
        await response.aclose()


async def _copy(
    nsid: str,
    response: httpx.Response,
    write: Callable[[bytes], Awaitable[int]] | None,
    max_size: int | None,
    observe: Callable[[bytes], None] | None,
) -> int:
    size = 0
    try:
        async for chunk in response.aiter_bytes(_CHUNK):
            size += len(chunk)
            if max_size is not None and size > max_size:
                raise PermanentError(f"{nsid}: response exceeds max_size={max_size} bytes")
            if observe is not None:
                observe(chunk)
            if write is not None:
                await write(chunk)
    except httpx.HTTPError as e:  # broken or timed-out stream mid-body
        raise classify_transport(nsid, str(response.url), e) from e
    return size

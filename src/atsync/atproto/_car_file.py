"""Read a full-repository CAR from a file in bounded memory, whatever its size.

``read_car`` keeps every block in a dict of ``CID`` objects: fine for a proof or a firehose
slice, not for a repository of a million records. ``RepoFile`` reads the file once to index
it and then walks the MST reading each node and record by offset. A file up to 32 MiB is
held in memory with a dict of offsets (the fast path: most repositories); a larger one stays
on disk, each block's CID, hash-checked, going with its offset and length into a temporary
SQLite file, so what stays in memory is SQLite's page cache (a few MB), the path from the
root to the current node, and one record at a time.

The checks are those of ``iter_repo_records``: every block's hash (when indexed, and again
when read back), the whole MST's structure, the commit's shape, and with a DID and key its
signature.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

from atsync._errors import ClosedError, VerificationError

from . import _car_stream
from ._car import DEFAULT_MAX_BLOCK_SIZE, CarReader
from ._car_stream import CarStream
from ._cbor import CID
from ._mst import get_block, iter_leaves
from ._stream_walk import StreamWalk
from ._verify import (
    Commit,
    RepoRecord,
    SigningKey,
    _decode_commit,
    _decode_record_block,
    _split_path,
    verify_commit,
)

__all__ = ["CarFile", "RepoFile"]

_BATCH = 2000  # index rows per executemany
_READ_CHUNK = 1024 * 1024


class _Held:
    """What a ``CarFile`` holds open, apart from it so its finalizer can close it all."""

    __slots__ = ("buf", "db", "file", "offsets", "stream", "tmp_dir")

    def __init__(self, file: BinaryIO | None) -> None:
        self.file = file
        self.buf: bytes | None = None
        self.offsets: dict[bytes, tuple[int, int]] = {}
        self.db: sqlite3.Connection | None = None
        self.tmp_dir: str | None = None
        self.stream: CarStream | None = None


def _cleanup(held: _Held) -> None:
    if held.db is not None:
        held.db.close()
    if held.file is not None:
        held.file.close()
    held.buf, held.offsets, held.stream = None, {}, None
    if held.tmp_dir is not None:
        shutil.rmtree(held.tmp_dir, ignore_errors=True)


class CarFile(Mapping[CID, bytes]):
    """A CAR v1 file as a read-only ``CID → bytes`` mapping, read once and hash-checked.

    A file up to ``memory_limit`` bytes (32 MiB: a repository of ~100,000 small records) is
    read into memory and indexed in a dict (``CarStream``; or give the ``stream`` that saw the
    file as it was written, which has done that already). A larger one stays on disk: every
    block is hash-checked as it streams by (the checks of ``CarReader``) and its offset
    recorded in a SQLite index in a temporary directory (``index_dir``, default the
    system's), removed by ``close()``. Memory is bounded either way, whatever the file's
    size. ``path=None``: the CAR is only the one an in-memory ``stream`` holds (it was written
    nowhere). Not for concurrent use from several threads; one thread after another is fine.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
        index_dir: str | os.PathLike[str] | None = None,
        memory_limit: int | None = None,
        stream: CarStream | None = None,
    ) -> None:
        if path is None and (stream is None or not stream.in_memory):
            raise ValueError("a CarFile without a path reads the CAR a CarStream holds in memory")
        self.path = Path(path) if path is not None else None
        file = open(self.path, "rb") if self.path is not None else None  # noqa: SIM115
        held = self._held = _Held(file)  # closed by close()
        # Runs on close(), or when the object is collected, or at exit: the index never stays.
        self._closer = weakref.finalize(self, _cleanup, held)
        try:
            limit = _car_stream.MEMORY_LIMIT if memory_limit is None else memory_limit
            if stream is None and file is not None and os.fstat(file.fileno()).st_size <= limit:
                stream = CarStream(decode=(), memory_limit=limit, max_block_size=max_block_size)
                while chunk := file.read(_READ_CHUNK):
                    stream.feed(chunk)
                stream.finish()
            if stream is not None and stream.in_memory:
                stream.finish()
                self.roots, held.buf, held.offsets = stream.roots, stream.data, stream.offsets
                held.stream = stream
            else:
                self.roots = self._index(max_block_size, index_dir)
        except BaseException:
            self.close()
            raise

    @property
    def _name(self) -> str:
        return str(self.path) if self.path is not None else "in memory"

    def _index(self, max_block_size: int, index_dir: str | os.PathLike[str] | None) -> list[CID]:
        if index_dir is not None:
            os.makedirs(index_dir, exist_ok=True)
        held = self._held
        held.tmp_dir = tempfile.mkdtemp(prefix="atsync-car-index-", dir=index_dir)
        db = held.db = sqlite3.connect(
            os.path.join(held.tmp_dir, "index.sqlite"),
            check_same_thread=False,
            isolation_level=None,
        )
        # A throwaway index: no journal, no fsync; if the process dies the directory is junk.
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute(
            "CREATE TABLE blocks (cid BLOB PRIMARY KEY, offset INTEGER NOT NULL,"
            " length INTEGER NOT NULL) WITHOUT ROWID"
        )
        assert held.file is not None  # a CAR on disk has its path
        reader = CarReader(held.file, max_block_size=max_block_size)
        insert = "INSERT OR IGNORE INTO blocks VALUES (?, ?, ?)"  # a repeated block is the same
        db.execute("BEGIN")
        batch: list[tuple[bytes, int, int]] = []
        for cid, offset, data in reader.iter_with_offsets():
            batch.append((bytes(cid), offset, len(data)))
            if len(batch) >= _BATCH:
                db.executemany(insert, batch)
                batch.clear()
        db.executemany(insert, batch)
        db.execute("COMMIT")
        return reader.roots

    @property
    def root(self) -> CID:
        return self.roots[0]

    @property
    def stream(self) -> CarStream | None:
        """The ``CarStream`` that indexed the file in memory (None: indexed on disk)."""
        return self._held.stream

    def _where(self, cid: CID) -> tuple[int, int] | None:
        if not self._closer.alive:
            raise ClosedError(f"the CAR file {self._name} was closed")
        held = self._held
        if held.db is None:
            return held.offsets.get(bytes(cid))
        row = held.db.execute(
            "SELECT offset, length FROM blocks WHERE cid = ?", (bytes(cid),)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def __getitem__(self, cid: CID) -> bytes:
        where = self._where(cid)
        if where is None:
            raise KeyError(cid)
        offset, length = where
        buf, file = self._held.buf, self._held.file
        if buf is not None:
            return buf[offset : offset + length]
        assert file is not None  # only a CAR held in memory has none
        file.seek(offset)
        data = file.read(length)
        if len(data) != length:
            raise VerificationError(f"the CAR file {self._name} was truncated after indexing")
        return data

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, CID) and self._where(cid) is not None

    def __iter__(self) -> Iterator[CID]:
        if not self._closer.alive:
            raise ClosedError(f"the CAR file {self._name} was closed")
        held = self._held
        if held.db is None:
            yield from map(CID.from_raw, list(held.offsets))
            return
        for (raw,) in held.db.execute("SELECT cid FROM blocks"):
            yield CID(bytes(raw))

    def __len__(self) -> int:
        if not self._closer.alive:
            raise ClosedError(f"the CAR file {self._name} was closed")
        held = self._held
        if held.db is None:
            return len(held.offsets)
        return int(held.db.execute("SELECT count(*) FROM blocks").fetchone()[0])

    def close(self) -> None:
        """Close the file and delete the index (safe to call twice)."""
        self._closer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RepoFile:
    """A full-repository CAR (what ``sync_get_repo`` writes) read from its file.

        with RepoFile(path, did=did, signing_key=key) as repo:
            print(repo.commit.rev, repo.count())
            for record in repo.records({"com.example.note"}):
                ...

    Opening indexes the file (see ``CarFile``; ``stream``: the ``CarStream`` that saw it
    downloading, with its nodes and records decoded ahead) and checks the commit: its shape
    always, its DID when ``did`` is given, its signature with ``signing_key`` (a ``did:key`` or
    ``(alg, public key)``; then ``did`` is required). ``VerificationError`` says what failed.
    Memory does not grow with the repository's size. ``path=None`` with a ``stream`` that held
    the whole CAR: a download written nowhere (see ``CarStream``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        did: str | None = None,
        signing_key: SigningKey | None = None,
        index_dir: str | os.PathLike[str] | None = None,
        max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
        memory_limit: int | None = None,
        stream: CarStream | None = None,
    ) -> None:
        if signing_key is not None and did is None:
            raise VerificationError("verifying a repo's signature needs its DID")
        self._car = CarFile(
            path,
            max_block_size=max_block_size,
            index_dir=index_dir,
            memory_limit=memory_limit,
            stream=stream,
        )
        stream = self._car.stream
        self._nodes = stream.nodes if stream is not None else None
        self._layers = stream.layers if stream is not None else None
        try:
            self.commit = self._check_commit(did, signing_key)
        except BaseException:
            self._car.close()
            raise

    def _check_commit(self, did: str | None, signing_key: SigningKey | None) -> Commit:
        root = self._car.root
        if signing_key is not None:
            assert did is not None
            return verify_commit(self._car, root, did, signing_key)
        commit, _ = _decode_commit(root, get_block(self._car, root, "commit"))
        if did is not None and commit.did != did:
            raise VerificationError(f"wrong DID: commit {root} is for {commit.did}, not {did}")
        return commit

    @property
    def blocks(self) -> Mapping[CID, bytes]:
        """Every block of the file, read from disk on access (the caller re-checks hashes)."""
        return self._car

    def leaves(
        self, on_node: Callable[[CID], object] | None = None
    ) -> Iterator[tuple[str, str, CID]]:
        """``(collection, rkey, record CID)`` of every record, in key order, reading only MST
        nodes: what a comparison of the repository with a local copy needs (``on_node``
        sees each node's CID as it is read)."""
        walk = self.walked()
        if walk is not None:
            if on_node is not None:
                for raw in walk.nodes:
                    on_node(CID.from_raw(raw))
            for _, collection, rkey, value in walk.leaves:
                yield collection, rkey, CID.from_raw(value)
            return
        leaves = iter_leaves(self._car, self.commit.data, self._nodes, on_node, self._layers)
        for key, cid in leaves:
            collection, rkey = _split_path(key)
            yield collection, rkey, cid

    def walked(self) -> StreamWalk | None:
        """The tree as the ``stream`` walked it while downloading (``CarStream(walk=True)``),
        its leaves in key order — when it is below the root this verified commit names and
        complete; None: ``leaves()`` walks it now."""
        stream = self._car.stream
        walk = stream.walk if stream is not None else None
        if walk is None or not walk.complete or walk.root != bytes(self.commit.data):
            return None
        walk.leaves.sort()  # by key: each leaf's first item, unique
        return walk

    def count(self) -> int:
        """How many records the repository holds (walks the MST, reads no record)."""
        return sum(1 for _ in self.leaves())

    def decoded_record(self, cid: CID) -> tuple[dict[str, Any], str] | None:
        """The record ``cid`` names and its JSON, if the ``stream`` decoded it ahead (its hash
        and data model checked); None: read ``blocks[cid]`` and decode it."""
        stream = self._car.stream
        if stream is None:
            return None
        raw = bytes(cid)
        record = stream.records.get(raw)
        return None if record is None else (record, stream.record_json[raw])

    def records(self, collections: Collection[str] | None = None) -> Iterator[RepoRecord]:
        """Every record, in key order, decoded and checked; with ``collections``, only those
        collections' records are read (the others are skipped without reading them)."""
        for collection, rkey, cid in self.leaves():
            if collections is not None and collection not in collections:
                continue
            path = f"{collection}/{rkey}"
            yield RepoRecord(collection, rkey, cid, _decode_record_block(self._car, cid, path))

    def __iter__(self) -> Iterator[RepoRecord]:
        return self.records()

    def close(self) -> None:
        """Close the file and delete the index (safe to call twice)."""
        self._car.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

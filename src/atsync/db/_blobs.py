"""Blobs: files and images kept beside the database, content-addressed.

    ref = db.blobs.put(b"…png bytes…", "image/png")        # -> BlobRef(cid, mime_type, size)
    ref = db.blobs.put_file("video.mp4", "video/mp4")       # copied and hashed in chunks
    db.set("notes", {"id": "n1", "image": ref})             # a "blob" property holds the ref
    db.blobs.read(ref) / db.blobs.open(ref)                 # the bytes back
    with db.blobs.receiving() as path:                      # a download writes to path,
        ref = db.blobs.adopt(path, "image/png")             # then it is renamed: no copy

A blob is stored once under its CID (CIDv1, raw codec, sha2-256 — the CID a PDS gives it), in
``<database>.blobs/`` as ``<cid>``: written to a temporary file and renamed, so a crash
leaves either the whole blob or none; putting the same bytes again writes nothing. A ``blob``
property stores the reference (CID, MIME type, size) as JSON in its column; the bytes stay in
the store. An in-memory database keeps its blobs in memory. A row that no longer references a blob
leaves it in the store (content-addressed, it may be referenced again); ``collect(keep)``
deletes the ones no longer wanted (the sync layer knows which: ``ATSync.collect_blobs``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .._errors import NotFoundError, ValidationError, VerificationError

__all__ = ["BlobRef", "BlobStore"]

_RAW_SHA256 = bytes((1, 0x55, 0x12, 32))
_CHUNK = 1024 * 1024  # bytes read at a time from a file being stored or checked


def blob_cid(data: bytes) -> str:
    """The CID of a blob's bytes: CIDv1, raw codec, sha2-256, base32 (``bafkrei…``). Built
    here because ``db`` sits below ``atproto`` (whose ``CID.for_data(data, CODEC_RAW)`` gives
    the same string: tests/test_blobs.py checks it)."""
    return _cid_of_digest(hashlib.sha256(data).digest())


def _cid_of_digest(digest: bytes) -> str:
    return "b" + base64.b32encode(_RAW_SHA256 + digest).decode("ascii").lower().rstrip("=")


@dataclass(frozen=True, slots=True)
class BlobRef:
    """A reference to a blob in the store: its CID, MIME type and size in bytes."""

    cid: str
    mime_type: str
    size: int

    def to_json(self) -> dict[str, object]:
        return {"cid": self.cid, "mimeType": self.mime_type, "size": self.size}

    @classmethod
    def from_json(cls, value: object) -> BlobRef:
        if isinstance(value, dict):
            cid, mime, size = value.get("cid"), value.get("mimeType"), value.get("size")
            ok = isinstance(cid, str) and cid.startswith("b") and isinstance(mime, str)
            if ok and isinstance(size, int) and not isinstance(size, bool) and size >= 0:
                return cls(str(cid), str(mime), size)
        raise ValidationError(f"not a blob reference: {value!r}")


class BlobStore:
    """The content-addressed blobs of one database (``None``: kept in memory)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory: dict[str, bytes] = {}
        self._stored_at: dict[str, float] = {}  # in memory: when each blob was put

    def put(self, data: bytes, mime_type: str) -> BlobRef:
        """Store ``data`` (a no-op if it is there already) and return its reference."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValidationError(f"a blob is bytes, got {type(data).__name__}")
        _check_mime_type(mime_type)
        data = bytes(data)
        cid = blob_cid(data)
        if self.directory is None:
            self._memory.setdefault(cid, data)
            self._stored_at[cid] = time.time()
        elif not self._kept_again(cid):
            self._store(cid, data)
        return BlobRef(cid, mime_type, len(data))

    def put_file(self, path: str | os.PathLike[str], mime_type: str) -> BlobRef:
        """``put`` the contents of a file, copied in chunks, then hashed in chunks (its CID
        is known only once it is read): memory stays flat whatever the file's size (a video,
        a vault's attachments)."""
        _check_mime_type(mime_type)
        with self.receiving() as incoming:
            shutil.copyfile(path, incoming)
            return self.adopt(incoming, mime_type)

    @contextmanager
    def receiving(self) -> Iterator[Path]:
        """A path for a download to write a blob to, then ``adopt`` it (no copy): inside the
        store (a temporary name, which ``cids`` never lists), or in a temporary directory for
        an in-memory store. Whatever is left there is removed when the block ends."""
        if self.directory is None:
            with tempfile.TemporaryDirectory(prefix="atsync-blob-") as scratch:
                yield Path(scratch) / "incoming"
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.directory, prefix=".incoming-")
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def adopt(self, path: Path, mime_type: str) -> BlobRef:
        """Take the file a download wrote at a ``receiving`` path as a blob: hashed in
        chunks, synced to disk and renamed to its CID (dropped if the store has it whole)."""
        _check_mime_type(mime_type)
        if self.directory is None:
            return self.put(path.read_bytes(), mime_type)
        cid, size = _file_cid(path, sync=True)
        if self._kept_again(cid):
            path.unlink(missing_ok=True)
        else:
            os.replace(path, self.directory / cid)
        return BlobRef(cid, mime_type, size)

    def _kept_again(self, cid: str) -> bool:
        """The store has this blob whole already: now it is wanted again (see collect). A
        file damaged on disk since is not whole: the caller writes it again."""
        assert self.directory is not None
        path = self.directory / cid
        try:
            if _file_cid(path)[0] != cid:
                return False
        except FileNotFoundError:
            return False
        os.utime(path)
        return True

    def _store(self, cid: str, data: bytes) -> None:
        """Write ``data`` to a temporary file in the store, sync it to disk and rename it to
        its CID: a crash leaves either the whole blob or none."""
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.directory / cid)
        finally:
            Path(tmp).unlink(missing_ok=True)  # renamed already, unless that failed

    def has(self, ref: BlobRef | str) -> bool:
        cid = ref.cid if isinstance(ref, BlobRef) else ref
        if self.directory is None:
            return cid in self._memory
        return (self.directory / cid).is_file()

    def size(self, ref: BlobRef | str) -> int | None:
        """The stored blob's size in bytes; None if the store lacks it."""
        cid = ref.cid if isinstance(ref, BlobRef) else ref
        if self.directory is None:
            data = self._memory.get(cid)
            return None if data is None else len(data)
        try:
            return (self.directory / _checked(cid)).stat().st_size
        except (FileNotFoundError, NotFoundError):
            return None

    def open(self, ref: BlobRef | str) -> BinaryIO:
        """The blob's bytes as a binary file (``NotFoundError`` if the store lacks it), as
        stored: ``read`` also checks them against the CID."""
        cid = ref.cid if isinstance(ref, BlobRef) else ref
        if self.directory is None:
            if cid not in self._memory:
                raise NotFoundError(_absent(cid))
            return io.BytesIO(self._memory[cid])
        try:
            return (self.directory / _checked(cid)).open("rb")
        except FileNotFoundError:
            raise NotFoundError(_absent(cid)) from None

    def read(self, ref: BlobRef | str) -> bytes:
        """The blob's bytes, checked against its CID: ``VerificationError`` if the file was
        damaged on disk since it was stored (``NotFoundError`` if the store lacks it)."""
        cid = ref.cid if isinstance(ref, BlobRef) else ref
        with self.open(cid) as blob:
            data = blob.read()
        if blob_cid(data) != cid:
            where = "in memory" if self.directory is None else str(self.directory / cid)
            raise VerificationError(
                f"blob {cid} is damaged in the store ({where}): its bytes no longer match its "
                "CID. put() the original bytes again, or delete the file and fetch_blob() it "
                "from a repository that has it"
            )
        return data

    def _drop_stale_incoming(self, cutoff: float) -> int:
        """Delete the temporary files of stores a crash interrupted (older than ``cutoff``);
        returns the bytes freed."""
        if self.directory is None or not self.directory.is_dir():
            return 0
        freed = 0
        for path in self.directory.glob(".incoming-*"):
            try:
                info = path.stat()
                if info.st_mtime <= cutoff:
                    path.unlink()
                    freed += info.st_size
            except FileNotFoundError:
                continue
        return freed

    def cids(self) -> list[str]:
        """The CIDs of every blob in the store."""
        if self.directory is None:
            return sorted(self._memory)
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.name.isalnum())

    def collect(self, keep: Collection[str], *, older_than: float = 3600.0) -> tuple[int, int]:
        """Delete the blobs not in ``keep`` that were stored more than ``older_than`` seconds
        ago; returns (how many, bytes freed). The grace period protects a blob an action has
        just stored for a row it has not committed yet."""
        removed = freed = 0
        cutoff = time.time() - older_than
        freed += self._drop_stale_incoming(cutoff)
        for cid in self.cids():
            if cid in keep:
                continue
            if self.directory is None:
                if self._stored_at.get(cid, 0.0) > cutoff:
                    continue
                self._stored_at.pop(cid, None)
                freed += len(self._memory.pop(cid))
                removed += 1
                continue
            path = self.directory / cid
            try:
                info = path.stat()
                if info.st_mtime > cutoff:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            freed += info.st_size
        return removed, freed


def _file_cid(path: Path, *, sync: bool = False) -> tuple[str, int]:
    """The blob CID and size of a file, read in chunks; ``sync``: flushed to disk too."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
        if sync:
            os.fsync(file.fileno())
        return _cid_of_digest(digest.digest()), file.tell()


def _check_mime_type(mime_type: object) -> None:
    if not isinstance(mime_type, str) or "/" not in mime_type:
        raise ValidationError(f"a blob needs a MIME type such as image/png, got {mime_type!r}")


def _checked(cid: str) -> str:
    # A CID names a file in the store directory: nothing that could reach outside it.
    if not cid.isalnum():
        raise NotFoundError(f"{cid!r} is not a blob CID")
    return cid


def _absent(cid: str) -> str:
    # The store is local; a pulled row's blob comes with blobs="eager" or by fetch_blob.
    return f"blob {cid} is not in the store (a pulled row's blob not fetched yet? see fetch_blob)"

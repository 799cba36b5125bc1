"""CAR v1 files (ipld.io/specs/transport/car/carv1): a streaming, hostile-input-safe reader
and a writer.

The reader pulls from ``bytes`` or any object with ``read(n)`` (a file, a socket file, an HTTP
response stream) through a small buffer, so a CAR never has to sit whole in memory; each block
is checked against its CID as it is read. What it refuses, with ``VerificationError``:
truncation anywhere, malformed or non-minimal varints, a section longer than
``max_block_size`` (refused before any allocation), a block whose bytes do not hash to its CID,
CIDs that are not CIDv1 + sha256 + dag-cbor/raw, and headers that are not CAR v1 with roots.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from atsync._errors import VerificationError

from ._cbor import (
    CID,
    CODEC_DAG_CBOR,
    CODEC_RAW,
    HASH_SHA256,
    _parse_cid,
    decode_dag_cbor,
    encode_dag_cbor,
    encode_uvarint,
)

__all__ = [
    "Car",
    "CarReader",
    "CarWriter",
    "read_car",
    "write_car",
]

# Records are at most 1,000,000 bytes and MST nodes far smaller; 2 MiB leaves headroom.
DEFAULT_MAX_BLOCK_SIZE = 2 * 1024 * 1024
MAX_HEADER_SIZE = 64 * 1024
CID_MAX_OVERHEAD = 4 * 9 + 64  # four varints and the largest digest _parse_cid accepts
_CHUNK = 64 * 1024


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Stream:
    """Exact reads over a possibly short-reading source, with offsets for error messages."""

    def __init__(self, source: _Readable) -> None:
        self._src = source
        self._buf = bytearray()
        self._pos = 0
        self.offset = 0  # bytes consumed so far, for messages

    def _fill(self, want: int) -> bool:
        """Make at least ``want`` unread bytes available; False if the source ends first."""
        while len(self._buf) - self._pos < want:
            if self._pos > _CHUNK:
                del self._buf[: self._pos]  # drop consumed bytes; appends stay amortized O(1)
                self._pos = 0
            chunk = self._src.read(max(_CHUNK, want - (len(self._buf) - self._pos)))
            if not chunk:
                return False
            self._buf += chunk
        return True

    def at_eof(self) -> bool:
        return not self._fill(1)

    def read_exact(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            have = len(self._buf) - self._pos
            raise VerificationError(
                f"truncated CAR: {what} needs {n} bytes at offset {self.offset}, only {have} left"
            )
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        self.offset += n
        return out

    def read_varint(self, what: str) -> int:
        start = self.offset
        value = 0
        for i in range(9):
            b = self.read_exact(1, what)[0]
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if b == 0 and i > 0:
                    raise VerificationError(f"bad varint for {what} at offset {start}: not minimal")
                return value
        raise VerificationError(f"bad varint for {what} at offset {start}: longer than 9 bytes")


def check_header_size(size: int) -> None:
    if size == 0 or size > MAX_HEADER_SIZE:
        raise VerificationError(f"CAR header length {size} is outside 1..{MAX_HEADER_SIZE}")


def parse_header(data: bytes) -> list[CID]:
    """The roots of a CAR v1 header (its bytes, after the length)."""
    try:
        header = decode_dag_cbor(data)
    except VerificationError as e:
        raise VerificationError(f"malformed CAR header: {e}") from e
    if not isinstance(header, dict):
        raise VerificationError("malformed CAR header: not a map")
    if header.get("version") != 1:
        raise VerificationError(f"unsupported CAR version {header.get('version')!r}")
    roots = header.get("roots")
    if not isinstance(roots, list) or not roots or not all(isinstance(r, CID) for r in roots):
        raise VerificationError("malformed CAR header: 'roots' must be a non-empty CID list")
    return roots


def check_block(cid: CID, data: bytes) -> None:
    """Refuse a block whose CID is not sha2-256 of dag-cbor or raw, or does not match it."""
    if cid.codec not in (CODEC_DAG_CBOR, CODEC_RAW):
        raise VerificationError(f"block {cid}: codec 0x{cid.codec:x} is not dag-cbor or raw")
    if cid.hash_code != HASH_SHA256 or len(cid.digest) != 32:
        raise VerificationError(f"block {cid}: hash is not sha2-256")
    if not cid.matches(data):
        raise VerificationError(f"CID mismatch at block {cid}: its bytes hash to something else")


class CarReader:
    """Iterate ``(cid, bytes)`` blocks of a CAR v1, each verified against its CID.

    ``roots`` is available as soon as the reader is constructed (the header is read eagerly).
    """

    def __init__(
        self,
        source: bytes | bytearray | memoryview | BinaryIO | _Readable,
        *,
        max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
    ) -> None:
        if isinstance(source, bytes | bytearray | memoryview):
            source = io.BytesIO(bytes(source))
        self._stream = _Stream(source)
        self._max_block_size = max_block_size
        self.roots = self._read_header()

    def _read_header(self) -> list[CID]:
        s = self._stream
        if s.at_eof():
            raise VerificationError("truncated CAR: empty input")
        size = s.read_varint("header length")
        check_header_size(size)
        return parse_header(s.read_exact(size, "header"))

    def __iter__(self) -> Iterator[tuple[CID, bytes]]:
        for cid, _, data in self.iter_with_offsets():
            yield cid, data

    def iter_with_offsets(self) -> Iterator[tuple[CID, int, bytes]]:
        """``(cid, offset, bytes)``: ``offset`` is where the block's bytes start in the source
        (from its first byte), so a file can be indexed in one pass and read back by offset."""
        s = self._stream
        limit = self._max_block_size + CID_MAX_OVERHEAD
        while not s.at_eof():
            start = s.offset
            size = s.read_varint("section length")
            if size == 0:
                raise VerificationError(f"empty CAR section at offset {start}")
            if size > limit:
                raise VerificationError(
                    f"CAR section at offset {start} claims {size} bytes, over the "
                    f"{self._max_block_size}-byte block limit"
                )
            section = s.read_exact(size, "block section")
            try:
                end = _parse_cid(section, 0)
            except ValueError as e:
                raise VerificationError(
                    f"malformed CID in CAR section at offset {start}: {e}"
                ) from e
            cid = CID(section[:end])
            data = section[end:]
            check_block(cid, data)
            yield cid, s.offset - len(data), data


@dataclass
class Car:
    """A whole CAR in memory: its roots and every block by CID (all already verified)."""

    roots: list[CID]
    blocks: dict[CID, bytes] = field(default_factory=dict)

    @property
    def root(self) -> CID:
        return self.roots[0]


def read_car(
    source: bytes | bytearray | memoryview | BinaryIO | _Readable,
    *,
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
    max_total_size: int | None = None,
) -> Car:
    """Read and verify every block. ``max_total_size`` caps the sum of block sizes."""
    reader = CarReader(source, max_block_size=max_block_size)
    car = Car(reader.roots)
    total = 0
    for cid, data in reader:
        total += len(data)
        if max_total_size is not None and total > max_total_size:
            raise VerificationError(f"CAR holds more than {max_total_size} bytes of blocks")
        car.blocks[cid] = data
    return car


class CarWriter:
    """Write a CAR v1 to ``out``: the header now, then one ``write_block`` per block."""

    def __init__(self, out: BinaryIO, roots: Sequence[CID]) -> None:
        if not roots:
            raise ValueError("a CAR needs at least one root")
        self._out = out
        header = encode_dag_cbor({"version": 1, "roots": list(roots)})
        out.write(encode_uvarint(len(header)) + header)

    def write_block(self, cid: CID, data: bytes, *, check: bool = True) -> None:
        """``check=False`` skips the CID check: only for building deliberately bad CARs."""
        if check:
            check_block(cid, data)
        raw = bytes(cid)
        self._out.write(encode_uvarint(len(raw) + len(data)) + raw + data)


def write_car(roots: Sequence[CID], blocks: Iterable[tuple[CID, bytes]]) -> bytes:
    buf = io.BytesIO()
    writer = CarWriter(buf, roots)
    for cid, data in blocks:
        writer.write_block(cid, data)
    return buf.getvalue()

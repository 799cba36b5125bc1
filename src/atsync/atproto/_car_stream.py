"""Index a CAR while it arrives, chunk by chunk, and decode what a repository reader needs.

    stream = CarStream(decode={"com.example.note"})   # MST nodes, and these records
    await client.sync_get_repo(did, path, on_chunk=stream.feed)
    stream.finish()                                   # VerificationError if it was cut short
    with RepoFile(path, did=did, signing_key=key, stream=stream) as repo:
        ...

Checking every block's hash and decoding the MST nodes and the wanted records is most of the
work of reading a repository; done in ``feed``, it happens while the download waits on the
network instead of after it. The checks are ``CarReader``'s: truncation, malformed or
non-minimal varints, sections over the block limit (refused before they are buffered whole),
CIDs that are not sha2-256 of dag-cbor or raw, blocks that do not hash to their CID.

Memory is bounded: the CAR is held up to ``memory_limit`` bytes (32 MiB); a larger one makes
the stream give up (``in_memory`` becomes False, everything is dropped; ``on_give_up`` sees the
bytes held before they are) and ``RepoFile`` indexes the file on disk instead. A caller that
writes the CAR nowhere while it fits (``sync_get_repo(did, None, on_chunk=...)``) starts its
file from ``on_give_up``: a repository that fits never touches the disk.

Records are decoded ahead only up to 16 MiB of them; the rest are decoded when read.
Decoding ahead takes libipld's fast paths only (``compact_node_from_libipld``,
``plain_record_from_libipld``); a block they refuse is left for the strict decoders, which
say what is wrong with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from typing import Any

import libipld

from atsync._errors import VerificationError
from atsync._gc import gc_paused

from ._car import (
    CID_MAX_OVERHEAD,
    DEFAULT_MAX_BLOCK_SIZE,
    check_block,
    check_header_size,
    parse_header,
)
from ._cbor import (
    CID,
    CODEC_DAG_CBOR,
    CODEC_RAW,
    HASH_SHA256,
    _parse_cid,
    plain_record_from_libipld,
)
from ._mst import CompactNode, compact_layer, compact_node_from_libipld
from ._stream_walk import StreamWalk

__all__ = ["MEMORY_LIMIT", "CarStream"]

MEMORY_LIMIT = 32 * 1024 * 1024  # CARs up to this size are held (and indexed) in memory
PREDECODE_LIMIT = 16 * 1024 * 1024  # bytes of records decoded ahead
_SHA256_DAG_CBOR = bytes((1, CODEC_DAG_CBOR, HASH_SHA256, 32))
_SHA256_RAW = bytes((1, CODEC_RAW, HASH_SHA256, 32))


class CarStream:
    """Feed a CAR's bytes in order; ``finish()`` at the end. Then, while ``in_memory``:
    ``roots``, ``data`` (the whole CAR), ``offsets`` (CID bytes -> (offset, length) of each
    block's data in ``data``), ``nodes`` (CID bytes -> ``CompactNode``), ``layers`` (CID
    bytes -> the height of every key of that node, where they agree), ``records`` and
    ``record_json`` (CID bytes -> the record, and its JSON: records of the ``decode``
    collections, data model proven; two dicts, not one of pairs, because the collector never
    stops tracking a pair that holds a dict)."""

    def __init__(
        self,
        *,
        decode: Collection[str] | None = None,
        walk: bool = False,
        memory_limit: int = MEMORY_LIMIT,
        max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
        on_give_up: Callable[[bytearray], None] | None = None,
    ) -> None:
        self.in_memory = True
        self.roots: list[CID] = []
        self.data = b""
        self.offsets: dict[bytes, tuple[int, int]] = {}
        self.nodes: dict[bytes, CompactNode] = {}
        self.layers: dict[bytes, int] = {}
        self.records: dict[bytes, dict[str, Any]] = {}
        self.record_json: dict[bytes, str] = {}
        self._decode = frozenset(decode) if decode is not None else None
        self._predecode_left = PREDECODE_LIMIT
        self._memory_limit = memory_limit
        self._max_block_size = max_block_size
        self._on_give_up = on_give_up
        self._buf = bytearray()
        self._pos = 0
        self._finished = False
        # A whole repository's tree, walked as its nodes arrive (see StreamWalk).
        self.walk = StreamWalk(self.nodes, self.layers) if walk else None
        self._root: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the CAR. ``VerificationError`` as soon as they break it."""
        if not self.in_memory:
            return
        if len(self._buf) + len(chunk) > self._memory_limit:
            self._give_up()
            return
        self._buf += chunk
        with gc_paused():  # decoded blocks are containers that all last
            self._parse()

    def finish(self) -> None:
        """The CAR is complete: ``VerificationError`` if it ended inside a header or block."""
        if not self.in_memory or self._finished:
            return
        self._parse()
        if not self.roots:
            what = "empty input" if not self._buf else "the header is cut short"
            raise VerificationError(f"truncated CAR: {what}")
        if self._pos != len(self._buf):
            raise VerificationError(
                f"truncated CAR: the section at offset {self._pos} is cut short "
                f"({len(self._buf) - self._pos} bytes left)"
            )
        self.data = bytes(self._buf)
        self._buf = bytearray()
        self._finished = True

    def close(self) -> None:
        """Let go of the CAR and of all that was read from it, once a reader is done: held
        by the stream, those containers would live on and the collector walk them."""
        self.data = b""
        self._let_go()

    def _give_up(self) -> None:
        self.in_memory = False
        if self._on_give_up is not None:
            self._on_give_up(self._buf)  # every byte fed before the chunk that did not fit
        self._let_go()

    def _let_go(self) -> None:
        self._buf = bytearray()
        self.offsets, self.nodes, self.records, self.record_json = {}, {}, {}, {}
        self.layers = {}
        self.walk = None

    def _varint(self, pos: int, what: str) -> tuple[int, int] | None:
        """(value, position after it), or None if the buffer ends inside it."""
        buf = self._buf
        value = 0
        for i in range(min(9, len(buf) - pos)):
            b = buf[pos + i]
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if b == 0 and i > 0:
                    raise VerificationError(f"bad varint for {what} at offset {pos}: not minimal")
                return value, pos + i + 1
        if len(buf) - pos >= 9:
            raise VerificationError(f"bad varint for {what} at offset {pos}: longer than 9 bytes")
        return None

    def _parse(self) -> None:
        buf = self._buf
        pos = self._pos
        if not self.roots:
            got = self._varint(pos, "header length")
            if got is None:
                return
            size, start = got
            check_header_size(size)
            if start + size > len(buf):
                return
            self.roots = parse_header(bytes(buf[start : start + size]))
            self._root = bytes(self.roots[0]) if self.roots else None
            pos = start + size
        limit = self._max_block_size + CID_MAX_OVERHEAD
        sha256 = hashlib.sha256
        offsets = self.offsets
        end_of_buf = len(buf)
        with memoryview(buf) as view:  # released before the next feed() grows the buffer
            while True:
                # Sections of up to 16 KiB (records, tree nodes) have a length of one or two
                # bytes: read here; others (and a non-minimal one, refused) by _varint.
                first = buf[pos] if pos < end_of_buf else 0x80
                if first < 0x80:
                    size, start = first, pos + 1
                elif pos + 1 < end_of_buf and 0 < buf[pos + 1] < 0x80:
                    size, start = (first & 0x7F) | (buf[pos + 1] << 7), pos + 2
                else:
                    got = self._varint(pos, "section length")
                    if got is None:
                        break
                    size, start = got
                if size == 0:
                    raise VerificationError(f"empty CAR section at offset {pos}")
                if size > limit:
                    raise VerificationError(
                        f"CAR section at offset {pos} claims {size} bytes, over the "
                        f"{self._max_block_size}-byte block limit"
                    )
                end = start + size
                if end > len(buf):
                    break
                raw = bytes(view[start : start + 36])
                prefix = raw[:4]
                data: bytes | None = None
                if size >= 36 and prefix in (_SHA256_DAG_CBOR, _SHA256_RAW):
                    data_at = start + 36
                    data = bytes(view[data_at:end])  # one copy: hashed, then decoded
                    if sha256(data).digest() != raw[4:]:
                        check_block(CID.from_raw(raw), data)  # names it
                else:
                    try:
                        data_at = _parse_cid(view[start:end], 0) + start
                    except ValueError as e:
                        raise VerificationError(
                            f"malformed CID in CAR section at offset {pos}: {e}"
                        ) from e
                    cid = CID(bytes(view[start:data_at]))
                    check_block(cid, bytes(view[data_at:end]))
                    raw = bytes(cid)
                if raw not in offsets:  # a repeated block is the same block
                    offsets[raw] = (data_at, end - data_at)
                    if data is None:
                        data = bytes(view[data_at:end])
                    if self._decode is not None and prefix == _SHA256_DAG_CBOR:
                        self._decode_ahead(raw, data)
                    walk = self.walk
                    if walk is not None:
                        if raw == self._root and walk.root is None:
                            walk.commit_arrived(data)
                        else:
                            walk.block_arrived(raw, offsets)
                pos = end
        self._pos = pos

    def _decode_ahead(self, raw: bytes, data: bytes) -> None:
        try:
            value = libipld.decode_dag_cbor(data)
        except (ValueError, RecursionError):
            return  # the strict decoder will say why, if a reader asks for it
        if type(value) is not dict:
            return
        kind = value.get("$type")
        if kind is None:  # records have one, nodes do not
            node = compact_node_from_libipld(value, data)
            if node is not None:
                self.nodes[raw] = node
                layer = compact_layer(node)  # its keys' hashes, while the network is slow
                if layer is not None:
                    self.layers[raw] = layer
            return
        assert self._decode is not None
        if kind in self._decode and self._predecode_left >= len(data):
            plain = plain_record_from_libipld(value, data)
            if plain is not None:
                self.records[raw], self.record_json[raw] = plain
                self._predecode_left -= len(data)

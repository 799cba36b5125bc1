"""CAR v1 reader/writer, fed with valid and hostile input."""

from __future__ import annotations

import io
import socket
import threading
import tracemalloc

import libipld
import pytest

from atsync._errors import VerificationError
from atsync.atproto._car import Car, CarReader, CarWriter, read_car, write_car
from atsync.atproto._cbor import CID, encode_dag_cbor, encode_uvarint


def _blocks(n: int) -> list[tuple[CID, bytes]]:
    out = []
    for i in range(n):
        data = encode_dag_cbor({"i": i, "pad": "x" * (i * 7 % 300)})
        out.append((CID.for_data(data), data))
    return out


BLOCKS = _blocks(20)
ROOT = BLOCKS[0][0]
CAR = write_car([ROOT], BLOCKS)


def _section(cid_bytes: bytes, data: bytes) -> bytes:
    return encode_uvarint(len(cid_bytes) + len(data)) + cid_bytes + data


def _header(value: object) -> bytes:
    h = encode_dag_cbor(value)
    return encode_uvarint(len(h)) + h


GOOD_HEADER = _header({"version": 1, "roots": [ROOT]})


def test_round_trip_from_bytes_and_file() -> None:
    car = read_car(CAR)
    assert car.roots == [ROOT]
    assert car.root == ROOT
    assert car.blocks == dict(BLOCKS)
    assert read_car(io.BytesIO(CAR)).blocks == dict(BLOCKS)
    assert list(CarReader(CAR)) == BLOCKS


def test_writer_streams_to_a_file_object() -> None:
    buf = io.BytesIO()
    w = CarWriter(buf, [ROOT])
    for cid, data in BLOCKS:
        w.write_block(cid, data)
    assert buf.getvalue() == CAR


def test_writer_refuses_a_block_that_does_not_match_its_cid() -> None:
    w = CarWriter(io.BytesIO(), [ROOT])
    with pytest.raises(VerificationError, match="CID mismatch"):
        w.write_block(ROOT, b"other bytes")


def test_reads_from_a_socket_with_short_reads() -> None:
    a, b = socket.socketpair()

    def send() -> None:
        with a:
            for i in range(0, len(CAR), 7):  # tiny writes -> short reads on the other side
                a.sendall(CAR[i : i + 7])

    t = threading.Thread(target=send)
    t.start()
    with b, b.makefile("rb", buffering=0) as f:
        car = read_car(f)
    t.join()
    assert car.blocks == dict(BLOCKS)


def test_blocks_arrive_before_the_rest_of_the_file_exists() -> None:
    # Streaming, not slurping: the first block must be readable while the sender still holds
    # back the remainder of the CAR.
    a, b = socket.socketpair()
    first_end = len(GOOD_HEADER) + len(_section(bytes(BLOCKS[0][0]), BLOCKS[0][1]))
    release = threading.Event()

    def send() -> None:
        with a:
            a.sendall(CAR[:first_end])
            release.wait(10)
            a.sendall(CAR[first_end:])

    t = threading.Thread(target=send)
    t.start()
    with b, b.makefile("rb", buffering=0) as f:
        reader = CarReader(f)
        it = iter(reader)
        assert next(it) == BLOCKS[0]
        release.set()
        assert list(it) == BLOCKS[1:]
    t.join()


def test_every_truncation_is_detected_or_ends_on_a_block_boundary() -> None:
    boundaries = {len(GOOD_HEADER)}
    pos = len(GOOD_HEADER)
    for cid, data in BLOCKS:
        pos += len(_section(bytes(cid), data))
        boundaries.add(pos)
    for cut in range(len(CAR)):
        if cut in boundaries:
            # A CAR cut between sections is itself a valid, shorter CAR; the repo layer then
            # notices the missing blocks.
            assert len(read_car(CAR[:cut]).blocks) < len(BLOCKS)
            continue
        with pytest.raises(VerificationError):
            read_car(CAR[:cut])


def test_truncation_message() -> None:
    with pytest.raises(VerificationError, match="truncated CAR"):
        read_car(CAR[:-3])
    with pytest.raises(VerificationError, match="truncated CAR: empty"):
        read_car(b"")


def test_flipped_byte_in_each_block_is_caught_with_its_cid() -> None:
    pos = len(GOOD_HEADER)
    for cid, data in BLOCKS:
        section = _section(bytes(cid), data)
        last = pos + len(section) - 1  # the last byte of this block's data
        bad = bytearray(CAR)
        bad[last] ^= 0x01
        with pytest.raises(VerificationError, match=f"CID mismatch at block {cid}"):
            read_car(bytes(bad))
        pos += len(section)


def test_flipped_byte_anywhere_never_passes_silently() -> None:
    for i in range(len(CAR)):
        bad = bytearray(CAR)
        bad[i] ^= 0x20
        try:
            car = read_car(bytes(bad))
        except VerificationError:
            continue
        # Survivable flips only ever change which CIDs are present, never their content.
        for cid, data in car.blocks.items():
            assert cid.matches(data)
        assert car.blocks != dict(BLOCKS) or car.roots != [ROOT]


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        (b"\x81\x00", "not minimal"),
        (b"\xff" * 10, "longer than 9 bytes"),
        (b"\x80", "truncated CAR"),
        (b"\x00", "empty CAR section"),
    ],
)
def test_bad_section_varints(tail: bytes, why: str) -> None:
    with pytest.raises(VerificationError, match=why):
        read_car(GOOD_HEADER + tail)


def test_bad_header_varint() -> None:
    with pytest.raises(VerificationError, match="not minimal"):
        read_car(b"\x80\x00")


@pytest.mark.parametrize("size", [2**62, 2**31, 3 * 1024 * 1024])
def test_huge_length_prefix_is_refused_without_allocating(size: int) -> None:
    data = GOOD_HEADER + encode_uvarint(size) + b"\x01\x71\x12\x20"
    tracemalloc.start()
    try:
        with pytest.raises(VerificationError, match="over the"):
            read_car(io.BytesIO(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_huge_header_length_is_refused() -> None:
    with pytest.raises(VerificationError, match="header length"):
        read_car(encode_uvarint(2**40) + b"\xa0")


def test_block_size_limit_is_configurable() -> None:
    big = encode_dag_cbor({"b": b"x" * 5000})
    car = write_car([CID.for_data(big)], [(CID.for_data(big), big)])
    assert len(read_car(car).blocks) == 1
    with pytest.raises(VerificationError, match="over the 1000-byte block limit"):
        read_car(car, max_block_size=1000)


def test_total_size_limit() -> None:
    with pytest.raises(VerificationError, match="more than 1000 bytes"):
        read_car(CAR, max_total_size=1000)


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (_header([1]), "not a map"),
        (_header({"version": 2, "roots": [ROOT]}), "unsupported CAR version 2"),
        (_header({"version": 1}), "roots"),
        (_header({"version": 1, "roots": []}), "roots"),
        (_header({"version": 1, "roots": ["bafy"]}), "roots"),
        (encode_uvarint(3) + b"\xa1\x61", "malformed CAR header"),
        (encode_uvarint(2) + b"\xfb\x00", "malformed CAR header"),
    ],
)
def test_bad_headers(header: bytes, why: str) -> None:
    with pytest.raises(VerificationError, match=why):
        read_car(header + _section(bytes(BLOCKS[0][0]), BLOCKS[0][1]))


def test_unsupported_cids_in_sections() -> None:
    data = BLOCKS[1][1]
    digest = BLOCKS[1][0].digest
    cases = {
        "sha2-256": bytes((1, 0x71, 0x13, 0x20)) + digest,  # sha2-512 code, 32-byte digest
        "dag-cbor or raw": bytes((1, 0x70, 0x12, 0x20)) + digest,  # dag-pb
        "only CIDv1": bytes((0x12, 0x20)) + digest,  # CIDv0
        "malformed CID": bytes((1, 0x71, 0x12, 0x80)),  # truncated varint in the CID
    }
    for why, cid_bytes in cases.items():
        with pytest.raises(VerificationError, match=why):
            read_car(GOOD_HEADER + _section(cid_bytes, data))


def test_duplicate_blocks_are_tolerated() -> None:
    car = write_car([ROOT], BLOCKS + BLOCKS[:3])
    assert read_car(car).blocks == dict(BLOCKS)


def test_car_dataclass_root_is_first_root() -> None:
    assert Car([BLOCKS[2][0], ROOT]).root == BLOCKS[2][0]


def test_libipld_reads_our_cars() -> None:
    # An independent reader agrees on roots and blocks (it decodes them, we keep bytes).
    header, blocks = libipld.decode_car(CAR)
    assert [CID(r) for r in header["roots"]] == [ROOT]
    assert {CID(k) for k in blocks} == {cid for cid, _ in BLOCKS}

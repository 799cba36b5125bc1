"""Full-repository CARs read from a file (RepoFile): the same records as the in-memory path,
every tampering caught, the index removed on close, and memory that does not grow with the
repository (measured against the in-memory path, here and on the real reference PDS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atsync._errors import ClosedError, VerificationError
from atsync.atproto import (
    CID,
    CarStream,
    Create,
    IdentityResolver,
    RepoFile,
    XrpcClient,
    generate_keypair,
    iter_repo_records,
    login,
    read_car,
)
from atsync.atproto import _car_stream as car_stream
from atsync.atproto._car import CarWriter
from atsync.atproto._car_file import CarFile
from atsync.atproto._cbor import encode_dag_cbor
from atsync.atproto._crypto import load_keypair
from atsync.atproto._mst import build_mst
from atsync.atproto._syntax import TidClock
from atsync.atproto._verify import sign_commit
from pds_fixtures import ACCOUNTS, MakePDS

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
KEY = load_keypair(
    "k256", bytes.fromhex("9085d2bef69286a6cbb51623c8fa258629945cd55ca705cc4e66700396894e0c")
)


def _blocks_of_repo(n: int, *, other: int = 0, text_size: int = 40) -> Iterator[tuple[CID, bytes]]:
    """The blocks of a signed repository of ``n`` notes (+ ``other`` records of a second
    collection): commit first, then MST nodes, then records, as the reference PDS orders
    them."""
    clock = TidClock(clock_id=0, now_us=iter(range(1_700_000_000_000_000, 1 << 60, 1000)).__next__)
    records: dict[CID, bytes] = {}
    leaves: dict[str, CID] = {}
    for i in range(n + other):
        coll = "com.example.note" if i < n else "com.example.other"
        data = encode_dag_cbor({"$type": coll, "text": f"note {i} " + "x" * text_size, "n": i})
        cid = CID.for_data(data)
        records[cid] = data
        leaves[f"{coll}/{clock.next()}"] = cid
    root, nodes = build_mst(leaves)
    commit_cid, commit = sign_commit(KEY, DID, root, clock.next())
    yield commit_cid, commit
    yield from nodes.items()
    yield from records.items()


def _write_repo(path: Path, blocks: Iterable[tuple[CID, bytes]], root: CID | None = None) -> Path:
    """A CAR of ``blocks`` whose root is ``root``, else the first block (the commit)."""
    items = list(blocks)
    with path.open("wb") as f:
        writer = CarWriter(f, [root if root is not None else items[0][0]])
        for cid, data in items:
            writer.write_block(cid, data, check=False)
    return path


@pytest.fixture(autouse=True, params=["memory", "disk"])
def index_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both indexes: in memory (files up to the limit) and on disk."""
    if request.param == "disk":
        monkeypatch.setattr(car_stream, "MEMORY_LIMIT", 0)
    return str(request.param)


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repo") / "repo.car"
    return _write_repo(path, _blocks_of_repo(300, other=40))


def test_the_same_records_as_the_in_memory_path(
    small_repo: Path, tmp_path: Path, index_mode: str
) -> None:
    expected = list(iter_repo_records(small_repo.read_bytes(), did=DID, signing_key=KEY.did))
    with RepoFile(small_repo, did=DID, signing_key=KEY.did, index_dir=tmp_path) as repo:
        assert repo.commit.did == DID and repo.commit.cid == read_car(small_repo.read_bytes()).root
        assert list(repo.records()) == expected
        assert list(repo) == expected
        assert repo.count() == 340
        assert list(repo.leaves()) == [(r.collection, r.rkey, r.cid) for r in expected]
        others = list(repo.records({"com.example.other"}))
        assert len(others) == 40 and {r.collection for r in others} == {"com.example.other"}
        # The blocks are a mapping read from disk.
        car = read_car(small_repo.read_bytes())
        assert len(repo.blocks) == len(car.blocks)
        assert set(repo.blocks) == set(car.blocks)
        some = next(iter(car.blocks))
        assert some in repo.blocks and repo.blocks[some] == car.blocks[some]
        assert CID.for_data(b"absent") not in repo.blocks and "x" not in repo.blocks
        if index_mode == "disk":
            assert next(p.name for p in tmp_path.iterdir()).startswith("atsync-car-index-")
        else:
            assert list(tmp_path.iterdir()) == []  # nothing on disk: the file is in memory
    assert list(tmp_path.iterdir()) == []  # the index went with close()
    with pytest.raises(ClosedError):
        next(repo.records())
    repo.close()  # twice is fine


def test_without_a_key_only_the_shape_and_did(small_repo: Path) -> None:
    with RepoFile(small_repo) as repo:
        assert repo.count() == 340
    with RepoFile(small_repo, did=DID) as repo:
        assert repo.commit.did == DID
    with pytest.raises(VerificationError, match="wrong DID"):
        RepoFile(small_repo, did="did:plc:" + "a" * 24)
    with pytest.raises(VerificationError, match="needs its DID"):
        RepoFile(small_repo, signing_key=KEY.did)


def test_wrong_key_and_wrong_did(small_repo: Path, tmp_path: Path) -> None:
    with pytest.raises(VerificationError, match="bad signature"):
        RepoFile(small_repo, did=DID, signing_key=generate_keypair("p256").did, index_dir=tmp_path)
    with pytest.raises(VerificationError, match="wrong DID"):
        RepoFile(small_repo, did="did:plc:" + "b" * 24, signing_key=KEY.did, index_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # a failed open leaves nothing behind


def _tampered(tmp_path: Path, change: Any) -> Path:
    blocks = list(_blocks_of_repo(60))
    root = blocks[0][0]
    change(blocks)
    return _write_repo(tmp_path / "bad.car", blocks, root)


def _flip_last_record(blocks: list[tuple[CID, bytes]]) -> None:
    cid, data = blocks[-1]
    blocks[-1] = (cid, data[:-1] + bytes([data[-1] ^ 1]))


def test_a_flipped_byte_is_caught_while_indexing(tmp_path: Path) -> None:
    path = _tampered(tmp_path, _flip_last_record)
    with pytest.raises(VerificationError, match="CID mismatch at block"):
        RepoFile(path, did=DID, signing_key=KEY.did, index_dir=tmp_path / "idx")
    assert not (tmp_path / "idx").exists() or list((tmp_path / "idx").iterdir()) == []


def test_a_dropped_record_or_node_is_caught_while_walking(tmp_path: Path) -> None:
    path = _tampered(tmp_path, lambda blocks: blocks.pop())
    with RepoFile(path, did=DID, signing_key=KEY.did) as repo:
        assert repo.count() == 60  # the MST is whole
        with pytest.raises(VerificationError, match=r"missing block .*record"):
            list(repo.records())
    path = _tampered(tmp_path, lambda blocks: blocks.pop(2))  # an MST node
    with RepoFile(path, did=DID, signing_key=KEY.did) as repo:
        with pytest.raises(VerificationError, match=r"missing block .*MST node"):
            list(repo.records())
    path = _tampered(tmp_path, lambda blocks: blocks.pop(0))  # the commit
    with pytest.raises(VerificationError, match=r"missing block .*commit"):
        RepoFile(path, did=DID, signing_key=KEY.did)


def test_truncated_file(small_repo: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.car"
    cut.write_bytes(small_repo.read_bytes()[:-10])
    with pytest.raises(VerificationError, match="truncated CAR"):
        RepoFile(cut)


def test_a_file_changed_after_indexing_is_caught_on_read(tmp_path: Path) -> None:
    path = _write_repo(tmp_path / "repo.car", _blocks_of_repo(60))
    with RepoFile(path, did=DID, signing_key=KEY.did, memory_limit=0) as repo:
        data = bytearray(path.read_bytes())
        data[-2] ^= 1  # inside the last record
        path.write_bytes(bytes(data))
        with pytest.raises(VerificationError, match="CID mismatch at block"):
            list(repo.records())
        path.write_bytes(bytes(data[:-50]))
        with pytest.raises(VerificationError, match="truncated after indexing"):
            list(repo.records())


def test_repeated_blocks_and_a_car_file_mapping(tmp_path: Path) -> None:
    blocks = list(_blocks_of_repo(30))
    path = _write_repo(tmp_path / "dup.car", blocks + blocks[1:5])
    with CarFile(path) as car:
        assert len(car) == len(blocks) and car.root == blocks[0][0]
        assert all(car[cid] == data for cid, data in blocks)
        with pytest.raises(KeyError):
            car[CID.for_data(b"absent")]
    with pytest.raises(ClosedError):
        len(car)
    with RepoFile(path, did=DID, signing_key=KEY.did) as repo:
        assert repo.count() == 30


def test_not_a_car(tmp_path: Path) -> None:
    bad = tmp_path / "bad.car"
    bad.write_bytes(b"\x05hello")
    with pytest.raises(VerificationError, match="malformed CAR header"):
        RepoFile(bad, index_dir=tmp_path / "idx")
    with pytest.raises(FileNotFoundError):
        RepoFile(tmp_path / "nothing.car")


# --- memory: the file path vs the in-memory path, each in a fresh process ----------------------

_MEASURE = textwrap.dedent(
    """
    import gc, resource, sys
    from atsync.atproto import RepoFile, iter_repo_records

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    def peak():
        # Linux: this process's own high-water mark. ru_maxrss is no good there: a child
        # forked from a big process (pytest) inherits the parent's peak across exec.
        try:
            return status("VmHWM")
        except OSError:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return rss if sys.platform == "darwin" else rss * 1024

    path, mode, did, key = sys.argv[1:]
    gc.collect()
    try:  # reset the high-water mark to now, so the imports' transient peak does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
    except OSError:
        before = peak()
    n = 0
    if mode in ("file", "default"):
        # "file": the on-disk index; "default": what RepoFile chooses (memory up to 32 MiB).
        limit = 0 if mode == "file" else None
        with RepoFile(path, did=did, signing_key=key, memory_limit=limit) as repo:
            for record in repo.records():
                n += 1
    else:
        with open(path, "rb") as f:
            for record in iter_repo_records(f, did=did, signing_key=key):
                n += 1
    print(n, peak() - before)
    """
)


def peak_rss_growth(path: Path, mode: str, did: str, key: str) -> tuple[int, int]:
    """(records read, peak RSS growth in bytes) of reading ``path`` in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), mode, did, key],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    ).stdout.split()
    return int(out[0]), int(out[1])


def _report(name: str, size: int, n: int, file_growth: int, memory_growth: int) -> str:
    mb = 1024 * 1024
    return (
        f"{name}: {n} records, CAR {size / mb:.1f} MB; peak RSS growth: "
        f"RepoFile {file_growth / mb:.1f} MB, iter_repo_records {memory_growth / mb:.1f} MB"
    )


@pytest.mark.skipif(sys.platform == "win32", reason="measured with /proc or getrusage")
def test_memory_does_not_grow_with_the_repository(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_repo(tmp_path / "big.car", _blocks_of_repo(20_000, text_size=400))
    n, file_growth = peak_rss_growth(path, "file", DID, KEY.did)
    assert n == 20_000
    n, memory_growth = peak_rss_growth(path, "memory", DID, KEY.did)
    assert n == 20_000
    with capsys.disabled():
        print("\n" + _report("local repo", path.stat().st_size, n, file_growth, memory_growth))
    # The CAR is ~11 MB and the in-memory path holds all of it; the file path holds SQLite's
    # page cache and one path of the tree.
    assert file_growth < 8 * 1024 * 1024
    assert memory_growth > 2 * file_growth
    # Under its memory limit (32 MiB) RepoFile holds the file and a dict of offsets: bounded
    # by the limit, whatever the repository's size (a larger file takes the disk index).
    n, default_growth = peak_rss_growth(path, "default", DID, KEY.did)
    assert n == 20_000 and default_growth < 48 * 1024 * 1024


# --- the real reference PDS: 20,000 records written, downloaded with getRepo, read back --------

COLL = "com.example.atsync.repoFile"


def _pds_note(i: int) -> dict[str, Any]:
    return {"$type": COLL, "text": f"note {i} " + "x" * 200, "createdAt": "2024-05-01T12:00:00Z"}


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_20000_record_repository_from_the_reference_pds(
    make_pds: MakePDS, tmp_path: Path, anyio_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pds = make_pds()
    handle, password = ACCOUNTS[0]
    did = pds.accounts[handle].did
    resolver = IdentityResolver(
        plc_url=pds.plc_url,
        use_dns=False,
        web_origin=lambda h: pds.pds_url,
        allow_test_handles=True,
    )
    key = (await resolver.resolve(did)).signing_key
    clock = TidClock()
    async with XrpcClient(session=await login(handle, password, pds.pds_url)) as client:
        for batch in range(100):  # applyWrites takes at most 200 writes
            writes = [
                Create(COLL, _pds_note(batch * 200 + i), rkey=clock.next()) for i in range(200)
            ]
            await client.apply_writes(did, writes)
        path = tmp_path / "repo.car"
        await client.sync_get_repo(did, path)
        latest = await client.sync_get_latest_commit(did)

    def read_both() -> tuple[int, int, int, int]:
        with RepoFile(path, did=did, signing_key=key) as repo:
            assert str(repo.commit.cid) == str(latest.cid) and repo.commit.rev == latest.rev
            from_file = list(repo.records())
        with path.open("rb") as f:
            in_memory = list(iter_repo_records(f, did=did, signing_key=key))
        assert from_file == in_memory and len(from_file) == 20_000
        n, file_growth = peak_rss_growth(path, "file", did, key)
        _, memory_growth = peak_rss_growth(path, "memory", did, key)
        return n, file_growth, memory_growth, path.stat().st_size

    n, file_growth, memory_growth, size = await anyio.to_thread.run_sync(read_both)
    with capsys.disabled():
        print("\n" + _report("reference PDS repo", size, n, file_growth, memory_growth))
    assert file_growth < 8 * 1024 * 1024 and memory_growth > 2 * file_growth


# --- CarStream: the same index fed in any chunks, decoded ahead, bounded ---------------------


def _feed(data: bytes, cuts: list[int], **options: Any) -> CarStream:
    stream = CarStream(**options)
    last = 0
    for cut in sorted(cuts):
        stream.feed(data[last:cut])
        last = cut
    stream.feed(data[last:])
    stream.finish()
    return stream


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.integers(0, 1 << 30), max_size=30))
def test_a_stream_fed_in_any_chunks_reads_the_same_repository(
    small_repo_bytes: bytes, tmp_path_factory: pytest.TempPathFactory, cuts: list[int]
) -> None:
    data = small_repo_bytes
    stream = _feed(data, [c % len(data) for c in cuts], decode={"com.example.note"})
    assert stream.in_memory and stream.data == data
    car = read_car(data)
    assert stream.roots == car.roots
    assert {
        CID.from_raw(raw): data[o : o + n] for raw, (o, n) in stream.offsets.items()
    } == car.blocks
    path = tmp_path_factory.mktemp("stream") / "repo.car"
    path.write_bytes(data)
    expected = list(iter_repo_records(data, did=DID, signing_key=KEY.did))
    with RepoFile(path, did=DID, signing_key=KEY.did, stream=stream) as repo:
        assert list(repo.records()) == expected
        ahead_count = 0
        for record in expected:  # decoded ahead: the notes, not the other collection
            ahead = repo.decoded_record(record.cid)
            if ahead is not None:  # None: left to the strict decoder (e.g. n = 0xf9 looks
                ahead_count += 1  # like a float head to the fast path's byte scan)
                assert record.collection == "com.example.note"
                assert ahead[0] == record.record and json.loads(ahead[1]) == record.record
        assert ahead_count >= 290
    assert (
        len(stream.nodes)
        == sum(1 for raw in stream.offsets if raw not in {bytes(r.cid) for r in expected}) - 1
    )


@pytest.fixture(scope="module")
def small_repo_bytes(small_repo: Path) -> bytes:
    return small_repo.read_bytes()


def test_a_stream_refuses_what_the_reader_refuses(small_repo_bytes: bytes) -> None:
    data = small_repo_bytes
    with pytest.raises(VerificationError, match="truncated CAR"):
        _feed(data[:-10], [100, 5000])
    with pytest.raises(VerificationError, match="truncated CAR: empty input"):
        _feed(b"", [])
    flipped = bytearray(data)
    flipped[-1] ^= 1
    with pytest.raises(VerificationError, match="CID mismatch at block"):
        _feed(bytes(flipped), [len(data) // 2])
    with pytest.raises(VerificationError, match="over the 100-byte block limit"):
        _feed(data, [], max_block_size=100)


def test_a_stream_over_its_memory_limit_gives_up_and_the_file_is_indexed_on_disk(
    small_repo: Path, small_repo_bytes: bytes, tmp_path: Path
) -> None:
    stream = _feed(small_repo_bytes, [1000, 20000], memory_limit=len(small_repo_bytes) - 1)
    assert not stream.in_memory and stream.offsets == {} and stream.nodes == {}
    with RepoFile(
        small_repo, did=DID, signing_key=KEY.did, stream=stream, index_dir=tmp_path
    ) as repo:
        assert repo.count() == 340
        assert next(p.name for p in tmp_path.iterdir()).startswith("atsync-car-index-")


@pytest.mark.parametrize("cut", [1, 700, 5000])
def test_a_stream_that_gives_up_hands_over_every_byte_it_held(
    small_repo_bytes: bytes, tmp_path: Path, cut: int
) -> None:
    """``on_give_up`` sees exactly the bytes fed before the chunk that did not fit: with the
    chunks after it, the whole CAR — what a download that wrote nothing yet must put on disk."""
    data = small_repo_bytes
    spilled = bytearray()
    gave_up: list[int] = []

    def keep(held: bytearray) -> None:
        gave_up.append(len(held))
        spilled.extend(held)

    stream = CarStream(memory_limit=len(data) - 1, on_give_up=keep)
    for start in range(0, len(data), cut):
        chunk = data[start : start + cut]
        stream.feed(chunk)
        if gave_up:
            spilled.extend(chunk)
    stream.finish()
    assert len(gave_up) == 1 and not stream.in_memory
    assert bytes(spilled) == data
    path = tmp_path / "spilled.car"
    path.write_bytes(spilled)
    with RepoFile(path, did=DID, signing_key=KEY.did, stream=stream) as repo:
        assert repo.count() == 340


def test_a_car_held_in_memory_is_read_without_a_file(
    small_repo: Path, small_repo_bytes: bytes
) -> None:
    stream = _feed(small_repo_bytes, [3000], decode={"com.example.note"}, walk=True)
    with RepoFile(None, did=DID, signing_key=KEY.did, stream=stream) as repo:
        assert repo.count() == 340
        with RepoFile(small_repo, did=DID, signing_key=KEY.did) as on_disk:
            assert list(repo.leaves()) == list(on_disk.leaves())
    given_up = _feed(small_repo_bytes, [3000], memory_limit=100)
    with pytest.raises(ValueError, match="holds in memory"):
        RepoFile(None, did=DID, signing_key=KEY.did, stream=given_up)
    with pytest.raises(ValueError, match="holds in memory"):
        CarFile(None)


def test_a_spill_lets_go_of_what_its_stream_read(small_repo_bytes: bytes) -> None:
    # Once a pull is done with it, nothing decoded lives on for the collector to walk.
    from atsync.sync._spill import Spill

    with Spill(decode={"com.example.note"}, walk=True) as spill:
        spill.feed(small_repo_bytes)
        assert spill.finish() is None
        stream = spill.stream
        stream.finish()  # as the reader does
        assert stream.records and stream.nodes and stream.offsets and stream.data
        assert stream.walk is not None and stream.walk.complete
    held = (stream.records, stream.record_json, stream.nodes, stream.layers, stream.offsets)
    assert held == ({}, {}, {}, {}, {}) and stream.data == b"" and stream.walk is None


# --- the tree walked while downloading (CarStream(walk=True)) -------------------------------


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(order=st.randoms(use_true_random=False), cuts=st.lists(st.integers(0, 1 << 30), max_size=8))
def test_a_tree_walked_while_downloading_is_the_tree_walked_after(
    tmp_path_factory: pytest.TempPathFactory, order: Any, cuts: list[int]
) -> None:
    """In any block order (the commit first or not) and any chunks: the same leaves in key
    order and the same nodes as ``iter_leaves`` walking the file."""
    blocks = list(_blocks_of_repo(200, other=30))
    commit = blocks[0]
    rest = blocks[1:]
    order.shuffle(rest)
    at = order.randrange(len(rest) + 1)
    path = tmp_path_factory.mktemp("walk") / "repo.car"
    _write_repo(path, [*rest[:at], commit, *rest[at:]], root=commit[0])
    data = path.read_bytes()
    stream = _feed(data, [c % len(data) for c in cuts], decode={"com.example.note"}, walk=True)
    with RepoFile(path, did=DID, signing_key=KEY.did) as plain:
        expected_nodes: list[CID] = []
        expected = list(plain.leaves(expected_nodes.append))
    with RepoFile(path, did=DID, signing_key=KEY.did, stream=stream) as repo:
        walked = repo.walked()
        assert stream.in_memory
        assert walked is not None
        assert sorted(walked.nodes) == sorted(bytes(c) for c in expected_nodes)
        nodes: list[CID] = []
        assert list(repo.leaves(nodes.append)) == expected
        assert sorted(map(bytes, nodes)) == sorted(map(bytes, expected_nodes))


def test_a_tree_the_stream_cannot_walk_is_walked_after_and_refused_there(
    tmp_path: Path,
) -> None:
    """A node missing from the CAR, or a commit naming another tree: the stream's walk is
    not taken, and the walk after the download says what is wrong."""
    blocks = list(_blocks_of_repo(120))
    root = CID.from_raw(bytes(blocks[0][0]))
    nodes = [b for b in blocks[1:] if b"$type" not in b[1]]
    without = [b for b in blocks if b[0] != nodes[-1][0]]  # a leaf node dropped
    path = _write_repo(tmp_path / "missing.car", without, root=root)
    stream = _feed(path.read_bytes(), [], decode={"com.example.note"}, walk=True)
    assert stream.walk is None or not stream.walk.complete
    with RepoFile(path, did=DID, signing_key=KEY.did, stream=stream) as repo:
        assert repo.walked() is None
        with pytest.raises(VerificationError, match="missing"):
            list(repo.leaves())


def test_a_stream_over_its_memory_limit_walks_nothing(small_repo: Path, tmp_path: Path) -> None:
    data = small_repo.read_bytes()
    stream = _feed(data, [1000], walk=True, memory_limit=len(data) - 1)
    assert stream.walk is None
    with RepoFile(small_repo, did=DID, signing_key=KEY.did, stream=stream) as repo:
        assert repo.walked() is None
        assert repo.count() == 340

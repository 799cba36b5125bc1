"""Hostile input to the decoders and the validator: random bytes, valid input mutated byte by
byte (records, CARs, firehose frames, a signed ``#commit`` event through the live pull's decode
and verify), and valid records mutated field by field. Nothing but atsync's own errors
(``AtsyncError``) comes out, and each input is answered well within the deadline (a hang or a
runaway allocation would fail it). Inputs that claim huge lengths or nest without end are
answered with an error and a few MB at most (measured with ``tracemalloc``)."""

from __future__ import annotations

import copy
import io
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atsync._errors import AtsyncError, RecordError, VerificationError
from atsync.atproto import (
    CID,
    CarStream,
    RepoFile,
    data_to_json,
    decode_dag_cbor,
    decode_plain_record,
    encode_dag_cbor,
    iter_repo_records,
    read_car,
    verify_commit_event,
)
from atsync.atproto._car import write_car
from atsync.atproto._cbor import decode_record, encode_uvarint
from atsync.atproto._firehose import decode_frame
from atsync.lexicon import LexiconSet, validate_record, validate_record_json
from lexicon_records_gen import records
from mutations import mutated
from test_car_file import DID, KEY, _blocks_of_repo, _write_repo
from test_commit_event import KEY as EVENT_KEY
from test_commit_event import _mixed_commit

FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
NOTES = LexiconSet.load(Path(__file__).parent / "lexicon_cases" / "notes")
RECORD = encode_dag_cbor(
    {"$type": "com.example.notes.note", "title": "a note", "n": 5, "tags": ["x"], "b": b"\x00"}
)
FRAME = encode_dag_cbor({"op": 1, "t": "#commit"}) + encode_dag_cbor(
    {"seq": 7, "repo": DID, "ops": [], "blocks": b"\x01\x02"}
)


def _repo_bytes(tmp: Path) -> bytes:
    return _write_repo(tmp / "repo.car", _blocks_of_repo(12, other=3)).read_bytes()


def only_ours(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except AtsyncError:
        pass


def decode_all(data: bytes) -> None:
    for decode in (decode_dag_cbor, decode_record, decode_frame, read_car):
        only_ours(decode, data)
    decode_plain_record(data)  # None or a value: never an exception


@FUZZ
@given(st.binary(max_size=3000))
def test_random_bytes(data: bytes) -> None:
    decode_all(data)


@FUZZ
@given(st.one_of(mutated(RECORD), mutated(FRAME)))
def test_mutated_records_and_frames(data: bytes) -> None:
    decode_all(data)


@FUZZ
@given(st.data())
def test_mutated_repositories(tmp_path_factory: Any, data: st.DataObject) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    car = data.draw(mutated(_repo_bytes(tmp)))
    path = tmp / "bad.car"
    path.write_bytes(car)

    def read_file() -> None:
        with RepoFile(path, did=DID, signing_key=KEY.did) as repo:
            list(repo.records())

    def read_stream() -> None:
        stream = CarStream(decode={"com.example.note"})
        cut = data.draw(st.integers(0, len(car)))
        stream.feed(car[:cut])
        stream.feed(car[cut:])
        stream.finish()
        with RepoFile(path, did=DID, signing_key=KEY.did, stream=stream) as repo:
            list(repo.records())

    for read in (read_file, read_stream, lambda: list(iter_repo_records(car, did=DID))):
        only_ours(read)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["$type", "$link", "$bytes", "title", "tags", "embed", "createdAt"])
            | st.text(max_size=6),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@FUZZ
@given(json_values)
def test_the_validator_with_random_records(value: Any) -> None:
    record = {"$type": "com.example.notes.note", **value} if isinstance(value, dict) else value
    only_ours(validate_record_json, NOTES, "com.example.notes.note", record)


# --- valid records, mutated field by field ------------------------------------------------------

CATALOG = LexiconSet.load(Path(__file__).parent / "interop" / "lexicon" / "catalog")
RECORD_TYPES = [(NOTES, "com.example.notes.note"), (CATALOG, "example.lexicon.record")]
LINK = CID.for_data(b"fuzz")
hostile_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(st.characters(codec=None), max_size=20)  # lone surrogates too
    | st.binary(max_size=40)
    | st.just(LINK)
    | st.sampled_from(["", "com.example.notes.note", "blob", "2024-05-01T12:00:00Z", "did:x"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["$type", "$link", "$bytes", "ref", "mimeType", "size", "images"])
            | st.text(max_size=6),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
# What a frame can carry: hostile in shape, but DAG-CBOR (64-bit integers, no floats, valid
# strings).
wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=40)
    | st.just(LINK)
    | st.sampled_from(["create", "update", "delete", "com.example.note/3kzzzzzzzzzz2", DID]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


def _places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path of every value in ``value`` (dict keys and list indexes), itself first."""
    found = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _places(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _places(v, (*path, i))
    return found


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


@st.composite
def mutated_records(draw: st.DrawFn) -> tuple[LexiconSet, str, Any]:
    """A record its Lexicon accepts, then one to three edits anywhere in it: a value replaced
    (by a hostile one, or by another of the record's own values), a field or item dropped, a
    field or item added."""
    lexicons, nsid = draw(st.sampled_from(RECORD_TYPES))
    record: Any = copy.deepcopy(draw(records(lexicons, nsid)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_places(record)))
        kind = draw(st.sampled_from(["replace", "swap", "drop", "add"]))
        if kind in ("replace", "swap"):
            if kind == "replace":
                new = draw(hostile_values)
            else:
                new = copy.deepcopy(_at(record, draw(st.sampled_from(_places(record)))))
            if not path:
                record = new
            else:
                _at(record, path[:-1])[path[-1]] = new
            continue
        target = _at(record, path)
        if kind == "drop" and isinstance(target, dict | list) and target:
            if isinstance(target, dict):
                del target[draw(st.sampled_from(sorted(target)))]
            else:
                del target[draw(st.integers(0, len(target) - 1))]
        elif kind == "add" and isinstance(target, dict):
            name = draw(st.sampled_from([*sorted(target), "$type", "extra", "embed"]))
            target[name] = draw(hostile_values)
        elif kind == "add" and isinstance(target, list):
            target.append(draw(hostile_values))
    return lexicons, nsid, record


@FUZZ
@given(mutated_records())
def test_the_validator_with_mutated_valid_records(case: tuple[LexiconSet, str, Any]) -> None:
    lexicons, nsid, record = case
    try:
        validate_record(lexicons, nsid, record)
    except RecordError:
        pass  # a record's fault is a RecordError, never a SchemaError or anything else
    try:
        as_json = data_to_json(record)
    except RecordError:
        return  # a "$link"/"$bytes" key has no JSON form
    try:
        validate_record_json(lexicons, nsid, as_json)
    except RecordError:
        pass


# --- #commit events, as the live pull decodes and verifies them ---------------------------------

_, COMMIT = _mixed_commit()  # a signed commit of 5 ops over 60 records, as the PDS sends it
COMMIT_FRAME = encode_dag_cbor({"op": 1, "t": "#commit"}) + encode_dag_cbor(COMMIT)
# Values an op may get that still look right: every CID in the blocks, every op's values (so
# that an op can reach the inversion, on the partial tree, and fail there).
PLAUSIBLE = st.sampled_from(
    [None, *read_car(COMMIT["blocks"]).blocks, *(v for op in COMMIT["ops"] for v in op.values())]
)


def decode_and_verify(frame: bytes) -> None:
    """What the live pull does with a frame: decode it (an error frame is a NetworkError) and
    verify the event, which must fail with ``VerificationError`` alone — the one exception
    the pull turns into "rejected, read the whole repository"."""
    try:
        event = decode_frame(frame)
    except AtsyncError:
        return
    try:
        verify_commit_event(event, EVENT_KEY.did, did=DID)
    except VerificationError:
        pass


def _frame(body: dict[str, Any]) -> bytes:
    return encode_dag_cbor({"op": 1, "t": "#commit"}) + encode_dag_cbor(body)


def test_the_commit_event_fuzzed_here_verifies_as_it_is() -> None:
    event = verify_commit_event(decode_frame(COMMIT_FRAME), EVENT_KEY.did, did=DID)
    assert len(event.ops) == 5 and len(COMMIT["blocks"]) > 2000


@FUZZ
@given(st.data())
def test_mutated_commit_events(data: st.DataObject) -> None:
    where = data.draw(st.sampled_from(["frame", "blocks", "op", "field"]))
    if where == "frame":  # the bytes as they come off the socket
        frame = data.draw(mutated(COMMIT_FRAME))
    elif where == "blocks":  # the CAR inside, in a well-formed frame
        frame = _frame({**COMMIT, "blocks": data.draw(mutated(COMMIT["blocks"]))})
    elif where == "op":  # one op's fields: the unsigned part
        ops = copy.deepcopy(COMMIT["ops"])
        op = data.draw(st.sampled_from(ops))
        name = data.draw(st.sampled_from(["action", "path", "cid", "prev", "extra"]))
        op[name] = data.draw(PLAUSIBLE | wire_values)
        frame = _frame({**COMMIT, "ops": data.draw(st.permutations(ops))})
    else:  # any top-level field
        name = data.draw(st.sampled_from(sorted(COMMIT)))
        frame = _frame({**COMMIT, name: data.draw(wire_values)})
    decode_and_verify(frame)


# --- memory: inputs that claim more than they hold --------------------------------------------

MAX_PEAK = 4 * 1024 * 1024  # bytes traced while answering one input of at most a few hundred KB
HUGE = 2**60


def _claim(major: int, n: int) -> bytes:
    """A CBOR head of ``major`` type claiming ``n`` (8-byte argument)."""
    return bytes([(major << 5) | 27]) + n.to_bytes(8, "big")


# DAG-CBOR values that claim far more than they hold, or nest without end.
CBOR: dict[str, bytes] = {
    "a byte string of 2^60 bytes": _claim(2, HUGE) + b"\x00" * 64,
    "a text of 2^60 bytes": _claim(3, HUGE) + b"a" * 64,
    "an array of 2^60 items": _claim(4, HUGE) + b"\x00" * 64,
    "a map of 2^60 entries": _claim(5, HUGE) + b"\x61a\x00" * 16,
    "a link of 2^60 bytes": b"\xd8\x2a" + _claim(2, HUGE) + b"\x00" * 64,
    "an array of 2^32-1 items in a map": b"\xa1\x61a\x9a\xff\xff\xff\xff" + b"\x00" * 64,
    "arrays nested 200,000 deep": b"\x81" * 200_000 + b"\x00",
    "maps nested 100,000 deep": b"\xa1\x61a" * 100_000 + b"\x00",
}
HEADER = write_car([LINK], [])  # a valid CAR header (its length, then the map), no blocks


def _car_of(block: bytes) -> tuple[bytes, CID]:
    """A CAR whose one block, its root, is ``block`` under its true CID (so it passes the
    hash check and reaches a decoder)."""
    cid = CID.for_data(block)
    section = bytes(cid) + block
    return write_car([cid], []) + encode_uvarint(len(section)) + section, cid


# CARs that claim more than they hold: (the CAR, its root).
CARS: dict[str, tuple[bytes, CID]] = {
    "a CAR header of 2^60 bytes": (encode_uvarint(HUGE) + b"\xa2" * 64, LINK),
    "a CAR section of 2^60 bytes": (HEADER + encode_uvarint(HUGE) + b"\x01" * 64, LINK),
    "a CAR section of 2^63-1 bytes": (HEADER + b"\xff" * 8 + b"\x7f" + b"\x00" * 64, LINK),
    # Up to the block limit (2 MiB), a claim is believed until the bytes run out.
    "a CAR section just under the block limit": (
        HEADER + encode_uvarint(2 * 1024 * 1024) + b"\x01q",
        LINK,
    ),
    **{
        f"a CAR header that is {name}": (encode_uvarint(len(v)) + v, LINK)
        for name, v in CBOR.items()
    },
}
# Well-formed CARs whose commit block is one of those values: read_car does not decode blocks,
# a repository reader and an event's verification do.
CAR_BLOCKS = {f"a CAR whose commit is {name}": _car_of(v) for name, v in CBOR.items()}


def _car_stream(car: bytes) -> None:
    stream = CarStream(decode={"com.example.note"})
    stream.feed(car)
    stream.finish()


def _event_of(car: bytes, root: CID) -> None:
    """A #commit event carrying ``car``, decoded and verified as the live pull does."""
    frame = _frame({**COMMIT, "blocks": car, "commit": root})
    verify_commit_event(decode_frame(frame), EVENT_KEY.did, did=DID)


def _memory_cases() -> dict[str, Callable[[], Any]]:
    cases: dict[str, Callable[[], Any]] = {}
    for name, v in CBOR.items():
        cases[f"decode_dag_cbor: {name}"] = lambda v=v: decode_dag_cbor(v)
        cases[f"decode_record: {name}"] = lambda v=v: decode_record(v)
        cases[f"decode_frame: {name}, as a frame's body"] = lambda v=v: decode_frame(
            encode_dag_cbor({"op": 1, "t": "#commit"}) + v
        )
    for name, (car, root) in {**CARS, **CAR_BLOCKS}.items():
        if name in CARS:
            cases[f"read_car: {name}"] = lambda car=car: read_car(car)
            cases[f"read_car, from a stream: {name}"] = lambda car=car: read_car(
                io.BufferedReader(io.BytesIO(car))
            )
            cases[f"CarStream: {name}"] = lambda car=car: _car_stream(car)
        cases[f"iter_repo_records: {name}"] = lambda car=car: list(iter_repo_records(car))
        cases[f"a #commit event: {name}"] = lambda car=car, root=root: _event_of(car, root)
    return cases


MEMORY_CASES = _memory_cases()


@pytest.mark.parametrize("case", sorted(MEMORY_CASES))
def test_a_claimed_length_or_depth_costs_no_memory(case: str) -> None:
    decode = MEMORY_CASES[case]
    tracemalloc.start()
    try:
        with pytest.raises(AtsyncError):
            decode()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK, f"{case}: {peak:,} bytes at the peak"


@pytest.mark.parametrize("name", sorted(CBOR))
def test_libipld_fast_path_declines_what_claims_more_than_it_holds(name: str) -> None:
    tracemalloc.start()
    try:
        assert decode_plain_record(CBOR[name]) is None  # never an exception
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK, f"{name}: {peak:,} bytes at the peak"

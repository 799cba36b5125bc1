"""Hostile input to the decoders and the validator: random bytes, and valid input mutated
byte by byte. Nothing but atsync's own errors (``AtsyncError``) comes out, and each input is
answered well within the deadline (a hang or a runaway allocation would fail it)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atsync._errors import AtsyncError
from atsync.atproto import (
    CarStream,
    RepoFile,
    decode_dag_cbor,
    decode_plain_record,
    encode_dag_cbor,
    iter_repo_records,
    read_car,
)
from atsync.atproto._cbor import decode_record
from atsync.atproto._firehose import decode_frame
from atsync.lexicon import LexiconSet, validate_record_json
from mutations import mutated
from test_car_file import DID, KEY, _blocks_of_repo, _write_repo

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

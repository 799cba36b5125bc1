"""Identifier syntax against the official atproto interop vectors, plus TID generation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from atsync._errors import InvalidSyntaxError
from atsync.atproto import _syntax as sx

VECTORS = Path(__file__).parent / "interop" / "syntax"

VALIDATORS: dict[str, Callable[[str], str]] = {
    "atidentifier": sx.validate_at_identifier,
    "aturi": sx.validate_at_uri,
    "cid": sx.validate_cid,
    "datetime": sx.validate_datetime,
    "did": sx.validate_did,
    "handle": sx.validate_handle,
    "language": sx.validate_language,
    "nsid": sx.validate_nsid,
    "recordkey": sx.validate_record_key,
    "tid": sx.validate_tid,
    "uri": sx.validate_uri,
}
CHECKERS: dict[str, Callable[[str], bool]] = {
    "atidentifier": sx.is_valid_at_identifier,
    "aturi": sx.is_valid_at_uri,
    "cid": sx.is_valid_cid,
    "datetime": sx.is_valid_datetime,
    "did": sx.is_valid_did,
    "handle": sx.is_valid_handle,
    "language": sx.is_valid_language,
    "nsid": sx.is_valid_nsid,
    "recordkey": sx.is_valid_record_key,
    "tid": sx.is_valid_tid,
    "uri": sx.is_valid_uri,
}


def _lines(path: Path) -> list[str]:
    # Leading/trailing spaces are part of several vectors, so only the newline is removed.
    out = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line == "" or line.startswith("#"):
            continue
        out.append(line)
    return out


def _cases(suffix: str) -> list[tuple[str, str]]:
    cases = []
    for path in sorted(VECTORS.glob(f"*_{suffix}.txt")):
        kind = path.name.split("_")[0]
        cases += [(kind, line) for line in _lines(path)]
    return cases


VALID = _cases("syntax_valid")
INVALID = _cases("syntax_invalid") + _cases("parse_invalid")


def test_every_vector_file_is_used() -> None:
    kinds = {p.name.split("_")[0] for p in VECTORS.glob("*.txt")}
    assert kinds == set(VALIDATORS)
    # Guards against a glob or comment-skipping bug that silently drops vectors.
    assert len(VALID) == 244
    assert len(INVALID) == 292


@pytest.mark.parametrize(("kind", "value"), VALID, ids=lambda v: v[:40])
def test_valid(kind: str, value: str) -> None:
    VALIDATORS[kind](value)
    assert CHECKERS[kind](value)


@pytest.mark.parametrize(("kind", "value"), INVALID, ids=lambda v: v[:40])
def test_invalid(kind: str, value: str) -> None:
    with pytest.raises(InvalidSyntaxError):
        VALIDATORS[kind](value)
    assert not CHECKERS[kind](value)


def test_error_names_the_kind_and_reason() -> None:
    with pytest.raises(InvalidSyntaxError, match=r"invalid handle 'jo_hn\.test': segment 'jo_hn'"):
        sx.validate_handle("jo_hn.test")
    with pytest.raises(InvalidSyntaxError, match=r"invalid record key '\.\.'"):
        sx.validate_record_key("..")
    with pytest.raises(InvalidSyntaxError, match="at most 2048"):
        sx.validate_did("did:web:" + "a" * 2100)


def test_non_strings_are_rejected_not_crashed() -> None:
    for validator in VALIDATORS.values():
        with pytest.raises(InvalidSyntaxError):
            validator(123)  # type: ignore[arg-type]


def test_normalization() -> None:
    assert sx.validate_handle("John.Test") == "john.test"
    assert sx.validate_nsid("COM.Example.fooBar") == "com.example.fooBar"
    assert sx.validate_did("did:plc:ABC") == "did:plc:ABC"
    assert sx.validate_at_identifier("Alice.Example.COM") == "alice.example.com"
    uri = sx.parse_at_uri("at://Alice.Test/COM.example.thing/3jzfcijpj2z2a")
    assert uri == sx.AtUri("alice.test", "com.example.thing", "3jzfcijpj2z2a")
    assert str(uri) == "at://alice.test/com.example.thing/3jzfcijpj2z2a"
    assert sx.parse_at_uri("at://did:plc:x").collection is None


def test_tid_encoding_round_trips() -> None:
    assert str(sx.Tid(0, 0)) == "2222222222222"
    tid = sx.Tid(1_700_000_000_123_456, 1023)
    s = str(tid)
    assert sx.is_valid_tid(s)
    assert sx.Tid.parse(s) == tid
    # Every vector in the valid file parses and re-encodes to itself.
    for line in _lines(VECTORS / "tid_syntax_valid.txt"):
        assert str(sx.Tid.parse(line)) == line


def test_tid_sorts_like_its_timestamp() -> None:
    a = str(sx.Tid(1_000_000, 999))
    b = str(sx.Tid(1_000_001, 0))
    assert a < b


def test_tid_rejects_out_of_range_parts() -> None:
    with pytest.raises(InvalidSyntaxError):
        sx.Tid(-1, 0)
    with pytest.raises(InvalidSyntaxError):
        sx.Tid(0, 1024)


def test_tid_clock_never_goes_backwards() -> None:
    wall = [5_000_000, 5_000_000, 4_000_000, 4_000_000, 6_000_000]
    clock = sx.TidClock(clock_id=7, now_us=lambda: wall.pop(0))
    tids = [clock.next_tid() for _ in range(5)]
    assert [t.timestamp_us for t in tids] == [5_000_000, 5_000_001, 5_000_002, 5_000_003, 6_000_000]
    strs = [str(t) for t in tids]
    assert strs == sorted(strs)
    assert len(set(strs)) == 5
    assert all(t.clock_id == 7 for t in tids)


def test_tid_clock_observe_jumps_past_foreign_tids() -> None:
    clock = sx.TidClock(clock_id=1, now_us=lambda: 10)
    foreign = str(sx.Tid(1_000_000_000, 3))
    clock.observe(foreign)
    assert clock.next() > foreign


def test_tid_clock_real_time_is_current() -> None:
    import time

    clock = sx.TidClock()
    before = time.time_ns() // 1000
    tid = sx.Tid.parse(clock.next())
    assert abs(tid.timestamp_us - before) < 5_000_000
    assert 0 <= clock.clock_id <= 1023

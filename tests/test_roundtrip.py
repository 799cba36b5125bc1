"""Round-trips of every property type through a real SQLite file, and rejected writes.

Every value written with ``set`` must come back identical from ``get``, ``get_many``,
``query``, ``iterate`` and after closing and reopening the file. "Identical" is strict:
the same Python type, floats bit for bit (so ``-0.0`` keeps its sign), JSON objects with
their keys in the same order. Raw SQL sees the documented storage class (text, integer,
real, blob). The same holds for the default a schema upgrade gives existing records.

A value that does not fit the schema must raise ``ValidationError`` and leave every table
exactly as it was (checked with a second, plain ``sqlite3`` connection).
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atsync._errors import ValidationError
from atsync.db import ModelDB

# One model per property type, each with a single property "v", plus the referenced model.
KINDS = [
    "string",
    "integer",
    "float",
    "number",
    "boolean",
    "json",
    "bytes",
    "@target",
]
NULLABLE_KINDS = [f"{kind}?" for kind in KINDS]
ALL_KINDS = [*KINDS, *NULLABLE_KINDS, "@target[]"]


def model_name(kind: str) -> str:
    base = kind.replace("@target[]", "relation").replace("@target", "reference")
    return "m_" + base.replace("?", "_null")


MODELS: dict[str, dict[str, Any]] = {
    model_name(kind): {"id": "primary", "v": kind} for kind in ALL_KINDS
}
MODELS["target"] = {"id": "primary", "label": "string?"}

FILTERABLE = {"string", "integer", "float", "number", "boolean", "bytes", "@target"}

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- strategies ---------------------------------------------------------------------------

# Hypothesis' text() never produces lone surrogates; it does produce NUL and astral chars.
texts = st.text()
keys = st.text(min_size=1, max_size=20)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
EDGE_FLOATS = [
    -0.0,
    0.0,
    5e-324,  # smallest subnormal
    -5e-324,
    2.2250738585072009e-308,  # largest subnormal
    2.2250738585072014e-308,  # smallest normal
    1.7976931348623157e308,
    -1.7976931348623157e308,
    math.inf,
    -math.inf,
    2.0**53 + 2,
    -(2.0**63),
    2.0**63,
    0.1,
    -1.0,
]
# Every finite float, both infinities, subnormals and both zeros.
floats = st.floats(allow_nan=False, allow_infinity=True, allow_subnormal=True)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)


def value_strategy(kind: str) -> st.SearchStrategy[Any]:
    nullable = kind.endswith("?")
    base = kind.removesuffix("?")
    strategy: st.SearchStrategy[Any]
    if base == "string":
        strategy = texts
    elif base == "integer":
        strategy = int64
    elif base in ("float", "number"):
        # ints are accepted and stored as floats (docs/modeldb.md)
        strategy = floats | st.sampled_from(EDGE_FLOATS) | int64
    elif base == "boolean":
        strategy = st.booleans()
    elif base == "json":
        # JSON null at the top level is "null" for the column: only allowed when nullable.
        strategy = json_values.filter(lambda v: v is not None)
    elif base == "bytes":
        strategy = st.binary(max_size=64) | st.just(b"")
    elif base == "@target":
        strategy = keys
    elif base == "@target[]":
        strategy = st.lists(keys, max_size=8)
    else:  # pragma: no cover - the list above is exhaustive
        raise AssertionError(kind)
    return st.none() | strategy if nullable else strategy


def expected_value(kind: str, value: Any) -> Any:
    """What reading ``value`` back must give (ints in float columns become floats)."""
    if value is not None and kind.removesuffix("?") in ("float", "number"):
        return float(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return value


# -- strict comparison ----------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal with the same types, floats bit for bit, dict keys in the same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def assert_same(actual: Any, expected: Any, where: str) -> None:
    assert same(actual, expected), f"{where}: read back {actual!r}, wrote {expected!r}"


# -- database helpers ---------------------------------------------------------------------


class Files:
    """Database files under one tmp_path (hypothesis reuses the fixture across examples)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._n = itertools.count()
        self._seeded: Path | None = None

    def new(self) -> Path:
        return self.root / f"db{next(self._n)}.sqlite"

    def seeded(self) -> Path:
        """One database per test with a 'base' record in every model (created once: the
        tests using it assert that it never changes)."""
        if self._seeded is None:
            self._seeded = self.new()
            seeded_database(self._seeded)
        return self._seeded


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def raw_snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows, through a plain sqlite3 connection (not ModelDB's)."""
    conn = sqlite3.connect(path)
    try:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        out: dict[str, list[tuple[Any, ...]]] = {}
        for table in tables:
            rows = conn.execute(f'SELECT * FROM "{table}"').fetchall()
            out[table] = sorted(rows, key=repr)
        return out
    finally:
        conn.close()


def read_back_all_ways(db: ModelDB, model: str, key: str) -> Iterator[tuple[str, Any]]:
    """Every way of reading the record back, each with a label for failure messages."""
    yield "get", db.get(model, key)
    yield "get_many", db.get_many(model, [key])[0]
    found = db.query(model, where={"id": key})
    assert len(found) == 1, f"query by key found {found!r}"
    yield "query", found[0]
    selected = db.query(model, where={"id": key}, select=["v"])
    assert len(selected) == 1
    yield "query(select=[v])", selected[0]
    streamed = list(db.iterate(model, where={"id": key}))
    assert len(streamed) == 1, f"iterate by key found {streamed!r}"
    yield "iterate", streamed[0]
    with db.transaction():
        inside = list(db.iterate(model, where={"id": key}))
    assert len(inside) == 1
    yield "iterate (in a transaction)", inside[0]


def check_round_trip(path: Path, kind: str, key: str, value: Any) -> None:
    model = model_name(kind)
    expected = {"id": key, "v": expected_value(kind, value)}
    db = ModelDB.open(path, MODELS)
    try:
        db.set(model, {"id": key, "v": value})
        for how, record in read_back_all_ways(db, model, key):
            assert record is not None, how
            assert list(record) == ["id", "v"], how
            assert_same(record, expected, f"{kind} via {how}")
        if kind.removesuffix("?") in FILTERABLE:
            by_value = db.query(model, where={"v": value})
            assert key in [r["id"] for r in by_value], f"{kind}: where v == {value!r} missed it"
            assert db.count(model, where={"v": value}) == len(by_value)
    finally:
        db.close()
    reopened = ModelDB.open(path, MODELS)
    try:
        for how, record in read_back_all_ways(reopened, model, key):
            assert_same(record, expected, f"{kind} via {how} after reopening")
    finally:
        reopened.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        if kind != "@target[]":
            (storage,) = conn.execute(
                f'SELECT typeof("v") FROM "{model}" WHERE "id" = ?', (key,)
            ).fetchone()
            assert storage == storage_class(kind, value), f"{kind} {value!r} stored as {storage}"
    finally:
        conn.close()


def storage_class(kind: str, value: Any) -> str:
    """The SQLite storage class raw SQL sees (docs/modeldb.md, "Tables are plain SQL")."""
    if value is None:
        return "null"
    return {
        "string": "text",
        "integer": "integer",
        "float": "real",
        "number": "real",
        "boolean": "integer",
        "json": "text",
        "bytes": "blob",
        "@target": "text",
    }[kind.removesuffix("?")]


# -- round-trips --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
@SETTINGS
@given(data=st.data())
def test_every_type_round_trips(files: Files, kind: str, data: st.DataObject) -> None:
    path = files.root / "shared.sqlite"  # one file for all examples: keys may repeat
    key = data.draw(keys, label="key")
    value = data.draw(value_strategy(kind), label="value")
    check_round_trip(path, kind, key, value)
    if isinstance(value, float):
        # Also the value of the other sign: hypothesis draws 0.0 first, so -0.0 is always
        # tried, and negative values as often as positive ones.
        check_round_trip(path, kind, key, -value)


@pytest.mark.parametrize("kind", ["float", "number", "float?", "number?"])
@pytest.mark.parametrize("value", EDGE_FLOATS, ids=repr)
def test_float_edge_values_round_trip_bit_for_bit(files: Files, kind: str, value: float) -> None:
    check_round_trip(files.new(), kind, "k", value)


@pytest.mark.parametrize("kind", ["float", "number"])
def test_negative_zero_keeps_its_sign(files: Files, kind: str) -> None:
    db = ModelDB.open(files.new(), MODELS)
    try:
        db.set(model_name(kind), {"id": "z", "v": -0.0})
        got = db.get(model_name(kind), "z")
        assert got is not None
        assert math.copysign(1.0, got["v"]) == -1.0, f"-0.0 came back as {got['v']!r}"
    finally:
        db.close()


def test_json_keeps_key_order_nul_characters_and_number_types(files: Files) -> None:
    value = {
        "z\x00key": ["a\x00b", -0.0, 1, 1.0, True, None, {"ключ": "значение", "": []}],
        "a": {"😀": 5e-324, "b": -(2**63), "c": 2**64},
        "\x00": "",
    }
    check_round_trip(files.new(), "json", "j\x00k", value)


def test_primary_keys_with_nul_and_astral_characters(files: Files) -> None:
    for i, key in enumerate(["\x00", "a\x00", "😀", "é", " ", "\n", "x" * 500]):
        check_round_trip(files.new(), "integer", key, i)


def test_relation_keeps_order_and_duplicates(files: Files) -> None:
    check_round_trip(files.new(), "@target[]", "r", ["b", "a", "b", "\x00", "😀", "a"])
    check_round_trip(files.new(), "@target[]", "r", [])


@pytest.mark.parametrize("kind", NULLABLE_KINDS)
def test_nullable_property_left_out_reads_as_none(files: Files, kind: str) -> None:
    db = ModelDB.open(files.new(), MODELS)
    try:
        db.set(model_name(kind), {"id": "k"})
        assert_same(db.get(model_name(kind), "k"), {"id": "k", "v": None}, kind)
        if kind.removesuffix("?") in FILTERABLE:
            assert [r["id"] for r in db.query(model_name(kind), where={"v": None})] == ["k"]
    finally:
        db.close()


def test_relation_left_out_reads_as_empty_list(files: Files) -> None:
    db = ModelDB.open(files.new(), MODELS)
    try:
        db.set("m_relation", {"id": "k"})
        assert db.get("m_relation", "k") == {"id": "k", "v": []}
    finally:
        db.close()


def check_upgrade_default(path: Path, kind: str, default: Any) -> None:
    v1 = {"m": {"id": "primary"}, "target": {"id": "primary"}}
    with ModelDB.open(path, v1) as db:
        db.set("m", {"id": "old"})

    def upgrade(api: Any, old: int, new: int) -> None:
        api.add_property("m", "v", kind, default=default)

    v2 = {"m": {"id": "primary", "v": kind}, "target": {"id": "primary"}}
    with ModelDB.open(path, v2, version=2, upgrade=upgrade) as db:
        db.set("m", {"id": "new", "v": default})
        expected = expected_value(kind, default)
        assert_same(db.get("m", "old"), {"id": "old", "v": expected}, f"{kind} upgrade default")
        if kind in FILTERABLE:
            found = [r["id"] for r in db.query("m", where={"v": default})]
            assert found == ["new", "old"], f"where v == {default!r} found {found}"
    conn = sqlite3.connect(path)
    try:
        stored = dict(conn.execute('SELECT id, typeof("v") FROM "m"').fetchall())
    finally:
        conn.close()
    assert stored["old"] == stored["new"], f"default stored as {stored['old']}: {stored}"


@pytest.mark.parametrize("kind", KINDS)
@settings(SETTINGS, max_examples=25)
@given(data=st.data())
def test_upgrade_default_round_trips(files: Files, kind: str, data: st.DataObject) -> None:
    """A property added by an upgrade gives existing records its default, read back exactly
    and stored like the same value written by set() (same SQLite storage class)."""
    check_upgrade_default(files.new(), kind, data.draw(value_strategy(kind), label="default"))


UPGRADE_EDGES: list[tuple[str, Any]] = [
    ("float", -0.0),
    ("float", 0.0),
    ("float", math.inf),
    ("number", -math.inf),
    ("float", 5e-324),
    ("integer", -(2**63)),
    ("string", "a\x00b"),
    ("string", "it's"),
    ("json", {"k\x00": ["\x00", -0.0]}),
    ("bytes", b"\x00'"),
    ("@target", "\x00"),
]


@pytest.mark.parametrize(
    ("kind", "default"), [pytest.param(k, d, id=f"{k}={d!r}") for k, d in UPGRADE_EDGES]
)
def test_upgrade_default_edge_values(files: Files, kind: str, default: Any) -> None:
    check_upgrade_default(files.new(), kind, default)


@pytest.mark.parametrize("dirname", ["a#b", "p%41", "q?mode=rw", "100%", "sp ace"])
def test_iterate_reads_the_same_file_whatever_its_path(tmp_path: Path, dirname: str) -> None:
    """iterate() opens a second connection by URI: the path must not be read as URI syntax."""
    # A decoy database where "p%41" would point if the path were percent-decoded.
    decoy_dir = tmp_path / "pA"
    decoy_dir.mkdir()
    decoy = ModelDB.open(decoy_dir / "t.db", MODELS)
    decoy.set("m_string", {"id": "decoy", "v": "the wrong database"})
    decoy.close()
    directory = tmp_path / dirname
    directory.mkdir()
    db = ModelDB.open(directory / "t.db", MODELS)
    try:
        db.set("m_string", {"id": "real", "v": "the right database"})
        assert db.query("m_string") == [{"id": "real", "v": "the right database"}]
        assert list(db.iterate("m_string")) == [{"id": "real", "v": "the right database"}]
    finally:
        db.close()


# -- rejected values ---------------------------------------------------------------------

LONE_SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)


@st.composite
def with_lone_surrogate(draw: st.DrawFn) -> str:
    text = draw(st.text(max_size=10))
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(LONE_SURROGATES) + text[at:]


def _nan_with_payload(bits: int) -> float:
    # Exponent all ones, non-zero mantissa: a NaN, of either sign, with any payload.
    mantissa = bits & ((1 << 52) - 1) or 1
    sign = (bits >> 52) & 1
    return struct.unpack("<d", struct.pack("<Q", (sign << 63) | (0x7FF << 52) | mantissa))[0]


nans = st.integers(0, 2**53 - 1).map(_nan_with_payload)
too_big_ints = st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1)
# Beyond what a float can hold at all: float(int) raises OverflowError for these.
huge_ints = st.integers(min_value=2**1024, max_value=2**1100).flatmap(
    lambda n: st.sampled_from([n, -n])
)


def deeply_nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def bad_values(kind: str) -> st.SearchStrategy[Any]:
    """Values that do not fit ``kind`` (wrong type, out of range, null, bad Unicode)."""
    base = kind.removesuffix("?")
    nullable = kind.endswith("?")
    others: list[Any] = [object(), 1j, 1.5j]
    if base != "json":
        others += [[], {}, ["x"]]
    if base != "bytes":
        others += [b"x", bytearray(b"y")]
    choices: list[st.SearchStrategy[Any]] = [st.sampled_from(others)]
    if not nullable:
        choices.append(st.none())
    if base in ("string", "@target"):
        choices += [with_lone_surrogate(), st.integers(), floats, st.booleans()]
    elif base == "integer":
        choices += [too_big_ints, st.booleans(), floats, st.sampled_from(["1", b"\x01"])]
    elif base in ("float", "number"):
        choices += [nans, st.booleans(), st.sampled_from(["1.0", b"1"]), huge_ints]
    elif base == "boolean":
        choices += [st.sampled_from([0, 1, 1.0, "true", b"\x01"]), int64]
    elif base == "json":
        choices += [
            st.sampled_from(
                [
                    math.nan,
                    math.inf,
                    -math.inf,
                    {"a": [1, math.nan]},
                    {"a": {"b": -math.inf}},
                    {1: "int key"},
                    {None: "null key"},
                    {"set": {1, 2}},
                    [b"bytes"],
                    deeply_nested(250),
                ]
            ),
            with_lone_surrogate(),
            with_lone_surrogate().map(lambda s: {s: 1}),
            with_lone_surrogate().map(lambda s: [{"k": s}]),
        ]
    elif base == "bytes":
        choices += [st.text(), st.lists(st.integers(0, 255), min_size=1), st.integers()]
    elif base == "@target[]":
        choices = [
            st.sampled_from([None, "ab", b"ab", 5, [1], [""], [None], ["ok", b"k"]]),
            with_lone_surrogate().map(lambda s: [s]),
            with_lone_surrogate().map(lambda s: ["ok", s]),
        ]
    else:  # pragma: no cover
        raise AssertionError(kind)
    return st.one_of(choices)


def good_value(kind: str) -> Any:
    return {
        "string": "s",
        "integer": 7,
        "float": 1.5,
        "number": 2.5,
        "boolean": True,
        "json": {"a": [1]},
        "bytes": b"\x00b",
        "@target": "t1",
        "@target[]": ["t1", "t2"],
    }[kind.removesuffix("?")]


def seeded_database(path: Path) -> None:
    """A database with one 'base' record in every model."""
    with ModelDB.open(path, MODELS) as db, db.transaction():
        for kind in ALL_KINDS:
            db.set(model_name(kind), {"id": "base", "v": good_value(kind)})
        db.set("target", {"id": "t1", "label": None})


def assert_rejected(path: Path, attempt: Callable[[ModelDB], None]) -> None:
    """``attempt`` raises ValidationError, alone or inside a transaction; nothing changes."""
    before = raw_snapshot(path)
    with ModelDB.open(path, MODELS) as db:
        with pytest.raises(ValidationError):
            attempt(db)
        assert not db.in_transaction
        assert raw_snapshot(path) == before
        # Caught inside a transaction, which then commits other work: still nothing of it.
        with db.transaction():
            with pytest.raises(ValidationError):
                attempt(db)
            db.set("target", {"id": "after", "label": "written after the failure"})
        db.delete("target", "after")
        assert db.count("target") == 1
    assert raw_snapshot(path) == before


@pytest.mark.parametrize("kind", ALL_KINDS)
@SETTINGS
@given(data=st.data())
def test_wrong_values_are_rejected_and_write_nothing(
    files: Files, kind: str, data: st.DataObject
) -> None:
    path = files.seeded()
    bad = data.draw(bad_values(kind), label="bad value")
    key = data.draw(st.sampled_from(["base", "new"]), label="key")
    model = model_name(kind)
    assert_rejected(path, lambda db: db.set(model, {"id": key, "v": bad}))
    assert_rejected(path, lambda db: db.update(model, {"id": "base", "v": bad}))


@pytest.mark.parametrize("kind", KINDS)
def test_missing_non_nullable_property_is_rejected(files: Files, kind: str) -> None:
    path = files.seeded()
    assert_rejected(path, lambda db: db.set(model_name(kind), {"id": "new"}))
    assert_rejected(path, lambda db: db.set(model_name(kind), {"id": "base"}))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_unknown_property_is_rejected(files: Files, kind: str) -> None:
    path = files.seeded()
    model = model_name(kind)
    good = good_value(kind)
    assert_rejected(path, lambda db: db.set(model, {"id": "new", "v": good, "extra": 1}))
    assert_rejected(path, lambda db: db.update(model, {"id": "base", "nope": 1}))


@pytest.mark.parametrize(
    "key",
    ["", None, 1, b"k", True, "\ud800", "a\udfff", ["k"]],
    ids=["empty", "none", "int", "bytes", "bool", "lone-high-surrogate", "lone-low", "list"],
)
def test_bad_primary_keys_are_rejected(files: Files, key: Any) -> None:
    path = files.seeded()
    assert_rejected(path, lambda db: db.set("m_string", {"id": key, "v": "x"}))
    assert_rejected(path, lambda db: db.set("m_string", {"v": "x"}))  # no key at all
    with ModelDB.open(path, MODELS) as db:
        with pytest.raises(ValidationError):
            db.get("m_string", key)
        with pytest.raises(ValidationError):
            db.delete("m_string", key)


@pytest.mark.parametrize(
    "value", [2**1024, -(2**1024), 10**400], ids=["2^1024", "-2^1024", "1e400"]
)
@pytest.mark.parametrize("kind", ["float", "number"])
def test_int_too_large_for_a_float_is_a_validation_error(
    files: Files, kind: str, value: int
) -> None:
    path = files.seeded()
    model = model_name(kind)
    assert_rejected(path, lambda db: db.set(model, {"id": "new", "v": value}))
    with ModelDB.open(path, MODELS) as db, pytest.raises(ValidationError):
        db.query(model, where={"v": {"gt": value}})

"""The shared-collection merge rule (``_shared``): hybrid clocks, per-field stamps, tombstones.

A hypothesis property: three writers with skewed clocks edit one document — different fields,
the same field, deletes — each writing its whole view into its own record, with records
delivered between them in any order. Once everyone has everyone's latest record, all three
compute the same row: each field holds the value of the edit with the greatest stamp, unless
a delete came after it.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from atsync.sync._shared import CLOCKS, DELETED, Hlc, merge_shared, stamp_record, valid_stamp

DIDS = ("did:plc:aaaa", "did:plc:bbbb", "did:plc:cccc")
FIELDS = ("title", "body", "n")
TYPE = {"$type": "com.example.doc"}


class Writer:
    def __init__(self, did: str, skew: int, now: list[int]) -> None:
        self.did = did
        self.clock = Hlc(wall_ms=lambda: now[0] + skew)
        self.records: dict[str, dict[str, Any]] = {}  # by author: the latest record seen

    def view(self) -> tuple[dict[str, Any] | None, dict[str, str]]:
        return merge_shared(self.records.values(), FIELDS)

    def write(self, field: str | None, value: Any) -> dict[str, Any]:
        """Edit ``field`` (None: delete the document); returns the new own record."""
        merged, stamps = self.view()
        row = None if field is None else {**(merged or {}), field: value}
        record = {**TYPE, **{k: v for k, v in (row or {}).items() if v is not None}}
        out = stamp_record(record, row, merged, stamps, FIELDS, lambda: self.clock.now(self.did))
        self.records[self.did] = out
        return out

    def receive(self, author: str, record: dict[str, Any]) -> None:
        self.records[author] = record
        for stamp in [*record[CLOCKS].values(), record.get(DELETED)]:
            if stamp:
                self.clock.observe(stamp)


steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("edit"),
            st.integers(0, 2),
            st.sampled_from([*FIELDS, None]),
            st.integers(0, 5),
        ),
        st.tuples(st.just("deliver"), st.integers(0, 2), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("tick"), st.integers(1, 50), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-1000, 1000), min_size=3, max_size=3), steps, st.randoms())
def test_three_writers_converge_on_the_latest_stamp_per_field(
    skews: list[int], plan: list[tuple[str, int, Any, int]], rnd: Any
) -> None:
    now = [1_700_000_000_000]
    writers = [Writer(did, skew, now) for did, skew in zip(DIDS, skews, strict=True)]
    edits: list[tuple[str, str | None, Any]] = []  # (stamp, field or None for delete, value)
    for kind, a, b, c in plan:
        if kind == "edit":
            record = writers[a].write(b, c)
            if b is None:
                edits.append((record[DELETED], None, None))
            else:
                edits.append((record[CLOCKS][b], b, c))
        elif kind == "deliver" and DIDS[b] in writers[b].records:
            writers[a].receive(DIDS[b], writers[b].records[DIDS[b]])
        elif kind == "tick":
            now[0] += a
    finals = [(w.did, w.records[w.did]) for w in writers if w.did in w.records]
    for writer in writers:
        order = finals[:]
        rnd.shuffle(order)
        for author, record in order:
            writer.receive(author, record)
    rows = [writer.view()[0] for writer in writers]
    assert rows[0] == rows[1] == rows[2]
    # Each field: the value of its latest edit ...
    latest: dict[str, tuple[str, Any]] = {}
    for stamp, field, value in edits:
        if field is not None and (field not in latest or stamp > latest[field][0]):
            latest[field] = (stamp, value)
    # ... unless the latest delete came after it: then the field is gone.
    deleted = max((stamp for stamp, field, _ in edits if field is None), default="")
    alive = {field: value for field, (stamp, value) in latest.items() if stamp > deleted}
    if not alive:
        assert rows[0] is None
    else:
        assert rows[0] == alive


def test_stamps_order_by_clock_then_did_and_the_clock_never_runs_behind() -> None:
    wall = [1_000]
    clock = Hlc(wall_ms=lambda: wall[0])
    first = clock.now("did:plc:zzzz")
    second = clock.now("did:plc:aaaa")  # same millisecond: the counter moves on
    assert first < second and valid_stamp(first) and valid_stamp(second)
    clock.observe("99999999999999.00000/did:plc:other")  # a stamp from a clock far ahead
    assert clock.now("did:plc:aaaa") > "99999999999999.00000"
    a = {**TYPE, "title": "a", CLOCKS: {"title": "00000000001000.00000/did:plc:aaaa"}}
    b = {**TYPE, "title": "b", CLOCKS: {"title": "00000000001000.00000/did:plc:bbbb"}}
    assert merge_shared([a, b], FIELDS)[0] == merge_shared([b, a], FIELDS)[0] == {"title": "b"}
    bad = {**TYPE, "title": "x", CLOCKS: {"title": "yesterday"}, DELETED: 5}
    assert merge_shared([a, bad], FIELDS)[0] == {"title": "a"}  # malformed stamps do not count


def test_the_clock_stays_a_valid_stamp_after_a_far_ahead_one_and_many_edits() -> None:
    """Once a clock far ahead is seen, every edit until the wall clock catches up moves the
    counter: its five digits ran out after 99,999 edits and the next stamp (six digits) was
    invalid, so the edit counted nowhere. Now the clock steps to the next millisecond."""
    clock = Hlc(wall_ms=lambda: 1_000)
    clock.observe("40000000000000.99990/did:plc:ahead")  # a device clock centuries ahead
    stamps = [clock.now("did:plc:mine") for _ in range(20)]
    assert all(valid_stamp(s) for s in stamps)
    assert stamps == sorted(stamps) and len(set(stamps)) == 20
    assert stamps[0] > "40000000000000.99990" and stamps[-1].startswith("40000000000001.")
    mine = {**TYPE, "title": "mine", CLOCKS: {"title": stamps[-1]}}
    ahead = {**TYPE, "title": "ahead", CLOCKS: {"title": "40000000000000.99990/did:plc:zzzz"}}
    assert merge_shared([ahead, mine], FIELDS)[0] == {"title": "mine"}  # the later edit wins
    top = Hlc(wall_ms=lambda: 1_000, state="99999999999999.99999")
    assert top.now("did:plc:mine") == "99999999999999.99999/did:plc:mine"  # nothing above


def test_a_damaged_clock_state_starts_from_zero_and_moves_on() -> None:
    clock = Hlc(wall_ms=lambda: 5_000, state="garbage")
    assert clock.now("did:plc:mine") == "00000000005000.00000/did:plc:mine"


def test_a_shared_keys_records_are_found_without_reading_every_followed_record() -> None:
    """Applying a shared record reads that key's versions; with many followed records held
    (here 5,000 of another collection) it must not walk all of them (it did: a full scan of
    the followed table per shared record)."""
    import json
    import sqlite3

    from atsync.sync._migrate import create_and_upgrade
    from atsync.sync._shared import shared_records

    conn = sqlite3.connect(":memory:", isolation_level=None)
    create_and_upgrade(conn)
    note = "INSERT INTO _atsync_followed VALUES (?, ?, ?, ?, ?, ?, ?)"
    conn.executemany(
        note,
        [
            ("did:plc:a", "app.note", f"r{i:05}", "notes", f"at://did:plc:a/app.note/r{i:05}",
             "bafy", json.dumps({"$type": "app.note", "text": "x"}))
            for i in range(5000)
        ],
    )  # fmt: skip
    doc = json.dumps({"$type": "app.doc", "title": "shared"})
    conn.execute(note, ("did:plc:b", "app.doc", "k1", "docs", "k1", "bafy", doc))
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 100)  # called every 100 virtual machine instructions
    found = shared_records(conn, "docs", "app.doc", "k1")
    conn.set_progress_handler(None, 0)
    assert found == [{"$type": "app.doc", "title": "shared"}]
    assert steps < 10, f"{steps * 100} instructions: the followed records were scanned"

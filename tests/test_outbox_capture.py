"""The capture path's fast paths keep their guarantees.

- ``Outbox.enqueue`` (one statement for the common cases) leaves exactly the tables the
  general, statement-by-statement coalescing rules leave, for any sequence of local writes,
  pushes, in-flight attempts, dead letters and remote states (checked against a reference
  copy of those rules);
- records of trusted bindings (encoded with libipld, no data-model walk) get the CID our
  strict encoder computes, which the PDS's own is checked against elsewhere;
- a record that cannot be pushed still fails its action.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atsync import RecordError
from atsync.app import ActionContext, App, Contract
from atsync.atproto._cbor import cid_for_record
from atsync.db import ModelDB
from atsync.sync import ATSync, Binding, Manual, Transform
from atsync.sync._capture import encode_record, encode_trusted
from atsync.sync._outbox import DEAD, OUTBOX, RECORDS, Outbox, create_sync_tables

COLLECTION = "test.atsync.capture"


# -- enqueue against the reference rules ---------------------------------------------------


def reference_enqueue(
    db: ModelDB, rkey: str, record: str | None, cid: str | None, action_id: str
) -> None:
    """The coalescing rules, one statement at a time (Outbox.enqueue before its fast path)."""
    conn = db.connection
    collection, model, key = COLLECTION, "notes", rkey
    on_pds_cid, seq, queued_op, attempted = conn.execute(
        f"SELECT (SELECT cid FROM {RECORDS} WHERE collection = ?1 AND rkey = ?2), "
        f"o.seq, o.op, o.attempted FROM (SELECT 1) "
        f"LEFT JOIN {OUTBOX} o ON o.collection = ?1 AND o.rkey = ?2",
        (collection, rkey),
    ).fetchone()
    on_pds = on_pds_cid is not None
    conn.execute(f"DELETE FROM {DEAD} WHERE collection = ? AND rkey = ?", (collection, rkey))
    if record is not None and cid == on_pds_cid and not attempted:
        if seq is not None:
            conn.execute(f"DELETE FROM {OUTBOX} WHERE seq = ?", (seq,))
        return
    if seq is None:
        if record is None and not on_pds:
            return
        op = "delete" if record is None else ("update" if on_pds else "create")
        conn.execute(
            f"INSERT INTO {OUTBOX} (collection, rkey, op, record, cid, model, key, "
            "first_action, last_action) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (collection, rkey, op, record, cid, model, key, action_id, action_id),
        )
        return
    if record is None:
        if queued_op == "create" and not attempted and not on_pds:
            conn.execute(f"DELETE FROM {OUTBOX} WHERE seq = ?", (seq,))
            return
        op = "delete"
    elif queued_op == "create":
        op = "create"
    else:
        op = "update" if on_pds or queued_op == "update" else "create"
    conn.execute(
        f"UPDATE {OUTBOX} SET op = ?, record = ?, cid = ?, version = version + 1, "
        "last_action = coalesce(?, last_action), first_action = coalesce(first_action, ?) "
        "WHERE seq = ?",
        (op, record, cid, action_id, action_id, seq),
    )


def open_db() -> ModelDB:
    return ModelDB.open(":memory:", {"notes": {"id": "primary"}}, setup=create_sync_tables)


def snapshot(db: ModelDB) -> tuple[list[Any], list[Any], list[Any]]:
    # seq values may differ (an upsert may use up an AUTOINCREMENT value): compare the order.
    outbox = db.execute(
        f"SELECT collection, rkey, op, record, cid, model, key, version, attempted, attempts, "
        f"sent_op, sent_cid, first_action, last_action FROM {OUTBOX} ORDER BY seq"
    ).fetchall()
    records = db.execute(f"SELECT * FROM {RECORDS} ORDER BY collection, rkey").fetchall()
    dead = db.execute(f"SELECT collection, rkey, op, record, cid FROM {DEAD} ORDER BY seq")
    return outbox, records, dead.fetchall()


STATES = [None, "a", "b", "c"]  # None: deleted
Step = tuple[str, int, int]  # (what, record, state)
steps = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "write", "attempt", "land", "dead", "remote"]),
        st.integers(0, 2),
        st.integers(0, len(STATES) - 1),
    ),
    max_size=40,
)


def apply(db: ModelDB, outbox: Outbox, step: Step, n: int, fast: bool) -> None:
    what, record, state = step
    rkey = f"r{record}"
    if what == "write":
        value = STATES[state]
        body = None if value is None else json.dumps({"$type": COLLECTION, "v": value})
        cid = None if value is None else f"cid-{value}"
        with db.transaction():
            if fast:
                outbox.enqueue(COLLECTION, rkey, "notes", rkey, body, cid, f"a{n:04}")
            else:
                reference_enqueue(db, rkey, body, cid, f"a{n:04}")
        return
    queued = [w for w in outbox.next_batch() if w.rkey == rkey]
    if what == "attempt" and queued:
        outbox.mark_attempted(queued)
    elif what == "land" and queued:
        outbox.mark_attempted(queued)
        outbox.complete(queued)
    elif what == "dead" and queued:
        outbox.dead_letter(queued[0], "InvalidRecord", "refused")
    elif what == "remote":
        # Another device's version (or this very state) is what the PDS now holds.
        value = STATES[state]
        with db.transaction():
            db.connection.execute(
                f"INSERT INTO {RECORDS} (collection, rkey, model, key, cid) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (collection, rkey) DO UPDATE SET cid = excluded.cid",
                (COLLECTION, rkey, "notes", rkey, None if value is None else f"cid-{value}"),
            )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_enqueue_matches_the_reference_coalescing_rules(sequence: list[Step]) -> None:
    fast_db, ref_db = open_db(), open_db()
    fast, ref = Outbox(fast_db), Outbox(ref_db)
    try:
        for n, step in enumerate(sequence):
            apply(fast_db, fast, step, n, fast=True)
            apply(ref_db, ref, step, n, fast=False)
            assert snapshot(fast_db) == snapshot(ref_db), f"after step {n}: {step}"
    finally:
        fast_db.close()
        ref_db.close()


# -- trusted bindings ----------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)  # no lone surrogates
contract = Contract(
    models={
        "tags": {"id": "primary"},
        "notes": {
            "id": "primary",
            "title": "string",
            "body": "string?",
            "n": "integer",
            "done": "boolean?",
            "tag": "@tags?",
            "tags": "@tags[]",
        },
        "loose": {"id": "primary", "data": "json", "score": "float"},
    }
)


@contract.action
def put_note(ctx: ActionContext, note: dict[str, Any]) -> None:
    ctx.db.set("notes", note)


@contract.action
def put_tag(ctx: ActionContext, key: str) -> None:
    ctx.db.set("tags", {"id": key})


@contract.action
def put_loose(ctx: ActionContext, key: str, data: Any, score: float) -> None:
    ctx.db.set("loose", {"id": key, "data": data, "score": score})


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with App.open(tmp_path / "app.db", contract) as app:
        yield app


def notes_sync(app: App) -> ATSync:
    return ATSync(
        app,
        bindings={"notes": Binding(COLLECTION, fields={"n": "count"}, local=["body"])},
        push=Manual(),
    )


def test_only_bindings_of_checked_kinds_are_trusted(app: App) -> None:
    sync = ATSync(
        app,
        bindings={
            "notes": Binding(COLLECTION),
            "loose": Binding("test.atsync.loose", transforms={"score": Transform(str, float)}),
            "tags": Binding("test.atsync.tags"),
        },
        push=Manual(),
    )
    trusted = {name: b.trusted for name, b in sync.bindings.items()}
    assert trusted == {"notes": True, "loose": False, "tags": True}
    transformed = Binding(COLLECTION, transforms={"title": Transform(str.upper, str.lower)})
    assert not transformed.bind(app.model_db.schema.models["notes"]).trusted
    sync.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    title=text,
    body=st.none() | text,
    n=st.integers(-(2**63), 2**63 - 1),
    done=st.none() | st.booleans(),
    tags=st.lists(st.sampled_from(["t1", "t2", "t3"]), max_size=4),
)
def test_trusted_records_get_the_cid_of_the_strict_encoder(
    tmp_path_factory: pytest.TempPathFactory,
    title: str,
    body: str | None,
    n: int,
    done: bool | None,
    tags: list[str],
) -> None:
    path = tmp_path_factory.mktemp("cid") / "app.db"
    with App.open(path, contract) as app:
        sync = notes_sync(app)
        assert sync.bindings["notes"].trusted
        for tag in ("t1", "t2", "t3"):
            app.actions.put_tag(tag)
        note = {"id": "k1", "title": title, "body": body, "n": n, "done": done, "tags": tags}
        note["tag"] = tags[0] if tags else None
        app.actions.put_note(note)
        record_json, cid = app.model_db.execute(
            f"SELECT record, cid FROM {OUTBOX} WHERE rkey = 'k1'"
        ).fetchone()
        record = {"$type": COLLECTION, "title": title, "count": n, "tags": tags}
        if done is not None:
            record["done"] = done
        if tags:
            record["tag"] = tags[0]
        assert json.loads(record_json) == record
        assert cid == cid_for_record(record)
        # Same text and CID as the general (checked) path.
        assert encode_trusted(COLLECTION, "k1", record, None) == encode_record(
            COLLECTION, "k1", record, None
        )
        sync.close()


def test_bad_records_still_fail_their_action(app: App) -> None:
    sync = ATSync(
        app,
        bindings={
            "notes": Binding(COLLECTION),
            "loose": Binding("test.atsync.loose", transforms={"score": Transform(str, float)}),
        },
        push=Manual(),
    )
    with pytest.raises(RecordError, match="not a valid atproto record key"):
        app.actions.put_note({"id": "no spaces", "title": "x", "n": 1, "tags": []})
    with pytest.raises(RecordError, match="byte limit"):
        app.actions.put_note({"id": "big", "title": "x" * 1_000_001, "n": 1, "tags": []})
    with pytest.raises(RecordError, match="float"):
        app.actions.put_loose("k", {"nested": 1.5}, 2.5)
    with pytest.raises(RecordError, match="CIDv1"):  # a json property holds the JSON form
        app.actions.put_loose("k", {"$link": "not-a-cid"}, 2.5)
    assert app.db.count("notes") == 0 and app.db.count("loose") == 0
    assert sync.outbox.counts() == (0, 0, 0)
    app.actions.put_loose("k", {"nested": [1, "two"], "raw": {"$bytes": "AAAA"}}, 2.5)
    record = json.loads(app.model_db.execute(f"SELECT record FROM {OUTBOX}").fetchone()[0])
    assert record == {
        "$type": "test.atsync.loose",
        "data": {"nested": [1, "two"], "raw": {"$bytes": "AAAA"}},  # bytes in the record
        "score": "2.5",
    }
    sync.close()


# -- pruning the sent CIDs ----------------------------------------------------------------


def test_sent_cids_are_pruned_only_for_records_with_nothing_queued() -> None:
    db = open_db()
    outbox = Outbox(db)

    def put(rkey: str, value: str) -> None:
        with db.transaction():
            body = json.dumps({"$type": COLLECTION, "v": value})
            outbox.enqueue(COLLECTION, rkey, "notes", rkey, body, f"cid-{value}", None)

    for rkey in ("landed", "requeued", "in-flight"):
        put(rkey, "a")
    batch = outbox.next_batch()
    outbox.mark_attempted(batch)
    outbox.complete([w for w in batch if w.rkey != "in-flight"])
    put("requeued", "b")  # changed after it landed: queued again
    assert all(outbox.ever_sent(COLLECTION, r, "cid-a") for r in ("landed", "requeued"))

    assert outbox.prune_settled() == 1
    # Nothing queued for it: forgotten. Queued again or still in flight: every CID kept,
    # so an earlier version landing late is still recognised as ours.
    assert not outbox.ever_sent(COLLECTION, "landed", "cid-a")
    assert outbox.ever_sent(COLLECTION, "requeued", "cid-a")
    assert outbox.ever_sent(COLLECTION, "in-flight", "cid-a")
    assert outbox.prune_settled() == 0

    rest = outbox.next_batch()
    outbox.mark_attempted(rest)
    outbox.complete(rest)
    assert outbox.prune_settled(limit=2) == 2
    assert outbox.prune_settled(limit=2) == 1
    assert db.execute("SELECT count(*) FROM _atsync_sent").fetchone()[0] == 0
    db.close()

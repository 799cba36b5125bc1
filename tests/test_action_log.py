"""The action log's hash chain and seals: verification, tampering, crash tails."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from atsync._errors import TransactionError, VerificationError
from atsync.app import REMOTE_ACTION, ActionContext, App, Contract
from atsync.atproto._crypto import verify_signature

contract = Contract(models={"items": {"id": "primary", "v": "integer"}})


@contract.action
def put(ctx: ActionContext, key: str, v: int) -> None:
    ctx.db.set("items", {"id": key, "v": v})


def fill(path: Path, seal_interval: float = 0.0) -> None:
    with App.open(path, contract, seal_interval=seal_interval) as app:
        for i in range(5):
            app.actions.put(f"k{i}", i)
        with app.batch():
            for i in range(5, 9):
                app.actions.put(f"k{i}", i)


def test_every_transaction_ends_in_a_link_and_seals_verify(tmp_path: Path) -> None:
    fill(tmp_path / "l.db")
    with App.open(tmp_path / "l.db", contract) as app:
        entries = list(app.log)
        assert app.log.verify() == 9
        links = [e for e in entries if e.hash is not None]
        assert len(links) == 6  # five single actions and one batch
        for link in links:  # seal_interval=0: every link sealed, by the app's key
            assert link.signer == app.signer.key_did
            assert verify_signature(link.signer, link.hash, link.signature)


def test_seal_interval_signs_less_often_but_close_seals_the_tail(tmp_path: Path) -> None:
    fill(tmp_path / "l.db", seal_interval=3600)
    raw = sqlite3.connect(tmp_path / "l.db")
    sealed = raw.execute("select count(*) from _atsync_log where sig is not null").fetchone()[0]
    assert sealed == 1  # only the tail, at close
    with App.open(tmp_path / "l.db", contract) as app:
        assert app.log.verify() == 9


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        (
            "update _atsync_log set args = '[[\"k1\",100],{}]' "
            "where id = (select min(id) from _atsync_log)",
            "does not match",
        ),
        ("delete from _atsync_log where id = (select min(id) from _atsync_log)", "does not match"),
        ("update _atsync_log set author = 'did:plc:mallory'", "does not match"),
        ("update _atsync_log set sig = zeroblob(64) where sig is not null", "bad signature"),
        (
            "update _atsync_log set signer = "
            "'did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme' where sig is not null",
            "bad signature",
        ),
    ],
)
def test_tampering_is_detected(tmp_path: Path, sql: str, message: str) -> None:
    fill(tmp_path / "l.db")
    raw = sqlite3.connect(tmp_path / "l.db")
    raw.execute(sql)
    raw.commit()
    with (
        App.open(tmp_path / "l.db", contract) as app,
        pytest.raises(VerificationError, match=message),
    ):
        app.log.verify()


def test_unsealed_tail_is_reported_and_sealed_on_open(tmp_path: Path) -> None:
    fill(tmp_path / "l.db")
    raw = sqlite3.connect(tmp_path / "l.db")
    raw.execute(
        "update _atsync_log set sig = null, signer = null "
        "where id = (select max(id) from _atsync_log)"
    )
    raw.commit()
    with App.open(tmp_path / "l.db", contract) as app:  # opening seals what a crash left
        assert app.log.verify() == 9


def test_log_reads_page_and_filter(tmp_path: Path) -> None:
    with App.open(tmp_path / "p.db", contract) as app:
        with app.batch():
            for i in range(1203):
                app.actions.put(f"k{i}", i)
        entries = list(app.log.entries())
        assert len(entries) == 1203 == len(app.log)
        assert [e.args for e in app.log.entries(after=entries[1199].id)] == [
            ["k1200", 1200],
            ["k1201", 1201],
            ["k1202", 1202],
        ]
        assert len(list(app.log.entries(limit=501))) == 501
        assert list(app.log.entries(name="other")) == []


remote_contract = Contract(
    models={"files": {"id": "primary", "name": "string", "data": "bytes?", "note": "string?"}}
)


@remote_contract.action
def annotate(ctx: ActionContext, key: str, note: str) -> None:
    ctx.db.update("files", {"id": key, "note": note})


def test_remote_changes_are_logged_chained_and_replayed(tmp_path: Path) -> None:
    did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
    with App.open(tmp_path / "r.db", remote_contract, seal_interval=0) as app:
        db = app.model_db
        with db.transaction():
            db.set("files", {"id": "a", "name": "a.bin", "data": b"\x00\xff"})
            db.set("files", {"id": "b", "name": "b.bin"})
            entry_id = app.log_remote(
                did,
                [
                    ("files", "a", {"id": "a", "name": "a.bin", "data": b"\x00\xff"}),
                    ("files", "b", {"id": "b", "name": "b.bin"}),
                ],
            )
        app.actions.annotate("a", "local note")  # a local-only property, set here
        with db.transaction():
            db.update("files", {"id": "a", "name": "renamed"})
            db.delete("files", "b")
            app.log_remote(did, [("files", "a", {"id": "a", "name": "renamed"})])
            app.log_remote(did, [("files", "b", None)])
            assert app.log_remote(did, []) is None
        entry = app.log.get(entry_id or "")
        assert entry is not None and (entry.name, entry.author) == (REMOTE_ACTION, did)
        assert entry.args[0][0] == [
            "files",
            "a",
            {"id": "a", "name": "a.bin", "data": {"$bytes": "AP8="}},
        ]
        state = [dict(r) for r in app.db.query("files")]
        assert state == [{"id": "a", "name": "renamed", "data": b"\x00\xff", "note": "local note"}]
        assert app.log.verify() == 4
        assert app.rebuild() == 4
        assert [dict(r) for r in app.db.query("files")] == state
        with pytest.raises(TransactionError, match="inside the transaction"):
            app.log_remote(did, [("files", "a", None)])

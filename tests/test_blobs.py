"""Blobs beside the database: content-addressed (the CID a PDS gives them), written whole or
not at all, held by ``blob`` properties as references, replayed by a rebuild; and refused by a
binding until their sync is built."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from atsync._errors import NotFoundError, SchemaError, ValidationError
from atsync.app import ActionContext, App, Contract
from atsync.atproto import CID
from atsync.atproto._cbor import CODEC_RAW
from atsync.db import BlobRef, ModelDB
from atsync.sync import ATSync, Binding, Manual

MODELS = {"notes": {"id": "primary", "title": "string", "image": "blob?"}}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def test_a_blob_is_stored_once_under_its_cid(tmp_path: Path) -> None:
    with ModelDB.open(tmp_path / "a.db", MODELS) as db:
        ref = db.blobs.put(PNG, "image/png")
        assert ref == BlobRef(str(CID.for_data(PNG, codec=CODEC_RAW)), "image/png", len(PNG))
        assert db.blobs.put(PNG, "image/png") == ref  # the same bytes: nothing new written
        stored = sorted((tmp_path / "a.db.blobs").iterdir())
        assert [p.name for p in stored] == [ref.cid]  # no temporary file left behind
        assert db.blobs.read(ref) == PNG and db.blobs.has(ref)
        with db.blobs.open(ref.cid) as f:
            assert f.read(8) == PNG[:8]
        db.set("notes", {"id": "n1", "title": "with an image", "image": ref})
        assert db.get("notes", "n1") == {"id": "n1", "title": "with an image", "image": ref}
        raw = db.execute("SELECT image FROM notes").fetchone()[0]
        assert raw == f'{{"cid":"{ref.cid}","mimeType":"image/png","size":{len(PNG)}}}'
        other = tmp_path / "photo.jpg"
        other.write_bytes(b"\xff\xd8 a jpeg")
        assert db.blobs.put_file(other, "image/jpeg").size == len(b"\xff\xd8 a jpeg")


def test_bad_blobs_say_why(tmp_path: Path) -> None:
    with ModelDB.open(tmp_path / "a.db", MODELS) as db:
        with pytest.raises(ValidationError, match="MIME type"):
            db.blobs.put(b"x", "png")
        with pytest.raises(ValidationError, match="expected a BlobRef"):
            db.set("notes", {"id": "n1", "title": "t", "image": {"cid": "bafy"}})
        with pytest.raises(NotFoundError, match="not in the store"):
            db.blobs.read(BlobRef(str(CID.for_data(b"absent", codec=CODEC_RAW)), "a/b", 6))
        with pytest.raises(NotFoundError):
            db.blobs.read("../a.db")


def test_an_in_memory_database_keeps_its_blobs_in_memory() -> None:
    db = ModelDB.open(":memory:", MODELS)
    ref = db.blobs.put(b"hello", "text/plain")
    assert db.blobs.read(ref) == b"hello"
    db.close()


contract = Contract(models=MODELS)


@contract.action
def attach(ctx: ActionContext, key: str, title: str, png_base64: str) -> None:
    ref = ctx.db.blobs.put(base64.b64decode(png_base64), "image/png")
    ctx.db.set("notes", {"id": key, "title": title, "image": ref})


def test_actions_put_blobs_and_a_rebuild_replays_them(tmp_path: Path) -> None:
    with App.open(tmp_path / "app.db", contract) as app:
        app.actions.attach("n1", "holiday", base64.b64encode(PNG).decode())
        note = app.db.get("notes", "n1")
        assert note is not None and app.blobs.read(note["image"]) == PNG
        state = [dict(r) for r in app.db.query("notes")]
        assert app.rebuild() == 1 and [dict(r) for r in app.db.query("notes")] == state


def test_a_blob_property_does_not_sync_yet(tmp_path: Path) -> None:
    with App.open(tmp_path / "app.db", contract) as app:
        with pytest.raises(SchemaError, match="blobs do not sync yet"):
            ATSync(app, bindings={"notes": Binding("com.example.note")}, push=Manual())
        sync = ATSync(  # kept on the device: fine
            app, bindings={"notes": Binding("com.example.note", local=["image"])}, push=Manual()
        )
        sync.close()

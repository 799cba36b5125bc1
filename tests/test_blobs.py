"""Blobs beside the database: content-addressed (the CID a PDS gives them), written whole or
not at all, held by ``blob`` properties as references, replayed by a rebuild; turned into blob
objects by a binding and checked in the action against the PDS's limits (sync against the real
PDS: test_blob_sync.py)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from atsync._errors import NotFoundError, RecordError, ValidationError, VerificationError
from atsync.app import ActionContext, App, Contract
from atsync.atproto import CID, data_to_json
from atsync.atproto._cbor import CODEC_RAW
from atsync.db import BlobRef, ModelDB
from atsync.sync import ATSync, Binding, Manual
from atsync.sync._blobsync import blob_refs

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


PHOTO_LEXICON = {
    "lexicon": 1,
    "id": "com.example.note",
    "defs": {
        "main": {
            "type": "record",
            "key": "any",
            "record": {
                "type": "object",
                "required": ["title"],
                "properties": {
                    "title": {"type": "string"},
                    "image": {"type": "blob", "accept": ["image/*"], "maxSize": 2000},
                },
            },
        }
    },
}


def test_a_blob_property_becomes_a_blob_object_and_back() -> None:
    binding = Binding("com.example.note").bind(contract.schema.models["notes"])
    assert binding.blob_fields == (("image", "image"),)
    ref = BlobRef(str(CID.for_data(PNG, codec=CODEC_RAW)), "image/png", len(PNG))
    record = binding.to_record({"id": "n1", "title": "t", "image": ref})
    assert record["image"] == {
        "$type": "blob", "ref": CID.parse(ref.cid), "mimeType": "image/png", "size": len(PNG)
    }  # fmt: skip
    assert binding.from_record(record, "n1")["image"] == ref
    as_json = {**record["image"], "ref": {"$link": ref.cid}}  # the JSON form reads back too
    assert binding.from_record({**record, "image": as_json}, "n1")["image"] == ref
    with pytest.raises(RecordError, match="not a blob object"):  # legacy form: no size
        binding.from_record({**record, "image": {"cid": ref.cid, "mimeType": "image/png"}}, "n1")
    queued = json.dumps({"a": [{"b": data_to_json(record["image"])}], "c": {"$link": ref.cid}})
    assert blob_refs(queued.replace(" ", "")) == [(ref.cid, "image/png")]  # nested, links not
    assert blob_refs('{"$type":"com.example.note","title":"no blob"}') == []


@contract.action
def attach_ref(ctx: ActionContext, key: str, ref_json: dict[str, object]) -> None:
    ctx.db.set("notes", {"id": key, "title": "t", "image": BlobRef.from_json(ref_json)})


@contract.action
def attach_bytes(ctx: ActionContext, key: str, data_base64: str, mime: str) -> None:
    ref = ctx.db.blobs.put(base64.b64decode(data_base64), mime)
    ctx.db.set("notes", {"id": key, "title": "t", "image": ref})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_blob_the_pds_would_refuse_fails_its_action_and_nothing_is_queued(
    tmp_path: Path,
) -> None:
    with App.open(tmp_path / "app.db", contract) as app:
        sync = ATSync(
            app, bindings={"notes": Binding("com.example.note")}, lexicons=[PHOTO_LEXICON],
            push=Manual(), max_blob_size=1500,
        )  # fmt: skip
        try:
            cases = [
                (b"\x89PNG" + bytes(1600), "image/png", "over the PDS's limit of 1,500"),
                (b"%PDF-1.4", "application/pdf", "not accepted"),  # the Lexicon's accept
            ]
            for data, mime, why in cases:
                with pytest.raises(RecordError, match=why):
                    app.actions.attach_bytes("n1", _b64(data), mime)
            absent = BlobRef(str(CID.for_data(b"elsewhere", codec=CODEC_RAW)), "image/png", 9)
            with pytest.raises(RecordError, match="not in this database's blob store"):
                app.actions.attach_ref("n2", absent.to_json())
            stored = app.blobs.put(b"tiny png", "image/png")
            lying = BlobRef(stored.cid, "image/png", 3)
            with pytest.raises(RecordError, match="says 3 bytes"):
                app.actions.attach_ref("n3", lying.to_json())
            assert app.db.count("notes") == 0 and sync.outbox.counts() == (0, 0, 0)
            app.actions.attach_bytes("n4", _b64(b"\x89PNG ok"), "image/png")
            assert sync.outbox.counts()[0] == 1
            with pytest.raises(ValidationError, match="blobs= takes"):
                ATSync(app, bindings={}, blobs="sometimes")  # type: ignore[arg-type]
        finally:
            sync.close()


def test_a_blob_its_lexicon_refuses_fails_its_action_and_nothing_is_queued(
    tmp_path: Path,
) -> None:
    # The PDS's limit (5 MiB by default) is far above the Lexicon's maxSize of 2000 bytes:
    # what refuses these is the Lexicon, in the action, before anything is queued.
    with App.open(tmp_path / "app.db", contract) as app:
        sync = ATSync(
            app, bindings={"notes": Binding("com.example.note")}, lexicons=[PHOTO_LEXICON],
            push=Manual(),
        )  # fmt: skip
        try:
            small = b"\x89PNG small"
            app.actions.attach_bytes("n1", _b64(small), "image/png")
            before = (app.db.get("notes", "n1"), sync.outbox.listing())
            assert sync.outbox.counts() == (1, 0, 0)
            cases = [
                (b"\x89PNG" + bytes(2000), "image/png", "larger than maxSize 2000 (2004 bytes)"),
                (b"%PDF-1.4", "application/pdf", "mimeType 'application/pdf' not accepted"),
                (
                    b"GIF89a",
                    "text/plain",
                    "mimeType 'text/plain' not accepted (accept: ['image/*'])",
                ),
            ]
            for key in ("n1", "n2"):  # replacing a row's blob, and a new row
                for data, mime, why in cases:
                    with pytest.raises(RecordError, match=re.escape(f"$.image: blob {why}")):
                        app.actions.attach_bytes(key, _b64(data), mime)
            # Nothing changed: the row keeps its blob, the queue holds only its first write.
            assert (app.db.get("notes", "n1"), sync.outbox.listing()) == before
            assert app.db.count("notes") == 1 and sync.outbox.counts() == (1, 0, 0)
            # At the limit, and of an accepted type, is fine.
            app.actions.attach_bytes("n2", _b64(b"\x89PNG" + bytes(1996)), "image/gif")
            assert sync.outbox.counts() == (2, 0, 0)
        finally:
            sync.close()


def test_blobs_nothing_references_any_more_are_collected_after_a_grace_period(
    tmp_path: Path,
) -> None:
    with App.open(tmp_path / "app.db", contract) as app:
        sync = ATSync(app, bindings={"notes": Binding("com.example.note")}, push=Manual())
        try:
            kept = b"\x89PNG kept by a row"
            app.actions.attach_bytes("n1", _b64(kept), "image/png")
            app.actions.attach_bytes("n2", _b64(b"\x89PNG replaced"), "image/png")
            app.actions.attach_bytes("n2", _b64(b"\x89PNG the new one"), "image/png")
            stray = app.blobs.put(b"put, never used", "text/plain")
            assert len(app.blobs.cids()) == 4
            assert sync.collect_blobs() == (0, 0)  # all of them younger than an hour
            removed, freed = sync.collect_blobs(older_than=0)
            assert removed == 2 and freed == len(b"\x89PNG replaced") + stray.size
            rows = {r["id"]: r["image"] for r in app.db.query("notes")}
            assert sorted(app.blobs.cids()) == sorted(ref.cid for ref in rows.values())
            assert app.blobs.read(rows["n1"]) == kept
            # Storing bytes that are there already makes them young again.
            again = app.blobs.put(b"put, never used", "text/plain")
            path = tmp_path / "app.db.blobs" / again.cid
            os.utime(path, (1, 1))
            assert app.blobs.put(b"put, never used", "text/plain") == again
            assert sync.collect_blobs(older_than=60) == (0, 0)
        finally:
            sync.close()


def test_the_blobs_command_counts_and_collects(tmp_path: Path) -> None:
    with App.open(tmp_path / "app.db", contract) as app:
        sync = ATSync(app, bindings={"notes": Binding("com.example.note")}, push=Manual())
        app.actions.attach_bytes("n1", _b64(b"\x89PNG in a row"), "image/png")
        app.blobs.put(b"nobody's", "text/plain")
        sync.close()
    command = [sys.executable, "-m", "atsync", "blobs", "--db", str(tmp_path / "app.db")]
    shown = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert shown == "2 blobs, 21 bytes; 1 referenced by nothing\n"
    done = subprocess.run(
        [*command, "--collect", "--older-than", "0"], capture_output=True, text=True, check=True
    ).stdout
    assert done.endswith("collected 1 blobs, 8 bytes freed\n")
    assert len(list((tmp_path / "app.db.blobs").iterdir())) == 1


def test_a_blob_damaged_on_disk_is_refused_by_read_and_repaired_by_put(tmp_path: Path) -> None:
    with ModelDB.open(tmp_path / "d.db", {"notes": {"id": "primary"}}) as db:
        data = b"the original bytes of a photo" * 100
        ref = db.blobs.put(data, "image/jpeg")
        path = tmp_path / "d.db.blobs" / ref.cid
        path.chmod(0o644)
        path.write_bytes(b"X" + data[1:])  # same size, one byte changed
        with pytest.raises(VerificationError, match=f"blob {ref.cid} is damaged in the store"):
            db.blobs.read(ref)
        with db.blobs.open(ref) as raw:  # open() gives the bytes as they are
            assert raw.read(1) == b"X"
        assert db.blobs.put(data, "image/jpeg") == ref  # the right bytes again: repaired
        assert db.blobs.read(ref) == data


def test_put_file_streams_a_large_file_and_gives_the_same_reference_as_put(
    tmp_path: Path,
) -> None:
    """A 24 MiB file is stored without being held in memory (it was read whole, then copied
    again: three times its size)."""
    import tracemalloc

    big = tmp_path / "video.mp4"
    with big.open("wb") as out:
        for i in range(24):
            out.write(bytes([i]) * (1024 * 1024))
    with ModelDB.open(tmp_path / "v.db", {"notes": {"id": "primary"}}) as db:
        tracemalloc.start()
        try:
            ref = db.blobs.put_file(big, "video/mp4")
            again = db.blobs.put_file(big, "video/mp4")  # there already: checked, kept
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB while storing 24 MiB"
        data = big.read_bytes()
        assert (
            ref
            == again
            == BlobRef(str(CID.for_data(data, codec=CODEC_RAW)), "video/mp4", len(data))
        )
        assert db.blobs.put(data, "video/mp4") == ref
        assert db.blobs.read(ref) == data
        assert [p.name for p in (tmp_path / "v.db.blobs").iterdir()] == [ref.cid]
        # Damaged on disk since: the file's bytes are stored again, whole.
        stored = tmp_path / "v.db.blobs" / ref.cid
        stored.chmod(0o644)
        stored.write_bytes(b"X" + data[1:])
        assert db.blobs.put_file(big, "video/mp4") == ref
        assert db.blobs.read(ref) == data
        with pytest.raises(ValidationError, match="MIME type"):
            db.blobs.put_file(big, "mp4")
        with pytest.raises(FileNotFoundError):
            db.blobs.put_file(tmp_path / "absent.png", "image/png")
        assert [p.name for p in (tmp_path / "v.db.blobs").iterdir()] == [ref.cid]


def test_collect_removes_what_a_store_interrupted_by_a_crash_left(tmp_path: Path) -> None:
    with ModelDB.open(tmp_path / "c.db", {"notes": {"id": "primary"}}) as db:
        ref = db.blobs.put(b"kept", "text/plain")
        store = tmp_path / "c.db.blobs"
        stale, fresh = store / ".incoming-crashed", store / ".incoming-in-progress"
        stale.write_bytes(b"half a blob")
        fresh.write_bytes(b"being written")
        os.utime(stale, (1, 1))
        assert db.blobs.collect({ref.cid}, older_than=60) == (0, len(b"half a blob"))
        assert sorted(p.name for p in store.iterdir()) == sorted([ref.cid, fresh.name])


def test_a_download_written_where_receiving_says_is_adopted_without_a_copy(
    tmp_path: Path,
) -> None:
    data = b"downloaded " * 1000
    for path in (tmp_path / "r.db", ":memory:"):
        with ModelDB.open(path, {"notes": {"id": "primary"}}) as db:
            with db.blobs.receiving() as incoming:
                incoming.write_bytes(data)  # as a download would
                inode = incoming.stat().st_ino
                ref = db.blobs.adopt(incoming, "text/plain")
            assert ref == BlobRef(str(CID.for_data(data, codec=CODEC_RAW)), "text/plain", len(data))
            assert db.blobs.read(ref) == data and db.blobs.cids() == [ref.cid]
            if db.blobs.directory is not None:
                assert (db.blobs.directory / ref.cid).stat().st_ino == inode  # renamed
                with db.blobs.receiving() as incoming:
                    incoming.write_bytes(b"a download that failed halfway")
                assert [p.name for p in db.blobs.directory.iterdir()] == [ref.cid]

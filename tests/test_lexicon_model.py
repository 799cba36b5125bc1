"""Models derived from record Lexicons, and hand-written models checked against them: the
mapping of every Lexicon type, clear errors before anything runs, a field both required and
nullable written as an explicit null, and a derived model that round-trips records (links,
bytes, nested objects and such nulls included) through the real PDS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync._errors import SchemaError
from atsync.app import ActionContext, App, Contract
from atsync.atproto import CID, IdentityResolver, XrpcClient, login
from atsync.db import BlobRef
from atsync.lexicon import LexiconSet, model_from_lexicon
from atsync.sync import ATSync, Binding, Immediate, Manual, Transform

NOTES = Path(__file__).parent / "lexicon_cases" / "notes"
NSID = "com.example.notes.note"


@pytest.fixture(scope="module")
def lexicons() -> LexiconSet:
    return LexiconSet.load(NOTES)


def test_every_lexicon_type_has_its_property(lexicons: LexiconSet) -> None:
    assert model_from_lexicon(lexicons, NSID) == {
        "id": "primary",
        "title": "string",  # required
        "body": "string?",  # nullable
        "tags": "json?",  # array
        "pinned": "boolean?",
        "priority": "integer?",
        "rating": "integer?",
        "visibility": "json?",  # ref
        "langs": "json?",
        "embed": "json?",  # union
        "outline": "json?",
        "attachment": "blob?",  # a BlobRef
        "checksum": "bytes?",
        "previous": "json?",  # cid-link, {"$link": …}
        "extra": "json?",  # unknown
        "author": "string?",  # format did
        "createdAt": "string",  # format datetime, required
    }
    contract = Contract(models={"notes": model_from_lexicon(lexicons, NSID, key="rkey")})
    assert contract.schema.models["notes"].primary_key == "rkey"


def test_what_cannot_be_derived_says_why(lexicons: LexiconSet) -> None:
    with pytest.raises(SchemaError, match="primary key's name"):
        model_from_lexicon(lexicons, NSID, key="title")
    with pytest.raises(SchemaError, match="not a record"):
        model_from_lexicon(lexicons, "com.example.notes.defs")
    with pytest.raises(SchemaError, match="no Lexicon document"):
        model_from_lexicon(lexicons, "com.example.missing")


@pytest.mark.parametrize(
    ("model", "transforms", "error"),
    [
        ({"id": "primary", "title": "string"}, {}, "requires field 'createdAt'"),
        (
            {"id": "primary", "title": "integer", "createdAt": "string"},
            {},
            "notes.title is integer, which cannot hold the Lexicon's string field 'title'",
        ),
        (
            {"id": "primary", "title": "string", "createdAt": "string", "checksum": "string?"},
            {},
            "cannot hold the Lexicon's bytes field 'checksum'",
        ),
        # A transform converts its own values: not compared.
        ({"id": "primary", "title": "integer", "createdAt": "string"}, {"title": "t"}, None),
    ],
)
def test_a_hand_written_model_is_checked_when_the_binding_is_made(
    lexicons: LexiconSet,
    tmp_path: Path,
    model: dict[str, str],
    transforms: dict[str, str],
    error: str | None,
) -> None:
    with App.open(tmp_path / "a.db", Contract(models={"notes": model})) as app:
        binding = Binding(
            NSID, transforms={p: Transform(str, int) for p in transforms}, direction="both"
        )
        if error is None:
            ATSync(app, bindings={"notes": binding}, lexicons=lexicons, push=Manual()).close()
            return
        with pytest.raises(SchemaError, match=error):
            ATSync(app, bindings={"notes": binding}, lexicons=lexicons, push=Manual())


DRAFT = "com.example.drafts.draft"
DRAFTS = LexiconSet(
    [
        {
            "lexicon": 1,
            "id": DRAFT,
            "defs": {
                "main": {
                    "type": "record",
                    "key": "any",
                    "record": {
                        "type": "object",
                        "required": ["title", "body"],
                        "nullable": ["body", "note"],  # body must be there, but may be null
                        "properties": {
                            "title": {"type": "string"},
                            "body": {"type": "string"},
                            "note": {"type": "string"},
                        },
                    },
                }
            },
        }
    ]
)

contract = Contract(
    models={
        "notes": model_from_lexicon(LexiconSet.load(NOTES), NSID),
        "drafts": model_from_lexicon(DRAFTS, DRAFT),
    }
)


@contract.action
def write(
    ctx: ActionContext,
    note: dict[str, Any],
    checksum: str,
    attachment: dict[str, Any] | None = None,
) -> None:
    blob = None if attachment is None else BlobRef.from_json(attachment)
    ctx.db.set("notes", {**note, "checksum": bytes.fromhex(checksum), "attachment": blob})


@contract.action
def draft(ctx: ActionContext, row: dict[str, Any]) -> None:
    ctx.db.set("drafts", row)


def test_a_required_nullable_field_is_written_as_null(tmp_path: Path) -> None:
    assert model_from_lexicon(DRAFTS, DRAFT) == {
        "id": "primary", "title": "string", "body": "string?", "note": "string?"
    }  # fmt: skip
    # Strings only: the binding's fast path; a transform takes the general one.
    for binding in (Binding(DRAFT), Binding(DRAFT, transforms={"title": Transform(str, str)})):
        with App.open(tmp_path / f"{binding.transforms!r}.db", contract) as app:
            sync = ATSync(app, bindings={"drafts": binding}, lexicons=DRAFTS, push=Manual())
            try:
                app.actions.draft({"id": "d1", "title": "t"})
                app.actions.draft({"id": "d2", "title": "t", "body": "b", "note": "n"})
                queued = dict(
                    app.model_db.execute("select rkey, record from _atsync_outbox").fetchall()
                )
                # body written as null (the Lexicon refuses a record without it); note is not
                # required, so its None is left out.
                assert json.loads(queued["d1"]) == {"$type": DRAFT, "title": "t", "body": None}
                assert json.loads(queued["d2"]) == {
                    "$type": DRAFT, "title": "t", "body": "b", "note": "n"
                }  # fmt: skip
                bound = sync._bindings["drafts"]
                assert bound.trusted == (not binding.transforms)
                record = bound.to_record({"id": "x", "title": "t"})
                assert record == {"$type": DRAFT, "title": "t", "body": None}
                # A null in a record reads back as None, like an absent field.
                assert bound.from_record(record, "x") == {
                    "id": "x", "title": "t", "body": None, "note": None
                }  # fmt: skip
            finally:
                sync.close()
    # Bound without the Lexicon, nothing asks for the null: the field is left out.
    plain = Binding(DRAFT).bind(contract.schema.models["drafts"])
    assert plain.to_record({"id": "x", "title": "t"}) == {"$type": DRAFT, "title": "t"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_derived_model_round_trips_through_the_pds(
    dev_pds: Any, tmp_path: Path, lexicons: LexiconSet
) -> None:
    account = dev_pds.accounts["alice.test"]
    session = await login(account.did, account.password, dev_pds.pds_url)
    link = str(CID.for_data(b"the previous version"))
    note = {
        "id": "3kdgcbl2j4x2a",
        "title": "from a Lexicon",
        "createdAt": "2026-11-30T12:00:00.000Z",
        "tags": ["a", "b"],
        "visibility": "com.example.notes.defs#public",  # a ref to a string
        "embed": {"$type": f"{NSID}#link", "uri": "https://example.com/"},  # a union
        "previous": {"$link": link},  # a link, in its JSON form
        "priority": 2,
    }
    both = LexiconSet([*lexicons, *DRAFTS])
    options: dict[str, Any] = {"session": session, "lexicons": both}
    bindings = {"notes": Binding(NSID), "drafts": Binding(DRAFT)}
    async with IdentityResolver(plc_url=dev_pds.plc_url, allow_insecure_localhost=True) as r:
        with App.open(tmp_path / "a.db", contract) as a, App.open(tmp_path / "b.db", contract) as b:
            sync_a = ATSync(a, bindings=bindings, push=Immediate(),
                            pull=Manual(), identity=r, **options)  # fmt: skip
            sync_b = ATSync(b, bindings=bindings, push=Manual(),
                            pull=Manual(), identity=r, **options)  # fmt: skip
            async with sync_a, sync_b:
                # The Lexicon's blob field is a blob property of the derived model.
                props = {p.name: p.kind for p in contract.schema.models["notes"].properties}
                assert props["attachment"] == "blob"
                text = b"an attachment, checked against the Lexicon's accept and maxSize\n"
                ref = a.blobs.put(text, "text/plain")
                a.actions.write(note, bytes(range(32)).hex(), ref.to_json())
                a.actions.draft({"id": "3kdgcbl2j4x2b", "title": "no body yet"})
                with anyio.fail_after(30):
                    await sync_a.wait_for_idle()
                    await sync_b.wait_pulled()
                assert sync_a.status.failed == 0 and sync_b.status.rejected == 0
                got = b.db.get("notes", note["id"])
                assert got is not None
                held = {k: v for k, v in dict(got).items() if v is not None}
                assert held == {**note, "checksum": bytes(range(32)), "attachment": ref}
                assert b.blobs.read(ref) == text  # uploaded by A, fetched by B, by its CID
                # The required, nullable body is on the PDS as null, and back as None.
                async with XrpcClient(session=session) as client:
                    on_pds = await client.get_record(session.did, DRAFT, "3kdgcbl2j4x2b")
                assert on_pds.value == {"$type": DRAFT, "title": "no body yet", "body": None}
                assert b.db.get("drafts", "3kdgcbl2j4x2b") == {
                    "id": "3kdgcbl2j4x2b", "title": "no body yet", "body": None, "note": None
                }  # fmt: skip
            for sync in (sync_a, sync_b):
                sync.close()

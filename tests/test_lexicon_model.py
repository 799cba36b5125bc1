"""Models derived from record Lexicons, and hand-written models checked against them: the
mapping of every Lexicon type, clear errors before anything runs, and a derived model that
round-trips records (links, bytes and nested objects included) through the real PDS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync._errors import SchemaError
from atsync.app import ActionContext, App, Contract
from atsync.atproto import CID, IdentityResolver, login
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


contract = Contract(models={"notes": model_from_lexicon(LexiconSet.load(NOTES), NSID)})


@contract.action
def write(ctx: ActionContext, note: dict[str, Any], checksum: str) -> None:
    ctx.db.set("notes", {**note, "checksum": bytes.fromhex(checksum)})


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
    options: dict[str, Any] = {"session": session, "lexicons": lexicons}
    async with IdentityResolver(plc_url=dev_pds.plc_url, allow_insecure_localhost=True) as r:
        with App.open(tmp_path / "a.db", contract) as a, App.open(tmp_path / "b.db", contract) as b:
            sync_a = ATSync(a, bindings={"notes": Binding(NSID)}, push=Immediate(),
                            pull=Manual(), identity=r, **options)  # fmt: skip
            sync_b = ATSync(b, bindings={"notes": Binding(NSID)}, push=Manual(),
                            pull=Manual(), identity=r, **options)  # fmt: skip
            async with sync_a, sync_b:
                a.actions.write(note, bytes(range(32)).hex())
                with anyio.fail_after(30):
                    await sync_a.wait_for_idle()
                    await sync_b.wait_pulled()
                assert sync_a.status.failed == 0 and sync_b.status.rejected == 0
                got = b.db.get("notes", note["id"])
                assert got is not None
                held = {k: v for k, v in dict(got).items() if v is not None}
                assert held == {**note, "checksum": bytes(range(32))}
            for sync in (sync_a, sync_b):
                sync.close()

"""Record validation: the interop vectors, a case per constraint, formats, refs, and generated
records (Hypothesis) that must pass."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atsync._errors import RecordError, SchemaError
from atsync.atproto._cbor import CID, CODEC_RAW, data_from_json, data_to_json
from atsync.lexicon._set import LexiconSet
from atsync.lexicon._validate import check_record_key, validate_record, validate_record_json
from lexicon_records_gen import SYNTAX, records

HERE = Path(__file__).parent
VECTORS = HERE / "interop" / "lexicon"
CASES = HERE / "lexicon_cases"
CATALOG = LexiconSet.load(VECTORS / "catalog")
NOTES = LexiconSet.load(CASES / "notes")
DEMO = "example.lexicon.record"
NOTE = "com.example.notes.note"
RAW = CID.for_data(b"a blob", CODEC_RAW)


def _load(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((VECTORS / name).read_text())
    return data


def note(**fields: Any) -> dict[str, Any]:
    return {"$type": NOTE, "title": "t", "createdAt": "2024-05-01T12:00:00.000Z", **fields}


# --- interop vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", _load("record-data-valid.json"), ids=lambda c: c["name"])
def test_valid_vectors_pass(case: dict[str, Any]) -> None:
    value = validate_record_json(CATALOG, DEMO, case["data"], rkey=case["rkey"])
    assert value == data_from_json(case["data"])
    assert validate_record(CATALOG, DEMO, value, rkey=case["rkey"]) is value


INVALID_REASONS = {
    "invalid integer field": "$.integer: expected an integer, got string",
    "invalid non-nullable string field": "$.string: null is not allowed here",
    "invalid bytes field": "$.bytes: expected bytes, got string",
    "invalid bytes: empty object": "$.bytes: expected bytes, got object",
    "invalid bytes: wrong type": "$.bytes: expected bytes, got object",
    "invalid cid-link field": "$.cid-link: expected a CID link, got string",
    "invalid array": "$.array: expected an array, got integer",
    "object nested wrong data type": "$.object.a: expected an integer, got string",
    "invalid token ref type": "$.ref: expected an object, got integer",
    "invalid string format did": "$.formats.did: invalid DID '123'",
    "invalid string format nsid": "$.formats.nsid: invalid NSID '123'",
    "invalid string format cid": "$.formats.cid: invalid CID '123'",
    "invalid string format datetime": "$.formats.datetime: invalid datetime '123'",
    "invalid string format uri": "$.formats.uri: invalid URI '123'",
    "invalid string format tid": "$.formats.tid: invalid TID '000'",
    "wrong const value": "$.constInteger: must be 42 (const), got 41",
    "integer not in enum": "$.enumInteger: integer 7 not in enum [4, 9, 16, 25]",
    "out of integer range": "$.rangeInteger: integer 9000 above maximum 20",
    "string too long": "$.lenString: string longer than maxLength 20 (23 UTF-8 bytes)",
    "string too long (graphemes)": "$.graphemeString: string longer than maxGraphemes 20",
    "out of enum string": "$.enumString: string 'unexpected' not in enum",
    "bytes too short": "$.sizeBytes: bytes shorter than minLength 10 (3 bytes)",
    "array too short": "$.lenArray: array shorter than minLength 2 (1 item)",
    "array too long": "$.lenArray: array longer than maxLength 5 (10 items)",
    "blob too large": "$.sizeBlob: blob larger than maxSize 20 (12345 bytes)",
    "open union wrong data type": "$.union: expected an object with a $type",
    "open union missing $type": "$.union: union member needs a $type",
    "union inner invalid": "$.union.a: expected an integer, got string",
    # These two vectors also lack the required "integer", which is reported first; the
    # variants below (ISOLATED) check the failure they are named after.
    "unknown wrong type (bool)": "$.integer: required field missing",
    "unknown wrong type (bytes)": "$.integer: required field missing",
}


@pytest.mark.parametrize("case", _load("record-data-invalid.json"), ids=lambda c: c["name"])
def test_invalid_vectors_fail_for_their_reason(case: dict[str, Any]) -> None:
    with pytest.raises(RecordError) as e:
        validate_record_json(CATALOG, DEMO, case["data"], rkey=case["rkey"])
    assert str(e.value).startswith(INVALID_REASONS[case["name"]])


def test_every_invalid_vector_has_a_reason() -> None:
    assert {c["name"] for c in _load("record-data-invalid.json")} == set(INVALID_REASONS)


ISOLATED = [
    ({"unknown": False}, "$.unknown: expected an object (type unknown), got boolean"),
    ({"unknown": {"$bytes": "123"}}, "$.unknown: expected an object (type unknown), got bytes"),
    ({"closedUnion": {"$type": f"{DEMO}#demoObjectTwo"}}, "$.closedUnion.$type: "),
    ({"acceptBlob": {**_load("record-data-valid.json")[1]["data"]["blob"]}}, "$.acceptBlob: blob"),
    ({"graphemeString": "🇩🇪" * 9}, "$.graphemeString: string shorter than minGraphemes 10"),
    ({"formats": {"language": "en_US"}}, "$.formats.language: invalid language 'en_US'"),
    ({"formats": {"recordkey": "a/b"}}, "$.formats.recordkey: invalid record key 'a/b'"),
    ({"formats": {"handle": "x"}}, "$.formats.handle: invalid handle 'x'"),
    ({"formats": {"atidentifier": "x"}}, "$.formats.atidentifier: invalid AT identifier"),
    ({"formats": {"aturi": "at://x"}}, "$.formats.aturi: invalid AT URI 'at://x'"),
]


@pytest.mark.parametrize(("fields", "reason"), ISOLATED, ids=[r for _, r in ISOLATED])
def test_isolated_variants_of_the_vectors(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(RecordError) as e:
        validate_record_json(CATALOG, DEMO, {"$type": DEMO, "integer": 1, **fields})
    assert str(e.value).startswith(reason)


# --- a case per constraint (tests/lexicon_cases/records.jsonl, one case a line) ----------------


def _cases() -> list[dict[str, Any]]:
    lines = (CASES / "records.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_constraint(case: dict[str, Any]) -> None:
    obj: dict[str, Any] = {"type": "object", "properties": {"f": case["schema"]}}
    if case.get("required"):
        obj["required"] = ["f"]
    if case.get("nullable"):
        obj["nullable"] = ["f"]
    defs = {"main": {"type": "record", "key": "any", "record": obj}, **case.get("defs", {})}
    lexicons = LexiconSet([{"lexicon": 1, "id": "com.example.test", "defs": defs}])
    data = {"$type": "com.example.test"}
    if not case.get("omit"):
        data["f"] = case["value"]
    if case["error"] is None:
        assert validate_record_json(lexicons, "com.example.test", data)["$type"] == data["$type"]
    else:
        with pytest.raises(RecordError) as e:
            validate_record_json(lexicons, "com.example.test", data)
        assert str(e.value).startswith(case["error"])


FORMAT_FILES = {
    "at-identifier": "atidentifier",
    "at-uri": "aturi",
    "cid": "cid",
    "datetime": "datetime",
    "did": "did",
    "handle": "handle",
    "language": "language",
    "nsid": "nsid",
    "record-key": "recordkey",
    "tid": "tid",
    "uri": "uri",
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_FILES))
def test_format_checks_follow_the_syntax_vectors(fmt: str) -> None:
    def lines(kind: str) -> list[str]:
        text = (SYNTAX / f"{FORMAT_FILES[fmt]}_syntax_{kind}.txt").read_text(encoding="utf-8")
        return [x for x in text.splitlines() if x and not x.startswith("#")]

    lexicons = LexiconSet(
        [
            {
                "lexicon": 1,
                "id": "com.example.fmt",
                "defs": {
                    "main": {
                        "type": "record",
                        "key": "tid",
                        "record": {
                            "type": "object",
                            "properties": {"v": {"type": "string", "format": fmt}},
                        },
                    }
                },
            }
        ]
    )
    for value in lines("valid"):
        validate_record(lexicons, "com.example.fmt", {"$type": "com.example.fmt", "v": value})
    invalid = lines("invalid")
    assert invalid
    for value in invalid:
        with pytest.raises(RecordError, match=r"^\$\.v: invalid "):
            validate_record(lexicons, "com.example.fmt", {"$type": "com.example.fmt", "v": value})


# --- the record as a whole ----------------------------------------------------------------------


def test_type_must_name_the_collection() -> None:
    with pytest.raises(RecordError, match=re.escape("$.$type: missing; must be 'com.example")):
        validate_record(NOTES, NOTE, {"title": "t", "createdAt": "2024-05-01T12:00:00Z"})
    with pytest.raises(RecordError, match=re.escape("$.$type: must be 'com.example.notes.note'")):
        validate_record(NOTES, NOTE, {**note(), "$type": "com.example.notes.other"})
    with pytest.raises(RecordError, match=re.escape("$.$type: must be a non-empty string")):
        validate_record(NOTES, NOTE, {**note(), "$type": ""})
    with pytest.raises(RecordError, match=re.escape("$: top level must be an object")):
        validate_record(NOTES, NOTE, [note()])  # type: ignore[arg-type]
    with pytest.raises(RecordError, match=re.escape("$: a record must be a JSON object")):
        validate_record_json(NOTES, NOTE, "x")


def test_returns_the_record_unchanged_without_defaults() -> None:
    rec = note()
    assert validate_record(NOTES, NOTE, rec) is rec
    assert "pinned" not in rec and "priority" not in rec  # defaults are not filled in
    js = validate_record_json(NOTES, NOTE, data_to_json(note(previous=RAW, checksum=b"x" * 32)))
    assert js["previous"] == RAW and js["checksum"] == b"x" * 32


def test_data_model_breaks_anywhere_are_refused() -> None:
    with pytest.raises(RecordError, match=re.escape("$.notInSchema[0]: float 0.5 is not allowed")):
        validate_record(NOTES, NOTE, note(notInSchema=[0.5]))
    with pytest.raises(RecordError, match=re.escape("$.extra.k: integer")):
        validate_record(NOTES, NOTE, note(extra={"k": 2**64}))
    with pytest.raises(RecordError, match=re.escape("$.body: string is not valid Unicode")):
        validate_record(NOTES, NOTE, note(body="\ud800"))


def test_data_model_form_keeps_bytes_and_links_apart() -> None:
    validate_record(NOTES, NOTE, note(previous=RAW, checksum=bytes(32)))
    with pytest.raises(RecordError, match=re.escape("$.previous: expected a CID link, got bytes")):
        validate_record(NOTES, NOTE, note(previous=bytes(RAW)))
    with pytest.raises(RecordError, match=re.escape("$.checksum: expected bytes, got CID link")):
        validate_record(NOTES, NOTE, note(checksum=RAW))
    with pytest.raises(RecordError, match=re.escape("$.previous: expected a CID link, got string")):
        validate_record(NOTES, NOTE, note(previous=str(RAW)))


def test_deep_paths_through_refs_unions_and_recursion() -> None:
    image = {"$type": "blob", "ref": RAW, "mimeType": "image/png", "size": 10}
    images = {"$type": f"{NOTE}#images", "images": [{"image": image, "alt": "ok"}] * 2}
    validate_record(NOTES, NOTE, note(embed=images))
    images["images"] = [{"image": image, "alt": "ok"}, {"image": image, "alt": "🙂" * 101}]
    with pytest.raises(RecordError) as e:
        validate_record(NOTES, NOTE, note(embed=images))
    assert str(e.value) == (
        "$.embed.images[1].alt: string longer than maxGraphemes 100 (101 graphemes)"
    )
    outline: dict[str, Any] = {"text": "root", "children": []}
    leaf = outline
    for depth in range(6):
        child: dict[str, Any] = {"text": f"level {depth}", "children": []}
        leaf["children"].append(child)
        leaf = child
    validate_record(NOTES, NOTE, note(outline=outline))
    leaf["children"].append({"children": []})
    with pytest.raises(RecordError) as e:
        validate_record(NOTES, NOTE, note(outline=outline))
    assert str(e.value) == "$.outline" + ".children[0]" * 7 + ".text: required field missing"


def test_union_variant_from_another_document_and_record_refs() -> None:
    strong = {"uri": f"at://did:plc:abc/{NOTE}/3kznmn7xqxl22", "cid": str(RAW)}
    validate_record(
        NOTES, NOTE, note(embed={"$type": "com.example.notes.defs#strongRef", **strong})
    )
    with pytest.raises(RecordError, match=re.escape("$.embed.cid: required field missing")):
        validate_record(
            NOTES, NOTE, note(embed={"$type": "com.example.notes.defs#strongRef", "uri": "x"})
        )
    # A ref to a record type demands the record's $type, unlike a ref to an object.
    lexicons = LexiconSet(
        [
            *NOTES,
            {
                "lexicon": 1,
                "id": "com.example.notes.pin",
                "defs": {
                    "main": {
                        "type": "record",
                        "key": "literal:self",
                        "record": {
                            "type": "object",
                            "required": ["note"],
                            "properties": {"note": {"type": "ref", "ref": NOTE}},
                        },
                    }
                },
            },
        ]
    )
    pin: dict[str, Any] = {"$type": "com.example.notes.pin", "note": note()}
    validate_record(lexicons, "com.example.notes.pin", pin, rkey="self")
    del pin["note"]["$type"]
    with pytest.raises(RecordError, match=re.escape("$.note.$type: missing; must be")):
        validate_record(lexicons, "com.example.notes.pin", pin)


def test_legacy_blobs_only_when_allowed() -> None:
    legacy = {"cid": str(RAW), "mimeType": "application/pdf"}
    with pytest.raises(RecordError, match=re.escape("$.attachment: legacy blob {cid, mimeType}")):
        validate_record(NOTES, NOTE, note(attachment=legacy))
    assert validate_record(NOTES, NOTE, note(attachment=legacy), allow_legacy_blobs=True)
    with pytest.raises(RecordError, match=re.escape("not accepted (accept: ['application/pdf'")):
        validate_record(
            NOTES,
            NOTE,
            note(attachment={**legacy, "mimeType": "image/png"}),
            allow_legacy_blobs=True,
        )
    with pytest.raises(RecordError, match=re.escape("legacy blob 'cid' must be a CID string")):
        validate_record(NOTES, NOTE, note(attachment={**legacy, "cid": 5}), allow_legacy_blobs=True)


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("tid", "3kznmn7xqxl22", "self"),
        ("nsid", "com.example.thing", "3kznmn7xqxl22"),
        ("literal:self", "self", "other"),
        ("any", "a:b~c_d.e-f", "a/b"),
    ],
)
def test_record_key_types(key: str, good: str, bad: str) -> None:
    lexicons = LexiconSet(
        [
            {
                "lexicon": 1,
                "id": "com.example.keyed",
                "defs": {
                    "main": {
                        "type": "record",
                        "key": key,
                        "record": {"type": "object", "properties": {}},
                    }
                },
            }
        ]
    )
    assert check_record_key(lexicons, "com.example.keyed", good) == good
    rec = {"$type": "com.example.keyed"}
    validate_record(lexicons, "com.example.keyed", rec, rkey=good)
    with pytest.raises(RecordError, match=f"record key '{bad}' of com.example.keyed"):
        validate_record(lexicons, "com.example.keyed", rec, rkey=bad)
    with pytest.raises(RecordError, match=re.escape("record key '..'")):
        check_record_key(lexicons, "com.example.keyed", "..")


def test_missing_lexicons_are_schema_errors_not_record_errors() -> None:
    with pytest.raises(SchemaError, match=re.escape("no Lexicon document 'com.example.nope'")):
        validate_record(NOTES, "com.example.nope", {"$type": "com.example.nope"})
    with pytest.raises(SchemaError, match="defines no primary type, not a record"):
        validate_record(NOTES, "com.example.notes.defs", {"$type": "com.example.notes.defs"})
    broken = LexiconSet([*NOTES])
    broken.add(
        {
            "lexicon": 1,
            "id": "com.example.notes.draft",
            "defs": {
                "main": {
                    "type": "record",
                    "key": "tid",
                    "record": {
                        "type": "object",
                        "properties": {"s": {"type": "ref", "ref": "com.example.gone#x"}},
                    },
                }
            },
        }
    )
    # The dangling ref fails its own record type at first use, with the path to it...
    with pytest.raises(SchemaError) as e:
        validate_record(broken, "com.example.notes.draft", {"$type": "com.example.notes.draft"})
    assert "Lexicon 'com.example.notes.draft': defs.main.record.properties.s.ref" in str(e.value)
    assert "no Lexicon document 'com.example.gone'" in str(e.value)
    # ...and leaves the other record types of the set working.
    validate_record(broken, NOTE, note())


def test_validators_are_compiled_once_and_rebuilt_after_add() -> None:
    lexicons = LexiconSet.load(CASES / "notes")
    validate_record(lexicons, NOTE, note())
    compiled = dict(lexicons._validators)
    assert compiled
    validate_record(lexicons, NOTE, note(rating=1))
    assert lexicons._validators == compiled
    lexicons.add({"lexicon": 1, "id": "com.example.more", "defs": {"t": {"type": "token"}}})
    assert not lexicons._validators
    with pytest.raises(RecordError, match=re.escape("$.rating: integer 6 above maximum 5")):
        validate_record(lexicons, NOTE, note(rating=6))


# --- generated records -----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.data(), nsid=st.sampled_from([DEMO, NOTE]))
def test_generated_valid_records_pass_in_both_forms(data: st.DataObject, nsid: str) -> None:
    lexicons = CATALOG if nsid == DEMO else NOTES
    rec = data.draw(records(lexicons, nsid))
    assert validate_record(lexicons, nsid, rec) is rec
    as_json = json.loads(json.dumps(data_to_json(rec)))
    assert validate_record_json(lexicons, nsid, as_json) == rec


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    value=st.integers(-(2**63), 2**63 - 1).filter(lambda n: not 10 <= n <= 20),
)
def test_generated_record_with_one_bound_broken_fails_there(
    data: st.DataObject, value: int
) -> None:
    rec = data.draw(records(CATALOG, DEMO))
    validate_record(CATALOG, DEMO, rec)
    rec["rangeInteger"] = value
    with pytest.raises(RecordError, match=re.escape(f"$.rangeInteger: integer {value} ")):
        validate_record(CATALOG, DEMO, rec)

"""Lexicon documents: the interop vectors, the catalog, every spec rule, and LexiconSet refs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from atsync._errors import SchemaError
from atsync.lexicon._doc import LexiconDoc, load_lexicon, load_lexicons, parse_lexicon
from atsync.lexicon._set import LexiconSet

VECTORS = Path(__file__).parent / "interop" / "lexicon"
CATALOG = VECTORS / "catalog"
CASES = Path(__file__).parent / "lexicon_cases"


def _load(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((VECTORS / name).read_text())
    return data


def doc(defs: dict[str, Any], nsid: str = "com.example.test") -> dict[str, Any]:
    return {"lexicon": 1, "id": nsid, "defs": defs}


def record(props: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A document whose main record has ``props`` (and ``extra`` keys on its object)."""
    obj = {"type": "object", "properties": props, **extra}
    return doc({"main": {"type": "record", "key": "tid", "record": obj}})


def prop(schema: dict[str, Any]) -> dict[str, Any]:
    return record({"f": schema})


# --- interop vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", _load("lexicon-valid.json"), ids=lambda c: c["name"])
def test_valid_vectors_parse(case: dict[str, Any]) -> None:
    d = parse_lexicon(case["lexicon"])
    assert d.id == case["lexicon"]["id"]
    assert set(d.defs) == set(case["lexicon"]["defs"])


INVALID_REASONS = {
    "invalid lexicon field": "lexicon: must be the integer 1",
    "invalid id field": "id: must be an NSID string, got integer",
    "invalid NSID": "id: 'one-two-three' is not a valid NSID",
    "defined unknown": "defs.demo: an unknown cannot be a named definition",
    "defined ref": "defs.demo: a ref cannot be a named definition",
    "non-main primary": "defs.demo: a record is a primary type: name it 'main'",
    "record missing type object": "defs.main.record: must be a schema of type 'object'",
}


@pytest.mark.parametrize("case", _load("lexicon-invalid.json"), ids=lambda c: c["name"])
def test_invalid_vectors_fail_for_their_reason(case: dict[str, Any]) -> None:
    with pytest.raises(SchemaError) as e:
        parse_lexicon(case["lexicon"])
    assert INVALID_REASONS[case["name"]] in str(e.value)


def test_every_invalid_vector_has_a_reason() -> None:
    assert {c["name"] for c in _load("lexicon-invalid.json")} == set(INVALID_REASONS)


@pytest.mark.parametrize("path", sorted(CATALOG.glob("*.json")), ids=lambda p: p.name)
def test_catalog_documents_load(path: Path) -> None:
    d = load_lexicon(path)
    assert d.id == json.loads(path.read_text())["id"]
    assert d.source == str(path)
    assert d.primary_type == path.stem


def test_catalog_set_resolves_refs_except_the_one_into_another_app() -> None:
    lexicons = LexiconSet.load(CATALOG)
    assert len(lexicons) == 5
    assert "example.lexicon.record" in lexicons
    lexicons.check_refs("example.lexicon.record")  # its own refs all resolve
    lexicons.check_refs("example.lexicon.subscription")
    with pytest.raises(SchemaError) as e:
        lexicons.check_refs()
    msg = str(e.value)
    assert "Lexicon 'example.lexicon.procedure': defs.main.input.schema.properties" in msg
    assert "'app.bsky.actor.defs#preferences'" in msg
    assert "no Lexicon document 'app.bsky.actor.defs' in the set" in msg
    lexicons.add(
        doc({"preferences": {"type": "array", "items": {"type": "unknown"}}}, "app.bsky.actor.defs")
    )
    lexicons.check_refs()


# --- every rule, one document each (tests/lexicon_cases/*.jsonl: one case a line) --------------


def _cases(name: str) -> list[dict[str, Any]]:
    lines = (CASES / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize("case", _cases("invalid-lexicons.jsonl"), ids=lambda c: c["name"])
def test_broken_document_is_refused_with_its_path(case: dict[str, Any]) -> None:
    with pytest.raises(SchemaError) as e:
        parse_lexicon(case["lexicon"])
    assert case["reason"] in str(e.value)


@pytest.mark.parametrize("case", _cases("valid-lexicons.jsonl"), ids=lambda c: c["name"])
def test_good_document_is_accepted(case: dict[str, Any]) -> None:
    data = case["lexicon"]
    d = parse_lexicon(data)
    assert d.to_json() == {k: v for k, v in data.items() if k != "$type"}


def test_non_strict_accepts_unknown_keys_and_formats() -> None:
    data = prop({"type": "string", "format": "email", "x-ui": "textarea"})
    with pytest.raises(SchemaError):
        parse_lexicon(data)
    d = parse_lexicon({**data, "x-top": 1}, strict=False)
    assert d.defs["main"]["record"]["properties"]["f"]["format"] == "email"
    # Structural rules stay in force without strict.
    query = doc({"main": {"type": "query", "input": {"encoding": "application/json"}}})
    with pytest.raises(SchemaError, match=re.escape("defs.main.input: a query has no input body")):
        parse_lexicon(query, strict=False)
    with pytest.raises(SchemaError, match="maxLength: must be an integer"):
        parse_lexicon(prop({"type": "string", "maxLength": "x"}), strict=False)


def test_document_is_copied_on_parse() -> None:
    data = prop({"type": "integer", "maximum": 3})
    d = parse_lexicon(data)
    data["defs"]["main"]["record"]["properties"]["f"]["maximum"] = 99
    assert d.defs["main"]["record"]["properties"]["f"]["maximum"] == 3


def test_errors_name_the_source_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(prop({"type": "string", "maxLength": -2})))
    with pytest.raises(SchemaError) as e:
        load_lexicon(bad)
    assert f"Lexicon 'com.example.test' (from {bad}): defs.main.record.properties.f" in str(e.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SchemaError, match=re.escape("broken.json: not valid JSON")):
        load_lexicon(tmp_path / "broken.json")
    with pytest.raises(SchemaError, match=re.escape("missing.json: cannot be read")):
        load_lexicon(tmp_path / "missing.json")


def test_load_directory_recursively_sorted(tmp_path: Path) -> None:
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "b.json").write_text(
        json.dumps(doc({"a": {"type": "token"}}, "com.example.b"))
    )
    (tmp_path / "a.json").write_text(json.dumps(doc({"a": {"type": "token"}}, "com.example.a")))
    (tmp_path / "notes.txt").write_text("not a lexicon")
    assert [d.id for d in load_lexicons(tmp_path)] == ["com.example.a", "com.example.b"]
    assert [d.id for d in LexiconSet.load(tmp_path / "a.json", tmp_path / "z")] == [
        "com.example.a",
        "com.example.b",
    ]


# --- LexiconSet -------------------------------------------------------------------------------


def test_set_add_get_and_duplicates() -> None:
    lexicons = LexiconSet([prop({"type": "integer"})])
    d = lexicons.get("com.example.test")
    assert isinstance(d, LexiconDoc)
    assert lexicons.add(prop({"type": "integer"})) is d  # same content: no-op
    with pytest.raises(
        SchemaError, match=re.escape("two different Lexicon documents for 'com.example.test'")
    ):
        lexicons.add(prop({"type": "string"}))
    with pytest.raises(
        SchemaError,
        match=r"no Lexicon document 'com.example.nope' in the set \(it has: com.example.test\)",
    ):
        lexicons.get("com.example.nope")
    assert lexicons.get_def("com.example.test")["type"] == "record"
    assert lexicons.get_def("com.example.test#main") is lexicons.get_def("com.example.test")
    with pytest.raises(SchemaError, match="has no definition 'other'"):
        lexicons.get_def("com.example.test#other")
    with pytest.raises(SchemaError, match="bad ref"):
        lexicons.get_def("#main")
    assert lexicons.record_def("com.example.test")["key"] == "tid"


def test_record_def_of_a_non_record_document() -> None:
    lexicons = LexiconSet.load(CATALOG)
    with pytest.raises(
        SchemaError, match=re.escape("'example.lexicon.query' defines query type, not a record")
    ):
        lexicons.record_def("example.lexicon.query")
    lexicons.add(doc({"x": {"type": "token"}}, "com.example.defs"))
    with pytest.raises(SchemaError, match="defines no primary type"):
        lexicons.record_def("com.example.defs")


def test_cross_document_refs_are_checked_by_kind() -> None:
    lexicons = LexiconSet(
        [
            doc(
                {
                    "tok": {"type": "token"},
                    "str": {"type": "string"},
                    "obj": {"type": "object", "properties": {}},
                },
                "com.example.defs",
            ),
            record({"a": {"type": "ref", "ref": "com.example.defs#tok"}}),
            record(
                {"b": {"type": "union", "refs": ["com.example.defs#str", "com.example.defs#obj"]}}
            )
            | {"id": "com.example.two"},
            record({"c": {"type": "ref", "ref": "com.example.defs#gone"}})
            | {"id": "com.example.three"},
        ]
    )
    with pytest.raises(SchemaError) as e:
        lexicons.check_refs()
    msg = str(e.value)
    assert "ref 'com.example.defs#tok' points at a token, which it cannot" in msg
    assert "union 'com.example.defs#str' points at a string, which it cannot" in msg
    assert "Lexicon 'com.example.defs' has no definition 'gone'" in msg
    assert "union 'com.example.defs#obj'" not in msg
    with pytest.raises(
        SchemaError, match=re.escape("'com.example.nope#main': no such Lexicon definition")
    ):
        lexicons.check_refs("com.example.nope")


def test_check_refs_follows_refs_transitively_and_only_reachable_ones() -> None:
    lexicons = LexiconSet(
        [
            record({"a": {"type": "ref", "ref": "com.example.mid#o"}}),
            doc(
                {
                    "o": {
                        "type": "object",
                        "properties": {"x": {"type": "ref", "ref": "com.example.far#o"}},
                    },
                    "unused": {
                        "type": "array",
                        "items": {"type": "ref", "ref": "com.example.elsewhere"},
                    },
                },
                "com.example.mid",
            ),
        ]
    )
    with pytest.raises(SchemaError) as e:
        lexicons.check_refs("com.example.test")
    assert "com.example.far#o" in str(e.value)
    assert "elsewhere" not in str(e.value)  # not reachable from the record
    lexicons.add(
        doc(
            {
                "o": {
                    "type": "object",
                    "properties": {"back": {"type": "ref", "ref": "com.example.mid#o"}},
                }
            },
            "com.example.far",
        )
    )
    lexicons.check_refs("com.example.test")  # resolves now, cycles included
    with pytest.raises(SchemaError, match="elsewhere"):
        lexicons.check_refs()

"""Lexicons: load and check Lexicon documents, validate records.

lexicons = LexiconSet.load("lexicons/")
validate_record(lexicons, "com.example.notes.note", record)
"""

from ._doc import LexiconDoc, load_lexicon, load_lexicons, parse_lexicon
from ._set import LexiconSet
from ._validate import check_record_key, validate_record, validate_record_json

__all__ = [
    "LexiconDoc",
    "LexiconSet",
    "check_record_key",
    "load_lexicon",
    "load_lexicons",
    "parse_lexicon",
    "validate_record",
    "validate_record_json",
]

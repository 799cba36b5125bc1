"""Lexicons: load and check Lexicon documents, validate records, bind models to collections.

lexicons = LexiconSet.load("lexicons/")
validate_record(lexicons, "com.example.notes.note", record)
Binding("com.example.notes.note", fields={"body": "text"})
"""

from ._binding import Binding, BoundBinding, Transform
from ._doc import LexiconDoc, load_lexicon, load_lexicons, parse_lexicon
from ._set import LexiconSet
from ._validate import check_record_key, validate_record, validate_record_json

__all__ = [
    "Binding",
    "BoundBinding",
    "LexiconDoc",
    "LexiconSet",
    "Transform",
    "check_record_key",
    "load_lexicon",
    "load_lexicons",
    "parse_lexicon",
    "validate_record",
    "validate_record_json",
]

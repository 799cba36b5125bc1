"""Lexicons: load and check Lexicon documents, validate records.

lexicons = LexiconSet.load("lexicons/")
validate_record(lexicons, "com.example.notes.note", record)
model_from_lexicon(lexicons, "com.example.notes.note")   # {"id": "primary", "text": …}
"""

from ._doc import LexiconDoc, load_lexicon, load_lexicons, parse_lexicon
from ._model import check_model_against_lexicon, model_from_lexicon
from ._set import LexiconSet
from ._validate import check_record_key, validate_record, validate_record_json

__all__ = [
    "LexiconDoc",
    "LexiconSet",
    "check_model_against_lexicon",
    "check_record_key",
    "load_lexicon",
    "load_lexicons",
    "model_from_lexicon",
    "parse_lexicon",
    "validate_record",
    "validate_record_json",
]

"""Lexicon string ``format``s, each checked by the atproto syntax validators.

The Lexicon spec asks for "the most expansive identifier syntax" in validation: any DID
method passes ``did``, a handle's TLD is not checked against a registry, and ``cid`` is the
loose string syntax rather than a decodable CID. Problems beyond syntax are the app's to
report. Validators raise ``InvalidSyntaxError``; ``_validate`` turns that into a ``RecordError``
carrying the field's path.
"""

from __future__ import annotations

from collections.abc import Callable

from atsync.atproto import (
    parse_at_uri,
    validate_at_identifier,
    validate_cid,
    validate_datetime,
    validate_did,
    validate_handle,
    validate_language,
    validate_nsid,
    validate_record_key,
    validate_tid,
    validate_uri,
)

__all__ = ["FORMATS", "format_checker"]

FormatCheck = Callable[[str], object]

# The formats of the Lexicon spec ("String Formats"); a document naming another is malformed.
FORMATS: dict[str, FormatCheck] = {
    "at-identifier": validate_at_identifier,
    "at-uri": parse_at_uri,
    "cid": validate_cid,
    "datetime": validate_datetime,
    "did": validate_did,
    "handle": validate_handle,
    "language": validate_language,
    "nsid": validate_nsid,
    "record-key": validate_record_key,
    "tid": validate_tid,
    "uri": validate_uri,
}


def format_checker(name: str) -> FormatCheck | None:
    """The validator for a format name, or ``None`` if the spec defines no such format."""
    return FORMATS.get(name)

"""``atsync lexicon``: check Lexicon documents or a record against them, derive a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .._errors import AtsyncError, SchemaError
from ..lexicon import LexiconSet, model_from_lexicon, validate_record_json
from ._main import main


@main.group()
def lexicon() -> None:
    """Lexicon documents: check them, check a record against them, derive a model."""


def _load(paths: tuple[Path, ...]) -> LexiconSet:
    try:
        lexicons = LexiconSet.load(*paths)
        lexicons.check_refs()  # every ref in the set resolves
    except (SchemaError, OSError, ValueError) as exc:
        raise click.ClickException(f"invalid: {exc}") from None
    return lexicons


@lexicon.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--record",
    "record_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A record (JSON, its $type names the Lexicon) to check against the documents.",
)
def check(paths: tuple[Path, ...], record_file: Path | None) -> None:
    """Check Lexicon documents (files or directories of .json files), and with --record a
    record against them. Exit code 1 and the first error's JSON path when invalid."""
    lexicons = _load(paths)
    if record_file is None:
        ids = sorted(doc.id for doc in lexicons)
        click.echo(f"ok: {len(ids)} Lexicon documents ({', '.join(ids)})")
        return
    try:
        record: Any = json.loads(record_file.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"invalid: {record_file} is not JSON: {exc}") from None
    nsid = record.get("$type") if isinstance(record, dict) else None
    if not isinstance(nsid, str):
        raise click.ClickException(f"invalid: {record_file}: $: the record has no $type")
    try:
        validate_record_json(lexicons, nsid, record)
    except AtsyncError as exc:  # RecordError (with the JSON path), SchemaError
        raise click.ClickException(f"invalid: {record_file}: {exc}") from None
    click.echo(f"ok: {record_file} is a valid {nsid} record")


@lexicon.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.argument("nsid")
@click.option("--key", default="id", show_default=True, help="The primary key's name.")
def model(paths: tuple[Path, ...], nsid: str, key: str) -> None:
    """Print the model derived from the record Lexicon NSID (JSON, as Contract(models=…)
    takes it)."""
    lexicons = _load(paths)
    try:
        derived = model_from_lexicon(lexicons, nsid, key=key)
    except SchemaError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(derived, indent=2))

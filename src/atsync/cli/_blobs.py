"""``atsync blobs``: what the blob store beside a database holds, and collecting what nothing
references any more (the same ``BlobStore.collect`` an app calls through
``ATSync.collect_blobs``)."""

from __future__ import annotations

from pathlib import Path

import click

from .._errors import AtsyncError
from ..db import ModelDB
from ..sync import Outbox, referenced_blobs
from ._main import main


@main.command()
@click.option(
    "--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="The app's database file.",
)  # fmt: skip
@click.option("--collect", is_flag=True, help="Delete the blobs nothing references any more.")
@click.option(
    "--older-than", default=3600.0, show_default=True, type=float,
    help="Seconds a blob must have been stored before --collect deletes it.",
)  # fmt: skip
def blobs(db_path: Path, collect: bool, older_than: float) -> None:
    """Blobs beside the database: how many, how large, how many nothing references."""
    try:
        db = ModelDB.open_existing(db_path)
    except AtsyncError as exc:
        raise click.ClickException(str(exc)) from None
    with db:
        Outbox(db).create_tables()
        store = db.blobs
        cids = store.cids()
        wanted = referenced_blobs(db)
        size = sum(store.size(c) or 0 for c in cids)
        loose = [c for c in cids if c not in wanted]
        click.echo(f"{len(cids)} blobs, {size:,} bytes; {len(loose)} referenced by nothing")
        if collect:
            removed, freed = store.collect(wanted, older_than=older_than)
            click.echo(f"collected {removed} blobs, {freed:,} bytes freed")

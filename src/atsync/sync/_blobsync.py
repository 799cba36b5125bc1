"""Blobs in sync: uploaded before the records that reference them, fetched after them.

**Push.** Before a batch goes out, each blob its records reference is uploaded
(``uploadBlob``, streamed from the store) unless this device knows the PDS holds it
(``_atsync_blobs``: a row per (DID, CID), written once an upload succeeded). So an unchanged
blob is not uploaded again, and the PDS never gets a record without its blob: the reference
PDS refuses such a record (``BlobNotFound``), and the batch waits until the upload worked.
An upload is idempotent (the PDS keys blobs by CID), so a crash between upload and record
costs one more upload, never a duplicate. A blob the PDS refuses (too large, say) makes
every write that references it a dead letter with the PDS's reason; nothing retries it on
its own (no orphan uploads). The PDS forgets a blob once no record references it; a record
that references it again gets ``BlobNotFound``: the row is forgotten and the blob uploaded
again, once per attempt.

**Pull.** Rows of bound models reference blobs by ``BlobRef``; the ones missing from the
store are fetched (``sync.getBlob``) from the repository the row came from — the user's own
or a followed one; a shared row's from any participant's — each checked against its CID
before it is stored (``BlobFetcher``). The engine does it after each pull (``blobs="eager"``)
or when asked (``fetch_blob``).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio

from .._errors import PermanentError, VerificationError
from ..atproto import XrpcClient
from ..db import BlobRef, BlobStore, ModelDB, quote_identifier
from ._binding import BoundBinding
from ._outbox import BLOBS, DEAD, OUTBOX, RECORDS, PendingWrite
from ._outbox_views import FOLLOWED

__all__ = [
    "BLOBS",
    "BlobFetcher",
    "BlobUploads",
    "blob_refs",
    "create_blob_table",
    "referenced_blobs",
]

UPLOADS = 4  # blobs uploaded at once
_IN_MEMORY = 8 * 1024 * 1024  # blobs up to this size are uploaded from memory, in one piece
# A blob's CID as it appears in any JSON text: CIDv1, raw codec, sha2-256, base32.
_BLOB_CID = re.compile(r"bafkrei[a-z2-7]{52}")
_BLOB_MARK = '"$type":"blob"'  # as compact_json writes it in every queued record


def create_blob_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {BLOBS} (
            did TEXT NOT NULL, cid TEXT NOT NULL, uploaded_at REAL NOT NULL,
            PRIMARY KEY (did, cid)
        ) WITHOUT ROWID"""
    )


def blob_refs(record_json: str | None) -> list[tuple[str, str]]:
    """(CID, MIME type) of every blob a queued record (atproto JSON form) references,
    nested ones included; cheap for the records that have none."""
    if not record_json or _BLOB_MARK not in record_json:
        return []
    found: list[tuple[str, str]] = []
    todo: list[Any] = [json.loads(record_json)]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            if value.get("$type") == "blob":
                ref, mime = value.get("ref"), value.get("mimeType")
                link = ref.get("$link") if isinstance(ref, dict) else None
                if isinstance(link, str) and isinstance(mime, str):
                    found.append((link, mime))
                continue
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
    return found


class BlobUploads:
    """The push side: which blobs each account's PDS holds, and uploading the rest."""

    def __init__(self, db: ModelDB) -> None:
        self._db = db
        self.uploaded = 0  # blobs uploaded by this engine (for the status and benchmarks)

    @property
    def store(self) -> BlobStore:
        return self._db.blobs

    def held(self, did: str, cid: str) -> bool:
        row = self._db.connection.execute(
            f"SELECT 1 FROM {BLOBS} WHERE did = ? AND cid = ?", (did, cid)
        ).fetchone()
        return row is not None

    def _mark_held(self, did: str, cid: str) -> None:
        with self._db.transaction():
            self._db.connection.execute(
                f"INSERT OR REPLACE INTO {BLOBS} (did, cid, uploaded_at) VALUES (?, ?, ?)",
                (did, cid, time.time()),
            )

    def forget(self, did: str, cids: Iterable[str]) -> int:
        """The PDS said it lacks these: upload them again next time. Returns how many of
        them the store can upload."""
        cids = set(cids)
        with self._db.transaction():
            self._db.connection.executemany(
                f"DELETE FROM {BLOBS} WHERE did = ? AND cid = ?", [(did, c) for c in cids]
            )
        return sum(1 for c in cids if self.store.has(c))

    async def upload_for(
        self,
        did: str,
        client: XrpcClient,
        batch: Sequence[PendingWrite],
        dead_letter: Callable[[PendingWrite, str | None, str], None],
    ) -> tuple[list[PendingWrite], set[str]]:
        """Upload what ``batch`` references and the PDS may lack, ``UPLOADS`` at once.
        Returns the writes that can go (a write whose blob the PDS refused is dead-lettered)
        and the CIDs uploaded now. Network and auth failures propagate (what was uploaded
        stays known): the batch waits and is tried again."""
        needed: dict[str, str] = {}  # CID -> MIME type
        for write in batch:
            for cid, mime in blob_refs(write.record):
                # Not in the store: the record came from the PDS with it (capture lets
                # nothing else through); if the PDS lost it, applyWrites says so.
                if cid not in needed and not self.held(did, cid) and self.store.has(cid):
                    needed[cid] = mime
        refused: dict[str, str] = {}  # CID -> why the PDS would not take it
        failures: list[Exception] = []
        limit = anyio.CapacityLimiter(UPLOADS)

        async def upload(cid: str, mime: str) -> None:
            async with limit:
                if failures:
                    return  # the network failed: the rest waits for the retry too
                try:
                    blob = await self._upload(client, cid, mime)
                except PermanentError as exc:
                    refused[cid] = f"the PDS refused blob {cid} ({mime}): {exc}"
                    return
                except VerificationError as exc:  # damaged here: sending it again cannot help
                    refused[cid] = str(exc)
                    return
                except Exception as exc:  # network, auth: raised below, once
                    failures.append(exc)
                    return
                got = str(blob.get("ref"))
                if got != cid:
                    refused[cid] = (
                        f"blob {cid} is damaged in the store: the PDS received bytes whose CID "
                        f"is {got}. put() the original bytes again, or delete the file and "
                        "fetch_blob() it from a repository that has it; then retry the dead letter"
                    )
                    return
                self._mark_held(did, cid)
                self.uploaded += 1

        async with anyio.create_task_group() as tg:
            for cid, mime in needed.items():
                tg.start_soon(upload, cid, mime)
        if failures:
            raise failures[0]
        kept: list[PendingWrite] = []
        for write in batch:
            problem = next((refused[c] for c, _ in blob_refs(write.record) if c in refused), None)
            if problem is None:
                kept.append(write)
            else:
                dead_letter(write, "BlobRefused", problem)
        return kept, set(needed) - set(refused)

    async def _upload(self, client: XrpcClient, cid: str, mime: str) -> dict[str, Any]:
        if (self.store.size(cid) or 0) <= _IN_MEMORY:
            return await client.upload_blob(self.store.read(cid), mime)
        with self.store.open(cid) as stream:  # read in chunks as it goes
            return await client.upload_blob(stream, mime)


# A row's blobs and where to look for them: the DIDs of the repositories that may hold them
# (None: the user's own).
Wanted = dict[str, tuple[BlobRef, set[str | None]]]


class BlobFetcher:
    """The pull side: the blobs bound rows reference that the store lacks, and getting them."""

    def __init__(self, db: ModelDB, bindings: Mapping[str, BoundBinding]) -> None:
        self._db = db
        self._with_blobs = [
            (b.model.name, b.model.primary_key, [prop for prop, _ in b.blob_fields], b.shared)
            for b in bindings.values()
            if b.blob_fields and b.direction != "push"
        ]
        self.failures: dict[str, str] = {}  # CID -> why its last fetch failed
        self.fetched = 0
        # CIDs seen in the store: not looked for again. Emptied when the store may have lost
        # some (collect_blobs) and at every engine start (a file deleted by hand).
        self.present: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self._with_blobs)

    def missing(self, followed: Callable[[], Iterable[str]]) -> Wanted:
        """Every blob a bound row references that the store lacks, with where to look."""
        wanted: Wanted = {}
        store = self._db.blobs
        conn = self._db.connection
        present = self.present
        for model, pk, props, shared in self._with_blobs:
            columns = ", ".join(quote_identifier(p) for p in props)
            nonnull = " OR ".join(f"{quote_identifier(p)} IS NOT NULL" for p in props)
            sql = f"SELECT {quote_identifier(pk)}, {columns} FROM {quote_identifier(model)}"
            for key, *raws in conn.execute(f"{sql} WHERE {nonnull}"):
                for raw in raws:
                    if raw is None or _cid_of_column(raw) in present:
                        continue  # the hot case (this runs after every pull): no parsing
                    try:
                        ref = BlobRef.from_json(json.loads(raw))
                    except (ValueError, TypeError):
                        continue  # a damaged column: nothing to fetch for it
                    if ref.cid in wanted:
                        sources = wanted[ref.cid][1]
                    elif store.has(ref.cid):
                        present.add(ref.cid)
                        continue
                    else:
                        sources = wanted.setdefault(ref.cid, (ref, set()))[1]
                    if shared:
                        sources.add(None)
                        sources.update(followed())
                    elif isinstance(key, str) and key.startswith("at://"):
                        sources.add(key[5:].split("/", 1)[0])
                    else:
                        sources.add(None)
        return wanted

    async def fetch(self, ref: BlobRef, did: str, client: XrpcClient, max_size: int) -> None:
        """Download one blob from ``did``'s PDS into the store, checked against its CID on the
        way (streamed to a file in the store: a large blob never sits in memory)."""
        store = self._db.blobs
        with store.receiving() as path:
            await client.sync_get_blob(did, ref.cid, path, max_size=max_size)
            stored = store.adopt(path, ref.mime_type)
        assert stored.cid == ref.cid, "sync_get_blob checked the bytes against the CID"
        self.present.add(ref.cid)
        self.fetched += 1
        self.failures.pop(ref.cid, None)


def _cid_of_column(raw: str) -> str | None:
    """The CID in a blob column as ModelDB writes it (``{"cid":"…",…}``), without parsing."""
    if raw.startswith('{"cid":"'):
        end = raw.find('"', 8)
        if end > 8:
            return raw[8:end]
    return None


def referenced_blobs(db: ModelDB) -> set[str]:
    """Every blob CID something in the database still references: a ``blob`` or ``json``
    column of any model, a queued write or a dead letter (not uploaded yet), a record as last
    synced, own or followed. What is not in it can go (``BlobStore.collect``)."""
    conn = db.connection
    found: set[str] = set()
    for model in db.schema.models.values():
        columns = [p.name for p in model.properties if p.kind in ("blob", "json")]
        if not columns:
            continue
        select = ", ".join(quote_identifier(c) for c in columns)
        for row in conn.execute(f"SELECT {select} FROM {quote_identifier(model.name)}"):
            for value in row:
                if isinstance(value, str):
                    found.update(_BLOB_CID.findall(value))
    for table in (OUTBOX, DEAD, RECORDS, FOLLOWED):
        try:
            rows = conn.execute(f"SELECT record FROM {table} WHERE record LIKE '%bafkrei%'")
        except sqlite3.OperationalError:
            continue  # a database that never synced has no such table
        for (text,) in rows:
            found.update(_BLOB_CID.findall(text or ""))
    return found

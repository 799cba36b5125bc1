"""The engine's side of blobs (mixed into ``ATSync``; the work itself is ``_blobsync``).

Uploads happen inside each push (``Pusher``). Downloads are a task of their own in the
engine's task group, so a slow blob never holds back records: after every pull, and at
start, it looks for blobs that bound rows reference and the store lacks, and with
``blobs="eager"`` (the default) fetches them, ``FETCHES`` at once, each from the repository
its row came from. A failed fetch (the host is down, the bytes do not match their CID) is
shown in the status (``blob_error``) and tried again after a backoff; it never blocks the
rest. With ``blobs="lazy"`` nothing is fetched until ``fetch_blob(ref)`` asks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import anyio

from .._errors import AuthError, NetworkError, NotFoundError, ValidationError, VerificationError
from ..atproto import XrpcClient
from ..db import BlobRef, ModelDB
from ._binding import BoundBinding
from ._blobsync import BlobFetcher, referenced_blobs
from ._follows import Follows

if TYPE_CHECKING:
    from ._steps import StepRunner

__all__ = ["BlobMode", "BlobSync"]

log = logging.getLogger("atsync.sync")
BlobMode = Literal["eager", "lazy"]
FETCHES = 4  # blobs downloaded at once
RETRY_SECONDS = (5.0, 30.0, 120.0, 600.0)  # after a round with failures, then the next…


class BlobSync:
    """Mixed into ``ATSync``: ``fetch_blob`` and the download task."""

    _db: ModelDB
    _follows: Follows
    _runner: StepRunner | None

    if TYPE_CHECKING:  # from the other parts of ATSync

        def _own_did(self) -> str | None: ...
        def _resolver(self, *, loopback: bool = False) -> Any: ...
        def _public_client(self, pds: str) -> XrpcClient: ...
        def _refresh_status(self, **changes: Any) -> None: ...

    def _setup_blobs(
        self, db: ModelDB, bound: Mapping[str, BoundBinding], mode: BlobMode, max_size: int
    ) -> None:
        if mode not in ("eager", "lazy"):
            raise ValidationError(f"blobs= takes 'eager' or 'lazy', not {mode!r}")
        if not isinstance(max_size, int) or max_size <= 0:
            raise ValidationError(f"max_blob_size must be a positive number of bytes: {max_size!r}")
        self.blob_mode: BlobMode = mode
        self.max_blob_size = max_size
        self._blob_fetcher = BlobFetcher(db, bound)
        self._blob_kick = anyio.Event()
        self._blob_asked = 0  # rounds asked for (after each pull), and the last one done
        self._blob_done = 0
        self._blob_progress = anyio.Event()

    def _kick_blobs(self) -> int:
        """Look for missing blobs (after a pull); returns the round to wait for."""
        self._blob_asked += 1
        self._blob_kick.set()
        return self._blob_asked

    async def _wait_blobs(self, round_: int) -> None:
        """Until a look for missing blobs asked at ``round_`` is over (eager: fetched or
        failed)."""
        if not self._blob_fetcher.active:
            return
        while self._blob_done < round_:
            await self._blob_progress.wait()

    async def fetch_blob(self, ref: BlobRef, *, did: str | None = None) -> bytes:
        """The bytes of ``ref``: from the store, or downloaded (from ``did``'s repository,
        by default the one a bound row referencing it came from, else the user's own),
        checked against the CID and stored (so is a copy damaged in the store).
        ``NotFoundError`` if no repository has it; network errors propagate."""
        store = self._db.blobs
        if store.has(ref):
            try:
                return store.read(ref)
            except VerificationError as exc:  # damaged on disk: fetched again
                log.warning("%s; fetching it again", exc)
        if did is not None:
            sources: list[str | None] = [did]
        else:
            wanted = self._blob_fetcher.missing(self._follows.dids).get(ref.cid)
            sources = sorted(wanted[1], key=lambda d: d or "") if wanted else []
            sources += [s for s in [None, *self._follows.dids()] if s not in sources]
        failure: Exception | None = None
        for source in sources:
            try:
                await self._fetch_from(ref, source)
                return store.read(ref)
            except (NetworkError, VerificationError, NotFoundError) as exc:
                failure = exc
        raise NotFoundError(f"blob {ref.cid} could not be fetched from {sources}: {failure}")

    def collect_blobs(self, *, older_than: float = 3600.0) -> tuple[int, int]:
        """Delete from the blob store the blobs nothing references any more — no row, no
        queued write, no record as last synced — stored more than ``older_than`` seconds ago;
        returns (how many, bytes freed). A row rebuilt from the action log may reference one
        again: its bytes are then fetched from the repository that holds them."""
        self._blob_fetcher.present.clear()
        return self._db.blobs.collect(referenced_blobs(self._db), older_than=older_than)

    async def _fetch_from(self, ref: BlobRef, did: str | None) -> None:
        own = self._own_did()
        runner = self._runner
        if did is None or did == own:
            if own is None:
                raise AuthError("the user's own blobs come from their PDS: log in first")
            session = runner.session if runner is not None else None
            if session is not None:
                client = self._public_client(session.pds_url)
                await self._blob_fetcher.fetch(ref, own, client, self.max_blob_size)
                return
            did = own
        identity = await self._resolver().resolve(did, check_handle=False)
        client = self._public_client(identity.pds)
        await self._blob_fetcher.fetch(ref, did, client, self.max_blob_size)

    async def _run_blob_fetches(self) -> None:
        """Run until cancelled (in the engine's task group)."""
        fetcher = self._blob_fetcher
        if not fetcher.active:
            return
        fetcher.present.clear()  # a blob file deleted by hand since the last run is fetched again
        failed_rounds = 0
        while True:
            self._blob_kick = anyio.Event()
            round_ = self._blob_asked
            try:
                wanted = fetcher.missing(self._follows.dids)
                failures = 0
                if self.blob_mode == "eager" and wanted:
                    # Said before and after: whoever waits on the status sees them arrive.
                    self._refresh_status(blobs_missing=len(wanted))
                    failures = await self._fetch_all(wanted)
                missing = failures if self.blob_mode == "eager" else len(wanted)
                error = next(iter(fetcher.failures.values()), None) if failures else None
                self._refresh_status(blobs_missing=missing, blob_error=error)
            except Exception:  # a damaged table, a closed database: say so, try again later
                log.exception("looking for missing blobs failed")
                failures = 1
            self._blob_done = max(self._blob_done, round_)
            progress, self._blob_progress = self._blob_progress, anyio.Event()
            progress.set()
            failed_rounds = failed_rounds + 1 if failures else 0
            delay = math.inf
            if failures:
                delay = RETRY_SECONDS[min(failed_rounds, len(RETRY_SECONDS)) - 1]
            with anyio.move_on_after(delay):
                await self._blob_kick.wait()

    async def _fetch_all(self, wanted: dict[str, tuple[BlobRef, set[str | None]]]) -> int:
        """Fetch every wanted blob, ``FETCHES`` at once; returns how many failed."""
        limit = anyio.CapacityLimiter(FETCHES)
        failed = 0

        async def one(ref: BlobRef, sources: set[str | None]) -> None:
            nonlocal failed
            async with limit:
                error: str | None = None
                for source in sorted(sources, key=lambda d: d or ""):
                    try:
                        await self._fetch_from(ref, source)
                        return
                    except Exception as exc:  # whatever it is, it is this blob's alone
                        error = f"blob {ref.cid} from {source or 'the user'}'s repository: {exc}"
                failed += 1
                self._blob_fetcher.failures[ref.cid] = error or f"blob {ref.cid}: no source"
                log.info("fetching a blob failed: %s", error)

        async with anyio.create_task_group() as tg:
            for ref, sources in wanted.values():
                tg.start_soon(one, ref, sources)
        return failed

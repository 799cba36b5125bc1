"""One push: queued writes to the PDS in ``applyWrites`` batches, exactly once.

Record keys are chosen locally, so every write names its record. A batch is sent with
``swapCommit`` = the last commit we know of this repo: if anything else wrote to the repo
since (another device, or our own earlier attempt that succeeded without us hearing back)
the PDS answers ``InvalidSwap`` and nothing is applied. After that, and after any failure
whose outcome is unknown (timeout, reset connection, the PDS's 500 for a create on an
existing key), the pusher **reconciles** before sending again: it reads each record's CID
and compares it with the CID computed locally — equal means already applied, so it is not
sent twice; absent or different decides between create and update. A record that another
writer changed since our last push is a conflict: it is recorded, and the local state wins
(the pull side merges properly).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .._errors import PermanentError, TransientError
from ..atproto import (
    Create,
    Delete,
    LatestCommit,
    RateLimitInfo,
    TidClock,
    Update,
    Write,
    XrpcClient,
    data_from_json,
)
from ._blobsync import BlobUploads, blob_refs
from ._budget import RateBudget
from ._carry import carry_unmapped
from ._outbox import OUTBOX, SENT, Outbox, PendingWrite

__all__ = ["PushResult", "Pusher", "RepoMoved"]

MAX_WRITES = 200
MAX_BYTES = 900_000  # under the PDS's 1 MB body limit, leaving room for the JSON envelope
UNREADABLE_TRIES = 5  # refusals without a readable error name before a write is dead-lettered

log = logging.getLogger("atsync.sync")


class RepoMoved(Exception):
    """``InvalidSwap`` on writes the engine also pulls: pull (and merge) before sending."""


@dataclass
class PushResult:
    pushed: int = 0
    already_applied: int = 0
    conflicts: int = 0
    dead_letters: int = 0
    rate_wait: float = 0.0  # seconds the budget asks to wait before the rest


class Pusher:
    """Pushes the outbox of one database to one account's repository."""

    def __init__(self, outbox: Outbox, budget: RateBudget | None) -> None:
        self.outbox = outbox
        self.budget = budget  # None: no pacing of our own (the PDS's answers still are)
        self.server_limit: RateLimitInfo | None = None  # applyWrites' RateLimit-* headers
        self.last_batch: Sequence[PendingWrite] = ()  # what the last attempt sent
        self.damaged = 0  # rows dead-lettered because they could not be read
        # Per collection, the record fields its binding maps (the rest is carried over).
        self.mapped: dict[str, frozenset[str]] = {}
        # Collections the engine pulls: an InvalidSwap on them is settled by a pull (which
        # merges) rather than by a reconcile (which can only let one side win).
        self.pulled: frozenset[str] | None = None
        self.batch_limit = MAX_WRITES  # shrinks to isolate a rejected write
        self.sent_swap: str | None = None  # the swapCommit the last batch was sent with
        self.needs_reconcile = False  # an unknown outcome is still unsettled
        self.fence_needed = False  # an unheard request might still land: see fence()
        self.blobs = BlobUploads(outbox.db)
        self._tids = TidClock()  # record keys chosen again (see _rekey)

    def _writes(self, batch: Sequence[PendingWrite]) -> tuple[list[Write], list[PendingWrite]]:
        """The batch as XRPC writes. A row that cannot be read back (a damaged file, a manual
        edit) is dead-lettered with the reason, so the rest of the queue goes on."""
        writes: list[Write] = []
        kept: list[PendingWrite] = []
        for w in batch:
            try:
                write = _as_write(w)
            except Exception as exc:  # whatever the damage is, it is this row's alone
                self.outbox.dead_letter(w, "UnreadableRow", f"the queued write is damaged: {exc}")
                self.damaged += 1
                continue
            writes.append(write)
            kept.append(w)
        return writes, kept

    def server_hold(self, points: int, now: float) -> tuple[int | None, float | None]:
        """What the PDS said about ``applyWrites`` in its last answer: how many points it
        still allows (None: no limit announced) and, when the next write does not fit, the
        Unix time its window resets."""
        info = self.server_limit
        if info is None or info.remaining is None:
            return None, None
        if info.reset_at is not None and info.reset_at <= now:
            return None, None  # that window is over
        if info.remaining >= points:
            return info.remaining, None
        return info.remaining, (info.reset_at if info.reset_at is not None else now + 60.0)

    def _one_commit_part(self, batch: list[PendingWrite]) -> int:
        """How much of ``batch`` can go in one commit. The reference PDS (0.5.x) deletes the
        blocks a commit replaces even when the same commit adds them back, so a commit in
        which one record takes the exact content another one leaves (two records swapping
        values, say) loses that block: the repository is corrupt and the record gone. Such a
        write waits for the next commit."""
        removed: set[str] = set()  # CIDs this commit replaces or deletes
        added: set[str] = set()  # CIDs it writes
        for i, write in enumerate(batch):
            old = self.outbox.remote_cid(write.collection, write.rkey)
            if (write.cid is not None and write.cid in removed) or (
                old is not None and old in added
            ):
                return i
            if old is not None and old != write.cid:
                removed.add(old)
            if write.cid is not None:
                added.add(write.cid)
        return len(batch)

    async def push_batch(
        self,
        did: str,
        client: XrpcClient,
        result: PushResult,
        collections: set[str] | None = None,
    ) -> bool:
        """Send the next batch (of ``collections``, or all); True if more may wait.

        Raises network errors."""
        if self.needs_reconcile:
            # The last failure's outcome is unknown and settling it failed too: settle first.
            await self.reconcile(did, client, [], result, check=True)
            self.needs_reconcile = False
        batch = self.outbox.next_batch(self.batch_limit, MAX_BYTES, collections)
        if not batch:
            return False
        if self.mapped:
            batch, settled = carry_unmapped(self.outbox, batch, self.mapped)
            if settled:
                result.already_applied += self.outbox.complete(settled)
            if not batch:
                return True
        writes, batch = self._writes(batch)
        if not batch:
            return True  # every row of it was damaged (now dead letters): look again
        cut = self._one_commit_part(batch)
        batch, writes = batch[:cut], writes[:cut]
        points = RateBudget.cost(w.op for w in batch)
        allowed, reset_at = self.server_hold(points, time.time())
        if allowed is not None and reset_at is not None:
            # Send what the PDS still allows now; hold the rest until its window resets.
            fits = _prefix_within(batch, allowed)
            if fits == 0:
                result.rate_wait = max(0.0, reset_at - time.time())
                return False
            batch, writes = batch[:fits], writes[:fits]
            points = RateBudget.cost(w.op for w in batch)
        wait = self.budget.wait_for(points) if self.budget is not None else 0.0
        if wait > 0:
            result.rate_wait = wait
            return False
        kept, fresh = await self.blobs.upload_for(
            did, client, batch, lambda w, error, why: self._refused(w, error, why, result)
        )
        if len(kept) < len(batch):
            batch, writes = _only(kept, batch, writes)
            if not batch:
                return True
        self.last_batch = batch  # a failure from here on is noted on these rows
        swap = self.outbox.get_state("commit_cid")
        if swap is None:
            # Even the first batch carries swapCommit: sent without one, it could land late
            # (after a timeout and a re-send) on top of newer writes and undo them.
            latest = await client.sync_get_latest_commit(did)
            self.outbox.set_commit(latest.cid, latest.rev)
            swap = latest.cid
        # No await from here to the request: what is marked is exactly what is sent.
        still = self.outbox.mark_attempted(batch)
        if len(still) < len(batch):
            batch, writes = _only(still, batch, writes)
            self.last_batch = batch
            if not batch:
                return True
        self.sent_swap = swap
        sent_at = time.time()
        try:
            answer = await client.apply_writes(did, writes, swap_commit=swap)
        except TransientError as exc:
            if exc.status is None:
                # Unanswered: the request may still be on its way and land while the repo
                # stays at ``swap``; until a commit moves it, no absence read is final.
                self.fence_needed = True
            raise
        except PermanentError as exc:
            if exc.error == "InvalidSwap":
                if self.pulled is not None and all(w.collection in self.pulled for w in batch):
                    # Another writer moved the repo: pull first, so its edits merge field by
                    # field with ours (and any unheard request of ours is recognised).
                    raise RepoMoved(str(exc)) from exc
                await self.reconcile(did, client, batch, result, check=True)
                return True
            if exc.error == "BlobNotFound" and self.blobs.forget(did, _blobs_of(batch) - fresh):
                return True  # the PDS forgot blobs uploaded before: upload them again, once
            if exc.error is None and max(w.attempts for w in batch) + 1 < UNREADABLE_TRIES:
                # A refusal whose body we could not read is no proof the writes are bad (the
                # answer may have been cut): settle against the PDS, then retry later.
                await self.reconcile(did, client, batch, result, check=True)
                raise TransientError(
                    f"unreadable refusal ({exc}); will check and retry", status=exc.status
                ) from exc
            self.outbox.note_error(batch, str(exc))
            if len(batch) > 1:
                # applyWrites is atomic: one bad write fails the batch. Halve until alone.
                self.batch_limit = max(1, len(batch) // 2)
                return True
            if _refused_record_key(exc) and self._rekey(batch[0]):
                return True  # sent again under another record key
            self.outbox.dead_letter(batch[0], exc.error, str(exc))
            result.dead_letters += 1
            self.batch_limit = MAX_WRITES
            return True
        self.fence_needed = False  # the repo moved past any request still on its way
        info = client.rate_limit
        if info is not None and info.observed_at >= sent_at:
            self.server_limit = info  # applyWrites' own bucket, as its answer told
        if self.budget is not None:
            self.budget.spend(points)
            self.outbox.set_state("budget", self.budget.dumps())
        commit = (answer.commit.cid, answer.commit.rev) if answer.commit else None
        result.pushed += self.outbox.complete(batch, commit=commit)
        if self.batch_limit < MAX_WRITES:
            self.batch_limit = min(MAX_WRITES, self.batch_limit * 2)
        return True

    def _rekey(self, write: PendingWrite) -> bool:
        """Give a create another record key, if atsync chose the refused one (a row of a
        ``rkey="tid"`` binding, whose key is not its record key): the record never reached
        the PDS under it (the check comes before any write). False: the key is the row's own
        (then the write is dead-lettered, naming the key)."""
        new = self._tids.next()
        db = self.outbox.db
        try:
            with db.transaction():
                moved = db.connection.execute(
                    f"UPDATE {OUTBOX} SET rkey = ?, attempted = 0, sent_op = NULL, "
                    "sent_cid = NULL WHERE seq = ? AND rkey = ? AND op = 'create' "
                    "AND key <> rkey",
                    (new, write.seq, write.rkey),
                ).rowcount
                if moved:
                    db.connection.execute(
                        f"DELETE FROM {SENT} WHERE collection = ? AND rkey = ?",
                        (write.collection, write.rkey),
                    )
        except sqlite3.IntegrityError:
            return False  # the new key is taken (two clocks met): dead-lettered instead
        if moved:
            log.warning(
                "the PDS refused the record key %s/%s; sending it as %s",
                write.collection, write.rkey, new,
            )  # fmt: skip
        return bool(moved)

    def _refused(
        self, write: PendingWrite, error: str | None, why: str, result: PushResult
    ) -> None:
        self.outbox.dead_letter(write, error, why)
        result.dead_letters += 1

    async def reconcile(
        self,
        did: str,
        client: XrpcClient,
        batch: Sequence[PendingWrite],
        result: PushResult,
        *,
        check: bool = False,
    ) -> None:
        """Read what the PDS holds and settle the outbox before anything is sent again.

        Unless ``check`` is set, a repo whose latest commit is still the one the batch was
        sent against received nothing: the batch can go again as it is. Otherwise (the
        commit moved, or the PDS answered 500 — e.g. for a delete of a record that is not
        there), every write that was ever sent is compared with the PDS, record by record.
        """
        latest = await client.sync_get_latest_commit(did)
        unmoved = self.sent_swap is not None and latest.cid == self.sent_swap
        if not check and unmoved:
            # Nothing landed *yet*: the unheard request may still arrive, and its swapCommit
            # would hold until the repo moves. The next commit of ours fences it off.
            self.fence_needed = True
            return
        if unmoved and self.fence_needed:
            # A request of ours may still be on its way with this swapCommit: a record read
            # absent now could appear a moment later (and a delete queued meanwhile would
            # count it as never created). Move the repo first, so what we read is final.
            latest = await self._fence_at(did, client, latest.cid)
        elif not unmoved:
            self.fence_needed = False  # the repo moved past every request still unheard
        writes = {w.seq: w for w in self.outbox.attempted_writes()}
        writes.update((w.seq, w) for w in batch)
        applied: list[PendingWrite] = []
        for w in writes.values():
            current = await self._current_cid(did, client, w)
            if (w.op == "delete" and current is None) or (w.op != "delete" and current == w.cid):
                applied.append(w)
                continue
            ours = w.sent(current) or (
                current is not None and self.outbox.ever_sent(w.collection, w.rkey, current)
            )
            base = self.outbox.remote_cid(w.collection, w.rkey)
            if current != base and not ours:
                result.conflicts += 1
                if base is None and current is not None:
                    # The repo already holds a record under this key that we never synced
                    # (another device, or an app that added sync later): never overwrite it
                    # silently. Kept locally and recorded; the pull side merges the two.
                    self.outbox.record_conflict(
                        w, base_cid=None, remote_cid=current, resolution="held"
                    )
                    self.outbox.dead_letter(
                        w,
                        "Conflict",
                        f"the repository already holds a different record at {w.collection}/"
                        f"{w.rkey} ({current}); the local version is kept and not pushed",
                    )
                    continue
                self.outbox.record_conflict(w, base_cid=base, remote_cid=current)
            self.outbox.rebase(w, remote_cid=current)
        result.already_applied += self.outbox.complete(applied, commit=(latest.cid, latest.rev))

    async def fence(self, did: str, client: XrpcClient, result: PushResult) -> None:
        """After an unheard request that had not landed when we looked, and with nothing else
        to send: move the repo with an empty ``applyWrites`` (a commit, no records, no rate
        points), so that request's ``swapCommit`` can no longer apply if it arrives late."""
        if not self.fence_needed:
            return
        swap = self.outbox.get_state("commit_cid")
        try:
            answer = await client.apply_writes(did, [], swap_commit=swap)
        except PermanentError as exc:
            if exc.error != "InvalidSwap":
                raise
            # Something landed after all: settle every write still queued.
            await self.reconcile(did, client, [], result, check=True)
            return
        if answer.commit is not None:
            self.outbox.set_commit(answer.commit.cid, answer.commit.rev)
        self.fence_needed = False

    async def renew_head(self, did: str, client: XrpcClient) -> None:
        """A new head commit, signed by the PDS with the key it holds for the account now
        (``StepRunner._renew_head``): the empty commit of a fence, off the known commit."""
        latest = await self._fence_at(did, client, self.outbox.get_state("commit_cid"))
        self.outbox.set_commit(latest.cid, latest.rev)

    async def _fence_at(self, did: str, client: XrpcClient, swap: str | None) -> LatestCommit:
        """Move the repo off ``swap`` (None: whatever it is at) with an empty commit; returns
        the repo's commit after. Either way (ours, or another one that beat it) no request
        sent with ``swap`` can land any more."""
        try:
            answer = await client.apply_writes(did, [], swap_commit=swap)
        except PermanentError as exc:
            if exc.error != "InvalidSwap":
                raise
            answer = None
        self.fence_needed = False
        if answer is not None and answer.commit is not None:
            return LatestCommit(answer.commit.cid, answer.commit.rev)
        return await client.sync_get_latest_commit(did)

    async def _current_cid(self, did: str, client: XrpcClient, w: PendingWrite) -> str | None:
        try:
            view = await client.get_record(did, w.collection, w.rkey)
        except PermanentError as exc:
            if exc.error == "RecordNotFound" or "not found" in str(exc).lower():
                return None
            raise
        return view.cid


def _refused_record_key(exc: PermanentError) -> bool:
    """The reference PDS refusing a record key it finds offensive (it matches a list of
    slurs against every record key given to it; a random TID can match). Its own TIDs are
    not checked."""
    return exc.error == "InvalidRequest" and "slur in record key" in str(exc)


def _as_write(w: PendingWrite) -> Write:
    if w.op == "delete":
        return Delete(w.collection, w.rkey)
    if w.record is None or w.cid is None:
        raise ValueError(f"a {w.op} without a record or CID")
    value = data_from_json(json.loads(w.record))
    if not isinstance(value, dict):
        raise ValueError("the record is not a JSON object")
    if w.op == "create":
        return Create(w.collection, value, w.rkey)
    return Update(w.collection, w.rkey, value)


def _only(
    kept: Sequence[PendingWrite], batch: Sequence[PendingWrite], writes: Sequence[Write]
) -> tuple[list[PendingWrite], list[Write]]:
    """``kept`` (a part of ``batch``) with their writes."""
    seqs = {w.seq for w in kept}
    return list(kept), [wr for w, wr in zip(batch, writes, strict=True) if w.seq in seqs]


def _blobs_of(batch: Sequence[PendingWrite]) -> set[str]:
    return {cid for w in batch for cid, _ in blob_refs(w.record)}


def _prefix_within(batch: Sequence[PendingWrite], points: int) -> int:
    """How many writes from the start of ``batch`` cost at most ``points``."""
    spent = 0
    for n, w in enumerate(batch):
        spent += RateBudget.cost((w.op,))
        if spent > points:
            return n
    return len(batch)

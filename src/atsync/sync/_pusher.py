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
from collections.abc import Sequence
from dataclasses import dataclass

from .._errors import PermanentError, TransientError
from ..atproto._cbor import data_from_json
from ..atproto._xrpc import Create, Delete, Update, Write, XrpcClient
from ._budget import RateBudget
from ._outbox import Outbox, PendingWrite

__all__ = ["PushResult", "Pusher"]

MAX_WRITES = 200
MAX_BYTES = 900_000  # under the PDS's 1 MB body limit, leaving room for the JSON envelope
UNREADABLE_TRIES = 5  # refusals without a readable error name before a write is dead-lettered


@dataclass
class PushResult:
    pushed: int = 0
    already_applied: int = 0
    conflicts: int = 0
    dead_letters: int = 0
    rate_wait: float = 0.0  # seconds the budget asks to wait before the rest


class Pusher:
    """Pushes the outbox of one database to one account's repository."""

    def __init__(self, outbox: Outbox, budget: RateBudget) -> None:
        self.outbox = outbox
        self.budget = budget
        self.batch_limit = MAX_WRITES  # shrinks to isolate a rejected write
        self.sent_swap: str | None = None  # the swapCommit the last batch was sent with
        self.needs_reconcile = False  # an unknown outcome is still unsettled
        self.fence_needed = False  # an unheard request might still land: see fence()

    def _writes(self, batch: Sequence[PendingWrite]) -> list[Write]:
        writes: list[Write] = []
        for w in batch:
            if w.op == "delete":
                writes.append(Delete(w.collection, w.rkey))
                continue
            value = data_from_json(json.loads(w.record or "{}"))
            if w.op == "create":
                writes.append(Create(w.collection, value, w.rkey))
            else:
                writes.append(Update(w.collection, w.rkey, value))
        return writes

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
        points = RateBudget.cost(w.op for w in batch)
        wait = self.budget.wait_for(points)
        if wait > 0:
            result.rate_wait = wait
            return False
        swap = self.outbox.get_state("commit_cid")
        if swap is None:
            # Even the first batch carries swapCommit: sent without one, it could land late
            # (after a timeout and a re-send) on top of newer writes and undo them.
            latest = await client.sync_get_latest_commit(did)
            self.outbox.set_commit(latest.cid, latest.rev)
            swap = latest.cid
        self.sent_swap = swap
        self.outbox.mark_attempted(batch)
        try:
            answer = await client.apply_writes(did, self._writes(batch), swap_commit=swap)
        except PermanentError as exc:
            if exc.error == "InvalidSwap":
                await self.reconcile(did, client, batch, result, check=True)
                return True
            if exc.error is None and max(w.attempts for w in batch) + 1 < UNREADABLE_TRIES:
                # A refusal whose body we could not read is no proof the writes are bad (the
                # answer may have been cut): settle against the PDS, then retry later.
                await self.reconcile(did, client, batch, result, check=True)
                raise TransientError(
                    f"unreadable refusal ({exc}); will check and retry", status=exc.status
                ) from exc
            if len(batch) > 1:
                # applyWrites is atomic: one bad write fails the batch. Halve until alone.
                self.batch_limit = max(1, len(batch) // 2)
                return True
            self.outbox.dead_letter(batch[0], exc.error, str(exc))
            result.dead_letters += 1
            self.batch_limit = MAX_WRITES
            return True
        self.fence_needed = False  # the repo moved past any request still on its way
        self.budget.spend(points)
        self.outbox.set_state("budget", self.budget.dumps())
        commit = (answer.commit.cid, answer.commit.rev) if answer.commit else None
        result.pushed += self.outbox.complete(batch, commit=commit)
        if self.batch_limit < MAX_WRITES:
            self.batch_limit = min(MAX_WRITES, self.batch_limit * 2)
        return True

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
        if not check and self.sent_swap is not None and latest.cid == self.sent_swap:
            # Nothing landed *yet*: the unheard request may still arrive, and its swapCommit
            # would hold until the repo moves. The next commit of ours fences it off.
            self.fence_needed = True
            return
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
            # Something landed after all: settle every write still queued, fence next time.
            await self.reconcile(did, client, [], result, check=True)
            return
        if answer.commit is not None:
            self.outbox.set_commit(answer.commit.cid, answer.commit.rev)
        self.fence_needed = False

    async def _current_cid(self, did: str, client: XrpcClient, w: PendingWrite) -> str | None:
        try:
            view = await client.get_record(did, w.collection, w.rkey)
        except PermanentError as exc:
            if exc.error == "RecordNotFound" or "not found" in str(exc).lower():
                return None
            raise
        return view.cid

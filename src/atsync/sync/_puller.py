"""One pull: the repository's state, verified, into the bound models — merged with local edits.

    repo CAR (getRepo, held in memory up to 32 MiB, larger ones streamed to a temporary
      file; indexed and decoded as it arrives)
      -> commit signature checked against the account's key, every block's hash, the MST
      -> the records of bound collections (direction "pull" or "both")
      -> compared with what was last synced (``_atsync_records``: CID and content per record)
      -> applied: new and changed records become rows, records gone from the repo delete
         their rows (deletes are found by comparing the whole set, never missed) — each
         merged three-way with a local edit still queued (``_apply.Applier``)

Rows written here are not captured (no echo). A record this device pushed is recognised by
its CID (what we last synced, or anything we ever sent) and not applied again. A record that
breaks its binding or Lexicon is not applied: it is kept in ``_atsync_rejected`` with the
reason. After a pull the stored ``swapCommit`` moves to the pulled commit, so the next push
does not pay an ``InvalidSwap`` for another device's commit. A crash in the middle leaves
the pulled commit unrecorded: the next pull applies what is still different (idempotent by
CID).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import cast

import anyio
import anyio.lowlevel
import libipld

from .._errors import PermanentError, VerificationError
from .._gc import gc_paused
from ..app import RemoteChange
from ..atproto import (
    CAR_MEMORY_LIMIT,
    CID,
    CarStream,
    MissingBlock,
    MstDiff,
    RepoFile,
    StreamWalk,
    VerifiedCommit,
    XrpcClient,
    data_from_json,
    decode_dag_cbor,
    decode_plain_record,
    diff_trees,
    mst_lookup,
)
from ..db import ModelDB
from ..lexicon import LexiconSet
from ._apply import Applier, Change, Known, OnPdsAction, PullResult
from ._binding import BoundBinding
from ._capture import Validator
from ._key_ahead import KeyAhead, KeySource
from ._merge import ConflictPolicy
from ._outbox import Outbox
from ._paced import PacedDelivery
from ._pull_position import PullPosition
from ._repo import OWN, Repo
from ._shared import Hlc
from ._spill import Spill

__all__ = ["Puller"]

log = logging.getLogger("atsync.sync")

CHUNK = 1000  # remote changes applied per transaction
GC_PAUSE_MAX = 5.0  # seconds of download a whole read keeps the collector paused, at most
# Trees of more nodes are not held (a pull after a gap reads such a repository whole):
# holding them would make a whole read's memory grow with the repository (~4 records a node).
TREE_NODES_MAX = 50_000
_NOT_HELD = object()
Progress = Callable[[int, int], None]


class Puller:
    """Pulls one account's repository into the bound models of one database."""

    def __init__(
        self,
        db: ModelDB,
        outbox: Outbox,
        bindings: Mapping[str, BoundBinding],
        *,
        applying_remote: Callable[[], AbstractContextManager[None]],
        validate: Validator | None,
        policy: ConflictPolicy,
        on_pds_action: OnPdsAction | None = None,
        watch: Iterable[str] = (),
        lexicons: LexiconSet | None = None,
        log_remote: Callable[[str, list[RemoteChange]], object] | None = None,
        repo: Repo = OWN,
        hlc: Hlc | None = None,
        paced: PacedDelivery | None = None,
    ) -> None:
        self._db = db
        self._paced = paced if paced is not None else PacedDelivery(db)
        self._repo = repo
        self._position = PullPosition(db, outbox, repo)
        self._tree = self._position.tree
        self._outbox = outbox
        self._by_collection = {b.collection: b for b in bindings.values() if b.direction != "push"}
        # Collections read for on_pds_action alone (no binding, no rows).
        self._watched = set(watch) - set(self._by_collection) if on_pds_action else set()
        self._slot: contextlib.AbstractAsyncContextManager[object] = contextlib.nullcontext()
        self._applier = Applier(
            db, outbox, self._by_collection,
            {b.collection for b in bindings.values() if b.direction != "pull"},
            applying_remote=applying_remote, validate=validate, policy=policy,
            on_pds_action=on_pds_action, lexicons=lexicons, log_remote=log_remote, repo=repo,
            hlc=hlc,
        )  # fmt: skip

    @property
    def collections(self) -> set[str]:
        return set(self._by_collection) | self._watched

    async def pull(
        self,
        did: str,
        client: XrpcClient,
        signing_key: KeySource,
        progress: Progress | None = None,
        download_slot: anyio.CapacityLimiter | None = None,
    ) -> PullResult:
        """Bring the bound models up to the repository's head. Raises network errors,
        ``VerificationError`` (then nothing of this pull is applied) and ``SigningKeyError``.
        ``signing_key`` is resolved beside the first request. ``download_slot``: held while
        talking to the PDS only, not while the read is verified and applied (followed
        repositories: the host serves the next one meanwhile)."""
        key = KeyAhead(signing_key)
        failure: Exception | None = None
        result = PullResult()
        pulling, cut = True, False

        async def resolve_key(scope: anyio.CancelScope) -> None:
            nonlocal cut
            await key.resolve()
            if key.failed and pulling:
                # Nothing can be verified, so nothing will be applied: stop the download
                # (a whole getRepo on a new device) instead of finishing it for nothing.
                cut = True
                scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(resolve_key, tg.cancel_scope)
            try:
                await self._pull(did, client, key, result, progress, download_slot)
            except Exception as exc:  # raised as itself below, not wrapped in a group
                failure = exc
            pulling = False
            tg.cancel_scope.cancel()  # a key nobody needed (the head had not moved)
        if cut:
            await key.get()  # raises SigningKeyError
        if failure is not None:
            raise failure
        return result

    async def _pull(
        self,
        did: str,
        client: XrpcClient,
        key: KeyAhead,
        result: PullResult,
        progress: Progress | None,
        download_slot: anyio.CapacityLimiter | None,
    ) -> None:
        self._slot = download_slot or contextlib.nullcontext()
        written = self._position.written_mark()
        pulled = self._position.pulled_commit()
        if pulled is not None and self.covers_collections():
            # Read before, these collections included: nothing to do if the head is the same.
            async with self._slot:
                latest = await client.sync_get_latest_commit(did)
            if latest.cid == pulled:
                result.commit, result.rev, result.unchanged = latest.cid, latest.rev, True
                return
            if await self._pull_since(did, client, key, result, progress, written):
                return
        known = self._known()
        known_cids = {record: was.cid for record, was in known.items()}
        spill = Spill(decode=self.collections, walk=True, memory_limit=CAR_MEMORY_LIMIT)
        # The spill ends first: what its stream decoded is let go before the collector
        # resumes, whose first pass would otherwise walk all of it.
        with contextlib.ExitStack() as paused, spill:
            # A whole read builds tens of thousands of objects that all last until it ends:
            # the collector would walk them again and again for nothing (a tenth of the time).
            # Paused for the whole read while the repository is held in memory (<= 32 MiB of
            # CAR) and the download is short (a slow network must not keep it off for the
            # whole process); otherwise it resumes, and decoding pauses it per chunk.
            paused.enter_context(gc_paused())
            commit, rev, data, changes, nodes, in_memory = await self._read_whole(
                did, client, key, known_cids, spill, paused
            )
            result.commit, result.rev = commit, rev
            if in_memory and changes:
                # A bounded bulk load (its CAR fitted in memory; followed repositories' loads
                # overlap): one checkpoint after the last, off the way of whoever waits for
                # the rows (the engine runs it when the database says it is due).
                paused.enter_context(self._db.checkpoints_deferred())
            await self._apply(did, rev, changes, known, result, progress)
            self._position.record(
                commit, rev, data, tree_limit=TREE_NODES_MAX, collections=self.collections,
                tree=nodes, written=written,
            )  # fmt: skip
            # Let go of the read (records, nodes, changes) before the collector resumes as
            # this block ends: its first pass would walk all of it, for nothing (40-60 ms
            # for 20,000 records, between the rows landing and wait_pulled() returning).
            del changes, nodes, known, known_cids

    async def _read_whole(
        self,
        did: str,
        client: XrpcClient,
        key: KeyAhead,
        known_cids: dict[tuple[str, str], str | None],
        spill: Spill,
        paused: contextlib.ExitStack,
    ) -> tuple[str, str, str, list[Change], list[tuple[bytes, bytes]] | None, bool]:
        """Download and read the whole repository; ``paused`` ends the collector's pause
        when the CAR outgrows memory or the download takes long. The last item: whether the
        CAR was held in memory."""
        stream = spill.stream
        resume_at = time.monotonic() + GC_PAUSE_MAX

        def feed(chunk: bytes) -> None:
            spill.feed(chunk)
            if not stream.in_memory or time.monotonic() > resume_at:
                paused.close()

        # Blocks are hash-checked and decoded as they arrive, while the network is slow.
        async with self._slot:
            await client.sync_get_repo(did, None, on_chunk=feed)
        signing_key = await key.get()
        read = await anyio.to_thread.run_sync(
            self._read, spill.finish(), did, signing_key, known_cids, stream
        )
        return (*read, stream.in_memory)

    async def _pull_since(
        self,
        did: str,
        client: XrpcClient,
        key: KeyAhead,
        result: PullResult,
        progress: Progress | None,
        written: int,
    ) -> bool:
        """Catch up by what changed since the pulled rev (``getRepo?since=``) over the held
        tree; False (nothing applied) when no tree is held for the pulled state, or the
        changes lack a block: then the whole repository is read."""
        rev, data = self.position()
        if rev is None or data is None or self._tree.root() != data:
            return False
        with Spill(decode=self.collections, memory_limit=CAR_MEMORY_LIMIT) as spill:
            try:
                async with self._slot:
                    await client.sync_get_repo(did, None, since=rev, on_chunk=spill.feed)
            except PermanentError as exc:
                # A rev the repository's history no longer has (after a #sync), or a PDS
                # without ``since``: the whole repository says where things stand.
                log.info("no changes since rev %s (%s): reading it all", rev, exc)
                return False
            signing_key = await key.get()
            try:
                # Off the event loop, as a whole read: a long absence makes a large delta.
                # (It reads the held tree and the sync tables; the engine's own push does
                # not run meanwhile, and the app's writes only add what ``written`` bounds.)
                commit, new_rev, new_data, changes, known, diff = await anyio.to_thread.run_sync(
                    self._read_since, spill.finish(), did, signing_key, spill.stream, data, written
                )
            except MissingBlock as exc:
                log.info("the changes since rev %s are incomplete (%s): reading it all", rev, exc)
                return False
        result.commit, result.rev = commit, new_rev
        await self._apply(did, new_rev, changes, known, result, progress)
        self._position.record(
            commit, new_rev, new_data, tree_limit=TREE_NODES_MAX, diff=diff, written=written
        )
        return True

    def covers_collections(self) -> bool:
        """Whether the last whole read included every collection pulled now: a binding added
        since (a new version of the app) needs one, or its records were never read."""
        return self._position.covers(self.collections)

    def position(self) -> tuple[str | None, str | None]:
        """The rev and MST root (``data``) the local state includes."""
        return self._position.position()

    def apply_commit(self, did: str, event: VerifiedCommit) -> PullResult:
        """Apply one verified ``#commit`` that directly follows ``position()`` — its
        operations only, no download — in one transaction with the new position and the
        stream cursor (at most 200 operations: no need to yield in between)."""
        result = PullResult(commit=str(event.commit), rev=event.rev)
        # Only the records the event touches: a live event costs the same in a repository
        # of twenty records or twenty thousand.
        known = self._known([(op.collection, op.rkey) for op in event.ops])
        changes: list[Change] = []
        for op in event.ops:
            if op.collection not in self.collections:
                continue
            was = known.get((op.collection, op.rkey))
            if op.cid is None:
                if was is not None and was.cid is not None:
                    changes.append((op.collection, op.rkey, None, None, None))
            elif was is None or was.cid != str(op.cid):
                changes.append((op.collection, op.rkey, str(op.cid), op.record, None))
        diff = self._position.tree_after(event)
        # The records the event puts in the held tree: any later delete of them shows in the
        # next catch-up's comparison, so this device's writes of them need no note.
        kept = [(op.collection, op.rkey) for op in event.ops if op.cid is not None]
        with self._db.transaction():
            self._applier.apply_chunk(did, event.rev, changes, known, result)
            self._position.record(
                str(event.commit), event.rev, str(event.data), tree_limit=TREE_NODES_MAX,
                cursor=event.seq, diff=diff, in_tree=kept if diff is not None else None,
            )  # fmt: skip
        return result

    def stream_passed(self, seq: int | None) -> None:
        """The local state includes the stream's events up to ``seq``: resume after it."""
        if seq is not None:
            self._position.stream_passed(seq)

    # -- reading ----------------------------------------------------------------------------

    def _read(
        self,
        path: Path | None,
        did: str,
        signing_key: str | None,
        known: Mapping[tuple[str, str], str | None],
        stream: CarStream,
    ) -> tuple[str, str, str, list[Change], list[tuple[bytes, bytes]] | None]:
        """Verify the CAR (memory bounded whatever its size) and list the changes: records of
        bound collections whose CID differs from what we hold, and records we hold that the
        repository no longer has (a whole comparison: no delete is missed)."""
        changes: list[Change] = []
        seen: set[tuple[str, str]] = set()  # of the records we hold: few on a new device
        collections = self.collections
        node_cids: list[CID] | None = []  # the tree, held for the next pull (if not too big)

        def on_node(cid: CID) -> None:
            nonlocal node_cids
            if node_cids is not None:
                node_cids.append(cid)
                if len(node_cids) > TREE_NODES_MAX:
                    node_cids = None

        with gc_paused(), RepoFile(path, did=did, signing_key=signing_key, stream=stream) as repo:
            walk = repo.walked()
            if walk is not None and not known:  # a first read: every record a new row
                commit = repo.commit
                changes, nodes = self._read_walked(repo, walk, stream)
                return str(commit.cid), commit.rev, str(commit.data), changes, nodes
            for collection, rkey, cid in repo.leaves(on_node):
                if collection not in collections:
                    continue
                text = str(cid)
                if known:
                    key = (collection, rkey)
                    held = known.get(key, _NOT_HELD)
                    if held is not _NOT_HELD:
                        seen.add(key)
                        if held == text:
                            continue  # unchanged, or our own write coming back: not read
                changes.append(_record_change(repo, collection, rkey, cid, text))
            commit = repo.commit
            for (collection, rkey), cid_held in known.items():
                if cid_held is not None and (collection, rkey) not in seen:
                    changes.append((collection, rkey, None, None, None))  # gone from the repo
            nodes = None
            if node_cids is not None:
                blocks = repo.blocks
                nodes = [(bytes(cid), bytes(blocks[cid])) for cid in node_cids]
            return str(commit.cid), commit.rev, str(commit.data), changes, nodes

    def _read_walked(
        self, repo: RepoFile, walk: StreamWalk, stream: CarStream
    ) -> tuple[list[Change], list[tuple[bytes, bytes]] | None]:
        """``_read`` of a tree the stream walked while downloading, for a device that holds
        none of its records: the changes straight from what the stream decoded."""
        collections = self.collections
        records, record_json = stream.records, stream.record_json
        changes: list[Change] = []
        for _, collection, rkey, raw in walk.leaves:
            if collection not in collections:
                continue
            record = records.get(raw)
            if record is not None:  # decoded ahead, its hash and data model checked
                text = str(libipld.encode_multibase("b", raw))
                changes.append((collection, rkey, text, record, record_json[raw]))
            else:
                cid = CID.from_raw(raw)
                changes.append(_record_change(repo, collection, rkey, cid, str(cid)))
        nodes = None
        if len(walk.nodes) <= TREE_NODES_MAX:
            data, offsets = stream.data, stream.offsets
            nodes = []
            for raw in walk.nodes:
                start, size = offsets[raw]
                nodes.append((raw, data[start : start + size]))
        return changes, nodes

    def _read_since(
        self,
        path: Path | None,
        did: str,
        signing_key: str | None,
        stream: CarStream,
        old_root: str,
        written: int,
    ) -> tuple[str, str, str, list[Change], dict[tuple[str, str], Known], MstDiff]:
        """Verify a ``getRepo?since=`` CAR and list the changes it makes to the held tree
        (``MissingBlock``: it lacks one; the whole repository must be read).

        A record this device wrote since its last pull is in neither tree's comparison
        when another device deleted it since: it was not in the old tree, and the new one
        has no node for it. Such a record that the new tree's changed nodes do not hold is
        gone (a record the new tree has and the old one had not sits in a changed node);
        ``written`` bounds them to the writes that landed before this pull began."""
        collections = self.collections
        with gc_paused(), RepoFile(path, did=did, signing_key=signing_key, stream=stream) as repo:
            commit = repo.commit
            diff = diff_trees(commit.data, repo.blocks, CID.parse(old_root), self._tree)
            added: dict[tuple[str, str], CID] = {}
            for path_key, cid in diff.added.items():
                collection, _, rkey = path_key.partition("/")
                if collection in collections:
                    added[(collection, rkey)] = cid
            # Gone: what left with the old tree's nodes, and what this device wrote since
            # that the new tree does not hold. Such a write is in no changed node when it
            # was deleted elsewhere (it was in no tree held here), but also when it ended as
            # it was at the last pull (an edit and its undo): the new tree is asked.
            left = {tuple(k.partition("/")[::2]) for k in diff.removed}
            # Read only: ChainMap's mutable typing aside, the held tree is never written here.
            new_tree = ChainMap(diff.new_nodes, cast("MutableMapping[CID, bytes]", self._tree))
            gone = [
                (collection, rkey)
                for collection, rkey in sorted(left | self._position.written_since_pull(written))
                if collection in collections
                and f"{collection}/{rkey}" not in diff.added
                and (
                    (collection, rkey) in left
                    or mst_lookup(new_tree, commit.data, f"{collection}/{rkey}")[0] is None
                )
            ]
            known = self._known([*added, *gone])
            changes: list[Change] = []
            missing: list[tuple[str, str, CID]] = []
            for (collection, rkey), cid in added.items():
                was = known.get((collection, rkey))
                if was is not None and was.cid == str(cid):
                    continue  # in a changed node, but itself unchanged
                if cid in repo.blocks:
                    changes.append(_record_change(repo, collection, rkey, cid, str(cid)))
                else:
                    missing.append((collection, rkey, cid))
            if missing:
                # The PDS leaves out a block it had before ``since`` (a record whose content
                # another record already has): its content is known here, or all is read.
                held = self._records_by_cid({str(cid) for *_, cid in missing})
                for collection, rkey, cid in missing:
                    record_json = held.get(str(cid))
                    if record_json is None:
                        raise MissingBlock(f"{collection}/{rkey} ({cid}) is not in the delta")
                    record = data_from_json(json.loads(record_json))
                    changes.append((collection, rkey, str(cid), record, None))
            for collection, rkey in gone:
                was = known.get((collection, rkey))
                if was is not None and was.cid is not None:
                    changes.append((collection, rkey, None, None, None))
            return str(commit.cid), commit.rev, str(commit.data), changes, known, diff

    # -- applying ---------------------------------------------------------------------------

    async def _apply(
        self,
        did: str,
        rev: str,
        changes: list[Change],
        known: dict[tuple[str, str], Known],
        result: PullResult,
        progress: Progress | None,
    ) -> None:
        total = len(changes)
        if self._repo.own:
            models = {b.model.name for b in self._by_collection.values()}
            fresh = frozenset(m for m in models if not self._db.query(m, limit=1))
        else:
            # Nothing held of this repository yet: no row has its AT URI keys.
            fresh = frozenset(
                b.model.name for b in self._by_collection.values() if not b.shared and not known
            )
        self._applier.restoring(fresh)
        # A followed repository's chunks are applied in a worker thread: SQLite's part of
        # the work (inserts, the commit) runs beside the event loop's (the next downloads),
        # and the loop is not held ~20 ms per chunk. Not the user's own, whose merges may
        # call the app's conflict policy, nor with an on_pds_action hook: the app's code
        # runs in the app's thread (a followed repository's rows are never merged). Live
        # queries are told in the loop's thread too, and at a pace (see _paced).
        threaded = not self._repo.own and not self._applier.has_hook
        try:
            for start in range(0, total, CHUNK):
                chunk = changes[start : start + CHUNK]
                held: list[object] = []
                try:
                    if threaded:
                        await anyio.to_thread.run_sync(
                            self._apply_held, did, rev, chunk, known, result, held
                        )
                    else:
                        self._apply_held(did, rev, chunk, known, result, held)
                finally:
                    self._paced.add(held)
                if progress is not None:
                    progress(min(total, start + CHUNK), total)
                await anyio.lowlevel.checkpoint()  # the app's writes go between two chunks
        finally:
            self._applier.restoring(frozenset())
            self._paced.pull_ended()

    def _apply_held(
        self,
        did: str,
        rev: str,
        chunk: list[Change],
        known: dict[tuple[str, str], Known],
        result: PullResult,
        held: list[object],
    ) -> None:
        with self._db.changes_held(held), self._db.transaction():
            self._applier.apply_chunk(did, rev, chunk, known, result)

    def _known(self, keys: list[tuple[str, str]] | None = None) -> dict[tuple[str, str], Known]:
        """What was last synced, per record of the pulled collections (or of ``keys``)."""
        if keys is not None:
            found: dict[tuple[str, str], Known] = {}
            where, params = self._repo.where()
            by_collection: dict[str, list[str]] = {}
            for collection, rkey in keys:
                by_collection.setdefault(collection, []).append(rkey)
            for collection, rkeys in by_collection.items():
                for start in range(0, len(rkeys), 500):
                    chunk = rkeys[start : start + 500]
                    for rkey, *known in self._db.execute(
                        f"SELECT rkey, model, key, cid, record FROM {self._repo.table} "
                        f"WHERE {where} AND collection = ? "
                        f"AND rkey IN ({', '.join('?' * len(chunk))})",
                        (*params, collection, *chunk),
                    ):
                        found[(collection, rkey)] = Known(*known)
            return found
        collections = sorted(self.collections)
        if not collections:
            return {}
        marks = ", ".join("?" * len(collections))
        where, params = self._repo.where()
        return {
            (c, r): Known(m, k, cid, rec)
            for c, r, m, k, cid, rec in self._db.execute(
                f"SELECT collection, rkey, model, key, cid, record FROM {self._repo.table} "
                f"WHERE {where} AND collection IN ({marks})",
                (*params, *collections),
            ).fetchall()
        }

    def _records_by_cid(self, cids: set[str]) -> dict[str, str]:
        """The content (JSON) of held records with these CIDs, as last synced."""
        found: dict[str, str] = {}
        wanted = sorted(cids)
        where, params = self._repo.where()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            for cid, record in self._db.execute(
                f"SELECT cid, record FROM {self._repo.table} WHERE {where} AND record IS NOT NULL "
                f"AND cid IN ({', '.join('?' * len(chunk))})",
                (*params, *chunk),
            ):
                found[cid] = record
        return found

    def reject_all(self, did: str, reason: str, detail: str) -> None:
        """The whole pull was refused (a forged or damaged repository): say so once."""
        self._applier.reject_all(did, reason, detail)


def _record_change(repo: RepoFile, collection: str, rkey: str, cid: CID, text: str) -> Change:
    """The change a record of the CAR makes (``text``: its CID as a string): decoded ahead
    while downloading, or now."""
    decoded = repo.decoded_record(cid)
    if decoded is not None:
        return (collection, rkey, text, decoded[0], decoded[1])
    data = repo.blocks[cid]
    if not cid.matches(data):
        raise VerificationError(f"{collection}/{rkey}: block does not match {text}")
    # Plain records (most) decode fast, their data model proven, with their JSON.
    plain = decode_plain_record(data)
    if plain is not None:
        return (collection, rkey, text, plain[0], plain[1])
    record = decode_dag_cbor(data)
    if not isinstance(record, dict):
        raise VerificationError(f"{collection}/{rkey}: the record is not a map")
    return (collection, rkey, text, record, None)

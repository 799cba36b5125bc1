"""Verify a firehose ``#commit`` event as sync 1.1 defines it (atproto.com/specs/sync).

The signed commit in ``blocks`` fixes the repository's new tree, but the ``ops`` list beside it
is not signed: a buggy or hostile producer could leave a delete out, or describe a record that
is not there. Sync 1.1 closes that gap by *operation inversion*: undo every op on the partial
tree carried in ``blocks`` (a create becomes a delete, a delete an insert of ``prev``, an update
a change back to ``prev``); if the list is complete and true, the result is the tree before
the commit, whose root the event carries as ``prevData``.

``prevData`` and ``since`` are not signed either. The caller, who knows the repository's last
verified ``rev`` and ``data``, compares them with ``VerifiedCommit.since``/``prev_data``: a
mismatch there is a gap in the stream (resynchronize), not a forged event, so it is not an
error here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from atsync._errors import InvalidSyntaxError, VerificationError

from ._car import read_car
from ._cbor import CID
from ._firehose import FirehoseFrame
from ._mst import mst_lookup
from ._mst_ops import EMPTY_TREE, PartialMst
from ._syntax import Tid, validate_did, validate_nsid, validate_record_key, validate_tid
from ._verify import SigningKey, _decode_record_block, verify_commit

__all__ = ["RepoOp", "VerifiedCommit", "verify_commit_event"]

# Hard limits of atproto.com/specs/sync for #commit events.
MAX_BLOCKS_BYTES = 2_000_000
MAX_RECORD_BYTES = 1_000_000
MAX_OPS = 200
# "a clock drift window of a few minutes" for revs in the future.
DEFAULT_MAX_CLOCK_SKEW = 300.0

Action = Literal["create", "update", "delete"]


@dataclass(frozen=True)
class RepoOp:
    """One verified record operation. ``cid`` is the record now (``None`` for a delete),
    ``prev`` the record before (``None`` for a create); ``record`` is the decoded record for a
    create or update, checked against ``cid`` and the data model."""

    action: Action
    collection: str
    rkey: str
    cid: CID | None
    prev: CID | None
    record: dict[str, Any] | None

    @property
    def path(self) -> str:
        return f"{self.collection}/{self.rkey}"


@dataclass(frozen=True)
class VerifiedCommit:
    """A ``#commit`` event that passed ``verify_commit_event``.

    ``commit`` is the signed commit's CID, ``data`` its MST root (store it: the next event's
    ``prev_data`` must equal it), ``since``/``prev_data`` what the event claims came before
    (unsigned: compare them with what you stored), ``seq`` the stream position if present,
    ``blocks`` the event's blocks, each hash-checked (among them the tree's new nodes).
    """

    did: str
    rev: str
    since: str | None
    commit: CID
    data: CID
    prev_data: CID | None
    ops: tuple[RepoOp, ...]
    seq: int | None = None
    blocks: Mapping[CID, bytes] = field(default_factory=dict, repr=False, compare=False)


def _malformed(why: str) -> VerificationError:
    return VerificationError(f"malformed #commit event: {why}")


def _opt_cid(value: Any, what: str) -> CID | None:
    if value is None or isinstance(value, CID):
        return value
    raise _malformed(f"{what} is not a CID or null")


def _body(event: FirehoseFrame | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(event, FirehoseFrame):
        if event.type != "#commit":
            raise _malformed(f"the frame is {event.type or 'untyped'}, not #commit")
        return event.body
    if not isinstance(event, Mapping):
        raise _malformed("the body is not a map")
    return event


def _parse_op(i: int, raw: Any) -> RepoOp:
    """The op's fields, checked; its record is read later."""
    if not isinstance(raw, Mapping):
        raise _malformed(f"op {i} is not a map")
    action, path = raw.get("action"), raw.get("path")
    if action not in ("create", "update", "delete"):
        raise _malformed(f"op {i} has action {action!r}, not create, update or delete")
    if not isinstance(path, str):
        raise _malformed(f"op {i} has no path")
    collection, sep, rkey = path.partition("/")
    try:
        if not sep:
            raise InvalidSyntaxError("no '/'")
        validate_nsid(collection)
        validate_record_key(rkey)
    except InvalidSyntaxError as e:
        raise _malformed(f"op {i} path {path!r} is not collection/rkey: {e}") from e
    cid = _opt_cid(raw.get("cid"), f"op {i} ({path}) 'cid'")
    prev = _opt_cid(raw.get("prev"), f"op {i} ({path}) 'prev'")
    if action == "delete":
        if cid is not None:
            raise _malformed(f"op {i} deletes {path} but names a record CID {cid}")
    elif cid is None:
        raise _malformed(f"op {i} ({action} {path}) has no record CID")
    if action != "create" and prev is None:
        # Without the previous CID the op cannot be undone: sync 1.1 requires it.
        raise _malformed(f"op {i} ({action} {path}) has no 'prev' CID")
    return RepoOp(action, collection, rkey, cid, prev if action != "create" else None, None)


def _check_rev(rev: str, prev_rev: str | None, now: float | None, skew: float) -> None:
    if prev_rev is not None and rev <= prev_rev:
        raise VerificationError(f"stale rev: {rev} is not after the last rev {prev_rev}")
    at = Tid.parse(rev).timestamp_us / 1e6
    clock = time.time() if now is None else now
    if at > clock + skew:
        raise VerificationError(
            f"rev {rev} is {at - clock:.0f} s in the future (more than {skew:.0f} s of drift)"
        )


def verify_commit_event(
    event: FirehoseFrame | Mapping[str, Any],
    signing_key: SigningKey,
    *,
    did: str | None = None,
    prev_rev: str | None = None,
    now: float | None = None,
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
    require_prev_data: bool = True,
) -> VerifiedCommit:
    """Check a ``#commit`` event (a ``FirehoseFrame`` or its decoded body) and return what it
    says, verified; ``VerificationError`` naming what is wrong otherwise.

    Checked: the fields' shapes and the spec's size limits; ``repo`` is ``did`` (when given);
    ``rev`` is a TID after ``prev_rev`` (when given) and not more than ``max_clock_skew``
    seconds ahead of ``now``; ``blocks`` is a CAR whose root is ``commit`` and whose every
    block hashes to its CID; the commit is ``repo``'s, signed by ``signing_key`` (a ``did:key``
    or ``(alg, public key)``), with the event's ``rev``; every create/update's record block is
    there, matches its CID and is a data-model map; and inverting the ops on the commit's tree
    gives ``prevData`` — which also proves each op's CID and ``prev`` right.

    A repository's first commit (``since`` and ``prevData`` both absent) must invert to the
    empty tree. Another commit without ``prevData`` (a pre-1.1 producer) is refused unless
    ``require_prev_data=False``; then each op is only checked against the new tree (a create
    or update holds its CID, a delete is absent), which cannot show that an op is missing.
    """
    body = _body(event)
    repo, rev, since = body.get("repo"), body.get("rev"), body.get("since")
    commit_cid, blocks, raw_ops = body.get("commit"), body.get("blocks"), body.get("ops")
    prev_data = _opt_cid(body.get("prevData"), "'prevData'")
    if not isinstance(repo, str):
        raise _malformed("'repo' is missing or not a string")
    if not isinstance(rev, str) or (since is not None and not isinstance(since, str)):
        raise _malformed("'rev' must be a string and 'since' a string or null")
    try:
        validate_did(repo)
        validate_tid(rev)
        if since is not None:
            validate_tid(since)
    except InvalidSyntaxError as e:
        raise _malformed(str(e)) from e
    if since is not None and since >= rev:
        raise _malformed(f"'since' {since} is not before 'rev' {rev}")
    if not isinstance(commit_cid, CID):
        raise _malformed("'commit' is missing or not a CID")
    if not isinstance(blocks, bytes):
        raise _malformed("'blocks' is missing or not bytes")
    if not isinstance(raw_ops, list):
        raise _malformed("'ops' is missing or not a list")
    if len(blocks) > MAX_BLOCKS_BYTES:
        raise _malformed(f"'blocks' has {len(blocks)} bytes, over the {MAX_BLOCKS_BYTES} limit")
    if len(raw_ops) > MAX_OPS:
        raise _malformed(f"{len(raw_ops)} ops, over the limit of {MAX_OPS}")
    seq = body.get("seq")
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    if did is not None and repo != did:
        raise VerificationError(f"wrong DID: the event is for {repo}, expected {did}")
    _check_rev(rev, prev_rev, now, max_clock_skew)

    ops = [_parse_op(i, raw) for i, raw in enumerate(raw_ops)]
    paths = [op.path for op in ops]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise _malformed(f"{dup} appears in more than one op")

    car = read_car(blocks)
    if car.root != commit_cid:
        raise VerificationError(f"the blocks' CAR root {car.root} is not the commit {commit_cid}")
    commit = verify_commit(car.blocks, commit_cid, repo, signing_key)
    if commit.rev != rev:
        raise VerificationError(
            f"rev mismatch: the event says {rev}, the signed commit {commit.rev}"
        )

    expected = prev_data
    if expected is None and since is None:
        expected = EMPTY_TREE  # the repository's first commit: it starts from nothing
    if expected is None:
        if require_prev_data:
            raise VerificationError(
                f"no prevData: commit {commit_cid} (rev {rev}) cannot be checked by inversion"
            )
        _check_ops_in_tree(car.blocks, commit.data, ops)
    else:
        got = _invert(car.blocks, commit.data, ops)
        if got != expected:
            claimed = "prevData" if prev_data is not None else "the empty tree (first commit)"
            raise VerificationError(
                f"inversion does not give prevData: undoing the {len(ops)} op(s) of commit "
                f"{commit_cid} gives tree {got}, but {claimed} is {expected}"
            )
    # The records last: a wrong CID in an op is then reported as such, not as a missing block.
    verified = tuple(_with_record(car.blocks, op) for op in ops)
    return VerifiedCommit(
        repo, rev, since, commit_cid, commit.data, prev_data, verified, seq, car.blocks
    )


def _with_record(blocks: Mapping[CID, bytes], op: RepoOp) -> RepoOp:
    if op.cid is None:
        return op
    data = blocks.get(op.cid)
    if data is not None and len(data) > MAX_RECORD_BYTES:
        raise VerificationError(
            f"record {op.path} ({op.cid}) has {len(data)} bytes, over {MAX_RECORD_BYTES}"
        )
    return replace(op, record=_decode_record_block(blocks, op.cid, op.path))


def _mismatch(op: RepoOp, holds: CID | None) -> VerificationError:
    if holds is None:
        return VerificationError(f"{op.action} of {op.path}: the commit's tree does not hold it")
    if op.cid is None:
        return VerificationError(
            f"delete of {op.path}: the commit's tree still holds it (CID {holds})"
        )
    return VerificationError(
        f"CID mismatch: the {op.action} of {op.path} names {op.cid}, "
        f"the commit's tree holds {holds}"
    )


def _invert(blocks: Mapping[CID, bytes], data: CID, ops: list[RepoOp]) -> CID:
    tree = PartialMst(blocks, data)
    for op in ops:
        tree.context = f"undo the {op.action} of {op.path}"
        holds = tree.get(op.path)
        if holds != op.cid:
            raise _mismatch(op, holds)
        if op.action == "create":
            tree.delete(op.path)
        elif op.action == "update":
            assert op.prev is not None  # _parse_op requires it
            tree.update(op.path, op.prev)
        else:
            assert op.prev is not None
            tree.add(op.path, op.prev)
    return tree.root_cid()


def _check_ops_in_tree(blocks: Mapping[CID, bytes], data: CID, ops: list[RepoOp]) -> None:
    for op in ops:
        holds, _ = mst_lookup(blocks, data, op.path)
        if holds != op.cid:
            raise _mismatch(op, holds)

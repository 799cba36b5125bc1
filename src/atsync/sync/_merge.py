"""Three-way merge of one row: the base (as last synced), the local edit, the remote version.

Fields changed on one side only are both kept. A field changed on both sides to different
values is a conflict, decided by the policy: ``"local"`` (the default: this device's value,
which it then pushes — so every device ends with the value of the last pusher), ``"remote"``,
or a callable ``(base, local, remote) -> merged`` that gets the whole rows (``base`` may be
None; a row that was deleted is None) and returns the merged row or None (deleted). An edit
on one side against a delete on the other is a conflict too, decided the same way. A json
column is one value: it is not merged inside.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .._errors import SchemaError

__all__ = ["ConflictPolicy", "MergeOutcome", "check_policy", "merge_rows"]

Row = dict[str, Any]
ConflictPolicy = (
    Literal["local", "remote"]
    | Callable[[Row | None, Row | None, Row | None], Mapping[str, Any] | None]
)
DELETED = "$deleted"  # the conflict of an edit against a delete


@dataclass(frozen=True, slots=True)
class MergeOutcome:
    merged: Row | None  # None: the row is deleted
    conflicted: tuple[str, ...]  # fields changed on both sides ("$deleted": edit vs delete)


def check_policy(policy: object) -> ConflictPolicy:
    if policy in ("local", "remote") or callable(policy):
        return policy  # type: ignore[return-value,unused-ignore]
    raise SchemaError(
        f"conflicts= must be 'local', 'remote' or a callable(base, local, remote), got {policy!r}"
    )


def merge_rows(
    base: Row | None,
    local: Row | None,
    remote: Row | None,
    policy: ConflictPolicy,
    key_field: str,
) -> MergeOutcome:
    """Merge ``local`` and ``remote`` against ``base`` (see the module docstring)."""
    if local is None or remote is None:
        if local is None and remote is None:
            return MergeOutcome(None, ())
        # One side deleted. If the other side did not change the row, the delete wins.
        survivor = local if local is not None else remote
        if base is not None and survivor is not None and _same(base, survivor, key_field):
            return MergeOutcome(None, ())
        return MergeOutcome(_decide(base, local, remote, policy), (DELETED,))
    conflicted: list[str] = []
    merged: Row = {key_field: local[key_field]}
    for field in sorted((set(local) | set(remote)) - {key_field}):
        mine, theirs = local.get(field), remote.get(field)
        was = base.get(field) if base is not None else None
        if mine == theirs or theirs == was:
            merged[field] = mine
        elif mine == was:
            merged[field] = theirs
        else:
            conflicted.append(field)
            merged[field] = mine if policy == "local" else theirs
    if conflicted and callable(policy):
        return MergeOutcome(_decide(base, local, remote, policy), tuple(conflicted))
    return MergeOutcome(merged, tuple(conflicted))


def _decide(
    base: Row | None, local: Row | None, remote: Row | None, policy: ConflictPolicy
) -> Row | None:
    if policy == "local":
        return local
    if policy == "remote":
        return remote
    chosen = policy(base, local, remote)
    return None if chosen is None else dict(chosen)


def _same(a: Mapping[str, Any], b: Mapping[str, Any], key_field: str) -> bool:
    fields = (set(a) | set(b)) - {key_field}
    return all(a.get(f) == b.get(f) for f in fields)

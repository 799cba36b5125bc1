"""Merging two versions of one vault file, and what to do when they cannot be merged.

Pure functions, no database and no disk, so they are easy to test and to replace:

- ``merge_lines(base, local, remote)``: a three-way merge by lines (like ``diff3``): edits to
  different parts of a note are both kept; ``None`` when the same or adjacent lines changed on
  both sides.
- ``Version``: one side of a conflict — the file's path, its content (a note's text, or an
  attachment's blob reference), the device that made it and when.
- a **keep policy** ``(local: Version, remote: Version) -> "local" | "remote"`` says which
  version stays in the file; the other one is left beside it as a conflict copy. The vault's
  default is ``keep_local`` (this device's version stays, as in Dropbox or Syncthing); also
  ``keep_remote`` and ``keep_newest``, or any callable of that shape.
- ``resolve(base, local, remote, keep)`` puts these together; ``conflict_path`` names the copy
  ``NAME (conflict DEVICE DATE).ext``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "KEEP_POLICIES",
    "Content",
    "KeepPolicy",
    "Resolution",
    "Side",
    "Version",
    "conflict_path",
    "device_name",
    "keep_local",
    "keep_newest",
    "keep_remote",
    "merge_lines",
    "resolve",
]

# A note's whole text (front matter + body), or an attachment's blob reference as JSON
# ({"cid", "mimeType", "size"}).
Content = str | dict[str, Any]
Side = Literal["local", "remote"]


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a file: where it was, what it held, which device made it and when
    (``edited_at``: RFC 3339, "" when unknown)."""

    path: str
    content: Content
    device: str
    edited_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "content": self.content,
            "device": self.device,
            "editedAt": self.edited_at,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Version:
        return cls(
            str(value["path"]),
            value["content"],
            str(value.get("device") or "unknown"),
            str(value.get("editedAt") or ""),
        )


KeepPolicy = Callable[[Version, Version], Side]


def keep_local(local: Version, remote: Version) -> Side:
    """This device's version stays in the file; the other device's goes beside it."""
    return "local"


def keep_remote(local: Version, remote: Version) -> Side:
    """The other device's version stays in the file; this device's goes beside it."""
    return "remote"


def keep_newest(local: Version, remote: Version) -> Side:
    """The version edited last stays (by the editing devices' clocks; a tie keeps local)."""
    return "remote" if remote.edited_at > local.edited_at else "local"


KEEP_POLICIES: dict[str, KeepPolicy] = {
    "local": keep_local,
    "remote": keep_remote,
    "newest": keep_newest,
}


@dataclass(frozen=True, slots=True)
class Resolution:
    """The content that stays, which side it came from (None: both sides' edits merged, or
    only one side changed), and the version to leave beside the file (None: nothing lost)."""

    content: Content
    kept: Side | None
    copy: Version | None


def resolve(base: Content | None, local: Version, remote: Version, keep: KeepPolicy) -> Resolution:
    """Merge two versions of a file against ``base`` (the version both started from; None
    when unknown). Notes are merged line by line; what cannot be merged is decided by
    ``keep``."""
    if local.content == remote.content:
        return Resolution(local.content, None, None)
    if base is not None and remote.content == base:
        return Resolution(local.content, None, None)
    if base is not None and local.content == base:
        return Resolution(remote.content, None, None)
    if isinstance(local.content, str) and isinstance(remote.content, str):
        text_base = base if isinstance(base, str) else ""
        merged = merge_lines(text_base, local.content, remote.content)
        if merged is not None:
            return Resolution(merged, None, None)
    side = keep(local, remote)
    if side not in ("local", "remote"):
        raise ValueError(f"a keep policy returns 'local' or 'remote', not {side!r}")
    if side == "local":
        return Resolution(local.content, "local", remote)
    return Resolution(remote.content, "remote", local)


def merge_lines(base: str, local: str, remote: str) -> str | None:
    """Three-way merge by lines: ``None`` when both sides changed the same lines (or lines
    next to each other, as diff3 and git count it)."""
    if local == remote or remote == base:
        return local
    if local == base:
        return remote
    b, mine, theirs = (s.splitlines(keepends=True) for s in (base, local, remote))
    to_mine, to_theirs = _matches(b, mine), _matches(b, theirs)
    # Base lines both sides kept: the anchors between which each side's edits are compared.
    anchors: list[int | None] = [i for i in range(len(b)) if i in to_mine and i in to_theirs]
    out: list[str] = []
    i = j = k = 0
    for anchor in [*anchors, None]:
        if anchor is None:
            end_b, end_m, end_t = len(b), len(mine), len(theirs)
        else:
            end_b, end_m, end_t = anchor, to_mine[anchor], to_theirs[anchor]
        was, ours, their = b[i:end_b], mine[j:end_m], theirs[k:end_t]
        if ours == was:
            out += their
        elif their in (was, ours):
            out += ours
        else:
            return None
        if anchor is not None:
            out.append(b[anchor])
            i, j, k = end_b + 1, end_m + 1, end_t + 1
    return "".join(out)


def _matches(a: list[str], b: list[str]) -> dict[int, int]:
    """Line ``i`` of ``a`` -> the line of ``b`` it matches (a longest common subsequence)."""
    pairs: dict[int, int] = {}
    for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        for n in range(block.size):
            pairs[block.a + n] = block.b + n
    return pairs


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def device_name(name: str) -> str:
    """A short device name that fits in a file name and a record (``--device``, hostname)."""
    short = _UNSAFE.sub("-", name).strip("-.")
    return short[:64] or "device"


def conflict_path(path: str, version: Version, taken: Callable[[str], bool]) -> str:
    """``NAME (conflict DEVICE DATE).ext`` beside ``path`` for ``version``; DATE is the day
    it was edited (YYYY-MM-DD, UTC). A name ``taken`` already gets a number."""
    folder, slash, name = path.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not stem:  # no extension, or a name like ".md"
        stem, dot, ext = name, "", ""
    date = version.edited_at[:10]
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        date = datetime.now(UTC).strftime("%Y-%m-%d")
    label = f"conflict {device_name(version.device)} {date}"
    n = 1
    while True:
        suffix = "" if n == 1 else f" {n}"
        candidate = f"{folder}{slash}{stem} ({label}{suffix}){dot}{ext}"
        if not taken(candidate):
            return candidate
        n += 1

"""The vault's contract: its models and actions, its Lexicons, and its conflict policy.

Models (tables in the app's SQLite file):

- ``files``: one row per Markdown note — ``path`` (relative, '/'-separated), ``front`` (the
  front matter between the ``---`` lines, verbatim; None when the file has none), ``body``,
  ``device`` and ``editedAt`` (who made this version, when). Synced as
  ``<nsid>.file`` records; the key is a TID (``ctx.tid()``), so a rename keeps the record.
- ``attachments``: every other file (images, PDFs...) — ``path`` and ``blob`` (the bytes, a
  blob uploaded before its record), ``device``, ``editedAt``. Synced as ``<nsid>.attachment``.
- ``disk`` (not synced): what this device last saw or wrote for each file — path, sha256,
  mtime, size, the ``version`` it holds (the text's sha256, or the blob's CID) and, for notes,
  the text itself: the base of a three-way merge when the file and its row both changed.
- ``vault_state`` (not synced): the position in the action log up to which pulled changes
  were written to disk, and the handles followed vaults were asked for by (their mirror
  folders' names).

Both synced models carry ``copies``, a local-only property (never in a record): versions that
lost a conflict and wait to be written beside their file as ``NAME (conflict DEVICE DATE).md``.
The conflict policy fills it inside the pull's transaction, so a crash cannot lose a version;
the vault writes the copies once the transaction is over and clears it (``record_applied``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

from vault_merge import Content, KeepPolicy, Version, keep_local, keep_remote, resolve

from atsync import ActionContext, Binding, Contract
from atsync.app import ReadOnlyDB
from atsync.db import BlobRef

__all__ = [
    "ATTACHMENTS",
    "COPIES",
    "CURSOR",
    "DISK",
    "FILES",
    "NSID",
    "STATE",
    "DiskStat",
    "StaleRow",
    "VaultConflicts",
    "as_version",
    "bindings",
    "content_of",
    "contract",
    "followed_names",
    "keep_for",
    "lexicons",
    "render",
    "split_front",
    "version_of",
    "version_of_content",
]

NSID = "com.example.vault"  # the records: <NSID>.file and <NSID>.attachment
LEXICONS = Path(__file__).parent / "lexicons"
FILES, ATTACHMENTS, DISK, STATE = "files", "attachments", "disk", "vault_state"
COPIES = "copies"
CURSOR = "cursor"
FOLLOWED = "followed:"  # + DID: the handle a followed vault was asked for by

contract = Contract(
    models={
        FILES: {
            "id": "primary",
            "path": "string",
            "front": "string?",
            "body": "string",
            "device": "string?",
            "editedAt": "string?",
            COPIES: "json?",
            "$indexes": ["path"],
        },
        ATTACHMENTS: {
            "id": "primary",
            "path": "string",
            "blob": "blob",
            "device": "string?",
            "editedAt": "string?",
            COPIES: "json?",
            "$indexes": ["path"],
        },
        DISK: {
            "id": "primary",
            "model": "string",
            "path": "string",
            "sha256": "string",
            "mtime_ns": "integer",
            "size": "integer",
            "version": "string",
            "text": "string?",
            "$indexes": ["path"],
        },
        STATE: {"id": "primary", "value": "string"},
    }
)


def bindings(nsid: str = NSID) -> dict[str, Binding]:
    return {
        FILES: Binding(f"{nsid}.file", local=(COPIES,)),
        ATTACHMENTS: Binding(f"{nsid}.attachment", local=(COPIES,)),
    }


def lexicons(nsid: str = NSID) -> list[dict[str, Any]]:
    """The example's Lexicon documents, their ids moved under ``nsid`` (tests give each run
    collections of its own on a shared PDS)."""
    docs = []
    for name in ("file", "attachment"):
        doc = json.loads((LEXICONS / f"{NSID}.{name}.json").read_text())
        doc["id"] = f"{nsid}.{name}"
        docs.append(doc)
    return docs


class DiskStat(TypedDict):
    sha256: str
    mtime_ns: int
    size: int


class StaleRow(Exception):
    """The row changed since the scanner read it (a pull landed in between): scan again."""


# -- a note's text ------------------------------------------------------------------------


def split_front(text: str) -> tuple[str | None, str]:
    """(front matter, body): the front matter is what lies between a first line ``---`` and
    the next line ``---``; ``render`` gives back the exact text."""
    lines = text.split("\n")
    if lines[0] != "---":
        return None, text
    for i in range(1, len(lines) - 1):  # the closing line must end with a newline
        if lines[i] == "---":
            front = "\n".join(lines[1:i]) + ("\n" if i > 1 else "")
            return front, "\n".join(lines[i + 1 :])
    return None, text


def render(front: str | None, body: str) -> str:
    return body if front is None else f"---\n{front}---\n{body}"


def content_of(model: str, row: Mapping[str, Any]) -> Content:
    """A note's whole text, or an attachment's blob reference as JSON."""
    if model == FILES:
        return render(row.get("front"), row["body"])
    blob = row["blob"]
    return blob.to_json() if isinstance(blob, BlobRef) else dict(blob)


def version_of_content(model: str, content: Content) -> str:
    if model == FILES:
        assert isinstance(content, str)
        return hashlib.sha256(content.encode()).hexdigest()
    assert isinstance(content, dict)
    return str(content["cid"])


def version_of(model: str, row: Mapping[str, Any]) -> str:
    """What identifies a row's content on disk: the text's sha256, or the blob's CID."""
    return version_of_content(model, content_of(model, row))


def _content_fields(model: str, content: Content) -> dict[str, Any]:
    if model == FILES:
        assert isinstance(content, str)
        front, body = split_front(content)
        return {"front": front, "body": body}
    return {"blob": BlobRef.from_json(content)}


def as_version(model: str, row: Mapping[str, Any]) -> Version:
    return Version(
        row["path"], content_of(model, row), row.get("device") or "", row.get("editedAt") or ""
    )


def keep_for(model: str, keep: KeepPolicy) -> KeepPolicy:
    """The keep policy for a conflict in ``model``. An attachment's pulled version always
    stays: its bytes may exist only on the PDS, which forgets a blob as soon as no record
    references it — and pushing this device's version would be that moment, possibly before
    the copy could be downloaded. This device's bytes are in its blob store, so they are the
    ones that go beside the file."""
    return keep if model == FILES else keep_remote


def _edited_at(ctx: ActionContext) -> str:
    moment = datetime.fromtimestamp(ctx.timestamp / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_model(model: str) -> None:
    if model not in (FILES, ATTACHMENTS):
        raise ValueError(f"not a vault model: {model!r}")


def _set_disk(
    ctx: ActionContext, key: str, model: str, path: str, stat: DiskStat, version: str,
    text: str | None,
) -> None:  # fmt: skip
    ctx.db.set(DISK, {"id": key, "model": model, "path": path, **stat, "version": version,
                      "text": text})  # fmt: skip


def _disk_text(model: str, content: Content) -> str | None:
    return content if model == FILES and isinstance(content, str) else None


# -- actions: what the scanner saw on disk -------------------------------------------------


@contract.action
def create_file(
    ctx: ActionContext, model: str, path: str, content: Content, device: str, stat: DiskStat
) -> str:
    """A new file on disk: a new row (its key a TID, kept through renames)."""
    _check_model(model)
    key = ctx.tid()
    fields = _content_fields(model, content)
    ctx.db.set(model, {"id": key, "path": path, **fields, "device": device,
                       "editedAt": _edited_at(ctx)})  # fmt: skip
    _set_disk(ctx, key, model, path, stat, version_of_content(model, content),
              _disk_text(model, content))  # fmt: skip
    return key


@contract.action
def edit_file(
    ctx: ActionContext,
    key: str,
    model: str,
    path: str,
    content: Content,
    device: str,
    stat: DiskStat,
    expect: str | None,
    copies: list[dict[str, Any]],
    disk_content: Content | None = None,
) -> None:
    """The file changed on disk. ``content`` is what the row gets (the file's content, or
    its merge with a pulled version the scanner met); ``expect`` the row's version the
    scanner based that on (None: no row — a delete elsewhere meets the edit, which wins);
    ``copies`` versions to leave beside the file; ``disk_content`` the file's own content
    when it differs from ``content``."""
    _check_model(model)
    row = ctx.db.get(model, key)
    if (None if row is None else version_of(model, row)) != expect:
        raise StaleRow(f"{model}/{key} changed while {path} was read")
    pending = list((row or {}).get(COPIES) or [])
    ctx.db.set(model, {"id": key, "path": path, **_content_fields(model, content),
                       "device": device, "editedAt": _edited_at(ctx),
                       COPIES: [*pending, *copies] or None})  # fmt: skip
    on_disk = content if disk_content is None else disk_content
    _set_disk(ctx, key, model, path, stat, version_of_content(model, on_disk),
              _disk_text(model, on_disk))  # fmt: skip


@contract.action
def move_file(
    ctx: ActionContext, key: str, model: str, path: str, device: str, stat: DiskStat
) -> None:
    """The file was renamed or moved on disk, its content unchanged."""
    _check_model(model)
    if ctx.db.get(model, key) is None:
        raise StaleRow(f"{model}/{key} is gone")
    ctx.db.update(model, {"id": key, "path": path, "device": device,
                          "editedAt": _edited_at(ctx)})  # fmt: skip
    ctx.db.update(DISK, {"id": key, "path": path, **stat})


@contract.action
def delete_file(ctx: ActionContext, key: str, model: str, expect: str) -> None:
    """The file was deleted on disk. If its row changed elsewhere since the file was written
    here (``expect`` is the version written), that edit wins: the row stays, and the vault
    writes the file again."""
    _check_model(model)
    row = ctx.db.get(model, key)
    if row is not None and version_of(model, row) == expect:
        ctx.db.delete(model, key)
    ctx.db.delete(DISK, key)


# -- the action that records what the vault wrote to disk ---------------------------------


@contract.action
def record_applied(
    ctx: ActionContext,
    written: list[dict[str, Any]],
    forgotten: list[str],
    moves: list[list[str]],
    drops: list[list[str]],
    copies: list[dict[str, Any]],
    cursor: str | None,
) -> list[str]:
    """After the vault wrote pulled changes to disk: the files written (``written``: key,
    model, path, version and the stat) and removed (``forgotten``); rows moved to another
    path because two claimed one (``moves``: key, model, path) or dropped as duplicates of
    another row with the same path and content (``drops``: key, model); conflict copies
    written (``copies``: key, model, handled = how many of the row's ``copies`` were done,
    created = the new files); and how far the action log was read. Returns the new keys."""
    for key, model, path in moves:
        if ctx.db.get(model, key) is not None:
            ctx.db.update(model, {"id": key, "path": path})
    for key, model in drops:
        ctx.db.delete(model, key)
    for entry in written:
        model, key = entry["model"], entry["key"]
        row = ctx.db.get(model, key)
        text = None  # the merge base, when the row still holds what was written
        if row is not None and model == FILES and version_of(model, row) == entry["version"]:
            text = render(row.get("front"), row["body"])
        _set_disk(ctx, key, model, entry["path"], entry["stat"], entry["version"], text)
    for key in forgotten:
        ctx.db.delete(DISK, key)
    created_keys = []
    for done in copies:
        model, key = done["model"], done["key"]
        row = ctx.db.get(model, key)
        if row is not None:
            rest = list(row.get(COPIES) or [])[done["handled"] :]
            ctx.db.update(model, {"id": key, COPIES: rest or None})
        for new in done["created"]:
            new_key = ctx.tid()
            made = {"device": new["device"], "editedAt": new["editedAt"] or None}
            fields = _content_fields(model, new["content"])
            ctx.db.set(model, {"id": new_key, "path": new["path"], **fields, **made})
            _set_disk(ctx, new_key, model, new["path"], new["stat"],
                      version_of_content(model, new["content"]),
                      _disk_text(model, new["content"]))  # fmt: skip
            created_keys.append(new_key)
    if cursor is not None:
        ctx.db.set(STATE, {"id": CURSOR, "value": cursor})
    return created_keys


@contract.action
def name_followed(ctx: ActionContext, did: str, handle: str) -> None:
    """Remember the handle a followed vault was asked for by: its mirror folder's name
    stays the same in later runs."""
    ctx.db.set(STATE, {"id": f"{FOLLOWED}{did}", "value": handle})


def followed_names(db: ReadOnlyDB) -> dict[str, str]:
    """DID -> the handle each followed vault was asked for by (``name_followed``)."""
    rows = db.query(STATE, where={"id": {"gte": FOLLOWED, "lt": FOLLOWED + "\uffff"}})
    return {row["id"].removeprefix(FOLLOWED): row["value"] for row in rows}


# -- the conflict policy the sync engine calls ---------------------------------------------


class VaultConflicts:
    """``ATSync(conflicts=VaultConflicts(...))``: how a pulled version of a file meets a
    local edit of it that was not pushed yet.

    The engine calls it with whole rows — ``base`` (as last synced), ``local``, ``remote`` —
    when a field changed on both sides, inside the pull's transaction. An edit beats a
    delete. Otherwise every field changed on one side only is kept, notes are merged line
    by line, and when the same lines (or an attachment's bytes) changed on both sides,
    ``keep`` (``vault_merge.KeepPolicy``) chooses the version that stays; the other is
    queued in the row's local-only ``copies``, to be written beside the file once the
    transaction is over. ``current(model, key)`` reads the row as it is now (its pending
    copies are kept).
    """

    def __init__(
        self,
        keep: KeepPolicy = keep_local,
        current: Callable[[str, str], Mapping[str, Any] | None] | None = None,
    ) -> None:
        self.keep = keep
        self.current = current

    def __call__(
        self,
        base: dict[str, Any] | None,
        local: dict[str, Any] | None,
        remote: dict[str, Any] | None,
    ) -> dict[str, Any] | None:
        if local is None or remote is None:
            survivor = local if local is not None else remote
            return None if survivor is None else dict(survivor)
        model = FILES if "body" in local else ATTACHMENTS
        merged: dict[str, Any] = {}
        for field in (set(local) | set(remote)) - {COPIES}:
            mine, theirs = local.get(field), remote.get(field)
            was = base.get(field) if base is not None else None
            merged[field] = theirs if mine == was and theirs != was else mine
        base_content = content_of(model, base) if base is not None else None
        keep = keep_for(model, self.keep)
        outcome = resolve(base_content, as_version(model, local), as_version(model, remote), keep)
        merged.update(_content_fields(model, outcome.content))
        if outcome.kept is not None:  # the kept version's author and time go with it
            kept = local if outcome.kept == "local" else remote
            merged["device"], merged["editedAt"] = kept.get("device"), kept.get("editedAt")
        if outcome.copy is not None:
            now = self.current(model, local["id"]) if self.current is not None else None
            pending = copy.deepcopy((now or {}).get(COPIES) or [])
            merged[COPIES] = [*pending, outcome.copy.to_json()]
        return merged

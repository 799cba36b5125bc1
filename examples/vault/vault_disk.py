"""The vault on disk: a polling scanner (files -> rows) and a writer (rows -> files).

``Vault.scan()`` walks the folder (hidden files and folders, and the top-level ``@...``
folders that mirror followed vaults, are left out) and compares each file with what the
``disk`` model says this device last saw or wrote: (mtime, size) first, then sha256. New
files, edits, renames (a path gone and a new one with the same content, in one scan: the
record keeps its key) and deletes become actions.

``Vault.apply()`` writes what pulls changed: the keys come from the ``$remote`` entries of the
action log since the last pass (``record_applied`` stores the position with the bookkeeping,
so a crash replays the pass), plus keys an earlier pass had to leave (a blob not fetched yet).
Files are written atomically (a hidden temporary file, fsync, rename), and their new sha256 is
recorded, so the scanner does not take them for local edits. A file changed on disk since
the scan is never overwritten: the next scan merges it with the row (``vault_merge``).

Two rows claiming one path (the same name created on two devices): the older key keeps it,
the other goes to ``NAME (conflict DEVICE DATE).md`` (the same on every device, so they
agree), or is dropped if both hold the same content. Conflict copies the pull queued in a
row's ``copies`` are written beside their file and become files (rows) of their own.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vault_app import (
    ATTACHMENTS,
    COPIES,
    CURSOR,
    DISK,
    FILES,
    STATE,
    DiskStat,
    StaleRow,
    as_version,
    keep_for,
    render,
    version_of,
)
from vault_files import Folder
from vault_merge import Content, KeepPolicy, Version, conflict_path, keep_local, resolve

from atsync import App, AtsyncError
from atsync.app import REMOTE_ACTION
from atsync.db import BlobRef

__all__ = ["ApplyResult", "ScanResult", "Vault"]

MAX_NOTE = 512 * 1024  # a note is one record, and a record is at most 1,000,000 bytes
MAX_BLOB = 5 * 1024 * 1024  # the reference PDS's blob limit, atsync's default
RECENT_NS = 2_000_000_000  # a file this fresh is hashed even if its (mtime, size) match
DISK_FIELDS = ["model", "path", "sha256", "mtime_ns", "size", "version"]


@dataclass
class ScanResult:
    """What one scan turned into actions (paths), and what it could not sync."""

    created: list[str] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)
    moved: list[tuple[str, str]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def changes(self) -> int:
        return len(self.created) + len(self.edited) + len(self.moved) + len(self.deleted)


@dataclass
class ApplyResult:
    """What one pass wrote to disk (paths)."""

    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    rows: int = 0  # rows this pass changed: moved off a taken path, dropped as duplicates
    waiting: int = 0  # rows left for a later pass (a blob not here yet, a file being edited)

    @property
    def changes(self) -> int:
        return len(self.written) + len(self.removed) + len(self.copies) + self.rows


@dataclass
class _Pass:
    """One apply pass: the disk entries as they become, and the bookkeeping to record."""

    entries: dict[str, dict[str, Any]]
    by_path: dict[str, str]
    written: list[dict[str, Any]] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    moves: list[list[str]] = field(default_factory=list)
    drops: list[list[str]] = field(default_factory=list)
    copies: list[dict[str, Any]] = field(default_factory=list)

    def put(self, key: str, model: str, path: str, st: DiskStat, version: str) -> None:
        old = self.entries.get(key)
        if old is not None and self.by_path.get(old["path"]) == key:
            del self.by_path[old["path"]]
        self.entries[key] = {"id": key, "model": model, "path": path, **st, "version": version}
        self.by_path[path] = key
        self.written.append({"key": key, "model": model, "path": path, "stat": st,
                             "version": version})  # fmt: skip

    def move(self, key: str, model: str, path: str) -> None:
        """The row goes to another path (recorded in the row by ``record_applied``)."""
        self.moves.append([key, model, path])

    def drop(self, key: str, model: str) -> None:
        self.drops.append([key, model])

    def moved_to(self, key: str) -> str | None:
        return next((path for k, _, path in reversed(self.moves) if k == key), None)

    def dropped(self, key: str) -> bool:
        return any(k == key for k, _ in self.drops)

    def forget(self, key: str) -> None:
        old = self.entries.pop(key, None)
        if old is not None and self.by_path.get(old["path"]) == key:
            del self.by_path[old["path"]]
        self.forgotten.append(key)


class Vault:
    """A folder of Markdown files kept in step with an app's ``files`` and ``attachments``.

    ``keep`` is the policy for a file and its row that both changed (see ``vault_merge``);
    ``follows()`` maps followed DIDs to their handles (their files are mirrored, read-only,
    under ``@handle/``); ``report`` gets one line per change.
    """

    def __init__(
        self,
        app: App,
        root: str | os.PathLike[str],
        *,
        device: str,
        keep: KeepPolicy = keep_local,
        follows: Callable[[], Mapping[str, str | None]] | None = None,
        report: Callable[[str], None] = print,
    ) -> None:
        self.app = app
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"the vault folder {self.root} does not exist")
        self.files = Folder(self.root)
        self.device = device
        self.keep = keep
        self.follows = follows
        self.report = report
        self._skipped: dict[str, tuple[int, int]] = {}  # path -> the stat it was refused at
        self._retry: set[tuple[str, str]] = set()
        self._refused: set[tuple[str, str]] = set()  # (key, path) reported as unsafe once
        self._handles: dict[str, str | None] = {}
        state = app.db.get(STATE, CURSOR)
        self._cursor: str | None = None if state is None else state["value"]

    # -- disk -> rows ------------------------------------------------------------------------

    def scan(self) -> ScanResult:
        """Turn what changed in the folder since the last scan into actions."""
        result = ScanResult()
        if not self.root.is_dir():  # an unmounted disk must not look like "delete everything"
            raise FileNotFoundError(f"the vault folder {self.root} is gone")
        found = self.files.walk()
        tracked = {
            row["path"]: row
            for row in self.app.db.query(DISK, select=DISK_FIELDS)
            if not row["id"].startswith("at://")
        }
        fresh: dict[str, tuple[bytes, DiskStat]] = {}  # new or changed files: data, stat
        now = time.time_ns()
        for path, st in sorted(found.items()):
            mark = (st.st_mtime_ns, st.st_size)
            if self._skipped.get(path) == mark:
                continue
            entry = tracked.get(path)
            recent = now - st.st_mtime_ns < RECENT_NS
            if entry is not None and not recent:
                seen = self.files.seen.get(path)
                if mark == (entry["mtime_ns"], entry["size"]):
                    continue
                if seen is not None and seen == (*mark, entry["sha256"]):
                    continue  # touched, not changed
            try:
                data = self.files.read(path)
            except OSError:
                continue  # gone since the walk: the next scan sees it gone
            sha = hashlib.sha256(data).hexdigest()
            self.files.seen[path] = (*mark, sha)
            if entry is None or sha != entry["sha256"]:
                fresh[path] = (data, {"sha256": sha, "mtime_ns": mark[0], "size": mark[1]})
        gone = {path: entry for path, entry in tracked.items() if path not in found}
        new = [path for path in fresh if path not in tracked]
        for path in new:
            data, disk = fresh[path]
            twin = self._renamed_from(path, self._kind(path, data), disk["sha256"], gone)
            if twin is not None:
                del gone[twin["path"]]
                self._move(twin, path, data, disk, result)
            else:
                self._create(path, data, disk, result)
        for path, (data, disk) in fresh.items():
            if path in tracked:
                self._edit(tracked[path], path, data, disk, result)
        for path, entry in gone.items():
            self.app.actions.delete_file(entry["id"], entry["model"], entry["version"])
            self.files.seen.pop(path, None)
            result.deleted.append(path)
            self.report(f"deleted {path}")
        return result

    @staticmethod
    def _kind(path: str, data: bytes) -> str:
        if path.lower().endswith(".md"):
            try:
                data.decode("utf-8")
                return FILES
            except UnicodeDecodeError:
                pass
        return ATTACHMENTS

    @staticmethod
    def _renamed_from(
        path: str, model: str, sha: str, gone: dict[str, dict[str, Any]]
    ) -> dict[str, Any] | None:
        """The vanished file this new one is, if one had the same content (preferring one
        with the same name: a folder renamed with several equal files in it)."""
        twins = [e for e in gone.values() if e["sha256"] == sha and e["model"] == model]
        name = path.rpartition("/")[2]
        same_name = [e for e in twins if e["path"].rpartition("/")[2] == name]
        found = same_name or twins
        return found[0] if found else None

    def _content(self, model: str, path: str, data: bytes) -> Content | None:
        """The row's content for a file's bytes (None: it cannot be synced, reported)."""
        limit = MAX_NOTE if model == FILES else MAX_BLOB
        if len(data) > limit:
            self.report(f"skipped {path}: {len(data)} bytes, more than {limit} can sync")
            return None
        if model == FILES:
            return data.decode("utf-8")
        mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return self.app.blobs.put(data, mime).to_json()

    def _skip(self, path: str, st: DiskStat, result: ScanResult) -> None:
        self._skipped[path] = (st["mtime_ns"], st["size"])
        result.skipped.append(path)

    def _create(self, path: str, data: bytes, st: DiskStat, result: ScanResult) -> None:
        model = self._kind(path, data)
        content = self._content(model, path, data)
        if content is None:
            self._skip(path, st, result)
            return
        try:
            self.app.actions.create_file(model, path, content, self.device, st)
        except AtsyncError as exc:
            self.report(f"skipped {path}: {exc}")
            self._skip(path, st, result)
            return
        result.created.append(path)
        self.report(f"created {path}")

    def _move(
        self, entry: dict[str, Any], path: str, data: bytes, st: DiskStat, result: ScanResult
    ) -> None:
        try:
            self.app.actions.move_file(entry["id"], entry["model"], path, self.device, st)
        except StaleRow:  # deleted elsewhere meanwhile: the file lives on, as an edit
            self._edit({**entry, "path": path}, path, data, st, result)
            return
        self.files.seen.pop(entry["path"], None)
        result.moved.append((entry["path"], path))
        self.report(f"renamed {entry['path']} -> {path}")

    def _edit(
        self, entry: dict[str, Any], path: str, data: bytes, st: DiskStat, result: ScanResult
    ) -> None:
        key, model = entry["id"], entry["model"]
        if self._kind(path, data) != model:  # e.g. a note saved in another encoding
            self.app.actions.delete_file(key, model, entry["version"])
            self._create(path, data, st, result)
            return
        content = self._content(model, path, data)
        if content is None:
            self._skip(path, st, result)
            return
        row = self.app.db.get(model, key)
        expect = None if row is None else version_of(model, row)
        merged, copies = content, []
        if row is not None and expect != entry["version"]:
            # A pull changed the row since its file was written here, and the file was
            # edited before the vault could write the pulled version: merge the two.
            base = (self.app.db.get(DISK, key) or {}).get("text")
            now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            mine = Version(path, content, self.device, now)
            outcome = resolve(base, mine, as_version(model, row), keep_for(model, self.keep))
            merged = outcome.content
            copies = [] if outcome.copy is None else [outcome.copy.to_json()]
        try:
            self.app.actions.edit_file(key, model, path, merged, self.device, st, expect, copies,
                                       None if merged == content else content)  # fmt: skip
        except StaleRow:
            self.files.seen.pop(path, None)  # a pull landed meanwhile: read it again next scan
            return
        except AtsyncError as exc:
            self.report(f"skipped {path}: {exc}")
            self._skip(path, st, result)
            return
        self._retry.add((model, key))  # a merge or a copy is for apply() to write
        result.edited.append(path)
        self.report(f"edited {path}" + ("" if merged == content else " (merged with a pull)"))

    # -- rows -> disk ------------------------------------------------------------------------

    def apply(self, *, everything: bool = False) -> ApplyResult:
        """Write to disk what pulls changed since the last pass (``everything``: compare
        every row, as at start-up)."""
        result = ApplyResult()
        self._handles = dict(self.follows()) if self.follows is not None else {}
        keys, self._retry = set(self._retry), set()
        cursor = self._cursor
        for entry in self.app.log.entries(after=cursor, name=REMOTE_ACTION):
            for model, key, _ in entry.args[0]:
                if model in (FILES, ATTACHMENTS):
                    keys.add((model, key))
            cursor = entry.id
        entries = {row["id"]: row for row in self.app.db.query(DISK, select=DISK_FIELDS)}
        if everything:
            for model in (FILES, ATTACHMENTS):
                keys |= {(model, row["id"]) for row in self.app.db.query(model, select=["id"])}
            keys |= {(row["model"], key) for key, row in entries.items()}
        run = _Pass(entries, {row["path"]: key for key, row in entries.items()})
        rows = {(m, k): self.app.db.get(m, k) for m, k in sorted(keys)}
        for (_, key), row in rows.items():  # deletes first: they free paths
            if row is None and key in run.entries:
                self._remove(key, run, result)
        todo = [(m, k) for (m, k), row in rows.items() if row is not None]
        while todo:
            pending = {k for _, k in todo}
            blocked = [mk for mk in todo if not self._write_row(*mk, run, result, pending)]
            if len(blocked) == len(todo):  # each waits for another: settle them by key
                for mk in blocked:
                    self._write_row(*mk, run, result, set())
                break
            todo = blocked
        for (model, key), row in rows.items():
            if row is not None and row.get(COPIES) and not key.startswith("at://"):
                self._write_copies(model, key, run, result)
        if any(
            (run.written, run.forgotten, run.moves, run.drops, run.copies, cursor != self._cursor)
        ):
            self.app.actions.record_applied(
                run.written, run.forgotten, run.moves, run.drops, run.copies, cursor
            )
        self._cursor = cursor
        result.rows = len(run.moves) + len(run.drops)
        result.waiting = len(self._retry)
        return result

    def _remove(self, key: str, run: _Pass, result: ApplyResult) -> None:
        """A row deleted by a pull: its file goes too, unless it was changed here since."""
        entry = run.entries[key]
        path = entry["path"]
        if self.files.unchanged(entry) or key.startswith("at://"):
            self.files.remove(path)
            result.removed.append(path)
            self.report(f"removed {path}")
        elif self.files.exists(path):
            self.report(f"kept {path}: deleted elsewhere, but changed here")
            return  # the entry stays: the next scan sees an edit, which brings the row back
        run.forget(key)

    def _write_row(
        self, model: str, key: str, run: _Pass, result: ApplyResult, pending: set[str]
    ) -> bool:
        """Write one row's file; False when its path is held by a row in ``pending`` (one
        that may move away in this pass: try again after it)."""
        row = self.app.db.get(model, key)
        if row is None or run.dropped(key):
            return True
        target = run.moved_to(key) or self._target(key, row["path"])
        if target is None:
            return True
        mirror = key.startswith("at://")
        version = version_of(model, row)
        entry = run.entries.get(key)
        if entry is not None and entry["version"] == version and entry["path"] == target:
            return True
        if entry is not None and not mirror and not self.files.unchanged(entry):
            self._retry.add((model, key))  # edited here since the scan: the scan merges it
            return True
        holder = run.by_path.get(target)
        if holder is not None and holder != key:
            if holder in pending:
                return False
            target = self._settle_claim(model, key, row, version, holder, target, run)
            if target is None:
                return True
        elif holder is None and not mirror and self.files.exists(target):
            self._retry.add((model, key))  # a file the scanner has not seen yet
            return True
        data = self._bytes(model, row)
        if data is None:
            self._retry.add((model, key))
            return True
        old = None if entry is None else entry["path"]
        try:
            if old is not None and old != target:
                if entry is not None and entry["version"] == version and self.files.exists(old):
                    st = self.files.rename(old, target)
                else:
                    st = self.files.write(target, data, readonly=mirror)
                    self.files.remove(old)
            else:
                st = self.files.write(target, data, readonly=mirror)
        except OSError as exc:
            self.report(f"cannot write {target}: {exc}")
            return True
        run.put(key, model, target, st, version)
        result.written.append(target)
        self.report(f"wrote {target}" if old in (None, target) else f"moved {old} -> {target}")
        return True

    def _settle_claim(
        self, model: str, key: str, row: Mapping[str, Any], version: str, holder: str,
        target: str, run: _Pass,
    ) -> str | None:  # fmt: skip
        """Two rows claim one path: the older key keeps it and the other moves to a conflict
        name — or, holding the same content, the newer row is dropped. Returns where this
        row goes (None: nowhere, it was dropped)."""
        held = run.entries[holder]
        other = self.app.db.get(held["model"], holder)
        if key.startswith("at://") or holder.startswith("at://"):
            self.report(f"skipped {target}: two files of a followed vault claim it")
            return None
        if other is not None and held["model"] == model and version_of(model, other) == version:
            loser = max(key, holder)
            run.drop(loser, model)
            if loser == key:
                return None
            # This row takes the file over: it is on disk already, with this content.
            st: DiskStat = {"sha256": held["sha256"], "mtime_ns": held["mtime_ns"],
                            "size": held["size"]}  # fmt: skip
            run.forget(holder)
            run.put(key, model, target, st, version)
            return None
        taken = self._taken(run)
        if other is not None and key > holder:  # this row moves aside
            new_path = conflict_path(target, as_version(model, row), taken)
            run.move(key, model, new_path)
            self.report(f"{target} is taken: the newer file goes to {new_path}")
            return new_path
        if not self.files.unchanged(held):
            self._retry.add((model, key))  # edited here since the scan: the scan goes first
            return None
        new_path = conflict_path(target, _version(held, other), taken)
        st = self.files.rename(target, new_path)
        if other is None:  # a file kept from a delete: the next scan adds it as new
            run.forget(holder)
        else:
            run.move(holder, held["model"], new_path)
            run.put(holder, held["model"], new_path, st, held["version"])
        self.report(f"{target} is taken: the newer file goes to {new_path}")
        return target

    def _write_copies(self, model: str, key: str, run: _Pass, result: ApplyResult) -> None:
        """Write the versions that lost a conflict beside their file; they become files."""
        row = self.app.db.get(model, key)
        if row is None or run.dropped(key):
            return
        where = run.entries.get(key, {}).get("path") or self._target(key, row["path"])
        if where is None:
            return
        created = []
        handled = 0
        taken = self._taken(run)
        for value in row[COPIES]:
            version = Version.from_json(value)
            data = self._content_bytes(model, version.content)
            if data is None:
                self._retry.add((model, key))
                break
            sha = hashlib.sha256(data).hexdigest()

            def other_file(path: str, sha: str = sha) -> bool:
                # A name holding this very copy is where an interrupted pass left it.
                return taken(path) and self.files.sha(path) != sha

            path = conflict_path(where, version, other_file)
            handled += 1
            if self.files.exists(path):
                continue  # written by an earlier pass that did not get to record it
            st = self.files.write(path, data)
            run.by_path[path] = "(copy)"
            created.append({"path": path, "content": version.content, "device": version.device,
                            "editedAt": version.edited_at, "stat": st})  # fmt: skip
            result.copies.append(path)
            self.report(f"conflict in {where}: the other version is in {path}")
        if handled:
            run.copies.append({"key": key, "model": model, "handled": handled,
                               "created": created})  # fmt: skip

    # -- helpers -----------------------------------------------------------------------------

    def _target(self, key: str, path: str) -> str | None:
        """Where a row's file goes: its path, under ``@handle/`` for a followed vault's
        row; None (reported once) for a path that would leave the folder or hide."""
        parts = path.split("/")
        bad = (not path or len(path) > 1024 or "\\" in path or "\0" in path
               or any(p in ("", ".", "..") or p.startswith(".") for p in parts))  # fmt: skip
        if key.startswith("at://"):
            did = key[len("at://") :].split("/", 1)[0]
            handle = self._handles.get(did)
            path = f"@{handle or did.replace(':', '_')}/{path}"
        elif parts[0].startswith("@"):
            bad = True  # reserved for followed vaults
        if bad:
            if (key, path) not in self._refused:
                self._refused.add((key, path))
                self.report(f"refused {path!r}: not a safe path inside the vault")
            return None
        return path

    def _taken(self, run: _Pass) -> Callable[[str], bool]:
        return lambda path: path in run.by_path or self.files.exists(path)

    def _bytes(self, model: str, row: Mapping[str, Any]) -> bytes | None:
        if model == FILES:
            return render(row.get("front"), row["body"]).encode()
        return self._content_bytes(model, row["blob"].to_json())

    def _content_bytes(self, model: str, content: Content) -> bytes | None:
        if isinstance(content, str):
            return content.encode()
        ref = BlobRef.from_json(content)
        return self.app.blobs.read(ref) if self.app.blobs.has(ref) else None


def _version(entry: Mapping[str, Any], row: Mapping[str, Any] | None) -> Version:
    if row is not None:
        return as_version(entry["model"], row)
    return Version(entry["path"], "", "", "")

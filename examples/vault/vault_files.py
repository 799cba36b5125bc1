"""The vault folder's files, as the scanner and the writer use them: listing, hashing,
atomic writes and renames, and removing the folders a removed file leaves empty.

Paths are relative to the vault's root and '/'-separated, whatever the platform.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat as stat_kind
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vault_app import DiskStat

__all__ = ["Folder"]


class Folder:
    """One vault folder. ``seen`` caches each file's (mtime_ns, size, sha256) as last read
    or written here, so an unchanged file is not hashed again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: dict[str, tuple[int, int, str]] = {}
        umask = os.umask(0)  # files written here get the mode any new file would get
        os.umask(umask)
        self._mode = 0o666 & ~umask

    def walk(self) -> dict[str, os.stat_result]:
        """Every regular file, by path. Hidden files and folders (``.obsidian``, ``.trash``,
        the writer's temporary files) are the device's own; top-level ``@...`` folders are
        mirrors of followed vaults; symlinks are not followed."""
        found: dict[str, os.stat_result] = {}
        for folder, dirs, names in os.walk(self.root):
            rel = os.path.relpath(folder, self.root)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            hidden = (".", "@") if not prefix else (".",)
            dirs[:] = [d for d in dirs if not d.startswith(hidden)]
            for name in names:
                if name.startswith("."):
                    continue
                try:
                    st = os.lstat(os.path.join(folder, name))
                except OSError:
                    continue
                if stat_kind.S_ISREG(st.st_mode):
                    found[prefix + name] = st
        return found

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.root / path)

    def read(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def sha(self, path: str) -> str | None:
        try:
            return hashlib.sha256(self.read(path)).hexdigest()
        except OSError:
            return None

    def unchanged(self, entry: Mapping[str, Any]) -> bool:
        """Whether the file is still what a ``disk`` entry says (not edited since)."""
        try:
            st = os.lstat(self.root / entry["path"])
        except OSError:
            return False
        if (st.st_mtime_ns, st.st_size) == (entry["mtime_ns"], entry["size"]):
            return True
        return self.sha(entry["path"]) == str(entry["sha256"])

    def write(self, path: str, data: bytes, *, readonly: bool = False) -> DiskStat:
        """Write a file atomically: a hidden temporary file beside it, fsync, rename — an
        editor or a crash never sees half a file."""
        full = self.root / path
        full.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=full.parent, prefix=f".{full.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
                os.fchmod(out.fileno(), 0o444 if readonly else self._mode)
            os.replace(tmp, full)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return self.stat(path, hashlib.sha256(data).hexdigest())

    def rename(self, old: str, new: str) -> DiskStat:
        (self.root / new).parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.root / old, self.root / new)
        self.forget(old)
        sha = self.sha(new)
        if sha is None:
            raise FileNotFoundError(f"{new} vanished while it was renamed")
        return self.stat(new, sha)

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / path).unlink()
        self.forget(path)

    def forget(self, path: str) -> None:
        """``path`` is gone: drop it from the cache and remove the folders it leaves empty
        (never the root)."""
        self.seen.pop(path, None)
        folder = (self.root / path).parent
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def stat(self, path: str, sha: str) -> DiskStat:
        st = os.lstat(self.root / path)
        self.seen[path] = (st.st_mtime_ns, st.st_size, sha)
        return {"sha256": sha, "mtime_ns": st.st_mtime_ns, "size": st.st_size}

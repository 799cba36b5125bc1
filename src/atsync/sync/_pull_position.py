"""Where the pull of one repository stands, as the sync state keeps it.

    pulled_commit, pulled_rev, pulled_data   the commit the local rows include, its rev and
                                             MST root (``follow:<did>:…`` for a followed one)
    pulled_collections                       the collections the last whole read covered
    stream_cursor                            the event stream's position (live pulls)
    _atsync_tree                             the tree held for the next catch-up (``_tree``)
    _atsync_unpulled                         the user's own writes in no tree pulled yet

Each pull and each live event moves all of it in one transaction with the rows it applied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from .._errors import VerificationError
from ..atproto import MissingBlock, MstDiff, VerifiedCommit, diff_trees
from ..db import ModelDB
from ._outbox import Outbox
from ._outbox_views import UNPULLED
from ._repo import Repo
from ._tree import TreeNodes

__all__ = ["PullPosition"]

log = logging.getLogger("atsync.sync")


class PullPosition:
    """One repository's pull position, the tree held at it, and (the user's own) the writes
    of this device that no tree pulled includes yet."""

    def __init__(self, db: ModelDB, outbox: Outbox, repo: Repo) -> None:
        self._db = db
        self._outbox = outbox
        self._repo = repo
        self.tree = TreeNodes(db, repo)

    def pulled_commit(self) -> str | None:
        return self._outbox.get_state(self._repo.state("pulled_commit"))

    def covers(self, collections: Collection[str]) -> bool:
        """Whether the last whole read included every one of ``collections``."""
        held = self._outbox.get_state(self._repo.state("pulled_collections"))
        return held is not None and set(collections) <= set(held.split(","))

    def position(self) -> tuple[str | None, str | None]:
        """The rev and MST root (``data``) the local state includes."""
        state = self._repo.state
        return self._outbox.get_state(state("pulled_rev")), self._outbox.get_state(
            state("pulled_data")
        )

    def written_mark(self) -> int:
        """The last of this device's writes noted as landed (0: none; followed: 0)."""
        if not self._repo.own:
            return 0
        (mark,) = self._db.execute(f"SELECT max(id) FROM {UNPULLED}").fetchone()
        return int(mark or 0)

    def written_since_pull(self, upto: int) -> set[tuple[str, str]]:
        if not self._repo.own:
            return set()
        return {
            (collection, rkey)
            for collection, rkey in self._db.execute(
                f"SELECT collection, rkey FROM {UNPULLED} WHERE id <= ?", (upto,)
            )
        }

    def tree_after(self, event: VerifiedCommit) -> MstDiff | None:
        """How a live event changes the held tree (None: no tree is held for the position
        it follows, or its blocks do not make up the change: the tree is then left behind,
        and the next gap reads the whole repository)."""
        held = self.tree.root()
        if held is None or event.prev_data is None or str(event.prev_data) != held:
            return None
        try:
            return diff_trees(event.data, event.blocks, event.prev_data, self.tree)
        except (MissingBlock, VerificationError) as exc:
            log.info("the held tree does not follow commit %s: %s", event.commit, exc)
            return None

    def stream_passed(self, seq: int) -> None:
        """The local state includes the stream's events up to ``seq`` (a whole read that
        began after they arrived, or one that came back again): resume after it."""
        with self._db.transaction():
            self._db.connection.execute(
                "INSERT OR REPLACE INTO _atsync_sync_state (key, value) VALUES (?, ?)",
                (self._repo.state("stream_cursor"), str(seq)),
            )

    def record(
        self,
        commit: str,
        rev: str,
        data: str,
        *,
        tree_limit: int,
        collections: Collection[str] | None = None,
        cursor: int | None = None,
        tree: list[tuple[bytes, bytes]] | None = None,
        diff: MstDiff | None = None,
        written: int | None = None,
        in_tree: list[tuple[str, str]] | None = None,
    ) -> None:
        """Record the pulled position in one transaction. ``collections``: a whole read of
        them (``tree``: its nodes, None: too many to hold); ``diff``: how the held tree
        moved (trees past ``tree_limit`` nodes are not held). This device's writes noted as
        not yet pulled are let go: up to ``written``; with ``in_tree`` (a live event), only
        those records; otherwise all."""
        state = self._repo.state
        values: list[tuple[str, str]] = [
            (state("pulled_commit"), commit),
            (state("pulled_rev"), rev),
            (state("pulled_data"), data),
            (state("last_pulled_at"), repr(time.time())),
        ]
        if collections is not None:  # every record of these collections was read
            values.append((state("pulled_collections"), ",".join(sorted(collections))))
        if cursor is not None:
            values.append((state("stream_cursor"), str(cursor)))
        if self._repo.own:
            values += [
                ("has_synced", "1"),
                # The next push is sent against the commit we now include: another device's
                # commit costs no InvalidSwap and no record-by-record reconcile.
                ("commit_cid", commit),
                ("commit_rev", rev),
            ]
        conn = self._db.connection
        with self._db.transaction():
            conn.executemany(
                "INSERT OR REPLACE INTO _atsync_sync_state (key, value) VALUES (?, ?)", values
            )
            if self._repo.own and in_tree is not None:
                # In the held tree now: a later delete of them shows in the next comparison.
                conn.executemany(
                    f"DELETE FROM {UNPULLED} WHERE collection = ? AND rkey = ?", in_tree
                )
            elif self._repo.own:
                # What the pulled state now includes (all of it after a live event the held
                # tree could not follow: the next pull reads everything).
                conn.execute(
                    f"DELETE FROM {UNPULLED} WHERE id <= ?",
                    (written if written is not None else 1 << 62,),
                )
            if diff is not None:
                # Kept in memory after a live event: the next one needs them at once.
                self.tree.update(data, diff, tree_limit, keep=in_tree is not None)
            elif collections is not None:
                # The nodes of what was read, or (a tree too big to hold) none.
                self.tree.replace(data if tree is not None else None, tree or ())

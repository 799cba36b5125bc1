"""Live queries: a callback re-fired with fresh results after a commit that changed them.

While a model has subscribers, every write to it records the row before and after (in the
stored column encoding). After the outermost commit each subscription whose filter matches
the old or the new row re-runs its query, and fires only when the results differ from those
it delivered last. A write that cannot change the results never re-runs the query.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._query import Query

if TYPE_CHECKING:
    from ._sqlite import ModelDB

__all__ = ["Change", "Subscription", "SubscriptionHub"]

log = logging.getLogger("atsync.db")

Results = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Change:
    """One row written: its model, and its stored row before and after (None if absent).

    A change with neither (``Change(model, None, None)``) means the whole table changed.
    """

    model: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None

    def may_affect(self, query: Query) -> bool:
        if self.model != query.model.name:
            return False
        if self.old is None and self.new is None:
            return True
        return query.matches(self.old) or query.matches(self.new)


@dataclass(eq=False)
class Subscription:
    """A live query; ``results`` holds what the callback last received. ``cancel()`` ends it."""

    query: Query
    callback: Callable[[Results], None]
    results: Results = field(default_factory=list)
    _hub: SubscriptionHub | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self._hub is not None

    def cancel(self) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            hub.remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class SubscriptionHub:
    """Subscriptions of one database, and the changes its open transaction has made."""

    def __init__(self) -> None:
        self._by_model: dict[str, list[Subscription]] = {}
        self._lock = threading.Lock()
        self.pending: list[Change] = []
        # Models with at least one subscription: read (without the lock) on every write.
        self.watched: set[str] = set()

    def watches(self, model: str) -> bool:
        return model in self.watched

    def add(self, subscription: Subscription) -> None:
        with self._lock:
            subscription._hub = self
            model = subscription.query.model.name
            self._by_model.setdefault(model, []).append(subscription)
            self.watched.add(model)

    def remove(self, subscription: Subscription) -> None:
        with self._lock:
            model = subscription.query.model.name
            subs = self._by_model.get(model, [])
            if subscription in subs:
                subs.remove(subscription)
            if not subs:
                self.watched.discard(model)

    def take_pending(self) -> list[Change]:
        changes = self.pending[:]
        self.pending.clear()  # the same list object stays registered for savepoint rollback
        return changes

    def notify(self, db: ModelDB, changes: list[Change]) -> None:
        """Re-run and fire the subscriptions these committed changes can affect."""
        if not changes:
            return
        with self._lock:
            candidates = [s for subs in self._by_model.values() for s in subs]
        for sub in candidates:
            model = sub.query.model.name
            relevant = any(change.may_affect(sub.query) for change in changes)
            if not relevant or not sub.active:
                continue
            fresh = db.run_query(sub.query)
            if fresh == sub.results:
                continue
            sub.results = fresh
            try:
                sub.callback(fresh)
            except Exception:
                # A subscriber's bug must not undo or block the writer that triggered it.
                log.exception("live query callback on %r raised", model)

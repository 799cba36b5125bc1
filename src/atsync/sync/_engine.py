"""ATSync: the engine that joins an App to the user's repository (push half).

    sync = ATSync(app, bindings={"notes": Binding("com.example.note")}, push=Debounce(0.5))
    async with sync:                       # runs until the block ends
        app.actions.create_note("hello")   # queued in the same transaction, pushed soon
        await sync.wait_for_idle()

Capture starts when the ``ATSync`` is created, before any login: everything done offline is
queued and pushed, in order, once a session exists (deferred auth). The engine's one task
sleeps until the strategy says a push is due, a login or ``push_now()`` asks for one, or the
backoff after a failure expires; whatever happens, a non-empty queue is retried without
waiting for a new local write (the watchdog).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Protocol

import anyio

from .._errors import (
    AuthError,
    NetworkError,
    PermanentError,
    RateLimitedError,
    SchemaError,
    TransientError,
)
from ..app import App
from ..atproto._xrpc import XrpcClient
from ..atproto._xrpc_errors import outcome_unknown
from ..lexicon import LexiconSet, validate_record
from ._backoff import Backoff
from ._binding import Binding, BoundBinding
from ._budget import RateBudget
from ._capture import Capture, OnAction, Validator
from ._outbox import Outbox, create_sync_tables
from ._pusher import Pusher, PushResult
from ._status import SyncStatus
from ._strategies import Debounce, Queue, Strategy
from ._waker import Waker

__all__ = ["ATSync", "SessionLike"]

log = logging.getLogger("atsync.sync")
WATCHDOG_SECONDS = 30.0


class SessionLike(Protocol):
    """What the engine needs from a logged-in session."""

    @property
    def did(self) -> str: ...

    @property
    def pds_url(self) -> str: ...

    async def access_token(self, client: XrpcClient) -> str: ...

    async def refresh(
        self, client: XrpcClient | None = None, *, stale_access: str | None
    ) -> str: ...


SessionSource = Callable[[], SessionLike | None]


class ATSync:
    """Syncs an ``App``'s bound models with the user's repository."""

    def __init__(
        self,
        app: App,
        *,
        bindings: Mapping[str, Binding],
        lexicons: LexiconSet | Iterable[str | os.PathLike[str] | Mapping[str, Any]] | None = None,
        session: SessionLike | SessionSource | None = None,
        push: Strategy | None = None,
        on_action: OnAction | None = None,
        validate: Validator | None = None,
        budget: RateBudget | None = None,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.app = app
        db = app.model_db
        with db.transaction():
            create_sync_tables(db.connection)
        self._bindings: dict[str, BoundBinding] = {}
        for model, binding in bindings.items():
            name = binding.model or model
            if name not in db.schema.models:
                raise SchemaError(f"binding for {name!r}: the app has no such model")
            self._bindings[name] = binding.bind(db.schema.models[name])
        collections = [b.collection for b in self._bindings.values()]
        if len(set(collections)) != len(collections):
            raise SchemaError("two bindings share a collection; each model needs its own")
        self.lexicons = _lexicon_set(lexicons)
        if self.lexicons is not None:
            validate = _lexicon_validator(self.lexicons, self._bindings.values(), validate)
        self.strategy = push or Debounce(0.5)
        self.outbox = Outbox(db)
        self.budget = budget if budget is not None else RateBudget()
        self.budget.loads(self.outbox.get_state("budget"))
        self._pusher = Pusher(self.outbox, self.budget)
        self._session_source = self._make_source(session)
        self._client_options = dict(client_options or {})
        self._capture = Capture(
            app,
            self.outbox,
            self._bindings,
            on_action=on_action,
            validate=validate,
            on_queued=self._on_local_change,
        )
        self._capture.attach()
        self._backoff = Backoff()
        self._waker: Waker | None = None
        # Per collection: (first, last) local change not yet pushed, and the last push.
        self._changes: dict[str, tuple[float, float]] = {}
        self._last_push: dict[str, float] = {}
        self._retry_at: float | None = None
        self._retry_collections: set[str] | None = None
        self._forced = False
        self._listeners: list[Callable[[SyncStatus], None]] = []
        self._status_changed = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._status = SyncStatus()
        self._refresh_status(state="stopped")

    # -- configuration ----------------------------------------------------------------------

    def _make_source(self, session: SessionLike | SessionSource | None) -> SessionSource:
        if session is None:
            signer = self.app.signer
            return lambda: getattr(signer, "session", None)
        if callable(session) and not hasattr(session, "access_token"):
            return session
        fixed = session
        return lambda: fixed  # type: ignore[return-value]

    @property
    def bindings(self) -> Mapping[str, BoundBinding]:
        return dict(self._bindings)

    # -- status -----------------------------------------------------------------------------

    @property
    def status(self) -> SyncStatus:
        return self._status

    def on_status(self, callback: Callable[[SyncStatus], None]) -> Callable[[], None]:
        """Call ``callback(status)`` on every change; returns a function that unsubscribes."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    async def status_changes(self) -> AsyncIterator[SyncStatus]:
        """Every status from now on (the current one first)."""
        while True:
            changed = self._status_changed
            yield self._status
            await changed.wait()

    def _refresh_status(self, **changes: Any) -> None:
        pending, failed, conflicts = self.outbox.counts()
        pushed_at = self.outbox.get_state("last_pushed_at")
        fields = dict(
            pending=pending,
            failed=failed,
            conflicts=conflicts,
            last_pushed_at=float(pushed_at) if pushed_at else None,
            has_synced=self.outbox.get_state("has_synced") == "1",
        )
        fields.update(changes)
        current = self._status
        new = SyncStatus(**{**_as_dict(current), **fields})
        if new == current:
            return
        self._status = new
        changed, self._status_changed = self._status_changed, anyio.Event()
        changed.set()
        for listener in list(self._listeners):
            try:
                listener(new)
            except Exception:
                log.exception("sync status listener raised")

    # -- running ------------------------------------------------------------------------------

    async def __aenter__(self) -> ATSync:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        await self._task_group.start(self.run)
        return self

    async def __aexit__(self, *exc: object) -> None:
        group, self._task_group = self._task_group, None
        if group is not None:
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The engine's task: run it in your own task group (``tg.start(sync.run)``) or use
        ``async with sync``. Cancel it to stop."""
        self._waker = Waker()
        pending, _, _ = self.outbox.counts()
        if pending:
            self._forced = True  # left over from an earlier run: push at once
        try:
            task_status.started()
            await self._loop()
        finally:
            self._waker = None
            self._refresh_status(state="stopped")

    async def _loop(self) -> None:
        client: XrpcClient | None = None
        session: SessionLike | None = None
        try:
            while True:
                current = self._session_source()
                if current is not session:
                    if client is not None:
                        await client.aclose()
                        client = None
                    session = current
                    if session is not None:
                        client = XrpcClient(session=session, **self._client_options)
                        self._forced = True  # a login starts a push
                if session is None or client is None:
                    self._refresh_status(state="needs_auth", did=None)
                    await self._sleep(WATCHDOG_SECONDS)
                    continue
                due, collections = self._schedule()
                now = time.monotonic()
                if due == math.inf and self._pusher.fence_needed:
                    await self._fence(session.did, client)
                if due > now:
                    # Offline or error while writes still wait for their retry; otherwise
                    # (nothing pending, or just logged in) idle.
                    failing = (
                        self._status.state in ("offline", "error", "needs_auth") and self._retry_at
                    )
                    if failing:
                        self._refresh_status(did=session.did)
                    else:
                        self._refresh_status(state="idle", did=session.did, upload_error=None)
                    await self._sleep(min(due - now, WATCHDOG_SECONDS))
                    continue
                await self._push(session.did, client, collections)
        finally:
            if client is not None:
                with anyio.CancelScope(shield=True):
                    await client.aclose()

    def _strategy_for(self, collection: str) -> Strategy:
        for binding in self._bindings.values():
            if binding.collection == collection and binding.binding.strategy is not None:
                strategy: Strategy = binding.binding.strategy
                return strategy
        return self.strategy

    def _schedule(self) -> tuple[float, set[str] | None]:
        """When the next push is due, and which collections it carries (None: all)."""
        pending = self.outbox.pending_by_collection()
        for gone in set(self._changes) - set(pending):
            del self._changes[gone]
        if not pending:
            # Nothing left (pushed, or settled by a reconcile): no push requested, no retry
            # pending, so the status goes back to idle.
            self._forced = False
            self._retry_at = self._retry_collections = None
            return math.inf, None
        if self._retry_at is not None:
            return self._retry_at, self._retry_collections
        if self._forced:
            return 0.0, None
        now = time.monotonic()
        earliest, due = math.inf, set()
        for collection, count in pending.items():
            # Queued by another process, or left after an error: the watchdog pushes it.
            first, last = self._changes.setdefault(collection, (now, now))
            at = self._strategy_for(collection).due_at(
                Queue(first, last, self._last_push.get(collection, 0.0), count)
            )
            earliest = min(earliest, at)
            if at <= now:
                due.add(collection)
        return earliest, due

    async def _sleep(self, seconds: float) -> None:
        waker = self._waker
        assert waker is not None
        with anyio.move_on_after(max(0.0, seconds)):
            await waker.wait()
        waker.clear()

    def _on_local_change(self, collections: set[str]) -> None:
        now = time.monotonic()
        for collection in collections:
            first, _ = self._changes.get(collection, (now, now))
            self._changes[collection] = (first, now)
        self._refresh_pending_soon()

    def _refresh_pending_soon(self) -> None:
        waker = self._waker
        if waker is not None:
            waker.set()

    async def _push(self, did: str, client: XrpcClient, collections: set[str] | None) -> None:
        self._forced = False
        self._refresh_status(state="pushing", did=did)
        result = PushResult()
        self._retry_collections = collections
        try:
            while True:
                landed = result.pushed + result.already_applied
                more = await self._pusher.push_batch(did, client, result, collections)
                if result.pushed + result.already_applied > landed:
                    # A batch went through: the PDS is fine, so the next failure starts the
                    # shared backoff afresh instead of compounding it.
                    self._backoff.succeeded()
                if not more:
                    break
                self._refresh_status()
            await self._pusher.fence(did, client, result)
        except RateLimitedError as exc:
            wait = max(0.0, (exc.reset_at or time.time() + 60) - time.time())
            self._retry_at = time.monotonic() + wait
            self._refresh_status(
                state="idle", rate_limited_until=time.time() + wait, upload_error=str(exc)
            )
            return
        except AuthError as exc:
            self._refresh_status(state="needs_auth", upload_error=str(exc))
            self._retry_at = time.monotonic() + WATCHDOG_SECONDS
            return
        except (TransientError, PermanentError, OSError) as exc:
            await self._after_failure(did, client, exc)
            return
        self._backoff.succeeded()
        self._retry_at = None
        now = time.monotonic()
        for collection in collections if collections is not None else list(self._changes):
            self._last_push[collection] = now
            self._changes.pop(collection, None)
        if result.rate_wait > 0:
            self._retry_at = time.monotonic() + result.rate_wait
            self._refresh_status(
                state="idle", rate_limited_until=time.time() + result.rate_wait, upload_error=None
            )
            return
        self._refresh_status(state="idle", upload_error=None, rate_limited_until=None)

    async def _fence(self, did: str, client: XrpcClient) -> None:
        try:
            await self._pusher.fence(did, client, PushResult())
        except (NetworkError, OSError) as exc:
            # Tried again on the next wake-up; meanwhile the status says why.
            self._refresh_status(upload_error=f"fencing an unheard request: {exc}")

    async def _after_failure(self, did: str, client: XrpcClient, exc: Exception) -> None:
        delay = self._backoff.next_delay()
        self._retry_at = time.monotonic() + delay
        offline = isinstance(exc, TransientError) and exc.status is None
        self._refresh_status(state="offline" if offline else "error", upload_error=str(exc))
        log.info("push failed (%s); retrying in %.2f s", exc, delay)
        if not outcome_unknown(exc):
            return
        # The batch may have been applied: settle before anything is sent again. A 500
        # also answers writes that do not fit the PDS's state (PDS.md): check them all.
        batch = self.outbox.next_batch(
            self._pusher.batch_limit, collections=self._retry_collections
        )
        check = isinstance(exc, NetworkError) and (exc.status or 0) >= 500
        try:
            await self._pusher.reconcile(did, client, batch, PushResult(), check=check)
        except RateLimitedError as again:
            self._pusher.needs_reconcile = True
            wait = max(0.0, (again.reset_at or time.time() + 60) - time.time())
            self._retry_at = max(self._retry_at, time.monotonic() + wait)
            self._refresh_status(rate_limited_until=time.time() + wait)
        except AuthError as again:
            self._pusher.needs_reconcile = True
            self._refresh_status(state="needs_auth", upload_error=str(again))
        except (NetworkError, OSError) as again:
            self._pusher.needs_reconcile = True
            log.info("reconcile after failure also failed: %s", again)

    # -- requests from the app ------------------------------------------------------------

    def push_now(self) -> None:
        """Push everything queued as soon as possible (also after a failure's backoff)."""
        self._forced = True
        self._retry_at = None
        self._refresh_pending_soon()

    async def wait_for_idle(self) -> SyncStatus:
        """Wait until the queue is empty and the engine idle; returns the status then.

        Bound the wait with ``anyio.fail_after(seconds)`` around the call.
        """
        async for status in self.status_changes():
            if status.pending == 0 and status.state in ("idle", "stopped"):
                pending, _, _ = self.outbox.counts()
                if pending == 0:
                    return status
        raise AssertionError("unreachable")

    async def wait_pushed(self, action_id: str) -> None:
        """Wait until the writes of action ``action_id`` are on the PDS.

        Raises ``PermanentError`` if one of them was rejected (it is in the dead letters).
        """
        async for _ in self.status_changes():
            pushed = self.outbox.is_pushed(action_id)
            if pushed is None:
                raise PermanentError(
                    f"a write of action {action_id} was rejected by the PDS; see "
                    "`atsync outbox` (dead letters)"
                )
            if pushed:
                return

    def retry_dead_letters(self) -> int:
        count = self.outbox.retry_dead_letters()
        self._refresh_status()
        self.push_now()
        return count

    def close(self) -> None:
        """Stop capturing local writes (the engine task must already be stopped)."""
        self._capture.detach()


def _lexicon_set(
    lexicons: LexiconSet | Iterable[str | os.PathLike[str] | Mapping[str, Any]] | None,
) -> LexiconSet | None:
    if lexicons is None or isinstance(lexicons, LexiconSet):
        return lexicons
    docs = LexiconSet()
    for item in lexicons:
        if isinstance(item, Mapping):
            docs.add(item)
        else:
            for doc in LexiconSet.load(item):
                docs.add(doc)
    return docs


def _lexicon_validator(
    lexicons: LexiconSet, bindings: Iterable[BoundBinding], extra: Validator | None
) -> Validator:
    """Every pushed binding needs its record Lexicon; records of other collections (from
    ``on_action``) are checked when their Lexicon is in the set."""
    pushed = [b.collection for b in bindings if b.direction != "pull"]
    for collection in pushed:
        if collection not in lexicons:
            raise SchemaError(
                f"binding {collection}: lexicons= has no Lexicon for it (loaded: "
                f"{', '.join(doc.id for doc in lexicons) or 'none'})"
            )
        lexicons.record_def(collection)
    if pushed:
        lexicons.check_refs(*pushed)

    def validate(collection: str, rkey: str, record: Mapping[str, Any]) -> None:
        if collection in lexicons:
            validate_record(lexicons, collection, record, rkey=rkey)
        if extra is not None:
            extra(collection, rkey, record)

    return validate


def _as_dict(status: SyncStatus) -> dict[str, Any]:
    return {name: getattr(status, name) for name in SyncStatus.__slots__}

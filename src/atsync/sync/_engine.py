"""ATSync: the engine that joins an App to the user's repository (push half).

    sync = ATSync(app, bindings={"notes": Binding("com.example.note")}, push=Debounce(0.5))
    async with sync:                       # runs until the block ends
        app.actions.create_note("hello")   # queued in the same transaction, pushed soon
        await sync.wait_for_idle()

Capture starts when the ``ATSync`` is created, before any login: everything done offline is
queued and pushed, in order, once a session exists (deferred auth). The engine is one task
that sleeps until something wakes it — a local commit, a login or logout, ``push_now()``, a
write by another process to the database (seen through SQLite's ``data_version`` within a
second), or the time its last decision named — and then asks ``decide(now, facts)`` what to
do (see ``_decide``). Whatever a step raises becomes an outcome: the engine shows it in the
status and carries on with backoff; it never ends on its own.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import anyio

from .._errors import SchemaError, SignerError
from ..app import App
from ..atproto import FirehoseFrame, IdentityResolver, XrpcClient
from ..db import ModelDB
from ..lexicon import LexiconSet
from ._apply import OnPdsAction
from ._backoff import Backoff
from ._binding import Binding, BoundBinding, declare_writes
from ._budget import RateBudget, is_hosted
from ._capture import DEFAULT_BLOB_LIMIT, Capture, OnAction, Validator
from ._decide import Facts, Fence, Pull, Push, Reconcile, Resync, Wait, decide
from ._engine_blobs import BlobMode, BlobSync
from ._engine_follow import FollowRepos, follow_options
from ._engine_pull import PullEvents
from ._engine_status import StatusKeeper, as_dict
from ._live import listen
from ._merge import ConflictPolicy, check_policy
from ._migrate import upgrade_sync_tables
from ._outbox import Outbox, create_sync_tables
from ._paced import PacedDelivery
from ._puller import Puller
from ._pusher import Pusher
from ._shared import Hlc
from ._status import RowState, State, SyncStatus, WaitReason
from ._steps import StepRunner, lexicon_set, lexicon_validator, required_nulls
from ._strategies import Debounce, Live, Manual, PullStrategy, Queue, Strategy
from ._waker import Waker

__all__ = ["ATSync", "SessionLike"]

log = logging.getLogger("atsync.sync")
POLL_SECONDS = 1.0  # how often an idle engine looks for writes by other processes
_STATE_FOR_WAIT = {
    None: State.IDLE,
    WaitReason.NEEDS_AUTH: State.NEEDS_AUTH,
    WaitReason.WRONG_ACCOUNT: State.ERROR,
    WaitReason.OFFLINE: State.OFFLINE,
    WaitReason.BACKOFF: State.ERROR,
    WaitReason.RATE_LIMITED: State.WAITING,
    WaitReason.DEBOUNCE: State.WAITING,
    WaitReason.MANUAL: State.WAITING,
}


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


class ATSync(StatusKeeper, PullEvents, FollowRepos, BlobSync):
    """Syncs an ``App``'s bound models with the user's repository, both ways.

    ``push`` / ``pull``: when writes go out and when the repository is read (see
    ``_strategies``; defaults ``Debounce(0.5)`` and ``Live()``). ``conflicts``: how a field
    changed both here and elsewhere is decided (``"local"``, ``"remote"`` or a callable
    ``(base, local, remote) -> merged`` on whole rows). ``verify``: check every pulled
    commit's signature against the account's key (resolved with ``identity``, an
    ``IdentityResolver``; by default one for the PLC directory at ``$ATSYNC_PLC_URL`` or
    plc.directory). ``budget``: ``None`` (default) paces by Bluesky's published limits only
    when the PDS is one of Bluesky's hosts; a ``RateBudget`` paces always;
    ``RateBudget.off()`` never. The PDS's own rate-limit answers are obeyed in every case.
    ``clock`` (monotonic seconds) is what the schedule is computed with. ``on_pds_action``:
    the seed's hook, called with a ``RemoteRecord`` for every pulled change, in the
    transaction that applies it (bound collections, and the collections in ``watch`` that
    have no binding: read for the hook alone). ``follow``: DIDs or handles of other
    people's repositories to follow besides those the database already follows (``follow()``;
    handles are resolved with ``identity`` when the engine starts): their bound records arrive
    read-only, keyed by AT URI, or merged into ``shared`` bindings (see ``_engine_follow``).
    ``blobs``: ``"eager"`` fetches the blobs pulled rows reference as they arrive, ``"lazy"``
    when ``fetch_blob`` asks; ``max_blob_size``: the largest blob the PDS takes (the reference
    PDS's default, 5 MiB; no PDS says its own), enforced before anything is queued.
    """

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
        clock: Callable[[], float] = time.monotonic,
        pull: PullStrategy | None = None,
        conflicts: ConflictPolicy = "local",
        verify: bool = True,
        identity: IdentityResolver | None = None,
        on_pds_action: OnPdsAction | None = None,
        watch: Iterable[str] = (),
        follow: Iterable[str] = (),
        blobs: BlobMode = "eager",
        max_blob_size: int = DEFAULT_BLOB_LIMIT,
    ) -> None:
        db = app.model_db
        self.app: App | None = app
        self.lexicons = lexicon_set(lexicons)
        bound: dict[str, BoundBinding] = {}
        for model, binding in bindings.items():
            name = binding.model or model
            if name not in db.schema.models:
                raise SchemaError(f"binding for {name!r}: the app has no such model")
            nulls = required_nulls(self.lexicons, binding.collection)
            bound[name] = binding.bind(db.schema.models[name], nulls=nulls)
        collections = [b.collection for b in bound.values()]
        if len(set(collections)) != len(collections):
            raise SchemaError("two bindings share a collection; each model needs its own")
        if self.lexicons is not None:
            validate = lexicon_validator(self.lexicons, bound.values(), validate)
        self._validate = validate
        self._setup(db, bound, session, push, budget, client_options, clock)
        self._capture: Capture | None = Capture(
            app, self.outbox, bound, on_action=on_action, validate=validate,
            on_queued=self._on_local_change,
        )  # fmt: skip
        self._capture.attach()
        self.pull_strategy: PullStrategy = pull if pull is not None else Live()
        self.verify = verify
        self._identity = identity
        # The clock of shared bindings' stamps: one per database, kept between runs.
        hlc = Hlc(state=self.outbox.get_state("hlc") or Hlc().state)
        self._paced = PacedDelivery(db)
        self._capture.hlc = hlc
        options = follow_options(
            bound, self.outbox, self._capture, validate, check_policy(conflicts), on_pds_action,
            watch, self.lexicons, app.log_remote, hlc, self._paced,
        )  # fmt: skip
        self._puller: Puller | None = Puller(db, **options)
        self._setup_follows(db, bound, follow, options)
        self._setup_blobs(db, bound, blobs, max_blob_size)
        self._capture.blob_limit = max_blob_size
        self._pusher.pulled = frozenset(self._puller.collections)
        signer = app.signer
        declare_writes(signer, bound.values(), on_action is not None)
        self._signer_hooks = (
            getattr(signer, "session_listeners", None),
            getattr(signer, "login_checks", None),
        )
        if session is None and self._signer_hooks[0] is not None:
            self._signer_hooks[0].append(self._on_session_change)
        if self._signer_hooks[1] is not None:
            self._signer_hooks[1].append(self.check_account)

    @classmethod
    def from_database(
        cls,
        db: ModelDB,
        *,
        session: SessionLike | SessionSource,
        push: Strategy | None = None,
        budget: RateBudget | None = None,
        client_options: Mapping[str, Any] | None = None,
    ) -> ATSync:
        """An engine for what a database's outbox holds, without the app's code: the queued
        records are complete, so they can be pushed by any process that holds the database
        (``atsync push``). Nothing new is captured."""
        self = cls.__new__(cls)
        self.app = None
        self.lexicons = None
        self._validate = None
        self._setup(db, {}, session, push, budget, client_options, time.monotonic)
        self._capture = None
        self.pull_strategy = Manual()
        self.verify = True
        self._identity = None
        self._puller = None
        self._paced = PacedDelivery(db)
        self._setup_follows(db, {}, (), {})
        self._setup_blobs(db, {}, "lazy", DEFAULT_BLOB_LIMIT)
        self._signer_hooks = (None, None)
        return self

    def _setup(
        self,
        db: ModelDB,
        bound: dict[str, BoundBinding],
        session: SessionLike | SessionSource | None,
        push: Strategy | None,
        budget: RateBudget | None,
        client_options: Mapping[str, Any] | None,
        clock: Callable[[], float],
    ) -> None:
        self._db = db
        with db.transaction():
            create_sync_tables(db.connection)
            upgrade_sync_tables(db.connection)
        self._bindings = bound
        self.strategy = push or Debounce(0.5)
        self._strategies = {
            b.collection: b.binding.strategy
            for b in bound.values()
            if b.binding.strategy is not None
        }
        self.outbox = Outbox(db)
        self._budget_choice = budget
        self.budget: RateBudget | None = budget
        self._pusher = Pusher(self.outbox, budget)
        self._pusher.mapped = {b.collection: b.record_fields for b in bound.values()}
        self._session_source = self._make_source(session)
        self._client_options = dict(client_options or {})
        self._clock = clock
        self._backoff = Backoff()
        self._waker: Waker | None = None
        self._runner: StepRunner | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._init_status()
        # Per collection: (first, last) local change not yet pushed, and the last push.
        self._changes: dict[str, tuple[float, float]] = {}
        self._last_push: dict[str, float] = {}
        self._forced = False
        self._eager = False
        self._resync_due = True
        self._resync_note: str | None = None  # rows the start-up comparison could not queue
        # Pulls in this run: when the last one ended, asked-for pulls (wait_pulled counts
        # them) and the last one served, whether the event stream is up.
        self._last_pull: float | None = None
        self._pull_forced = False
        self._pull_wanted = 0
        self._pull_done = 0
        self._stream_up = False
        self._session_changed = anyio.Event()  # set, and replaced, at each session change
        # #commit events waiting for the next pull; lost: one was dropped or is not a
        # #commit (the next pull reads the whole repository).
        self._events: deque[FirehoseFrame] = deque()
        self._events_lost = False
        # The PDS said the account is not active (takendown, suspended, deactivated…):
        # nothing is pulled until it says otherwise.
        self._account_inactive: str | None = None
        self._refresh_status(state=State.STOPPED)

    def _make_source(self, session: SessionLike | SessionSource | None) -> SessionSource:
        if session is None:
            signer = self.app.signer if self.app is not None else None
            return lambda: getattr(signer, "session", None)
        if callable(session) and not hasattr(session, "access_token"):
            return session
        fixed = session
        return lambda: fixed  # type: ignore[return-value]

    @property
    def bindings(self) -> Mapping[str, BoundBinding]:
        return dict(self._bindings)

    @property
    def db(self) -> ModelDB:
        return self._db

    @property
    def _running(self) -> bool:
        return self._waker is not None

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
        ``async with sync``. Cancel it to stop; it can be started again later."""
        if self._waker is not None:
            raise RuntimeError("this engine is already running")
        self._waker = Waker()
        self._runner = StepRunner(self)
        self._resync_due = True
        self._eager = self.outbox.counts()[0] > 0  # left from earlier: push at once
        self._last_pull, self._stream_up = None, False
        if self._resumes_stream():
            # The stream will replay what happened since the stored cursor: no need to read
            # the whole repository at start (unless the stream stays down past `fallback`).
            self._last_pull = self._clock()
        try:
            async with anyio.create_task_group() as tg:
                if isinstance(self.pull_strategy, Live) and self._pulls():
                    tg.start_soon(listen, self._stream_session, self._on_repo_event,
                                  self._on_stream, self._stream_cursor,
                                  self._on_bad_frame, self._on_own_host_event,
                                  lambda: self._session_changed)  # fmt: skip
                if self._pulls():
                    tg.start_soon(self._run_follows, self._own_host)
                    tg.start_soon(self._run_blob_fetches)
                    tg.start_soon(self._paced.run)
                task_status.started()
                await self._loop()
        finally:
            runner, self._runner = self._runner, None
            self._waker = None
            with anyio.CancelScope(shield=True):
                await runner.aclose()
                await self._close_follow_clients()
            try:
                self._refresh_status(
                    state=State.STOPPED, waiting_reason=None, resumes_at=None, did=None
                )
            except Exception:  # e.g. the app closed its database first: nothing to count
                self._status = SyncStatus(**{**as_dict(self._status), "state": State.STOPPED})

    async def _loop(self) -> None:
        runner = self._runner
        assert runner is not None
        while True:
            try:
                await self._tick(runner)
            except Exception as exc:
                # A bug, a damaged table, a full disk: show it, back off, go on. The engine
                # is the only thing that pushes; it must not end on its own.
                log.exception("sync engine step failed")
                delay = self._backoff.next_delay()
                runner.retry_at = self._clock() + delay
                runner.retry_reason = WaitReason.BACKOFF
                try:
                    await runner.drop_client()  # a fresh client on the next try
                    self.outbox.create_tables()  # a sync table dropped by hand comes back
                    self._refresh_status(
                        state=State.ERROR,
                        upload_error=f"internal error: {type(exc).__name__}: {exc}",
                        waiting_reason=WaitReason.BACKOFF,
                        resumes_at=time.time() + delay,
                    )
                except Exception:
                    # Even the status cannot be read or written (the database itself fails):
                    # keep it in memory and try again after the backoff.
                    log.exception("could not show the engine's failure")
                    self._status = SyncStatus(
                        **{
                            **as_dict(self._status),
                            "state": State.ERROR,
                            "upload_error": f"internal error: {type(exc).__name__}: {exc}",
                        }
                    )
                await self._sleep(delay)

    async def _tick(self, runner: StepRunner) -> None:
        now = self._clock()
        if runner.observe_external_writes() and self.outbox.counts()[0] > 0:
            self._eager = True  # queued by another process (`atsync retry`, a tool)
        session = await runner.observe_session(self._current_session())
        step = decide(now, self._facts(now, runner, session))
        if isinstance(step, Wait):
            await self._wait(step, now, runner, session)
        elif isinstance(step, Resync):
            await runner.resync()
            self._resync_due = False
        elif isinstance(step, Pull):
            await runner.pull()
        elif isinstance(step, Push):
            self._forced = self._eager = False
            await runner.push(step.collections)
        elif isinstance(step, Reconcile):
            await runner.reconcile()
        elif isinstance(step, Fence):
            await runner.fence()

    def _current_session(self) -> SessionLike | None:
        try:
            return self._session_source()
        except Exception:
            log.exception("the session source raised; treated as logged out")
            return None

    def _facts(self, now: float, runner: StepRunner, session: SessionLike | None) -> Facts:
        pending = self.outbox.pending_by_collection()
        for gone in set(self._changes) - set(pending):
            del self._changes[gone]
        queues = {}
        for collection, count in pending.items():
            # Queued by another process, or left after an error: due by its strategy from now.
            first, last = self._changes.setdefault(collection, (now, now))
            queues[collection] = Queue(first, last, self._last_push.get(collection, 0.0), count)
        return Facts(
            logged_in=session is not None,
            wrong_account=runner.wrong_account is not None,
            auth_failed=runner.auth_failed,
            resync_due=self._resync_due,
            queues=queues,
            strategies=self._strategies,
            default_strategy=self.strategy,
            forced=self._forced,
            eager=self._eager,
            retry_at=runner.retry_at,
            retry_reason=runner.retry_reason,
            retry_collections=runner.retry_collections,
            needs_reconcile=self._pusher.needs_reconcile,
            fence_needed=self._pusher.fence_needed,
            pull_at=self._pull_at(runner),
            pull_forced=self._pull_forced and self._pulls(),
        )

    async def _wait(
        self, step: Wait, now: float, runner: StepRunner, session: SessionLike | None
    ) -> None:
        state = _STATE_FOR_WAIT[step.reason]
        changes: dict[str, Any] = dict(
            state=state,
            did=session.did if session is not None else None,
            waiting_reason=step.reason,
            resumes_at=None if step.until == math.inf else time.time() + (step.until - now),
        )
        if step.reason is None:
            # Idle: nothing queued. Whatever failed before is over.
            self._forced = self._eager = False
            runner.settled()
            changes.update(upload_error=self._resync_note, rate_limited_until=None)
        elif step.reason is WaitReason.WRONG_ACCOUNT:
            changes.update(upload_error=runner.wrong_account)
        elif step.reason in (WaitReason.DEBOUNCE, WaitReason.MANUAL):
            changes.update(upload_error=None, rate_limited_until=None)
        self._refresh_status(**changes)
        await self._sleep(step.until - now)

    async def _sleep(self, seconds: float) -> None:
        waker = self._waker
        assert waker is not None
        with anyio.move_on_after(max(0.0, min(seconds, POLL_SECONDS))):
            await waker.wait()
        waker.clear()

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None:
            waker.set()

    # -- events ---------------------------------------------------------------------------

    def _on_local_change(self, collections: set[str]) -> None:
        now = self._clock()
        for collection in collections:
            first, _ = self._changes.get(collection, (now, now))
            self._changes[collection] = (first, now)
        self._wake()

    def _on_session_change(self, session: object) -> None:
        self._wake()  # a login pushes at once; a logout stops pushing at once

    def check_account(self, did: str) -> None:
        """Refuse ``did`` if this database already syncs with another account (raises
        ``SignerError``; ``ATPSigner.login`` calls it before adopting a session)."""
        account = self.outbox.get_state("account")
        if account is not None and account != did:
            raise SignerError(
                f"this database syncs with {account}; it cannot sync with {did} too (one "
                f"database, one repository). Log in as {account}, or call "
                "start_fresh() on the engine to forget the old account's sync state first."
            )

    # -- requests from the app ------------------------------------------------------------

    def push_now(self) -> None:
        """Push everything queued as soon as possible (also after a failure's backoff)."""
        self._forced = True
        runner = self._runner
        if runner is not None:
            runner.retry_at = None
            runner.auth_failed = False  # "sync now" tries the session again
        self._wake()

    def row_state(self, model: str, key: str) -> RowState:
        """Where one row of a bound model stands: local only, pending, synced, failed or in
        conflict (``RowState``) — e.g. for a sync badge next to each item in a list."""
        if model not in self._bindings:
            raise SchemaError(f"{model!r} is not a bound model (bound: {sorted(self._bindings)})")
        return RowState(self.outbox.row_state(model, key))

    def pull_now(self) -> None:
        """Pull as soon as possible (whatever the pull strategy says)."""
        self._pull_wanted += 1
        self._pull_forced = True
        self._ask_follows()
        runner = self._runner
        if runner is not None:
            runner.pull_retry_at = None
        self._wake()

    async def wait_pulled(self) -> SyncStatus:
        """Pull, and wait until the local state includes the repository's head as of this
        call (a pull that started after it has completed), and each followed repository's
        (a pull of it finished, or failed: see ``follow_errors``), and with ``blobs="eager"``
        the blobs their rows reference (fetched, or failed: ``status.blob_error``). Bound it
        with ``anyio.fail_after``."""
        if not self._pulls():
            return self.status  # no binding pulls: the local state includes all it can
        self.pull_now()
        target, followed = self._pull_wanted, self._follow_asked
        async for _ in self.status_changes():
            if self._pull_done >= target:
                break
        await self._wait_follows(followed)  # and every followed repository's
        if self.blob_mode == "eager":
            await self._wait_blobs(self._kick_blobs())
        self._paced.flush()  # live queries have seen every row pulled
        return self.status

    def start_fresh(self) -> None:
        """Forget this database's sync state — the account, what was synced, conflicts, dead
        letters, the queue — so that it can sync with another account: on the next start
        (or at once, if running) every row of the bound models is queued again as new. The
        local data and the action log are untouched."""
        self.outbox.forget_everything()
        self._resync_due = True
        runner = self._runner
        if runner is not None:
            runner.forget_account()
        self._refresh_status()
        self._wake()

    def retry_dead_letters(self) -> int:
        count = self.outbox.retry_dead_letters()
        self._refresh_status()
        self.push_now()
        return count

    def close(self) -> None:
        """Stop capturing local writes (the engine task must already be stopped). Rows
        changed after this are found by the comparison at the next engine's start."""
        if self._capture is not None:
            self._capture.detach()
        listeners, checks = self._signer_hooks
        for hooks, hook in ((listeners, self._on_session_change), (checks, self.check_account)):
            if hooks is not None and hook in hooks:
                hooks.remove(hook)

    # -- for the step runner --------------------------------------------------------------

    def _budget_for(self, pds_url: str) -> RateBudget | None:
        if self._budget_choice is not None:
            budget: RateBudget | None = self._budget_choice
        elif is_hosted(pds_url):
            budget = RateBudget.hosted()
        else:
            budget = None
        if budget is not None:
            budget.loads(self.outbox.get_state("budget"))
        self.budget = self._pusher.budget = budget
        return budget

    def _pushed(self, collections: frozenset[str] | None) -> None:
        now = self._clock()
        for collection in collections if collections is not None else list(self._changes):
            self._last_push[collection] = now
            self._changes.pop(collection, None)

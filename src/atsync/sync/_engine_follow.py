"""The engine's side of following (mixed into ``ATSync``; the bookkeeping is ``_follows``).

Each followed repository gets a ``Puller`` of its own (``Repo(did)``): resolved to its PDS and
signing key — its PDS may be another host than the user's — and read with a client that sends
no credentials (following works before the user logs in). Each one is pulled by a task of its
own in the engine's task group, so a host that is down or hangs delays only its own
repositories: never the user's own sync, nor the other hosts (at most ``HOST_PULLS`` pulls at
once per host). When: at start (``Manual``: only when asked), on ``pull_now()`` /
``wait_pulled()`` / ``follow()``, every ``Poll`` interval, and with ``Live()`` when the event
streams say so — the user's own host's stream (already open) and one stream per other host
where followed accounts live, shared by all of them; an event about a followed account, or a
stream's (re)connect, makes its task pull that repository (a verified whole comparison: the
events are hints, never applied as such). While a host's stream is down its repositories are
polled every ``fallback`` seconds. A followed repository that fails (offline host, forged
data, an account not active on its host) is reported in ``follow_errors`` and retried with
its next pull, at the latest after ``fallback`` seconds. ``#identity`` and ``#account`` events
make the next pull resolve the DID afresh; an account its host says is not active is resolved
afresh at once, and pulled from its new host if it moved.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import (
    InvalidSyntaxError,
    NetworkError,
    PermanentError,
    ValidationError,
    VerificationError,
)
from ..app import App
from ..atproto import (
    DEFAULT_PLC_URL,
    IdentityResolver,
    XrpcClient,
    is_valid_did,
    validate_atproto_did,
)
from ..db import ModelDB
from ._binding import BoundBinding
from ._follows import Follows, Origin
from ._key_ahead import known_key
from ._live import listen_for_others
from ._merge import ConflictPolicy
from ._paced import PacedDelivery
from ._puller import Puller
from ._repo import Repo
from ._status import INACTIVE_ERRORS
from ._strategies import Live, Manual, Poll, PullStrategy

if TYPE_CHECKING:
    from ._apply import OnPdsAction
    from ._capture import Capture, Validator
    from ._steps import StepRunner

__all__ = ["FollowRepos"]

log = logging.getLogger("atsync.sync")
HOST_PULLS = 4  # followed repositories of one host downloading at once
# Followed repositories pulled at once, all hosts together: each holds its read (up to 32 MiB
# in memory) until it is applied.
FOLLOW_PULLS = 8


class FollowRepos:
    """Mixed into ``ATSync``: ``follow``/``unfollow``/``following``/``origin``."""

    app: App | None
    _capture: Capture | None
    _identity: Any
    _runner: StepRunner | None
    _puller: Puller | None
    pull_strategy: PullStrategy
    verify: bool

    if TYPE_CHECKING:  # from the other parts of ATSync

        def _kick_blobs(self) -> int: ...
        async def _checkpoint_if_due(self) -> None: ...
        def _current_session(self) -> Any: ...

    def _setup_follows(
        self,
        db: ModelDB,
        bound: Mapping[str, BoundBinding],
        follow: Iterable[str],
        puller_options: dict[str, Any],
    ) -> None:
        self._follows = Follows(db)
        self._follow_db = db
        self._follow_bound = dict(bound)
        self._follow_options = puller_options
        self._followed_pullers: dict[str, Puller] = {}
        self.follow_errors: dict[str, str] = {}  # DID -> the last failure of its pull
        self._follow_retry: set[str] = set()  # failed for a reason a later try may not meet
        self._follow_hosts: dict[str, str] = {}  # DID -> its PDS, as last resolved
        self._host_streams: dict[str, bool] = {}  # host -> its event stream is up
        self._hosts_changed = anyio.Event()
        self._follows_changed = anyio.Event()
        self._follow_wake: dict[str, anyio.Event] = {}  # DID -> wakes its task
        self._follow_new: set[str] = set()  # followed while running: pull at once
        self._follow_asked = 0  # pull_now() generations, and what each task has done
        self._follow_done: dict[str, int] = {}
        self._follow_progress = anyio.Event()
        self._follow_clients: dict[str, XrpcClient] = {}  # by host, no credentials
        self._host_limits: dict[str, anyio.CapacityLimiter] = {}
        self._follow_pulls = anyio.CapacityLimiter(FOLLOW_PULLS)
        self._follow_resolver: IdentityResolver | None = None  # made here, closed at stop
        # Handles are resolved when the engine starts (a failure goes to follow_errors).
        self._follow_handles: list[str] = []
        for who in follow:
            if is_valid_did(who):
                self._follows.add(_followable(who), None)
            elif isinstance(who, str) and "." in who:
                self._follow_handles.append(who)
            else:
                raise ValidationError(f"follow=[…] takes DIDs and handles, not {who!r}")
        # wait_pulled() includes the repositories of these handles: they are not followed
        # until the engine has resolved them.
        self._handles_resolved = anyio.Event()
        if not self._follow_handles:
            self._handles_resolved.set()
        if self._capture is not None:
            self._capture.read_only = self._follows.followed_row

    @property
    def following(self) -> list[str]:
        """The DIDs of the repositories this database follows, oldest first."""
        return self._follows.dids()

    async def follow(self, who: str) -> str:
        """Follow a repository by DID or handle (resolved with ``identity=``); its bound
        records arrive with the next pull (one is started now). Returns its DID."""
        handle = None
        did = who
        if is_valid_did(who):
            _followable(who)  # a DID no resolver takes is refused now, not at each pull
        else:
            handle = who
            did = await self._did_of_handle(who)
        own = self._own_did()
        if did == own:
            raise ValidationError(f"{who!r} is this account's own repository")
        if self._follows.add(did, handle):
            self._follow_new.add(did)
            self._follows_changed.set()  # its task starts, and pulls at once
        return did

    async def _did_of_handle(self, handle: str) -> str:
        """A handle's DID: by DNS / HTTPS well-known, else — logged in — as the user's own PDS
        resolves it (any PDS resolves handles, and a local dev PDS is the only one that knows
        its ``.test`` handles), checked against the DID document's claimed handle."""
        try:
            return str((await self._resolver().resolve(handle)).did)
        except (VerificationError, NetworkError) as failure:
            session = self._current_session()
            if session is None:
                raise
            pds = session.pds_url
            try:
                answer = await self._public_client(pds).query(
                    "com.atproto.identity.resolveHandle", {"handle": handle}
                )
            except PermanentError as refused:  # e.g. HandleNotFound: said as the resolver does
                raise VerificationError(
                    f"handle {handle} does not resolve: {failure}; nor by {pds}: "
                    f"{refused.error or refused}"
                ) from refused
            did = answer.get("did") if isinstance(answer, dict) else None
            if not isinstance(did, str) or not is_valid_did(did):
                raise VerificationError(f"{pds} resolved {handle!r} to {did!r}") from failure
            claimed = (await self._resolver().resolve_did(did)).handle
            if claimed != handle:
                raise VerificationError(
                    f"{pds} resolves {handle!r} to {did}, whose DID document claims "
                    f"{claimed or 'no handle'}"
                ) from failure
            return did

    def unfollow(self, who: str) -> bool:
        """Stop following (by DID or the handle it was followed by): its rows are deleted
        and its pull position forgotten. False if it was not followed."""
        did = self._follows.did_for(who)
        if did is None:
            return False
        self._followed_pullers.pop(did, None)
        self.follow_errors.pop(did, None)
        self._follow_retry.discard(did)
        self._follow_done.pop(did, None)
        if self._follow_hosts.pop(did, None) is not None:
            self._hosts_changed.set()
        self._follows_changed.set()  # its task stops
        app = self.app
        capture = self._capture
        assert capture is not None, "an engine without its app follows nobody"
        removed = self._follows.remove(
            did, capture.applying_remote, app.log_remote if app is not None else None,
            {m: b for m, b in self._follow_bound.items() if b.shared},
        )  # fmt: skip
        log.info("unfollowed %s: %d rows removed", did, removed)
        return True

    def origin(self, model: str, key: str) -> Origin | None:
        """Where the row ``model``/``key`` came from (the user's own repository, or a
        followed one): ``Origin(did, uri, cid)``; None for a row not synced yet."""
        return self._follows.origin(model, key, self._own_did())

    def _own_did(self) -> str | None:
        runner = self._runner
        if runner is not None and runner.session is not None:
            return str(runner.session.did)
        return self.app.did if self.app is not None and self.app.did.startswith("did:") else None

    def _followed_puller(self, did: str) -> Puller:
        puller = self._followed_pullers.get(did)
        if puller is None:
            puller = Puller(self._follow_db, **self._follow_options, repo=Repo(did))
            self._followed_pullers[did] = puller
        return puller

    def _resolver(self, *, loopback: bool = False) -> Any:
        """The engine's identity resolver, for its own account and the ones it follows:
        ``identity=``, or one made on first use for the PLC directory at ``$ATSYNC_PLC_URL``
        (or plc.directory). A directory or PDS on loopback (``loopback``) is a development
        set-up whose DID documents name http:// endpoints."""
        if self._identity is not None:
            return self._identity
        if self._follow_resolver is None:
            plc = os.environ.get("ATSYNC_PLC_URL", DEFAULT_PLC_URL)
            local = loopback or plc.startswith(("http://localhost", "http://127.0.0.1"))
            self._follow_resolver = IdentityResolver(plc_url=plc, allow_insecure_localhost=local)
        return self._follow_resolver

    def _public_client(self, pds: str) -> XrpcClient:
        """A client without credentials for ``pds``: one per host, its connections reused."""
        pds = pds.rstrip("/")
        client = self._follow_clients.get(pds)
        if client is None:
            client = self._follow_clients[pds] = XrpcClient(pds)
        return client

    async def _close_follow_clients(self) -> None:
        clients, self._follow_clients = self._follow_clients, {}
        for client in clients.values():
            await client.aclose()
        resolver, self._follow_resolver = self._follow_resolver, None
        if resolver is not None:
            await resolver.aclose()

    # -- when: asked, polled, or told by an event stream ----------------------------------------

    def _kick_follows(self, dids: Iterable[str] | None = None) -> None:
        for did in self._follows.dids() if dids is None else dids:
            wake = self._follow_wake.get(did)
            if wake is not None:
                wake.set()

    def _ask_follows(self) -> int:
        """``pull_now()``: every followed repository is pulled; returns the generation a
        ``wait_pulled()`` waits for."""
        self._follow_asked += 1
        self._kick_follows()
        return self._follow_asked

    async def _wait_follows(self, generation: int) -> None:
        """Until every followed repository finished a pull asked at ``generation`` (or
        later); a failed pull counts (its error is in ``follow_errors``)."""
        await self._handles_resolved.wait()
        while any(self._follow_done.get(did, 0) < generation for did in self._follows.dids()):
            await self._follow_progress.wait()

    def _poll_delay(self, did: str) -> float:
        strategy = self.pull_strategy
        if isinstance(strategy, Poll):
            return strategy.seconds
        if isinstance(strategy, Live):
            host = self._follow_hosts.get(did)
            streamed = host is not None and self._host_streams.get(host, False)
            # A repository whose host failed, or says the account is not active there, is
            # tried again without waiting for an event: an account that moved may say so
            # only on its new host's stream.
            return math.inf if streamed and did not in self._follow_retry else strategy.fallback
        return math.inf  # OnStart, Manual: when asked

    def _on_other(self, did: str | None, host: str, kind: str) -> None:
        """An event on ``host`` about ``did`` (None: the stream (re)connected)."""
        if did is None:
            self._kick_follows(d for d, h in self._follow_hosts.items() if h == host)
        elif did in self._follow_wake:
            # A new key or host (#identity), or an account deactivated here because it moved
            # to another host (#account): resolved afresh by its next pull.
            if kind in ("#identity", "#account"):
                self._forget_identity(did)
            self._follow_wake[did].set()

    def _forget_identity(self, did: str) -> None:
        invalidate = getattr(self._resolver(), "invalidate", None)
        if invalidate is not None:
            invalidate(did)

    def _on_host_stream(self, host: str, up: bool) -> None:
        self._host_streams[host] = up
        if not up:  # its repositories go back to polling
            self._kick_follows(d for d, h in self._follow_hosts.items() if h == host)

    # -- the tasks -------------------------------------------------------------------------------

    async def _run_follows(self, own_host: Callable[[], str | None]) -> None:
        """Run until cancelled (in the engine's task group): a task per followed repository,
        and with ``Live()`` an event stream per host of followed accounts."""
        running: dict[str, anyio.CancelScope] = {}
        starting = True
        for handle in self._follow_handles:
            try:
                await self.follow(handle)
            except (ValidationError, NetworkError, VerificationError) as exc:
                self.follow_errors[handle] = f"cannot follow {handle!r}: {exc}"
                log.warning("cannot follow %s: %s", handle, exc)
        self._handles_resolved.set()
        async with anyio.create_task_group() as tg:
            if isinstance(self.pull_strategy, Live):
                tg.start_soon(self._watch_follow_hosts, own_host)
            while True:
                self._follows_changed = anyio.Event()
                dids = set(self._follows.dids())
                for did in dids - set(running):
                    scope = running[did] = anyio.CancelScope()
                    at_once = did in self._follow_new or (
                        starting and not isinstance(self.pull_strategy, Manual)
                    )
                    self._follow_new.discard(did)
                    tg.start_soon(self._follow_task, did, scope, at_once)
                for did in set(running) - dids:
                    running.pop(did).cancel()
                    self._follow_wake.pop(did, None)
                starting = False
                await self._follows_changed.wait()

    async def _follow_task(self, did: str, scope: anyio.CancelScope, at_once: bool) -> None:
        with scope:
            wake = self._follow_wake[did] = anyio.Event()
            pending = at_once
            while True:
                # Asked before this task ran (or since its last pull): no waiting.
                if not pending and self._follow_done.get(did, 0) >= self._follow_asked:
                    with anyio.move_on_after(self._poll_delay(did)):
                        await wake.wait()
                pending = False
                # A new event before the pull: what is asked meanwhile makes another one.
                wake = self._follow_wake[did] = anyio.Event()
                generation = self._follow_asked
                try:
                    await self._pull_followed(did)
                except Exception as exc:
                    # A bug, or the database failing under this repository's rows: said for
                    # this repository, tried again by the usual rules; the engine and the
                    # other repositories go on.
                    log.exception("pulling followed repository %s failed", did)
                    self._follow_retry.add(did)
                    self.follow_errors[did] = f"unexpected error: {exc!r}"
                self._follow_done[did] = max(self._follow_done.get(did, 0), generation)
                self._kick_blobs()
                progress, self._follow_progress = self._follow_progress, anyio.Event()
                progress.set()
                await self._checkpoint_if_due()

    async def _watch_follow_hosts(self, own_host: Callable[[], str | None]) -> None:
        """Run until cancelled: one event stream per host of followed repositories (the
        user's own host is already listened to), started and stopped as follows change."""
        running: dict[str, anyio.CancelScope] = {}
        async with anyio.create_task_group() as tg:
            while True:
                self._hosts_changed = anyio.Event()
                own = own_host()
                wanted = set(self._follow_hosts.values()) - {own}
                for host in wanted - set(running):
                    scope = running[host] = anyio.CancelScope()
                    tg.start_soon(self._host_stream, host, scope)
                for host in set(running) - wanted:
                    running.pop(host).cancel()
                    self._host_streams.pop(host, None)
                await self._hosts_changed.wait()

    async def _host_stream(self, host: str, scope: anyio.CancelScope) -> None:
        with scope:
            await listen_for_others(
                host,
                lambda did, kind: self._on_other(did, host, kind),
                lambda up: self._on_host_stream(host, up),
            )

    async def _pull_followed(self, did: str) -> None:
        """One pull of a followed repository; a failure goes to ``follow_errors``. An account
        that is not active on its host is resolved afresh once: if it moved to another host,
        it is pulled from there at once."""
        inactive = await self._pull_followed_once(did)
        if inactive is None:
            return
        host = self._follow_hosts.get(did)  # the host that said so
        self._forget_identity(did)
        try:
            moved = (await self._resolver().resolve(did, check_handle=False)).pds.rstrip("/")
        except (NetworkError, VerificationError):
            moved = host
        if moved != host:
            log.info("followed repository %s moved from %s to %s", did, host, moved)
            inactive = await self._pull_followed_once(did)
            if inactive is None:
                return
        where = self._follow_hosts.get(did)
        self.follow_errors[did] = f"the account is not active on its PDS {where} ({inactive.error})"
        self._follow_retry.add(did)
        log.info("followed repository %s is not active on %s: %s", did, where, inactive)

    async def _pull_followed_once(self, did: str) -> PermanentError | None:
        """``_pull_followed`` at the host the DID resolves to now. Returns the host's answer
        when the account is not active there; any other failure goes to ``follow_errors``."""
        identity = None
        try:
            identity = await self._resolver().resolve(did, check_handle=False)
            pds = identity.pds.rstrip("/")
            if self._follow_hosts.get(did) != pds:
                self._follow_hosts[did] = pds  # a new host to listen to (or it moved)
                self._hosts_changed.set()
            host = self._host_limits.setdefault(pds, anyio.CapacityLimiter(HOST_PULLS))
            # The host's slot only while downloading: it serves the next repository while
            # this one is verified and applied.
            async with self._follow_pulls:
                theirs = self._public_client(pds)
                key = identity.signing_key if self.verify else None
                puller = self._followed_puller(did)
                result = await puller.pull(did, theirs, known_key(key), download_slot=host)
        except (VerificationError, InvalidSyntaxError) as exc:
            # Tried again on the next event or ask, not on a timer.
            self._follow_retry.discard(did)
            if identity is None:
                # No DID document (yet), or one without a usable PDS or key: nothing of the
                # repository was read, so nothing of it is recorded as refused.
                self.follow_errors[did] = f"its identity does not resolve: {exc}"
                log.warning("followed repository %s: its identity does not resolve: %s", did, exc)
            else:  # forged or damaged: each try records its refusal
                reason = (
                    "VerificationError"
                    if isinstance(exc, VerificationError)
                    else "InvalidSyntaxError"
                )
                self._followed_puller(did).reject_all(did, reason, str(exc))
                self.follow_errors[did] = f"the repository failed verification: {exc}"
                log.warning("followed repository %s failed verification: %s", did, exc)
        except PermanentError as exc:
            if exc.error in INACTIVE_ERRORS:
                return exc
            self._follow_retry.discard(did)
            self.follow_errors[did] = str(exc)
            log.info("pulling followed repository %s failed: %s", did, exc)
        except (NetworkError, OSError) as exc:
            self._follow_retry.add(did)
            self.follow_errors[did] = str(exc)
            log.info("pulling followed repository %s failed: %s", did, exc)
        else:
            self._follow_retry.discard(did)
            self.follow_errors.pop(did, None)
            if result.applied or result.deleted:
                log.info(
                    "pulled %s at rev %s: %d applied, %d deleted",
                    did, result.rev, result.applied, result.deleted,
                )  # fmt: skip
        return None


def follow_options(
    bound: Mapping[str, BoundBinding],
    outbox: Any,
    capture: Capture,
    validate: Validator | None,
    policy: ConflictPolicy,
    on_pds_action: OnPdsAction | None,
    watch: Iterable[str],
    lexicons: Any,
    log_remote: Any,
    hlc: Any,
    paced: PacedDelivery,
) -> dict[str, Any]:
    """The arguments every ``Puller`` of this engine shares (the user's own and followed)."""
    return {
        "hlc": hlc,
        "paced": paced,
        "outbox": outbox,
        "bindings": bound,
        "applying_remote": capture.applying_remote,
        "validate": validate,
        "policy": policy,
        "on_pds_action": on_pds_action,
        "watch": watch,
        "lexicons": lexicons,
        "log_remote": log_remote,
    }


def _followable(did: str) -> str:
    """``did`` if a resolver can take it (``validate_atproto_did``); else the error, which
    names what is wrong, as an ``InvalidSyntaxError`` (a method atproto does not use too)."""
    try:
        return validate_atproto_did(did)
    except VerificationError as exc:
        raise InvalidSyntaxError(f"cannot follow {did!r:.80}: {exc}") from None

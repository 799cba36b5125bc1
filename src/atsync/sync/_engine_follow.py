"""The engine's side of following (mixed into ``ATSync``; the bookkeeping is ``_follows``).

Each followed repository gets a ``Puller`` of its own (``Repo(did)``): resolved to its PDS and
signing key — its PDS may be another host than the user's — and read with a client that sends
no credentials. A pull step pulls the followed repositories after the user's own one. With
``Live()`` the event streams say when: the user's own host's stream (already open) and one
stream per other host where followed accounts live, shared by all of them; an event about a
followed account, or a stream's reconnect, makes the next step pull that repository (a
verified whole comparison: the events are hints, never applied as such). While a host's
stream is down its repositories are polled every ``fallback`` seconds. A followed
repository that fails (offline host, forged data) is reported in ``follow_errors`` and
retried with the next step; it never holds back the others or the user's own sync.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import NetworkError, ValidationError, VerificationError
from ..app import App
from ..atproto import XrpcClient, is_valid_did
from ..db import ModelDB
from ._binding import BoundBinding
from ._follows import Follows, Origin
from ._live import listen_for_others
from ._merge import ConflictPolicy
from ._puller import Puller
from ._repo import Repo
from ._strategies import Live, PullStrategy

if TYPE_CHECKING:
    from ._apply import OnPdsAction
    from ._capture import Capture, Validator
    from ._steps import StepRunner

__all__ = ["FollowRepos"]

log = logging.getLogger("atsync.sync")
FOLLOW_PULLS = 4  # followed repositories pulled at once


class FollowRepos:
    """Mixed into ``ATSync``: ``follow``/``unfollow``/``following``/``origin``."""

    app: App | None
    _capture: Capture | None
    _identity: Any
    _runner: StepRunner | None
    _pull_forced: bool
    _wake: Callable[[], None]
    _puller: Puller | None
    pull_strategy: PullStrategy

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
        # Live: which host each followed DID is on, the event streams of those hosts, and
        # the followed repositories their events (or a reconnect) said changed.
        self._follow_hosts: dict[str, str] = {}
        self._host_streams: dict[str, bool] = {}
        self._hosts_changed = anyio.Event()
        self._follow_due: set[str] = set()
        self._follow_pulled: set[str] = set()  # pulled at least once in this run
        self._follow_clients: dict[str, XrpcClient] = {}  # by host, no credentials
        for who in follow:
            if not is_valid_did(who):
                raise ValidationError(
                    f"follow=[…] takes DIDs ({who!r} is not one); follow a handle with "
                    "await sync.follow(handle), which resolves it"
                )
            self._follows.add(who, None)
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
        if not is_valid_did(who):
            handle = who
            resolver = self._identity
            if resolver is None and self._runner is not None:
                resolver = self._runner._resolver
            if resolver is None:
                raise ValidationError(
                    f"cannot resolve the handle {who!r} before the engine has an identity "
                    "resolver: give ATSync(identity=…) or follow by DID"
                )
            did = (await resolver.resolve(who)).did
        own = self._own_did()
        if did == own:
            raise ValidationError(f"{who!r} is this account's own repository")
        if self._follows.add(did, handle):
            self._pull_forced = True
            self._wake()
        return did

    def unfollow(self, who: str) -> bool:
        """Stop following (by DID or the handle it was followed by): its rows are deleted
        and its pull position forgotten. False if it was not followed."""
        did = self._follows.did_for(who)
        if did is None:
            return False
        self._followed_pullers.pop(did, None)
        self.follow_errors.pop(did, None)
        if self._follow_hosts.pop(did, None) is not None:
            self._hosts_changed.set()
        app = self.app
        capture = self._capture
        assert capture is not None, "an engine without its app follows nobody"
        removed = self._follows.remove(
            did, capture.applying_remote, app.log_remote if app is not None else None
        )
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

    async def _close_follow_clients(self) -> None:
        clients, self._follow_clients = self._follow_clients, {}
        for client in clients.values():
            await client.aclose()

    def _follow_streams_up(self) -> bool:
        """Every followed repository's host has its event stream up (Live needs no poll)."""
        hosts = {self._follow_hosts.get(did) for did in self._follows.dids()}
        return None not in hosts and all(self._host_streams.get(h or "") for h in hosts)

    def _on_other(self, did: str | None, host: str) -> None:
        """An event on ``host`` about ``did`` (None: the stream reconnected)."""
        followed = self._follows.dids()
        if did is None:
            due = {d for d in followed if self._follow_hosts.get(d) == host}
        else:
            due = {did} if did in followed else set()
        if due:
            self._follow_due |= due
            self._pull_forced = True
            self._wake()

    def _on_host_stream(self, host: str, up: bool) -> None:
        self._host_streams[host] = up
        self._wake()

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
                lambda did: self._on_other(did, host),
                lambda up: self._on_host_stream(host, up),
            )

    async def _pull_follows(self, runner: StepRunner, client: XrpcClient, verify: bool) -> None:
        """Pull the followed repositories that are due — all of them unless Live has every
        host's stream up, else those whose events said they changed — ``FOLLOW_PULLS`` at a
        time (their downloads overlap). A failure is kept in ``follow_errors``."""
        live = isinstance(self.pull_strategy, Live)
        due = []
        for did in self._follows.dids():
            host = self._follow_hosts.get(did)
            streamed = live and host is not None and self._host_streams.get(host, False)
            if streamed and did in self._follow_pulled and did not in self._follow_due:
                continue
            self._follow_due.discard(did)
            due.append(did)
        limiter = anyio.CapacityLimiter(FOLLOW_PULLS)
        async with anyio.create_task_group() as tg:
            for did in due:
                tg.start_soon(self._pull_followed, runner, client, verify, did, limiter)

    async def _pull_followed(
        self,
        runner: StepRunner,
        client: XrpcClient,
        verify: bool,
        did: str,
        limiter: anyio.CapacityLimiter,
    ) -> None:
        async with limiter:
            try:
                identity = await runner.resolver(client).resolve(did)
                pds = identity.pds.rstrip("/")
                if self._follow_hosts.get(did) != pds:
                    self._follow_hosts[did] = pds  # a new host to listen to (or it moved)
                    self._hosts_changed.set()
                puller = self._followed_puller(did)
                theirs = self._follow_clients.get(pds)
                if theirs is None:  # one client per host: its connections are reused
                    theirs = self._follow_clients[pds] = XrpcClient(pds)
                key = identity.signing_key if verify else None
                result = await puller.pull(did, theirs, key)
            except VerificationError as exc:
                self._followed_puller(did).reject_all(did, "VerificationError", str(exc))
                self.follow_errors[did] = f"the repository failed verification: {exc}"
                log.warning("followed repository %s failed verification: %s", did, exc)
            except (NetworkError, OSError) as exc:
                self.follow_errors[did] = str(exc)
                log.info("pulling followed repository %s failed: %s", did, exc)
            else:
                self._follow_pulled.add(did)
                self.follow_errors.pop(did, None)
                if result.applied or result.deleted:
                    log.info(
                        "pulled %s at rev %s: %d applied, %d deleted",
                        did, result.rev, result.applied, result.deleted,
                    )  # fmt: skip


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
) -> dict[str, Any]:
    """The arguments every ``Puller`` of this engine shares (the user's own and followed)."""
    return {
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

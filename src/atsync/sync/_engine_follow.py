"""The engine's side of following (mixed into ``ATSync``; the bookkeeping is ``_follows``).

Each followed repository gets a ``Puller`` of its own (``Repo(did)``): resolved to its PDS and
signing key — its PDS may be another host than the user's — and read with a client that sends
no credentials. Every pull step of the engine pulls the followed repositories after the
user's own one; with ``Live()`` that is at least every ``fallback`` seconds (their events are
not followed yet). A followed repository that fails (offline host, forged data) is reported
and retried with the next step; it never holds back the others or the user's own sync.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .._errors import NetworkError, ValidationError, VerificationError
from ..app import App
from ..atproto import XrpcClient, is_valid_did
from ..db import ModelDB
from ._binding import BoundBinding
from ._follows import Follows, Origin
from ._merge import ConflictPolicy
from ._puller import Puller
from ._repo import Repo

if TYPE_CHECKING:
    from ._apply import OnPdsAction
    from ._capture import Capture, Validator
    from ._steps import StepRunner

__all__ = ["FollowRepos"]

log = logging.getLogger("atsync.sync")


class FollowRepos:
    """Mixed into ``ATSync``: ``follow``/``unfollow``/``following``/``origin``."""

    app: App | None
    _capture: Capture | None
    _identity: Any
    _runner: StepRunner | None
    _pull_forced: bool
    _wake: Callable[[], None]
    _puller: Puller | None

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

    async def _pull_follows(self, runner: StepRunner, client: XrpcClient, verify: bool) -> None:
        """Pull every followed repository once; a failure is kept in ``follow_errors``."""
        for did in self._follows.dids():
            try:
                identity = await runner.resolver(client).resolve(did)
                puller = self._followed_puller(did)
                async with XrpcClient(identity.pds) as theirs:
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

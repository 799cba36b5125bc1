"""The engine's steps and their outcomes: push, reconcile, fence, resync.

``StepRunner`` owns what one run of the engine holds — the XRPC client of the current
session, the retry time and its reason, whether the PDS refused the session or the session
belongs to another account — and turns every failure of a step into an outcome (a retry
time, a status) instead of an exception. ``decide`` reads these facts on the next tick.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import (
    AuthError,
    BadSignature,
    NetworkError,
    PermanentError,
    RateLimitedError,
    SchemaError,
    TransientError,
    VerificationError,
)
from ..atproto import (
    FirehoseFrame,
    IdentityResolver,
    XrpcClient,
    outcome_unknown,
    verify_commit_event,
)
from ..lexicon import LexiconSet, check_model_against_lexicon, validate_record
from ._apply import PullResult
from ._binding import BoundBinding
from ._capture import Validator
from ._key_ahead import KeyAhead, SigningKeyError, known_key
from ._pusher import PushResult, RepoMoved
from ._resync import ResyncScan
from ._status import INACTIVE_ERRORS, State, WaitReason

if TYPE_CHECKING:
    from ._engine import ATSync, SessionLike

__all__ = ["StepRunner", "lexicon_set", "lexicon_validator"]

log = logging.getLogger("atsync.sync")
OFFLINE_PROBE_SECONDS = 5.0  # while the PDS does not answer, try at least this often
AUTH_RETRY_SECONDS = 60.0  # a refused session is tried again this long after
PRUNE_CHUNK = 5000  # settled bookkeeping rows forgotten per idle tick
# What the PDS answers for a repository whose account is not active.


class StepRunner:
    """One run of the engine: its client, its retry state, and the steps."""

    def __init__(self, engine: ATSync) -> None:
        self.engine = engine
        self.session: SessionLike | None = None
        self.client: XrpcClient | None = None
        self.retry_at: float | None = None
        self.retry_reason = WaitReason.BACKOFF
        self.retry_collections: frozenset[str] | None = None
        self.auth_failed = False
        self.wrong_account: str | None = None  # why this session's account is refused
        self.pull_retry_at: float | None = None  # a failed pull is tried again then
        self.head_renewed = False  # see _renew_head: once per session
        self._data_version: int | None = None

    # -- what the engine observes on every tick ------------------------------------------

    def observe_external_writes(self) -> bool:
        """True when another connection committed to the database since the last look."""
        row = self.engine.db.execute("PRAGMA data_version").fetchone()
        version = int(row[0])
        changed = self._data_version is not None and version != self._data_version
        self._data_version = version
        return changed

    async def observe_session(self, current: SessionLike | None) -> SessionLike | None:
        if current is self.session:
            return current
        await self.drop_client()
        self.session = current
        engine = self.engine
        changed, engine._session_changed = engine._session_changed, anyio.Event()
        changed.set()  # the event stream follows the session: to its host, or closed
        if current is None:
            return None
        self.client = XrpcClient(session=current, **engine._client_options)
        self.auth_failed = False
        self.retry_at = None
        engine._pusher.server_limit = None
        engine._budget_for(current.pds_url)
        account = engine.outbox.get_state("account")
        if account is None:
            engine.outbox.set_state("account", current.did)
            account = current.did
        self.wrong_account = None
        if account != current.did:
            self.wrong_account = (
                f"this database syncs with {account}, but the session is {current.did}: "
                f"nothing is pushed. Log in as {account}, or call start_fresh() to sync "
                "with the new account from scratch."
            )
        # What the old session's stream said of the account (deactivated, a signing key) was
        # said by its host: after a move the new host says otherwise. The stored stream cursor
        # counts the old host's events: it is not used at another (``_stream_cursor``).
        engine._account_inactive = None
        self.forget_identity()
        self.head_renewed = False
        engine._eager = True  # a login pushes at once
        # And pulls — unless the strategy is Manual (only when asked) or the event stream will
        # replay from its stored cursor. A pull asked for before the login stays asked for.
        engine._pull_forced = engine._pull_forced or engine._pulls_after_login()
        self.pull_retry_at = None
        return current

    async def drop_client(self) -> None:
        client, self.client, self.session = self.client, None, None
        if client is not None:
            await client.aclose()

    def forget_account(self) -> None:
        self.session = None  # observed afresh on the next tick: the account is set again
        self.wrong_account = None

    def settled(self) -> None:
        """Nothing queued, nothing unsettled: forget the last failure, prune bookkeeping."""
        self.retry_at = None
        self.retry_collections = None
        engine = self.engine
        if not engine._pusher.fence_needed:
            # In short transactions: an idle engine comes back here every second.
            engine.outbox.prune_settled(limit=PRUNE_CHUNK)

    def forget_identity(self) -> None:
        did = self.session.did if self.session is not None else None
        invalidate = getattr(self.engine._resolver(), "invalidate", None)
        if invalidate is not None and did is not None:
            invalidate(did)

    async def aclose(self) -> None:
        await self.drop_client()

    # -- steps ----------------------------------------------------------------------------

    async def resync(self) -> None:
        """Queue the rows whose state the sync tables do not know (see ``_resync``)."""
        engine = self.engine
        if engine.app is None or not engine._bindings:
            return
        capture = engine._capture
        scan = ResyncScan(
            engine.app, engine.outbox, engine._bindings, validate=engine._validate,
            write_shared=capture.write_shared_row if capture is not None else None,
        )  # fmt: skip
        await scan.run_async()
        if scan.queued:
            log.info("start-up comparison queued %d writes (%d deletes)", scan.queued, scan.deletes)
            engine._eager = True  # rows that waited for an engine: push them now
        engine._resync_note = None
        if scan.failures:
            first = scan.failures[0]
            engine._resync_note = (
                f"{len(scan.failures)} row(s) cannot be records and stay local (first: "
                f"{first.model}/{first.key}: {first.message})"
            )
            log.warning("%s", engine._resync_note)

    async def pull(self) -> bool:
        """Bring the bound models up to the repository's head (see ``_puller``); True if
        it did."""
        engine = self.engine
        puller = engine._puller
        assert puller is not None, "decide() pulls only with pulled bindings"
        did, client = self._did_client()
        wanted = engine._pull_wanted
        engine._pull_forced = False
        if engine._account_inactive is not None and engine._stream_up:
            # Not pulled while the account is not active; the stream's next #account says
            # when it is again (without a stream, each pull asks the PDS).
            self._show_inactive()
            return False
        engine._refresh_status(state=State.PULLING, did=did, waiting_reason=None, resumes_at=None)

        def progress(done: int, total: int) -> None:
            engine._refresh_status(pull_progress=(done, total))

        async def signing_key() -> str | None:
            return await self._signing_key(did, client) if engine.verify else None

        frames, engine._events = list(engine._events), deque()
        lost, engine._events_lost = engine._events_lost, False
        log.debug(
            "pull: %d events, lost=%s, asked %d/%d, stream %s", len(frames), lost,
            engine._pull_done, engine._pull_wanted, "up" if engine._stream_up else "down",
        )  # fmt: skip
        key: str | None = None
        try:
            if frames and not lost:
                key = await KeyAhead.now(signing_key)  # the events are checked with it first
            followed = frames and not lost and key is not None
            if frames and not followed:
                log.info(
                    "%d events, but the stream lost track: reading the repository", len(frames)
                )
            if not followed or not await self._apply_events(did, key or "", frames):
                result = await puller.pull(did, client, signing_key, progress)
                # The events that arrived before this read are in it: the stream resumes
                # after them, not from an older position (or none: the whole read again).
                seqs = [frame.seq for frame in frames if frame.seq is not None]
                puller.stream_passed(max(seqs) if seqs else None)
            elif engine._pull_wanted > engine._pull_done:
                # Asked for the head as of now: the events may not have reached it yet.
                result = await puller.pull(did, client, known_key(key), progress)
            else:
                result = PullResult()
        except SigningKeyError as exc:
            self._pull_failed(f"cannot resolve the account's signing key: {exc}", None)
            return False
        except RateLimitedError as exc:
            wait = max(0.0, (exc.reset_at or time.time() + 60) - time.time())
            self._pull_failed(str(exc), wait)
            return False
        except AuthError as exc:
            self.auth_failed = True
            self.retry_at = engine._clock() + AUTH_RETRY_SECONDS
            engine._refresh_status(state=State.NEEDS_AUTH, download_error=str(exc))
            return False
        except VerificationError as exc:
            if isinstance(exc, BadSignature) and await self._renew_head(did, client):
                return False  # read again at once, its new head signed with the current key
            # Forged, tampered or damaged: nothing of it was applied. Said once per failure.
            puller.reject_all(did, "VerificationError", str(exc))
            self._pull_failed(f"the repository failed verification: {exc}", None)
            return False
        except PermanentError as exc:
            if exc.error in INACTIVE_ERRORS:
                engine._account_inactive = exc.error
                engine._last_pull = engine._clock()
                self._show_inactive()
                return False
            self._pull_failed(str(exc), None)
            return False
        except (NetworkError, OSError) as exc:
            self._pull_failed(str(exc), None, offline=isinstance(exc, TransientError)
                              and exc.status is None)  # fmt: skip
            return False
        engine._backoff.succeeded()
        self.pull_retry_at = None
        engine._last_pull = engine._clock()
        engine._pull_done = max(engine._pull_done, wanted)
        engine._kick_blobs()  # rows may reference blobs the store lacks
        if result.merged or result.applied or result.deleted:
            log.info(
                "pulled rev %s: %d applied, %d deleted, %d merged (%d conflicts), %d rejected",
                result.rev, result.applied, result.deleted, result.merged, result.conflicts,
                result.rejected,
            )  # fmt: skip
        engine._refresh_status(download_error=None, pull_progress=None)
        await engine._checkpoint_if_due()
        return True

    async def _apply_events(self, did: str, key: str, frames: list[FirehoseFrame]) -> bool:
        """Apply #commit events that follow the local state, verified; False at the first
        gap or bad event (then the whole repository is read)."""
        puller = self.engine._puller
        assert puller is not None
        rev, data = puller.position()
        if rev is None or not puller.covers_collections():
            return False  # never pulled in full (or not these collections): nothing to follow
        # Already included events (replayed, or brought first by a whole read): the stream
        # resumes after them. Their seq is written once for a run of them (an applied event
        # writes its own with its rows), not in a transaction each.
        passed: int | None = None
        try:
            for frame in frames:
                try:
                    event = verify_commit_event(frame, key, did=did)
                except VerificationError as exc:
                    puller.reject_all(did, "VerificationError", f"#commit event: {exc}")
                    return False
                if event.rev <= rev:
                    passed = event.seq if event.seq is not None else passed
                    continue
                prev_data = str(event.prev_data) if event.prev_data is not None else None
                if event.since != rev or (data is not None and prev_data != data):
                    log.info(
                        "event %s (since %s) does not follow rev %s: reading the repository",
                        event.rev, event.since, rev,
                    )  # fmt: skip
                    return False  # a gap: something happened that we did not see
                passed = None  # this event's seq is later, and written with it
                puller.apply_commit(did, event)
                rev, data = event.rev, str(event.data)
            return True
        finally:
            puller.stream_passed(passed)

    def _show_inactive(self) -> None:
        engine = self.engine
        engine._refresh_status(
            download_error=f"the account is not active on its PDS ({engine._account_inactive}):"
            " nothing is pulled until it is active again"
        )

    def _pull_failed(self, message: str, wait: float | None, *, offline: bool = False) -> None:
        engine = self.engine
        delay = engine._backoff.next_delay() if wait is None else wait
        if offline:
            delay = min(delay, OFFLINE_PROBE_SECONDS)
        # A pull's own retry time: a failing pull never holds back the push queue.
        self.pull_retry_at = engine._clock() + delay
        engine._last_pull = engine._clock()
        engine._refresh_status(download_error=message, pull_progress=None)
        log.info("pull failed (%s); retrying in %.2f s", message, delay)

    async def _renew_head(self, did: str, client: XrpcClient) -> bool:
        """The account's head commit is not signed with its current key: after a move to
        another host, that host keeps the imported head, signed with the old key, until its
        first commit. Ask it for one — an empty ``applyWrites``, signed with the key it holds
        for the account — once per session. True if it made one. (A host that does not hold
        the account's key signs it with another: the next read fails as before.)"""
        if self.head_renewed:
            return False
        self.head_renewed = True
        try:
            await self.engine._pusher.renew_head(did, client)
        except NetworkError as exc:
            log.info("could not ask for a new head commit: %s", exc)
            return False
        log.info("the head commit of %s was not signed with its current key: renewed", did)
        self.engine._pull_forced = True
        return True

    async def _signing_key(self, did: str, client: XrpcClient) -> str:
        """The account's current signing key, from its DID document."""
        identity = await self.resolver(client).resolve(did, check_handle=False)
        return identity.signing_key

    def resolver(self, client: XrpcClient) -> IdentityResolver:
        """The engine's identity resolver (``_engine_follow``: one for the account and the
        accounts it follows); a PDS on loopback is a development set-up whose DID documents
        name http:// endpoints."""
        local = client.service.startswith(("http://localhost", "http://127.0.0.1"))
        return self.engine._resolver(loopback=local)  # type: ignore[no-any-return]

    async def push(self, collections: frozenset[str] | None) -> None:
        engine = self.engine
        pusher = engine._pusher
        did, client = self._did_client()
        engine._refresh_status(state=State.PUSHING, did=did, waiting_reason=None, resumes_at=None)
        result = PushResult()
        self.retry_collections = collections
        chosen = set(collections) if collections is not None else None

        async def work() -> None:
            while True:
                landed = result.pushed + result.already_applied
                more = await pusher.push_batch(did, client, result, chosen)
                if result.pushed + result.already_applied > landed:
                    # A batch went through: the PDS is fine, so the next failure starts the
                    # shared backoff afresh instead of compounding it.
                    engine._backoff.succeeded()
                if not more:
                    break
                engine._refresh_status()
            await pusher.fence(did, client, result)

        try:
            pushed = await self._guarded(work, did, client)
        except RepoMoved:
            # Another writer moved the repo: pull now (merging its edits with ours field by
            # field), then push again. If no pull can be made (the key cannot be resolved, the
            # account is not active…), settle the old way — record by record, ours wins.
            if not await self.pull():
                reconcile = engine._pusher.reconcile
                await self._guarded(
                    lambda: reconcile(did, client, [], PushResult(), check=True), did, client
                )
            self.retry_at = engine._clock()
            return
        if not pushed:
            return
        engine._backoff.succeeded()
        self.retry_at = None
        engine._pushed(collections)
        if result.rate_wait > 0:
            self._hold(result.rate_wait, None)
            return
        engine._refresh_status(upload_error=None, rate_limited_until=None)

    async def reconcile(self) -> None:
        engine = self.engine
        pusher = engine._pusher
        did, client = self._did_client()

        async def work() -> None:
            await pusher.reconcile(did, client, [], PushResult(), check=True)
            pusher.needs_reconcile = False

        if await self._guarded(work, did, client):
            # Settled: the failed push it belonged to is retried now, whatever the strategy.
            self.retry_at = self.engine._clock()

    async def fence(self) -> None:
        pusher = self.engine._pusher
        did, client = self._did_client()

        async def work() -> None:
            await pusher.fence(did, client, PushResult())

        if await self._guarded(work, did, client):
            self.retry_at = None

    # -- outcomes ---------------------------------------------------------------------------

    def _did_client(self) -> tuple[str, XrpcClient]:
        if self.session is None or self.client is None:
            raise AssertionError("decide() asked for a network step without a session")
        return self.session.did, self.client

    async def _guarded(
        self, work: Callable[[], Awaitable[None]], did: str, client: XrpcClient
    ) -> bool:
        """Run a network step; every failure becomes a retry time and a status. True if it
        completed."""
        engine = self.engine
        try:
            await work()
            self.auth_failed = False
            return True
        except RateLimitedError as exc:
            self._hold(max(0.0, (exc.reset_at or time.time() + 60) - time.time()), str(exc))
        except AuthError as exc:
            # Until a new login (which wakes the engine) or push_now(); the same session is
            # tried again after a while, in case the refusal was not the PDS's last word.
            self.auth_failed = True
            self.retry_at = engine._clock() + AUTH_RETRY_SECONDS
            engine._refresh_status(state=State.NEEDS_AUTH, upload_error=str(exc))
        except (TransientError, PermanentError, OSError) as exc:
            await self._after_failure(did, client, exc)
        return False

    def _hold(self, seconds: float, message: str | None) -> None:
        """The PDS or the budget holds writes back for ``seconds``."""
        self.retry_at = self.engine._clock() + seconds
        self.retry_reason = WaitReason.RATE_LIMITED
        self.engine._refresh_status(rate_limited_until=time.time() + seconds, upload_error=message)

    async def _after_failure(self, did: str, client: XrpcClient, exc: Exception) -> None:
        engine = self.engine
        pusher = engine._pusher
        offline = isinstance(exc, TransientError) and exc.status is None
        delay = engine._backoff.next_delay()
        if offline:
            delay = min(delay, OFFLINE_PROBE_SECONDS)  # notice a network that comes back
        self.retry_at = engine._clock() + delay
        self.retry_reason = WaitReason.OFFLINE if offline else WaitReason.BACKOFF
        if pusher.last_batch:
            try:
                engine.outbox.note_error(pusher.last_batch, str(exc))
            except Exception:
                log.exception("could not note the error on the queued writes")
        engine._refresh_status(
            state=State.OFFLINE if offline else State.ERROR, upload_error=str(exc)
        )
        log.info("push failed (%s); retrying in %.2f s", exc, delay)
        if not outcome_unknown(exc):
            return
        # The batch may have been applied: settle before anything is sent again. A 500
        # also answers writes that do not fit the PDS's state (PDS.md): check them all.
        batch = engine.outbox.next_batch(
            pusher.batch_limit,
            collections=set(self.retry_collections) if self.retry_collections else None,
        )
        check = isinstance(exc, NetworkError) and (exc.status or 0) >= 500
        try:
            await pusher.reconcile(did, client, batch, PushResult(), check=check)
        except RateLimitedError as again:
            pusher.needs_reconcile = True
            wait = max(0.0, (again.reset_at or time.time() + 60) - time.time())
            self.retry_at = max(self.retry_at, engine._clock() + wait)
            engine._refresh_status(rate_limited_until=time.time() + wait)
        except AuthError as again:
            pusher.needs_reconcile = True
            self.auth_failed = True
            self.retry_at = engine._clock() + AUTH_RETRY_SECONDS
            engine._refresh_status(state=State.NEEDS_AUTH, upload_error=str(again))
        except (NetworkError, OSError) as again:
            pusher.needs_reconcile = True
            log.info("reconcile after failure also failed: %s", again)


def lexicon_set(
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


def required_nulls(lexicons: LexiconSet | None, collection: str) -> frozenset[str]:
    """The fields of ``collection``'s record Lexicon that are both required and nullable: a
    binding writes them as ``null`` when their property is null, since the Lexicon refuses a
    record that leaves them out."""
    if lexicons is None or collection not in lexicons:
        return frozenset()
    main = lexicons.get(collection).main
    record = main.get("record") if main is not None and main.get("type") == "record" else None
    if not isinstance(record, Mapping):
        return frozenset()  # not a record Lexicon: lexicon_validator says so if it matters
    return frozenset(record.get("required") or ()) & frozenset(record.get("nullable") or ())


def lexicon_validator(
    lexicons: LexiconSet, bindings: Iterable[BoundBinding], extra: Validator | None
) -> Validator:
    """Every pushed binding needs its record Lexicon; records of other collections (from
    ``on_action``) are checked when their Lexicon is in the set."""
    bindings = list(bindings)
    for binding in bindings:  # a model that cannot hold the records: said before anything runs
        if binding.collection in lexicons:
            check_model_against_lexicon(
                lexicons, binding.collection, binding.model, binding.field_map,
                binding.transformed,
            )  # fmt: skip
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

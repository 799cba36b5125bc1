"""Reliability of the push engine against the real PDS (issue #4, item 9).

Every test ends by checking that the PDS holds exactly the local state (every record of the
test's collection, listed straight from the PDS, equals the local rows mapped through the
binding), that the outbox is empty and, where the firehose lets us count them, that no write
reached the repository twice (no commit repeats a record's content).

Faults come from the PDS itself (stopped and restarted, its own rate limiter), from the fault
proxy in ``fault_proxy.py`` sitting between the engine and the PDS, and from SIGKILL.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from atsync.app import ActionContext, App, Contract
from atsync.atproto._devpds import DevPDS
from atsync.atproto._session import Session, login
from atsync.atproto._xrpc import XrpcClient
from atsync.sync import (
    ATSync,
    Batch,
    Binding,
    Debounce,
    Immediate,
    Manual,
    RateBudget,
    Strategy,
    SyncStatus,
)
from atsync.sync._backoff import Backoff
from fault_proxy import (
    Answer,
    Delay,
    DropAfterForward,
    DropBeforeForward,
    Error500,
    FaultProxy,
    Hold,
    ProxyRequest,
    RateLimited,
    ResetMidResponse,
    Truncate,
    proxied_session,
)
from pds_fixtures import MakePDS

pytestmark = pytest.mark.anyio

APPLY = "com.atproto.repo.applyWrites"
GET_RECORD = "com.atproto.repo.getRecord"
LATEST = "com.atproto.sync.getLatestCommit"
MARKERS = "test.atsync.marker"


def notes_engine(app: App, collection: str, session: Any, **options: Any) -> ATSync:
    """The engine most tests here use: notes bound to the test's collection, budget off."""
    return ATSync(
        app,
        pull=Manual(),
        bindings={"notes": Binding(collection)},
        session=session,
        budget=RateBudget.off(),
        **options,
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


contract = Contract(
    models={
        "notes": {"id": "primary", "title": "string", "body": "string?", "n": "integer"},
        "posts": {"id": "primary", "text": "string", "createdAt": "string?"},
    }
)


@contract.action
def put_note(ctx: ActionContext, key: str, title: str, n: int = 0) -> None:
    ctx.db.set("notes", {"id": key, "title": title, "n": n})


@contract.action
def drop_note(ctx: ActionContext, key: str) -> None:
    ctx.db.delete("notes", key)


@contract.action
def put_post(ctx: ActionContext, key: str, text: str, created_at: str | None) -> None:
    ctx.db.set("posts", {"id": key, "text": text, "createdAt": created_at})


# --- helpers -------------------------------------------------------------------------------------


def collection_for(request: pytest.FixtureRequest) -> str:
    # Tests share the dev PDS's accounts: each gets a collection of its own (the hash keeps
    # parametrized variants, whose names differ only at the end, apart).
    name = "".join(c for c in request.node.name if c.isalnum())[:40].lower()
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    return f"test.atsync.rel.{name}{digest}"


async def log_in(pds: DevPDS, handle: str = "alice.test") -> Session:
    account = pds.accounts[handle]
    return await login(account.did, account.password, pds.pds_url)


async def pds_records(pds_url: str, did: str, collection: str) -> dict[str, dict[str, Any]]:
    """Every record of ``collection``, straight from the PDS (no proxy, no engine)."""
    async with XrpcClient(pds_url) as client:
        records: dict[str, dict[str, Any]] = {}
        async for view in client.iter_records(did, collection):
            assert view.rkey not in records, f"listRecords returned {view.rkey} twice"
            records[view.rkey] = view.value
        return records


def local_records(app: App, sync: ATSync, model: str = "notes") -> dict[str, dict[str, Any]]:
    """The local rows of ``model`` as the records they should be on the PDS, by rkey."""
    binding = sync.bindings[model]
    out: dict[str, dict[str, Any]] = {}
    for row in app.db.query(model):
        if binding.binding.rkey == "primary":
            rkey = binding.rkey_for(row)
        else:
            found = sync.outbox.rkey_for(binding.collection, model, row[binding.model.primary_key])
            assert found is not None, f"{model}/{row['id']} has no record key"
            rkey = found
        out[rkey] = binding.to_record(row)
    return out


async def assert_pds_equals_local(
    app: App, sync: ATSync, pds_url: str, did: str, model: str = "notes"
) -> dict[str, dict[str, Any]]:
    pending, _, _ = sync.outbox.counts()
    assert pending == 0, "the outbox is not empty"
    remote = await pds_records(pds_url, did, sync.bindings[model].collection)
    local = local_records(app, sync, model)
    assert sorted(remote) == sorted(local), (
        f"only on the PDS: {sorted(set(remote) - set(local))[:10]}, "
        f"only local: {sorted(set(local) - set(remote))[:10]}"
    )
    different = [k for k in local if remote[k] != local[k]]
    assert not different, f"content differs for {different[:10]}: {remote[different[0]]}"
    return remote


async def commit_ops(session: Session, pds_url: str, collection: str) -> list[tuple[str, str, Any]]:
    """Every record operation ever committed in ``collection`` of the session's repo, in
    order, as (action, rkey, cid), read by replaying the PDS's firehose from the start up to
    a marker record written now (so the replay is known to be complete)."""
    marker = f"m{time.time_ns()}"
    async with XrpcClient(pds_url, session=_direct(session, pds_url)) as client:
        await client.put_record(session.did, MARKERS, marker, {"$type": MARKERS})
        ops: list[tuple[str, str, Any]] = []
        with anyio.fail_after(60):
            async with client.subscribe_repos(0) as stream:
                async for frame in stream:
                    if frame.type != "#commit" or frame.body.get("repo") != session.did:
                        continue
                    for op in frame.body.get("ops", []):
                        coll, _, rkey = str(op["path"]).partition("/")
                        if coll == collection:
                            ops.append((str(op["action"]), rkey, op.get("cid")))
                        if coll == MARKERS and rkey == marker:
                            return ops
    raise AssertionError("unreachable")


def _direct(session: Session, pds_url: str) -> Session:
    return session if session.pds_url == pds_url else proxied_session(session, pds_url)


def assert_no_duplicate_commits(ops: Iterable[tuple[str, str, Any]]) -> Counter[str]:
    """No write reached the repository twice: per record, every create finds it absent,
    every update and delete finds it present, and no update re-commits unchanged content."""
    state: dict[str, Any] = {}
    actions: Counter[str] = Counter()
    for action, rkey, cid in ops:
        actions[action] += 1
        if action == "create":
            assert rkey not in state, f"{rkey} created twice"
            state[rkey] = cid
        elif action == "update":
            assert rkey in state, f"{rkey} updated while absent"
            assert state[rkey] != cid, f"{rkey} re-committed with unchanged content {cid}"
            state[rkey] = cid
        else:
            assert rkey in state, f"{rkey} deleted while absent"
            del state[rkey]
    return actions


class StatusLog:
    """Every status the engine published (callbacks run synchronously in the engine)."""

    def __init__(self, sync: ATSync) -> None:
        self.seen: list[SyncStatus] = []
        sync.on_status(self.seen.append)

    @property
    def states(self) -> list[str]:
        return [s.state for s in self.seen]


async def wait_status(
    sync: ATSync, predicate: Callable[[SyncStatus], bool], within: float
) -> SyncStatus:
    with anyio.fail_after(within):
        async for status in sync.status_changes():
            if predicate(status):
                return status
    raise AssertionError("unreachable")


async def idle(sync: ATSync, within: float = 60) -> SyncStatus:
    with anyio.fail_after(within):
        return await sync.wait_for_idle()


def seed_notes(app: App, keys: Iterable[str], title: str = "seed") -> None:
    with app.batch():
        for i, key in enumerate(keys):
            app.actions.put_note(key, f"{title} {key}", i)


def mixed_changes(app: App, rng: random.Random, existing: list[str], prefix: str, new: int) -> None:
    """Creates of ``new`` records, updates and deletes of existing ones, in one transaction."""
    with app.batch():
        for i in range(new):
            app.actions.put_note(f"{prefix}{i:04d}", f"new {prefix}{i}", i)
        for key in rng.sample(existing, len(existing) // 2):
            app.actions.put_note(key, f"updated {key}", rng.randrange(1000))
        alive = [k for k in existing if app.db.get("notes", k) is not None]
        for key in rng.sample(alive, len(alive) // 4):
            app.actions.drop_note(key)


def queued_ops(sync: ATSync) -> Counter[str]:
    """How many writes of each kind wait in the outbox (all of it)."""
    return Counter(w.op for w in sync.outbox.next_batch(1_000_000, 10**12))


def held_event(proxy: FaultProxy) -> Any:
    """The proxy's record of the first request a ``Hold`` fault kept."""
    return next(e for e in proxy.events if e.fault == "hold")


def apply_writes_events(proxy: FaultProxy) -> list[Any]:
    return proxy.requests(APPLY)


# --- the PDS stopped in the middle of a queue ----------------------------------------------------


async def test_pds_stopped_mid_queue_drains_without_duplicates(
    restartable_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pds = restartable_pds
    collection = collection_for(request)
    session = await log_in(pds)
    applies = 0
    armed = False
    second_batch = anyio.Event()
    pds_down = anyio.Event()

    async def on_request(req: httpx.Request) -> None:
        # Holds the second batch of the big queue until the PDS is down, so the stop hits
        # the engine mid-queue whatever the machine's speed.
        nonlocal applies
        if armed and req.url.path.endswith(APPLY):
            applies += 1
            if applies == 2:
                second_batch.set()
                await pds_down.wait()

    with App.open(tmp_path / "a.db", contract) as app:
        sync = notes_engine(
            app,
            collection,
            session,
            push=Manual(),
            client_options={"event_hooks": {"request": [on_request]}},
        )
        log = StatusLog(sync)
        async with sync:
            seed = [f"s{i:03d}" for i in range(100)]
            seed_notes(app, seed)
            sync.push_now()
            await idle(sync)

            mixed_changes(app, random.Random(1), seed, "q", 600)
            planned = queued_ops(sync)
            queued = sum(planned.values())
            assert queued > 600 and planned["delete"] > 0  # several batches of at most 200
            armed = True
            sync.push_now()
            with anyio.fail_after(30):
                await second_batch.wait()
            assert 0 < sync.status.pending < queued  # the first batch is on the PDS
            await anyio.to_thread.run_sync(pds.stop)
            pds_down.set()
            down = await wait_status(sync, lambda s: s.state in ("offline", "error"), 30)
            assert down.pending > 0 and down.upload_error
            await anyio.to_thread.run_sync(pds.start)
            status = await idle(sync, 90)
            assert status.failed == 0 and status.conflicts == 0 and status.upload_error is None

        states = log.states
        first_down = next(i for i, s in enumerate(states) if s in ("offline", "error"))
        assert "idle" in states[first_down:] and states[-1] == "stopped"
        await assert_pds_equals_local(app, sync, pds.pds_url, session.did)
        ops = await commit_ops(session, pds.pds_url, collection)
        actions = assert_no_duplicate_commits(ops)
        # Each coalesced write reached the repository exactly once.
        assert actions == planned + Counter(create=100)
        sync.close()


# --- the fault proxy -----------------------------------------------------------------------------


async def proxied_engine_setup(dev_pds: DevPDS, proxy: FaultProxy) -> tuple[Session, Session]:
    direct = await log_in(dev_pds)
    return direct, proxied_session(direct, proxy.url)


async def test_batch_applied_but_connection_dropped_is_not_sent_twice(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        # 1st batch: the very first push (no known commit yet); 2nd: the mixed batch after it.
        proxy.add(DropAfterForward(), nsid=APPLY, nth=[1, 2])
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            log = StatusLog(sync)
            async with sync:
                seed = [f"s{i:03d}" for i in range(50)]
                seed_notes(app, seed)
                sync.push_now()
                await idle(sync)
                mixed_changes(app, random.Random(2), seed, "q", 40)
                planned = queued_ops(sync)
                sync.push_now()
                status = await idle(sync)
                assert status.conflicts == 0 and status.failed == 0
            assert proxy.counts["drop_after_forward"] == 2
            dropped = [e for e in apply_writes_events(proxy) if e.fault == "drop_after_forward"]
            assert all(e.upstream_status == 200 and e.status is None for e in dropped)
            assert "offline" in log.states
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            actions = assert_no_duplicate_commits(
                await commit_ops(direct, dev_pds.pds_url, collection)
            )
            assert actions == planned + Counter(create=50)
            sync.close()


@pytest.mark.parametrize("before_forward", [False, True], ids=["slow-answer", "late-request"])
async def test_answers_slower_than_the_client_timeout(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest, before_forward: bool
) -> None:
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(
                app, collection, session, push=Manual(), client_options={"timeout": 1.0}
            )
            async with sync:
                seed = [f"s{i:03d}" for i in range(30)]
                seed_notes(app, seed)
                sync.push_now()
                await idle(sync)
                # Once a commit is known, every batch carries swapCommit, so even a request
                # that reaches the PDS after the engine gave up cannot apply over newer state.
                proxy.add(Delay(2.5, after_forward=not before_forward), nsid=APPLY, nth=1)
                mixed_changes(app, random.Random(3), seed, "q", 20)
                sync.push_now()
                status = await idle(sync)
                assert status.failed == 0 and status.conflicts == 0
                with anyio.fail_after(10):
                    # The delayed request is answered by the PDS in the end: wait for that,
                    # then for the engine to settle whatever it caused.
                    await proxy.wait_until(lambda p: all(e.done for e in p.events))
                sync.push_now()
                await idle(sync)
            (delayed,) = [e for e in apply_writes_events(proxy) if e.fault == "delay"]
            assert delayed.forwarded
            if before_forward:  # reached the PDS late: InvalidSwap, or applied before the retry
                assert delayed.upstream_status in (200, 400)
            else:  # applied, answered after the engine had given up
                assert delayed.upstream_status == 200
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            assert_no_duplicate_commits(await commit_ops(direct, dev_pds.pds_url, collection))
            sync.close()


async def test_500s_and_broken_answers_are_retried_until_everything_is_on_the_pds(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        proxy.add(Error500(), nsid=APPLY, nth=2)
        proxy.add(Truncate(), nsid=APPLY, nth=3)
        proxy.add(Truncate(keep=0.2, fix_length=True), nsid=APPLY, nth=4)
        proxy.add(ResetMidResponse(), nsid=APPLY, nth=5)
        proxy.add(DropBeforeForward(), nsid=APPLY, nth=6)
        proxy.add(Error500(), nsid=GET_RECORD, nth=[3, 4])  # the reconcile fails too
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Immediate())
            log = StatusLog(sync)
            async with sync:
                seed = [f"s{i:03d}" for i in range(40)]
                seed_notes(app, seed)
                await idle(sync)
                rng = random.Random(4)
                # Enough rounds that the sixth applyWrites happens: failed sends are settled
                # by reading the PDS rather than re-sent, so they come slower than one a round.
                for round_ in range(8):
                    mixed_changes(app, rng, seed, f"r{round_}-", 10)
                    await idle(sync)
                status = sync.status
                assert status.failed == 0 and status.conflicts == 0
            for fault in ("error_500", "truncate", "reset_mid_response", "drop_before_forward"):
                assert proxy.counts[fault] >= 1, fault
            assert proxy.counts["error_500"] == 3
            assert {"offline", "error"} <= set(log.states)
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            assert_no_duplicate_commits(await commit_ops(direct, dev_pds.pds_url, collection))
            sync.close()


@pytest.mark.parametrize("header", ["retry-after", "ratelimit-reset"])
async def test_429_makes_the_engine_wait_as_told(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest, header: str
) -> None:
    collection = collection_for(request)
    wait = 2.0
    fault = RateLimited(retry_after=wait) if header == "retry-after" else RateLimited(None, wait)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        proxy.add(fault, nsid=APPLY, nth=1)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Immediate())
            log = StatusLog(sync)
            async with sync:
                before = time.time()
                seed_notes(app, [f"s{i:03d}" for i in range(20)])
                limited = await wait_status(sync, lambda s: s.rate_limited_until is not None, 10)
                # Held back, and saying so: never idle while writes wait.
                held = await wait_status(sync, lambda s: s.state == "waiting", 10)
                assert limited.pending == 20 and held.pending == 20
                assert held.waiting_reason == "rate_limited"
                assert held.resumes_at is not None and held.resumes_at >= before + wait - 0.1
                assert limited.rate_limited_until is not None
                assert limited.rate_limited_until >= before + wait - 0.1
                status = await idle(sync, 30)
                assert status.rate_limited_until is None and status.failed == 0
            first, second = apply_writes_events(proxy)[:2]
            assert first.fault == "rate_limited" and not first.forwarded
            assert first.answered_at is not None
            # Measured at the proxy on the monotonic clock: the retry came no sooner than told.
            assert second.received_at - first.answered_at >= wait - 0.05
            assert len(apply_writes_events(proxy)) == 2  # no retry storm while waiting
            assert any(s.rate_limited_until for s in log.seen)
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            sync.close()


@pytest.mark.parametrize("answer", ["answered", "dropped"])
async def test_local_edits_while_a_batch_is_in_flight(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest, answer: str
) -> None:
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                seed_notes(app, ["u1", "u2", "d1", "d2", "keep"])
                sync.push_now()
                await idle(sync)
                # The batch in flight: creates c1..c4, updates u1, u2, deletes d1, d2.
                hold = Hold(after_forward=True, drop=answer == "dropped")
                proxy.add(hold, nsid=APPLY, nth=1)
                with app.batch():
                    for key in ("c1", "c2", "c3", "c4"):
                        app.actions.put_note(key, f"created {key}", 1)
                    app.actions.put_note("u1", "updated u1", 2)
                    app.actions.put_note("u2", "updated u2", 2)
                    app.actions.drop_note("d1")
                    app.actions.drop_note("d2")
                sync.push_now()
                with anyio.fail_after(10):
                    await hold.reached.wait()
                # The PDS has applied the batch; the engine has not heard back yet.
                app.actions.put_note("c1", "created c1, edited in flight", 3)
                app.actions.drop_note("c2")
                app.actions.put_note("c3", "created c3, edited in flight", 3)
                app.actions.put_note("c3", "created c3", 1)  # back to what is in flight
                app.actions.put_note("u1", "updated u1 again in flight", 4)
                app.actions.drop_note("u2")
                app.actions.put_note("d1", "d1 re-created in flight", 5)
                hold.release()
                status = await idle(sync)
                assert status.failed == 0
                # Nobody else writes to this collection: nothing here is a conflict.
                assert status.conflicts == 0
            assert proxy.counts["hold"] == 1
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            assert_no_duplicate_commits(await commit_ops(direct, dev_pds.pds_url, collection))
            sync.close()


async def test_random_faults_while_the_app_keeps_editing(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url, seed=7) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        # A few certain faults early on, then seeded random ones. Capped, so that the
        # shared backoff (full jitter, doubling per consecutive failure) stays short.
        # Every other batch: a success between two faults resets the backoff.
        certain = [
            proxy.add(DropAfterForward(), nsid=APPLY, nth=1),
            proxy.add(Error500(), nsid=APPLY, nth=3),
            proxy.add(Delay(2.0, after_forward=True), nsid=APPLY, nth=5),
            proxy.add(Truncate(), nsid=APPLY, nth=7),
            proxy.add(RateLimited(retry_after=0.5), nsid=APPLY, nth=9),
            proxy.add(ResetMidResponse(), nsid=APPLY, nth=11),
        ]
        proxy.add(DropAfterForward(), nsid=APPLY, probability=0.1, times=2)
        proxy.add(Error500(), nsid=APPLY, probability=0.1, times=1)
        proxy.add(Delay(2.0, after_forward=False), nsid=APPLY, probability=0.1, times=1)
        proxy.add(Error500(), nsid=GET_RECORD, probability=0.02, times=1)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(
                app, collection, session, push=Immediate(), client_options={"timeout": 1.0}
            )
            async with sync:
                rng = random.Random(8)
                keys = [f"k{i:02d}" for i in range(40)]
                step = 0
                # At least 600 edits, and on until every certain fault has fired (how many
                # batches the edits make depends on how the pushes and edits interleave).
                while step < 600 or not all(rule.fired for rule in certain):
                    assert step < 20_000, [rule.fired for rule in certain]
                    step += 1
                    key = rng.choice(keys)
                    if rng.random() < 0.2:
                        app.actions.drop_note(key)
                    else:
                        app.actions.put_note(key, f"{key} at step {step}", step)
                    if step % 2 == 0:
                        # The app's pace (~3 s of edits): pushes overlap local writes.
                        await anyio.sleep(0.01)
                status = await idle(sync, 120)
                assert status.failed == 0 and status.conflicts == 0
            for fault in ("drop_after_forward", "error_500", "delay", "truncate"):
                assert proxy.counts[fault] >= 1, fault
            assert proxy.counts["rate_limited"] == 1 and proxy.counts["reset_mid_response"] == 1
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            assert_no_duplicate_commits(await commit_ops(direct, dev_pds.pds_url, collection))
            sync.close()


# --- the watchdog --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    [Immediate(), Debounce(0.1), Batch(n=1000, max_delay=3600), Manual()],
    ids=["immediate", "debounce", "batch", "manual"],
)
async def test_watchdog_retries_a_failed_queue_without_new_local_writes(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest, strategy: Strategy
) -> None:
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        proxy.add(Error500(), nsid=APPLY, nth=[1, 2])
        proxy.add(DropBeforeForward(), nsid=APPLY, nth=3)
        proxy.add(Error500(), nsid="com.atproto.sync.getLatestCommit", nth=1)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = ATSync(
                app,
                pull=Manual(),
                bindings={"notes": Binding(collection)},
                session=session,
                push=strategy,
                budget=RateBudget.off(),
            )
            log = StatusLog(sync)
            async with sync:
                seed_notes(app, [f"s{i:03d}" for i in range(10)])
                # The one nudge a Batch/Manual app would give; after it, no more local writes
                # and no more push_now(): only the engine's own retries can drain the queue.
                sync.push_now()
                status = await idle(sync, 45)
                assert status.failed == 0
            assert len(apply_writes_events(proxy)) == 4
            assert proxy.counts["error_500"] == 3 and proxy.counts["drop_before_forward"] == 1
            assert "error" in log.states
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            sync.close()


# --- writes the PDS rejects for good -------------------------------------------------------------

POST = "app.bsky.feed.post"  # a Lexicon the reference PDS knows, so it validates its records
DATE = "2024-01-01T00:00:00.000Z"


async def test_rejected_record_is_dead_lettered_and_the_rest_is_pushed(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = collection_for(request)
    # bob's posts are written by this test only; their record keys must be TIDs.
    session = await log_in(dev_pds, "bob.test")
    bad = {"b1": ("no createdAt", None), "b2": ("x" * 400, DATE)}  # 300 graphemes at most
    with App.open(tmp_path / "a.db", contract) as app:
        sync = ATSync(
            app,
            pull=Manual(),
            bindings={"notes": Binding(collection), "posts": Binding(POST, rkey="tid")},
            session=session,
            push=Manual(),
            budget=RateBudget.off(),
        )

        def post_rkeys(keys: Iterable[str]) -> set[str]:
            return {str(sync.outbox.rkey_for(POST, "posts", key)) for key in keys}

        async def assert_posts_on_pds() -> None:
            # Only the valid posts of this database are on the PDS, as they are locally.
            remote = await pds_records(dev_pds.pds_url, session.did, POST)
            local = local_records(app, sync, "posts")
            mine = {k: v for k, v in remote.items() if k in local}
            assert mine == {k: v for k, v in local.items() if k not in post_rkeys(bad)}

        async with sync:
            with app.batch():
                for i in range(30):
                    app.actions.put_note(f"n{i:02d}", f"note {i}", i)
                    if i % 3 == 0:
                        app.actions.put_post(f"g{i:02d}", f"post {i}", DATE)
                    if i == 10:
                        app.actions.put_post("b1", *bad["b1"])
                    if i == 20:
                        app.actions.put_post("b2", *bad["b2"])
            sync.push_now()
            status = await idle(sync)
            assert status.failed == 2
            dead = sync.outbox.dead_letters()
            assert {d.rkey for d in dead} == post_rkeys(bad)
            assert all(d.error == "InvalidRequest" for d in dead)
            assert all(d.message and "Invalid app.bsky.feed.post record" in d.message for d in dead)
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, session.did)
            await assert_posts_on_pds()

            assert sync.retry_dead_letters() == 2
            # Back in the queue at once (no await since: the engine has not run yet).
            assert sync.outbox.counts()[:2] == (2, 0)
            status = await idle(sync)
            # Still invalid: rejected again, with the server's reason, nothing else disturbed.
            assert status.failed == 2
            assert {d.rkey for d in sync.outbox.dead_letters()} == post_rkeys(bad)
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, session.did)
            await assert_posts_on_pds()
        sync.close()


# --- rate limits ---------------------------------------------------------------------------------


async def test_pds_rate_limit_slows_the_engine_and_loses_nothing(
    make_pds: MakePDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The reference PDS limits repo writes per account to 5,000 points an hour (create 3,
    update 2, delete 1; ``repo-write-hour`` in @atproto/pds's rate-limits.js, also 35,000 a
    day). 1,800 creates are 5,400 points: over the hourly limit."""
    pds = make_pds(rate_limits=True)
    collection = collection_for(request)
    session = await log_in(pds)
    answers: list[httpx.Response] = []

    async def on_response(response: httpx.Response) -> None:
        if response.request.url.path.endswith(APPLY):
            answers.append(response)

    hooks = {"event_hooks": {"response": [on_response]}}
    with App.open(tmp_path / "a.db", contract) as app:
        keys = [f"k{i:04d}" for i in range(1800)]
        # 1. No budget of our own on a local PDS: the engine obeys the PDS's RateLimit-*
        # headers — it sends what still fits (1,666 creates = 4,998 points: 8 batches of 200
        # and one of 66) and holds the rest until the window resets, without a single 429.
        paced = ATSync(
            app,
            pull=Manual(),
            bindings={"notes": Binding(collection)},
            session=session,
            push=Manual(),
            client_options=hooks,
        )
        assert paced.budget is None
        async with paced:
            seed_notes(app, keys)
            paced.push_now()
            held = await wait_status(paced, lambda s: s.state == "waiting" and s.pending < 1800, 60)
            assert held.pending == 134
            assert held.waiting_reason == "rate_limited"
            assert held.rate_limited_until is not None
            assert held.rate_limited_until > time.time() + 3000  # the window is an hour
            assert held.resumes_at is not None and held.resumes_at > time.time() + 3000
        assert [r.status_code for r in answers] == [200] * 9
        assert answers[-1].headers["ratelimit-remaining"] == "2"
        paced.close()

        # 2. A new engine knows nothing of the spent points (as if another device had spent
        # them): the PDS itself says 429, and the engine waits as told.
        answers.clear()
        unpaced = ATSync(
            app,
            pull=Manual(),
            bindings={"notes": Binding(collection)},
            session=session,
            push=Manual(),
            budget=RateBudget.off(),
            client_options=hooks,
        )
        async with unpaced:
            unpaced.push_now()  # Manual(): what is left waits for the user's "sync now"
            told = await wait_status(unpaced, lambda s: s.rate_limited_until is not None, 60)
            assert [r.status_code for r in answers] == [429]
            reset = float(answers[0].headers["ratelimit-reset"])
            assert told.rate_limited_until is not None
            assert told.rate_limited_until >= reset - 1  # waits as long as the PDS said
            assert told.pending == 134 and told.failed == 0
            # The PDS's limiter lives in its memory: a restart resets it. The user then asks
            # to push now rather than wait out the hour.
            await anyio.to_thread.run_sync(pds.stop)
            await anyio.to_thread.run_sync(pds.start)
            unpaced.push_now()
            status = await idle(unpaced, 60)
            assert status.rate_limited_until is None and status.failed == 0
        assert [r.status_code for r in answers] == [429, 200]
        await assert_pds_equals_local(app, unpaced, pds.pds_url, session.did)
        actions = assert_no_duplicate_commits(await commit_ops(session, pds.pds_url, collection))
        assert actions == {"create": 1800}
        unpaced.close()


async def test_a_pds_without_limits_is_not_paced(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """3,000 notes after login on a local PDS that sends no rate limit (the dev PDS without
    --rate-limits): all pushed in one go — no budget of our own holds them for an hour."""
    collection = collection_for(request)
    session = await log_in(dev_pds)
    with App.open(tmp_path / "a.db", contract) as app:
        sync = ATSync(app, pull=Manual(), bindings={"notes": Binding(collection)}, session=session)
        assert sync.budget is None
        log = StatusLog(sync)
        async with sync:
            seed_notes(app, [f"k{i:04d}" for i in range(3000)])
            status = await idle(sync, 120)
            assert status.pending == 0 and status.rate_limited_until is None
        assert not [s for s in log.seen if s.waiting_reason == "rate_limited"]
        await assert_pds_equals_local(app, sync, dev_pds.pds_url, session.did)
        sync.close()


async def test_rate_budget_holds_writes_until_the_window_frees_points(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = collection_for(request)
    session = await log_in(dev_pds)
    offset = 0.0
    budget = RateBudget(per_hour=100, per_day=None, clock=lambda: time.time() + offset)
    # 100 points spent almost an hour ago: they leave the window 2 s from now.
    frees_at = time.time() + 2.0
    offset = -(3600.0 - 2.0)
    budget.spend(100)
    offset = 0.0
    sent: list[float] = []

    async def on_request(req: httpx.Request) -> None:
        if req.url.path.endswith(APPLY):
            sent.append(time.time())

    with App.open(tmp_path / "a.db", contract) as app:
        sync = ATSync(
            app,
            pull=Manual(),
            bindings={"notes": Binding(collection)},
            session=session,
            push=Immediate(),
            budget=budget,
            client_options={"event_hooks": {"request": [on_request]}},
        )
        async with sync:
            seed_notes(app, [f"s{i:02d}" for i in range(30)])  # 90 points
            held = await wait_status(sync, lambda s: s.rate_limited_until is not None, 10)
            assert held.pending == 30 and sent == []
            assert held.rate_limited_until is not None
            assert abs(held.rate_limited_until - frees_at) < 0.2
            status = await idle(sync, 30)
            assert status.rate_limited_until is None
        # One batch, sent once the old points had left the window (the wall clock, which
        # the budget follows; a little slack for float rounding only).
        assert len(sent) == 1 and sent[0] >= frees_at - 0.05
        await assert_pds_equals_local(app, sync, dev_pds.pds_url, session.did)
        sync.close()


# --- kill -9 -------------------------------------------------------------------------------------


# The scripted sequence, as source: the child runs this very text, the parent execs it to
# know the expected end state (inspect.getsource would read whatever the file holds now).
STEPS_SOURCE = """
def make_steps(seed: int, count: int, keys: int) -> list[tuple[str, str, str, int]]:
    # (op, key, title, n), op "put" or "drop"
    rng = random.Random(seed)
    alive: set[str] = set()
    steps: list[tuple[str, str, str, int]] = []
    names = [f"k{i:03d}" for i in range(keys)]
    for i in range(count):
        key = names[i] if i < keys else rng.choice(names)
        if key in alive and rng.random() < 0.2:
            steps.append(("drop", key, "", 0))
            alive.discard(key)
        else:
            steps.append(("put", key, f"{key} v{i}", i))
            alive.add(key)
    return steps
"""


def make_steps(seed: int, count: int, keys: int) -> list[tuple[str, str, str, int]]:
    namespace: dict[str, Any] = {"random": random}
    exec(STEPS_SOURCE, namespace)
    steps: list[tuple[str, str, str, int]] = namespace["make_steps"](seed, count, keys)
    return steps


def expected_rows(steps: list[tuple[str, str, str, int]]) -> dict[str, tuple[str, int]]:
    rows: dict[str, tuple[str, int]] = {}
    for op, key, title, n in steps:
        if op == "drop":
            rows.pop(key, None)
        else:
            rows[key] = (title, n)
    return rows


CHILD = """
import random
import sys

import anyio

from atsync.app import ActionContext, App, Contract
from atsync.atproto._session import FileSessionStore, Session, login
from atsync.sync import Binding
from atsync.sync import ATSync, Immediate, Manual, RateBudget

contract = Contract(models={{
    "notes": {{"id": "primary", "slug": "string", "title": "string", "n": "integer"}},
    "progress": {{"id": "primary", "step": "integer"}},
}})


@contract.action
def put_note(ctx: ActionContext, step: int, key: str, title: str, n: int) -> None:
    ctx.db.set("notes", {{"id": key, "slug": key, "title": title, "n": n}})
    ctx.db.set("progress", {{"id": "p", "step": step}})  # in the same transaction


@contract.action
def drop_note(ctx: ActionContext, step: int, key: str) -> None:
    ctx.db.delete("notes", key)
    ctx.db.set("progress", {{"id": "p", "step": step}})


{make_steps}

async def main() -> None:
    db, store_dir, pds_url, did, password, collection = sys.argv[1:7]
    steps = make_steps({seed}, {count}, {keys})
    store = FileSessionStore(store_dir)
    session = Session.resume(store, did) or await login(did, password, pds_url, store=store)
    with App.open(db, contract) as app:
        sync = ATSync(
        app,
        pull=Manual(),
            bindings={{"notes": Binding(collection, rkey="tid", local=["n"])}},
            session=session,
            push=Immediate(),
            budget=RateBudget.off(),
        )
        async with sync:
            print("ready", flush=True)
            done = app.db.get("progress", "p")
            start = done["step"] + 1 if done else 0
            for i in range(start, len(steps)):
                op, key, title, n = steps[i]
                if op == "drop":
                    app.actions.drop_note(i, key)
                else:
                    app.actions.put_note(i, key, title, n)
                await anyio.sleep(0.01)  # the app's pace: pushes run between its actions
            with anyio.fail_after(60):
                await sync.wait_for_idle()
            print("done", sync.outbox.counts(), flush=True)
        sync.close()


anyio.run(main)
"""

KILL_SEED, KILL_STEPS, KILL_KEYS, KILLS = 11, 1500, 100, 30

kill_contract = Contract(
    models={
        "notes": {"id": "primary", "slug": "string", "title": "string", "n": "integer"},
        "progress": {"id": "primary", "step": "integer"},
    }
)


async def _run_child(
    args: list[str], log: Path, kill_after: float | None
) -> tuple[list[str], int | None]:
    """Run the child; kill it ``kill_after`` seconds after its "ready" line (None: let it
    finish). Returns its stdout lines and exit code."""
    with log.open("ab") as err:
        process = await anyio.open_process(args, stdout=subprocess.PIPE, stderr=err)
        lines: list[str] = []
        try:
            assert process.stdout is not None
            out = BufferedByteReceiveStream(process.stdout)
            try:
                with anyio.fail_after(60):
                    lines.append((await out.receive_until(b"\n", 4096)).decode())
            except (anyio.IncompleteRead, TimeoutError) as exc:
                stderr = await anyio.Path(log).read_text()
                raise AssertionError(f"no ready line; stderr: {stderr[-3000:]}") from exc
            assert lines[0] == "ready", lines
            if kill_after is None:
                with anyio.fail_after(120):
                    lines.append((await out.receive_until(b"\n", 4096)).decode())
                    return lines, await process.wait()
            # The one sleep here picks the kill moment; start-up was awaited above.
            await anyio.sleep(kill_after)
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)
            return lines, await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


def _progress(db: Path) -> int:
    """The last scripted step the killed child committed (-1: none yet)."""
    with closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT step FROM progress WHERE id = 'p'").fetchone()
    return -1 if row is None else int(row[0])


@pytest.mark.slow
async def test_kill_minus_9_thirty_times_loses_and_duplicates_nothing(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    collection = collection_for(request)
    account = dev_pds.accounts["alice.test"]
    script = tmp_path / "child.py"
    script.write_text(
        CHILD.format(
            make_steps=STEPS_SOURCE,
            seed=KILL_SEED,
            count=KILL_STEPS,
            keys=KILL_KEYS,
        )
    )
    db = tmp_path / "app.db"
    args = [
        sys.executable,
        str(script),
        str(db),
        str(tmp_path / "sessions"),
        dev_pds.pds_url,
        account.did,
        account.password,
        collection,
    ]
    log = tmp_path / "child-stderr.log"
    rng = random.Random(KILL_SEED)
    killed, progress = 0, []
    for _ in range(KILLS):
        lines, code = await _run_child(args, log, kill_after=rng.uniform(0.0, 1.0))
        killed += code == -signal.SIGKILL
        progress.append(_progress(db))
    lines, code = await _run_child(args, log, kill_after=None)
    assert code == 0 and lines[-1].startswith("done (0, 0,"), (lines, log.read_text()[-3000:])
    assert killed >= KILLS * 2 // 3, f"only {killed} of {KILLS} runs were killed"
    # Most kills hit the script while it ran (and pushed), not an idle engine after it.
    assert sum(1 for p in progress if p < KILL_STEPS - 1) >= KILLS // 2, progress

    steps = make_steps(KILL_SEED, KILL_STEPS, KILL_KEYS)
    expected = expected_rows(steps)
    session = await log_in(dev_pds)
    with App.open(db, kill_contract) as app:
        sync = ATSync(
            app,
            pull=Manual(),
            bindings={"notes": Binding(collection, rkey="tid", local=["n"])},
            push=Manual(),
        )
        # Every scripted step ran exactly once (progress is written with each action).
        assert app.db.get("progress", "p") == {"id": "p", "step": KILL_STEPS - 1}
        rows = {r["id"]: (r["title"], r["n"]) for r in app.db.query("notes")}
        assert rows == expected
        assert sync.outbox.counts()[:2] == (0, 0)
        remote = await assert_pds_equals_local(app, sync, dev_pds.pds_url, session.did)
        # Exactly once: one record per local row (a duplicate would have another TID).
        slugs = Counter(str(v["slug"]) for v in remote.values())
        assert slugs == Counter(list(expected))
        assert_no_duplicate_commits(await commit_ops(session, dev_pds.pds_url, collection))
        # Nobody else writes to this collection: a recorded conflict is a false alarm.
        assert sync.outbox.counts()[2] == 0, "conflicts recorded against our own writes"
        sync.close()


# --- suspected engine bugs: each shows one precisely ---------------------------------------------


async def test_first_push_delayed_past_the_timeout_cannot_resurrect_a_deleted_record(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The very first batch of a database goes out without swapCommit (no commit is known
    yet). If it reaches the PDS only after the engine gave up on it, re-sent it, and pushed
    newer changes, it applies on top of them: here it re-creates a record deleted since."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        late = Hold(after_forward=False)  # held before the PDS sees it
        proxy.add(late, nsid=APPLY, nth=1)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(
                app, collection, session, push=Immediate(), client_options={"timeout": 1.0}
            )
            async with sync:
                app.actions.put_note("a", "first", 1)
                await idle(sync, 30)  # timed out, reconciled, re-sent: on the PDS
                app.actions.drop_note("a")
                await idle(sync, 30)
                late.release()
                with anyio.fail_after(10):
                    await proxy.wait_until(lambda p: held_event(p).done)
                assert held_event(proxy).forwarded
                sync.push_now()
                await idle(sync, 30)
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            sync.close()


async def test_retrying_a_dead_letter_never_overwrites_a_newer_pushed_version(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A write the PDS rejected (here: v1 of note x, refused with a 400 that a later PDS
    policy no longer gives) is superseded by a newer local version that reaches the PDS.
    ``retry_dead_letters()`` must not send the stale v1 over it."""
    collection = collection_for(request)

    def rejects_v1(req: ProxyRequest) -> bool:
        body = req.json() or {}
        return any((w.get("value") or {}).get("title") == "x v1" for w in body.get("writes", []))

    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        proxy.add(Answer(400, "InvalidRecord", "refused by policy"), nsid=APPLY, when=rejects_v1)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                app.actions.put_note("x", "x v1", 1)
                app.actions.put_note("y", "y v1", 1)
                sync.push_now()
                status = await idle(sync)
                assert status.failed == 1 and sync.outbox.dead_letters()[0].rkey == "x"
                app.actions.put_note("x", "x v2", 2)  # the fix, pushed fine
                sync.push_now()
                await idle(sync)
                await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
                proxy.clear()  # the PDS would now accept v1
                sync.retry_dead_letters()
                await idle(sync)
            assert proxy.counts["answer"] >= 1
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            sync.close()


async def test_saving_unchanged_content_makes_no_new_commit(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """applyWrites#update with unchanged content still makes a commit (PDS.md). Saving a row
    unchanged, or editing it and back before a push, must not send one."""
    collection = collection_for(request)
    session = await log_in(dev_pds)
    with App.open(tmp_path / "a.db", contract) as app:
        sync = notes_engine(app, collection, session, push=Manual())
        async with sync:
            app.actions.put_note("a", "same", 1)
            app.actions.put_note("b", "same", 1)
            sync.push_now()
            await idle(sync)
            app.actions.put_note("a", "same", 1)  # saved again, unchanged
            app.actions.put_note("b", "changed", 2)
            app.actions.put_note("b", "same", 1)  # and changed back before any push
            sync.push_now()
            await idle(sync)
        await assert_pds_equals_local(app, sync, dev_pds.pds_url, session.did)
        ops = await commit_ops(session, dev_pds.pds_url, collection)
        assert_no_duplicate_commits(ops)
        sync.close()


async def test_status_returns_to_idle_when_the_reconcile_settles_the_whole_queue(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The batch was applied but its answer lost; the reconcile right after the failure finds
    every write on the PDS and empties the outbox. Nothing is left to push, so the engine
    must report idle (and ``wait_for_idle`` return), not stay "offline" for good."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        proxy.add(DropAfterForward(), nsid=APPLY, nth=1)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Immediate())
            async with sync:
                seed_notes(app, ["a", "b", "c"])
                # Settled at once by the reconcile; well within the 30 s watchdog period.
                status = await idle(sync, 15)
                assert status.upload_error is None
            assert proxy.counts["drop_after_forward"] == 1
            assert len(apply_writes_events(proxy)) == 1  # never sent twice
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            sync.close()


async def test_writes_of_an_unheard_batch_are_all_reconciled_after_the_batch_shrank(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A batch of 40 creates is applied but unheard; the re-send meets a 4xx whose body is
    cut (the PDS's InvalidSwap, unreadable), so the pusher halves its batch. The reconcile
    after the next InvalidSwap checks only those 20 writes yet moves the known commit to
    the PDS's latest; the other 20 (applied too) are then re-sent as creates: the PDS
    answers 500, and every later reconcile concludes "nothing was written since" — the
    500 loop PDS.md warns about."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                seed_notes(app, [f"s{i:02d}" for i in range(10)])
                sync.push_now()
                await idle(sync)
                # (A rule counts the requests it sees from when it is added.)
                proxy.add(DropAfterForward(), nsid=APPLY, nth=1)
                proxy.add(Error500(), nsid="com.atproto.sync.getLatestCommit", nth=1)
                proxy.add(Truncate(keep=0.1, fix_length=True), nsid=APPLY, nth=2)
                seed_notes(app, [f"n{i:02d}" for i in range(40)], title="new")
                sync.push_now()
                status = await idle(sync, 30)
                assert status.failed == 0
            # Settled by reading the PDS before any re-send; a re-send, if one happens, meets
            # the cut 400 and must not dead-letter anything.
            for cut in apply_writes_events(proxy)[2:3]:
                assert cut.fault == "truncate" and cut.upstream_status == 400
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            actions = assert_no_duplicate_commits(
                await commit_ops(direct, dev_pds.pds_url, collection)
            )
            assert actions == {"create": 50}
            sync.close()


async def test_retrying_a_dead_letter_superseded_by_a_pushed_fix_leaves_nothing_failed(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A post the PDS rejected (no createdAt) is fixed by the app and the fix is pushed.
    Then the user presses "retry failed": the dead letter is stale (its record is on the
    PDS in a newer state), so retrying it must not send the old version again — nor leave
    a failure behind that no action of the user can clear."""
    collection = collection_for(request)
    session = await log_in(dev_pds, "bob.test")
    with App.open(tmp_path / "a.db", contract) as app:
        sync = ATSync(
            app,
            pull=Manual(),
            bindings={"notes": Binding(collection), "posts": Binding(POST, rkey="tid")},
            session=session,
            push=Manual(),
            budget=RateBudget.off(),
        )
        async with sync:
            app.actions.put_post("p1", "hello", None)  # invalid: createdAt is required
            app.actions.put_note("n1", "note 1", 1)
            sync.push_now()
            status = await idle(sync)
            assert status.failed == 1
            app.actions.put_post("p1", "hello", DATE)  # fixed
            sync.push_now()
            await idle(sync)
            rkey = sync.outbox.rkey_for(POST, "posts", "p1")
            assert rkey is not None
            assert (await pds_records(dev_pds.pds_url, session.did, POST))[rkey]["createdAt"]

            # The fix superseded the dead letter when it was queued: nothing stale is left
            # to retry, and nothing failed remains.
            assert sync.outbox.dead_letters() == []
            assert sync.retry_dead_letters() == 0
            app.actions.put_note("n2", "note 2, queued behind the retried letter", 2)
            sync.push_now()
            status = await idle(sync, 30)
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, session.did)
            remote = await pds_records(dev_pds.pds_url, session.did, POST)
            assert remote[rkey] == local_records(app, sync, "posts")[rkey]
            assert status.failed == 0, sync.outbox.dead_letters()
        sync.close()


async def test_deleting_a_record_whose_create_never_landed_sends_no_delete(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A create is in flight and never reaches the PDS (the connection drops first); the app
    deletes the record meanwhile. The reconcile sees that nothing was committed since and
    leaves the rows as they are — but the create, marked attempted, has become a delete of a
    record that does not exist. The PDS answers such a delete with 500, and every later
    reconcile again concludes "nothing written since": the queue never drains."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                seed_notes(app, ["s1"])
                sync.push_now()
                await idle(sync)  # a commit is known from here on
                lost = Hold(after_forward=False, drop=True)
                proxy.add(lost, nsid=APPLY, nth=1)
                app.actions.put_note("x", "never lands", 1)
                app.actions.put_note("y", "lands on the retry", 1)
                sync.push_now()
                with anyio.fail_after(10):
                    await lost.reached.wait()
                app.actions.drop_note("x")
                lost.release()
                await idle(sync, 30)
            assert proxy.counts["hold"] == 1
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            sync.close()


async def test_a_429_during_the_reconcile_is_waited_out_too(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """After an unheard batch the engine reads the PDS before sending again; if the PDS
    answers one of those reads with 429 + Retry-After, nothing may be sent before then."""
    collection = collection_for(request)
    wait = 2.0
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            log = StatusLog(sync)
            async with sync:
                seed_notes(app, ["s1"])
                sync.push_now()
                await idle(sync)
                proxy.add(DropAfterForward(), nsid=APPLY, nth=1)
                told = proxy.add(RateLimited(retry_after=wait), nsid=GET_RECORD, nth=1)
                seed_notes(app, ["a", "b"], title="new")
                sync.push_now()
                await idle(sync, 30)
            assert told.fired == 1
            limited = next(e for e in proxy.events if e.fault == "rate_limited")
            assert limited.answered_at is not None
            after = [e for e in proxy.events if e.received_at > limited.answered_at]
            assert after, "nothing was sent after the 429"
            assert after[0].received_at - limited.answered_at >= wait - 0.05, after[0]
            assert any(s.rate_limited_until for s in log.seen)
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            sync.close()


async def test_a_401_during_the_reconcile_does_not_kill_the_engine(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """An auth failure on one of the reconcile's reads (here a 401 from something between
    the app and the PDS) must end up in the status like any push failure; the engine task
    keeps running and the queue drains once calls succeed again."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                seed_notes(app, ["s1"])
                sync.push_now()
                await idle(sync)
                proxy.add(DropAfterForward(), nsid=APPLY, nth=1)
                proxy.add(
                    Answer(401, "AuthenticationRequired", "Authentication Required"),
                    nsid="com.atproto.sync.getLatestCommit",
                    nth=1,
                )
                seed_notes(app, ["a", "b"], title="new")
                sync.push_now()
                await wait_status(sync, lambda s: s.state in ("needs_auth", "error"), 15)
                sync.push_now()  # e.g. the user logs in again / presses "sync now"
                await idle(sync, 30)
            assert proxy.counts["answer"] == 1
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            sync.close()


async def test_an_unreadable_4xx_never_dead_letters_a_write_that_landed(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A create is applied but unheard, the reconcile fails, and the re-send is refused
    with the PDS's 400 InvalidSwap — whose body arrives cut off, so the engine cannot read
    the error's name. A rejection it cannot read is no proof the write is invalid: the
    write (which is on the PDS) must not end in the dead letters."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                seed_notes(app, ["s1"])
                sync.push_now()
                await idle(sync)
                proxy.add(DropAfterForward(), nsid=APPLY, nth=1)
                proxy.add(Error500(), nsid="com.atproto.sync.getLatestCommit", nth=1)
                proxy.add(Truncate(keep=0.1, fix_length=True), nsid=APPLY, nth=2)
                app.actions.put_note("x", "landed on the first try", 1)
                sync.push_now()
                status = await idle(sync, 30)
                # The failed reconcile is retried before anything is re-sent: it finds the
                # write on the PDS, so the (truncated) re-send never has to happen. If it
                # did, its unreadable 400 must not dead-letter the write either.
                events = apply_writes_events(proxy)
                for cut in events[2:]:
                    assert cut.fault == "truncate" and cut.upstream_status == 400
                assert status.failed == 0, sync.outbox.dead_letters()
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            sync.close()


async def test_a_reconcile_cut_short_does_not_turn_our_own_landed_write_into_a_conflict(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """An update of x (v1) lands unheard. The reconcile finds x applied, but a later read
    of the same reconcile fails, so nothing is settled. x is edited again (v2) and the
    re-send (refused: InvalidSwap) now names v2 as what was sent. The next reconcile finds
    v1 on the PDS — our own write from the first attempt — and must not call it a conflict
    with another writer (nobody else writes here)."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                seed_notes(app, ["x"])
                sync.push_now()
                await idle(sync)
                proxy.add(DropAfterForward(), nsid=APPLY, nth=1)
                cut_short = Hold(after_forward=False, drop=True)
                proxy.add(cut_short, nsid=GET_RECORD, when=lambda r: "rkey=y" in r.target, nth=1)
                app.actions.put_note("x", "x v1", 1)
                app.actions.put_note("y", "y", 1)
                sync.push_now()
                with anyio.fail_after(10):
                    await cut_short.reached.wait()  # x was read (applied); y's read hangs
                app.actions.put_note("x", "x v2", 2)
                cut_short.release()
                status = await idle(sync, 30)
                assert status.failed == 0
                assert status.conflicts == 0
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            assert_no_duplicate_commits(await commit_ops(direct, dev_pds.pds_url, collection))
            sync.close()


async def test_an_earlier_attempt_landing_late_is_recognised_as_our_own_write(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Attempt 1 (x = v1) is slow to reach the PDS; the engine times out, sees nothing
    landed, and re-sends x, now edited to v2 (attempt 2, refused with a 500). Attempt 1
    then lands after all — nothing committed in between, so its swapCommit still holds.
    The next reconcile finds v1 on the PDS: a write of ours (attempt 1), not a conflict
    with another writer; and v2 must still end up on the PDS."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(
                app, collection, session, push=Manual(), client_options={"timeout": 1.0}
            )
            async with sync:
                seed_notes(app, ["x"])
                sync.push_now()
                await idle(sync)
                slow = Hold(after_forward=False)  # reaches the PDS when released
                proxy.add(slow, nsid=APPLY, nth=1)
                proxy.add(Error500(), nsid=APPLY, nth=2)
                third = Hold(after_forward=False)
                proxy.add(third, nsid=APPLY, nth=3)
                app.actions.put_note("x", "x v1", 1)
                sync.push_now()
                with anyio.fail_after(10):
                    await slow.reached.wait()
                app.actions.put_note("x", "x v2", 2)  # what every later attempt carries
                with anyio.fail_after(30):
                    await third.reached.wait()  # timed out, re-sent (500), about to re-send
                slow.release()
                with anyio.fail_after(10):
                    await proxy.wait_until(lambda p: held_event(p).done)
                assert held_event(proxy).upstream_status == 200  # v1 landed late
                third.release()
                status = await idle(sync, 30)
                assert status.failed == 0
                assert status.conflicts == 0
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            assert_no_duplicate_commits(await commit_ops(direct, dev_pds.pds_url, collection))
            sync.close()


async def test_a_create_still_in_flight_cannot_land_after_its_record_was_deleted(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Attempt 1 (create d) is slow to reach the PDS; the engine times out. Attempt 2 is
    answered with a 500, and the reconcile after it reads d absent — while attempt 1 is
    still on its way — so d's queued create counts as never landed, and deleting d locally
    drops it from the queue. Attempt 1 then reaches the PDS: nothing committed since, so
    its swapCommit still holds and d would stand on the PDS for good (found by the
    random-faults test in CI). Absence is final only once no earlier request can land:
    the reconcile fences first."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(
                app, collection, session, push=Manual(), client_options={"timeout": 1.0}
            )
            # Failures wait two minutes: only push_now() moves the engine on, step by step.
            sync._backoff = Backoff(base=120.0, cap=120.0, _random=_Longest())
            async with sync:
                seed_notes(app, ["x"])
                sync.push_now()
                await idle(sync)
                slow = Hold(after_forward=False)  # reaches the PDS when released
                proxy.add(slow, nsid=APPLY, nth=1)
                proxy.add(Error500(), nsid=APPLY, nth=2)
                looked = len(proxy.requests(LATEST))
                app.actions.put_note("d", "doomed", 1)
                sync.push_now()
                with anyio.fail_after(10):
                    await slow.reached.wait()
                    # Timed out; the reconcile after it saw the repo unmoved.
                    await proxy.wait_until(lambda p: len(p.requests(LATEST)) > looked)
                sync.push_now()  # attempt 2: the 500, then a reconcile that reads d
                with anyio.fail_after(10):
                    await proxy.wait_until(lambda p: any(e.done for e in p.requests(GET_RECORD)))
                    # No event marks the reconcile's end: look at d's queued write.
                    while _queued(sync, "d") != ("create", 0):  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                app.actions.drop_note("d")
                slow.release()
                with anyio.fail_after(10):
                    await proxy.wait_until(lambda p: held_event(p).done)
                assert held_event(proxy).forwarded
                sync.push_now()
                status = await idle(sync, 30)
                assert status.failed == 0
            remote = await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            assert sorted(remote) == ["x"]
            sync.close()


async def test_a_write_deleted_while_its_batch_gets_ready_is_not_sent(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A batch is read from the queue, then made ready over the network (blobs uploaded,
    the first batch's swapCommit asked for). A note created and deleted again meanwhile
    leaves the queue (a create never sent) — the batch must not send it anyway: it would
    stand on the PDS with nothing local and nothing queued (found by the random-faults
    test in CI)."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        getting_ready = Hold(after_forward=False)
        proxy.add(getting_ready, nsid=LATEST, nth=1)  # the first batch's swapCommit
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                app.actions.put_note("kept", "stays", 1)
                app.actions.put_note("gone", "deleted before it is sent", 2)
                sync.push_now()
                with anyio.fail_after(10):
                    await getting_ready.reached.wait()
                app.actions.drop_note("gone")
                getting_ready.release()
                status = await idle(sync, 30)
                assert status.failed == 0
            remote = await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            assert sorted(remote) == ["kept"]
            sync.close()


async def test_a_write_changed_while_its_batch_gets_ready_is_recorded_as_what_was_sent(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The batch carries the delete of x; while it gets ready, x is put back. The delete
    lands unheard. The reconcile must know the delete as ours (what the batch sent, not
    what the row holds by then) — not a conflict with another writer — and x ends on the
    PDS as put back."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                seed_notes(app, ["x"])
                sync.push_now()
                await idle(sync)
                sync.outbox.set_state("commit_cid", None)  # the next batch asks for it
                getting_ready = Hold(after_forward=False)
                proxy.add(getting_ready, nsid=LATEST, nth=1)
                proxy.add(DropAfterForward(), nsid=APPLY, nth=1)
                app.actions.drop_note("x")
                sync.push_now()
                with anyio.fail_after(10):
                    await getting_ready.reached.wait()
                app.actions.put_note("x", "put back", 2)
                getting_ready.release()
                status = await idle(sync, 30)
                assert status.failed == 0
                assert status.conflicts == 0, sync.outbox.conflicts()
            remote = await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            assert remote["x"]["title"] == "put back"
            sync.close()


def _queued(sync: ATSync, rkey: str) -> tuple[str, int] | None:
    """The op of ``rkey``'s queued write and whether it may have been sent unheard."""
    row = sync.outbox.db.execute(
        "SELECT op, attempted FROM _atsync_outbox WHERE rkey = ?", (rkey,)
    ).fetchone()
    return None if row is None else (row[0], row[1])


class _Longest(random.Random):
    """Full jitter at its ceiling: every backoff waits as long as it may."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_an_unreadable_invalid_swap_after_another_devices_commit_is_not_a_dead_letter(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Another device commits to the repo, so the engine's next batch carries a stale
    swapCommit; the PDS refuses it (400 InvalidSwap) but the answer's body arrives cut off.
    A refusal the engine cannot read must be settled by reading the PDS, not taken for a
    rejected record."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                seed_notes(app, ["s1"])
                sync.push_now()
                await idle(sync)
                async with XrpcClient(session=direct) as other_device:
                    await other_device.put_record(
                        direct.did, MARKERS, f"d{time.time_ns()}", {"$type": MARKERS}
                    )
                cut = proxy.add(Truncate(keep=0.1, fix_length=True), nsid=APPLY, nth=1)
                app.actions.put_note("x", "x", 1)
                app.actions.put_note("y", "y", 1)
                sync.push_now()
                status = await idle(sync, 30)
                assert cut.fired == 1
                assert apply_writes_events(proxy)[1].upstream_status == 400  # InvalidSwap
                assert status.failed == 0, sync.outbox.dead_letters()
                assert status.conflicts == 0
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            sync.close()


async def test_an_expired_token_mid_push_is_refreshed_once_and_the_push_goes_on(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The PDS says the access token expired in the middle of a queue (injected: the real
    one lives 2 h). The session refreshes once — a real, rotating refreshSession — and the
    push carries on with the new token; nothing is lost or sent twice."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        # (The access JWT may come back identical within the same second: same claims.)
        old_refresh = session.data.refresh_jwt
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                seed_notes(app, [f"s{i:03d}" for i in range(250)])  # two batches
                expired = proxy.add(
                    Answer(400, "ExpiredToken", "Token has expired"), nsid=APPLY, nth=2
                )
                sync.push_now()
                status = await idle(sync, 30)
                assert status.failed == 0 and status.state == "idle"
            assert expired.fired == 1
            assert len(proxy.requests("com.atproto.server.refreshSession")) == 1
            assert session.data.refresh_jwt != old_refresh  # rotated, and in use
            sent = [e for e in apply_writes_events(proxy) if e.forwarded]
            assert [e.upstream_status for e in sent] == [200, 200]
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            actions = assert_no_duplicate_commits(
                await commit_ops(direct, dev_pds.pds_url, collection)
            )
            assert actions == {"create": 250}
            sync.close()


async def test_each_successful_batch_resets_the_backoff(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Isolated faults in a long queue: every other batch is dropped before it reaches the
    PDS, and the one after it goes through. A batch that went through proves the PDS is
    back, so the next fault must start the backoff afresh (≤ 0.5 s) — not compound, with
    full jitter doubling per failure, into waits of tens of seconds."""
    collection = collection_for(request)
    faults = 8
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                seed_notes(app, [f"n{i:04d}" for i in range(200 * (faults + 1))])
                proxy.add(DropBeforeForward(), nsid=APPLY, nth=range(2, 2 * faults + 1, 2))
                sync.push_now()
                status = await idle(sync, 90)
                assert status.failed == 0
            events = apply_writes_events(proxy)
            assert proxy.counts["drop_before_forward"] == faults
            gaps = [
                round(after.received_at - dropped.received_at, 2)
                for dropped, after in itertools.pairwise(events)
                if dropped.fault == "drop_before_forward"
            ]
            assert len(gaps) == faults
            # Backoff base 0.5 s (full jitter), plus the reconcile's one cheap read.
            assert max(gaps) <= 0.75, gaps
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            sync.close()


async def test_a_late_attempt_cannot_resurrect_a_record_deleted_in_the_meantime(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Attempt 1 (create x) is slow to reach the PDS; the engine times out, re-sends
    (refused: 500) and reads the PDS: x is not there. The app deletes x; the engine sends
    the delete, the PDS answers 500 (no such record), the engine reads again (absent) and
    settles: nothing left to do, idle. But attempt 1 is still on its way, and its
    swapCommit still holds (nothing was committed since): it lands, and x is on the PDS
    although the app deleted it."""
    collection = collection_for(request)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        with App.open(tmp_path / "a.db", contract) as app:
            sync = notes_engine(
                app, collection, session, push=Manual(), client_options={"timeout": 1.0}
            )
            async with sync:
                seed_notes(app, ["s1"])
                sync.push_now()
                await idle(sync)
                slow = Hold(after_forward=False)  # reaches the PDS when released
                proxy.add(slow, nsid=APPLY, nth=1)
                refused = proxy.add(Error500(), nsid=APPLY, nth=2)
                app.actions.put_note("x", "x", 1)
                sync.push_now()
                with anyio.fail_after(10):
                    await slow.reached.wait()
                with anyio.fail_after(30):
                    # Timed out, re-sent (500), and the PDS read: x is not there.
                    await proxy.wait_until(
                        lambda p: (
                            refused.fired == 1
                            and any(e.nsid == GET_RECORD and e.done for e in p.events)
                        )
                    )
                app.actions.drop_note("x")
                sync.push_now()
                await idle(sync, 30)  # whatever the engine does about x, it is done
                slow.release()
                with anyio.fail_after(10):
                    await proxy.wait_until(lambda p: held_event(p).done)
                # The engine fenced it: an empty applyWrites moved the repo once the queue was
                # settled, so the late attempt's swapCommit no longer holds.
                assert held_event(proxy).upstream_status == 400
                sync.push_now()
                await idle(sync, 30)
            await assert_pds_equals_local(app, sync, dev_pds.pds_url, direct.did)
            sync.close()


async def test_a_record_key_the_pds_finds_offensive_is_chosen_again_when_atsync_chose_it(
    dev_pds: DevPDS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The reference PDS refuses a record key that matches its list of slurs ("Unacceptable
    slur in record key"), and a random TID can. A key atsync minted (``rkey="tid"``) is
    minted again and the row reaches the PDS; a row whose key is its record key is
    dead-lettered with the PDS's reason (the key is the app's)."""
    collection = collection_for(request)
    slur = Answer(400, "InvalidRequest", "Unacceptable slur in record key")

    def first_try_of(title: str) -> Callable[[ProxyRequest], bool]:
        def matches(req: ProxyRequest) -> bool:
            writes = (req.json() or {}).get("writes", [])
            return any((w.get("value") or {}).get("title") == title for w in writes)

        return matches

    async with FaultProxy(dev_pds.pds_url) as proxy:
        direct, session = await proxied_engine_setup(dev_pds, proxy)
        proxy.add(slur, nsid=APPLY, when=first_try_of("minted"), times=1)
        proxy.add(slur, nsid=APPLY, when=first_try_of("own key"))
        tids = collection + "tid"
        with App.open(tmp_path / "a.db", contract) as app:
            sync = ATSync(
                app, pull=Manual(), push=Manual(), session=session, budget=RateBudget.off(),
                bindings={"notes": Binding(tids, rkey="tid")},
            )  # fmt: skip
            async with sync:
                app.actions.put_note("m", "minted", 1)
                refused = sync.outbox.rkey_for(tids, "notes", "m")
                sync.push_now()
                status = await idle(sync)
                assert (status.pending, status.failed) == (0, 0)
                chosen = sync.outbox.rkey_for(tids, "notes", "m")
                assert chosen is not None and chosen != refused
                remote = await pds_records(dev_pds.pds_url, direct.did, tids)
                assert set(remote) == {chosen} and remote[chosen]["title"] == "minted"
            sync.close()
        with App.open(tmp_path / "b.db", contract) as app:
            sync = notes_engine(app, collection, session, push=Manual())
            async with sync:
                app.actions.put_note("own", "own key", 1)
                sync.push_now()
                status = await idle(sync)
                assert status.failed == 1
                (dead,) = sync.outbox.dead_letters()
                assert dead.rkey == "own" and "slur in record key" in (dead.message or "")
            sync.close()
        assert proxy.counts["answer"] >= 2

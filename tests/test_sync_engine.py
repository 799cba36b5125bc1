"""The engine's schedule and failure paths, fast: against an in-process fake of the PDS.

These take seconds, not minutes; tests/test_push_reliability.py checks the same paths against
the real reference PDS through a fault proxy.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from atsync import SignerError
from atsync.app import ActionContext, App, ATPSigner, Contract
from atsync.atproto import MemorySessionStore
from atsync.db import ModelDB
from atsync.sync import (
    ATSync,
    Binding,
    Debounce,
    Immediate,
    Manual,
    Outbox,
    RateBudget,
    SyncStatus,
    SyncThread,
)
from fake_pds import FakePDS, FakeSession, xrpc_error
from sync_devices import wait_status

pytestmark = pytest.mark.anyio
NOTES = "com.example.fake.note"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


contract = Contract(models={"notes": {"id": "primary", "title": "string"}})


@contract.action
def put(ctx: ActionContext, key: str, title: str) -> None:
    ctx.db.set("notes", {"id": key, "title": title})


def seed(app: App, keys: Iterable[str], title: str = "t") -> None:
    with app.batch():
        for key in keys:
            app.actions.put(key, f"{title} {key}")


def engine(app: App, pds: FakePDS, **options: Any) -> ATSync:
    options.setdefault("session", pds.session())
    options.setdefault("push", Immediate())
    return ATSync(
        app,
        pull=Manual(),
        bindings={"notes": Binding(NOTES)},
        client_options={"transport": pds.transport},
        **options,
    )


async def idle(sync: ATSync, within: float = 10) -> SyncStatus:
    with anyio.fail_after(within):
        return await sync.wait_for_idle()


def local_titles(app: App) -> dict[str, str]:
    return {row["id"]: row["title"] for row in app.db.query("notes")}


def remote_titles(pds: FakePDS) -> dict[str, str]:
    return {rkey: value["title"] for rkey, value in pds.values(NOTES).items()}


# --- wake-ups -----------------------------------------------------------------------------------


async def test_a_login_wakes_the_engine_at_once(tmp_path: Path) -> None:
    pds = FakePDS()
    signer = ATPSigner(store=MemorySessionStore())
    with App.open(tmp_path / "a.db", contract, signer=signer) as app:
        sync = engine(app, pds, session=None)  # the signer's session, as apps use it
        async with sync:
            seed(app, ["a", "b"])
            status = await wait_status(sync, lambda s: s.state == "needs_auth" and s.pending == 2)
            assert status.waiting_reason == "needs_auth"
            started = time.monotonic()
            signer.session = FakeSession(pds.did)  # what login() ends with
            await idle(sync)
            # Not the 1 s poll, not a watchdog: the login itself woke the engine.
            assert time.monotonic() - started < 0.5
            assert remote_titles(pds) == local_titles(app)
            signer.session = None  # logout: the engine stops pushing at once
            await wait_status(sync, lambda s: s.state == "needs_auth", within=0.5)
            seed(app, ["c"])
            await wait_status(sync, lambda s: s.pending == 1 and s.state == "needs_auth")
            assert "c" not in remote_titles(pds)
        sync.close()


async def test_a_write_by_another_process_wakes_the_engine(tmp_path: Path) -> None:
    """`atsync retry` (another connection) queues dead letters again: pushed without a
    push_now() and without a new local change — not after the strategy's long debounce."""
    pds = FakePDS()
    with App.open(tmp_path / "a.db", contract) as app:
        sync = engine(app, pds, push=Debounce(60))
        async with sync:
            seed(app, ["a", "b"])
            # Refused as a batch, then alone: a goes to the dead letters, b is pushed.
            for _ in range(2):
                pds.fault(on_apply(lambda r: xrpc_error(400, "InvalidRecord", "no")))
            sync.push_now()
            await wait_status(sync, lambda s: s.failed == 1 and s.pending == 0)
            # Another process (a second connection to the file) requeues the dead letter.
            other = ModelDB.open_existing(tmp_path / "a.db")
            with other:
                assert Outbox(other).retry_dead_letters() == 1
            started = time.monotonic()
            status = await idle(sync, within=5)
            assert status.failed == 0 and time.monotonic() - started < 2.5
        assert remote_titles(pds) == local_titles(app)
        sync.close()


async def test_offline_is_probed_every_few_seconds_and_noticed(tmp_path: Path) -> None:
    pds = FakePDS()
    down = True

    def unreachable(request: httpx.Request) -> httpx.Response | None:
        if down:
            raise httpx.ConnectError("connection refused", request=request)
        return None

    pds.fault(unreachable, sticky=True)
    with App.open(tmp_path / "a.db", contract) as app:
        sync = engine(app, pds)
        async with sync:
            seed(app, ["a"])
            offline = await wait_status(sync, lambda s: s.state == "offline")
            assert offline.waiting_reason is None or offline.waiting_reason == "offline"
            held = await wait_status(sync, lambda s: s.waiting_reason == "offline")
            assert held.resumes_at is not None and held.resumes_at <= time.time() + 5.01
            (queued,) = sync.outbox.listing()  # what `atsync outbox` shows
            assert "connection refused" in (queued.last_error or "")
            down = False
            back = time.monotonic()
            await idle(sync, within=7)
            assert time.monotonic() - back < 5.5  # noticed by the next probe
        assert remote_titles(pds) == local_titles(app)
        sync.close()


# --- the engine never dies ------------------------------------------------------------------


async def test_a_damaged_outbox_row_is_dead_lettered_and_the_rest_goes_on(tmp_path: Path) -> None:
    pds = FakePDS()
    with App.open(tmp_path / "a.db", contract) as app:
        sync = engine(app, pds, push=Manual())
        seed(app, ["a", "b", "c", "d"])
        raw = sqlite3.connect(tmp_path / "a.db")
        raw.execute("update _atsync_outbox set record = '{not json' where rkey = 'b'")
        raw.execute("update _atsync_outbox set record = '[1, 2]' where rkey = 'c'")
        raw.commit()
        raw.close()
        async with sync:
            sync.push_now()
            status = await idle(sync)
            assert status.failed == 2 and status.state == "idle"
        assert sorted(remote_titles(pds)) == ["a", "d"]
        dead = {d.rkey: d for d in sync.outbox.dead_letters()}
        assert set(dead) == {"b", "c"} and dead["b"].error == "UnreadableRow"
        assert sync.row_state("notes", "b") == "failed"
        app.actions.put("e", "new")
        assert sync.row_state("notes", "e") == "pending"
        assert "damaged" in (dead["b"].message or "")
        # A newer state of the damaged record supersedes its dead letter and is pushed.
        async with sync:
            app.actions.put("b", "repaired")
            sync.push_now()
            status = await idle(sync)
            assert status.failed == 1
        assert remote_titles(pds)["b"] == "repaired"
        assert sync.row_state("notes", "b") == sync.row_state("notes", "e") == "synced"
        sync.close()


async def test_damaged_sync_state_is_survived(tmp_path: Path) -> None:
    pds = FakePDS()
    with App.open(tmp_path / "a.db", contract) as app:
        seed(app, ["a", "b"])
        raw = sqlite3.connect(tmp_path / "a.db")
        raw.execute(
            "create table if not exists _atsync_sync_state (key text primary key, value text)"
        )
        for key, value in [("budget", "{{{"), ("commit_cid", "not-a-cid"), ("engine", "[")]:
            raw.execute("insert or replace into _atsync_sync_state values (?, ?)", (key, value))
        raw.commit()
        raw.close()
        sync = engine(app, pds, budget=RateBudget())
        async with sync:
            seed(app, ["c"])
            status = await idle(sync)
            assert status.failed == 0
        assert remote_titles(pds) == local_titles(app)
        sync.close()


async def test_a_dropped_sync_table_is_recreated_and_the_engine_goes_on(tmp_path: Path) -> None:
    pds = FakePDS()
    with App.open(tmp_path / "a.db", contract) as app:
        sync = engine(app, pds)
        seen: list[SyncStatus] = []
        sync.on_status(seen.append)
        async with sync:
            seed(app, ["a"])
            await idle(sync)
            raw = sqlite3.connect(tmp_path / "a.db")
            raw.execute("drop table _atsync_sent")  # what a careless manual clean-up does
            raw.commit()
            raw.close()
            seed(app, ["b"])
            await idle(sync)
        assert any("no such table" in (s.upload_error or "") for s in seen if s.state == "error")
        assert remote_titles(pds) == local_titles(app)
        sync.close()


def _raise_once(target: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = getattr(target, name)

    def patched(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(f"injected failure in {name}")
        return original(*args, **kwargs)

    async def apatched(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(f"injected failure in {name}")
        return await original(*args, **kwargs)

    import inspect

    monkeypatch.setattr(
        target, name, apatched if inspect.iscoroutinefunction(original) else patched
    )
    return calls


@pytest.mark.parametrize(
    ("where", "name"),
    [
        ("outbox", "next_batch"),
        ("outbox", "mark_attempted"),
        ("outbox", "complete"),
        ("outbox", "pending_by_collection"),
        ("client", "apply_writes"),
        ("client", "sync_get_latest_commit"),
        ("pusher", "fence"),
    ],
)
async def test_an_exception_at_any_step_is_shown_and_the_engine_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, name: str
) -> None:
    from atsync.atproto import XrpcClient
    from atsync.sync._pusher import Pusher

    pds = FakePDS()
    target = {"outbox": Outbox, "client": XrpcClient, "pusher": Pusher}[where]
    with App.open(tmp_path / "a.db", contract) as app:
        sync = engine(app, pds)
        seen: list[SyncStatus] = []
        sync.on_status(seen.append)
        if name == "fence":
            # A fence follows an unheard request that had not landed when we looked.
            pds.fault(on_apply(_no_answer))
        calls = _raise_once(target, name, monkeypatch)
        async with sync:
            seed(app, ["a", "b"])
            await idle(sync, within=15)
            assert sync.status.state == "idle"  # the task is alive, not stopped
        assert calls, f"{name} was never called"
        errors = [s for s in seen if s.state == "error" and s.upload_error]
        assert any(f"injected failure in {name}" in (s.upload_error or "") for s in errors)
        assert remote_titles(pds) == local_titles(app)
        sync.close()


def on_apply(
    answer: Callable[[httpx.Request], httpx.Response],
) -> Callable[[httpx.Request], httpx.Response | None]:
    return lambda r: answer(r) if r.url.path.endswith("applyWrites") else None


def _no_answer(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


# --- stop and start -------------------------------------------------------------------------


async def test_an_engine_stops_and_starts_again(tmp_path: Path) -> None:
    pds = FakePDS()
    with App.open(tmp_path / "a.db", contract) as app:
        sync = engine(app, pds)
        async with sync:
            seed(app, ["a"])
            await idle(sync)
        assert sync.status.state == "stopped"
        seed(app, ["b", "c"])  # while stopped: queued, not pushed
        assert sync.status.pending == 2 and sorted(remote_titles(pds)) == ["a"]
        async with sync:
            await idle(sync)
        assert remote_titles(pds) == local_titles(app)
        sync.close()


def test_sync_thread_stops_and_starts_again(tmp_path: Path) -> None:
    pds = FakePDS()
    with App.open(tmp_path / "a.db", contract) as app:
        sync = SyncThread(
            app,
            pull=Manual(),
            bindings={"notes": Binding(NOTES)},
            session=pds.session(),
            client_options={"transport": pds.transport},
        )
        sync.start()
        seed(app, ["a"])
        sync.wait_for_idle(timeout=10)
        sync.stop()
        seed(app, ["b"])
        assert sync.status.state == "stopped" and sync.status.pending == 1
        sync.start()
        status = sync.wait_for_idle(timeout=10)
        sync.close()
        assert status.pending == 0
        assert remote_titles(pds) == local_titles(app)


# --- waiting and rate limits ----------------------------------------------------------------


async def test_the_pds_rate_limit_headers_hold_the_queue_and_say_why(tmp_path: Path) -> None:
    pds = FakePDS()
    reset = pds.reset_at = time.time() + 3600
    pds.points_left = 630  # 210 creates
    with App.open(tmp_path / "a.db", contract) as app:
        sync = engine(app, pds, push=Manual())
        assert sync.budget is None  # not a Bluesky host: no pacing of our own
        async with sync:
            seed(app, [f"k{i:03d}" for i in range(250)])
            sync.push_now()
            held = await wait_status(sync, lambda s: s.state == "waiting" and s.pending < 250)
            assert held.waiting_reason == "rate_limited"
            assert held.pending == 250 - 200 - 10  # one batch, then what the PDS still allows
            assert held.resumes_at is not None and abs(held.resumes_at - reset) < 2
            assert held.rate_limited_until is not None
        sync.close()


async def test_no_limit_no_pacing_and_bluesky_hosts_are_paced(tmp_path: Path) -> None:
    keys = [f"k{i:04d}" for i in range(3000)]
    pds = FakePDS()
    with App.open(tmp_path / "a.db", contract) as app:
        sync = engine(app, pds)
        async with sync:
            seed(app, keys)
            status = await idle(sync, within=60)
            assert status.pending == 0 and status.rate_limited_until is None
        assert len(pds.values(NOTES)) == 3000
        sync.close()

    hosted = FakePDS()
    session = FakeSession(hosted.did, "https://morel.us-east.host.bsky.network")
    with App.open(tmp_path / "b.db", contract) as app:
        sync = engine(app, hosted, session=session)
        async with sync:
            seed(app, keys)
            held = await wait_status(sync, lambda s: s.state == "waiting" and s.pending < 3000, 60)
            assert held.waiting_reason == "rate_limited"
            assert held.pending == 3000 - 1600  # 8 batches of 200 creates: 4,800 of 5,000 points
            assert held.resumes_at is not None and held.resumes_at > time.time() + 3000
        assert sync.budget is not None and sync.budget.per_hour == 5000
        sync.close()


# --- one database, one repository -----------------------------------------------------------


async def test_another_account_is_refused_until_start_fresh(tmp_path: Path) -> None:
    first, second = FakePDS(), FakePDS(did="did:plc:secondsecondsecondsecond")
    signer = ATPSigner(store=MemorySessionStore())
    with App.open(tmp_path / "a.db", contract, signer=signer) as app:
        sync = engine(app, first, session=lambda: current)
        current: FakeSession | None = first.session()
        async with sync:
            seed(app, ["a", "b"])
            await idle(sync)
            with pytest.raises(SignerError, match="syncs with did:plc:fake"):
                sync.check_account(second.did)  # what ATPSigner.login() asks before adopting
            assert sync.check_account in signer.login_checks
            current = second.session()
            seed(app, ["c"])
            refused = await wait_status(sync, lambda s: s.waiting_reason == "wrong_account")
            assert refused.state == "error" and "did:plc:fake" in (refused.upload_error or "")
            assert second.count("applyWrites") == 0 and "c" not in remote_titles(first)
        sync.close()
        # A deliberate fresh start: everything local is new to the second repository.
        sync2 = engine(app, second, session=second.session())
        sync2.start_fresh()
        async with sync2:
            await idle(sync2)
        assert remote_titles(second) == local_titles(app)
        assert json.loads(sync2.outbox.get_state("engine") or "{}")["state"] == "stopped"
        sync2.close()


# --- decide(): the schedule as a pure function -----------------------------------------------


def q(first: float, last: float | None = None, pending: int = 1) -> Any:
    from atsync.sync._strategies import Queue

    return Queue(first, first if last is None else last, 0.0, pending)


def test_decide_orders_its_checks_as_the_policy_says() -> None:
    import math

    from atsync.sync import WaitReason
    from atsync.sync._decide import Facts, Fence, Push, Reconcile, Resync, Wait, decide

    notes = {"n": q(10.0)}
    debounce = Debounce(0.5)
    base = Facts(logged_in=True, queues=notes, default_strategy=debounce)
    assert decide(10.0, Facts(resync_due=True)) == Resync()  # before login, too
    assert decide(10.0, Facts(queues=notes)) == Wait(math.inf, WaitReason.NEEDS_AUTH)
    wrong = Facts(logged_in=True, wrong_account=True, queues=notes)
    assert decide(10.0, wrong) == Wait(math.inf, WaitReason.WRONG_ACCOUNT)
    assert decide(10.0, Facts(logged_in=True)) == Wait(math.inf)  # idle
    assert decide(10.0, base) == Wait(10.5, WaitReason.DEBOUNCE)
    assert decide(10.5, base) == Push(frozenset({"n"}))
    # push_now() pushes everything; a login pushes what a strategy would push at all.
    manual = Facts(logged_in=True, queues=notes, default_strategy=Manual())
    assert decide(10.0, manual) == Wait(math.inf, WaitReason.MANUAL)
    assert decide(10.0, Facts(**{**_fields(manual), "eager": True})) == Wait(
        math.inf, WaitReason.MANUAL
    )
    assert decide(10.0, Facts(**{**_fields(manual), "forced": True})) == Push()
    assert decide(10.0, Facts(**{**_fields(base), "eager": True})) == Push(frozenset({"n"}))
    # A failure: wait for its retry time whatever else is asked, then retry what it carried.
    failed = Facts(
        **{
            **_fields(base),
            "forced": True,
            "retry_at": 20.0,
            "retry_reason": WaitReason.OFFLINE,
            "retry_collections": frozenset({"n"}),
        }
    )
    assert decide(19.0, failed) == Wait(20.0, WaitReason.OFFLINE)
    assert decide(20.0, Facts(**{**_fields(failed), "forced": False})) == Push(frozenset({"n"}))
    # An unknown outcome is settled before anything is sent again; a fence when settled.
    unsettled = Facts(**{**_fields(base), "needs_reconcile": True})
    assert decide(10.0, unsettled) == Reconcile()
    assert decide(10.0, Facts(logged_in=True, fence_needed=True)) == Fence()
    # A refused session waits for a login, or its retry time.
    refused = Facts(**{**_fields(base), "auth_failed": True})
    assert decide(10.0, refused) == Wait(math.inf, WaitReason.NEEDS_AUTH)
    later = Facts(**{**_fields(refused), "retry_at": 70.0})
    assert decide(69.0, later) == Wait(70.0, WaitReason.NEEDS_AUTH)
    assert decide(70.0, later) == Push(None)


def _fields(facts: Any) -> dict[str, Any]:
    return {name: getattr(facts, name) for name in facts.__slots__}


# --- the state syncs ----------------------------------------------------------------------------


async def test_rows_from_before_sync_are_pushed_but_never_overwrite_the_repo(
    tmp_path: Path,
) -> None:
    """An app that adds sync later: its rows reach the PDS at the engine's first start —
    except where the repository already holds a different record under the same key, which
    is a recorded conflict, kept locally, never silently overwritten."""
    pds = FakePDS()
    theirs = {"$type": NOTES, "title": "written on another device"}
    from atsync.atproto import cid_for_record

    pds.records[(NOTES, "b")] = (str(cid_for_record(theirs)), theirs)
    with App.open(tmp_path / "a.db", contract) as app:
        seed(app, ["a", "b", "c"])  # no engine attached: nothing queued
        sync = engine(app, pds)
        assert sync.status.pending == 0
        assert sync.row_state("notes", "a") == "local"  # not compared yet
        async with sync:
            status = await wait_status(sync, lambda s: s.pending == 0 and s.state == "idle")
        assert status.conflicts == 1 and status.failed == 1
        assert [sync.row_state("notes", k) for k in "abc"] == ["synced", "conflict", "synced"]
        assert pds.values(NOTES)["b"] == theirs  # not overwritten
        assert remote_titles(pds)["a"] == "t a" and remote_titles(pds)["c"] == "t c"
        (dead,) = sync.outbox.dead_letters()
        assert (dead.rkey, dead.error) == ("b", "Conflict")
        held = app.model_db.execute("select rkey, resolution from _atsync_conflicts").fetchall()
        assert held == [("b", "held")]
        # A second start finds nothing new to queue (the held row is not sent again).
        async with sync:
            status = await idle(sync)
        assert status.failed == 1 and pds.values(NOTES)["b"] == theirs
        sync.close()


async def test_settled_bookkeeping_is_pruned_when_the_engine_is_idle(tmp_path: Path) -> None:
    pds = FakePDS()
    with App.open(tmp_path / "a.db", contract) as app:
        sync = engine(app, pds)
        async with sync:
            seed(app, [f"k{i}" for i in range(50)])
            await idle(sync)
            app.actions.put("k1", "again")
            await idle(sync)
            sent = app.model_db.execute("select count(*) from _atsync_sent").fetchone()[0]
            assert sent == 0  # every push answered: nothing can land late any more
        assert remote_titles(pds) == local_titles(app)
        sync.close()


async def test_the_status_counts_a_write_as_soon_as_its_action_returned(tmp_path: Path) -> None:
    with App.open(tmp_path / "app.db", contract) as app:
        sync = ATSync(app, bindings={"notes": Binding(NOTES)}, push=Manual(), pull=Manual())
        async with sync:
            for i in range(1, 4):  # no login: the engine only waits, and the count is right
                app.actions.put(f"n{i}", f"note {i}")
                assert sync.status.pending == i
        sync.close()

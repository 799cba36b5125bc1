"""The fault proxy itself, in front of the real PDS: each fault does what it says."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import pytest
import websockets.asyncio.client

from atsync._errors import PermanentError, RateLimitedError, TransientError, VerificationError
from atsync.atproto import (
    FirehoseFrame,
    FirehoseSubscription,
    IdentityResolver,
    verify_commit_event,
)
from atsync.atproto._session import Session, login
from atsync.atproto._xrpc import XrpcClient, outcome_unknown
from atsync.sync._live import stream_url
from fault_proxy import (
    Cut,
    Delay,
    DelayFrame,
    DropAfterForward,
    DropBeforeForward,
    DropFrame,
    DuplicateFrame,
    Error500,
    ErrorFrame,
    FaultProxy,
    Hold,
    HoldFrame,
    InjectFrame,
    RateLimited,
    ReorderFrame,
    ResetMidResponse,
    RewriteFrame,
    Truncate,
    corrupt_cbor,
    info_frame,
    proxied_session,
    replace_in_blocks,
    rewrite_body,
)

pytestmark = pytest.mark.anyio

PUT = "com.atproto.repo.putRecord"
DESCRIBE = "com.atproto.server.describeServer"
COLLECTION = "test.atsync.faultproxy"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def alice(dev_pds: Any) -> Session:
    account = dev_pds.accounts["alice.test"]
    return await login(account.did, account.password, dev_pds.pds_url)


async def exists(session: Session, rkey: str) -> bool:
    async with XrpcClient(session=session) as direct:
        page = await direct.list_records(session.did, COLLECTION, limit=100)
        return any(r.rkey == rkey for r in page.records)


async def test_passes_requests_unchanged_over_one_kept_alive_connection(dev_pds: Any) -> None:
    async with FaultProxy(dev_pds.pds_url) as proxy:
        async with XrpcClient(dev_pds.pds_url) as direct, XrpcClient(proxy.url) as via:
            expected = await direct.query(DESCRIBE)
            for _ in range(3):
                assert await via.query(DESCRIBE) == expected
        assert proxy.counts == {"pass": 3}
        assert [e.status for e in proxy.requests(DESCRIBE)] == [200, 200, 200]
        assert all(e.forwarded and e.upstream_status == 200 for e in proxy.events)


async def test_answers_500_and_429_without_forwarding(dev_pds: Any) -> None:
    async with FaultProxy(dev_pds.pds_url) as proxy:
        proxy.add(Error500(), nsid=DESCRIBE, nth=2)
        proxy.add(RateLimited(retry_after=3), nsid=DESCRIBE, nth=3)
        async with XrpcClient(proxy.url) as via:
            await via.query(DESCRIBE)
            with pytest.raises(TransientError) as failed:
                await via.query(DESCRIBE)
            assert failed.value.status == 500 and failed.value.error == "InternalServerError"
            before = time.time()
            with pytest.raises(RateLimitedError) as limited:
                await via.query(DESCRIBE)
            assert limited.value.reset_at is not None
            assert before + 2.9 <= limited.value.reset_at <= time.time() + 3.1
            await via.query(DESCRIBE)  # the 4th passes again
        assert proxy.counts == {"pass": 2, "error_500": 1, "rate_limited": 1}
        assert [e.forwarded for e in proxy.events] == [True, False, False, True]


async def test_rules_match_by_path_prefix_and_predicate(dev_pds: Any) -> None:
    async with FaultProxy(dev_pds.pds_url) as proxy:
        by_path = proxy.add(Error500(), path="/xrpc/_health")
        by_body = proxy.add(Error500(), when=lambda r: r.method == "GET" and "x=1" in r.target)
        async with httpx.AsyncClient(base_url=proxy.url) as http:
            assert (await http.get("/xrpc/_health")).status_code == 500
            assert (await http.get(f"/xrpc/{DESCRIBE}", params={"x": 1})).status_code == 500
            assert (await http.get(f"/xrpc/{DESCRIBE}")).status_code == 200
        assert by_path.fired == 1 and by_body.fired == 1
        assert proxy.counts == {"error_500": 2, "pass": 1}


async def test_rate_limit_reset_header_is_epoch_seconds(dev_pds: Any) -> None:
    async with FaultProxy(dev_pds.pds_url) as proxy:
        proxy.add(RateLimited(retry_after=None, reset_in=5), nsid=DESCRIBE)
        async with XrpcClient(proxy.url) as via:
            with pytest.raises(RateLimitedError) as limited:
                await via.query(DESCRIBE)
        assert limited.value.reset_at is not None
        assert time.time() + 4 <= limited.value.reset_at <= time.time() + 6.1


async def test_drop_after_forward_applies_the_write_and_never_answers(dev_pds: Any) -> None:
    session = await alice(dev_pds)
    async with FaultProxy(dev_pds.pds_url) as proxy:
        proxy.add(DropAfterForward(), nsid=PUT, nth=1)
        proxy.add(DropBeforeForward(), nsid=PUT, nth=2)
        async with XrpcClient(session=proxied_session(session, proxy.url)) as via:
            with pytest.raises(TransientError) as dropped:
                await via.put_record(session.did, COLLECTION, "after", {"$type": COLLECTION})
            assert dropped.value.status is None and outcome_unknown(dropped.value)
            with pytest.raises(TransientError):
                await via.put_record(session.did, COLLECTION, "before", {"$type": COLLECTION})
        assert proxy.counts == {"drop_after_forward": 1, "drop_before_forward": 1}
        assert proxy.events[0].upstream_status == 200 and proxy.events[0].status is None
        assert not proxy.events[1].forwarded
    assert await exists(session, "after")
    assert not await exists(session, "before")


@pytest.mark.parametrize(
    "fault",
    [Truncate(), Truncate(keep=0.3, fix_length=True), ResetMidResponse()],
    ids=["truncate", "truncate-fixed-length", "reset"],
)
async def test_broken_responses_are_errors_whose_outcome_is_unknown(
    dev_pds: Any, fault: Any
) -> None:
    session = await alice(dev_pds)
    rkey = f"broken-{fault.name}-{getattr(fault, 'fix_length', False)}"
    async with FaultProxy(dev_pds.pds_url) as proxy:
        proxy.add(fault, nsid=PUT)
        async with XrpcClient(session=proxied_session(session, proxy.url)) as via:
            with pytest.raises(TransientError) as broken:
                await via.put_record(session.did, COLLECTION, rkey, {"$type": COLLECTION})
        assert outcome_unknown(broken.value)
        assert proxy.counts[fault.name] == 1
    assert await exists(session, rkey)  # the PDS applied it


async def test_delay_before_forwarding_outlasts_a_client_timeout(dev_pds: Any) -> None:
    async with FaultProxy(dev_pds.pds_url) as proxy:
        proxy.add(Delay(1.0), nsid=DESCRIBE, nth=1)
        proxy.add(Delay(0.3, after_forward=True), nsid=DESCRIBE, nth=2)
        async with XrpcClient(proxy.url, timeout=0.3) as via:
            start = time.monotonic()
            with pytest.raises(TransientError, match="timed out"):
                await via.query(DESCRIBE)
            assert time.monotonic() - start < 0.9
            with anyio.fail_after(5):
                # The proxy forwards the late request anyway, as a slow network would.
                await proxy.wait_until(lambda p: p.events[0].upstream_status == 200)
        async with XrpcClient(proxy.url, timeout=2) as patient:
            start = time.monotonic()
            await patient.query(DESCRIBE)
            assert time.monotonic() - start >= 0.3
        assert proxy.counts == {"delay": 2}


async def test_hold_keeps_a_request_in_flight_until_released(dev_pds: Any) -> None:
    async with FaultProxy(dev_pds.pds_url) as proxy:
        hold = Hold()
        proxy.add(hold, nsid=DESCRIBE)
        async with XrpcClient(proxy.url) as via, anyio.create_task_group() as tg:
            answers: list[Any] = []

            async def call() -> None:
                answers.append(await via.query(DESCRIBE))

            tg.start_soon(call)
            with anyio.fail_after(5):
                await hold.reached.wait()
            assert answers == [] and proxy.events[0].upstream_status == 200
            hold.release()
        assert len(answers) == 1


async def test_probability_rules_replay_with_the_same_seed(dev_pds: Any) -> None:
    fired: list[list[str]] = []
    for _ in range(2):
        async with FaultProxy(dev_pds.pds_url, seed=42) as proxy:
            rule = proxy.add(Error500(), nsid=DESCRIBE, probability=0.5, times=4)
            async with XrpcClient(proxy.url) as via:
                for _ in range(12):
                    try:
                        await via.query(DESCRIBE)
                    except TransientError:
                        pass
            fired.append([e.fault for e in proxy.events])
            assert rule.fired == proxy.counts["error_500"] <= 4
            assert rule.matched == 12
    assert fired[0] == fired[1]
    assert 1 <= fired[0].count("error_500") <= 4


# --- the event stream (WebSocket) relay ---------------------------------------------------------

STREAM = "com.atproto.sync.subscribeRepos"


async def a_cursor(dev_pds: Any, session: Session, prefix: str) -> int:
    """A stream position just before what the test writes next: the seq of a marker commit,
    read on a direct subscription (written again if the subscription was not listening yet)."""
    async with FirehoseSubscription(stream_url(dev_pds.pds_url)) as live:
        for attempt in range(5):
            rkey = f"{prefix}-mark{attempt}"
            async with XrpcClient(session=session) as direct:
                await direct.put_record(session.did, COLLECTION, rkey, {"$type": COLLECTION})
            with anyio.move_on_after(3):
                async for frame in live:
                    ops = frame.body.get("ops") or []
                    if any(op.get("path") == f"{COLLECTION}/{rkey}" for op in ops):
                        assert frame.seq is not None
                        return frame.seq
    raise AssertionError("the PDS never sent the marker's #commit")


async def write(session: Session, *rkeys: str, title: str = "a note") -> None:
    async with XrpcClient(session=session) as direct:
        for rkey in rkeys:
            record = {"$type": COLLECTION, "title": title}
            await direct.put_record(session.did, COLLECTION, rkey, record)


async def commits_of(sub: FirehoseSubscription, prefix: str, count: int) -> list[FirehoseFrame]:
    """The next ``count`` #commit frames about records whose key starts with ``prefix``."""
    seen: list[FirehoseFrame] = []
    with anyio.fail_after(15):
        async for frame in sub:
            ops = frame.body.get("ops") or []
            if frame.type == "#commit" and any(
                op.get("path", "").startswith(f"{COLLECTION}/{prefix}") for op in ops
            ):
                seen.append(frame)
                if len(seen) == count:
                    break
    return seen


def rkey_of(frame: FirehoseFrame) -> str:
    return str(frame.body["ops"][0]["path"]).rsplit("/", 1)[1]


def via(proxy: FaultProxy, cursor: int | None = None) -> str:
    return stream_url(proxy.url) + (f"?cursor={cursor}" if cursor is not None else "")


async def test_relays_an_event_stream_byte_for_byte(dev_pds: Any) -> None:
    session = await alice(dev_pds)
    cursor = await a_cursor(dev_pds, session, "ws-pass")
    await write(session, "ws-pass-1", "ws-pass-2", "ws-pass-3")
    url = f"ws://127.0.0.1:{dev_pds.port}/xrpc/{STREAM}?cursor={cursor}"
    async with FaultProxy(dev_pds.pds_url) as proxy:
        async with (
            websockets.asyncio.client.connect(url, compression=None, proxy=None) as direct,
            websockets.asyncio.client.connect(
                via(proxy, cursor), compression=None, proxy=None
            ) as relayed,
        ):
            with anyio.fail_after(10):
                for _ in range(3):
                    assert await relayed.recv() == await direct.recv()
        (stream,) = proxy.streams
        assert stream.status == 101 and stream.cursor == cursor
        assert [f.fault for f in stream.frames[:3]] == ["pass"] * 3
        assert all(f.forwarded for f in stream.frames[:3])
        (upgrade,) = proxy.requests(STREAM)
        assert upgrade.forwarded and upgrade.status == 101 and proxy.counts == {"pass": 1}
        with anyio.fail_after(5):
            await proxy.wait_until(lambda p: p.streams[0].closed_at is not None)
        assert stream.ended == "client closed" and stream.upstream_closed


async def test_cut_closes_both_sides_and_a_cursor_resumes(dev_pds: Any) -> None:
    session = await alice(dev_pds)
    cursor = await a_cursor(dev_pds, session, "ws-cut")
    await write(session, "ws-cut-1", "ws-cut-2", "ws-cut-3")
    async with FaultProxy(dev_pds.pds_url) as proxy:
        rule = proxy.add_frame(Cut(), type="#commit", path=f"{COLLECTION}/ws-cut-", nth=2)
        async with FirehoseSubscription(via(proxy, cursor)) as sub:
            (first,) = await commits_of(sub, "ws-cut-", 1)
            with pytest.raises(TransientError, match="closed"), anyio.fail_after(10):
                await commits_of(sub, "ws-cut-", 1)
        assert rkey_of(first) == "ws-cut-1" and rule.fired == 1
        stream = proxy.streams[0]
        assert stream.ended == "cut" and stream.closed_at is not None
        assert stream.upstream_closed  # the PDS's side too
        cut = next(f for f in stream.frames if f.fault == "cut")
        assert not cut.forwarded and cut.seq is not None
        # Resuming from the last frame received replays the one that was cut.
        async with FirehoseSubscription(via(proxy, first.seq)) as again:
            rest = await commits_of(again, "ws-cut-", 2)
        assert [rkey_of(f) for f in rest] == ["ws-cut-2", "ws-cut-3"]
        assert rest[0].seq == cut.seq
        assert proxy.frame_counts["cut"] == 1 and len(proxy.streams) == 2


async def test_cut_with_a_close_frame_and_after_forwarding(dev_pds: Any) -> None:
    session = await alice(dev_pds)
    cursor = await a_cursor(dev_pds, session, "ws-cutclose")
    await write(session, "ws-cutclose-1", "ws-cutclose-2")
    async with FaultProxy(dev_pds.pds_url) as proxy:
        proxy.add_frame(Cut(forward=True, close=True, code=1012), path=f"{COLLECTION}/ws-cutc")
        async with FirehoseSubscription(via(proxy, cursor)) as sub:
            (first,) = await commits_of(sub, "ws-cutclose-", 1)
            with pytest.raises(TransientError, match="code 1012"), anyio.fail_after(10):
                await commits_of(sub, "ws-cutclose-", 1)
        assert rkey_of(first) == "ws-cutclose-1"
        assert proxy.streams[0].ended == "cut"


async def test_dropped_delayed_and_held_frames(dev_pds: Any) -> None:
    session = await alice(dev_pds)
    cursor = await a_cursor(dev_pds, session, "ws-gap")
    keys = [f"ws-gap-{i}" for i in range(1, 6)]
    await write(session, *keys)
    path = f"{COLLECTION}/ws-gap-"
    async with FaultProxy(dev_pds.pds_url) as proxy:
        proxy.add_frame(DropFrame(), type="#commit", path=path, nth=2)
        proxy.add_frame(DelayFrame(0.6), type="#commit", path=path, nth=3)
        hold = HoldFrame()
        proxy.add_frame(hold, type="#commit", path=path, nth=5)
        async with FirehoseSubscription(via(proxy, cursor)) as sub:
            start = time.monotonic()
            got = await commits_of(sub, "ws-gap-", 2)
            assert time.monotonic() - start >= 0.6  # the 3rd waited, and so did the ones behind
            got += await commits_of(sub, "ws-gap-", 1)
            with anyio.fail_after(10):
                await hold.reached.wait()
            with anyio.move_on_after(0.3):
                await commits_of(sub, "ws-gap-", 1)
                raise AssertionError("a held frame was relayed")
            hold.release()
            got += await commits_of(sub, "ws-gap-", 1)
        assert [rkey_of(f) for f in got] == ["ws-gap-1", "ws-gap-3", "ws-gap-4", "ws-gap-5"]
        seqs = [f.seq or 0 for f in got]
        assert seqs == sorted(seqs)  # order kept
        dropped = [f for f in proxy.frames("#commit") if f.fault == "drop"]
        assert len(dropped) == 1 and not dropped[0].forwarded
        assert proxy.frame_counts["delay"] == 1 and proxy.frame_counts["hold"] == 1


async def test_rewritten_frames_are_malformed_or_fail_verification(dev_pds: Any) -> None:
    session = await alice(dev_pds)
    cursor = await a_cursor(dev_pds, session, "ws-bad")
    await write(session, "ws-bad-1", title="the original title")
    await write(session, "ws-bad-2", title="the original title")
    async with FaultProxy(dev_pds.pds_url) as proxy:
        proxy.add_frame(RewriteFrame(corrupt_cbor), path=f"{COLLECTION}/ws-bad-1")
        tamper = replace_in_blocks(b"the original title", b"a tampered title!!")
        proxy.add_frame(RewriteFrame(tamper), path=f"{COLLECTION}/ws-bad-2")
        async with FirehoseSubscription(via(proxy, cursor)) as sub:
            with pytest.raises(VerificationError, match="malformed firehose frame"):
                await commits_of(sub, "ws-bad-", 1)
            (tampered,) = await commits_of(sub, "ws-bad-", 1)  # it decodes...
        assert rkey_of(tampered) == "ws-bad-2"
        assert b"a tampered title!!" in tampered.body["blocks"]
        async with IdentityResolver(plc_url=dev_pds.plc_url, allow_insecure_localhost=True) as r:
            signing_key = (await r.resolve(session.did)).signing_key
        with pytest.raises(VerificationError):  # ...but its record block is not its CID's
            verify_commit_event(tampered, signing_key, did=session.did)
        assert proxy.frame_counts["rewrite"] == 2


async def test_injected_info_and_error_frames(dev_pds: Any) -> None:
    session = await alice(dev_pds)
    cursor = await a_cursor(dev_pds, session, "ws-inject")
    await write(session, "ws-inject-1", "ws-inject-2")
    path = f"{COLLECTION}/ws-inject-"
    async with FaultProxy(dev_pds.pds_url) as proxy:
        proxy.add_frame(InjectFrame(info_frame("OutdatedCursor", "injected")), path=path, nth=1)
        proxy.add_frame(ErrorFrame("FutureCursor", "injected"), path=path, nth=2)
        frames: list[FirehoseFrame] = []
        async with FirehoseSubscription(via(proxy, cursor)) as sub:
            with pytest.raises(PermanentError) as refused, anyio.fail_after(10):
                async for frame in sub:
                    frames.append(frame)
        assert refused.value.error == "FutureCursor"
        info = next(i for i, f in enumerate(frames) if f.type == "#info")
        assert frames[info].body == {"name": "OutdatedCursor", "message": "injected"}
        assert rkey_of(frames[info + 1]) == "ws-inject-1"
        assert not any(f.type == "#commit" and rkey_of(f) == "ws-inject-2" for f in frames)
        with anyio.fail_after(5):
            await proxy.wait_until(lambda p: p.streams[0].closed_at is not None)
        assert proxy.streams[0].ended == "error frame"


async def test_the_pds_own_error_frame_and_a_refused_handshake(dev_pds: Any) -> None:
    async with FaultProxy(dev_pds.pds_url) as proxy:
        # A cursor from the future: the PDS itself answers with an error frame and closes.
        async with FirehoseSubscription(via(proxy, 10**12)) as sub:
            with pytest.raises(PermanentError) as future, anyio.fail_after(10):
                await sub.next_frame()
        assert future.value.error == "FutureCursor"
        assert proxy.frames()[0].type == "error" and proxy.frames()[0].forwarded
        # The handshake refused by an HTTP rule: nothing reaches the PDS.
        proxy.add(Error500(), nsid=STREAM, nth=1)
        with pytest.raises(TransientError) as refused:
            async with FirehoseSubscription(via(proxy)):
                pass
        assert refused.value.status == 500
        assert [e.fault for e in proxy.requests(STREAM)] == ["pass", "error_500"]
        assert len(proxy.streams) == 1


async def test_http_requests_still_pass_while_a_stream_is_relayed(dev_pds: Any) -> None:
    async with FaultProxy(dev_pds.pds_url) as proxy:
        async with FirehoseSubscription(via(proxy)), XrpcClient(proxy.url) as http:
            assert (await http.query(DESCRIBE))["did"]
            with anyio.fail_after(5):
                await proxy.wait_until(lambda p: bool(p.streams) and p.streams[0].open)
        assert [e.nsid for e in proxy.events] == [STREAM, DESCRIBE]
        assert proxy.events[1].status == 200


async def test_duplicated_reordered_and_forged_frames(dev_pds: Any) -> None:
    session = await alice(dev_pds)
    cursor = await a_cursor(dev_pds, session, "ws-order")
    await write(session, "ws-order-1", "ws-order-2", "ws-order-3", "ws-order-4")
    path = f"{COLLECTION}/ws-order-"
    async with FaultProxy(dev_pds.pds_url) as proxy:
        proxy.add_frame(DuplicateFrame(), path=path, nth=1)
        proxy.add_frame(ReorderFrame(), path=path, nth=2)
        forged = rewrite_body(lambda body: {**body, "since": "forged"})
        proxy.add_frame(RewriteFrame(forged), path=path, nth=4)
        async with FirehoseSubscription(via(proxy, cursor)) as sub:
            got = await commits_of(sub, "ws-order-", 5)
        assert [rkey_of(f) for f in got] == [
            "ws-order-1",
            "ws-order-1",
            "ws-order-3",
            "ws-order-2",
            "ws-order-4",
        ]
        assert got[0].seq == got[1].seq and got[4].body["since"] == "forged"
        assert got[3].body["since"] != "forged"
        assert proxy.frame_counts["duplicate"] == proxy.frame_counts["reorder"] == 1

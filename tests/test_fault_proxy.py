"""The fault proxy itself, in front of the real PDS: each fault does what it says."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import pytest

from atsync._errors import RateLimitedError, TransientError
from atsync.atproto._session import Session, login
from atsync.atproto._xrpc import XrpcClient, outcome_unknown
from fault_proxy import (
    Delay,
    DropAfterForward,
    DropBeforeForward,
    Error500,
    FaultProxy,
    Hold,
    RateLimited,
    ResetMidResponse,
    Truncate,
    proxied_session,
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

"""Push throughput on a local reference PDS: atsync vs two hand-written baselines.

    .venv/bin/python benchmarks/push.py [--n 5000] [--sdk-n 1000]

Same PDS, same run, each in its own collection:

(a) a loop of ``createRecord`` with the ``atproto`` SDK (one request per record; measured on
    ``--sdk-n`` records, as its rate does not change with n);
(b) ``applyWrites`` batches of 200 creates with plain httpx (the floor for batching);
(c) atsync: ``n`` actions done offline, then the engine pushes them (timed from
    ``push_now()`` to an empty queue). The rate budget is off: a local PDS has no such
    limit, and the hosted budget would pace 5,000 creates over three hours.

Targets (issue #4): atsync >= 8x (a) and >= 0.8x (b) in records/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from atsync.app import App, ATPSigner, Contract
from atsync.atproto import DevPDS, MemorySessionStore
from atsync.sync import ATSync, Binding, Manual, RateBudget

TARGET_SDK, TARGET_RAW = 8.0, 0.8
PASSWORD = "bench-pw-1"

contract = Contract(models={"posts": {"id": "primary", "text": "string", "n": "integer"}})


@contract.action
def post(ctx, n):  # type: ignore[no-untyped-def]
    ctx.db.set("posts", {"id": ctx.tid(), "text": f"post number {n}", "n": n})


def record(collection: str, n: int) -> dict[str, Any]:
    return {"$type": collection, "text": f"post number {n}", "n": n}


def sdk_loop(pds: DevPDS, did: str, n: int, collection: str) -> float:
    from atproto import Client  # the Python AT Protocol SDK

    client = Client(base_url=pds.pds_url)
    client.login(did, PASSWORD, fetch_bsky_profile=False)  # no AppView behind a local PDS
    start = time.perf_counter()
    for i in range(n):
        client.com.atproto.repo.create_record(
            {"repo": did, "collection": collection, "record": record(collection, i)}
        )
    return n / (time.perf_counter() - start)


def raw_batches(pds: DevPDS, did: str, n: int, collection: str) -> float:
    with httpx.Client(base_url=pds.pds_url, timeout=60) as http:
        token = http.post(
            "/xrpc/com.atproto.server.createSession",
            json={"identifier": did, "password": PASSWORD},
        ).json()["accessJwt"]
        headers = {"Authorization": f"Bearer {token}"}
        start = time.perf_counter()
        for first in range(0, n, 200):
            writes = [
                {
                    "$type": "com.atproto.repo.applyWrites#create",
                    "collection": collection,
                    "value": record(collection, i),
                }
                for i in range(first, min(n, first + 200))
            ]
            answer = http.post(
                "/xrpc/com.atproto.repo.applyWrites",
                json={"repo": did, "writes": writes},
                headers=headers,
            )
            answer.raise_for_status()
        return n / (time.perf_counter() - start)


def atsync_push(pds: DevPDS, did: str, n: int, collection: str, tmp: Path) -> float:
    signer = ATPSigner(store=MemorySessionStore())
    with App.open(tmp / f"{collection}.db", contract, signer=signer) as app:
        sync = ATSync(
            app, bindings={"posts": Binding(collection)}, push=Manual(), budget=RateBudget.off()
        )
        with app.batch():
            for i in range(n):
                app.actions.post(i)
        signer.login(did, PASSWORD, pds.pds_url)
        rate = n / timed_push(sync)
        sync.close()
        return rate


def timed_push(sync: ATSync) -> float:
    """Seconds from ``push_now()`` to an empty queue, every write landed."""

    async def push() -> float:
        async with sync:
            start = time.perf_counter()
            sync.push_now()
            status = await sync.wait_for_idle()
            elapsed = time.perf_counter() - start
        assert (status.pending, status.failed) == (0, 0), status
        return elapsed

    return anyio.run(push)


def count_records(pds: DevPDS, did: str, collection: str) -> int:
    total, cursor = 0, None
    with httpx.Client(base_url=pds.pds_url, timeout=60) as http:
        while True:
            params: dict[str, Any] = {"repo": did, "collection": collection, "limit": 100}
            if cursor:
                params["cursor"] = cursor
            page = http.get("/xrpc/com.atproto.repo.listRecords", params=params).json()
            total += len(page["records"])
            cursor = page.get("cursor")
            if not cursor or not page["records"]:
                return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--sdk-n", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, DevPDS(accounts=[("bench.test", PASSWORD)]) as pds:
        did = pds.accounts["bench.test"].did
        rates = {
            "sdk": sdk_loop(pds, did, args.sdk_n, "bench.sdk.post"),
            "raw": raw_batches(pds, did, args.n, "bench.raw.post"),
            "atsync": atsync_push(pds, did, args.n, "bench.atsync.post", Path(tmp)),
        }
        counts = {
            name: count_records(pds, did, f"bench.{name}.post") for name in ("sdk", "raw", "atsync")
        }
    assert counts == {"sdk": args.sdk_n, "raw": args.n, "atsync": args.n}, counts
    vs_sdk, vs_raw = rates["atsync"] / rates["sdk"], rates["atsync"] / rates["raw"]
    ok_sdk, ok_raw = vs_sdk >= TARGET_SDK, vs_raw >= TARGET_RAW
    print(f"local reference PDS, {args.n:,} creates ({args.sdk_n:,} for the SDK loop)")
    print(f"  (a) atproto SDK, createRecord loop : {rates['sdk']:>8,.0f} records/s")
    print(f"  (b) httpx, applyWrites x200        : {rates['raw']:>8,.0f} records/s")
    print(f"  (c) atsync push                    : {rates['atsync']:>8,.0f} records/s")
    print(
        f"  atsync / (a) = {vs_sdk:.1f}x (target >= {TARGET_SDK}x)  {'PASS' if ok_sdk else 'FAIL'}"
    )
    print(
        f"  atsync / (b) = {vs_raw:.2f}x (target >= {TARGET_RAW}x)  {'PASS' if ok_raw else 'FAIL'}"
    )
    print(f"  every record landed exactly once: {counts}")
    return 0 if ok_sdk and ok_raw else 1


if __name__ == "__main__":
    sys.exit(main())

"""Pushing records with images on a local reference PDS: atsync vs a hand-written httpx loop.

    .venv/bin/python benchmarks/blobs.py [--n 200] [--size 100000] [--rounds 3]

Same PDS, same run, each in its own collection, each record with its own image (``--size``
bytes of random data, so no two blobs are alike):

(a) httpx: ``uploadBlob`` for each image, one after the other, then the records in
    ``applyWrites`` batches of 200, each holding the blob reference the upload returned;
(b) atsync: ``n`` actions done offline, each putting its image in the blob store and a row
    referencing it; then the engine pushes them (timed from ``push_now()`` to an empty
    queue: the uploads, the checks, the records).

The median of ``--rounds`` rounds (fresh collections and fresh images each round). Target
(issue #11): atsync >= 0.8x (a) in records/s. Every record must land exactly once, with
its blob on the PDS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from push import timed_push  # the same timing as the push benchmark's

from atsync.app import App, ATPSigner, Contract
from atsync.atproto import DevPDS, MemorySessionStore
from atsync.sync import ATSync, Binding, Manual, RateBudget

TARGET = 0.8
PASSWORD = "bench-pw-1"

contract = Contract(models={"photos": {"id": "primary", "title": "string", "image": "blob"}})


@contract.action
def photo(ctx, n, data):  # type: ignore[no-untyped-def]
    ref = ctx.db.blobs.put(bytes.fromhex(data), "image/jpeg")
    ctx.db.set("photos", {"id": f"p{n}", "title": f"photo {n}", "image": ref})


def images(n: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def raw_loop(pds: DevPDS, did: str, blobs: list[bytes], collection: str) -> float:
    with httpx.Client(base_url=pds.pds_url, timeout=60) as http:
        token = http.post(
            "/xrpc/com.atproto.server.createSession",
            json={"identifier": did, "password": PASSWORD},
        ).json()["accessJwt"]
        auth = {"Authorization": f"Bearer {token}"}
        start = time.perf_counter()
        refs = []
        for data in blobs:
            answer = http.post(
                "/xrpc/com.atproto.repo.uploadBlob",
                content=data,
                headers={**auth, "Content-Type": "image/jpeg"},
            )
            answer.raise_for_status()
            refs.append(answer.json()["blob"])
        for first in range(0, len(refs), 200):
            writes = [
                {
                    "$type": "com.atproto.repo.applyWrites#create",
                    "collection": collection,
                    "rkey": f"p{i}",
                    "value": {"$type": collection, "title": f"photo {i}", "image": refs[i]},
                }
                for i in range(first, min(len(refs), first + 200))
            ]
            answer = http.post(
                "/xrpc/com.atproto.repo.applyWrites",
                json={"repo": did, "writes": writes},
                headers=auth,
            )
            answer.raise_for_status()
        return len(blobs) / (time.perf_counter() - start)


def atsync_push(pds: DevPDS, did: str, blobs: list[bytes], collection: str, tmp: Path) -> float:
    signer = ATPSigner(store=MemorySessionStore())
    with App.open(tmp / f"{collection}.db", contract, signer=signer) as app:
        sync = ATSync(
            app, bindings={"photos": Binding(collection)}, push=Manual(), pull=Manual(),
            budget=RateBudget.off(),
        )  # fmt: skip
        with app.batch():
            for i, data in enumerate(blobs):
                app.actions.photo(i, data.hex())
        signer.login(did, PASSWORD, pds.pds_url)
        rate = len(blobs) / timed_push(sync)
        sync.close()
        return rate


def landed(pds: DevPDS, did: str, collection: str) -> tuple[int, set[str]]:
    """How many records the collection holds, and the blob CIDs they reference."""
    total, cursor = 0, None
    cids: set[str] = set()
    with httpx.Client(base_url=pds.pds_url, timeout=60) as http:
        while True:
            params: dict[str, Any] = {"repo": did, "collection": collection, "limit": 100}
            if cursor:
                params["cursor"] = cursor
            page = http.get("/xrpc/com.atproto.repo.listRecords", params=params).json()
            total += len(page["records"])
            cids.update(r["value"]["image"]["ref"]["$link"] for r in page["records"])
            cursor = page.get("cursor")
            if not cursor or not page["records"]:
                return total, cids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"raw": [], "atsync": []}
    with tempfile.TemporaryDirectory() as tmp, DevPDS(accounts=[("bench.test", PASSWORD)]) as pds:
        did = pds.accounts["bench.test"].did
        for r in range(args.rounds):
            for name in ("raw", "atsync"):
                collection = f"bench.{name}.photo{r}"
                blobs = images(args.n, args.size)
                if name == "raw":
                    rate = raw_loop(pds, did, blobs, collection)
                else:
                    rate = atsync_push(pds, did, blobs, collection, Path(tmp))
                rates[name].append(rate)
                count, cids = landed(pds, did, collection)
                assert count == args.n, (name, count)
                assert len(cids) == args.n, (name, len(cids))
    raw, ours = statistics.median(rates["raw"]), statistics.median(rates["atsync"])
    ratio = ours / raw
    print(
        f"local reference PDS, {args.n} records with a {args.size:,}-byte image each, "
        f"median of {args.rounds} rounds"
    )
    print(f"  (a) httpx, uploadBlob each + applyWrites x200 : {raw:>6,.0f} records/s")
    print(f"  (b) atsync push                              : {ours:>6,.0f} records/s")
    ok = ratio >= TARGET
    print(f"  atsync / (a) = {ratio:.2f}x (target >= {TARGET}x)  {'PASS' if ok else 'FAIL'}")
    print(f"  every record landed exactly once, each with its own blob ({args.rounds} rounds)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""An in-process fake of the PDS's repo endpoints, as an httpx transport, for fast engine tests.

It answers what the push half calls — ``applyWrites`` (atomic, ``swapCommit``, the reference
PDS's 500 for create-on-existing and update/delete-of-missing), ``getLatestCommit`` and
``getRecord`` — from a dict of records whose CIDs are computed like the real PDS's, so the
engine's "already applied?" checks work against it. The real XrpcClient runs on top of it
(``client_options={"transport": fake.transport}``), so error classification is the real one.

Faults are functions of the request that return a response, raise an ``httpx`` error (no
answer), or return None to let the request through; each is used once unless ``sticky``.
The real-PDS tests in test_push_reliability.py check the same paths end to end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from atsync.atproto import CID, Tid, cid_for_record, data_from_json

FAKE_URL = "https://fake-pds.test"
Fault = Callable[[httpx.Request], "httpx.Response | None"]


def xrpc_error(status: int, error: str, message: str = "", **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": error, "message": message}, headers=headers)


@dataclass
class FakeSession:
    """What the engine needs of a session, without a server behind it."""

    did: str = "did:plc:fakefakefakefakefakefake"
    pds_url: str = FAKE_URL

    async def access_token(self, client: Any) -> str:
        return "fake-access-token"

    async def refresh(self, client: Any = None, *, stale_access: str | None) -> str:
        return "fake-access-token"


@dataclass
class FakePDS:
    did: str = "did:plc:fakefakefakefakefakefake"
    records: dict[tuple[str, str], tuple[str, dict[str, Any]]] = field(default_factory=dict)
    commits: int = 0
    faults: list[tuple[Fault, bool]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)  # NSIDs, in order
    # applyWrites' rate limit, as the reference PDS applies it: points (create 3, update 2,
    # delete 1) left in the window that ends at ``reset_at``; None: no limit, no headers.
    points_left: int | None = None
    reset_at: float = 0.0

    def __post_init__(self) -> None:
        self.commit_cid = self._commit_cid()
        self.transport = httpx.MockTransport(self.handle)

    def session(self) -> FakeSession:
        return FakeSession(self.did)

    def fault(self, fault: Fault, *, sticky: bool = False) -> None:
        self.faults.append((fault, sticky))

    def count(self, nsid_suffix: str) -> int:
        return sum(1 for nsid in self.calls if nsid.endswith(nsid_suffix))

    def values(self, collection: str) -> dict[str, dict[str, Any]]:
        return {rkey: value for (c, rkey), (_, value) in self.records.items() if c == collection}

    # -- the endpoints --------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        nsid = request.url.path.rsplit("/", 1)[-1]
        self.calls.append(nsid)
        for entry in list(self.faults):
            fault, sticky = entry
            try:
                answer = fault(request)  # may raise an httpx error: no answer at all
            except Exception:
                if not sticky:
                    self.faults.remove(entry)
                raise
            if answer is not None:
                if not sticky:
                    self.faults.remove(entry)
                return answer
        if nsid == "com.atproto.repo.applyWrites":
            return self._apply_writes(json.loads(request.content))
        if nsid == "com.atproto.sync.getLatestCommit":
            return httpx.Response(200, json={"cid": self.commit_cid, "rev": self._rev()})
        if nsid == "com.atproto.repo.getRecord":
            key = (request.url.params["collection"], request.url.params["rkey"])
            if key not in self.records:
                return xrpc_error(400, "RecordNotFound", f"Could not locate record: {key}")
            cid, value = self.records[key]
            uri = f"at://{self.did}/{key[0]}/{key[1]}"
            return httpx.Response(200, json={"uri": uri, "cid": cid, "value": value})
        return xrpc_error(501, "MethodNotImplemented", nsid)

    def _apply_writes(self, body: dict[str, Any]) -> httpx.Response:
        swap = body.get("swapCommit")
        if swap is not None and swap != self.commit_cid:
            return xrpc_error(400, "InvalidSwap", f"Commit was at {self.commit_cid}")
        writes = body["writes"]
        for w in writes:
            kind = w["$type"].rsplit("#", 1)[-1]
            exists = (w["collection"], w["rkey"]) in self.records
            if (kind == "create") == exists:
                return xrpc_error(500, "InternalServerError", "Internal Server Error")
            if kind != "delete" and w["value"].get("$type") != w["collection"]:
                return xrpc_error(400, "InvalidRecord", "Invalid $type")
        cost = sum(
            {"create": 3, "update": 2, "delete": 1}[w["$type"].rsplit("#", 1)[-1]] for w in writes
        )
        if self.points_left is not None and cost > self.points_left:
            return xrpc_error(
                429, "RateLimitExceeded", "Rate Limit Exceeded", **self._limit_headers()
            )
        if self.points_left is not None:
            self.points_left -= cost
        results = []
        for w in writes:
            kind = w["$type"].rsplit("#", 1)[-1]
            key = (w["collection"], w["rkey"])
            if kind == "delete":
                del self.records[key]
                results.append({"$type": "com.atproto.repo.applyWrites#deleteResult"})
                continue
            cid = str(cid_for_record(data_from_json(w["value"])))
            self.records[key] = (cid, w["value"])
            results.append(
                {
                    "$type": f"com.atproto.repo.applyWrites#{kind}Result",
                    "uri": f"at://{self.did}/{key[0]}/{key[1]}",
                    "cid": cid,
                }
            )
        self.commits += 1
        self.commit_cid = self._commit_cid()
        out = {"commit": {"cid": self.commit_cid, "rev": self._rev()}, "results": results}
        return httpx.Response(200, json=out, headers=self._limit_headers())

    def _limit_headers(self) -> dict[str, str]:
        if self.points_left is None:
            return {}
        return {
            "ratelimit-limit": "5000",
            "ratelimit-remaining": str(self.points_left),
            "ratelimit-reset": str(int(self.reset_at)),
            "ratelimit-policy": "5000;w=3600",
        }

    def _commit_cid(self) -> str:
        return str(CID.for_data(f"commit {self.commits}".encode()))

    def _rev(self) -> str:
        return str(Tid(1_700_000_000_000_000 + self.commits, 0))

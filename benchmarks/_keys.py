"""Filling a benchmark's repositories under fresh TIDs, robustly.

The reference PDS refuses a record key that its slur filter matches
(``InvalidRequest: Unacceptable slur in record key``). About one random TID in a million does
(counted against the PDS's own check); a fill of 50,000 records met one. Such a batch is
written again under new keys: what a benchmark measures does not depend on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from atsync import PermanentError
from atsync.atproto import Create, TidClock, XrpcClient

__all__ = ["create_all"]


async def create_all(
    client: XrpcClient, did: str, collection: str, records: Sequence[dict[str, Any]],
    clock: TidClock,
) -> list[str]:  # fmt: skip
    """One ``applyWrites`` of ``records`` as creates under new TIDs; returns their keys."""
    while True:
        writes = [Create(collection, value, rkey=clock.next()) for value in records]
        try:
            await client.apply_writes(did, writes)
        except PermanentError as exc:
            if "slur in record key" not in str(exc):
                raise
            continue
        return [w.rkey for w in writes if w.rkey is not None]

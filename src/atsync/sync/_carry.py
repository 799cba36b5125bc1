"""Nothing of a record is lost in a round trip: fields the binding does not map are kept.

A record pulled from the repository may hold fields this app's binding does not map —
written by a newer version of the app, or by another app under the same Lexicon. The row
keeps only what the binding maps; when the row is edited here and pushed back, those fields
are carried over from the record as last synced (``_atsync_records.record``), unchanged.
Done just before sending, on the few writes whose base has such fields; the queued row is
rewritten with the full record and its CID, so the "already applied?" checks compare the
right CIDs. A write that, carried over, equals what the PDS holds is not sent at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace

from .._json import compact_json
from ..atproto import cid_for_record, data_from_json
from ._outbox import Outbox, PendingWrite

__all__ = ["carry_unmapped"]


def carry_unmapped(
    outbox: Outbox,
    batch: Sequence[PendingWrite],
    mapped: Mapping[str, frozenset[str]],
) -> tuple[list[PendingWrite], list[PendingWrite]]:
    """(the batch to send, writes that turned out to be on the PDS already)."""
    puts = [w for w in batch if w.op != "delete" and w.collection in mapped and w.record]
    if not puts:
        return list(batch), []
    bases = outbox.base_records([(w.collection, w.rkey) for w in puts])
    if not bases:
        return list(batch), []
    send: list[PendingWrite] = []
    settled: list[PendingWrite] = []
    for w in batch:
        base = bases.get((w.collection, w.rkey)) if w in puts else None
        if base is None:
            send.append(w)
            continue
        base_cid, base_json = base
        try:
            known = json.loads(base_json)
            mine = json.loads(w.record or "{}")
        except ValueError:
            send.append(w)  # an unreadable base: send ours as it is
            continue
        fields = mapped[w.collection]
        extra = {k: v for k, v in known.items() if k not in fields and k not in mine}
        if not extra:
            send.append(w)
            continue
        full = {**mine, **extra}
        record_json = compact_json(full)
        cid = str(cid_for_record(data_from_json(full)))
        if not outbox.replace_record(w, record_json, cid):
            continue  # changed meanwhile: the next batch carries the newer state
        carried = replace(w, record=record_json, cid=cid)
        (settled if cid == base_cid else send).append(carried)
    return send, settled

"""The sync engine: the app's bound models <-> records in the user's repository, both ways.

from atsync.sync import ATSync, Binding, Debounce

sync = ATSync(app, bindings={"notes": Binding("com.example.note")}, push=Debounce(0.5))
async with sync:
    ...
"""

from ._apply import RemoteRecord
from ._backoff import Backoff
from ._binding import Binding, Transform
from ._blobsync import referenced_blobs
from ._blocking import SyncThread
from ._budget import RateBudget
from ._capture import ActionCall, RecordWrite
from ._engine import ATSync
from ._follows import FollowedRepo, Origin, followed_repositories
from ._merge import ConflictPolicy
from ._outbox import DeadLetter, Outbox, PendingWrite, QueuedWrite
from ._status import RowState, State, SyncStatus, WaitReason
from ._strategies import (
    Batch,
    Debounce,
    Immediate,
    Interval,
    Live,
    Manual,
    OnStart,
    Poll,
    PullStrategy,
    Strategy,
)

__all__ = [
    "ATSync",
    "ActionCall",
    "Backoff",
    "Batch",
    "Binding",
    "ConflictPolicy",
    "DeadLetter",
    "Debounce",
    "FollowedRepo",
    "Immediate",
    "Interval",
    "Live",
    "Manual",
    "OnStart",
    "Origin",
    "Outbox",
    "PendingWrite",
    "Poll",
    "PullStrategy",
    "QueuedWrite",
    "RateBudget",
    "RecordWrite",
    "RemoteRecord",
    "RowState",
    "State",
    "Strategy",
    "SyncStatus",
    "SyncThread",
    "Transform",
    "WaitReason",
    "followed_repositories",
    "referenced_blobs",
]

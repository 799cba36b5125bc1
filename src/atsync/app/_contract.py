"""Contracts: an app's models plus the actions that are the only way to change them."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, overload

from .._errors import ActionError
from ..atproto import Tid, format_tid, is_valid_nsid
from ..db import Upgrade, parse_schema

if TYPE_CHECKING:
    from ..db import ModelDB, Schema

__all__ = ["ActionContext", "ActionFunction", "ActionResult", "Contract"]

ActionFunction = Callable[..., Any]
F = TypeVar("F", bound=ActionFunction)
_ACTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class ActionContext:
    """What an action sees: ``db`` (writable, inside the action's transaction), ``did`` (the
    author), ``id`` (the action id, a TID from the app's hybrid logical clock),
    ``timestamp`` (milliseconds since the epoch, from that clock) and ``tid()``.

    ``tid()`` derives record keys from the action id, so replaying the action log
    reproduces the same keys.
    """

    __slots__ = ("_clock_id", "db", "did", "id", "tids_used", "timestamp", "timestamp_us")

    def __init__(
        self,
        db: ModelDB,
        did: str,
        timestamp_us: int,
        clock_id: int,
        action_id: str | None = None,
    ) -> None:
        self.db = db
        self.did = did
        # ``action_id``: the TID of (timestamp_us, clock_id), when the caller has it already.
        self.id = format_tid(timestamp_us, clock_id) if action_id is None else action_id
        self.timestamp_us = timestamp_us
        self.timestamp = timestamp_us // 1000
        self._clock_id = clock_id
        self.tids_used = 0  # how many tid() handed out (the app's clock skips past them)

    def tid(self) -> str:
        """A fresh TID, unique on this device and the same when the log is replayed."""
        self.tids_used += 1
        return str(Tid(self.timestamp_us + self.tids_used, self._clock_id))


class ActionResult(NamedTuple):
    """What calling an action returns: its log ``id`` and the function's ``result``."""

    id: str
    # typing.Any, not Any: NamedTuple's generated __new__ has no module globals to resolve a
    # bare name in, and pdoc (make docs) reads its annotations.
    result: typing.Any = None


@dataclass
class Contract:
    """Models (ModelDB schema language) and actions, registered with ``@contract.action``.

    ``nsid`` names the app in atproto (e.g. ``"com.example.notes"``); its records, such as
    the session-key authorization, live under it. ``version`` and ``upgrade`` describe
    schema changes between releases of the app.
    """

    models: Mapping[str, Mapping[str, Any]]
    nsid: str | None = None  # the app's own NSID: the home of its records (e.g. sessions)
    version: int = 1
    upgrade: Upgrade | None = None
    actions: dict[str, ActionFunction] = field(default_factory=dict)
    schema: Schema = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.schema = parse_schema(self.models)
        if self.nsid is not None and not is_valid_nsid(self.nsid):
            raise ActionError(f"Contract(nsid={self.nsid!r}) is not a valid NSID")
        for name, fn in list(self.actions.items()):
            self._check(name, fn)

    @overload
    def action(self, fn: F, /) -> F: ...
    @overload
    def action(self, fn: None = None, /, *, name: str | None = None) -> Callable[[F], F]: ...

    def action(self, fn: ActionFunction | None = None, /, *, name: str | None = None) -> Any:
        """Register ``fn(ctx, *args, **kwargs)`` as an action (under ``name`` or its own)."""

        def register(f: ActionFunction) -> ActionFunction:
            action_name = name or f.__name__
            self._check(action_name, f)
            if action_name in self.actions and self.actions[action_name] is not f:
                raise ActionError(f"an action named {action_name!r} is already registered")
            self.actions[action_name] = f
            return f

        return register(fn) if fn is not None else register

    @staticmethod
    def _check(name: str, fn: ActionFunction) -> None:
        if not isinstance(name, str) or not _ACTION_NAME.match(name):
            raise ActionError(f"action name {name!r} must be a Python identifier")
        if not callable(fn):
            raise ActionError(f"action {name!r} is not callable")
        if inspect.iscoroutinefunction(fn):
            raise ActionError(
                f"action {name!r} is async; actions run inside one database transaction "
                "and must be plain functions"
            )
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            return
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.VAR_POSITIONAL,
        ):
            raise ActionError(f"action {name!r} must take the context as its first parameter")

"""Property: three devices of one account, random edits and random sync interleavings, end
identical to each other and to the repository (issue 9, item 12).

Each example drives three devices — each its own ``App`` database and ``ATSync`` with
``push=Manual()`` and ``pull=Manual()`` — against the shared reference PDS, on an account
of this module's own (so that pulls read a small repository), in a collection of its own. A
step is

- a local action on one device — a create or overwrite, an edit of one field, a delete — on
  a key space of three records, so that devices edit the same records concurrently;
- a sync move of one device: push, pull, or both in either order;
- a push or pull with a local action done while its request is in flight (when the PDS's
  answer to ``applyWrites`` or ``getRepo`` arrives, before the engine reads it);
- a stop or start of a device's engine (leaving and re-entering ``async with sync``; every
  start pulls), or a detach (the engine stopped and ``close()``d, so writes made meanwhile
  are found by the comparison at the next start).

After every pull, each record the device has no local edit queued for must be what the PDS
holds; after every push (nothing left queued), every record must be. The example ends with a
full sync — every device pushes, then every device pulls, until nothing is queued anywhere —
and then:

- every device's ``notes`` table is the same, and equal to the records on the PDS;
- no dead letters, no rejected records, nothing queued, no error logged by the engine;
- a record only one device ever wrote holds that device's last local state (no lost write).

The same property runs with ``conflicts="remote"``, with a callable (which also checks the
rows it is given), and with ``pull=Live()`` (the devices also apply each other's commits
from the event stream, in the background, between the steps). Sequences that failed are
kept at the end as plain regression tests. ``ATSYNC_PROPERTY_EXAMPLES=300`` (and
``--timeout=0``) makes a longer hunt.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from atsync.app import ActionContext, App, Contract
from atsync.atproto import IdentityResolver, Session, XrpcClient, login
from atsync.sync import ATSync, Binding, Live, Manual, PullStrategy

contract = Contract(
    models={"notes": {"id": "primary", "title": "string", "body": "string?", "n": "integer"}}
)


@contract.action
def put(ctx: ActionContext, key: str, title: str, body: str | None, n: int) -> None:
    ctx.db.set("notes", {"id": key, "title": title, "body": body, "n": n})


@contract.action
def edit(ctx: ActionContext, key: str, name: str, value: Any) -> None:
    ctx.db.update("notes", {"id": key, name: value})


@contract.action
def drop(ctx: ActionContext, key: str) -> None:
    ctx.db.delete("notes", key)


DEVICES = 3
KEYS = ("ka", "kb", "kc")
TITLES = ("t0", "t1", "t2")
BODIES = (None, "b0", "b1")
NUMBERS = (0, 1, 2)
VALUES: dict[str, tuple[Any, ...]] = {"title": TITLES, "body": BODIES, "n": NUMBERS}
STEP_TIMEOUT = 30.0  # seconds for one push or pull of a handful of records
PASSWORD = "prop-pw-1"
# Dead letters the properties let pass while a known bug (with its regression test below) is
# open, so that they can go on looking for others; their records are left out of the checks.
# Empty: "Conflict" was here for bug 1 until 0ab11f1 fixed it.
TOLERATED_DEAD_LETTERS: frozenset[str] = frozenset()

Row = dict[str, Any]
Step = tuple[Any, ...]

# -- the steps --------------------------------------------------------------------------------

device_ = st.integers(0, DEVICES - 1)
key_ = st.sampled_from(KEYS)
puts = st.tuples(
    st.just("put"), device_, key_, st.sampled_from(TITLES), st.sampled_from(BODIES),
    st.sampled_from(NUMBERS),
)  # fmt: skip
edits = st.sampled_from(sorted(VALUES)).flatmap(
    lambda name: st.tuples(
        st.just("edit"), device_, key_, st.just(name), st.sampled_from(VALUES[name])
    )
)
drops = st.tuples(st.just("drop"), device_, key_)
locals_ = st.one_of(puts, edits, drops)
syncs = st.tuples(st.sampled_from(("push", "pull", "push+pull", "pull+push")), device_)
engine_moves = st.tuples(st.sampled_from(("stop", "start", "detach")), device_)
# A push or pull of the local action's device, with that action done while the request is in
# flight: when the PDS's answer to applyWrites (push) or getRepo (pull) arrives, before the
# engine reads it.
in_flight = st.tuples(st.sampled_from(("push~", "pull~")), locals_)
steps = st.lists(st.one_of(locals_, syncs, syncs, engine_moves, in_flight), min_size=1, max_size=24)

# The suite runs 25 examples of the first property and 12 of each other one (~1 min).
EXAMPLES = int(os.environ.get("ATSYNC_PROPERTY_EXAMPLES", "25"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# -- an account of its own, so that pulls read a small repository -----------------------------


@dataclass(frozen=True)
class Account:
    pds_url: str
    plc_url: str
    did: str
    handle: str


_accounts: dict[str, Account] = {}


def account_on(dev_pds: Any) -> Account:
    """A fresh account on the shared PDS for this module (created once per PDS)."""
    if dev_pds.pds_url not in _accounts:
        handle = f"p{secrets.token_hex(4)}.test"
        body = {"handle": handle, "password": PASSWORD, "email": f"{handle}@example.invalid"}
        answer = httpx.post(
            f"{dev_pds.pds_url}/xrpc/com.atproto.server.createAccount", json=body, timeout=30
        )
        answer.raise_for_status()
        _accounts[dev_pds.pds_url] = Account(
            dev_pds.pds_url, dev_pds.plc_url, answer.json()["did"], handle
        )
    return _accounts[dev_pds.pds_url]


def fresh_collection(tag: str) -> str:
    return f"test.atsync.prop.{tag}{secrets.token_hex(6)}"


# -- internal errors of the engine are failures ------------------------------------------------


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(self.format(record))


@contextmanager
def engine_errors() -> Iterator[list[str]]:
    handler = _Errors()
    logger = logging.getLogger("atsync")
    logger.addHandler(handler)
    try:
        yield handler.seen
    finally:
        logger.removeHandler(handler)


# -- a device ------------------------------------------------------------------------------


@dataclass
class Device:
    """One device of the account: its own database; its engine runs in a task of its own
    (so that engines can be stopped in any order)."""

    name: str
    app: App
    make_sync: Callable[[App, Any], ATSync]
    remote: Callable[[], Awaitable[dict[str, Row]]]
    sync: ATSync | None = None
    running: bool = False
    _scope: anyio.CancelScope | None = None
    _done: anyio.Event | None = None
    # (an XRPC method, what to do when its answer arrives): once, then disarmed.
    armed: tuple[str, Callable[[], None]] | None = None
    tolerate: frozenset[str] = frozenset()  # dead letters let pass (known bugs)

    async def on_response(self, response: httpx.Response) -> None:
        """An httpx response hook of the engine's XRPC client."""
        armed = self.armed
        if armed is not None and response.request.url.path.endswith(armed[0]):
            self.armed = None
            armed[1]()

    def rows(self) -> dict[str, Row]:
        return {r["id"]: dict(r) for r in self.app.db.query("notes")}

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        if self.running:
            return
        if self.sync is None:
            self.sync = self.make_sync(self.app, {"event_hooks": {"response": [self.on_response]}})
        sync, scope, done, started = self.sync, anyio.CancelScope(), anyio.Event(), anyio.Event()

        async def run() -> None:
            try:
                with scope:
                    async with sync:
                        started.set()
                        await anyio.sleep_forever()
            finally:
                done.set()
                started.set()

        self._scope, self._done = scope, done
        tg.start_soon(run)
        await started.wait()
        self.running = True
        # The engine pulls at every start (a new session): let it, so that the order of
        # what happens does not depend on timing.
        await self.pull()

    async def stop(self) -> None:
        if not self.running:
            return
        assert self._scope is not None and self._done is not None
        self._scope.cancel()
        await self._done.wait()
        self.running = False

    async def detach(self) -> None:
        await self.stop()
        if self.sync is not None:
            self.sync.close()
            self.sync = None

    async def push(self) -> None:
        if not self.running:
            return
        sync = self.sync
        assert sync is not None
        if self.pending() == 0:
            # Nothing to push. (push_now() now would leave the request standing until the
            # engine's next turn, and a write made before that turn would be pushed by it,
            # behind the test's back.)
            return
        sync.push_now()
        with self._bounded("push"):
            await sync.wait_for_idle()
        # Everything went out, on top of a head this device had included (its swapCommit
        # held, or the InvalidSwap was settled by a pull): it holds what the PDS holds.
        await self.check_against_pds("a push", set())

    async def pull(self) -> None:
        if not self.running:
            return
        sync = self.sync
        assert sync is not None
        with self._bounded("pull"):
            await sync.wait_pulled()
        # The local state includes the repository's head: every record with no local edit
        # queued is what the PDS holds (nobody writes while we look).
        queued = {k for (k,) in self.app.model_db.execute("SELECT key FROM _atsync_outbox")}
        await self.check_against_pds("a pull", queued)

    async def check_against_pds(self, after: str, queued: set[str]) -> None:
        remote = await self.remote()
        mine = self.rows()
        for key in set(KEYS) - queued - self.held():
            assert mine.get(key) == remote.get(key), (
                f"{self.name} after {after}: {key} is {mine.get(key)}, the PDS has "
                f"{remote.get(key)}"
            )

    @contextmanager
    def _bounded(self, what: str) -> Iterator[None]:
        try:
            with anyio.fail_after(STEP_TIMEOUT):
                yield
        except TimeoutError:
            status = self.sync.status if self.sync is not None else None
            raise AssertionError(f"{self.name}: {what} did not finish: {status}") from None

    def pending(self) -> int:
        return int(self.app.model_db.execute("SELECT count(*) FROM _atsync_outbox").fetchone()[0])

    def held(self) -> set[str]:
        """Keys whose write is in the dead letters with a tolerated error: the known bugs
        leave such a row apart from the PDS, so the checks leave it out."""
        db = self.app.model_db
        errors = sorted(self.tolerate)
        marks = ", ".join("?" * len(errors))
        return {k for (k,) in db.execute(
            f"SELECT key FROM _atsync_dead_letters WHERE error IN ({marks})", errors
        )}  # fmt: skip

    def sync_counts(self) -> tuple[list[str], int]:
        """(the dead letters' errors, how many rejected records)."""
        db = self.app.model_db
        dead = [e for (e,) in db.execute("SELECT error FROM _atsync_dead_letters")]
        rejected = db.execute("SELECT count(*) FROM _atsync_rejected").fetchone()[0]
        return dead, int(rejected)


# -- one example --------------------------------------------------------------------------------


async def remote_rows(session: Session, collection: str) -> dict[str, Row]:
    async with XrpcClient(session=session) as client:
        return {
            v.rkey: {
                "id": v.rkey,
                "title": v.value["title"],
                "body": v.value.get("body"),
                "n": v.value["n"],
            }
            async for v in client.iter_records(session.did, collection)
        }


def do_local(step: Step, devices: list[Device], writers: dict[str, set[int]],
             last: dict[str, Row | None]) -> None:  # fmt: skip
    """A local action on one device (an edit or delete of a row it does not hold: nothing)."""
    kind, d, key = step[0], devices[step[1]], step[2]
    exists = key in d.rows()
    if kind == "put":
        d.app.actions.put(key, *step[3:])
    elif kind == "edit" and exists:
        d.app.actions.edit(key, step[3], step[4])
    elif kind == "drop" and exists:
        d.app.actions.drop(key)
    else:
        return
    writers.setdefault(key, set()).add(step[1])
    last[key] = d.rows().get(key)


IN_FLIGHT = {"push~": "com.atproto.repo.applyWrites", "pull~": "com.atproto.sync.getRepo"}


async def do_step(step: Step, devices: list[Device], tg: anyio.abc.TaskGroup,
                  writers: dict[str, set[int]], last: dict[str, Row | None]) -> None:  # fmt: skip
    kind = step[0]
    if kind in ("put", "edit", "drop"):
        do_local(step, devices, writers, last)
        return
    if kind in IN_FLIGHT:
        action = step[1]
        d = devices[action[1]]
        d.armed = (IN_FLIGHT[kind], lambda: do_local(action, devices, writers, last))
        try:
            await (d.push() if kind == "push~" else d.pull())
        finally:
            if d.armed is not None:  # no such request was made: the action comes after
                d.armed = None
                do_local(action, devices, writers, last)
        return
    d = devices[step[1]]
    if kind == "push":
        await d.push()
    elif kind == "pull":
        await d.pull()
    elif kind == "push+pull":
        await d.push()
        await d.pull()
    elif kind == "pull+push":
        await d.pull()
        await d.push()
    elif kind == "stop":
        await d.stop()
    elif kind == "start":
        await d.start(tg)
    elif kind == "detach":
        await d.detach()


async def full_sync(devices: list[Device], tg: anyio.abc.TaskGroup, rounds: int = 6) -> int:
    """Every device pushes, then every device pulls, until nothing is queued anywhere."""
    for d in devices:
        await d.start(tg)
    for n in range(1, rounds + 1):
        for d in devices:
            await d.push()
        for d in devices:
            await d.pull()
        if all(d.pending() == 0 for d in devices):
            return n
    raise AssertionError(
        f"no fixed point after {rounds} full rounds: pending "
        f"{[d.pending() for d in devices]}, rows {[d.rows() for d in devices]}"
    )


async def run_example(
    pds: Account,
    steps_: list[Step],
    conflicts: Any,
    tag: str,
    tolerate: frozenset[str],
    pull: Callable[[], PullStrategy],
) -> tuple[list[Device], dict[str, Row], dict[str, set[int]], dict[str, Row | None]]:
    session = await login(pds.did, PASSWORD, pds.pds_url)
    collection = fresh_collection(tag)
    writers: dict[str, set[int]] = {}
    last: dict[str, Row | None] = {}
    async with IdentityResolver(plc_url=pds.plc_url, allow_insecure_localhost=True) as resolver:

        def make_sync(app: App, client_options: Any) -> ATSync:
            return ATSync(
                app,
                bindings={"notes": Binding(collection)},
                session=session,
                push=Manual(),
                pull=pull(),
                identity=resolver,
                conflicts=conflicts,
                client_options=client_options,
            )

        with tempfile.TemporaryDirectory(prefix="atsync-prop-") as tmp:
            apps = [App.open(Path(tmp) / f"d{i}.db", contract) for i in range(DEVICES)]
            devices = [
                Device(
                    f"device {i}",
                    app,
                    make_sync,
                    lambda: remote_rows(session, collection),
                    tolerate=tolerate,
                )
                for i, app in enumerate(apps)
            ]
            try:
                async with anyio.create_task_group() as tg:
                    for d in devices:
                        await d.start(tg)
                    for step in steps_:
                        await do_step(step, devices, tg, writers, last)
                    await full_sync(devices, tg)
                    remote = await remote_rows(session, collection)
                    snapshot = [(d.rows(), d.pending(), d.sync_counts(), d.held()) for d in devices]
                    for d in devices:
                        await d.detach()
                # Pulled changes are in each device's action log: a rebuild gives it back.
                for d, app in zip(devices, apps, strict=True):
                    before = d.rows()
                    app.rebuild()
                    assert d.rows() == before, f"{d.name}: a rebuild from its log differs"
            finally:
                for app in apps:
                    app.close()
    for d, (rows, pending, (dead, rejected), held) in zip(devices, snapshot, strict=True):
        dead = [e for e in dead if e not in tolerate]
        rows = {k: v for k, v in rows.items() if k not in held}
        expected = {k: v for k, v in remote.items() if k not in held}
        assert (dead, rejected) == ([], 0), f"{d.name}: dead letters {dead}, rejected {rejected}"
        assert pending == 0, f"{d.name}: {pending} writes still queued"
        assert rows == expected, f"{d.name} differs from the PDS:\n{rows}\n{expected}"
    return devices, remote, writers, last


def check_example(
    pds: Account,
    steps_: list[Step],
    conflicts: Any,
    tag: str,
    tolerate: frozenset[str] = TOLERATED_DEAD_LETTERS,
    pull: Callable[[], PullStrategy] = Manual,
) -> dict[str, Row]:
    """Run one example and check the property; returns the records on the PDS."""
    with engine_errors() as errors:
        _, remote, writers, last = anyio.run(
            run_example, pds, steps_, conflicts, tag, tolerate, pull, backend="asyncio"
        )
    assert not errors, f"the engine logged errors: {errors}"
    for key, who in writers.items():
        if len(who) == 1:
            # Written by one device only: its last local state is what everyone holds.
            assert remote.get(key) == last[key], f"{key}: {remote.get(key)} != {last[key]}"
    return remote


# -- the properties ---------------------------------------------------------------------------


@pytest.mark.pds
@SETTINGS
@given(steps_=steps)
def test_devices_converge_with_the_repository(dev_pds: Any, steps_: list[Step]) -> None:
    check_example(account_on(dev_pds), steps_, "local", "local")


@pytest.mark.pds
@settings(SETTINGS, max_examples=max(1, EXAMPLES // 2))
@given(steps_=steps)
def test_devices_converge_with_the_remote_policy(dev_pds: Any, steps_: list[Step]) -> None:
    check_example(account_on(dev_pds), steps_, "remote", "remote")


class FieldwiseMax:
    """A conflict policy as an app would write one: field by field against the base, the
    larger value where both sides changed, an edit beats a delete. It also records any row it
    is given that is not a row of the model."""

    def __init__(self) -> None:
        self.odd: list[tuple[Any, Any, Any]] = []

    def __call__(self, base: Row | None, local: Row | None, remote: Row | None) -> Row | None:
        for row in (base, local, remote):
            if row is not None and not (
                isinstance(row, dict)
                and row.get("id") in KEYS
                and row.get("title") in TITLES
                and row.get("body") in BODIES
                and row.get("n") in NUMBERS
            ):
                self.odd.append((base, local, remote))
        if local is None or remote is None:
            return local if local is not None else remote
        merged = {"id": local["id"]}
        for name in VALUES:
            mine, theirs = local.get(name), remote.get(name)
            was = base.get(name) if base is not None else None
            if mine == theirs or theirs == was:
                merged[name] = mine
            elif mine == was:
                merged[name] = theirs
            else:
                merged[name] = max((mine, theirs), key=lambda v: (v is not None, v or 0))
        return merged


@pytest.mark.pds
@settings(SETTINGS, max_examples=max(1, EXAMPLES // 2))
@given(steps_=steps)
def test_devices_converge_with_a_callable_policy(dev_pds: Any, steps_: list[Step]) -> None:
    policy = FieldwiseMax()
    check_example(account_on(dev_pds), steps_, policy, "callable")
    assert not policy.odd, f"the policy was given rows that are not rows: {policy.odd}"


@pytest.mark.pds
@settings(SETTINGS, max_examples=max(1, EXAMPLES // 2))
@given(steps_=steps)
def test_devices_converge_with_live_pulls(dev_pds: Any, steps_: list[Step]) -> None:
    """The same with ``pull=Live()``: the devices also apply each other's commits from the
    event stream, in the background, between the steps."""
    check_example(account_on(dev_pds), steps_, "local", "live", pull=Live)


# -- regression tests: minimal sequences the properties found ---------------------------------


def regression(dev_pds: Any, steps_: list[Step], conflicts: Any = "local") -> dict[str, Row]:
    """One fixed sequence, checked as the properties check it, nothing tolerated."""
    return check_example(account_on(dev_pds), steps_, conflicts, "regression", frozenset())


# The sequences below were found by the properties (shrunk by Hypothesis, then by hand) on
# 6d08735, where they failed; 0ab11f1 (an InvalidSwap on pulled collections is settled by a
# pull that merges) fixed all three. Kept as plain regression tests.
#
# Bug 1: a record created concurrently on two devices (the same key, never synced by the
# second) is not merged when the second device pushes first: its push meets InvalidSwap, the
# reconcile finds a record it never synced and moves its create to the dead letters
# ("Conflict", resolution "held", "merging the two is the pull side's job"); the next pull
# then finds nothing queued for that record and overwrites the local row with the remote one.
# The local version survives only in the dead letter, which stays (status.failed = 1), and an
# `atsync retry` would later push that stale version over whatever the devices agreed on.
@pytest.mark.pds
def test_regression_a_record_created_on_two_devices_is_merged(dev_pds: Any) -> None:
    remote = regression(
        dev_pds,
        [("put", 0, "ka", "t0", None, 0), ("put", 1, "ka", "t0", None, 1)],
    )
    assert remote["ka"]["n"] == 1  # conflicts="local": device 1 merged last and pushed


# Bug 1 again, worse: the held row can stay on its device for good. Device 1 creates ka and
# pushes; device 0 creates ka too (never having pulled it) and device 1 then deletes it. In
# the full sync device 0 pushes first: InvalidSwap, its create is held in the dead letters
# (and _atsync_records never learns of ka); device 1's delete lands; device 0's pull then
# finds ka neither in the repository nor in what it synced, so nothing happens — device 0
# keeps a row that no other device and not the PDS has, with nothing queued.
@pytest.mark.pds
def test_regression_a_held_create_does_not_leave_its_device_apart(dev_pds: Any) -> None:
    regression(
        dev_pds,
        [
            ("put", 1, "ka", "t0", None, 0),
            ("push", 1),
            ("put", 0, "ka", "t0", None, 1),
            ("drop", 1, "ka"),
        ],
    )


# Gap 2 (issue 9, item 7: merge "on pull or on InvalidSwap"): a device that pushes an edit
# without having pulled another device's edit of other fields of the same record overwrites
# them. Its push meets InvalidSwap; Pusher.reconcile records a conflict and rebases the
# whole queued row on the remote CID (the local state wins, as docs/sync.md says "for now"),
# so the field the other device changed is lost although nobody else changed it.
@pytest.mark.pds
def test_regression_edits_of_different_fields_merge_when_pushed_without_a_pull(
    dev_pds: Any,
) -> None:
    remote = regression(
        dev_pds,
        [
            ("put", 0, "ka", "t0", None, 0),
            ("push", 0),
            ("pull", 1),
            ("edit", 0, "ka", "title", "t1"),
            ("edit", 1, "ka", "body", "b1"),
            ("push", 0),
            ("push", 1),
        ],
    )
    assert remote["ka"] == {"id": "ka", "title": "t1", "body": "b1", "n": 0}


# Found by CI in a fresh clone (hypothesis): two devices create ka and kb with each other's
# values; device 1's merged push then swaps the two records' contents in one commit, and the
# reference PDS (0.5.x) deletes the blocks that commit replaces although it adds them back:
# both records vanish from the PDS, which then serves a repository with missing blocks. The
# pusher now sends such a write in the next commit.
@pytest.mark.pds
def test_regression_two_records_swapping_contents_do_not_vanish(dev_pds: Any) -> None:
    remote = regression(
        dev_pds,
        [
            ("put", 0, "ka", "t0", None, 1),
            ("put", 0, "kb", "t0", None, 0),
            ("put", 1, "ka", "t0", None, 0),
            ("put", 1, "kb", "t0", None, 1),
        ],
    )
    assert (remote["ka"]["n"], remote["kb"]["n"]) == (0, 1)  # device 1 merged last, local wins

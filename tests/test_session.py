"""Sessions against the real reference PDS: login, persistence, resume, logout, refresh with
token rotation (persist before use, single flight), and revoked sessions (docs/sessions.md).

Expired access tokens are real: they are minted exactly as the PDS mints them (HS256 over
``{scope, aud, sub, iat, exp}`` with the ``PDS_JWT_SECRET`` the dev PDS was started with,
see ``@atproto/pds/dist/account-manager/helpers/auth.js``), with ``exp`` in the past, so the
PDS itself answers ``ExpiredToken``. The refresh that follows is the PDS's own.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import platformdirs
import pytest

from atsync._blocking import Portal
from atsync._errors import AuthError
from atsync.atproto._blocking_client import (
    BlockingXrpcClient,
    blocking_login,
    blocking_logout,
)
from atsync.atproto._devpds import DevPDS
from atsync.atproto._session import (
    FileSessionStore,
    MemorySessionStore,
    Session,
    SessionStore,
    jwt_expiry,
    login,
)
from atsync.atproto._syntax import TidClock
from atsync.atproto._xrpc import XrpcClient
from pds_fixtures import ACCOUNTS

pytestmark = [pytest.mark.pds, pytest.mark.anyio]

COLL = "com.example.atsync.sessionTest"
CLOCK = TidClock()
HANDLE, PASSWORD = ACCOUNTS[0]
REFRESH = "com.atproto.server.refreshSession"
CREATE = "com.atproto.repo.createRecord"
FIELDS = {"did", "handle", "pds_url", "access_jwt", "refresh_jwt"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def note(text: str) -> dict[str, Any]:
    return {"$type": COLL, "text": text}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_access(pds: DevPDS, real_access: str, *, exp: float) -> str:
    """An access JWT for the same account and audience as ``real_access``, signed with the
    PDS's secret, expiring at ``exp``."""
    state = json.loads((pds.directory / "atsync-devpds.json").read_text())  # type: ignore[operator]
    secret = state["jwt_secret"].encode()
    payload_b64 = real_access.split(".")[1]
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    payload.update(exp=int(exp), iat=int(exp) - 7200)
    header = {"typ": "at+jwt", "alg": "HS256"}
    signing_input = (
        f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(payload).encode())}"
    )
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(sig)}"


class Recorder:
    """httpx request hook: which XRPC methods were called with which bearer token, and
    whether each authenticated call used the token that the store held at that moment."""

    def __init__(self, store: SessionStore | None = None, key: str | None = None) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.store, self.key = store, key
        self.unpersisted: list[str] = []

    async def __call__(self, request: httpx.Request) -> None:
        nsid = request.url.path.removeprefix("/xrpc/")
        auth = request.headers.get("authorization")
        token = auth.removeprefix("Bearer ") if auth else None
        self.calls.append((nsid, token))
        if self.store is not None and self.key is not None and token and nsid != REFRESH:
            stored = self.store.load(self.key)
            if stored is None or stored["access_jwt"] != token:
                self.unpersisted.append(nsid)

    def count(self, nsid: str) -> int:
        return sum(1 for n, _ in self.calls if n == nsid)

    @property
    def nsids(self) -> list[str]:
        return [n for n, _ in self.calls]


def skewed(seconds: float) -> Callable[[], float]:
    # A local clock running behind the server's: the client believes the token is still
    # valid, so only the server's ExpiredToken reveals the expiry.
    return lambda: time.time() - seconds


async def expired_session(
    pds: DevPDS, store: SessionStore, *, clock: Callable[[], float] = time.time
) -> tuple[Session, str]:
    """A real login whose access token is then replaced by a minted, expired one (stored)."""
    fresh = await login(HANDLE, PASSWORD, pds.pds_url, store=store)
    expired = mint_access(pds, fresh.data.access_jwt, exp=time.time() - 600)
    session = Session(dataclasses.replace(fresh.data, access_jwt=expired), store=store, clock=clock)
    await session.save()
    return session, expired


# --- login, store, resume, logout -------------------------------------------------------------


async def test_login_stores_five_fields_privately(dev_pds: DevPDS, tmp_path: Path) -> None:
    store = FileSessionStore(tmp_path / "sessions")
    session = await login(HANDLE, PASSWORD, dev_pds.pds_url, store=store)
    assert session.did == dev_pds.accounts[HANDLE].did and session.handle == HANDLE
    assert session.pds_url == dev_pds.pds_url and session.key == session.did
    path = store.path_for(session.did)
    assert path.parent == store.directory and ":" not in path.name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    text = path.read_text()
    assert set(json.loads(text)) == FIELDS and PASSWORD not in text
    assert os.listdir(store.directory) == [path.name]  # no temp files left behind
    exp = session.data.access_expires_at
    assert exp is not None and 3600 < exp - time.time() <= 7200 + 60  # ~2 h access token
    assert "eyJ" not in repr(session) + repr(session.data)  # tokens stay out of reprs


async def test_wrong_password_is_an_auth_error(dev_pds: DevPDS) -> None:
    store = MemorySessionStore()
    with pytest.raises(AuthError) as exc:
        await login(HANDLE, "not-the-password", dev_pds.pds_url, store=store)
    assert exc.value.status == 401 and "Invalid identifier or password" in str(exc.value)
    assert store.load(dev_pds.accounts[HANDLE].did) is None


async def test_resume_from_disk_without_logging_in(dev_pds: DevPDS, tmp_path: Path) -> None:
    first = await login(HANDLE, PASSWORD, dev_pds.pds_url, store=FileSessionStore(tmp_path))
    # "Next start": a new store object, a new session, a new client; no password anywhere.
    store = FileSessionStore(tmp_path)
    resumed = Session.resume(store, first.did)
    assert resumed is not None and resumed.data == first.data
    assert Session.resume(store, "did:plc:unknown") is None
    rec = Recorder()
    async with XrpcClient(session=resumed, event_hooks={"request": [rec]}) as client:
        rkey = CLOCK.next()
        await client.create_record(resumed.did, COLL, note("resumed"), rkey=rkey)
        assert (await client.get_record(resumed.did, COLL, rkey)).value == note("resumed")
    assert rec.nsids == [CREATE, "com.atproto.repo.getRecord"]
    assert rec.calls[0][1] == first.data.access_jwt


async def test_logout_makes_the_stored_session_unusable(dev_pds: DevPDS, tmp_path: Path) -> None:
    store = FileSessionStore(tmp_path)
    session = await login(HANDLE, PASSWORD, dev_pds.pds_url, store=store)
    old = session.data
    rec = Recorder()
    async with XrpcClient(session=session, event_hooks={"request": [rec]}) as client:
        await session.logout(client)
        assert rec.nsids == ["com.atproto.server.deleteSession"]
        assert rec.calls[0][1] == old.refresh_jwt
        assert store.load(session.did) is None and Session.resume(store, session.did) is None
        assert not store.path_for(session.did).exists()
        assert not session.alive
        with pytest.raises(AuthError, match="log in again"):
            await client.create_record(session.did, COLL, note("after logout"))
        assert len(rec.calls) == 1  # refused locally, no request
        # The server agrees: the old refresh token is revoked.
        with pytest.raises(AuthError) as exc:
            await client.procedure(REFRESH, bearer=old.refresh_jwt)
        assert exc.value.error == "ExpiredToken" and "revoked" in (exc.value.message or "")


# --- refresh ------------------------------------------------------------------------------------


async def test_minted_tokens_are_judged_by_the_pds(dev_pds: DevPDS) -> None:
    # Checks the test's own minting: a future exp works, a past exp is the PDS's ExpiredToken.
    session = await login(HANDLE, PASSWORD, dev_pds.pds_url)
    valid = mint_access(dev_pds, session.data.access_jwt, exp=time.time() + 600)
    expired = mint_access(dev_pds, session.data.access_jwt, exp=time.time() - 600)
    assert jwt_expiry(expired) is not None and jwt_expiry(expired) < time.time()  # type: ignore[operator]
    async with XrpcClient(dev_pds.pds_url) as anon:
        me = await anon.query("com.atproto.server.getSession", bearer=valid)
        assert me["did"] == session.did
        with pytest.raises(AuthError) as exc:
            await anon.query("com.atproto.server.getSession", bearer=expired)
        assert exc.value.error == "ExpiredToken" and exc.value.status == 400


@pytest.mark.parametrize("who_notices", ["client clock", "server"])
async def test_expired_access_token_is_refreshed_transparently(
    dev_pds: DevPDS, tmp_path: Path, who_notices: str
) -> None:
    store = FileSessionStore(tmp_path)
    clock = time.time if who_notices == "client clock" else skewed(3600)
    session, expired = await expired_session(dev_pds, store, clock=clock)
    old_refresh = session.data.refresh_jwt
    rec = Recorder(store, session.key)
    async with XrpcClient(session=session, event_hooks={"request": [rec]}) as client:
        rkey = CLOCK.next()
        written = await client.create_record(session.did, COLL, note("after expiry"), rkey=rkey)
        assert (await client.get_record(session.did, COLL, rkey)).cid == written.cid
    if who_notices == "client clock":  # refreshed ahead of use: no failed call
        assert rec.nsids == [REFRESH, CREATE, "com.atproto.repo.getRecord"]
    else:  # the PDS said ExpiredToken: one refresh, one retry
        assert rec.nsids == [CREATE, REFRESH, CREATE, "com.atproto.repo.getRecord"]
        assert rec.calls[0][1] == expired
    assert [t for n, t in rec.calls if n == REFRESH] == [old_refresh]
    new = session.data
    assert new.refresh_jwt != old_refresh and new.access_jwt != expired  # rotated
    assert rec.unpersisted == []  # every call used a token that was already on disk
    assert json.loads(store.path_for(session.did).read_text()) == new.to_dict()


@pytest.mark.parametrize("who_notices", ["client clock", "server"])
async def test_concurrent_calls_share_one_refresh(dev_pds: DevPDS, who_notices: str) -> None:
    store = MemorySessionStore()
    clock = time.time if who_notices == "client clock" else skewed(3600)
    session, _ = await expired_session(dev_pds, store, clock=clock)
    rec = Recorder(store, session.key)
    results: list[str] = []
    async with XrpcClient(session=session, event_hooks={"request": [rec]}) as client:

        async def write(i: int) -> None:
            written = await client.create_record(session.did, COLL, note(f"concurrent {i}"))
            results.append(written.cid)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(write, i)
    assert len(results) == 8
    assert rec.count(REFRESH) == 1
    assert rec.count(CREATE) == (8 if who_notices == "client clock" else 16)
    assert rec.unpersisted == []


async def test_crash_between_refresh_and_persist_loses_nothing(
    dev_pds: DevPDS, tmp_path: Path
) -> None:
    class FailingStore(FileSessionStore):
        fail = False

        def save(self, key: str, data: Any) -> None:
            if self.fail:
                raise OSError(28, "No space left on device")
            super().save(key, data)

    store = FailingStore(tmp_path)
    session, expired = await expired_session(dev_pds, store)
    before = session.data
    store.fail = True
    rec = Recorder()
    async with XrpcClient(session=session, event_hooks={"request": [rec]}) as client:
        with pytest.raises(OSError, match="No space"):
            await client.create_record(session.did, COLL, note("never sent"))
    assert rec.nsids == [REFRESH]  # the server rotated, but the new pair was never used ...
    assert session.data == before  # ... nor kept: the old pair stays in use
    # "Restart" from what is on disk (the old pair): the session still works, because the
    # PDS accepts the previous refresh token for a grace period after a rotation.
    resumed = Session.resume(FileSessionStore(tmp_path), session.did)
    assert resumed is not None and resumed.data.access_jwt == expired
    async with XrpcClient(session=resumed) as client:
        await client.create_record(resumed.did, COLL, note("after the crash"))
    assert resumed.data.refresh_jwt != before.refresh_jwt


async def test_a_pair_rotated_by_another_process_is_adopted(
    dev_pds: DevPDS, tmp_path: Path
) -> None:
    first, _ = await expired_session(dev_pds, FileSessionStore(tmp_path))
    a = Session.resume(FileSessionStore(tmp_path), first.did)
    b = Session.resume(FileSessionStore(tmp_path), first.did)
    assert a is not None and b is not None
    async with XrpcClient(session=a) as client:
        await client.create_record(a.did, COLL, note("process A"))  # A rotates the pair
    rec = Recorder()
    async with XrpcClient(session=b, event_hooks={"request": [rec]}) as client:
        await client.create_record(b.did, COLL, note("process B"))
    # B found A's pair in the store and used it instead of refreshing with a spent token.
    assert rec.nsids == [CREATE] and rec.calls[0][1] == a.data.access_jwt
    assert b.data == a.data


@pytest.mark.parametrize("who_notices", ["client clock", "server"])
async def test_revoked_session_becomes_a_clear_auth_error(
    dev_pds: DevPDS, tmp_path: Path, who_notices: str
) -> None:
    store = FileSessionStore(tmp_path)
    clock = time.time if who_notices == "client clock" else skewed(3600)
    session, _ = await expired_session(dev_pds, store, clock=clock)
    # Another client logs this session out on the server (e.g. the user revoked it).
    async with XrpcClient(dev_pds.pds_url) as other:
        await other.procedure("com.atproto.server.deleteSession", bearer=session.data.refresh_jwt)
    rec = Recorder()
    async with XrpcClient(session=session, event_hooks={"request": [rec]}) as client:
        with pytest.raises(AuthError, match="log in again") as exc:
            await client.create_record(session.did, COLL, note("revoked"))
        assert exc.value.error == "ExpiredToken"
        expected = [REFRESH] if who_notices == "client clock" else [CREATE, REFRESH]
        assert rec.nsids == expected  # one refresh attempt, no retry loop
        assert not session.alive
        for _ in range(3):
            with pytest.raises(AuthError, match="log in again"):
                await client.create_record(session.did, COLL, note("still revoked"))
        assert rec.nsids == expected  # later calls fail at once, without any request


# --- stores and the blocking facade ---------------------------------------------------------------


def test_stores_round_trip_and_defaults(tmp_path: Path) -> None:
    default = FileSessionStore()
    assert default.directory == Path(platformdirs.user_data_dir("atsync")) / "sessions"
    data = dict.fromkeys(FIELDS, "x")
    for store in (MemorySessionStore(), FileSessionStore(tmp_path / "a" / "b")):
        assert store.load("did:plc:abc") is None
        store.save("did:plc:abc", data)
        store.save("did:plc:abc", {**data, "handle": "y"})  # replaced atomically
        assert store.load("did:plc:abc") == {**data, "handle": "y"}
        store.delete("did:plc:abc")
        store.delete("did:plc:abc")  # deleting twice is fine
        assert store.load("did:plc:abc") is None
    broken = FileSessionStore(tmp_path / "broken")
    broken.save("k", data)
    broken.path_for("k").write_text("{not json")
    with pytest.raises(AuthError, match="log in again"):
        Session.resume(broken, "k")
    broken.save("k", {"did": "did:plc:abc"})
    with pytest.raises(AuthError, match="incomplete"):
        Session.resume(broken, "k")


def test_blocking_login_client_and_logout(dev_pds: DevPDS, tmp_path: Path) -> None:
    store = FileSessionStore(tmp_path)
    with Portal() as portal:
        session = blocking_login(HANDLE, PASSWORD, dev_pds.pds_url, store=store, portal=portal)
        assert store.load(session.did) == session.data.to_dict()
        with BlockingXrpcClient(session=session, portal=portal) as client:
            rkey = CLOCK.next()
            client.create_record(session.did, COLL, note("blocking"), rkey=rkey)
            assert client.get_record(session.did, COLL, rkey).value == note("blocking")
            blocking_logout(session, portal=portal)
            assert store.load(session.did) is None
            with pytest.raises(AuthError, match="log in again"):
                client.create_record(session.did, COLL, note("after logout"))

"""Sessions with a PDS: log in, refresh, persist, resume, log out (docs/sessions.md).

A ``Session`` holds the account's DID, handle, PDS URL and the access/refresh JWT pair, and
keeps it in a ``SessionStore`` under a key (the DID by default). The rules:

- **Persist before use.** ``refreshSession`` rotates the refresh token: the old one stops
  working (after a short grace period on the reference PDS). The new pair is written to the
  store (atomically: temp file, fsync, rename, for ``FileSessionStore``) *before* any call
  uses it; if the write fails, the new pair is dropped and the old one stays in use, so a
  crash or a full disk at any point leaves a pair on disk that the server accepts.
- **Refresh once.** A call that fails with ``ExpiredToken`` refreshes once and is retried
  once; the access token is also refreshed ahead of time when its ``exp`` claim (read without
  verification; the server is the judge) is less than ``refresh_margin`` seconds away.
  Concurrent callers that need a refresh share one ``refreshSession`` request.
- **Dead is dead.** If the server refuses the refresh (revoked, expired, account gone), the
  session becomes unusable and every further call raises ``AuthError`` at once ("log in
  again") without touching the network: no retry loop. The stored copy is left alone (another
  process may have rotated it); ``logout()`` or a new ``login()`` replaces it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar
from urllib.parse import quote

import anyio
import anyio.to_thread
import platformdirs

from atsync._errors import AuthError, PermanentError, TransientError

from ._xrpc import XrpcClient

__all__ = [
    "FileSessionStore",
    "MemorySessionStore",
    "Session",
    "SessionData",
    "SessionStore",
    "StoredSession",
    "default_session_dir",
    "jwt_expiry",
    "login",
]

DEFAULT_REFRESH_MARGIN = 300.0
_FIELDS = ("did", "handle", "pds_url", "access_jwt", "refresh_jwt")


# --- stores ------------------------------------------------------------------------------------


class SessionStore(Protocol):
    """Where sessions are kept between runs. ``save`` must be atomic: after a crash the key
    holds either the old or the new data, never a mix or nothing."""

    def load(self, key: str) -> dict[str, Any] | None: ...

    def save(self, key: str, data: Mapping[str, Any]) -> None: ...

    def delete(self, key: str) -> None: ...


class MemorySessionStore:
    """Keeps sessions in this process only (tests, short scripts)."""

    def __init__(self) -> None:
        self._items: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def load(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            item = self._items.get(key)
            return dict(item) if item is not None else None

    def save(self, key: str, data: Mapping[str, Any]) -> None:
        with self._lock:
            self._items[key] = dict(data)

    def delete(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)


def default_session_dir() -> Path:
    return Path(platformdirs.user_data_dir("atsync")) / "sessions"


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (e.g. Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FileSessionStore:
    """One JSON file per key (mode 0600) in ``directory`` (mode 0700 when created here),
    default ``platformdirs.user_data_dir("atsync")/sessions``. Writes are atomic and durable:
    temp file in the same directory, fsync, rename, fsync of the directory."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_session_dir()

    def path_for(self, key: str) -> Path:
        if not key:
            raise ValueError("a session key must not be empty")
        # DIDs contain ':' (not allowed in Windows file names); quoting keeps keys reversible.
        return self.directory / (quote(key, safe="") + ".json")

    def load(self, key: str) -> dict[str, Any] | None:
        path = self.path_for(key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise AuthError(f"the stored session {path} is unreadable ({e}); log in again") from e
        if not isinstance(data, dict):
            raise AuthError(f"the stored session {path} is not a JSON object; log in again")
        return data

    def save(self, key: str, data: Mapping[str, Any]) -> None:
        path = self.path_for(key)
        if not self.directory.exists():
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)  # mkdir's mode is filtered by the umask
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)  # mkstemp does this already; tokens must never be readable
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(dict(data), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)

    def delete(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)
        if self.directory.exists():
            _fsync_dir(self.directory)


# --- session data ------------------------------------------------------------------------------


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (Unix time), read WITHOUT verifying the signature; ``None``
    if the token is not a JWT or has no numeric ``exp``. Only used to refresh ahead of time."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


@dataclass(frozen=True, repr=False)
class SessionData:
    """What is persisted for a session, and nothing else (never the password)."""

    did: str
    handle: str
    pds_url: str
    access_jwt: str
    refresh_jwt: str

    def __repr__(self) -> str:  # tokens are secrets: keep them out of logs and tracebacks
        return f"SessionData(did={self.did!r}, handle={self.handle!r}, pds_url={self.pds_url!r})"

    def to_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SessionData:
        values: list[str] = []
        for name in _FIELDS:
            value = data.get(name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"session data lacks a non-empty string {name!r}")
            values.append(value)
        return cls(*values)

    @property
    def access_expires_at(self) -> float | None:
        return jwt_expiry(self.access_jwt)


def _pds_from_did_doc(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return None
    for service in doc.get("service") or []:
        if (
            isinstance(service, dict)
            and str(service.get("id", "")).endswith("#atproto_pds")
            and isinstance(service.get("serviceEndpoint"), str)
        ):
            return str(service["serviceEndpoint"]).rstrip("/")
    return None


def _from_server(nsid: str, body: Any, pds_url: str) -> SessionData:
    if not isinstance(body, dict):
        raise TransientError(f"{nsid}: malformed response: expected a JSON object")
    try:
        return SessionData.from_dict(
            {
                "did": body.get("did"),
                "handle": body.get("handle"),
                "pds_url": pds_url,
                "access_jwt": body.get("accessJwt"),
                "refresh_jwt": body.get("refreshJwt"),
            }
        )
    except ValueError as e:
        raise TransientError(f"{nsid}: malformed response: {e}") from e


# --- the session -------------------------------------------------------------------------------


class _Persisted(Protocol):
    """What a session keeps in its store: its account, and ``to_dict()`` to save it."""

    @property
    def did(self) -> str: ...

    @property
    def handle(self) -> str: ...

    @property
    def pds_url(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


D = TypeVar("D", bound=_Persisted)


class StoredSession(Generic[D]):
    """What a password session and an OAuth session share: their data, the store it is
    saved in under ``key``, when to refresh ahead of time, and being dead — refused by the
    server or logged out — after which every use raises ``AuthError``."""

    _what: ClassVar[str] = "session"  # as error messages name it

    def __init__(
        self,
        data: D,
        *,
        store: SessionStore | None = None,
        key: str | None = None,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._data = data
        self.store: SessionStore = store if store is not None else MemorySessionStore()
        self.key = key or data.did
        self.refresh_margin = refresh_margin
        self._clock = clock
        self._lock = anyio.Lock()
        self._dead: AuthError | None = None

    @classmethod
    def _load(cls, stored: Mapping[str, Any]) -> D:
        """The data from its stored form (``ValueError`` if it is not complete)."""
        raise NotImplementedError

    @classmethod
    def resume(
        cls,
        store: SessionStore,
        key: str,
        *,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        clock: Callable[[], float] = time.time,
    ) -> Self | None:
        """The session stored under ``key`` (no network), or ``None`` if there is none."""
        stored = store.load(key)
        if stored is None:
            return None
        try:
            data = cls._load(stored)
            return cls(data, store=store, key=key, refresh_margin=refresh_margin, clock=clock)
        except ValueError as e:  # a field missing, or (OAuth) a key that does not load
            raise AuthError(f"the stored session {key!r} is incomplete ({e}); log in again") from e

    @property
    def data(self) -> D:
        return self._data

    @property
    def did(self) -> str:
        return self._data.did

    @property
    def handle(self) -> str:
        return self._data.handle

    @property
    def pds_url(self) -> str:
        return self._data.pds_url

    @property
    def alive(self) -> bool:
        """False once refresh was refused or after ``logout()``."""
        return self._dead is None

    def _check_alive(self) -> None:
        if self._dead is not None:
            dead = self._dead
            raise AuthError(str(dead), error=dead.error, status=dead.status)

    def _kill(self, why: str, cause: AuthError | PermanentError | None = None) -> AuthError:
        detail = f" ({cause.error}: {cause.message})" if cause is not None and cause.error else ""
        self._dead = AuthError(
            f"the {self._what} of {self.handle} ({self.did}) {why}{detail}; log in again",
            error=cause.error if cause is not None else None,
            status=cause.status if cause is not None else None,
        )
        return AuthError(str(self._dead), error=self._dead.error, status=self._dead.status)

    async def save(self) -> None:
        """Write the current data to the store (a login does this before returning)."""
        await anyio.to_thread.run_sync(self.store.save, self.key, self._data.to_dict())


class Session(StoredSession[SessionData]):
    """A logged-in account; give it to ``XrpcClient(session=...)``. See the module docstring.

    ``clock`` (Unix time) only decides when to refresh ahead of time; the server decides
    whether a token has expired.
    """

    def __repr__(self) -> str:
        return f"Session(did={self.did!r}, handle={self.handle!r}, pds_url={self.pds_url!r})"

    @classmethod
    def _load(cls, stored: Mapping[str, Any]) -> SessionData:
        return SessionData.from_dict(stored)

    def _due(self, data: SessionData) -> bool:
        exp = data.access_expires_at
        return exp is not None and exp - self._clock() < self.refresh_margin

    async def access_token(self, client: XrpcClient) -> str:
        """The access token to send now, refreshed first if it expires within the margin."""
        self._check_alive()
        data = self._data
        if self._due(data):
            return await self.refresh(client, stale_access=data.access_jwt)
        return data.access_jwt

    async def refresh(
        self, client: XrpcClient | None = None, *, stale_access: str | None = None
    ) -> str:
        """Rotate the token pair with ``refreshSession``, persist it, then return the new
        access token. Single-flight: if ``stale_access`` is no longer the current token,
        another task refreshed meanwhile and its token is returned without a request.
        ``stale_access=None`` forces a refresh."""
        async with self._lock:
            self._check_alive()
            current = self._data
            if stale_access is not None and stale_access != current.access_jwt:
                return current.access_jwt
            # Another process sharing the store may have rotated the pair already; its
            # refresh token is the live one, ours may be past the server's grace period.
            stored_raw = await anyio.to_thread.run_sync(self.store.load, self.key)
            if stored_raw is not None:
                try:
                    stored = SessionData.from_dict(stored_raw)
                except ValueError:
                    stored = None
                if (
                    stored is not None
                    and stored.did == current.did
                    and stored.refresh_jwt != current.refresh_jwt
                ):
                    self._data = current = stored
                    if stale_access is not None and not self._due(stored):
                        return stored.access_jwt
            new = await self._rotate(client, current)
            # Shielded: once the server has rotated, cancelling the caller must not leave the
            # new pair unsaved while still in memory (or saved but not in memory).
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.store.save, self.key, new.to_dict())
                self._data = new
            return new.access_jwt

    async def _rotate(self, client: XrpcClient | None, current: SessionData) -> SessionData:
        nsid = "com.atproto.server.refreshSession"
        if client is None or client.service != current.pds_url.rstrip("/"):
            # Never send the refresh token to another service than the session's PDS.
            async with XrpcClient(current.pds_url) as own:
                return await self._rotate(own, current)
        try:
            body = await client.procedure(nsid, bearer=current.refresh_jwt)
        except (AuthError, PermanentError) as e:
            raise self._kill("can no longer be refreshed", e) from e
        new = _from_server(nsid, body, current.pds_url)
        if new.did != current.did:
            raise self._kill(f"was refreshed as another account ({new.did})")
        return new

    async def logout(self, client: XrpcClient | None = None) -> None:
        """Revoke the session on the server (``deleteSession``) and delete the stored copy.
        The local copy is deleted even if the server cannot be reached (the error is then
        raised after); a session the server already considers dead logs out quietly."""
        async with self._lock:
            try:
                if self._dead is None:
                    if client is None or client.service != self.pds_url.rstrip("/"):
                        async with XrpcClient(self.pds_url) as own:
                            await self._delete_session(own)
                    else:
                        await self._delete_session(client)
            finally:
                self._dead = AuthError(
                    f"the session of {self.handle} ({self.did}) was logged out; log in again"
                )
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.store.delete, self.key)

    async def _delete_session(self, client: XrpcClient) -> None:
        # Already revoked or expired: the server holds nothing left to revoke.
        with contextlib.suppress(AuthError):
            await client.procedure(
                "com.atproto.server.deleteSession", bearer=self._data.refresh_jwt
            )


async def login(
    identifier: str,
    password: str,
    service: str,
    *,
    store: SessionStore | None = None,
    key: str | None = None,
    auth_factor_token: str | None = None,
    client: XrpcClient | None = None,
    refresh_margin: float = DEFAULT_REFRESH_MARGIN,
    clock: Callable[[], float] = time.time,
) -> Session:
    """Log in with ``createSession`` (handle, DID or email + password or app password) and
    save the session in ``store`` (default: in memory only) under ``key`` (default: the
    DID) before returning it. Wrong credentials raise ``AuthError``. The password is used
    for this one request and kept nowhere."""
    nsid = "com.atproto.server.createSession"
    service = service.rstrip("/")
    body: dict[str, Any] = {"identifier": identifier, "password": password}
    if auth_factor_token is not None:
        body["authFactorToken"] = auth_factor_token
    if client is None:
        async with XrpcClient(service) as own:
            out = await own.procedure(nsid, body)
    else:
        if client.service != service:
            raise ValueError(f"client is for {client.service}, not {service}")
        out = await client.procedure(nsid, body)
    pds_url = _pds_from_did_doc(out.get("didDoc") if isinstance(out, dict) else None)
    data = _from_server(nsid, out, pds_url or service)
    session = Session(data, store=store, key=key, refresh_margin=refresh_margin, clock=clock)
    await session.save()
    return session

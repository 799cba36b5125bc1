"""Signers: who an action is attributed to, and the key that signs the action log.

- ``LocalSigner``: a ``did:key`` (ed25519 by default, or secp256k1 / p256) created on first
  open and kept beside the database in a file only its owner can read (mode 0600).
  Signatures verify from the public key alone (``verify_signature(signer.key_did, …)``).
- ``ATPSigner``: a local session key that acts for an atproto account. It works before any
  login (``allow_unauthenticated=True``, actions are attributed to the session key); once the
  user logs in, actions are attributed to their DID. The login half lives in the
  connectivity layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import webbrowser
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._blocking import Portal
from .._errors import SignerError
from ..atproto import (
    DEFAULT_OAUTH_SCOPE,
    FileSessionStore,
    IdentityResolver,
    KeyAlgorithm,
    Keypair,
    OAuthSession,
    Session,
    SessionStore,
    XrpcClient,
    authorize_session_key,
    generate_keypair,
    granular_scope,
    load_keypair,
    login,
    oauth_login,
    resume_session,
)

__all__ = ["ATPSigner", "KeyAlgorithm", "LocalSigner", "Signer", "key_path_for"]

_KEY_FILE_VERSION = 1


def key_path_for(db_path: str | Path) -> Path:
    """Where the signing key of the database at ``db_path`` lives: ``<db_path>.key``."""
    return Path(f"{db_path}.key")


class Signer(ABC):
    """Signs the action log and names the author of each action."""

    @property
    @abstractmethod
    def did(self) -> str:
        """The DID actions are attributed to."""

    @property
    @abstractmethod
    def key_did(self) -> str:
        """The ``did:key`` of the key that signs."""

    @abstractmethod
    def sign(self, data: bytes) -> bytes:
        """Sign ``data``; verifiable with ``verify_signature(self.key_did, data, sig)``."""

    def attach(self, db_path: str | Path | None) -> None:  # noqa: B027 - optional hook
        """Called by ``App.open`` so a signer without a key can keep one beside the db."""

    def opened(self, app: Any) -> None:  # noqa: B027 - optional hook
        """Called by ``App.open`` once the app is ready (a signer may resume a session)."""


class LocalSigner(Signer):
    """A ``did:key`` signer whose private key never leaves this machine."""

    def __init__(self, keypair: Keypair | None = None, *, path: str | Path | None = None) -> None:
        self._keypair = keypair
        self._path = Path(path) if path is not None else None
        if keypair is None and self._path is not None:
            self._keypair = load_or_create_key(self._path, "ed25519")

    @classmethod
    def ephemeral(cls, alg: KeyAlgorithm = "ed25519") -> LocalSigner:
        """A signer whose key lives in memory only (tests, ``:memory:`` databases)."""
        return cls(generate_keypair(alg))

    @classmethod
    def load_or_create(cls, path: str | Path, alg: KeyAlgorithm = "ed25519") -> LocalSigner:
        """Load the key at ``path``, or create one there (mode 0600) if none exists."""
        return cls(load_or_create_key(Path(path), alg), path=path)

    def attach(self, db_path: str | Path | None) -> None:
        if self._keypair is None:
            if db_path is None or str(db_path) == ":memory:":
                self._keypair = generate_keypair("ed25519")
            else:
                self._path = key_path_for(db_path)
                self._keypair = load_or_create_key(self._path, "ed25519")

    @property
    def keypair(self) -> Keypair:
        if self._keypair is None:
            raise SignerError("this signer has no key yet: pass it to App.open first")
        return self._keypair

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def did(self) -> str:
        return self.keypair.did

    @property
    def key_did(self) -> str:
        return self.keypair.did

    def sign(self, data: bytes) -> bytes:
        return self.keypair.sign(data)

    def __repr__(self) -> str:
        did = self._keypair.did if self._keypair is not None else "(no key yet)"
        return f"<LocalSigner {did}>"


class ATPSigner(LocalSigner):
    """Acts for an atproto account through a local session key; works before login.

    Before login (``allow_unauthenticated=True``), actions are attributed to the session
    key's ``did:key``. ``login()`` (any time after the app started) creates a session,
    saves it in ``store`` (a 0600 file under the user's data directory by default) so the
    next start resumes it, and — when the app's contract has an NSID, or ``collection`` is
    given — writes a record authorizing the session key (see ``docs/signers.md``); from
    then on actions are attributed to the account's DID, and so are the earlier ones that
    this key signed (``App.author_of``).
    """

    def __init__(
        self,
        keypair: Keypair | None = None,
        *,
        path: str | Path | None = None,
        allow_unauthenticated: bool = True,
        store: SessionStore | None = None,
        collection: str | None = None,
        authorize: bool = True,
    ) -> None:
        super().__init__(keypair, path=path)
        self.allow_unauthenticated = allow_unauthenticated
        self.authorize = authorize
        self._store = store
        self._collection = collection
        self._app: Any = None
        self._session: Session | OAuthSession | None = None
        # Called with the new session (None: logged out) from the thread that changed it;
        # the sync engine wakes on it.
        self.session_listeners: list[Callable[[Session | OAuthSession | None], None]] = []
        # Called with the DID of a fresh login before it is adopted; one that raises refuses
        # the login (the sync engine refuses an account other than the database's).
        self.login_checks: list[Callable[[str], None]] = []
        # What an OAuth login must be allowed to write: the collections of the sync engines
        # attached (None: unknown, e.g. an on_action hook writes anywhere), and blobs.
        self.oauth_collections: set[str] | None = set()
        self.oauth_blobs = False

    @property
    def session(self) -> Session | OAuthSession | None:
        """The account's session: by password (``Session``) or OAuth (``OAuthSession``)."""
        return self._session

    @session.setter
    def session(self, session: Session | OAuthSession | None) -> None:
        changed = session is not self._session
        self._session = session
        if changed:
            for listener in list(self.session_listeners):
                listener(session)

    @property
    def store(self) -> SessionStore:
        if self._store is None:
            self._store = FileSessionStore()
        return self._store

    @property
    def _store_key(self) -> str:
        return f"atsync-session-{self.key_did}"

    @property
    def authenticated(self) -> bool:
        return self.session is not None

    @property
    def did(self) -> str:
        return self.session.did if self.session is not None else self.key_did

    @property
    def collection(self) -> str | None:
        """Where the session key's authorization record goes (None: not written)."""
        if self._collection is not None:
            return self._collection
        nsid = getattr(getattr(self._app, "contract", None), "nsid", None)
        return f"{nsid}.session" if nsid else None

    def opened(self, app: Any) -> None:
        self._app = app
        self.session = resume_session(self.store, self._store_key)

    def sign(self, data: bytes) -> bytes:
        if not self.authenticated and not self.allow_unauthenticated:
            raise SignerError(
                "not logged in: call login() first, or create the ATPSigner with "
                "allow_unauthenticated=True to act before login"
            )
        return super().sign(data)

    async def login_async(
        self, identifier: str, password: str, service: str | None = None
    ) -> Session:
        """Log in (an app password is best); ``service`` defaults to the account's PDS."""
        if service is None:
            async with IdentityResolver() as resolver:
                service = (await resolver.resolve(identifier)).pds
        previous = self._session
        session = await login(identifier, password, service, store=self.store, key=self._store_key)
        await self._adopt(session, previous)
        return session

    async def login_oauth_async(
        self,
        identifier: str,
        *,
        scope: str | None = None,
        client_id: str | None = None,
        open_browser: Callable[[str], Any] | None = webbrowser.open,
        show_url: Callable[[str], Any] | None = None,
        identity: IdentityResolver | None = None,
        login_timeout: float = 300.0,
    ) -> OAuthSession:
        """Log in with OAuth in the user's browser (docs/oauth.md): the authorization page
        opens (its URL is printed too, unless ``show_url`` shows it otherwise), the user
        signs in and consents there, and the session comes back on a loopback listener.
        ``client_id``: the app's https client-metadata URL; by default the development
        loopback client. Deferred auth works as with ``login``. ``scope``: by default, when a
        sync engine is attached, only what it writes (``granular_scope``: its collections and
        the session key's authorization record; a PDS that refuses such scopes is asked for
        ``atproto transition:generic``), else ``atproto transition:generic``."""
        if scope is None:
            scope = self.oauth_scope()
        previous = self._session
        options: dict[str, Any] = {} if show_url is None else {"show_url": show_url}
        session = await oauth_login(
            identifier,
            scope=scope,
            client_id=client_id,
            open_browser=open_browser,
            identity=identity,
            store=self.store,
            key=self._store_key,
            login_timeout=login_timeout,
            **options,
        )
        await self._adopt(session, previous)
        return session

    def oauth_scope(self) -> str:
        """The scope ``login_oauth`` asks for by default (see there)."""
        wanted = self.oauth_collections
        if not wanted:
            return DEFAULT_OAUTH_SCOPE
        own = self.collection if self.authorize else None  # the key's authorization record
        return granular_scope([*wanted, *([own] if own else [])], blobs=self.oauth_blobs)

    async def _adopt(
        self, session: Session | OAuthSession, previous: Session | OAuthSession | None
    ) -> None:
        try:
            for check in list(self.login_checks):
                check(session.did)
        except Exception:
            # Refused: end the new session and put the previous one back in the store.
            with contextlib.suppress(Exception):
                await session.logout()
            if previous is not None:
                await previous.save()
            raise
        collection = self.collection
        if self.authorize and collection is not None:
            async with XrpcClient(session=session) as client:
                proof = await authorize_session_key(
                    client,
                    session.did,
                    collection,
                    self.key_did,
                    getattr(getattr(self._app, "contract", None), "nsid", None),
                )
            if self._app is not None:
                self._app.record_authorization(self.key_did, session.did, collection, proof)
        self.session = session

    def login(self, identifier: str, password: str, service: str | None = None) -> Session:
        """Blocking ``login_async`` for scripts, notebooks and the CLI."""
        with Portal() as portal:
            return portal.call(self.login_async, identifier, password, service)

    def login_oauth(
        self,
        identifier: str,
        *,
        scope: str | None = None,
        client_id: str | None = None,
        open_browser: Callable[[str], Any] | None = webbrowser.open,
        show_url: Callable[[str], Any] | None = None,
        identity: IdentityResolver | None = None,
        login_timeout: float = 300.0,
    ) -> OAuthSession:
        """Blocking ``login_oauth_async``."""
        with Portal() as portal:
            return portal.call(
                lambda: self.login_oauth_async(
                    identifier,
                    scope=scope,
                    client_id=client_id,
                    open_browser=open_browser,
                    show_url=show_url,
                    identity=identity,
                    login_timeout=login_timeout,
                )
            )

    async def logout_async(self) -> None:
        """End the session on the server and forget it here; actions are local again."""
        session, self.session = self.session, None
        if session is not None:
            await session.logout()

    def logout(self) -> None:
        with Portal() as portal:
            portal.call(self.logout_async)

    def __repr__(self) -> str:
        return f"<ATPSigner did={self.did if self._keypair else None!r}>"


def load_or_create_key(path: Path, alg: KeyAlgorithm) -> Keypair:
    """Read a key file, or create it atomically with mode 0600 if it does not exist."""
    try:
        return _load_key(path)
    except FileNotFoundError:
        pass
    keypair = generate_keypair(alg)
    body = json.dumps(
        {
            "version": _KEY_FILE_VERSION,
            "alg": alg,
            "did": keypair.did,
            "private_key": keypair.private_bytes().hex(),
        }
    ).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if another process created the key first; then use theirs.
        os.link(tmp, path)
    except FileExistsError:
        return _load_key(path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return keypair


def _load_key(path: Path) -> Keypair:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SignerError(
            f"the key file {path} is readable by others (mode {mode:o}); "
            f"restrict it with: chmod 600 {path}"
        )
    try:
        data = json.loads(path.read_text())
        alg = data["alg"]
        keypair = load_keypair(alg, bytes.fromhex(data["private_key"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise SignerError(f"the key file {path} is unreadable or damaged: {exc}") from exc
    if data.get("did") not in (None, keypair.did):
        raise SignerError(f"the key file {path} names {data['did']} but holds {keypair.did}")
    return keypair


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

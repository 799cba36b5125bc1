"""A real reference PDS (``@atproto/pds``) with its PLC directory, on loopback.

``ensure_installed()`` installs the pinned npm packages once into a cache outside the
repository; ``DevPDS`` runs them in one Node process (``devpds_server.mjs``) bound to
127.0.0.1 and creates ``.test`` accounts on it. Used by ``atsync dev-pds`` and by the tests.
See docs/dev-pds.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import anyio.to_thread
import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from atsync._errors import DevPDSError

from ._devpds_install import (
    NODE_PACKAGE_VERSION,
    PDS_VERSION,
    PLC_VERSION,
    InstallInfo,
    Progress,
    _ignore,
    default_cache_dir,
    ensure_installed,
)
from ._devpds_move import move_account
from ._tls import is_loopback_url

__all__ = [
    "NODE_PACKAGE_VERSION",
    "PDS_VERSION",
    "PLC_VERSION",
    "DevAccount",
    "DevPDS",
    "InstallInfo",
    "default_cache_dir",
    "ensure_installed",
]

_STATE_FILE = "atsync-devpds.json"
_PLC_LOG = "plc-operations.jsonl"
_READY_PREFIX = "ATSYNC-DEVPDS "
_LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class DevAccount:
    handle: str
    did: str
    password: str


def _launcher_path() -> Path:
    return Path(str(resources.files("atsync.atproto").joinpath("devpds_server.mjs")))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_LOOPBACK, 0))
        return int(s.getsockname()[1])


def _new_state() -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256K1())
    return {
        "version": 1,
        "pds_port": None,
        "admin_password": secrets.token_urlsafe(18),
        "jwt_secret": secrets.token_hex(32),
        "rotation_key_hex": f"{key.private_numbers().private_value:064x}",
        "accounts": {},
    }


def _write_json_atomic(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds secrets
    with os.fdopen(fd, "w") as fh:
        json.dump(value, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _stop_process(proc: subprocess.Popen[str], timeout: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()


def _finalize(proc: subprocess.Popen[str] | None, temp_dir: Path | None) -> None:
    # Runs when a DevPDS is collected or the interpreter exits without stop().
    if proc is not None:
        _stop_process(proc, 5.0)
    if temp_dir is not None:
        shutil.rmtree(temp_dir, ignore_errors=True)


class DevPDS:
    """The reference PDS and a PLC directory on loopback, with ``.test`` accounts.

    ``plc_url`` joins the PLC directory another dev PDS runs (its ``plc_url``) instead of
    starting one: several PDS hosts whose accounts all resolve through one directory.

    Use ``start()``/``stop()`` (``start_async()``/``stop_async()`` in async code),
    ``with DevPDS() as pds:``, or ``async with DevPDS() as pds:``.
    Without ``data_dir`` everything lives in a temporary directory removed by ``stop()``; with
    it, accounts, records, keys and the PLC's operations survive ``stop()``/``start()`` and a new
    ``DevPDS`` on the same directory (which then keeps the port it was first given).
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | str | None = None,
        rate_limits: bool = False,
        accounts: Iterable[tuple[str, str]] = (("alice.test", "hunter22"),),
        *,
        cache_dir: Path | None = None,
        progress: Progress | None = None,
        startup_timeout: float = 60.0,
        log: bool = False,
        replay_window_ms: int | None = None,
        plc_url: str | None = None,
        oauth_token_ttl_ms: int | None = None,
    ) -> None:
        if replay_window_ms is not None and replay_window_ms < 0:
            raise DevPDSError(f"replay_window_ms must be >= 0, got {replay_window_ms}")
        if oauth_token_ttl_ms is not None and oauth_token_ttl_ms < 1000:
            raise DevPDSError(f"oauth_token_ttl_ms must be >= 1000, got {oauth_token_ttl_ms}")
        # How long the OAuth provider's access tokens live (one hour by default): short in
        # the tests that watch a token expire on the server.
        self._oauth_token_ttl_ms = oauth_token_ttl_ms
        if plc_url is not None and not (plc_url.startswith("http://") and is_loopback_url(plc_url)):
            raise DevPDSError(f"plc_url must be a loopback http URL, got {plc_url!r}")
        # Join another dev PDS's PLC directory instead of running one: two PDS hosts whose
        # accounts resolve through one directory (following someone on another host).
        self._joined_plc = plc_url.rstrip("/") if plc_url is not None else None
        self._replay_window_ms = replay_window_ms
        self._requested = [(h.lower(), pw) for h, pw in accounts]
        for handle, _ in self._requested:
            # The PDS itself checks the rest (label lengths, characters) at createAccount.
            if not handle.endswith(".test") or len(handle) <= len(".test"):
                raise DevPDSError(f"dev PDS handles must look like name.test, got {handle!r}")
        self._port = port
        self._data_dir = Path(data_dir).resolve() if data_dir is not None else None
        self._rate_limits = rate_limits
        self._cache_dir = cache_dir
        self._progress = progress or _ignore
        self._startup_timeout = startup_timeout
        self._log = log
        self._proc: subprocess.Popen[str] | None = None
        self._run_dir: Path | None = None
        self._temp_dir: Path | None = None
        self._state: dict[str, Any] = {}
        self._plc_port: int | None = None
        self._stderr: deque[str] = deque(maxlen=60)
        self._ready: dict[str, Any] | None = None
        self._ready_event = threading.Event()
        self._readers: list[threading.Thread] = []
        # Unparametrized: weakref.finalize is not subscriptable at run time, where pdoc
        # (make docs) evaluates this annotation.
        self._finalizer: weakref.finalize | None = None  # type: ignore[type-arg]

    # -- public surface ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def port(self) -> int:
        return int(self._need("pds_port"))

    @property
    def pds_url(self) -> str:
        # The same origin the PDS puts in the DID documents it creates (PDS_HOSTNAME=localhost).
        return f"http://localhost:{self.port}"

    @property
    def plc_url(self) -> str:
        if self._joined_plc is not None:
            return self._joined_plc
        if self._plc_port is None:
            raise DevPDSError("the dev PDS is not running")
        return f"http://{_LOOPBACK}:{self._plc_port}"

    @property
    def admin_password(self) -> str:
        return str(self._need("admin_password"))

    @property
    def accounts(self) -> dict[str, DevAccount]:
        """Every account the data directory knows, by handle (a ``DevAccount``)."""
        known: dict[str, dict[str, str]] = self._state.get("accounts", {})
        return {h: DevAccount(h, a["did"], a["password"]) for h, a in known.items()}

    @property
    def data_dir(self) -> Path | None:
        """The kept data directory, or ``None`` when data is temporary."""
        return self._data_dir

    @property
    def directory(self) -> Path | None:
        """Where the running PDS keeps its data: ``data_dir`` or a temporary directory."""
        return self._run_dir

    @property
    def pid(self) -> int | None:
        """Pid of the Node process running the PDS and PLC."""
        return self._proc.pid if self._proc is not None else None

    def info(self) -> dict[str, Any]:
        """What ``atsync dev-pds`` prints: URLs, admin password, accounts."""
        return {
            "pds_url": self.pds_url,
            "plc_url": self.plc_url,
            "admin_password": self.admin_password,
            "accounts": {
                h: {"did": a.did, "password": a.password} for h, a in self.accounts.items()
            },
        }

    def move_account(self, handle: str, to: DevPDS) -> DevAccount:
        """Move ``handle`` to the dev PDS ``to`` (running, joined to this one's PLC directory)
        as an account migrates on the network: the same DID, its records imported there,
        its DID document naming ``to`` and its new signing key, active there and deactivated
        here. Both hosts' event streams say so (``#identity``, ``#account``). Blobs stay."""
        account = self.accounts.get(handle.lower())
        if account is None:
            raise DevPDSError(f"{handle!r} is not an account of this dev PDS")
        move_account(self, to, account.handle, account.password, self._need("rotation_key_hex"))
        moved = {"did": account.did, "password": account.password}
        to._state.setdefault("accounts", {})[account.handle] = moved
        to._save_state()
        del self._state["accounts"][account.handle]
        self._save_state()
        return DevAccount(account.handle, account.did, account.password)

    def start(self) -> Self:
        if self.running:
            return self
        install = ensure_installed(self._cache_dir, self._progress)
        self._prepare_run_dir()
        try:
            self._launch_with_port_retry(install)
            self._wait_healthy()
            self._create_accounts()
        except BaseException:
            self._shutdown()
            raise
        return self

    def stop(self) -> None:
        self._shutdown()

    async def start_async(self) -> Self:
        """``start()`` for async code: runs it on a worker thread."""
        return await anyio.to_thread.run_sync(self.start)

    async def stop_async(self) -> None:
        """``stop()`` for async code: runs it on a worker thread."""
        await anyio.to_thread.run_sync(self.stop)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.start_async()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_async()

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    # -- internals -----------------------------------------------------------------------------

    def _need(self, key: str) -> Any:
        if not self.running or key not in self._state:
            raise DevPDSError("the dev PDS is not running")
        return self._state[key]

    def _prepare_run_dir(self) -> None:
        if self._data_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="atsync-devpds-"))
            run_dir = self._temp_dir
        else:
            run_dir = self._data_dir
            run_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("pds", "blobs"):
            (run_dir / sub).mkdir(exist_ok=True)
        self._run_dir = run_dir
        state_path = run_dir / _STATE_FILE
        if state_path.exists():
            try:
                self._state = json.loads(state_path.read_text())
            except ValueError as exc:
                raise DevPDSError(f"{state_path} is unreadable: {exc}") from exc
        else:
            self._state = _new_state()
        stored = self._state.get("pds_port")
        if stored is not None and self._port is not None and stored != self._port:
            # The DID documents in this data point at the first port; another one would
            # leave every account resolving to a PDS that is not there.
            raise DevPDSError(
                f"{run_dir} was created for port {stored}; start it on that port (or omit port)"
            )

    def _launch_with_port_retry(self, install: InstallInfo) -> None:
        fixed = self._port is not None or self._state.get("pds_port") is not None
        attempts = 1 if fixed else 3
        for attempt in range(attempts):
            port = self._port or self._state.get("pds_port") or _free_port()
            try:
                self._launch(install, port)
                return
            except DevPDSError:
                # A free port picked by us can be taken before node binds it; try another.
                if attempt + 1 < attempts and "EADDRINUSE" in self.stderr_tail():
                    self._shutdown_process()
                    continue
                raise

    def _launch(self, install: InstallInfo, port: int) -> None:
        assert self._run_dir is not None
        run_dir = self._run_dir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PDS_", "ATSYNC_DEVPDS_"))}
        env.update(
            ATSYNC_DEVPDS_INSTALL_DIR=str(install.install_dir),
            ATSYNC_DEVPDS_PLC_LOG=str(run_dir / _PLC_LOG),
            ATSYNC_DEVPDS_PLC_PORT="0",
            ATSYNC_DEVPDS_PLC_URL=self._joined_plc or "",
            PDS_HOSTNAME="localhost",
            PDS_PORT=str(port),
            PDS_DEV_MODE="true",
            PDS_INVITE_REQUIRED="false",
            PDS_DATA_DIRECTORY=str(run_dir / "pds"),
            PDS_BLOBSTORE_DISK_LOCATION=str(run_dir / "blobs"),
            PDS_JWT_SECRET=self._state["jwt_secret"],
            PDS_ADMIN_PASSWORD=self._state["admin_password"],
            PDS_PLC_ROTATION_KEY_K256_PRIVATE_KEY_HEX=self._state["rotation_key_hex"],
            PDS_SERVICE_HANDLE_DOMAINS=".test",
            PDS_DISABLE_SSRF_PROTECTION="true",
            PDS_CRAWLERS="",
            PDS_BSKY_APP_VIEW_URL="https://appview.invalid",
            PDS_BSKY_APP_VIEW_DID="did:example:invalid",
            PDS_RATE_LIMITS_ENABLED="true" if self._rate_limits else "false",
            LOG_ENABLED="true" if self._log else "false",
        )
        if self._replay_window_ms is not None:
            # How far back subscribeRepos replays from a cursor; older cursors get an
            # #info OutdatedCursor (the reference PDS's default is one day).
            env["PDS_REPO_BACKFILL_LIMIT_MS"] = str(self._replay_window_ms)
        if self._oauth_token_ttl_ms is not None:
            env["ATSYNC_DEVPDS_OAUTH_TOKEN_TTL_MS"] = str(self._oauth_token_ttl_ms)
        if self._temp_dir is not None:
            env["ATSYNC_DEVPDS_TEMP_DIR"] = str(self._temp_dir)
        self._stderr.clear()
        self._ready = None
        self._ready_event.clear()
        try:
            proc = subprocess.Popen(
                [str(install.node), str(_launcher_path())],
                cwd=run_dir,
                env=env,
                # The launcher exits when this pipe closes: that is how it notices that we died.
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                # Own session: a Ctrl-C meant for us must not kill it before we stop it cleanly.
                start_new_session=True,
            )
        except OSError as exc:
            raise DevPDSError(f"cannot run {install.node}: {exc}") from exc
        self._proc = proc
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _finalize, proc, self._temp_dir)
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read_stdout, args=(proc.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True),
        ]
        for t in self._readers:
            t.start()
        if not self._ready_event.wait(self._startup_timeout) or self._ready is None:
            if proc.poll() is None:
                raise self._error(f"the PDS did not start within {self._startup_timeout:.0f} s")
            self._join_readers()
            raise self._error(f"the PDS process exited with code {proc.returncode}")
        plc_port = self._ready.get("plc_port")
        self._plc_port = int(plc_port) if plc_port is not None else None
        self._state["pds_port"] = int(self._ready["pds_port"])
        self._port = self._state["pds_port"]
        self._save_state()

    def _read_stdout(self, stream: IO[str]) -> None:
        for line in stream:
            if line.startswith(_READY_PREFIX) and self._ready is None:
                with contextlib.suppress(ValueError):
                    self._ready = json.loads(line[len(_READY_PREFIX) :])
                self._ready_event.set()
            elif self._log:
                self._progress(line.rstrip())
        self._ready_event.set()  # EOF: the process is gone, stop waiting for "ready"

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            self._stderr.append(line.rstrip())
            if self._log:
                self._progress(line.rstrip())

    def _join_readers(self) -> None:
        for t in self._readers:
            t.join(timeout=5)
        self._readers = []

    def _error(self, message: str) -> DevPDSError:
        tail = self.stderr_tail()
        return DevPDSError(f"{message}\n--- node stderr (tail) ---\n{tail}" if tail else message)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        url = f"http://{_LOOPBACK}:{self.port}/xrpc/_health"
        last: str = ""
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if not self.running:
                    raise self._error("the PDS process exited during start")
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.05)
        raise self._error(f"{url} did not answer 200 within {self._startup_timeout:.0f} s {last}")

    def _create_accounts(self) -> None:
        known: dict[str, dict[str, str]] = self._state.setdefault("accounts", {})
        with httpx.Client(base_url=f"http://{_LOOPBACK}:{self.port}", timeout=30.0) as client:
            for handle, password in self._requested:
                if handle in known and known[handle]["password"] == password:
                    continue
                did = self._create_account(client, handle, password)
                known[handle] = {"did": did, "password": password}
                self._save_state()

    def _create_account(self, client: httpx.Client, handle: str, password: str) -> str:
        body = {"handle": handle, "password": password, "email": f"{handle}@example.invalid"}
        resp = client.post("/xrpc/com.atproto.server.createAccount", json=body)
        if resp.status_code == 200:
            return str(resp.json()["did"])
        # Already there (e.g. the state file was lost): the password decides whether it is ours.
        session = client.post(
            "/xrpc/com.atproto.server.createSession",
            json={"identifier": handle, "password": password},
        )
        if session.status_code == 200:
            return str(session.json()["did"])
        raise self._error(f"createAccount {handle} failed: {resp.status_code} {resp.text}")

    def _save_state(self) -> None:
        assert self._run_dir is not None
        _write_json_atomic(self._run_dir / _STATE_FILE, self._state)

    def _shutdown_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_process(proc, 10.0)
            self._join_readers()
        self._plc_port = None

    def _shutdown(self) -> None:
        self._shutdown_process()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
            self._run_dir = None
            self._state = {}

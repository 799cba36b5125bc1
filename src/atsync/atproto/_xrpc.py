"""An async XRPC client for the calls the sync engine needs (atproto.com/specs/xrpc).

Built on ``httpx.AsyncClient`` (works under anyio's asyncio and trio backends; the firehose
part needs asyncio). Close it with ``async with XrpcClient(...)`` or ``await aclose()``.

Records go in and come out in the atproto *data model* form (``CID`` objects for links,
``bytes`` for bytes, see ``_cbor``): exactly what ``cid_for_record`` hashes, so a CID computed
locally can be compared with the server's. The JSON ``$link``/``$bytes`` form stays inside
this module.

Every failure raises a classified ``NetworkError`` (table in docs/xrpc.md):

- no response, timeouts, 5xx (and 408)   -> ``TransientError`` (``status`` None or 5xx)
- 429, or ``RateLimit-Remaining: 0``      -> ``RateLimitedError`` with ``reset_at``
- 401 or an auth error name (``ExpiredToken``, ``InvalidToken``, ``AccountTakedown``…)
                                           -> ``AuthError``
- other 4xx (and 501)                      -> ``PermanentError``

**The 500 trap.** The reference PDS answers ``500 InternalServerError`` to ``createRecord``
or ``applyWrites#create`` on a record key that exists, and to ``applyWrites`` update/delete of
a missing record. Such a 500 is classified ``TransientError`` (``status == 500``,
``error == "InternalServerError"``), but a *write* that failed with it, or with a timeout or
broken connection, may have been applied: ``outcome_unknown(exc)`` says so, and the caller
must read the current state (``get_record`` / ``sync_get_latest_commit``, compare CIDs) before
sending the write again. Retrying blindly loops forever.

With a ``session`` (see ``_session``) calls that need auth carry its access token; a call
that fails with ``ExpiredToken`` makes the session refresh once (single-flight) and is sent
once more. A session that implements ``RequestAuth`` (OAuth: ``_oauth_session``) makes each
request's auth headers itself, since every DPoP request carries its own proof, and says after
each response whether to resend (a new DPoP nonce) or refresh first. The ``RateLimit-*``
headers of every response are kept in ``rate_limit``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, BinaryIO, Protocol, Self

import httpx

from atsync._errors import (
    AuthError,
    ClosedError,
    PermanentError,
    TransientError,
    VerificationError,
)

from ._cbor import CID, CODEC_RAW, data_from_json
from ._firehose import DEFAULT_MAX_FRAME_SIZE, FirehoseFrame, FirehoseSubscription
from ._tls import is_loopback_url, tls_context
from ._xrpc_download import save_body
from ._xrpc_errors import (
    RateLimitInfo,
    classify_response,
    classify_transport,
    outcome_unknown,
    parse_error_body,
    parse_rate_limit,
)
from ._xrpc_types import (
    UNSET,
    ApplyWritesResult,
    CommitMeta,
    Create,
    Delete,
    Download,
    LatestCommit,
    RecordPage,
    RecordView,
    RepoDescription,
    RequestAuth,
    Update,
    Write,
    WriteOpResult,
    WriteResult,
    _apply_writes_result,
    _Body,
    _check_replayable,
    _commit,
    _malformed,
    _obj,
    _opt_str,
    _record_json,
    _record_view,
    _str,
    _Unset,
    _write_result,
    _writes_json,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "UNSET",
    "ApplyWritesResult",
    "CommitMeta",
    "Create",
    "Delete",
    "Download",
    "FirehoseFrame",
    "FirehoseSubscription",
    "LatestCommit",
    "RateLimitInfo",
    "RecordPage",
    "RecordView",
    "RepoDescription",
    "RequestAuth",
    "SessionAuth",
    "Update",
    "Write",
    "WriteOpResult",
    "WriteResult",
    "XrpcClient",
    "outcome_unknown",
]

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
USER_AGENT = "atsync (+https://atproto.com)"
_MAX_ERROR_BODY = 64 * 1024


class SessionAuth(Protocol):
    """What the client needs from a session (``_session.Session`` implements it)."""

    @property
    def pds_url(self) -> str: ...

    async def access_token(self, client: XrpcClient) -> str: ...

    async def refresh(self, client: XrpcClient | None = None, *, stale_access: str | None) -> str:
        """Refresh unless ``stale_access`` is no longer current; return the access token."""
        ...


# --- the client --------------------------------------------------------------------------------


class XrpcClient:
    """Async XRPC client for one service (a PDS). See the module docstring.

    ``service`` defaults to the session's PDS; with a session, any other service is refused,
    so that its tokens are never sent elsewhere. ``event_hooks`` and ``transport`` go to
    ``httpx.AsyncClient`` (e.g. to count requests, or to route through a test proxy).
    """

    def __init__(
        self,
        service: str | None = None,
        *,
        session: SessionAuth | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        event_hooks: Mapping[str, list[Callable[..., Any]]] | None = None,
    ) -> None:
        if service is None:
            if session is None:
                raise ValueError("XrpcClient needs a service URL or a session")
            service = session.pds_url
        service = service.rstrip("/")
        if not service.startswith(("http://", "https://")):
            raise ValueError(f"service must be an http(s) URL, got {service!r}")
        if session is not None and session.pds_url.rstrip("/") != service:
            raise ValueError(
                f"the session belongs to {session.pds_url}; refusing to send its tokens to "
                f"{service} (use a client without a session for other services)"
            )
        self.service = service
        self.session = session
        self.rate_limit: RateLimitInfo | None = None
        # Repository CARs and blobs from a PDS on this machine come uncompressed: the
        # reference PDS compresses (and first gathers 64 KiB per chunk) whenever a client
        # accepts it, which over loopback costs both ends CPU and delays the first byte by
        # most of a second for a 20,000-record repository, to save bytes that cross no wire.
        # Elsewhere compression saves more than it costs. A caller's own header wins.
        asked = {k.lower() for k in headers or {}}
        self._download_headers = (
            {"Accept-Encoding": "identity"}
            if is_loopback_url(service) and "accept-encoding" not in asked
            else {}
        )
        self._closed = False
        self._http = httpx.AsyncClient(
            verify=tls_context(),
            timeout=timeout,
            headers={"User-Agent": USER_AGENT, **(headers or {})},
            transport=transport,
            event_hooks={k: list(v) for k, v in (event_hooks or {}).items()},
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        await self._http.aclose()

    # -- the generic calls ----------------------------------------------------------------

    def _url(self, nsid: str) -> str:
        return f"{self.service}/xrpc/{nsid}"

    async def _send_once(self, request: httpx.Request, nsid: str, stream: bool) -> httpx.Response:
        if self._closed:
            raise ClosedError("the XRPC client is closed")
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.RequestError as e:
            raise classify_transport(nsid, str(request.url), e) from e
        info = parse_rate_limit(response.headers, time.time())
        if info is not None:
            self.rate_limit = info
        return response

    async def _error(self, nsid: str, response: httpx.Response) -> Exception:
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= _MAX_ERROR_BODY:
                    break
        except httpx.HTTPError:
            pass  # the status alone still classifies the failure
        finally:
            await response.aclose()
        return classify_response(
            nsid, response.status_code, response.headers, bytes(body), time.time()
        )

    async def _call(
        self,
        method: str,
        nsid: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        body: _Body | None = None,
        content_type: str | None = None,
        auth: bool = False,
        bearer: str | None = None,
    ) -> Any:
        """Send one call; with ``auth`` the session's token, refreshed once on ExpiredToken
        (or, with a ``RequestAuth`` session, when its hook says so; plus one resend with a
        new DPoP nonce)."""
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        token = bearer
        if auth and bearer is None:
            if self.session is None:
                raise AuthError(f"{nsid} needs a logged-in session; log in first")
            token = await self.session.access_token(self)
        session = self.session if auth and bearer is None else None
        hook = session if isinstance(session, RequestAuth) else None
        url = self._url(nsid)
        refreshed = resent = False
        while True:
            headers: dict[str, str] = {}
            if token is not None:
                if hook is not None:
                    headers.update(hook.request_headers(method, url, token))
                else:
                    headers["Authorization"] = f"Bearer {token}"
            if body is not None:
                headers["Content-Type"] = content_type or "application/octet-stream"
                if body.size is not None:
                    headers["Content-Length"] = str(body.size)
                async with body.open() as content:
                    request = self._http.build_request(
                        method, url, params=clean, headers=headers, content=content
                    )
                    response = await self._send_once(request, nsid, stream=False)
            else:
                request = self._http.build_request(
                    method, url, params=clean, headers=headers, json=json_body
                )
                response = await self._send_once(request, nsid, stream=False)
            verdict = hook.after_response(url, response) if hook is not None else None
            if response.is_success:
                if not response.content:
                    return None
                try:
                    return response.json()
                except ValueError as e:
                    raise _malformed(nsid, f"invalid JSON: {e}") from e
            error, _ = parse_error_body(response.content)
            if verdict == "nonce":
                if resent:  # the nonce moved again meanwhile: not a refusal of the session
                    raise TransientError(
                        f"{nsid}: the server asked for a new DPoP nonce twice",
                        error=error,
                        status=response.status_code,
                    )
                resent = True
                _check_replayable(nsid, body, error, response.status_code)
                continue
            expired = verdict == "refresh" if hook is not None else error == "ExpiredToken"
            if not refreshed and session is not None and expired:
                refreshed = True
                token = await session.refresh(self, stale_access=token)
                _check_replayable(nsid, body, error, response.status_code)
                continue
            raise classify_response(
                nsid, response.status_code, response.headers, response.content, time.time()
            )

    async def query(
        self,
        nsid: str,
        params: Mapping[str, Any] | None = None,
        *,
        auth: bool = False,
        bearer: str | None = None,
    ) -> Any:
        """Any XRPC query (GET); returns the decoded JSON (``None`` for an empty body).
        ``auth`` sends the session's access token; ``bearer`` sends the given token."""
        return await self._call("GET", nsid, params=params, auth=auth, bearer=bearer)

    async def procedure(
        self,
        nsid: str,
        body: Any = None,
        *,
        params: Mapping[str, Any] | None = None,
        auth: bool = False,
        bearer: str | None = None,
    ) -> Any:
        """Any XRPC procedure (POST) with a JSON ``body``; returns the decoded JSON."""
        return await self._call(
            "POST", nsid, params=params, json_body=body, auth=auth, bearer=bearer
        )

    # -- com.atproto.repo -----------------------------------------------------------------

    async def create_record(
        self,
        repo: str,
        collection: str,
        record: Mapping[str, Any],
        *,
        rkey: str | None = None,
        validate: bool | None = None,
        swap_commit: str | None = None,
    ) -> WriteResult:
        """``createRecord``. On an existing ``rkey`` the reference PDS answers 500: see the
        module docstring (``outcome_unknown``)."""
        nsid = "com.atproto.repo.createRecord"
        body: dict[str, Any] = {
            "repo": repo,
            "collection": collection,
            "record": _record_json(record),
        }
        if rkey is not None:
            body["rkey"] = rkey
        if validate is not None:
            body["validate"] = validate
        if swap_commit is not None:
            body["swapCommit"] = swap_commit
        return _write_result(nsid, await self._call("POST", nsid, json_body=body, auth=True))

    async def put_record(
        self,
        repo: str,
        collection: str,
        rkey: str,
        record: Mapping[str, Any],
        *,
        swap_record: str | CID | _Unset | None = UNSET,
        validate: bool | None = None,
        swap_commit: str | None = None,
    ) -> WriteResult:
        """``putRecord``. ``swap_record``: the CID the record must have now (else
        ``PermanentError`` ``InvalidSwap``); ``None`` means "must not exist" — an idempotent
        create: identical content is a no-op success, other content is ``InvalidSwap``."""
        nsid = "com.atproto.repo.putRecord"
        body: dict[str, Any] = {
            "repo": repo,
            "collection": collection,
            "rkey": rkey,
            "record": _record_json(record),
        }
        if not isinstance(swap_record, _Unset):
            body["swapRecord"] = None if swap_record is None else str(swap_record)
        if validate is not None:
            body["validate"] = validate
        if swap_commit is not None:
            body["swapCommit"] = swap_commit
        return _write_result(nsid, await self._call("POST", nsid, json_body=body, auth=True))

    async def delete_record(
        self,
        repo: str,
        collection: str,
        rkey: str,
        *,
        swap_record: str | CID | None = None,
        swap_commit: str | None = None,
    ) -> CommitMeta | None:
        """``deleteRecord``; returns the new commit (``None`` if nothing was deleted)."""
        nsid = "com.atproto.repo.deleteRecord"
        body: dict[str, Any] = {"repo": repo, "collection": collection, "rkey": rkey}
        if swap_record is not None:
            body["swapRecord"] = str(swap_record)
        if swap_commit is not None:
            body["swapCommit"] = swap_commit
        out = await self._call("POST", nsid, json_body=body, auth=True)
        return _commit(nsid, out) if isinstance(out, dict) else None

    async def apply_writes(
        self,
        repo: str,
        writes: Sequence[Write],
        *,
        validate: bool | None = None,
        swap_commit: str | None = None,
    ) -> ApplyWritesResult:
        """``applyWrites``: atomic, at most 200 writes (the server refuses more with
        ``PermanentError``). Create-on-existing, update/delete-of-missing answer 500."""
        nsid = "com.atproto.repo.applyWrites"
        body: dict[str, Any] = {"repo": repo, "writes": _writes_json(writes)}
        if validate is not None:
            body["validate"] = validate
        if swap_commit is not None:
            body["swapCommit"] = swap_commit
        out = _obj(nsid, await self._call("POST", nsid, json_body=body, auth=True))
        return _apply_writes_result(nsid, out)

    async def get_record(
        self, repo: str, collection: str, rkey: str, *, cid: str | None = None
    ) -> RecordView:
        """``getRecord``; a missing record is ``PermanentError`` ``RecordNotFound``."""
        nsid = "com.atproto.repo.getRecord"
        params = {"repo": repo, "collection": collection, "rkey": rkey, "cid": cid}
        return _record_view(nsid, await self._call("GET", nsid, params=params))

    async def list_records(
        self,
        repo: str,
        collection: str,
        *,
        limit: int = 100,
        cursor: str | None = None,
        reverse: bool = False,
    ) -> RecordPage:
        """One page of ``listRecords`` (``limit`` ≤ 100)."""
        nsid = "com.atproto.repo.listRecords"
        params = {
            "repo": repo,
            "collection": collection,
            "limit": limit,
            "cursor": cursor,
            "reverse": "true" if reverse else None,
        }
        out = _obj(nsid, await self._call("GET", nsid, params=params))
        records = out.get("records")
        if not isinstance(records, list):
            raise _malformed(nsid, "'records' is not a list")
        return RecordPage([_record_view(nsid, r) for r in records], _opt_str(out, "cursor"))

    async def iter_records(
        self, repo: str, collection: str, *, page_size: int = 100, reverse: bool = False
    ) -> AsyncIterator[RecordView]:
        """Every record of ``collection``, page after page."""
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            page = await self.list_records(
                repo, collection, limit=page_size, cursor=cursor, reverse=reverse
            )
            for record in page.records:
                yield record
            if not page.records or page.cursor is None:
                return
            if page.cursor in seen:  # a server bug would otherwise loop forever
                raise PermanentError(f"listRecords repeated the cursor {page.cursor!r}")
            seen.add(page.cursor)
            cursor = page.cursor

    async def describe_repo(self, repo: str) -> RepoDescription:
        nsid = "com.atproto.repo.describeRepo"
        out = _obj(nsid, await self._call("GET", nsid, params={"repo": repo}))
        collections = out.get("collections") or []
        return RepoDescription(
            _str(nsid, out, "did"),
            _str(nsid, out, "handle"),
            [c for c in collections if isinstance(c, str)],
            bool(out.get("handleIsCorrect")),
            _obj(nsid, out.get("didDoc") or {}),
        )

    async def upload_blob(
        self, data: bytes | str | os.PathLike[str] | BinaryIO, mime_type: str
    ) -> dict[str, Any]:
        """``uploadBlob`` from bytes, a file path, or a binary stream (read in chunks, never
        whole). Returns the blob reference in data-model form, ready to put in a record. The
        PDS keeps the blob only once a record references it."""
        nsid = "com.atproto.repo.uploadBlob"
        out = await self._call("POST", nsid, body=_Body(data), content_type=mime_type, auth=True)
        blob = data_from_json(_obj(nsid, _obj(nsid, out).get("blob")))
        if not isinstance(blob, dict) or not isinstance(blob.get("ref"), CID):
            raise _malformed(nsid, "'blob' is not a blob reference")
        return blob

    # -- com.atproto.sync -----------------------------------------------------------------

    async def sync_get_latest_commit(self, did: str) -> LatestCommit:
        nsid = "com.atproto.sync.getLatestCommit"
        out = _obj(nsid, await self._call("GET", nsid, params={"did": did}))
        return LatestCommit(_str(nsid, out, "cid"), _str(nsid, out, "rev"))

    async def sync_get_record(self, did: str, collection: str, rkey: str) -> bytes:
        """The record's proof CAR: signed commit + MST path (+ the record if present)."""
        nsid = "com.atproto.sync.getRecord"
        params = {"did": did, "collection": collection, "rkey": rkey}
        request = self._http.build_request("GET", self._url(nsid), params=params)
        response = await self._send_once(request, nsid, stream=False)
        if not response.is_success:
            raise classify_response(
                nsid, response.status_code, response.headers, response.content, time.time()
            )
        return response.content

    async def sync_get_repo(
        self,
        did: str,
        dest: str | os.PathLike[str] | BinaryIO | None,
        *,
        since: str | None = None,
        max_size: int | None = None,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> Download:
        """Stream the repository CAR (``since``: only what changed after that rev) to ``dest``,
        a path (written to ``<path>.part``, fsynced, then renamed: a complete file or none), a
        binary file object, or None (written nowhere: ``on_chunk`` has it all). The CAR is
        never held in memory here. ``on_chunk`` sees each chunk as it arrives (e.g.
        ``CarStream.feed``, to index it meanwhile); its exception stops the download."""
        return await self._download(
            "com.atproto.sync.getRepo", {"did": did, "since": since}, dest, max_size, on_chunk
        )

    async def sync_get_blob(
        self,
        did: str,
        cid: str | CID,
        dest: str | os.PathLike[str] | BinaryIO,
        *,
        max_size: int | None = None,
    ) -> Download:
        """Stream a blob to ``dest`` (as ``sync_get_repo``), checking its bytes against
        ``cid`` (``VerificationError`` if they differ; a path target is then not created)."""
        parsed = CID.parse(cid) if isinstance(cid, str) else cid
        hasher = hashlib.sha256()

        def check() -> None:
            if parsed.codec != CODEC_RAW or hasher.digest() != parsed.digest:
                raise VerificationError(f"blob {parsed}: the downloaded bytes do not match")

        return await self._download(
            "com.atproto.sync.getBlob",
            {"did": did, "cid": str(parsed)},
            dest,
            max_size,
            hasher.update,
            check,
        )

    async def _download(
        self,
        nsid: str,
        params: Mapping[str, Any],
        dest: str | os.PathLike[str] | BinaryIO | None,
        max_size: int | None,
        observe: Callable[[bytes], None] | None = None,
        finish: Callable[[], None] | None = None,
    ) -> Download:
        clean = {k: v for k, v in params.items() if v is not None}
        request = self._http.build_request(
            "GET", self._url(nsid), params=clean, headers=self._download_headers
        )
        response = await self._send_once(request, nsid, stream=True)
        if not response.is_success:
            raise await self._error(nsid, response)
        return await save_body(nsid, response, dest, max_size, observe, finish)

    def subscribe_repos(
        self,
        cursor: int | None = None,
        *,
        open_timeout: float = 10.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> FirehoseSubscription:
        """The PDS's ``subscribeRepos`` stream from ``cursor`` (``None``: from now on; 0:
        replay everything kept). Use ``async with client.subscribe_repos(c) as sub:`` and
        ``async for frame in sub``."""
        ws = "wss://" + self.service[8:] if self.service.startswith("https://") else None
        ws = ws or "ws://" + self.service[len("http://") :]
        url = f"{ws}/xrpc/com.atproto.sync.subscribeRepos"
        if cursor is not None:
            url += f"?cursor={int(cursor)}"
        return FirehoseSubscription(
            url, open_timeout=open_timeout, max_frame_size=max_frame_size, user_agent=USER_AGENT
        )

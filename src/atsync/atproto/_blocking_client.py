"""Blocking facades of the XRPC client and of sessions, for scripts and the CLI.

Hand-written forwarders: every method calls the async implementation through one
``atsync._blocking.Portal`` (an event loop in a background thread). Use one portal for a
session and the clients that share it, so they run on the same loop:

    with Portal() as portal:
        session = blocking_login("alice.test", "pw", url, store=FileSessionStore(), portal=portal)
        with BlockingXrpcClient(session=session, portal=portal) as client:
            client.create_record(session.did, "com.example.note", {"text": "hi"})
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from types import TracebackType
from typing import Any, BinaryIO, Self

import anyio

from atsync._blocking import Portal
from atsync._errors import ClosedError, PermanentError

from ._cbor import CID
from ._oauth_session import OAuthSession
from ._session import DEFAULT_REFRESH_MARGIN, Session, SessionStore, login
from ._xrpc import (
    UNSET,
    ApplyWritesResult,
    CommitMeta,
    Download,
    FirehoseFrame,
    FirehoseSubscription,
    LatestCommit,
    RateLimitInfo,
    RecordPage,
    RecordView,
    RepoDescription,
    Write,
    WriteResult,
    XrpcClient,
)
from ._xrpc_types import _Unset

__all__ = [
    "BlockingFirehoseSubscription",
    "BlockingXrpcClient",
    "blocking_login",
    "blocking_logout",
]


class BlockingFirehoseSubscription:
    """Blocking view of a ``FirehoseSubscription``: ``with`` it, then iterate or call
    ``next_frame(timeout)``."""

    def __init__(self, portal: Portal, subscription: FirehoseSubscription) -> None:
        self._portal = portal
        self._sub = subscription

    def __enter__(self) -> Self:
        self._portal.call(self._sub.open)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._portal.call(self._sub.aclose)

    def next_frame(self, timeout: float | None = None) -> FirehoseFrame:
        """The next frame; ``TimeoutError`` if none arrives within ``timeout`` seconds."""

        async def next_within() -> FirehoseFrame:
            with anyio.fail_after(timeout):
                return await self._sub.next_frame()

        return self._portal.call(next_within)

    def __iter__(self) -> Iterator[FirehoseFrame]:
        while True:
            try:
                yield self._portal.call(self._sub.next_frame)
            except ClosedError:
                return


class BlockingXrpcClient:
    """Blocking twin of ``XrpcClient``; same arguments, same results and errors.

    Without ``portal`` it starts its own (stopped by ``close()``).
    """

    def __init__(
        self,
        service: str | None = None,
        *,
        session: Session | OAuthSession | None = None,
        portal: Portal | None = None,
        **options: Any,
    ) -> None:
        self._own_portal = portal is None
        self.portal = portal if portal is not None else Portal().start()
        self._client = XrpcClient(service, session=session, **options)

    @property
    def service(self) -> str:
        return self._client.service

    @property
    def session(self) -> Session | OAuthSession | None:
        session = self._client.session
        return session if isinstance(session, Session | OAuthSession) else None

    @property
    def rate_limit(self) -> RateLimitInfo | None:
        return self._client.rate_limit

    @property
    def async_client(self) -> XrpcClient:
        return self._client

    def close(self) -> None:
        try:
            self.portal.call(self._client.aclose)
        finally:
            if self._own_portal:
                self.portal.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def query(
        self,
        nsid: str,
        params: Mapping[str, Any] | None = None,
        *,
        auth: bool = False,
        bearer: str | None = None,
    ) -> Any:
        return self.portal.call(partial(self._client.query, nsid, params, auth=auth, bearer=bearer))

    def procedure(
        self,
        nsid: str,
        body: Any = None,
        *,
        params: Mapping[str, Any] | None = None,
        auth: bool = False,
        bearer: str | None = None,
    ) -> Any:
        call = partial(self._client.procedure, nsid, body, params=params, auth=auth, bearer=bearer)
        return self.portal.call(call)

    def create_record(
        self,
        repo: str,
        collection: str,
        record: Mapping[str, Any],
        *,
        rkey: str | None = None,
        validate: bool | None = None,
        swap_commit: str | None = None,
    ) -> WriteResult:
        call = partial(
            self._client.create_record,
            repo,
            collection,
            record,
            rkey=rkey,
            validate=validate,
            swap_commit=swap_commit,
        )
        return self.portal.call(call)

    def put_record(
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
        call = partial(
            self._client.put_record,
            repo,
            collection,
            rkey,
            record,
            swap_record=swap_record,
            validate=validate,
            swap_commit=swap_commit,
        )
        return self.portal.call(call)

    def delete_record(
        self,
        repo: str,
        collection: str,
        rkey: str,
        *,
        swap_record: str | CID | None = None,
        swap_commit: str | None = None,
    ) -> CommitMeta | None:
        call = partial(
            self._client.delete_record,
            repo,
            collection,
            rkey,
            swap_record=swap_record,
            swap_commit=swap_commit,
        )
        return self.portal.call(call)

    def apply_writes(
        self,
        repo: str,
        writes: Sequence[Write],
        *,
        validate: bool | None = None,
        swap_commit: str | None = None,
    ) -> ApplyWritesResult:
        call = partial(
            self._client.apply_writes, repo, writes, validate=validate, swap_commit=swap_commit
        )
        return self.portal.call(call)

    def get_record(
        self, repo: str, collection: str, rkey: str, *, cid: str | None = None
    ) -> RecordView:
        return self.portal.call(partial(self._client.get_record, repo, collection, rkey, cid=cid))

    def list_records(
        self,
        repo: str,
        collection: str,
        *,
        limit: int = 100,
        cursor: str | None = None,
        reverse: bool = False,
    ) -> RecordPage:
        call = partial(
            self._client.list_records,
            repo,
            collection,
            limit=limit,
            cursor=cursor,
            reverse=reverse,
        )
        return self.portal.call(call)

    def iter_records(
        self, repo: str, collection: str, *, page_size: int = 100, reverse: bool = False
    ) -> Iterator[RecordView]:
        """Every record of ``collection``; one ``list_records`` call per page."""
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            page = self.list_records(
                repo, collection, limit=page_size, cursor=cursor, reverse=reverse
            )
            yield from page.records
            if not page.records or page.cursor is None:
                return
            if page.cursor in seen:  # a server bug would otherwise loop forever
                raise PermanentError(f"listRecords repeated the cursor {page.cursor!r}")
            seen.add(page.cursor)
            cursor = page.cursor

    def describe_repo(self, repo: str) -> RepoDescription:
        return self.portal.call(self._client.describe_repo, repo)

    def upload_blob(
        self, data: bytes | str | os.PathLike[str] | BinaryIO, mime_type: str
    ) -> dict[str, Any]:
        return self.portal.call(self._client.upload_blob, data, mime_type)

    def sync_get_latest_commit(self, did: str) -> LatestCommit:
        return self.portal.call(self._client.sync_get_latest_commit, did)

    def sync_get_record(self, did: str, collection: str, rkey: str) -> bytes:
        return self.portal.call(self._client.sync_get_record, did, collection, rkey)

    def sync_get_repo(
        self,
        did: str,
        dest: str | os.PathLike[str] | BinaryIO | None,
        *,
        since: str | None = None,
        max_size: int | None = None,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> Download:
        call = partial(
            self._client.sync_get_repo,
            did,
            dest,
            since=since,
            max_size=max_size,
            on_chunk=on_chunk,
        )
        return self.portal.call(call)

    def sync_get_blob(
        self,
        did: str,
        cid: str | CID,
        dest: str | os.PathLike[str] | BinaryIO,
        *,
        max_size: int | None = None,
    ) -> Download:
        call = partial(self._client.sync_get_blob, did, cid, dest, max_size=max_size)
        return self.portal.call(call)

    def subscribe_repos(
        self, cursor: int | None = None, *, open_timeout: float = 10.0
    ) -> BlockingFirehoseSubscription:
        sub = self._client.subscribe_repos(cursor, open_timeout=open_timeout)
        return BlockingFirehoseSubscription(self.portal, sub)


def _with_portal(portal: Portal | None) -> tuple[Portal, bool]:
    return (portal, False) if portal is not None else (Portal().start(), True)


def blocking_login(
    identifier: str,
    password: str,
    service: str,
    *,
    store: SessionStore | None = None,
    key: str | None = None,
    auth_factor_token: str | None = None,
    refresh_margin: float = DEFAULT_REFRESH_MARGIN,
    portal: Portal | None = None,
) -> Session:
    """Blocking ``login``. Pass the ``portal`` the session's clients will use."""
    p, own = _with_portal(portal)
    try:
        call = partial(
            login,
            identifier,
            password,
            service,
            store=store,
            key=key,
            auth_factor_token=auth_factor_token,
            refresh_margin=refresh_margin,
        )
        return p.call(call)
    finally:
        if own:
            p.close()


def blocking_logout(session: Session | OAuthSession, *, portal: Portal | None = None) -> None:
    """Blocking ``logout`` of a password or an OAuth session."""
    p, own = _with_portal(portal)
    try:
        p.call(session.logout)
    finally:
        if own:
            p.close()

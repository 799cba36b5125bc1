"""Identity resolution: handle → DID → DID document → PDS and signing key.

``IdentityResolver`` (async, on ``httpx`` and ``dnspython``) implements the atproto specs
(atproto.com/specs/handle, /specs/did); ``BlockingIdentityResolver`` forwards to it through a
``Portal``. See docs/identity.md for the whole story; the short version:

- handle → DID: DNS TXT ``_atproto.<handle>`` first (exactly one distinct valid ``did=``
  value; several different ones are a conflict and the handle does not resolve), then, only
  when DNS gave nothing, ``https://<handle>/.well-known/atproto-did``;
- DID → document: ``did:plc`` from the PLC directory, ``did:web`` (hostname level only) from
  ``https://<host>/.well-known/did.json``; the document's ``id`` must be the DID;
- ``resolve()`` returns an ``Identity`` whose ``handle`` is set only when verified both ways
  (the handle resolves to the DID *and* the document's primary handle is that handle).

Results are cached (success and failure TTLs, bounded LRU); transient failures are not.
**When a signature fails to verify with a key from here, call ``invalidate(did)`` and
resolve once more**: the account may have rotated its key since it was cached. If the
fresh key fails too, the data is bad.

Errors: ``InvalidSyntaxError`` for malformed input (raised before any network call);
``VerificationError`` when the identity does not resolve or is unusable (not found, document
id mismatch, no PDS, no signing key, unsupported DID method, reserved TLD); ``TransientError``
(``RateLimitedError`` for 429) when the network or a server failed and a retry may help.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Literal

import anyio
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import httpx

from atsync._blocking import Portal
from atsync._errors import ClosedError, RateLimitedError, TransientError, VerificationError

from ._did_doc import (
    DidDocument,
    did_web_host,
    handle_tld_problem,
    parse_did_document,
    validate_atproto_did,
)
from ._syntax import is_valid_did, validate_at_identifier, validate_handle
from ._tls import tls_context
from ._ttl_cache import TtlCache
from ._xrpc_errors import retry_at

__all__ = [
    "DEFAULT_PLC_URL",
    "INVALID_HANDLE",
    "BlockingIdentityResolver",
    "Identity",
    "IdentityResolver",
]

DEFAULT_PLC_URL = "https://plc.directory"
INVALID_HANDLE = "handle.invalid"

# Caps on response bodies: a DID plus whitespace, and a DID document (PLC's are ~1 KB).
_WELL_KNOWN_LIMIT = 8 * 1024
_DOCUMENT_LIMIT = 128 * 1024
# "_atproto." (9 characters) + handle must fit the 253-character DNS name limit.
_MAX_DNS_HANDLE = 253 - len("_atproto.")
_MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Identity:
    """A resolved account. ``handle`` is ``None`` unless verified both ways; then
    ``handle_problem`` says why (not claimed, does not resolve, resolves elsewhere, or could
    not be checked because of a network failure)."""

    did: str
    handle: str | None
    pds: str
    signing_key: str
    handle_problem: str | None = None
    document: DidDocument | None = field(default=None, compare=False, repr=False)

    @property
    def display_handle(self) -> str:
        """The handle, or ``handle.invalid`` as atproto APIs show an unverified one."""
        return self.handle if self.handle is not None else INVALID_HANDLE


# --- cache -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HandleResult:
    """A definitive handle → DID answer: ``did``, or ``None`` and the ``reason``."""

    did: str | None
    reason: str | None = None


@dataclass(frozen=True)
class _DocFailure:
    """A definitive "this DID has no usable document" answer, cached like a success."""

    reason: str


@dataclass(frozen=True)
class _Outcome:
    """One handle resolution method's answer. ``failed`` means the method could not give a
    definitive answer (network, SERVFAIL, 5xx), so "no DID" must not be concluded from it."""

    kind: Literal["found", "absent", "conflict", "failed"]
    detail: str


_CacheKey = tuple[Literal["handle", "did"], str]
_CacheValue = _HandleResult | DidDocument | _DocFailure


# --- the resolver --------------------------------------------------------------------------


class IdentityResolver:
    """Resolve handles and DIDs to verified identities (see the module docstring).

    Options (all keyword-only):

    - ``plc_url``: the PLC directory; ``GET {plc_url}/{did}`` returns a did:plc document.
    - ``http_client``: an ``httpx.AsyncClient`` to use (not closed by ``aclose()``); by
      default one of our own. ``timeout`` applies per request either way.
    - ``dns_nameservers``: ``[(address, port), …]`` to query instead of the system resolver
      configuration; ``use_dns=False`` skips the DNS method altogether.
    - ``web_origin``: ``host -> base URL`` for the handle's ``/.well-known/atproto-did`` and
      a did:web's ``/.well-known/did.json``; the request then carries ``Host: <host>``. The
      default is ``https://<host>`` (``http://`` for did:web on ``localhost`` when allowed).
      Meant for development (e.g. every ``.test`` handle → the dev PDS, which answers
      ``/.well-known/atproto-did`` by ``Host``) and tests.
    - ``allow_insecure_localhost``: accept ``did:web:localhost[%3A<port>]`` and fetch it over
      plain http, as the DID spec allows for development only.
    - ``allow_test_handles``: resolve ``.test`` handles and did:web hosts (development only).
    - ``ttl`` / ``failure_ttl``: seconds a definitive success / failure stays cached;
      ``max_entries`` bounds the cache; ``clock`` (monotonic seconds) is injectable for tests.
    """

    def __init__(
        self,
        *,
        plc_url: str = DEFAULT_PLC_URL,
        http_client: httpx.AsyncClient | None = None,
        dns_nameservers: Sequence[tuple[str, int]] | None = None,
        use_dns: bool = True,
        web_origin: Callable[[str], str] | None = None,
        allow_insecure_localhost: bool = False,
        allow_test_handles: bool = False,
        timeout: float = 10.0,
        ttl: float = 3600.0,
        failure_ttl: float = 60.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0 or failure_ttl < 0 or timeout <= 0 or max_entries < 1:
            raise ValueError("ttl and failure_ttl must be >= 0, timeout > 0, max_entries >= 1")
        self._plc_url = plc_url.rstrip("/")
        self._own_http = http_client is None
        self._http = http_client or httpx.AsyncClient(
            verify=tls_context(), max_redirects=_MAX_REDIRECTS, headers={"User-Agent": "atsync"}
        )
        self._nameservers = list(dns_nameservers) if dns_nameservers is not None else None
        self._use_dns = use_dns
        self._dns: dns.asyncresolver.Resolver | None = None
        self._web_origin = web_origin
        self._allow_localhost = allow_insecure_localhost
        self._allow_test = allow_test_handles
        self._timeout = timeout
        self._ttl = ttl
        self._failure_ttl = failure_ttl
        self._cache: TtlCache[_CacheKey, _CacheValue] = TtlCache(max_entries, clock)
        self._inflight: dict[_CacheKey, anyio.Event] = {}
        # Bumped by invalidate()/clear(): a lookup that started before must not store its
        # (possibly stale) answer afterwards.
        self._generation = 0

    # -- public API ----------------------------------------------------------------------

    async def resolve(
        self, identifier: str, *, strict: bool = False, check_handle: bool = True
    ) -> Identity:
        """Resolve a handle or DID to an ``Identity`` with PDS and signing key.

        The handle is verified both ways; if that fails, ``handle`` is ``None`` and
        ``handle_problem`` says why — or, with ``strict=True``, ``VerificationError``.
        ``check_handle=False`` (a DID only): the handle is not looked up at all, for callers
        that need the PDS and key alone (verifying a repository's commits) — it costs a DNS
        query and perhaps an HTTPS request; ``handle`` is then ``None``.
        """
        ident = validate_at_identifier(identifier)
        handle: str | None
        problem: str | None
        if ident.startswith("did:") and not check_handle:
            doc = await self.resolve_did(ident)
            handle, problem = None, "not checked"
        elif ident.startswith("did:"):
            doc = await self.resolve_did(ident)
            handle, problem = await self._verify_claimed_handle(doc)
        else:
            did = await self.resolve_handle(ident)
            doc = await self.resolve_did(did)
            if doc.handle == ident:
                handle, problem = ident, None
            else:
                claimed = doc.handle or "no handle"
                handle, problem = None, f"the DID document of {did} claims {claimed}, not {ident}"
        if doc.pds is None:
            raise VerificationError(f"{doc.did} has no usable PDS: {doc.pds_problem}")
        if doc.signing_key is None:
            raise VerificationError(
                f"{doc.did} has no usable signing key: {doc.signing_key_problem}"
            )
        if strict and handle is None:
            raise VerificationError(f"handle of {doc.did} not verified: {problem}")
        return Identity(doc.did, handle, doc.pds, doc.signing_key, problem, doc)

    async def resolve_handle(self, handle: str) -> str:
        """The DID a handle points to (DNS TXT, then HTTPS well-known).

        This is one direction only: use ``resolve()`` for a handle you will show or trust.
        """
        h = self._check_handle(handle)
        result = await self._cached(("handle", h), partial(self._lookup_handle, h))
        assert isinstance(result, _HandleResult)
        if result.did is None:
            raise VerificationError(f"handle {h} does not resolve: {result.reason}")
        return result.did

    async def resolve_did(self, did: str) -> DidDocument:
        """The parsed DID document (``pds``/``signing_key`` may be ``None``: see its
        ``*_problem`` fields). The claimed handle is *not* verified here."""
        self._check_did(did)
        result = await self._cached(("did", did), partial(self._fetch_document, did))
        if isinstance(result, _DocFailure):
            raise VerificationError(result.reason)
        assert isinstance(result, DidDocument)
        return result

    def invalidate(self, identifier: str) -> None:
        """Forget what is cached about a DID (its document, and handles pointing to it) or a
        handle (its DID, and that DID's document), so the next resolution fetches afresh."""
        ident = validate_at_identifier(identifier)
        self._generation += 1
        if ident.startswith("did:"):
            doc = self._cache.pop(("did", ident))
            stale = self._cache.keys_where(
                lambda k, v: k[0] == "handle" and isinstance(v, _HandleResult) and v.did == ident
            )
            for key in stale:
                self._cache.pop(key)
            if isinstance(doc, DidDocument) and doc.handle is not None:
                self._cache.pop(("handle", doc.handle))
        else:
            result = self._cache.pop(("handle", ident))
            if isinstance(result, _HandleResult) and result.did is not None:
                self._cache.pop(("did", result.did))

    def clear(self) -> None:
        """Forget everything cached."""
        self._generation += 1
        self._cache.clear()

    async def aclose(self) -> None:
        """Close the HTTP client if the resolver created it."""
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> IdentityResolver:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- input checks (no network) --------------------------------------------------------

    def _check_handle(self, handle: str) -> str:
        h = validate_handle(handle)
        problem = handle_tld_problem(h, allow_test=self._allow_test)
        if problem:
            raise VerificationError(f"handle {h} cannot be resolved: {problem}")
        return h

    def _check_did(self, did: str) -> None:
        validate_atproto_did(did)
        if did.startswith("did:web:"):  # and what this resolver's policy allows of it
            did_web_host(did, allow_localhost=self._allow_localhost, allow_test=self._allow_test)

    # -- cache with single flight ---------------------------------------------------------

    async def _cached(
        self, key: _CacheKey, fetch: Callable[[], Awaitable[_CacheValue]]
    ) -> _CacheValue:
        while True:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            pending = self._inflight.get(key)
            if pending is None:
                break
            # Someone is fetching this already: wait and use their answer. If theirs failed
            # transiently nothing was cached, and the loop makes us fetch ourselves.
            await pending.wait()
        done = self._inflight[key] = anyio.Event()
        generation = self._generation
        try:
            value = await fetch()
            if generation == self._generation:
                ok = isinstance(value, DidDocument) or (
                    isinstance(value, _HandleResult) and value.did is not None
                )
                self._cache.put(key, value, self._ttl if ok else self._failure_ttl)
            return value
        finally:
            del self._inflight[key]
            done.set()

    # -- handle → DID ---------------------------------------------------------------------

    async def _lookup_handle(self, handle: str) -> _HandleResult:
        by_dns = await self._dns_lookup(handle)
        if by_dns.kind == "found":
            return _HandleResult(by_dns.detail)
        if by_dns.kind == "conflict":
            # The spec says resolution fails; the web server is not asked to break the tie.
            return _HandleResult(None, f"DNS: {by_dns.detail}")
        by_http = await self._well_known_lookup(handle)
        if by_http.kind == "found":
            return _HandleResult(by_http.detail)
        summary = f"DNS: {by_dns.detail}; HTTPS: {by_http.detail}"
        if "failed" in (by_dns.kind, by_http.kind):
            # A method that could not answer might have held the DID: not a definitive "no".
            raise TransientError(f"could not resolve handle {handle}: {summary}")
        return _HandleResult(None, summary)

    def _dns_resolver(self) -> dns.asyncresolver.Resolver:
        if self._dns is None:
            if self._nameservers is None:
                resolver = dns.asyncresolver.Resolver()  # reads /etc/resolv.conf
            else:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(address, port)
                    for address, port in self._nameservers
                ]
            resolver.lifetime = self._timeout
            self._dns = resolver
        return self._dns

    async def _dns_lookup(self, handle: str) -> _Outcome:
        if not self._use_dns:
            return _Outcome("absent", "not used (use_dns=False)")
        if len(handle) > _MAX_DNS_HANDLE:
            return _Outcome("absent", "handle too long for a DNS name with _atproto.")
        qname = dns.name.from_text(f"_atproto.{handle}")  # absolute: no search domains
        shown = qname.to_text(omit_final_dot=True)
        try:
            answer = await self._dns_resolver().resolve(qname, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return _Outcome("absent", f"no TXT record at {shown}")
        except dns.exception.DNSException as e:
            # Timeouts, SERVFAIL from every server, no resolver configuration...
            return _Outcome("failed", f"lookup of {shown} failed: {e or type(e).__name__}")
        dids: list[str] = []
        malformed = 0
        for rdata in answer:
            # A TXT record may be split into several strings; its value is their join.
            try:
                value = b"".join(rdata.strings).decode("ascii")
            except UnicodeDecodeError:
                continue
            if not value.startswith("did="):
                continue  # other TXT records are not ours to judge
            if is_valid_did(value[4:]):
                if value[4:] not in dids:
                    dids.append(value[4:])
            else:
                malformed += 1
        if len(dids) == 1:
            return _Outcome("found", dids[0])
        if len(dids) > 1:
            return _Outcome("conflict", f"conflicting did= records at {shown}: {dids}")
        note = f" ({malformed} with a malformed DID)" if malformed else ""
        return _Outcome("absent", f"no valid did= record at {shown}{note}")

    async def _well_known_lookup(self, handle: str) -> _Outcome:
        url = f"{self._origin(handle)}/.well-known/atproto-did"
        where = url if self._web_origin is None else f"{url} (Host: {handle})"
        try:
            status, body, _ = await self._get(url, host=handle, limit=_WELL_KNOWN_LIMIT)
        except TransientError as e:
            return _Outcome("failed", str(e))
        except VerificationError as e:
            return _Outcome("absent", str(e))
        if status == 429 or status >= 500:
            return _Outcome("failed", f"{where} answered HTTP {status}")
        if not 200 <= status < 300:
            return _Outcome("absent", f"{where} answered HTTP {status}")
        # The spec allows trimming whitespace; the content type need not be checked.
        text = body.decode("utf-8", errors="replace").strip()
        if not is_valid_did(text):
            return _Outcome("absent", f"{where} did not answer with a DID ({text[:60]!r})")
        return _Outcome("found", text)

    # -- DID → document -------------------------------------------------------------------

    async def _fetch_document(self, did: str) -> DidDocument | _DocFailure:
        if did.startswith("did:plc:"):
            url, host = f"{self._plc_url}/{did}", None
        else:
            web_host = did_web_host(
                did, allow_localhost=self._allow_localhost, allow_test=self._allow_test
            )
            url, host = f"{self._origin(web_host)}/.well-known/did.json", web_host
        try:
            status, body, headers = await self._get(url, host=host, limit=_DOCUMENT_LIMIT)
        except VerificationError as e:
            return _DocFailure(f"DID document of {did}: {e}")
        if status == 429:
            raise RateLimitedError(
                f"{url} is rate limiting DID resolution", reset_at=retry_at(headers, time.time())
            )
        if status >= 500:
            raise TransientError(f"{url} answered HTTP {status}", status=status)
        if status in (404, 410):
            return _DocFailure(f"{did} not found: {url} answered HTTP {status}")
        if not 200 <= status < 300:
            return _DocFailure(f"DID document of {did}: {url} answered HTTP {status}")
        try:
            data = json.loads(body)
        except ValueError:
            return _DocFailure(f"DID document of {did} from {url} is not JSON")
        try:
            return parse_did_document(did, data)
        except VerificationError as e:
            return _DocFailure(str(e))

    # -- HTTP -----------------------------------------------------------------------------

    def _origin(self, host: str) -> str:
        if self._web_origin is not None:
            return self._web_origin(host).rstrip("/")
        if self._allow_localhost and host.split(":")[0] == "localhost":
            return f"http://{host}"
        return f"https://{host}"

    async def _get(
        self, url: str, *, host: str | None, limit: int
    ) -> tuple[int, bytes, httpx.Headers]:
        """GET with redirects; the body is read only for 2xx, at most ``limit`` bytes.

        ``TransientError`` when no answer came (connection, timeout); ``VerificationError``
        when the answer is unusable whatever we retry (too large, redirect loop, bad scheme).
        """
        # With a custom origin the server must still learn which host is being asked for.
        headers = {"Host": host} if host is not None and self._web_origin is not None else {}
        try:
            async with self._http.stream(
                "GET", url, headers=headers, follow_redirects=True, timeout=self._timeout
            ) as resp:
                body = bytearray()
                if 200 <= resp.status_code < 300:
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > limit:
                            raise VerificationError(f"{url}: response larger than {limit} bytes")
                return resp.status_code, bytes(body), resp.headers
        except (httpx.TooManyRedirects, httpx.UnsupportedProtocol, httpx.DecodingError) as e:
            raise VerificationError(f"{url}: {e}") from e
        except httpx.TimeoutException as e:
            raise TransientError(f"{url}: timed out after {self._timeout} s") from e
        except httpx.HTTPError as e:
            raise TransientError(f"{url}: {e or type(e).__name__}") from e

    # -- bidirectional check --------------------------------------------------------------

    async def _verify_claimed_handle(self, doc: DidDocument) -> tuple[str | None, str | None]:
        claimed = doc.handle
        if claimed is None:
            return None, "the DID document claims no handle"
        try:
            did = await self.resolve_handle(claimed)
        except VerificationError as e:
            return None, str(e)
        except TransientError as e:
            # Not cached: the next resolve() tries again.
            return None, f"could not check handle {claimed}: {e}"
        if did != doc.did:
            return None, f"handle {claimed} resolves to {did}, not {doc.did}"
        return claimed, None


# --- blocking facade -------------------------------------------------------------------------


class BlockingIdentityResolver:
    """``IdentityResolver`` for blocking code: each method runs the async one on a ``Portal``.

    ``BlockingIdentityResolver(IdentityResolver(...))`` — the resolver may be built outside
    any event loop. Without ``portal`` it starts (on ``__enter__``) and stops its own.
    """

    def __init__(
        self, resolver: IdentityResolver | None = None, *, portal: Portal | None = None
    ) -> None:
        self.resolver = resolver if resolver is not None else IdentityResolver()
        self._own_portal = portal is None
        self._portal = portal if portal is not None else Portal()
        self._closed = False

    def __enter__(self) -> BlockingIdentityResolver:
        if self._own_portal:
            self._portal.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def resolve(self, identifier: str, *, strict: bool = False) -> Identity:
        return self._portal.call(partial(self.resolver.resolve, identifier, strict=strict))

    def resolve_handle(self, handle: str) -> str:
        return self._portal.call(self.resolver.resolve_handle, handle)

    def resolve_did(self, did: str) -> DidDocument:
        return self._portal.call(self.resolver.resolve_did, did)

    def invalidate(self, identifier: str) -> None:
        # On the loop's thread: the cache is not shared across threads.
        self._portal.call(_run_sync, partial(self.resolver.invalidate, identifier))

    def clear(self) -> None:
        self._portal.call(_run_sync, self.resolver.clear)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._portal.call(self.resolver.aclose)
        except ClosedError:
            pass  # never entered: the client was never used on any loop
        finally:
            if self._own_portal:
                self._portal.close()


async def _run_sync(fn: Callable[[], None]) -> None:
    fn()

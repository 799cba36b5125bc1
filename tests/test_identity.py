"""Identity resolution against real servers on loopback: the dev PDS and its PLC, a tiny DNS
server answering TXT queries, and a tiny HTTP server for well-known and did:web documents.
No mocks; requests are counted at the httpx client (event hook) and at the servers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from atsync._errors import (
    InvalidSyntaxError,
    RateLimitedError,
    TransientError,
    VerificationError,
)
from atsync.atproto import validate_atproto_did
from atsync.atproto._car import read_car
from atsync.atproto._crypto import generate_keypair
from atsync.atproto._devpds import DevPDS
from atsync.atproto._did_doc import parse_did_document
from atsync.atproto._identity import BlockingIdentityResolver, IdentityResolver
from atsync.atproto._verify import verify_commit
from loopback_servers import LoopbackDNS, LoopbackHTTP
from pds_fixtures import ACCOUNTS

DID_A = "did:plc:" + "a" * 24
DID_B = "did:plc:" + "b" * 24
DID_C = "did:plc:" + "c" * 24


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def dns_server() -> Any:
    with LoopbackDNS() as server:
        yield server


@pytest.fixture
def web() -> Any:
    with LoopbackHTTP() as server:
        yield server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    resolver: IdentityResolver
    requests: list[str]  # every URL the resolver's httpx client requested, in order
    dns: LoopbackDNS
    web: LoopbackHTTP


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def open_rig(
    dns_server: LoopbackDNS,
    web: LoopbackHTTP,
    *,
    origin: Callable[[str], str] | None = None,
    map_to_web: bool = True,
    **options: Any,
) -> AsyncIterator[Rig]:
    """A resolver on the loopback DNS server; by default every host's web origin is ``web``."""
    requests: list[str] = []

    async def log(request: httpx.Request) -> None:
        requests.append(str(request.url))

    options.setdefault("plc_url", f"http://127.0.0.1:{_closed_port()}")
    options.setdefault("allow_test_handles", True)
    async with httpx.AsyncClient(event_hooks={"request": [log]}) as client:
        resolver = IdentityResolver(
            http_client=client,
            dns_nameservers=[dns_server.address],
            web_origin=origin or ((lambda host: web.url) if map_to_web else None),
            timeout=5.0,
            **options,
        )
        async with resolver:
            yield Rig(resolver, requests, dns_server, web)


def did_web_for(web: LoopbackHTTP) -> str:
    return f"did:web:localhost%3A{web.port}"


def did_doc(
    did: str,
    *,
    handles: tuple[str, ...] = (),
    pds: str | None = "https://pds.example.com",
    key: str | None = None,
    with_key: bool = True,
    doc_id: str | None = None,
) -> dict[str, Any]:
    keypair = generate_keypair("p256")
    doc: dict[str, Any] = {
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": doc_id or did,
        "alsoKnownAs": [f"at://{h}" for h in handles],
        "verificationMethod": [],
        "service": [],
    }
    if with_key:
        doc["verificationMethod"].append(
            {
                "id": f"{did}#atproto",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": key or keypair.public_key_multibase,
            }
        )
    if pds is not None:
        doc["service"].append(
            {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}
        )
    return doc


def serve_did_web(web: LoopbackHTTP, did: str, doc: dict[str, Any]) -> None:
    host = did.removeprefix("did:web:").split("%")[0]
    web.route(host, "/.well-known/did.json", doc)


# --- the real PLC and PDS ---------------------------------------------------------------------


def pds_origin(pds: DevPDS, web: LoopbackHTTP) -> Callable[[str], str]:
    # The dev PDS answers /.well-known/atproto-did for its own .test handles by Host header.
    return lambda host: pds.pds_url if host in pds.accounts else web.url


@pytest.mark.pds
@pytest.mark.anyio
async def test_did_plc_resolves_to_the_dev_pds_and_its_signing_key(
    dev_pds: DevPDS, dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    alice, bob = dev_pds.accounts["alice.test"], dev_pds.accounts["bob.test"]
    async with open_rig(
        dns_server, web, plc_url=dev_pds.plc_url, origin=pds_origin(dev_pds, web)
    ) as rig:
        ident = await rig.resolver.resolve(alice.did)
        bob_ident = await rig.resolver.resolve(bob.did)
    assert ident.did == alice.did
    assert ident.pds == dev_pds.pds_url
    assert ident.handle == "alice.test" and ident.handle_problem is None
    assert ident.document is not None and ident.document.handles == ("alice.test",)
    assert ident.signing_key.startswith("did:key:z")
    # The handle was checked by DNS (NXDOMAIN here), then at the PDS's well-known endpoint.
    assert dns_server.queries[0] == "_atproto.alice.test"
    assert rig.requests[:2] == [
        f"{dev_pds.plc_url}/{alice.did}",
        f"{dev_pds.pds_url}/.well-known/atproto-did",
    ]

    async with httpx.AsyncClient(base_url=dev_pds.pds_url) as client:
        login = await client.post(
            "/xrpc/com.atproto.server.createSession",
            json={"identifier": "alice.test", "password": dict(ACCOUNTS)["alice.test"]},
        )
        token = login.json()["accessJwt"]
        creds = await client.get(
            "/xrpc/com.atproto.identity.getRecommendedDidCredentials",
            headers={"Authorization": f"Bearer {token}"},
        )
        repo = await client.get("/xrpc/com.atproto.sync.getRepo", params={"did": alice.did})
    # What the PDS itself holds as the account's key is what the resolver found...
    assert creds.json()["verificationMethods"]["atproto"] == ident.signing_key
    # ...and it verifies the signature on the repository's current commit; bob's does not.
    car = read_car(repo.content)
    assert verify_commit(car.blocks, car.root, alice.did, ident.signing_key).did == alice.did
    with pytest.raises(VerificationError, match="bad signature"):
        verify_commit(car.blocks, car.root, alice.did, bob_ident.signing_key)


@pytest.mark.pds
@pytest.mark.anyio
async def test_handle_resolves_through_the_pds_well_known_endpoint(
    dev_pds: DevPDS, dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    async with open_rig(
        dns_server, web, plc_url=dev_pds.plc_url, origin=pds_origin(dev_pds, web)
    ) as rig:
        ident = await rig.resolver.resolve("BOB.test")  # handles are case-insensitive
        assert ident.did == dev_pds.accounts["bob.test"].did
        assert ident.handle == "bob.test" and ident.pds == dev_pds.pds_url
        with pytest.raises(VerificationError, match=r"nobody\.test does not resolve.*HTTP 404"):
            await rig.resolver.resolve("nobody.test")


@pytest.mark.pds
@pytest.mark.anyio
async def test_handle_not_claimed_by_the_did_document_is_not_verified(
    dev_pds: DevPDS, dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    alice = dev_pds.accounts["alice.test"]
    dns_server.txt("_atproto.mallory.test", f"did={alice.did}")
    async with open_rig(
        dns_server, web, plc_url=dev_pds.plc_url, origin=pds_origin(dev_pds, web)
    ) as rig:
        assert await rig.resolver.resolve_handle("mallory.test") == alice.did  # one direction
        ident = await rig.resolver.resolve("mallory.test")
        assert ident.did == alice.did and ident.handle is None
        assert ident.display_handle == "handle.invalid"
        assert ident.handle_problem is not None and "claims alice.test" in ident.handle_problem
        with pytest.raises(VerificationError, match="not verified"):
            await rig.resolver.resolve("mallory.test", strict=True)


@pytest.mark.pds
@pytest.mark.anyio
async def test_did_claiming_a_handle_that_points_elsewhere_gets_no_handle(
    dev_pds: DevPDS, dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    did = did_web_for(web)
    serve_did_web(web, did, did_doc(did, handles=("alice.test",)))
    async with open_rig(
        dns_server,
        web,
        plc_url=dev_pds.plc_url,
        origin=pds_origin(dev_pds, web),
        allow_insecure_localhost=True,
    ) as rig:
        ident = await rig.resolver.resolve(did)
    assert ident.did == did and ident.handle is None
    assert ident.handle_problem == (
        f"handle alice.test resolves to {dev_pds.accounts['alice.test'].did}, not {did}"
    )


@pytest.mark.pds
def test_blocking_facade_resolves_through_a_portal(dev_pds: DevPDS) -> None:
    alice = dev_pds.accounts["alice.test"]
    resolver = IdentityResolver(
        plc_url=dev_pds.plc_url,
        use_dns=False,
        web_origin=lambda host: dev_pds.pds_url,
        allow_test_handles=True,
    )
    with BlockingIdentityResolver(resolver) as blocking:
        ident = blocking.resolve("alice.test")
        assert (ident.did, ident.handle, ident.pds) == (alice.did, "alice.test", dev_pds.pds_url)
        assert blocking.resolve_handle("bob.test") == dev_pds.accounts["bob.test"].did
        assert blocking.resolve_did(alice.did).signing_key == ident.signing_key
        blocking.invalidate(alice.did)
        blocking.clear()
        assert blocking.resolve(alice.did).signing_key == ident.signing_key
    blocking.close()  # a second close is harmless


# --- handle → DID over DNS TXT and HTTPS well-known --------------------------------------------


@pytest.mark.anyio
async def test_one_dns_record_resolves_without_asking_the_web(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    dns_server.txt("_atproto.one.test", "v=spf1 -all", f"did={DID_A}")
    # The same DID twice (as different records: one split in two strings) is no conflict.
    dns_server.txt("_atproto.twice.test", f"did={DID_B}", [b"did=", DID_B.encode()])
    dns_server.txt("_atproto.split.test", [b"did=did:plc:", b"c" * 24])
    web.route("one.test", "/.well-known/atproto-did", DID_C)
    async with open_rig(dns_server, web) as rig:
        assert await rig.resolver.resolve_handle("one.test") == DID_A
        assert await rig.resolver.resolve_handle("twice.test") == DID_B  # same DID twice: ok
        assert await rig.resolver.resolve_handle("split.test") == DID_C  # strings joined
    assert rig.requests == []
    assert dns_server.queries == ["_atproto.one.test", "_atproto.twice.test", "_atproto.split.test"]


@pytest.mark.anyio
async def test_conflicting_dns_records_do_not_resolve(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    dns_server.txt("_atproto.two.test", f"did={DID_A}", f"did={DID_B}")
    web.route("two.test", "/.well-known/atproto-did", DID_A)
    async with open_rig(dns_server, web) as rig:
        with pytest.raises(VerificationError, match="conflicting did= records"):
            await rig.resolver.resolve_handle("two.test")
    assert rig.requests == []  # the web server does not get to break the tie


@pytest.mark.anyio
async def test_malformed_did_in_dns_is_ignored(dns_server: LoopbackDNS, web: LoopbackHTTP) -> None:
    dns_server.txt("_atproto.bad.test", "did=did:PLC:nope")
    dns_server.txt("_atproto.mixed.test", "did=not a did", f"did={DID_A}")
    async with open_rig(dns_server, web) as rig:
        with pytest.raises(VerificationError, match=r"1 with a malformed DID.*HTTP 404"):
            await rig.resolver.resolve_handle("bad.test")
        assert rig.requests == [f"{web.url}/.well-known/atproto-did"]  # fell back, found none
        assert await rig.resolver.resolve_handle("mixed.test") == DID_A


@pytest.mark.anyio
async def test_nxdomain_falls_back_to_well_known(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    web.route("fallback.test", "/.well-known/atproto-did", f"  {DID_A}\r\n")
    web.route("moved.test", "/.well-known/atproto-did", "", status=302,
              headers={"Location": "/elsewhere"})  # fmt: skip
    web.route("moved.test", "/elsewhere", DID_B)
    web.route("junk.test", "/.well-known/atproto-did", "<html>hello</html>")
    async with open_rig(dns_server, web) as rig:
        assert await rig.resolver.resolve_handle("fallback.test") == DID_A
        assert await rig.resolver.resolve_handle("moved.test") == DID_B
        with pytest.raises(VerificationError, match="did not answer with a DID"):
            await rig.resolver.resolve_handle("junk.test")
    assert dns_server.queries[0] == "_atproto.fallback.test"
    # The request went to the mapped origin but named the handle as its Host.
    assert web.hits[0] == ("fallback.test", "/.well-known/atproto-did")


@pytest.mark.anyio
async def test_failures_that_could_hide_a_did_are_transient(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    dns_server.servfail("_atproto.dnsdown.test")
    dns_server.servfail("_atproto.dnsdown-webok.test")
    web.route("dnsdown-webok.test", "/.well-known/atproto-did", DID_A)
    web.route("webdown.test", "/.well-known/atproto-did", "oops", status=500)
    async with open_rig(dns_server, web) as rig:
        with pytest.raises(TransientError, match=r"could not resolve handle dnsdown\.test"):
            await rig.resolver.resolve_handle("dnsdown.test")
        assert await rig.resolver.resolve_handle("dnsdown-webok.test") == DID_A
        with pytest.raises(TransientError, match="HTTP 500"):
            await rig.resolver.resolve_handle("webdown.test")
        # Transient failures are not cached: asking again asks the servers again.
        before = len(rig.requests)
        with pytest.raises(TransientError):
            await rig.resolver.resolve_handle("webdown.test")
        assert len(rig.requests) == before + 1


# --- DID → document: did:web ---------------------------------------------------------------


def serve_webby(dns_server: LoopbackDNS, web: LoopbackHTTP, claimed: str) -> tuple[str, Any]:
    """A did:web on localhost whose document claims ``claimed`` (any case), and the DNS
    record of webby.test pointing back at it: its DID and signing keypair."""
    did = did_web_for(web)
    keypair = generate_keypair("k256")
    serve_did_web(
        web,
        did,
        did_doc(did, handles=(claimed,), key=keypair.public_key_multibase,
                pds="https://pds.example.com/"),
    )  # fmt: skip
    dns_server.txt("_atproto.webby.test", f"did={did}")
    return did, keypair


@pytest.mark.anyio
async def test_did_web_on_localhost_with_a_dns_verified_handle(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    did, keypair = serve_webby(dns_server, web, "Webby.test")
    # No origin mapping: did:web:localhost%3A<port> itself says where to go (plain http).
    async with open_rig(dns_server, web, map_to_web=False, allow_insecure_localhost=True) as rig:
        ident = await rig.resolver.resolve("webby.test")
    assert ident.did == did and ident.handle == "webby.test"
    assert ident.pds == "https://pds.example.com"
    assert ident.signing_key == keypair.did
    assert rig.requests == [f"http://localhost:{web.port}/.well-known/did.json"]


@pytest.mark.anyio
async def test_a_did_resolved_without_its_handle_asks_no_dns_and_no_web_for_it(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    """What a pull needs (the PDS and the signing key) costs the DID document alone: no DNS
    query and no well-known request for the handle the document claims."""
    did, keypair = serve_webby(dns_server, web, "webby.test")
    async with open_rig(dns_server, web, map_to_web=False, allow_insecure_localhost=True) as rig:
        ident = await rig.resolver.resolve(did, check_handle=False)
        assert ident.pds == "https://pds.example.com"
        assert ident.signing_key == keypair.did
        assert ident.handle is None and ident.handle_problem == "not checked"
        assert dns_server.queries == []
        assert rig.requests == [f"http://localhost:{web.port}/.well-known/did.json"]
        checked = await rig.resolver.resolve(did)  # the same DID, its handle checked
        assert checked.handle == "webby.test"
        assert dns_server.queries == ["_atproto.webby.test"]


@pytest.mark.anyio
async def test_did_web_through_a_mapped_origin(dns_server: LoopbackDNS, web: LoopbackHTTP) -> None:
    did = "did:web:webhost.test"
    web.route("webhost.test", "/.well-known/did.json", did_doc(did))
    async with open_rig(dns_server, web) as rig:
        doc = await rig.resolver.resolve_did(did)
    assert doc.did == did and doc.pds == "https://pds.example.com"
    assert web.hits == [("webhost.test", "/.well-known/did.json")]


@pytest.mark.anyio
async def test_did_document_errors(dns_server: LoopbackDNS, web: LoopbackHTTP) -> None:
    web.route("mismatch.test", "/.well-known/did.json", did_doc("did:web:other.test"))
    web.route("missing.test", "/.well-known/did.json", "gone", status=404)
    web.route("notjson.test", "/.well-known/did.json", "{nope")
    web.route("busy.test", "/.well-known/did.json", "", status=503)
    web.route("slowdown.test", "/.well-known/did.json", "", status=429,
              headers={"Retry-After": "30"})  # fmt: skip
    web.route("big.test", "/.well-known/did.json", b" " * (200 * 1024))
    web.route("nopds.test", "/.well-known/did.json", did_doc("did:web:nopds.test", pds=None))
    web.route("nokey.test", "/.well-known/did.json", did_doc("did:web:nokey.test", with_key=False))
    async with open_rig(dns_server, web) as rig:
        r = rig.resolver
        with pytest.raises(VerificationError, match="does not match the DID did:web:mismatch"):
            await r.resolve_did("did:web:mismatch.test")
        with pytest.raises(VerificationError, match=r"did:web:missing\.test not found.*404"):
            await r.resolve_did("did:web:missing.test")
        with pytest.raises(VerificationError, match="is not JSON"):
            await r.resolve_did("did:web:notjson.test")
        with pytest.raises(TransientError, match="HTTP 503"):
            await r.resolve_did("did:web:busy.test")
        asked_at = time.time()
        with pytest.raises(RateLimitedError) as limited:
            await r.resolve_did("did:web:slowdown.test")
        assert limited.value.reset_at is not None
        assert asked_at + 30 <= limited.value.reset_at <= time.time() + 30  # Retry-After: 30
        with pytest.raises(VerificationError, match="larger than"):
            await r.resolve_did("did:web:big.test")
        # A document without PDS or key still parses; an Identity cannot be made from it.
        assert (await r.resolve_did("did:web:nopds.test")).pds is None
        with pytest.raises(VerificationError, match="no usable PDS: no service #atproto_pds"):
            await r.resolve("did:web:nopds.test")
        with pytest.raises(VerificationError, match="no usable signing key"):
            await r.resolve("did:web:nokey.test")


@pytest.mark.anyio
async def test_unreachable_plc_is_a_transient_error(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    async with open_rig(dns_server, web) as rig:  # plc_url points at a closed port
        for _ in range(2):
            with pytest.raises(TransientError, match=DID_A):
                await rig.resolver.resolve_did(DID_A)
    assert len(rig.requests) == 2  # not cached


# --- rejected before any network call ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("identifier", "error", "match"),
    [
        ("john..test", InvalidSyntaxError, "invalid AT identifier"),
        ("did:PLC:abc", InvalidSyntaxError, "invalid AT identifier"),
        ("alice.test ", InvalidSyntaxError, "invalid AT identifier"),
        ("did:plc:tooshort", InvalidSyntaxError, "invalid did:plc"),
        ("did:web:bad%20host.test", InvalidSyntaxError, "only %3A"),
        ("did:web:localhost%3Aabc", InvalidSyntaxError, "is not a number"),
        ("did:web:host.test%3A8080", VerificationError, "ports are allowed only on localhost"),
        ("did:web:localhost%3A8080", VerificationError, "allow_insecure_localhost"),
        ("did:web:example.com:user:alice", VerificationError, "path-based did:web"),
        ("did:web:printer.local", VerificationError, r"\.local top-level domain is reserved"),
        ("did:key:zQ3shZc2QzApp2oymGvQbzP8eKheVshBHbU4ZYjeXqwSKEn6N", VerificationError,
         "unsupported DID method did:key"),
        ("laptop.local", VerificationError, r"\.local top-level domain is reserved"),
        ("handle.invalid", VerificationError, r"\.invalid top-level domain is reserved"),
        ("dev.test", VerificationError, "allow_test_handles"),
    ],
)  # fmt: skip
async def test_rejected_before_any_network_call(
    dns_server: LoopbackDNS,
    web: LoopbackHTTP,
    identifier: str,
    error: type[Exception],
    match: str,
) -> None:
    async with open_rig(dns_server, web, allow_test_handles=False) as rig:
        with pytest.raises(error, match=match):
            await rig.resolver.resolve(identifier)
    assert rig.requests == [] and dns_server.queries == [] and web.hits == []


@pytest.mark.parametrize(
    ("did", "error", "match"),
    [
        ("did:plc:tooshort", InvalidSyntaxError, "invalid did:plc"),
        ("did:plc:UPPERCASE0000000000000000", InvalidSyntaxError, "invalid did:plc"),
        ("did:web:bad%20host.test", InvalidSyntaxError, "only %3A"),
        ("did:web:host.test%3A8080", VerificationError, "ports are allowed only on localhost"),
        ("did:web:example.com:user:alice", VerificationError, "path-based did:web"),
        ("did:web:printer.local", VerificationError, r"\.local top-level domain is reserved"),
        ("did:key:zQ3shZc2QzApp2oymGvQbzP8eKheVshBHbU4ZYjeXqwSKEn6N", VerificationError,
         "unsupported DID method did:key"),
        ("not a did", InvalidSyntaxError, "DID"),
    ],
)  # fmt: skip
def test_validate_atproto_did_refuses_what_no_resolver_takes(
    did: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        validate_atproto_did(did)


@pytest.mark.parametrize(
    "did",
    ["did:plc:ewvi7nxzyoun6zhxrhs64oiz", "did:web:example.com", "did:web:localhost%3A2583",
     "did:web:dev.test"],
)  # fmt: skip
def test_validate_atproto_did_leaves_policy_to_the_resolver(did: str) -> None:
    # localhost ports and .test hosts are well formed; whether to resolve them is the
    # resolver's choice (allow_insecure_localhost, allow_test_handles)
    assert validate_atproto_did(did) == did


# --- caching -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cache_hits_expiry_and_invalidation(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    did = "did:web:cached.test"
    web.route("cached.test", "/.well-known/did.json", did_doc(did, handles=("cached.test",)))
    dns_server.txt("_atproto.cached.test", f"did={did}")
    clock = Clock()
    async with open_rig(dns_server, web, clock=clock, ttl=100.0) as rig:
        first = await rig.resolver.resolve("cached.test")
        assert (len(rig.requests), len(dns_server.queries)) == (1, 1)

        again = await rig.resolver.resolve(did)  # a hit for both the document and the handle
        assert again == first and (len(rig.requests), len(dns_server.queries)) == (1, 1)

        clock.now += 99.0
        await rig.resolver.resolve("cached.test")
        assert (len(rig.requests), len(dns_server.queries)) == (1, 1)

        clock.now += 1.0  # the entries are now exactly ttl old: expired
        await rig.resolver.resolve("cached.test")
        assert (len(rig.requests), len(dns_server.queries)) == (2, 2)

        # After a failed signature check: invalidate the DID, resolve once more.
        rig.resolver.invalidate(did)
        await rig.resolver.resolve(did)
        assert (len(rig.requests), len(dns_server.queries)) == (3, 3)

        rig.resolver.invalidate("cached.test")  # drops the handle and its DID's document
        await rig.resolver.resolve("cached.test")
        assert (len(rig.requests), len(dns_server.queries)) == (4, 4)


@pytest.mark.anyio
async def test_invalidating_a_did_forgets_the_handles_about_it(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    claims_other = "did:web:claims-other.test"  # claims a handle that points elsewhere
    pointed_at = "did:web:pointed-at.test"  # a handle points at it that it does not claim
    web.route("claims-other.test", "/.well-known/did.json",
              did_doc(claims_other, handles=("elsewhere.test",)))  # fmt: skip
    web.route("pointed-at.test", "/.well-known/did.json", did_doc(pointed_at))
    dns_server.txt("_atproto.elsewhere.test", f"did={DID_A}")
    dns_server.txt("_atproto.alias.test", f"did={pointed_at}")
    async with open_rig(dns_server, web) as rig:
        assert (await rig.resolver.resolve(claims_other)).handle is None
        assert await rig.resolver.resolve_handle("alias.test") == pointed_at
        assert dns_server.queries == ["_atproto.elsewhere.test", "_atproto.alias.test"]

        rig.resolver.invalidate(claims_other)
        rig.resolver.invalidate(pointed_at)
        await rig.resolver.resolve(claims_other)
        await rig.resolver.resolve_handle("alias.test")
        assert dns_server.queries[2:] == ["_atproto.elsewhere.test", "_atproto.alias.test"]


@pytest.mark.anyio
async def test_failures_are_cached_for_failure_ttl(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    did = "did:web:later.test"
    clock = Clock()
    async with open_rig(dns_server, web, clock=clock, failure_ttl=30.0) as rig:
        for _ in range(2):
            with pytest.raises(VerificationError, match="not found"):
                await rig.resolver.resolve_did(did)
        with pytest.raises(VerificationError, match="does not resolve"):
            await rig.resolver.resolve_handle("later.test")
        assert len(rig.requests) == 2 and len(dns_server.queries) == 1  # doc + well-known

        web.route("later.test", "/.well-known/did.json", did_doc(did))
        web.route("later.test", "/.well-known/atproto-did", did)
        clock.now += 30.0
        assert (await rig.resolver.resolve_did(did)).did == did
        assert await rig.resolver.resolve_handle("later.test") == did
        assert len(rig.requests) == 4


@pytest.mark.anyio
async def test_cache_is_bounded_and_evicts_the_least_recently_used(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    n0, n1, n2 = dids = [f"did:web:n{i}.test" for i in range(3)]
    for did in dids:
        web.route(did.removeprefix("did:web:"), "/.well-known/did.json", did_doc(did))
    async with open_rig(dns_server, web, max_entries=2) as rig:
        await rig.resolver.resolve_did(n0)
        await rig.resolver.resolve_did(n1)
        await rig.resolver.resolve_did(n0)  # a hit, and n0 is now the most recently used
        await rig.resolver.resolve_did(n2)  # evicts n1
        assert len(rig.requests) == 3
        await rig.resolver.resolve_did(n0)
        assert len(rig.requests) == 3
        await rig.resolver.resolve_did(n1)
        assert rig.requests[-1].startswith(web.url) and len(rig.requests) == 4
        assert web.hits[-1] == ("n1.test", "/.well-known/did.json")


@pytest.mark.anyio
async def test_concurrent_lookups_share_one_request(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    did = "did:web:shared.test"
    web.route("shared.test", "/.well-known/did.json", did_doc(did))
    results = []

    async def lookup() -> None:
        results.append(await rig.resolver.resolve_did(did))

    async with open_rig(dns_server, web) as rig:
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(lookup)
    assert len(results) == 5 and all(r == results[0] for r in results)
    assert len(rig.requests) == 1


@pytest.mark.anyio
async def test_invalidate_during_a_lookup_discards_its_answer(
    dns_server: LoopbackDNS, web: LoopbackHTTP
) -> None:
    did = "did:web:racing.test"
    web.route("racing.test", "/.well-known/did.json", did_doc(did))
    arrived, release = threading.Event(), threading.Event()

    def hold() -> None:
        arrived.set()
        release.wait()

    web.before_reply = hold
    async with open_rig(dns_server, web) as rig:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rig.resolver.resolve_did, did)
            await anyio.to_thread.run_sync(arrived.wait)  # the request is at the server
            rig.resolver.invalidate(did)
            web.before_reply = None
            release.set()
        await rig.resolver.resolve_did(did)  # the first answer predates invalidate()
    assert len(rig.requests) == 2


# --- document parsing details (no I/O) -----------------------------------------------------------


def test_document_primary_handle_is_the_first_valid_at_uri() -> None:
    did = DID_A
    doc = did_doc(did)
    doc["alsoKnownAs"] = ["https://x.example", "at://not a handle", "at://First.example",
                          "at://second.example"]  # fmt: skip
    parsed = parse_did_document(did, doc)
    assert parsed.handle == "first.example"
    assert parsed.handles == ("first.example", "second.example")


def test_document_signing_key_rules() -> None:
    did = DID_A
    good, other = generate_keypair("p256"), generate_keypair("ed25519")
    doc = did_doc(did, key=good.public_key_multibase)
    doc["verificationMethod"] = [
        {"id": "#atproto", "type": "Multikey", "controller": "did:plc:" + "z" * 24,
         "publicKeyMultibase": other.public_key_multibase},  # wrong controller: skipped
        {"id": f"{did}#other", "type": "Multikey", "controller": did,
         "publicKeyMultibase": other.public_key_multibase},  # not #atproto: skipped
        {"id": "#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": "zzz"},
        {"id": "#atproto", "type": "Multikey", "controller": did,
         "publicKeyMultibase": good.public_key_multibase},
    ]  # fmt: skip
    parsed = parse_did_document(did, doc)
    assert parsed.signing_key == good.did
    doc["verificationMethod"] = doc["verificationMethod"][:1]
    parsed = parse_did_document(did, doc)
    assert parsed.signing_key is None and parsed.signing_key_problem is not None
    assert "controller" in parsed.signing_key_problem


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("https://pds.example.com", "https://pds.example.com"),
        ("http://localhost:2583/", "http://localhost:2583"),
        ("https://pds.example.com/xrpc", None),
        ("https://user@pds.example.com", None),
        ("ftp://pds.example.com", None),
        ("https://pds.example.com:notaport", None),
    ],
)
def test_document_pds_endpoint_must_be_a_bare_origin(endpoint: str, expected: str | None) -> None:
    parsed = parse_did_document(DID_A, did_doc(DID_A, pds=endpoint))
    assert parsed.pds == expected
    assert (parsed.pds_problem is None) == (expected is not None)


def test_document_first_matching_pds_service_counts_even_if_invalid() -> None:
    doc = did_doc(DID_A, pds="https://pds.example.com/path")
    doc["service"].append(
        {"id": f"{DID_A}#atproto_pds", "type": "AtprotoPersonalDataServer",
         "serviceEndpoint": "https://second.example.com"}
    )  # fmt: skip
    assert parse_did_document(DID_A, doc).pds is None


def test_document_structure_errors() -> None:
    with pytest.raises(VerificationError, match="not a JSON object"):
        parse_did_document(DID_A, ["not", "a", "doc"])
    with pytest.raises(VerificationError, match="'service' is not a list"):
        parse_did_document(DID_A, {**did_doc(DID_A), "service": {"id": "#atproto_pds"}})
    with pytest.raises(VerificationError, match="does not match"):
        parse_did_document(DID_A, did_doc(DID_A, doc_id=DID_B))

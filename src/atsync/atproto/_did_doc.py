"""DID documents as atproto reads them, and the DID methods atproto allows.

Pure functions, no I/O: ``parse_did_document`` extracts what atproto needs from a resolved
document (atproto.com/specs/did), and ``did_web_host`` / ``validate_did_plc`` check the two
"blessed" DID methods before anything goes on the network. ``_identity`` does the fetching.

What is extracted, per the spec:

- handle: the *first valid* ``at://<handle>`` entry of ``alsoKnownAs``; later entries are
  ignored for verification (every service must agree on one handle per DID);
- signing key: the first valid ``verificationMethod`` whose ``id`` is ``#atproto`` or
  ``<did>#atproto`` and whose ``controller`` is the DID, as a ``did:key`` (``Multikey`` or the
  legacy ``EcdsaSecp256…VerificationKey2019`` forms);
- PDS: the first ``service`` whose ``id`` is ``#atproto_pds`` or ``<did>#atproto_pds`` and
  whose ``type`` is ``AtprotoPersonalDataServer``; its endpoint must be a bare http(s) origin.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from atsync._errors import InvalidSyntaxError, VerificationError

from ._crypto import did_key_from_verification_method
from ._syntax import is_valid_handle, validate_did, validate_handle

__all__ = [
    "RESERVED_TLDS",
    "DidDocument",
    "did_web_host",
    "handle_tld_problem",
    "parse_did_document",
    "validate_atproto_did",
    "validate_did_plc",
]

# atproto.com/specs/handle "Additional Non-Syntax Restrictions": valid syntax, but resolution
# must fail at once. The same list applies to did:web hostnames (specs/did).
RESERVED_TLDS = frozenset(
    ("alt", "arpa", "example", "internal", "invalid", "local", "localhost", "onion")
)

_DID_PLC = re.compile(r"did:plc:[a-z2-7]{24}")
_PORT = re.compile(r"[0-9]{1,5}")


def validate_did_plc(did: str) -> str:
    """``did:plc:`` followed by 24 lowercase base32 characters, else ``InvalidSyntaxError``."""
    if not _DID_PLC.fullmatch(did):
        raise InvalidSyntaxError(f"invalid did:plc {did!r:.80}: must be did:plc: + 24 of a-z 2-7")
    return did


def validate_atproto_did(did: str) -> str:
    """A DID atproto can resolve, by syntax alone: ``did:plc:`` and 24 base32 characters, or
    a hostname ``did:web`` (a port only on localhost; whether that and ``.test`` hosts may be
    resolved is the resolver's policy). ``InvalidSyntaxError`` for a malformed DID;
    ``VerificationError`` for a method or form atproto does not use."""
    validate_did(did)
    if did.startswith("did:plc:"):
        return validate_did_plc(did)
    if did.startswith("did:web:"):
        did_web_host(did, allow_localhost=True, allow_test=True)
        return did
    method = did.split(":", 2)[1]
    raise VerificationError(
        f"unsupported DID method did:{method} ({did:.80}): atproto uses did:plc and did:web"
    )


def handle_tld_problem(hostname: str, *, allow_test: bool) -> str | None:
    """Why a syntactically valid handle or did:web host must not be resolved, or ``None``."""
    tld = hostname.rsplit(".", 1)[-1].lower()
    if tld in RESERVED_TLDS:
        return f"the .{tld} top-level domain is reserved and never resolves in atproto"
    if tld == "test" and not allow_test:
        return "the .test top-level domain is for development only (allow_test_handles=True)"
    return None


def did_web_host(did: str, *, allow_localhost: bool, allow_test: bool) -> str:
    """The ``host`` or ``localhost:port`` a ``did:web`` names.

    ``InvalidSyntaxError`` for a malformed DID or host; ``VerificationError`` for what atproto does
    not support: path-based did:web, ports or ``localhost`` outside development, reserved TLDs.
    """
    validate_did(did)
    if not did.startswith("did:web:"):
        raise InvalidSyntaxError(f"{did!r:.80} is not a did:web")
    ident = did[len("did:web:") :]
    if ":" in ident:
        raise VerificationError(f"{did}: path-based did:web is not supported in atproto")
    # A port is the only percent-encoding a hostname-level did:web can carry.
    host, sep, port = re.sub("%3[aA]", ":", ident, count=1).partition(":")
    if "%" in host or "%" in port:
        raise InvalidSyntaxError(f"invalid did:web {did!r:.80}: only %3A (a port colon) is allowed")
    if sep and not _PORT.fullmatch(port):
        raise InvalidSyntaxError(f"invalid did:web {did!r:.80}: port {port!r} is not a number")
    if host.lower() == "localhost":
        if not allow_localhost:
            raise VerificationError(
                f"{did}: did:web on localhost is for development only "
                "(allow_insecure_localhost=True)"
            )
        return f"localhost:{port}" if sep else "localhost"
    if sep:
        raise VerificationError(f"{did}: did:web ports are allowed only on localhost")
    try:
        hostname = validate_handle(host)  # handle syntax is exactly hostname syntax
    except InvalidSyntaxError as e:
        raise InvalidSyntaxError(f"invalid did:web {did!r:.80}: {e}") from None
    problem = handle_tld_problem(hostname, allow_test=allow_test)
    if problem:
        raise VerificationError(f"{did}: {problem}")
    return hostname


@dataclass(frozen=True)
class DidDocument:
    """What atproto reads from a DID document.

    ``pds`` and ``signing_key`` are ``None`` when the document has no valid entry; the
    matching ``*_problem`` says why. ``raw`` is the document as received.
    """

    did: str
    handles: tuple[str, ...]
    pds: str | None
    signing_key: str | None
    pds_problem: str | None = None
    signing_key_problem: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def handle(self) -> str | None:
        """The primary handle: the first valid ``at://`` entry (not yet verified!)."""
        return self.handles[0] if self.handles else None


def _list_field(doc: Mapping[str, Any], name: str, did: str) -> list[Any]:
    value = doc.get(name, [])
    if not isinstance(value, list):
        raise VerificationError(f"DID document of {did}: {name!r} is not a list")
    return value


def _fragment_id(value: object, did: str, fragment: str) -> bool:
    return value in (f"#{fragment}", f"{did}#{fragment}")


def _handles(aka: list[Any]) -> tuple[str, ...]:
    out: list[str] = []
    for entry in aka:
        if isinstance(entry, str) and entry.startswith("at://"):
            candidate = entry[len("at://") :]
            # Invalid entries are skipped: the spec's primary handle is the first *valid* one.
            if is_valid_handle(candidate):
                handle = candidate.lower()
                if handle not in out:
                    out.append(handle)
    return tuple(out)


def _signing_key(methods: list[Any], did: str) -> tuple[str | None, str | None]:
    problem = "no verificationMethod with id #atproto"
    for method in methods:
        if not isinstance(method, Mapping) or not _fragment_id(method.get("id"), did, "atproto"):
            continue
        if method.get("controller") != did:
            problem = f"#atproto key controller {method.get('controller')!r:.80} is not {did}"
            continue
        suite, multibase = method.get("type"), method.get("publicKeyMultibase")
        if not isinstance(suite, str) or not isinstance(multibase, str):
            problem = "#atproto key lacks a string type or publicKeyMultibase"
            continue
        try:
            return did_key_from_verification_method(suite, multibase), None
        except VerificationError as e:
            problem = f"#atproto key unusable: {e}"
    return None, problem


def _pds_endpoint(services: list[Any], did: str) -> tuple[str | None, str | None]:
    for service in services:
        if not (
            isinstance(service, Mapping)
            and _fragment_id(service.get("id"), did, "atproto_pds")
            and service.get("type") == "AtprotoPersonalDataServer"
        ):
            continue
        # The spec says the first matching entry counts, valid or not: no fallback to others.
        endpoint = service.get("serviceEndpoint")
        if not isinstance(endpoint, str):
            return None, "#atproto_pds serviceEndpoint is not a string"
        try:
            url = urlsplit(endpoint)
            url.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            return None, f"#atproto_pds endpoint {endpoint!r:.80} is not a URL"
        if (
            url.scheme not in ("http", "https")
            or not url.hostname
            or url.username is not None
            or url.path not in ("", "/")
            or url.query
            or url.fragment
        ):
            return None, (
                f"#atproto_pds endpoint {endpoint!r:.80} is not a bare http(s) origin "
                "(scheme, host and optional port only)"
            )
        return f"{url.scheme}://{url.netloc}", None
    return None, "no service #atproto_pds of type AtprotoPersonalDataServer"


def parse_did_document(did: str, doc: object) -> DidDocument:
    """Check that ``doc`` is ``did``'s document and extract the atproto parts.

    ``VerificationError`` if it is not a JSON object, its ``id`` is not exactly ``did`` (a
    server answering with another DID's document must not be believed), or a field that must
    be a list is not one. A missing PDS or key is not an error here: see ``DidDocument``.
    """
    if not isinstance(doc, Mapping):
        raise VerificationError(f"DID document of {did} is not a JSON object")
    if doc.get("id") != did:
        raise VerificationError(
            f"DID document id {doc.get('id')!r:.80} does not match the DID {did} it was "
            "resolved for"
        )
    handles = _handles(_list_field(doc, "alsoKnownAs", did))
    key, key_problem = _signing_key(_list_field(doc, "verificationMethod", did), did)
    pds, pds_problem = _pds_endpoint(_list_field(doc, "service", did), did)
    return DidDocument(
        did=did,
        handles=handles,
        pds=pds,
        signing_key=key,
        pds_problem=pds_problem,
        signing_key_problem=key_problem,
        raw=doc,
    )

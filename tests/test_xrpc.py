"""The XRPC client against the real reference PDS: every call, streaming, the firehose, and
how each kind of failure is classified (docs/xrpc.md)."""

from __future__ import annotations

import io
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from atsync._blocking import Portal
from atsync._errors import (
    AuthError,
    PermanentError,
    RateLimitedError,
    TransientError,
    VerificationError,
)
from atsync.atproto._blocking_client import BlockingXrpcClient
from atsync.atproto._car import CarReader, read_car
from atsync.atproto._cbor import CID, cid_for_record, encode_dag_cbor
from atsync.atproto._crypto import did_key_from_verification_method
from atsync.atproto._devpds import DevPDS
from atsync.atproto._firehose import decode_frame
from atsync.atproto._session import Session, SessionData
from atsync.atproto._syntax import TidClock
from atsync.atproto._verify import iter_repo_records, verify_record_proof
from atsync.atproto._xrpc import (
    Create,
    Delete,
    Update,
    XrpcClient,
    outcome_unknown,
)
from atsync.atproto._xrpc_errors import classify_response, retry_at
from pds_fixtures import ACCOUNTS, MakePDS

pytestmark = [pytest.mark.pds, pytest.mark.anyio]

COLL = "com.example.atsync.xrpcTest"
CLOCK = TidClock()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def alice_data(dev_pds: DevPDS) -> SessionData:
    # One createSession for the module; each test wraps it in a Session of its own loop.
    handle, password = ACCOUNTS[0]
    resp = httpx.post(
        f"{dev_pds.pds_url}/xrpc/com.atproto.server.createSession",
        json={"identifier": handle, "password": password},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    return SessionData(body["did"], handle, dev_pds.pds_url, body["accessJwt"], body["refreshJwt"])


@pytest.fixture
def client(alice_data: SessionData) -> XrpcClient:
    return XrpcClient(session=Session(alice_data))


def note(text: str, **extra: Any) -> dict[str, Any]:
    return {"$type": COLL, "text": text, "createdAt": "2024-05-01T12:00:00.000Z", **extra}


def signing_key(pds: DevPDS, did: str) -> str:
    doc = httpx.get(f"{pds.plc_url}/{did}").json()
    [method] = [m for m in doc["verificationMethod"] if m["id"].endswith("#atproto")]
    return did_key_from_verification_method(method["type"], method["publicKeyMultibase"])


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- com.atproto.repo ----------------------------------------------------------------------------


async def test_create_get_put_delete(client: XrpcClient) -> None:
    async with client:
        repo = alice_did(client)
        rkey = CLOCK.next()
        record = note("hello ✓", raw=b"\x01\x02", link=CID.for_data(b"x"))
        created = await client.create_record(repo, COLL, record, rkey=rkey)
        assert created.uri == f"at://{repo}/{COLL}/{rkey}"
        assert created.cid == cid_for_record(record)  # bytes and links survive the JSON hop
        assert created.commit is not None and created.commit.rev
        got = await client.get_record(repo, COLL, rkey)
        assert got.value == record and got.cid == created.cid and got.rkey == rkey

        updated = note("second")
        put = await client.put_record(repo, COLL, rkey, updated, swap_record=created.cid)
        assert put.cid == cid_for_record(updated)
        assert (await client.get_record(repo, COLL, rkey)).value == updated

        commit = await client.delete_record(repo, COLL, rkey, swap_record=put.cid)
        assert commit is not None and commit.rev > created.commit.rev
        with pytest.raises(PermanentError) as exc:
            await client.get_record(repo, COLL, rkey)
        assert exc.value.error == "RecordNotFound" and exc.value.status == 400


def alice_did(client: XrpcClient) -> str:
    assert isinstance(client.session, Session)
    return client.session.did


async def test_put_record_swaps(client: XrpcClient) -> None:
    async with client:
        repo, rkey = alice_did(client), CLOCK.next()
        first = await client.put_record(repo, COLL, rkey, note("v1"), swap_record=None)
        # swap_record=None is "create exactly this": repeating it is an idempotent no-op ...
        again = await client.put_record(repo, COLL, rkey, note("v1"), swap_record=None)
        assert again.cid == first.cid
        # ... and other content under the same key is a collision, reported with its name.
        with pytest.raises(PermanentError) as exc:
            await client.put_record(repo, COLL, rkey, note("other"), swap_record=None)
        assert exc.value.error == "InvalidSwap" and exc.value.status == 400
        assert first.cid in (exc.value.message or "")  # "Record was at <cid>"
        stale = cid_for_record(note("never stored"))
        with pytest.raises(PermanentError) as exc:
            await client.put_record(repo, COLL, rkey, note("v2"), swap_record=stale)
        assert exc.value.error == "InvalidSwap"
        assert not outcome_unknown(exc.value)


async def test_apply_writes_and_swap_commit(client: XrpcClient) -> None:
    async with client:
        repo = alice_did(client)
        a, b = CLOCK.next(), CLOCK.next()
        await client.create_record(repo, COLL, note("b"), rkey=b)
        head = await client.sync_get_latest_commit(repo)
        result = await client.apply_writes(
            repo,
            [Create(COLL, note("a"), rkey=a), Update(COLL, b, note("b2")), Delete(COLL, b)],
            swap_commit=head.cid,
        )
        assert [r.kind for r in result.results] == ["create", "update", "delete"]
        assert result.results[0].cid == cid_for_record(note("a"))
        assert result.commit is not None
        assert (await client.sync_get_latest_commit(repo)).cid == result.commit.cid
        with pytest.raises(PermanentError) as exc:
            await client.apply_writes(repo, [Delete(COLL, a)], swap_commit=head.cid)
        assert exc.value.error == "InvalidSwap"
        await client.get_record(repo, COLL, a)  # the refused batch changed nothing


async def test_classified_permanent_failures(client: XrpcClient) -> None:
    async with client:
        repo = alice_did(client)
        too_many = [Create(COLL, note(str(i)), rkey=CLOCK.next()) for i in range(201)]
        with pytest.raises(PermanentError) as exc:
            await client.apply_writes(repo, too_many)
        assert exc.value.error == "InvalidRequest" and "Too many writes" in str(exc.value)
        with pytest.raises(PermanentError) as exc:
            await client.create_record(repo, COLL, note("x"), validate=True)
        assert exc.value.error == "InvalidRequest" and exc.value.status == 400
        assert "Unknown lexicon" in (exc.value.message or "")
        with pytest.raises(PermanentError) as exc:
            await client.get_record(repo, COLL, CLOCK.next())
        assert exc.value.error == "RecordNotFound"


async def test_create_on_existing_rkey_is_the_transient_500(client: XrpcClient) -> None:
    async with client:
        repo, rkey = alice_did(client), CLOCK.next()
        await client.create_record(repo, COLL, note("once"), rkey=rkey)
        with pytest.raises(TransientError) as exc:
            await client.create_record(repo, COLL, note("once"), rkey=rkey)
        assert type(exc.value) is TransientError
        assert exc.value.status == 500 and exc.value.error == "InternalServerError"
        assert outcome_unknown(exc.value)  # the engine must read before retrying
        with pytest.raises(TransientError) as exc:
            await client.apply_writes(repo, [Create(COLL, note("once"), rkey=rkey)])
        assert exc.value.status == 500 and exc.value.error == "InternalServerError"


async def test_list_records_pages_past_100(client: XrpcClient) -> None:
    coll = f"com.example.atsync.page{secrets.token_hex(4)}"
    async with client:
        repo = alice_did(client)
        rkeys = [CLOCK.next() for _ in range(230)]
        for start in (0, 200):
            chunk = rkeys[start : start + 200]
            await client.apply_writes(
                repo, [Create(coll, {"$type": coll, "k": k}, k) for k in chunk]
            )
        first = await client.list_records(repo, coll, limit=100)
        assert len(first.records) == 100 and first.cursor is not None
        assert [r.rkey for r in first.records] == sorted(rkeys, reverse=True)[:100]
        seen = [r.rkey async for r in client.iter_records(repo, coll)]
        assert seen == sorted(rkeys, reverse=True)
        ascending = [r.rkey async for r in client.iter_records(repo, coll, reverse=True)]
        assert ascending == sorted(rkeys)
        assert all(r.value["k"] == r.rkey for r in first.records)


async def test_writes_need_a_session(dev_pds: DevPDS) -> None:
    requests: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        requests.append(request)

    async with XrpcClient(dev_pds.pds_url, event_hooks={"request": [count]}) as anon:
        with pytest.raises(AuthError, match="log in"):
            await anon.create_record("did:plc:x", COLL, note("x"))
        assert requests == []  # refused before any request
        with pytest.raises(AuthError) as exc:
            await anon.procedure("com.atproto.repo.createRecord", {"repo": "x"})
        assert exc.value.status == 401  # the server's own answer when no token is sent


def test_session_tokens_stay_with_their_pds(alice_data: SessionData) -> None:
    with pytest.raises(ValueError, match="refusing to send"):
        XrpcClient("http://127.0.0.1:1", session=Session(alice_data))


# --- com.atproto.sync ----------------------------------------------------------------------------


class ChunkRecorder(io.RawIOBase):
    def __init__(self) -> None:
        self.chunks: list[int] = []
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.chunks.append(len(b))
        self.data += b
        return len(b)


async def test_get_repo_streams_to_disk(
    client: XrpcClient, dev_pds: DevPDS, tmp_path: Path
) -> None:
    async with client:
        repo, rkey = alice_did(client), CLOCK.next()
        written = await client.create_record(repo, COLL, note("in the repo"), rkey=rkey)
        target = tmp_path / "repo.car"
        download = await client.sync_get_repo(repo, target)
        assert download.path == target and download.size == target.stat().st_size
        assert not (tmp_path / "repo.car.part").exists()
        with target.open("rb") as fh:
            records = {
                (r.collection, r.rkey): r
                for r in iter_repo_records(fh, did=repo, signing_key=signing_key(dev_pds, repo))
            }
        assert str(records[(COLL, rkey)].cid) == written.cid
        # Into a caller's file object, in bounded chunks (never the whole CAR at once).
        sink = ChunkRecorder()
        streamed = await client.sync_get_repo(repo, sink)  # type: ignore[arg-type]
        assert streamed.path is None and streamed.size == len(sink.data)
        assert max(sink.chunks) <= 64 * 1024
        if streamed.size > 64 * 1024:
            assert len(sink.chunks) > 1
        assert CarReader(bytes(sink.data)).roots == read_car(target.read_bytes()).roots
        with pytest.raises(PermanentError, match="max_size"):
            await client.sync_get_repo(repo, tmp_path / "small.car", max_size=100)
        assert not (tmp_path / "small.car").exists()
        assert not (tmp_path / "small.car.part").exists()


async def test_get_repo_from_loopback_is_not_compressed_unless_asked(
    alice_data: SessionData,
) -> None:
    # Over loopback the CAR comes as it is (the PDS's compression costs both ends CPU and
    # holds back the first byte, for bytes that cross no wire); a caller who asks for gzip
    # gets it, decoded to the same bytes.
    answers: list[httpx.Response] = []

    async def seen(response: httpx.Response) -> None:
        answers.append(response)

    hooks = {"response": [seen]}
    plain = XrpcClient(session=Session(alice_data), event_hooks=hooks)
    zipped = XrpcClient(
        session=Session(alice_data), headers={"Accept-Encoding": "gzip"}, event_hooks=hooks
    )
    async with plain, zipped:
        repo = alice_did(plain)
        for i in range(30):  # enough for the PDS to think compressing it worthwhile
            await plain.create_record(
                repo, COLL, note(f"compressible {i} " * 20), rkey=CLOCK.next()
            )
        as_is, gzipped = io.BytesIO(), io.BytesIO()
        await plain.sync_get_repo(repo, as_is)
        await zipped.sync_get_repo(repo, gzipped)
        assert [r.request.headers["accept-encoding"] for r in answers[-2:]] == ["identity", "gzip"]
        assert [r.headers.get("content-encoding") for r in answers[-2:]] == [None, "gzip"]
        assert as_is.getvalue() == gzipped.getvalue()
        # Other calls keep httpx's defaults: only the downloads are asked for as they are.
        await plain.sync_get_latest_commit(repo)
        assert "gzip" in answers[-1].request.headers["accept-encoding"]


def test_loopback_urls() -> None:
    from atsync.atproto._tls import is_loopback_url

    for url in (
        "http://localhost:2583",
        "http://127.0.0.1",
        "http://[::1]:80/x",
        "http://LOCALHOST",
    ):
        assert is_loopback_url(url), url
    for url in ("https://bsky.social", "http://127.0.0.2.example", "http://localhost.evil.com"):
        assert not is_loopback_url(url), url


async def test_get_repo_since_has_only_the_delta(client: XrpcClient, tmp_path: Path) -> None:
    async with client:
        repo = alice_did(client)
        old = await client.create_record(repo, COLL, note("before"), rkey=CLOCK.next())
        assert old.commit is not None
        new = await client.create_record(repo, COLL, note("after"), rkey=CLOCK.next())
        full = await client.sync_get_repo(repo, tmp_path / "full.car")
        delta_buf = io.BytesIO()
        delta = await client.sync_get_repo(repo, delta_buf, since=old.commit.rev)
        assert delta.size < full.size
        car = read_car(delta_buf.getvalue())
        assert new.commit is not None and str(car.root) == new.commit.cid
        assert CID.parse(new.cid) in car.blocks
        assert CID.parse(old.cid) not in car.blocks


async def test_get_record_proof_and_latest_commit(client: XrpcClient, dev_pds: DevPDS) -> None:
    async with client:
        repo, rkey = alice_did(client), CLOCK.next()
        written = await client.create_record(repo, COLL, note("proved"), rkey=rkey)
        latest = await client.sync_get_latest_commit(repo)
        assert written.commit is not None and latest.rev == written.commit.rev
        proof = await client.sync_get_record(repo, COLL, rkey)
        key = signing_key(dev_pds, repo)
        cid, value = verify_record_proof(proof, repo, key, COLL, rkey)
        assert str(cid) == written.cid and value == note("proved")
        missing = CLOCK.next()
        absent = await client.sync_get_record(repo, COLL, missing)
        assert verify_record_proof(absent, repo, key, COLL, missing) == (None, None)


class OneShot(io.RawIOBase):
    """A non-seekable source (like a pipe) that counts its reads."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)
        self.reads = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        return self._src.read(n)


async def test_blob_round_trip(client: XrpcClient, tmp_path: Path) -> None:
    payload = secrets.token_bytes(200_000)
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    async with client:
        repo = alice_did(client)
        from_bytes = await client.upload_blob(payload, "application/octet-stream")
        from_path = await client.upload_blob(path, "application/octet-stream")
        with path.open("rb") as fh:
            from_stream = await client.upload_blob(fh, "application/octet-stream")
        one_shot = OneShot(payload)  # not seekable: sent chunked, without a length
        from_pipe = await client.upload_blob(one_shot, "application/octet-stream")  # type: ignore[arg-type]
        assert from_bytes == from_path == from_stream == from_pipe
        assert one_shot.reads > 1  # read piece by piece, not whole
        ref = from_bytes["ref"]
        assert ref == CID.for_data(payload, codec=0x55) and from_bytes["size"] == len(payload)
        with pytest.raises(PermanentError) as exc:  # kept only once a record references it
            await client.sync_get_blob(repo, ref, tmp_path / "early.bin")
        assert exc.value.status == 400 and "Blob not found" in str(exc.value)
        await client.create_record(repo, COLL, note("with blob", file=from_bytes))
        out = tmp_path / "got.bin"
        got = await client.sync_get_blob(repo, ref, out)
        assert got.size == len(payload) and out.read_bytes() == payload
        buf = io.BytesIO()
        await client.sync_get_blob(repo, str(ref), buf)
        assert buf.getvalue() == payload


# --- subscribeRepos -----------------------------------------------------------------------------


async def test_subscribe_repos_delivers_a_commit_made_after_connecting(
    client: XrpcClient,
) -> None:
    async with client, client.subscribe_repos() as sub:
        repo, rkey = alice_did(client), CLOCK.next()
        written = await client.create_record(repo, COLL, note("live"), rkey=rkey)
        with anyio.fail_after(15):
            async for frame in sub:
                ops = (frame.body.get("ops") or []) if frame.type == "#commit" else []
                hits = [op for op in ops if op["path"] == f"{COLL}/{rkey}"]
                if hits:
                    break
        assert frame.body["repo"] == repo and isinstance(frame.seq, int)
        assert hits[0]["action"] == "create" and str(hits[0]["cid"]) == written.cid
        blocks = read_car(frame.body["blocks"]).blocks
        assert encode_dag_cbor(note("live")) == blocks[CID.parse(written.cid)]


async def test_subscribe_repos_replay_and_error_frames(client: XrpcClient) -> None:
    async with client:
        async with client.subscribe_repos(cursor=0) as sub:
            with anyio.fail_after(15):
                first = await sub.next_frame()
        assert first.seq == 1 and first.type in {"#identity", "#account", "#commit", "#sync"}
        with pytest.raises(PermanentError) as exc:
            async with client.subscribe_repos(cursor=10**12) as sub:
                with anyio.fail_after(15):
                    await sub.next_frame()
        assert exc.value.error == "FutureCursor"


def test_decode_frame_is_strict() -> None:
    good = encode_dag_cbor({"op": 1, "t": "#info"}) + encode_dag_cbor({"name": "OutdatedCursor"})
    assert decode_frame(good).type == "#info"
    with pytest.raises(VerificationError, match="trailing"):
        decode_frame(good + b"\x00")
    with pytest.raises(VerificationError):
        decode_frame(encode_dag_cbor({"op": 1, "t": "#info"}))  # no body
    with pytest.raises(VerificationError, match="unknown op"):
        decode_frame(encode_dag_cbor({"op": 2}) + encode_dag_cbor({}))
    err = encode_dag_cbor({"op": -1}) + encode_dag_cbor({"error": "ConsumerTooSlow"})
    with pytest.raises(TransientError) as exc:
        decode_frame(err)
    assert exc.value.error == "ConsumerTooSlow"


# --- transport failures and rate limits ---------------------------------------------------------


async def test_connection_refused_is_transient_and_nothing_was_sent() -> None:
    port = closed_port()
    async with XrpcClient(f"http://127.0.0.1:{port}") as dead:
        with pytest.raises(TransientError) as exc:
            await dead.get_record("did:plc:x", COLL, "self")
        assert exc.value.status is None and exc.value.error is None
        assert not outcome_unknown(exc.value)
        with pytest.raises(TransientError):
            async with dead.subscribe_repos() as sub:
                await sub.next_frame()


async def test_timeout_after_sending_leaves_the_outcome_unknown() -> None:
    # A listening socket that never answers: the request goes out, no response comes back.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        async with XrpcClient(url, timeout=httpx.Timeout(0.5, connect=5.0)) as slow:
            with pytest.raises(TransientError, match="timed out") as exc:
                await slow.procedure("com.atproto.repo.createRecord", {"x": 1})
        assert exc.value.status is None and outcome_unknown(exc.value)


async def test_rate_limit_429_from_the_pds_limiter(make_pds: MakePDS) -> None:
    pds = make_pds(rate_limits=True)
    handle, password = ACCOUNTS[1]
    body = {"identifier": handle, "password": password}
    ok: list[int] = []
    limited: list[RateLimitedError] = []
    async with XrpcClient(pds.pds_url) as anon:
        await anon.procedure("com.atproto.server.createSession", body)
        info = anon.rate_limit
        assert info is not None and info.limit is not None and info.remaining is not None
        assert info.remaining < info.limit and info.reset_at is not None
        assert info.reset_at > time.time() - 1

        async def attempt(limiter: anyio.CapacityLimiter) -> None:
            async with limiter:
                try:
                    await anon.procedure("com.atproto.server.createSession", body)
                    ok.append(1)
                except RateLimitedError as e:
                    limited.append(e)

        limiter = anyio.CapacityLimiter(10)
        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(attempt, limiter)
    assert limited, "41 createSession calls never hit the 30-per-5-minutes limit"
    assert len(ok) < 40
    err = limited[0]
    assert err.status == 429 and err.error == "RateLimitExceeded"
    assert err.reset_at is not None and err.reset_at > time.time()


def test_rate_limit_header_parsing() -> None:
    now = 1_700_000_000.0
    assert retry_at({"ratelimit-reset": "1700000300"}, now) == 1_700_000_300  # epoch seconds
    assert retry_at({"retry-after": "30"}, now) == now + 30
    assert retry_at({"retry-after": "Tue, 14 Nov 2023 22:14:20 GMT"}, now) == 1_700_000_060
    # Both present: the later time satisfies both.
    assert retry_at({"retry-after": "30", "ratelimit-reset": "1700000010"}, now) == now + 30
    assert retry_at({"retry-after": "soon"}, now) is None
    exhausted = classify_response(
        "x.y.z", 400, {"ratelimit-remaining": "0", "ratelimit-reset": "1700000100"}, b"", now
    )
    assert isinstance(exhausted, RateLimitedError) and exhausted.reset_at == 1_700_000_100
    expired = classify_response("x.y.z", 400, {}, b'{"error":"ExpiredToken","message":"m"}', now)
    assert isinstance(expired, AuthError) and expired.message == "m"
    assert isinstance(classify_response("x.y.z", 503, {}, b"<html>", now), TransientError)
    assert isinstance(classify_response("x.y.z", 501, {}, b"", now), PermanentError)


# --- blocking facade ----------------------------------------------------------------------------


def test_blocking_client(alice_data: SessionData) -> None:
    with Portal() as portal:
        session = Session(alice_data)
        with BlockingXrpcClient(session=session, portal=portal) as client:
            coll = f"com.example.atsync.blocking{secrets.token_hex(4)}"
            rkeys = [CLOCK.next() for _ in range(3)]
            for rkey in rkeys:
                record = {"$type": coll, "text": "blocking"}
                written = client.create_record(session.did, coll, record, rkey=rkey)
            assert client.get_record(session.did, coll, rkeys[-1]).cid == written.cid
            page = client.list_records(session.did, coll, limit=2)
            assert len(page.records) == 2 and page.cursor == rkeys[1]
            listed = [r.rkey for r in client.iter_records(session.did, coll, page_size=2)]
            assert listed == rkeys[::-1]
            with client.subscribe_repos(cursor=0) as sub:
                assert sub.next_frame(timeout=15).seq == 1
            with pytest.raises(PermanentError) as exc:
                client.get_record(session.did, COLL, CLOCK.next())
            assert exc.value.error == "RecordNotFound"

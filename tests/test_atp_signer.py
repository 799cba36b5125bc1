"""ATPSigner against the real PDS: deferred login, session-key authorization, resume, logout."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from atsync._errors import VerificationError
from atsync.app import ActionContext, App, ATPSigner, Contract
from atsync.atproto._authorization import authorization_rkey, revoke_session_key, verify_session
from atsync.atproto._identity import IdentityResolver
from atsync.atproto._session import FileSessionStore, login
from atsync.atproto._xrpc import XrpcClient
from atsync.atproto._xrpc_types import Create

contract = Contract(models={"notes": {"id": "primary", "text": "string"}}, nsid="test.atsync.notes")


@contract.action
def note(ctx: ActionContext, text: str) -> str:
    key = ctx.tid()
    ctx.db.set("notes", {"id": key, "text": text})
    return ctx.did


def signing_key(dev_pds: Any, did: str) -> str:
    async def resolve() -> str:
        async with IdentityResolver(plc_url=dev_pds.plc_url, allow_insecure_localhost=True) as r:
            return (await r.resolve_did(did)).signing_key

    return anyio.run(resolve)


def test_login_later_authorizes_the_key_and_attributes_earlier_actions(
    dev_pds: Any, tmp_path: Path
) -> None:
    bob = dev_pds.accounts["bob.test"]
    store = FileSessionStore(tmp_path / "sessions")
    signer = ATPSigner(store=store)
    with App.open(tmp_path / "n.db", contract, signer=signer) as app:
        before = app.actions.note("offline first")
        assert before.result == signer.key_did and not signer.authenticated
        session = signer.login("bob.test", bob.password, dev_pds.pds_url)
        assert session.did == bob.did and app.did == bob.did
        after = app.actions.note("after login")
        assert after.result == bob.did
        authors = [app.author_of(e) for e in app.log]
        assert authors == [bob.did, bob.did]  # the pre-login action too, via the key's proof
        found = app.authorization(signer.key_did)
        assert found is not None
        account, collection, proof = found
        assert (account, collection) == (bob.did, "test.atsync.notes.session")
        auth = verify_session(
            proof,
            account=bob.did,
            signing_key=signing_key(dev_pds, bob.did),
            session_key=signer.key_did,
            collection=collection,
        )
        assert auth.rkey == authorization_rkey(signer.key_did)
        # The session file is 0600 and holds no password.
        path = store.path_for(f"atsync-session-{signer.key_did}")
        assert path.stat().st_mode & 0o777 == 0o600
        assert bob.password not in path.read_text()

    # A new start resumes the session without logging in.
    again = ATPSigner(store=store)
    with App.open(tmp_path / "n.db", contract, signer=again) as app:
        assert again.authenticated and app.did == bob.did
        again.logout()
        assert not again.authenticated and app.did == again.key_did
    assert not path.exists()


def test_proofs_are_checked_offline_and_fail_clearly(dev_pds: Any, tmp_path: Path) -> None:
    alice = dev_pds.accounts["alice.test"]
    signer = ATPSigner(store=FileSessionStore(tmp_path / "s"))
    with App.open(tmp_path / "p.db", contract, signer=signer) as app:

        async def fill() -> None:  # a tree deep enough for the paths of two keys to part
            session = await login(alice.did, alice.password, dev_pds.pds_url)
            async with XrpcClient(session=session) as client:
                # Among the authorization records: keys spread as theirs are (did:key text).
                rng = random.Random(7)
                alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
                writes = [
                    Create(
                        "test.atsync.notes.session",
                        {"n": i},
                        "z6Mk" + "".join(rng.choices(alphabet, k=12)),
                    )
                    for i in range(200)
                ]
                await client.apply_writes(alice.did, writes)

        anyio.run(fill)
        signer.login(alice.did, alice.password, dev_pds.pds_url)
        _, collection, proof = app.authorization(signer.key_did)  # type: ignore[misc]
        key = signing_key(dev_pds, alice.did)
        ok = dict(account=alice.did, signing_key=key, collection=collection)
        verify_session(proof, session_key=signer.key_did, **ok)
        for _ in range(40):  # other keys' records fall anywhere in the tree, on its path or not
            other_key = ATPSigner(store=FileSessionStore(tmp_path / "t"))
            other_key.attach(None)
            with pytest.raises(VerificationError, match="no authorization"):
                verify_session(proof, session_key=other_key.key_did, **ok)
        with pytest.raises(VerificationError):
            verify_session(
                proof,
                session_key=signer.key_did,
                **{**ok, "account": dev_pds.accounts["bob.test"].did},
            )
        for at in range(len(proof)):  # any flipped bit, anywhere: refused, and said so
            tampered = bytearray(proof)
            tampered[at] ^= 0x01 if at % 2 else 0x80
            with pytest.raises(VerificationError):
                verify_session(bytes(tampered), session_key=signer.key_did, **ok)
        with pytest.raises(VerificationError):
            verify_session(proof[:-10], session_key=signer.key_did, **ok)

        async def revoke() -> bytes:
            assert signer.session is not None
            async with XrpcClient(session=signer.session) as client:
                await revoke_session_key(client, alice.did, collection, signer.key_did)
                return await client.sync_get_record(
                    alice.did, collection, authorization_rkey(signer.key_did)
                )

        fresh = anyio.run(revoke)
        with pytest.raises(VerificationError, match="revoked"):
            verify_session(fresh, session_key=signer.key_did, **ok)


def test_authorizations_table_is_plain_sql(dev_pds: Any, tmp_path: Path) -> None:
    alice = dev_pds.accounts["alice.test"]
    signer = ATPSigner(store=FileSessionStore(tmp_path / "s"))
    with App.open(tmp_path / "q.db", contract, signer=signer):
        signer.login("alice.test", alice.password, dev_pds.pds_url)
    raw = sqlite3.connect(tmp_path / "q.db")
    rows = raw.execute("select session_key, account from _atsync_authorizations").fetchall()
    assert rows == [(signer.key_did, alice.did)]


def test_a_signer_that_needs_its_session_reopens_a_log_a_crash_left_unsealed(
    dev_pds: Any, tmp_path: Path
) -> None:
    bob = dev_pds.accounts["bob.test"]
    store = FileSessionStore(tmp_path / "sessions")
    signer = ATPSigner(store=store)
    with App.open(tmp_path / "n.db", contract, signer=signer) as app:
        signer.login("bob.test", bob.password, dev_pds.pds_url)
        app.actions.note("sealed, then its seal lost")
    with sqlite3.connect(tmp_path / "n.db") as raw:  # as if killed before the seal
        raw.execute("UPDATE _atsync_log SET sig = NULL")
    strict = ATPSigner(store=store, allow_unauthenticated=False)
    with App.open(tmp_path / "n.db", contract, signer=strict) as app:  # resumes, then seals
        assert strict.authenticated and app.log.verify() == len(app.log)

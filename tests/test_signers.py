"""Signers: did:key created on first open, stored 0600, verifiable from the public key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from atsync._errors import SignerError
from atsync.app import App, ATPSigner, Contract, LocalSigner
from atsync.atproto._crypto import parse_did_key, verify_signature

contract = Contract(models={"m": {"id": "primary"}})


@contract.action
def touch(ctx, key):  # type: ignore[no-untyped-def]
    ctx.db.set("m", {"id": key})


def test_key_is_created_beside_the_database_with_0600(tmp_path: Path) -> None:
    with App.open(tmp_path / "a.db", contract) as app:
        did = app.did
    key_file = tmp_path / "a.db.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert did in key_file.read_text()
    with App.open(tmp_path / "a.db", contract) as again:
        assert again.did == did


@pytest.mark.parametrize("alg", ["ed25519", "k256", "p256"])
def test_signatures_verify_from_the_did_alone(tmp_path: Path, alg: str) -> None:
    signer = LocalSigner.load_or_create(tmp_path / f"{alg}.key", alg)  # type: ignore[arg-type]
    assert parse_did_key(signer.did)[0] == alg
    sig = signer.sign(b"message")
    assert verify_signature(signer.key_did, b"message", sig)
    assert not verify_signature(signer.key_did, b"messagE", sig)
    reloaded = LocalSigner.load_or_create(tmp_path / f"{alg}.key")
    assert reloaded.did == signer.did


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    LocalSigner.load_or_create(tmp_path / "k.key")
    os.chmod(tmp_path / "k.key", 0o644)
    with pytest.raises(SignerError, match="chmod 600"):
        LocalSigner.load_or_create(tmp_path / "k.key")


def test_damaged_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"{not json")
    os.close(fd)
    with pytest.raises(SignerError, match="unreadable or damaged"):
        LocalSigner.load_or_create(path)


def test_atp_signer_acts_before_login(tmp_path: Path) -> None:
    signer = ATPSigner(allow_unauthenticated=True)
    with App.open(tmp_path / "a.db", contract, signer=signer) as app:
        assert not signer.authenticated
        assert app.did == signer.key_did
        app.actions.touch("x")
        assert app.log.verify() == 1
    assert (tmp_path / "a.db.key").exists()


def test_atp_signer_refuses_to_sign_unauthenticated_when_told(tmp_path: Path) -> None:
    signer = ATPSigner(allow_unauthenticated=False)
    with pytest.raises(SignerError, match="not logged in"):
        App.open(tmp_path / "a.db", contract, signer=signer, seal_interval=0).actions.touch("x")


def test_memory_database_gets_an_ephemeral_key() -> None:
    with App.open(":memory:", contract) as app:
        app.actions.touch("x")
        assert app.did.startswith("did:key:z6Mk")  # ed25519


def test_an_oauth_login_asks_for_what_the_attached_engines_write(tmp_path: Path) -> None:
    from atsync.atproto import DEFAULT_OAUTH_SCOPE, MemorySessionStore
    from atsync.sync import ATSync, Binding, Manual, RecordWrite

    models = {"notes": {"id": "primary", "t": "string"}, "pics": {"id": "primary", "p": "blob?"}}
    contract = Contract(models=models, nsid="com.example.app")
    signer = ATPSigner(store=MemorySessionStore())
    with App.open(tmp_path / "a.db", contract, signer=signer) as app:
        assert signer.oauth_scope() == DEFAULT_OAUTH_SCOPE  # nothing attached: the general one
        notes = ATSync(app, bindings={"notes": Binding("com.example.note")}, push=Manual())
        assert signer.oauth_scope() == "atproto repo:com.example.app.session repo:com.example.note"
        pics = ATSync(app, bindings={"pics": Binding("com.example.pic")}, push=Manual())
        assert signer.oauth_scope() == (
            "atproto repo:com.example.app.session repo:com.example.note repo:com.example.pic "
            "blob:*/*"
        )
        anywhere = ATSync(
            app, bindings={}, push=Manual(), on_action=lambda call: [RecordWrite("a.b.c", "k", {})]
        )
        assert signer.oauth_scope() == DEFAULT_OAUTH_SCOPE  # a hook may write any collection
        for sync in (notes, pics, anywhere):
            sync.close()

"""Tree-head encoding, LocalSigner and offline verification."""

from __future__ import annotations

import dataclasses
import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from audit_worker.crypto import (
    KeyUnavailableError,
    LocalSigner,
    SignatureError,
    TreeHead,
    public_key_fingerprint,
    verify_tree_head,
)

ROOT = hashlib.sha256(b"root").digest()


@pytest.fixture
def head() -> TreeHead:
    return TreeHead(
        log_id="hospital-a", tree_size=42, root_hash=ROOT, timestamp_ms=1_700_000_000_000
    )


@pytest.fixture
def signer(tmp_path: Path) -> LocalSigner:
    return LocalSigner(tmp_path / "keys" / "sth.pem", create=True)


def test_signing_input_format(head: TreeHead) -> None:
    assert head.signing_input() == (
        b"audit-kit/tree-head/v1\nhospital-a\n42\n" + ROOT.hex().encode() + b"\n1700000000000\n"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"log_id": "a\nb"},
        {"log_id": ""},
        {"tree_size": -1},
        {"root_hash": b"\x00" * 31},
        {"timestamp_ms": -5},
    ],
)
def test_tree_head_validation(head: TreeHead, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(head, **kwargs)  # type: ignore[arg-type]


def test_empty_tree_allowed(head: TreeHead) -> None:
    assert dataclasses.replace(head, tree_size=0).signing_input().count(b"\n0\n") == 1


def test_sign_and_verify(signer: LocalSigner, head: TreeHead) -> None:
    sig = signer.sign(head.signing_input())
    verify_tree_head(signer.public_key_pem(), head, sig)


@pytest.mark.parametrize(
    "change",
    [
        {"tree_size": 43},
        {"root_hash": hashlib.sha256(b"other").digest()},
        {"timestamp_ms": 1_700_000_000_001},
        {"log_id": "hospital-b"},
    ],
)
def test_changed_head_fails(signer: LocalSigner, head: TreeHead, change: dict[str, object]) -> None:
    sig = signer.sign(head.signing_input())
    changed = dataclasses.replace(head, **change)  # type: ignore[arg-type]
    with pytest.raises(SignatureError) as info:
        verify_tree_head(signer.public_key_pem(), changed, sig)
    assert str(changed.tree_size) in str(info.value)
    assert b"BEGIN" not in str(info.value).encode()


def test_other_key_fails(signer: LocalSigner, head: TreeHead, tmp_path: Path) -> None:
    other = LocalSigner(tmp_path / "other.pem", create=True)
    sig = other.sign(head.signing_input())
    with pytest.raises(SignatureError):
        verify_tree_head(signer.public_key_pem(), head, sig)


@pytest.mark.parametrize("sig", [b"", b"garbage", b"\x30\x06\x02\x01\x01\x02\x01\x01"])
def test_malformed_signature_fails(signer: LocalSigner, head: TreeHead, sig: bytes) -> None:
    with pytest.raises(SignatureError):
        verify_tree_head(signer.public_key_pem(), head, sig)


def test_unusable_public_key(head: TreeHead, signer: LocalSigner) -> None:
    sig = signer.sign(head.signing_input())
    with pytest.raises(SignatureError):
        verify_tree_head(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", head, sig)


def test_key_file_mode_reload_and_ref(tmp_path: Path, head: TreeHead) -> None:
    path = tmp_path / "keys" / "sth.pem"
    first = LocalSigner(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    again = LocalSigner(path)
    assert again.ref == first.ref
    assert again.public_key_pem() == first.public_key_pem()
    verify_tree_head(first.public_key_pem(), head, again.sign(head.signing_input()))
    fp = public_key_fingerprint(first.public_key_pem())
    assert len(fp) == 64
    assert first.ref == "local:" + fp[:12]
    assert [p.name for p in path.parent.iterdir()] == ["sth.pem"]


def test_public_key_pem_is_public(signer: LocalSigner) -> None:
    pem = signer.public_key_pem()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    serialization.load_pem_public_key(pem)


def test_missing_key_file(tmp_path: Path) -> None:
    path = tmp_path / "none.pem"
    with pytest.raises(KeyUnavailableError) as info:
        LocalSigner(path)
    assert str(path) in str(info.value)
    assert not path.exists()


def test_malformed_key_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nSECRETSTUFF\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyUnavailableError) as info:
        LocalSigner(path)
    assert "SECRETSTUFF" not in str(info.value)
    assert str(path) in str(info.value)

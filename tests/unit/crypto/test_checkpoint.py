"""Checkpoints in signed notes: the exact C2SP text, and every way a note is refused."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from audit_worker.crypto import LocalSigner, TrustedKey, TrustedKeys
from audit_worker.crypto.checkpoint import (
    MAX_NOTE_BYTES,
    Checkpoint,
    CheckpointError,
    note_key_id,
    open_note,
    sign_note,
)

ROOT = hashlib.sha256(b"root").digest()
CHAIN = hashlib.sha256(b"chain").digest()
POINT = Checkpoint("hospital-a", 42, ROOT, 1_700_000_000_000, 3, CHAIN)


@pytest.fixture
def signer(tmp_path: Path) -> LocalSigner:
    return LocalSigner(tmp_path / "sth.pem", create=True)


@pytest.fixture
def key(signer: LocalSigner) -> TrustedKey:
    return TrustedKeys.from_pems([signer.public_key_pem()]).keys[0]


def test_checkpoint_text_is_origin_size_base64_root_then_extension_lines() -> None:
    assert POINT.text() == (
        b"hospital-a\n42\n" + base64.b64encode(ROOT) + b"\n"
        b"timestamp 1700000000000\n"
        b"dead-letters 3 " + base64.b64encode(CHAIN) + b"\n"
    )


def test_signed_note_verifies_with_only_the_signed_note_spec(
    signer: LocalSigner, key: TrustedKey
) -> None:
    """What a standard reader does: split off the signature lines, take the 4-byte key ID
    (SHA-256 of the DER SubjectPublicKeyInfo), verify ECDSA over the note text."""
    note = sign_note(POINT, signer, key)
    text, _, signatures = note.decode().rpartition("\n\n")
    dash, name, blob = signatures.rstrip("\n").split(" ")
    assert (dash, name) == ("\u2014", "hospital-a")
    raw = base64.b64decode(blob)
    public = serialization.load_pem_public_key(signer.public_key_pem())
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert raw[:4] == hashlib.sha256(der).digest()[:4] == note_key_id(key)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(raw[4:], (text + "\n").encode(), ec.ECDSA(hashes.SHA256()))


def test_open_note_returns_the_checkpoint_and_its_signer(
    signer: LocalSigner, key: TrustedKey
) -> None:
    checkpoint, by = open_note(sign_note(POINT, signer, key), TrustedKeys((key,)))
    assert checkpoint == POINT
    assert by == key


def test_changed_size_breaks_the_signature(signer: LocalSigner, key: TrustedKey) -> None:
    note = sign_note(POINT, signer, key).replace(b"\n42\n", b"\n43\n", 1)
    with pytest.raises(CheckpointError, match="does not verify"):
        open_note(note, TrustedKeys((key,)))


def test_note_signed_by_an_unknown_key_is_refused(tmp_path: Path, key: TrustedKey) -> None:
    other = LocalSigner(tmp_path / "other.pem", create=True)
    other_key = TrustedKeys.from_pems([other.public_key_pem()]).keys[0]
    note = sign_note(POINT, other, other_key)
    with pytest.raises(CheckpointError, match="no signature by a trusted key"):
        open_note(note, TrustedKeys((key,)))


def test_signature_of_an_unknown_key_beside_a_trusted_one_is_ignored(
    tmp_path: Path, signer: LocalSigner, key: TrustedKey
) -> None:
    other = LocalSigner(tmp_path / "other.pem", create=True)
    other_key = TrustedKeys.from_pems([other.public_key_pem()]).keys[0]
    foreign_line = sign_note(POINT, other, other_key).rpartition(b"\n\n")[2]
    note = sign_note(POINT, signer, key) + foreign_line
    assert open_note(note, TrustedKeys((key,)))[0] == POINT


def test_key_outside_its_window_cannot_vouch_for_a_checkpoint(
    signer: LocalSigner, key: TrustedKey
) -> None:
    retired = TrustedKey(key.pem, key.fingerprint, valid_until_ms=POINT.timestamp_ms)
    with pytest.raises(CheckpointError, match="validity window"):
        open_note(sign_note(POINT, signer, key), TrustedKeys((retired,)))


def test_trusted_key_id_under_another_name_is_ignored(
    signer: LocalSigner, key: TrustedKey
) -> None:
    renamed = "\u2014 x ".encode()
    note = sign_note(POINT, signer, key).replace("\u2014 hospital-a ".encode(), renamed)
    with pytest.raises(CheckpointError, match="no signature by a trusted key"):
        open_note(note, TrustedKeys((key,)))


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda n: n.replace(b"\n\n", b"\n"), "blank line"),
        (lambda n: n[:-1], "blank line"),
        (lambda n: n.replace(b"timestamp ", b"time "), "timestamp"),
        (lambda n: n.replace(b"dead-letters 3", b"dead-letters x"), "dead-letters"),
        (lambda n: n.replace(b"\n42\n", b"\n042\n"), "decimal"),
        (lambda n: n.replace(b"hospital-a\n", b"Hospital A\n", 1), "origin"),
        (lambda n: b"\x01" + n, "control"),
        (lambda n: b"\xff" + n, "UTF-8"),
        (lambda n: n + b" " * MAX_NOTE_BYTES, "larger"),
        (lambda n: n.replace("\u2014".encode(), b"-"), "signature line"),
    ],
)
def test_malformed_notes_are_refused_with_the_reason(
    signer: LocalSigner, key: TrustedKey, mangle: object, reason: str
) -> None:
    note = sign_note(POINT, signer, key)
    with pytest.raises(CheckpointError, match=reason):
        open_note(mangle(note), TrustedKeys((key,)))  # type: ignore[operator]


def test_root_that_is_not_32_bytes_is_refused() -> None:
    text = POINT.text().decode().replace(base64.b64encode(ROOT).decode(), "AAAA")
    with pytest.raises(CheckpointError, match="32 bytes"):
        Checkpoint.parse(text)


@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise_anything_but_checkpoint_error(data: bytes) -> None:
    keys = TrustedKeys((_FIXED_KEY,))
    with contextlib.suppress(CheckpointError):
        open_note(data, keys)


_FIXED_KEY = TrustedKeys.from_pems([
    ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
]).keys[0]


@pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("openssl", "sed", "tail", "cut", "base64", "sh")),
    reason="needs openssl and coreutils",
)
def test_auditor_recipe_in_the_docs_verifies_a_checkpoint_with_openssl(
    tmp_path: Path, signer: LocalSigner, key: TrustedKey
) -> None:
    """The shell steps docs/audit-log.md gives auditors, run as written."""
    (tmp_path / "checkpoint").write_bytes(sign_note(POINT, signer, key))
    (tmp_path / "signer.pem").write_bytes(signer.public_key_pem())
    recipe = (
        "note=checkpoint; sed -n '1,5p' \"$note\" > text; "
        "tail -1 \"$note\" | cut -d' ' -f3 | base64 -d | tail -c +5 > sig.der; "
        "openssl dgst -sha256 -verify signer.pem -signature sig.der text"
    )
    done = subprocess.run(["sh", "-c", recipe], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "Verified OK" in done.stdout
    (tmp_path / "checkpoint").write_bytes(
        sign_note(POINT, signer, key).replace(b"\n42\n", b"\n43\n")
    )
    done = subprocess.run(["sh", "-c", recipe], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0

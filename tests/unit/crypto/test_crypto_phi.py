"""Pseudonymiser and FieldCipher."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from audit_worker.crypto import (
    DataKey,
    DecryptionError,
    FieldCipher,
    LocalKeyWrapper,
    Pseudonymiser,
)

KEY = bytes(range(32))


@pytest.fixture
def pseudo() -> Pseudonymiser:
    return Pseudonymiser(KEY)


@pytest.fixture
def data_key(tmp_path: Path) -> DataKey:
    return LocalKeyWrapper(tmp_path / "m.key", create=True).generate_data_key("phi")


def test_digest_definition(pseudo: Pseudonymiser) -> None:
    expected = hmac.new(KEY, b"patient\x00MRN-123", hashlib.sha256).digest()
    assert pseudo.digest("patient", "MRN-123") == expected
    assert pseudo.hexdigest("patient", "MRN-123") == expected.hex()
    assert len(expected) == 32


def test_same_value_same_digest(pseudo: Pseudonymiser) -> None:
    assert pseudo.digest("actor", "dr.smith") == pseudo.digest("actor", "dr.smith")
    # Prototype reuse must not leak state between calls.
    assert pseudo.digest("actor", "a") != pseudo.digest("actor", "b")
    assert pseudo.digest("actor", "a") == Pseudonymiser(KEY).digest("actor", "a")


def test_kind_separation(pseudo: Pseudonymiser) -> None:
    digests = {pseudo.digest(kind, "12345") for kind in ("patient", "actor", "network")}
    assert len(digests) == 3


def test_whitespace_normalisation(pseudo: Pseudonymiser) -> None:
    base = pseudo.digest("patient", "MRN-123")
    assert pseudo.digest("patient", "  MRN-123\t\n") == base
    # Only surrounding whitespace and (for patient ids) no case folding.
    assert pseudo.digest("patient", "mrn-123") != base
    assert pseudo.digest("patient", "MRN -123") != base


def test_network_lower_cased(pseudo: Pseudonymiser) -> None:
    assert pseudo.digest("network", " 2001:DB8::1 ") == pseudo.digest("network", "2001:db8::1")
    assert pseudo.normalise("network", " 2001:DB8::A ") == "2001:db8::a"
    assert pseudo.normalise("actor", " Dr.Smith ") == "Dr.Smith"


def test_different_keys_differ(pseudo: Pseudonymiser) -> None:
    other = Pseudonymiser(bytes(range(1, 33)))
    assert other.digest("patient", "MRN-123") != pseudo.digest("patient", "MRN-123")


def test_rejects_bad_input(pseudo: Pseudonymiser) -> None:
    with pytest.raises(ValueError) as info:
        pseudo.digest("patient", "   ")
    assert "patient" in str(info.value)
    with pytest.raises(ValueError):
        pseudo.digest("doctor", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Pseudonymiser(b"short")


def test_field_cipher_round_trip(data_key: DataKey) -> None:
    fc = FieldCipher()
    payload = os.urandom(200)
    blob = fc.encrypt(data_key, payload, b"event-1/payload")
    assert len(blob) == 12 + 200 + 16
    assert fc.decrypt(data_key, blob, b"event-1/payload") == payload
    # A fresh cipher object (other process) decrypts too.
    assert FieldCipher().decrypt(data_key, blob, b"event-1/payload") == payload
    # Random nonces: same input, different output.
    assert fc.encrypt(data_key, payload, b"event-1/payload") != blob


def test_field_cipher_empty_plaintext(data_key: DataKey) -> None:
    fc = FieldCipher()
    assert fc.decrypt(data_key, fc.encrypt(data_key, b"", b"a"), b"a") == b""


def test_field_cipher_aad_mismatch(data_key: DataKey) -> None:
    fc = FieldCipher()
    blob = fc.encrypt(data_key, b"secret PHI", b"event-1/payload")
    with pytest.raises(DecryptionError) as info:
        fc.decrypt(data_key, blob, b"event-2/payload")
    assert "secret PHI" not in str(info.value)
    assert data_key.key_id in str(info.value)


@pytest.mark.parametrize("index", [0, 11, 12, 30, -1])  # nonce, body and tag bytes
def test_field_cipher_flipped_bit(data_key: DataKey, index: int) -> None:
    fc = FieldCipher()
    blob = bytearray(fc.encrypt(data_key, b"x" * 40, b"aad"))
    blob[index] ^= 0x80
    with pytest.raises(DecryptionError):
        fc.decrypt(data_key, bytes(blob), b"aad")


def test_field_cipher_wrong_key_and_truncation(data_key: DataKey, tmp_path: Path) -> None:
    other = LocalKeyWrapper(tmp_path / "o.key", create=True).generate_data_key("phi")
    fc = FieldCipher()
    blob = fc.encrypt(data_key, b"payload", b"aad")
    with pytest.raises(DecryptionError):
        fc.decrypt(other, blob, b"aad")
    with pytest.raises(DecryptionError):
        fc.decrypt(data_key, blob[:27], b"aad")


def test_field_cipher_cache_bounded(tmp_path: Path) -> None:
    wrapper = LocalKeyWrapper(tmp_path / "m.key", create=True)
    keys = [wrapper.generate_data_key("phi") for _ in range(5)]
    fc = FieldCipher(cache_size=2)
    blobs = [fc.encrypt(k, b"p", b"a") for k in keys]
    assert len(fc._aeads) == 2
    for k, b in zip(keys, blobs, strict=True):
        assert fc.decrypt(k, b, b"a") == b"p"
    assert len(fc._aeads) == 2

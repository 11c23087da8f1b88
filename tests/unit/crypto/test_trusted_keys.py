"""The trusted-keys file: what it accepts, every way it is refused, and the verdict on a
head (`ok`, `bad_signature`, `outside_window`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from audit_worker.crypto import LocalSigner, TreeHead, TrustedKeys, TrustedKeysError

JUNE = 1_780_272_000_000  # 2026-06-01T00:00:00Z in ms


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalSigner, LocalSigner]:
    directory = tmp_path_factory.mktemp("signers")
    return (LocalSigner(directory / "old.pem", create=True),
            LocalSigner(directory / "new.pem", create=True))


def pem_of(key: Any) -> bytes:
    return bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trusted-keys.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def signed(signer: LocalSigner, timestamp_ms: int) -> tuple[TreeHead, bytes]:
    head = TreeHead("audit-log", 10, bytes(32), timestamp_ms)
    return head, signer.sign(head.signing_input())


# ---- what it accepts

def test_a_rotation_file_loads_keys_from_files_relative_to_it(
        tmp_path: Path, signers: tuple[LocalSigner, LocalSigner]) -> None:
    old, new = signers
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "old.pem").write_bytes(old.public_key_pem())
    path = write(tmp_path, "keys:\n"
                 "  - public_key_file: keys/old.pem\n"
                 "    valid_until: 2026-06-01T00:00:00Z\n"  # unquoted: YAML reads a datetime
                 "  - public_key: |\n"
                 + "".join(f"      {line}\n" for line in new.public_key_pem().decode().splitlines())
                 + "    valid_from: '2026-06-01T00:00:00+00:00'\n")
    trusted = TrustedKeys.load(path)
    assert [(k.pem, k.valid_from_ms, k.valid_until_ms) for k in trusted.keys] == [
        (old.public_key_pem(), None, JUNE), (new.public_key_pem(), JUNE, None)]
    assert len(trusted.keys[0].fingerprint) == 64


def test_windows_are_half_open(signers: tuple[LocalSigner, LocalSigner]) -> None:
    old, _ = signers
    trusted = TrustedKeys.parse({"keys": [{
        "public_key": old.public_key_pem().decode(), "valid_from": "2026-01-01T00:00:00Z",
        "valid_until": "2026-06-01T00:00:00Z"}]}, base=Path("."))
    key = trusted.keys[0]
    assert key.covers(JUNE - 1) and not key.covers(JUNE)
    assert key.covers(key.valid_from_ms or 0) and not key.covers((key.valid_from_ms or 0) - 1)


def test_an_offset_other_than_utc_is_converted(signers: tuple[LocalSigner, LocalSigner]) -> None:
    trusted = TrustedKeys.parse({"keys": [{
        "public_key": signers[0].public_key_pem().decode(),
        "valid_until": "2026-06-01T02:00:00+02:00"}]}, base=Path("."))
    assert trusted.keys[0].valid_until_ms == JUNE


def test_from_pems_trusts_each_key_for_all_time(signers: tuple[LocalSigner, LocalSigner]) -> None:
    trusted = TrustedKeys.from_pems([s.public_key_pem() for s in signers])
    assert all(k.valid_from_ms is None and k.valid_until_ms is None for k in trusted.keys)


# ---- the verdict on a head

def test_a_head_is_ok_from_a_key_valid_at_its_time_and_outside_the_window_otherwise(
        signers: tuple[LocalSigner, LocalSigner]) -> None:
    old, new = signers
    trusted = TrustedKeys.parse({"keys": [
        {"public_key": old.public_key_pem().decode(), "valid_until": "2026-06-01T00:00:00Z"},
        {"public_key": new.public_key_pem().decode(), "valid_from": "2026-06-01T00:00:00Z"},
    ]}, base=Path("."))
    assert trusted.check_head(*signed(old, JUNE - 1)) == "ok"
    assert trusted.check_head(*signed(new, JUNE)) == "ok"
    assert trusted.check_head(*signed(old, JUNE)) == "outside_window"  # rotated out
    assert trusted.check_head(*signed(new, JUNE - 1)) == "outside_window"  # not yet in use


def test_a_head_no_trusted_key_signed_is_a_bad_signature(
        signers: tuple[LocalSigner, LocalSigner]) -> None:
    old, new = signers
    trusted = TrustedKeys.from_pems([old.public_key_pem()])
    assert trusted.check_head(*signed(new, JUNE)) == "bad_signature"
    head, signature = signed(old, JUNE)
    assert trusted.check_head(head, signature[:-1] + bytes([signature[-1] ^ 1])) == "bad_signature"
    assert trusted.check_head(head, b"not DER") == "bad_signature"


# ---- every way the file is refused

def refused(document: Any, match: str, base: Path = Path(".")) -> None:
    with pytest.raises(TrustedKeysError, match=match):
        TrustedKeys.parse(document, base=base, name="keys.yaml")


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TrustedKeysError, match=r"cannot read .*missing\.yaml"):
        TrustedKeys.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("content", [b"keys: [unclosed\n", b"\xff\xfe keys"],
                         ids=["bad-yaml", "not-utf8"])
def test_a_file_that_is_not_yaml_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "keys.yaml"
    path.write_bytes(content)
    with pytest.raises(TrustedKeysError, match="is not a YAML document"):
        TrustedKeys.load(path)


@pytest.mark.parametrize("document", [None, [], "keys", {"keys": [], "extra": 1}, {"key": []}],
                         ids=["empty", "list", "string", "extra-key", "misspelt"])
def test_the_document_must_be_a_mapping_with_only_keys(document: Any) -> None:
    refused(document, "keys.yaml: must be a mapping with exactly one key, `keys`")


@pytest.mark.parametrize("keys", [[], "a.pem", {"public_key_file": "a.pem"}, None],
                         ids=["empty", "string", "mapping", "null"])
def test_keys_must_be_a_non_empty_list(keys: Any) -> None:
    refused({"keys": keys}, "keys must be a non-empty list")


def test_an_entry_must_be_a_mapping() -> None:
    refused({"keys": ["a.pem"]}, r"keys\[0\]: must be a mapping")


def test_an_unknown_field_is_refused_with_the_allowed_ones() -> None:
    refused({"keys": [{"public_key_file": "a.pem", "valid_to": "2026-01-01T00:00:00Z"}]},
            r"keys\[0\]: unknown field\(s\); allowed: public_key, public_key_file, valid_from,"
            " valid_until")


@pytest.mark.parametrize("entry", [{}, {"public_key": "x", "public_key_file": "a.pem"}],
                         ids=["neither", "both"])
def test_exactly_one_of_public_key_and_public_key_file(entry: dict[str, Any]) -> None:
    refused({"keys": [entry]}, "give exactly one of public_key, public_key_file")


def test_public_key_must_be_text() -> None:
    refused({"keys": [{"public_key": 42}]}, r"keys\[0\].public_key: must be PEM text")


@pytest.mark.parametrize("file", ["", 42, None], ids=["empty", "number", "null"])
def test_public_key_file_must_be_a_file_name(file: Any) -> None:
    refused({"keys": [{"public_key_file": file}]}, "public_key_file: must be a file name")


def test_a_missing_key_file_is_named_by_its_entry(tmp_path: Path) -> None:
    refused({"keys": [{"public_key_file": "gone.pem"}]},
            r"keys\[0\].public_key_file: cannot read it", base=tmp_path)


def test_text_that_is_not_a_pem_public_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n")
    refused({"keys": [{"public_key_file": "junk.pem"}]},
            r"keys\[0\].public_key: not a PEM public key", base=tmp_path)
    refused({"keys": [{"public_key": "hello"}]}, "not a PEM public key")


@pytest.mark.parametrize("key", [
    rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ec.generate_private_key(ec.SECP384R1()),
], ids=["rsa", "p384"])
def test_a_key_other_than_ecdsa_p256_is_refused(key: Any) -> None:
    refused({"keys": [{"public_key": pem_of(key).decode()}]}, "not an ECDSA P-256 public key")


@pytest.mark.parametrize(("value", "match"), [
    ("June 2026", "valid_from: not an RFC 3339 date-time"),
    (1780272000, "valid_from: must be an RFC 3339 date-time string"),
    ("2026-06-01T00:00:00", "valid_from: needs a UTC offset"),
], ids=["prose", "number", "no-offset"])
def test_a_bad_instant_is_named_by_its_field(
        value: Any, match: str, signers: tuple[LocalSigner, LocalSigner]) -> None:
    refused({"keys": [{"public_key": signers[0].public_key_pem().decode(), "valid_from": value}]},
            match)


def test_an_unquoted_yaml_time_without_offset_is_refused(
        tmp_path: Path, signers: tuple[LocalSigner, LocalSigner]) -> None:
    (tmp_path / "k.pem").write_bytes(signers[0].public_key_pem())
    path = write(tmp_path, "keys:\n  - public_key_file: k.pem\n"
                 "    valid_until: 2026-06-01 00:00:00\n")
    with pytest.raises(TrustedKeysError, match="valid_until: needs a UTC offset"):
        TrustedKeys.load(path)


@pytest.mark.parametrize("until", ["2026-06-01T00:00:00Z", "2026-05-01T00:00:00Z"],
                         ids=["empty-window", "reversed"])
def test_a_window_must_end_after_it_starts(
        until: str, signers: tuple[LocalSigner, LocalSigner]) -> None:
    refused({"keys": [{"public_key": signers[0].public_key_pem().decode(),
                       "valid_from": "2026-06-01T00:00:00Z", "valid_until": until}]},
            r"keys\[0\]: valid_until must be after valid_from")


def test_the_entry_named_is_the_one_at_fault(signers: tuple[LocalSigner, LocalSigner]) -> None:
    good = {"public_key": signers[0].public_key_pem().decode()}
    refused({"keys": [good, good, {"public_key": "x"}]}, r"keys\[2\]")


def test_from_pems_needs_a_key_and_names_a_bad_one(
        signers: tuple[LocalSigner, LocalSigner]) -> None:
    with pytest.raises(TrustedKeysError, match="no public key given"):
        TrustedKeys.from_pems([])
    with pytest.raises(TrustedKeysError, match="public key 2: not a PEM public key"):
        TrustedKeys.from_pems([signers[0].public_key_pem(), b"not a key"])


def test_stored_head_is_trusted_only_for_its_log_well_formed_and_signed(tmp_path: Path) -> None:
    from audit_worker.crypto import LocalSigner, TreeHead

    signer = LocalSigner(tmp_path / "k.pem", create=True)
    keys = TrustedKeys.from_pems([signer.public_key_pem()])
    head = TreeHead("log-a", 5, bytes(32), 1_700_000_000_000)
    row = {"log_id": "log-a", "tree_size": 5, "root_hash": bytes(32),
           "timestamp_ms": head.timestamp_ms, "signature": signer.sign(head.signing_input())}
    assert keys.stored_head("log-a", row) == head
    assert keys.stored_head("log-b", row) is None
    assert keys.stored_head("log-a", {**row, "tree_size": 6}) is None
    assert keys.stored_head("log-a", {**row, "root_hash": b"short"}) is None

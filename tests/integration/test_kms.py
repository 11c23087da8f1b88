"""KmsKeyWrapper / KmsSigner against moto in server mode (real HTTP to a local moto).

Known moto 5.2 deviations from real KMS (verified against moto's source and behaviour):
- a disabled key still serves GenerateDataKey/Decrypt/Sign (real KMS: DisabledException),
  so key-state errors are covered with botocore's Stubber in tests/unit/crypto instead;
- Decrypt with a mismatching KeyId yields AccessDeniedException (real: IncorrectKeyException);
- GetPublicKey on a symmetric key returns an RSA public key (real: UnsupportedOperationException);
- MessageType=DIGEST is ignored (the digest is hashed again) and the 4096-byte RAW limit is not
  enforced. KmsSigner only uses RAW with short messages, so this does not affect it.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from audit_worker.crypto import (
    CryptoError,
    DataKeyManager,
    DecryptionError,
    FieldCipher,
    KeyUnavailableError,
    KmsKeyWrapper,
    KmsSigner,
    SignatureError,
    TreeHead,
    public_key_fingerprint,
    verify_tree_head,
)

FAST_FAIL = Config(
    connect_timeout=1, read_timeout=2, retries={"max_attempts": 1, "mode": "standard"}
)


def _client(endpoint: str, config: Config | None = None) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=config,
    )


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        # Keep developer ~/.aws settings (profiles, retry modes, CA bundles) out of the test.
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        mp.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="module")
def kms(moto_endpoint: str) -> Any:
    return _client(moto_endpoint)


@pytest.fixture(scope="module")
def sym_key(kms: Any) -> str:
    meta = kms.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
    return str(meta["KeyId"])


@pytest.fixture(scope="module")
def sign_key(kms: Any) -> str:
    meta = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    assert meta["SigningAlgorithms"] == ["ECDSA_SHA_256"]
    return str(meta["KeyId"])


class CountingClient:
    """Proxy around a boto3 client counting calls per operation."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)

        return counted


def _head(size: int = 7) -> TreeHead:
    return TreeHead("log-1", size, hashlib.sha256(b"r").digest(), 1_700_000_000_000)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- KmsKeyWrapper ------------------------------------------------------------------------


def test_wrapper_round_trip(kms: Any, sym_key: str) -> None:
    wrapper = KmsKeyWrapper(sym_key, kms)
    assert wrapper.ref == "kms:" + sym_key
    key = wrapper.generate_data_key("phi")
    assert len(key.plaintext) == 32
    assert key.wrapper_ref == wrapper.ref
    assert len(key.key_id) == 16
    assert wrapper.unwrap(key.wrapped, "phi") == key.plaintext


def test_wrapper_round_trip_via_alias(kms: Any, sym_key: str) -> None:
    kms.create_alias(AliasName="alias/audit-kit-test", TargetKeyId=sym_key)
    wrapper = KmsKeyWrapper("alias/audit-kit-test", kms)
    key = wrapper.generate_data_key("phi")
    assert KmsKeyWrapper(sym_key, kms).unwrap(key.wrapped, "phi") == key.plaintext


def test_encryption_context_binding(kms: Any, sym_key: str) -> None:
    wrapper = KmsKeyWrapper(sym_key, kms)
    key = wrapper.generate_data_key("phi")
    with pytest.raises(DecryptionError) as info:
        wrapper.unwrap(key.wrapped, "index")
    assert "InvalidCiphertextException" in str(info.value)
    assert key.plaintext.hex() not in str(info.value)
    # The context is really {"purpose", "app"}: a raw Decrypt with it succeeds, without it fails.
    ok = kms.decrypt(
        CiphertextBlob=key.wrapped, EncryptionContext={"purpose": "phi", "app": "audit-kit"}
    )
    assert ok["Plaintext"] == key.plaintext
    with pytest.raises(kms.exceptions.InvalidCiphertextException):
        kms.decrypt(CiphertextBlob=key.wrapped)


def test_corrupted_blob(kms: Any, sym_key: str) -> None:
    wrapper = KmsKeyWrapper(sym_key, kms)
    blob = bytearray(wrapper.generate_data_key("phi").wrapped)
    blob[-1] ^= 0x01
    with pytest.raises(DecryptionError):
        wrapper.unwrap(bytes(blob), "phi")


def test_blob_from_another_key_is_refused(kms: Any, sym_key: str) -> None:
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    key = KmsKeyWrapper(other, kms).generate_data_key("phi")
    # moto answers AccessDeniedException (-> KeyUnavailableError); real KMS answers
    # IncorrectKeyException (-> DecryptionError). Either way it is refused.
    with pytest.raises(CryptoError):
        KmsKeyWrapper(sym_key, kms).unwrap(key.wrapped, "phi")


def test_unknown_key_is_unavailable(kms: Any) -> None:
    missing = "11111111-2222-3333-4444-555555555555"
    with pytest.raises(KeyUnavailableError) as info:
        KmsKeyWrapper(missing, kms).generate_data_key("phi")
    assert "kms:" + missing in str(info.value)
    assert "NotFoundException" in str(info.value)
    assert info.value.ref == "kms:" + missing


def test_manager_one_kms_call_for_many_events(kms: Any, sym_key: str) -> None:
    client = CountingClient(kms)
    mgr = DataKeyManager(KmsKeyWrapper(sym_key, client), rotate_after_uses=10_000)
    cipher = FieldCipher()
    blobs = []
    for i in range(10_000):
        key = mgr.current()
        blobs.append((key.key_id, key.wrapped, cipher.encrypt(key, b"payload %d" % i, b"%d" % i)))
        mgr.note_use(1)
    assert client.calls == {"generate_data_key": 1}
    mgr.current()
    assert client.calls == {"generate_data_key": 2}
    assert mgr.rotations == 1

    # A reader process: one Decrypt for the whole batch.
    reader_client = CountingClient(kms)
    reader = DataKeyManager(KmsKeyWrapper(sym_key, reader_client))
    for i, (key_id, wrapped, blob) in enumerate(blobs):
        assert cipher.decrypt(reader.get(key_id, wrapped), blob, b"%d" % i) == b"payload %d" % i
    assert reader_client.calls == {"decrypt": 1}


# --- KmsSigner ----------------------------------------------------------------------------


def test_signer_verifies_offline(kms: Any, sign_key: str) -> None:
    client = CountingClient(kms)
    signer = KmsSigner(sign_key, client)
    assert signer.ref == "kms:" + sign_key
    pem = signer.public_key_pem()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert signer.public_key_pem() is pem  # cached
    head = _head()
    sig = signer.sign(head.signing_input())
    assert client.calls == {"get_public_key": 1, "sign": 1}
    # Offline: only the PEM, no KMS client involved.
    verify_tree_head(pem, head, sig)
    with pytest.raises(SignatureError) as info:
        verify_tree_head(pem, _head(8), sig)
    assert "8" in str(info.value)
    assert len(public_key_fingerprint(pem)) == 64


def test_kms_signature_is_der_p256_sha256(kms: Any, sign_key: str) -> None:
    # Cross-check with KMS Verify: the offline format matches what KMS itself accepts.
    signer = KmsSigner(sign_key, kms)
    msg = _head().signing_input()
    sig = signer.sign(msg)
    assert sig[0] == 0x30  # DER SEQUENCE
    resp = kms.verify(
        KeyId=sign_key,
        Message=msg,
        MessageType="RAW",
        Signature=sig,
        SigningAlgorithm="ECDSA_SHA_256",
    )
    assert resp["SignatureValid"] is True


def test_signer_with_symmetric_key_is_rejected(kms: Any, sym_key: str) -> None:
    signer = KmsSigner(sym_key, kms)
    with pytest.raises(KeyUnavailableError):
        signer.sign(b"message")
    # moto returns an RSA key from GetPublicKey here; real KMS raises
    # UnsupportedOperationException. Both end as KeyUnavailableError.
    with pytest.raises(KeyUnavailableError):
        signer.public_key_pem()


def test_signer_other_key_fails_verification(kms: Any, sign_key: str) -> None:
    other = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    head = _head()
    sig = KmsSigner(other["KeyId"], kms).sign(head.signing_input())
    with pytest.raises(SignatureError):
        verify_tree_head(KmsSigner(sign_key, kms).public_key_pem(), head, sig)


# --- unreachable endpoints ----------------------------------------------------------------


def test_closed_port_is_key_unavailable() -> None:
    client = _client(f"http://127.0.0.1:{_closed_port()}", FAST_FAIL)
    wrapper = KmsKeyWrapper("alias/audit", client)
    signer = KmsSigner("alias/sth", client)
    start = time.monotonic()
    with pytest.raises(KeyUnavailableError) as info:
        wrapper.generate_data_key("phi")
    assert "kms:alias/audit" in str(info.value)
    assert "EndpointConnectionError" in str(info.value)
    assert info.value.__cause__ is not None
    with pytest.raises(KeyUnavailableError):
        wrapper.unwrap(b"\x00" * 64, "phi")
    with pytest.raises(KeyUnavailableError):
        signer.sign(b"message")
    with pytest.raises(KeyUnavailableError):
        signer.public_key_pem()
    assert time.monotonic() - start < 10


def test_stopped_server_is_key_unavailable() -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = _client(f"http://{host}:{port}", FAST_FAIL)
    key_id = client.create_key()["KeyMetadata"]["KeyId"]
    wrapper = KmsKeyWrapper(key_id, client)
    mgr = DataKeyManager(wrapper, rotate_after_uses=1)
    key = mgr.current()
    server.stop()
    # Unwrapping a cached key still works without KMS...
    assert mgr.get(key.key_id, key.wrapped) is key
    # ...but the next rotation needs KMS and fails loudly.
    mgr.note_use(1)
    with pytest.raises(KeyUnavailableError) as info:
        mgr.current()
    assert key_id in str(info.value)
    with pytest.raises(KeyUnavailableError):
        wrapper.unwrap(key.wrapped, "phi")

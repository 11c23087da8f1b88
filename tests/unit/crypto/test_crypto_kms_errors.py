"""Mapping of real-KMS error codes that moto cannot produce (key state, wrong key).

Uses botocore's Stubber, so the responses have exactly the shape boto3 gives for real KMS.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from audit_worker.crypto import DecryptionError, KeyUnavailableError, KmsKeyWrapper, KmsSigner


@pytest.fixture
def stubbed() -> Iterator[tuple[Any, Stubber]]:
    client = boto3.client(
        "kms",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    with Stubber(client) as stub:
        yield client, stub
        stub.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        ("DisabledException", "re-enable"),
        ("KMSInvalidStateException", "pending deletion"),
        ("AccessDeniedException", "IAM"),
        ("NotFoundException", "region"),
        ("ThrottlingException", "retry"),
    ],
)
def test_key_state_errors(stubbed: tuple[Any, Stubber], code: str, hint: str) -> None:
    client, stub = stubbed
    stub.add_client_error("generate_data_key", service_error_code=code, http_status_code=400)
    with pytest.raises(KeyUnavailableError) as info:
        KmsKeyWrapper("alias/audit", client).generate_data_key("phi")
    msg = str(info.value)
    assert "kms:alias/audit" in msg
    assert code in msg
    assert hint in msg
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("code", ["IncorrectKeyException", "InvalidCiphertextException"])
def test_wrong_key_or_ciphertext_is_decryption_error(
    stubbed: tuple[Any, Stubber], code: str
) -> None:
    client, stub = stubbed
    stub.add_client_error("decrypt", service_error_code=code, http_status_code=400)
    with pytest.raises(DecryptionError):
        KmsKeyWrapper("alias/audit", client).unwrap(b"\x01" * 64, "phi")


def test_request_parameters(stubbed: tuple[Any, Stubber]) -> None:
    client, stub = stubbed
    ctx = {"purpose": "phi", "app": "audit-kit"}
    stub.add_response(
        "generate_data_key",
        {"Plaintext": b"k" * 32, "CiphertextBlob": b"w" * 64, "KeyId": "arn"},
        {"KeyId": "alias/audit", "KeySpec": "AES_256", "EncryptionContext": ctx},
    )
    stub.add_response(
        "decrypt",
        {"Plaintext": b"k" * 32, "KeyId": "arn"},
        {"CiphertextBlob": b"w" * 64, "KeyId": "alias/audit", "EncryptionContext": ctx},
    )
    wrapper = KmsKeyWrapper("alias/audit", client)
    key = wrapper.generate_data_key("phi")
    assert wrapper.unwrap(key.wrapped, "phi") == key.plaintext


def test_signer_unsupported_operation(stubbed: tuple[Any, Stubber]) -> None:
    client, stub = stubbed
    stub.add_client_error("get_public_key", service_error_code="UnsupportedOperationException")
    with pytest.raises(KeyUnavailableError) as info:
        KmsSigner("alias/sth", client).public_key_pem()
    assert "KeySpec" in str(info.value)

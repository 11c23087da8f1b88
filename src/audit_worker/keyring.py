"""Build the key wrapper and tree-head signer that the settings ask for."""

from __future__ import annotations

from typing import Any

from audit_worker.config import WorkerSettings
from audit_worker.crypto import (
    KeyWrapper,
    KmsKeyWrapper,
    KmsSigner,
    LocalKeyWrapper,
    LocalSigner,
    TreeHeadSigner,
    TrustedKeys,
    TrustedKeysError,
)
from audit_worker.errors import ConfigurationError


def kms_client(settings: WorkerSettings) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "kms",
        region_name=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 3}),
    )


def build_keys(
    settings: WorkerSettings, *, create: bool = False
) -> tuple[KeyWrapper, TreeHeadSigner]:
    """The data-key wrapper and signer. `create` makes missing local key files (dev only)."""
    if settings.key_backend == "kms":
        client = kms_client(settings)
        assert settings.kms_data_key_id and settings.kms_signing_key_id  # settings checked
        return (
            KmsKeyWrapper(settings.kms_data_key_id, client),
            KmsSigner(settings.kms_signing_key_id, client),
        )
    key_dir = settings.local_key_dir
    return (
        LocalKeyWrapper(key_dir / "master.key", create=create),
        LocalSigner(key_dir / "signing.pem", create=create),
    )


def trusted_keys(settings: WorkerSettings, own_public_pem: bytes) -> TrustedKeys:
    """The keys whose tree heads the worker resumes from: its own signing key for all
    time (tried first), then those of ``trusted_keys_file`` within their windows."""
    keys = TrustedKeys.from_pems([own_public_pem]).keys
    if settings.trusted_keys_file is not None:
        try:
            keys += TrustedKeys.load(settings.trusted_keys_file).keys
        except TrustedKeysError as exc:
            raise ConfigurationError(
                f"AUDIT_TRUSTED_KEYS_FILE: {exc}: fix the file, or unset the setting when "
                "the signing key was never rotated"
            ) from None
    return TrustedKeys(keys)

"""Mapping of boto3/botocore failures to crypto-layer exceptions."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from .errors import CryptoError, DecryptionError, KeyUnavailableError

# Exceptions a KMS call may raise; callers catch exactly these and map them with kms_error().
AWS_ERRORS: tuple[type[Exception], ...] = (ClientError, BotoCoreError)

# Codes that mean "this ciphertext is not valid for this key/context", i.e. data problems
# rather than an unreachable key. Real KMS reports a KeyId mismatch as IncorrectKeyException.
_DECRYPTION_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})

_HINTS: dict[str, str] = {
    "AccessDeniedException": "check the IAM policy and the key policy grant this operation",
    "DisabledException": "re-enable the key",
    "KMSInvalidStateException": "the key is disabled, pending deletion or pending import; "
    "re-enable it or cancel the deletion",
    "NotFoundException": "check the key id/alias/ARN and the region",
    "InvalidKeyUsageException": "the key has the wrong KeyUsage/KeySpec for this operation",
    "UnsupportedOperationException": "the key has the wrong KeyUsage/KeySpec for this operation",
    "ValidationException": "check the key configuration (KeySpec/KeyUsage/algorithm)",
    "KeyUnavailableException": "KMS reports the key temporarily unavailable; retry later",
    "DependencyTimeoutException": "KMS timed out; retry later",
    "KMSInternalException": "KMS internal error; retry later",
    "ThrottlingException": "KMS is throttling requests; retry with backoff",
}
_NETWORK_HINT = "check network reachability of the KMS endpoint, the region and the AWS credentials"


def kms_error(exc: Exception, ref: str, action: str) -> CryptoError:
    """Translate a botocore exception raised during *action* on *ref* into a CryptoError.

    Only the AWS error code goes into the message; the original exception stays chained
    (``raise ... from exc``) for debugging.
    """
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
        if code in _DECRYPTION_CODES:
            return DecryptionError(
                f"KMS rejected the ciphertext during {action} with {ref} ({code}): "
                "wrong key, wrong purpose/encryption context or corrupted blob"
            )
        hint = _HINTS.get(code, "check the key state and permissions in KMS")
        return KeyUnavailableError(
            f"KMS key {ref} unavailable during {action} ({code}): {hint}", ref=ref
        )
    return KeyUnavailableError(
        f"KMS key {ref} unreachable during {action} ({type(exc).__name__}): {_NETWORK_HINT}",
        ref=ref,
    )

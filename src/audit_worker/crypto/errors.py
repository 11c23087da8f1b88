"""Exceptions raised by the crypto layer.

Messages name key *references* (``local:…``, ``kms:…``, file paths, key ids) and tree
sizes, never key material or plaintext, so they are safe to log.
"""

from __future__ import annotations

__all__ = ["CryptoError", "DecryptionError", "KeyUnavailableError", "SignatureError"]


class CryptoError(Exception):
    """Base class for all crypto-layer failures."""


class KeyUnavailableError(CryptoError):
    """A key (KMS key or key file) cannot be reached or used; operator action is needed."""

    def __init__(self, message: str, *, ref: str | None = None) -> None:
        super().__init__(message)
        self.ref = ref


class DecryptionError(CryptoError):
    """Authenticated decryption failed: wrong key, wrong purpose/AAD or corrupted data."""


class SignatureError(CryptoError):
    """A tree-head signature did not verify (or could not be checked)."""

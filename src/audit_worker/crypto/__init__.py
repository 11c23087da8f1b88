"""Envelope encryption, PHI pseudonymisation and tree-head signing."""

from __future__ import annotations

from .errors import CryptoError, DecryptionError, KeyUnavailableError, SignatureError
from .phi import FieldCipher, Pseudonymiser, PseudonymKind
from .signing import (
    TREE_HEAD_DOMAIN,
    KmsSigner,
    LocalSigner,
    TreeHead,
    TreeHeadSigner,
    public_key_fingerprint,
    verify_tree_head,
)
from .trusted_keys import HeadCheck, TrustedKey, TrustedKeys, TrustedKeysError
from .wrapping import (
    DATA_KEY_BYTES,
    DataKey,
    DataKeyManager,
    KeyWrapper,
    KmsKeyWrapper,
    LocalKeyWrapper,
    data_key_id,
)

__all__ = [
    "DATA_KEY_BYTES",
    "TREE_HEAD_DOMAIN",
    "CryptoError",
    "DataKey",
    "DataKeyManager",
    "DecryptionError",
    "FieldCipher",
    "HeadCheck",
    "KeyUnavailableError",
    "KeyWrapper",
    "KmsKeyWrapper",
    "KmsSigner",
    "LocalKeyWrapper",
    "LocalSigner",
    "PseudonymKind",
    "Pseudonymiser",
    "SignatureError",
    "TreeHead",
    "TreeHeadSigner",
    "TrustedKey",
    "TrustedKeys",
    "TrustedKeysError",
    "data_key_id",
    "public_key_fingerprint",
    "verify_tree_head",
]

"""PHI handling: keyed pseudonyms for identifiers and AES-GCM field encryption."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from typing import Literal, get_args

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import DecryptionError
from .wrapping import DataKey

__all__ = ["FieldCipher", "PseudonymKind", "Pseudonymiser"]

PseudonymKind = Literal["patient", "actor", "network"]
_KINDS: tuple[str, ...] = get_args(PseudonymKind)
_MIN_HMAC_KEY_BYTES = 16
_NONCE_BYTES = 12
_TAG_BYTES = 16


class Pseudonymiser:
    """Deterministic HMAC-SHA256 pseudonyms for patient, actor and network identifiers.

    The kind is mixed into the MAC input so the same string used as a patient id and as an
    actor id yields unrelated pseudonyms.
    """

    def __init__(self, hmac_key: bytes) -> None:
        if len(hmac_key) < _MIN_HMAC_KEY_BYTES:
            raise ValueError(f"hmac_key must be at least {_MIN_HMAC_KEY_BYTES} bytes")
        # One prototype per kind with the "kind\x00" prefix already absorbed: each call is
        # then a copy() plus one update(), no key schedule.
        self._protos: dict[str, hmac.HMAC] = {}
        for kind in _KINDS:
            proto = hmac.new(hmac_key, digestmod=hashlib.sha256)
            proto.update(kind.encode() + b"\x00")
            self._protos[kind] = proto
        self._content = hmac.new(hmac_key, digestmod=hashlib.sha256)
        self._content.update(b"content\x00")

    @staticmethod
    def normalise(kind: PseudonymKind, value: str) -> str:
        """Strip surrounding whitespace; network addresses are also lower-cased (IPv6 hex)."""
        value = value.strip()
        return value.lower() if kind == "network" else value

    def digest(self, kind: PseudonymKind, value: str) -> bytes:
        """HMAC-SHA256(key, kind || 0x00 || normalised(value))."""
        try:
            mac = self._protos[kind].copy()
        except KeyError:
            raise ValueError(f"unknown pseudonym kind {kind!r}; expected one of {_KINDS}") from None
        norm = value.strip()
        if not norm:
            # Pseudonymising blanks would merge every missing id into one pseudonym.
            raise ValueError(f"empty {kind} identifier cannot be pseudonymised")
        if kind == "network":
            norm = norm.lower()
        mac.update(norm.encode())
        return mac.digest()

    def fingerprint(self, content: bytes) -> bytes:
        """HMAC-SHA256(key, "content" || 0x00 || content): tells two bodies sent under one
        event id apart without storing either in clear."""
        mac = self._content.copy()
        mac.update(content)
        return mac.digest()

    def hexdigest(self, kind: PseudonymKind, value: str) -> str:
        """Hex form of :meth:`digest`."""
        return self.digest(kind, value).hex()


class FieldCipher:
    """AES-256-GCM encryption of PHI fields under data keys.

    Output format: 12-byte random nonce || ciphertext || 16-byte tag.
    """

    def __init__(self, cache_size: int = 64) -> None:
        if cache_size <= 0:
            raise ValueError("cache_size must be positive")
        self._cache_size = cache_size
        self._aeads: OrderedDict[str, AESGCM] = OrderedDict()

    def _aead(self, key: DataKey) -> AESGCM:
        aead = self._aeads.get(key.key_id)
        if aead is None:
            aead = AESGCM(key.plaintext)
            self._aeads[key.key_id] = aead
            if len(self._aeads) > self._cache_size:
                self._aeads.popitem(last=False)
        elif len(self._aeads) > 1:
            # Cheap LRU touch; skipped in the common single-key case.
            self._aeads.move_to_end(key.key_id)
        return aead

    def encrypt(self, key: DataKey, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt *plaintext* bound to *aad* (e.g. event id + field name)."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead(key).encrypt(nonce, plaintext, aad)

    def decrypt(self, key: DataKey, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a blob from :meth:`encrypt`; DecryptionError on any mismatch."""
        if len(blob) < _NONCE_BYTES + _TAG_BYTES:
            raise DecryptionError(f"field ciphertext under key {key.key_id} is truncated")
        try:
            return self._aead(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise DecryptionError(
                f"field decryption under key {key.key_id} failed: wrong key, AAD mismatch "
                "or corrupted ciphertext"
            ) from exc

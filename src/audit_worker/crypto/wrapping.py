"""Envelope encryption: data keys wrapped by a local master key or by AWS KMS."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._aws import AWS_ERRORS, kms_error
from ._files import create_secret, missing_file_error, read_secret
from .errors import DecryptionError, KeyUnavailableError

__all__ = [
    "DATA_KEY_BYTES",
    "DataKey",
    "DataKeyManager",
    "KeyWrapper",
    "KmsKeyWrapper",
    "LocalKeyWrapper",
    "data_key_id",
]

DATA_KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_APP = "audit-kit"
# Versioned prefix so local AAD can never collide with AAD used elsewhere in the app.
_LOCAL_AAD_PREFIX = b"audit-kit/data-key/v1\x00"


def data_key_id(wrapped: bytes) -> str:
    """Short stable id of a data key: first 16 hex chars of SHA-256 of its wrapped blob."""
    return hashlib.sha256(wrapped).hexdigest()[:16]


@dataclass(frozen=True)
class DataKey:
    """A 256-bit data key together with its wrapped (storable) form."""

    key_id: str
    plaintext: bytes = field(repr=False)
    wrapped: bytes
    wrapper_ref: str
    created_at: float

    def __post_init__(self) -> None:
        if len(self.plaintext) != DATA_KEY_BYTES:
            raise ValueError(f"data key {self.key_id} must be {DATA_KEY_BYTES} bytes")


class KeyWrapper(Protocol):
    """Generates and unwraps data keys bound to a purpose."""

    ref: str

    def generate_data_key(self, purpose: str) -> DataKey:
        """Create a fresh data key wrapped for *purpose*."""
        ...

    def unwrap(self, wrapped: bytes, purpose: str) -> bytes:
        """Return the plaintext of a key wrapped for *purpose*; DecryptionError otherwise."""
        ...


def _check_purpose(purpose: str) -> None:
    if not purpose:
        raise ValueError("purpose must be a non-empty string")


class LocalKeyWrapper:
    """Wraps data keys with AES-256-GCM under a master key kept in a local file.

    The file holds the base64 text of 32 random bytes. Intended for development and
    single-node deployments; production should use :class:`KmsKeyWrapper`.
    """

    def __init__(self, key_file: Path, create: bool = False) -> None:
        self.key_file = Path(key_file)
        master = self._load(self.key_file, create)
        self._aead = AESGCM(master)
        self.ref = "local:" + hashlib.sha256(master).hexdigest()[:12]

    @staticmethod
    def _load(path: Path, create: bool) -> bytes:
        raw = read_secret(path, "master key")
        if raw is None:
            if not create:
                raise missing_file_error(path, "master key")
            fresh = os.urandom(DATA_KEY_BYTES)
            if create_secret(path, base64.b64encode(fresh) + b"\n", "master key"):
                return fresh
            # Lost a creation race: use the key the other process wrote.
            raw = read_secret(path, "master key")
            if raw is None:
                raise missing_file_error(path, "master key")
        try:
            master = base64.b64decode(raw.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyUnavailableError(
                f"master key file {path} is not valid base64: restore it from backup",
                ref=str(path),
            ) from exc
        if len(master) != DATA_KEY_BYTES:
            raise KeyUnavailableError(
                f"master key file {path} must hold {DATA_KEY_BYTES} base64-encoded bytes: "
                "restore it from backup",
                ref=str(path),
            )
        return master

    def generate_data_key(self, purpose: str) -> DataKey:
        """Create a random data key and wrap it for *purpose*."""
        _check_purpose(purpose)
        plaintext = os.urandom(DATA_KEY_BYTES)
        nonce = os.urandom(_NONCE_BYTES)
        wrapped = nonce + self._aead.encrypt(nonce, plaintext, _local_aad(purpose))
        return DataKey(
            key_id=data_key_id(wrapped),
            plaintext=plaintext,
            wrapped=wrapped,
            wrapper_ref=self.ref,
            created_at=time.time(),
        )

    def unwrap(self, wrapped: bytes, purpose: str) -> bytes:
        """Unwrap a key; DecryptionError if the master key or purpose differ."""
        _check_purpose(purpose)
        if len(wrapped) != _NONCE_BYTES + DATA_KEY_BYTES + _TAG_BYTES:
            raise DecryptionError(
                f"wrapped data key {data_key_id(wrapped)} has the wrong length for {self.ref}"
            )
        try:
            return self._aead.decrypt(
                wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], _local_aad(purpose)
            )
        except InvalidTag as exc:
            raise DecryptionError(
                f"cannot unwrap data key {data_key_id(wrapped)} with {self.ref}: "
                "wrong master key, wrong purpose or corrupted blob"
            ) from exc


def _local_aad(purpose: str) -> bytes:
    return _LOCAL_AAD_PREFIX + purpose.encode()


class KmsKeyWrapper:
    """Wraps data keys with an AWS KMS symmetric key (``GenerateDataKey`` / ``Decrypt``)."""

    def __init__(self, key_id: str, client: Any) -> None:
        if not key_id:
            raise ValueError("key_id must be a non-empty KMS key id, ARN or alias")
        self.key_id = key_id
        self.ref = "kms:" + key_id
        self._client = client

    @staticmethod
    def _context(purpose: str) -> dict[str, str]:
        return {"purpose": purpose, "app": _APP}

    def generate_data_key(self, purpose: str) -> DataKey:
        """One KMS ``GenerateDataKey`` call returning a 256-bit key bound to *purpose*."""
        _check_purpose(purpose)
        try:
            resp = self._client.generate_data_key(
                KeyId=self.key_id, KeySpec="AES_256", EncryptionContext=self._context(purpose)
            )
        except AWS_ERRORS as exc:
            raise kms_error(exc, self.ref, "GenerateDataKey") from exc
        plaintext = bytes(resp["Plaintext"])
        wrapped = bytes(resp["CiphertextBlob"])
        if len(plaintext) != DATA_KEY_BYTES:
            raise KeyUnavailableError(
                f"KMS key {self.ref} returned a data key of unexpected length", ref=self.ref
            )
        return DataKey(
            key_id=data_key_id(wrapped),
            plaintext=plaintext,
            wrapped=wrapped,
            wrapper_ref=self.ref,
            created_at=time.time(),
        )

    def unwrap(self, wrapped: bytes, purpose: str) -> bytes:
        """One KMS ``Decrypt`` call; the encryption context must match the wrap purpose."""
        _check_purpose(purpose)
        try:
            # Passing KeyId makes KMS refuse blobs wrapped under any other key, so a
            # substituted blob from an attacker-controlled key is not silently accepted.
            resp = self._client.decrypt(
                CiphertextBlob=wrapped, KeyId=self.key_id, EncryptionContext=self._context(purpose)
            )
        except AWS_ERRORS as exc:
            raise kms_error(exc, self.ref, f"Decrypt of data key {data_key_id(wrapped)}") from exc
        plaintext = bytes(resp["Plaintext"])
        if len(plaintext) != DATA_KEY_BYTES:
            raise DecryptionError(
                f"data key {data_key_id(wrapped)} unwrapped by {self.ref} has the wrong length"
            )
        return plaintext


class DataKeyManager:
    """Caches the current data key for one purpose and rotates it by age or use count.

    Not thread-safe: meant for a single asyncio loop. The wrapper calls are blocking
    (KMS is an HTTP call) but happen only on rotation or on a cache miss in :meth:`get`.
    """

    def __init__(
        self,
        wrapper: KeyWrapper,
        purpose: str = "phi",
        rotate_after_seconds: float = 3600.0,
        # AES-GCM with random 96-bit nonces is safe for ~2**32 messages per key (NIST
        # SP 800-38D); 5M keeps the nonce-collision probability negligible.
        rotate_after_uses: int = 5_000_000,
        clock: Callable[[], float] = time.monotonic,
        cache_size: int = 64,
    ) -> None:
        _check_purpose(purpose)
        if rotate_after_seconds <= 0:
            raise ValueError("rotate_after_seconds must be positive")
        if rotate_after_uses <= 0:
            raise ValueError("rotate_after_uses must be positive")
        if cache_size <= 0:
            raise ValueError("cache_size must be positive")
        self.wrapper = wrapper
        self.purpose = purpose
        self.rotate_after_seconds = rotate_after_seconds
        self.rotate_after_uses = rotate_after_uses
        self._clock = clock
        self._cache_size = cache_size
        self._current: DataKey | None = None
        self._born = 0.0  # clock() value when the current key was generated
        self._uses = 0
        self._cache: OrderedDict[str, DataKey] = OrderedDict()
        self.rotations = 0  # replacements of an existing current key (not the first one)

    @property
    def uses(self) -> int:
        """Uses recorded against the current key."""
        return self._uses

    def current(self) -> DataKey:
        """Return the key to encrypt with, generating one only when needed."""
        key = self._current
        if (
            key is None
            or self._uses >= self.rotate_after_uses
            or self._clock() - self._born >= self.rotate_after_seconds
        ):
            key = self._rotate()
        return key

    def rotate(self) -> DataKey:
        """Force a new current key (e.g. after a master-key change)."""
        return self._rotate()

    def _rotate(self) -> DataKey:
        key = self.wrapper.generate_data_key(self.purpose)
        if self._current is not None:
            self.rotations += 1
            # Recently written rows reference the outgoing key; keep it hot for reads.
            self._remember(self._current)
        self._current = key
        self._born = self._clock()
        self._uses = 0
        return key

    def note_use(self, n: int = 1) -> None:
        """Record *n* encryptions under the current key."""
        if n < 0:
            raise ValueError("n must be >= 0")
        self._uses += n

    def get(self, key_id: str, wrapped: bytes) -> DataKey:
        """Return the data key *key_id*, unwrapping it at most once while it stays cached."""
        cur = self._current
        if cur is not None and cur.key_id == key_id:
            return cur
        cached = self._cache.get(key_id)
        if cached is not None:
            self._cache.move_to_end(key_id)
            return cached
        if data_key_id(wrapped) != key_id:
            # key_id is derived from the blob; a mismatch means corrupted or swapped metadata.
            raise DecryptionError(f"wrapped blob does not match data key id {key_id}")
        plaintext = self.wrapper.unwrap(wrapped, self.purpose)
        # created_at records when this process unwrapped the key; the original creation
        # time is not stored in the wrapped blob.
        key = DataKey(
            key_id=key_id,
            plaintext=plaintext,
            wrapped=wrapped,
            wrapper_ref=self.wrapper.ref,
            created_at=time.time(),
        )
        self._remember(key)
        return key

    def _remember(self, key: DataKey) -> None:
        self._cache[key.key_id] = key
        self._cache.move_to_end(key.key_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

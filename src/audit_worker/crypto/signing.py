"""Signed tree heads: ECDSA P-256 / SHA-256 with a local key or an AWS KMS key."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ._aws import AWS_ERRORS, kms_error
from ._files import create_secret, missing_file_error, read_secret
from .errors import KeyUnavailableError, SignatureError

__all__ = [
    "TREE_HEAD_DOMAIN",
    "KmsSigner",
    "LocalSigner",
    "TreeHead",
    "TreeHeadSigner",
    "public_key_fingerprint",
    "verify_tree_head",
]

# Domain separation + version: a signature over a tree head can never be replayed as a
# signature over some other message type signed by the same key, and v2 can change format.
TREE_HEAD_DOMAIN = b"audit-kit/tree-head/v1\n"
_HASH_BYTES = 32
# KMS Sign accepts RAW messages up to 4096 bytes; larger ones need MessageType=DIGEST.
_KMS_MAX_RAW_MESSAGE = 4096


@dataclass(frozen=True)
class TreeHead:
    """Signed statement of a Merkle tree's size and root at a point in time."""

    log_id: str
    tree_size: int
    root_hash: bytes
    timestamp_ms: int

    def __post_init__(self) -> None:
        # Validation keeps signing_input() unambiguous: one encoding per head and vice versa.
        if not self.log_id or "\n" in self.log_id or "\r" in self.log_id:
            raise ValueError("log_id must be non-empty and contain no line breaks")
        if isinstance(self.tree_size, bool) or not isinstance(self.tree_size, int):
            raise TypeError("tree_size must be an int")
        if self.tree_size < 0:
            raise ValueError("tree_size must be >= 0")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != _HASH_BYTES:
            raise ValueError(f"root_hash must be {_HASH_BYTES} bytes")
        if isinstance(self.timestamp_ms, bool) or not isinstance(self.timestamp_ms, int):
            raise TypeError("timestamp_ms must be an int")
        if self.timestamp_ms < 0:
            raise ValueError("timestamp_ms must be >= 0")

    def signing_input(self) -> bytes:
        """The exact bytes that are signed (versioned, newline-delimited)."""
        body = f"{self.log_id}\n{self.tree_size}\n{self.root_hash.hex()}\n{self.timestamp_ms}\n"
        return TREE_HEAD_DOMAIN + body.encode()


class TreeHeadSigner(Protocol):
    """Produces DER-encoded ECDSA P-256/SHA-256 signatures."""

    ref: str

    def sign(self, message: bytes) -> bytes:
        """Sign *message* (hashed with SHA-256 by the signer); returns a DER signature."""
        ...

    def public_key_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM of the verification key."""
        ...


def _load_p256_public(pem: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("public key is not an ECDSA P-256 key")
    return key


def _spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_fingerprint(pem: bytes) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo of a PEM public key."""
    key = serialization.load_pem_public_key(pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def verify_tree_head(public_key_pem: bytes, head: TreeHead, signature: bytes) -> None:
    """Verify *signature* over *head*; raises SignatureError if it does not verify."""
    try:
        key = _load_p256_public(public_key_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SignatureError(
            f"cannot verify tree head of size {head.tree_size}: unusable public key"
        ) from exc
    try:
        key.verify(signature, head.signing_input(), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(
            f"invalid signature on tree head of size {head.tree_size} for log {head.log_id!r}"
        ) from exc


class LocalSigner:
    """ECDSA P-256 signer with a PKCS#8 PEM private key in a local file (mode 0600)."""

    def __init__(self, key_file: Path, create: bool = False) -> None:
        self.key_file = Path(key_file)
        self._key = self._load(self.key_file, create)
        public = self._key.public_key()
        self._pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.ref = "local:" + hashlib.sha256(_spki_der(public)).hexdigest()[:12]

    @staticmethod
    def _load(path: Path, create: bool) -> ec.EllipticCurvePrivateKey:
        raw = read_secret(path, "signing key")
        if raw is None:
            if not create:
                raise missing_file_error(path, "signing key")
            fresh = ec.generate_private_key(ec.SECP256R1())
            pem = fresh.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            if create_secret(path, pem, "signing key"):
                return fresh
            raw = read_secret(path, "signing key")  # lost a creation race
            if raw is None:
                raise missing_file_error(path, "signing key")
        try:
            key = serialization.load_pem_private_key(raw, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # Deliberately no detail from the parser: never echo key file contents.
            raise KeyUnavailableError(
                f"signing key file {path} is not an unencrypted PEM private key: "
                "restore it from backup",
                ref=str(path),
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise KeyUnavailableError(
                f"signing key file {path} does not hold an ECDSA P-256 key", ref=str(path)
            )
        return key

    def sign(self, message: bytes) -> bytes:
        """DER ECDSA signature over SHA-256(message)."""
        return self._key.sign(message, ec.ECDSA(hashes.SHA256()))

    def public_key_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM of the signing key."""
        return self._pem


class KmsSigner:
    """ECDSA P-256 signer backed by an AWS KMS ``ECC_NIST_P256`` / ``SIGN_VERIFY`` key."""

    def __init__(self, key_id: str, client: Any) -> None:
        if not key_id:
            raise ValueError("key_id must be a non-empty KMS key id, ARN or alias")
        self.key_id = key_id
        self.ref = "kms:" + key_id
        self._client = client
        self._pem: bytes | None = None

    def sign(self, message: bytes) -> bytes:
        """One KMS ``Sign`` call (RAW message, ECDSA_SHA_256); returns a DER signature."""
        if not message or len(message) > _KMS_MAX_RAW_MESSAGE:
            raise ValueError(f"message must be 1..{_KMS_MAX_RAW_MESSAGE} bytes for KMS RAW signing")
        try:
            resp = self._client.sign(
                KeyId=self.key_id,
                Message=message,
                MessageType="RAW",
                SigningAlgorithm="ECDSA_SHA_256",
            )
        except AWS_ERRORS as exc:
            raise kms_error(exc, self.ref, "Sign") from exc
        return bytes(resp["Signature"])

    def public_key_pem(self) -> bytes:
        """PEM of the KMS public key (fetched once with ``GetPublicKey``, then cached)."""
        if self._pem is None:
            try:
                resp = self._client.get_public_key(KeyId=self.key_id)
            except AWS_ERRORS as exc:
                raise kms_error(exc, self.ref, "GetPublicKey") from exc
            try:
                key = serialization.load_der_public_key(bytes(resp["PublicKey"]))
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise KeyUnavailableError(
                    f"KMS key {self.ref} returned an unparsable public key", ref=self.ref
                ) from exc
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
                key.curve, ec.SECP256R1
            ):
                raise KeyUnavailableError(
                    f"KMS key {self.ref} is not an ECC_NIST_P256 key: create the signing key "
                    "with KeySpec=ECC_NIST_P256 and KeyUsage=SIGN_VERIFY",
                    ref=self.ref,
                )
            self._pem = key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return self._pem

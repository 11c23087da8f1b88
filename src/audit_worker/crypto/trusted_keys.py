"""The signing keys a verifier trusts, each for a window of time.

A key that was rotated out must not be able to sign heads dated after its rotation, and a
new key must not sign heads dated before it existed. A key file lists each public key with
its window; a head is accepted only from a key whose window covers the head's timestamp.

File format (YAML)::

    keys:
      - public_key_file: signing-2025.pem     # relative to this file; or public_key: PEM text
        valid_until: 2026-06-01T00:00:00Z     # optional; no bound when absent
      - public_key_file: signing-2026.pem
        valid_from: 2026-06-01T00:00:00Z      # optional; no bound when absent

Windows are half open: ``valid_from <= timestamp < valid_until``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import SignatureError
from .signing import TreeHead, public_key_fingerprint, verify_tree_head

__all__ = ["HeadCheck", "TrustedKey", "TrustedKeys", "TrustedKeysError"]

HeadCheck = Literal["ok", "bad_signature", "outside_window"]
_FIELDS = frozenset({"public_key", "public_key_file", "valid_from", "valid_until"})


class TrustedKeysError(ValueError):
    """The trusted-keys file is unusable; the message names the entry and the rule."""


@dataclass(frozen=True)
class TrustedKey:
    pem: bytes
    fingerprint: str  # hex SHA-256 of the DER SubjectPublicKeyInfo
    valid_from_ms: int | None = None
    valid_until_ms: int | None = None

    def covers(self, timestamp_ms: int) -> bool:
        if self.valid_from_ms is not None and timestamp_ms < self.valid_from_ms:
            return False
        return self.valid_until_ms is None or timestamp_ms < self.valid_until_ms

    @property
    def spki_der(self) -> bytes:
        return serialization.load_pem_public_key(self.pem).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _p256_pem(pem: bytes, where: str) -> bytes:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TrustedKeysError(f"{where}: not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TrustedKeysError(f"{where}: not an ECDSA P-256 public key")
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _instant_ms(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):  # YAML reads unquoted timestamps itself
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise TrustedKeysError(
                f"{where}: not an RFC 3339 date-time (e.g. 2026-06-01T00:00:00Z)"
            ) from None
    else:
        raise TrustedKeysError(f"{where}: must be an RFC 3339 date-time string")
    if moment.tzinfo is None:
        raise TrustedKeysError(f"{where}: needs a UTC offset (e.g. ...Z)")
    return int(moment.astimezone(UTC).timestamp() * 1000)


@dataclass(frozen=True)
class TrustedKeys:
    keys: tuple[TrustedKey, ...]

    @classmethod
    def from_pems(cls, pems: Iterable[bytes]) -> TrustedKeys:
        """Keys trusted for all time (one key, or no rotation history to go by)."""
        keys = []
        for n, pem in enumerate(pems):
            normal = _p256_pem(pem, f"public key {n + 1}")
            keys.append(TrustedKey(normal, public_key_fingerprint(normal)))
        if not keys:
            raise TrustedKeysError("no public key given")
        return cls(tuple(keys))

    @classmethod
    def load(cls, path: Path) -> TrustedKeys:
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise TrustedKeysError(f"cannot read {path}: {exc.strerror}") from None
        except (yaml.YAMLError, UnicodeDecodeError):
            raise TrustedKeysError(f"{path} is not a YAML document") from None
        return cls.parse(document, base=path.parent, name=str(path))

    @classmethod
    def parse(cls, document: Any, *, base: Path, name: str = "trusted keys") -> TrustedKeys:
        if not isinstance(document, Mapping) or set(document) != {"keys"}:
            raise TrustedKeysError(f"{name}: must be a mapping with exactly one key, `keys`")
        entries = document["keys"]
        if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
            raise TrustedKeysError(f"{name}: keys must be a non-empty list")
        keys = []
        for n, entry in enumerate(entries):
            where = f"{name}: keys[{n}]"
            if not isinstance(entry, Mapping):
                raise TrustedKeysError(f"{where}: must be a mapping")
            unknown = set(entry) - _FIELDS
            if unknown:
                raise TrustedKeysError(
                    f"{where}: unknown field(s); allowed: {', '.join(sorted(_FIELDS))}"
                )
            if ("public_key" in entry) == ("public_key_file" in entry):
                raise TrustedKeysError(f"{where}: give exactly one of public_key, public_key_file")
            if "public_key" in entry:
                if not isinstance(entry["public_key"], str):
                    raise TrustedKeysError(f"{where}.public_key: must be PEM text")
                raw = entry["public_key"].encode()
            else:
                file = entry["public_key_file"]
                if not isinstance(file, str) or not file:
                    raise TrustedKeysError(f"{where}.public_key_file: must be a file name")
                try:
                    raw = (base / file).read_bytes()
                except OSError as exc:
                    raise TrustedKeysError(
                        f"{where}.public_key_file: cannot read it ({exc.strerror})"
                    ) from None
            pem = _p256_pem(raw, f"{where}.public_key")
            start = _instant_ms(entry.get("valid_from"), f"{where}.valid_from")
            end = _instant_ms(entry.get("valid_until"), f"{where}.valid_until")
            if start is not None and end is not None and end <= start:
                raise TrustedKeysError(f"{where}: valid_until must be after valid_from")
            keys.append(TrustedKey(pem, public_key_fingerprint(pem), start, end))
        return cls(tuple(keys))

    def stored_head(self, log_id: str, row: Any) -> TreeHead | None:
        """The head of a stored row (``tree_size``, ``root_hash``, ``timestamp_ms``,
        ``log_id``, ``signature``) when it names `log_id`, is well formed and a key valid
        at its time signed it; else None."""
        if row["log_id"] != log_id:
            return None
        try:
            head = TreeHead(log_id, row["tree_size"], bytes(row["root_hash"]), row["timestamp_ms"])
        except (TypeError, ValueError):
            return None
        return head if self.check_head(head, bytes(row["signature"])) == "ok" else None

    def check_head(self, head: TreeHead, signature: bytes) -> HeadCheck:
        """``ok`` when a key whose window covers the head's timestamp verifies it;
        ``outside_window`` when only a key whose window does not cover it does."""
        outside = False
        for key in self.keys:
            try:
                verify_tree_head(key.pem, head, signature)
            except (SignatureError, ValueError):
                continue
            if key.covers(head.timestamp_ms):
                return "ok"
            outside = True
        return "outside_window" if outside else "bad_signature"

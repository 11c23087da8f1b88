"""Tree heads as C2SP checkpoints (c2sp.org/tlog-checkpoint) in signed notes
(c2sp.org/signed-note), the form in which heads leave the database.

A checkpoint's text is the origin (this kit uses the log id), the tree size in decimal, the
root hash in standard base64, then extension lines. This kit writes two extension lines,
which checkpoint readers keep as opaque text:

    timestamp <milliseconds since the Unix epoch>
    dead-letters <count> <base64 SHA-256 chain hash>

The signature line is signature type 0x02 of the signed-note spec (ECDSA, as
transparency-dev/witness implements it): ``— <key name> base64(key ID || DER signature)``,
key ID = the first four bytes of SHA-256 of the key's DER SubjectPublicKeyInfo, and the
signature an ECDSA P-256 / SHA-256 signature over the note text. The key name is the log id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import CryptoError
from .signing import TreeHeadSigner
from .trusted_keys import TrustedKey, TrustedKeys

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "note_key_id",
    "open_note",
    "sign_note",
]

_HASH_BYTES = 32
_DASH = "\u2014"
# A checkpoint and its one signature are a few hundred bytes; anything far larger is not one.
MAX_NOTE_BYTES = 8192
_ORIGIN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")


class CheckpointError(CryptoError):
    """A note is not a well-formed checkpoint of this kit, or no trusted key signed it."""


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise CheckpointError(f"{what} is not standard base64") from None


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    tree_size: int
    root_hash: bytes
    timestamp_ms: int
    dead_letters: int = 0
    dead_letter_hash: bytes = bytes(_HASH_BYTES)

    def __post_init__(self) -> None:
        if not _ORIGIN.fullmatch(self.origin):
            raise ValueError("origin must be a log id ([a-z0-9][a-z0-9._-]{0,62})")
        for name in ("tree_size", "timestamp_ms", "dead_letters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**19:
                raise ValueError(f"{name} must be an int in 0..10^19-1")
        for name in ("root_hash", "dead_letter_hash"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != _HASH_BYTES:
                raise ValueError(f"{name} must be {_HASH_BYTES} bytes")

    def text(self) -> bytes:
        """The note text that is signed (it ends in a newline)."""
        return (
            f"{self.origin}\n{self.tree_size}\n{base64.b64encode(self.root_hash).decode()}\n"
            f"timestamp {self.timestamp_ms}\n"
            f"dead-letters {self.dead_letters} {base64.b64encode(self.dead_letter_hash).decode()}\n"
        ).encode()

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) != 6 or lines[-1] != "":
            raise CheckpointError(
                "checkpoint text must be 5 lines (origin, size, root, timestamp, dead-letters)"
            )
        origin, size, root, stamp, dead = lines[:5]
        if not _ORIGIN.fullmatch(origin):
            raise CheckpointError("checkpoint origin is not a log id")
        if not _DECIMAL.fullmatch(size):
            raise CheckpointError("checkpoint size is not a decimal number")
        root_hash = _b64decode(root, "checkpoint root hash")
        if len(root_hash) != _HASH_BYTES:
            raise CheckpointError(f"checkpoint root hash is not {_HASH_BYTES} bytes")
        key, _, value = stamp.partition(" ")
        if key != "timestamp" or not _DECIMAL.fullmatch(value):
            raise CheckpointError("checkpoint line 4 must be `timestamp <milliseconds>`")
        parts = dead.split(" ")
        if len(parts) != 3 or parts[0] != "dead-letters" or not _DECIMAL.fullmatch(parts[1]):
            raise CheckpointError("checkpoint line 5 must be `dead-letters <count> <hash>`")
        chain = _b64decode(parts[2], "checkpoint dead-letter hash")
        if len(chain) != _HASH_BYTES:
            raise CheckpointError(f"checkpoint dead-letter hash is not {_HASH_BYTES} bytes")
        return cls(origin, int(size), root_hash, int(value), int(parts[1]), chain)


def note_key_id(key: TrustedKey) -> bytes:
    """Signed-note key ID of an ECDSA key: SHA-256 of its DER SubjectPublicKeyInfo, 4 bytes."""
    return hashlib.sha256(key.spki_der).digest()[:4]


def sign_note(checkpoint: Checkpoint, signer: TreeHeadSigner, public_key: TrustedKey) -> bytes:
    """The signed note: text, a blank line, one signature line by `signer`, whose public key
    is `public_key` (the caller checks the signature, as it does for database heads)."""
    text = checkpoint.text()
    signature = signer.sign(text)
    blob = base64.b64encode(note_key_id(public_key) + signature).decode()
    return text + f"\n{_DASH} {checkpoint.origin} {blob}\n".encode()


def open_note(note: bytes, keys: TrustedKeys) -> tuple[Checkpoint, TrustedKey]:
    """Parse a signed checkpoint and verify it: a trusted key whose name (the origin) and key
    ID match a signature line must verify it, and its window must cover the checkpoint's
    timestamp. Signatures by unknown keys are ignored, as the signed-note spec requires."""
    if len(note) > MAX_NOTE_BYTES:
        raise CheckpointError(f"note is larger than {MAX_NOTE_BYTES} bytes")
    try:
        decoded = note.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError("note is not UTF-8") from None
    if any(ord(c) < 0x20 and c != "\n" for c in decoded):
        raise CheckpointError("note holds control characters")
    text, sep, signatures = decoded.rpartition("\n\n")
    if not sep or not signatures.endswith("\n"):
        raise CheckpointError("note has no blank line before its signature lines")
    checkpoint = Checkpoint.parse(text + "\n")
    signed = (text + "\n").encode()
    ids = {note_key_id(k): k for k in keys.keys}
    for line in signatures[:-1].split("\n"):
        dash, _, rest = line.partition(" ")
        name, _, blob = rest.partition(" ")
        if dash != _DASH or not name or not blob or " " in blob:
            raise CheckpointError("malformed signature line")
        raw = _b64decode(blob, "signature")
        key = ids.get(raw[:4])
        if name != checkpoint.origin or key is None or len(raw) < 5:
            continue
        public = serialization.load_pem_public_key(key.pem)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        try:
            public.verify(raw[4:], signed, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise CheckpointError(
                f"checkpoint at size {checkpoint.tree_size}: a trusted key's signature does "
                "not verify (forged or altered checkpoint)"
            ) from None
        if not key.covers(checkpoint.timestamp_ms):
            raise CheckpointError(
                f"checkpoint at size {checkpoint.tree_size} is dated outside the validity "
                "window of the key that signed it"
            )
        return checkpoint, key
    raise CheckpointError(
        f"checkpoint at size {checkpoint.tree_size} has no signature by a trusted key"
    )

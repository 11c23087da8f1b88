"""RFC 9162 (CT v2, identical to RFC 6962) Merkle tree hashing with SHA-256.

Leaves and interior nodes are hashed with distinct one-byte prefixes so that a
leaf can never be reinterpreted as an interior node (second-preimage
resistance, RFC 9162 §2.1.1):

    leaf hash = SHA-256(0x00 || leaf data)
    node hash = SHA-256(0x01 || left child hash || right child hash)
    empty     = SHA-256("")
"""

from __future__ import annotations

from hashlib import sha256
from typing import Final

LEAF_PREFIX: Final = 0x00
NODE_PREFIX: Final = 0x01
HASH_SIZE: Final = 32

_LEAF: Final = bytes([LEAF_PREFIX])
_NODE: Final = bytes([NODE_PREFIX])
# Computed once: the empty tree's root is a constant.
_EMPTY_ROOT: Final = sha256(b"").digest()


def hash_leaf(data: bytes) -> bytes:
    """Return the leaf hash ``SHA-256(0x00 || data)``; ``data`` may be any length."""
    return sha256(_LEAF + data).digest()


def hash_children(left: bytes, right: bytes) -> bytes:
    """Return the interior node hash ``SHA-256(0x01 || left || right)``.

    Precondition: ``left`` and ``right`` are ``HASH_SIZE``-byte node hashes; this is
    not checked here because it sits on every hot path (callers that accept
    untrusted hashes validate lengths first).
    """
    return sha256(_NODE + left + right).digest()


def empty_root() -> bytes:
    """Return the root of the empty tree, ``SHA-256("")`` (RFC 9162 §2.1.1)."""
    return _EMPTY_ROOT

"""Compact range ("frontier") of an append-only RFC 9162 Merkle tree.

A tree of ``size`` leaves decomposes uniquely into perfect subtrees, one per set
bit of ``size``, largest (leftmost) first. For ``size = 0b1101`` (13) that is
the subtrees over leaves [0, 8), [8, 12) and [12, 13). Their roots are all the
state needed to append further leaves and to compute the current root, so the
frontier holds ``popcount(size)`` hashes, i.e. O(log n).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Self

from audit_worker.merkle.hasher import HASH_SIZE, empty_root, hash_children


class CompactRange:
    """The roots of the perfect subtrees covering leaves ``[0, size)``, left to right.

    ``root()`` equals ``root_from_leaf_hashes`` of every leaf hash appended so
    far. Appending is O(log n) worst case and O(1) amortised hashing.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        """Create the frontier of the empty tree."""
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def from_state(cls, size: int, hashes: Sequence[bytes]) -> Self:
        """Rebuild a frontier from a stored ``size`` and its subtree roots.

        Requires ``size >= 0``, ``len(hashes) == popcount(size)`` and every hash
        to be ``HASH_SIZE`` bytes; raises ``ValueError`` otherwise. The hashes
        are copied, so later changes to the caller's list have no effect.
        """
        if size < 0:
            raise ValueError(f"size {size} is negative, want >= 0")
        want = size.bit_count()
        if len(hashes) != want:
            raise ValueError(f"wrong number of hashes {len(hashes)} for size {size}, want {want}")
        for i, h in enumerate(hashes):
            if len(h) != HASH_SIZE:
                raise ValueError(f"hash {i} has size {len(h)}, want {HASH_SIZE}")
        compact = cls()
        compact._size = size
        compact._hashes = [bytes(h) for h in hashes]
        return compact

    @classmethod
    def from_packed(cls, size: int, packed: bytes) -> Self:
        """Rebuild a frontier stored as its subtree roots concatenated (``packed()``);
        ``ValueError`` as for ``from_state``."""
        return cls.from_state(
            size, [packed[i : i + HASH_SIZE] for i in range(0, len(packed), HASH_SIZE)]
        )

    def packed(self) -> bytes:
        """The subtree roots concatenated, largest first: how the database stores them."""
        return b"".join(self._hashes)

    @property
    def size(self) -> int:
        """Number of leaves covered."""
        return self._size

    @property
    def hashes(self) -> list[bytes]:
        """A copy of the subtree roots, largest subtree first."""
        return list(self._hashes)

    def append(self, leaf_hash: bytes) -> None:
        """Append one ``HASH_SIZE``-byte leaf hash (``hash_leaf(entry)``, not the entry)."""
        if len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"leaf hash size {len(leaf_hash)}, want {HASH_SIZE}")
        hashes = self._hashes
        hashes.append(leaf_hash)
        # Like binary increment: each trailing 1 bit of the old size is a perfect
        # subtree as tall as the one being carried, so the two merge into their parent.
        carry = self._size
        while carry & 1:
            right = hashes.pop()
            hashes[-1] = hash_children(hashes[-1], right)
            carry >>= 1
        self._size += 1

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append each leaf hash in order (see ``append``)."""
        for leaf_hash in leaf_hashes:
            self.append(leaf_hash)

    def root(self) -> bytes:
        """Return the Merkle Tree Hash of all appended leaves; ``empty_root()`` if none.

        The RFC tree hangs each smaller subtree off the right of the larger ones,
        so the root folds the frontier from the right: H(a, H(b, c)).
        """
        hashes = self._hashes
        if not hashes:
            return empty_root()
        root = hashes[-1]
        for h in reversed(hashes[:-1]):
            root = hash_children(h, root)
        return root

    def copy(self) -> Self:
        """Return an independent frontier with the same state."""
        clone = type(self)()
        clone._size = self._size
        clone._hashes = list(self._hashes)
        return clone

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, hashes={len(self._hashes)})"

"""Merkle Tree Hash (MTH) and proof generation per RFC 9162 §2.1.

All functions take the list of *leaf hashes* ``D[0:n]`` (each already
``hash_leaf(entry)``, ``HASH_SIZE`` bytes), never raw entries. Structure, for
``n > 1`` and ``k`` the largest power of two strictly less than ``n``::

    MTH({})      = SHA-256("")
    MTH({d0})    = leaf hash d0
    MTH(D[0:n])  = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))

Generation is O(n) hashing in the number of leaves and never recurses over
slices; nothing here performs I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import sha256
from typing import Final

from audit_worker.merkle.hasher import NODE_PREFIX, empty_root

_NODE: Final = bytes([NODE_PREFIX])


def _split_point(count: int) -> int:
    """Largest power of two strictly less than ``count`` (requires ``count >= 2``)."""
    return 1 << ((count - 1).bit_length() - 1)


def _reduce_level(nodes: Sequence[bytes]) -> list[bytes]:
    """Hash aligned pairs ``(nodes[2i], nodes[2i+1])``; promote a lone last node.

    Aligned pairs at each level are exactly the perfect subtrees of the RFC tree.
    A lone last node roots the ragged right edge; in the RFC tree its sibling is
    a taller subtree to its left, so it is carried upward unchanged until that
    sibling has been built.
    """
    pairs = iter(nodes)
    # zip over one iterator yields consecutive pairs; strict=False on purpose so
    # an odd trailing node is left for the promotion below.
    parents = [
        sha256(_NODE + left + right).digest() for left, right in zip(pairs, pairs, strict=False)
    ]
    if len(nodes) & 1:
        parents.append(nodes[-1])
    return parents


def _subtree_root(leaf_hashes: Sequence[bytes], start: int, end: int) -> bytes:
    """Return MTH(D[start:end]); requires ``0 <= start < end <= len(leaf_hashes)``."""
    if end - start == 1:
        return leaf_hashes[start]
    # Avoid copying the whole input for the common full-tree case; a sub-range is
    # copied once (references only) and then every level shrinks by half.
    whole = start == 0 and end == len(leaf_hashes)
    level = _reduce_level(leaf_hashes if whole else leaf_hashes[start:end])
    while len(level) > 1:
        level = _reduce_level(level)
    return level[0]


def root_from_leaf_hashes(leaf_hashes: Sequence[bytes]) -> bytes:
    """Return the Merkle Tree Hash of ``leaf_hashes`` (RFC 9162 §2.1.1).

    Precondition: every element is a ``HASH_SIZE``-byte leaf hash. This is not
    checked, because this is the bulk-verification hot path; the result for
    malformed input is well defined but meaningless.

    Computed bottom-up, level by level, which yields the same tree as the RFC's
    recursive split at the largest power of two: n - 1 node hashes for n leaves.
    Returns ``empty_root()`` for an empty sequence.
    """
    if not leaf_hashes:
        return empty_root()
    return _subtree_root(leaf_hashes, 0, len(leaf_hashes))


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Return the audit path PATH(index, D[0:n]) for ``n = len(leaf_hashes)`` (§2.1.3.1).

    Requires ``0 <= index < n`` (raises ``ValueError`` otherwise). The path is
    ordered leaf-to-root: element ``i`` is the sibling subtree hash at depth
    ``len(path) - i``. A tree of one leaf has an empty path.
    """
    size = len(leaf_hashes)
    if not 0 <= index < size:
        raise ValueError(f"index {index} out of range for size {size}")
    # Unroll the RFC recursion top-down. Each step keeps the half holding the
    # leaf and records the other half; the RFC appends those on the way back
    # up, so the recorded ranges are reversed at the end.
    siblings: list[tuple[int, int]] = []
    start, end = 0, size
    while end - start > 1:
        mid = start + _split_point(end - start)
        if index < mid:
            siblings.append((mid, end))
            end = mid
        else:
            siblings.append((start, mid))
            start = mid
    # Sibling ranges are disjoint, so hashing them all costs at most n - 1 nodes.
    return [_subtree_root(leaf_hashes, s, e) for s, e in reversed(siblings)]


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int, new_size: int) -> list[bytes]:
    """Return PROOF(old_size, D[0:new_size]) per RFC 9162 §2.1.4.1.

    Requires ``0 < old_size <= new_size <= len(leaf_hashes)`` (raises
    ``ValueError`` otherwise); only the first ``new_size`` leaves are used. The
    proof is empty when ``old_size == new_size``.

    PROOF(m, D[n]) = SUBPROOF(m, D[n], true), where, with k the largest power
    of two below the current subtree size:

    * m == size: ``[]`` if the subtree is the old tree itself (b is true),
      otherwise ``[MTH(subtree)]``;
    * m <= k:    SUBPROOF(m, left, b) followed by MTH(right);
    * m > k:     SUBPROOF(m - k, right, false) followed by MTH(left).
    """
    if not 0 < old_size <= new_size <= len(leaf_hashes):
        raise ValueError(
            f"sizes old={old_size} new={new_size} out of range, "
            f"want 0 < old <= new <= {len(leaf_hashes)}"
        )
    # Same top-down unrolling as inclusion_proof; ``old_size`` stays an absolute
    # leaf count, so "m == size" becomes "old_size == end".
    nodes: list[tuple[int, int]] = []
    start, end = 0, new_size
    while old_size != end:
        mid = start + _split_point(end - start)
        if old_size <= mid:
            nodes.append((mid, end))
            end = mid
        else:
            nodes.append((start, mid))
            start = mid
    # The RFC's ``b`` turns false on the first step right, i.e. exactly when
    # start > 0. Then the old tree is not a single node of the new tree, and the
    # verifier needs this subtree's hash as the seed it extends both ways; when
    # start == 0 the subtree *is* the old tree, whose root the verifier holds.
    if start > 0:
        nodes.append((start, end))
    return [_subtree_root(leaf_hashes, s, e) for s, e in reversed(nodes)]

"""Inclusion and consistency proof verification per RFC 9162 §2.1.3.2 and §2.1.4.2.

Proofs are untrusted input: every hash length and the exact proof length are
checked before any hashing, so truncated, padded or malformed proofs fail with a
``ProofError`` that says what was received and what was expected. A proof that
is well formed but does not reproduce the trusted root raises
``RootMismatchError``. Nothing here performs I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from audit_worker.merkle.hasher import HASH_SIZE, hash_children


class ProofError(ValueError):
    """A proof, or the sizes/hashes it is checked against, is invalid."""


class RootMismatchError(ProofError):
    """A well-formed proof leads to a root other than the trusted one.

    ``expected`` is the trusted root the caller supplied, ``computed`` the root
    the proof actually yields; ``which`` names the root ("root", "old root",
    "new root").
    """

    def __init__(self, expected: bytes, computed: bytes, which: str = "root") -> None:
        self.expected = expected
        self.computed = computed
        self.which = which
        super().__init__(f"{which} mismatch: computed {computed.hex()}, want {expected.hex()}")

    def __reduce__(self) -> tuple[type[RootMismatchError], tuple[bytes, bytes, str]]:
        # Exception pickling replays ``args`` (the message) by default, which
        # does not fit this constructor; needed to cross process boundaries.
        return (type(self), (self.expected, self.computed, self.which))


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{name} size {len(value)}, want {HASH_SIZE}")


def _check_proof(proof: Sequence[bytes], want: int) -> None:
    # The exact length is known from the sizes alone, so trailing garbage or a
    # missing element is rejected before hashing anything.
    if len(proof) != want:
        raise ProofError(f"wrong proof size {len(proof)}, want {want}")
    for i, node in enumerate(proof):
        _check_hash(f"proof[{i}]", node)


def _inclusion_proof_size(index: int, size: int) -> int:
    """Audit path length for ``0 <= index < size``.

    Below the level where the paths to ``index`` and to the last leaf merge
    (``inner`` levels) every level has a sibling; above it the path follows the
    right border, which has a left sibling exactly where ``index`` has a 1 bit.
    """
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def _consistency_proof_size(old_size: int, new_size: int) -> int:
    """Consistency proof length for ``0 < old_size < new_size``.

    It is the audit path of the old tree's last complete node (leaf
    ``old_size - 1`` lifted by the trailing zero bits of ``old_size``), plus
    that node itself unless it is the whole old tree (old_size a power of two).
    """
    shift = (old_size & -old_size).bit_length() - 1  # trailing zero bits
    node = (old_size - 1) >> shift
    seed = 0 if node == 0 else 1
    return seed + _inclusion_proof_size(node, ((new_size - 1) >> shift) + 1)


def root_from_inclusion_proof(
    index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes]
) -> bytes:
    """Return the root implied by an audit path (RFC 9162 §2.1.3.2).

    Preconditions, checked (``ProofError`` otherwise): ``0 <= index < size``,
    ``leaf_hash`` and every proof element are ``HASH_SIZE`` bytes, and the proof
    has exactly the length the tree shape requires. ``leaf_hash`` is
    ``hash_leaf(entry)``, and the path is ordered leaf-to-root as produced by
    ``inclusion_proof``. The result is only meaningful when compared with a
    trusted root; use ``verify_inclusion`` for that.
    """
    if not 0 <= index < size:
        raise ProofError(f"index {index} out of range for size {size}")
    _check_hash("leaf hash", leaf_hash)
    _check_proof(proof, _inclusion_proof_size(index, size))

    fn, sn = index, size - 1  # our node's index and the last node's, per level
    root = leaf_hash
    for node in proof:
        if sn == 0:  # unreachable after _check_proof; kept as in the RFC
            raise ProofError("proof longer than the tree is deep")
        if fn & 1 or fn == sn:
            root = hash_children(node, root)
            # On the right border a node without a right sibling is promoted
            # unchanged, so skip the levels where that happens.
            while fn != 0 and (fn & 1) == 0:
                fn >>= 1
                sn >>= 1
        else:
            root = hash_children(root, node)
        fn >>= 1
        sn >>= 1
    if sn != 0:  # unreachable after _check_proof; kept as in the RFC
        raise ProofError("proof shorter than the tree is deep")
    return root


def verify_inclusion(
    index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` with ``root``.

    Returns ``None`` on success. Raises ``ProofError`` for malformed input (see
    ``root_from_inclusion_proof``; also ``root`` must be ``HASH_SIZE`` bytes) and
    ``RootMismatchError`` when the proof does not lead to ``root``. A tree of
    size 0 contains no leaves, so it never verifies.
    """
    _check_hash("root", root)
    computed = root_from_inclusion_proof(index, size, leaf_hash, proof)
    if computed != root:
        raise RootMismatchError(expected=root, computed=computed)


def verify_consistency(
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
) -> None:
    """Check that the tree (new_size, new_root) extends (old_size, old_root).

    Implements RFC 9162 §2.1.4.2. Returns ``None`` on success; raises
    ``ProofError`` when ``old_size > new_size``, a size is negative, a root or
    proof element is not ``HASH_SIZE`` bytes, or the proof has the wrong length,
    and ``RootMismatchError`` when the proof does not reproduce both roots.

    Edge cases:

    * ``old_size == new_size`` (including 0): the proof must be empty and the
      roots equal.
    * ``0 == old_size < new_size``: every tree extends the empty tree, so the
      only valid proof is empty and ``old_root`` is not compared (it should be
      ``empty_root()``).
    """
    if old_size < 0 or new_size < 0:
        raise ProofError(f"negative tree size: old {old_size}, new {new_size}")
    if old_size > new_size:
        raise ProofError(f"old size {old_size} exceeds new size {new_size}")
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    # Equal sizes first, so that (0, 0) still requires equal roots.
    if old_size == new_size:
        _check_proof(proof, 0)
        if old_root != new_root:
            raise RootMismatchError(expected=old_root, computed=new_root, which="new root")
        return
    if old_size == 0:
        _check_proof(proof, 0)
        return
    _check_proof(proof, _consistency_proof_size(old_size, new_size))

    # When old_size is a power of two the old tree is a node of the new tree and
    # its root is the RFC's implicit first path element; otherwise proof[0] is.
    if (old_size & (old_size - 1)) == 0:
        seed, rest = old_root, proof
    else:
        seed, rest = proof[0], proof[1:]
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:  # start from the old tree's last complete subtree
        fn >>= 1
        sn >>= 1
    old_computed = new_computed = seed
    for node in rest:
        if sn == 0:  # unreachable after _check_proof; kept as in the RFC
            raise ProofError("proof longer than the tree is deep")
        if fn & 1 or fn == sn:
            # A left sibling: part of both trees.
            old_computed = hash_children(node, old_computed)
            new_computed = hash_children(node, new_computed)
            while fn != 0 and (fn & 1) == 0:
                fn >>= 1
                sn >>= 1
        else:
            # A right sibling: only in the new tree.
            new_computed = hash_children(new_computed, node)
        fn >>= 1
        sn >>= 1
    if sn != 0:  # unreachable after _check_proof; kept as in the RFC
        raise ProofError("proof shorter than the tree is deep")
    if old_computed != old_root:
        raise RootMismatchError(expected=old_root, computed=old_computed, which="old root")
    if new_computed != new_root:
        raise RootMismatchError(expected=new_root, computed=new_computed, which="new root")

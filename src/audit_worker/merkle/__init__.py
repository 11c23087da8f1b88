"""RFC 9162 (Certificate Transparency v2 / RFC 6962) Merkle trees: hashing, roots,
inclusion and consistency proofs, and an append-only compact range.

Pure functions over SHA-256 leaf hashes; no I/O.
"""

from audit_worker.merkle.compact import CompactRange
from audit_worker.merkle.hasher import (
    HASH_SIZE,
    LEAF_PREFIX,
    NODE_PREFIX,
    empty_root,
    hash_children,
    hash_leaf,
)
from audit_worker.merkle.tree import consistency_proof, inclusion_proof, root_from_leaf_hashes
from audit_worker.merkle.verify import (
    ProofError,
    RootMismatchError,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)

__all__ = [
    "HASH_SIZE",
    "LEAF_PREFIX",
    "NODE_PREFIX",
    "CompactRange",
    "ProofError",
    "RootMismatchError",
    "consistency_proof",
    "empty_root",
    "hash_children",
    "hash_leaf",
    "inclusion_proof",
    "root_from_inclusion_proof",
    "root_from_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]

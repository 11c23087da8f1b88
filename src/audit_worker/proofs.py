"""Inclusion and consistency proofs served from the stored log."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from audit_worker.db.store import LogStore
from audit_worker.merkle import consistency_proof, inclusion_proof, root_from_leaf_hashes


@dataclass(frozen=True)
class InclusionProof:
    event_id: uuid.UUID
    log_index: int
    tree_size: int
    leaf_hash: bytes
    path: list[bytes]
    root: bytes


@dataclass(frozen=True)
class ConsistencyProof:
    old_size: int
    new_size: int
    path: list[bytes]
    old_root: bytes
    new_root: bytes


class ProofError(LookupError):
    """The proof cannot be made: unknown event, or a size the log does not have."""


async def prove_inclusion(
    store: LogStore, event_id: uuid.UUID, tree_size: int
) -> InclusionProof:
    """Prove that `event_id` is in the tree of `tree_size` leaves."""
    located = await store.locate(event_id)
    if located is None:
        raise ProofError(f"event {event_id} is not in the log")
    index, leaf_hash = located
    if index >= tree_size:
        raise ProofError(f"event {event_id} has index {index}, beyond tree size {tree_size}")
    leaves = await store.leaf_hashes(tree_size)
    return InclusionProof(
        event_id, index, tree_size, leaf_hash, inclusion_proof(leaves, index),
        root_from_leaf_hashes(leaves),
    )


async def prove_consistency(store: LogStore, old_size: int, new_size: int) -> ConsistencyProof:
    """Prove that the tree of `new_size` leaves extends the tree of `old_size` leaves."""
    if not 0 < old_size <= new_size:
        raise ProofError(f"need 0 < old size <= new size, got {old_size} and {new_size}")
    leaves = await store.leaf_hashes(new_size)
    return ConsistencyProof(
        old_size, new_size, consistency_proof(leaves, old_size, new_size),
        root_from_leaf_hashes(leaves[:old_size]), root_from_leaf_hashes(leaves),
    )

"""Boundary behaviour, error reporting and API contracts of audit_worker.merkle."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from audit_worker import merkle
from audit_worker.merkle import (
    HASH_SIZE,
    LEAF_PREFIX,
    NODE_PREFIX,
    CompactRange,
    ProofError,
    RootMismatchError,
    consistency_proof,
    empty_root,
    hash_children,
    hash_leaf,
    inclusion_proof,
    root_from_inclusion_proof,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

LEAVES = [hash_leaf(i.to_bytes(2, "big")) for i in range(64)]
EMPTY = hashlib.sha256(b"").digest()
OTHER = hashlib.sha256(b"other").digest()


def _root(size: int) -> bytes:
    return root_from_leaf_hashes(LEAVES[:size])


# --- hasher


def test_hash_functions_use_rfc_domain_separation_prefixes() -> None:
    assert (LEAF_PREFIX, NODE_PREFIX, HASH_SIZE) == (0x00, 0x01, 32)
    assert hash_leaf(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert (
        hash_children(b"L" * 32, b"R" * 32)
        == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()
    )
    assert empty_root() == EMPTY


def test_leaf_cannot_be_confused_with_interior_node() -> None:
    left, right = LEAVES[0], LEAVES[1]
    assert hash_leaf(left + right) != hash_children(left, right)


def test_public_names_are_exported() -> None:
    assert set(merkle.__all__) == {
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
    }
    assert all(hasattr(merkle, name) for name in merkle.__all__)


# --- tree


def test_root_of_empty_tree_is_sha256_of_empty_string() -> None:
    assert root_from_leaf_hashes([]) == EMPTY


def test_root_of_single_leaf_is_the_leaf_hash() -> None:
    assert root_from_leaf_hashes(LEAVES[:1]) == LEAVES[0]


def test_root_accepts_any_sequence_and_does_not_mutate_it() -> None:
    leaves = tuple(LEAVES[:13])
    assert root_from_leaf_hashes(leaves) == root_from_leaf_hashes(list(leaves))
    assert leaves == tuple(LEAVES[:13])


@pytest.mark.parametrize("index", [-1, 5, 7])
def test_inclusion_proof_rejects_index_outside_tree(index: int) -> None:
    with pytest.raises(ValueError, match=f"^index {index} out of range for size 5$"):
        inclusion_proof(LEAVES[:5], index)


def test_inclusion_proof_for_single_leaf_tree_is_empty() -> None:
    assert inclusion_proof(LEAVES[:1], 0) == []


@pytest.mark.parametrize(("old", "new"), [(0, 5), (-1, 5), (6, 5), (3, 65), (0, 0)])
def test_consistency_proof_rejects_sizes_outside_contract(old: int, new: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        consistency_proof(LEAVES, old, new)


@pytest.mark.parametrize("size", [1, 5, 64])
def test_consistency_proof_between_equal_sizes_is_empty(size: int) -> None:
    assert consistency_proof(LEAVES, size, size) == []


def test_consistency_proof_ignores_leaves_beyond_new_size() -> None:
    assert consistency_proof(LEAVES, 3, 7) == consistency_proof(LEAVES[:7], 3, 7)


# --- verify: inclusion


def test_verify_inclusion_reports_wrong_proof_size_as_got_want() -> None:
    proof = inclusion_proof(LEAVES[:8], 0)  # 3 elements; size 9 needs 4
    with pytest.raises(ProofError, match=r"^wrong proof size 3, want 4$"):
        verify_inclusion(0, 9, LEAVES[0], proof, _root(9))


def test_verify_inclusion_reports_index_out_of_range() -> None:
    with pytest.raises(ProofError, match=r"^index 7 out of range for size 5$"):
        verify_inclusion(7, 5, LEAVES[7], [], _root(5))


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (-1, 4), (2, 1)])
def test_verify_inclusion_never_accepts_index_outside_tree(index: int, size: int) -> None:
    with pytest.raises(ProofError, match="out of range"):
        root_from_inclusion_proof(index, size, LEAVES[0], [])


def test_verify_inclusion_single_leaf_tree_needs_leaf_equal_to_root() -> None:
    verify_inclusion(0, 1, LEAVES[0], [], LEAVES[0])
    with pytest.raises(RootMismatchError):
        verify_inclusion(0, 1, LEAVES[1], [], LEAVES[0])


@pytest.mark.parametrize(
    ("leaf", "root", "message"),
    [
        (b"", None, r"^leaf hash size 0, want 32$"),
        (b"x" * 33, None, r"^leaf hash size 33, want 32$"),
        (None, b"", r"^root size 0, want 32$"),
    ],
)
def test_verify_inclusion_rejects_wrong_length_hashes(
    leaf: bytes | None, root: bytes | None, message: str
) -> None:
    proof = inclusion_proof(LEAVES[:6], 2)
    with pytest.raises(ProofError, match=message):
        leaf = LEAVES[2] if leaf is None else leaf
        verify_inclusion(2, 6, leaf, proof, _root(6) if root is None else root)


def test_verify_inclusion_rejects_wrong_length_proof_element() -> None:
    proof = inclusion_proof(LEAVES[:6], 2)
    proof[1] = proof[1][:-1]
    with pytest.raises(ProofError, match=r"^proof\[1\] size 31, want 32$"):
        verify_inclusion(2, 6, LEAVES[2], proof, _root(6))


def test_verify_inclusion_mismatch_carries_expected_and_computed_roots() -> None:
    proof = inclusion_proof(LEAVES[:6], 2)
    with pytest.raises(RootMismatchError) as raised:
        verify_inclusion(2, 6, LEAVES[2], proof, OTHER)
    err = raised.value
    assert (err.expected, err.computed) == (OTHER, _root(6))
    assert str(err) == f"root mismatch: computed {_root(6).hex()}, want {OTHER.hex()}"


def test_errors_are_value_errors_and_survive_pickling() -> None:
    assert issubclass(RootMismatchError, ProofError)
    assert issubclass(ProofError, ValueError)
    err = RootMismatchError(expected=OTHER, computed=EMPTY, which="old root")
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.expected, clone.computed, clone.which, str(clone)) == (
        OTHER,
        EMPTY,
        "old root",
        str(err),
    )


# --- verify: consistency


@pytest.mark.parametrize("new_size", [0, 1, 17])
def test_empty_tree_is_consistent_with_any_tree_given_empty_proof(new_size: int) -> None:
    verify_consistency(0, new_size, EMPTY, _root(new_size), [])


def test_two_empty_trees_are_consistent_only_with_equal_roots() -> None:
    verify_consistency(0, 0, EMPTY, EMPTY, [])
    with pytest.raises(RootMismatchError):
        verify_consistency(0, 0, EMPTY, OTHER, [])


def test_consistency_from_empty_tree_rejects_non_empty_proof() -> None:
    with pytest.raises(ProofError, match=r"^wrong proof size 1, want 0$"):
        verify_consistency(0, 4, EMPTY, _root(4), [_root(4)])


def test_equal_sizes_are_consistent_only_with_equal_roots_and_empty_proof() -> None:
    verify_consistency(5, 5, _root(5), _root(5), [])
    with pytest.raises(RootMismatchError) as raised:
        verify_consistency(5, 5, _root(5), OTHER, [])
    assert (raised.value.expected, raised.value.computed) == (_root(5), OTHER)
    with pytest.raises(ProofError, match=r"^wrong proof size 1, want 0$"):
        verify_consistency(5, 5, _root(5), _root(5), [_root(5)])


def test_consistency_rejects_shrinking_tree() -> None:
    with pytest.raises(ProofError, match=r"^old size 8 exceeds new size 6$"):
        verify_consistency(8, 6, _root(8), _root(6), consistency_proof(LEAVES, 6, 8))


def test_consistency_rejects_negative_sizes() -> None:
    with pytest.raises(ProofError, match="negative"):
        verify_consistency(-1, 4, EMPTY, _root(4), [])


@pytest.mark.parametrize(
    ("old_root", "new_root", "message"),
    [
        (b"short", None, r"^old root size 5, want 32$"),
        (None, b"", r"^new root size 0, want 32$"),
    ],
)
def test_consistency_rejects_wrong_length_roots(
    old_root: bytes | None, new_root: bytes | None, message: str
) -> None:
    proof = consistency_proof(LEAVES, 3, 7)
    with pytest.raises(ProofError, match=message):
        old_root = _root(3) if old_root is None else old_root
        new_root = _root(7) if new_root is None else new_root
        verify_consistency(3, 7, old_root, new_root, proof)


def test_consistency_rejects_trailing_garbage() -> None:
    proof = consistency_proof(LEAVES, 3, 7)
    with pytest.raises(ProofError, match=r"^wrong proof size 5, want 4$"):
        verify_consistency(3, 7, _root(3), _root(7), [*proof, b""])


def test_consistency_mismatch_names_the_root_that_failed() -> None:
    proof = consistency_proof(LEAVES, 3, 7)
    with pytest.raises(RootMismatchError, match=r"^old root mismatch"):
        verify_consistency(3, 7, OTHER, _root(7), proof)
    with pytest.raises(RootMismatchError, match=r"^new root mismatch"):
        verify_consistency(3, 7, _root(3), OTHER, proof)


def test_all_proofs_for_all_small_trees_verify() -> None:
    # Exhaustive over every (index, size) and (old, new) pair up to 40 leaves.
    for new in range(1, 41):
        root = _root(new)
        for index in range(new):
            verify_inclusion(index, new, LEAVES[index], inclusion_proof(LEAVES[:new], index), root)
        for old in range(0, new + 1):
            proof = consistency_proof(LEAVES, old, new) if old else []
            verify_consistency(old, new, _root(old), root, proof)


# --- compact range


def test_empty_compact_range_has_empty_root() -> None:
    compact = CompactRange()
    assert (compact.size, compact.hashes, compact.root()) == (0, [], EMPTY)


def test_compact_range_keeps_one_hash_per_set_bit_of_size() -> None:
    compact = CompactRange()
    compact.extend(LEAVES[:13])  # 0b1101: subtrees [0,8), [8,12), [12,13)
    assert compact.hashes == [_root(8), root_from_leaf_hashes(LEAVES[8:12]), LEAVES[12]]


def test_compact_range_from_state_reports_wrong_hash_count() -> None:
    with pytest.raises(ValueError, match=r"^wrong number of hashes 1 for size 3, want 2$"):
        CompactRange.from_state(3, [LEAVES[0]])


def test_compact_range_from_state_rejects_negative_size_and_bad_hash_length() -> None:
    with pytest.raises(ValueError, match="negative"):
        CompactRange.from_state(-1, [])
    with pytest.raises(ValueError, match=r"^hash 1 has size 3, want 32$"):
        CompactRange.from_state(3, [LEAVES[0], b"abc"])


def test_compact_range_from_state_of_empty_tree() -> None:
    assert CompactRange.from_state(0, []).root() == EMPTY


def test_compact_range_append_rejects_wrong_length_leaf_hash() -> None:
    compact = CompactRange()
    with pytest.raises(ValueError, match=r"^leaf hash size 4, want 32$"):
        compact.append(b"leaf")
    assert compact.size == 0


def test_compact_range_hashes_and_copy_are_independent_of_the_original() -> None:
    compact = CompactRange()
    compact.extend(LEAVES[:5])
    exposed = compact.hashes
    exposed.clear()
    clone = compact.copy()
    clone.append(LEAVES[5])
    assert compact.size == 5
    assert compact.root() == _root(5)
    assert clone.root() == _root(6)


def test_compact_range_from_state_copies_the_callers_list() -> None:
    state = [_root(4)]
    compact = CompactRange.from_state(4, state)
    state[0] = OTHER
    assert compact.root() == _root(4)


def test_proofs_verify_in_trees_larger_than_the_property_tests_reach() -> None:
    leaves = [hash_leaf(i.to_bytes(4, "big")) for i in range(4097)]
    for size in (1023, 1024, 1025, 4097):
        root = root_from_leaf_hashes(leaves[:size])
        for index in (0, 1, size // 2, size - 2, size - 1):
            verify_inclusion(
                index, size, leaves[index], inclusion_proof(leaves[:size], index), root
            )
        for old in (1, 3, 512, 1000, size - 1):
            old_root = root_from_leaf_hashes(leaves[:old])
            verify_consistency(old, size, old_root, root, consistency_proof(leaves, old, size))


def test_equal_sizes_with_different_roots_name_the_new_root() -> None:
    with pytest.raises(RootMismatchError) as caught:
        verify_consistency(4, 4, _root(4), OTHER, [])
    assert (caught.value.which, caught.value.expected, caught.value.computed) == (
        "new root", _root(4), OTHER)
    assert str(caught.value) == f"new root mismatch: computed {OTHER.hex()}, want {_root(4).hex()}"


def test_packed_frontier_round_trips_and_a_short_packing_is_refused() -> None:
    compact = CompactRange()
    for i in range(13):  # 0b1101: three subtree roots
        compact.append(bytes([i]) * 32)
    packed = compact.packed()
    assert len(packed) == 3 * 32
    again = CompactRange.from_packed(13, packed)
    assert (again.size, again.hashes, again.root()) == (13, compact.hashes, compact.root())
    with pytest.raises(ValueError):
        CompactRange.from_packed(13, packed[:-1])
    with pytest.raises(ValueError):
        CompactRange.from_packed(15, packed)  # four subtree roots

"""Property tests: generated proofs verify, any tampering is rejected, and the
fast implementations agree with a literal transcription of RFC 9162 §2.1."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit_worker.merkle import (
    CompactRange,
    ProofError,
    consistency_proof,
    empty_root,
    hash_children,
    hash_leaf,
    inclusion_proof,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

MAX_SIZE = 300
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)

# --- Reference: RFC 9162 §2.1 definitions, recursive over slices, deliberately naive.


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: Sequence[bytes]) -> bytes:
    if len(d) == 0:
        return empty_root()
    if len(d) == 1:
        return d[0]
    k = _k(len(d))
    return hash_children(ref_mth(d[:k]), ref_mth(d[k:]))


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _k(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


# --- Strategies


@st.composite
def leaf_hashes(draw: st.DrawFn, min_size: int = 0) -> list[bytes]:
    """Distinct leaf hashes; the salt varies contents between examples."""
    size = draw(st.integers(min_value=min_size, max_value=MAX_SIZE))
    salt = draw(st.binary(max_size=8))
    return [hash_leaf(salt + i.to_bytes(4, "big")) for i in range(size)]


def _flip(proof: list[bytes], element: int, bit: int) -> list[bytes]:
    tampered = list(proof)
    node = bytearray(tampered[element])
    node[bit // 8] ^= 1 << (bit % 8)
    tampered[element] = bytes(node)
    return tampered


# --- Properties


@PROPERTY_SETTINGS
@given(leaves=leaf_hashes())
def test_root_equals_rfc_recursive_definition(leaves: list[bytes]) -> None:
    assert root_from_leaf_hashes(leaves) == ref_mth(leaves)


@PROPERTY_SETTINGS
@given(leaves=leaf_hashes(min_size=1), data=st.data())
def test_every_inclusion_proof_verifies_and_matches_rfc_path(
    leaves: list[bytes], data: st.DataObject
) -> None:
    size, root = len(leaves), root_from_leaf_hashes(leaves)
    for index in range(size):
        verify_inclusion(index, size, leaves[index], inclusion_proof(leaves, index), root)
    index = data.draw(st.integers(0, size - 1), label="index")
    assert inclusion_proof(leaves, index) == ref_path(index, leaves)


@PROPERTY_SETTINGS
@given(leaves=leaf_hashes(min_size=1), data=st.data())
def test_consistency_proof_between_random_sizes_verifies_and_matches_rfc_proof(
    leaves: list[bytes], data: st.DataObject
) -> None:
    new_size = data.draw(st.integers(1, len(leaves)), label="new_size")
    old_size = data.draw(st.integers(1, new_size), label="old_size")
    proof = consistency_proof(leaves, old_size, new_size)
    assert proof == ref_subproof(old_size, leaves[:new_size], True)
    old_root = root_from_leaf_hashes(leaves[:old_size])
    new_root = root_from_leaf_hashes(leaves[:new_size])
    verify_consistency(old_size, new_size, old_root, new_root, proof)


@PROPERTY_SETTINGS
@given(leaves=leaf_hashes())
def test_compact_range_root_equals_full_root_at_every_size(leaves: list[bytes]) -> None:
    compact = CompactRange()
    assert compact.root() == root_from_leaf_hashes([])
    for size, leaf in enumerate(leaves, start=1):
        compact.append(leaf)
        assert compact.size == size
        assert len(compact.hashes) == size.bit_count()
        assert compact.root() == root_from_leaf_hashes(leaves[:size])


@PROPERTY_SETTINGS
@given(leaves=leaf_hashes(), data=st.data())
def test_compact_range_restored_from_state_continues_identically(
    leaves: list[bytes], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(leaves)), label="cut")
    first = CompactRange()
    first.extend(leaves[:cut])
    restored = CompactRange.from_state(first.size, first.hashes)
    restored.extend(leaves[cut:])
    assert restored.root() == root_from_leaf_hashes(leaves)


@PROPERTY_SETTINGS
@given(leaves=leaf_hashes(min_size=2), data=st.data())
def test_flipped_bit_anywhere_in_inclusion_proof_is_rejected(
    leaves: list[bytes], data: st.DataObject
) -> None:
    size, root = len(leaves), root_from_leaf_hashes(leaves)
    index = data.draw(st.integers(0, size - 1), label="index")
    proof = inclusion_proof(leaves, index)
    element = data.draw(st.integers(0, len(proof) - 1), label="element")
    bit = data.draw(st.integers(0, 8 * len(proof[element]) - 1), label="bit")
    with pytest.raises(ProofError):
        verify_inclusion(index, size, leaves[index], _flip(proof, element, bit), root)


@PROPERTY_SETTINGS
@given(leaves=leaf_hashes(min_size=2), data=st.data())
def test_flipped_bit_anywhere_in_consistency_proof_is_rejected(
    leaves: list[bytes], data: st.DataObject
) -> None:
    new_size = data.draw(st.integers(2, len(leaves)), label="new_size")
    old_size = data.draw(st.integers(1, new_size - 1), label="old_size")
    proof = consistency_proof(leaves, old_size, new_size)
    element = data.draw(st.integers(0, len(proof) - 1), label="element")
    bit = data.draw(st.integers(0, 8 * len(proof[element]) - 1), label="bit")
    old_root = root_from_leaf_hashes(leaves[:old_size])
    new_root = root_from_leaf_hashes(leaves[:new_size])
    with pytest.raises(ProofError):
        verify_consistency(old_size, new_size, old_root, new_root, _flip(proof, element, bit))


@PROPERTY_SETTINGS
@given(leaves=leaf_hashes(min_size=2), data=st.data())
def test_inclusion_proof_does_not_verify_at_another_index(
    leaves: list[bytes], data: st.DataObject
) -> None:
    size, root = len(leaves), root_from_leaf_hashes(leaves)
    index = data.draw(st.integers(0, size - 1), label="index")
    other = data.draw(st.integers(0, size - 1).filter(lambda i: i != index), label="other")
    with pytest.raises(ProofError):
        verify_inclusion(other, size, leaves[index], inclusion_proof(leaves, index), root)


@PROPERTY_SETTINGS
@given(leaves=leaf_hashes(min_size=2), data=st.data())
def test_consistency_proof_does_not_verify_for_a_rewritten_history(
    leaves: list[bytes], data: st.DataObject
) -> None:
    new_size = data.draw(st.integers(2, len(leaves)), label="new_size")
    old_size = data.draw(st.integers(1, new_size - 1), label="old_size")
    changed = data.draw(st.integers(0, old_size - 1), label="changed")
    # The log rewrote one already-published leaf before growing.
    rewritten = list(leaves)
    rewritten[changed] = hash_leaf(b"rewritten")
    old_root = root_from_leaf_hashes(leaves[:old_size])
    new_root = root_from_leaf_hashes(rewritten[:new_size])
    proof = consistency_proof(rewritten, old_size, new_size)
    with pytest.raises(ProofError):
        verify_consistency(old_size, new_size, old_root, new_root, proof)

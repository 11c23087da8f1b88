"""Published RFC 6962 / RFC 9162 reference vectors, and mutations of them.

The data lives in ``vectors/rfc6962.json`` together with where each value comes
from (transparency-dev/merkle and google/certificate-transparency test suites).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from audit_worker.merkle import (
    CompactRange,
    ProofError,
    RootMismatchError,
    consistency_proof,
    hash_leaf,
    inclusion_proof,
    root_from_inclusion_proof,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

Case = dict[str, Any]

_DATA: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "rfc6962.json").read_text(encoding="utf-8")
)


def _h(value: str) -> bytes:
    return bytes.fromhex(value)


def _hs(values: list[str]) -> list[bytes]:
    return [bytes.fromhex(v) for v in values]


# The published leaf hashes, so tree tests do not depend on hash_leaf being right.
LEAF_HASHES = _hs(_DATA["leaf_hashes"])
ROOTS = _hs(_DATA["roots"])


def _check_leaf_hash(case: Case) -> None:
    assert hash_leaf(_h(case["leaf"])) == _h(case["leaf_hash"])


def _check_root(case: Case) -> None:
    size = case["size"]
    assert root_from_leaf_hashes(LEAF_HASHES[:size]) == ROOTS[size]


def _check_compact_range(case: Case) -> None:
    size = case["size"]
    compact = CompactRange()
    compact.extend(LEAF_HASHES[:size])
    assert compact.size == size
    assert compact.hashes == _hs(case["hashes"])
    assert compact.root() == ROOTS[size]
    assert CompactRange.from_state(size, _hs(case["hashes"])).root() == ROOTS[size]


def _check_inclusion(case: Case) -> None:
    index, size, proof = case["index"], case["size"], _hs(case["proof"])
    assert inclusion_proof(LEAF_HASHES[:size], index) == proof
    assert root_from_inclusion_proof(index, size, LEAF_HASHES[index], proof) == ROOTS[size]
    verify_inclusion(index, size, LEAF_HASHES[index], proof, ROOTS[size])


def _check_consistency(case: Case) -> None:
    old, new, proof = case["old_size"], case["new_size"], _hs(case["proof"])
    assert consistency_proof(LEAF_HASHES, old, new) == proof
    verify_consistency(old, new, ROOTS[old], ROOTS[new], proof)


_CHECKS: dict[str, Callable[[Case], None]] = {
    "leaf_hash": _check_leaf_hash,
    "root": _check_root,
    "compact_range": _check_compact_range,
    "inclusion": _check_inclusion,
    "consistency": _check_consistency,
}


def _valid_cases() -> list[Any]:
    cases: list[Any] = []
    for i, (leaf, leaf_hash) in enumerate(zip(_DATA["leaves"], _DATA["leaf_hashes"], strict=True)):
        case = {"kind": "leaf_hash", "leaf": leaf, "leaf_hash": leaf_hash}
        cases.append(pytest.param(case, id=f"leaf-hash-{i}"))
    for size in range(len(ROOTS)):
        cases.append(pytest.param({"kind": "root", "size": size}, id=f"root-size-{size}"))
    for size, hashes in enumerate(_DATA["compact_ranges"]):
        case = {"kind": "compact_range", "size": size, "hashes": hashes}
        cases.append(pytest.param(case, id=f"compact-range-size-{size}"))
    for case in _DATA["inclusion"]:
        case_id = f"inclusion-{case['index']}-of-{case['size']}"
        cases.append(pytest.param({"kind": "inclusion", **case}, id=case_id))
    for case in _DATA["consistency"]:
        case_id = f"consistency-{case['old_size']}-to-{case['new_size']}"
        cases.append(pytest.param({"kind": "consistency", **case}, id=case_id))
    return cases


@pytest.mark.parametrize("case", _valid_cases())
def test_published_vector_is_reproduced(case: Case) -> None:
    _CHECKS[case["kind"]](case)


def _run_rejected_inclusion(case: Case) -> None:
    verify_inclusion(
        case["index"], case["size"], _h(case["leaf_hash"]), _hs(case["proof"]), _h(case["root"])
    )


def _run_rejected_consistency(case: Case) -> None:
    verify_consistency(
        case["old_size"],
        case["new_size"],
        _h(case["old_root"]),
        _h(case["new_root"]),
        _hs(case["proof"]),
    )


def _rejected_cases() -> list[Any]:
    return [
        pytest.param(_run_rejected_inclusion, case, id=f"inclusion/{case['name']}")
        for case in _DATA["rejected_inclusion"]
    ] + [
        pytest.param(_run_rejected_consistency, case, id=f"consistency/{case['name']}")
        for case in _DATA["rejected_consistency"]
    ]


@pytest.mark.parametrize(("run", "case"), _rejected_cases())
def test_mutated_vector_is_rejected_for_the_right_reason(
    run: Callable[[Case], None], case: Case
) -> None:
    with pytest.raises(ProofError) as raised:
        run(case)
    # "malformed" must be caught by the shape checks, before any root is
    # computed; "mismatch" must get through them and fail on the roots.
    is_mismatch = isinstance(raised.value, RootMismatchError)
    assert is_mismatch == (case["rejected_as"] == "mismatch"), str(raised.value)


def test_vector_file_covers_every_required_mutation() -> None:
    suffixes = {
        case["name"].split("/", 1)[1]
        for case in _DATA["rejected_inclusion"] + _DATA["rejected_consistency"]
    }
    required = {
        "wrong-leaf",
        "wrong-index",
        "modified-proof-0-bit-3",
        "trailing-garbage",
        "truncated-proof",
        "wrong-root",
        "swapped-sizes",
    }
    assert required <= suffixes

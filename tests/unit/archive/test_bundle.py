"""The month bundle format on its own: written, read back, verified, and refused when any
part of it changes; inclusion proofs from a start range equal full-tree proofs."""

from __future__ import annotations

import gzip
import json
from datetime import date
from pathlib import Path

import pytest

from audit_worker.archive.bundle import (
    PART_ROWS,
    BundleError,
    BundleWriter,
    VerifiedBundle,
    verify_bundle,
)
from audit_worker.archive.reader import inclusion_path
from audit_worker.crypto import LocalSigner, TrustedKeys
from audit_worker.merkle import (
    CompactRange,
    hash_leaf,
    inclusion_proof,
    root_from_leaf_hashes,
    verify_inclusion,
)

MONTH = date(2026, 9, 1)


def _leaf(index: int) -> bytes:
    return b'{"log_index":%d,"recorded":"2026-09-10T00:00:00.000Z","x":%d}' % (index, index)


def _rows(first: int, end: int) -> list[tuple[int, bytes, bytes]]:
    return [(i, _leaf(i), hash_leaf(_leaf(i))) for i in range(first, end)]


@pytest.fixture
def signer(tmp_path: Path) -> LocalSigner:
    return LocalSigner(tmp_path / "signing.pem", create=True)


@pytest.fixture
def keys(signer: LocalSigner) -> TrustedKeys:
    return TrustedKeys.from_pems([signer.public_key_pem()])


def _start(first: int) -> CompactRange:
    start = CompactRange()
    start.extend(hash_leaf(_leaf(i)) for i in range(first))
    return start


def _write(signer: LocalSigner, keys: TrustedKeys, first: int, end: int) -> dict[str, bytes]:
    writer = BundleWriter("audit-log", MONTH, _start(first))
    objects = {p.key: p.data for p in writer.add(_rows(first, end))}
    last = writer.finish()
    if last is not None:
        objects[last.key] = last.data
    objects["checkpoint"] = writer.sign(1_760_000_000_000, signer, keys.keys[0])
    objects["manifest.json"] = writer.manifest()
    return objects


def _verify(objects: dict[str, bytes], keys: TrustedKeys, first: int) -> VerifiedBundle:
    return verify_bundle(
        objects["manifest.json"], objects.get, keys, log_id="audit-log", month=MONTH,
        expected_start=_start(first),
    )


@pytest.mark.parametrize(
    ("first", "end"), [(0, 0), (0, 1), (5, 300), (PART_ROWS - 3, PART_ROWS + 4)]
)
def test_written_bundle_verifies_and_ends_at_the_whole_trees_root(
    signer: LocalSigner, keys: TrustedKeys, first: int, end: int
) -> None:
    objects = _write(signer, keys, first, end)
    bundle = _verify(objects, keys, first)
    assert (bundle.first_index, bundle.end_index) == (first, end)
    assert bundle.checkpoint.root_hash == root_from_leaf_hashes(
        [hash_leaf(_leaf(i)) for i in range(end)]
    )
    manifest = json.loads(objects["manifest.json"])
    assert [p["first_index"] // PART_ROWS for p in manifest["parts"]] == sorted(
        {i // PART_ROWS for i in range(first, end)}
    )


def test_each_line_of_a_part_is_a_leaf_that_jq_can_read(
    signer: LocalSigner, keys: TrustedKeys
) -> None:
    objects = _write(signer, keys, 0, 3)
    lines = gzip.decompress(objects["entries/000000.jsonl.gz"]).splitlines()
    assert [json.loads(line)["log_index"] for line in lines] == [0, 1, 2]
    assert lines == [_leaf(i) for i in range(3)]


def _changed_row(objects: dict[str, bytes]) -> None:
    """A row changed, with the part's SHA-256 in the manifest updated to match."""
    key = "entries/000000.jsonl.gz"
    text = gzip.decompress(objects[key]).replace(b'"x":7}', b'"x":8}')
    objects[key] = gzip.compress(text, mtime=0)
    manifest = json.loads(objects["manifest.json"])
    import hashlib

    manifest["parts"][0].update(sha256=hashlib.sha256(objects[key]).hexdigest(),
                                bytes=len(objects[key]))
    objects["manifest.json"] = json.dumps(manifest).encode()


def _changed_part_bytes(objects: dict[str, bytes]) -> None:
    key = "entries/000000.jsonl.gz"
    objects[key] = gzip.compress(gzip.decompress(objects[key]).replace(b'"x":7}', b'"x":8}'))


def _dropped_row(objects: dict[str, bytes]) -> None:
    key = "entries/000000.jsonl.gz"
    lines = gzip.decompress(objects[key]).splitlines(keepends=True)
    objects[key] = gzip.compress(b"".join(lines[:7] + lines[8:]), mtime=0)


def _bad_signature(objects: dict[str, bytes]) -> None:
    note = objects["checkpoint"]
    text, _, sig = note.rpartition(b" ")
    flipped = bytes([sig[10] ^ 1]) if sig[10:11] not in (b"A", b"B") else b"C"
    objects["checkpoint"] = text + b" " + sig[:10] + flipped + sig[11:]


def _wrong_start(objects: dict[str, bytes]) -> None:
    manifest = json.loads(objects["manifest.json"])
    manifest["start_range"]["hashes"][0] = "00" * 32
    objects["manifest.json"] = json.dumps(manifest).encode()


def _missing_checkpoint(objects: dict[str, bytes]) -> None:
    del objects["checkpoint"]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_changed_row, "do not hash to the manifest's end range"),
        (_changed_part_bytes, "does not have its SHA-256"),
        (_dropped_row, "does not have its SHA-256"),
        (_bad_signature, "checkpoint"),
        (_wrong_start, "not the previous month's end range"),
        (_missing_checkpoint, "checkpoint object is missing"),
    ],
    ids=["changed-row", "changed-part", "dropped-row", "bad-signature", "wrong-start",
         "missing-checkpoint"],
)
def test_tampered_bundle_is_refused_with_the_check_that_failed(
    signer: LocalSigner, keys: TrustedKeys, tamper: object, message: str
) -> None:
    objects = _write(signer, keys, 5, 40)
    tamper(objects)  # type: ignore[operator]
    with pytest.raises(BundleError, match=message):
        _verify(objects, keys, 5)


def test_bundle_signed_by_another_key_is_refused(signer: LocalSigner, tmp_path: Path) -> None:
    other = LocalSigner(tmp_path / "other.pem", create=True)
    objects = _write(signer, TrustedKeys.from_pems([signer.public_key_pem()]), 0, 10)
    with pytest.raises(BundleError, match="no signature by a trusted key"):
        _verify(objects, TrustedKeys.from_pems([other.public_key_pem()]), 0)


def test_writer_refuses_a_changed_row_before_archiving_it() -> None:
    writer = BundleWriter("audit-log", MONTH, CompactRange())
    rows = _rows(0, 3)
    rows[1] = (1, rows[1][1].replace(b'"x":1', b'"x":2'), rows[1][2])
    with pytest.raises(BundleError, match="row 1: its leaf data does not hash"):
        writer.add(rows)


def test_writer_refuses_a_gap() -> None:
    writer = BundleWriter("audit-log", MONTH, CompactRange())
    with pytest.raises(BundleError, match="row 2 came where row 1 was expected"):
        writer.add([_rows(0, 1)[0], _rows(2, 3)[0]])


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 31, 64, 100])
def test_inclusion_path_from_a_start_range_equals_the_full_tree_proof(size: int) -> None:
    leaves = [hash_leaf(b"%d" % i) for i in range(size)]
    for first in range(size):
        start = CompactRange()
        start.extend(leaves[:first])
        for index in range(first, size):
            path, root = inclusion_path(start, leaves[first:], index, size)
            assert path == inclusion_proof(leaves, index), (first, index, size)
            verify_inclusion(index, size, leaves[index], path, root)

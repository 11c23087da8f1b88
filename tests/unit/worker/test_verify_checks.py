"""The verifier's checks without a database: one row, one index range, the signed roots
across ranges, and how findings are counted. Rows are dicts with the columns the verifier
selects (``log_index``, ``leaf_data``, ``leaf_hash``, ``fragments``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from audit_worker.crypto import LocalSigner, TreeHead, TrustedKeys
from audit_worker.merkle import CompactRange, hash_leaf, root_from_leaf_hashes
from audit_worker.verify import (
    Finding,
    VerifyReport,
    _Assembler,
    _check_heads,
    _check_row,
    _Chunk,
    _ChunkChecker,
    _Collector,
    _column_problems,
)

CHECKED = ("event_id", "action", "outcome", "patient_hmac", "actor_hmac", "occurred",
           "recorded", "data_key_id")


def columns(index: int, **changed: str) -> dict[str, str]:
    values = {"event_id": f'"e-{index}"', "action": '"R"', "outcome": "0",
              "patient_hmac": "null", "actor_hmac": '"ab"',
              "occurred": '"2026-01-01T00:00:00.000Z"', "recorded": '"2026-01-01T00:00:01.000Z"',
              # what the server renders for a NULL data_key_id: no sealed fields
              "sealed": "null"}
    return values | changed


def leaf(index: int) -> bytes:
    body = ",".join(f'"{k}":{v}' for k, v in columns(index).items())
    return f'{{"log_index":{index},{body},"detail":null}}'.encode()


def fragments(index: int, **changed: str) -> bytes:
    return "\n".join(f',"{k}":{v},' for k, v in columns(index, **changed).items()).encode()


def row(index: int, data: bytes | None = None, **changed: str) -> dict[str, Any]:
    data = leaf(index) if data is None else data
    return {"log_index": index, "leaf_data": data, "leaf_hash": hash_leaf(data),
            "fragments": fragments(index, **changed)}


def hashes(lo: int, hi: int) -> list[bytes]:
    return [hash_leaf(leaf(i)) for i in range(lo, hi)]


# ---- one row

def test_a_row_whose_columns_match_its_leaf_has_no_finding() -> None:
    findings: list[Finding] = []
    assert _check_row(row(3), findings) == hash_leaf(leaf(3))
    assert findings == []
    assert _column_problems(fragments(3), leaf(3)) == []


def test_a_changed_row_no_longer_hashes_to_its_leaf_hash() -> None:
    changed = row(3) | {"leaf_data": leaf(3).replace(b'"R"', b'"D"')}
    changed["fragments"] = fragments(3, action='"D"')
    findings: list[Finding] = []
    assert _check_row(changed, findings) == hash_leaf(changed["leaf_data"])
    assert findings == [Finding(
        "changed_row", "row 3: its data no longer hashes to the leaf hash written with it",
        index=3)]


@pytest.mark.parametrize(("stored_at", "written_for"), [(3, 5), (1, 12)])
def test_a_row_written_for_another_index_is_reordered(stored_at: int, written_for: int) -> None:
    moved = row(stored_at, leaf(written_for), outcome="4")  # columns not checked then
    findings: list[Finding] = []
    _check_row(moved, findings)
    assert findings == [Finding(
        "reordered_row",
        f'row stored at index {stored_at} was written for another index '
        f'({{"log_index":{written_for})', index=stored_at)]


def test_a_column_that_differs_from_the_leaf_is_named() -> None:
    findings: list[Finding] = []
    _check_row(row(3, outcome="12", actor_hmac='"cd"'), findings)
    assert findings == [Finding(
        "column_mismatch", "row 3: column(s) outcome, actor_hmac differ from the logged leaf "
        "(searches would return wrong rows)", index=3)]


def test_fragments_of_the_wrong_shape_name_every_column() -> None:
    assert _column_problems(b',"event_id":"e-3",', leaf(3)) == list(CHECKED)


def sealed_leaf(index: int, key_id: str = "k1") -> bytes:
    """A leaf with sealed fields: keys sorted, so ``key_id`` comes last in the object."""
    return leaf(index).replace(
        b'"sealed":null', b'"sealed":{"ct":"AAAA","key_id":"%s"}' % key_id.encode())


def with_key_id_fragment(index: int, fragment: bytes) -> bytes:
    """The fragments of `index` with the data_key_id one (the last) replaced, as the
    server renders it: ``,"key_id":<to_json(column)>}``, or ``,"sealed":null,`` for NULL."""
    return b"\n".join([*fragments(index).split(b"\n")[:-1], fragment])


@pytest.mark.parametrize(("data", "fragment", "problems"), [
    (sealed_leaf(3), b',"key_id":"k1"}', []),
    (leaf(3), b',"sealed":null,', []),
    # the column names another data key than the one the leaf was sealed under
    (sealed_leaf(3), b',"key_id":"k2"}', ["data_key_id"]),
    # NULL column, but the leaf has sealed fields: NULL must mean no key id at all
    (sealed_leaf(3), b',"sealed":null,', ["data_key_id"]),
    (leaf(3), b',"key_id":"k1"}', ["data_key_id"]),
    # a value that tries to close the string and match the rest of the leaf stays quoted
    (sealed_leaf(3), b',"key_id":"k1\\"}"}', ["data_key_id"]),
], ids=["same-key", "both-null", "other-key", "null-column-sealed-leaf",
        "key-column-unsealed-leaf", "quote-injection"])
def test_data_key_id_must_agree_with_the_sealed_fields_of_the_leaf(
        data: bytes, fragment: bytes, problems: list[str]) -> None:
    assert _column_problems(with_key_id_fragment(3, fragment), data) == problems


# ---- one index range

def test_a_gapless_range_gives_its_root_and_a_compact_range_per_signed_size() -> None:
    checker = _ChunkChecker(0, 4, [2, 4, 9])
    checker.feed([row(0), row(1)])
    checker.feed([row(2), row(3)])
    chunk = checker.finish()
    two = CompactRange()
    two.extend(hashes(0, 2))
    assert chunk == _Chunk(0, 4, rows=4, findings=[], broken_at=None,
                           partials={2: two.hashes, 4: [root_from_leaf_hashes(hashes(0, 4))]},
                           root=root_from_leaf_hashes(hashes(0, 4)))


def test_a_range_may_start_past_zero() -> None:
    checker = _ChunkChecker(4, 8, [8])
    checker.feed([row(i) for i in range(4, 8)])
    chunk = checker.finish()
    assert chunk.root == root_from_leaf_hashes(hashes(4, 8)) and chunk.findings == []


def test_a_second_row_with_an_index_is_a_duplicate_and_is_skipped() -> None:
    checker = _ChunkChecker(0, 3, [3])
    checker.feed([row(0), row(1), row(1), row(2)])
    chunk = checker.finish()
    assert chunk.findings == [Finding("duplicate_index", "a second row claims index 1",
                                      index=1)]
    assert chunk.rows == 4 and chunk.root == root_from_leaf_hashes(hashes(0, 3))


def test_one_missing_row_breaks_the_range_where_it_is_missing() -> None:
    checker = _ChunkChecker(0, 4, [1, 4])
    checker.feed([row(0), row(1), row(3)])
    chunk = checker.finish()
    assert chunk.findings == [Finding("deleted_row", "1 row(s) missing at index 2", index=2)]
    assert (chunk.broken_at, chunk.root, list(chunk.partials)) == (2, None, [1])


def test_several_missing_rows_are_named_as_a_range() -> None:
    checker = _ChunkChecker(0, 5, [])
    checker.feed([row(0), row(4)])
    assert checker.finish().findings == [
        Finding("deleted_row", "3 row(s) missing at index 1..3", index=1)]


def test_rows_missing_at_the_end_of_a_range_are_found_when_it_finishes() -> None:
    checker = _ChunkChecker(0, 4, [4])
    checker.feed([row(0), row(1)])
    chunk = checker.finish()
    assert chunk.findings == [Finding("deleted_row", "2 row(s) missing at index 2..3", index=2)]
    assert (chunk.broken_at, chunk.root, chunk.partials) == (2, None, {})


def test_a_range_broken_twice_keeps_the_first_break() -> None:
    checker = _ChunkChecker(0, 6, [])
    checker.feed([row(0), row(2), row(4)])
    chunk = checker.finish()
    assert chunk.broken_at == 1
    assert [f.index for f in chunk.findings] == [1, 3, 5]


def test_a_range_with_a_finding_but_no_gap_still_gives_its_root() -> None:
    checker = _ChunkChecker(0, 2, [2])
    checker.feed([row(0, outcome="8"), row(1)])
    chunk = checker.finish()
    assert [f.kind for f in chunk.findings] == ["column_mismatch"]
    assert chunk.root == root_from_leaf_hashes(hashes(0, 2))


# ---- signed roots across ranges

def roots(*sizes: int) -> dict[int, bytes]:
    return {s: root_from_leaf_hashes(hashes(0, s)) for s in sizes}


def checked(lo: int, hi: int, signed: list[int], present: range | None = None) -> _Chunk:
    checker = _ChunkChecker(lo, hi, signed)
    checker.feed([row(i) for i in (present if present is not None else range(lo, hi))])
    return checker.finish()


def assemble(signed: dict[int, bytes], *chunks: _Chunk) -> VerifyReport:
    report = VerifyReport()
    assembler = _Assembler(signed, _Collector(report))
    for chunk in chunks:
        assembler.add(chunk)
    return report


def test_every_signed_root_across_ranges_is_verified() -> None:
    signed = roots(1, 2, 3, 4)
    report = assemble(signed, checked(0, 2, [1, 2]), checked(2, 4, [3, 4]))
    assert report.findings == [] and report.verified_size == 4 and report.rows == 4


def test_a_root_that_the_rows_do_not_give_is_a_mismatch_and_stops_the_comparison() -> None:
    signed = roots(1, 2, 3, 4)
    signed[2] = bytes(32)
    report = assemble(signed, checked(0, 2, [1, 2]), checked(2, 4, [3, 4]))
    computed = root_from_leaf_hashes(hashes(0, 2))
    assert report.findings == [Finding(
        "root_mismatch", f"tree head at size 2 signs root {'00' * 8}…, "
        f"the rows give {computed.hex()[:16]}…", tree_size=2)]
    assert report.verified_size == 1 and report.rows == 4


def test_a_missing_range_is_deleted_rows_and_nothing_after_it_is_verified() -> None:
    signed = roots(2, 6)
    report = assemble(signed, checked(0, 2, [2]), checked(4, 6, [6]))
    assert report.findings == [Finding("deleted_row", "2 row(s) missing at index 2..3",
                                       index=2)]
    assert report.verified_size == 2 and report.rows == 4


def test_nothing_after_a_gap_inside_a_range_is_verified() -> None:
    signed = roots(1, 3, 4)
    broken = checked(0, 2, [1], present=range(0, 1))
    report = assemble(signed, broken, checked(2, 4, [3, 4]))
    assert [f.kind for f in report.findings] == ["deleted_row"]
    assert report.verified_size == 1 and report.rows == 3


def test_nothing_after_a_short_range_lines_up() -> None:
    short = _Chunk(0, 2, rows=2, partials={2: [root_from_leaf_hashes(hashes(0, 2))]})
    report = assemble(roots(2, 3), short, checked(2, 4, [3]))
    assert report.verified_size == 2 and report.findings == [] and report.rows == 4


def test_findings_of_a_range_are_reported_even_after_the_log_broke() -> None:
    first = checked(0, 2, [], present=range(0, 1))
    second = checked(2, 4, [], present=range(2, 4))
    second.findings.append(Finding("column_mismatch", "row 2", index=2))
    report = assemble({}, first, second)
    assert [f.kind for f in report.findings] == ["deleted_row", "column_mismatch"]


# ---- signatures

@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalSigner, LocalSigner]:
    directory: Path = tmp_path_factory.mktemp("keys")
    return (LocalSigner(directory / "a.pem", create=True),
            LocalSigner(directory / "b.pem", create=True))


def head_row(signer: LocalSigner, size: int, timestamp_ms: int,
             log_id: str = "audit-log") -> dict[str, Any]:
    head = TreeHead(log_id, size, bytes([size]) * 32, timestamp_ms)
    return {"tree_size": size, "root_hash": head.root_hash, "timestamp_ms": timestamp_ms,
            "log_id": log_id, "signature": signer.sign(head.signing_input())}


def check_heads(rows: list[dict[str, Any]], trusted: TrustedKeys) -> VerifyReport:
    report = VerifyReport()
    _check_heads(rows, trusted, "audit-log", _Collector(report))
    return report


def test_a_tree_head_passes_when_any_of_the_keys_signed_it(
        keys: tuple[LocalSigner, LocalSigner]) -> None:
    signer, other = keys
    rows = [head_row(signer, 4, 1000)]
    both = TrustedKeys.from_pems([other.public_key_pem(), signer.public_key_pem()])
    assert check_heads(rows, both).valid_tree_heads == 1
    report = check_heads(rows, TrustedKeys.from_pems([other.public_key_pem()]))
    assert [(f.kind, f.tree_size) for f in report.findings] == [("bad_signature", 4)]


def test_a_head_signed_outside_its_keys_window_does_not_count(
        keys: tuple[LocalSigner, LocalSigner]) -> None:
    old, new = keys
    trusted = TrustedKeys.parse({"keys": [
        {"public_key": old.public_key_pem().decode(), "valid_until": "1970-01-01T00:00:02Z"},
        {"public_key": new.public_key_pem().decode(), "valid_from": "1970-01-01T00:00:02Z"},
    ]}, base=Path("."))
    rows = [head_row(old, 1, 1000), head_row(new, 2, 2000), head_row(old, 3, 3000)]
    report = check_heads(rows, trusted)
    assert [(f.kind, f.tree_size) for f in report.findings] == [("key_outside_window", 3)]
    assert report.valid_tree_heads == 2 and report.tree_heads == 3


def test_a_larger_head_dated_before_a_smaller_one_goes_backwards(
        keys: tuple[LocalSigner, LocalSigner]) -> None:
    signer, _ = keys
    rows = [head_row(signer, 1, 5000), head_row(signer, 2, 5000), head_row(signer, 3, 4000),
            head_row(signer, 4, 4500), head_row(signer, 5, 6000)]
    report = check_heads(rows, TrustedKeys.from_pems([signer.public_key_pem()]))
    # equal times are fine; 3 and 4 are both dated before the head at size 2
    assert [(f.kind, f.tree_size) for f in report.findings] == [
        ("timestamp_backwards", 3), ("timestamp_backwards", 4)]
    assert "before the head at the smaller size 1" in report.findings[0].message
    assert report.valid_tree_heads == 5  # still signed: the finding says what is wrong


def test_a_head_for_another_log_is_not_trusted(keys: tuple[LocalSigner, LocalSigner]) -> None:
    signer, _ = keys
    report = check_heads([head_row(signer, 1, 1000, log_id="other-log")],
                         TrustedKeys.from_pems([signer.public_key_pem()]))
    assert [(f.kind, f.tree_size) for f in report.findings] == [("wrong_log_id", 1)]


# ---- the report

def test_the_first_50_findings_of_a_kind_are_kept_and_the_rest_counted() -> None:
    report = VerifyReport()
    out = _Collector(report)
    for i in range(52):
        out.add(Finding("deleted_row", f"row {i}", index=i))
    out.add(Finding("changed_row", "row 0", index=0))
    assert [f.index for f in report.findings if f.kind == "deleted_row"] == list(range(50))
    assert [f.kind for f in report.findings].count("changed_row") == 1
    assert report.suppressed == {"deleted_row": 2}


def test_the_report_is_ok_only_without_findings() -> None:
    assert VerifyReport().ok
    assert not VerifyReport(findings=[Finding("deleted_row", "x")]).ok


def test_the_report_as_stored_rounds_time_and_rate() -> None:
    report = VerifyReport(rows=1000, tree_heads=3, valid_tree_heads=2, verified_size=900,
                          seconds=0.12345, findings=[Finding("unsigned_tail", "100 rows",
                                                             index=900)],
                          suppressed={"deleted_row": 7})
    assert report.rate == 1000 / 0.12345
    assert report.as_dict() == {
        "ok": False, "rows": 1000, "tree_heads": 3, "valid_tree_heads": 2,
        "verified_size": 900, "seconds": 0.123, "rows_per_second": 8100,
        "findings": [{"kind": "unsigned_tail", "message": "100 rows", "index": 900,
                      "tree_size": None, "dead_letter_id": None}],
        "suppressed": {"deleted_row": 7}, "limits": [], "dead_letters": 0,
        "dead_letter_chain_hash": "00" * 32, "witnessed_size": None,
    }


def test_an_instant_report_has_no_rate() -> None:
    assert VerifyReport(rows=5).rate == 0.0
    assert VerifyReport(rows=5).as_dict()["rows_per_second"] == 0


def test_a_fresh_report_and_chunk_are_empty() -> None:
    assert VerifyReport().as_dict() == {
        "ok": True, "rows": 0, "tree_heads": 0, "valid_tree_heads": 0, "verified_size": 0,
        "seconds": 0.0, "rows_per_second": 0, "findings": [], "suppressed": {}, "limits": [],
        "dead_letters": 0, "dead_letter_chain_hash": "00" * 32, "witnessed_size": None}
    assert (_Chunk(0, 4).rows, _Chunk(0, 4).findings, _Chunk(0, 4).broken_at,
            _Chunk(0, 4).partials, _Chunk(0, 4).root) == (0, [], None, {}, None)


def test_the_index_a_moved_row_claims_is_shown_cut_and_safe() -> None:
    forged = b'{"log_index":' + b"9" * 30 + b"\xff" + b',"event_id":"x"}'
    findings: list[Finding] = []
    _check_row(row(3, forged), findings)
    assert findings[0].message == (
        'row stored at index 3 was written for another index ({"log_index":' + "9" * 27 + ")")
    invalid = b'{"log_index":7\xff,"event_id":"x"}'
    findings = []
    _check_row(row(3, invalid), findings)
    assert findings[0].message.endswith('({"log_index":7\ufffd)')


def test_rows_missing_before_the_first_range_are_deleted_rows() -> None:
    report = assemble({}, checked(2, 4, []))
    assert report.findings == [Finding("deleted_row", "2 row(s) missing at index 0..1", index=0)]


def test_a_finding_without_a_place_is_stored_with_nulls() -> None:
    report = VerifyReport(findings=[Finding("truncated_tail", "gone")])
    assert report.as_dict()["findings"] == [
        {"kind": "truncated_tail", "message": "gone", "index": None, "tree_size": None,
         "dead_letter_id": None}]

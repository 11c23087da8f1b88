"""The dead-letter chain's canonical encoding and checker, without a database.

The expected bytes are written out field by field from the format in the module docstring
of `audit_worker.deadletter_chain`, so a change of the encoding fails here first (and
tests/integration/worker/test_dead_letter_chain.py holds the SQL of migration 0004 to it).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from audit_worker.deadletter_chain import (
    DOMAIN,
    GENESIS,
    ChainChecker,
    ChainedDeadLetter,
    ChainProblem,
    DeadLetterEvidence,
    encode_evidence,
    micros_since_epoch,
    next_hash,
)

WHEN = datetime(2026, 3, 1, 12, 30, 15, 123000, tzinfo=UTC)


def evidence(index: int = 0, **changed: object) -> DeadLetterEvidence:
    base = DeadLetterEvidence(
        chain_index=index, stream_entry_id=f"1700000000000-{index}", received_at=WHEN,
        field="occurred", value_class="string", rule="bad_timestamp",
        message="occurred is not an RFC 3339 date-time", delivery_count=1,
        payload_sha256=hashlib.sha256(b"sealed").digest(), data_key_id="dk-1",
    )
    return replace(base, **changed)  # type: ignore[arg-type]


def present(value: bytes) -> bytes:
    return b"\x01" + struct.pack(">I", len(value)) + value


def test_the_encoding_is_each_field_tagged_and_length_prefixed_in_order() -> None:
    e = evidence(7)
    micros = 1772368215123000  # 2026-03-01T12:30:15.123Z in microseconds since the epoch
    assert micros_since_epoch(WHEN) == micros
    assert encode_evidence(e) == b"".join([
        present((7).to_bytes(8, "big")),
        present(b"1700000000000-7"),
        present(micros.to_bytes(8, "big")),
        present(b"occurred"),
        present(b"string"),
        present(b"bad_timestamp"),
        present(b"occurred is not an RFC 3339 date-time"),
        present((1).to_bytes(8, "big")),
        present(hashlib.sha256(b"sealed").digest()),
        present(b"dk-1"),
    ])


def test_null_fields_are_a_single_zero_byte() -> None:
    e = evidence(0, stream_entry_id=None, payload_sha256=None, data_key_id=None)
    encoded = encode_evidence(e)
    assert encoded.startswith(present(bytes(8)) + b"\x00")
    assert encoded.endswith(present((1).to_bytes(8, "big")) + b"\x00\x00")


def test_null_and_empty_text_encode_differently() -> None:
    assert encode_evidence(evidence(data_key_id=None)) != encode_evidence(evidence(data_key_id=""))


def test_moving_bytes_between_fields_changes_the_encoding() -> None:
    # without length prefixes, "ab" + "c" and "a" + "bc" would read alike
    one = evidence(field="ab", value_class="c")
    other = evidence(field="a", value_class="bc")
    assert encode_evidence(one) != encode_evidence(other)


def test_text_is_utf8() -> None:
    assert present("é".encode()) in encode_evidence(evidence(message="é"))


def test_the_first_hash_extends_32_zero_bytes_under_the_domain() -> None:
    e = evidence(0)
    assert bytes(32) == GENESIS
    assert DOMAIN == b"audit-kit/dead-letter-chain/v1\x00"
    assert next_hash(GENESIS, e) == hashlib.sha256(DOMAIN + GENESIS + encode_evidence(e)).digest()


def test_received_at_counts_microseconds_whatever_the_offset() -> None:
    elsewhere = WHEN.astimezone(timezone(timedelta(hours=-5)))
    assert micros_since_epoch(elsewhere) == micros_since_epoch(WHEN)
    assert micros_since_epoch(WHEN + timedelta(microseconds=1)) == micros_since_epoch(WHEN) + 1
    assert micros_since_epoch(datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC)) == -1_000_000


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="UTC offset"):
        micros_since_epoch(datetime(2026, 1, 1))


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33])
def test_a_previous_hash_or_payload_digest_of_the_wrong_size_is_refused(bad: bytes) -> None:
    with pytest.raises(ValueError, match="want 32"):
        next_hash(bad, evidence())
    with pytest.raises(ValueError, match="want 32"):
        encode_evidence(evidence(payload_sha256=bad))


@pytest.mark.parametrize("name", ["chain_index", "stream_entry_id", "received_at", "field",
                                  "value_class", "rule", "message", "delivery_count",
                                  "payload_sha256", "data_key_id"])
def test_every_column_is_covered(name: str) -> None:
    other: Any = {"chain_index": 1, "stream_entry_id": "x", "received_at": WHEN + timedelta(
        microseconds=1), "field": "x", "value_class": "x", "rule": "x", "message": "x",
        "delivery_count": 2, "payload_sha256": bytes(32), "data_key_id": "x"}[name]
    changed = replace(evidence(), **{name: other})
    assert next_hash(GENESIS, changed) != next_hash(GENESIS, evidence())


# ---- the checker

def chain(n: int) -> list[ChainedDeadLetter]:
    rows, previous = [], GENESIS
    for i in range(n):
        previous = next_hash(previous, evidence(i))
        rows.append(ChainedDeadLetter(100 + i, evidence(i), previous))
    return rows


def test_an_intact_chain_has_no_problem_and_gives_its_head() -> None:
    rows = chain(5)
    checker = ChainChecker()
    checker.feed(rows[:2])
    checker.feed(rows[2:])
    assert checker.problems == []
    assert (checker.expected, checker.previous, checker.rows) == (5, rows[-1].chain_hash, 5)


def test_a_checker_may_start_from_a_witnessed_head() -> None:
    rows = chain(5)
    checker = ChainChecker(expected=3, previous=rows[2].chain_hash)
    checker.feed(rows[3:])
    assert checker.problems == [] and checker.expected == 5


def test_a_changed_column_is_found_at_its_row_and_the_rows_after_still_check() -> None:
    rows = chain(5)
    rows[2] = replace(rows[2], evidence=replace(rows[2].evidence, rule="other"))
    checker = ChainChecker()
    checker.feed(rows)
    assert [(p.kind, p.chain_index, p.check, p.dead_letter_id) for p in checker.problems] == [
        ("changed", 2, "hash", 102)]


def test_a_row_rehashed_after_an_edit_breaks_the_next_link() -> None:
    rows = chain(5)
    edited = replace(rows[2].evidence, rule="other")
    rows[2] = ChainedDeadLetter(102, edited, next_hash(rows[1].chain_hash, edited))
    checker = ChainChecker()
    checker.feed(rows)
    assert [(p.kind, p.chain_index) for p in checker.problems] == [("changed", 3)]


def test_deleted_rows_are_a_gap_named_by_its_range() -> None:
    rows = chain(6)
    checker = ChainChecker()
    checker.feed(rows[:1] + rows[4:])
    assert checker.problems == [ChainProblem(
        "deleted", 1, "index", "3 dead letter(s) missing at chain index 1..3")]
    assert checker.expected == 6


def test_a_second_row_with_a_taken_index_is_a_change() -> None:
    rows = chain(3)
    checker = ChainChecker()
    checker.feed([rows[0], rows[1], replace(rows[1], dead_letter_id=999), rows[2]])
    assert [(p.kind, p.chain_index, p.check, p.dead_letter_id) for p in checker.problems] == [
        ("changed", 1, "index", 999)]


def test_deleting_the_newest_rows_leaves_a_chain_that_checks() -> None:
    """The limit that the report states: only a witnessed head shows this."""
    rows = chain(5)
    checker = ChainChecker()
    checker.feed(rows[:3])
    assert checker.problems == [] and checker.expected == 3

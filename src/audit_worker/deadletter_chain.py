"""The hash chain over dead letters: its canonical encoding and an incremental checker.

Dead letters are evidence too (an entry the worker refused is an access attempt someone may
want to hide), but they are not leaves of the Merkle log. Each row of
``audit.dead_letters`` carries ``chain_index`` (0, 1, 2, ... without gaps) and
``chain_hash``::

    chain_hash[i] = SHA-256(DOMAIN || chain_hash[i-1] || evidence(row i))
    chain_hash[-1] = 32 zero bytes (GENESIS)
    DOMAIN = b"audit-kit/dead-letter-chain/v1" || 0x00

``evidence(row)`` is the concatenation of these fields, in this order, each encoded as
``0x00`` when NULL, else ``0x01 || uint32_be(len(value)) || value``:

    chain_index      int64, 8 bytes big-endian two's complement
    stream_entry_id  UTF-8 text
    received_at      int64 microseconds since 1970-01-01T00:00:00Z (the worker writes
                     millisecond values; rows of older releases carry microseconds)
    field            UTF-8 text
    value_class      UTF-8 text
    rule             UTF-8 text
    message          UTF-8 text
    delivery_count   int64, 8 bytes big-endian
    payload_sealed   SHA-256 of the sealed payload (32 bytes), NULL when no payload
    data_key_id      UTF-8 text

Every field is length-prefixed and tagged, so no two rows encode alike. Migration 0004
computes the same bytes in SQL (``audit.dead_letter_chain_hash``) to chain the rows that
predate it and the rows a previous release inserts; the tests hold the two together.

This module is pure (no database): the store extends the chain, and ``verify`` and the
witness publisher recompute it, with the functions here.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

__all__ = [
    "DOMAIN",
    "GENESIS",
    "ChainChecker",
    "ChainProblem",
    "ChainedDeadLetter",
    "DeadLetterEvidence",
    "encode_evidence",
    "micros_since_epoch",
    "next_hash",
]

DOMAIN = b"audit-kit/dead-letter-chain/v1\x00"
GENESIS = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_LENGTH = struct.Struct(">I")
_INT64 = struct.Struct(">q")


@dataclass(frozen=True, slots=True)
class DeadLetterEvidence:
    """The columns of one dead letter that the chain covers (``id`` is not among them:
    it is a sequence value, not evidence; ``chain_index`` is)."""

    chain_index: int
    stream_entry_id: str | None
    received_at: datetime
    field: str
    value_class: str
    rule: str
    message: str
    delivery_count: int
    payload_sha256: bytes | None
    data_key_id: str | None


def micros_since_epoch(moment: datetime) -> int:
    """Exact integer microseconds since the Unix epoch; requires an aware datetime."""
    if moment.tzinfo is None:
        raise ValueError("received_at must carry a UTC offset")
    return (moment - _EPOCH) // _MICROSECOND


def _field(value: bytes | None) -> bytes:
    if value is None:
        return b"\x00"
    return b"\x01" + _LENGTH.pack(len(value)) + value


def _text(value: str | None) -> bytes | None:
    return None if value is None else value.encode("utf-8")


def encode_evidence(e: DeadLetterEvidence) -> bytes:
    """The canonical bytes of one row (see the module docstring)."""
    if e.payload_sha256 is not None and len(e.payload_sha256) != 32:
        raise ValueError(f"payload_sha256 has {len(e.payload_sha256)} bytes, want 32")
    return b"".join(
        (
            _field(_INT64.pack(e.chain_index)),
            _field(_text(e.stream_entry_id)),
            _field(_INT64.pack(micros_since_epoch(e.received_at))),
            _field(_text(e.field)),
            _field(_text(e.value_class)),
            _field(_text(e.rule)),
            _field(_text(e.message)),
            _field(_INT64.pack(e.delivery_count)),
            _field(e.payload_sha256),
            _field(_text(e.data_key_id)),
        )
    )


def next_hash(previous: bytes, evidence: DeadLetterEvidence) -> bytes:
    """chain_hash of `evidence`'s row, given the chain_hash of the row before it."""
    if len(previous) != 32:
        raise ValueError(f"previous chain hash has {len(previous)} bytes, want 32")
    return hashlib.sha256(DOMAIN + previous + encode_evidence(evidence)).digest()


@dataclass(frozen=True, slots=True)
class ChainedDeadLetter:
    """A stored row: its evidence, its id (to point an operator at it) and the stored hash."""

    dead_letter_id: int
    evidence: DeadLetterEvidence
    chain_hash: bytes


ProblemKind = Literal["changed", "deleted"]


@dataclass(frozen=True, slots=True)
class ChainProblem:
    kind: ProblemKind
    chain_index: int
    check: Literal["index", "hash"]  # which stored value is wrong
    message: str
    dead_letter_id: int | None = None


@dataclass
class ChainChecker:
    """Recomputes the chain from ``start`` (whose predecessor hash is ``previous``) over rows
    fed in chain_index order, and records every problem instead of stopping at the first.

    After a problem it carries on from the stored hash of the row it stopped at, so one
    edited row gives one finding and the rows after it are still checked.
    """

    expected: int = 0  # the next chain_index; after the last row, the chain's length
    previous: bytes = GENESIS  # the hash the next row must extend
    problems: list[ChainProblem] = field(default_factory=list)
    rows: int = 0

    def feed(self, rows: Iterable[ChainedDeadLetter]) -> None:
        for row in rows:
            self._one(row)

    def _one(self, row: ChainedDeadLetter) -> None:
        index = row.evidence.chain_index
        self.rows += 1
        if index < self.expected:
            self.problems.append(
                ChainProblem(
                    "changed", index, "index",
                    f"dead letter id {row.dead_letter_id} claims chain index {index}, which "
                    "another dead letter holds (a row was copied or renumbered)",
                    row.dead_letter_id,
                )
            )
            return
        if index > self.expected:
            missing = index - self.expected
            span = f"{self.expected}..{index - 1}" if missing > 1 else str(self.expected)
            self.problems.append(
                ChainProblem(
                    "deleted", self.expected, "index",
                    f"{missing} dead letter(s) missing at chain index {span}",
                )
            )
            # The hash before `index` was deleted with its row: resynchronise on the
            # stored hash, so the rows after this one are still checked.
            self.expected, self.previous = index + 1, row.chain_hash
            return
        computed = next_hash(self.previous, row.evidence)
        if computed != row.chain_hash:
            self.problems.append(
                ChainProblem(
                    "changed", index, "hash",
                    f"dead letter id {row.dead_letter_id} at chain index {index}: its stored "
                    "chain hash does not follow from its columns and the hash before it "
                    "(this row, or the chain hash of the row before, was changed)",
                    row.dead_letter_id,
                )
            )
        self.expected, self.previous = index + 1, row.chain_hash

"""The append-only log in PostgreSQL, and its sequencer.

One sequencer per log: every append takes a transaction-scoped advisory lock, catches its
compact range up with whatever other workers appended, skips event ids already stored, and
assigns the next gapless indices in the same transaction that stores the rows. Two workers
writing at once therefore build one tree, and a replayed event never gets a second index.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from audit_worker.crypto import DataKey
from audit_worker.errors import SequenceError
from audit_worker.events import Rejection
from audit_worker.merkle import HASH_SIZE, CompactRange
from audit_worker.records import PreparedEvent, SequencedEvent, iso_ms, sequence

EVENT_COLUMNS = (
    "log_index",
    "event_id",
    "recorded",
    "occurred",
    "action",
    "outcome",
    "patient_hmac",
    "actor_hmac",
    "data_key_id",
    "leaf_data",
    "leaf_hash",
)


def sequencer_lock_key(log_id: str) -> int:
    """The advisory lock id of a log: stable across processes and releases."""
    return zlib.crc32(f"audit-kit/sequencer/{log_id}".encode())


@dataclass(frozen=True, slots=True)
class DeadLetter:
    rejection: Rejection
    stream_entry_id: str | None
    delivery_count: int
    payload_sealed: bytes | None
    data_key_id: str | None


@dataclass(frozen=True, slots=True)
class AppendResult:
    stored: list[SequencedEvent]
    duplicates: list[uuid.UUID]
    frontier: CompactRange


@dataclass(frozen=True, slots=True)
class StoredTreeHead:
    tree_size: int
    root_hash: bytes
    timestamp_ms: int
    log_id: str
    signature: bytes
    signer_ref: str


def now_ms() -> datetime:
    """Now, truncated to the millisecond precision that leaves record."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _pack_frontier(frontier: CompactRange) -> bytes:
    return b"".join(frontier.hashes)


def _unpack_frontier(size: int, packed: bytes) -> CompactRange:
    hashes = [packed[i : i + HASH_SIZE] for i in range(0, len(packed), HASH_SIZE)]
    return CompactRange.from_state(size, hashes)


class LogStore:
    """Reads and appends one log. Safe to share between tasks of one worker."""

    def __init__(self, pool: asyncpg.Pool, log_id: str) -> None:
        self.pool = pool
        self.log_id = log_id
        self._lock_key = sequencer_lock_key(log_id)

    async def _catch_up(
        self, conn: PoolConnectionProxy[asyncpg.Record], frontier: CompactRange
    ) -> None:
        rows = await conn.fetch(
            "SELECT log_index, leaf_hash FROM audit.events WHERE log_index >= $1 "
            "ORDER BY log_index",
            frontier.size,
        )
        for row in rows:
            if row["log_index"] != frontier.size:
                raise SequenceError(
                    f"log index {row['log_index']} found where {frontier.size} was expected; "
                    "stop the writers and run `audit-worker verify`"
                )
            frontier.append(bytes(row["leaf_hash"]))

    async def catch_up(self, frontier: CompactRange) -> CompactRange:
        """A copy of `frontier` extended with the rows committed since (by any worker)."""
        fresh = frontier.copy()
        async with self.pool.acquire() as conn:
            await self._catch_up(conn, fresh)
        return fresh

    async def load_frontier(self) -> CompactRange:
        """Resume from the newest tree head's compact range, then catch up with the rows."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT tree_size, frontier FROM audit.tree_heads ORDER BY tree_size DESC LIMIT 1"
            )
            frontier = (
                _unpack_frontier(row["tree_size"], bytes(row["frontier"]))
                if row
                else CompactRange()
            )
            await self._catch_up(conn, frontier)
            return frontier

    async def append(
        self,
        frontier: CompactRange,
        events: Sequence[PreparedEvent],
        dead_letters: Sequence[DeadLetter] = (),
        new_keys: Sequence[DataKey] = (),
    ) -> AppendResult:
        """Store a batch in one transaction. `frontier` is not modified: use the result's."""
        work = frontier.copy()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)
            for key in new_keys:
                await conn.execute(
                    "INSERT INTO audit.data_keys (key_id, purpose, wrapped, wrapper_ref) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (key_id) DO NOTHING",
                    key.key_id,
                    "phi",
                    key.wrapped,
                    key.wrapper_ref,
                )
            if dead_letters:
                await conn.executemany(
                    "INSERT INTO audit.dead_letters (stream_entry_id, field, value_class, rule,"
                    " message, delivery_count, payload_sealed, data_key_id)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    " ON CONFLICT (stream_entry_id) DO NOTHING",
                    [
                        (
                            d.stream_entry_id,
                            d.rejection.field,
                            d.rejection.value_class,
                            d.rejection.rule,
                            d.rejection.message,
                            d.delivery_count,
                            d.payload_sealed,
                            d.data_key_id,
                        )
                        for d in dead_letters
                    ],
                )
            stored: list[SequencedEvent] = []
            duplicates: list[uuid.UUID] = []
            if events:
                await self._catch_up(conn, work)
                ids = [e.event_id for e in events]
                existing = {
                    r["event_id"]
                    for r in await conn.fetch(
                        "SELECT event_id FROM audit.events WHERE event_id = ANY($1::uuid[])", ids
                    )
                }
                recorded = now_ms()
                recorded_iso = iso_ms(recorded).encode()
                for event in events:
                    if event.event_id in existing:
                        duplicates.append(event.event_id)
                        continue
                    existing.add(event.event_id)  # the same id twice in one batch
                    sequenced = sequence(event, work.size, recorded, recorded_iso)
                    work.append(sequenced.leaf_hash)
                    stored.append(sequenced)
                if stored:
                    await conn.copy_records_to_table(
                        "events",
                        schema_name="audit",
                        columns=EVENT_COLUMNS,
                        records=[
                            (
                                s.log_index,
                                s.prepared.event_id,
                                s.recorded,
                                s.prepared.occurred,
                                s.prepared.action,
                                s.prepared.outcome,
                                s.prepared.patient_hmac,
                                s.prepared.actor_hmac,
                                s.prepared.data_key_id,
                                s.leaf_data,
                                s.leaf_hash,
                            )
                            for s in stored
                        ],
                    )
        return AppendResult(stored, duplicates, work)

    async def insert_tree_head(self, head: StoredTreeHead, frontier: CompactRange) -> bool:
        """Store a signed tree head; False when one for this size already exists."""
        if frontier.size != head.tree_size:
            raise ValueError(f"frontier size {frontier.size}, want {head.tree_size}")
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                "INSERT INTO audit.tree_heads (tree_size, root_hash, timestamp_ms, log_id,"
                " signature, signer_ref, frontier) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (tree_size) DO NOTHING",
                head.tree_size,
                head.root_hash,
                head.timestamp_ms,
                head.log_id,
                head.signature,
                head.signer_ref,
                _pack_frontier(frontier),
            )
        return bool(status.endswith(" 1"))

    async def tree_heads(self) -> list[StoredTreeHead]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT tree_size, root_hash, timestamp_ms, log_id, signature, signer_ref"
                " FROM audit.tree_heads ORDER BY tree_size"
            )
        return [
            StoredTreeHead(
                r["tree_size"],
                bytes(r["root_hash"]),
                r["timestamp_ms"],
                r["log_id"],
                bytes(r["signature"]),
                r["signer_ref"],
            )
            for r in rows
        ]

    async def leaf_hashes(self, upto: int) -> list[bytes]:
        """Leaf hashes 0..upto-1 as stored (for proofs; `verify` recomputes its own)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT log_index, leaf_hash FROM audit.events WHERE log_index < $1 "
                "ORDER BY log_index",
                upto,
            )
        if len(rows) != upto or (rows and rows[-1]["log_index"] != upto - 1):
            raise SequenceError(f"log has {len(rows)} leaves below index {upto}, want {upto}")
        return [bytes(r["leaf_hash"]) for r in rows]

    async def locate(self, event_id: uuid.UUID) -> tuple[int, bytes] | None:
        """The log index and leaf hash of an event, or None."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT log_index, leaf_hash FROM audit.events WHERE event_id = $1", event_id
            )
        return (row["log_index"], bytes(row["leaf_hash"])) if row else None

    async def dead_letter_count(self) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM audit.dead_letters"))

    async def load_or_create_key(self, purpose: str, create: DataKey | None) -> bytes | None:
        """The wrapped key for `purpose`: the first one stored, inserting `create` if none."""
        async with self.pool.acquire() as conn, conn.transaction():
            # Under the sequencer lock so that two first-starting workers agree on one key.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)
            if create is not None:
                await conn.execute(
                    "INSERT INTO audit.data_keys (key_id, purpose, wrapped, wrapper_ref)"
                    " SELECT $1, $2, $3, $4 WHERE NOT EXISTS"
                    " (SELECT 1 FROM audit.data_keys WHERE purpose = $2)",
                    create.key_id,
                    purpose,
                    create.wrapped,
                    create.wrapper_ref,
                )
            row = await conn.fetchrow(
                "SELECT wrapped FROM audit.data_keys WHERE purpose = $1"
                " ORDER BY created_at, key_id LIMIT 1",
                purpose,
            )
        return bytes(row["wrapped"]) if row else None

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
from audit_worker.errors import ConfigurationError, SequenceError
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


# Serialises pinning the log id (before anyone knows which sequencer lock to take).
PIN_LOCK_KEY = zlib.crc32(b"audit-kit/log-identity")


def sequencer_lock_key(pinned_log_id: str) -> int:
    """The advisory lock of the one sequencer per database. Derived from the log id pinned
    in the database, never from a worker's settings, so every worker on a database queues
    on the same lock; and the same key as releases before the pin took, so an old-release
    worker and a new one never sequence at once during the blue-green that brings 0002."""
    return zlib.crc32(f"audit-kit/sequencer/{pinned_log_id}".encode())
# Unique keys whose violation means the log's bookkeeping was tampered with or a second
# sequencer ignored the lock: an integrity failure, never an entry's fault.
_SEQUENCE_CONSTRAINTS = frozenset({"event_keys_pkey", "event_keys_log_index_key"})


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
    # Event ids already in the log with another body: skipped like duplicates, but reported.
    conflicts: list[uuid.UUID]


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


# Default longest wait for a pooled connection (the worker passes
# AUDIT_DATABASE_ACQUIRE_TIMEOUT_SECONDS): a TimeoutError is retried like any PostgreSQL
# outage, where an unbounded wait would wedge the batch in hand.
ACQUIRE_TIMEOUT_SECONDS = 10.0


class LogStore:
    """Reads and appends one log. Safe to share between tasks of one worker."""

    def __init__(
        self, pool: asyncpg.Pool, log_id: str, *,
        acquire_timeout: float = ACQUIRE_TIMEOUT_SECONDS,
    ) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        self.log_id = log_id
        self._lock_key: int | None = None  # known once the log id is pinned

    async def pin_log_id(self) -> None:
        """Pin this database to the configured log id on first use; refuse another one.
        Every write that takes the sequencer's lock does this first."""
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PIN_LOCK_KEY)
            await conn.execute(
                "INSERT INTO audit.log_identity (log_id) VALUES ($1) ON CONFLICT DO NOTHING",
                self.log_id,
            )
            pinned = await conn.fetchval("SELECT log_id FROM audit.log_identity")
            # The heads name the log they were signed for: an emptied or rewritten pin
            # must not let a worker with another log id in.
            signed = await conn.fetchval(
                "SELECT log_id FROM audit.tree_heads WHERE log_id <> $1 LIMIT 1", pinned
            )
        if signed is not None:
            raise ConfigurationError(
                f"this database pins the log {pinned!r}, but it holds tree heads of the log "
                f"{signed!r}: stop the writers and run `audit-worker verify`"
            )
        if pinned == self.log_id:
            self._lock_key = sequencer_lock_key(pinned)
        else:
            raise ConfigurationError(
                f"this database holds the log {pinned!r}, but AUDIT_LOG_ID is {self.log_id!r}:"
                " set AUDIT_LOG_ID to the database's log id, or point AUDIT_DATABASE_URL at"
                " the database of this log"
            )

    async def lock_key(self) -> int:
        """The sequencer's advisory lock key, pinning the log id first if need be."""
        if self._lock_key is None:
            await self.pin_log_id()
        assert self._lock_key is not None
        return self._lock_key

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
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            await self._catch_up(conn, fresh)
        return fresh

    async def load_frontier(self) -> CompactRange:
        """Resume from the newest tree head's compact range, then catch up with the rows."""
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
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
        spooled: Sequence[int] = (),
    ) -> AppendResult:
        """Store a batch in one transaction. `frontier` is not modified: use the result's.
        `spooled` names rows of ``audit.intake_spool`` that this batch carries: they are
        deleted in the same transaction, so a spooled event reaches the log at most once."""
        work = frontier.copy()
        lock_key = await self.lock_key()
        try:
            # READ COMMITTED on purpose: each statement after the lock sees what the previous
            # lock holder committed. REPEATABLE READ would take its snapshot at the lock
            # statement, before the lock is granted, and miss those rows.
            async with (
                self.pool.acquire(timeout=self.acquire_timeout) as conn,
                conn.transaction(isolation="read_committed"),
            ):
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key)
                await self._store_keys_and_dead_letters(conn, new_keys, dead_letters)
                if spooled:
                    await conn.execute(
                        "DELETE FROM audit.intake_spool WHERE spool_id = ANY($1::bigint[])",
                        list(spooled),
                    )
                stored, duplicates, conflicts = (
                    await self._sequence(conn, work, events) if events else ([], [], [])
                )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name in _SEQUENCE_CONSTRAINTS:
                raise SequenceError(
                    f"unique key {exc.constraint_name} refused a row the sequencer assigned "
                    "under its lock: the log's key table was written outside the sequencer; "
                    "stop the writers and run `audit-worker verify`"
                ) from None
            raise
        return AppendResult(stored, duplicates, work, conflicts)

    async def _store_keys_and_dead_letters(
        self,
        conn: PoolConnectionProxy[asyncpg.Record],
        new_keys: Sequence[DataKey],
        dead_letters: Sequence[DeadLetter],
    ) -> None:
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

    async def _sequence(
        self,
        conn: PoolConnectionProxy[asyncpg.Record],
        work: CompactRange,
        events: Sequence[PreparedEvent],
    ) -> tuple[list[SequencedEvent], list[uuid.UUID], list[uuid.UUID]]:
        """Under the lock: skip ids already stored, give the rest the next indices, store
        them and their keys. `work` is extended in place."""
        await self._catch_up(conn, work)
        # Looked up in the log itself: rows that a worker of the release before 0002 wrote
        # have no key row, and must still stop a replay.
        known: dict[uuid.UUID, bytes | None] = {
            r["event_id"]: (bytes(r["fingerprint"]) if r["fingerprint"] is not None else None)
            for r in await conn.fetch(
                "SELECT e.event_id, k.fingerprint FROM audit.events e"
                " LEFT JOIN audit.event_keys k ON k.event_id = e.event_id"
                " WHERE e.event_id = ANY($1::uuid[])",
                [e.event_id for e in events],
            )
        }
        stored: list[SequencedEvent] = []
        duplicates: list[uuid.UUID] = []
        conflicts: list[uuid.UUID] = []
        recorded = now_ms()
        recorded_iso = iso_ms(recorded).encode()
        for event in events:
            if event.event_id in known:
                seen = known[event.event_id]
                if seen is not None and seen != event.fingerprint:
                    conflicts.append(event.event_id)
                else:
                    duplicates.append(event.event_id)
                continue
            known[event.event_id] = event.fingerprint  # the same id twice in one batch
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
            await conn.copy_records_to_table(
                "event_keys",
                schema_name="audit",
                columns=("event_id", "log_index", "fingerprint"),
                records=[
                    (s.prepared.event_id, s.log_index, s.prepared.fingerprint) for s in stored
                ],
            )
        return stored, duplicates, conflicts

    async def insert_tree_head(self, head: StoredTreeHead, frontier: CompactRange) -> bool:
        """Store a signed tree head; False when one for this size already exists."""
        if frontier.size != head.tree_size:
            raise ValueError(f"frontier size {frontier.size}, want {head.tree_size}")
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
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
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
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
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
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
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            row = await conn.fetchrow(
                "SELECT log_index, leaf_hash FROM audit.events WHERE event_id = $1", event_id
            )
        return (row["log_index"], bytes(row["leaf_hash"])) if row else None

    async def dead_letter_count(self) -> int:
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            return int(await conn.fetchval("SELECT count(*) FROM audit.dead_letters"))

    async def load_or_create_key(self, purpose: str, create: DataKey | None) -> bytes | None:
        """The wrapped key for `purpose`: the first one stored, inserting `create` if none."""
        lock_key = await self.lock_key()
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn, conn.transaction():
            # Under the sequencer lock so that two first-starting workers agree on one key.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key)
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

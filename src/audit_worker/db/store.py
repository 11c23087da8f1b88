"""The append-only log in PostgreSQL, and its sequencer.

One sequencer per log: every append takes a transaction-scoped advisory lock, catches its
compact range up with whatever other workers appended, skips event ids already stored, and
assigns the next gapless indices in the same transaction that stores the rows. Two workers
writing at once therefore build one tree, and a replayed event never gets a second index.
"""

from __future__ import annotations

import hashlib
import uuid
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from audit_worker.crypto import DataKey, TreeHead, TrustedKeys
from audit_worker.deadletter_chain import (
    GENESIS,
    ChainChecker,
    ChainedDeadLetter,
    DeadLetterEvidence,
    next_hash,
)
from audit_worker.errors import (
    AdoptedRowError,
    ConfigurationError,
    DeadLetterChainError,
    SequenceError,
    UntrustedHeadError,
)
from audit_worker.events import Rejection
from audit_worker.merkle import HASH_SIZE, CompactRange, hash_leaf, root_from_leaf_hashes
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


_STOP = "stop the writers and run `audit-worker verify`"
# At resume, the rows of the head's rightmost subtree are rehashed against its frontier
# when the subtree is at most this wide (most sizes); wider ones check row tree_size-1 only.
HEAD_SUBTREE_CHECK = 1024


def adopted_leaf_hash(index: int, leaf_data: bytes, leaf_hash: bytes) -> bytes:
    """The leaf hash of a row this process did not write, recomputed from its data.

    Requires nothing of the row; raises `AdoptedRowError` when the data was written for
    another index or does not hash to the stored leaf hash. The messages name the index
    and the check only, never the row's content."""
    if not leaf_data.startswith(b'{"log_index":%d,' % index):
        raise AdoptedRowError(
            f"row {index}: its leaf data was written for another log index (moved or "
            f"planted row); the worker will not adopt it: {_STOP}"
        )
    computed = hash_leaf(leaf_data)
    if computed != leaf_hash:
        raise AdoptedRowError(
            f"row {index}: its leaf data does not hash to its stored leaf hash (changed or "
            f"planted row); the worker will not adopt it: {_STOP}"
        )
    return computed


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
        # Every row found here was written by someone else (another worker, an older
        # release, an intruder): it is rehashed before the tree grows over it. Usually
        # there is none, and then reading leaf_data too costs nothing.
        rows = await conn.fetch(
            "SELECT log_index, leaf_data, leaf_hash FROM audit.events WHERE log_index >= $1 "
            "ORDER BY log_index",
            frontier.size,
        )
        for row in rows:
            if row["log_index"] != frontier.size:
                raise SequenceError(
                    f"log index {row['log_index']} found where {frontier.size} was expected; "
                    "stop the writers and run `audit-worker verify`"
                )
            frontier.append(
                adopted_leaf_hash(frontier.size, row["leaf_data"], row["leaf_hash"])
            )

    async def catch_up(self, frontier: CompactRange) -> CompactRange:
        """A copy of `frontier` extended with the rows committed since (by any worker)."""
        fresh = frontier.copy()
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            await self._catch_up(conn, fresh)
        return fresh

    async def load_frontier(self, trusted: TrustedKeys) -> CompactRange:
        """Resume from the newest tree head's compact range, then catch up with the rows.

        Nothing read back is trusted: the head must be signed by a key of `trusted` whose
        window covers its timestamp, name the pinned log, and store a frontier whose root
        is the signed root over rows that exist; each row after it is rehashed (see
        `_catch_up`). Without a head, the range is rebuilt from every row, rehashed.
        Raises `UntrustedHeadError`, `AdoptedRowError` or `SequenceError`."""
        await self.lock_key()  # pins the log id that the head must name
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            row = await conn.fetchrow(
                "SELECT tree_size, root_hash, timestamp_ms, log_id, signature, frontier"
                " FROM audit.tree_heads ORDER BY tree_size DESC LIMIT 1"
            )
            frontier = CompactRange()
            if row is not None:
                frontier = self._trusted_frontier(row, trusted)
                await self._check_head_rows(conn, frontier)
            await self._catch_up(conn, frontier)
            return frontier

    def _trusted_frontier(self, row: asyncpg.Record, trusted: TrustedKeys) -> CompactRange:
        """The stored frontier of a head, once the head and the frontier check out."""
        size = row["tree_size"]

        def untrusted(check: str) -> UntrustedHeadError:
            return UntrustedHeadError(
                f"the newest tree head (size {size}) {check}; the worker will not resume "
                f"from it: {_STOP}"
            )

        # The head's own log id is not quoted: it is data an intruder may have written.
        if row["log_id"] != self.log_id:
            raise untrusted(f"names another log than the pinned log {self.log_id!r}")
        try:
            head = TreeHead(self.log_id, size, bytes(row["root_hash"]), row["timestamp_ms"])
        except (TypeError, ValueError):
            raise untrusted("is malformed (root hash or timestamp)") from None
        verdict = trusted.check_head(head, bytes(row["signature"]))
        if verdict == "bad_signature":
            raise untrusted(
                "is not signed by the worker's signing key nor by any key of "
                "AUDIT_TRUSTED_KEYS_FILE"
            )
        if verdict == "outside_window":
            raise untrusted(
                "is signed by a key of AUDIT_TRUSTED_KEYS_FILE whose window does not cover "
                "the head's timestamp"
            )
        packed = bytes(row["frontier"])
        want = size.bit_count()
        if len(packed) != want * HASH_SIZE:
            raise untrusted(
                f"stores a frontier of {len(packed)} bytes, want {want * HASH_SIZE} "
                f"({want} hashes for its size)"
            )
        frontier = CompactRange.from_packed(size, packed)
        if frontier.root() != head.root_hash:
            raise untrusted("stores a frontier whose root is not the signed root hash")
        return frontier

    async def _check_head_rows(
        self, conn: PoolConnectionProxy[asyncpg.Record], frontier: CompactRange
    ) -> None:
        """Row tree_size-1 exists and hashes to its leaf; when the head's rightmost
        subtree is narrow, its rows rehash to the frontier's last hash (the signed root
        then covers rows that are really there)."""
        size = frontier.size
        if size == 0:
            return
        width = size & -size  # the rightmost perfect subtree covers [size - width, size)
        low = size - width if width <= HEAD_SUBTREE_CHECK else size - 1
        rows = await conn.fetch(
            "SELECT log_index, leaf_data, leaf_hash FROM audit.events"
            " WHERE log_index >= $1 AND log_index < $2 ORDER BY log_index",
            low,
            size,
        )
        indices = [r["log_index"] for r in rows]
        if indices != list(range(low, size)):
            # the first index not where it should be; past the rows read, the next one
            wrong = next(
                (want for want, got in zip(range(low, size), indices, strict=False)
                 if want != got),
                min(low + len(indices), size - 1),
            )
            raise UntrustedHeadError(
                f"the newest tree head (size {size}) covers row {wrong}, which is missing "
                f"or stored twice; the worker will not resume from it: {_STOP}"
            )
        leaves = [
            adopted_leaf_hash(r["log_index"], r["leaf_data"], r["leaf_hash"]) for r in rows
        ]
        if low == size - width and root_from_leaf_hashes(leaves) != frontier.hashes[-1]:
            raise UntrustedHeadError(
                f"the newest tree head (size {size}): rows {low}..{size - 1} do not hash to "
                f"its stored frontier; the worker will not resume from it: {_STOP}"
            )

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
        if dead_letters:  # a batch without dead letters pays nothing for the chain
            await _insert_chained(conn, dead_letters)

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
        recorded = await self._monotonic_now(conn, work.size)
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

    async def _monotonic_now(
        self, conn: PoolConnectionProxy[asyncpg.Record], size: int
    ) -> datetime:
        """Now, or the last row's `recorded` if a worker whose clock is ahead wrote it: under
        the lock, `recorded` never goes backwards with log_index, so each monthly partition
        holds one contiguous index range (what the archive's month bundles need)."""
        moment = now_ms()
        if size == 0:
            return moment
        last: datetime | None = await conn.fetchval(
            "SELECT max(recorded) FROM audit.events WHERE log_index = $1", size - 1
        )
        if last is None:
            # The caught-up range says row size-1 exists: it was removed under the lock.
            raise SequenceError(
                f"log index {size - 1}, the newest the sequencer built on, is gone from the "
                f"database; {_STOP}"
            )
        return max(moment, last.replace(microsecond=last.microsecond // 1000 * 1000))

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
                frontier.packed(),
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


# --------------------------------------------------------------------- dead-letter chain
#
# The API the witness publisher calls (with any asyncpg connection, pooled or not):
#
#   await dead_letter_chain_head(conn) -> (count, hash)
#       the chain as stored: how many dead letters are chained and the chain_hash of the
#       last one (32 zero bytes when there is none). One index lookup.
#   await verify_dead_letter_chain(conn, start, start_hash) -> (count, hash)
#       recompute the chain from chain index `start` on, given the hash `start_hash` of
#       row start-1 (GENESIS for 0), e.g. the (count, hash) witnessed last time; checks
#       first that row start-1 still holds `start_hash`. Raises DeadLetterChainError
#       (an IntegrityError) naming the chain index and the check (``start``, ``index`` or
#       ``hash``) at the first problem; returns the new (count, hash) otherwise.
#
# Format: audit_worker.deadletter_chain. Rows without a chain (possible only with the
# chain trigger of migration 0004 bypassed) are not part of the chain: `verify` reports
# them as dead_letter_unchained.

DeadLetterConn: TypeAlias = "asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]"
_CHAIN_PAGE = 10_000
_LAST_CHAINED = (
    "SELECT chain_index, chain_hash FROM audit.dead_letters WHERE chain_index IS NOT NULL"
    " ORDER BY chain_index DESC LIMIT 1"
)
_CHAINED_ROWS = (
    "SELECT id, chain_index, chain_hash, stream_entry_id, received_at, field, value_class,"
    " rule, message, delivery_count, sha256(payload_sealed) AS payload_sha256, data_key_id"
    " FROM audit.dead_letters WHERE chain_index >= $1 ORDER BY chain_index LIMIT $2"
)


def _chained(row: asyncpg.Record) -> ChainedDeadLetter:
    digest = row["payload_sha256"]
    return ChainedDeadLetter(
        row["id"],
        DeadLetterEvidence(
            row["chain_index"], row["stream_entry_id"], row["received_at"], row["field"],
            row["value_class"], row["rule"], row["message"], row["delivery_count"],
            bytes(digest) if digest is not None else None, row["data_key_id"],
        ),
        bytes(row["chain_hash"]),
    )


async def chained_dead_letters(
    conn: DeadLetterConn, start: int = 0
) -> AsyncIterator[list[ChainedDeadLetter]]:
    """The chained dead letters from chain index `start` on, in pages, in chain order.
    The payload is hashed by the server: ciphertexts never cross the wire."""
    while True:
        rows = await conn.fetch(_CHAINED_ROWS, start, _CHAIN_PAGE)
        if not rows:
            return
        yield [_chained(r) for r in rows]
        start = rows[-1]["chain_index"] + 1


async def dead_letter_chain_head(conn: DeadLetterConn) -> tuple[int, bytes]:
    """(number of chained dead letters, chain_hash of the last; GENESIS when none)."""
    row = await conn.fetchrow(_LAST_CHAINED)
    if row is None:
        return 0, GENESIS
    return row["chain_index"] + 1, bytes(row["chain_hash"])


async def verify_dead_letter_chain(
    conn: DeadLetterConn, start: int, start_hash: bytes
) -> tuple[int, bytes]:
    """Recompute the chain from `start`; see the API note above. Runs in one snapshot
    (its own read-only transaction unless `conn` is already in one)."""
    if start < 0 or len(start_hash) != HASH_SIZE:
        raise ValueError("start must be >= 0 and start_hash 32 bytes")
    if conn.is_in_transaction():
        return await _verify_chain_from(conn, start, start_hash)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _verify_chain_from(conn, start, start_hash)


async def _verify_chain_from(
    conn: DeadLetterConn, start: int, start_hash: bytes
) -> tuple[int, bytes]:
    if start > 0:
        stored = await conn.fetchval(
            "SELECT chain_hash FROM audit.dead_letters WHERE chain_index = $1", start - 1
        )
        if stored is None or bytes(stored) != start_hash:
            what = "is missing" if stored is None else "holds another chain hash"
            raise DeadLetterChainError(
                f"dead-letter chain index {start - 1} {what} than the one given as the start "
                "(dead letters deleted from the end, or the chain rewritten): "
                "stop the writers and run `audit-worker verify`",
                index=start - 1, check="start",
            )
    checker = ChainChecker(expected=start, previous=start_hash)
    async for page in chained_dead_letters(conn, start):
        checker.feed(page)
        if checker.problems:
            problem = checker.problems[0]
            raise DeadLetterChainError(
                f"{problem.message}: stop the writers and run `audit-worker verify`",
                index=problem.chain_index, check=problem.check,
            )
    return checker.expected, checker.previous


async def _insert_chained(
    conn: PoolConnectionProxy[asyncpg.Record], dead_letters: Sequence[DeadLetter]
) -> None:
    """Append dead letters to the chain. Called under the sequencer's lock, so the last
    chained row read here stays the last until commit. Entries already dead-lettered (a
    redelivery after a crash before XACK) are skipped here rather than by ON CONFLICT,
    which would leave a gap in the chain."""
    entry_ids = [d.stream_entry_id for d in dead_letters if d.stream_entry_id is not None]
    head = await conn.fetchrow(
        "SELECT (SELECT array_agg(stream_entry_id) FROM audit.dead_letters"
        "  WHERE stream_entry_id = ANY($1::text[])) AS known, last.chain_index, last.chain_hash"
        f" FROM (SELECT 1) AS one LEFT JOIN LATERAL ({_LAST_CHAINED}) AS last ON true",
        entry_ids,
    )
    assert head is not None  # one row, always
    known = set(head["known"] or ())
    count, previous = (
        (head["chain_index"] + 1, bytes(head["chain_hash"]))
        if head["chain_index"] is not None
        else (0, GENESIS)
    )
    received = now_ms()  # set here, not by the column default: the hash covers it
    records = []
    for d in dead_letters:
        if d.stream_entry_id is not None:
            if d.stream_entry_id in known:
                continue
            known.add(d.stream_entry_id)
        r = d.rejection
        digest = hashlib.sha256(d.payload_sealed).digest() if d.payload_sealed is not None else None
        previous = next_hash(
            previous,
            DeadLetterEvidence(count, d.stream_entry_id, received, r.field, r.value_class,
                               r.rule, r.message, d.delivery_count, digest, d.data_key_id),
        )
        records.append((d.stream_entry_id, received, r.field, r.value_class, r.rule, r.message,
                        d.delivery_count, d.payload_sealed, d.data_key_id, count, previous))
        count += 1
    if records:
        await conn.executemany(
            "INSERT INTO audit.dead_letters (stream_entry_id, received_at, field, value_class,"
            " rule, message, delivery_count, payload_sealed, data_key_id, chain_index,"
            " chain_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            records,
        )

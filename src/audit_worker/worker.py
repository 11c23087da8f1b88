"""The worker: stream batch in, validated and sealed rows out, signed tree heads on top.

One batch is: read entries, parse each (bad ones become dead letters with their reason),
pseudonymise and encrypt, append to the log in one transaction (`commit`), then announce
dead letters and XACK everything (`acknowledge`). Nothing is acknowledged before it is
committed; the two steps are separate so that a Redis failure after the commit is retried
without committing again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from audit_worker.crypto import (
    CryptoError,
    DataKey,
    DataKeyManager,
    FieldCipher,
    TreeHead,
    TreeHeadSigner,
    verify_tree_head,
)
from audit_worker.db.store import AppendResult, DeadLetter, LogStore, StoredTreeHead
from audit_worker.errors import AuditError
from audit_worker.events import Rejection, parse_event, rejection, value_class
from audit_worker.intake import StreamEntry, StreamIntake
from audit_worker.merkle import CompactRange
from audit_worker.records import PreparedEvent, RecordBuilder
from audit_worker.resilience import classify, postgres_error_kind, sqlstate

# One entry of a batch and what triage made of it: an event to append or a dead letter.
Unit = tuple[StreamEntry, PreparedEvent | DeadLetter]
# What `Worker.triage` makes of a batch: its units and the data key they were sealed with.
Triaged = tuple[list[Unit], DataKey]


@dataclass
class BatchResult:
    read: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    first_index: int | None = None
    latencies_ms: list[float] = field(default_factory=list)
    # For logs and metrics: (event id, log index) of each stored event, the ids skipped as
    # replays, and the rule of each dead letter. Ids and indices only, never content.
    stored_events: list[tuple[uuid.UUID, int]] = field(default_factory=list)
    duplicate_ids: list[uuid.UUID] = field(default_factory=list)
    dead_letter_rules: list[str] = field(default_factory=list)
    # Event ids replayed with another body than the one stored (skipped, never stored).
    conflict_ids: list[uuid.UUID] = field(default_factory=list)
    # Entries the stream delivered more often than the limit (crashes, outages): reported,
    # never dead-lettered for it.
    redelivered: int = 0
    # Database refusals that the batch was split to isolate (SQLSTATEs, for the metric).
    isolated_sqlstates: list[str] = field(default_factory=list)


@dataclass
class CommittedBatch:
    """A batch stored in PostgreSQL, not yet acknowledged in Redis."""

    entry_ids: list[str]
    dead_letters: list[tuple[str, str, str, str]]  # (entry id, field, rule, value class)
    result: BatchResult


@dataclass
class WorkerStats:
    batches: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    tree_heads: int = 0
    conflicts: int = 0


class Worker:
    """Owns the compact range of its view of the log; one per process."""

    def __init__(
        self,
        *,
        store: LogStore,
        intake: StreamIntake,
        builder: RecordBuilder,
        cipher: FieldCipher,
        data_keys: DataKeyManager,
        signer: TreeHeadSigner,
        frontier: CompactRange,
        max_deliveries: int = 5,
        max_future_skew: float = 300.0,
        public_key_pem: bytes | None = None,
    ) -> None:
        self.store = store
        self.intake = intake
        self.builder = builder
        self.cipher = cipher
        self.data_keys = data_keys
        self.signer = signer
        self.frontier = frontier
        self.max_deliveries = max_deliveries
        self.max_future_skew = max_future_skew
        self.stats = WorkerStats()
        self._persisted_keys: set[str] = set()
        self._last_signed_size = -1
        # The key the resumed head was checked with (assemble), else pinned at first signing.
        self._public_pem: bytes | None = public_key_pem

    def _dead_letter(self, entry: StreamEntry, rejection: Rejection, key: DataKey) -> DeadLetter:
        sealed = None
        if entry.payload is not None:
            sealed = self.cipher.encrypt(key, entry.payload, entry.entry_id.encode())
        return DeadLetter(
            rejection, entry.entry_id, entry.deliveries, sealed,
            key.key_id if sealed is not None else None,
        )

    def _triage_one(self, entry: StreamEntry, key: DataKey) -> PreparedEvent | Rejection:
        if entry.payload is None:
            return rejection("(entry)", "missing", "missing_event_field")
        outcome = parse_event(entry.payload, max_future_skew=self.max_future_skew)
        if isinstance(outcome, Rejection):
            return outcome
        try:
            return self.builder.prepare(outcome, key)
        except Exception:
            # A validated event that cannot be prepared is a bug, not a reason to stop.
            return rejection("(event)", value_class(entry.payload), "unprocessable")

    def triage(self, entries: list[StreamEntry]) -> Triaged:
        """Parse and seal a batch: CPU only, no I/O. Never raises for an entry's sake; a
        key-service failure for the data key propagates (the commit retries it)."""
        key = self.data_keys.current()
        units: list[Unit] = []
        for entry in entries:
            outcome = self._triage_one(entry, key)
            if isinstance(outcome, Rejection):
                units.append((entry, self._dead_letter(entry, outcome, key)))
            else:
                units.append((entry, outcome))
        self.data_keys.note_use(len(entries))
        return units, key

    async def commit(
        self, entries: list[StreamEntry], triaged: Triaged | None = None
    ) -> CommittedBatch:
        """Validate, seal and append one batch. Raises on a transient database or key
        failure, or on one that configuration caused, with nothing new stored; may be
        called again with the same entries (what a split batch already stored is then
        skipped as replayed). `triaged` is `triage(entries)` when the caller already did it
        (while the previous batch was committing).

        A row PostgreSQL refuses for its data (SQLSTATE class 22, 23 or 54), or an
        unforeseen error while appending, splits the batch in halves until the entry is
        found; only that entry is dead-lettered and the others are stored."""
        result = BatchResult(read=len(entries))
        if not entries:
            return CommittedBatch([], [], result)
        units, key = triaged if triaged is not None else self.triage(entries)
        result.redelivered = sum(1 for e in entries if e.deliveries > self.max_deliveries)
        new_keys = [] if key.key_id in self._persisted_keys else [key]
        appended: list[AppendResult] = []
        dead: list[DeadLetter] = []
        await self._append_isolating(units, key, new_keys, appended, dead, result)
        self._persisted_keys.add(key.key_id)
        committed_ms = time.time() * 1000
        stored = [s for a in appended for s in a.stored]
        result.stored = len(stored)
        result.duplicate_ids = [i for a in appended for i in a.duplicates]
        result.duplicates = len(result.duplicate_ids)
        result.conflict_ids = [i for a in appended for i in a.conflicts]
        result.dead_lettered = len(dead)
        result.first_index = stored[0].log_index if stored else None
        result.latencies_ms = [committed_ms - e.added_ms for e in entries]
        result.stored_events = [(s.prepared.event_id, s.log_index) for s in stored]
        result.dead_letter_rules = [d.rejection.rule for d in dead]
        self.stats.batches += 1
        self.stats.stored += result.stored
        self.stats.duplicates += result.duplicates
        self.stats.dead_lettered += result.dead_lettered
        self.stats.conflicts += len(result.conflict_ids)
        announcements = [
            (d.stream_entry_id or "", d.rejection.field, d.rejection.rule,
             d.rejection.value_class) for d in dead
        ]
        # Spooled entries came from PostgreSQL: there is nothing to XACK for them.
        stream_ids = [e.entry_id for e in entries if e.spool_id is None]
        return CommittedBatch(stream_ids, announcements, result)

    async def _append_isolating(
        self,
        units: list[Unit],
        key: DataKey,
        new_keys: list[DataKey],
        appended: list[AppendResult],
        dead: list[DeadLetter],
        result: BatchResult,
    ) -> None:
        """Append `units` in one transaction; on an entry's error, split and recurse.
        Each part that succeeds is committed at once (and `self.frontier` follows it)."""
        prepared = [u for _, u in units if isinstance(u, PreparedEvent)]
        letters = [u for _, u in units if isinstance(u, DeadLetter)]
        spooled = [e.spool_id for e, _ in units if e.spool_id is not None]
        attempts = 0
        replaced = False  # the entry is now a dead letter with fixed text only
        while True:
            try:
                outcome = await self.store.append(
                    self.frontier, prepared, letters, new_keys, spooled
                )
            except Exception as exc:
                if replaced or not self._entry_may_be_at_fault(exc):
                    raise
                if len(units) > 1:
                    break
                attempts += 1
                code = sqlstate(exc)
                if code is None and attempts < self.max_deliveries:
                    continue  # an unforeseen error: the entry gets max_deliveries tries
                entry = units[0][0]
                rule = f"sqlstate_{code}" if code is not None else "delivery_limit_exceeded"
                if code is not None:
                    result.isolated_sqlstates.append(code)
                letters = [self._dead_letter(entry, rejection("(event)", value_class(
                    entry.payload), rule), key)]
                prepared = []
                replaced = True
                continue
            self.frontier = outcome.frontier
            new_keys.clear()  # stored with the first part that committed
            appended.append(outcome)
            dead.extend(letters)
            return
        middle = len(units) // 2
        for part in (units[:middle], units[middle:]):
            await self._append_isolating(part, key, new_keys, appended, dead, result)

    @staticmethod
    def _entry_may_be_at_fault(exc: BaseException) -> bool:
        """Whether splitting the batch could isolate the cause: a data error of one row,
        or an error nobody planned for. Never dependency, configuration or integrity
        failures."""
        if isinstance(exc, AuditError | CryptoError) or classify(exc, "postgres") is not None:
            return False
        kind = postgres_error_kind(exc)
        return kind == "entry" if kind is not None else True

    async def acknowledge(self, batch: CommittedBatch) -> None:
        """Announce the batch's dead letters and XACK its entries (Redis only)."""
        await self.intake.publish_dead_letters(batch.dead_letters)
        await self.intake.ack(batch.entry_ids)

    async def process(self, entries: list[StreamEntry]) -> BatchResult:
        """Store one batch and acknowledge it. Raises on database or Redis failure, leaving
        every entry pending in the stream."""
        batch = await self.commit(entries)
        await self.acknowledge(batch)
        return batch.result

    async def sign_tree_head(self, *, force: bool = False) -> StoredTreeHead | None:
        """Sign the current tree if it grew since the last head (or always, with force).

        The tree is first caught up with rows other workers committed, so a worker never
        signs a smaller tree after a larger one was signed (e.g. a freshly started slot)."""
        frontier = await self.store.catch_up(self.frontier)
        if frontier.size == self._last_signed_size and not force:
            return None
        head = TreeHead(
            log_id=self.store.log_id,
            tree_size=frontier.size,
            root_hash=frontier.root(),
            timestamp_ms=int(time.time() * 1000),
        )
        # KMS signing is a blocking HTTP call; keep the event loop free for intake.
        signature = await asyncio.to_thread(self._sign_and_check, head)
        stored = StoredTreeHead(
            head.tree_size, head.root_hash, head.timestamp_ms, head.log_id, signature,
            self.signer.ref,
        )
        await self.store.insert_tree_head(stored, frontier)
        self._last_signed_size = frontier.size
        self.stats.tree_heads += 1
        return stored

    def _sign_and_check(self, head: TreeHead) -> bytes:
        """Sign, then verify the signature with the public key pinned at the first signing,
        before the head is stored: a signer that changed key or returns bad signatures
        raises `SignatureError` instead of putting an unverifiable head in the log."""
        if self._public_pem is None:
            self._public_pem = self.signer.public_key_pem()
        signature = self.signer.sign(head.signing_input())
        verify_tree_head(self._public_pem, head, signature)
        return signature

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
    DataKey,
    DataKeyManager,
    FieldCipher,
    TreeHead,
    TreeHeadSigner,
    verify_tree_head,
)
from audit_worker.db.store import DeadLetter, LogStore, StoredTreeHead
from audit_worker.events import AuditEvent, Rejection, parse_event
from audit_worker.intake import StreamEntry, StreamIntake
from audit_worker.merkle import CompactRange
from audit_worker.records import PreparedEvent, RecordBuilder

# What `Worker.triage` makes of a batch: the events to append, the dead letters, the key.
Triaged = tuple[list[PreparedEvent], list[DeadLetter], DataKey]

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
        self._public_pem: bytes | None = None

    def _dead_letter(self, entry: StreamEntry, rejection: Rejection, key: DataKey) -> DeadLetter:
        sealed = None
        if entry.payload is not None:
            sealed = self.cipher.encrypt(key, entry.payload, entry.entry_id.encode())
        return DeadLetter(
            rejection, entry.entry_id, entry.deliveries, sealed,
            key.key_id if sealed is not None else None,
        )

    def triage(self, entries: list[StreamEntry]) -> Triaged:
        """Parse and seal a batch: CPU only, no I/O."""
        key = self.data_keys.current()
        prepared: list[PreparedEvent] = []
        dead: list[DeadLetter] = []
        for entry in entries:
            outcome: AuditEvent | Rejection
            if entry.deliveries > self.max_deliveries:
                outcome = Rejection(
                    "(entry)", "stream-entry", "delivery_limit_exceeded",
                    f"delivered {entry.deliveries} times, the limit is {self.max_deliveries}",
                )
            elif entry.payload is None:
                outcome = Rejection(
                    "(entry)", "missing", "missing_event_field",
                    "stream entry has no 'event' field",
                )
            else:
                outcome = parse_event(entry.payload, max_future_skew=self.max_future_skew)
            if isinstance(outcome, Rejection):
                dead.append(self._dead_letter(entry, outcome, key))
            else:
                prepared.append(self.builder.prepare(outcome, key))
        self.data_keys.note_use(len(entries))
        return prepared, dead, key

    async def commit(
        self, entries: list[StreamEntry], triaged: Triaged | None = None
    ) -> CommittedBatch:
        """Validate, seal and append one batch in one transaction. Raises on database or key
        failure with nothing stored; may be called again with the same entries. `triaged`
        is `triage(entries)` when the caller already did it (while the previous batch was
        committing)."""
        result = BatchResult(read=len(entries))
        if not entries:
            return CommittedBatch([], [], result)
        prepared, dead, key = triaged if triaged is not None else self.triage(entries)
        new_keys = [] if key.key_id in self._persisted_keys else [key]
        appended = await self.store.append(self.frontier, prepared, dead, new_keys)
        self.frontier = appended.frontier
        self._persisted_keys.add(key.key_id)
        committed_ms = time.time() * 1000
        result.stored = len(appended.stored)
        result.duplicates = len(appended.duplicates)
        result.dead_lettered = len(dead)
        result.first_index = appended.stored[0].log_index if appended.stored else None
        result.latencies_ms = [committed_ms - e.added_ms for e in entries]
        result.stored_events = [(s.prepared.event_id, s.log_index) for s in appended.stored]
        result.duplicate_ids = list(appended.duplicates)
        result.dead_letter_rules = [d.rejection.rule for d in dead]
        self.stats.batches += 1
        self.stats.stored += result.stored
        self.stats.duplicates += result.duplicates
        self.stats.dead_lettered += result.dead_lettered
        announcements = [
            (d.stream_entry_id or "", d.rejection.field, d.rejection.rule,
             d.rejection.value_class) for d in dead
        ]
        return CommittedBatch([e.entry_id for e in entries], announcements, result)

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

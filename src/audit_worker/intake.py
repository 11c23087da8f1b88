"""Redis Streams intake: a consumer group read in batches, acknowledged only after commit.

Delivery is at least once: an entry stays pending until `ack`, a dead consumer's entries
are taken over with XAUTOCLAIM once idle, and an entry delivered more often than the limit
is handed back as such so the worker dead-letters it instead of looping on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

EVENT_FIELD = b"event"
# Entry ids of events drained from the HTTP intake's PostgreSQL spool (`audit_worker.db.
# spool`): never a Redis id (those are digits), so they are never XACKed.
SPOOL_ENTRY_PREFIX = "spool-"


@dataclass(frozen=True, slots=True)
class StreamEntry:
    entry_id: str
    payload: bytes | None  # None when the entry has no ``event`` field
    deliveries: int
    # Set for an event the HTTP intake spooled in PostgreSQL while Redis was down: its row
    # in audit.intake_spool, and when it was received.
    spool_id: int | None = None
    spooled_ms: int | None = None

    @property
    def added_ms(self) -> int:
        """When the producer's XADD happened (the first part of the entry id), or when a
        spooled event was received."""
        if self.spooled_ms is not None:
            return self.spooled_ms
        return int(self.entry_id.split("-", 1)[0])


def _entry(
    entry_id: bytes | str, fields: dict[bytes, bytes] | None, deliveries: int
) -> StreamEntry:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return StreamEntry(eid, (fields or {}).get(EVENT_FIELD), deliveries)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: tuple[int, int]) -> tuple[int, int]:
    return entry_id[0], entry_id[1] + 1


class StreamIntake:
    """One consumer of the worker group. The Redis client must not decode responses."""

    def __init__(
        self,
        redis: Redis,
        *,
        stream: str,
        group: str,
        consumer: str,
        dead_letter_stream: str,
        claim_idle_ms: int = 15_000,
        claim_every_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_letter_stream = dead_letter_stream
        self.claim_idle_ms = claim_idle_ms
        self._claim_every_s = claim_every_s
        self._next_claim = 0.0
        self._own_backlog = True  # first read our own pending entries (after a restart)

    async def ensure_group(self) -> None:
        """Create the group at the start of the stream, so nothing added earlier is missed."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _deliveries(self, ids: Sequence[str]) -> dict[str, int]:
        if not ids:
            return {}
        rows: Any = await self.redis.xpending_range(
            self.stream, self.group, min=ids[0], max=ids[-1], count=len(ids) * 2 + 10,
        )
        return {
            (r["message_id"].decode() if isinstance(r["message_id"], bytes) else r["message_id"]):
            int(r["times_delivered"])
            for r in rows
        }

    async def _read_own_backlog(self, count: int) -> list[StreamEntry]:
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: "0"}, count=count
        )
        raw = reply[0][1] if reply else []
        if not raw:
            self._own_backlog = False
            return []
        counts = await self._deliveries([_entry(i, f, 0).entry_id for i, f in raw])
        return [_entry(i, f, counts.get(_entry(i, f, 0).entry_id, 1)) for i, f in raw]

    async def _claim_idle(self, count: int) -> list[StreamEntry]:
        reply: Any = await self.redis.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms,
            start_id="0-0", count=count,
        )
        claimed = [(i, f) for i, f in reply[1] if f is not None]
        if not claimed:
            return []
        counts = await self._deliveries([_entry(i, f, 0).entry_id for i, f in claimed])
        return [_entry(i, f, counts.get(_entry(i, f, 0).entry_id, 1)) for i, f in claimed]

    async def read_batch(self, count: int, block_ms: int) -> list[StreamEntry]:
        """The next batch: our own unacknowledged entries first, then idle ones of dead
        consumers (every few seconds), then new entries, waiting up to `block_ms`."""
        if self._own_backlog:
            entries = await self._read_own_backlog(count)
            if entries:
                return entries
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + self._claim_every_s
            entries = await self._claim_idle(count)
            if entries:
                return entries
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        if not reply:
            return []
        return [_entry(i, f, 1) for i, f in reply[0][1]]

    def replay_own_backlog(self) -> None:
        """After a failed batch, re-read our pending entries before new ones."""
        self._own_backlog = True

    async def ack(self, entry_ids: Sequence[str]) -> int:
        ids = [i for i in entry_ids if not i.startswith(SPOOL_ENTRY_PREFIX)]
        if not ids:
            return 0
        return int(await self.redis.xack(self.stream, self.group, *ids))

    async def publish_dead_letters(self, reasons: Sequence[tuple[str, str, str, str]]) -> None:
        """Announce dead letters (entry id, field, rule, value class); never the payload."""
        if not reasons:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, field, rule, klass in reasons:
                pipe.xadd(
                    self.dead_letter_stream,
                    {"entry_id": entry_id, "field": field, "rule": rule, "value_class": klass},
                    maxlen=1_000_000, approximate=True,
                )
            await pipe.execute()

    async def trim(self, retention_ms: int, now_ms: int) -> int:
        """Drop entries that the group has acknowledged and that are older than the
        retention; entries still pending or not yet delivered are never trimmed.
        Returns how many were removed. Assumes this group is the stream's only reader."""
        groups = await self.redis.xinfo_groups(self.stream)
        ours = [g for g in groups if _text(g["name"]) == self.group]
        if not ours:
            return 0
        # Everything up to the last delivered entry and before the oldest pending one is
        # acknowledged; the first entry to keep is the smaller of the two bounds.
        keep_from = _next_id(_id(_text(ours[0]["last-delivered-id"])))
        summary = await self.redis.xpending(self.stream, self.group)
        if summary.get("pending"):
            keep_from = min(keep_from, _id(_text(summary["min"])))
        cutoff = min(keep_from, (now_ms - retention_ms, 0))
        if cutoff <= (0, 0):
            return 0
        minid = f"{cutoff[0]}-{cutoff[1]}"
        return int(await self.redis.xtrim(self.stream, minid=minid, approximate=False))

    async def backlog(self) -> tuple[int, int]:
        """(lag, pending): entries not yet delivered to the group, and delivered but unacked."""
        groups = await self.redis.xinfo_groups(self.stream)
        for group in groups:
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            if name == self.group:
                lag = group.get("lag")
                return (int(lag) if lag is not None else -1, int(group["pending"]))
        return (-1, 0)

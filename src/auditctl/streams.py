"""The intake streams as the workflows see them (Redis, on either platform): the consumer
group's backlog, the entries a site acknowledged, and the hand-off of a frozen site's
backlog to another site's stream during a planned switchover."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from audit_worker.events import AuditEvent, parse_event
from auditctl.platform import StreamStats

STREAM = "audit:events"
GROUP = "audit-workers"
LAG_CAP = 100_000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def stream_stats(redis: Redis, stream: str = STREAM, group: str = GROUP) -> StreamStats:
    """Length, pending and lag of the consumer group, lag counted from the group's
    last-delivered id (Redis 6.2 does not report it; capped at `LAG_CAP`)."""
    length = int(await redis.xlen(stream))
    if not length and not await redis.exists(stream):
        return StreamStats(0, 0, 0)
    for info in await redis.xinfo_groups(stream):
        if _text(info["name"]) != group:
            continue
        pending = int(info["pending"])
        if info.get("lag") is not None:
            return StreamStats(length, int(info["lag"]), pending)
        last = _text(info["last-delivered-id"])
        entries: Any = await redis.xrange(stream, min=f"({last}", max="+", count=LAG_CAP)
        return StreamStats(length, len(entries), pending, len(entries) >= LAG_CAP)
    return StreamStats(length, length, 0)


async def handoff(src: Redis, dst: Redis, stream: str = STREAM, group: str = GROUP) -> int:
    """Copy the entries of `src`'s stream that its consumer group never acknowledged
    (pending ones and those after the last-delivered id) to `dst`'s stream, and move the
    group past them so that a second hand-off does not copy them again."""
    if not await src.exists(stream):
        return 0
    last, has_group = "0-0", False
    for info in await src.xinfo_groups(stream):
        if _text(info["name"]) == group:
            last, has_group = _text(info["last-delivered-id"]), True
    ids: list[str] = []
    if has_group:
        pending: Any = await src.xpending_range(stream, group, min="-", max="+", count=100_000)
        ids = [_text(row["message_id"]) for row in pending]
    copied = 0
    for entry_id in ids:
        found: Any = await src.xrange(stream, min=entry_id, max=entry_id)
        for _, fields in found:
            await dst.xadd(stream, fields)
            copied += 1
    newest = last
    start = f"({last}"
    while True:
        batch: Any = await src.xrange(stream, min=start, max="+", count=1000)
        if not batch:
            break
        async with dst.pipeline(transaction=False) as pipe:
            for _, fields in batch:
                pipe.xadd(stream, fields)
            await pipe.execute()
        copied += len(batch)
        newest = _text(batch[-1][0])
        start = f"({newest}"
    if has_group and newest != last:
        await src.xgroup_setid(stream, group, newest)
    if ids:
        await src.xack(stream, group, *ids)
    return copied


async def acknowledged(redis: Redis, since: float, stream: str = STREAM) -> set[str]:
    """Event ids of the valid events the stream accepted since `since` (Unix seconds).

    Each entry is validated as the worker validates it, at the time the stream accepted it:
    an entry the worker dead-letters is not an audit event and is not counted."""
    out: set[str] = set()
    start = f"{int(since * 1000)}-0"
    while True:
        batch: Any = await redis.xrange(stream, min=start, max="+", count=5000)
        if not batch:
            return out
        for entry_id, fields in batch:
            raw = fields.get(b"event") if isinstance(fields, dict) else None
            if raw is None:
                continue
            added = datetime.fromtimestamp(int(_text(entry_id).split("-", 1)[0]) / 1000, UTC)
            outcome = parse_event(raw, now=added)
            if isinstance(outcome, AuditEvent):
                out.add(str(outcome.event_id))
        start = f"({_text(batch[-1][0])}"



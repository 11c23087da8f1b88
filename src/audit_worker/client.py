"""A small Python client for producers: validate an audit event, then XADD it to the stream.

    client = AuditClient.from_url("redis://localhost:6379/0")
    logged = await client.log(
        action="R", code="rest-read", outcome=0,
        agent={"who": "dr-jones", "role": "physician"},
        source={"observer": "ehr-web"},
        patient="MRN-123", entity=[{"type": "Observation", "id": "obs-9"}],
    )
    logged.event_id, logged.stream_id

`event_id` (a fresh UUID) and `occurred` (now, UTC) are filled in when not given. The
event is validated exactly as the worker validates it before anything is written, so a bad
event raises `EventRejected` (field, value class, rule) in the producer instead of ending
up in the dead-letter store. `log_many` writes a batch in one MULTI/EXEC: all or nothing.
Re-sending an event with the same `event_id` is safe: the log stores it once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from audit_worker.events import AuditEvent, Rejection, parse_event, rejection

DEFAULT_STREAM = "audit:events"


class EventRejected(ValueError):
    """The event is invalid; nothing was written. `rejection` says why (never the value)."""

    def __init__(self, rejection: Rejection, index: int = 0) -> None:
        super().__init__(f"event {index} rejected: {rejection.message} (rule {rejection.rule})")
        self.rejection = rejection
        self.index = index


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    event_id: uuid.UUID
    stream_id: str


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def prepare(
    event: Mapping[str, Any] | AuditEvent | None = None,
    *,
    max_future_skew: float = 300.0,
    **fields: Any,
) -> tuple[AuditEvent, bytes]:
    """Build, complete and validate one event; the bytes are what goes to the stream."""
    if isinstance(event, AuditEvent):
        data: dict[str, Any] = event.model_dump(mode="json", exclude_none=True)
    else:
        data = dict(event or {})
    data.update(fields)
    data.setdefault("event_id", str(uuid.uuid4()))
    data.setdefault("occurred", datetime.now(UTC).isoformat())
    try:
        raw = orjson.dumps(data, default=_json_default)
    except TypeError:
        raise EventRejected(rejection("(event)", "object", "not_serialisable")) from None
    outcome = parse_event(raw, max_future_skew=max_future_skew)
    if isinstance(outcome, Rejection):
        raise EventRejected(outcome)
    return outcome, raw


class AuditClient:
    """Writes validated events to the worker's Redis stream (asyncio)."""

    def __init__(
        self, redis: Redis, *, stream: str = DEFAULT_STREAM, max_future_skew: float = 300.0
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.max_future_skew = max_future_skew

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> AuditClient:
        return cls(Redis.from_url(url), **kwargs)

    async def log(
        self, event: Mapping[str, Any] | AuditEvent | None = None, **fields: Any
    ) -> LoggedEvent:
        """Validate one event (a mapping, an `AuditEvent`, or keyword fields) and XADD it."""
        parsed, raw = prepare(event, max_future_skew=self.max_future_skew, **fields)
        stream_id = await self.redis.xadd(self.stream, {"event": raw})
        return LoggedEvent(parsed.event_id, _text(stream_id))

    async def log_many(
        self, events: Iterable[Mapping[str, Any] | AuditEvent]
    ) -> list[LoggedEvent]:
        """Validate every event first, then XADD them all in one transaction."""
        prepared = []
        for index, event in enumerate(events):
            try:
                prepared.append(prepare(event, max_future_skew=self.max_future_skew))
            except EventRejected as exc:
                raise EventRejected(exc.rejection, index) from None
        if not prepared:
            return []
        async with self.redis.pipeline(transaction=True) as pipe:
            for _, raw in prepared:
                pipe.xadd(self.stream, {"event": raw})
            ids = await pipe.execute()
        return [
            LoggedEvent(parsed.event_id, _text(sid))
            for (parsed, _), sid in zip(prepared, ids, strict=True)
        ]

    async def aclose(self) -> None:
        await self.redis.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""AuditClient writes validated events to the stream; the worker stores them."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from audit_worker.client import AuditClient, EventRejected
from audit_worker.config import WorkerSettings
from tests.integration.service.conftest import count, eventually, running
from tests.support import make_event


async def test_log_and_log_many_reach_the_log(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    db = settings.database_url.get_secret_value()
    client = AuditClient(producer, stream=settings.stream)
    async with running(settings):
        logged = await client.log(
            action="R", code="rest-read", outcome=0,
            agent={"who": "clinician-7", "role": "physician"},
            source={"observer": "ehr-client-test"}, patient="MRN-TEST-000007",
        )
        assert logged.stream_id
        many = await client.log_many([make_event(i) for i in range(9)])
        assert len(many) == 9

        async def all_in() -> bool:
            return await count(db) == 10

        await eventually(all_in, what="10 stored")
        assert await count(
            db, f"SELECT count(*) FROM audit.events WHERE event_id = '{logged.event_id}'"
        ) == 1


async def test_invalid_events_are_refused_before_anything_is_written(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    client = AuditClient(producer, stream=settings.stream)
    with pytest.raises(EventRejected) as err:
        await client.log(make_event(1, outcome=3))
    assert err.value.rejection.field == "outcome"
    with pytest.raises(EventRejected) as err:
        await client.log_many([make_event(1), make_event(2, agent={})])
    assert err.value.index == 1
    assert await producer.xlen(settings.stream) == 0

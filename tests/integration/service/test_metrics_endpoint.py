"""GET /metrics after real traffic: the figures match what happened, and no PHI leaks."""

from __future__ import annotations

import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from audit_worker.config import WorkerSettings
from tests.integration.service.conftest import count, eventually, running
from tests.support import encode, make_event


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_reflect_stored_dead_lettered_and_replayed_events(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    db = settings.database_url.get_secret_value()
    good = [make_event(i) for i in range(40)]
    async with running(settings) as worker:
        async with producer.pipeline(transaction=False) as pipe:
            for event in good:
                pipe.xadd(settings.stream, {"event": encode(event)})
            pipe.xadd(settings.stream, {"event": encode(make_event(1, action="X"))})
            pipe.xadd(settings.stream, {"event": b"{not json"})
            pipe.xadd(settings.stream, {"event": encode(good[0])})  # a replay
            await pipe.execute()
        await eventually(lambda: count(db) , what="stored")
        await eventually(
            lambda: worker.service.metrics.events_received._value.get() >= 43, what="read"
        )
        await eventually(lambda: worker.service.metrics.tree_heads_signed._value.get() > 0)
        await worker.service.refresh_stats()
        reply = await worker.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.text
    values = samples(text)
    assert values[("audit_events_received_total", ())] == 43
    assert values[("audit_events_stored_total", ())] == 40
    assert values[("audit_events_duplicate_total", ())] == 1
    assert values[("audit_events_dead_lettered_total", (("reason", "not_allowed_value"),))] == 1
    assert values[("audit_events_dead_lettered_total", (("reason", "json_invalid"),))] == 1
    assert values[("audit_batch_size_sum", ())] == 43
    assert values[("audit_event_latency_seconds_count", ())] == 43
    assert values[("audit_stream_pending", ())] == 0
    assert values[("audit_tree_size", ())] == 40
    assert 0 <= values[("audit_tree_head_age_seconds", ())] < 30
    for dependency in ("postgres", "redis", "kms"):
        assert values[("audit_breaker_state", (("dependency", dependency),))] == 0
        assert values[("audit_retries_total", (("dependency", dependency),))] == 0
    assert values[("audit_integrity_failures_total", ())] == 0
    assert values[("audit_slot_active", ())] == 1
    assert ("process_resident_memory_bytes", ()) in values
    # nothing identifying, anywhere in the exposition
    for secret in ("MRN-TEST", "clinician-", "10.1.2.3", "synthetic chart", good[0]["event_id"]):
        assert secret not in text

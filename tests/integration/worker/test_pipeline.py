"""The pipeline against real PostgreSQL and Redis: stream in, verified log out."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from audit_worker.service import Assembly
from tests.support import drain, encode, make_event


async def _xadd(producer: aioredis.Redis, stream: str, payloads: list[bytes]) -> None:
    async with producer.pipeline(transaction=False) as pipe:
        for p in payloads:
            pipe.xadd(stream, {"event": p})
        await pipe.execute()


async def test_valid_events_are_stored_once_each_and_acknowledged(
    parts: Assembly, producer: aioredis.Redis
) -> None:
    stream = parts.worker.intake.stream
    await _xadd(producer, stream, [encode(make_event(i)) for i in range(300)])
    assert await drain(parts) == 300
    async with parts.pool.acquire() as conn:
        rows = await conn.fetch("SELECT log_index FROM audit.events ORDER BY log_index")
    assert [r["log_index"] for r in rows] == list(range(300))
    assert (await parts.worker.intake.backlog())[1] == 0  # nothing left pending


async def test_malformed_events_go_to_dead_letters_with_reason_and_worker_continues(
    parts: Assembly, producer: aioredis.Redis
) -> None:
    stream = parts.worker.intake.stream
    good = [encode(make_event(i)) for i in range(10)]
    bad = [
        b"{not json",
        encode(make_event(99, action="X")),
        encode(make_event(98, patient="a\x00b")),
    ]
    await _xadd(producer, stream, good[:5] + bad + good[5:])
    await producer.xadd(stream, {"other": b"x"})
    assert await drain(parts) == 10
    async with parts.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT field, value_class, rule, payload_sealed FROM audit.dead_letters ORDER BY id"
        )
    assert [(r["field"], r["rule"]) for r in rows] == [
        ("(event)", "json_invalid"),
        ("action", "not_allowed_value"),
        ("patient", "control_characters"),
        ("(entry)", "missing_event_field"),
    ]
    # the raw payload is kept, but only sealed: no plaintext PHI in the dead-letter table
    assert all(b"MRN-TEST" not in (r["payload_sealed"] or b"") for r in rows)
    announced = await producer.xrange(parts.worker.intake.dead_letter_stream)
    assert len(announced) == 4
    assert all(b"MRN" not in b"".join(f.values()) for _, f in announced)


async def test_replayed_event_id_is_never_stored_twice(
    parts: Assembly, producer: aioredis.Redis
) -> None:
    stream = parts.worker.intake.stream
    event = encode(make_event(1))
    await _xadd(producer, stream, [event, event])
    await drain(parts)
    await _xadd(producer, stream, [event])
    await drain(parts)
    async with parts.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit.events") == 1
    assert parts.worker.stats.duplicates == 2


async def test_entries_of_a_dead_consumer_are_claimed_and_stored(
    parts: Assembly, producer: aioredis.Redis
) -> None:
    intake = parts.worker.intake
    await _xadd(producer, intake.stream, [encode(make_event(i)) for i in range(20)])
    # another consumer reads them and dies without acknowledging
    await producer.xreadgroup(intake.group, "dead-consumer", {intake.stream: ">"}, count=100)
    intake.claim_idle_ms = 1
    await asyncio.sleep(0.01)  # idle for longer than claim_idle_ms, or XAUTOCLAIM skips them
    assert await drain(parts) == 20
    assert (await intake.backlog())[1] == 0


async def test_valid_entry_redelivered_past_the_limit_is_still_stored(
    parts: Assembly, producer: aioredis.Redis
) -> None:
    # Redeliveries come from crashes and outages, never from the entry: they do not count.
    intake = parts.worker.intake
    await _xadd(producer, intake.stream, [encode(make_event(1))])
    await producer.xreadgroup(intake.group, "flaky", {intake.stream: ">"}, count=10)
    for _ in range(parts.worker.max_deliveries + 2):
        await producer.xautoclaim(intake.stream, intake.group, "flaky", 0, "0-0")
    intake.claim_idle_ms = 1
    await asyncio.sleep(0.01)  # idle for longer than claim_idle_ms, or XAUTOCLAIM skips it
    await drain(parts)
    async with parts.pool.acquire() as conn:
        dead = await conn.fetchval("SELECT count(*) FROM audit.dead_letters")
        stored = await conn.fetchval("SELECT count(*) FROM audit.events")
    assert (dead, stored) == (0, 1)
    assert (await intake.backlog())[1] == 0


async def test_phi_is_pseudonymised_and_encrypted_at_rest(
    parts: Assembly, producer: aioredis.Redis
) -> None:
    await _xadd(producer, parts.worker.intake.stream, [encode(make_event(7))])
    await drain(parts)
    async with parts.pool.acquire() as conn:
        dump = await conn.fetchval(
            "SELECT string_agg(encode(leaf_data, 'escape'), '') FROM audit.events"
        )
    for secret in ("MRN-TEST-000007", "clinician-7", "10.0.0.7", "synthetic chart access", "obs-7"):
        assert secret not in dump
    assert '"entity_types":["Observation"]' in dump


async def test_worker_role_cannot_update_or_delete(parts: Assembly, fresh_database: str) -> None:
    async with parts.pool.acquire() as conn:
        await conn.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='audit_login_test')"
            " THEN CREATE ROLE audit_login_test LOGIN; END IF; END $$;"
            " GRANT audit_writer TO audit_login_test"
        )
    login = fresh_database.replace("postgres@", "audit_login_test@", 1)
    conn = await asyncpg.connect(login)
    try:
        await conn.execute("SET ROLE audit_writer")
        await conn.fetchval("SELECT count(*) FROM audit.events")
        for statement in (
            "UPDATE audit.events SET action = 'D'",
            "DELETE FROM audit.events",
            "UPDATE audit.tree_heads SET log_id = 'x'",
            "TRUNCATE audit.events",
        ):
            try:
                await conn.execute(statement)
            except asyncpg.InsufficientPrivilegeError:
                continue
            raise AssertionError(f"writer role was allowed: {statement}")
    finally:
        await conn.close()


async def test_trim_drops_only_acknowledged_entries_past_retention(
    parts: Assembly, producer: aioredis.Redis
) -> None:
    import time

    intake = parts.worker.intake
    await _xadd(producer, intake.stream, [encode(make_event(i)) for i in range(50)])
    assert await drain(parts) == 50
    await _xadd(producer, intake.stream, [encode(make_event(i)) for i in range(50, 60)])
    # read but not acknowledged: these must survive any trim
    await producer.xreadgroup(intake.group, "slow-consumer", {intake.stream: ">"}, count=5)
    now = int(time.time() * 1000)
    assert await intake.trim(retention_ms=3_600_000, now_ms=now) == 0  # all younger than 1 h
    assert await intake.trim(retention_ms=0, now_ms=now) == 50
    assert await producer.xlen(intake.stream) == 10
    assert (await intake.backlog())[1] == 5


async def test_an_entry_the_worker_fails_on_is_tried_alone_then_dead_lettered(
    parts: Assembly, producer: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug that fires for one event only: its batch is split, the others are stored, and
    # the event is tried alone max_deliveries times before it is set aside, sealed.
    store = parts.worker.store
    poison = make_event(13)
    tries: list[int] = []
    real_append = store.append

    async def append(frontier: Any, events: Any, *args: Any, **kwargs: Any) -> Any:
        if any(str(e.event_id) == poison["event_id"] for e in events):
            tries.append(len(events))
            raise KeyError("a bug")
        return await real_append(frontier, events, *args, **kwargs)

    monkeypatch.setattr(store, "append", append)
    events = [make_event(i) for i in range(20)]
    events[13] = poison
    await _xadd(producer, parts.worker.intake.stream, [encode(e) for e in events])
    assert await drain(parts) == 19
    async with parts.pool.acquire() as conn:
        rules = [r[0] for r in await conn.fetch("SELECT rule FROM audit.dead_letters")]
    assert rules == ["delivery_limit_exceeded"]
    assert tries.count(1) == parts.worker.max_deliveries  # alone, as often as the limit
    assert (await parts.worker.intake.backlog())[1] == 0

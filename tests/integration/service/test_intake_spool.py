"""POST /v1/events while Redis is down: the PostgreSQL spool, its drain, and its limits.

Real PostgreSQL and Redis; the outage tests stop this module's own servers.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from audit_worker.config import WorkerSettings
from audit_worker.db.spool import IntakeSpool, SpoolOpener, seal
from audit_worker.localenv import PostgresServer, RedisServer
from audit_worker.resilience import BreakerState
from audit_worker.slots import activate
from audit_worker.worker import Worker
from tests.integration.service.conftest import count, eventually, running
from tests.integration.service.test_intake_http import post
from tests.support import make_event, running_parts

MARKER = "SPOOLMARK7f3a"  # in `detail` and `agent.who`: must never appear in clear


def marked(n: int) -> dict[str, Any]:
    return make_event(
        n, detail=f"{MARKER} chart note {n}",
        agent={"who": f"{MARKER}-clinician-{n}", "role": "physician"},
    )


async def _rows(db: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _spool_depth(db: str) -> int:
    try:
        return await count(db, "SELECT count(*) FROM audit.intake_spool")
    except (OSError, asyncpg.PostgresError):
        return -1


def _sealed(worker: Worker, events: list[dict[str, Any]]) -> list[tuple[uuid.UUID, bytes]]:
    key = worker.data_keys.current()
    return [
        (uuid.UUID(e["event_id"]),
         seal(worker.cipher, key, uuid.UUID(e["event_id"]), orjson.dumps(e)))
        for e in events
    ]


async def test_redis_outage_spools_events_and_drains_them_once_in_order(
    own_settings: WorkerSettings, own_redis: RedisServer
) -> None:
    db = own_settings.database_url.get_secret_value()
    with capture_logs() as logs:
        async with running(own_settings) as worker:
            first = make_event(0)
            reply = await post(worker, first)
            assert reply.status_code == 202 and reply.json()["results"][0]["spooled"] is False
            await eventually(lambda: _stored(db, 1), what="first event stored")

            await asyncio.to_thread(own_redis.kill)
            try:
                # The breaker may still be closed: the XADD fails, then the spool takes it.
                single = marked(1)
                reply = await post(worker, single)
                assert reply.status_code == 202, reply.text
                result = reply.json()["results"][0]
                assert (result["status"], result["stream_id"], result["spooled"]) == (
                    "accepted", None, True)
                breaker = worker.service.breakers["redis"]
                await eventually(lambda: breaker.state is BreakerState.OPEN, 10, what="open")

                batch = [marked(i) for i in range(2, 102)]
                reply = await post(worker, batch)
                assert reply.status_code == 202, reply.text
                body = reply.json()
                assert (body["accepted"], body["written"]) == (100, True)
                assert all(r["spooled"] and r["stream_id"] is None for r in body["results"])

                partial = [marked(200), make_event(201, action="X"), marked(202)]
                reply = await post(worker, partial, mode="partial")
                assert reply.status_code == 207, reply.text
                assert [(r["status"], r.get("spooled")) for r in reply.json()["results"]] == [
                    ("accepted", True), ("rejected", None), ("accepted", True)]

                spooled = [e["event_id"] for e in (single, *batch, partial[0], partial[2])]
                rows = await _rows(
                    db, "SELECT event_id, payload_sealed FROM audit.intake_spool"
                    " ORDER BY spool_id")
                assert [str(r["event_id"]) for r in rows] == spooled
                for row in rows:  # sealed: neither free text nor identifiers in clear
                    sealed = bytes(row["payload_sealed"])
                    assert MARKER.encode() not in sealed and b"MRN-TEST" not in sealed
                    assert b"clinician" not in sealed
                await asyncio.sleep(0.5)  # while Redis is down, nothing is drained
                assert await count(db) == 1

                text = (await worker.get("/metrics")).text
                assert 'audit_intake_events_total{outcome="spooled"} 103.0' in text
                assert "audit_intake_spool_depth 103.0" in text
            finally:
                await asyncio.to_thread(own_redis.start)

            await eventually(lambda: _stored(db, 104), 30, what="spooled events stored")
            await eventually(lambda: _spool_empty(db), 10, what="spool empty")
            logged = await _rows(db, "SELECT event_id FROM audit.events ORDER BY log_index")
            assert [str(r["event_id"]) for r in logged] == [first["event_id"], *spooled]
            assert await count(db, "SELECT count(*) FROM audit.event_keys") == 104
            assert await count(db, "SELECT count(*) FROM audit.dead_letters") == 0

            await eventually(lambda: breaker.state is BreakerState.CLOSED, 10, what="closed")
            reply = await post(worker, make_event(300))
            assert reply.json()["results"][0]["spooled"] is False  # the stream again
            await eventually(lambda: _stored(db, 105), what="stream after the outage")
            await eventually(
                lambda: "audit_intake_spool_depth 0.0" in worker.service.metrics.render()[0]
                .decode(), 5, what="depth gauge back to 0",
            )
    assert MARKER not in repr(logs)
    assert any(e["event"].startswith("stream unreachable: the intake spools") for e in logs)
    assert any(e["event"] == "intake spool drained into the log" for e in logs)


async def _stored(db: str, n: int) -> bool:
    try:
        return await count(db) >= n
    except (OSError, asyncpg.PostgresError):
        return False


async def _spool_empty(db: str) -> bool:
    return await _spool_depth(db) == 0


async def test_redis_and_postgres_down_is_503(
    own_settings: WorkerSettings, own_redis: RedisServer, own_postgres: PostgresServer
) -> None:
    db = own_settings.database_url.get_secret_value()
    async with running(own_settings) as worker:
        await asyncio.to_thread(own_redis.kill)
        await asyncio.to_thread(own_postgres.stop, cleanup=False)
        try:
            event = marked(1)
            reply = await post(worker, event)
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"] == "stream_unavailable"
            assert "spool failed too" in reply.json()["message"]
            assert reply.headers["retry-after"] == "1"
            assert MARKER not in reply.text
        finally:
            await asyncio.to_thread(own_postgres.start)
            await asyncio.to_thread(own_redis.start)
        # nothing was written: the producer's retry is what stores it
        await eventually(lambda: _ready(worker), 30, what="ready again")
        assert await _spool_depth(db) == 0
        reply = await post(worker, event)
        assert reply.status_code == 202, reply.text
        await eventually(lambda: _stored(db, 1), 30, what="retried event stored")


async def _ready(worker: Any) -> bool:
    return bool((await worker.get("/readyz")).status_code == 200)


async def test_spool_rows_that_do_not_open_stay_in_the_spool_until_their_key_returns(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    # The sealed bytes are the only copy of an accepted event: a row that does not open is
    # never deleted nor dead-lettered; it is skipped, counted, and tried again later.
    db = settings.database_url.get_secret_value()
    quick = settings.model_copy(update={"configuration_recheck_seconds": 0.5})
    async with running(quick) as handle:
        worker = handle.service.worker
        assert worker is not None and handle.service.parts is not None
        good, moved, orphan = make_event(1), make_event(2), make_event(3)
        sealed = dict(_sealed(worker, [good, moved]))
        spool = IntakeSpool(handle.service.parts.pool)
        swapped = sealed[uuid.UUID(good["event_id"])]  # a ciphertext moved to another row
        await spool.insert(
            [(uuid.UUID(good["event_id"]), sealed[uuid.UUID(good["event_id"])]),
             (uuid.UUID(moved["event_id"]), swapped)], worker.data_keys.current(),
        )
        # A row sealed under a data key whose row is not in audit.data_keys (yet).
        lost_key = worker.data_keys.wrapper.generate_data_key(worker.data_keys.purpose)
        orphan_blob = worker.cipher.encrypt(
            lost_key, orjson.dumps(orphan), uuid.UUID(orphan["event_id"]).bytes
        )
        conn = await asyncpg.connect(db)
        try:
            await conn.execute(
                "INSERT INTO audit.intake_spool (event_id, payload_sealed, data_key_id)"
                " VALUES ($1, $2, $3)", uuid.UUID(orphan["event_id"]), orphan_blob,
                lost_key.key_id,
            )
        finally:
            await conn.close()
        with capture_logs() as logs:
            handle.service.note_spooled(3)
            await eventually(lambda: _stored(db, 1), what="good event stored")
            await eventually(
                lambda: handle.service.metrics.intake_spool_unopened._value.get() == 2, 10,
                what="two rows counted as unopened",
            )
        assert await count(db, "SELECT count(*) FROM audit.intake_spool") == 2
        assert await count(db, "SELECT count(*) FROM audit.dead_letters") == 0
        assert any(e.get("alert") == "audit_spool_unopened" for e in logs)
        assert handle.service.status.phase == "running"
        # the worker keeps consuming the stream meanwhile
        await producer.xadd(settings.stream, {"event": orjson.dumps(make_event(4))})
        await eventually(lambda: _stored(db, 2), what="stream event after the bad rows")
        # the key row comes back (restored from a backup): the orphan opens at the next look
        conn = await asyncpg.connect(db)
        try:
            await conn.execute(
                "INSERT INTO audit.data_keys (key_id, purpose, wrapped, wrapper_ref)"
                " VALUES ($1, 'phi', $2, $3)", lost_key.key_id, lost_key.wrapped,
                lost_key.wrapper_ref,
            )
        finally:
            await conn.close()
        await eventually(lambda: _stored(db, 3), 20, what="orphan stored once its key is back")
        logged = {str(r["event_id"]) for r in await _rows(db, "SELECT event_id FROM audit.events")}
        assert orphan["event_id"] in logged and moved["event_id"] not in logged
        assert await count(db, "SELECT count(*) FROM audit.intake_spool") == 1  # the moved one


async def test_a_standby_slot_does_not_drain_the_spool(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    db = settings.database_url.get_secret_value()
    await activate(producer, settings.control_key, "green")
    async with running(settings.model_copy(update={"slot": "blue"})) as handle:
        worker, parts = handle.service.worker, handle.service.parts
        assert worker is not None and parts is not None
        events = [make_event(i) for i in range(20)]
        await IntakeSpool(parts.pool).insert(_sealed(worker, events), worker.data_keys.current())
        handle.service.note_spooled(len(events))
        await asyncio.sleep(1.5)  # longer than the spool poll
        assert await _spool_depth(db) == 20 and await count(db) == 0
        await activate(producer, settings.control_key, "blue")
        await eventually(lambda: _stored(db, 20), 10, what="drained once active")
        assert await _spool_depth(db) == 0


async def test_two_drainers_racing_store_each_spooled_event_once(
    settings: WorkerSettings,
) -> None:
    db = settings.database_url.get_secret_value()
    other = settings.model_copy(update={"consumer_name": "test-worker-2"})
    async with running_parts(settings) as a, running_parts(other) as b:
        events = [make_event(i) for i in range(600)]
        key = a.worker.data_keys.current()
        spool = IntakeSpool(a.pool)
        await spool.insert(_sealed(a.worker, events), key)
        # b never saw a's data key: it unwraps it from audit.data_keys
        openers = {
            id(p): SpoolOpener(p.worker.cipher, p.worker.data_keys.wrapper) for p in (a, b)
        }

        # The worst case: both read the same rows before either commits.
        rows = await spool.fetch(100)
        opened = [await openers[id(p)].entries(rows) for p in (a, b)]
        first = await asyncio.gather(
            *(p.worker.commit(entries) for p, entries in zip((a, b), opened, strict=True))
        )
        assert sum(c.result.stored for c in first) == 100
        assert sum(c.result.duplicates for c in first) == 100
        assert all(c.entry_ids == [] for c in first)  # nothing to XACK for spooled entries
        for committed in first:
            await a.worker.acknowledge(committed)
        assert await a.worker.intake.ack(["spool-1", "spool-2"]) == 0

        async def drain(parts: Any) -> int:
            stored = 0
            while rows := await spool.fetch(50):
                committed = await parts.worker.commit(await openers[id(parts)].entries(rows))
                stored += committed.result.stored
            return stored

        rest = await asyncio.gather(drain(a), drain(b))
        assert sum(rest) == 500
    assert await _spool_depth(db) == 0
    logged = await _rows(db, "SELECT log_index, event_id FROM audit.events ORDER BY log_index")
    assert [r["log_index"] for r in logged] == list(range(600))
    assert sorted(str(r["event_id"]) for r in logged) == sorted(e["event_id"] for e in events)
    # each drainer appends its batch in spool order
    order = {e["event_id"]: n for n, e in enumerate(events)}
    positions = [order[str(r["event_id"])] for r in logged]
    assert positions[:100] == list(range(100))

"""Blue-green slot gating with two in-process workers on one stream and one log.

The control key is switched back and forth under a steady load: consumption moves within
1 s, and the log ends up with every event exactly once and verifies.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis

from audit_worker.config import WorkerSettings
from audit_worker.localenv.workload import synthetic_event
from audit_worker.slots import activate, read_control
from audit_worker.verify import verify_log
from audit_worker.worker import BatchResult
from tests.integration.service.conftest import count, eventually, running

SWITCHES = 6


@dataclass
class Load:
    ids: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def steady(redis: aioredis.Redis, stream: str, load: Load, rate: float = 400) -> None:
    n = 0
    tick = 0.025
    while not load.stop.is_set():
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(int(rate * tick)):
                event = synthetic_event(n)
                load.ids.append(event["event_id"])
                pipe.xadd(stream, {"event": json.dumps(event).encode()})
                n += 1
            await pipe.execute()
        await asyncio.sleep(tick)


async def test_switching_slots_moves_consumption_within_a_second_without_loss(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    db = settings.database_url.get_secret_value()
    batches: list[tuple[float, str, int]] = []

    def recorder(slot: str):  # type: ignore[no-untyped-def]
        def on_batch(result: BatchResult) -> None:
            batches.append((time.perf_counter(), slot, result.read))
        return on_batch

    common = {"slot_poll_seconds": 0.1}  # the default poll interval of an idle slot
    blue = settings.model_copy(update={**common, "slot": "blue", "consumer_name": "w-blue"})
    green = settings.model_copy(update={**common, "slot": "green", "consumer_name": "w-green"})
    await activate(producer, settings.control_key, "blue")
    load = Load()
    latencies: list[float] = []
    async with (
        running(blue, on_batch=recorder("blue")) as b,
        running(green, on_batch=recorder("green")) as g,
    ):
        assert b.service.status.decision and b.service.status.decision.active
        ready = (await g.get("/readyz")).json()
        assert ready["ready"] is True and ready["slot"]["active"] is False  # ready but idle
        producing = asyncio.create_task(steady(producer, settings.stream, load))
        await asyncio.sleep(0.8)
        active = "blue"
        for _ in range(SWITCHES):
            target = "green" if active == "blue" else "blue"
            switched_at = time.perf_counter()
            epoch = await activate(producer, settings.control_key, target)
            await eventually(
                lambda t=target, s=switched_at: any(
                    ts > s and slot == t for ts, slot, _ in batches
                ),
                5, 0.005, f"{target} consuming",
            )
            first = min(ts for ts, slot, _ in batches if ts > switched_at and slot == target)
            latencies.append(first - switched_at)
            await asyncio.sleep(0.9)
            # the old slot stopped: nothing from it in the last part of the interval
            late = [ts for ts, slot, _ in batches if slot == active and ts > switched_at + 0.5]
            assert not late, f"{active} still consumed {len(late)} batch(es) after the switch"
            assert (await read_control(producer, settings.control_key)).epoch == epoch  # type: ignore[union-attr]
            active = target
        load.stop.set()
        await producing
        await eventually(lambda: _all_stored(db, len(load.ids)), 30, 0.05, "drained")
        assert b.service.status.decision.highest_epoch == SWITCHES + 1  # type: ignore[union-attr]
    conn = await asyncpg.connect(db)
    try:
        stored = [str(r[0]) for r in await conn.fetch("SELECT event_id FROM audit.events")]
        indices = [r[0] for r in await conn.fetch(
            "SELECT log_index FROM audit.events ORDER BY log_index")]
        pem = (settings.local_key_dir / "signing.pem").read_bytes()
        from audit_worker.crypto import LocalSigner

        report = await verify_log(
            conn, LocalSigner(settings.local_key_dir / "signing.pem").public_key_pem(),
            log_id=settings.log_id,
        )
        assert pem
    finally:
        await conn.close()
    assert len(stored) == len(set(stored)) == len(load.ids), "lost or duplicated events"
    assert set(stored) == set(load.ids)
    assert indices == list(range(len(indices)))
    assert report.ok, report.findings
    assert {slot for _, slot, _ in batches} == {"blue", "green"}
    assert max(latencies) < 1.0, latencies
    print(
        f"\nslot switch: {SWITCHES} switches, {len(load.ids)} events, latency to first batch "
        f"of the new slot: median {statistics.median(latencies) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms"
    )


async def _all_stored(db: str, n: int) -> bool:
    return await count(db) >= n


async def test_a_stale_epoch_does_not_wake_a_slot_up(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    db = settings.database_url.get_secret_value()
    blue = settings.model_copy(update={"slot": "blue"})
    await activate(producer, settings.control_key, "blue", min_epoch=5)
    async with running(blue) as worker:
        await activate(producer, settings.control_key, "green")  # epoch 6
        await eventually(lambda: not worker.service.status.decision.active, what="standby")  # type: ignore[union-attr]
        # a stale value, e.g. from a Redis restored from an old snapshot
        await producer.set(settings.control_key, json.dumps({"slot": "blue", "epoch": 5}))
        await eventually(
            lambda: worker.service.status.decision.reason == "stale_epoch",  # type: ignore[union-attr]
            what="stale epoch seen",
        )
        await producer.xadd(settings.stream, {"event": json.dumps(synthetic_event(1)).encode()})
        await asyncio.sleep(0.5)
        assert await count(db) == 0, "a stale slot consumed"
        ready = (await worker.get("/readyz")).json()
        assert ready["slot"]["state"] == "stale_epoch" and "older than epoch 6" in ready[
            "slot"]["detail"]
        assert (await worker.get("/metrics")).text.count("audit_slot_active 0.0") == 1
        # the stale value would make the next switch reuse epoch 6, which named green:
        # the worker refuses that too, until a switch jumps past every epoch it has seen
        assert await activate(producer, settings.control_key, "blue") == 6
        await eventually(
            lambda: worker.service.status.decision.reason == "epoch_conflict",  # type: ignore[union-attr]
            what="conflict seen",
        )
        assert await activate(producer, settings.control_key, "blue", min_epoch=7) == 7
        await eventually(lambda: _all_stored(db, 1), what="resumed")


async def test_no_control_key_means_no_consumption_unless_bootstrapped(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    db = settings.database_url.get_secret_value()
    await producer.xadd(settings.stream, {"event": json.dumps(synthetic_event(1)).encode()})
    async with running(settings.model_copy(update={"slot": "green"})) as worker:
        await asyncio.sleep(0.4)
        assert worker.service.status.decision.reason == "no_control_key"  # type: ignore[union-attr]
        assert await count(db) == 0
    boot = settings.model_copy(
        update={"slot": "green", "slot_bootstrap": True, "consumer_name": str(uuid.uuid4())}
    )
    async with running(boot):
        await eventually(lambda: _all_stored(db, 1), what="bootstrapped slot consumed")
    value = await read_control(producer, settings.control_key)
    assert value is not None and (value.slot, value.epoch) == ("green", 1)

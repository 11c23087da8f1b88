"""Exactly-once is enforced by the database: one event id, one log index, one log id."""

from __future__ import annotations

import asyncio
import uuid
import zlib

import asyncpg
import pytest
import redis.asyncio as aioredis

from audit_worker.config import WorkerSettings
from audit_worker.db.store import LogStore, sequencer_lock_key
from audit_worker.errors import ConfigurationError, SequenceError
from audit_worker.service import Assembly
from audit_worker.verify import verify_log
from tests.support import drain, encode, make_event, running_parts


async def _xadd(producer: aioredis.Redis, stream: str, events: list[dict[str, object]]) -> None:
    async with producer.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.xadd(stream, {"event": encode(event)})
        await pipe.execute()


async def _race(a: Assembly, b: Assembly, batches: tuple[int, int]) -> list[int]:
    async def work(parts: Assembly, batch: int) -> int:
        return await drain(parts, batch=batch, idle_rounds=3)

    return list(await asyncio.gather(work(a, batches[0]), work(b, batches[1])))


async def _log_shape(conn: asyncpg.Connection) -> tuple[int, int, int, int]:
    row = await conn.fetchrow(
        "SELECT count(*), count(DISTINCT event_id), count(DISTINCT log_index),"
        " coalesce(max(log_index), -1) + 1 FROM audit.events"
    )
    return (row[0], row[1], row[2], row[3])


async def test_two_workers_with_different_settings_race_to_one_exactly_once_log(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    other = settings.model_copy(
        update={"consumer_name": "w2", "batch_size": 7, "max_deliveries": 2}
    )
    events = [make_event(i) for i in range(1500)]
    async with running_parts(settings) as a, running_parts(other) as b:
        # every event twice, and a third time later: replays must never get a second index
        await _xadd(producer, settings.stream, events + events)
        first = await _race(a, b, (250, 7))
        await _xadd(producer, settings.stream, events[::3])
        second = await _race(a, b, (250, 7))
        await a.worker.sign_tree_head()
        async with a.pool.acquire() as conn:
            shape = await _log_shape(conn)
            keys = await conn.fetchval("SELECT count(*) FROM audit.event_keys")
            report = await verify_log(
                conn, a.worker.signer.public_key_pem(), log_id=a.worker.store.log_id
            )
    assert sum(first) + sum(second) == 1500
    assert min(first) > 0, f"both workers should have appended, got {first}"
    assert shape == (1500, 1500, 1500, 1500) and keys == 1500
    assert report.ok, report.findings


async def test_sequencer_is_correct_when_the_database_defaults_to_repeatable_read(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    # REPEATABLE READ would snapshot before the advisory lock is granted and miss the rows
    # the previous holder committed; the sequencer sets READ COMMITTED itself.
    db = settings.database_url.get_secret_value()
    conn = await asyncpg.connect(db)
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(
            f'ALTER DATABASE "{name}" SET default_transaction_isolation = \'repeatable read\''
        )
    finally:
        await conn.close()
    other = settings.model_copy(update={"consumer_name": "w2"})
    async with running_parts(settings) as a, running_parts(other) as b:
        await _xadd(producer, settings.stream, [make_event(i) for i in range(2000)])
        counts = await _race(a, b, (50, 50))
        async with a.pool.acquire() as c:
            assert await c.fetchval("SHOW default_transaction_isolation") == "repeatable read"
            shape = await _log_shape(c)
    assert min(counts) > 0 and shape == (2000, 2000, 2000, 2000)


async def test_the_key_table_refuses_a_second_row_for_an_event_id_or_index(
    parts: Assembly, producer: aioredis.Redis
) -> None:
    await _xadd(producer, parts.worker.intake.stream, [make_event(1), make_event(2)])
    await drain(parts)
    async with parts.pool.acquire() as conn:
        event_id = await conn.fetchval("SELECT event_id FROM audit.events WHERE log_index = 0")
        with pytest.raises(asyncpg.UniqueViolationError, match="event_keys_pkey"):
            await conn.execute(
                "INSERT INTO audit.event_keys (event_id, log_index) VALUES ($1, 99)", event_id
            )
        with pytest.raises(asyncpg.UniqueViolationError, match="event_keys_log_index_key"):
            await conn.execute(
                "INSERT INTO audit.event_keys (event_id, log_index) VALUES ($1, 1)", uuid.uuid4()
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("DELETE FROM audit.event_keys")


async def test_an_index_taken_outside_the_sequencer_halts_instead_of_dead_lettering(
    parts: Assembly, producer: aioredis.Redis
) -> None:
    # An insider claims the next index in the key table: the sequencer's row is refused.
    # That is the log's bookkeeping failing, not the entries' fault: no dead letters.
    async with parts.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO audit.event_keys (event_id, log_index) VALUES ($1, 0)", uuid.uuid4()
        )
    await _xadd(producer, parts.worker.intake.stream, [make_event(1)])
    entries = await parts.worker.intake.read_batch(10, 50)
    with pytest.raises(SequenceError, match="event_keys_log_index_key"):
        await parts.worker.commit(entries)
    async with parts.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit.dead_letters") == 0


async def test_a_worker_configured_with_another_log_id_refuses_to_start(
    settings: WorkerSettings,
) -> None:
    async with running_parts(settings):
        pass  # pins the database to settings.log_id
    other = settings.model_copy(update={"log_id": "another-log"})
    with pytest.raises(ConfigurationError) as caught:
        async with running_parts(other):
            pass
    message = str(caught.value)
    assert repr(settings.log_id) in message and "'another-log'" in message
    assert "AUDIT_LOG_ID" in message


async def test_the_sequencer_lock_is_the_databases_not_a_settings_choice(
    parts: Assembly, settings: WorkerSettings
) -> None:
    ours = LogStore(parts.pool, settings.log_id)
    # The key releases before 0002 took, spelled out: old and new workers must queue on
    # one lock during the release that brings the pin.
    legacy = zlib.crc32(f"audit-kit/sequencer/{settings.log_id}".encode())
    assert await ours.lock_key() == sequencer_lock_key(settings.log_id) == legacy
    stranger = LogStore(parts.pool, "another-log")
    with pytest.raises(ConfigurationError, match="this database holds the log"):
        await stranger.lock_key()
    with pytest.raises(ConfigurationError):
        await stranger.append(parts.worker.frontier, [])


async def test_replay_of_an_event_id_with_another_body_is_a_counted_conflict(
    parts: Assembly, producer: aioredis.Redis
) -> None:
    original = make_event(5)
    changed = {**original, "detail": "a different body MARKER-CONFLICT"}
    await _xadd(producer, parts.worker.intake.stream, [original])
    await drain(parts)
    await _xadd(producer, parts.worker.intake.stream, [changed, original])
    entries = await parts.worker.intake.read_batch(10, 50)
    batch = await parts.worker.commit(entries)
    assert batch.result.stored == 0
    assert batch.result.conflict_ids == [uuid.UUID(original["event_id"])]  # type: ignore[arg-type]
    assert batch.result.duplicate_ids == [uuid.UUID(original["event_id"])]  # type: ignore[arg-type]
    assert parts.worker.stats.conflicts == 1
    async with parts.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit.events") == 1


async def test_a_replay_of_an_event_an_old_release_stored_without_a_key_row_is_skipped(
    parts: Assembly, producer: aioredis.Redis
) -> None:
    event = make_event(3)
    await _xadd(producer, parts.worker.intake.stream, [event])
    await drain(parts)
    async with parts.pool.acquire() as conn:
        # What a worker of the release before 0002 leaves: the row, no key row.
        await conn.execute("ALTER TABLE audit.event_keys DISABLE TRIGGER event_keys_append_only")
        await conn.execute("DELETE FROM audit.event_keys")
        await conn.execute("ALTER TABLE audit.event_keys ENABLE TRIGGER event_keys_append_only")
    await _xadd(producer, parts.worker.intake.stream, [event])
    assert await drain(parts) == 0
    assert parts.worker.stats.duplicates == 1


@pytest.mark.parametrize(
    "table", ["log_identity", "event_keys", "dead_letter_replays", "tree_heads", "dead_letters"]
)
async def test_the_owner_cannot_truncate_the_logs_evidence_or_identity(
    parts: Assembly, table: str
) -> None:
    # Row triggers never see TRUNCATE; a statement trigger refuses it (even for the owner).
    async with parts.pool.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="TRUNCATE refused"):
            await conn.execute(f"TRUNCATE audit.{table} CASCADE")
        assert await conn.fetchval("SELECT count(*) FROM audit.log_identity") == 1


async def test_a_rewritten_pin_does_not_let_another_log_id_in(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    async with running_parts(settings) as parts:
        await _xadd(producer, parts.worker.intake.stream, [make_event(1)])
        await drain(parts)
        await parts.worker.sign_tree_head()
        async with parts.pool.acquire() as conn:
            # An insider with the owner's rights disables the guard and rewrites the pin.
            await conn.execute("ALTER TABLE audit.log_identity DISABLE TRIGGER USER")
            await conn.execute("UPDATE audit.log_identity SET log_id = 'another-log'")
            await conn.execute("ALTER TABLE audit.log_identity ENABLE TRIGGER USER")
    other = settings.model_copy(update={"log_id": "another-log"})
    with pytest.raises(ConfigurationError, match="holds tree heads of the log"):
        async with running_parts(other):
            pass

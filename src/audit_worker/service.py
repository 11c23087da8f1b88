"""Assemble a worker from settings and run it until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from audit_worker.config import WorkerSettings
from audit_worker.crypto import DataKeyManager, FieldCipher, KeyWrapper, Pseudonymiser
from audit_worker.db.migrate import require_current
from audit_worker.db.store import LogStore
from audit_worker.intake import StreamIntake
from audit_worker.keyring import build_keys
from audit_worker.records import RecordBuilder
from audit_worker.worker import BatchResult, Worker

log = logging.getLogger("audit_worker")
HMAC_PURPOSE = "hmac"


async def open_pool(database_url: str, *, size: int = 4) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=size)
    assert pool is not None
    return pool


async def load_hmac_key(store: LogStore, wrapper: KeyWrapper) -> bytes:
    """The log's pseudonymisation key: created once, then the same for every worker."""
    wrapped = await store.load_or_create_key(HMAC_PURPOSE, None)
    if wrapped is None:
        fresh = await asyncio.to_thread(wrapper.generate_data_key, HMAC_PURPOSE)
        wrapped = await store.load_or_create_key(HMAC_PURPOSE, fresh)
        assert wrapped is not None
    return await asyncio.to_thread(wrapper.unwrap, wrapped, HMAC_PURPOSE)


@dataclass
class Assembly:
    worker: Worker
    pool: asyncpg.Pool
    redis: Redis


@contextlib.asynccontextmanager
async def assemble(settings: WorkerSettings, *, create_keys: bool = False) -> AsyncIterator[Assembly]:
    """Connect, check the schema, load keys and the log's compact range."""
    pool = await open_pool(settings.database_url.get_secret_value())
    redis = Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=False)
    try:
        async with pool.acquire() as conn:
            await require_current(conn)
            await conn.execute("SELECT audit.ensure_partitions(2)")
        store = LogStore(pool, settings.log_id)
        wrapper, signer = build_keys(settings, create=create_keys)
        pseudonymiser = Pseudonymiser(await load_hmac_key(store, wrapper))
        cipher = FieldCipher()
        intake = StreamIntake(
            redis,
            stream=settings.stream,
            group=settings.consumer_group,
            consumer=settings.consumer_name,
            dead_letter_stream=settings.dead_letter_stream,
            claim_idle_ms=settings.claim_idle_ms,
        )
        await intake.ensure_group()
        worker = Worker(
            store=store,
            intake=intake,
            builder=RecordBuilder(pseudonymiser, cipher),
            cipher=cipher,
            data_keys=DataKeyManager(
                wrapper, rotate_after_seconds=settings.data_key_rotate_seconds
            ),
            signer=signer,
            frontier=await store.load_frontier(),
            max_deliveries=settings.max_deliveries,
            max_future_skew=settings.max_future_skew_seconds,
        )
        yield Assembly(worker, pool, redis)
    finally:
        await redis.aclose()
        await pool.close()


async def _sign_periodically(worker: Worker, interval: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
        try:
            await worker.sign_tree_head()
        except Exception:  # the next tick retries; the failure is logged, never the data
            log.exception("signing the tree head failed")


async def run(
    settings: WorkerSettings,
    stop: asyncio.Event | None = None,
    *,
    create_keys: bool = False,
    install_signal_handlers: bool = True,
    on_batch: Callable[[BatchResult], None] | None = None,
) -> Worker:
    """Consume until `stop` is set or SIGTERM arrives; then finish the batch in hand,
    acknowledge it and sign a final tree head."""
    stop = stop or asyncio.Event()
    if install_signal_handlers:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    async with assemble(settings, create_keys=create_keys) as parts:
        worker = parts.worker
        signer = asyncio.create_task(
            _sign_periodically(worker, settings.sign_interval_seconds, stop)
        )
        backoff = 0.1
        try:
            while not stop.is_set():
                try:
                    entries = await worker.intake.read_batch(settings.batch_size, settings.block_ms)
                    result = await worker.process(entries)
                    if on_batch is not None and result.read:
                        on_batch(result)
                    backoff = 0.1
                except (OSError, asyncpg.PostgresError, RedisError) as exc:
                    # Entries stay pending; re-read them once the dependency is back.
                    log.warning("batch failed, retrying in %.1fs: %s", backoff, type(exc).__name__)
                    worker.intake.replay_own_backlog()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            stop.set()
            await signer
            await asyncio.wait_for(worker.sign_tree_head(), settings.shutdown_grace_seconds)
    return worker

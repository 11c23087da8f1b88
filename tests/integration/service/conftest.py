"""A whole worker service (consumer, signer, gauges, HTTP app) on real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from audit_worker.config import WorkerSettings
from audit_worker.localenv import PostgresServer, RedisServer, create_database
from audit_worker.service import Service
from tests.support import migrate_url, worker_settings

TOKEN = "test-intake-token-0123456789"
FAST = {
    "block_ms": 50,
    "sign_interval_seconds": 0.2,
    "stats_interval_seconds": 0.2,
    "retry_initial_seconds": 0.05,
    "retry_max_seconds": 0.5,
    "breaker_reset_seconds": 0.5,
    "slot_poll_seconds": 0.05,
    "shutdown_grace_seconds": 10.0,
    "intake_tokens": [TOKEN],
    "intake_port": 0,  # any free port: 8081 may be taken, and tests may run side by side
}


def service_settings(db: str, redis_url: str, key_dir: Path, **extra: Any) -> WorkerSettings:
    return worker_settings(db, redis_url, key_dir, **{**FAST, **extra})


async def eventually(
    predicate: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str = "condition",
) -> float:
    """Wait until `predicate` is true; return how long it took."""
    started = time.perf_counter()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)


class Running:
    """A Service running in a task, with an HTTP client on its app."""

    def __init__(self, service: Service, task: asyncio.Task[Any]) -> None:
        self.service = service
        self.task = task
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=service.app), base_url="http://worker"
        )

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(path)

    async def stop(self) -> BaseException | None:
        self.service.stop_event.set()
        done = await asyncio.wait_for(asyncio.gather(self.task, return_exceptions=True), 60)
        await self.http.aclose()
        result = done[0]
        return result if isinstance(result, BaseException) else None


@contextlib.asynccontextmanager
async def running(
    settings: WorkerSettings, *, wait: bool = True, **kwargs: Any
) -> AsyncIterator[Running]:
    service = Service(settings, create_keys=True, **kwargs)
    task = asyncio.create_task(service.run(install_signal_handlers=False))
    handle = Running(service, task)
    try:
        if wait:
            await eventually(
                lambda: service.status.phase != "starting" or task.done(), 30, what="start"
            )
            if task.done():
                task.result()
        yield handle
    finally:
        if not task.done() or not handle.http.is_closed:
            await handle.stop()


async def count(db: str, sql: str = "SELECT count(*) FROM audit.events") -> int:
    conn = await asyncpg.connect(db)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


@pytest.fixture
async def settings(fresh_database: str, fresh_redis: str, tmp_path: Path) -> WorkerSettings:
    await migrate_url(fresh_database)
    return service_settings(fresh_database, fresh_redis, tmp_path / "keys")


@pytest.fixture
async def producer(fresh_redis: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(fresh_redis)
    yield client
    await client.aclose()


# ---- servers of our own, for tests that stop, kill and restart them


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    with PostgresServer(fast=True) as server:
        yield server


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def own_settings(
    own_postgres: PostgresServer, own_redis: RedisServer, tmp_path: Path
) -> WorkerSettings:
    """Settings on servers this module may stop; both are (re)started and clean here."""
    if not own_postgres.is_running():
        own_postgres.start()
    if not own_redis.is_running():
        own_redis.start()
    client = aioredis.Redis.from_url(own_redis.url)
    await client.flushall()
    await client.aclose()
    db = await asyncio.to_thread(
        create_database, own_postgres.url, f"svc_{time.monotonic_ns()}"
    )
    await migrate_url(db)
    return service_settings(db, own_redis.url, tmp_path / "keys")

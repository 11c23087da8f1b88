from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from audit_worker.config import WorkerSettings
from audit_worker.service import Assembly
from tests.support import migrate_url, running_parts, worker_settings


@pytest.fixture
async def settings(fresh_database: str, fresh_redis: str, tmp_path: Path) -> WorkerSettings:
    await migrate_url(fresh_database)
    return worker_settings(fresh_database, fresh_redis, tmp_path / "keys")


@pytest.fixture
async def parts(settings: WorkerSettings) -> AsyncIterator[Assembly]:
    async with running_parts(settings) as assembled:
        yield assembled


@pytest.fixture
async def producer(fresh_redis: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(fresh_redis)
    yield client
    await client.aclose()

"""Helpers shared by tests: synthetic events (no real PHI) and a worker wired to real servers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from audit_worker.config import WorkerSettings
from audit_worker.db.migrate import migrate
from audit_worker.localenv.workload import synthetic_event
from audit_worker.service import Assembly, assemble


def make_event(n: int = 0, **overrides: Any) -> dict[str, Any]:
    """A synthetic audit event (obviously fake identifiers), with fields overridden."""
    return {**synthetic_event(n), **overrides}


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def worker_settings(
    database_url: str, redis_url: str, key_dir: Path, **extra: Any
) -> WorkerSettings:
    return WorkerSettings(
        database_url=database_url,  # type: ignore[arg-type]
        redis_url=redis_url,  # type: ignore[arg-type]
        local_key_dir=key_dir,
        consumer_name=extra.pop("consumer_name", "test-worker"),
        block_ms=extra.pop("block_ms", 50),
        **extra,
    )


async def migrate_url(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


@asynccontextmanager
async def running_parts(settings: WorkerSettings) -> AsyncIterator[Assembly]:
    async with assemble(settings, create_keys=True) as parts:
        yield parts


async def drain(parts: Assembly, *, batch: int = 500, idle_rounds: int = 2) -> int:
    """Process until the stream gives nothing `idle_rounds` times in a row."""
    stored = 0
    idle = 0
    while idle < idle_rounds:
        entries = await parts.worker.intake.read_batch(batch, 20)
        if not entries:
            idle += 1
            continue
        idle = 0
        result = await parts.worker.process(entries)
        stored += result.stored
    return stored


def locked_bucket(client: Any) -> str:
    """A new S3 bucket with Object Lock in COMPLIANCE mode for six years, as infra/archive.py
    declares it (moto enforces the retention and conditional PUTs)."""
    import uuid

    bucket = f"archive-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    client.put_object_lock_configuration(
        Bucket=bucket,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Years": 6}},
        },
    )
    return bucket

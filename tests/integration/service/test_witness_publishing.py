"""The worker publishes signed checkpoints outside the database, and shows a database that
holds less than its witness."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import boto3
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from audit_worker.config import WorkerSettings
from audit_worker.crypto import LocalSigner, TrustedKeys
from audit_worker.crypto.checkpoint import open_note
from audit_worker.localenv import MotoServer
from audit_worker.objectstore import DirectoryStore, S3Store
from audit_worker.witness import WitnessLog
from tests.integration.service.conftest import count, eventually, running, service_settings
from tests.support import encode, locked_bucket, make_event


async def _send(producer: aioredis.Redis, stream: str, events: list[dict[str, object]]) -> None:
    async with producer.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.xadd(stream, {"event": encode(event)})
        await pipe.execute()


def _witnessed(log: WitnessLog) -> int:
    newest = log.newest().newest
    return newest.checkpoint.tree_size if newest else -1


def _keys(key_dir: Path) -> TrustedKeys:
    return TrustedKeys.from_pems([LocalSigner(key_dir / "signing.pem").public_key_pem()])


async def test_signed_heads_reach_the_witness_as_verifiable_checkpoints(
    fresh_database: str, fresh_redis: str, tmp_path: Path, producer: aioredis.Redis,
    settings: WorkerSettings,
) -> None:
    archive = tmp_path / "archive"
    settings = service_settings(
        fresh_database, fresh_redis, tmp_path / "keys", archive_url=str(archive),
        witness_interval_seconds=0.2,
    )
    async with running(settings) as worker:
        await _send(producer, settings.stream, [make_event(i) for i in range(30)])
        await eventually(lambda: count(fresh_database), what="stored")
        log = WitnessLog(DirectoryStore(archive), settings.log_id, _keys(tmp_path / "keys"))
        await eventually(lambda: _witnessed(log) == 30, what="size 30 witnessed")
        await eventually(
            lambda: worker.service.metrics.witnessed_tree_size._value.get() == 30,
            what="witnessed gauge",
        )
        assert worker.service.metrics.witness_published._value.get() >= 1
    latest = (archive / settings.log_id / "checkpoint").read_bytes()
    checkpoint, _ = open_note(latest, _keys(tmp_path / "keys"))
    assert checkpoint.tree_size == 30 and checkpoint.origin == settings.log_id


async def test_heads_are_witnessed_in_an_object_lock_bucket_on_s3(
    fresh_database: str, fresh_redis: str, tmp_path: Path, producer: aioredis.Redis,
    settings: WorkerSettings, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    kwargs = moto_server.boto3_kwargs()
    client = boto3.client("s3", **kwargs)
    bucket = locked_bucket(client)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    settings = service_settings(
        fresh_database, fresh_redis, tmp_path / "keys", archive_url=f"s3://{bucket}/prod",
        aws_endpoint_url=kwargs["endpoint_url"], witness_interval_seconds=0.2,
    )
    async with running(settings):
        await _send(producer, settings.stream, [make_event(i) for i in range(12)])
        await eventually(lambda: count(fresh_database), what="stored")
        log = WitnessLog(S3Store(bucket, "prod", client), settings.log_id, _keys(tmp_path / "keys"))
        await eventually(lambda: _witnessed(log) == 12, what="size 12 witnessed on S3")


async def test_a_database_rolled_back_below_its_witness_shows_in_the_gauges(
    fresh_database: str, fresh_redis: str, tmp_path: Path, producer: aioredis.Redis,
    settings: WorkerSettings, postgres_url: str,
) -> None:
    archive = tmp_path / "archive"
    settings = service_settings(
        fresh_database, fresh_redis, tmp_path / "keys", archive_url=str(archive),
        witness_interval_seconds=0.2,
    )
    async with running(settings) as worker:
        await _send(producer, settings.stream, [make_event(i) for i in range(40)])
        await eventually(
            lambda: worker.service.metrics.witnessed_tree_size._value.get() == 40,
            what="size 40 witnessed",
        )
    # The insider: delete the newest rows and every head that covers them.
    conn = await asyncpg.connect(fresh_database)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("DELETE FROM audit.events WHERE log_index >= 25")
            await conn.execute("DELETE FROM audit.event_keys WHERE log_index >= 25")
            await conn.execute("DELETE FROM audit.tree_heads WHERE tree_size > 25")
        assert await conn.fetchval("SELECT coalesce(max(tree_size), 0) FROM audit.tree_heads") <= 25
    finally:
        await conn.close()
    with capture_logs() as logs:
        async with running(settings) as worker:
            metrics = worker.service.metrics
            await eventually(
                lambda: metrics.witnessed_tree_size._value.get() == 40, what="read"
            )
            await worker.service.refresh_stats()
            in_database = metrics.database_tree_head_size._value.get()
            assert in_database <= 25
            assert metrics.witnessed_tree_size._value.get() > in_database
    alarms = [e for e in logs if e.get("alert") == "audit_log_rolled_back"]
    assert len(alarms) == 1
    assert alarms[0]["log_level"] == "critical"
    # The database's newest trusted head: what is left of the log's signed evidence.
    assert (alarms[0]["tree_size"], alarms[0]["witnessed_size"]) == (in_database, 40)


async def test_an_unsigned_head_inserted_by_hand_does_not_raise_the_database_gauge(
    fresh_database: str, fresh_redis: str, tmp_path: Path, producer: aioredis.Redis,
    settings: WorkerSettings,
) -> None:
    """Otherwise one forged row in audit.tree_heads would silence AuditLogRolledBack."""
    settings = service_settings(
        fresh_database, fresh_redis, tmp_path / "keys", archive_url=str(tmp_path / "archive"),
        witness_interval_seconds=0.2,
    )
    async with running(settings) as worker:
        await _send(producer, settings.stream, [make_event(i) for i in range(30)])
        metrics = worker.service.metrics
        await eventually(lambda: metrics.witnessed_tree_size._value.get() == 30, what="witness")
        conn = await asyncpg.connect(fresh_database)
        try:
            await conn.execute(
                "INSERT INTO audit.tree_heads (tree_size, root_hash, timestamp_ms, log_id,"
                " signature, signer_ref, frontier) VALUES (1000000000, $1, 1, $2, $3, 'x', '')",
                bytes(32), settings.log_id, b"not a signature",
            )
        finally:
            await conn.close()
        assert await worker.service._verified_head_size() == 30
        assert metrics.database_tree_head_size._value.get() == 30

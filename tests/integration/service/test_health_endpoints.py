"""Health endpoints against real servers that are stopped, killed and started again.

Each endpoint must answer within its probe timeout (liveness 5 s, readiness 3 s, database
10 s, redis 5 s, external 15 s) with JSON that says what is wrong.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import boto3
import httpx
import pytest

from audit_worker.config import WorkerSettings
from audit_worker.localenv import MotoServer, PostgresServer, RedisServer, database_url
from tests.integration.service.conftest import count, eventually, running, service_settings
from tests.support import migrate_url

TIMEOUTS = {
    "/livez": 5.0,
    "/readyz": 3.0,
    "/healthz/database": 10.0,
    "/healthz/redis": 5.0,
    "/healthz/external": 15.0,
}


async def test_all_checks_pass_fast_with_json_bodies(own_settings: WorkerSettings) -> None:
    async with running(own_settings, serve_http=True) as worker:
        port = worker.service.http_port
        assert port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as real:
            figures = {}
            for path, timeout in TIMEOUTS.items():
                started = time.perf_counter()
                reply = await real.get(path, timeout=timeout)
                figures[path] = (time.perf_counter() - started) * 1000
                body = reply.json()
                assert reply.status_code == 200, body
                assert body["status"] == "ok" and body["problems"] == []
                assert reply.headers["cache-control"] == "no-store"
        ready = (await worker.get("/readyz")).json()
        assert ready["ready"] is True and ready["slot"]["state"] == "ungated"
        assert ready["breakers"]["postgres"]["state"] == "closed"
    print("\nhealth endpoint latency over real HTTP (ms):",
          {k: round(v, 1) for k, v in figures.items()})


async def test_postgres_down_is_named_and_readiness_recovers(
    own_settings: WorkerSettings, own_postgres: PostgresServer
) -> None:
    async with running(own_settings) as worker:
        await asyncio.to_thread(own_postgres.stop, cleanup=False)
        try:
            started = time.perf_counter()
            database = await worker.get("/healthz/database")
            elapsed = time.perf_counter() - started
            assert database.status_code == 503 and elapsed < TIMEOUTS["/healthz/database"]
            problems = database.json()["problems"]
            assert any(p.startswith("database:") for p in problems), problems
            assert any("Connect" in p or "refused" in p.lower() for p in problems), problems

            ready = await worker.get("/readyz")
            assert ready.status_code == 503
            body = ready.json()
            assert body["ready"] is False and body["checks"]["database"]["ok"] is False
            assert any("database ping" in p for p in body["problems"]), body["problems"]
            assert (await worker.get("/livez")).status_code == 200  # not wedged: waiting
            assert (await worker.get("/healthz/redis")).status_code == 200
        finally:
            await asyncio.to_thread(own_postgres.start)
        took = await eventually(
            lambda: _ok(worker, "/readyz"), 15, 0.1, "readiness after PostgreSQL returned"
        )
        print(f"\nreadiness back {took:.2f}s after PostgreSQL started")


async def _ok(worker: object, path: str) -> bool:
    return (await worker.get(path)).status_code == 200  # type: ignore[attr-defined]


async def test_redis_killed_is_named_and_readiness_recovers(
    own_settings: WorkerSettings, own_redis: RedisServer
) -> None:
    async with running(own_settings) as worker:
        await asyncio.to_thread(own_redis.kill)
        try:
            started = time.perf_counter()
            reply = await worker.get("/healthz/redis")
            assert time.perf_counter() - started < TIMEOUTS["/healthz/redis"]
            assert reply.status_code == 503
            assert any(p.startswith("redis:") for p in reply.json()["problems"])
            ready = await worker.get("/readyz")
            assert ready.status_code == 503
            assert any("redis" in p for p in ready.json()["problems"])
            assert (await worker.get("/healthz/database")).status_code == 200
            # the consumer loop notices too: its Redis breaker opens
            await eventually(
                lambda: worker.service.breakers["redis"].state.name == "OPEN", 10,
                what="redis breaker open",
            )
        finally:
            await asyncio.to_thread(own_redis.start)
        await eventually(lambda: _ok(worker, "/readyz"), 15, 0.1, "readiness after Redis")


async def test_waiting_for_postgres_at_start_up_is_reported(
    own_postgres: PostgresServer, own_redis: RedisServer, tmp_path: Path
) -> None:
    if not own_redis.is_running():
        own_redis.start()
    await asyncio.to_thread(own_postgres.stop, cleanup=False)
    # A missing database is a configuration error (SQLSTATE 3D000): looked at again
    # every configuration_recheck_seconds, not retried with backoff.
    settings = service_settings(
        database_url(own_postgres.url, "startup_wait"), own_redis.url, tmp_path / "k",
        configuration_recheck_seconds=0.5,
    )
    try:
        async with running(settings, wait=False) as worker:
            await eventually(
                lambda: worker.service.status.startup_problem is not None, 10, what="problem"
            )
            ready = await worker.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["phase"] == "starting"
            assert any(p.startswith("starting: postgres") for p in ready.json()["problems"])
            assert (await worker.get("/livez")).status_code == 200
            await asyncio.to_thread(own_postgres.start)
            await asyncio.to_thread(
                own_postgres.create_database, "startup_wait"
            )
            # the schema is missing: still waiting, and saying so
            await eventually(
                lambda: "schema" in (worker.service.status.startup_problem or ""), 10,
                what="schema problem",
            )
            await migrate_url(settings.database_url.get_secret_value())
            await eventually(lambda: worker.service.status.phase == "running", 15, what="run")
            assert (await worker.get("/readyz")).status_code == 200
    finally:
        if not own_postgres.is_running():
            own_postgres.start()


@pytest.fixture
def aws(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    kwargs = moto_server.boto3_kwargs()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return kwargs


async def test_external_checks_kms_keys_and_the_archive_bucket(
    own_settings: WorkerSettings, aws: dict[str, str]
) -> None:
    kms = boto3.client("kms", **aws)
    data_key = kms.create_key(KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    signing_key = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")[
        "KeyMetadata"
    ]["KeyId"]
    bucket = f"audit-archive-{time.monotonic_ns()}"
    settings = own_settings.model_copy(
        update={
            "key_backend": "kms", "kms_data_key_id": data_key,
            "kms_signing_key_id": signing_key, "aws_endpoint_url": aws["endpoint_url"],
            "archive_bucket": bucket,
        }
    )
    async with running(settings) as worker:
        started = time.perf_counter()
        reply = await worker.get("/healthz/external")
        assert time.perf_counter() - started < TIMEOUTS["/healthz/external"]
        body = reply.json()
        assert reply.status_code == 503, body
        assert [p.split(":")[0] for p in body["problems"]] == ["s3_archive_bucket"]
        assert body["details"]["kms_signing_key"]["state"] == "Enabled"

        boto3.client("s3", **aws).create_bucket(Bucket=bucket)
        assert (await worker.get("/healthz/external")).status_code == 200

        kms.disable_key(KeyId=data_key)
        body = (await worker.get("/healthz/external")).json()
        assert body["problems"] == ["kms_data_key: key state is Disabled, not Enabled"]
        kms.enable_key(KeyId=data_key)


async def test_external_reports_missing_local_key_files(own_settings: WorkerSettings) -> None:
    async with running(own_settings) as worker:
        (own_settings.local_key_dir / "signing.pem").unlink()
        reply = await worker.get("/healthz/external")
        assert reply.status_code == 503
        assert reply.json()["problems"] == ["local_signing_key: missing or unreadable"]
        await count(own_settings.database_url.get_secret_value())  # database unaffected

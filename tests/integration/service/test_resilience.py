"""Failures of PostgreSQL and Redis, tampering and bad signatures, against real servers."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import boto3
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from audit_worker.config import WorkerSettings
from audit_worker.crypto import LocalSigner
from audit_worker.crypto.errors import SignatureError
from audit_worker.errors import SequenceError
from audit_worker.localenv import MotoServer, PostgresServer, RedisServer
from audit_worker.resilience import BreakerState
from tests.integration.service.conftest import count, eventually, running
from tests.support import encode, make_event


async def _xadd(redis_url: str, stream: str, first: int, n: int) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for i in range(first, first + n):
                pipe.xadd(stream, {"event": encode(make_event(i))})
            await pipe.execute()
    finally:
        await client.aclose()


async def _stored(db: str, n: int) -> bool:
    try:
        return await count(db) >= n
    except (OSError, asyncpg.PostgresError):
        return False


async def test_postgres_outage_keeps_entries_pending_and_stores_them_on_return(
    own_settings: WorkerSettings, own_postgres: PostgresServer
) -> None:
    db = own_settings.database_url.get_secret_value()
    redis_url = own_settings.redis_url.get_secret_value()
    async with running(own_settings) as worker:
        await _xadd(redis_url, own_settings.stream, 0, 100)
        await eventually(lambda: _stored(db, 100), what="first 100")
        await asyncio.to_thread(own_postgres.stop, cleanup=False)
        try:
            await _xadd(redis_url, own_settings.stream, 100, 200)
            breaker = worker.service.breakers["postgres"]
            await eventually(lambda: breaker.state is BreakerState.OPEN, 10, what="open")
            await asyncio.sleep(1.5)  # several retry rounds while it is down
            ready = (await worker.get("/readyz")).json()
            assert any("postgres circuit breaker" in p for p in ready["problems"]), ready
            client = aioredis.Redis.from_url(redis_url)
            pending = await client.xpending_range(
                own_settings.stream, own_settings.consumer_group, "-", "+", 1000
            )
            await client.aclose()
            # the batch in hand is retried in memory: its delivery count does not grow
            assert pending and {p["times_delivered"] for p in pending} == {1}
        finally:
            await asyncio.to_thread(own_postgres.start)
        back = time.perf_counter()
        await eventually(lambda: _stored(db, 300), 30, 0.05, "all 300 stored")
        recovery = time.perf_counter() - back
        assert await count(db, "SELECT count(*) FROM audit.dead_letters") == 0
        assert worker.service.metrics.retries.labels("postgres")._value.get() > 0
        await eventually(lambda: breaker.state is BreakerState.CLOSED, 5, what="closed")
    print(f"\nPostgreSQL outage: all pending events stored {recovery:.2f}s after it returned")


async def test_redis_outage_the_worker_waits_and_reconnects(
    own_settings: WorkerSettings, own_redis: RedisServer
) -> None:
    db = own_settings.database_url.get_secret_value()
    redis_url = own_settings.redis_url.get_secret_value()
    async with running(own_settings) as worker:
        await _xadd(redis_url, own_settings.stream, 0, 50)
        await eventually(lambda: _stored(db, 50), what="first 50")
        await asyncio.to_thread(own_redis.kill)
        try:
            await eventually(
                lambda: worker.service.breakers["redis"].state is BreakerState.OPEN, 10,
                what="redis breaker open",
            )
            assert (await worker.get("/livez")).status_code == 200
        finally:
            await asyncio.to_thread(own_redis.start)
        await _xadd(redis_url, own_settings.stream, 50, 50)
        await eventually(lambda: _stored(db, 100), 20, what="stored after Redis returned")
        assert worker.service.metrics.retries.labels("redis")._value.get() > 0


async def test_tampered_log_stops_the_writer_and_raises_the_alarm(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    db = settings.database_url.get_secret_value()
    with capture_logs() as logs:
        async with running(settings) as worker:
            await _xadd(settings.redis_url.get_secret_value(), settings.stream, 0, 10)
            await eventually(lambda: _stored(db, 10), what="10 stored")
            await eventually(lambda: worker.service.metrics.tree_heads_signed._value.get() > 0)
            conn = await asyncpg.connect(db)
            try:  # an attacker with the owner's rights appends a forged row at index 20
                async with conn.transaction():
                    await conn.execute("SET LOCAL session_replication_role = replica")
                    await conn.execute(
                        "INSERT INTO audit.events SELECT 20, gen_random_uuid(), recorded,"
                        " occurred, action, outcome, patient_hmac, actor_hmac, data_key_id,"
                        " leaf_data, leaf_hash FROM audit.events WHERE log_index = 0"
                    )
                heads_before = await conn.fetchval("SELECT max(tree_size) FROM audit.tree_heads")
            finally:
                await conn.close()
            await _xadd(settings.redis_url.get_secret_value(), settings.stream, 10, 5)
            await eventually(lambda: worker.service.status.phase == "halted", what="halted")
            metrics = (await worker.get("/metrics")).text
            assert "audit_integrity_failures_total 1.0" in metrics
            ready = await worker.get("/readyz")
            assert ready.status_code == 503
            assert any("integrity failure" in p and "SequenceError" in p
                       for p in ready.json()["problems"])
            assert (await worker.get("/livez")).status_code == 200  # halted, not wedged
            await asyncio.sleep(0.6)  # several sign intervals: nothing more is signed
            assert await count(db) == 11  # 10 + the forged one; nothing appended after it
            pending = await producer.xpending(settings.stream, settings.consumer_group)
            group = (await producer.xinfo_groups(settings.stream))[0]
            last = group["last-delivered-id"].decode()
            undelivered = await producer.xrange(settings.stream, min=f"({last}")
            # nothing acknowledged after the failure: every entry is still in the stream
            assert pending["pending"] >= 1
            assert pending["pending"] + len(undelivered) == 5
            failure = await worker.stop()
        assert isinstance(failure, SequenceError)
    assert await count(db, "SELECT max(tree_size) FROM audit.tree_heads") == heads_before
    critical = [e for e in logs if e["log_level"] == "critical"]
    assert len(critical) == 1 and critical[0]["alert"] == "audit_integrity_failure"
    assert "MRN" not in str(critical)


async def test_signature_that_does_not_verify_stops_the_writer(
    settings: WorkerSettings, tmp_path: object
) -> None:
    db = settings.database_url.get_secret_value()
    async with running(settings) as worker:
        await _xadd(settings.redis_url.get_secret_value(), settings.stream, 0, 5)
        await eventually(lambda: worker.service.metrics.tree_heads_signed._value.get() > 0)
        assert worker.service.worker is not None
        # the signing key changes under the worker (e.g. a KMS alias re-pointed)
        from pathlib import Path

        worker.service.worker.signer = LocalSigner(Path(str(tmp_path)) / "other.pem", create=True)
        await _xadd(settings.redis_url.get_secret_value(), settings.stream, 5, 5)
        await eventually(lambda: worker.service.status.phase == "halted", what="halted")
        assert "SignatureError" in (worker.service.status.integrity_failure or "")
        failure = await worker.stop()
    assert isinstance(failure, SignatureError)
    # the unverifiable head never reached the log
    assert await count(db, "SELECT max(tree_size) FROM audit.tree_heads") == 5


async def test_kms_outage_degrades_gracefully_and_recovers(
    own_settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KMS down: events are still stored with the cached data key, tree heads wait,
    readiness says the key service is unavailable; all of it recovers when KMS returns."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_CONFIG_FILE", "/nonexistent"),
                        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")):
        monkeypatch.setenv(name, value)
    kms_server = MotoServer().start()
    try:
        kms = boto3.client("kms", **kms_server.boto3_kwargs())
        data_key = kms.create_key(KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
        signing_key = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")[
            "KeyMetadata"]["KeyId"]
        settings = own_settings.model_copy(update={
            "key_backend": "kms", "kms_data_key_id": data_key,
            "kms_signing_key_id": signing_key, "aws_endpoint_url": kms_server.url,
        })
        db = settings.database_url.get_secret_value()
        redis_url = settings.redis_url.get_secret_value()
        async with running(settings) as worker:
            await _xadd(redis_url, settings.stream, 0, 20)
            await eventually(lambda: _stored(db, 20), what="first 20")
            await eventually(lambda: worker.service.metrics.tree_heads_signed._value.get() > 0)
            kms_server.stop()
            await _xadd(redis_url, settings.stream, 20, 20)
            await eventually(lambda: _stored(db, 40), 20, what="stored while KMS is down")
            breaker = worker.service.breakers["kms"]
            await eventually(lambda: breaker.state is not BreakerState.CLOSED, 20, what="kms")
            ready = (await worker.get("/readyz")).json()
            assert any(p.startswith("kms circuit breaker") for p in ready["problems"]), ready
            external = await worker.get("/healthz/external")
            assert external.status_code == 503
            signed_before = await count(db, "SELECT max(tree_size) FROM audit.tree_heads")
            assert signed_before == 20  # nothing signed while KMS is down
            kms_server = MotoServer(port=kms_server.port).start()
            await eventually(lambda: breaker.state is BreakerState.CLOSED, 20, what="closed")
            await eventually(
                lambda: _signed(db, 40), 10, what="tree head over the events stored meanwhile"
            )
            assert (await worker.get("/readyz")).status_code == 200
    finally:
        kms_server.stop()


async def _signed(db: str, size: int) -> bool:
    return await count(db, "SELECT coalesce(max(tree_size), 0) FROM audit.tree_heads") >= size


async def test_a_log_tampered_before_start_up_halts_the_writer_at_once(
    settings: WorkerSettings,
) -> None:
    db = settings.database_url.get_secret_value()
    async with running(settings) as worker:
        await _xadd(settings.redis_url.get_secret_value(), settings.stream, 0, 5)
        await eventually(lambda: _stored(db, 5), what="5 stored")
    conn = await asyncpg.connect(db)
    try:  # a row appears at index 9 while no worker runs: indices 5..8 are missing
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "INSERT INTO audit.events SELECT 9, gen_random_uuid(), recorded, occurred,"
                " action, outcome, patient_hmac, actor_hmac, data_key_id, leaf_data, leaf_hash"
                " FROM audit.events WHERE log_index = 0"
            )
    finally:
        await conn.close()
    async with running(settings) as worker:
        assert worker.service.status.phase == "halted"
        ready = await worker.get("/readyz")
        assert ready.status_code == 503
        assert "integrity failure" in " ".join(ready.json()["problems"])
        assert "audit_integrity_failures_total 1.0" in (await worker.get("/metrics")).text
        assert (await worker.get("/livez")).status_code == 200
        failure = await worker.stop()
    assert isinstance(failure, SequenceError)

"""SIGTERM to a real `audit-worker run` process in the middle of a burst."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import redis.asyncio as aioredis

from audit_worker.crypto import LocalSigner
from audit_worker.localenv import free_port
from audit_worker.localenv.workload import produce
from audit_worker.verify import verify_log
from tests.integration.service.conftest import count, eventually
from tests.support import migrate_url

GRACE = 10


async def test_sigterm_finishes_the_batch_in_hand_signs_and_exits_in_time(
    fresh_database: str, fresh_redis: str, tmp_path: Path
) -> None:
    await migrate_url(fresh_database)
    port = free_port()
    env = {
        **os.environ,
        "AUDIT_DATABASE_URL": fresh_database,
        "AUDIT_REDIS_URL": fresh_redis,
        "AUDIT_LOCAL_KEY_DIR": str(tmp_path / "keys"),
        "AUDIT_HTTP_HOST": "127.0.0.1",
        "AUDIT_HTTP_PORT": str(port),
        "AUDIT_INTAKE_PORT": "0",
        "AUDIT_CONSUMER_NAME": "sigterm-test",
        "AUDIT_SHUTDOWN_GRACE_SECONDS": str(GRACE),
        "AUDIT_SIGN_INTERVAL_SECONDS": "30",  # only the final tree head will be signed
        "AUDIT_BATCH_SIZE": "500",
        "AUDIT_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "audit_worker.cli", "run", "--create-keys"], env=env,
        stderr=subprocess.PIPE,
    )
    redis = aioredis.Redis.from_url(fresh_redis)
    try:
        async def ready() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    reply = await http.get(f"http://127.0.0.1:{port}/readyz", timeout=3)
                return reply.status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(ready, 60, 0.1, "worker ready")
        for check in ("livez", "readyz", "database", "redis", "external"):
            done = subprocess.run(
                [sys.executable, "-m", "audit_worker.cli", "health", check],
                env=env, capture_output=True, text=True, timeout=30, check=False,
            )
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["status"] == "ok"
        dead = subprocess.run(
            [sys.executable, "-m", "audit_worker.cli", "health", "livez", "--url",
             f"http://127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert dead.returncode == 1 and "no answer" in dead.stderr
        await produce(redis, "audit:events", 20_000, chunk=2000)
        await eventually(lambda: _some(fresh_database), 30, 0.005, "first commit")
        proc.send_signal(signal.SIGTERM)
        sent = time.perf_counter()
        code = await asyncio.to_thread(proc.wait, GRACE + 10)
        took = time.perf_counter() - sent
        assert code == 0, proc.stderr.read().decode() if proc.stderr else ""
        assert took < GRACE
        pending = await redis.xpending("audit:events", "audit-workers")
        assert pending["pending"] == 0, "the batch in hand was not acknowledged"
        stored = await count(fresh_database)
        assert 0 < stored < 20_000, "SIGTERM should come mid-burst"
        conn = await asyncpg.connect(fresh_database)
        try:
            head = await conn.fetchval("SELECT max(tree_size) FROM audit.tree_heads")
            pem = LocalSigner(tmp_path / "keys" / "signing.pem").public_key_pem()
            report = await verify_log(conn, pem, log_id="audit-log")
        finally:
            await conn.close()
        assert head == stored, "the final tree head covers everything stored"
        assert report.ok, report.findings
        print(f"\nSIGTERM mid-burst: exit 0 after {took:.2f}s, {stored} stored, final head {head}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await redis.aclose()


async def _some(db: str) -> bool:
    return await count(db) > 0

"""`make demo`: the local environment, a workload through a real worker process, and a
verification of the result, with figures.

Runs PostgreSQL and Redis on this machine (started here, stopped at the end), local keys,
one `audit-worker run` process. Prints what it measured; exits non-zero if anything is off.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from audit_worker.db.migrate import migrate
from audit_worker.localenv.servers import PostgresServer, RedisServer
from audit_worker.localenv.workload import produce
from audit_worker.verify import verify_log

console = Console()
EVENTS = int(os.environ.get("AUDIT_DEMO_EVENTS", "20000"))
MALFORMED_EVERY = 100  # 1% bad input, to show the dead-letter path


def worker_env(db_url: str, redis_url: str, key_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AUDIT_DATABASE_URL": db_url,
        "AUDIT_REDIS_URL": redis_url,
        "AUDIT_LOCAL_KEY_DIR": str(key_dir),
        "AUDIT_ENVIRONMENT": "local",
        "AUDIT_CONSUMER_NAME": "demo-worker-1",
        "AUDIT_HTTP_PORT": "0",
        "AUDIT_LOG_LEVEL": "warning",
    }


async def _count(db_url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(db_url)
    try:
        return (
            await conn.fetchval("SELECT count(*) FROM audit.events"),
            await conn.fetchval("SELECT count(*) FROM audit.dead_letters"),
        )
    finally:
        await conn.close()


async def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="audit-demo-"))
    with console.status("starting PostgreSQL and Redis on this machine"):
        pg = PostgresServer(fast=False).start()
        rd = RedisServer().start()
    try:
        db_url = pg.url
        conn = await asyncpg.connect(db_url)
        applied = await migrate(conn)
        await conn.close()
        console.print(f"schema: {len(applied)} migration(s) applied")
        env = worker_env(db_url, rd.url, work / "keys")
        worker = subprocess.Popen(
            [sys.executable, "-m", "audit_worker.cli", "run", "--create-keys"], env=env
        )
        redis = Redis.from_url(rd.url)
        with console.status(f"producing {EVENTS:,} events (1% malformed)"):
            produced = await produce(redis, "audit:events", EVENTS, malformed_every=MALFORMED_EVERY)
        started = time.perf_counter()
        deadline = started + 300
        with console.status("waiting for the worker to store everything"):
            while True:
                stored, dead = await _count(db_url)
                if stored + dead >= produced.total or time.perf_counter() > deadline:
                    break
                await asyncio.sleep(0.05)
        drained = time.perf_counter() - started
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
        await redis.aclose()
        pem = subprocess.run(
            [sys.executable, "-m", "audit_worker.cli", "public-key"],
            env=env,
            capture_output=True,
            check=True,
        ).stdout
        (work / "signing.pub.pem").write_bytes(pem)
        conn = await asyncpg.connect(db_url)
        report = await verify_log(conn, pem, log_id="audit-log")
        await conn.close()
        table = Table("figure", "value", title="audit worker demo (local environment)")
        table.add_row(
            "events produced", f"{produced.good:,} valid + {produced.malformed:,} malformed"
        )
        table.add_row("stored in the log", f"{stored:,}")
        table.add_row("dead-lettered with reason", f"{dead:,}")
        table.add_row("produce rate", f"{produced.total / produced.seconds:,.0f} events/s")
        table.add_row("drain after production", f"{drained:.2f} s")
        table.add_row("worker exit code (SIGTERM)", str(code))
        table.add_row("signed tree heads", str(report.valid_tree_heads))
        table.add_row(
            "verify",
            f"{'OK' if report.ok else 'FAILED'}: {report.rows:,} rows "
            f"in {report.seconds:.2f} s ({report.rate:,.0f} rows/s)",
        )
        table.add_row("public key", str(work / "signing.pub.pem"))
        console.print(table)
        ok = report.ok and stored == produced.good and dead == produced.malformed and code == 0
        if not ok:
            console.print("[red]demo failed[/red]", report.findings[:5])
        return 0 if ok else 1
    finally:
        rd.stop()
        pg.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

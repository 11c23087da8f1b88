"""`make demo`: the local platform, a workload, a blue-green promotion, a rollback and a DR
drill (with its failback), with the figures and the drill report's path.

Everything runs on this machine and is stopped at the end: PostgreSQL (a primary and a
streaming replica, durable commits), a Redis per site, one `audit-worker run` process per
running slot, local keys. Exits non-zero if any step does not do what it should.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from audit_worker.crypto import TrustedKeys
from audit_worker.localenv.platform import STREAM, LocalStack, producing
from audit_worker.localenv.workload import produce
from audit_worker.objectstore import DirectoryStore
from audit_worker.verify import WitnessedCheckpoint, verify_log
from audit_worker.witness import WitnessLog
from auditctl.environments import project_root
from auditctl.failover import DrillOptions, drill, failback
from auditctl.gates import Thresholds
from auditctl.platforms.local import LocalPlatform
from auditctl.promotion import Phase
from auditctl.release import PromoteOptions, promote, rollback

console = Console()
EVENTS = int(os.environ.get("AUDITKIT_DEMO_EVENTS", "20000"))
MALFORMED_EVERY = 100  # 1% bad input, to show the dead-letter path
LOAD_RATE = 300.0  # events/s while promoting and drilling
GATES = Thresholds(readiness_timeout_seconds=60, smoke_timeout_seconds=30)
REPORTS: list[str] = []


async def _count(db_url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(db_url)
    try:
        return (
            await conn.fetchval("SELECT count(*) FROM audit.events"),
            await conn.fetchval("SELECT count(*) FROM audit.dead_letters"),
        )
    finally:
        await conn.close()


async def _wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(url + "/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {timeout:g}s")


async def _workload(stack: LocalStack, table: Table) -> bool:
    db_url = stack.site("prod").database_url
    redis = Redis.from_url(stack.site("prod").redis_url)
    with console.status(f"producing {EVENTS:,} events (1% malformed)"):
        produced = await produce(redis, STREAM, EVENTS, malformed_every=MALFORMED_EVERY)
    await redis.aclose()
    started = time.perf_counter()
    with console.status("waiting for the blue slot to store everything"):
        while True:
            stored, dead = await _count(db_url)
            if stored + dead >= produced.total or time.perf_counter() - started > 300:
                break
            await asyncio.sleep(0.05)
    drained = time.perf_counter() - started
    platform = LocalPlatform(stack)
    pem = await platform.public_key_pem()
    with console.status("waiting for the last batch to be signed and witnessed"):
        witnessed = await _witnessed(stack, pem, platform.log_id, stored)
    conn = await asyncpg.connect(db_url)
    with console.status("verifying the log against the witness"):
        report = await verify_log(conn, pem, log_id=platform.log_id, allow_unsigned_tail=True,
                                  witness=witnessed)
    await conn.close()
    table.add_row("events produced", f"{produced.good:,} valid + {produced.malformed:,} malformed")
    table.add_row("stored / dead-lettered with reason", f"{stored:,} / {dead:,}")
    table.add_row("produce rate; drain after production",
                  f"{produced.total / produced.seconds:,.0f} events/s; {drained:.2f} s")
    table.add_row("verify", f"{'OK' if report.ok else 'FAILED'}: {report.rows:,} rows, "
                  f"{report.valid_tree_heads} signed tree heads, {report.seconds:.2f} s")
    checkpoint = witnessed.checkpoint
    table.add_row("witnessed checkpoint (outside the database)",
                  f"size {checkpoint.tree_size:,}, {checkpoint.dead_letters:,} dead letters, "
                  f"{witnessed.where}; the database "
                  + ("agrees" if report.ok else "DISAGREES"))
    return report.ok and stored == produced.good and dead == produced.malformed


async def _witnessed(
    stack: LocalStack, pem: bytes, log_id: str, size: int, timeout: float = 60.0
) -> WitnessedCheckpoint:
    """The workers publish a checkpoint every few seconds: wait for one that covers `size`."""
    log = WitnessLog(DirectoryStore(stack.archive_dir), log_id, TrustedKeys.from_pems([pem]))
    deadline = time.perf_counter() + timeout
    while True:
        newest = (await asyncio.to_thread(log.newest)).newest
        if newest is not None and newest.checkpoint.tree_size >= size:
            return WitnessedCheckpoint(newest.checkpoint, f"{log.url}{newest.key}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"no checkpoint covering {size} entries within {timeout:g}s")
        await asyncio.sleep(0.5)


async def _release(stack: LocalStack, table: Table) -> bool:
    platform = LocalPlatform(stack)
    async with producing(stack.state_dir, LOAD_RATE) as load:
        with console.status(f"promoting 0.2.0 (blue -> green) under {LOAD_RATE:.0f} events/s"):
            promoted = await promote(
                platform, PromoteOptions("0.2.0", scale_down_delay_seconds=3, thresholds=GATES),
                environment="local", auto_promote=True, scale_down_delay_seconds=30,
            )
        with console.status("promoting 0.3.0, then rolling it back within the window"):
            task = asyncio.create_task(promote(
                platform, PromoteOptions("0.3.0", scale_down_delay_seconds=60, thresholds=GATES),
                environment="local", auto_promote=True, scale_down_delay_seconds=30,
            ))
            while not task.done():
                record = await platform.load_promotion()
                if record is not None and record.image == "0.3.0" and \
                        record.phase is Phase.SCALE_DOWN_DELAY:
                    break
                await asyncio.sleep(0.1)
            rolled = await rollback(platform, environment="local")
            await task
    failed = ", ".join(g.name for g in promoted.failed_gates()) or "none"
    table.add_row("promotion 0.2.0 blue -> green",
                  f"{promoted.phase.value}; {len(promoted.gates)} gates, failed: {failed}")
    if promoted.switch_seconds is not None:
        table.add_row("slot switch (both slots acknowledged)",
                      f"{promoted.switch_seconds * 1000:.0f} ms")
    table.add_row("promotion 0.3.0, then `auditctl rollback`",
                  f"{rolled.phase.value}: {rolled.aftermath().summary}")
    if rolled.rollback_seconds is not None:
        table.add_row("rollback switch", f"{rolled.rollback_seconds * 1000:.0f} ms")
    table.add_row("events written during the releases", f"{load.total:,} ({load.errors} errors)")
    return promoted.phase is Phase.COMPLETED and rolled.phase is Phase.ROLLED_BACK


async def _drill(stack: LocalStack, table: Table) -> bool:
    platform = LocalPlatform(stack)
    options = DrillOptions(reports_dir=project_root() / "reports")
    async with producing(stack.state_dir, LOAD_RATE):
        with console.status(f"DR drill prod -> dr under {LOAD_RATE:.0f} events/s"):
            report = await drill(platform, options)
    back_options = DrillOptions(reports_dir=options.reports_dir)
    with console.status("failback dr -> prod (pg_rewind)"):
        back = await failback(platform, back_options)
    rpo = report.rpo
    table.add_row("DR drill (planned switchover)", "PASSED" if report.ok else
                  "FAILED: " + "; ".join(report.verdict()))
    table.add_row("RTO: declaration to first verified canary in DR",
                  "n/a" if report.rto_seconds is None else f"{report.rto_seconds:.2f} s")
    if rpo is not None:
        table.add_row("RPO: events acknowledged in prod, missing in DR",
                      f"{rpo.missing} of {rpo.acknowledged:,}")
        if rpo.lag_at_t0_seconds is not None:
            table.add_row("replication lag at T0 (heartbeat)",
                          f"{rpo.lag_at_t0_seconds * 1000:.0f} ms, {rpo.lag_at_t0_bytes:,} bytes")
    REPORTS.extend(str(options.report_paths[k]) for k in ("html", "markdown", "json")
                   if k in options.report_paths)
    table.add_row("failback (pg_rewind, switch back)", "PASSED" if back.ok else
                  "FAILED: " + "; ".join(back.verdict()))
    if back.rto_seconds is not None:
        table.add_row("failback RTO", f"{back.rto_seconds:.2f} s")
    return report.ok and back.ok


async def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="audit-demo-"))
    root.chmod(0o755)
    started = time.perf_counter()
    with console.status("starting the local platform: PostgreSQL primary + streaming "
                        "replica, Redis per site, the blue worker"):
        stack = LocalStack.up(root / "platform", fast=False, image="0.1.0")
    table = Table("figure", "value", title="audit-kit demo (local platform)")
    try:
        await _wait_ready(stack.worker_url("prod", "blue"))
        ok = await _workload(stack, table)
        ok = await _release(stack, table) and ok
        ok = await _drill(stack, table) and ok
    finally:
        with console.status("stopping everything"):
            stack.down()
            shutil.rmtree(root, ignore_errors=True)
    table.add_row("demo run time", f"{time.perf_counter() - started:.1f} s")
    console.print(table)
    for path in REPORTS:
        console.print(f"drill report: {path}")
    if not ok:
        console.print("[red]demo failed[/red]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

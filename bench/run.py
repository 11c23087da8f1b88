"""`make bench`: the worker's speed against its limits, side by side in one run.

Scenarios (all on this machine, PostgreSQL with fsync and synchronous commit ON):
  naive       one INSERT and one COMMIT per event (what a simple logger does)
  copy        a raw COPY of the same rows in batches of 1,000 (the storage limit)
  pipeline    the whole worker: XREADGROUP, validation, HMAC, AES-GCM, Merkle, COPY, XACK,
              draining a preloaded stream, with 1 and with 2 worker processes
  steady      p50/p99 latency from XADD to commit at 1,000 events/s (producer in a
              separate process)
  burst       p99 latency of a 5,000-event burst into an idle worker
  witness     the pipeline with witnessing off and on (a checkpoint to an Object Lock
              bucket on moto's S3 every 10 s, the default, and every 1 s), alternated;
              and the cost of one publication (sign the note, two PUTs)
  verify      `verify_log` over everything the run stored
Prints a table and writes bench/results/latest.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from audit_worker.config import WorkerSettings
from audit_worker.crypto import DataKeyManager, FieldCipher, LocalKeyWrapper, Pseudonymiser
from audit_worker.db.migrate import migrate
from audit_worker.db.store import EVENT_COLUMNS
from audit_worker.events import AuditEvent, parse_event
from audit_worker.localenv.servers import MotoServer, PostgresServer, RedisServer
from audit_worker.localenv.workload import produce, synthetic_event
from audit_worker.records import RecordBuilder, sequence
from audit_worker.service import run as run_worker
from audit_worker.verify import verify_log
from audit_worker.worker import BatchResult

console = Console()
RESULTS = Path(__file__).parent / "results"
PIPELINE_EVENTS = int(os.environ.get("BENCH_PIPELINE_EVENTS", "100000"))
WITNESS_EVENTS = int(os.environ.get("BENCH_WITNESS_EVENTS", "60000"))
WITNESS_ROUNDS = 4


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def sample_rows(count: int, key_dir: Path) -> list[tuple[Any, ...]]:
    wrapper = LocalKeyWrapper(key_dir / "bench.key", create=True)
    builder = RecordBuilder(Pseudonymiser(b"k" * 32), FieldCipher())
    key = DataKeyManager(wrapper).current()
    rows = []
    now = time.time()
    from datetime import UTC, datetime

    recorded = datetime.fromtimestamp(now, UTC)
    for i in range(count):
        parsed = parse_event(json.dumps(synthetic_event(i)).encode())
        assert isinstance(parsed, AuditEvent)
        s = sequence(builder.prepare(parsed, key), 10_000_000 + i, recorded)
        p = s.prepared
        rows.append(
            (
                s.log_index,
                p.event_id,
                s.recorded,
                p.occurred,
                p.action,
                p.outcome,
                p.patient_hmac,
                p.actor_hmac,
                p.data_key_id,
                s.leaf_data,
                s.leaf_hash,
            )
        )
    return rows


async def bench_naive(url: str, rows: list[tuple[Any, ...]]) -> float:
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE bench_naive (LIKE audit.events)")
    started = time.perf_counter()
    for row in rows:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO bench_naive (log_index, event_id, recorded, occurred, action, outcome,"
                " patient_hmac, actor_hmac, data_key_id, leaf_data, leaf_hash)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)",
                *row,
            )
    elapsed = time.perf_counter() - started
    await conn.close()
    return len(rows) / elapsed


async def bench_copy(url: str, rows: list[tuple[Any, ...]]) -> float:
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE bench_copy (LIKE audit.events INCLUDING INDEXES)")
    started = time.perf_counter()
    for i in range(0, len(rows), 1000):
        async with conn.transaction():
            await conn.copy_records_to_table(
                "bench_copy", records=rows[i : i + 1000], columns=EVENT_COLUMNS
            )
    elapsed = time.perf_counter() - started
    await conn.close()
    return len(rows) / elapsed


async def count_events(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM audit.events"))
    finally:
        await conn.close()


def worker_process(env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "audit_worker.cli", "run", "--create-keys"],
        env={**env, "AUDIT_CONSUMER_NAME": name},
    )


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU of a running process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_pipeline(
    url: str, redis_url: str, env: dict[str, str], workers: int, events: int
) -> dict[str, float]:
    """Drain a preloaded stream with `workers` processes. `drain` counts from process
    start (Python start-up, connections, key loading included); `sustained` counts from
    the first to the last commit, by the rows' own `recorded` times."""
    redis = Redis.from_url(redis_url)
    await produce(redis, "audit:events", events, chunk=1000)
    await redis.aclose()
    before = await count_events(url)
    procs = [worker_process(env, f"bench-{workers}-{i}") for i in range(workers)]
    started = time.perf_counter()
    while await count_events(url) < before + events:
        await asyncio.sleep(0.02)
        if time.perf_counter() - started > 600:
            raise RuntimeError("pipeline did not drain in 10 minutes")
    elapsed = time.perf_counter() - started
    cpu = sum(process_cpu_seconds(p.pid) for p in procs)
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(60)
    conn = await asyncpg.connect(url)
    try:
        first, last, batches = await conn.fetchrow(
            "SELECT min(recorded), max(recorded), count(DISTINCT recorded) FROM audit.events"
            " WHERE log_index >= $1",
            before,
        )
    finally:
        await conn.close()
    # the first batch's own commit time is not in the span: leave its rows out
    span = (last - first).total_seconds()
    per_batch = events / max(1, batches)
    return {
        "worker_cpu_s_per_1000": cpu / events * 1000,
        "drain_events_per_s": events / elapsed,
        "sustained_events_per_s": (events - per_batch) / span if span > 0 else float("nan"),
    }


async def bench_latency(
    settings: WorkerSettings, redis_url: str, count: int, rate: float | None
) -> dict[str, float]:
    latencies: list[float] = []
    stop = asyncio.Event()

    def collect(result: BatchResult) -> None:
        latencies.extend(result.latencies_ms)

    task = asyncio.create_task(
        run_worker(settings, stop, install_signal_handlers=False, on_batch=collect)
    )
    await asyncio.sleep(1.0)  # worker connected and idle
    args = [sys.executable, "-m", "audit_worker.localenv.workload", redis_url, str(count)]
    if rate:
        args += ["--rate", str(rate)]
    producer = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    await producer.communicate()
    deadline = time.perf_counter() + 120
    while len(latencies) < count and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await task
    return {
        "events": len(latencies),
        "p50_ms": statistics.median(latencies),
        "p99_ms": pct(latencies, 0.99),
        "max_ms": max(latencies),
    }


def locked_bucket(moto: MotoServer) -> str:
    import boto3

    client = boto3.client("s3", **moto.boto3_kwargs())
    client.create_bucket(Bucket="bench-archive", ObjectLockEnabledForBucket=True)
    client.put_object_lock_configuration(
        Bucket="bench-archive",
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Years": 6}},
        },
    )
    return "bench-archive"


def bench_publication(moto: MotoServer, bucket: str, key_dir: Path, count: int) -> dict[str, float]:
    """One witness publication as the worker makes it: sign the checkpoint note, check the
    signature, write the size's object once and replace `checkpoint`."""
    import boto3

    from audit_worker.crypto import LocalSigner, TrustedKeys
    from audit_worker.crypto.checkpoint import Checkpoint, open_note, sign_note
    from audit_worker.objectstore import S3Store
    from audit_worker.witness import WitnessLog

    signer = LocalSigner(key_dir / "signing.pem")
    keys = TrustedKeys.from_pems([signer.public_key_pem()])
    log = WitnessLog(S3Store(bucket, "publication", boto3.client("s3", **moto.boto3_kwargs())),
                     "bench", keys)
    seconds = []
    for size in range(1, count + 1):
        started = time.perf_counter()
        note = sign_note(Checkpoint("bench", size, bytes(32), size), signer, keys.keys[0])
        open_note(note, keys)
        log.publish(note, size)
        seconds.append(time.perf_counter() - started)
    return {"p50_ms": statistics.median(seconds) * 1000, "p99_ms": pct(seconds, 0.99) * 1000}


async def bench_witness(
    url: str, redis_url: str, env: dict[str, str], moto: MotoServer, bucket: str
) -> dict[str, Any]:
    """Witnessing off and on, alternated in the same run so drift hits both alike."""
    on = {
        **env, "AUDIT_ARCHIVE_URL": f"s3://{bucket}/", "AUDIT_AWS_ENDPOINT_URL": moto.url,
        "AUDIT_AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    # moto serves S3 from this process, on the same 2 cores as the worker and PostgreSQL;
    # a directory store shows the worker's own share of the cost without moto's.
    directory = {**env, "AUDIT_ARCHIVE_URL": tempfile.mkdtemp(prefix="audit-bench-witness-"),
                 "AUDIT_WITNESS_INTERVAL_SECONDS": "10"}
    modes = {
        "off": env,
        "on_10s": {**on, "AUDIT_WITNESS_INTERVAL_SECONDS": "10"},
        "on_10s_directory": directory,
        "on_1s": {**on, "AUDIT_WITNESS_INTERVAL_SECONDS": "1"},
    }
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    order = list(modes)
    for _ in range(WITNESS_ROUNDS):
        for mode in order:  # each round in another order: the log grows run by run
            result = await bench_pipeline(url, redis_url, modes[mode], 1, WITNESS_EVENTS)
            runs[mode].append(result["sustained_events_per_s"])
            cpu[mode].append(result["worker_cpu_s_per_1000"])
        order = order[1:] + order[:1]
    return {"events_per_run": WITNESS_EVENTS, "sustained_events_per_s": runs,
            "worker_cpu_s_per_1000": cpu}


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="audit-bench-"))
    pg = PostgresServer(fast=False).start()
    rd = RedisServer().start()
    results: dict[str, Any] = {
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        "postgres": "fsync on, synchronous_commit on, same machine",
        "command": "make bench",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        conn = await asyncpg.connect(pg.url)
        await migrate(conn)
        await conn.close()
        key_dir = work / "keys"
        env = {
            **os.environ,
            "AUDIT_DATABASE_URL": pg.url,
            "AUDIT_REDIS_URL": rd.url,
            "AUDIT_LOCAL_KEY_DIR": str(key_dir),
            "AUDIT_LOG_LEVEL": "warning",
            "AUDIT_HTTP_PORT": "0",  # `run` serves HTTP: two workers here need two ports
            "AUDIT_INTAKE_PORT": "0",  # each, health and intake
        }
        settings = WorkerSettings(
            database_url=pg.url,
            redis_url=rd.url,
            local_key_dir=key_dir,  # type: ignore[arg-type]
            consumer_name="bench-latency",
            log_level="warning",
        )
        with console.status("baselines: naive INSERT+COMMIT and raw COPY"):
            rows = sample_rows(20_000, work)
            results["naive_events_per_s"] = await bench_naive(pg.url, rows[:5000])
            results["copy_events_per_s"] = await bench_copy(pg.url, rows)
        for workers in (1, 2):
            with console.status(f"pipeline: {PIPELINE_EVENTS:,} events, {workers} worker(s)"):
                results[f"pipeline_{workers}w"] = await bench_pipeline(
                    pg.url, rd.url, env, workers, PIPELINE_EVENTS
                )
        with console.status("witness: pipeline with witnessing off and on, alternated"):
            moto = MotoServer().start()
            try:
                bucket = locked_bucket(moto)
                results["witness"] = await bench_witness(pg.url, rd.url, env, moto, bucket)
                results["witness"]["publication"] = bench_publication(moto, bucket, key_dir, 200)
            finally:
                moto.stop()
        with console.status("steady: 1,000 events/s for 20 s"):
            results["steady_1000"] = await bench_latency(settings, rd.url, 20_000, 1000.0)
        with console.status("burst: 5,000 events at once"):
            results["burst_5000"] = await bench_latency(settings, rd.url, 5000, None)
        with console.status("verify: the whole log"):
            conn = await asyncpg.connect(pg.url)
            from audit_worker.crypto import LocalSigner

            pem = LocalSigner(key_dir / "signing.pem").public_key_pem()
            for procs in (1, 2):
                report = await verify_log(
                    conn, pem, log_id=settings.log_id, dsn=pg.url, workers=procs
                )
                results[f"verify_{procs}p"] = {
                    "ok": report.ok,
                    "rows": report.rows,
                    "seconds": report.seconds,
                    "rows_per_s": report.rate,
                }
            await conn.close()
    finally:
        rd.stop()
        pg.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    table = Table("scenario", "figure", title=f"make bench — {results['machine']}")
    table.add_row("naive INSERT+COMMIT per event", f"{results['naive_events_per_s']:,.0f} events/s")
    table.add_row("raw COPY, batches of 1,000", f"{results['copy_events_per_s']:,.0f} events/s")
    for w in (1, 2):
        p = results[f"pipeline_{w}w"]
        table.add_row(
            f"pipeline, {w} worker process(es)",
            f"{p['sustained_events_per_s']:,.0f} events/s sustained"
            f" ({p['drain_events_per_s']:,.0f}/s including start-up)",
        )
    witness = results["witness"]
    for mode, rates in witness["sustained_events_per_s"].items():
        label = mode.replace("_directory", " (directory store)").replace("_", " every ")
        table.add_row(
            f"pipeline, witness {label}",
            f"{min(rates):,.0f} to {max(rates):,.0f} events/s sustained ({len(rates)} runs)",
        )
    for mode, seconds in witness["worker_cpu_s_per_1000"].items():
        table.add_row(
            f"worker CPU per 1,000 events, witness {mode}",
            f"{min(seconds):.3f} to {max(seconds):.3f} s ({len(seconds)} runs)",
        )
    publication = witness["publication"]
    table.add_row(
        "one witness publication (sign, 2 PUTs to moto S3)",
        f"p50 {publication['p50_ms']:.1f} ms, p99 {publication['p99_ms']:.1f} ms",
    )
    for name in ("steady_1000", "burst_5000"):
        r = results[name]
        table.add_row(
            name,
            f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms"
            f" ({r['events']:,} events)",
        )
    for procs in (1, 2):
        v = results[f"verify_{procs}p"]
        table.add_row(
            f"verify, {procs} process(es)",
            f"{v['rows_per_s']:,.0f} rows/s ({v['rows']:,} rows, ok={v['ok']})",
        )
    console.print(table)


if __name__ == "__main__":
    asyncio.run(main())

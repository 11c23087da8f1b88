"""`make bench` (second part): POST /v1/events to the Redis stream vs. to the PostgreSQL spool.

One worker `Service` in this process (consumer, signer and both HTTP listeners on
127.0.0.1; PostgreSQL with fsync and synchronous commit ON, Redis with AOF), requests sent
one at a time by two clients:
  asgi       straight into the app (httpx ASGI transport): the handler's own cost
  tcp        over the intake listener on a kept-alive connection: what a producer sees
and three phases:
  stream     single events and batches of 100 while Redis is up (XADD in MULTI/EXEC)
  spool      the same while Redis is killed (sealed, one PostgreSQL transaction each)
  catch-up   Redis restarted: how fast the worker moves the spooled events into the log
Prints a table and writes bench/results/spool.json. Bounded: well under a minute.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from rich.console import Console
from rich.table import Table

from audit_worker.config import WorkerSettings
from audit_worker.db.migrate import migrate
from audit_worker.localenv.servers import PostgresServer, RedisServer
from audit_worker.localenv.workload import synthetic_event
from audit_worker.logs import configure as configure_logs
from audit_worker.resilience import BreakerState
from audit_worker.service import Service

console = Console()
RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-intake-token-0123456789"
SINGLES = int(os.environ.get("BENCH_SPOOL_SINGLES", "500"))
BATCHES = int(os.environ.get("BENCH_SPOOL_BATCHES", "50"))  # of 100 events each
TCP_SINGLES, TCP_BATCHES = SINGLES // 5, BATCHES // 5
HOST = "127.0.0.1"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def wait_for(what: str, check: Any, timeout: float = 60.0) -> float:
    started = time.perf_counter()
    while not await check():
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"{what}: not reached within {timeout:.0f}s")
        await asyncio.sleep(0.02)
    return time.perf_counter() - started


async def post_all(
    client: httpx.AsyncClient, bodies: list[Any], *, spooled: bool
) -> list[float]:
    """Send each body, one at a time; latencies in ms. Every event must be accepted where
    the scenario says (stream or spool)."""
    latencies = []
    for body in bodies:
        started = time.perf_counter()
        reply = await client.post("/v1/events", json=body)
        latencies.append((time.perf_counter() - started) * 1000)
        if reply.status_code != 202:
            raise RuntimeError(f"POST answered {reply.status_code}: {reply.text[:200]}")
        if any(r["spooled"] is not spooled for r in reply.json()["results"]):
            raise RuntimeError(f"expected spooled={spooled}: {reply.text[:200]}")
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    return {"requests": len(latencies), "p50_ms": pct(latencies, 0.5),
            "p99_ms": pct(latencies, 0.99), "max_ms": max(latencies)}


async def scenario(
    client: httpx.AsyncClient, *, spooled: bool, first: int, singles: int, batches: int
) -> dict[str, Any]:
    one = [synthetic_event(first + i) for i in range(singles + 20)]
    many = [
        [synthetic_event(first + singles + 20 + b * 100 + i) for i in range(100)]
        for b in range(batches)
    ]
    await post_all(client, one[:20], spooled=spooled)  # warm-up: connections, data key
    return {
        "single": summary(await post_all(client, one[20:], spooled=spooled)),
        "batch_100": summary(await post_all(client, many, spooled=spooled)),
    }


async def both(clients: dict[str, httpx.AsyncClient], *, spooled: bool, first: int) -> Any:
    return {
        "asgi": await scenario(
            clients["asgi"], spooled=spooled, first=first, singles=SINGLES, batches=BATCHES
        ),
        "tcp": await scenario(
            clients["tcp"], spooled=spooled, first=first + 500_000, singles=TCP_SINGLES,
            batches=TCP_BATCHES,
        ),
    }


async def main() -> None:
    configure_logs("error")  # the outage's breaker warnings would bury the table
    work = Path(tempfile.mkdtemp(prefix="audit-bench-spool-"))
    pg = PostgresServer(fast=False).start()
    rd = RedisServer().start()
    results: dict[str, Any] = {
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        "postgres": "fsync on, synchronous_commit on, same machine",
        "command": "make bench (bench/spool.py)",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        conn = await asyncpg.connect(pg.url)  # kept: polling must not cost a connect each time
        await migrate(conn)
        settings = WorkerSettings(
            database_url=pg.url, redis_url=rd.url,  # type: ignore[arg-type]
            local_key_dir=work / "keys", consumer_name="bench-spool", log_level="warning",
            http_host=HOST, http_port=0, intake_port=0,
            intake_tokens=[TOKEN],  # type: ignore[list-item]
        )
        service = Service(settings, create_keys=True, serve_http=True)
        task = asyncio.create_task(service.run(install_signal_handlers=False))
        await wait_for("worker started", _started(service))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        clients = {
            "asgi": httpx.AsyncClient(
                transport=httpx.ASGITransport(app=service.app), base_url="http://worker",
                headers=auth, timeout=30,
            ),
            "tcp": httpx.AsyncClient(
                base_url=f"http://{HOST}:{service.intake_port}", headers=auth, timeout=30
            ),
        }

        async def spool_depth() -> int:
            return int(await conn.fetchval("SELECT count(*) FROM audit.intake_spool"))

        async def events() -> int:
            return int(await conn.fetchval("SELECT count(*) FROM audit.events"))

        async def redis_breaker_open() -> bool:
            return service.breakers["redis"].state is BreakerState.OPEN

        with console.status("stream: POST /v1/events with Redis up"):
            results["stream"] = await both(clients, spooled=False, first=0)
            total = await events()
        with console.status("spool: POST /v1/events with Redis killed"):
            rd.kill()
            await wait_for("redis breaker open", redis_breaker_open, 20)
            results["spool"] = await both(clients, spooled=True, first=1_000_000)
            spooled = await spool_depth()
            before = await events()
        with console.status(f"catch-up: {spooled:,} spooled events into the log"):
            back = time.perf_counter()
            rd.start()
            await wait_for("spool drained", lambda: _is_zero(spool_depth), 120)
            drained_s = time.perf_counter() - back
            await wait_for("all stored", lambda: _at_least(events, before + spooled), 30)
            row = await conn.fetchrow(
                "SELECT min(recorded), max(recorded), count(DISTINCT recorded)"
                " FROM audit.events WHERE log_index >= $1", before,
            )
            assert row is not None
            first, last, batches = row
            span = (last - first).total_seconds()
            per_batch = spooled / max(1, batches)  # the first batch's commit is not in the span
            results["catch_up"] = {
                "spooled_events": spooled,
                "stream_events_before": total,
                "redis_back_to_empty_s": drained_s,
                "sustained_events_per_s": (spooled - per_batch) / span if span > 0
                else float("nan"),
                "commits": batches,
            }
        for client in clients.values():
            await client.aclose()
        await conn.close()
        service.stop_event.set()
        await asyncio.wait_for(task, 60)
    finally:
        rd.stop()
        pg.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "spool.json").write_text(json.dumps(results, indent=2, default=str))
    table = Table("POST /v1/events", "stream (Redis up)", "spool (Redis down)",
                  title=f"stream vs. spool — {results['machine']}")
    for via in ("asgi", "tcp"):
        for kind, label in (("single", "1 event"), ("batch_100", "100 events")):
            cells = []
            for side in ("stream", "spool"):
                r = results[side][via][kind]
                cells.append(f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms"
                             f" (n={r['requests']})")
            table.add_row(f"{label}, {via}", *cells)
    c = results["catch_up"]
    table.add_row(
        "catch-up after Redis returns", "",
        f"{c['spooled_events']:,} events: {c['sustained_events_per_s']:,.0f}/s sustained,"
        f" spool empty {c['redis_back_to_empty_s']:.2f} s after Redis was back",
    )
    console.print(table)


def _started(service: Service) -> Any:
    async def check() -> bool:
        return service.status.phase != "starting" and service.intake_port is not None

    return check


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)


async def _is_zero(count: Any) -> bool:
    return bool(await count() == 0)


if __name__ == "__main__":
    asyncio.run(main())

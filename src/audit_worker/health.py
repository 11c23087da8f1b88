"""Health of one worker process: what the main loop reports, and the five checks.

=========== ===================== ======= =====================================================
endpoint    kubelet / monitoring  timeout fails when
=========== ===================== ======= =====================================================
/livez      liveness, startup     5 s     the main loop has not moved for
                                          ``liveness_stall_seconds`` (the process is wedged)
/readyz     readiness             3 s     the worker cannot make progress: still starting,
                                          shutting down, writer stopped by an integrity
                                          failure, a circuit breaker open (PostgreSQL, Redis,
                                          KMS), or PostgreSQL / Redis not answering a ping
/healthz/database   monitoring    10 s    no connection, ``SELECT 1`` fails, schema not current
/healthz/redis      monitoring    5 s     no PING answer, stream or consumer group unreadable
/healthz/external   monitoring    15 s    KMS keys not enabled / unreachable (kms backend),
                                          key files unreadable (local backend), the archive
                                          bucket unreachable (when ``archive_bucket`` is set)
=========== ===================== ======= =====================================================

Each check finishes within its budget (a little under the probe timeout) and answers JSON
that says what is wrong: ``{"status": "fail", "problems": ["..."], ...}`` with HTTP 503.

An idle blue-green slot (the control key names the other slot) is *ready*: it can take over
the moment the key is switched, and the promotion workflow waits for the idle slot's
readiness before switching. ``slot.active`` in the readiness body tells the two apart.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import asyncpg
from redis.asyncio import Redis

from audit_worker import tls
from audit_worker.config import WorkerSettings
from audit_worker.db import migrate as migrations
from audit_worker.db.credentials import settings_password
from audit_worker.resilience import BreakerState, CircuitBreaker, Dependency, describe_error
from audit_worker.slots import SlotDecision

Phase = Literal["starting", "running", "stopping", "stopped", "halted"]

# Budgets: a little under the probe timeouts of the design's table (5, 3, 10, 5, 15 s).
LIVENESS_BUDGET = 4.0
READINESS_BUDGET = 2.5
DATABASE_BUDGET = 8.0
REDIS_BUDGET = 4.0
EXTERNAL_BUDGET = 12.0
PING_TIMEOUT = 1.0


@dataclass
class ServiceStatus:
    """What the main loop reports; read by the health checks. One per worker."""

    slot: str | None = None
    phase: Phase = "starting"
    started_at: float = field(default_factory=time.monotonic)
    heartbeat: float = field(default_factory=time.monotonic)
    startup_problem: str | None = None
    integrity_failure: str | None = None
    configuration_problem: str | None = None  # a configuration error halts the writer
    decision: SlotDecision | None = None
    batches: int = 0
    last_batch_at: float | None = None  # wall clock

    def beat(self) -> None:
        self.heartbeat = time.monotonic()


@dataclass
class CheckResult:
    ok: bool
    body: dict[str, Any]

    @property
    def status_code(self) -> int:
        return 200 if self.ok else 503


def _result(check: str, started: float, problems: list[str], **details: Any) -> CheckResult:
    ok = not problems
    body: dict[str, Any] = {
        "status": "ok" if ok else "fail",
        "check": check,
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
        "problems": problems,
    }
    body.update(details)
    return CheckResult(ok, body)


async def _within(budget: float, what: str, coro: Awaitable[Any]) -> tuple[Any, str | None]:
    """Run `coro` within `budget` seconds: (value, None) or (None, problem)."""
    try:
        return await asyncio.wait_for(coro, timeout=budget), None
    except TimeoutError:
        return None, f"{what}: no answer within {budget:g}s"
    except Exception as exc:
        return None, f"{what}: {describe_error(exc)}"


class HealthChecks:
    """The five checks, on the worker's own connections where it has them."""

    def __init__(
        self,
        settings: WorkerSettings,
        status: ServiceStatus,
        breakers: dict[Dependency, CircuitBreaker],
        redis: Redis,
        pool: Callable[[], asyncpg.Pool | None],
        *,
        aws_clients: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.status = status
        self.breakers = breakers
        self.redis = redis
        self._pool = pool
        self._aws: dict[str, Any] = dict(aws_clients or {})
        """service -> boto3 client, built on first use (tests pass stubbed clients)."""

    # ---- liveness
    async def liveness(self) -> CheckResult:
        started = time.perf_counter()
        stalled = time.monotonic() - self.status.heartbeat
        problems = []
        if stalled > self.settings.liveness_stall_seconds and self.status.phase != "halted":
            problems.append(
                f"main loop has not moved for {stalled:.0f}s "
                f"(limit {self.settings.liveness_stall_seconds:g}s): the worker is wedged"
            )
        return _result(
            "liveness", started, problems, phase=self.status.phase,
            loop_idle_seconds=round(stalled, 3),
            uptime_seconds=round(time.monotonic() - self.status.started_at, 1),
        )

    # ---- readiness
    def _slot(self) -> dict[str, Any]:
        decision = self.status.decision
        if decision is None:
            return {"name": self.status.slot, "active": False, "state": "unknown", "epoch": None}
        return {
            "name": self.status.slot,
            "active": decision.active,
            "state": decision.reason,
            "epoch": decision.value.epoch if decision.value else None,
            "highest_epoch_seen": decision.highest_epoch,
            "detail": decision.describe(),
        }

    def _breakers(self) -> dict[str, Any]:
        return {name: b.describe() for name, b in self.breakers.items()}

    async def _ping_database(self) -> float:
        started = time.perf_counter()
        pool = self._pool()
        if pool is not None:
            async with pool.acquire(timeout=PING_TIMEOUT) as pooled:
                await pooled.fetchval("SELECT 1", timeout=PING_TIMEOUT)
        else:
            conn = await tls.connect(
                self.settings.database_url.get_secret_value(), timeout=PING_TIMEOUT,
                password=settings_password(self.settings),
                ca_file=self.settings.database_ca_file,
            )
            try:
                await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT)
            finally:
                await conn.close()
        return round((time.perf_counter() - started) * 1000, 1)

    async def _ping_redis(self) -> float:
        started = time.perf_counter()
        await self.redis.ping()
        return round((time.perf_counter() - started) * 1000, 1)

    async def readiness(self) -> CheckResult:
        started = time.perf_counter()
        status = self.status
        problems: list[str] = []
        if status.phase == "starting":
            problems.append(
                "starting: " + (status.startup_problem or "connecting to PostgreSQL and Redis")
            )
        elif status.phase in ("stopping", "stopped"):
            problems.append("shutting down")
        if status.integrity_failure:
            problems.append(f"writer stopped by an integrity failure: {status.integrity_failure}")
        if status.configuration_problem and status.phase != "starting":
            problems.append(f"writer halted: {status.configuration_problem}")
        for name, breaker in self.breakers.items():
            state = breaker.state
            if state is not BreakerState.CLOSED:  # open, or half-open: not proven back yet
                word = "open" if state is BreakerState.OPEN else "half-open (probing)"
                problems.append(
                    f"{name} circuit breaker {word} after {breaker.consecutive_failures} "
                    f"failure(s): {breaker.last_error or 'unknown error'}"
                )
        (db_ms, db_problem), (redis_ms, redis_problem) = await asyncio.gather(
            _within(PING_TIMEOUT + 0.2, "database ping", self._ping_database()),
            _within(PING_TIMEOUT + 0.2, "redis ping", self._ping_redis()),
        )
        problems += [p for p in (db_problem, redis_problem) if p]
        return _result(
            "readiness", started, problems,
            ready=not problems, phase=status.phase, slot=self._slot(),
            checks={
                "database": {"ok": db_problem is None, "latency_ms": db_ms},
                "redis": {"ok": redis_problem is None, "latency_ms": redis_ms},
            },
            breakers=self._breakers(),
        )

    # ---- database
    async def _database_details(self) -> dict[str, Any]:
        pool = self._pool()
        if pool is not None:
            async with pool.acquire(timeout=3) as pooled:
                return await self._inspect_database(pooled)
        conn = await tls.connect(self.settings.database_url.get_secret_value(), timeout=3,
                                 password=settings_password(self.settings),
                                 ca_file=self.settings.database_ca_file)
        try:
            return await self._inspect_database(conn)
        finally:
            await conn.close()

    @staticmethod
    async def _inspect_database(conn: Any) -> dict[str, Any]:
        version = await conn.fetchval("SHOW server_version")
        in_recovery = await conn.fetchval("SELECT pg_is_in_recovery()")
        schema_problem = None
        try:
            await migrations.require_current(conn)
        except Exception as exc:
            schema_problem = str(exc)
        head = None
        if schema_problem is None:
            row = await conn.fetchrow(
                "SELECT tree_size, timestamp_ms FROM audit.tree_heads "
                "ORDER BY tree_size DESC LIMIT 1"
            )
            if row is not None:
                head = {
                    "tree_size": row["tree_size"],
                    "age_seconds": round(time.time() - row["timestamp_ms"] / 1000, 1),
                }
        return {
            "server_version": version,
            "read_only_replica": bool(in_recovery),
            "schema_problem": schema_problem,
            "newest_tree_head": head,
        }

    async def database(self) -> CheckResult:
        started = time.perf_counter()
        details, problem = await _within(DATABASE_BUDGET - 1, "database", self._database_details())
        problems = [problem] if problem else []
        if details:
            if details["schema_problem"]:
                problems.append(f"schema: {details['schema_problem']}")
            if details["read_only_replica"]:
                problems.append("connected to a read-only replica (in recovery)")
        breaker = self.breakers["postgres"]
        if breaker.state is BreakerState.OPEN:
            problems.append(f"circuit breaker open: {breaker.last_error or 'unknown error'}")
        return _result(
            "database", started, problems, details=details, breaker=breaker.describe()
        )

    # ---- redis
    async def _redis_details(self) -> dict[str, Any]:
        info = await self.redis.info("server")
        details: dict[str, Any] = {"redis_version": info.get("redis_version")}
        stream = self.settings.stream
        details["stream_length"] = int(await self.redis.xlen(stream))
        group_found = False
        if details["stream_length"] or await self.redis.exists(stream):
            for group in await self.redis.xinfo_groups(stream):
                name = group["name"]
                name = name.decode() if isinstance(name, bytes) else name
                if name == self.settings.consumer_group:
                    group_found = True
                    lag = group.get("lag")
                    details["group"] = {
                        "name": name,
                        "pending": int(group["pending"]),
                        "lag": int(lag) if lag is not None else None,
                        "consumers": int(group["consumers"]),
                    }
        details["group_exists"] = group_found
        raw = await self.redis.get(self.settings.control_key)
        details["control_key_set"] = raw is not None
        return details

    async def redis_check(self) -> CheckResult:
        started = time.perf_counter()
        details, problem = await _within(REDIS_BUDGET - 0.5, "redis", self._redis_details())
        problems = [problem] if problem else []
        if details and not details["group_exists"] and self.status.phase == "running":
            problems.append(f"consumer group {self.settings.consumer_group!r} does not exist")
        breaker = self.breakers["redis"]
        if breaker.state is BreakerState.OPEN:
            problems.append(f"circuit breaker open: {breaker.last_error or 'unknown error'}")
        return _result("redis", started, problems, details=details, breaker=breaker.describe())

    # ---- external (KMS, S3)
    def _client(self, service: str) -> Any:
        if service not in self._aws:
            import boto3
            from botocore.config import Config

            self._aws[service] = boto3.client(
                service,
                region_name=self.settings.aws_region,
                endpoint_url=self.settings.aws_endpoint_url,
                config=Config(
                    connect_timeout=2, read_timeout=4, retries={"max_attempts": 1}
                ),
            )
        return self._aws[service]

    def _kms_key(self, key_id: str, usage: str) -> dict[str, Any]:
        meta = self._client("kms").describe_key(KeyId=key_id)["KeyMetadata"]
        state, key_usage = meta.get("KeyState"), meta.get("KeyUsage")
        problem = None
        if state != "Enabled":
            problem = f"key state is {state}, not Enabled"
        elif key_usage != usage:
            problem = f"key usage is {key_usage}, not {usage}"
        return {"key": key_id, "state": state, "usage": key_usage, "problem": problem}

    def _bucket(self, bucket: str) -> dict[str, Any]:
        self._client("s3").head_bucket(Bucket=bucket)
        return {"bucket": bucket, "problem": None}

    def _local_key(self, name: str) -> dict[str, Any]:
        path = self.settings.local_key_dir / name
        readable = path.is_file() and os.access(path, os.R_OK)
        return {"file": str(path), "problem": None if readable else "missing or unreadable"}

    async def _probe(self, what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        value, problem = await _within(EXTERNAL_BUDGET - 1, what, asyncio.to_thread(fn))
        if problem is not None:
            return {"problem": problem}
        assert isinstance(value, dict)
        return value

    async def external(self) -> CheckResult:
        started = time.perf_counter()
        s = self.settings
        probes: dict[str, Awaitable[dict[str, Any]]] = {}
        if s.key_backend == "kms":
            assert s.kms_data_key_id and s.kms_signing_key_id
            data_id, sign_id = s.kms_data_key_id, s.kms_signing_key_id
            probes["kms_data_key"] = self._probe(
                "KMS data key", lambda: self._kms_key(data_id, "ENCRYPT_DECRYPT")
            )
            probes["kms_signing_key"] = self._probe(
                "KMS signing key", lambda: self._kms_key(sign_id, "SIGN_VERIFY")
            )
        else:
            for name in ("master.key", "signing.pem"):
                probes[f"local_{name.split('.')[0]}_key"] = self._probe(
                    name, partial(self._local_key, name)
                )
        if s.archive_bucket:
            bucket = s.archive_bucket
            probes["s3_archive_bucket"] = self._probe("S3 bucket", lambda: self._bucket(bucket))
        results = dict(zip(probes, await asyncio.gather(*probes.values()), strict=True))
        problems = [f"{name}: {r['problem']}" for name, r in results.items() if r.get("problem")]
        breaker = self.breakers["kms"]
        if breaker.state is BreakerState.OPEN:
            problems.append(f"KMS circuit breaker open: {breaker.last_error or 'unknown error'}")
        return _result(
            "external", started, problems, key_backend=s.key_backend, details=results,
            breaker=breaker.describe(),
        )

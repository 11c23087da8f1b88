"""The ``local`` platform: the workflows' operations on `audit_worker.localenv.platform`.

Real processes on this machine: PostgreSQL primary and streaming replica, a Redis per site,
one ``audit-worker run`` process per running slot. Images are worker versions
(`image_spec`); DNS is the local endpoint record. Blocking process work (pg_ctl,
pg_rewind, stopping a worker) runs in a thread so the event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import orjson
from redis.asyncio import Redis

from audit_worker.client import AuditClient
from audit_worker.config import Slot
from audit_worker.crypto import LocalSigner
from audit_worker.db.migrate import load_migrations
from audit_worker.localenv.platform import (
    CONTROL_KEY,
    STREAM,
    LocalStack,
    apply_migrations,
    image_spec,
)
from audit_worker.localenv.replication import replication_status
from audit_worker.localenv.servers import HOST
from audit_worker.slots import ControlValue, activate, read_control
from auditctl.errors import EnvironmentNotRunning, PlatformError
from auditctl.gates import GateResult, MigrationPlan, plan_migrations
from auditctl.platform import (
    SLOTS,
    Probe,
    ReplicaInfo,
    SiteInfo,
    SlotInfo,
    StreamStats,
    Topology,
)
from auditctl.promotion import PromotionRecord
from auditctl.streams import acknowledged, handoff, stream_stats

ACTIVATE_READY_TIMEOUT = 30.0
MEMORY_PER_WORKER_MB = 256  # environments/local.yaml worker.memory_request


@asynccontextmanager
async def _redis(url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        yield client
    finally:
        await client.aclose()


class LocalPlatform:
    """`ReleasePlatform` and `FailoverPlatform` on this machine."""

    name = "local"

    def __init__(self, stack: LocalStack, environment: str = "local") -> None:
        self.stack = stack
        self.environment = environment
        self.log_id = stack.state.log_id

    @classmethod
    def open(cls, state_dir: Path, environment: str = "local") -> LocalPlatform:
        try:
            return cls(LocalStack(state_dir), environment)
        except FileNotFoundError as exc:
            raise EnvironmentNotRunning(str(exc)) from None

    @property
    def state_dir(self) -> Path:
        return self.stack.state_dir

    def _primary(self) -> str:
        return self.stack.refresh().primary

    # ------------------------------------------------------------------ release
    async def control(self, site: str | None = None) -> ControlValue | None:
        async with _redis(self.stack.site(site or self._primary()).redis_url) as redis:
            return await read_control(redis, CONTROL_KEY)

    async def slots(self) -> dict[Slot, SlotInfo]:
        site = self._primary()
        out: dict[Slot, SlotInfo] = {}
        for slot in SLOTS:
            worker = self.stack.site(site).workers[slot]
            running = self.stack.worker_running(site, slot)
            out[slot] = SlotInfo(
                slot, worker.image, 1 if worker.pid is not None else 0, 1 if running else 0,
                worker.started_at,
            )
        return out

    async def probe(self, slot: Slot, path: str, timeout: float = 3.0) -> Probe:
        return await self._probe(self.stack.worker_url(self._primary(), slot), path, timeout)

    async def slot_probe(self, site: str, path: str) -> Probe:
        control = await self.control(site)
        slot: Slot = control.slot if control else "blue"
        return await self._probe(self.stack.worker_url(site, slot), path, 3.0)

    @staticmethod
    async def _probe(base: str, path: str, timeout: float) -> Probe:
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                reply = await client.get(base + path)
        except httpx.HTTPError as exc:
            return Probe(0, None, f"no answer from {base}{path}: {type(exc).__name__}")
        if reply.headers.get("content-type", "").startswith("application/json"):
            return Probe(reply.status_code, reply.json())
        return Probe(reply.status_code, reply.text)

    async def migration_plan(self, image: str, *, old_slot: Slot) -> MigrationPlan:
        conn = await asyncpg.connect(await self.database_url())
        try:
            exists = await conn.fetchval(
                "SELECT to_regclass('audit.schema_migrations') IS NOT NULL"
            )
            applied = (
                [r["version"] for r in await conn.fetch(
                    "SELECT version FROM audit.schema_migrations")]
                if exists else []
            )
        finally:
            await conn.close()
        wanted = [*load_migrations(), *image_spec(image).migrations]
        return plan_migrations(
            applied, wanted, old_slot=old_slot,
            old_slot_running=self.stack.worker_running(self._primary(), old_slot),
        )

    async def apply_migrations(self, image: str, plan: MigrationPlan) -> list[str]:
        if not plan.ok:
            raise PlatformError(plan.reason or "migration plan refused")
        packaged = {m.version for m in load_migrations()}
        extra = tuple(m for m in plan.to_apply if m.version not in packaged)
        conn = await asyncpg.connect(await self.database_url())
        try:
            return await apply_migrations(conn, extra)
        finally:
            await conn.close()

    async def deploy(self, slot: Slot, image: str) -> None:
        await asyncio.to_thread(self.stack.start_worker, self._primary(), slot, image)

    async def scale_down(self, slot: Slot) -> None:
        await asyncio.to_thread(self.stack.stop_worker, self._primary(), slot)

    async def switch(self, slot: Slot, *, expected_epoch: int) -> int:
        async with _redis(self.stack.site(self._primary()).redis_url) as redis:
            return await activate(redis, CONTROL_KEY, slot, expected_epoch=expected_epoch)

    async def submit_events(
        self, events: Sequence[Mapping[str, Any]], *, via_slot: Slot | None
    ) -> list[str]:
        site = self._primary()
        if via_slot is None:
            return await self._to_stream(site, events)
        url = self.stack.intake_url(site, via_slot) + "/v1/events"
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.post(
                url, content=orjson.dumps(list(events)),
                headers={"Authorization": f"Bearer {self.stack.intake_token}",
                         "Content-Type": "application/json"},
            )
        if reply.status_code != 202:
            raise PlatformError(f"{via_slot}'s intake answered {reply.status_code}: "
                                f"{reply.text[:300]}")
        # A spooled event (Redis down) has no stream entry id yet: nothing to look up.
        return [str(r["stream_id"]) for r in reply.json()["results"] if r.get("stream_id")]

    async def _to_stream(self, site: str, events: Sequence[Mapping[str, Any]]) -> list[str]:
        async with _redis(self.stack.site(site).redis_url) as redis:
            logged = await AuditClient(redis, stream=STREAM).log_many(events)
        return [e.stream_id for e in logged]

    async def database_url(self, site: str | None = None) -> str:
        return self.stack.site(site or self._primary()).database_url

    async def public_key_pem(self, site: str | None = None) -> bytes:
        key_dir = Path(self.stack.site(site or self._primary()).key_dir)
        signer = await asyncio.to_thread(LocalSigner, key_dir / "signing.pem")
        return signer.public_key_pem()

    @asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        with (self.state_dir / "promotion.lock").open("a") as handle:
            await asyncio.to_thread(fcntl.flock, handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _promotion_file(self) -> Path:
        return self.state_dir / f"promotion-{self._primary()}.json"

    async def load_promotion(self) -> PromotionRecord | None:
        try:
            data = json.loads(self._promotion_file().read_text())
        except FileNotFoundError:
            return None
        return PromotionRecord.from_dict(data)

    async def save_promotion(self, record: PromotionRecord) -> None:
        path = self._promotion_file()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record.to_dict(), indent=2))
        os.replace(tmp, path)

    async def stream_stats(self, site: str | None = None) -> StreamStats:
        async with _redis(self.stack.site(site or self._primary()).redis_url) as redis:
            return await stream_stats(redis)

    async def replica(self) -> ReplicaInfo | None:
        state = self.stack.refresh()
        primary, replica = state.primary, state.replica
        try:
            rows = await replication_status(self.stack.site(primary).database_url)
        except (OSError, asyncpg.PostgresError) as exc:
            return ReplicaInfo(primary, replica, f"primary unreachable ({exc})", None, None)
        row = next((r for r in rows if r.application_name == replica), None)
        if row is None:
            running = self.stack.node(replica).is_running()
            return ReplicaInfo(primary, replica, "not streaming" if running else "stopped",
                               None, None)
        return ReplicaInfo(primary, replica, row.state, row.lag_bytes, row.replay_lag_seconds)

    # ------------------------------------------------------------------ failover
    async def topology(self) -> Topology:
        state = self.stack.refresh()
        endpoint = self.stack.endpoints().intake_site
        sites = {}
        for name in state.sites:
            node = self.stack.node(name)
            role: Any
            if not node.is_running():
                role = "stopped"
            elif name == state.primary:
                role = "primary"
            else:
                role = "replica" if node.is_standby() else "unknown"
            running = sum(self.stack.worker_running(name, s) for s in SLOTS)
            sites[name] = SiteInfo(name, role, running, endpoint == name)
        replica = state.replica if sites[state.replica].database_role == "replica" else None
        return Topology(state.primary, replica, endpoint, sites)

    def describe_steps(self) -> dict[str, str]:
        return {
            "rebuild": "stop the old primary's PostgreSQL; pg_rewind -R from the primary; "
                       "start it as a standby and wait until it streams",
            "preflight": "heartbeat row on the primary (auditctl.heartbeat) read back on the "
                         "replica; free memory and ports for the target's workers; the "
                         "target's key directory verifies the source's newest signed head",
            "freeze": "SIGTERM the source's worker processes (both slots)",
            "catch-up": "pg_last_wal_replay_lsn() on the replica >= pg_current_wal_insert_lsn() "
                        "on the primary",
            "promote": "SELECT pg_promote(true) on the replica's PostgreSQL",
            "fence": "pg_ctl stop on the old primary",
            "activate": "start the target's active slot (audit-worker run) with the "
                        "source's image and raise the target's control-key epoch",
            "switch-endpoint": "rewrite .local/platform/endpoints.json (the local stand-in for "
                               "the Route 53 failover records); producers re-read it after "
                               "its TTL",
            "handoff": "XRANGE the source stream after the group's last-delivered id (and its "
                       "pending entries), XADD them to the target's stream",
            "canary": "XADD canary events to the target's Redis; inclusion proofs against "
                      "the target's newest signed tree head",
            "consistency": "consistency proof from the target's leaves between the source's "
                           "last signed head and the target's newest",
            "rpo": "event ids in the source's stream and log since the window start, "
                   "looked up in the target's log",
            "restore-replica": "pg_rewind -R the other site from the primary; start it as a "
                               "standby",
        }

    async def capacity(self, site: str) -> GateResult:
        record = self.stack.site(site)
        problems = []
        try:
            async with _redis(record.redis_url) as redis:
                await redis.ping()
        except Exception as exc:
            problems.append(f"{site}'s Redis does not answer: {exc}")
        for slot, worker in record.workers.items():
            if not self.stack.worker_running(site, slot) and not _port_free(worker.port):
                problems.append(f"port {worker.port} for {site}/{slot} is taken")
        available = _mem_available_mb()
        if available is not None and available < MEMORY_PER_WORKER_MB:
            problems.append(f"only {available} MB of memory available, a worker asks "
                            f"{MEMORY_PER_WORKER_MB} MB")
        return GateResult(
            "capacity", "drill", not problems,
            "; ".join(problems) or f"{site}: Redis answers, worker ports free, "
            f"{available} MB memory available, {os.cpu_count()} CPUs",
            measured={"memory_mb": available, "cpus": os.cpu_count()},
        )

    async def freeze(self, site: str) -> str:
        stopped = []
        for slot in SLOTS:
            if await asyncio.to_thread(self.stack.stop_worker, site, slot):
                stopped.append(slot)
        return f"stopped {site}'s " + (", ".join(stopped) or "no") + " worker(s)"

    async def unfreeze(self, site: str) -> str:
        control = await self.control(site)
        if control is None:
            raise PlatformError(f"{site} has no control key: no slot to restart")
        image = self.stack.site(site).workers[control.slot].image
        await asyncio.to_thread(self.stack.start_worker, site, control.slot, image)
        return f"{site}/{control.slot} ({image}) started again"

    async def promote_database(self, site: str) -> str:
        if site != self.stack.refresh().replica:
            raise PlatformError(f"{site} does not hold the replica")
        seconds = await asyncio.to_thread(self.stack.promote_replica)
        return f"pg_promote() on {site}'s PostgreSQL: writable after {seconds * 1000:.0f} ms"

    async def fence(self, site: str) -> str:
        await asyncio.to_thread(self.stack.fence, site)
        return f"{site}'s PostgreSQL stopped"

    async def activate(self, site: str) -> str:
        """Start the target's active slot with the source's active image and raise the
        target's control-key epoch.

        A fresh process, not a pilot light waiting on the read-only replica: such a worker
        loads its compact range once, at start, and after the promotion would sign that
        stale size (a tree head older than the log, with a newer timestamp) before its
        first batch catches it up."""
        source = "prod" if site == "dr" else "dr"
        control = await self.control(source)
        slot: Slot = control.slot if control else "blue"
        image = self.stack.site(source).workers[slot].image
        async with _redis(self.stack.site(site).redis_url) as redis:
            epoch = await activate(redis, CONTROL_KEY, slot)
        await asyncio.to_thread(self.stack.start_worker, site, slot, image)
        started = time.monotonic()
        url = self.stack.worker_url(site, slot)
        while time.monotonic() - started < ACTIVATE_READY_TIMEOUT:
            if (await self._probe(url, "/readyz", 1.0)).ok:
                return (f"{site}/{slot} runs {image}, control epoch {epoch}; ready after "
                        f"{time.monotonic() - started:.1f}s")
            await asyncio.sleep(0.05)
        raise PlatformError(f"{site}/{slot} not ready within {ACTIVATE_READY_TIMEOUT:g}s")

    async def switch_endpoint(self, site: str) -> tuple[str, float]:
        endpoints = await asyncio.to_thread(self.stack.set_endpoints, cast(Any, site))
        return (f"endpoint record serial {endpoints.serial}: intake and database name {site}",
                endpoints.ttl_seconds)

    async def handoff(self, source: str, target: str) -> int:
        async with _redis(self.stack.site(source).redis_url) as src, \
                _redis(self.stack.site(target).redis_url) as dst:
            return await handoff(src, dst)

    async def submit_canaries(self, site: str, events: Sequence[Mapping[str, Any]]) -> None:
        await self._to_stream(site, events)

    async def acknowledged(self, site: str, since: float) -> set[str]:
        async with _redis(self.stack.site(site).redis_url) as redis:
            return await acknowledged(redis, since)

    async def rebuild_replica(self, site: str) -> str:
        output = await asyncio.to_thread(self.stack.rebuild_replica, site)
        last = [line for line in output.splitlines() if line.startswith("pg_rewind:")]
        return "; ".join(line.removeprefix("pg_rewind: ") for line in last[-3:])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _mem_available_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None

"""The local platform: two "sites" of the audit log on this machine, for real.

``prod`` and ``dr`` each have a PostgreSQL server, a Redis server, a key directory and two
blue-green worker slots. Prod's PostgreSQL is the primary; DR's is a real streaming replica
of it (``pg_basebackup -R``), promoted with ``pg_promote()`` in a drill and rebuilt with
``pg_rewind`` on failback (see `audit_worker.localenv.replication`). A worker slot is an
``audit-worker run`` process with ``AUDIT_SLOT`` set and its own ``AUDIT_HTTP_PORT`` and
``AUDIT_INTAKE_PORT``.

What is modelled rather than real, and how:

* **Images** are worker *versions*: a tag names a worker process plus settings, see
  `image_spec`. A tag ending in ``-broken`` is a worker whose database address is wrong,
  so it starts but never becomes ready; ``-contract`` ships a contract migration (the
  release workflow must refuse it while the old slot runs); ``-expand`` ships an expand
  migration. Every other tag is the worker as built.
* **DNS** is a local "endpoint record", ``endpoints.json`` in the state directory: which
  site's Redis takes events (the intake record) and which site's database is the log (the
  database record), with a serial number and a TTL that producers honour
  (`FollowingProducer`). Switching it is what a Route 53 failover does.
* **DR keys** are a copy of prod's key directory made once at start-up (as KMS multi-region
  replica keys are copies of prod's keys); a drill checks they still match.

All of it is recorded in ``state.json`` (ports, process ids, directories, which site is the
primary) under the state directory, normally ``.local/platform`` of the checkout, so that
separate ``auditctl`` commands find the same environment. ``LocalStack.up`` starts it and
``LocalStack.down`` stops it; in between, servers and workers outlive the command that
started them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import asyncpg
from redis.asyncio import Redis

from audit_worker.config import Slot
from audit_worker.crypto import LocalKeyWrapper, LocalSigner
from audit_worker.db.migrate import Migration, load_migrations, migrate
from audit_worker.localenv.replication import Node, detach, promote
from audit_worker.localenv.servers import (
    HOST,
    RedisServer,
    _pid_alive,
    _run_coroutine,
    _wait_dead,
    free_port,
)
from audit_worker.localenv.workload import malformed_event, synthetic_event
from audit_worker.slots import activate

__all__ = [
    "CONTROL_KEY",
    "SITES",
    "STREAM",
    "Endpoints",
    "FollowingProducer",
    "ImageSpec",
    "LocalPorts",
    "LocalStack",
    "SiteRecord",
    "StackState",
    "WorkerRecord",
    "apply_migrations",
    "image_spec",
    "read_endpoints",
]

Site = Literal["prod", "dr"]
SITES: tuple[Site, Site] = ("prod", "dr")
SLOTS: tuple[Slot, Slot] = ("blue", "green")
STREAM = "audit:events"
GROUP = "audit-workers"
CONTROL_KEY = "audit:control:active-slot"
STATE_FILE = "state.json"
ENDPOINTS_FILE = "endpoints.json"
TOKEN_FILE = "intake-token"
ENDPOINT_TTL_SECONDS = 0.5
UNREACHABLE_DATABASE = "postgresql://postgres@127.0.0.1:1/postgres"


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageSpec:
    """What a tag means on the local platform (see the module docstring)."""

    tag: str
    env: dict[str, str] = field(default_factory=dict)
    migrations: tuple[Migration, ...] = ()
    description: str = "the worker as built"


def _extra_migration(kind: Literal["expand", "contract"], tag: str) -> Migration:
    version = len(load_migrations()) + 1
    if kind == "expand":
        name = "dead_letter_triage"
        sql = (
            "-- kind: expand\n"
            "ALTER TABLE audit.dead_letters ADD COLUMN IF NOT EXISTS triaged_at timestamptz;\n"
        )
    else:
        name = "drop_actor_index"
        sql = "-- kind: contract\nDROP INDEX IF EXISTS audit.events_actor_idx;\n"
    return Migration(version, f"{name}_{tag.replace('.', '_').replace('-', '_')}"[:60], kind, sql)


def image_spec(tag: str) -> ImageSpec:
    """The local meaning of an image tag. Pure."""
    if tag.endswith("-broken"):
        return ImageSpec(
            tag, {"AUDIT_DATABASE_URL": UNREACHABLE_DATABASE},
            description="starts, but its database address is wrong: never ready",
        )
    if tag.endswith("-contract"):
        return ImageSpec(
            tag, migrations=(_extra_migration("contract", tag),),
            description="ships a contract migration (drops an index the old slot uses)",
        )
    if tag.endswith("-expand"):
        return ImageSpec(
            tag, migrations=(_extra_migration("expand", tag),),
            description="ships an expand migration (adds a nullable column)",
        )
    return ImageSpec(tag)


async def apply_migrations(conn: asyncpg.Connection, extra: tuple[Migration, ...]) -> list[str]:
    """Apply the packaged migrations, then an image's own ones, each in a transaction.

    The local stand-in for the new image's ``audit-worker migrate`` Job: the packaged set
    goes through `audit_worker.db.migrate.migrate` (expand only), the image's extra
    migrations are recorded in the same ``audit.schema_migrations`` table. The caller has
    already refused contract migrations (`auditctl.gates.plan_migrations`).
    """
    applied = [f"{m.version:04d}_{m.name}" for m in await migrate(conn)]
    done = {r["version"] for r in await conn.fetch("SELECT version FROM audit.schema_migrations")}
    for m in extra:
        if m.version in done:
            continue
        async with conn.transaction():
            await conn.execute(m.sql)
            await conn.execute(
                "INSERT INTO audit.schema_migrations (version, name, kind, checksum)"
                " VALUES ($1, $2, $3, $4)",
                m.version, m.name, m.kind, m.checksum,
            )
        applied.append(f"{m.version:04d}_{m.name}")
    return applied


# --------------------------------------------------------------------------- state


@dataclass
class WorkerRecord:
    slot: Slot
    image: str
    port: int
    pid: int | None = None
    started_at: float | None = None
    log: str = ""
    intake_port: int = 0  # POST /v1/events has its own listener; 0 (older state): any port


@dataclass
class SiteRecord:
    name: Site
    pg_port: int
    pg_dir: str
    redis_port: int
    redis_dir: str
    redis_pid: int | None
    key_dir: str
    workers: dict[str, WorkerRecord]
    redis_run_dir: str = ""  # redis.conf and redis.log (a temp dir RedisServer chose)

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.pg_port}/postgres"

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.redis_port}/0"


@dataclass
class StackState:
    state_dir: str
    log_id: str
    fast: bool
    primary: Site
    sites: dict[str, SiteRecord]
    created_at: float
    version: int = 1

    def site(self, name: str) -> SiteRecord:
        return self.sites[name]

    @property
    def replica(self) -> Site:
        return "dr" if self.primary == "prod" else "prod"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StackState:
        data = json.loads(text)
        sites = {
            name: SiteRecord(
                **{k: v for k, v in site.items() if k != "workers"},
                workers={slot: WorkerRecord(**w) for slot, w in site["workers"].items()},
            )
            for name, site in data.pop("sites").items()
        }
        return cls(sites=sites, **data)


@dataclass(frozen=True)
class Endpoints:
    """The local "DNS": where producers send events and where the log database is."""

    intake_site: Site
    intake_url: str
    database_site: Site
    database_url: str
    serial: int
    changed_at: float
    ttl_seconds: float = ENDPOINT_TTL_SECONDS


def read_endpoints(state_dir: Path) -> Endpoints:
    return Endpoints(**json.loads((state_dir / ENDPOINTS_FILE).read_text()))


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


@dataclass(frozen=True)
class LocalPorts:
    """TCP ports of one local platform; `LocalPorts.free` picks unused ones (tests)."""

    prod_postgres: int
    dr_postgres: int
    prod_redis: int
    dr_redis: int
    workers: dict[str, int]  # "<site>-<slot>" -> HTTP port

    @classmethod
    def free(cls) -> LocalPorts:
        return cls(
            free_port(), free_port(), free_port(), free_port(),
            {f"{site}-{slot}": free_port() for site in SITES for slot in SLOTS},
        )

    @classmethod
    def from_settings(cls, postgres: int, replica: int, redis: int) -> LocalPorts:
        """The ports of ``environments/local.yaml``; DR's Redis and the workers get free ones."""
        return cls(
            postgres, replica, redis, free_port(),
            {f"{site}-{slot}": free_port() for site in SITES for slot in SLOTS},
        )


# --------------------------------------------------------------------------- the stack

_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class LocalStack:
    """The local platform's state and the operations on its processes.

    Every method that changes the state takes the state file's lock, so two ``auditctl``
    commands (a promotion waiting out its scale-down delay and a rollback) can share it.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.resolve()
        self.state = self._read()

    # ---- state file
    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def _read(self) -> StackState:
        try:
            return StackState.from_json(self.state_file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no local environment in {self.state_dir}: start one with `auditctl local up`"
            ) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[StackState]:
        """Re-read the state under the lock, yield it, write it back."""
        lock = self.state_dir / "state.lock"
        with lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self.state = self._read()
                yield self.state
                _write_atomic(self.state_file, self.state.to_json())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def refresh(self) -> StackState:
        self.state = self._read()
        return self.state

    @staticmethod
    def exists(state_dir: Path) -> bool:
        return (state_dir / STATE_FILE).exists()

    # ---- addresses
    def site(self, name: str) -> SiteRecord:
        return self.state.site(name)

    def node(self, name: str) -> Node:
        site = self.site(name)
        return Node(Path(site.pg_dir), site.pg_port, fast=self.state.fast)

    def worker_url(self, site: str, slot: str) -> str:
        """Health and metrics of a worker slot."""
        return f"http://{HOST}:{self.site(site).workers[slot].port}"

    def intake_url(self, site: str, slot: str) -> str:
        """The HTTP intake of a worker slot (its own listener)."""
        return f"http://{HOST}:{self.site(site).workers[slot].intake_port}"

    @property
    def intake_token(self) -> str:
        return (self.state_dir / TOKEN_FILE).read_text().strip()

    def endpoints(self) -> Endpoints:
        return read_endpoints(self.state_dir)

    def set_endpoints(self, site: Site) -> Endpoints:
        """Point the intake and database records at `site` (the local "DNS switch")."""
        try:
            serial = self.endpoints().serial + 1
        except FileNotFoundError:
            serial = 1
        record = self.site(site)
        endpoints = Endpoints(
            intake_site=site, intake_url=record.redis_url, database_site=site,
            database_url=record.database_url, serial=serial, changed_at=time.time(),
        )
        _write_atomic(self.state_dir / ENDPOINTS_FILE, json.dumps(asdict(endpoints), indent=2))
        return endpoints

    # ---- lifecycle
    @classmethod
    def up(
        cls,
        state_dir: Path,
        *,
        ports: LocalPorts | None = None,
        fast: bool = False,
        image: str = "0.1.0",
        slot: Slot = "blue",
        log_id: str = "audit-local",
    ) -> LocalStack:
        """Start both sites (prod primary, DR streaming replica) and prod's `slot` running
        `image`; return the stack. Refuses when a local environment already runs there."""
        state_dir = state_dir.resolve()
        if cls.exists(state_dir):
            raise FileExistsError(
                f"a local environment already exists in {state_dir}: `auditctl local down` first"
            )
        if any((state_dir / site).exists() for site in SITES):
            raise FileExistsError(
                f"{state_dir} holds the data of an earlier local environment: delete it with "
                "`auditctl local down --purge` (or choose another --state-dir)"
            )
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir.chmod(0o755)
        (state_dir / "logs").mkdir(exist_ok=True)
        ports = ports or LocalPorts.free()
        token = state_dir / TOKEN_FILE
        token.write_text(secrets.token_urlsafe(24))
        token.chmod(0o600)
        started: list[Any] = []
        try:
            sites: dict[str, SiteRecord] = {}
            for name, pg_port, redis_port in (
                ("prod", ports.prod_postgres, ports.prod_redis),
                ("dr", ports.dr_postgres, ports.dr_redis),
            ):
                site = cast(Site, name)
                redis = RedisServer(
                    redis_port, data_dir=state_dir / site / "redis", keep=True
                ).start()
                detach(redis)
                started.append(redis)
                sites[site] = SiteRecord(
                    name=site, pg_port=pg_port, pg_dir=str(state_dir / site / "postgres"),
                    redis_port=redis.port, redis_dir=str(state_dir / site / "redis"),
                    redis_pid=_redis_pid(redis.url), key_dir=str(state_dir / site / "keys"),
                    redis_run_dir=str(redis.log_file.parent),
                    workers={
                        s: WorkerRecord(
                            slot=s, image=image, port=ports.workers[f"{site}-{s}"],
                            log=str(state_dir / "logs" / f"{site}-{s}.log"),
                            intake_port=free_port(),
                        )
                        for s in SLOTS
                    },
                )
            prod = Node(Path(sites["prod"].pg_dir), ports.prod_postgres, fast=fast).start()
            detach(prod)
            started.append(prod)
            _run_coroutine(_migrate(prod.url, image_spec(image).migrations))
            prod_keys = Path(sites["prod"].key_dir)
            LocalKeyWrapper(prod_keys / "master.key", create=True)
            LocalSigner(prod_keys / "signing.pem", create=True)
            shutil.copytree(prod_keys, sites["dr"].key_dir)  # the "replica keys" in DR
            dr = Node(Path(sites["dr"].pg_dir), ports.dr_postgres, fast=fast)
            dr.clone_from(prod, application_name="dr")
            detach(dr)
            started.append(dr)
            state = StackState(
                state_dir=str(state_dir), log_id=log_id, fast=fast, primary="prod",
                sites=sites, created_at=time.time(),
            )
            _write_atomic(state_dir / STATE_FILE, state.to_json())
            stack = cls(state_dir)
            stack.set_endpoints("prod")
            _run_coroutine(_activate(sites["prod"].redis_url, slot))
            stack.start_worker("prod", slot, image)
            return stack
        except BaseException:
            for server in reversed(started):
                with contextlib.suppress(Exception):
                    server.stop(cleanup=False) if isinstance(server, Node) else server.stop()
            with contextlib.suppress(FileNotFoundError):
                (state_dir / STATE_FILE).unlink()
            raise

    def down(self, *, purge: bool = False) -> None:
        """Stop every worker, Redis and PostgreSQL of both sites; `purge` removes the data."""
        for name in SITES:
            for slot in SLOTS:
                self.stop_worker(name, slot, timeout=15)
            site = self.site(name)
            if site.redis_pid is not None and _pid_alive(site.redis_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(site.redis_pid, signal.SIGTERM)
                _wait_dead([site.redis_pid], 15)
            if site.redis_run_dir:
                shutil.rmtree(site.redis_run_dir, ignore_errors=True)
            node = self.node(name)
            if node.is_running():
                node.stop(cleanup=False)
        if purge:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        else:
            self.state_file.unlink(missing_ok=True)

    @property
    def archive_dir(self) -> Path:
        """The local platform's evidence store: witnessed heads and archived months."""
        return self.state_dir / "archive"

    # ---- workers
    def worker_env(self, site: str, slot: str, image: str) -> dict[str, str]:
        record = self.site(site)
        worker = record.workers[slot]
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AUDIT_")}
        env.update({
            "AUDIT_ENVIRONMENT": "local",
            "AUDIT_LOG_ID": self.state.log_id,
            "AUDIT_DATABASE_URL": record.database_url,
            "AUDIT_REDIS_URL": record.redis_url,
            "AUDIT_SLOT": slot,
            "AUDIT_CONSUMER_NAME": f"{site}-{slot}",
            "AUDIT_HTTP_HOST": HOST,
            "AUDIT_HTTP_PORT": str(worker.port),
            "AUDIT_INTAKE_PORT": str(worker.intake_port),
            "AUDIT_LOCAL_KEY_DIR": record.key_dir,
            # One directory stands for prod's Object Lock bucket and its DR replica
            # (replication is instant here; S3 Replication Time Control promises 15 min).
            "AUDIT_ARCHIVE_URL": str(self.archive_dir),
            "AUDIT_WITNESS_INTERVAL_SECONDS": "2",
            "AUDIT_INTAKE_TOKENS": self.intake_token,
            "AUDIT_BATCH_SIZE": "500",
            "AUDIT_SIGN_INTERVAL_SECONDS": "1",
            "AUDIT_SHUTDOWN_GRACE_SECONDS": "10",
            "AUDIT_STATS_INTERVAL_SECONDS": "1",
            "AUDIT_LOG_FORMAT": "json",
            "AUDIT_LOG_LEVEL": "info",
            "AUDITCTL_IMAGE": image,
        })
        env.update(image_spec(image).env)
        return env

    def start_worker(self, site: str, slot: str, image: str) -> WorkerRecord:
        """Start (or restart) `slot` at `site` running `image`; returns its record at once
        (readiness is the caller's to wait for)."""
        self.stop_worker(site, slot)
        with self.locked() as state:
            worker = state.site(site).workers[slot]
            log = Path(worker.log)
            with log.open("ab") as out:
                out.write(f"--- {time.strftime('%H:%M:%S')} start {image}\n".encode())
                proc = subprocess.Popen(
                    [sys.executable, "-m", "audit_worker.cli", "run"],
                    env=self.worker_env(site, slot, image), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
            _CHILDREN[proc.pid] = proc
            worker.image, worker.pid, worker.started_at = image, proc.pid, time.time()
            return worker

    def stop_worker(self, site: str, slot: str, *, timeout: float = 15.0) -> bool:
        """SIGTERM the slot's process (it finishes its batch and signs a final tree head),
        SIGKILL after `timeout`. True when a process was running."""
        with self.locked() as state:
            worker = state.site(site).workers[slot]
            pid, worker.pid, worker.started_at = worker.pid, None, None
        if pid is None or not _pid_alive(pid):
            _reap(pid)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if _wait_dead([pid], timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_dead([pid], 5)
        _reap(pid)
        return True

    def worker_running(self, site: str, slot: str) -> bool:
        pid = self.site(site).workers[slot].pid
        return pid is not None and _pid_alive(pid)

    # ---- databases
    def promote_replica(self) -> float:
        """``pg_promote()`` on the replica's site; record it as the primary."""
        replica = self.state.replica
        seconds = _run_coroutine(promote(self.site(replica).database_url))
        with self.locked() as state:
            state.primary = replica
        return seconds

    def fence(self, site: str) -> None:
        """Stop a site's PostgreSQL (the old primary after a failover: nothing may write to
        it until it is rebuilt as a replica)."""
        node = self.node(site)
        if node.is_running():
            node.stop(cleanup=False)

    def rebuild_replica(self, site: str) -> str:
        """Make the (stopped) database at `site` a standby of the current primary with
        pg_rewind; returns pg_rewind's account."""
        primary = self.state.primary
        if site == primary:
            raise ValueError(f"{site} is the primary: nothing to rebuild")
        return self.node(site).rewind_from(self.node(primary), application_name=site)


def _reap(pid: int | None) -> None:
    proc = _CHILDREN.pop(pid, None) if pid is not None else None
    if proc is not None:
        with contextlib.suppress(Exception):
            proc.wait(timeout=1)


def _redis_pid(url: str) -> int:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


async def _migrate(url: str, extra: tuple[Migration, ...]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn, extra)
    finally:
        await conn.close()


async def _activate(redis_url: str, slot: Slot) -> int:
    redis = Redis.from_url(redis_url)
    try:
        return await activate(redis, CONTROL_KEY, slot)
    finally:
        await redis.aclose()


# --------------------------------------------------------------------------- load


@dataclass
class FollowingProducer:
    """Synthetic events at `rate` per second to whichever Redis the intake record names.

    Like a producer behind DNS, it re-reads the record once its TTL has passed, so after a
    switch it keeps writing to the old site for up to one TTL. Every acknowledged XADD is
    kept with the site that acknowledged it (``acked``); failed writes are retried against
    a fresh lookup and counted in ``errors``.
    """

    state_dir: Path
    rate: float = 200.0
    chunk: int = 10
    malformed_every: int = 0  # every n-th entry is bad input (dead-lettered, not an event)
    acked: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SITES})
    errors: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def total(self) -> int:
        return sum(len(ids) for ids in self.acked.values())

    def all_ids(self) -> list[str]:
        return [i for ids in self.acked.values() for i in ids]

    async def run(self, limit: int | None = None) -> None:
        clients: dict[str, Redis] = {}
        endpoints = read_endpoints(self.state_dir)
        looked_up = time.monotonic()
        started = time.monotonic()
        n = 0
        try:
            while not self.stop.is_set() and (limit is None or n < limit):
                if time.monotonic() - looked_up >= endpoints.ttl_seconds:
                    endpoints, looked_up = read_endpoints(self.state_dir), time.monotonic()
                url = endpoints.intake_url
                client = clients.get(url) or clients.setdefault(url, Redis.from_url(url))
                numbers = range(n, n + self.chunk)
                bad = {i for i in numbers
                       if self.malformed_every and i % self.malformed_every == 0}
                batch = [synthetic_event(i) for i in numbers if i not in bad]
                try:
                    async with client.pipeline(transaction=True) as pipe:
                        for event in batch:
                            pipe.xadd(STREAM, {"event": json.dumps(event).encode()})
                        for i in bad:
                            pipe.xadd(STREAM, {"event": malformed_event(i)})
                        await pipe.execute()
                except Exception:  # Redis down or switched away: look up again and retry
                    self.errors += 1
                    looked_up = 0.0
                    await asyncio.sleep(0.05)
                    continue
                self.acked[endpoints.intake_site].extend(e["event_id"] for e in batch)
                n += self.chunk
                ahead = n / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), ahead)
        finally:
            for client in clients.values():
                await client.aclose()


@contextlib.asynccontextmanager
async def producing(
    state_dir: Path, rate: float, *, malformed_every: int = 0
) -> AsyncIterator[FollowingProducer]:
    """Run a `FollowingProducer` in the background for the duration of the block."""
    producer = FollowingProducer(state_dir, rate=rate, malformed_every=malformed_every)
    task = asyncio.create_task(producer.run(), name="local-producer")
    try:
        yield producer
    finally:
        producer.stop.set()
        await task


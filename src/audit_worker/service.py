"""Assemble a worker from settings and run it until told to stop.

`run` (and the `Service` behind it) is the worker process: the consumer loop, the tree-head
signer, background gauges, and, for `audit-worker run`, the HTTP server (health, metrics,
intake). How it behaves under failure:

* PostgreSQL down: the batch in hand is retried in memory (backoff with jitter, circuit
  breaker) without being re-read, so its delivery count does not grow; entries stay
  pending in the stream and are stored once PostgreSQL returns. Nothing new is read.
* Redis down: reads and acknowledgements are retried the same way; the Redis client
  reconnects by itself. A batch already committed is acknowledged once Redis is back
  (never committed twice: the sequencer skips event ids already in the log). The HTTP
  intake spools accepted events in PostgreSQL meanwhile (`audit_worker.db.spool`); the
  consumer moves them into the log in spool order, taking turns with the stream, once
  Redis answers again and the slot is active.
* KMS down: the failing call (data-key rotation, tree-head signing) is retried; events
  keep being stored with the current data key until it must rotate.
* Tamper, sequence or signature failure: the writer stops for good (no more reads, no more
  tree heads), ``audit_integrity_failures_total`` counts it, a critical log line says what
  failed, readiness turns false; the process stays up for the operator until stopped,
  then exits non-zero.
* SIGTERM: the batch in hand is finished and acknowledged, a final tree head is signed,
  and the process exits within ``shutdown_grace_seconds``.
* Blue-green: with ``slot`` set, the worker consumes only while the control key names
  its slot (see `audit_worker.slots`), re-checked before every batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import asyncpg
import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from audit_worker import tls
from audit_worker.config import WorkerSettings
from audit_worker.crypto import (
    DataKeyManager,
    FieldCipher,
    KeyUnavailableError,
    KeyWrapper,
    Pseudonymiser,
    SignatureError,
    TrustedKeys,
)
from audit_worker.db.credentials import IamTokenProvider, settings_password
from audit_worker.db.migrate import require_current
from audit_worker.db.spool import IntakeSpool, SpoolOpener
from audit_worker.db.store import LogStore, verify_dead_letter_chain
from audit_worker.errors import DependencyError, IntegrityError, MigrationError
from audit_worker.health import HealthChecks, ServiceStatus
from audit_worker.intake import StreamEntry, StreamIntake
from audit_worker.keyring import build_keys, trusted_keys
from audit_worker.metrics import Metrics
from audit_worker.objectstore import evidence_store
from audit_worker.records import RecordBuilder
from audit_worker.resilience import (
    DEPENDENCIES,
    BreakerOpen,
    CircuitBreaker,
    Dependency,
    acquire,
    call_with_retry,
    classify,
    configuration_hint,
    describe_error,
    postgres_error_kind,
    sleep_or_stop,
    sqlstate,
)
from audit_worker.slots import UNGATED, SlotDecision, SlotGate
from audit_worker.witness import DeadLetterChainTracker, WitnessLog, WitnessPublisher
from audit_worker.worker import BatchResult, CommittedBatch, Triaged, Worker

if TYPE_CHECKING:
    from fastapi import FastAPI

log = structlog.stdlib.get_logger("audit_worker")
HMAC_PURPOSE = "hmac"
INTEGRITY_FAILURES = (IntegrityError, SignatureError)
PROGRESS_LOG_SECONDS = 10.0
# How often the consumer looks for events another process's intake spooled (its own
# intake tells it at once). An indexed LIMIT query on an empty table: cheap.
SPOOL_POLL_SECONDS = 1.0
T = TypeVar("T")


async def open_pool(
    database_url: str,
    *,
    size: int = 4,
    command_timeout: float | None = None,
    server_settings: dict[str, str] | None = None,
    password: IamTokenProvider | None = None,
    ca_file: Path = tls.DEFAULT_DATABASE_CA_FILE,
) -> asyncpg.Pool:
    # password: None uses the URL's; a token provider is called for every new connection.
    # ca_file: the CA when the URL asks for sslmode=verify-full (audit_worker.tls).
    return await tls.create_pool(
        database_url, ca_file=ca_file, min_size=1, max_size=size,
        command_timeout=command_timeout, server_settings=server_settings, password=password,
    )


def session_timeouts(settings: WorkerSettings) -> dict[str, str]:
    """The server-side bounds of a worker session, in milliseconds. Sent at connection
    start, they take precedence over the login's own ``ALTER ROLE ... SET`` defaults."""
    return {
        "statement_timeout": str(round(settings.database_statement_timeout_seconds * 1000)),
        "idle_in_transaction_session_timeout": str(
            round(settings.database_idle_in_transaction_timeout_seconds * 1000)
        ),
    }


def redis_client(
    url: str, *, socket_timeout: float = 5.0, ca_file: Path | None = None
) -> Redis:
    """A Redis client that fails fast (one quick internal retry): the worker's own retry
    with backoff and its circuit breaker decide what happens next. ``rediss://`` checks
    the certificate and host name against `ca_file` and the system trust store."""
    return Redis.from_url(
        url,
        **tls.redis_options(url, ca_file),
        decode_responses=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2.0,
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=1),
        health_check_interval=30,
    )


async def load_hmac_key(store: LogStore, wrapper: KeyWrapper) -> bytes:
    """The log's pseudonymisation key: created once, then the same for every worker."""
    wrapped = await store.load_or_create_key(HMAC_PURPOSE, None)
    if wrapped is None:
        fresh = await asyncio.to_thread(wrapper.generate_data_key, HMAC_PURPOSE)
        wrapped = await store.load_or_create_key(HMAC_PURPOSE, fresh)
        assert wrapped is not None
    return await asyncio.to_thread(wrapper.unwrap, wrapped, HMAC_PURPOSE)


@dataclass
class Assembly:
    worker: Worker
    pool: asyncpg.Pool
    redis: Redis


@contextlib.asynccontextmanager
async def assemble(
    settings: WorkerSettings, *, create_keys: bool = False
) -> AsyncIterator[Assembly]:
    """Connect, check the schema, load keys and the log's compact range."""
    pool = await open_pool(
        settings.database_url.get_secret_value(),
        size=settings.database_pool_size,
        command_timeout=settings.database_command_timeout_seconds,
        server_settings=session_timeouts(settings),
        password=settings_password(settings),
        ca_file=settings.database_ca_file,
    )
    # The socket timeout must outlast a blocking XREADGROUP.
    redis = redis_client(
        settings.redis_url.get_secret_value(), socket_timeout=settings.block_ms / 1000 + 5,
        ca_file=settings.redis_ca_file,
    )
    try:
        async with pool.acquire(timeout=settings.database_acquire_timeout_seconds) as conn:
            await require_current(cast(asyncpg.Connection, conn))
            await conn.execute("SELECT audit.ensure_partitions(2)")
        store = LogStore(
            pool, settings.log_id, acquire_timeout=settings.database_acquire_timeout_seconds
        )
        await store.pin_log_id()
        wrapper, signer = build_keys(settings, create=create_keys)
        pseudonymiser = Pseudonymiser(await load_hmac_key(store, wrapper))
        cipher = FieldCipher()
        intake = StreamIntake(
            redis,
            stream=settings.stream,
            group=settings.consumer_group,
            consumer=settings.consumer_name,
            dead_letter_stream=settings.dead_letter_stream,
            claim_idle_ms=settings.claim_idle_ms,
        )
        await intake.ensure_group()
        # GetPublicKey for KMS: the key the resumed head must verify with (or a rotated-out
        # one from the trusted-keys file), and the one every signature is checked with.
        public_pem = await asyncio.to_thread(signer.public_key_pem)
        trusted = trusted_keys(settings, public_pem)
        worker = Worker(
            store=store,
            intake=intake,
            builder=RecordBuilder(pseudonymiser, cipher),
            cipher=cipher,
            data_keys=DataKeyManager(
                wrapper, rotate_after_seconds=settings.data_key_rotate_seconds
            ),
            signer=signer,
            frontier=await store.load_frontier(trusted),
            max_deliveries=settings.max_deliveries,
            max_future_skew=settings.max_future_skew_seconds,
            public_key_pem=public_pem,
        )
        yield Assembly(worker, pool, redis)
    finally:
        await redis.aclose()
        await pool.close()


class Service:
    """One worker process: consumer loop, signer, gauges and (optionally) HTTP.

    Tests build one directly to reach `app`, `metrics`, `status` and `health`; the CLI
    runs one with ``serve_http=True``.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        create_keys: bool = False,
        on_batch: Callable[[BatchResult], None] | None = None,
        serve_http: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.create_keys = create_keys
        self.on_batch = on_batch
        self.serve_http = serve_http
        self.metrics = metrics or Metrics()
        self.metrics.set_info(slot=settings.slot, log_id=settings.log_id)
        self.status = ServiceStatus(slot=settings.slot)
        self.breakers: dict[Dependency, CircuitBreaker] = {
            name: CircuitBreaker(
                name,
                failure_threshold=settings.breaker_failure_threshold,
                reset_seconds=settings.breaker_reset_seconds,
                on_change=self._breaker_changed,
            )
            for name in DEPENDENCIES
        }
        self.redis = redis_client(
            settings.redis_url.get_secret_value(), ca_file=settings.redis_ca_file
        )
        self.gate = (
            SlotGate(settings.slot, settings.control_key, bootstrap=settings.slot_bootstrap)
            if settings.slot is not None
            else None
        )
        self.parts: Assembly | None = None
        self.health = HealthChecks(
            settings, self.status, self.breakers, self.redis,
            lambda: self.parts.pool if self.parts is not None else None,
        )
        self.http_port: int | None = None
        self.intake_port: int | None = None
        self.stop_event = asyncio.Event()
        self._integrity_exc: BaseException | None = None
        self._app: FastAPI | None = None
        self._stats_intake = StreamIntake(
            self.redis, stream=settings.stream, group=settings.consumer_group,
            consumer=settings.consumer_name, dead_letter_stream=settings.dead_letter_stream,
        )
        self._progress = {"stored": 0, "dead_lettered": 0, "duplicates": 0}
        self._progress_at = time.monotonic()
        # The intake's PostgreSQL spool: when to look next, whether more rows are known to
        # wait, and how many were handed to the log since it was last found empty.
        self._spool_check_at = 0.0
        self._spool_backlog = False
        self._spool_moved = 0
        self._spool_opener: SpoolOpener | None = None
        # Spool rows that did not open (another master key, a missing data key, a changed
        # ciphertext): left in the spool, the only copy of an accepted event, and skipped
        # until `_spool_stuck_until`, when they are tried again.
        self._spool_stuck: set[int] = set()
        self._spool_stuck_until = 0.0
        # The newest head this worker signed (size, root, timestamp), for the witness.
        self._last_signed: tuple[int, bytes, int] | None = None
        self._witness_read_at = 0.0
        self._rollback_reported = -1
        self._trusted: TrustedKeys | None = None  # heads the gauges believe: set at start

    @property
    def app(self) -> FastAPI:
        if self._app is None:
            from audit_worker.http.app import create_app

            self._app = create_app(self)
        return self._app

    def note_spooled(self, count: int) -> None:
        """The intake spooled `count` events: drain before the next batch, not at the poll."""
        self._spool_backlog = True
        self.metrics.intake_spool_depth.inc(count)

    @property
    def worker(self) -> Worker | None:
        return self.parts.worker if self.parts is not None else None

    # ------------------------------------------------------------------ callbacks
    def _breaker_changed(self, name: str, state: Any) -> None:
        self.metrics.set_breaker(name, state)
        log.warning("circuit breaker changed", dependency=name, state=state.name.lower())

    def _on_retry(self, dependency: Dependency, exc: BaseException, wait: float) -> None:
        self.status.beat()
        self.metrics.retries.labels(dependency).inc()
        log.warning(
            "dependency call failed, retrying", dependency=dependency,
            error=describe_error(exc), retry_in_s=round(wait, 2),
        )

    def _halt(self, exc: BaseException) -> None:
        """Stop the writer for good and raise the alarm."""
        if self.status.integrity_failure is not None:
            return
        # SequenceError and SignatureError messages name indices, sizes and key references.
        message = f"{type(exc).__name__}: {exc}"
        self._integrity_exc = exc
        self.status.integrity_failure = message
        self.status.phase = "halted"
        self.metrics.integrity_failures.inc()
        log.critical(
            "integrity failure: the writer is stopped; run `audit-worker verify` and "
            "investigate before restarting", error=message, alert="audit_integrity_failure",
        )

    def _note_decision(self, decision: SlotDecision) -> None:
        before = self.status.decision
        self.status.decision = decision
        self.metrics.slot_active.set(1 if decision.active else 0)
        self.metrics.slot_epoch.set(decision.highest_epoch)
        if before is None or before.active != decision.active or before.reason != decision.reason:
            (log.info if decision.reason in ("active", "standby", "ungated") else log.warning)(
                "slot state", slot=self.settings.slot, active=decision.active,
                state=decision.reason, epoch=decision.value.epoch if decision.value else None,
                detail=decision.describe(),
            )

    # ------------------------------------------------------------------ run
    async def run(
        self, stop: asyncio.Event | None = None, *, install_signal_handlers: bool = True
    ) -> Worker:
        """Run until `stop` is set (or SIGTERM/SIGINT); return the worker."""
        stop = stop or self.stop_event
        self.stop_event = stop
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._signalled, sig, stop)
        http = await self._start_http() if self.serve_http else None
        stats = asyncio.create_task(self._stats_loop(stop), name="audit-stats")
        maintenance = asyncio.create_task(self._maintenance_loop(stop), name="audit-maintenance")
        worker: Worker | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                self.parts = await self._assemble(stack, stop)
                if self.parts is not None:
                    worker = self.parts.worker
                    await self._serve(worker, stop)
        finally:
            self.parts = None
            self.status.phase = "stopped"
            stop.set()
            stats.cancel()
            maintenance.cancel()
            await asyncio.gather(stats, maintenance, return_exceptions=True)
            if http is not None:
                await self._stop_http(*http)
            await self.redis.aclose()
            if install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        if self._integrity_exc is not None:
            raise self._integrity_exc
        if worker is None:
            raise DependencyError(
                "stopped before the worker could start: "
                + (self.status.startup_problem or "no reason recorded")
            )
        log.info("worker stopped", tree_size=worker.frontier.size, **vars(worker.stats))
        return worker

    def _signalled(self, sig: signal.Signals, stop: asyncio.Event) -> None:
        log.info("signal received: finishing the batch in hand", signal=sig.name)
        stop.set()

    async def _assemble(
        self, stack: contextlib.AsyncExitStack, stop: asyncio.Event
    ) -> Assembly | None:
        """Connect to everything, waiting (with backoff) for dependencies that are down
        and for a schema that is not migrated yet. None when stopped first."""
        s = self.settings
        attempt = 0
        while not stop.is_set():
            self.status.beat()
            try:
                parts = await stack.enter_async_context(
                    assemble(s, create_keys=self.create_keys)
                )
            except INTEGRITY_FAILURES as exc:
                # The stored log contradicts itself (e.g. a gap where the compact range
                # resumes): never write; serve health and metrics until stopped.
                self._halt(exc)
                await stop.wait()
                return None
            except MigrationError as exc:
                problem = f"schema: {exc}"
            except KeyUnavailableError as exc:
                if s.key_backend == "local":
                    raise  # a missing local key file does not come back by waiting
                problem = f"key service: {describe_error(exc)}"
                self.breakers["kms"].record_failure(describe_error(exc))
            except Exception as exc:
                if (tls_failure := tls.startup_failure(exc, s)) is not None:
                    # A certificate that does not verify does not fix itself: say which
                    # setting to fix, look again now and then (a mounted CA may change).
                    problem = str(tls_failure)
                    self.status.startup_problem = problem
                    log.critical("TLS failed: the worker cannot start until it is fixed",
                                 error=problem)
                    await sleep_or_stop(stop, s.configuration_recheck_seconds)
                    continue
                if postgres_error_kind(exc) == "halt":
                    # Wrong password, missing database or grant: waiting with backoff
                    # will not fix it; say so loudly and look again now and then.
                    problem = self._configuration_failed(exc, "start-up")
                    self.status.startup_problem = problem
                    await sleep_or_stop(stop, s.configuration_recheck_seconds)
                    continue
                dependency = classify(exc, "postgres")
                if dependency is None:
                    raise
                problem = f"{dependency}: {describe_error(exc)}"
                self.breakers[dependency].record_failure(describe_error(exc))
            else:
                self.status.startup_problem = None
                self._configuration_fixed()
                for breaker in self.breakers.values():
                    if breaker.state.name != "CLOSED":
                        breaker.record_success()
                log.info(
                    "worker started", slot=s.slot, consumer=s.consumer_name,
                    tree_size=parts.worker.frontier.size, http_port=self.http_port,
                )
                self.metrics.note_tree_size(parts.worker.frontier.size)
                return parts
            self.status.startup_problem = problem
            wait = random.uniform(0, min(s.retry_max_seconds, s.retry_initial_seconds * 2**attempt))
            attempt += 1
            log.warning("waiting for dependencies", problem=problem, retry_in_s=round(wait, 2))
            await sleep_or_stop(stop, max(wait, 0.05))
        return None

    async def _serve(self, worker: Worker, stop: asyncio.Event) -> None:
        """Consume and sign until `stop`, then shut down within the grace period."""
        s = self.settings
        # Part of start-up: "running" means the consumer starts now (tests and probes wait
        # for it), not after the witness's first S3 round trip.
        publisher = await self._witness_publisher(worker)
        self.status.phase = "running" if self._integrity_exc is None else "halted"
        consumer = asyncio.create_task(self._consume(worker, stop), name="audit-consumer")
        signer = asyncio.create_task(self._sign_loop(worker, stop), name="audit-signer")
        witness = asyncio.create_task(
            self._witness_loop(worker, publisher, stop), name="audit-witness"
        )
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({consumer, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        deadline = time.monotonic() + s.shutdown_grace_seconds
        if self.status.phase != "halted":
            self.status.phase = "stopping"
        # Finish the batch in hand, leaving a little time for the final tree head.
        reserve = min(5.0, s.shutdown_grace_seconds * 0.25)
        for task, what in ((consumer, "batch in hand"), (signer, "tree-head signer")):
            left = deadline - reserve - time.monotonic()
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=max(0.05, left))
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                log.warning(f"{what} abandoned at the grace deadline: its entries stay pending")
        witness.cancel()
        await asyncio.gather(witness, return_exceptions=True)
        if consumer.done() and not consumer.cancelled() and consumer.exception() is not None:
            raise consumer.exception()  # type: ignore[misc]  # a bug: surface it
        if self._integrity_exc is None:
            left = deadline - time.monotonic()
            try:
                head = await asyncio.wait_for(worker.sign_tree_head(), timeout=max(0.05, left))
            except INTEGRITY_FAILURES as exc:
                self._halt(exc)
            except Exception as exc:
                log.warning("final tree head not signed", error=describe_error(exc))
            else:
                if head is not None:
                    self._signed(head.tree_size, head.timestamp_ms, head.root_hash)

    # ------------------------------------------------------------------ consumer
    async def _retry(
        self,
        fn: Callable[[], Awaitable[T]],
        uses: tuple[Dependency, ...],
        interrupt: asyncio.Event | None,
    ) -> T:
        return await call_with_retry(
            fn, breakers=self.breakers, uses=uses,
            initial=self.settings.retry_initial_seconds, maximum=self.settings.retry_max_seconds,
            interrupt=interrupt, on_retry=self._on_retry,
        )

    async def _check_slot(self, stop: asyncio.Event) -> SlotDecision | None:
        gate = self.gate
        if gate is None:
            decision = UNGATED
        else:
            try:
                decision = await self._retry(lambda: gate.check(self.redis), ("redis",), stop)
            except Exception:
                if stop.is_set():
                    return None
                raise
        self._note_decision(decision)
        return decision

    async def _consume(self, worker: Worker, stop: asyncio.Event) -> None:
        s = self.settings
        intake = worker.intake

        async def read() -> list[Any]:
            try:
                # While spooled events wait, do not idle on an empty stream.
                block = 1 if self._spool_backlog else s.block_ms
                return await intake.read_batch(s.batch_size, block)
            except BaseException:
                # The reply may have been lost after Redis delivered entries to us: read
                # our own pending entries first next time.
                intake.replay_own_backlog()
                raise

        # One batch commits while the next is read and triaged: the CPU work of a batch
        # overlaps the database's work on the previous one.
        inflight: asyncio.Task[None] | None = None
        took_spool = False  # spool and stream take turns while both have entries
        inflight_spooled = 0  # highest spool id in the batch in flight (0: none spooled)
        try:
            while not stop.is_set():
                self.status.beat()
                if self._integrity_exc is not None:
                    await stop.wait()
                    return
                decision = await self._check_slot(stop)
                if decision is None:
                    break
                if not decision.active:
                    if inflight is not None:
                        await inflight
                        inflight = None
                    await sleep_or_stop(stop, s.slot_poll_seconds)
                    continue
                entries: list[Any] = []
                if not took_spool and self._spool_due():
                    # The rows of a spooled batch in flight go only when it commits: read
                    # past them, so the next batch is read and triaged meanwhile.
                    pending = inflight is not None and not inflight.done()
                    entries = await self._read_spool(
                        worker, stop, after=inflight_spooled if pending else 0
                    )
                took_spool = bool(entries)
                if not entries:
                    try:
                        entries = await self._retry(read, ("redis",), stop)
                    except Exception:
                        if stop.is_set():
                            break
                        raise
                if not entries:
                    # While spooled events wait, the next spool batch overlaps this one.
                    if inflight is not None and not self._spool_backlog:
                        await inflight
                        inflight = None
                    continue
                try:
                    triaged: Triaged | None = worker.triage(entries)
                except Exception:
                    triaged = None  # e.g. KMS down at a key rotation: commit retries it
                if inflight is not None:
                    await inflight
                    inflight = None
                if self._integrity_exc is not None:
                    continue  # the writer halted while this batch was being read
                inflight = asyncio.create_task(self._process(worker, entries, triaged))
                inflight_spooled = (entries[-1].spool_id or 0) if took_spool else 0
            if inflight is not None:
                await inflight
        except asyncio.CancelledError:
            if inflight is not None and not inflight.done():
                inflight.cancel()
                await asyncio.gather(inflight, return_exceptions=True)
            raise

    def _spool_due(self) -> bool:
        return self._spool_backlog or time.monotonic() >= self._spool_check_at

    async def _read_spool(
        self, worker: Worker, stop: asyncio.Event, *, after: int = 0
    ) -> list[StreamEntry]:
        """The oldest spooled events (up to a batch, spool ids above `after`), opened, in
        spool order. Called only when the slot gate said active (for a slot, that needs
        Redis: a standby never drains); `Worker.commit` deletes their rows in the
        transaction that appends them. A row that committed late below `after` is read by
        a later call without it. [] when there are none, on stop, or when
        the spool cannot be read for a reason retrying does not fix (logged; looked at
        again after `configuration_recheck_seconds`, the stream is served meanwhile)."""
        s = self.settings
        parts = self.parts
        self._spool_check_at = time.monotonic() + SPOOL_POLL_SECONDS
        if parts is None:
            return []
        spool = IntakeSpool(parts.pool, acquire_timeout=s.database_acquire_timeout_seconds)
        opener = self._spool_opener
        if opener is None or opener.cipher is not worker.cipher:
            opener = self._spool_opener = SpoolOpener(
                worker.cipher, worker.data_keys.wrapper, purpose=worker.data_keys.purpose
            )

        if self._spool_stuck and time.monotonic() >= self._spool_stuck_until:
            self._spool_stuck.clear()  # the key may have been fixed meanwhile: try again
        skip = sorted(self._spool_stuck)

        async def fetch() -> list[StreamEntry]:
            return await opener.entries(
                await spool.fetch(s.batch_size, after=after, skip=skip)
            )

        try:
            # A KMS failure while unwrapping is charged to the KMS breaker and retried.
            entries = await self._retry(fetch, ("postgres",), stop)
        except Exception as exc:
            self._spool_backlog = False
            if not stop.is_set():
                self._spool_check_at = time.monotonic() + s.configuration_recheck_seconds
                log.error("intake spool not drained; trying again later",
                          error=describe_error(exc))
            return []
        self._spool_backlog = len(entries) >= s.batch_size
        unopened = [e.spool_id for e in entries if e.payload is None and e.spool_id is not None]
        if unopened:
            entries = [e for e in entries if e.payload is not None]
            self._spool_stuck.update(unopened)
            self._spool_stuck_until = time.monotonic() + s.configuration_recheck_seconds
            self.metrics.intake_spool_unopened.set(len(self._spool_stuck))
            log.critical(
                "spooled events do not open (another master key, a missing data key or a "
                "changed ciphertext): they stay in the spool and are tried again later",
                spool_ids=unopened[:50], count=len(unopened),
                alert="audit_spool_unopened",
            )
        elif not self._spool_stuck:
            self.metrics.intake_spool_unopened.set(0)
        self._spool_moved += len(entries)
        if not self._spool_backlog and self._spool_moved:
            log.info("intake spool drained into the log", events=self._spool_moved)
            self._spool_moved = 0
        return entries

    async def _process(
        self, worker: Worker, entries: list[Any], triaged: Triaged | None = None
    ) -> None:
        """Commit and acknowledge one batch, retrying until it is done (the grace
        deadline on shutdown cancels it; its entries then stay pending). A configuration
        or permission error halts the writer: the batch is tried again every
        `configuration_recheck_seconds` until it commits or the worker stops."""
        self.metrics.events_received.inc(len(entries))
        started = time.perf_counter()
        hand: list[Triaged | None] = [triaged]

        async def commit() -> CommittedBatch:
            return await worker.commit(entries, hand[0])

        while True:
            try:
                committed = await self._retry(commit, ("postgres",), None)
            except INTEGRITY_FAILURES as exc:
                self._halt(exc)
                return
            except Exception as exc:
                # "entry" here: even a dead letter with fixed text only was refused, so
                # the database, not an entry, is at fault.
                if postgres_error_kind(exc) not in ("halt", "entry"):
                    raise
                self._configuration_failed(exc, "commit")
                await sleep_or_stop(self.stop_event, self.settings.configuration_recheck_seconds)
                if self.stop_event.is_set():
                    return  # nothing was stored: the entries stay pending
                hand[0] = None  # re-triage: the data key may have rotated meanwhile
                continue
            break
        self._configuration_fixed()
        seconds = time.perf_counter() - started
        result = committed.result
        self.metrics.observe_batch(result, result.dead_letter_rules, seconds)
        self.metrics.note_tree_size(worker.frontier.size)
        self._log_batch(result, committed, seconds)
        if committed.entry_ids or committed.dead_letters:  # a spooled batch may need none
            await self._retry(lambda: worker.acknowledge(committed), ("redis",), None)
        self.status.batches += 1
        self.status.last_batch_at = time.time()
        if self.on_batch is not None and result.read:
            self.on_batch(result)

    def _configuration_failed(self, exc: BaseException, during: str) -> str:
        """A PostgreSQL error that only an operator can fix: readiness false, a critical
        line naming the SQLSTATE and the fix, the metric. Returns the problem text."""
        code = sqlstate(exc) or "unknown"
        problem = f"PostgreSQL refused the worker's {during} ({describe_error(exc)}): " + (
            configuration_hint(code)
        )
        self.status.configuration_problem = problem
        self.metrics.configuration_failures.labels(code).inc()
        self.metrics.configuration_halted.set(1)
        log.critical(
            "configuration error: the writer is halted until it is fixed", sqlstate=code,
            error=describe_error(exc), fix=configuration_hint(code),
            retry_in_s=self.settings.configuration_recheck_seconds,
            alert="audit_configuration_failure",
        )
        return problem

    def _configuration_fixed(self) -> None:
        if self.status.configuration_problem is not None:
            log.warning("configuration error cleared: the writer resumes")
            self.status.configuration_problem = None
            self.metrics.configuration_halted.set(0)

    def _log_batch(self, result: BatchResult, batch: CommittedBatch, seconds: float) -> None:
        if logging.getLogger("audit_worker").isEnabledFor(logging.DEBUG):
            log.debug(
                "batch committed", read=result.read, stored=result.stored,
                first_index=result.first_index,
                last_index=result.stored_events[-1][1] if result.stored_events else None,
                duplicates=result.duplicates, dead_lettered=result.dead_lettered,
                seconds=round(seconds, 4),
            )
            for event_id, index in result.stored_events:
                log.debug("event stored", event_id=str(event_id), log_index=index)
        for entry_id, field, rule, value_class in batch.dead_letters:
            log.warning(
                "event dead-lettered", stream_entry_id=entry_id, field=field, rule=rule,
                value_class=value_class,
            )
        if result.isolated_sqlstates:
            log.critical(
                "PostgreSQL refused entries for their data; each was dead-lettered, sealed. "
                "Validated events should never be refused: if many are, a constraint or "
                "trigger on audit.events is wrong; fix it, then replay them with "
                "`audit-worker dead-letters replay --rule sqlstate_<code>`",
                sqlstates=sorted(set(result.isolated_sqlstates)),
                count=len(result.isolated_sqlstates), alert="audit_events_refused",
            )
        if result.conflict_ids:
            log.error(
                "replayed event ids with another body than the stored one (not stored)",
                event_ids=[str(i) for i in result.conflict_ids[:50]],
                count=len(result.conflict_ids), alert="audit_event_conflict",
            )
        if result.redelivered:
            log.warning(
                "entries redelivered more often than AUDIT_MAX_DELIVERIES (crashes or "
                "outages); processed as usual", count=result.redelivered,
            )
        if result.duplicate_ids:
            log.info(
                "replayed events skipped (already in the log)",
                event_ids=[str(i) for i in result.duplicate_ids[:50]],
                count=len(result.duplicate_ids),
            )
        progress = self._progress
        progress["stored"] += result.stored
        progress["dead_lettered"] += result.dead_lettered
        progress["duplicates"] += result.duplicates
        now = time.monotonic()
        if now - self._progress_at >= PROGRESS_LOG_SECONDS:
            log.info(
                "progress", seconds=round(now - self._progress_at, 1),
                tree_size=self.worker.frontier.size if self.worker else None, **progress,
            )
            self._progress = {"stored": 0, "dead_lettered": 0, "duplicates": 0}
            self._progress_at = now

    # ------------------------------------------------------------------ signer
    def _signed(self, tree_size: int, timestamp_ms: int, root: bytes) -> None:
        self._last_signed = (tree_size, root, timestamp_ms)
        self.metrics.tree_heads_signed.inc()
        self.metrics.note_tree_head(tree_size, timestamp_ms)
        log.info("tree head signed", tree_size=tree_size, root_hash=root.hex())

    async def _sign_once(self, worker: Worker) -> None:
        mine = [self.breakers["postgres"], self.breakers["kms"]]
        try:
            acquire(mine)
        except BreakerOpen:
            return
        try:
            head = await worker.sign_tree_head()
        except INTEGRITY_FAILURES as exc:
            for breaker in mine:
                breaker.release()
            self._halt(exc)
            return
        except Exception as exc:
            failing = classify(exc, "postgres")
            for breaker in mine:
                if breaker.name == failing:
                    breaker.record_failure(describe_error(exc))
                else:
                    breaker.release()
            if postgres_error_kind(exc) == "halt":
                self._configuration_failed(exc, "tree-head signing")
            elif failing is None:
                log.exception("signing the tree head failed")
            else:
                self.metrics.retries.labels(failing).inc()
                log.warning(
                    "signing the tree head failed; next interval retries",
                    dependency=failing, error=describe_error(exc),
                )
            return
        if head is None:  # nothing new to sign: no evidence either way
            for breaker in mine:
                breaker.release()
            return
        for breaker in mine:
            breaker.record_success()
        self._signed(head.tree_size, head.timestamp_ms, head.root_hash)

    async def _sign_loop(self, worker: Worker, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await sleep_or_stop(stop, self.settings.sign_interval_seconds)
            if stop.is_set() or self._integrity_exc is not None:
                return
            await self._sign_once(worker)

    # ------------------------------------------------------------------ witness
    async def _witness_publisher(self, worker: Worker) -> WitnessPublisher | None:
        """Set up witnessing before the consumer starts: building the S3 client and its
        first request load botocore's models, seconds of CPU that must not land on the
        first batches. None when there is nowhere to witness, or it cannot be set up: a
        witness problem never keeps events out of the log."""
        parts = self.parts
        try:
            pem = await asyncio.to_thread(worker.signer.public_key_pem)
            own = TrustedKeys.from_pems([pem]).keys[0]
            self._trusted = await asyncio.to_thread(trusted_keys, self.settings, pem)
            store = await asyncio.to_thread(evidence_store, self.settings)
        except Exception as exc:
            self.metrics.witness_failures.inc()
            log.warning("witness not set up: tree heads are not witnessed",
                        error=describe_error(exc))
            return None
        if store is None or parts is None:
            log.warning(
                "no evidence store (AUDIT_ARCHIVE_URL or AUDIT_ARCHIVE_BUCKET): tree heads "
                "are not witnessed, so a rollback of the database could go unnoticed"
            )
            return None
        witness_log = WitnessLog(store, self.settings.log_id, self._trusted)
        chain = DeadLetterChainTracker(
            parts.pool, self.settings.database_acquire_timeout_seconds, verify_dead_letter_chain
        )
        publisher = WitnessPublisher(
            witness_log, worker.signer, own, chain.head,
            interval_seconds=self.settings.witness_interval_seconds,
        )
        log.info("witnessing tree heads", url=witness_log.url,
                 interval_s=self.settings.witness_interval_seconds)
        # The first read, while idle; an unreachable store must not hold back the consumer.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._witness_once(worker, publisher), timeout=10)
        return publisher

    async def _witness_loop(
        self, worker: Worker, publisher: WitnessPublisher | None, stop: asyncio.Event
    ) -> None:
        """Publish the newest head this worker signed outside the database, at most once
        per AUDIT_WITNESS_INTERVAL_SECONDS, and compare the database with the witness."""
        if publisher is None:
            return
        while not stop.is_set():
            await sleep_or_stop(stop, min(1.0, self.settings.witness_interval_seconds))
            if not stop.is_set():
                await self._witness_once(worker, publisher)

    async def _witness_once(self, worker: Worker, publisher: WitnessPublisher) -> None:
        now = time.time()
        head = self._last_signed
        if self._integrity_exc is not None:
            return  # a halted writer vouches for nothing
        if head is not None and publisher.due(head[0], now):
            try:
                fresh = await publisher.publish(*head)
            except INTEGRITY_FAILURES as exc:
                self._halt(exc)
                return
            except Exception as exc:
                self.metrics.witness_failures.inc()
                log.warning("tree head not witnessed; next interval retries",
                            tree_size=head[0], error=describe_error(exc))
                publisher.published_at = now  # wait an interval, do not hammer the store
            else:
                self.metrics.witness_published.inc()
                self.metrics.witness_last_published.set(publisher.published_at)
                log.info("tree head witnessed", tree_size=head[0], new=fresh)
        if now - self._witness_read_at < self.settings.witness_interval_seconds:
            return
        self._witness_read_at = now
        try:
            read = await asyncio.to_thread(publisher.log.newest)
        except Exception as exc:
            log.warning("witness not read", error=describe_error(exc))
            return
        self.metrics.witness_refused.set(len(read.refused))
        for key, reason in read.refused:
            log.critical("a checkpoint in the witness does not verify", object=key,
                         reason=reason, alert="audit_witness_forged")
        if read.newest is None:
            return
        witnessed = read.newest.checkpoint.tree_size
        self.metrics.witnessed_tree_size.set(witnessed)
        # Read after the witness: every witnessed head was in the database before it was
        # published, so the database holds at least as much unless something was removed.
        try:
            in_database = await self._verified_head_size()
        except Exception as exc:
            log.warning("tree heads not read for the witness check", error=describe_error(exc))
            return
        if in_database is None:
            return
        if witnessed > in_database and witnessed != self._rollback_reported:
            # Not a halt: after a region-down failover DR legitimately holds less than
            # prod's witness. The operator decides; the alert and the runbook say how.
            self._rollback_reported = witnessed
            log.critical(
                "the database holds fewer log entries than the witness has seen: entries "
                "were removed, a backup was restored, or DR took over with a loss",
                tree_size=in_database, witnessed_size=witnessed,
                alert="audit_log_rolled_back",
            )

    # ------------------------------------------------------------------ gauges
    async def refresh_stats(self) -> None:
        """Stream lag and pending, the intake spool's depth, newest signed tree head;
        failures leave old values."""
        try:
            lag, pending = await asyncio.wait_for(self._stats_intake.backlog(), timeout=2)
        except Exception as exc:  # best effort: the gauges keep their last values
            log.debug("stream gauges not refreshed", error=describe_error(exc))
        else:
            # Redis < 7 does not report a group's lag: NaN rather than a made-up number.
            self.metrics.stream_lag.set(lag if lag >= 0 else math.nan)
            self.metrics.stream_pending.set(pending)
        parts = self.parts
        if parts is None:
            return
        try:
            depth = await IntakeSpool(parts.pool, acquire_timeout=2).depth(timeout=2)
        except Exception as exc:
            log.debug("spool gauge not refreshed", error=describe_error(exc))
        else:
            self.metrics.intake_spool_depth.set(depth)
        try:
            async with parts.pool.acquire(timeout=2) as conn:
                row = await conn.fetchrow(
                    "SELECT tree_size, timestamp_ms FROM audit.tree_heads"
                    " ORDER BY tree_size DESC LIMIT 1", timeout=2,
                )
        except Exception as exc:
            log.debug("tree head gauges not refreshed", error=describe_error(exc))
            return
        if row is not None:
            self.metrics.note_tree_head(row["tree_size"], row["timestamp_ms"])
        try:
            await self._verified_head_size()
        except Exception as exc:
            log.debug("verified head gauge not refreshed", error=describe_error(exc))

    async def _verified_head_size(self) -> int | None:
        """The size of the newest head in the database that a trusted key signed, as read
        now (0 without one), into `audit_database_tree_head_size`. Not the largest ever
        seen, so a rollback shows; and not any row, so an unsigned head inserted by hand
        cannot hide one. None before the keys are known."""
        parts, trusted = self.parts, self._trusted
        if parts is None or trusted is None:
            return None
        async with parts.pool.acquire(timeout=2) as conn:
            rows = await conn.fetch(
                "SELECT tree_size, root_hash, timestamp_ms, log_id, signature"
                " FROM audit.tree_heads ORDER BY tree_size DESC LIMIT 16", timeout=2,
            )
        size = next((r["tree_size"] for r in rows
                     if trusted.stored_head(self.settings.log_id, r) is not None), 0)
        self.metrics.database_tree_head_size.set(size)
        return size

    async def maintain(self) -> None:
        """Keep monthly partitions ahead (a worker may run for months) and trim the
        acknowledged part of the stream. Best effort: the next round retries."""
        parts = self.parts
        if parts is None:
            return
        try:
            async with parts.pool.acquire(timeout=5) as conn:
                await conn.execute("SELECT audit.ensure_partitions(2)", timeout=30)
        except Exception as exc:
            log.warning("partitions not checked", error=describe_error(exc))
        from audit_worker.archive import maintenance as archive  # closed months -> archive

        await archive.maintain(self.settings, parts.pool, parts.worker.signer, self.metrics)
        retention = self.settings.stream_retention_seconds
        if retention <= 0:
            return
        try:
            trimmed = await parts.worker.intake.trim(int(retention * 1000), int(time.time() * 1000))
        except Exception as exc:
            log.warning("stream not trimmed", error=describe_error(exc))
        else:
            if trimmed:
                log.info("acknowledged stream entries trimmed", entries=trimmed)

    async def _maintenance_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await sleep_or_stop(stop, self.settings.maintenance_interval_seconds)
            if not stop.is_set():
                await self.maintain()

    async def _stats_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.refresh_stats()
            await sleep_or_stop(stop, self.settings.stats_interval_seconds)

    # ------------------------------------------------------------------ HTTP
    @staticmethod
    def _listen(host: str, port: int, variable: str) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto IPPROTO_TCP: asyncio turns on TCP_NODELAY only for such sockets; without it
        # every answer waits about 40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise DependencyError(
                f"cannot listen on {host}:{port} ({exc.strerror}): "
                f"set {variable} to a free port (0 picks one)"
            ) from None
        return sock

    async def _start_http(self) -> tuple[list[Any], asyncio.Task[None]]:
        """Two uvicorn servers, each on its own socket with its own limits, so producers
        can never take the connections the probes need: health and metrics on
        ``http_port``, the intake on ``intake_port`` (see `audit_worker.http.server`)."""
        from audit_worker.http.app import HEALTH_PATHS, INTAKE_PATHS, OnlyPaths
        from audit_worker.http.server import (
            HEALTH_LIMITS,
            INTAKE_MAX_HEAD_BYTES,
            ListenerLimits,
            QuietServer,
            make_config,
        )

        s = self.settings
        health_sock = self._listen(s.http_host, s.http_port, "AUDIT_HTTP_PORT")
        try:
            intake_sock = self._listen(s.http_host, s.intake_port, "AUDIT_INTAKE_PORT")
        except BaseException:
            health_sock.close()
            raise
        self.http_port = health_sock.getsockname()[1]
        self.intake_port = intake_sock.getsockname()[1]
        intake_limits = ListenerLimits(
            max_connections=s.intake_max_connections,
            header_timeout=s.intake_header_timeout_seconds,
            keep_alive=s.intake_keep_alive_seconds,
            max_head_bytes=INTAKE_MAX_HEAD_BYTES,
            backlog=s.intake_max_connections,
        )
        listeners = [
            (OnlyPaths(self.app, HEALTH_PATHS, "health"), HEALTH_LIMITS, health_sock),
            (OnlyPaths(self.app, INTAKE_PATHS, "intake"), intake_limits, intake_sock),
        ]
        servers = [QuietServer(make_config(app, limits)) for app, limits, _ in listeners]

        async def serve() -> None:
            try:
                async with asyncio.TaskGroup() as group:  # one failing stops the other
                    for server, (_, _, sock) in zip(servers, listeners, strict=True):
                        group.create_task(server.serve(sockets=[sock]))
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0] from None

        task = asyncio.create_task(serve(), name="audit-http")
        deadline = time.monotonic() + 10  # uvicorn starts in milliseconds: a hang is a bug
        while not all(server.started for server in servers) and not task.done():
            if time.monotonic() > deadline:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise DependencyError("the HTTP listeners did not start within 10 s")
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
        log.info(
            "http listening", host=s.http_host, port=self.http_port,
            intake_port=self.intake_port,
        )
        return servers, task

    async def _stop_http(self, servers: list[Any], task: asyncio.Task[None]) -> None:
        for server in servers:
            server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout=3)
        except (TimeoutError, Exception):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

async def run(
    settings: WorkerSettings,
    stop: asyncio.Event | None = None,
    *,
    create_keys: bool = False,
    install_signal_handlers: bool = True,
    on_batch: Callable[[BatchResult], None] | None = None,
    serve_http: bool = False,
    metrics: Metrics | None = None,
) -> Worker:
    """Consume until `stop` is set or SIGTERM arrives; then finish the batch in hand,
    acknowledge it and sign a final tree head. With `serve_http`, also serve health and
    metrics on ``settings.http_host:http_port`` and the intake on ``intake_port``."""
    service = Service(
        settings, create_keys=create_keys, on_batch=on_batch, serve_http=serve_http,
        metrics=metrics,
    )
    return await service.run(stop, install_signal_handlers=install_signal_handlers)

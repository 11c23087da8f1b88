"""Prometheus metrics of one worker process (exposed at ``GET /metrics``).

Names follow the Prometheus conventions: an ``audit_`` prefix, base units (seconds),
``_total`` on counters. Labels hold only bounded, non-identifying values: a dependency
name, a validation rule, an HTTP status code, an outcome. Never an event id, an
identifier, a value or an error message: no PHI can reach a label.

Each `Metrics` has its own registry, so two workers in one process (tests) do not clash.
"""

from __future__ import annotations

import math
import re
import time
from importlib import metadata

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from audit_worker.resilience import DEPENDENCIES, BreakerState
from audit_worker.worker import BatchResult

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: they double the series count for nothing

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)
BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_REASON = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
MAX_REASONS = 64
OTHER = "other"


def version() -> str:
    try:
        return metadata.version("audit-kit")
    except metadata.PackageNotFoundError:
        return "unknown"


class ReasonLabels:
    """Keeps a label's values bounded: rule names only (``[a-z0-9_]``), at most `limit`
    distinct ones, anything else becomes ``other``."""

    def __init__(self, limit: int = MAX_REASONS) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, reason: str) -> str:
        if reason in self._seen:
            return reason
        if not _REASON.match(reason) or len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(reason)
        return reason


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        self.reason = ReasonLabels()

        self.info = Info("audit_worker", "The worker's build and slot.", registry=r)
        self.events_received = Counter(
            "audit_events_received_total",
            "Stream entries read by this worker (a redelivered entry counts again).",
            registry=r,
        )
        self.events_stored = Counter(
            "audit_events_stored_total", "Events appended to the log by this worker.", registry=r
        )
        self.events_duplicate = Counter(
            "audit_events_duplicate_total",
            "Events skipped because their event_id was already in the log (replays).",
            registry=r,
        )
        self.events_conflict = Counter(
            "audit_events_conflict_total",
            "Events whose event_id is in the log with another body (skipped, never stored).",
            registry=r,
        )
        self.events_redelivered = Counter(
            "audit_events_redelivered_total",
            "Stream entries delivered more often than AUDIT_MAX_DELIVERIES (crashes or "
            "outages; processed as usual, never dead-lettered for it).",
            registry=r,
        )
        self.events_isolated = Counter(
            "audit_events_isolated_total",
            "Entries PostgreSQL refused for their data, isolated by splitting the batch "
            "(and dead-lettered with rule sqlstate_XXXXX), by SQLSTATE.",
            ["sqlstate"],
            registry=r,
        )
        self.configuration_failures = Counter(
            "audit_configuration_failures_total",
            "PostgreSQL errors that configuration or permissions cause (the writer halts "
            "until fixed), by SQLSTATE.",
            ["sqlstate"],
            registry=r,
        )
        self.configuration_halted = Gauge(
            "audit_writer_configuration_halted",
            "1 while the writer is halted by a configuration or permission error.",
            registry=r,
        )
        self.events_dead_lettered = Counter(
            "audit_events_dead_lettered_total",
            "Entries sent to the dead-letter store, by the validation rule that failed.",
            ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "audit_batch_size", "Entries per committed batch.", buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "audit_batch_duration_seconds",
            "Time to validate, seal and commit one batch.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.event_latency = Histogram(
            "audit_event_latency_seconds",
            "From the producer's XADD to the PostgreSQL commit, per entry.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stream_lag = Gauge(
            "audit_stream_lag",
            "Entries in the stream not yet delivered to the consumer group (NaN on Redis < 7).",
            registry=r,
        )
        self.stream_pending = Gauge(
            "audit_stream_pending",
            "Entries delivered to the consumer group but not yet acknowledged.",
            registry=r,
        )
        self.breaker_state = Gauge(
            "audit_breaker_state",
            "Circuit breaker state per dependency: 0 closed, 1 half-open, 2 open.",
            ["dependency"],
            registry=r,
        )
        self.retries = Counter(
            "audit_retries_total",
            "Retries after a failed call to a dependency.",
            ["dependency"],
            registry=r,
        )
        self.tree_size = Gauge(
            "audit_tree_size", "Leaves in the log as this worker last saw it.", registry=r
        )
        self.tree_heads_signed = Counter(
            "audit_tree_heads_signed_total", "Tree heads signed by this worker.", registry=r
        )
        self.tree_head_age = Gauge(
            "audit_tree_head_age_seconds",
            "Seconds since the newest signed tree head of the log (NaN before the first).",
            registry=r,
        )
        self.integrity_failures = Counter(
            "audit_integrity_failures_total",
            "Tamper, sequence or signature failures; each one stops the writer.",
            registry=r,
        )
        self.slot_active = Gauge(
            "audit_slot_active", "1 while this worker's slot is the active one.", registry=r
        )
        self.slot_epoch = Gauge(
            "audit_slot_epoch", "Highest control-key epoch this worker has seen.", registry=r
        )
        self.intake_requests = Counter(
            "audit_intake_requests_total",
            "POST /v1/events requests by HTTP status code.",
            ["code"],
            registry=r,
        )
        self.intake_events = Counter(
            "audit_intake_events_total",
            "Events in POST /v1/events requests: accepted (written to the stream), spooled "
            "(written to the PostgreSQL spool while Redis was unreachable) or rejected.",
            ["outcome"],
            registry=r,
        )
        self.intake_spool_unopened = Gauge(
            "audit_intake_spool_unopened",
            "Spooled events whose sealed payload did not open; kept in the spool, not "
            "moved into the log, tried again every AUDIT_CONFIGURATION_RECHECK_SECONDS.",
            registry=r,
        )
        self.intake_spool_depth = Gauge(
            "audit_intake_spool_depth",
            "Events in the intake's PostgreSQL spool, not yet moved into the log (as this "
            "worker last counted).",
            registry=r,
        )

        self.database_tree_head_size = Gauge(
            "audit_database_tree_head_size",
            "Size of the newest signed tree head in the database, as last read (not the "
            "largest ever seen: a rollback shows).",
            registry=r,
        )
        self.witnessed_tree_size = Gauge(
            "audit_witnessed_tree_size",
            "Size of the newest checkpoint in the witness (evidence store) that verifies "
            "(NaN before the first read or without a witness).",
            registry=r,
        )
        self.witnessed_tree_size.set(math.nan)
        self.witness_published = Counter(
            "audit_witness_published_total",
            "Signed checkpoints this worker published to the witness.",
            registry=r,
        )
        self.witness_failures = Counter(
            "audit_witness_failures_total",
            "Attempts to publish a checkpoint that failed (retried the next interval).",
            registry=r,
        )
        self.witness_last_published = Gauge(
            "audit_witness_last_published_timestamp_seconds",
            "Unix time of this worker's last checkpoint publication (0 before the first).",
            registry=r,
        )
        self.witness_refused = Gauge(
            "audit_witness_refused_checkpoints",
            "Checkpoints above the newest valid one in the witness that do not verify "
            "(forged, or signed by an untrusted key), at the last read.",
            registry=r,
        )
        # The six-year archive (audit_worker.archive): months exported, verified, detached.
        self.archive_months = Counter(
            "audit_archive_months_total",
            "Closed months the archive exporter handled, by outcome: exported (and verified "
            "in the archive) or detached (left the hot database).",
            ["outcome"],
            registry=r,
        )
        self.archive_failures = Counter(
            "audit_archive_export_failures_total",
            "Archive export rounds that failed, by reason: refused (the month is not one "
            "index range, or the archive holds other content), not_verified (the uploaded "
            "copy or the previous month did not verify), unavailable (S3 or PostgreSQL).",
            ["reason"],
            registry=r,
        )
        for outcome in ("exported", "detached"):
            self.archive_months.labels(outcome)
        for reason in ("refused", "not_verified", "unavailable"):
            self.archive_failures.labels(reason)
        self._head_timestamp: float | None = None
        self._tree_size = 0
        self.tree_head_age.set_function(self._head_age)
        for dependency in DEPENDENCIES:
            self.breaker_state.labels(dependency).set(0)
            self.retries.labels(dependency)
        for outcome in ("accepted", "spooled", "rejected"):
            self.intake_events.labels(outcome)

    # ---- updates
    def _head_age(self) -> float:
        if self._head_timestamp is None:
            return math.nan
        return max(0.0, time.time() - self._head_timestamp)

    def set_info(self, *, slot: str | None, log_id: str) -> None:
        self.info.info({"version": version(), "slot": slot or "none", "log_id": log_id})

    def note_tree_head(self, tree_size: int, timestamp_ms: int) -> None:
        """The newest signed tree head seen (signed here or read from the log)."""
        timestamp = timestamp_ms / 1000
        if self._head_timestamp is None or timestamp > self._head_timestamp:
            self._head_timestamp = timestamp
        self.note_tree_size(tree_size)

    def note_tree_size(self, size: int) -> None:
        if size > self._tree_size:  # the log never shrinks: keep the largest size seen
            self._tree_size = size
            self.tree_size.set(size)

    def observe_batch(self, result: BatchResult, rules: list[str], seconds: float) -> None:
        self.batch_size.observe(result.read)
        self.batch_duration.observe(seconds)
        self.events_stored.inc(result.stored)
        if result.duplicates:
            self.events_duplicate.inc(result.duplicates)
        if result.conflict_ids:
            self.events_conflict.inc(len(result.conflict_ids))
        if result.redelivered:
            self.events_redelivered.inc(result.redelivered)
        for code in result.isolated_sqlstates:
            self.events_isolated.labels(code).inc()  # SQLSTATEs: five characters, bounded
        for rule in rules:
            self.events_dead_lettered.labels(self.reason(rule)).inc()
        observe = self.event_latency.observe
        for ms in result.latencies_ms:
            observe(max(0.0, ms / 1000))

    def set_breaker(self, dependency: str, state: BreakerState) -> None:
        self.breaker_state.labels(dependency).set(state.value)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

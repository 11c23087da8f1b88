"""Promotion gates: what is measured, the thresholds, and the verdicts. Pure: the release
workflow (`auditctl.release`) gathers the inputs and records the `GateResult`s.

Before the switch (the new image runs in the idle slot, the active slot is untouched):

* ``migrations``: the image's pending migrations are expand-only (`plan_migrations`);
  a contract migration is refused while the old slot still runs.
* ``readiness``: the new slot answers ``/readyz`` 200 before the deadline.
* ``dependencies``: its ``/healthz/database``, ``/healthz/redis`` and ``/healthz/external``.
* ``smoke``: smoke events submitted through the new slot's intake are in the log, each with
  an inclusion proof verified against a signed tree head.
* ``dead-letters``: no dead-letter growth while the gates ran.
* ``worker-metrics``: the new slot's ``/metrics``: no integrity failure, every circuit
  breaker closed, no intake answer 5xx.

After the switch (a failure switches back, see `auditctl.promotion`):

* ``smoke``, ``dead-letters`` again, now stored by the new slot;
* ``consistency``: the signed tree head after the switch extends the one before it;
* ``error-rate`` and ``latency``: from the new slot's ``/metrics`` over the analysis
  window: dead-lettered / received, and the 99th percentile of
  ``audit_event_latency_seconds`` (producer's XADD to PostgreSQL commit);
* ``old-slot-standby``: the old slot reports standby at the new epoch (one writer).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from audit_worker.db.migrate import Migration

Stage = Literal["pre-switch", "post-switch", "drill"]
Measured = dict[str, float | int | str | bool | None]


@dataclass(frozen=True)
class Thresholds:
    """Gate settings; the defaults suit every environment, tests shorten the waits."""

    readiness_timeout_seconds: float = 60.0
    smoke_events: int = 3
    smoke_timeout_seconds: float = 30.0
    max_error_rate: float = 0.01
    max_latency_p99_seconds: float = 2.0
    max_dead_letter_growth: int = 0
    analysis_seconds: float = 2.0  # minimum post-switch window for the metric gates


@dataclass(frozen=True)
class GateResult:
    name: str
    stage: Stage
    passed: bool
    detail: str
    seconds: float = 0.0
    measured: Measured = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateResult:
        return cls(**data)


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class MetricsSample:
    """The figures the gates read from one worker's ``/metrics``."""

    received: float = 0.0
    stored: float = 0.0
    dead_lettered: float = 0.0
    integrity_failures: float = 0.0
    latency_buckets: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative count)
    latency_count: float = 0.0
    breakers: dict[str, float] = field(default_factory=dict)  # 0 closed, 1 half-open, 2 open
    intake_by_code: dict[str, float] = field(default_factory=dict)
    slot_active: float | None = None
    slot_epoch: float | None = None
    tree_size: float | None = None


def parse_metrics(text: str) -> MetricsSample:
    """Read the worker's Prometheus text exposition."""
    values: dict[str, float] = {}
    buckets: dict[float, float] = {}
    breakers: dict[str, float] = {}
    intake: dict[str, float] = {}
    dead = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == "audit_event_latency_seconds_bucket":
                buckets[float(labels["le"])] = value
            elif name == "audit_events_dead_lettered_total":
                dead += value
            elif name == "audit_breaker_state":
                breakers[labels["dependency"]] = value
            elif name == "audit_intake_requests_total":
                intake[labels["code"]] = intake.get(labels["code"], 0.0) + value
            elif not labels:
                values[name] = value
    return MetricsSample(
        received=values.get("audit_events_received_total", 0.0),
        stored=values.get("audit_events_stored_total", 0.0),
        dead_lettered=dead,
        integrity_failures=values.get("audit_integrity_failures_total", 0.0),
        latency_buckets=tuple(sorted(buckets.items())),
        latency_count=values.get("audit_event_latency_seconds_count", 0.0),
        breakers=breakers,
        intake_by_code=intake,
        slot_active=values.get("audit_slot_active"),
        slot_epoch=values.get("audit_slot_epoch"),
        tree_size=values.get("audit_tree_size"),
    )


def window(before: MetricsSample, after: MetricsSample) -> MetricsSample:
    """Counters as increases from `before` to `after`; gauges as in `after`."""
    earlier = dict(before.latency_buckets)
    return MetricsSample(
        received=after.received - before.received,
        stored=after.stored - before.stored,
        dead_lettered=after.dead_lettered - before.dead_lettered,
        integrity_failures=after.integrity_failures - before.integrity_failures,
        latency_buckets=tuple((le, n - earlier.get(le, 0.0)) for le, n in after.latency_buckets),
        latency_count=after.latency_count - before.latency_count,
        breakers=after.breakers,
        intake_by_code={
            code: n - before.intake_by_code.get(code, 0.0)
            for code, n in after.intake_by_code.items()
        },
        slot_active=after.slot_active,
        slot_epoch=after.slot_epoch,
        tree_size=after.tree_size,
    )


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket that holds
    the q-th observation. None without observations; the highest finite bound when the
    quantile falls in the ``+Inf`` bucket."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def error_rate_gate(win: MetricsSample, th: Thresholds, stage: Stage = "post-switch") -> GateResult:
    if win.received <= 0:
        return GateResult(
            "error-rate", stage, False, "the new slot received no events in the window",
            measured={"received": 0},
        )
    rate = win.dead_lettered / win.received
    passed = rate <= th.max_error_rate and win.integrity_failures == 0
    detail = (
        f"{win.dead_lettered:.0f} of {win.received:.0f} entries dead-lettered "
        f"({rate:.2%}, limit {th.max_error_rate:.2%})"
    )
    if win.integrity_failures:
        detail += f"; {win.integrity_failures:.0f} integrity failure(s)"
    return GateResult(
        "error-rate", stage, passed, detail,
        measured={"error_rate": round(rate, 6), "received": int(win.received),
                  "dead_lettered": int(win.dead_lettered)},
    )


def latency_gate(win: MetricsSample, th: Thresholds, stage: Stage = "post-switch") -> GateResult:
    p99 = histogram_quantile(0.99, win.latency_buckets)
    if p99 is None:
        return GateResult("latency", stage, False, "no event latency observed in the window")
    passed = p99 <= th.max_latency_p99_seconds
    return GateResult(
        "latency", stage, passed,
        f"p99 {p99 * 1000:.0f} ms over {win.latency_count:.0f} events "
        f"(limit {th.max_latency_p99_seconds * 1000:.0f} ms)",
        measured={"p99_seconds": round(p99, 4), "events": int(win.latency_count)},
    )


def worker_metrics_gate(
    sample: MetricsSample, win: MetricsSample, stage: Stage = "pre-switch"
) -> GateResult:
    problems = []
    if sample.integrity_failures:
        problems.append(f"{sample.integrity_failures:.0f} integrity failure(s)")
    opened = sorted(name for name, state in sample.breakers.items() if state != 0)
    if opened:
        problems.append(f"circuit breaker not closed: {', '.join(opened)}")
    errors = sum(n for code, n in win.intake_by_code.items() if code.startswith("5"))
    if errors:
        problems.append(f"{errors:.0f} intake answer(s) 5xx")
    return GateResult(
        "worker-metrics", stage, not problems,
        "; ".join(problems) or "no integrity failure, breakers closed, no intake 5xx",
        measured={"integrity_failures": int(sample.integrity_failures),
                  "breakers_open": len(opened), "intake_5xx": int(errors)},
    )


def dead_letter_gate(
    before: int, after: int, smoke_dead_lettered: int, th: Thresholds, stage: Stage
) -> GateResult:
    growth = after - before
    passed = growth <= th.max_dead_letter_growth and smoke_dead_lettered == 0
    detail = f"{growth} new dead letter(s) (limit {th.max_dead_letter_growth})"
    if smoke_dead_lettered:
        detail += f"; {smoke_dead_lettered} smoke event(s) dead-lettered"
    return GateResult(
        "dead-letters", stage, passed, detail,
        measured={"before": before, "after": after, "growth": growth},
    )


def readiness_gate(
    ready: bool, problems: Sequence[str], waited: float, deadline: float
) -> GateResult:
    if ready:
        return GateResult(
            "readiness", "pre-switch", True, f"ready after {waited:.1f}s", waited,
            measured={"seconds": round(waited, 2)},
        )
    why = "; ".join(problems) or "no answer"
    return GateResult(
        "readiness", "pre-switch", False,
        f"not ready within the {deadline:g}s deadline: {why}", waited,
        measured={"seconds": round(waited, 2)},
    )


# --------------------------------------------------------------------------- migrations


@dataclass(frozen=True)
class MigrationPlan:
    to_apply: tuple[Migration, ...]
    refused: tuple[Migration, ...]
    reason: str | None = None
    note: str | None = None  # how the platform applies them, when not listed here

    @property
    def ok(self) -> bool:
        return not self.refused

    def names(self, which: Iterable[Migration]) -> list[str]:
        return [f"{m.version:04d}_{m.name} ({m.kind})" for m in which]

    def gate(self, seconds: float = 0.0) -> GateResult:
        if self.refused:
            return GateResult(
                "migrations", "pre-switch", False, self.reason or "refused", seconds,
                measured={"refused": ", ".join(self.names(self.refused))},
            )
        if self.note:
            detail = self.note
        elif self.to_apply:
            detail = "expand only: " + ", ".join(self.names(self.to_apply))
        else:
            detail = "schema already current"
        return GateResult(
            "migrations", "pre-switch", True, detail, seconds,
            measured={"applied": len(self.to_apply)},
        )


def plan_migrations(
    applied: Iterable[int],
    wanted: Sequence[Migration],
    *,
    old_slot: str,
    old_slot_running: bool,
) -> MigrationPlan:
    """Which of the image's migrations to apply before the new slot starts.

    Expand migrations are applied; a contract migration is refused as long as the old slot
    runs (it still uses what the contract removes): the plan then applies nothing at all.
    """
    done = set(applied)
    pending = tuple(m for m in sorted(wanted, key=lambda m: m.version) if m.version not in done)
    contract = tuple(m for m in pending if m.kind == "contract")
    if contract and old_slot_running:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in contract)
        return MigrationPlan(
            (), contract,
            f"{names} is a contract migration and slot {old_slot} still runs the previous "
            "release: ship it in a later release, or run `audit-worker migrate "
            "--allow-contract` once the old slot is scaled down",
        )
    return MigrationPlan(pending, ())

"""Gate verdicts (pure): the worker's own /metrics text, histogram quantiles, thresholds,
and the expand/contract migration plan."""

from __future__ import annotations

import math

import pytest

from audit_worker.db.migrate import Migration
from audit_worker.metrics import Metrics
from audit_worker.resilience import BreakerState
from audit_worker.worker import BatchResult
from auditctl.gates import (
    MetricsSample,
    Thresholds,
    dead_letter_gate,
    error_rate_gate,
    histogram_quantile,
    latency_gate,
    parse_metrics,
    plan_migrations,
    readiness_gate,
    window,
    worker_metrics_gate,
)

TH = Thresholds()


def worker_metrics(received: int, dead: int, latencies_ms: list[float]) -> Metrics:
    """A worker's registry after one batch (the real `Metrics` class, no server)."""
    metrics = Metrics()
    metrics.events_received.inc(received)
    result = BatchResult(read=received, stored=received - dead, dead_lettered=dead,
                         latencies_ms=latencies_ms)
    metrics.observe_batch(result, ["schema_invalid"] * dead, 0.01)
    return metrics


def text(metrics: Metrics) -> str:
    body, _ = metrics.render()
    return body.decode()


def test_parse_reads_the_workers_own_exposition() -> None:
    metrics = worker_metrics(100, 2, [20.0] * 98)
    metrics.set_breaker("postgres", BreakerState.OPEN)
    metrics.intake_requests.labels("202").inc(3)
    metrics.intake_requests.labels("503").inc()
    metrics.slot_active.set(1)
    metrics.slot_epoch.set(7)
    sample = parse_metrics(text(metrics))
    assert sample.received == 100 and sample.stored == 98 and sample.dead_lettered == 2
    assert sample.latency_count == 98
    assert sample.latency_buckets[-1] == (math.inf, 98)
    assert sample.breakers["postgres"] == 2 and sample.breakers["redis"] == 0
    assert sample.intake_by_code == {"202": 3, "503": 1}
    assert (sample.slot_active, sample.slot_epoch) == (1, 7)


def test_window_subtracts_counters_and_keeps_gauges() -> None:
    before = parse_metrics(text(worker_metrics(10, 0, [5.0] * 10)))
    after_metrics = worker_metrics(10, 0, [5.0] * 10)
    after_metrics.events_received.inc(40)
    after_metrics.observe_batch(BatchResult(read=40, stored=39, dead_lettered=1,
                                            latencies_ms=[300.0] * 39), ["x"], 0.01)
    win = window(before, parse_metrics(text(after_metrics)))
    assert win.received == 40 and win.dead_lettered == 1 and win.latency_count == 39
    assert histogram_quantile(0.5, win.latency_buckets) == pytest.approx(0.375, abs=0.13)


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.5, 0.05), (0.9, 0.09), (1.0, 0.1), (0.0, 0.0)],
)
def test_histogram_quantile_interpolates_like_prometheus(q: float, expected: float) -> None:
    buckets = [(0.1, 100.0), (1.0, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(q, buckets) == pytest.approx(expected)


def test_histogram_quantile_edge_cases() -> None:
    assert histogram_quantile(0.99, []) is None
    assert histogram_quantile(0.99, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 100.0)]) == 0.1  # in +Inf
    with pytest.raises(ValueError, match="quantile"):
        histogram_quantile(1.5, [(1.0, 1.0)])


def test_error_rate_gate() -> None:
    ok = error_rate_gate(MetricsSample(received=1000, dead_lettered=5), TH)
    bad = error_rate_gate(MetricsSample(received=100, dead_lettered=5), TH)
    idle = error_rate_gate(MetricsSample(), TH)
    tampered = error_rate_gate(MetricsSample(received=100, integrity_failures=1), TH)
    assert ok.passed and ok.measured["error_rate"] == 0.005
    assert not bad.passed and "5.00%" in bad.detail
    assert not idle.passed and "no events" in idle.detail
    assert not tampered.passed and "integrity" in tampered.detail


def test_latency_gate_uses_the_99th_percentile() -> None:
    fast = MetricsSample(latency_buckets=((0.1, 99.0), (5.0, 100.0), (math.inf, 100.0)),
                         latency_count=100)
    slow = MetricsSample(latency_buckets=((0.1, 50.0), (5.0, 100.0), (math.inf, 100.0)),
                         latency_count=100)
    assert latency_gate(fast, TH).passed
    result = latency_gate(slow, TH)
    assert not result.passed and result.measured["p99_seconds"] > 2.0
    assert not latency_gate(MetricsSample(), TH).passed


def test_worker_metrics_gate_names_each_problem() -> None:
    healthy = MetricsSample(breakers={"postgres": 0, "redis": 0})
    assert worker_metrics_gate(healthy, MetricsSample()).passed
    sick = MetricsSample(integrity_failures=1, breakers={"kms": 2, "redis": 0})
    win = MetricsSample(intake_by_code={"202": 5, "503": 2})
    result = worker_metrics_gate(sick, win)
    assert not result.passed
    assert "integrity" in result.detail and "kms" in result.detail and "2 intake" in result.detail


def test_dead_letter_gate() -> None:
    assert dead_letter_gate(10, 10, 0, TH, "pre-switch").passed
    assert not dead_letter_gate(10, 11, 0, TH, "pre-switch").passed
    assert dead_letter_gate(10, 11, 0, Thresholds(max_dead_letter_growth=5), "pre-switch").passed
    smoke = dead_letter_gate(10, 10, 1, Thresholds(max_dead_letter_growth=5), "post-switch")
    assert not smoke.passed and "smoke" in smoke.detail


def test_readiness_gate_says_why_not_ready() -> None:
    assert readiness_gate(True, [], 1.2, 60).passed
    result = readiness_gate(False, ["starting: postgres: refused"], 60.1, 60)
    assert not result.passed and "60s deadline" in result.detail and "refused" in result.detail


def migration(version: int, kind: str = "expand") -> Migration:
    return Migration(version, f"m{version}", kind, f"-- kind: {kind}\nSELECT {version};")  # type: ignore[arg-type]


def test_expand_migrations_are_planned_in_order() -> None:
    plan = plan_migrations([1], [migration(3), migration(1), migration(2)], old_slot="blue",
                           old_slot_running=True)
    assert plan.ok and [m.version for m in plan.to_apply] == [2, 3]
    assert plan.gate().passed and "0002_m2 (expand)" in plan.gate().detail


def test_a_contract_migration_is_refused_while_the_old_slot_runs() -> None:
    wanted = [migration(1), migration(2), migration(3, "contract")]
    plan = plan_migrations([1], wanted, old_slot="blue", old_slot_running=True)
    assert not plan.ok and plan.to_apply == ()  # nothing at all is applied
    assert [m.version for m in plan.refused] == [3]
    assert "slot blue still runs" in (plan.reason or "")
    assert not plan.gate().passed


def test_a_contract_migration_is_allowed_once_the_old_slot_is_gone() -> None:
    plan = plan_migrations([1], [migration(1), migration(2, "contract")], old_slot="blue",
                           old_slot_running=False)
    assert plan.ok and [m.version for m in plan.to_apply] == [2]


def test_an_applied_contract_migration_is_not_pending() -> None:
    plan = plan_migrations([1, 2], [migration(1), migration(2, "contract")], old_slot="blue",
                           old_slot_running=True)
    assert plan.ok and plan.to_apply == () and plan.gate().detail == "schema already current"

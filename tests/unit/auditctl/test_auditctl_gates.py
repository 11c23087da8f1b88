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
    GateResult,
    MetricsSample,
    MigrationPlan,
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


# ---- verdicts as stored in the promotion record: every field pinned

def test_error_rate_gate_verdicts_are_stored_as_they_read() -> None:
    assert error_rate_gate(MetricsSample(received=1000, dead_lettered=10), TH) == GateResult(
        "error-rate", "post-switch", True, "10 of 1000 entries dead-lettered (1.00%, limit 1.00%)",
        measured={"error_rate": 0.01, "received": 1000, "dead_lettered": 10})
    assert error_rate_gate(MetricsSample(received=999, dead_lettered=10), TH,
                           "drill") == GateResult(
        "error-rate", "drill", False, "10 of 999 entries dead-lettered (1.00%, limit 1.00%)",
        measured={"error_rate": 0.01001, "received": 999, "dead_lettered": 10})
    assert error_rate_gate(MetricsSample(received=100, integrity_failures=2), TH) == GateResult(
        "error-rate", "post-switch", False,
        "0 of 100 entries dead-lettered (0.00%, limit 1.00%); 2 integrity failure(s)",
        measured={"error_rate": 0.0, "received": 100, "dead_lettered": 0})
    assert error_rate_gate(MetricsSample(received=0.5), TH) == GateResult(
        "error-rate", "post-switch", True, "0 of 0 entries dead-lettered (0.00%, limit 1.00%)",
        measured={"error_rate": 0.0, "received": 0, "dead_lettered": 0})
    assert error_rate_gate(MetricsSample(received=-1), TH, "drill") == GateResult(
        "error-rate", "drill", False, "the new slot received no events in the window",
        measured={"received": 0})


def test_latency_gate_verdicts_are_stored_as_they_read() -> None:
    at_limit = MetricsSample(latency_buckets=((2.0, 100.0), (math.inf, 100.0)),
                             latency_count=100)
    assert latency_gate(at_limit, Thresholds(max_latency_p99_seconds=1.98)) == GateResult(
        "latency", "post-switch", True, "p99 1980 ms over 100 events (limit 1980 ms)",
        measured={"p99_seconds": 1.98, "events": 100})
    assert latency_gate(at_limit, Thresholds(max_latency_p99_seconds=1.97), "drill") == (
        GateResult("latency", "drill", False, "p99 1980 ms over 100 events (limit 1970 ms)",
                   measured={"p99_seconds": 1.98, "events": 100}))
    assert latency_gate(MetricsSample(), TH, "drill") == GateResult(
        "latency", "drill", False, "no event latency observed in the window")


def test_worker_metrics_gate_verdicts_are_stored_as_they_read() -> None:
    assert worker_metrics_gate(MetricsSample(breakers={"postgres": 0}), MetricsSample(
        intake_by_code={"202": 4, "429": 1})) == GateResult(
        "worker-metrics", "pre-switch", True,
        "no integrity failure, breakers closed, no intake 5xx",
        measured={"integrity_failures": 0, "breakers_open": 0, "intake_5xx": 0})
    sick = MetricsSample(integrity_failures=3, breakers={"redis": 1, "kms": 2, "postgres": 0})
    assert worker_metrics_gate(sick, MetricsSample(intake_by_code={"503": 2, "500": 1}),
                               "post-switch") == GateResult(
        "worker-metrics", "post-switch", False,
        "3 integrity failure(s); circuit breaker not closed: kms, redis; 3 intake answer(s) 5xx",
        measured={"integrity_failures": 3, "breakers_open": 2, "intake_5xx": 3})


def test_dead_letter_gate_verdicts_are_stored_as_they_read() -> None:
    assert dead_letter_gate(10, 12, 0, Thresholds(max_dead_letter_growth=2),
                            "pre-switch") == GateResult(
        "dead-letters", "pre-switch", True, "2 new dead letter(s) (limit 2)",
        measured={"before": 10, "after": 12, "growth": 2})
    assert dead_letter_gate(10, 13, 2, Thresholds(max_dead_letter_growth=2),
                            "post-switch") == GateResult(
        "dead-letters", "post-switch", False,
        "3 new dead letter(s) (limit 2); 2 smoke event(s) dead-lettered",
        measured={"before": 10, "after": 13, "growth": 3})


def test_readiness_gate_verdicts_are_stored_as_they_read() -> None:
    assert readiness_gate(True, ["ignored"], 1.256, 60) == GateResult(
        "readiness", "pre-switch", True, "ready after 1.3s", 1.256, measured={"seconds": 1.26})
    assert readiness_gate(False, ["starting", "postgres: refused"], 60.123, 60.5) == GateResult(
        "readiness", "pre-switch", False,
        "not ready within the 60.5s deadline: starting; postgres: refused", 60.123,
        measured={"seconds": 60.12})
    assert readiness_gate(False, [], 5.0, 5).detail == "not ready within the 5s deadline: no answer"


def test_migration_gate_verdicts_are_stored_as_they_read() -> None:
    plan = plan_migrations([1], [migration(12), migration(1), migration(2)], old_slot="blue",
                           old_slot_running=True)
    assert plan.gate(0.5) == GateResult(
        "migrations", "pre-switch", True, "expand only: 0002_m2 (expand), 0012_m12 (expand)", 0.5,
        measured={"applied": 2})
    refused = plan_migrations([], [migration(1), migration(2, "contract"),
                                   migration(3, "contract")], old_slot="green",
                              old_slot_running=True)
    assert refused.reason == (
        "0002_m2, 0003_m3 is a contract migration and slot green still runs the previous "
        "release: ship it in a later release, or run `audit-worker migrate --allow-contract` "
        "once the old slot is scaled down")
    assert refused.gate(0.25) == GateResult(
        "migrations", "pre-switch", False, refused.reason, 0.25,
        measured={"refused": "0002_m2 (contract), 0003_m3 (contract)"})
    noted = MigrationPlan((migration(4),), (), note="applied by the platform's job")
    assert noted.gate() == GateResult("migrations", "pre-switch", True,
                                      "applied by the platform's job", 0.0,
                                      measured={"applied": 1})
    assert MigrationPlan((), (migration(5, "contract"),)).gate().detail == "refused"
    assert plan_migrations([], [], old_slot="blue", old_slot_running=True) == MigrationPlan(
        (), ())


def test_a_gate_result_survives_its_stored_form() -> None:
    result = GateResult("smoke", "post-switch", True, "3 events", 0.5, {"events": 3})
    assert result.to_dict() == {"name": "smoke", "stage": "post-switch", "passed": True,
                                "detail": "3 events", "seconds": 0.5,
                                "measured": {"events": 3}}
    assert GateResult.from_dict(result.to_dict()) == result
    assert GateResult("x", "drill", True, "d") == GateResult("x", "drill", True, "d", 0.0, {})


def test_the_default_thresholds_are_pinned() -> None:
    assert Thresholds() == Thresholds(
        readiness_timeout_seconds=60.0, smoke_events=3, smoke_timeout_seconds=30.0,
        max_error_rate=0.01, max_latency_p99_seconds=2.0, max_dead_letter_growth=0,
        analysis_seconds=2.0)


def test_parse_reads_every_figure_and_sums_dead_letters_and_codes() -> None:
    exposition = "\n".join([
        "# TYPE audit_events_received_total counter", "audit_events_received_total 12",
        "# TYPE audit_events_stored_total counter", "audit_events_stored_total 9",
        "# TYPE audit_events_dead_lettered_total counter",
        'audit_events_dead_lettered_total{rule="a"} 2',
        'audit_events_dead_lettered_total{rule="b"} 1',
        "# TYPE audit_integrity_failures_total counter", "audit_integrity_failures_total 1",
        "# TYPE audit_event_latency_seconds histogram",
        'audit_event_latency_seconds_bucket{le="0.5"} 4',
        'audit_event_latency_seconds_bucket{le="0.1"} 3',
        'audit_event_latency_seconds_bucket{le="+Inf"} 9',
        "audit_event_latency_seconds_count 9", "audit_event_latency_seconds_sum 2",
        "# TYPE audit_breaker_state gauge", 'audit_breaker_state{dependency="kms"} 1',
        "# TYPE audit_intake_requests_total counter",
        'audit_intake_requests_total{code="202",path="a"} 2',
        'audit_intake_requests_total{code="202",path="b"} 3',
        "# TYPE audit_slot_active gauge", "audit_slot_active 0",
        "# TYPE audit_slot_epoch gauge", "audit_slot_epoch 4",
        "# TYPE audit_tree_size gauge", "audit_tree_size 99", ""])
    assert parse_metrics(exposition) == MetricsSample(
        received=12, stored=9, dead_lettered=3, integrity_failures=1,
        latency_buckets=((0.1, 3), (0.5, 4), (math.inf, 9)), latency_count=9,
        breakers={"kms": 1}, intake_by_code={"202": 5}, slot_active=0, slot_epoch=4,
        tree_size=99)
    assert parse_metrics("") == MetricsSample()


def test_window_turns_every_counter_into_an_increase() -> None:
    before = MetricsSample(received=10, stored=8, dead_lettered=2, integrity_failures=1,
                           latency_buckets=((0.1, 5), (math.inf, 8)), latency_count=8,
                           breakers={"kms": 2}, intake_by_code={"202": 4},
                           slot_active=0, slot_epoch=3, tree_size=8)
    after = MetricsSample(received=30, stored=25, dead_lettered=5, integrity_failures=1,
                          latency_buckets=((0.1, 15), (0.5, 2), (math.inf, 25)),
                          latency_count=25, breakers={"kms": 0},
                          intake_by_code={"202": 10, "503": 1}, slot_active=1, slot_epoch=4,
                          tree_size=25)
    assert window(before, after) == MetricsSample(
        received=20, stored=17, dead_lettered=3, integrity_failures=0,
        latency_buckets=((0.1, 10), (0.5, 2), (math.inf, 17)), latency_count=17,
        breakers={"kms": 0}, intake_by_code={"202": 6, "503": 1}, slot_active=1, slot_epoch=4,
        tree_size=25)


def test_histogram_quantile_bounds_and_ties() -> None:
    assert histogram_quantile(0.0, [(1.0, 4.0), (math.inf, 4.0)]) == 0.0
    assert histogram_quantile(1.0, [(1.0, 4.0), (math.inf, 4.0)]) == 1.0
    assert histogram_quantile(0.5, [(0.2, 0.0), (1.0, 4.0), (math.inf, 4.0)]) == (
        pytest.approx(0.6))
    assert histogram_quantile(0.5, [(math.inf, 4.0), (1.0, 4.0)]) == 0.5  # unordered input
    for q in (-0.01, 1.01):
        with pytest.raises(ValueError, match=r"^quantile must be in \[0, 1\], got "):
            histogram_quantile(q, [(1.0, 1.0)])

"""Metric names follow Prometheus conventions and labels can never carry PHI."""

from __future__ import annotations

import re
import uuid

from prometheus_client.parser import text_string_to_metric_families

from audit_worker.metrics import OTHER, Metrics, ReasonLabels
from audit_worker.resilience import BreakerState
from audit_worker.worker import BatchResult

ALLOWED_LABELS = {
    "reason", "dependency", "code", "outcome", "version", "slot", "log_id", "sqlstate"
}
REQUIRED = {
    "audit_events_received", "audit_events_stored", "audit_events_dead_lettered",
    "audit_batch_size", "audit_event_latency_seconds", "audit_stream_lag",
    "audit_stream_pending", "audit_breaker_state", "audit_tree_size",
    "audit_tree_head_age_seconds", "audit_retries", "audit_integrity_failures",
}


def families(metrics: Metrics) -> dict[str, object]:
    return {f.name: f for f in metrics.registry.collect() if f.name.startswith("audit_")}


def test_names_units_and_types_follow_prometheus_conventions() -> None:
    found = families(Metrics())
    assert set(found) >= REQUIRED, REQUIRED - set(found)
    for name, family in found.items():
        kind = family.type  # type: ignore[attr-defined]
        assert re.fullmatch(r"audit_[a-z][a-z0-9_]*", name), name
        assert not name.endswith("_total"), f"{name}: the client adds _total to counters"
        if kind == "histogram" and ("latency" in name or "duration" in name):
            assert name.endswith("_seconds"), name
        for bad in ("_ms", "_milliseconds", "_minutes"):
            assert bad not in name, f"{name}: use base units (seconds)"
    exposition = Metrics().render()[0].decode()
    for line in exposition.splitlines():
        if line.startswith("# TYPE audit_") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line
    assert "_created" not in exposition


def test_labels_are_only_bounded_non_identifying_names() -> None:
    metrics = Metrics()
    for family in metrics.registry.collect():
        if not family.name.startswith("audit_"):
            continue
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS | {"le"}, (family.name, sample.labels)


def test_dead_letter_reasons_are_bounded_and_never_free_text() -> None:
    labels = ReasonLabels(limit=3)
    assert labels("literal_error") == "literal_error"
    assert labels("MRN-TEST-000001 is not valid") == OTHER
    assert labels("value is 'John Smith'") == OTHER
    assert labels("missing") == "missing"
    assert labels("too_large") == "too_large"
    assert labels("uuid_parsing") == OTHER  # over the limit
    assert labels("literal_error") == "literal_error"  # known ones keep their label


def test_a_batch_updates_the_counters_without_putting_ids_in_labels() -> None:
    metrics = Metrics()
    event_id = uuid.uuid4()
    result = BatchResult(
        read=5, stored=3, duplicates=1, dead_lettered=1, latencies_ms=[5.0, 20.0, 1500.0],
        stored_events=[(event_id, 0)],
    )
    metrics.observe_batch(result, ["control_characters"], 0.02)
    metrics.set_breaker("postgres", BreakerState.OPEN)
    metrics.note_tree_head(42, 1_700_000_000_000)
    text = metrics.render()[0].decode()
    assert str(event_id) not in text
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text) for s in f.samples
    }
    assert values[("audit_events_stored_total", ())] == 3
    assert values[("audit_events_duplicate_total", ())] == 1
    assert values[("audit_events_dead_lettered_total", (("reason", "control_characters"),))] == 1
    assert values[("audit_event_latency_seconds_count", ())] == 3
    assert values[("audit_breaker_state", (("dependency", "postgres"),))] == 2
    assert values[("audit_tree_size", ())] == 42
    assert values[("audit_tree_head_age_seconds", ())] > 0


def test_two_workers_in_one_process_have_separate_registries() -> None:
    first, second = Metrics(), Metrics()
    first.events_stored.inc(5)
    assert b"audit_events_stored_total 0.0" in second.render()[0]

"""Event validation: every rejection says which field, what kind of value and which rule,
and never carries the value itself."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from audit_worker.events import MAX_EVENT_BYTES, AuditEvent, Rejection, parse_event
from tests.support import make_event


def _parse(**overrides: object) -> AuditEvent | Rejection:
    return parse_event(json.dumps(make_event(1, **overrides)).encode())


def test_valid_event_parses_with_utc_time() -> None:
    event = _parse(occurred="2026-03-01T10:00:00+02:00")
    assert isinstance(event, AuditEvent)
    assert event.occurred == datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("overrides", "field", "rule"),
    [
        ({"action": "X"}, "action", "literal_error"),
        ({"outcome": 3}, "outcome", "literal_error"),
        ({"event_id": "123"}, "event_id", "uuid_parsing"),
        ({"occurred": "2026-01-01T10:00:00"}, "occurred", "timezone_required"),
        ({"patient": "MRN\x00X"}, "patient", "control_characters"),
        ({"patient": ""}, "patient", "string_too_short"),
        ({"agent": {"who": "x" * 300}}, "agent.who", "string_too_long"),
        ({"source": {"observer": "has space"}}, "source.observer", "string_pattern_mismatch"),
        ({"unexpected": 1}, "unexpected", "extra_forbidden"),
        ({"entity": [{"type": "Patient", "id": 5}]}, "entity.0.id", "string_type"),
    ],
)
def test_rejection_names_field_and_rule(
    overrides: dict[str, object], field: str, rule: str
) -> None:
    rejected = _parse(**overrides)
    assert isinstance(rejected, Rejection)
    assert (rejected.field, rejected.rule) == (field, rule)


def test_missing_field_is_reported_as_missing() -> None:
    event = make_event(1)
    del event["agent"]
    rejected = parse_event(json.dumps(event).encode())
    assert isinstance(rejected, Rejection)
    assert (rejected.field, rejected.value_class, rejected.rule) == ("agent", "missing", "missing")


def test_rejection_never_contains_the_value() -> None:
    rejected = _parse(patient="MRN-SECRET-42\x01")
    assert isinstance(rejected, Rejection)
    assert "MRN-SECRET" not in json.dumps(rejected.as_dict())
    assert rejected.value_class == "string(len=14)"


def test_invalid_json_and_oversized_input_are_rejected() -> None:
    assert parse_event(b"{").rule == "json_invalid"  # type: ignore[union-attr]
    big = parse_event(b" " * (MAX_EVENT_BYTES + 1))
    assert isinstance(big, Rejection) and big.rule == "too_large"


def test_event_far_in_the_future_is_rejected() -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    rejected = _parse(occurred=later)
    assert isinstance(rejected, Rejection) and rejected.rule == "not_in_future"


def test_control_characters_in_free_text_are_removed_not_rejected() -> None:
    event = _parse(detail="line one\nline\x07 two")
    assert isinstance(event, AuditEvent)
    assert event.detail == "line one\nline two"

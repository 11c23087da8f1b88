"""Event validation: every rejection says which field, what kind of value and which rule,
and never carries the value itself."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from audit_worker.events import MAX_EVENT_BYTES, RULES, AuditEvent, Rejection, parse_event
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
        ({"action": "X"}, "action", "not_allowed_value"),
        ({"outcome": 3}, "outcome", "not_allowed_value"),
        ({"event_id": "123"}, "event_id", "invalid_uuid"),
        ({"occurred": "2026-01-01T10:00:00"}, "occurred", "timezone_required"),
        ({"occurred": "0001-01-01T00:00:00+05:00"}, "occurred", "occurred_out_of_range"),
        ({"occurred": "9999-12-31T23:59:59-05:00"}, "occurred", "occurred_out_of_range"),
        ({"occurred": "1969-12-31T23:59:59Z"}, "occurred", "occurred_out_of_range"),
        ({"occurred": "2026-02-30T10:00:00Z"}, "occurred", "invalid_datetime"),
        ({"patient": "MRN\x00X"}, "patient", "control_characters"),
        ({"patient": ""}, "patient", "too_short"),
        ({"agent": {"who": "x" * 300}}, "agent.who", "too_long"),
        ({"source": {"observer": "has space"}}, "source.observer", "pattern_mismatch"),
        ({"unexpected": 1}, "(unknown key)", "unknown_field"),
        ({"role": 1}, "(unknown key)", "unknown_field"),  # a field name, but not here
        ({"agent": {"who": "a", "Jane Doe MRN 12345": 1}}, "agent.(unknown key)", "unknown_field"),
        ({"entity": [{"type": "Patient", "id": 5}]}, "entity.0.id", "wrong_type"),
    ],
)
def test_rejection_names_field_and_rule(
    overrides: dict[str, object], field: str, rule: str
) -> None:
    rejected = _parse(**overrides)
    assert isinstance(rejected, Rejection)
    assert (rejected.field, rejected.rule) == (field, rule)


def test_rules_and_messages_come_from_the_fixed_vocabulary() -> None:
    for overrides in (
        {"event_id": "6a1d4a4e-1111-4111-8111-11111111111Z"},  # the parser quotes the "Z"
        {"agent": {"who": "a", "Jane Doe MRN 12345": 1}},
        {"occurred": "0001-01-01T00:00:00+05:00"},
    ):
        rejected = _parse(**overrides)
        assert isinstance(rejected, Rejection)
        assert rejected.rule in RULES
        assert rejected.message == f"{rejected.field}: {RULES[rejected.rule]}"
        assert "Jane" not in json.dumps(rejected.as_dict())
        assert "`Z`" not in rejected.message


def test_occurred_bounds_are_inclusive_of_the_epoch() -> None:
    assert isinstance(_parse(occurred="1970-01-01T00:00:00Z"), AuditEvent)
    assert isinstance(_parse(occurred="1970-01-01T05:00:00+05:00"), AuditEvent)
    assert _parse(occurred="1970-01-01T04:59:59.999+05:00").rule == (  # type: ignore[union-attr]
        "occurred_out_of_range"
    )


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


@pytest.mark.parametrize("occurred", [0, 1767225600, "1767225600", 253402300800, 1.5, None])
def test_occurred_must_be_rfc3339_text_not_a_number(occurred: object) -> None:
    # pydantic alone would read numbers as Unix time (253402300800 as milliseconds: 1978).
    rejected = _parse(occurred=occurred)
    assert isinstance(rejected, Rejection)
    assert (rejected.field, rejected.rule) == ("occurred", "invalid_datetime")

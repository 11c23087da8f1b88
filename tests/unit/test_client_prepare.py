"""AuditClient's validation happens before anything is written."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from audit_worker.client import EventRejected, prepare
from audit_worker.events import parse_event
from tests.support import make_event


def test_event_id_and_occurred_are_filled_in() -> None:
    event, raw = prepare(
        action="R", code="rest-read", outcome=0,
        agent={"who": "clinician-1"}, source={"observer": "ehr"},
    )
    assert isinstance(event.event_id, uuid.UUID)
    assert abs((datetime.now(UTC) - event.occurred).total_seconds()) < 5
    assert parse_event(raw) == event  # the worker will read exactly this


def test_keyword_fields_override_the_mapping_and_datetimes_serialise() -> None:
    occurred = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    event, raw = prepare(make_event(1), outcome=4, occurred=occurred)
    assert event.outcome == 4 and event.occurred == occurred
    assert orjson.loads(raw)["occurred"].startswith("2026-01-02T03:04:05")


def test_invalid_events_raise_with_the_rule_and_without_the_value() -> None:
    with pytest.raises(EventRejected) as err:
        prepare(make_event(1, patient="MRN-TEST-\x00-1"))
    assert err.value.rejection.rule == "control_characters"
    assert "MRN-TEST" not in str(err.value)


def test_unserialisable_values_are_a_rejection_too() -> None:
    with pytest.raises(EventRejected) as err:
        prepare(make_event(1), detail=object())
    assert err.value.rejection.rule == "not_serialisable"

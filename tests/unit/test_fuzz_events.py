"""Fuzzing `parse_event`: whatever the bytes, an event or a precise rejection, never a crash.

Bounded (200 examples per property) so the suite stays fast; run with
``--hypothesis-seed`` to reproduce a failure.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit_worker.events import MAX_EVENT_BYTES, AuditEvent, Rejection, parse_event

FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


def valid_event() -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "action": "R",
        "code": "rest-read",
        "outcome": 0,
        "occurred": datetime.now(UTC).isoformat(),
        "agent": {"who": "clinician-1", "role": "physician", "network": "10.0.0.1"},
        "source": {"observer": "ehr-fuzz", "site": "ward-1"},
        "patient": "MRN-TEST-000001",
        "entity": [{"type": "Observation", "id": "obs-1"}],
        "purpose_of_use": ["TREAT"],
        "detail": "fuzz",
    }


FIELDS = [*valid_event(), "agent.who", "agent.role", "source.observer", "entity.0.type"]


def check(outcome: AuditEvent | Rejection) -> None:
    if isinstance(outcome, Rejection):
        assert outcome.field, outcome
        assert outcome.value_class, outcome
        assert outcome.rule and outcome.rule != "value_error", outcome
        assert outcome.message, outcome
        assert outcome.as_dict().keys() == {"field", "value_class", "rule", "message"}
    else:
        assert isinstance(outcome, AuditEvent)


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(raw: bytes) -> None:
    check(parse_event(raw))


@FUZZ
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    check(parse_event(json.dumps(value).encode()))


def _set(event: dict[str, Any], path: str, new: Any) -> None:
    *parents, last = path.split(".")
    target: Any = event
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        target[int(last)] = new
    else:
        target[last] = new


@FUZZ
@given(st.sampled_from(FIELDS), json_values | st.text(min_size=0, max_size=300))
def test_one_field_replaced_by_anything(path: str, new: Any) -> None:
    event = valid_event()
    _set(event, path, new)
    outcome = parse_event(json.dumps(event).encode())
    check(outcome)
    if isinstance(outcome, Rejection):
        # the rejection names the field that was changed (or the event as a whole)
        assert outcome.field.split(".")[0] in (path.split(".")[0], "(event)"), (path, outcome)
        # and never the value itself (it may be PHI)
        if isinstance(new, str) and len(new) >= 8:
            assert new not in outcome.message and new not in outcome.value_class


@FUZZ
@given(st.sampled_from([f for f in FIELDS if "." not in f]))
def test_one_field_removed(name: str) -> None:
    event = valid_event()
    del event[name]
    check(parse_event(json.dumps(event).encode()))


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=10), json_values, min_size=1, max_size=3))
def test_unknown_fields_are_rejected_by_name(extra: dict[str, Any]) -> None:
    event = valid_event()
    extra = {k: v for k, v in extra.items() if k not in event}
    event.update(extra)
    outcome = parse_event(json.dumps(event).encode())
    check(outcome)
    if extra:
        assert isinstance(outcome, Rejection) and outcome.rule == "unknown_field"
        # The key's name is input: it never becomes the field.
        assert outcome.field == "(unknown key)"


def test_oversized_event_is_rejected_before_parsing() -> None:
    outcome = parse_event(b"{" + b" " * MAX_EVENT_BYTES + b"}")
    assert isinstance(outcome, Rejection) and outcome.rule == "too_large"

"""The event model's rules, each at its bound and one past it, and the rejection vocabulary
pinned as it is stored in dead letters. Limits are spelled out as numbers here, not taken
from the module, so that moving one in the code fails a test."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from audit_worker.events import (
    RULES,
    UNKNOWN_KEY,
    AuditEvent,
    Rejection,
    field_path,
    parse_event,
    rejection,
    value_class,
)
from tests.support import make_event

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def parse(now: datetime | None = None, **overrides: Any) -> AuditEvent | Rejection:
    return parse_event(json.dumps(make_event(1, **overrides)).encode(), now=now)


def accepted(**overrides: Any) -> AuditEvent:
    event = parse(**overrides)
    assert isinstance(event, AuditEvent), event
    return event


def refused(**overrides: Any) -> Rejection:
    outcome = parse(**overrides)
    assert isinstance(outcome, Rejection), outcome
    return outcome


# ---- allowed values

@pytest.mark.parametrize("outcome", [0, 4, 8, 12],
                         ids=["0-success", "4-minor-failure", "8-serious-failure",
                              "12-major-failure"])
def test_every_fhir_outcome_code_is_accepted(outcome: int) -> None:
    assert accepted(outcome=outcome).outcome == outcome


@pytest.mark.parametrize("outcome", [-1, 1, 3, 5, 7, 9, 11, 13, 16])
def test_outcome_codes_next_to_the_fhir_codes_are_refused(outcome: int) -> None:
    assert refused(outcome=outcome).rule == "not_allowed_value"


@pytest.mark.parametrize("action", ["C", "R", "U", "D", "E"])
def test_every_fhir_action_is_accepted(action: str) -> None:
    assert accepted(action=action).action == action


@pytest.mark.parametrize("action", ["c", "X", "CR", ""])
def test_other_actions_are_refused(action: str) -> None:
    assert refused(action=action).rule == "not_allowed_value"


# ---- size and time limits

def _padded(size: int) -> bytes:
    raw = json.dumps(make_event(1)).encode()
    return raw + b" " * (size - len(raw))  # JSON allows trailing whitespace


def test_an_event_of_16_kib_is_accepted() -> None:
    assert isinstance(parse_event(_padded(16_384)), AuditEvent)


def test_an_event_one_byte_over_16_kib_is_refused_as_too_large() -> None:
    outcome = parse_event(_padded(16_385))
    assert isinstance(outcome, Rejection)
    assert outcome.as_dict() == {
        "field": "(event)", "value_class": "bytes(len=16385)", "rule": "too_large",
        "message": "(event): is larger than the limit of 16384 bytes",
    }


def test_an_event_300_seconds_ahead_is_within_the_clock_skew() -> None:
    event = parse(now=NOW, occurred=(NOW + timedelta(seconds=300)).isoformat())
    assert isinstance(event, AuditEvent)


def test_an_event_just_over_300_seconds_ahead_is_refused() -> None:
    outcome = parse(now=NOW, occurred=(NOW + timedelta(seconds=300.001)).isoformat())
    assert isinstance(outcome, Rejection)
    assert outcome.as_dict() == {
        "field": "occurred", "value_class": "datetime", "rule": "not_in_future",
        "message": "occurred: lies further in the future than the allowed clock skew",
    }


def test_the_clock_skew_allowance_is_a_parameter() -> None:
    ahead = json.dumps(make_event(1, occurred=(NOW + timedelta(seconds=2)).isoformat()))
    assert isinstance(parse_event(ahead.encode(), now=NOW, max_future_skew=1), Rejection)
    assert isinstance(parse_event(ahead.encode(), now=NOW, max_future_skew=2), AuditEvent)


# ---- lengths and counts

@pytest.mark.parametrize(("field", "make"), [
    ("agent.who", lambda v: {"agent": {"who": v}}),
    ("agent.network", lambda v: {"agent": {"who": "a", "network": v}}),
    ("patient", lambda v: {"patient": v}),
    ("entity.0.id", lambda v: {"entity": [{"type": "Patient", "id": v}]}),
])
def test_an_identifier_holds_1_to_256_characters(field: str, make: Any) -> None:
    accepted(**make("x" * 256))
    accepted(**make("x"))
    too_long = refused(**make("x" * 257))
    assert (too_long.field, too_long.rule, too_long.value_class) == (
        field, "too_long", "string(len=257)")
    assert (refused(**make("")).field, refused(**make("")).rule) == (field, "too_short")


@pytest.mark.parametrize(("field", "make"), [
    ("code", lambda v: {"code": v}),
    ("agent.role", lambda v: {"agent": {"who": "a", "role": v}}),
    ("source.observer", lambda v: {"source": {"observer": v}}),
    ("source.site", lambda v: {"source": {"observer": "o", "site": v}}),
    ("source.type", lambda v: {"source": {"observer": "o", "type": v}}),
    ("entity.0.type", lambda v: {"entity": [{"type": v}]}),
    ("purpose_of_use.0", lambda v: {"purpose_of_use": [v]}),
])
def test_a_code_holds_1_to_128_characters_of_its_alphabet(field: str, make: Any) -> None:
    accepted(**make("a" * 128))
    accepted(**make("A"))
    accepted(**make("9a._:/-Z"))
    for bad in ("a" * 129, "", "-abc", "abc!", "!abc", "a b"):
        outcome = refused(**make(bad))
        assert (outcome.field, outcome.rule) == (field, "pattern_mismatch"), bad


def test_detail_holds_4096_characters() -> None:
    assert accepted(detail="d" * 4096).detail == "d" * 4096
    assert refused(detail="d" * 4097).rule == "too_long"


@pytest.mark.parametrize(("field", "item", "limit"), [
    ("entity", {"type": "Patient"}, 32),
    ("purpose_of_use", "TREAT", 8),
])
def test_lists_hold_up_to_their_limit(field: str, item: Any, limit: int) -> None:
    assert len(getattr(accepted(**{field: [item] * limit}), field)) == limit
    outcome = refused(**{field: [item] * (limit + 1)})
    assert (outcome.field, outcome.rule, outcome.value_class) == (
        field, "too_long", f"array(len={limit + 1})")


# ---- whitespace and control characters

def test_identifiers_and_codes_are_stripped_of_surrounding_whitespace() -> None:
    event = accepted(code=" rest-read ", patient="  MRN-1 ", detail=" note ",
                     agent={"who": " clinician-1 ", "role": " physician "},
                     source={"observer": " ehr "},
                     entity=[{"type": " Patient ", "id": " p-1 "}],
                     purpose_of_use=[" TREAT "])
    assert (event.code, event.patient, event.detail) == ("rest-read", "MRN-1", "note")
    assert (event.agent.who, event.agent.role, event.source.observer) == (
        "clinician-1", "physician", "ehr")
    assert (event.entity[0].type, event.entity[0].id, event.purpose_of_use) == (
        "Patient", "p-1", ["TREAT"])


def test_an_identifier_of_only_whitespace_is_empty() -> None:
    assert refused(agent={"who": "   "}).rule == "too_short"


@pytest.mark.parametrize("value", ["\x01abc", "abc\x01", "a\x00b", "a\x1fb", "a\x7fb", "a\nb"])
def test_an_identifier_with_a_control_character_is_refused(value: str) -> None:
    outcome = refused(patient=value)
    assert (outcome.field, outcome.rule) == ("patient", "control_characters")
    assert outcome.message == "patient: contains control characters"


def test_free_text_keeps_tabs_and_line_breaks_and_loses_other_controls() -> None:
    kept = "a\tb\nc\rd"
    dropped = "".join(chr(c) for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F))
    assert accepted(detail=f"x{dropped}{kept}").detail == f"x{kept}"


# ---- defaults and immutability

def test_optional_fields_default_to_absent() -> None:
    raw = {k: v for k, v in make_event(1).items()
           if k in ("event_id", "action", "code", "outcome", "occurred")}
    raw |= {"agent": {"who": "a"}, "source": {"observer": "o"}}
    event = parse_event(json.dumps(raw).encode())
    assert isinstance(event, AuditEvent)
    assert (event.agent.role, event.agent.requestor, event.agent.network) == (None, True, None)
    assert (event.source.site, event.source.type) == (None, None)
    assert (event.patient, event.entity, event.purpose_of_use, event.detail) == (
        None, [], [], None)
    entity = accepted(entity=[{"type": "Patient"}]).entity[0]
    assert entity.id is None


def test_a_parsed_event_cannot_be_changed() -> None:
    event = accepted()
    with pytest.raises(ValidationError):
        event.code = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        event.agent.who = "other"  # type: ignore[misc]


# ---- rejections: the vocabulary, and what a rejection says

def test_the_rule_vocabulary_is_pinned_as_stored_in_dead_letters() -> None:
    assert RULES == {
        "json_invalid": "is not valid UTF-8 JSON",
        "not_an_object": "must be a JSON object",
        "missing": "is required",
        "unknown_field": "is not a field of the event model",
        "wrong_type": "has the wrong type",
        "not_allowed_value": "is not one of the allowed values",
        "pattern_mismatch": "does not match the allowed format",
        "control_characters": "contains control characters",
        "too_short": "is too short or empty",
        "too_long": "is too long or has too many items",
        "invalid_uuid": "is not a valid UUID",
        "invalid_datetime": "is not a valid RFC 3339 date-time",
        "timezone_required": "needs a timezone offset (e.g. 2026-01-01T10:00:00Z)",
        "occurred_out_of_range":
            "lies before 1970-01-01T00:00:00Z or outside the calendar in UTC",
        "not_in_future": "lies further in the future than the allowed clock skew",
        "too_large": "is larger than the limit of 16384 bytes",
        "too_deep": "is nested too deeply to be processed",
        "invalid_value": "is invalid",
        "missing_event_field": "has no 'event' field",
        "not_serialisable": "could not be serialised as JSON",
        "unprocessable":
            "could not be processed (an internal error; the entry is kept sealed)",
        "database_refused": "was refused by the database",
        "delivery_limit_exceeded": "failed in the worker as often as the delivery limit allows",
    }


@pytest.mark.parametrize(("raw", "value_klass", "rule"), [
    (b"{", "bytes(len=1)", "json_invalid"),
    (b'{"code": "\xff"}', "bytes(len=13)", "json_invalid"),
    (b"[1]", "array(len=1)", "not_an_object"),
    (b'"x"', "string(len=1)", "not_an_object"),
    (b"null", "null", "not_an_object"),
])
def test_input_that_is_not_an_object_is_refused_as_a_whole(
        raw: bytes, value_klass: str, rule: str) -> None:
    outcome = parse_event(raw)
    assert isinstance(outcome, Rejection)
    assert (outcome.field, outcome.value_class, outcome.rule) == ("(event)", value_klass, rule)
    assert outcome.message == f"(event): {RULES[rule]}"


@pytest.mark.parametrize(("overrides", "field", "klass", "rule"), [
    ({"code": 5}, "code", "int", "wrong_type"),
    ({"entity": {}}, "entity", "object", "wrong_type"),
    ({"purpose_of_use": [1]}, "purpose_of_use.0", "int", "wrong_type"),
    ({"agent": {"who": "a", "requestor": "maybe"}}, "agent.requestor", "string(len=5)",
     "wrong_type"),
    ({"agent": {"who": "a", "requestor": []}}, "agent.requestor", "array(len=0)",
     "wrong_type"),
    ({"event_id": 5}, "event_id", "int", "invalid_uuid"),
    ({"event_id": "zz"}, "event_id", "string(len=2)", "invalid_uuid"),
    ({"occurred": []}, "occurred", "array(len=0)", "invalid_datetime"),
    ({"occurred": "2026-13-01T00:00:00Z"}, "occurred", "string(len=20)", "invalid_datetime"),
    ({"occurred": "2026-02-30T10:00:00Z"}, "occurred", "string(len=20)", "invalid_datetime"),
    ({"occurred": "2026-01-01"}, "occurred", "string(len=10)", "invalid_datetime"),
    ({"occurred": 1e20}, "occurred", "float", "invalid_datetime"),
    ({"outcome": 10**30}, "outcome", "int", "invalid_value"),
    ({"outcome": True}, "outcome", "boolean", "not_allowed_value"),
])
def test_each_kind_of_bad_value_has_its_rule(
        overrides: dict[str, Any], field: str, klass: str, rule: str) -> None:
    outcome = refused(**overrides)
    assert (outcome.field, outcome.value_class, outcome.rule) == (field, klass, rule)
    assert outcome.message == f"{field}: {RULES[rule]}"


@pytest.mark.parametrize(("overrides", "field", "klass"), [
    ({"agent": [1]}, "agent", "array(len=1)"), ({"agent": "x"}, "agent", "string(len=1)"),
    ({"entity": ["x"]}, "entity.0", "string(len=1)")])
def test_a_section_that_is_not_an_object_is_refused_naming_it(
        overrides: dict[str, Any], field: str, klass: str) -> None:
    outcome = refused(**overrides)
    assert outcome == Rejection(field, klass, "not_an_object", f"{field}: must be a JSON object")


def test_input_that_breaks_the_parser_is_unprocessable_not_a_crash() -> None:
    outcome = parse_event(12345)  # type: ignore[arg-type]
    assert isinstance(outcome, Rejection)
    assert outcome.as_dict() == {
        "field": "(event)", "value_class": "int", "rule": "unprocessable",
        "message": "(event): could not be processed (an internal error; the entry is kept "
                   "sealed)",
    }


@pytest.mark.parametrize(("value", "klass"), [
    (None, "null"), (True, "boolean"), (False, "boolean"), (3, "int"), (1.5, "float"),
    ("abc", "string(len=3)"), (b"ab", "bytes(len=2)"), (bytearray(b"a"), "bytes(len=1)"),
    ([1, 2], "array(len=2)"), ({"k": "v"}, "object"), (object(), "other"),
])
def test_a_value_is_described_by_type_and_size_only(value: object, klass: str) -> None:
    assert value_class(value) == klass


def test_a_database_refusal_names_its_sqlstate() -> None:
    assert rejection("event", "object", "sqlstate_23505") == Rejection(
        "event", "object", "sqlstate_23505",
        "event: was refused by the database (SQLSTATE 23505)")


@pytest.mark.parametrize("rule", ["sqlstate_2350", "sqlstate_235050", "sqlstate_2350a",
                                  "xsqlstate_23505", "sqlstate_23505\n", "no_such_rule"])
def test_a_rule_outside_the_vocabulary_becomes_invalid_value(rule: str) -> None:
    refusal = rejection("code", "int", rule)
    assert refusal == Rejection("code", "int", "invalid_value", "code: is invalid")


def test_a_field_path_keeps_indexes_and_schema_names_only() -> None:
    assert field_path(["entity", 0, "id"]) == "entity.0.id"
    assert field_path(["agent", "Jane Doe"]) == f"agent.{UNKNOWN_KEY}" == "agent.(unknown key)"
    assert field_path([]) == "(event)"

"""The audit event model (after FHIR AuditEvent and IHE ATNA) and its validation.

`parse_event` turns raw bytes into an `AuditEvent` or a `Rejection`. A rejection says which
field, what class of value (never the value: it may be PHI) and which rule failed, so the
dead-letter store is useful without becoming a second copy of patient data.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

# Control characters cannot be shown safely in a review tool, and NUL cannot be stored in a
# PostgreSQL text column; identifiers with them are rejected, free text is cleaned.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# Checked by pydantic-core's own regex engine: no Python call per identifier.
_NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]*$"
# A date-time as RFC 3339 writes it; the offset is checked afterwards (timezone_required).
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})?\Z"
)

Identifier = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=256, pattern=_NO_CONTROL_PATTERN
    ),
]
Code = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]

# FHIR AuditEvent.action: Create, Read, Update, Delete, Execute.
Action = Literal["C", "R", "U", "D", "E"]
# FHIR AuditEvent.outcome: 0 success, 4 minor failure, 8 serious failure, 12 major failure.
Outcome = Literal[0, 4, 8, 12]
MAX_EVENT_BYTES = 16_384
# `occurred` lies in [OCCURRED_MIN, now + max_future_skew]. The lower bound keeps dates that
# are surely typos (year 1) and dates without a UTC equivalent out of the log.
OCCURRED_MIN = datetime(1970, 1, 1, tzinfo=UTC)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Agent(_Strict):
    """Who did it: the actor's identifier is pseudonymised before storage."""

    who: Identifier
    role: Code | None = None
    requestor: bool = True
    network: Identifier | None = None


class Source(_Strict):
    """Which system observed and reported the event."""

    observer: Code
    site: Code | None = None
    type: Code | None = None


class Entity(_Strict):
    """What was touched. Only the resource type is stored in clear."""

    type: Code
    id: Identifier | None = None


class AuditEvent(_Strict):
    """One audit event as producers send it."""

    event_id: uuid.UUID
    action: Action
    code: Code
    outcome: Outcome
    occurred: datetime
    agent: Agent
    source: Source
    patient: Identifier | None = None
    entity: list[Entity] = Field(default_factory=list, max_length=32)
    purpose_of_use: list[Code] = Field(default_factory=list, max_length=8)
    detail: Annotated[str, StringConstraints(max_length=4096)] | None = None

    @field_validator("occurred", mode="before")
    @classmethod
    def _rfc3339_text(cls, value: Any) -> Any:
        # pydantic would also take 0, 1767225600 or "1767225600" as Unix time (seconds or
        # milliseconds, by size): a producer's bug would then be stored as a plausible date.
        if not isinstance(value, str) or not _RFC3339.match(value):
            raise ValueError("invalid_datetime")
        return value

    @field_validator("occurred")
    @classmethod
    def _timezone_required(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("timezone_required")
        try:
            utc = value.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00:00+05:00 has no UTC equivalent
            raise ValueError("occurred_out_of_range") from None
        if utc < OCCURRED_MIN:
            raise ValueError("occurred_out_of_range")
        return utc

    @field_validator("detail")
    @classmethod
    def _clean_detail(cls, value: str | None) -> str | None:
        # Free text is sanitised rather than rejected: dropping a real access record over a
        # stray control character would lose more than it protects.
        return None if value is None else _CONTROL.sub("", value)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an event was refused. Safe to log and store in clear: every part comes from the
    schema or a fixed template, never from the input (not even a key's name)."""

    field: str
    value_class: str
    rule: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {
            "field": self.field,
            "value_class": self.value_class,
            "rule": self.rule,
            "message": self.message,
        }


def value_class(value: Any) -> str:
    """Describe a value by type and size only."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return type(value).__name__
    if isinstance(value, str):
        return f"string(len={len(value)})"
    if isinstance(value, bytes | bytearray):
        return f"bytes(len={len(value)})"
    if isinstance(value, list):
        return f"array(len={len(value)})"
    if isinstance(value, dict):
        return "object"
    return "other"


# The fixed vocabulary of rejection rules, each with the one message template it uses.
# Besides these, a dead letter's rule may be ``sqlstate_XXXXX``: PostgreSQL refused the
# entry's row with that SQLSTATE (see `audit_worker.resilience`).
RULES: dict[str, str] = {
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
    "occurred_out_of_range": "lies before 1970-01-01T00:00:00Z or outside the calendar in UTC",
    "not_in_future": "lies further in the future than the allowed clock skew",
    "too_large": f"is larger than the limit of {MAX_EVENT_BYTES} bytes",
    "too_deep": "is nested too deeply to be processed",
    "invalid_value": "is invalid",
    "missing_event_field": "has no 'event' field",
    "not_serialisable": "could not be serialised as JSON",
    "unprocessable": "could not be processed (an internal error; the entry is kept sealed)",
    "database_refused": "was refused by the database",
    "delivery_limit_exceeded": "failed in the worker as often as the delivery limit allows",
}

# pydantic-core's error types, folded into the vocabulary above.
_PYDANTIC_RULES: dict[str, str] = {
    "json_invalid": "json_invalid",
    "json_type": "json_invalid",
    "model_type": "not_an_object",
    "model_attributes_type": "not_an_object",
    "dict_type": "not_an_object",
    "missing": "missing",
    "extra_forbidden": "unknown_field",
    "literal_error": "not_allowed_value",
    "enum": "not_allowed_value",
    "string_pattern_mismatch": "pattern_mismatch",
    "string_too_short": "too_short",
    "too_short": "too_short",
    "string_too_long": "too_long",
    "too_long": "too_long",
    "uuid_parsing": "invalid_uuid",
    "uuid_type": "invalid_uuid",
    "uuid_version": "invalid_uuid",
    "datetime_parsing": "invalid_datetime",
    "datetime_from_date_parsing": "invalid_datetime",
    "datetime_type": "invalid_datetime",
    "datetime_object_invalid": "invalid_datetime",
    "string_type": "wrong_type",
    "string_unicode": "wrong_type",
    "int_type": "wrong_type",
    "int_parsing": "wrong_type",
    "int_from_float": "wrong_type",
    "bool_type": "wrong_type",
    "bool_parsing": "wrong_type",
    "list_type": "wrong_type",
    "none_required": "wrong_type",
}

# Every name a location may hold; anything else in a location came from the input.
_FIELD_NAMES = frozenset(
    name for model in (Agent, Source, Entity, AuditEvent) for name in model.model_fields
)
UNKNOWN_KEY = "(unknown key)"


_SQLSTATE_RULE = re.compile(r"sqlstate_[0-9A-Z]{5}")  # whole rule: fullmatch, not match


def rejection(field: str, klass: str, rule: str) -> Rejection:
    """A rejection whose message is the rule's fixed template."""
    if _SQLSTATE_RULE.fullmatch(rule):
        return Rejection(field, klass, rule, f"{field}: {RULES['database_refused']} "
                         f"(SQLSTATE {rule[-5:]})")
    if rule not in RULES:
        rule = "invalid_value"
    return Rejection(field, klass, rule, f"{field}: {RULES[rule]}")


def field_path(loc: Sequence[int | str], *, unknown_last: bool = False) -> str:
    """A dotted location with every input-derived part (an unknown key) replaced."""
    parts = [
        str(part) if isinstance(part, int) or part in _FIELD_NAMES else UNKNOWN_KEY
        for part in loc
    ]
    if unknown_last and parts:
        parts[-1] = UNKNOWN_KEY
    return ".".join(parts) or "(event)"


def _rejection_from(exc: ValidationError) -> Rejection:
    err = exc.errors(include_url=False)[0]
    kind = err["type"]
    if kind == "value_error":
        # Our own validators raise ValueError(rule_name); anything else is not ours.
        named = str(err.get("ctx", {}).get("error", ""))
        rule = named if named in RULES else "invalid_value"
    else:
        rule = _PYDANTIC_RULES.get(kind, "invalid_value")
    if rule == "pattern_mismatch" and err.get("ctx", {}).get("pattern") == _NO_CONTROL_PATTERN:
        rule = "control_characters"
    klass = "missing" if rule == "missing" else value_class(err.get("input"))
    # For an unknown field the last part is the key itself, even when it spells a field
    # name that belongs elsewhere ("role" at the top level).
    return rejection(field_path(err["loc"], unknown_last=rule == "unknown_field"), klass, rule)


def parse_event(
    raw: bytes, *, now: datetime | None = None, max_future_skew: float = 300.0
) -> AuditEvent | Rejection:
    """Validate one event. Never raises: bad input is data, and whatever goes wrong while
    looking at it becomes a rejection (rule ``unprocessable`` for the unforeseen)."""
    try:
        return _parse(raw, now, max_future_skew)
    except Exception:
        return rejection("(event)", value_class(raw), "unprocessable")


def _parse(raw: bytes, now: datetime | None, max_future_skew: float) -> AuditEvent | Rejection:
    if len(raw) > MAX_EVENT_BYTES:
        return rejection("(event)", f"bytes(len={len(raw)})", "too_large")
    try:
        event = AuditEvent.model_validate_json(raw)
    except ValidationError as exc:
        return _rejection_from(exc)
    limit = (now or datetime.now(UTC)) + timedelta(seconds=max_future_skew)
    if event.occurred > limit:
        return rejection("occurred", "datetime", "not_in_future")
    return event

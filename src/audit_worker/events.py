"""The audit event model (after FHIR AuditEvent and IHE ATNA) and its validation.

`parse_event` turns raw bytes into an `AuditEvent` or a `Rejection`. A rejection says which
field, what class of value (never the value: it may be PHI) and which rule failed, so the
dead-letter store is useful without becoming a second copy of patient data.
"""

from __future__ import annotations

import re
import uuid
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

    @field_validator("occurred")
    @classmethod
    def _timezone_required(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("timezone_required")
        return value.astimezone(UTC)

    @field_validator("detail")
    @classmethod
    def _clean_detail(cls, value: str | None) -> str | None:
        # Free text is sanitised rather than rejected: dropping a real access record over a
        # stray control character would lose more than it protects.
        return None if value is None else _CONTROL.sub("", value)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an event was refused. Safe to log: it never holds the value itself."""

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
    return type(value).__name__


_RULE_MESSAGES = {
    "control_characters": "contains control characters",
    "timezone_required": "needs a timezone offset (e.g. 2026-01-01T10:00:00Z)",
    "not_in_future": "lies further in the future than the allowed clock skew",
}


def _rejection_from(exc: ValidationError) -> Rejection:
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in err["loc"]) or "(event)"
    rule = err["type"]
    message = err["msg"]
    if rule == "value_error":
        # Our own validators raise ValueError(rule_name): surface the rule, not "value_error".
        rule = str(err.get("ctx", {}).get("error", message))
        message = _RULE_MESSAGES.get(rule, rule)
    pattern = err.get("ctx", {}).get("pattern")
    if rule == "string_pattern_mismatch" and pattern == _NO_CONTROL_PATTERN:
        rule = "control_characters"
        message = _RULE_MESSAGES[rule]
    if rule == "json_invalid":
        field = "(event)"
    klass = "missing" if rule == "missing" else value_class(err.get("input"))
    return Rejection(field, klass, rule, f"{field}: {message}")


def parse_event(
    raw: bytes, *, now: datetime | None = None, max_future_skew: float = 300.0
) -> AuditEvent | Rejection:
    """Validate one event. Returns a rejection instead of raising: bad input is data."""
    if len(raw) > MAX_EVENT_BYTES:
        return Rejection(
            "(event)",
            f"bytes(len={len(raw)})",
            "too_large",
            f"event is {len(raw)} bytes, the limit is {MAX_EVENT_BYTES}",
        )
    try:
        event = AuditEvent.model_validate_json(raw)
    except ValidationError as exc:
        return _rejection_from(exc)
    limit = (now or datetime.now(UTC)) + timedelta(seconds=max_future_skew)
    if event.occurred > limit:
        return Rejection(
            "occurred",
            "datetime",
            "not_in_future",
            f"occurred: {_RULE_MESSAGES['not_in_future']} ({max_future_skew:.0f} s)",
        )
    return event

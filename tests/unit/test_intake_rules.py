"""HTTP intake rules that need no server: tokens, media types, body shapes, validation."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import SecretStr

from audit_worker.events import AuditEvent, Rejection
from audit_worker.http.intake import (
    IntakeError,
    _media_type_ok,
    parse_body,
    token_digests,
    token_matches,
    validate_items,
)
from tests.support import make_event


def test_tokens_are_compared_by_digest_against_every_token() -> None:
    digests = token_digests(
        [SecretStr("first-token-0123456789"), SecretStr("second-token-0123456")]
    )
    assert token_matches("second-token-0123456", digests)
    assert not token_matches("second-token-012345", digests)
    assert not token_matches("", digests)
    assert not token_matches("x" * 10_000, digests)
    assert not token_matches("anything", [])


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ('application/json; charset="UTF-8"', True),
        ("application/json; charset=latin-1", False),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("", False),
        (None, False),
    ],
)
def test_only_json_is_accepted(content_type: str | None, ok: bool) -> None:
    assert _media_type_ok(content_type) is ok


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{not json", 422, "json_invalid"),
        (b"", 422, "json_invalid"),
        (b'"a string"', 422, "body_not_event_or_array"),
        (b"42", 422, "body_not_event_or_array"),
        (b"[]", 422, "empty_batch"),
        (json.dumps([{}] * 11).encode(), 413, "too_many_events"),
    ],
)
def test_bad_bodies_get_precise_errors(body: bytes, status: int, error: str) -> None:
    with pytest.raises(IntakeError) as err:
        parse_body(body, max_events=10)
    assert (err.value.status, err.value.error) == (status, error)


def test_a_single_object_and_a_batch_are_both_accepted() -> None:
    assert parse_body(b"{}", 10) == ([{}], False)
    assert parse_body(b"[{}, 1]", 10) == ([{}, 1], True)


def test_each_item_is_validated_like_the_worker_validates_it() -> None:
    good = make_event(1)
    bad_id = str(uuid.uuid4())
    checked = validate_items(
        [good, make_event(2, event_id=bad_id, action="X"), "not an object", {"event_id": 5}],
        max_future_skew=300,
    )
    outcomes = [outcome for _, outcome, _ in checked]
    assert isinstance(outcomes[0], AuditEvent)
    assert [type(o) for o in outcomes[1:]] == [Rejection] * 3
    assert [event_id for _, _, event_id in checked] == [good["event_id"], bad_id, None, None]
    assert outcomes[1].field == "action"  # type: ignore[union-attr]

"""Fuzzing POST /v1/events (real Redis behind it): never a 5xx, every rejection explained.

Bounded examples so it stays fast; a failure prints the body that caused it.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit_worker.service import Service
from tests.integration.service.conftest import TOKEN, service_settings
from tests.support import make_event

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=15,
)
FIELDS = ["event_id", "action", "code", "outcome", "occurred", "agent", "source", "patient",
          "entity", "purpose_of_use", "detail"]


@st.composite
def mutated_events(draw: st.DrawFn) -> dict[str, Any]:
    event = copy.deepcopy(make_event(draw(st.integers(0, 10_000))))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()):
            event[name] = draw(json_values)
        else:
            event.pop(name, None)
    return event


bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    mutated_events().map(lambda e: json.dumps(e).encode()),
    st.lists(mutated_events(), min_size=1, max_size=8).map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=300),
)


class Harness:
    def __init__(self, settings_: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.service = Service(settings_)
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.service.app), base_url="http://worker"
        )

    def post(self, body: bytes, mode: str) -> httpx.Response:
        return self.loop.run_until_complete(
            self.http.post("/v1/events", content=body, headers=HEADERS, params={"mode": mode})
        )

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.run_until_complete(self.service.redis.aclose())
        self.loop.close()


@pytest.fixture
def harness(fresh_redis: str, tmp_path: Path) -> Iterator[Harness]:
    settings_ = service_settings(
        "postgresql://unused.invalid/audit", fresh_redis, tmp_path / "keys",
        intake_max_events=6,
    )
    h = Harness(settings_)
    yield h
    h.close()


def check(reply: httpx.Response) -> None:
    assert reply.status_code in (202, 207, 413, 422), (reply.status_code, reply.text)
    body = reply.json()
    if "results" not in body:
        assert body["error"] and body["message"], body
        return
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(results)))
    rejected = [r for r in results if r["status"] == "rejected"]
    accepted = [r for r in results if r["status"] == "accepted"]
    assert (body["accepted"], body["rejected"]) == (len(accepted), len(rejected))
    for r in rejected:
        rejection = r["rejection"]
        assert rejection["field"] and rejection["value_class"] and rejection["rule"], r
        assert rejection["rule"] != "value_error"
    for r in accepted:
        assert r["stream_id"] and r["event_id"]
    if body["mode"] == "atomic":
        assert not (accepted and rejected), "atomic mode wrote part of a batch"
    expected = 202 if not rejected else (207 if accepted else 422)
    assert reply.status_code == expected


def test_fuzzed_bodies_in_atomic_mode(harness: Harness) -> None:
    @FUZZ
    @given(bodies)
    def run(body: bytes) -> None:
        check(harness.post(body, "atomic"))

    run()


def test_fuzzed_bodies_in_partial_mode(harness: Harness) -> None:
    @FUZZ
    @given(bodies)
    def run(body: bytes) -> None:
        check(harness.post(body, "partial"))

    run()

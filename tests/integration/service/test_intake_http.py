"""POST /v1/events end to end: HTTP in, Redis stream, worker, the log; every 4xx precise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from pydantic import SecretStr

from audit_worker.config import WorkerSettings
from audit_worker.http.app import openapi_text
from audit_worker.service import Service
from tests.integration.service.conftest import TOKEN, count, eventually, running
from tests.support import make_event

AUTH = {"Authorization": f"Bearer {TOKEN}"}
DOCS = Path(__file__).resolve().parents[3] / "docs" / "openapi.json"


async def post(worker: Any, body: Any, *, mode: str | None = None, **kw: Any) -> httpx.Response:
    headers = {**AUTH, **kw.pop("headers", {})}
    params = {"mode": mode} if mode else None
    if isinstance(body, bytes):
        headers.setdefault("Content-Type", "application/json")
        return await worker.http.post("/v1/events", content=body, headers=headers, params=params)
    return await worker.http.post("/v1/events", json=body, headers=headers, params=params)


async def test_single_and_batch_events_reach_the_log(settings: WorkerSettings) -> None:
    db = settings.database_url.get_secret_value()
    async with running(settings) as worker:
        single = make_event(1)
        reply = await post(worker, single)
        assert reply.status_code == 202, reply.text
        body = reply.json()
        assert body["mode"] == "atomic" and body["written"] is True
        assert body["results"][0]["status"] == "accepted"
        assert body["results"][0]["event_id"] == single["event_id"]
        assert body["results"][0]["stream_id"]

        batch = [make_event(i) for i in range(2, 52)]
        reply = await post(worker, batch)
        assert reply.status_code == 202
        assert reply.json()["accepted"] == 50
        await eventually(lambda: _stored(db, 51), what="51 events in the log")
        conn_ids = await _event_ids(db)
        assert {single["event_id"], *(e["event_id"] for e in batch)} == conn_ids
        text = (await worker.get("/metrics")).text
        assert 'audit_intake_requests_total{code="202"} 2.0' in text
        assert 'audit_intake_events_total{outcome="accepted"} 51.0' in text


async def _stored(db: str, n: int) -> bool:
    return await count(db) >= n


async def _event_ids(db: str) -> set[str]:
    import asyncpg

    conn = await asyncpg.connect(db)
    try:
        return {str(r[0]) for r in await conn.fetch("SELECT event_id FROM audit.events")}
    finally:
        await conn.close()


async def test_atomic_mode_writes_nothing_when_one_event_is_invalid(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    service = Service(settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app), base_url="http://worker"
    ) as http:
        worker = type("W", (), {"http": http})()
        events = [make_event(1), make_event(2, action="X"), make_event(3, patient="a\x00b")]
        reply = await post(worker, events)
        assert reply.status_code == 422
        body = reply.json()
        assert (body["accepted"], body["rejected"], body["written"]) == (0, 2, False)
        assert [r["status"] for r in body["results"]] == ["not_written", "rejected", "rejected"]
        assert body["results"][1]["rejection"] == {
            "field": "action", "value_class": "string(len=1)", "rule": "not_allowed_value",
            "message": body["results"][1]["rejection"]["message"],
        }
        assert body["results"][2]["rejection"]["rule"] == "control_characters"
        assert "a\x00b" not in reply.text
        assert await producer.xlen(settings.stream) == 0

        reply = await post(worker, events, mode="partial")
        assert reply.status_code == 207
        body = reply.json()
        assert (body["accepted"], body["rejected"], body["written"]) == (1, 2, True)
        assert [r["status"] for r in body["results"]] == ["accepted", "rejected", "rejected"]
        assert await producer.xlen(settings.stream) == 1

        reply = await post(worker, events[1:], mode="partial")
        assert reply.status_code == 422 and reply.json()["written"] is False
    await service.redis.aclose()


async def test_precise_client_errors(settings: WorkerSettings, producer: aioredis.Redis) -> None:
    settings = settings.model_copy(update={"intake_max_body_bytes": 4096, "intake_max_events": 3})
    service = Service(settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app), base_url="http://worker"
    ) as http:
        event = make_event(1)

        async def call(**kw: Any) -> httpx.Response:
            return await http.post("/v1/events", **kw)

        missing = await call(json=event)
        assert missing.status_code == 401 and missing.json()["error"] == "missing_token"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = await call(json=event, headers={"Authorization": f"Bearer {TOKEN}x"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_token"
        basic = await call(json=event, headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert basic.status_code == 401

        form = await call(content=b"a=b", headers={**AUTH, "Content-Type": "text/plain"})
        assert form.status_code == 415 and form.json()["error"] == "unsupported_media_type"

        big = await call(
            content=json.dumps([event] * 20).encode(),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert big.status_code == 413 and big.json()["error"] == "body_too_large"

        async def chunks():  # no Content-Length: the limit still holds while streaming
            for _ in range(10):
                yield b" " * 1000

        json_type = {**AUTH, "Content-Type": "application/json"}
        streamed = await call(content=chunks(), headers=json_type)
        assert streamed.status_code == 413

        many = await call(json=[{}] * 4, headers=AUTH)
        assert many.status_code == 413 and many.json()["error"] == "too_many_events"

        for body, error in ((b"{oops", "json_invalid"), (b"[]", "empty_batch"),
                            (b"17", "body_not_event_or_array")):
            reply = await call(content=body, headers={**AUTH, "Content-Type": "application/json"})
            assert (reply.status_code, reply.json()["error"]) == (422, error)

        bad_mode = await call(json=event, headers=AUTH, params={"mode": "sometimes"})
        assert bad_mode.status_code == 422 and bad_mode.json()["error"] == "invalid_request"
        # authentication comes first, whatever else is wrong
        assert (await call(content=b"{oops", params={"mode": "x"})).status_code == 401

        assert await producer.xlen(settings.stream) == 0
        text = (await http.get("/metrics")).text
        assert 'audit_intake_requests_total{code="401"} 4.0' in text
    await service.redis.aclose()


async def test_intake_without_tokens_is_disabled(settings: WorkerSettings) -> None:
    service = Service(settings.model_copy(update={"intake_tokens": []}))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app), base_url="http://worker"
    ) as http:
        reply = await http.post("/v1/events", json=make_event(1), headers=AUTH)
        assert reply.status_code == 503 and reply.json()["error"] == "intake_disabled"
    await service.redis.aclose()


async def test_unreachable_stream_is_503_with_retry_after(settings: WorkerSettings) -> None:
    from audit_worker.localenv import free_port

    service = Service(
        settings.model_copy(
            update={"redis_url": SecretStr(f"redis://127.0.0.1:{free_port()}/0")}
        )
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app), base_url="http://worker"
    ) as http:
        reply = await http.post("/v1/events", json=[make_event(1)], headers=AUTH)
        assert reply.status_code == 503 and reply.json()["error"] == "stream_unavailable"
        assert reply.headers["retry-after"] == "1"
    await service.redis.aclose()


def test_checked_in_openapi_document_is_current() -> None:
    current = openapi_text()
    assert DOCS.exists(), "run: audit-worker openapi > docs/openapi.json"
    assert DOCS.read_text() == current, (
        "docs/openapi.json is stale: run `audit-worker openapi > docs/openapi.json`"
    )
    paths = json.loads(current)["paths"]
    assert {"/livez", "/readyz", "/healthz/database", "/healthz/redis", "/healthz/external",
            "/metrics", "/v1/events"} <= set(paths)


async def test_served_openapi_matches_the_document(settings: WorkerSettings) -> None:
    service = Service(settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app), base_url="http://worker"
    ) as http:
        served = (await http.get("/openapi.json")).json()
    assert served == json.loads(DOCS.read_text())
    await service.redis.aclose()


async def test_a_body_nested_past_the_serialisers_limit_is_rejected_not_a_500(
    settings: WorkerSettings,
) -> None:
    deep = b"[" * 300 + b'"MKRDEEP"' + b"]" * 300
    good = json.dumps(make_event(1)).encode()
    bad = good[:-1] + b', "entity": ' + deep + b"}"
    async with running(settings) as worker:
        single = await post(worker, bad)
        batch = await post(worker, b"[" + good + b"," + bad + b"]", mode="partial")
    assert single.status_code == 422
    assert single.json()["results"][0]["rejection"]["rule"] == "too_deep"
    assert batch.status_code == 207 and batch.json()["accepted"] == 1
    assert b"MKRDEEP" not in single.content + batch.content

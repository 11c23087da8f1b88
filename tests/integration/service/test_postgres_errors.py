"""PostgreSQL errors sorted by SQLSTATE, each provoked for real on the suite's server.

* entry (classes 22, 23): the batch is split until the refused entry is found; only it is
  dead-lettered, with the SQLSTATE as its rule, and every other entry is stored.
* transient (40, 57P01, …): retried with backoff; nothing is lost or dead-lettered.
* halt (42501, 28P01, 3D000, …): readiness false, a critical log line and a metric say
  what to fix; the batch is tried again slowly and stored once the cause is fixed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from audit_worker.config import WorkerSettings
from tests.integration.service.conftest import count, eventually, running, service_settings
from tests.integration.service.hostile import REFUSE_OUTCOME_8
from tests.support import encode, make_event, migrate_url


async def _sql(db: str, *statements: str) -> None:
    conn = await asyncpg.connect(db)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _send(producer: aioredis.Redis, stream: str, events: list[dict[str, object]]) -> None:
    for event in events:
        await producer.xadd(stream, {"event": encode(event)})


async def _dead_letters(db: str) -> list[tuple[str, str, str]]:
    conn = await asyncpg.connect(db)
    try:
        rows = await conn.fetch(
            "SELECT field, rule, message FROM audit.dead_letters ORDER BY id"
        )
    finally:
        await conn.close()
    return [(r["field"], r["rule"], r["message"]) for r in rows]


async def _gapless(db: str) -> bool:
    conn = await asyncpg.connect(db)
    try:
        size, top, distinct = await conn.fetchrow(
            "SELECT count(*), coalesce(max(log_index), -1), count(DISTINCT event_id)"
            " FROM audit.events"
        )
    finally:
        await conn.close()
    return bool(size == top + 1 == distinct)


def _has(db: str, rows: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await count(db) == rows

    return check


def _metric(body: str, name: str, label: str) -> float:
    for line in body.splitlines():
        if line.startswith(f'{name}{{{label}}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_row_refused_for_its_data_dead_letters_only_that_entry(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    db = settings.database_url.get_secret_value()
    # A constraint the kit does not ship stands in for data PostgreSQL refuses: the error
    # (23514 check_violation) is PostgreSQL's own.
    await _sql(db, "ALTER TABLE audit.events ADD CONSTRAINT no_major_failures"
               " CHECK (outcome <> 12)")
    events = [make_event(i) for i in range(40)]
    events[7]["outcome"] = 12
    events[31]["outcome"] = 12
    async with running(settings) as worker:
        await _send(producer, settings.stream, events)
        await eventually(
            lambda: worker.service.status.batches > 0 and worker.service.worker is not None
            and worker.service.worker.stats.stored == 38, 20, what="38 stored",
        )
        metrics = (await worker.get("/metrics")).text
        assert (await worker.get("/readyz")).status_code == 200
    assert await count(db) == 38 and await _gapless(db)
    dead = await _dead_letters(db)
    assert [(f, r) for f, r, _ in dead] == [("(event)", "sqlstate_23514")] * 2
    assert dead[0][2] == "(event): was refused by the database (SQLSTATE 23514)"
    assert _metric(metrics, "audit_events_isolated_total", 'sqlstate="23514"') == 2


async def test_invalid_byte_sequence_from_a_trigger_isolates_the_entry(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    db = settings.database_url.get_secret_value()
    await _sql(db, *REFUSE_OUTCOME_8)
    events = [make_event(i) for i in range(25)]
    events[0]["outcome"] = 8
    events[24]["outcome"] = 8
    async with running(settings) as worker:
        await _send(producer, settings.stream, events)
        await eventually(
            lambda: worker.service.worker is not None
            and worker.service.worker.stats.stored == 23
            and worker.service.worker.stats.dead_lettered == 2, 20, what="isolated",
        )
    assert [r for _, r, _ in await _dead_letters(db)] == ["sqlstate_22021"] * 2
    assert await _gapless(db)


async def test_serialization_failures_are_retried_and_nothing_is_lost(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    db = settings.database_url.get_secret_value()
    # nextval is not rolled back with the failing transaction: the first three tries fail.
    await _sql(
        db,
        "CREATE SEQUENCE audit.t_tries",
        "CREATE FUNCTION audit.t_flaky() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF nextval('audit.t_tries') <= 3 THEN"
        " RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER t_flaky BEFORE INSERT ON audit.events FOR EACH ROW"
        " EXECUTE FUNCTION audit.t_flaky()",
        "GRANT USAGE ON SEQUENCE audit.t_tries TO PUBLIC",
    )
    async with running(settings) as worker:
        await _send(producer, settings.stream, [make_event(i) for i in range(10)])
        await eventually(_has(db, 10), 20, what="all stored")
        metrics = (await worker.get("/metrics")).text
    assert await _dead_letters(db) == []
    assert _metric(metrics, "audit_retries_total", 'dependency="postgres"') >= 1


async def test_admin_shutdown_of_the_workers_connections_is_retried(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    db = settings.database_url.get_secret_value()
    async with running(settings):
        await _send(producer, settings.stream, [make_event(i) for i in range(5)])
        await eventually(_has(db, 5), 20)
        # 57P01 admin_shutdown on every connection the worker holds
        await _sql(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        await _send(producer, settings.stream, [make_event(i) for i in range(5, 15)])
        await eventually(_has(db, 15), 20, what="stored after 57P01")
    assert await _dead_letters(db) == [] and await _gapless(db)


async def _worker_login(db: str) -> str:
    """A login like RDS's worker login: audit_writer's grants and nothing more."""
    name = f"w_{uuid.uuid4().hex[:10]}"
    await _sql(db, f"CREATE ROLE {name} LOGIN PASSWORD 'pw-{name}'",
               f"GRANT audit_writer TO {name}")
    scheme, rest = db.split("://", 1)
    host = rest.split("@", 1)[-1]
    return f"{scheme}://{name}:pw-{name}@{host}"


async def test_revoked_grant_halts_loudly_until_it_is_granted_again(
    fresh_database: str, fresh_redis: str, tmp_path: Path, producer: aioredis.Redis
) -> None:
    await migrate_url(fresh_database)
    login = await _worker_login(fresh_database)
    settings = service_settings(login, fresh_redis, tmp_path / "keys",
                                configuration_recheck_seconds=0.3)
    with capture_logs() as logs:
        async with running(settings) as worker:
            await _send(producer, settings.stream, [make_event(0)])
            await eventually(_has(fresh_database, 1), 20)
            await _sql(fresh_database, "REVOKE INSERT ON audit.events FROM audit_writer")
            await _send(producer, settings.stream, [make_event(i) for i in range(1, 6)])
            await eventually(
                lambda: worker.service.status.configuration_problem is not None, 20,
                what="halted",
            )
            ready = await worker.get("/readyz")
            assert ready.status_code == 503
            problem = " ".join(ready.json()["problems"])
            assert "42501" in problem and "GRANT audit_writer" in problem
            metrics = (await worker.get("/metrics")).text
            assert _metric(metrics, "audit_configuration_failures_total",
                           'sqlstate="42501"') >= 1
            assert "audit_writer_configuration_halted 1.0" in metrics
            await _sql(fresh_database, "GRANT INSERT ON audit.events TO audit_writer")
            await eventually(_has(fresh_database, 6), 20, what="resumed")
            await eventually(lambda: worker.service.status.configuration_problem is None, 5)
            assert (await worker.get("/readyz")).status_code == 200
    critical = [e for e in logs if e["log_level"] == "critical"]
    assert critical and all(e["sqlstate"] == "42501" for e in critical)
    assert await _dead_letters(fresh_database) == []


async def test_unknown_login_halts_at_start_up_and_names_the_fix(
    fresh_database: str, fresh_redis: str, tmp_path: Path
) -> None:
    await migrate_url(fresh_database)
    login = await _worker_login(fresh_database)
    # A login that does not exist: SQLSTATE 28000 whatever the server's auth method (the
    # suite's server trusts loopback, so a wrong password alone would get in).
    wrong = login.replace("://w_", "://nobody_", 1)
    settings = service_settings(wrong, fresh_redis, tmp_path / "keys",
                                configuration_recheck_seconds=0.3)
    async with running(settings, wait=False) as worker:
        await eventually(
            lambda: "SQLSTATE 28" in (worker.service.status.startup_problem or ""), 20,
            what="class 28 reported",
        )
        ready = await worker.get("/readyz")
        assert ready.status_code == 503
        assert "check the login" in json.dumps(ready.json())
        metrics = (await worker.get("/metrics")).text
        assert _metric(metrics, "audit_configuration_failures_total", 'sqlstate="28000"') >= 1
        assert worker.service.worker is None  # never assembled: nothing consumed


async def test_a_conflicting_replay_is_counted_and_logged_by_id_only(
    settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    db = settings.database_url.get_secret_value()
    original = make_event(9)
    changed = {**original, "detail": "another body MKR-CONFLICT", "patient": "MKR-PATIENT"}
    with capture_logs() as logs:
        async with running(settings) as worker:
            await _send(producer, settings.stream, [original])
            await eventually(_has(db, 1), 20)
            await _send(producer, settings.stream, [changed])
            await eventually(
                lambda: worker.service.worker is not None
                and worker.service.worker.stats.conflicts == 1, 20, what="conflict counted",
            )
            metrics = (await worker.get("/metrics")).text
    assert await count(db) == 1
    assert "audit_events_conflict_total 1.0" in metrics
    (line,) = [e for e in logs if e.get("alert") == "audit_event_conflict"]
    assert line["event_ids"] == [original["event_id"]] and line["count"] == 1
    assert "MKR" not in repr(logs)

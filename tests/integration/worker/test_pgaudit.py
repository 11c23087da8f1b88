"""The parameter group's pgaudit settings, run on a real PostgreSQL with pgAudit loaded.

RDS cannot be reached from here, so this starts a PostgreSQL of its own with the
pgaudit values of `infra.database.PARAMETERS` and reads its server log, which on RDS is the
log exported to CloudWatch. It needs pgAudit built for the server's major version
(Debian: ``apt-get install postgresql-15-pgaudit``) and is skipped without it. What it
cannot prove: that RDS's parameter group accepts these values (see the deployment guide).
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from audit_worker.localenv import PostgresServer, create_database, find_pg_bindir
from infra.database import PARAMETERS
from tests.support import drain, encode, make_event, migrate_url, running_parts, worker_settings

PGAUDIT_SETTINGS = ("shared_preload_libraries", "pgaudit.log", "pgaudit.log_catalog",
                    "pgaudit.log_parameter", "pgaudit.role")


def _pgaudit_installed() -> bool:
    pg_config = find_pg_bindir() / "pg_config"
    if not pg_config.exists():
        return False
    libdir = subprocess.run([pg_config, "--pkglibdir"], capture_output=True, text=True,
                            check=False).stdout.strip()
    return bool(libdir) and (Path(libdir) / "pgaudit.so").exists()


pytestmark = pytest.mark.skipif(
    not _pgaudit_installed(),
    reason="pgAudit is not installed for this PostgreSQL (Debian: postgresql-15-pgaudit)",
)


class AuditedServer(PostgresServer):
    """A PostgreSQL with the RDS parameter group's pgaudit settings."""

    def settings(self) -> dict[str, str]:
        settings = super().settings()
        for name in PGAUDIT_SETTINGS:
            settings[name] = f"'{PARAMETERS[name][0]}'"
        return settings


class ServerLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.mark = 0

    def start(self) -> None:
        self.mark = self.path.stat().st_size

    def since_start(self) -> str:
        time.sleep(0.2)  # the logger writes asynchronously to the file
        with self.path.open(encoding="utf-8", errors="replace") as fh:
            fh.seek(self.mark)
            return fh.read()

    def audit_lines(self) -> list[str]:
        return [line for line in self.since_start().splitlines() if "AUDIT: SESSION" in line]


@pytest.fixture(scope="module")
def audited() -> Iterator[AuditedServer]:
    with AuditedServer(fast=True) as server:
        yield server


@pytest.fixture
async def database(audited: AuditedServer) -> AsyncIterator[str]:
    url = create_database(audited.url, f"pgaudit_{uuid.uuid4().hex[:12]}")
    conn = await asyncpg.connect(url)
    try:
        # As the bootstrap does once per database: DDL lines then name their objects.
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pgaudit")
    finally:
        await conn.close()
    await migrate_url(url)
    yield url


@pytest.fixture
def log(audited: AuditedServer) -> ServerLog:
    return ServerLog(audited.log_file)


def _classes(lines: list[str]) -> list[tuple[str, str]]:
    """(class, command) of each AUDIT line: SESSION,stmt,substmt,CLASS,COMMAND,..."""
    found = []
    for line in lines:
        fields = line.split("AUDIT: SESSION,", 1)[1].split(",")
        found.append((fields[2], fields[3]))
    return found


async def test_the_parameter_groups_pgaudit_settings_load_on_a_real_server(database: str) -> None:
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("SHOW pgaudit.log") == "ddl,role,write,misc_set"
        assert await conn.fetchval("SHOW pgaudit.log_parameter") == "off"
        assert "pgaudit" in (await conn.fetchval("SHOW shared_preload_libraries")).split(",")
    finally:
        await conn.close()


async def test_every_way_past_the_guards_is_recorded(database: str, log: ServerLog) -> None:
    """What the schema cannot refuse its owner, pgaudit records: the SET that silences the
    row triggers, disabling a trigger, detaching and dropping a partition, grants."""
    conn = await asyncpg.connect(database)
    log.start()
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("UPDATE audit.tree_heads SET log_id = 'x' WHERE false")
        await conn.execute("ALTER TABLE audit.events_default DISABLE TRIGGER events_no_truncate")
        await conn.execute("TRUNCATE audit.events_default")
        await conn.execute("ALTER TABLE audit.events DETACH PARTITION audit.events_default")
        await conn.execute("DROP TABLE audit.events_default")
        await conn.execute("GRANT INSERT ON audit.schema_migrations TO audit_writer")
    finally:
        await conn.close()
    recorded = _classes(log.audit_lines())
    for expected in [("MISC", "SET"), ("WRITE", "UPDATE"), ("DDL", "ALTER TABLE"),
                     ("WRITE", "TRUNCATE TABLE"), ("DDL", "DROP TABLE"), ("ROLE", "GRANT")]:
        assert expected in recorded, (expected, recorded)
    text = log.since_start()
    assert "DISABLE TRIGGER events_no_truncate" in text
    assert "DETACH PARTITION audit.events_default" in text


async def test_a_refused_truncate_leaves_an_error_line_not_an_audit_line(
    database: str, log: ServerLog
) -> None:
    conn = await asyncpg.connect(database)
    log.start()
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("TRUNCATE audit.events")
    finally:
        await conn.close()
    text = log.since_start()
    assert not [line for line in log.audit_lines() if "TRUNCATE" in line]
    assert "ERROR:  audit.events is append-only: TRUNCATE refused" in text
    assert "STATEMENT:  TRUNCATE audit.events" in text


async def test_the_workers_writes_are_recorded_without_their_values(
    database: str, log: ServerLog, fresh_redis: str, tmp_path: Path
) -> None:
    """write and misc_set record every batch (counted here); log_parameter = 0 keeps bound
    values, which may be patient data, out of the log."""
    settings = worker_settings(database, fresh_redis, tmp_path / "keys")
    async with running_parts(settings) as parts:
        client = aioredis.Redis.from_url(fresh_redis)
        try:
            for i in range(50):
                await client.xadd(parts.worker.intake.stream, {"event": encode(make_event(i))})
            log.start()
            assert await drain(parts, batch=50, idle_rounds=1) == 50
            lines = log.audit_lines()
            # A bad entry, dead-lettered: its row's fields are bound values too.
            bad = {**make_event(99), "patient": "MRN-LEAK-42", "action": "X"}
            await client.xadd(parts.worker.intake.stream, {"event": encode(bad)})
            await drain(parts, batch=50, idle_rounds=1)
        finally:
            await client.aclose()
    commands = [command for _, command in _classes(lines)]
    assert "COPY" in commands  # the batch's rows
    text = log.since_start()
    for value in ("MRN-TEST-000001", "MRN-LEAK-42", "clinician-1", "10.0.0.7"):
        assert value not in text
    assert re.search(r"<not logged>", text)
    print(f"pgaudit lines for one batch of 50 events: {len(lines)} ({commands})")

"""The migration login of docs/guides/migration-guide.md, run as written against PostgreSQL.

The chart's migration Job connects as ``auditlog_migrator``, a login the operator creates
once with the RDS master user (``audit_admin``), because the worker's login holds only
``audit_writer`` and cannot run DDL. These tests take the SQL out of the guide (the
``psql`` heredoc and the hand-over block), so the guide cannot drift from what works, and
run it with a master role that, as on RDS, is not a superuser: ``CREATEROLE``, owner of the
database. Role names get a unique suffix because roles are shared by the whole server.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from audit_worker.db import migrate as m

GUIDE = Path(__file__).resolve().parents[3] / "docs" / "guides" / "migration-guide.md"


def _guide_sql() -> tuple[str, str]:
    """(the heredoc that creates the login, the block that hands objects over)."""
    text = GUIDE.read_text(encoding="utf-8")
    create = re.search(r"<<'SQL'\n(.*?)\nSQL\n", text, re.DOTALL)
    handover = re.search(r"already migrated as `audit_admin`.*?```sql\n(.*?)```", text, re.DOTALL)
    assert create and handover, "the guide no longer has the migration login's SQL"
    return create.group(1), handover.group(1)


CREATE_SQL, HANDOVER_SQL = _guide_sql()
SHIPPED = [x.version for x in m.load_migrations()]


@dataclass(frozen=True)
class Cluster:
    superuser: str
    database: str
    admin: str
    migrator: str
    worker: str
    password: str

    def url(self, role: str) -> str:
        parts = urlsplit(self.superuser)
        host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
        netloc = f"{quote(role, safe='')}:{quote(self.password, safe='')}@{host}"
        return urlunsplit(parts._replace(netloc=netloc, path="/" + self.database))

    def sql(self, text: str) -> str:
        """The guide's SQL for this cluster's role and database names."""
        text = text.replace(":'pw'", f"'{self.password}'")
        text = re.sub(r"\bauditlog_migrator\b", self.migrator, text)
        text = re.sub(r"\baudit_admin\b", self.admin, text)
        return re.sub(r"\bDATABASE audit\b", f'DATABASE "{self.database}"', text)


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def cluster(postgres_url: str) -> AsyncIterator[Cluster]:
    suffix = uuid.uuid4().hex[:10]
    c = Cluster(superuser=postgres_url, database=f"migrator_{suffix}", admin=f"admin_{suffix}",
                migrator=f"auditlog_migrator_{suffix}", worker=f"worker_{suffix}",
                password=uuid.uuid4().hex)
    await _execute(postgres_url, f"CREATE ROLE {c.admin} LOGIN CREATEROLE "
                                 f"PASSWORD '{c.password}'")
    await _execute(postgres_url, f'CREATE DATABASE "{c.database}" OWNER {c.admin}')
    # As on RDS with PostgreSQL 15+: nobody but the owner creates anything by default.
    on_database = urlunsplit(urlsplit(postgres_url)._replace(path="/" + c.database))
    await _execute(on_database, f'REVOKE CREATE ON DATABASE "{c.database}" FROM PUBLIC; '
                                "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    try:
        yield c
    finally:
        await _execute(postgres_url, f'DROP DATABASE IF EXISTS "{c.database}" WITH (FORCE)')
        for role in (c.worker, c.migrator, c.admin):
            await _execute(postgres_url, f"DROP ROLE IF EXISTS {role}")


async def _migrate(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [x.version for x in await m.migrate(conn)]
    finally:
        await conn.close()


async def _add_worker_login(c: Cluster) -> None:
    # The worker's login is the other half of the bootstrap; made by the superuser here so
    # that the test does not depend on who created audit_writer in this server.
    await _execute(c.superuser, f"CREATE ROLE {c.worker} LOGIN PASSWORD '{c.password}'; "
                                f"GRANT audit_writer TO {c.worker}")


async def _assert_worker_can_run(c: Cluster) -> None:
    conn = await asyncpg.connect(c.url(c.worker))
    try:
        await m.require_current(conn)
        await conn.fetchval("SELECT audit.ensure_partitions(4)")
        await conn.execute("INSERT INTO audit.dead_letters (field, value_class, rule, message) "
                           "VALUES ('f', 'c', 'r', 'm')")
        assert await conn.fetchval("SELECT count(*) FROM audit.later") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM audit.dead_letters")
    finally:
        await conn.close()


async def _owners(c: Cluster) -> set[str]:
    conn = await asyncpg.connect(c.url(c.admin))
    try:
        rows = await conn.fetch(
            "SELECT pg_get_userbyid(relowner) AS o FROM pg_class "
            "WHERE relnamespace = 'audit'::regnamespace UNION "
            "SELECT pg_get_userbyid(proowner) FROM pg_proc "
            "WHERE pronamespace = 'audit'::regnamespace UNION "
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'audit'")
    finally:
        await conn.close()
    return {r["o"] for r in rows}


async def test_the_worker_login_cannot_migrate(cluster: Cluster) -> None:
    """The bug the migration login fixes: audit_writer cannot even create the bookkeeping."""
    await _execute(cluster.url(cluster.admin), cluster.sql(CREATE_SQL))
    await _add_worker_login(cluster)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _migrate(cluster.url(cluster.worker))


async def test_a_new_database_migrates_as_the_migration_login(cluster: Cluster) -> None:
    await _execute(cluster.url(cluster.admin), cluster.sql(CREATE_SQL))
    await _add_worker_login(cluster)
    migrator = cluster.url(cluster.migrator)

    assert await _migrate(migrator) == SHIPPED
    assert await _migrate(migrator) == []
    await _execute(migrator, "CREATE TABLE audit.later (id int)")  # a later migration's table

    assert await _owners(cluster) == {cluster.migrator}
    await _assert_worker_can_run(cluster)


async def test_a_database_migrated_as_the_master_user_is_handed_over(cluster: Cluster) -> None:
    admin = cluster.url(cluster.admin)
    assert await _migrate(admin) == SHIPPED  # the workaround of earlier releases of the guide

    await _execute(admin, cluster.sql(CREATE_SQL))
    await _execute(admin, cluster.sql(HANDOVER_SQL))
    await _add_worker_login(cluster)
    migrator = cluster.url(cluster.migrator)

    assert await _migrate(migrator) == []
    await _execute(migrator, "ALTER TABLE audit.dead_letters ADD COLUMN triaged_at timestamptz; "
                             "CREATE TABLE audit.later (id int)")
    assert await _owners(cluster) == {cluster.migrator}
    await _assert_worker_can_run(cluster)
    conn = await asyncpg.connect(admin)
    try:
        assert not await conn.fetchval(
            "SELECT pg_has_role($1, $2, 'MEMBER')", cluster.admin, cluster.migrator)
    finally:
        await conn.close()

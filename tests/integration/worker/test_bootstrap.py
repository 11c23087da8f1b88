"""The database bootstrap (`audit_worker.db.bootstrap`, `audit-worker bootstrap`) on a
PostgreSQL that, like a new RDS instance, holds nothing but a master login.

The server is the suite's own kind, but this one checks passwords (scram-sha-256 on TCP,
as RDS does) so a login that bootstrap did not set up really cannot sign in. The master
is what RDS creates: not a superuser, ``CREATEROLE`` and ``CREATEDB``, owner of the
instance's database. RDS's ``rds_iam`` role exists on every RDS instance; here the fixture
creates it (NOLOGIN, the master may grant it), which is all of RDS IAM authentication that
runs without AWS: the token check itself happens inside RDS and cannot be rehearsed here.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import asyncpg
import boto3
import pytest
from typer.testing import CliRunner

from audit_worker.cli import app
from audit_worker.db import bootstrap as boot
from audit_worker.db import migrate as m
from audit_worker.localenv.servers import PostgresServer

MASTER = "audit_admin"
DATABASE = "audit"


@dataclass(frozen=True)
class Rds:
    """A password-checking server with only the master login, as RDS creates it."""

    host: str
    port: int
    superuser: str  # the test's own view of the server (pg_authid), never the kit's
    master_password: str

    def url(self, login: str, password: str | None = None, database: str = DATABASE) -> str:
        secret = f":{quote(password, safe='')}" if password is not None else ""
        return f"postgresql://{login}{secret}@{self.host}:{self.port}/{database}"

    @property
    def master_url(self) -> str:
        return self.url(MASTER, self.master_password)


@pytest.fixture(scope="module")
def rds() -> Iterator[Rds]:
    with PostgresServer(fast=True) as server:
        password = uuid.uuid4().hex

        async def setup() -> None:
            conn = await asyncpg.connect(server.url)
            try:
                await conn.execute("CREATE ROLE rds_iam NOLOGIN")
                await conn.execute(
                    f"CREATE ROLE {MASTER} LOGIN CREATEROLE CREATEDB PASSWORD '{password}'")
                await conn.execute(f"GRANT rds_iam TO {MASTER} WITH ADMIN OPTION")
                await conn.execute(f"CREATE DATABASE {DATABASE} OWNER {MASTER}")
                await conn.execute(f"REVOKE ALL ON DATABASE {DATABASE} FROM PUBLIC")
            finally:
                await conn.close()

        asyncio.run(setup())
        # From here on, TCP logins need their password; the superuser keeps the socket.
        hba = server.data_dir / "pg_hba.conf"
        lines = [line.replace("trust", "scram-sha-256") if line.startswith("host") else line
                 for line in hba.read_text().splitlines()]
        hba.write_text("\n".join(lines) + "\n")
        superuser = f"postgresql://postgres@/postgres?host={server.socket_dir}&port={server.port}"

        async def reload() -> None:
            conn = await asyncpg.connect(superuser)
            try:
                await conn.execute("SELECT pg_reload_conf()")
            finally:
                await conn.close()

        asyncio.run(reload())
        yield Rds(host="127.0.0.1", port=server.port, superuser=superuser,
                  master_password=password)


@pytest.fixture
def logins() -> boot.Logins:
    # Roles are shared by the whole server: each test its own names.
    suffix = uuid.uuid4().hex[:8]
    return boot.Logins(database=DATABASE, migrator=f"migrator_{suffix}",
                       worker=f"worker_{suffix}")


def _bootstrap(rds: Rds, logins: boot.Logins, *args: str, env: dict[str, str] | None = None
               ) -> Any:
    result = CliRunner().invoke(app, [
        "bootstrap", "--migrator", logins.migrator, "--worker", logins.worker,
        "--output", "json", *args], env=env, catch_exceptions=False)
    return result


def _password_env(rds: Rds, passwords: dict[str, str]) -> dict[str, str]:
    return {"AUDIT_BOOTSTRAP_DATABASE_URL": rds.master_url,
            "AUDIT_BOOTSTRAP_MIGRATOR_PASSWORD": passwords["migrator"],
            "AUDIT_BOOTSTRAP_WORKER_PASSWORD": passwords["worker"]}


@pytest.fixture
def passwords() -> dict[str, str]:
    return {"migrator": uuid.uuid4().hex, "worker": uuid.uuid4().hex}


def _superuser_fetch(rds: Rds, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(rds.superuser)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def test_the_server_checks_passwords_as_rds_does(rds: Rds) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(asyncpg.connect(rds.url(MASTER, "not-the-password")))


def test_from_a_master_login_alone_bootstrap_then_migrate_then_the_worker_runs(
        rds: Rds, logins: boot.Logins, passwords: dict[str, str]) -> None:
    result = _bootstrap(rds, logins, "--database-auth", "password",
                        env=_password_env(rds, passwords))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["created"]) >= {logins.migrator, logins.worker}

    migrated = CliRunner().invoke(app, [
        "migrate", "--database-url", rds.url(logins.migrator, passwords["migrator"]),
        "--output", "json"], catch_exceptions=False)
    assert migrated.exit_code == 0, migrated.output
    assert json.loads(migrated.output)["applied"] == [x.version for x in m.load_migrations()]

    async def as_worker() -> None:
        worker = await asyncpg.connect(rds.url(logins.worker, passwords["worker"]))
        try:
            await m.require_current(worker)  # what the worker checks before it consumes
            assert await worker.fetchval(
                "SELECT has_table_privilege('audit.events', 'INSERT')") is True
            assert await worker.fetchval("SHOW statement_timeout") == "2min"
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await worker.execute("CREATE SCHEMA worker_owned")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await worker.execute("CREATE TABLE audit.worker_owned (x int)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await worker.execute("DELETE FROM audit.events")
        finally:
            await worker.close()

    asyncio.run(as_worker())


def test_a_second_bootstrap_creates_nothing_and_keeps_the_logins_working(
        rds: Rds, logins: boot.Logins, passwords: dict[str, str]) -> None:
    env = _password_env(rds, passwords)
    assert _bootstrap(rds, logins, "--database-auth", "password", env=env).exit_code == 0
    again = _bootstrap(rds, logins, "--database-auth", "password", env=env)
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["created"] == []


def test_iam_bootstrap_grants_rds_iam_and_leaves_no_password(
        rds: Rds, logins: boot.Logins) -> None:
    result = _bootstrap(rds, logins, "--database-auth", "iam",
                        env={"AUDIT_BOOTSTRAP_DATABASE_URL": rds.master_url})
    assert result.exit_code == 0, result.output
    rows = _superuser_fetch(
        rds, "SELECT rolname, rolpassword IS NULL AS no_password, "
        "pg_has_role(rolname, 'rds_iam', 'MEMBER') AS iam FROM pg_authid "
        "WHERE rolname = ANY($1::text[])", [logins.migrator, logins.worker])
    assert {r["rolname"]: (r["no_password"], r["iam"]) for r in rows} == {
        logins.migrator: (True, True), logins.worker: (True, True)}


def test_bootstrap_reads_the_master_login_from_the_rds_managed_secret(
        rds: Rds, logins: boot.Logins, moto_server: Any, aws_kwargs: dict[str, str]) -> None:
    client = boto3.client("secretsmanager", **aws_kwargs)
    arn = client.create_secret(
        Name=f"rds!db-{uuid.uuid4()}",
        SecretString=json.dumps({"username": MASTER, "password": rds.master_password}),
    )["ARN"]
    env = {"AUDIT_BOOTSTRAP_DATABASE_URL": rds.url("unused"), "AUDIT_MASTER_SECRET_ARN": arn,
           "AUDIT_AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": aws_kwargs["endpoint_url"],
           "AWS_ACCESS_KEY_ID": aws_kwargs["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": aws_kwargs["aws_secret_access_key"]}
    result = _bootstrap(rds, logins, "--database-auth", "iam", env=env)
    assert result.exit_code == 0, result.output
    assert rds.master_password not in result.output


def test_a_master_secret_that_cannot_be_read_names_the_permission(
        rds: Rds, logins: boot.Logins, moto_server: Any, aws_kwargs: dict[str, str]) -> None:
    env = {"AUDIT_BOOTSTRAP_DATABASE_URL": rds.url("unused"),
           "AUDIT_MASTER_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:"
           "secret:rds!db-missing-AbCdEf", "AUDIT_AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": aws_kwargs["endpoint_url"],
           "AWS_ACCESS_KEY_ID": aws_kwargs["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": aws_kwargs["aws_secret_access_key"]}
    result = _bootstrap(rds, logins, "--database-auth", "iam", env=env)
    assert result.exit_code == 2
    assert "secretsmanager:GetSecretValue" in result.output
    assert "ResourceNotFoundException" in result.output


def test_a_master_without_createrole_is_refused_by_postgresql(
        rds: Rds, logins: boot.Logins) -> None:
    weak, password = f"weak_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    _superuser_fetch(rds, f"CREATE ROLE {weak} LOGIN PASSWORD '{password}'")
    _superuser_fetch(rds, f"GRANT CONNECT ON DATABASE {DATABASE} TO {weak}")
    result = _bootstrap(rds, logins, "--database-auth", "iam",
                        env={"AUDIT_BOOTSTRAP_DATABASE_URL": rds.url(weak, password)})
    assert result.exit_code == 1
    assert "bootstrap refused by PostgreSQL (42501)" in result.output
    assert password not in result.output


def test_password_mode_without_the_passwords_names_the_variables(
        rds: Rds, logins: boot.Logins) -> None:
    result = _bootstrap(rds, logins, "--database-auth", "password",
                        env={"AUDIT_BOOTSTRAP_DATABASE_URL": rds.master_url})
    assert result.exit_code == 2
    assert "AUDIT_BOOTSTRAP_MIGRATOR_PASSWORD" in result.output
    assert "AUDIT_BOOTSTRAP_WORKER_PASSWORD" in result.output


def test_the_bootstrap_sql_holds_no_password() -> None:
    sql = boot.bootstrap_sql(auth="password")
    assert "PASSWORD" not in sql.replace("PASSWORD NULL", "")
    assert "GRANT rds_iam" in boot.bootstrap_sql(auth="iam")


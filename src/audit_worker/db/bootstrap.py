"""The database bootstrap: the logins and roles the migrations and the worker need.

Runs as the RDS master login (``audit_admin``), which on RDS is *not* a superuser: it has
``CREATEROLE`` and ``CREATEDB``, owns the instance's database and is a member of
``rds_superuser`` (https://docs.aws.amazon.com/AmazonRDS/latest/UserGuide/Appendix.PostgreSQL.CommonDBATasks.Roles.rds_superuser.html).
It creates only what needs ``CREATEROLE``, then steps aside; everything in schema ``audit``
is created and owned by the migration login. Every statement converges, so it runs before
every migration (the chart's migration Job) and a second run changes nothing.

========================  ======================================================  =========
role                      what                                                    created
========================  ======================================================  =========
``audit_writer``          NOLOGIN; SELECT/INSERT in schema audit (migrations       here
                          0001-0005 grant it; 0001 creates it only when missing)
``audit_archiver``        NOLOGIN; may call audit.detach_archived_month (0005)     here
``auditlog_migrator``     LOGIN; CONNECT and CREATE on the database: it creates    here
                          and owns schema audit when it applies 0001
``audit_worker``          LOGIN; CONNECT, member of audit_writer (and of           here
                          audit_archiver only when months are detached), session
                          timeouts
========================  ======================================================  =========

With ``auth = "iam"`` both logins are granted ``rds_iam`` and have no password: they sign
in with RDS IAM tokens (`audit_worker.db.credentials`), so no database password of theirs
exists anywhere, Pulumi state included. With ``auth = "password"`` (the local platform) the
passwords given are set instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from audit_worker.db.credentials import DatabaseAuth
from audit_worker.errors import ConfigurationError

__all__ = ["Logins", "bootstrap", "bootstrap_sql", "existing_roles", "master_url_from_secret"]

WRITER_ROLE = "audit_writer"
ARCHIVER_ROLE = "audit_archiver"
IAM_ROLE = "rds_iam"
# The worker login's own defaults, for psql and any other tool that uses it; the worker's
# pool sends its own (AUDIT_DATABASE_*_TIMEOUT_SECONDS) at every connection.
WORKER_TIMEOUTS = {"statement_timeout": "120s", "idle_in_transaction_session_timeout": "30s"}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Logins:
    database: str = "audit"
    migrator: str = "auditlog_migrator"
    worker: str = "audit_worker"

    def __post_init__(self) -> None:
        # Names go into SQL as identifiers: only plain lower-case names, never quoted.
        for field in ("database", "migrator", "worker"):
            if not _NAME.match(getattr(self, field)):
                raise ConfigurationError(
                    f"bootstrap {field} name must match {_NAME.pattern} (lower-case letters, "
                    "digits and _)")
        if self.migrator == self.worker:
            raise ConfigurationError("bootstrap: the migration and worker logins must differ")


def _create_if_missing(role: str, attributes: str) -> str:
    return (f"  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN\n"
            f"    CREATE ROLE {role} {attributes};\n  END IF;\n")


def bootstrap_sql(logins: Logins = Logins(), *, auth: DatabaseAuth = "iam",
                  archiver: bool = False) -> str:
    """The bootstrap as one SQL script (no secrets in it: passwords are set separately)."""
    db, migrator, worker = logins.database, logins.migrator, logins.worker
    lines = [
        "-- Roles: only the master login may create them (CREATEROLE).",
        "DO $$ BEGIN\n"
        + _create_if_missing(WRITER_ROLE, "NOLOGIN")
        + _create_if_missing(ARCHIVER_ROLE, "NOLOGIN")
        + _create_if_missing(migrator, "LOGIN")
        + _create_if_missing(worker, "LOGIN")
        + "END $$;",
        f"ALTER ROLE {migrator} LOGIN;",
        f"ALTER ROLE {worker} LOGIN;",
        "-- The migration login creates schema audit (0001) and owns everything in it.",
        f"GRANT CONNECT, CREATE ON DATABASE {db} TO {migrator};",
        "-- The worker: connect, read and append (audit_writer), nothing else.",
        f"GRANT CONNECT ON DATABASE {db} TO {worker};",
        f"GRANT {WRITER_ROLE} TO {worker};",
        # Detaching a verified month drops its rows: granted only where the environment
        # turns it on (archive.detach_verified_months), revoked again where it is off.
        (f"GRANT {ARCHIVER_ROLE} TO {worker};" if archiver
         else f"REVOKE {ARCHIVER_ROLE} FROM {worker};"),
        # Set on the login itself: ALTER ROLE ... SET on a NOLOGIN group never reaches
        # its members.
        *(f"ALTER ROLE {worker} SET {name} = '{value}';"
          for name, value in WORKER_TIMEOUTS.items()),
    ]
    if auth == "iam":
        lines += [
            "-- RDS IAM authentication: these logins sign in with tokens, never a password.",
            f"GRANT {IAM_ROLE} TO {migrator}, {worker};",
            f"ALTER ROLE {migrator} PASSWORD NULL;",
            f"ALTER ROLE {worker} PASSWORD NULL;",
        ]
    return "\n".join(lines) + "\n"


def master_url_from_secret(url: str, secret_arn: str, *, region: str,
                           client: Any | None = None) -> str:
    """`url` (host, port, database, sslmode) with the master login and password of the
    RDS-managed secret `secret_arn` (``manage_master_user_password``): JSON holding
    ``username`` and ``password``. The password lives only in memory here."""
    from botocore.exceptions import BotoCoreError, ClientError

    if client is None:
        import boto3

        client = boto3.session.Session().client("secretsmanager", region_name=region)
    try:
        value = client.get_secret_value(SecretId=secret_arn)["SecretString"]
    except (BotoCoreError, ClientError) as exc:
        code = exc.response["Error"]["Code"] if isinstance(exc, ClientError) else (
            type(exc).__name__)
        raise ConfigurationError(
            f"bootstrap: cannot read the master secret ({code}): the migration Job's role "
            "needs secretsmanager:GetSecretValue on AUDIT_MASTER_SECRET_ARN and "
            "kms:Decrypt on its key") from None
    try:
        secret = json.loads(value)
        user, password = str(secret["username"]), str(secret["password"])
    except (ValueError, KeyError, TypeError):
        raise ConfigurationError(
            "bootstrap: the master secret is not the JSON RDS writes (username, password): "
            "AUDIT_MASTER_SECRET_ARN must name the instance's RDS-managed master secret"
        ) from None
    parts = urlsplit(url)
    if not parts.hostname:
        raise ConfigurationError("bootstrap: the master database URL needs a host")
    host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


async def existing_roles(conn: asyncpg.Connection, logins: Logins = Logins()) -> set[str]:
    """Which of the bootstrap's roles exist already."""
    names = [WRITER_ROLE, ARCHIVER_ROLE, logins.migrator, logins.worker]
    rows = await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])",
                            names)
    return {row["rolname"] for row in rows}


async def bootstrap(conn: asyncpg.Connection, logins: Logins = Logins(), *,
                    auth: DatabaseAuth = "iam", archiver: bool = False,
                    passwords: dict[str, str] | None = None) -> None:
    """Run `bootstrap_sql` on a connection of the master login, in one transaction.

    ``passwords`` (auth ``password`` only) maps a login to its password; the server quotes
    it (``format('%L')``), so no value is spliced into SQL here.
    """
    if auth == "iam" and passwords:
        raise ConfigurationError("bootstrap: database_auth iam takes no passwords")
    if auth == "password" and set(passwords or {}) != {logins.migrator, logins.worker}:
        raise ConfigurationError(
            f"bootstrap: database_auth password needs the passwords of {logins.migrator} "
            f"and {logins.worker}")
    if await conn.fetchval("SELECT current_database()") != logins.database:
        raise ConfigurationError(
            f"bootstrap: connected to another database than {logins.database!r}: the "
            "database URL's path must name the instance's database")
    async with conn.transaction():
        await conn.execute(bootstrap_sql(logins, auth=auth, archiver=archiver))
        for login, password in (passwords or {}).items():
            statement = await conn.fetchval(
                "SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)",
                login, password)
            await conn.execute(statement)

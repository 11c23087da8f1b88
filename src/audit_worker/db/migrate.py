"""Versioned, checksummed schema migrations.

Files are ``migrations/NNNN_name.sql``; the first lines may declare ``-- kind: expand`` or
``-- kind: contract``. An applied migration whose file changed is refused: the history of an
audit database must not be rewritten quietly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import asyncpg

from audit_worker.errors import MigrationError

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_KIND = re.compile(r"^--\s*kind:\s*(expand|contract)\s*$", re.MULTILINE)
# Any constant will do; it only has to be the same for every migrator of this schema.
_MIGRATION_LOCK = 0x61756469_74_6D67

Kind = Literal["expand", "contract"]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    kind: Kind
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class MigrationStatus:
    applied: list[int]
    pending: list[Migration]


def load_migrations(package: str = "audit_worker.db.migrations") -> list[Migration]:
    """Read the packaged migrations in version order; gaps and bad names are errors."""
    found = []
    for entry in resources.files(package).iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _NAME.match(entry.name)
        if not match:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        sql = entry.read_text(encoding="utf-8")
        kind_match = _KIND.search(sql)
        kind: Kind = "contract" if kind_match and kind_match.group(1) == "contract" else "expand"
        found.append(Migration(int(match.group(1)), match.group(2), kind, sql))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migration versions must be 1..N without gaps: found {migration.version}, "
                f"want {expected}"
            )
    return found


_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS audit;
CREATE TABLE IF NOT EXISTS audit.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    kind       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


async def _applied(conn: asyncpg.Connection) -> dict[int, str]:
    exists = await conn.fetchval("SELECT to_regclass('audit.schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM audit.schema_migrations")
    return {r["version"]: r["checksum"] for r in rows}


def _check_checksums(applied: dict[int, str], known: list[Migration]) -> None:
    by_version = {m.version: m for m in known}
    newest_known = max(by_version, default=0)
    for version, checksum in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None and version > newest_known:
            # A newer release ran its expand migrations: the old slot keeps working.
            continue
        if migration is None:
            raise MigrationError(
                f"the database has migration {version}, which this release does not know"
            )
        if migration.checksum != checksum:
            raise MigrationError(
                f"migration {version:04d}_{migration.name} changed after it was applied "
                f"(checksum {checksum[:12]} in the database, {migration.checksum[:12]} in "
                "this release); restore the original file and add a new migration instead"
            )


async def status(conn: asyncpg.Connection) -> MigrationStatus:
    """What is applied and what is pending; raises on a changed checksum."""
    known = load_migrations()
    applied = await _applied(conn)
    _check_checksums(applied, known)
    return MigrationStatus(
        applied=sorted(applied), pending=[m for m in known if m.version not in applied]
    )


async def migrate(
    conn: asyncpg.Connection, *, allow_contract: bool = False, target: int | None = None
) -> list[Migration]:
    """Apply pending migrations, each in its own transaction. Returns what was applied.

    Contract migrations (dropping what the previous release still uses) are refused unless
    `allow_contract` is set, because during a blue-green release both slots run at once.
    """
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(_BOOKKEEPING)
        current = await status(conn)
        todo = [m for m in current.pending if target is None or m.version <= target]
        blocked = [m for m in todo if m.kind == "contract" and not allow_contract]
        if blocked:
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in blocked)
            raise MigrationError(
                f"{names} is a contract migration; run it only after the old slot has been "
                "scaled down (pass --allow-contract)"
            )
        for migration in todo:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO audit.schema_migrations (version, name, kind, checksum) "
                    "VALUES ($1, $2, $3, $4)",
                    migration.version,
                    migration.name,
                    migration.kind,
                    migration.checksum,
                )
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


async def require_current(conn: asyncpg.Connection) -> None:
    """Refuse to start a worker against a schema that is behind or was altered."""
    current = await status(conn)
    if current.pending:
        versions = ", ".join(str(m.version) for m in current.pending)
        raise MigrationError(
            f"schema is not migrated (pending: {versions}); run `audit-worker migrate` first"
        )

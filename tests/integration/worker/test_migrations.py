"""Migrations: versioned, checksummed, contract ones refused while two slots may run."""

from __future__ import annotations

import asyncpg
import pytest

from audit_worker.db import migrate as m
from audit_worker.errors import MigrationError


async def test_migrate_applies_once_and_records_checksums(fresh_database: str) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        first = await m.migrate(conn)
        again = await m.migrate(conn)
        rows = await conn.fetch("SELECT version, checksum FROM audit.schema_migrations")
    finally:
        await conn.close()
    assert [x.version for x in first] == [x.version for x in m.load_migrations()]
    assert again == []
    assert rows[0]["checksum"] == m.load_migrations()[0].checksum


async def test_changed_applied_migration_is_refused(fresh_database: str) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        await m.migrate(conn)
        async with conn.transaction():  # past the append-only trigger of 0003, as an insider
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "UPDATE audit.schema_migrations SET checksum = 'abc' WHERE version = 1")
        with pytest.raises(MigrationError, match=r"0001_initial changed after it was applied"):
            await m.migrate(conn)
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await m.require_current(conn)
    finally:
        await conn.close()


async def test_worker_refuses_an_unmigrated_schema(fresh_database: str) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        with pytest.raises(MigrationError, match="run `audit-worker migrate` first"):
            await m.require_current(conn)
    finally:
        await conn.close()


async def test_newer_expand_migration_does_not_stop_the_old_release(fresh_database: str) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        await m.migrate(conn)
        await conn.execute(
            "INSERT INTO audit.schema_migrations (version, name, kind, checksum)"
            " VALUES ($1, 'from_newer_release', 'expand', 'x')",
            len(m.load_migrations()) + 1,
        )
        await m.require_current(conn)  # no exception: the old slot keeps running
    finally:
        await conn.close()


async def test_contract_migration_needs_allow_contract(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = m.load_migrations()
    contract = m.Migration(
        len(shipped) + 1, "drop_old_column", "contract", "-- kind: contract\nSELECT 1;"
    )
    known = [*shipped, contract]
    monkeypatch.setattr(m, "load_migrations", lambda: known)
    conn = await asyncpg.connect(fresh_database)
    try:
        with pytest.raises(MigrationError, match="contract migration"):
            await m.migrate(conn)
        applied = await m.migrate(conn, allow_contract=True)
    finally:
        await conn.close()
    assert [x.version for x in applied] == [*(x.version for x in shipped), contract.version]

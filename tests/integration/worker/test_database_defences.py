"""The database defends itself: every privilege of the worker's login, and the owner's
TRUNCATE, tried for real against PostgreSQL.

The worker's login is made as on RDS (LOGIN, member of ``audit_writer``, no superuser) by
the SQL of docs/guides/deployment-patterns.md ("The worker's database login"), taken out of
the guide so that the guide cannot drift from what is tested. Tables, partitions,
sequences and functions are enumerated from the catalog: a table added by a later
migration fails `test_the_catalog_grants_the_worker_login_exactly_the_designed_privileges`
until its privileges are decided here. The insider attacks run as a database superuser,
which is more than the owner of schema ``audit`` has on RDS.
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
import redis.asyncio as aioredis

from audit_worker import verify as verify_module
from audit_worker.config import WorkerSettings
from audit_worker.db import migrate as m
from audit_worker.resilience import postgres_error_kind
from audit_worker.service import Assembly, open_pool, session_timeouts
from audit_worker.verify import verify_log
from tests.support import drain, encode, make_event, migrate_url, worker_settings

GUIDE = Path(__file__).resolve().parents[3] / "docs" / "guides" / "deployment-patterns.md"
PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
READ_APPEND = frozenset({"SELECT", "INSERT"})
# What the design lets the worker do on each table of schema audit; partitions of
# audit.events inherit the events row.
WRITER_PRIVILEGES: dict[str, frozenset[str]] = {
    "events": READ_APPEND,
    "event_keys": READ_APPEND,
    "tree_heads": READ_APPEND,
    "dead_letters": READ_APPEND,
    "dead_letter_replays": READ_APPEND,
    "data_keys": READ_APPEND,
    "log_identity": READ_APPEND,
    # A queue, not evidence: its rows leave in the transaction that logs them.
    "intake_spool": READ_APPEND | {"DELETE"},
    # Read by require_current at start-up; written only by `audit-worker migrate`.
    "schema_migrations": frozenset({"SELECT"}),
    # 0005: the worker records a month it exported; only audit.detach_archived_month
    # (SECURITY DEFINER) records one it detached.
    "archived_months": READ_APPEND,
    "detached_months": frozenset({"SELECT"}),
}
# SECURITY DEFINER functions run with their owner's rights: each one the worker may call
# is a door through the missing grants, so the list is kept here on purpose.
WRITER_DEFINERS = ["ensure_partitions"]
REFUSED = "the worker's login was allowed to"


def _worker_login_sql() -> str:
    text = GUIDE.read_text(encoding="utf-8")
    block = re.search(r"<<'WORKER_SQL'\n(.*?)\nWORKER_SQL\n", text, re.DOTALL)
    assert block, "the deployment guide no longer has the worker login's SQL"
    return block.group(1)


WORKER_SQL = _worker_login_sql()


@dataclass(frozen=True)
class Login:
    name: str
    url: str


def _url_for(database_url: str, role: str, password: str) -> str:
    parts = urlsplit(database_url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return urlunsplit(parts._replace(netloc=f"{quote(role)}:{quote(password)}@{host}"))


async def _superuser(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(database_url)


@pytest.fixture
async def migrated(fresh_database: str) -> str:
    await migrate_url(fresh_database)
    return fresh_database


@pytest.fixture
async def worker_login(migrated: str) -> AsyncIterator[Login]:
    """A login made by the guide's SQL, with a unique name: roles are server-wide."""
    name = f"audit_worker_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    database = urlsplit(migrated).path.lstrip("/")
    sql = WORKER_SQL.replace(":'pw'", f"'{password}'")
    sql = re.sub(r"\baudit_worker\b", name, sql)
    sql = re.sub(r"\bDATABASE audit\b", f'DATABASE "{database}"', sql)
    conn = await _superuser(migrated)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
    try:
        yield Login(name, _url_for(migrated, name, password))
    finally:
        conn = await _superuser(migrated)
        try:
            await conn.execute(f"DROP OWNED BY {name}; DROP ROLE {name}")
        finally:
            await conn.close()


async def _tables(conn: asyncpg.Connection) -> dict[str, str]:
    """Every table of schema audit -> the WRITER_PRIVILEGES row that governs it."""
    rows = await conn.fetch(
        "SELECT c.relname, p.relname AS parent FROM pg_class c"
        " LEFT JOIN pg_inherits i ON i.inhrelid = c.oid"
        " LEFT JOIN pg_class p ON p.oid = i.inhparent"
        " WHERE c.relnamespace = 'audit'::regnamespace AND c.relkind IN ('r', 'p')"
        " ORDER BY c.relname"
    )
    return {r["relname"]: r["parent"] or r["relname"] for r in rows}


async def _partitions(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT inhrelid::regclass::text AS part FROM pg_inherits"
        " WHERE inhparent = 'audit.events'::regclass ORDER BY 1"
    )
    return [r["part"] for r in rows]


async def _outcome(conn: asyncpg.Connection, sql: str, *args: object) -> str | None:
    """None when the statement ran, else its SQLSTATE."""
    try:
        await conn.execute(sql, *args)
    except asyncpg.PostgresError as exc:
        return str(exc.sqlstate)
    return None


# --------------------------------------------------------------------------- the worker


async def test_the_catalog_grants_the_worker_login_exactly_the_designed_privileges(
    worker_login: Login, migrated: str
) -> None:
    conn = await _superuser(migrated)
    try:
        tables = await _tables(conn)
        undecided = sorted(set(tables.values()) - set(WRITER_PRIVILEGES))
        assert not undecided, (
            f"audit.{undecided[0]} has no row in WRITER_PRIVILEGES: decide what the worker "
            "may do on it (and grant only that in its migration)"
        )
        wrong = []
        for table, governed_by in tables.items():
            for privilege in PRIVILEGES:
                has = await conn.fetchval(
                    "SELECT has_table_privilege($1, $2, $3)",
                    worker_login.name, f"audit.{table}", privilege,
                )
                if has != (privilege in WRITER_PRIVILEGES[governed_by]):
                    wrong.append(f"{privilege} on audit.{table}: {has}")
        assert not wrong, wrong
        assert set(await _partitions(conn)) >= {"audit.events_default"}
        # Sequences: nextval for the bigserial ids, never setval.
        for row in await conn.fetch(
            "SELECT oid::regclass::text AS seq FROM pg_class"
            " WHERE relnamespace = 'audit'::regnamespace AND relkind = 'S'"
        ):
            assert await conn.fetchval(
                "SELECT has_sequence_privilege($1, $2, 'USAGE')", worker_login.name, row["seq"])
            assert not await conn.fetchval(
                "SELECT has_sequence_privilege($1, $2, 'UPDATE')", worker_login.name, row["seq"])
        definers = await conn.fetch(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'audit'::regnamespace"
            " AND prosecdef AND has_function_privilege($1, oid, 'EXECUTE') ORDER BY proname",
            worker_login.name,
        )
        assert [r["proname"] for r in definers] == WRITER_DEFINERS
        assert not await conn.fetchval(
            "SELECT has_function_privilege($1, 'audit.guard_events_partition(regclass)',"
            " 'EXECUTE')", worker_login.name)
        assert not await conn.fetchval(
            "SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls"
            " FROM pg_roles WHERE rolname = $1", worker_login.name)
    finally:
        await conn.close()


async def test_every_table_and_partition_runs_only_the_designed_statements_for_the_worker(
    worker_login: Login, migrated: str
) -> None:
    """Each statement for real, as the login, on every table and partition. The WHERE false
    forms touch no row, but PostgreSQL checks the privilege all the same."""
    conn = await asyncpg.connect(worker_login.url)
    try:
        tables = await _tables(conn)
        unexpected = []
        for table, governed_by in tables.items():
            allowed = WRITER_PRIVILEGES[governed_by]
            column = await conn.fetchval(
                "SELECT quote_ident(attname) FROM pg_attribute"
                " WHERE attrelid = $1::regclass AND attnum = 1", f"audit.{table}")
            t = f"audit.{table}"
            statements = {
                "SELECT": f"SELECT * FROM {t} LIMIT 0",
                "INSERT": f"INSERT INTO {t} SELECT * FROM {t} WHERE false",
                "UPDATE": f"UPDATE {t} SET {column} = {column} WHERE false",
                "DELETE": f"DELETE FROM {t} WHERE false",
                "TRUNCATE": f"TRUNCATE {t}",
            }
            for privilege, sql in statements.items():
                sqlstate = await _outcome(conn, sql)
                want = None if privilege in allowed else "42501"
                if sqlstate != want:
                    unexpected.append(f"{sql}: SQLSTATE {sqlstate}, want {want}")
        assert not unexpected, unexpected
        assert "events_default" in tables
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE audit.planted (id int)",
        "CREATE TABLE public.planted (id int)",
        "CREATE SCHEMA planted",
        "CREATE OR REPLACE FUNCTION audit.ensure_partitions(months_ahead integer DEFAULT 2)"
        " RETURNS integer LANGUAGE sql AS 'SELECT 0'",
        "ALTER TABLE audit.events ADD COLUMN planted int",
        "ALTER TABLE audit.events DISABLE TRIGGER events_append_only",
        "ALTER TABLE audit.events_default DISABLE TRIGGER events_no_truncate",
        "ALTER TABLE audit.tree_heads DISABLE TRIGGER USER",
        "ALTER TABLE audit.events DETACH PARTITION audit.events_default",
        "DROP TRIGGER events_no_truncate ON audit.events_default",
        "CREATE TRIGGER planted BEFORE INSERT ON audit.events"
        " FOR EACH ROW EXECUTE FUNCTION audit.refuse_change()",
        "DROP TABLE audit.events_default",
        "DROP FUNCTION audit.ensure_partitions(integer)",
        "SELECT audit.guard_events_partition('audit.events')",
        "SELECT setval('audit.dead_letters_id_seq', 1)",
        "INSERT INTO audit.schema_migrations (version, name, kind, checksum)"
        " VALUES (999, 'planted', 'expand', 'x')",
        "SET session_replication_role = replica",
        "CREATE ROLE planted LOGIN",
    ],
)
async def test_the_worker_login_is_refused(worker_login: Login, sql: str) -> None:
    conn = await asyncpg.connect(worker_login.url)
    try:
        assert await _outcome(conn, sql) == "42501", f"{REFUSED}: {sql}"
    finally:
        await conn.close()


async def test_the_worker_login_still_starts_and_keeps_partitions_ahead(
    worker_login: Login,
) -> None:
    """What 0003 took away is what the worker never needed."""
    conn = await asyncpg.connect(worker_login.url)
    try:
        await m.require_current(conn)  # reads audit.schema_migrations
        assert await conn.fetchval("SELECT audit.ensure_partitions()") == 0
        assert await conn.fetchval("SELECT audit.ensure_partitions(12)") == 10
        assert len(await _partitions(conn)) == 14  # 13 months and the default
    finally:
        await conn.close()


@pytest.mark.parametrize("months_ahead", [13, -1, 10_000, None])
async def test_ensure_partitions_refuses_months_ahead_outside_0_to_12(
    worker_login: Login, months_ahead: int | None
) -> None:
    conn = await asyncpg.connect(worker_login.url)
    try:
        before = len(await _partitions(conn))
        with pytest.raises(asyncpg.InvalidParameterValueError) as refused:
            await conn.fetchval("SELECT audit.ensure_partitions($1)", months_ahead)
        assert refused.value.sqlstate == "22023"
        assert "months_ahead must be between 0 and 12, got " in str(refused.value)
        assert len(await _partitions(conn)) == before
    finally:
        await conn.close()


# --------------------------------------------------------------------------- timeouts


def test_the_guides_login_timeouts_are_the_worker_defaults() -> None:
    settings = dict(re.findall(r"SET (\w+) = '(\d+)s'", WORKER_SQL))
    defaults = WorkerSettings.model_fields
    assert float(settings["statement_timeout"]) == (
        defaults["database_statement_timeout_seconds"].default)
    assert float(settings["idle_in_transaction_session_timeout"]) == (
        defaults["database_idle_in_transaction_timeout_seconds"].default)


async def test_a_session_of_the_worker_login_is_bounded_by_the_logins_defaults(
    worker_login: Login,
) -> None:
    """Any tool (psql, a script) that uses the worker's credentials gets the bounds."""
    conn = await asyncpg.connect(worker_login.url)
    try:
        assert await conn.fetchval("SHOW statement_timeout") == "2min"
        assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "30s"
    finally:
        await conn.close()


async def test_the_worker_pools_own_timeouts_take_precedence_over_the_logins(
    worker_login: Login, fresh_redis: str, tmp_path: Path
) -> None:
    settings = worker_settings(
        worker_login.url, fresh_redis, tmp_path, database_statement_timeout_seconds=90,
        database_idle_in_transaction_timeout_seconds=12.5,
    )
    pool = await open_pool(worker_login.url, size=2, server_settings=session_timeouts(settings))
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "90s"
            assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "12500ms"
    finally:
        await pool.close()


def test_a_statement_timeout_below_the_command_timeout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is below database_command_timeout_seconds"):
        worker_settings("postgresql://x@h/db", "redis://h", tmp_path,
                        database_statement_timeout_seconds=30,
                        database_command_timeout_seconds=60)


async def test_a_session_stuck_in_its_transaction_is_ended_and_frees_the_sequencer_lock(
    worker_login: Login, fresh_redis: str, tmp_path: Path
) -> None:
    settings = worker_settings(
        worker_login.url, fresh_redis, tmp_path,
        database_idle_in_transaction_timeout_seconds=1,
    )
    pool = await open_pool(worker_login.url, size=2, server_settings=session_timeouts(settings))
    other = await asyncpg.connect(worker_login.url)
    lock = 0x5EC
    try:
        stuck = await pool.acquire()
        transaction = stuck.transaction()
        await transaction.start()
        await stuck.execute("SELECT pg_advisory_xact_lock($1)", lock)
        assert not await other.fetchval("SELECT pg_try_advisory_lock($1)", lock)
        await other.execute("SELECT pg_sleep(1.5)")  # the holder does nothing meanwhile
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", lock)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)) as ended:
            await stuck.execute("SELECT 1")
        assert postgres_error_kind(ended.value) == "transient"  # the batch is retried
        await pool.release(stuck)
    finally:
        await other.close()
        await pool.close()


async def test_a_runaway_statement_is_cancelled_as_a_transient_error(
    worker_login: Login, fresh_redis: str, tmp_path: Path
) -> None:
    settings = worker_settings(
        worker_login.url, fresh_redis, tmp_path, database_statement_timeout_seconds=1,
        database_command_timeout_seconds=1,
    )
    pool = await open_pool(worker_login.url, size=2, server_settings=session_timeouts(settings))
    try:
        async with pool.acquire() as conn:
            with pytest.raises(asyncpg.QueryCanceledError) as cancelled:
                await conn.execute("SELECT pg_sleep(3)")
        assert cancelled.value.sqlstate == "57014"
        assert postgres_error_kind(cancelled.value) == "transient"
    finally:
        await pool.close()


async def test_verify_as_the_worker_login_is_not_cut_by_its_timeouts(
    parts: Assembly, producer: aioredis.Redis, fresh_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Verify's first connection waits idle in its transaction while processes check the
    chunks (spawning them alone takes longer than the 1 s bound set here)."""
    for i in range(40):
        await producer.xadd(parts.worker.intake.stream, {"event": encode(make_event(i))})
    assert await drain(parts) == 40
    await parts.worker.sign_tree_head()
    name, password = f"audit_verifier_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    conn = await _superuser(fresh_database)
    await conn.execute(
        f"CREATE ROLE {name} LOGIN PASSWORD '{password}'; GRANT audit_writer TO {name};"
        f" ALTER ROLE {name} SET statement_timeout = '1s';"
        f" ALTER ROLE {name} SET idle_in_transaction_session_timeout = '1s'")
    url = _url_for(fresh_database, name, password)
    monkeypatch.setattr(verify_module, "_CHUNK", 16)  # several chunks from 40 rows
    try:
        reader = await asyncpg.connect(url)
        try:
            report = await verify_log(
                reader, parts.worker.signer.public_key_pem(), log_id=parts.worker.store.log_id,
                dsn=url, workers=2,
            )
        finally:
            await reader.close()
        assert report.ok, report.findings
        assert report.rows == 40
    finally:
        await conn.execute(f"DROP OWNED BY {name}; DROP ROLE {name}")
        await conn.close()


# --------------------------------------------------------------------------- the owner


async def _insert_rows(conn: asyncpg.Connection) -> None:
    """One row in the current month's partition and one in the default partition."""
    await conn.execute(
        "INSERT INTO audit.events (log_index, event_id, recorded, occurred, action, outcome,"
        " actor_hmac, leaf_data, leaf_hash) VALUES"
        " (0, gen_random_uuid(), now(), now(), 'R', 0, '\\x00', '\\x00', sha256('a')),"
        " (1, gen_random_uuid(), '1990-01-01', now(), 'R', 0, '\\x00', '\\x00', sha256('b'))"
    )


async def test_the_owner_cannot_truncate_the_events_or_any_partition(migrated: str) -> None:
    conn = await _superuser(migrated)
    try:
        await _insert_rows(conn)
        targets = ["audit.events", *await _partitions(conn)]
        assert len(targets) == 5  # the parent, three months and the default
        for target in targets:
            for sql in (f"TRUNCATE {target}", f"TRUNCATE {target} CASCADE",
                        f"TRUNCATE {target} RESTART IDENTITY"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="TRUNCATE refused"):
                    await conn.execute(sql)
        for partition in targets[1:]:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="TRUNCATE refused"):
                await conn.execute(f"TRUNCATE ONLY {partition}")
        # ONLY on the parent: PostgreSQL itself refuses it (nothing to empty).
        with pytest.raises(asyncpg.PostgresError, match="cannot truncate only a partitioned"):
            await conn.execute("TRUNCATE ONLY audit.events")
        assert await conn.fetchval("SELECT count(*) FROM audit.events") == 2
    finally:
        await conn.close()


async def test_truncate_is_refused_even_with_session_replication_role_replica(
    migrated: str,
) -> None:
    """The row guards yield to replica mode (pgaudit's misc_set records the SET); the
    TRUNCATE guards are ENABLE ALWAYS and do not."""
    conn = await _superuser(migrated)
    try:
        await _insert_rows(conn)
        tables = [f"audit.{t}" for t in await _tables(conn) if t != "events"]
        for target in ["audit.events", *tables]:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="TRUNCATE refused"):
                async with conn.transaction():
                    await conn.execute("SET LOCAL session_replication_role = replica")
                    await conn.execute(f"TRUNCATE {target} CASCADE")
        assert await conn.fetchval("SELECT count(*) FROM audit.events") == 2
    finally:
        await conn.close()


async def test_every_table_and_partition_has_its_guards(worker_login: Login, migrated: str) -> None:
    """Including the partitions ensure_partitions creates later, as the worker calls it."""
    worker = await asyncpg.connect(worker_login.url)
    try:
        before = set(await _partitions(worker))
        assert await worker.fetchval("SELECT audit.ensure_partitions(6)") == 4
        later = sorted(set(await _partitions(worker)) - before)
    finally:
        await worker.close()
    conn = await _superuser(migrated)
    try:
        rows = await conn.fetch(
            "SELECT c.relname, t.tgname, t.tgenabled, t.tgtype FROM pg_class c"
            " JOIN pg_trigger t ON t.tgrelid = c.oid AND NOT t.tgisinternal"
            " WHERE c.relnamespace = 'audit'::regnamespace")
        guards: dict[str, dict[str, str]] = {}
        for r in rows:
            guards.setdefault(r["relname"], {})[r["tgname"]] = r["tgenabled"].decode()
        tables = await _tables(conn)
        missing = []
        for table, governed_by in tables.items():
            own = guards.get(table, {})
            truncate_guard = "events_no_truncate" if governed_by == "events" else (
                f"{table}_no_truncate")
            if own.get(truncate_guard) != "A":
                missing.append(f"{table}: {truncate_guard} not ENABLE ALWAYS ({own})")
            if "DELETE" in WRITER_PRIVILEGES[governed_by]:
                continue  # the spool's rows leave by DELETE
            if governed_by == "events" and table != "events":
                row_guard = "events_partition_append_only"  # survives DETACH
            else:
                row_guard = f"{table}_append_only"
            if row_guard not in own:
                missing.append(f"{table}: no {row_guard}")
        assert not missing, missing
        assert len(later) == 4
        for partition in later:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="TRUNCATE refused"):
                await conn.execute(f"TRUNCATE {partition}")
    finally:
        await conn.close()


async def test_a_detached_partition_still_refuses_delete_update_and_truncate(
    migrated: str,
) -> None:
    """DETACH drops the row guard cloned from audit.events; the partition's own remain."""
    conn = await _superuser(migrated)
    try:
        await _insert_rows(conn)
        await conn.execute("ALTER TABLE audit.events DETACH PARTITION audit.events_default")
        for sql in ("DELETE FROM audit.events_default",
                    "UPDATE audit.events_default SET action = 'D'",
                    "TRUNCATE audit.events_default"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(sql)
        assert await conn.fetchval("SELECT count(*) FROM audit.events_default") == 1
    finally:
        await conn.close()


async def test_migration_0003_guards_partitions_created_before_it(fresh_database: str) -> None:
    conn = await _superuser(fresh_database)
    try:
        assert [x.version for x in await m.migrate(conn, target=2)] == [1, 2]
        await conn.execute(
            "CREATE TABLE audit.events_1999_01 PARTITION OF audit.events"
            " FOR VALUES FROM ('1999-01-01') TO ('1999-02-01')")
        await conn.execute(
            "INSERT INTO audit.events (log_index, event_id, recorded, occurred, action, outcome,"
            " actor_hmac, leaf_data, leaf_hash) VALUES (0, gen_random_uuid(), '1999-01-02',"
            " now(), 'R', 0, '\\x00', '\\x00', sha256('a'))")
        assert 3 in [x.version for x in await m.migrate(conn)]
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="TRUNCATE refused"):
            await conn.execute("TRUNCATE audit.events_1999_01")
        await conn.execute("ALTER TABLE audit.events DETACH PARTITION audit.events_1999_01")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="DELETE refused"):
            await conn.execute("DELETE FROM audit.events_1999_01")
    finally:
        await conn.close()


async def test_what_the_owner_can_still_do_is_ddl_and_verify_finds_the_rows_gone(
    parts: Assembly, producer: aioredis.Redis, fresh_database: str,
) -> None:
    """The limit of a schema that defends itself: its owner can disable a guard or drop a
    partition (both DDL, which pgaudit records), and verify sees the rows missing."""
    for i in range(10):
        await producer.xadd(parts.worker.intake.stream, {"event": encode(make_event(i))})
    assert await drain(parts) == 10
    await parts.worker.sign_tree_head()
    conn = await _superuser(fresh_database)
    try:
        month = await conn.fetchval(
            "SELECT tableoid::regclass::text FROM audit.events WHERE log_index = 0")
        await conn.execute(f"ALTER TABLE audit.events DETACH PARTITION {month}; DROP TABLE {month}")
        report = await verify_log(
            conn, parts.worker.signer.public_key_pem(), log_id=parts.worker.store.log_id)
    finally:
        await conn.close()
    assert not report.ok
    assert "truncated_tail" in {f.kind for f in report.findings}

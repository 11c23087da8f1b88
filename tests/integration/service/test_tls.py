"""TLS with certificate checks to real servers: PostgreSQL serving TLS, Redis behind TLS.

The servers present a certificate for ``localhost`` signed by a CA this module makes
(`tests.tlskit`). The worker must connect when that CA is configured, and refuse, with an
error that names the setting to fix and holds neither the URL nor the password, when the
CA is missing or another one, and when the host it dialled is not in the certificate.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.exceptions
from structlog.testing import capture_logs

from audit_worker import tls
from audit_worker.errors import TlsError
from audit_worker.localenv import PostgresServer, create_database, drop_database
from audit_worker.service import open_pool, redis_client
from tests.integration.service.conftest import eventually, running, service_settings
from tests.support import migrate_url
from tests.tlskit import Pki, TlsFront, make_pki

PASSWORD = "tls-test-password-7f3a"  # trust auth ignores it; it must never be shown


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_postgres(pki: Pki) -> Iterator[PostgresServer]:
    with PostgresServer(fast=True, tls=pki.pair) as server:
        yield server


@pytest.fixture(scope="module")
def tls_redis(redis_url: str, pki: Pki) -> Iterator[TlsFront]:
    upstream = urlsplit(redis_url)
    assert upstream.hostname and upstream.port
    with TlsFront(upstream.hostname, upstream.port, pki) as front:
        yield front


def _url(plain: str, *, host: str = "localhost", mode: str | None = "verify-full") -> str:
    """`plain` (postgresql://user@127.0.0.1:port/db) at `host`, with a password and mode."""
    parts = urlsplit(plain)
    netloc = f"{parts.username}:{PASSWORD}@{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, f"sslmode={mode}" if mode else "", ""))


async def _session_is_encrypted(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))


def _assert_secret_free(text: str, url: str) -> None:
    assert PASSWORD not in text and url not in text


# --------------------------------------------------------------------------- PostgreSQL


async def test_plain_asyncpg_cannot_verify_full_without_a_root_certificate(
    tls_postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure of issue 10 itself: the image's HOME (/tmp) has no .postgresql/root.crt
    and nothing sets PGSSLROOTCERT, so a verify-full URL never connects."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    with pytest.raises(asyncpg.exceptions.ClientConfigurationError, match="root certificate"):
        await asyncpg.connect(_url(tls_postgres.url), timeout=5)


async def test_verify_full_connects_with_the_configured_ca_over_tls(
    tls_postgres: PostgresServer, pki: Pki
) -> None:
    conn = await tls.connect(_url(tls_postgres.url), ca_file=pki.ca_file, timeout=5)
    try:
        assert await _session_is_encrypted(conn)
    finally:
        await conn.close()


async def test_every_connection_of_the_worker_pool_is_verified_tls(
    tls_postgres: PostgresServer, pki: Pki
) -> None:
    pool = await open_pool(_url(tls_postgres.url), size=3, ca_file=pki.ca_file)
    try:
        held = [await pool.acquire() for _ in range(3)]  # opened after start-up too
        assert [await _session_is_encrypted(c) for c in held] == [True, True, True]
        for conn in held:
            await pool.release(conn)
    finally:
        await pool.close()


def test_the_worker_context_requires_a_certificate_and_checks_the_host(pki: Pki) -> None:
    context = tls.postgres_context("postgresql://w@db/audit?sslmode=verify-full", pki.ca_file)
    assert context is not None
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


async def test_a_missing_ca_file_is_refused_naming_database_ca_file(
    tls_postgres: PostgresServer, tmp_path: Path
) -> None:
    url = _url(tls_postgres.url)
    with pytest.raises(TlsError) as err:
        await tls.connect(url, ca_file=tmp_path / "absent.pem", timeout=5)
    message = str(err.value)
    assert "AUDIT_DATABASE_CA_FILE" in message and "does not exist" in message
    _assert_secret_free(message, url)


async def test_a_file_that_is_no_ca_bundle_is_refused_naming_database_ca_file(
    tls_postgres: PostgresServer, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TlsError, match=r"AUDIT_DATABASE_CA_FILE: .* not a readable PEM"):
        await tls.connect(_url(tls_postgres.url), ca_file=junk, timeout=5)


async def test_a_server_signed_by_another_ca_is_refused_naming_database_ca_file(
    tls_postgres: PostgresServer, pki: Pki
) -> None:
    url = _url(tls_postgres.url)
    with pytest.raises(TlsError) as err:
        await tls.connect(url, ca_file=pki.other_ca_file, timeout=5)
    message = str(err.value)
    assert "does not chain to a CA in AUDIT_DATABASE_CA_FILE" in message
    assert str(pki.other_ca_file) in message and "Set AUDIT_DATABASE_CA_FILE" in message
    _assert_secret_free(message, url)


async def test_a_host_the_certificate_does_not_name_is_refused(
    tls_postgres: PostgresServer, pki: Pki
) -> None:
    url = _url(tls_postgres.url, host="127.0.0.1")  # same server, a name not in its SAN
    with pytest.raises(TlsError) as err:
        await tls.connect(url, ca_file=pki.ca_file, timeout=5)
    message = str(err.value)
    assert "does not name the host in AUDIT_DATABASE_URL" in message
    assert "127.0.0.1" not in message
    _assert_secret_free(message, url)


async def test_verify_ca_checks_the_chain_but_not_the_host(
    tls_postgres: PostgresServer, pki: Pki
) -> None:
    url = _url(tls_postgres.url, host="127.0.0.1", mode="verify-ca")
    conn = await tls.connect(url, ca_file=pki.ca_file, timeout=5)
    try:
        assert await _session_is_encrypted(conn)
    finally:
        await conn.close()
    with pytest.raises(TlsError, match="AUDIT_DATABASE_CA_FILE"):
        await tls.connect(url, ca_file=pki.other_ca_file, timeout=5)


async def test_without_a_verify_mode_the_ca_setting_is_not_read(
    tls_postgres: PostgresServer, tmp_path: Path
) -> None:
    # Local development: a plain URL works whatever the (image) default CA path.
    assert tls.postgres_context(tls_postgres.url, tmp_path / "absent.pem") is None
    conn = await tls.connect(tls_postgres.url, ca_file=tmp_path / "absent.pem", timeout=5)
    await conn.close()


def test_a_url_that_names_sslrootcert_is_refused(pki: Pki) -> None:
    url = f"postgresql://w:{PASSWORD}@db/audit?sslmode=verify-full&sslrootcert=/x.pem"
    with pytest.raises(TlsError, match=r"remove sslrootcert .* AUDIT_DATABASE_CA_FILE") as err:
        tls.postgres_context(url, pki.ca_file)
    _assert_secret_free(str(err.value), url)


# --------------------------------------------------------------------------- Redis


async def test_rediss_connects_with_the_configured_ca(tls_redis: TlsFront, pki: Pki) -> None:
    before = tls_redis.handshakes
    client = redis_client(tls_redis.url(), ca_file=pki.ca_file)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    assert tls_redis.handshakes > before  # it went through TLS, not around it


async def _redis_failure(url: str, ca_file: Path | None) -> TlsError:
    client = redis_client(url, ca_file=ca_file)
    try:
        with pytest.raises(redis.exceptions.ConnectionError) as err:
            await client.ping()
    finally:
        await client.aclose()
    explained = tls.explain(err.value, "redis", ca_file)
    assert explained is not None, f"not recognised as a TLS failure: {err.value!r}"
    return explained


async def test_rediss_without_a_ca_trusts_the_system_store_only(tls_redis: TlsFront) -> None:
    message = str(await _redis_failure(tls_redis.url(), None))
    assert "system trust store (AUDIT_REDIS_CA_FILE is unset)" in message
    assert "Set AUDIT_REDIS_CA_FILE" in message


async def test_rediss_signed_by_another_ca_is_refused_naming_redis_ca_file(
    tls_redis: TlsFront, pki: Pki
) -> None:
    message = str(await _redis_failure(tls_redis.url(), pki.other_ca_file))
    assert "does not chain to a CA in AUDIT_REDIS_CA_FILE" in message


async def test_rediss_to_a_host_the_certificate_does_not_name_is_refused(
    tls_redis: TlsFront, pki: Pki
) -> None:
    message = str(await _redis_failure(tls_redis.url(host="127.0.0.1"), pki.ca_file))
    assert "does not name the host in AUDIT_REDIS_URL" in message
    assert "127.0.0.1" not in message


def test_a_missing_redis_ca_file_is_refused_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match=r"AUDIT_REDIS_CA_FILE: .* does not exist"):
        redis_client("rediss://cache:6379/0", ca_file=tmp_path / "absent.pem")


@pytest.mark.parametrize("param", ["ssl_cert_reqs=none", "ssl_check_hostname=false"])
def test_a_rediss_url_that_turns_checks_off_is_refused(param: str) -> None:
    url = f"rediss://:{PASSWORD}@cache:6379/0?{param}"
    with pytest.raises(TlsError, match="AUDIT_REDIS_URL sets ssl_") as err:
        redis_client(url)
    _assert_secret_free(str(err.value), url)


# --------------------------------------------------------------------------- the worker


@pytest.fixture
def tls_database(tls_postgres: PostgresServer) -> Iterator[str]:
    """A new database on the TLS server: its plain URL (127.0.0.1, no sslmode)."""
    name = f"tls_{uuid.uuid4().hex[:12]}"
    yield create_database(tls_postgres.url, name)
    drop_database(tls_postgres.url, name)


async def test_the_worker_starts_and_is_ready_with_verify_full_to_both(
    tls_database: str, tls_redis: TlsFront, fresh_redis: str, pki: Pki, tmp_path: Path
) -> None:
    await migrate_url(tls_database)
    settings = service_settings(
        _url(tls_database), tls_redis.url(), tmp_path / "keys",
        database_ca_file=pki.ca_file, redis_ca_file=pki.ca_file,
    )
    async with running(settings) as worker:
        assert worker.service.status.phase == "running"
        ready = await worker.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert worker.service.parts is not None
        async with worker.service.parts.pool.acquire() as conn:
            assert await _session_is_encrypted(conn)


@pytest.mark.parametrize(
    ("which", "setting"),
    [("database", "AUDIT_DATABASE_CA_FILE"), ("redis", "AUDIT_REDIS_CA_FILE")],
)
async def test_a_worker_with_the_wrong_ca_stays_unready_and_names_the_setting(
    which: str, setting: str, tls_database: str, tls_redis: TlsFront, fresh_redis: str,
    pki: Pki, tmp_path: Path,
) -> None:
    await migrate_url(tls_database)
    database_url, redis_url = _url(tls_database), tls_redis.url()
    cas = {"database_ca_file": pki.ca_file, "redis_ca_file": pki.ca_file}
    cas[f"{which}_ca_file"] = pki.other_ca_file
    settings = service_settings(database_url, redis_url, tmp_path / "keys", **cas,
                                configuration_recheck_seconds=0.2)
    with capture_logs() as logs:
        async with running(settings, wait=False) as worker:
            await eventually(lambda: setting in (worker.service.status.startup_problem or ""),
                             20, what="a start-up problem naming the setting")
            ready = await worker.get("/readyz")
            assert ready.status_code == 503 and setting in ready.text
            assert worker.service.status.phase == "starting"
    critical = [e for e in logs if e["log_level"] == "critical" and "TLS" in e["event"]]
    assert critical and setting in critical[0]["error"]
    everything = repr(logs) + ready.text
    _assert_secret_free(everything, database_url)
    assert redis_url not in everything


# --------------------------------------------------------------------------- the CLI


def test_migrate_over_verify_full_reads_the_ca_from_database_ca_file(
    tls_database: str, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the chart's migration Job runs: the CA comes from the same variable."""
    from typer.testing import CliRunner

    from audit_worker.cli import app

    url = _url(tls_database)
    monkeypatch.setenv("AUDIT_DATABASE_URL", url)
    runner = CliRunner()
    monkeypatch.setenv("AUDIT_DATABASE_CA_FILE", str(pki.other_ca_file))
    refused = runner.invoke(app, ["migrate"])
    assert refused.exit_code == 1, refused.output
    assert "AUDIT_DATABASE_CA_FILE" in refused.output
    _assert_secret_free(refused.output, url)
    monkeypatch.setenv("AUDIT_DATABASE_CA_FILE", str(pki.ca_file))
    done = runner.invoke(app, ["migrate"])
    assert done.exit_code == 0, done.output
    assert "applied" in done.output

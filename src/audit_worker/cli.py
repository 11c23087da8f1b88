"""`audit-worker`: run the worker, migrate the schema, verify the log, check its health,
compute search keys."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Coroutine
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from audit_worker import logs, tls
from audit_worker.config import WorkerSettings, load_settings
from audit_worker.db import migrate as migrations
from audit_worker.errors import AuditError

if TYPE_CHECKING:
    from audit_worker.deadletters import DeadLetterRow, ReplayReport, Selection

app = typer.Typer(
    help="The tamper-evident audit log worker.", no_args_is_help=True, add_completion=False
)
console = Console(stderr=True)


class Output(StrEnum):
    text = "text"
    json = "json"


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file (env AUDIT_CONFIG_FILE)")
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="text or json")]
DbOpt = Annotated[
    str | None,
    typer.Option("--database-url", envvar="AUDIT_DATABASE_URL", help="PostgreSQL URL"),
]
DbCaOpt = Annotated[
    Path,
    typer.Option(
        "--database-ca-file", envvar="AUDIT_DATABASE_CA_FILE",
        help="CA bundle (PEM) that signed the database's certificate, read when the URL "
        "has sslmode=verify-full or verify-ca (default: the RDS bundle in the image)",
    ),
]


class Auth(StrEnum):
    password = "password"
    iam = "iam"


AuthOpt = Annotated[
    Auth,
    typer.Option("--database-auth", envvar="AUDIT_DATABASE_AUTH",
                 help="password: the URL's; iam: an RDS IAM token per connection"),
]
RegionOpt = Annotated[
    str, typer.Option("--aws-region", envvar="AUDIT_AWS_REGION", help="AWS region (iam)")
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _emit(output: Output, data: dict[str, Any]) -> None:
    if output is Output.json:
        sys.stdout.write(json.dumps(data, default=str) + "\n")


def _settings(config: Path | None) -> WorkerSettings:
    """Settings, or exit 2 with the message (every bad or unknown setting, no traceback)."""
    try:
        return load_settings(config)
    except AuditError as exc:
        raise _fail(str(exc)) from None


def _need_db(url: str | None) -> str:
    if not url:
        raise _fail("no database: pass --database-url or set AUDIT_DATABASE_URL")
    return url


@app.command()
def run(config: ConfigOpt = None, create_keys: bool = typer.Option(
    False, help="create missing local key files (local/dev key backend only)"
)) -> None:
    """Consume the stream and append to the log until SIGTERM, serving health and metrics
    on AUDIT_HTTP_HOST:AUDIT_HTTP_PORT (default 0.0.0.0:8080) and the HTTP intake on its
    own listener, AUDIT_INTAKE_PORT (default 8081).

    The process waits (readiness false) while PostgreSQL or Redis is down or the schema
    is not migrated yet, and exits 1 after an integrity failure stopped the writer."""
    from audit_worker import service
    from audit_worker.crypto import CryptoError

    settings = _settings(config)
    logs.configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(service.run(settings, create_keys=create_keys, serve_http=True))
    except (AuditError, CryptoError) as exc:
        raise _fail(str(exc), 1) from None


class Check(StrEnum):
    livez = "livez"
    readyz = "readyz"
    database = "database"
    redis = "redis"
    external = "external"


_CHECK_PATHS = {
    Check.livez: ("/livez", 5.0),
    Check.readyz: ("/readyz", 3.0),
    Check.database: ("/healthz/database", 10.0),
    Check.redis: ("/healthz/redis", 5.0),
    Check.external: ("/healthz/external", 15.0),
}


@app.command()
def health(
    check: Annotated[Check, typer.Argument(help="which check")] = Check.readyz,
    url: Annotated[
        str | None,
        typer.Option(help="worker base URL (default http://127.0.0.1:$AUDIT_HTTP_PORT)"),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="seconds (default: the check's probe timeout)")
    ] = None,
    output: OutputOpt = Output.json,
) -> None:
    """Ask a running worker for one health check; exit 0 when healthy, 1 when not."""
    import os

    import httpx

    path, default_timeout = _CHECK_PATHS[check]
    base = url or f"http://127.0.0.1:{os.environ.get('AUDIT_HTTP_PORT', '8080')}"
    try:
        reply = httpx.get(base.rstrip("/") + path, timeout=timeout or default_timeout)
    except httpx.HTTPError as exc:
        raise _fail(f"no answer from {base}{path}: {type(exc).__name__}: {exc}", 1) from None
    try:
        body = reply.json()
    except ValueError:
        body = {"status": "fail", "problems": [f"HTTP {reply.status_code}, not JSON"]}
    if output is Output.json:
        _emit(output, body)
    else:
        status = "[green]ok[/green]" if reply.status_code == 200 else "[red]FAIL[/red]"
        console.print(f"{status}  {check.value} ({reply.status_code})")
        for problem in body.get("problems", []):
            console.print(f"  - {problem}")
    if reply.status_code != 200:
        raise typer.Exit(1)


@app.command()
def openapi() -> None:
    """Print the HTTP API's OpenAPI document (as checked in at docs/openapi.json)."""
    from audit_worker.http.app import openapi_text

    sys.stdout.write(openapi_text())


@app.command()
def migrate(
    database_url: DbOpt = None,
    database_ca_file: DbCaOpt = tls.DEFAULT_DATABASE_CA_FILE,
    database_auth: AuthOpt = Auth.password,
    aws_region: RegionOpt = "us-east-1",
    allow_contract: bool = typer.Option(False, help="also apply contract migrations"),
    check: bool = typer.Option(False, help="only report; exit 1 when migrations are pending"),
    output: OutputOpt = Output.text,
) -> None:
    """Apply versioned schema migrations, refusing when an applied one was changed."""
    from audit_worker.db.credentials import connect_password

    url = _need_db(database_url)
    try:
        password = connect_password(url, database_auth.value, region=aws_region)
    except AuditError as exc:
        raise _fail(str(exc)) from None

    async def go() -> tuple[list[int], list[migrations.Migration]]:
        conn = await tls.connect(url, ca_file=database_ca_file, password=password)
        try:
            if check:
                state = await migrations.status(conn)
                return state.applied, state.pending
            applied = await migrations.migrate(conn, allow_contract=allow_contract)
            return [m.version for m in applied], []
        finally:
            await conn.close()

    try:
        done, pending = asyncio.run(go())
    except AuditError as exc:
        raise _fail(str(exc), 1) from None
    if output is Output.json:
        _emit(output, {"applied": done, "pending": [m.version for m in pending]})
    elif check:
        waiting = [m.version for m in pending] or "none"
        console.print(f"applied: {done or 'none'}; pending: {waiting}")
    else:
        console.print(f"applied {len(done)} migration(s): {done or 'schema already current'}")
    if check and pending:
        raise typer.Exit(1)


@app.command()
def bootstrap(
    master_url: Annotated[str | None, typer.Option(
        "--master-url", envvar="AUDIT_BOOTSTRAP_DATABASE_URL",
        help="URL of the instance's database as the master login; with --master-secret-arn "
        "its login and password come from that secret")] = None,
    master_secret_arn: Annotated[str | None, typer.Option(
        "--master-secret-arn", envvar="AUDIT_MASTER_SECRET_ARN",
        help="the RDS-managed master secret (Secrets Manager)")] = None,
    database_ca_file: DbCaOpt = tls.DEFAULT_DATABASE_CA_FILE,
    database_auth: AuthOpt = Auth.iam,
    aws_region: RegionOpt = "us-east-1",
    migrator: str = typer.Option("auditlog_migrator", help="the migration login"),
    worker: str = typer.Option("audit_worker", help="the worker login"),
    archiver: bool = typer.Option(False, envvar="AUDIT_ARCHIVE_DETACH_VERIFIED_MONTHS",
                                  help="grant audit_archiver (months are detached)"),
    output: OutputOpt = Output.text,
) -> None:
    """Create the migration and worker logins and their roles, as the master login.

    Idempotent: the chart's migration Job runs it before every migration. With
    --database-auth iam the logins get rds_iam and no password; with password (the local
    platform) their passwords come from AUDIT_BOOTSTRAP_MIGRATOR_PASSWORD and
    AUDIT_BOOTSTRAP_WORKER_PASSWORD, never from the command line."""
    import os

    from audit_worker.db import bootstrap as boot

    if not master_url:
        raise _fail("no master database: pass --master-url or set AUDIT_BOOTSTRAP_DATABASE_URL")
    try:
        logins = boot.Logins(database=urlsplit(master_url).path.lstrip("/") or "audit",
                             migrator=migrator, worker=worker)
        url = (boot.master_url_from_secret(master_url, master_secret_arn, region=aws_region)
               if master_secret_arn else master_url)
    except AuditError as exc:
        raise _fail(str(exc)) from None
    passwords: dict[str, str] | None = None
    if database_auth is Auth.password:
        names = {migrator: "AUDIT_BOOTSTRAP_MIGRATOR_PASSWORD",
                 worker: "AUDIT_BOOTSTRAP_WORKER_PASSWORD"}
        missing = [var for var in names.values() if not os.environ.get(var)]
        if missing:
            raise _fail(f"--database-auth password needs {' and '.join(missing)}")
        passwords = {login: os.environ[var] for login, var in names.items()}

    async def go() -> list[str]:
        conn = await tls.connect(url, ca_file=database_ca_file)
        try:
            before = await boot.existing_roles(conn, logins)
            await boot.bootstrap(conn, logins, auth=database_auth.value, archiver=archiver,
                                 passwords=passwords)
            return sorted(await boot.existing_roles(conn, logins) - before)
        finally:
            await conn.close()

    try:
        created = asyncio.run(go())
    except AuditError as exc:
        raise _fail(str(exc), 1) from None
    except asyncpg.PostgresError as exc:
        # The server's message names a role or privilege, never a password.
        raise _fail(f"bootstrap refused by PostgreSQL ({exc.sqlstate}): {exc}", 1) from None
    if output is Output.json:
        _emit(output, {"created": created, "auth": database_auth.value,
                       "logins": [migrator, worker]})
    else:
        console.print(f"bootstrap done ({database_auth.value}): created "
                      f"{', '.join(created) or 'nothing (all roles existed)'}")


def _trusted_keys(public_key: list[Path] | None, trusted_keys: Path | None) -> Any:
    """The keys `verify` trusts: one --public-key for all time, or a --trusted-keys file."""
    from audit_worker.crypto import TrustedKeys, TrustedKeysError

    if public_key and trusted_keys is not None:
        raise _fail("give --public-key or --trusted-keys, not both (list every key in the "
                    "--trusted-keys file)")
    if trusted_keys is not None:
        try:
            return TrustedKeys.load(trusted_keys)
        except TrustedKeysError as exc:
            raise _fail(f"--trusted-keys: {exc}") from None
    if not public_key:
        raise _fail("say which key signs the tree heads: --public-key FILE (one key, trusted "
                    "for all time) or --trusted-keys FILE (keys with their validity windows)")
    if len(public_key) > 1:
        raise _fail("--public-key was given more than once: a key rotation needs each key's "
                    "validity window, so list the keys with their windows in a "
                    "--trusted-keys file (format: docs/audit-log.md)")
    try:
        pem = public_key[0].read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read public key {public_key[0]}: {exc.strerror}") from None
    try:
        return TrustedKeys.from_pems([pem])
    except TrustedKeysError as exc:
        raise _fail(f"--public-key {public_key[0]}: {exc}") from None


@app.command()
def verify(
    public_key: Annotated[
        list[Path] | None,
        typer.Option(
            help="PEM public key of the tree-head signer, trusted for all time (one key; "
            "after a rotation use --trusted-keys)"
        ),
    ] = None,
    trusted_keys: Annotated[
        Path | None,
        typer.Option(
            help="YAML file listing the signing keys, each with its validity window "
            "(valid_from, valid_until); a head counts only from a key valid at its time"
        ),
    ] = None,
    database_url: DbOpt = None,
    database_ca_file: DbCaOpt = tls.DEFAULT_DATABASE_CA_FILE,
    log_id: str | None = typer.Option(
        None, help="required: the log id every tree head must name (the workers' AUDIT_LOG_ID)"
    ),
    allow_unsigned_tail: bool = typer.Option(
        False, help="do not fail on rows newer than the last signed tree head (live logs)"
    ),
    workers: int = typer.Option(
        os.cpu_count() or 1, min=1, help="processes for the per-row checks of large logs"
    ),
    archive: str | None = typer.Option(
        None, "--archive", help="also verify the archived months (s3://bucket/prefix or a "
        "directory), chained to each other and to the hot rows"
    ),
    witness: str | None = typer.Option(
        None, "--witness", help="check the database against the newest checkpoint witnessed "
        "outside it (s3://bucket/prefix or a directory: the workers' AUDIT_ARCHIVE_URL)"
    ),
    output: OutputOpt = Output.text,
) -> None:
    """Recompute every leaf, signed root and the dead-letter chain; exit 1 and list what is
    wrong if anything is. The report's limits say what one database cannot show."""
    from audit_worker.verify import verify_log

    if not log_id:
        raise _fail("--log-id is required: the log id every tree head must name (the "
                    "workers' AUDIT_LOG_ID, e.g. --log-id audit-log); without it a head "
                    "signed for another log would count")
    trusted = _trusted_keys(public_key, trusted_keys)
    url = _need_db(database_url)
    witnessed, forged = _read_witness(witness, trusted, log_id) if witness else (None, [])

    async def go() -> Any:
        conn = await tls.connect(url, ca_file=database_ca_file)
        try:
            if archive is not None:
                return await _verify_archive(conn, archive, trusted, log_id, dsn=url,
                                             workers=workers, witness=witnessed,
                                             allow_unsigned_tail=allow_unsigned_tail,
                                             ca_file=database_ca_file)
            return await verify_log(
                conn, trusted, log_id=log_id, allow_unsigned_tail=allow_unsigned_tail,
                dsn=url, workers=workers, witness=witnessed, ca_file=database_ca_file,
            )
        finally:
            await conn.close()

    try:
        report = asyncio.run(go())
    except AuditError as exc:  # TlsError: the message names the setting to fix
        raise _fail(str(exc)) from None
    if witness:
        from audit_worker.verify import note_witness_read

        note_witness_read(report, forged, found=witnessed is not None)
    if output is Output.json:
        _emit(output, report.as_dict())
    else:
        status = "[green]OK[/green]" if report.ok else "[red]TAMPERED[/red]"
        console.print(
            f"{status}  rows {report.rows}, tree heads {report.valid_tree_heads}/"
            f"{report.tree_heads} valid, verified size {report.verified_size}, "
            f"dead letters {report.dead_letters}, "
            f"{report.seconds:.2f}s ({report.rate:,.0f} rows/s)"
        )
        if report.findings:
            table = Table("kind", "where", "finding")
            for f in report.findings:
                table.add_row(f.kind, _where(f), f.message)
            console.print(table)
        if archive is not None:
            rate = report.archived_rows / report.archive_seconds if report.archive_seconds else 0
            console.print(
                f"archive: {report.archived_months} month(s), {report.archived_rows} rows "
                f"verified, {report.archive_seconds:.2f}s ({rate:,.0f} rows/s)"
            )
        for limit in report.limits:
            console.print(f"[yellow]limit:[/yellow] {limit}")
    if not report.ok:
        raise typer.Exit(1)


async def _verify_archive(conn: Any, url: str, trusted: Any, log_id: str, **kwargs: Any) -> Any:
    """`verify --archive`: the months in the archive, then the hot rows from their end."""
    from audit_worker.archive.reader import verify_with_archive
    from audit_worker.objectstore import ObjectStoreError, open_store

    try:
        store = open_store(url)
    except ValueError as exc:
        raise _fail(f"--archive: {exc}") from None
    try:
        return await verify_with_archive(conn, store, trusted, log_id=log_id, **kwargs)
    except ObjectStoreError as exc:
        raise _fail(f"--archive: {exc}") from None


def _read_witness(url: str, trusted: Any, log_id: str) -> tuple[Any, list[tuple[str, str]]]:
    """`verify --witness`: the newest checkpoint there that verifies, and the refused ones."""
    from audit_worker.objectstore import ObjectStoreError, open_store
    from audit_worker.verify import WitnessedCheckpoint
    from audit_worker.witness import WitnessLog

    try:
        log = WitnessLog(open_store(url), log_id, trusted)
        read = log.newest()
    except ValueError as exc:
        raise _fail(f"--witness: {exc}") from None
    except ObjectStoreError as exc:
        raise _fail(f"--witness: {exc}") from None
    found = None
    if read.newest is not None:
        found = WitnessedCheckpoint(read.newest.checkpoint, f"{log.url}{read.newest.key}")
    return found, [(f"{log.url}{key}", why) for key, why in read.refused]


def _where(finding: Any) -> str:
    if finding.kind.startswith("dead_letter_"):
        if finding.index is not None:
            return f"dead-letter chain index {finding.index}"
        return f"dead letter id {finding.dead_letter_id}"
    if finding.index is not None:
        return f"index {finding.index}"
    if finding.tree_size is None:
        return "archive"
    return f"size {finding.tree_size}"


@app.command("search-key")
def search_key(
    kind: Annotated[str, typer.Argument(help="patient, actor or network")],
    value: Annotated[str, typer.Argument(help="the identifier to look up (not logged)")],
    config: ConfigOpt = None,
) -> None:
    """Print the HMAC under which the log stores an identifier, to search by it."""
    from audit_worker import service
    from audit_worker.crypto import Pseudonymiser
    from audit_worker.db.store import LogStore
    from audit_worker.keyring import build_keys

    if kind not in ("patient", "actor", "network"):
        raise _fail(f"kind must be patient, actor or network, not {kind!r}")
    settings = _settings(config)

    async def go() -> str:
        pool = await service.open_pool(settings.database_url.get_secret_value(), size=1,
                                       ca_file=settings.database_ca_file)
        try:
            wrapper, _ = build_keys(settings)
            key = await service.load_hmac_key(LogStore(pool, settings.log_id), wrapper)
            return Pseudonymiser(key).hexdigest(kind, value)  # type: ignore[arg-type]
        finally:
            await pool.close()

    sys.stdout.write(asyncio.run(go()) + "\n")


@app.command("public-key")
def public_key_cmd(config: ConfigOpt = None) -> None:
    """Print the tree-head signer's public key (PEM), for `verify`."""
    from audit_worker.keyring import build_keys

    _, signer = build_keys(_settings(config))
    sys.stdout.write(signer.public_key_pem().decode())


@app.command()
def prove(
    event_id: Annotated[uuid.UUID, typer.Argument(help="event to prove")],
    database_url: DbOpt = None,
    database_ca_file: DbCaOpt = tls.DEFAULT_DATABASE_CA_FILE,
    tree_size: int | None = typer.Option(None, help="tree size (default: latest tree head)"),
    archive: str | None = typer.Option(
        None, "--archive", help="archive (s3://bucket/prefix or a directory) to take the leaves "
        "of months that left the database from; needs --log-id and a key"
    ),
    log_id: str | None = typer.Option(None, help="the log id (with --archive)"),
    public_key: Annotated[
        list[Path] | None, typer.Option(help="signer's PEM public key (with --archive)")
    ] = None,
    trusted_keys: Annotated[
        Path | None, typer.Option(help="trusted-keys YAML file (with --archive)")
    ] = None,
    output: OutputOpt = Output.json,
) -> None:
    """Inclusion proof of an event in a signed tree head. With --archive, also for events
    whose month was exported and left the database (leaves from the verified bundles)."""
    from audit_worker.db.store import LogStore
    from audit_worker.proofs import ProofError, prove_inclusion
    from audit_worker.service import open_pool

    url = _need_db(database_url)
    if archive is not None:
        if not log_id:
            raise _fail("--archive needs --log-id (the workers' AUDIT_LOG_ID)")
        data = asyncio.run(_prove_archived(url, archive, _trusted_keys(public_key, trusted_keys),
                                           log_id, event_id, tree_size, database_ca_file))
        _emit(Output.json, data) if output is Output.json else console.print(data)
        return

    async def go() -> dict[str, Any]:
        pool = await open_pool(url, size=1, ca_file=database_ca_file)
        try:
            store = LogStore(pool, "")
            size = tree_size
            if size is None:
                heads = await store.tree_heads()
                if not heads:
                    raise ProofError("no signed tree head yet")
                size = heads[-1].tree_size
            proof = await prove_inclusion(store, event_id, size)
            return {
                "event_id": str(proof.event_id), "log_index": proof.log_index,
                "tree_size": proof.tree_size, "leaf_hash": proof.leaf_hash.hex(),
                "path": [h.hex() for h in proof.path], "root": proof.root.hex(),
            }
        finally:
            await pool.close()

    try:
        data = asyncio.run(go())
    except (ProofError, AuditError) as exc:
        # After months left the database, their leaves are only in the archive.
        raise _fail(f"{exc} (if months were archived and detached, pass --archive)", 1) from None
    _emit(Output.json, data) if output is Output.json else console.print(data)


async def _prove_archived(
    url: str, archive: str, trusted: Any, log_id: str, event_id: uuid.UUID, size: int | None,
    ca_file: Path = tls.DEFAULT_DATABASE_CA_FILE,
) -> dict[str, Any]:
    from audit_worker.archive import BundleError
    from audit_worker.archive.reader import prove_archived
    from audit_worker.objectstore import ObjectStoreError, open_store

    conn = await tls.connect(url, ca_file=ca_file)
    try:
        if size is None:
            size = await conn.fetchval("SELECT max(tree_size) FROM audit.tree_heads")
            if size is None:
                raise _fail("no signed tree head yet", 1)
        proof = await prove_archived(conn, open_store(archive), trusted, log_id=log_id,
                                     event_id=event_id, tree_size=size)
    except (LookupError, BundleError, ObjectStoreError, ValueError) as exc:
        raise _fail(str(exc), 1) from None
    finally:
        await conn.close()
    return {
        "event_id": str(proof.event_id), "log_index": proof.log_index,
        "tree_size": proof.tree_size, "leaf_hash": proof.leaf_hash.hex(),
        "path": [h.hex() for h in proof.path], "root": proof.root.hex(),
        "archived_month": proof.month,
    }


# --------------------------------------------------------------------------- archive

archive_app = typer.Typer(
    help="The six-year archive: closed months exported to the S3 Object Lock bucket as "
    "self-verifying bundles (format: docs/audit-log.md).",
    no_args_is_help=True,
)
app.add_typer(archive_app, name="archive")


@archive_app.command("export")
def archive_export(
    config: ConfigOpt = None,
    month: str | None = typer.Option(
        None, help="only this month (YYYY-MM); months go in order, so earlier ones first"
    ),
    detach: bool | None = typer.Option(
        None, "--detach/--no-detach",
        help="remove verified months from the hot database (default: "
        "AUDIT_ARCHIVE_DETACH_VERIFIED_MONTHS)",
    ),
    output: OutputOpt = Output.text,
) -> None:
    """Export closed months (ended more than AUDIT_ARCHIVE_GRACE_SECONDS ago) to the
    archive (AUDIT_ARCHIVE_URL or AUDIT_ARCHIVE_BUCKET), read each back and verify it,
    record it in audit.archived_months; what the worker's maintenance loop does hourly.

    Examples:

        # export every month that is due, with progress on stderr
        audit-worker archive export

        # one month, as JSON (exit 1 if it was refused)
        audit-worker archive export --month 2026-10 --output json

    Leaves behind: objects under <log_id>/months/YYYY-MM/ (kept six years under Object
    Lock, never replaced), a row per month in audit.archived_months, and with --detach the
    month's partition dropped (audit.detached_months)."""
    from datetime import date

    from audit_worker.archive import BundleError, ExportRefusedError
    from audit_worker.archive.maintenance import build_exporter
    from audit_worker.keyring import build_keys
    from audit_worker.objectstore import ObjectStoreError
    from audit_worker.service import open_pool

    settings = _settings(config)
    logs.configure(settings.log_level, settings.log_format)  # to stderr: stdout is the report
    only = None
    if month is not None:
        try:
            only = date.fromisoformat(month + "-01")
        except ValueError:
            raise _fail(f"--month must be YYYY-MM, e.g. 2026-10 (got {month!r})") from None

    def progress(m: date, done: int, total: int) -> None:
        console.print(f"{m:%Y-%m}: {done}/{total} rows exported", highlight=False)

    async def go() -> list[Any]:
        pool = await open_pool(settings.database_url.get_secret_value(), size=2,
                               ca_file=settings.database_ca_file)
        try:
            _, signer = build_keys(settings)
            exporter = await build_exporter(settings, pool, signer, detach=detach,
                                            progress=progress)
            if exporter is None:
                raise _fail("no archive: set AUDIT_ARCHIVE_URL (s3://bucket/prefix or a "
                            "directory) or AUDIT_ARCHIVE_BUCKET")
            return await exporter.run(only=only)
        finally:
            await pool.close()

    try:
        results = asyncio.run(go())
    except (BundleError, ExportRefusedError, ObjectStoreError) as exc:
        if output is Output.json:
            _emit(output, {"ok": False, "error": str(exc)})
        raise _fail(str(exc), 1) from None
    if output is Output.json:
        _emit(output, {"ok": True, "months": [r.as_dict() for r in results]})
    else:
        table = Table("month", "status", "indices", "rows", "bytes", "rows/s", "detail")
        for r in results:
            table.add_row(r.month, r.status, f"{r.first_index}..{r.end_index}", str(r.rows),
                          str(r.bytes), f"{r.rate:,.0f}", r.detail or "-")
        console.print(table if results else "nothing to export: no closed month is due")


# --------------------------------------------------------------------------- dead letters

dead_letters_app = typer.Typer(
    help="Review dead letters (entries the worker refused) and replay the ones now valid. "
    "Only `show --decrypt --i-understand-this-shows-phi` prints a payload.",
    no_args_is_help=True,
)
app.add_typer(dead_letters_app, name="dead-letters")

RuleOpt = Annotated[
    list[str] | None, typer.Option("--rule", help="only this rule; repeat for several")
]
SinceOpt = Annotated[
    str | None,
    typer.Option("--since", help="received at or after this ISO 8601 time (no offset: UTC)"),
]
UntilOpt = Annotated[
    str | None,
    typer.Option("--until", help="received before this ISO 8601 time (no offset: UTC)"),
]
PHI_WARNING = (
    "[yellow]warning:[/yellow] the decrypted payload below may hold PHI: keep it out of "
    "tickets, chats, logs and shell history"
)


def _selection(
    ids: list[int] | None, rules: list[str] | None, since: str | None, until: str | None,
    limit: int | None = None,
) -> Selection:
    from audit_worker.deadletters import DeadLetterError, Selection, parse_time

    try:
        return Selection(
            ids=tuple(ids or ()), rules=tuple(rules or ()),
            since=parse_time(since, "--since") if since is not None else None,
            until=parse_time(until, "--until") if until is not None else None,
            limit=limit,
        )
    except DeadLetterError as exc:
        raise _fail(str(exc)) from None


T = TypeVar("T")


def _run_dead_letters(work: Coroutine[Any, Any, T], *, stopped: str = "") -> T:
    """Run a coroutine; expected failures become an error line and an exit code. Driver
    messages go through `describe_error`, which drops anything that could be row data."""
    from redis.exceptions import RedisError

    from audit_worker.crypto import CryptoError
    from audit_worker.deadletters import UnknownDeadLetters
    from audit_worker.resilience import describe_error

    try:
        return asyncio.run(work)
    except UnknownDeadLetters as exc:
        raise _fail(str(exc), 2) from None
    except (AuditError, CryptoError) as exc:  # DeadLetterError included: exit 1
        raise _fail(str(exc), 1) from None
    except (asyncpg.PostgresError, RedisError, OSError) as exc:
        raise _fail(f"{stopped}{describe_error(exc)}", 1) from None


def _worker_settings(config: Path | None, database_url: str | None) -> WorkerSettings:
    # --database-url (or AUDIT_DATABASE_URL) wins over the settings file's database_url.
    overrides = {"database_url": database_url} if database_url else {}
    try:
        return load_settings(config, **overrides)
    except AuditError as exc:
        raise _fail(str(exc)) from None


@dead_letters_app.command("list")
def dead_letters_list(
    rule: RuleOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: int | None = typer.Option(None, min=1, help="at most this many, newest first"),
    database_url: DbOpt = None,
    database_ca_file: DbCaOpt = tls.DEFAULT_DATABASE_CA_FILE,
    output: OutputOpt = Output.text,
) -> None:
    """List dead letters, newest first: reason, deliveries and whether they were replayed.
    Never decrypts anything."""
    from audit_worker.deadletters import list_dead_letters

    selection = _selection(None, rule, since, until, limit)
    url = _need_db(database_url)

    async def go() -> list[DeadLetterRow]:
        conn = await tls.connect(url, ca_file=database_ca_file)
        try:
            return await list_dead_letters(conn, selection)
        finally:
            await conn.close()

    rows = _run_dead_letters(go())
    if output is Output.json:
        sys.stdout.write(json.dumps([r.as_dict() for r in rows]) + "\n")
        return
    table = Table("id", "received_at", "stream entry", "field", "rule", "value class",
                  "deliveries", "replayed")
    for r in rows:
        replayed = f"{r.last_replay} ({r.replays}x)" if r.replayed else "no"
        table.add_row(str(r.id), r.received_at.isoformat(), r.stream_entry_id or "-", r.field,
                      r.rule, r.value_class, str(r.delivery_count), replayed)
    console.print(table)
    console.print(f"{len(rows)} dead letter(s)")


@dead_letters_app.command("show")
def dead_letters_show(
    dead_letter_id: Annotated[int, typer.Argument(metavar="ID", help="dead letter id")],
    decrypt: bool = typer.Option(
        False, "--decrypt", help="also unseal and print the payload (needs the PHI flag)"
    ),
    phi_ok: bool = typer.Option(
        False, "--i-understand-this-shows-phi",
        help="confirm that the decrypted payload may hold PHI (required with --decrypt)",
    ),
    config: ConfigOpt = None,
    database_url: DbOpt = None,
    database_ca_file: DbCaOpt = tls.DEFAULT_DATABASE_CA_FILE,
    output: OutputOpt = Output.text,
) -> None:
    """Show one dead letter. With --decrypt --i-understand-this-shows-phi, unwrap its data
    key with the configured key backend and print the payload on stdout."""
    from audit_worker.deadletters import (
        DeadLetterError,
        PayloadOpener,
        Selection,
        fetch_sealed,
        list_dead_letters,
    )

    if decrypt and not phi_ok:
        raise _fail("--decrypt prints a payload that may hold PHI: add "
                    "--i-understand-this-shows-phi to confirm")
    if phi_ok and not decrypt:
        raise _fail("--i-understand-this-shows-phi goes with --decrypt: add --decrypt to "
                    "print the payload")
    from audit_worker.keyring import build_keys

    settings = _worker_settings(config, database_url) if decrypt else None
    url = settings.database_url.get_secret_value() if settings else _need_db(database_url)

    async def go() -> tuple[DeadLetterRow, bytes | None]:
        conn = await tls.connect(url, ca_file=database_ca_file)
        try:
            (row,) = await list_dead_letters(conn, Selection(ids=(dead_letter_id,)))
            if settings is None:
                return row, None
            (sealed,) = await fetch_sealed(conn, [dead_letter_id])
            if sealed.ciphertext is None:
                raise DeadLetterError(
                    f"dead letter {row.id} has no stored payload (rule {row.rule}): "
                    "nothing to decrypt"
                )
            # Key files or KMS are touched only now, for a dead letter that exists.
            wrapper, _ = await asyncio.to_thread(build_keys, settings)
            return row, await asyncio.to_thread(PayloadOpener(wrapper).open, sealed)
        finally:
            await conn.close()

    row, payload = _run_dead_letters(go())
    text: str | None = None
    encoding = "utf-8"
    if payload is not None:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            import base64

            text, encoding = base64.b64encode(payload).decode(), "base64"
    if output is Output.json:
        data = row.as_dict()
        if text is not None:
            console.print(PHI_WARNING)
            data |= {"payload": text, "payload_encoding": encoding}
        _emit(output, data)
        return
    table = Table("field", "value", show_header=False)
    for name, value in row.as_dict().items():
        table.add_row(name, "-" if value is None else str(value))
    console.print(table)
    if text is None:
        if row.has_payload:
            console.print("payload: sealed (--decrypt --i-understand-this-shows-phi shows it)")
        return
    console.print(PHI_WARNING)
    if encoding == "base64":
        console.print("the payload is not UTF-8 text: printed as base64")
    sys.stdout.write(text + "\n")


@dead_letters_app.command("replay")
def dead_letters_replay(
    dead_letter_ids: Annotated[
        list[int] | None, typer.Argument(metavar="ID", help="dead letter ids (any number)")
    ] = None,
    rule: RuleOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="only re-validate: add nothing to the stream, record nothing"
    ),
    config: ConfigOpt = None,
    database_url: DbOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Re-validate the selected dead letters and XADD the now-valid ones to the stream, as
    a producer would; the worker stores each event once (it skips known event ids).

    Each verdict is recorded in audit.dead_letter_replays (resubmitted or rejected).
    Exit 1 when a payload would not decrypt."""
    from audit_worker.deadletters import PayloadOpener, replay
    from audit_worker.keyring import build_keys
    from audit_worker.service import redis_client

    selection = _selection(dead_letter_ids, rule, since, until)
    if selection.is_empty:
        raise _fail("say which dead letters to replay: ids, --rule, --since or --until")
    settings = _worker_settings(config, database_url)

    async def go() -> ReplayReport:
        wrapper, _ = await asyncio.to_thread(build_keys, settings)
        conn = await tls.connect(settings.database_url.get_secret_value(),
                                 ca_file=settings.database_ca_file)
        redis = redis_client(settings.redis_url.get_secret_value(),
                             ca_file=settings.redis_ca_file)
        try:
            return await replay(
                conn, redis, selection, PayloadOpener(wrapper), stream=settings.stream,
                max_future_skew=settings.max_future_skew_seconds, dry_run=dry_run,
            )
        finally:
            await redis.aclose()
            await conn.close()

    report = _run_dead_letters(
        go(), stopped="replay stopped (what was done is in audit.dead_letter_replays): "
    )
    if output is Output.json:
        _emit(output, report.as_dict())
    else:
        table = Table("dead letter", "outcome", "rule", "new stream entry", "error")
        for r in report.results:
            table.add_row(str(r.dead_letter_id), r.outcome.value, r.rule or "-",
                          r.stream_entry_id or "-", r.error or "-")
        console.print(table)
        counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.counts().items()
                           if v or k in ("resubmitted", "rejected"))
        note = " (dry run: nothing added to the stream or recorded)" if dry_run else ""
        console.print(f"{len(report.results)} dead letter(s): {counts}{note}")
    if not report.ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

"""`audit-worker`: run the worker, migrate the schema, verify the log, check its health,
compute search keys."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from audit_worker import logs
from audit_worker.config import load_settings
from audit_worker.db import migrate as migrations
from audit_worker.errors import AuditError

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


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _emit(output: Output, data: dict[str, Any]) -> None:
    if output is Output.json:
        sys.stdout.write(json.dumps(data, default=str) + "\n")


def _need_db(url: str | None) -> str:
    if not url:
        raise _fail("no database: pass --database-url or set AUDIT_DATABASE_URL")
    return url


@app.command()
def run(config: ConfigOpt = None, create_keys: bool = typer.Option(
    False, help="create missing local key files (local/dev key backend only)"
)) -> None:
    """Consume the stream and append to the log until SIGTERM, serving health, metrics
    and the HTTP intake on AUDIT_HTTP_HOST:AUDIT_HTTP_PORT (default 0.0.0.0:8080).

    The process waits (readiness false) while PostgreSQL or Redis is down or the schema
    is not migrated yet, and exits 1 after an integrity failure stopped the writer."""
    from audit_worker import service
    from audit_worker.crypto import CryptoError

    try:
        settings = load_settings(config)
    except AuditError as exc:
        raise _fail(str(exc)) from None
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
    allow_contract: bool = typer.Option(False, help="also apply contract migrations"),
    check: bool = typer.Option(False, help="only report; exit 1 when migrations are pending"),
    output: OutputOpt = Output.text,
) -> None:
    """Apply versioned schema migrations, refusing when an applied one was changed."""
    url = _need_db(database_url)

    async def go() -> tuple[list[int], list[migrations.Migration]]:
        conn = await asyncpg.connect(url)
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
def verify(
    public_key: Annotated[
        list[Path],
        typer.Option(
            help="PEM public key of the tree-head signer; repeat it for each key the log was "
            "signed with across a key rotation"
        ),
    ],
    database_url: DbOpt = None,
    log_id: str | None = typer.Option(None, help="expected log id in every tree head"),
    allow_unsigned_tail: bool = typer.Option(
        False, help="do not fail on rows newer than the last signed tree head (live logs)"
    ),
    workers: int = typer.Option(
        os.cpu_count() or 1, min=1, help="processes for the per-row checks of large logs"
    ),
    output: OutputOpt = Output.text,
) -> None:
    """Recompute every leaf and signed root; exit 1 and list what is wrong if anything is."""
    from audit_worker.verify import verify_log

    url = _need_db(database_url)
    pems = []
    for path in public_key:
        try:
            pems.append(path.read_bytes())
        except OSError as exc:
            raise _fail(f"cannot read public key {path}: {exc.strerror}") from None

    async def go() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await verify_log(
                conn, pems, log_id=log_id, allow_unsigned_tail=allow_unsigned_tail,
                dsn=url, workers=workers,
            )
        finally:
            await conn.close()

    report = asyncio.run(go())
    if output is Output.json:
        _emit(output, report.as_dict())
    else:
        status = "[green]OK[/green]" if report.ok else "[red]TAMPERED[/red]"
        console.print(
            f"{status}  rows {report.rows}, tree heads {report.valid_tree_heads}/"
            f"{report.tree_heads} valid, verified size {report.verified_size}, "
            f"{report.seconds:.2f}s ({report.rate:,.0f} rows/s)"
        )
        if report.findings:
            table = Table("kind", "where", "finding")
            for f in report.findings:
                where = f"index {f.index}" if f.index is not None else f"size {f.tree_size}"
                table.add_row(f.kind, where, f.message)
            console.print(table)
    if not report.ok:
        raise typer.Exit(1)


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
    settings = load_settings(config)

    async def go() -> str:
        pool = await service.open_pool(settings.database_url.get_secret_value(), size=1)
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

    _, signer = build_keys(load_settings(config))
    sys.stdout.write(signer.public_key_pem().decode())


@app.command()
def prove(
    event_id: Annotated[uuid.UUID, typer.Argument(help="event to prove")],
    database_url: DbOpt = None,
    tree_size: int | None = typer.Option(None, help="tree size (default: latest tree head)"),
    output: OutputOpt = Output.json,
) -> None:
    """Inclusion proof of an event in a signed tree head."""
    from audit_worker.db.store import LogStore
    from audit_worker.proofs import ProofError, prove_inclusion
    from audit_worker.service import open_pool

    url = _need_db(database_url)

    async def go() -> dict[str, Any]:
        pool = await open_pool(url, size=1)
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
    except ProofError as exc:
        raise _fail(str(exc), 1) from None
    _emit(Output.json, data) if output is Output.json else console.print(data)


if __name__ == "__main__":
    app()

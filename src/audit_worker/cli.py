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

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from audit_worker import logs
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
    settings = _settings(config)

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

    _, signer = build_keys(_settings(config))
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
    output: OutputOpt = Output.text,
) -> None:
    """List dead letters, newest first: reason, deliveries and whether they were replayed.
    Never decrypts anything."""
    from audit_worker.deadletters import list_dead_letters

    selection = _selection(None, rule, since, until, limit)
    url = _need_db(database_url)

    async def go() -> list[DeadLetterRow]:
        conn = await asyncpg.connect(url)
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
        conn = await asyncpg.connect(url)
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
        conn = await asyncpg.connect(settings.database_url.get_secret_value())
        redis = redis_client(settings.redis_url.get_secret_value())
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

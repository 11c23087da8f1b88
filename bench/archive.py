"""The six-year archive: how fast a closed month is exported and verified.

One PostgreSQL (this machine), one closed month of BENCH_ARCHIVE_ROWS realistic rows (the
worker's own leaves: HMACs, AES-GCM sealed details), covered by a signed head. Each of
BENCH_ARCHIVE_RUNS runs works on a fresh copy of that database (CREATE DATABASE ...
TEMPLATE) and a fresh directory archive:
  export   `ArchiveExporter.run()`: read the partition, check and hash every row, gzip,
           write the parts, sign the checkpoint, read everything back and verify it, record
           it in audit.archived_months (what the maintenance loop does)
  verify   `check_archive`: the archive alone, every bundle verified and chained (what
           `verify --archive` adds to a database verification)
Prints a table and writes bench/results/archive.json. Run: .venv/bin/python bench/archive.py
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from audit_worker.archive import ArchiveExporter
from audit_worker.archive.reader import check_archive
from audit_worker.crypto import (
    DataKeyManager,
    FieldCipher,
    LocalKeyWrapper,
    LocalSigner,
    Pseudonymiser,
    TreeHead,
    TrustedKeys,
)
from audit_worker.db.migrate import migrate
from audit_worker.db.store import EVENT_COLUMNS
from audit_worker.events import AuditEvent, parse_event
from audit_worker.localenv.servers import PostgresServer, create_database
from audit_worker.localenv.workload import synthetic_event
from audit_worker.merkle import CompactRange
from audit_worker.objectstore import DirectoryStore
from audit_worker.records import RecordBuilder, sequence

console = Console()
RESULTS = Path(__file__).parent / "results"
ROWS = int(os.environ.get("BENCH_ARCHIVE_ROWS", "200000"))
RUNS = int(os.environ.get("BENCH_ARCHIVE_RUNS", "3"))
LOG_ID = "audit-log"


def closed_month() -> date:
    today = datetime.now(UTC).date().replace(day=1)
    last = date(today.year - (today.month == 1), (today.month - 2) % 12 + 1, 1)
    return date(last.year - (last.month == 1), (last.month - 2) % 12 + 1, 1)


async def build_base(url: str, key_dir: Path, signer: LocalSigner) -> None:
    """The template database: migrated, one closed month of ROWS rows, a signed head."""
    month = closed_month()
    following = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await conn.execute(
            f"CREATE TABLE audit.events_{month:%Y_%m} PARTITION OF audit.events FOR VALUES"
            f" FROM ('{month.isoformat()} 00:00+00') TO ('{following.isoformat()} 00:00+00')"
        )
        await conn.execute("INSERT INTO audit.log_identity (log_id) VALUES ($1)", LOG_ID)
        builder = RecordBuilder(Pseudonymiser(b"k" * 32), FieldCipher())
        key = DataKeyManager(LocalKeyWrapper(key_dir / "bench.key", create=True)).current()
        recorded = datetime(month.year, month.month, 2, tzinfo=UTC)
        frontier = CompactRange()
        batch: list[tuple[Any, ...]] = []
        for i in range(ROWS):
            parsed = parse_event(json.dumps(synthetic_event(i)).encode())
            assert isinstance(parsed, AuditEvent)
            s = sequence(builder.prepare(parsed, key), i, recorded)
            p = s.prepared
            frontier.append(s.leaf_hash)
            batch.append((s.log_index, p.event_id, s.recorded, p.occurred, p.action, p.outcome,
                          p.patient_hmac, p.actor_hmac, p.data_key_id, s.leaf_data, s.leaf_hash))
            if len(batch) == 10_000:
                await conn.copy_records_to_table("events", schema_name="audit",
                                                 columns=EVENT_COLUMNS, records=batch)
                batch = []
        if batch:
            await conn.copy_records_to_table("events", schema_name="audit",
                                             columns=EVENT_COLUMNS, records=batch)
        head = TreeHead(LOG_ID, ROWS, frontier.root(), int(time.time() * 1000))
        await conn.execute(
            "INSERT INTO audit.tree_heads (tree_size, root_hash, timestamp_ms, log_id, signature,"
            " signer_ref, frontier) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            ROWS, head.root_hash, head.timestamp_ms, LOG_ID, signer.sign(head.signing_input()),
            signer.ref, b"".join(frontier.hashes),
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def one_run(url: str, archive: Path, signer: LocalSigner) -> dict[str, float]:
    keys = TrustedKeys.from_pems([signer.public_key_pem()])
    store = DirectoryStore(archive)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    try:
        exporter = ArchiveExporter(pool, store, log_id=LOG_ID, signer=signer,
                                   own_key=keys.keys[0], trusted=keys, grace_seconds=0,
                                   detach=False)
        started = time.perf_counter()
        results = await exporter.run()
        export_s = time.perf_counter() - started
    finally:
        await pool.close()
    if [r.status for r in results] != ["exported"] or results[0].rows != ROWS:
        raise RuntimeError(f"unexpected export result: {results}")
    started = time.perf_counter()
    check = await asyncio.to_thread(check_archive, store, keys, LOG_ID)
    verify_s = time.perf_counter() - started
    if check.findings or check.rows != ROWS:
        raise RuntimeError(f"archive did not verify: {check.findings}")
    return {"export_rows_per_s": ROWS / export_s, "verify_rows_per_s": ROWS / verify_s,
            "bytes": float(results[0].bytes)}


async def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        signer = LocalSigner(work / "signing.pem", create=True)
        with PostgresServer(fast=False) as server:
            base = create_database(server.url, "archive_base")
            started = time.perf_counter()
            await build_base(base, work, signer)
            console.print(f"{ROWS} rows built in {time.perf_counter() - started:.1f}s")
            runs = []
            for n in range(RUNS):
                url = create_database(server.url, f"archive_run_{n}")
                conn = await asyncpg.connect(url)
                await conn.close()
                admin = await asyncpg.connect(server.url)
                try:
                    await admin.execute(f"DROP DATABASE archive_run_{n}")
                    await admin.execute(
                        f"CREATE DATABASE archive_run_{n} TEMPLATE archive_base")
                finally:
                    await admin.close()
                runs.append(await one_run(url, work / f"archive-{n}", signer))
                console.print(f"run {n + 1}: {runs[-1]}")
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "rows": ROWS,
        "runs": runs,
        "export_rows_per_s_median": statistics.median(r["export_rows_per_s"] for r in runs),
        "verify_rows_per_s_median": statistics.median(r["verify_rows_per_s"] for r in runs),
        "archive_bytes": runs[0]["bytes"],
        "bytes_per_row": runs[0]["bytes"] / ROWS,
    }
    table = Table("figure", *[f"run {i + 1}" for i in range(len(runs))], "median")
    for name in ("export_rows_per_s", "verify_rows_per_s"):
        table.add_row(name, *[f"{r[name]:,.0f}" for r in runs],
                      f"{result[name + '_median']:,.0f}")
    console.print(table)
    size = runs[0]["bytes"]
    console.print(f"archive: {size / 1e6:.1f} MB for {ROWS} rows "
                  f"({size / ROWS:.0f} bytes/row, gzip)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "archive.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    asyncio.run(main())

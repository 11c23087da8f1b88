"""The six-year archive, for real: closed monthly partitions exported to moto's S3 (Object
Lock COMPLIANCE, conditional PUTs) or a directory, read back and verified, recorded,
detached; `verify --archive` chaining the months to the live log; proofs for events that
left the database; and what the exporter and the database refuse.

Rows of past months are made by the real pipeline with the sequencer's clock frozen in
that month (`recorded` is set under the sequencer's lock); their partitions are created
by the test as the superuser, as a deployment that has run for months would have them.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import boto3
import pytest
import redis.asyncio as aioredis

from audit_worker.archive import ArchiveExporter, BundleError, ExportRefusedError
from audit_worker.archive.bundle import month_prefix, verify_bundle
from audit_worker.archive.reader import prove_archived, verify_with_archive
from audit_worker.config import WorkerSettings
from audit_worker.crypto import TrustedKeys
from audit_worker.db import store as store_module
from audit_worker.merkle import CompactRange, hash_leaf, verify_inclusion
from audit_worker.objectstore import DirectoryStore, ObjectStore, S3Store
from audit_worker.service import Assembly
from audit_worker.verify import verify_log
from tests.support import drain, encode, locked_bucket, make_event, running_parts

SIZES = (150, 100, 1100)  # rows two months ago, last month, this month


def _months() -> tuple[date, date, date]:
    today = datetime.now(UTC).date().replace(day=1)
    last = date(today.year - (today.month == 1), (today.month - 2) % 12 + 1, 1)
    before = date(last.year - (last.month == 1), (last.month - 2) % 12 + 1, 1)
    return before, last, today


def _partition(month: date) -> str:
    return f"events_{month.year:04d}_{month.month:02d}"


@dataclass
class Log:
    parts: Assembly
    months: tuple[date, date, date]
    keys: TrustedKeys

    @property
    def log_id(self) -> str:
        return self.parts.worker.store.log_id

    def exporter(self, store: ObjectStore, *, detach: bool = False) -> ArchiveExporter:
        return ArchiveExporter(
            self.parts.pool, store, log_id=self.log_id, signer=self.parts.worker.signer,
            own_key=self.keys.keys[0], trusted=self.keys, grace_seconds=0, detach=detach,
        )

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.parts.pool.acquire() as conn:
            return await conn.fetchval(sql, *args)


async def _produce(parts: Assembly, producer: aioredis.Redis, count: int, offset: int) -> None:
    async with producer.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.xadd(parts.worker.intake.stream, {"event": encode(make_event(offset + i))})
        await pipe.execute()
    await drain(parts, batch=500, idle_rounds=1)
    await parts.worker.sign_tree_head()


@pytest.fixture
async def log(
    parts: Assembly, producer: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Log]:
    months = _months()
    async with parts.pool.acquire() as conn:
        for month in months[:2]:
            following = months[months.index(month) + 1]
            await conn.execute(
                f"CREATE TABLE audit.{_partition(month)} PARTITION OF audit.events FOR VALUES"
                f" FROM ('{month.isoformat()} 00:00+00') TO ('{following.isoformat()} 00:00+00')"
            )
    offset = 0
    for month, count in zip(months, SIZES, strict=True):
        frozen = datetime(month.year, month.month, 1, 12, tzinfo=UTC)
        if month == months[2]:
            monkeypatch.undo()
        else:
            monkeypatch.setattr(store_module, "now_ms", lambda frozen=frozen: frozen)
        await _produce(parts, producer, count, offset)
        offset += count
    keys = TrustedKeys.from_pems([parts.worker.signer.public_key_pem()])
    yield Log(parts, months, keys)


@pytest.fixture
def s3_store(aws_kwargs: dict[str, str]) -> tuple[S3Store, Any]:
    client = boto3.client("s3", **aws_kwargs)
    return S3Store(locked_bucket(client), "", client), client


async def test_closed_months_are_exported_verified_and_recorded_not_the_current_one(
    log: Log, s3_store: tuple[S3Store, Any]
) -> None:
    store, client = s3_store
    results = await log.exporter(store).run()
    before, last, _ = log.months
    assert [(r.month, r.status, r.first_index, r.end_index) for r in results] == [
        (f"{before:%Y-%m}", "exported", 0, 150),
        (f"{last:%Y-%m}", "exported", 150, 250),
    ]
    async with log.parts.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM audit.archived_months ORDER BY month")
    assert [(r["month"], r["rows"]) for r in rows] == [(before, 150), (last, 100)]
    assert all(r["verified_at"] is not None for r in rows)
    # The objects are under Object Lock: COMPLIANCE retention, six years.
    key = rows[1]["manifest_key"]
    head = client.head_object(Bucket=store.bucket, Key=key)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert head["ObjectLockRetainUntilDate"].year >= datetime.now(UTC).year + 5
    # The archived copy verifies on its own and chains to the month before.
    prefix = month_prefix(log.log_id, last)
    manifest = store.get(prefix + "manifest.json")
    assert manifest is not None
    bundle = verify_bundle(
        manifest, lambda k: store.get(prefix + k), log.keys, log_id=log.log_id, month=last,
        expected_start=CompactRange.from_state(150, json_range(store, log.log_id, before)),
    )
    assert (bundle.first_index, bundle.end_index) == (150, 250)
    # The partitions stay (detach is off), and a second run has nothing to do.
    assert await log.fetchval(f"SELECT count(*) FROM audit.{_partition(last)}") == 100
    assert await log.exporter(store).run() == []


def json_range(store: ObjectStore, log_id: str, month: date) -> list[bytes]:
    manifest = store.get(month_prefix(log_id, month) + "manifest.json")
    assert manifest is not None
    return [bytes.fromhex(h) for h in json.loads(manifest)["end_range"]["hashes"]]


class TamperingStore(DirectoryStore):
    """A store that changes what it is given on the way in (an archive that lies)."""

    def __init__(self, root: Path, tamper: Callable[[str, bytes], bytes]) -> None:
        super().__init__(root)
        self.tamper = tamper

    def put(self, key: str, data: bytes, *, replace: bool = False) -> None:
        super().put(key, self.tamper(key, data), replace=replace)


def _changed_row(key: str, data: bytes) -> bytes:
    if not key.endswith(".jsonl.gz"):
        return data
    return gzip.compress(gzip.decompress(data).replace(b'"outcome":0', b'"outcome":4', 1))


def _wrong_start(key: str, data: bytes) -> bytes:
    if not key.endswith("manifest.json"):
        return data
    document = json.loads(data)
    if document["start_range"]["hashes"]:
        document["start_range"]["hashes"][0] = "00" * 32
    document["start_range"] = {"size": 0, "hashes": []}
    document["first_index"] = 0
    document["rows"] = document["end_index"]
    return json.dumps(document).encode()


def _bad_signature(key: str, data: bytes) -> bytes:
    if not key.endswith("/checkpoint"):
        return data
    text, _, blob = data.rstrip(b"\n").rpartition(b" ")
    raw = bytearray(base64.b64decode(blob))
    raw[-1] ^= 1
    return text + b" " + base64.b64encode(bytes(raw)) + b"\n"


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_changed_row, "does not have its SHA-256"),
        (_wrong_start, "start range|manifest"),
        (_bad_signature, "checkpoint"),
    ],
    ids=["changed-row", "wrong-start-range", "bad-checkpoint-signature"],
)
async def test_tampered_upload_fails_export_verification_and_the_partition_stays(
    log: Log, tmp_path: Path, tamper: Callable[[str, bytes], bytes], message: str
) -> None:
    before, last, _ = log.months
    if tamper is _wrong_start:  # the second month's start range is the one that can lie
        lying = TamperingStore(tmp_path / "lying", tamper)
        await ArchiveExporter(
            log.parts.pool, lying, log_id=log.log_id, signer=log.parts.worker.signer,
            own_key=log.keys.keys[0], trusted=log.keys, grace_seconds=0, detach=True,
        ).run(only=before)
        with pytest.raises(BundleError, match=message):
            await log.exporter(lying, detach=True).run()
        stays = last
    else:
        with pytest.raises(BundleError, match=message):
            await log.exporter(TamperingStore(tmp_path / "lying", tamper), detach=True).run()
        stays = before
    months = {r for r in await _archived(log)}
    assert stays not in months
    assert await log.fetchval(f"SELECT to_regclass('audit.{_partition(stays)}')") is not None
    assert await log.fetchval(
        "SELECT count(*) FROM audit.detached_months WHERE month = $1", stays) == 0


async def _archived(log: Log) -> list[date]:
    async with log.parts.pool.acquire() as conn:
        return [r["month"] for r in await conn.fetch("SELECT month FROM audit.archived_months")]


async def test_verified_months_are_detached_and_the_hot_part_still_verifies(
    log: Log, tmp_path: Path, settings: WorkerSettings
) -> None:
    store = DirectoryStore(tmp_path / "archive")
    results = await log.exporter(store, detach=True).run()
    before, last, _ = log.months
    assert [r.status for r in results] == ["exported", "exported", "detached", "detached"]
    for month in (before, last):
        assert await log.fetchval(f"SELECT to_regclass('audit.{_partition(month)}')") is None
    assert await log.fetchval("SELECT min(log_index) FROM audit.events") == 250
    async with log.parts.pool.acquire() as conn:
        hot = await verify_log(conn, log.keys, log_id=log.log_id)
        full = await verify_with_archive(conn, store, log.keys, log_id=log.log_id)
    assert hot.ok, hot.findings
    assert hot.rows == SIZES[2]
    assert any("indices 0..249" in limit and "not checked" in limit for limit in hot.limits)
    assert full.ok, full.findings
    assert (full.archived_rows, full.archived_months, full.rows) == (250, 2, SIZES[2])
    assert not any("archived rows" in limit for limit in full.limits)
    # A worker restarting after the detach resumes from its newest head.
    async with running_parts(settings) as again:
        assert again.worker.frontier.size == sum(SIZES)


async def test_detach_waits_until_the_newest_head_is_past_the_month(
    parts: Assembly, producer: aioredis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, _, _ = _months()
    async with parts.pool.acquire() as conn:
        await conn.execute(
            f"CREATE TABLE audit.{_partition(before)} PARTITION OF audit.events FOR VALUES"
            f" FROM ('{before.isoformat()} 00:00+00') TO ('{before.isoformat()} 00:00+00'::"
            "timestamptz + interval '1 month')"
        )
    frozen = datetime(before.year, before.month, 2, tzinfo=UTC)
    monkeypatch.setattr(store_module, "now_ms", lambda: frozen)
    await _produce(parts, producer, 20, 0)
    monkeypatch.undo()
    await _produce(parts, producer, 10, 20)
    keys = TrustedKeys.from_pems([parts.worker.signer.public_key_pem()])
    log = Log(parts, _months(), keys)
    results = await log.exporter(DirectoryStore(tmp_path / "a"), detach=True).run()
    assert [r.status for r in results] == ["exported", "waiting"]
    assert "1024 rows past" in results[1].detail
    assert await log.fetchval(f"SELECT count(*) FROM audit.{_partition(before)}") == 20


async def test_verify_archive_catches_a_month_whose_rows_were_rewritten(
    log: Log, s3_store: tuple[S3Store, Any]
) -> None:
    store, client = s3_store
    await log.exporter(store, detach=True).run()
    before = log.months[0]
    prefix = month_prefix(log.log_id, before)
    # A second version of the part, with one row changed and the manifest made to match:
    # S3 keeps the first under Object Lock, but a reader gets the newest.
    key = prefix + "entries/000000.jsonl.gz"
    forged = gzip.compress(gzip.decompress(store.get(key) or b"").replace(
        b'"outcome":0', b'"outcome":4', 1), mtime=0)
    store.put(key, forged, replace=True)
    manifest = json.loads(store.get(prefix + "manifest.json") or b"")
    manifest["parts"][0].update(sha256=hashlib.sha256(forged).hexdigest(), bytes=len(forged))
    store.put(prefix + "manifest.json", json.dumps(manifest).encode(), replace=True)
    assert len(client.list_object_versions(Bucket=store.bucket, Prefix=key)["Versions"]) == 2
    async with log.parts.pool.acquire() as conn:
        report = await verify_with_archive(conn, store, log.keys, log_id=log.log_id)
    kinds = [(f.kind, f.message) for f in report.findings]
    # The database's head at the month's end no longer matches: the rows were changed.
    assert any(k == "archive_mismatch" and f"month {before:%Y-%m}" in m
               and ("does not match the archived rows" in m or "do not hash" in m)
               for k, m in kinds), kinds
    assert not report.ok


async def test_verify_archive_catches_a_missing_month(log: Log, tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "archive")
    await log.exporter(store, detach=True).run()
    before = log.months[0]
    shutil.rmtree(tmp_path / "archive" / month_prefix(log.log_id, before))
    async with log.parts.pool.acquire() as conn:
        report = await verify_with_archive(conn, store, log.keys, log_id=log.log_id)
    missing = [f for f in report.findings if f.kind == "missing_month"]
    assert any(f"month {before:%Y-%m} is recorded" in f.message for f in missing), missing
    assert any("starts at index 150" in f.message for f in missing), missing


async def test_an_archived_event_is_proven_from_the_bundles(log: Log, tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "archive")
    await log.exporter(store, detach=True).run()
    event_id = await log.fetchval("SELECT event_id FROM audit.event_keys WHERE log_index = 42")
    async with log.parts.pool.acquire() as conn:
        head = await conn.fetchrow(
            "SELECT tree_size, root_hash FROM audit.tree_heads ORDER BY tree_size DESC LIMIT 1"
        )
        assert await conn.fetchval(
            "SELECT count(*) FROM audit.events WHERE event_id = $1", event_id) == 0
        proof = await prove_archived(conn, store, log.keys, log_id=log.log_id,
                                     event_id=event_id, tree_size=head["tree_size"])
    assert proof.log_index == 42 and proof.root == bytes(head["root_hash"])
    verify_inclusion(42, proof.tree_size, proof.leaf_hash, proof.path, proof.root)
    # A hot event after detached months: the archive gives the range its rows continue.
    hot_id = await log.fetchval("SELECT event_id FROM audit.events WHERE log_index = 300")
    async with log.parts.pool.acquire() as conn:
        hot = await prove_archived(conn, store, log.keys, log_id=log.log_id,
                                   event_id=hot_id, tree_size=head["tree_size"])
    assert (hot.log_index, hot.month, hot.root) == (300, "hot", bytes(head["root_hash"]))
    verify_inclusion(300, hot.tree_size, hot.leaf_hash, hot.path, hot.root)


async def test_exporter_refuses_a_partition_that_is_not_one_index_range(log: Log,
                                                                        tmp_path: Path) -> None:
    before = log.months[0]
    # Row 200 (last month) moved into the month before, as a clock running backwards would
    # have put it: the month before now holds 0..149 and 200.
    async with log.parts.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "UPDATE audit.events SET recorded = $1 WHERE log_index = 200",
            datetime(before.year, before.month, 3, tzinfo=UTC),
        )
    with pytest.raises(ExportRefusedError, match=r"holds 151 rows over indices 0\.\.200, not one "
                       "contiguous index range"):
        await log.exporter(DirectoryStore(tmp_path / "a"), detach=True).run()
    assert await _archived(log) == []


async def test_rows_rewritten_with_their_hashes_are_refused_not_archived(
    log: Log, tmp_path: Path
) -> None:
    """An insider rewrites a closed month's row and recomputes its leaf hash: every row still
    hashes to itself, but not to the signed root, so the month is not signed into the
    archive for six years."""
    async with log.parts.pool.acquire() as conn:
        data = bytes(await conn.fetchval("SELECT leaf_data FROM audit.events WHERE log_index = 7"))
    forged = data.replace(b'"outcome":0', b'"outcome":4')
    assert forged != data
    async with log.parts.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "UPDATE audit.events SET leaf_data = $1, leaf_hash = $2 WHERE log_index = 7",
            forged, hash_leaf(forged),
        )
    store = DirectoryStore(tmp_path / "a")
    with pytest.raises(ExportRefusedError, match=r"do not give that head's root"):
        await log.exporter(store, detach=True).run()
    assert await _archived(log) == []
    assert store.keys(f"{log.log_id}/months/{log.months[0].isoformat()[:7]}/checkpoint") == []


async def test_recorded_never_goes_backwards_with_log_index(
    parts: Assembly, producer: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose clock is behind the last row's time stamps its rows with that time."""
    ahead = datetime(2030, 1, 1, tzinfo=UTC)
    async with parts.pool.acquire() as conn:
        await conn.execute(
            "CREATE TABLE audit.events_2030_01 PARTITION OF audit.events FOR VALUES"
            " FROM ('2030-01-01 00:00+00') TO ('2030-02-01 00:00+00')"
        )
    monkeypatch.setattr(store_module, "now_ms", lambda: ahead)
    await _produce(parts, producer, 5, 0)
    monkeypatch.undo()  # the clock of the next writer is years behind
    await _produce(parts, producer, 5, 5)
    async with parts.pool.acquire() as conn:
        rows = await conn.fetch("SELECT log_index, recorded FROM audit.events ORDER BY log_index")
        report = await verify_log(conn, parts.worker.signer.public_key_pem(),
                                  log_id=parts.worker.store.log_id)
    assert [r["recorded"] for r in rows] == [ahead] * 10
    assert report.ok, report.findings


def _login_url(superuser_url: str, role: str, password: str) -> str:
    parts = urlsplit(superuser_url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return urlunsplit(parts._replace(netloc=f"{quote(role)}:{quote(password)}@{host}"))


async def test_only_an_archiver_login_detaches_and_only_an_exported_month(
    log: Log, fresh_database: str, tmp_path: Path
) -> None:
    role, password = f"worker_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    async with log.parts.pool.acquire() as conn:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        await conn.execute(f"GRANT audit_writer TO {role}")
    before = log.months[0]
    worker = await asyncpg.connect(_login_url(fresh_database, role, password))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await worker.fetchval("SELECT audit.detach_archived_month($1)", before)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await worker.execute(
                f"ALTER TABLE audit.events DETACH PARTITION audit.{_partition(before)}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await worker.execute("INSERT INTO audit.detached_months (month) VALUES ($1)", before)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await worker.execute("DELETE FROM audit.archived_months")
        assert await log.fetchval(f"SELECT count(*) FROM audit.{_partition(before)}") == 150
        # Exported and verified: still not the writer's right, which would let a stolen
        # password fake an export and drop a month; only a login given audit_archiver.
        await log.exporter(DirectoryStore(tmp_path / "archive")).run(only=before)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await worker.fetchval("SELECT audit.detach_archived_month($1)", before)
        async with log.parts.pool.acquire() as conn:
            await conn.execute(f"GRANT audit_archiver TO {role}")
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError,
                           match=r"not in audit\.archived_months"):
            await worker.fetchval("SELECT audit.detach_archived_month($1)", log.months[1])
        assert await worker.fetchval("SELECT audit.detach_archived_month($1)", before) == 150
        assert await worker.fetchval("SELECT audit.detach_archived_month($1)", before) == 0
        assert await worker.fetchval(
            "SELECT detached_by FROM audit.detached_months WHERE month = $1", before) == role
    finally:
        await worker.close()
        async with log.parts.pool.acquire() as conn:
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")
    assert await log.fetchval(f"SELECT to_regclass('audit.{_partition(before)}')") is None


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audit_worker.cli", *args], capture_output=True, text=True,
        timeout=120, check=False, env={**os.environ, **(env or {})},
    )


async def test_cli_exports_verifies_and_proves_with_the_archive(
    log: Log, tmp_path: Path, settings: WorkerSettings, fresh_database: str
) -> None:
    archive = tmp_path / "archive"
    env = {
        "AUDIT_DATABASE_URL": fresh_database,
        "AUDIT_REDIS_URL": settings.redis_url.get_secret_value(),
        "AUDIT_LOCAL_KEY_DIR": str(settings.local_key_dir),
        "AUDIT_ARCHIVE_URL": str(archive),
        "AUDIT_ARCHIVE_GRACE_SECONDS": "0",
    }
    exported = await asyncio.to_thread(
        _cli, "archive", "export", "--detach", "--output", "json", env=env)
    assert exported.returncode == 0, exported.stderr
    months = json.loads(exported.stdout)["months"]
    assert [m["status"] for m in months] == ["exported", "exported", "detached", "detached"]
    assert "150/150 rows exported" in exported.stderr  # progress
    key = tmp_path / "pub.pem"
    key.write_bytes(log.parts.worker.signer.public_key_pem())
    common = ("--public-key", str(key), "--log-id", log.log_id, "--database-url", fresh_database)
    verified = await asyncio.to_thread(
        _cli, "verify", *common, "--archive", str(archive), "--output", "json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert (report["archived_rows"], report["archived_months"]) == (250, 2)
    assert report["archived_rows_per_second"] > 0
    hot_only = await asyncio.to_thread(_cli, "verify", *common, "--output", "json")
    assert hot_only.returncode == 0, hot_only.stdout
    assert any("not checked" in limit for limit in json.loads(hot_only.stdout)["limits"])
    event_id = await log.fetchval("SELECT event_id FROM audit.event_keys WHERE log_index = 7")
    proved = await asyncio.to_thread(
        _cli, "prove", str(event_id), *common, "--archive", str(archive))
    assert proved.returncode == 0, proved.stderr
    proof = json.loads(proved.stdout)
    assert (proof["log_index"], proof["archived_month"]) == (7, f"{log.months[0]:%Y-%m}")
    without = await asyncio.to_thread(
        _cli, "prove", str(event_id), "--database-url", fresh_database)
    assert without.returncode == 1 and "pass --archive" in without.stderr


def _guide_blocks() -> tuple[str, str]:
    """(the reader's guide's shell block, its month-root.py script), from the doc."""
    text = (Path(__file__).resolve().parents[3] / "docs" / "audit-log.md").read_text()
    guide = text.split("### Reader's guide")[1]
    shell = guide.split("```bash\n")[1].split("```")[0]
    script = guide.split("<!-- month-root.py -->\n```python\n")[1].split("```")[0]
    return shell, script


async def test_the_readers_guide_checks_a_month_with_standard_tools(
    log: Log, tmp_path: Path
) -> None:
    store = DirectoryStore(tmp_path / "archive")
    await log.exporter(store).run()
    month = tmp_path / "archive" / month_prefix(log.log_id, log.months[1])
    shutil.copytree(month, tmp_path / "m")
    (tmp_path / "signer.pem").write_bytes(log.parts.worker.signer.public_key_pem())
    shell, script = _guide_blocks()
    (tmp_path / "month-root.py").write_text(script)
    done = await asyncio.to_thread(subprocess.run, ["bash", "-euo", "pipefail", "-c", shell],
                                   cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Verified OK" in done.stdout and ": OK" in done.stdout
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["end_root"] in done.stdout  # the checkpoint's root, as hex
    root = await asyncio.to_thread(subprocess.run, [sys.executable, "month-root.py", "m"],
                                   cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert root.returncode == 0, root.stderr
    assert f"rows 150..249 give root {manifest['end_root']}" in root.stdout
    # The script fails on a changed row even when the part's SHA-256 was made to match.
    part = tmp_path / "m" / "entries" / "000000.jsonl.gz"
    forged = gzip.compress(gzip.decompress(part.read_bytes()).replace(
        b'"outcome":0', b'"outcome":4', 1))
    part.chmod(0o644)
    part.write_bytes(forged)
    manifest["parts"][0]["sha256"] = hashlib.sha256(forged).hexdigest()
    (tmp_path / "m" / "manifest.json").chmod(0o644)
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    bad = await asyncio.to_thread(subprocess.run, [sys.executable, "month-root.py", "m"],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "AssertionError" in bad.stderr


async def test_the_maintenance_round_exports_and_detaches_closed_months(
    log: Log, settings: WorkerSettings, tmp_path: Path
) -> None:
    from audit_worker.service import Service

    service = Service(settings.model_copy(update={
        "archive_url": str(tmp_path / "archive"), "archive_grace_seconds": 0.0,
        "archive_detach_verified_months": True,
    }))
    service.parts = log.parts
    try:
        await service.maintain()
    finally:
        service.parts = None
        await service.redis.aclose()
    assert await _archived(log) == list(log.months[:2])
    assert await log.fetchval("SELECT count(*) FROM audit.detached_months") == 2
    sample = service.metrics.registry.get_sample_value
    assert sample("audit_archive_months_total", {"outcome": "exported"}) == 2
    assert sample("audit_archive_months_total", {"outcome": "detached"}) == 2
    assert sample("audit_archive_export_failures_total", {"reason": "refused"}) == 0


async def test_a_refused_month_is_counted_and_the_maintenance_round_goes_on(
    log: Log, settings: WorkerSettings, tmp_path: Path
) -> None:
    from audit_worker.service import Service

    async with log.parts.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute("UPDATE audit.events SET recorded = $1 WHERE log_index = 200",
                           datetime(log.months[0].year, log.months[0].month, 3, tzinfo=UTC))
    service = Service(settings.model_copy(update={
        "archive_url": str(tmp_path / "archive"), "archive_grace_seconds": 0.0}))
    service.parts = log.parts
    try:
        await service.maintain()
    finally:
        service.parts = None
        await service.redis.aclose()
    sample = service.metrics.registry.get_sample_value
    assert sample("audit_archive_export_failures_total", {"reason": "refused"}) == 1
    assert await _archived(log) == []


@pytest.mark.parametrize(("chunk", "workers"), [(8, 1), (8, 2), (256, 1), (1 << 16, 1)])
async def test_hot_rows_after_detached_months_verify_in_any_chunking_and_changes_show(
    log: Log, tmp_path: Path, fresh_database: str, monkeypatch: pytest.MonkeyPatch,
    chunk: int, workers: int,
) -> None:
    import audit_worker.verify as verify_module

    await log.exporter(DirectoryStore(tmp_path / "archive"), detach=True).run()
    monkeypatch.setattr(verify_module, "_CHUNK", chunk)
    async with log.parts.pool.acquire() as conn:
        report = await verify_log(conn, log.keys, log_id=log.log_id, dsn=fresh_database,
                                  workers=workers)
    assert report.ok, report.findings
    assert (report.rows, report.verified_size) == (SIZES[2], sum(SIZES))
    async with log.parts.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        data = bytes(await conn.fetchval(
            "SELECT leaf_data FROM audit.events WHERE log_index = 251"))
        forged = data.replace(b'"outcome":0', b'"outcome":4')
        await conn.execute(
            "UPDATE audit.events SET leaf_data = $1, leaf_hash = sha256('\\x00'::bytea || $1)"
            " WHERE log_index = 251", forged)
    async with log.parts.pool.acquire() as conn:
        report = await verify_log(conn, log.keys, log_id=log.log_id, dsn=fresh_database,
                                  workers=workers)
    assert {f.kind for f in report.findings} >= {"root_mismatch"}, report.findings

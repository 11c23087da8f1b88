"""An insider with superuser rights on the database rolls the log back, truncates it, or
rewrites it with the signing key in hand. The database alone then verifies; checked
against the witnessed checkpoint outside it, each attack is reported precisely."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from audit_worker.config import WorkerSettings
from audit_worker.crypto import LocalSigner, TrustedKeys
from audit_worker.crypto.checkpoint import Checkpoint, sign_note
from audit_worker.db.store import verify_dead_letter_chain
from audit_worker.objectstore import DirectoryStore
from audit_worker.service import Assembly
from audit_worker.verify import VerifyReport, WitnessedCheckpoint, verify_log
from audit_worker.witness import (
    DeadLetterChainTracker,
    WitnessLog,
    WitnessPublisher,
    history_key,
)
from tests.support import drain, encode, make_event

EVENTS, MALFORMED = 60, 3


async def _send(parts: Assembly, producer: aioredis.Redis, first: int, count: int) -> None:
    async with producer.pipeline(transaction=False) as pipe:
        for i in range(first, first + count):
            pipe.xadd(parts.worker.intake.stream, {"event": encode(make_event(i))})
        await pipe.execute()
    await drain(parts, batch=count, idle_rounds=1)


def _witness_log(parts: Assembly, root: Path) -> WitnessLog:
    pem = parts.worker.signer.public_key_pem()
    return WitnessLog(DirectoryStore(root), parts.worker.store.log_id, TrustedKeys.from_pems([pem]))


@pytest.fixture
async def witnessed(
    parts: Assembly, producer: aioredis.Redis, tmp_path: Path
) -> AsyncIterator[tuple[Assembly, WitnessLog]]:
    """60 events and 3 dead letters in 3 batches, each signed; the last head witnessed."""
    for batch in range(3):
        await _send(parts, producer, batch * 100, EVENTS // 3)
        await producer.xadd(parts.worker.intake.stream,
                            {"event": encode(make_event(900 + batch, action="X"))})
        await drain(parts, batch=10, idle_rounds=1)
        head = await parts.worker.sign_tree_head()
    assert head is not None and head.tree_size == EVENTS
    log = _witness_log(parts, tmp_path / "archive")
    own = log.keys.keys[0]
    chain = DeadLetterChainTracker(parts.pool, 5, verify_dead_letter_chain)
    publisher = WitnessPublisher(log, parts.worker.signer, own, chain.head, interval_seconds=0)
    assert await publisher.publish(head.tree_size, head.root_hash, head.timestamp_ms)
    yield parts, log


async def _verify(parts: Assembly, log: WitnessLog | None) -> VerifyReport:
    witness = None
    if log is not None:
        newest = log.newest().newest
        assert newest is not None
        witness = WitnessedCheckpoint(newest.checkpoint, newest.key)
    async with parts.pool.acquire() as conn:
        return await verify_log(
            conn, parts.worker.signer.public_key_pem(), log_id=parts.worker.store.log_id,
            witness=witness,
        )


async def _tamper(parts: Assembly, *statements: str) -> None:
    async with parts.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        for sql in statements:
            await conn.execute(sql)


def _kinds(report: VerifyReport) -> list[str]:
    return [f.kind for f in report.findings]


async def test_untouched_log_agrees_with_its_witness(
    witnessed: tuple[Assembly, WitnessLog],
) -> None:
    parts, log = witnessed
    report = await _verify(parts, log)
    assert report.ok, report.findings
    assert report.witnessed_size == EVENTS
    assert report.dead_letters == MALFORMED
    assert not any("only a witnessed checkpoint" in limit for limit in report.limits)


async def test_rollback_passes_alone_and_is_caught_by_the_witness(
    witnessed: tuple[Assembly, WitnessLog],
) -> None:
    parts, log = witnessed
    await _tamper(
        parts,
        "DELETE FROM audit.events WHERE log_index >= 40",
        "DELETE FROM audit.event_keys WHERE log_index >= 40",
        f"DELETE FROM audit.tree_heads WHERE tree_size > {EVENTS * 2 // 3}",
    )
    alone = await _verify(parts, None)
    assert alone.ok, alone.findings  # what the issue found: a shorter log that verifies
    assert any("only a witnessed checkpoint (--witness)" in limit for limit in alone.limits)
    report = await _verify(parts, log)
    assert _kinds(report) == ["rolled_back"]
    assert "holds 40 log entries" in report.findings[0].message
    assert "covers 60: 20 entries" in report.findings[0].message


async def test_truncation_with_triggers_disabled_is_caught_by_the_witness(
    witnessed: tuple[Assembly, WitnessLog],
) -> None:
    parts, log = witnessed
    async with parts.pool.acquire() as conn, conn.transaction():
        for table in ("audit.events", "audit.tree_heads", "audit.event_keys"):
            await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER ALL")
        partitions = await conn.fetch(
            "SELECT c.oid::regclass::text AS name FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'audit.events'::regclass"
        )
        for p in partitions:
            await conn.execute(f"ALTER TABLE {p['name']} DISABLE TRIGGER ALL")
        await conn.execute("TRUNCATE audit.events, audit.tree_heads, audit.event_keys")
    report = await _verify(parts, log)
    assert _kinds(report) == ["rolled_back"]
    assert "holds 0 log entries" in report.findings[0].message


async def test_rewrite_resigned_with_the_real_key_is_caught_by_the_witness(
    witnessed: tuple[Assembly, WitnessLog], producer: aioredis.Redis
) -> None:
    """The worst insider: holds the signing key too. Rows from index 30 are replaced by
    other events and every head is re-signed: alone, the log verifies."""
    parts, log = witnessed
    await _tamper(
        parts,
        "DELETE FROM audit.events WHERE log_index >= 30",
        "DELETE FROM audit.event_keys WHERE log_index >= 30",
        "DELETE FROM audit.tree_heads WHERE tree_size > 20",
    )
    parts.worker.frontier = await parts.worker.store.load_frontier(
        TrustedKeys.from_pems([parts.worker.signer.public_key_pem()])
    )
    await _send(parts, producer, 5000, 40)  # 30 + 40 = 70 entries, other events
    await parts.worker.sign_tree_head()
    alone = await _verify(parts, None)
    assert alone.ok, alone.findings
    report = await _verify(parts, log)
    assert _kinds(report) == ["witness_mismatch"]
    assert report.findings[0].tree_size == EVENTS


async def test_newest_dead_letter_deleted_is_caught_only_by_the_witness(
    witnessed: tuple[Assembly, WitnessLog],
) -> None:
    parts, log = witnessed
    await _tamper(parts, f"DELETE FROM audit.dead_letters WHERE chain_index = {MALFORMED - 1}")
    alone = await _verify(parts, None)
    assert alone.ok, alone.findings
    assert any(limit.startswith("dead letters:") for limit in alone.limits)
    report = await _verify(parts, log)
    assert _kinds(report) == ["dead_letters_rolled_back"]


async def test_newest_dead_letter_replaced_and_rechained_is_caught_by_the_witness(
    witnessed: tuple[Assembly, WitnessLog],
) -> None:
    parts, log = witnessed
    await _tamper(parts, f"DELETE FROM audit.dead_letters WHERE chain_index = {MALFORMED - 1}")
    async with parts.pool.acquire() as conn:
        # With the triggers on, the chain trigger links the forged row as it would any.
        await conn.execute(
            "INSERT INTO audit.dead_letters (stream_entry_id, received_at, field, value_class,"
            " rule, message, delivery_count) VALUES ('0-1', now(), 'action', 'string',"
            " 'enum', 'forged', 1)"
        )
    alone = await _verify(parts, None)
    assert alone.ok, alone.findings
    report = await _verify(parts, log)
    assert _kinds(report) == ["dead_letter_witness_mismatch"]


async def test_forged_checkpoints_in_the_witness_are_reported_and_passed_over(
    witnessed: tuple[Assembly, WitnessLog], tmp_path: Path
) -> None:
    _parts, log = witnessed
    forger = LocalSigner(tmp_path / "forger.pem", create=True)
    forged_key = TrustedKeys.from_pems([forger.public_key_pem()]).keys[0]
    note = sign_note(
        Checkpoint(log.log_id, 10**9, bytes(32), 1), forger, forged_key
    )
    log.store.put(history_key(log.log_id, 10**9), note)
    read = log.newest()
    assert read.newest is not None and read.newest.checkpoint.tree_size == EVENTS
    assert [key for key, _ in read.refused] == [history_key(log.log_id, 10**9)]


async def test_verify_command_reports_a_rollback_against_the_witness_as_json(
    witnessed: tuple[Assembly, WitnessLog], tmp_path: Path, settings: WorkerSettings,
) -> None:
    parts, log = witnessed
    await _tamper(
        parts, "DELETE FROM audit.events WHERE log_index >= 40",
        "DELETE FROM audit.event_keys WHERE log_index >= 40",
        "DELETE FROM audit.tree_heads WHERE tree_size > 40",
    )
    pem = tmp_path / "signer.pem"
    pem.write_bytes(parts.worker.signer.public_key_pem())
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "audit_worker.cli", "verify", "--public-key", str(pem),
         "--log-id", log.log_id, "--witness", str(tmp_path / "archive"), "--workers", "1",
         "--output", "json"],
        env={"AUDIT_DATABASE_URL": settings.database_url.get_secret_value(),
             "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert [f["kind"] for f in report["findings"]] == ["rolled_back"]
    assert report["witnessed_size"] == EVENTS

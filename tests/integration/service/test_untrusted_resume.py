"""An untrusted head or row halts the whole service visibly, and nothing of it is logged.

The halt must be what the operator sees: readiness false with the error's class and the
check that failed, ``audit_integrity_failures_total``, one critical line with the alert
field, liveness still up, and no tree head signed nor event appended after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

import asyncpg
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from audit_worker.config import WorkerSettings
from audit_worker.crypto import TreeHead
from audit_worker.errors import AdoptedRowError, UntrustedHeadError
from audit_worker.merkle import hash_leaf
from tests.integration.service.conftest import Running, count, eventually, running
from tests.support import encode, make_event

MARKER = b"planted-by-an-insider"  # row content that must never reach the logs
HEADS = "SELECT count(*) FROM audit.tree_heads"


async def _store_some(settings: WorkerSettings, n: int) -> None:
    """Run a worker until `n` events are stored and signed, then stop it."""
    db = settings.database_url.get_secret_value()
    async with running(settings) as worker:
        assert worker.service.worker is not None
        for i in range(n):
            await worker.service.redis.xadd(settings.stream, {"event": encode(make_event(i))})
        await eventually(lambda: _at_least(db, n), what=f"{n} stored")
        assert await worker.stop() is None


async def _at_least(db: str, n: int) -> bool:
    return await count(db) >= n and await count(
        db, "SELECT coalesce(max(tree_size), 0) FROM audit.tree_heads") >= n


async def _superuser(db: str, sql: str, *args: object) -> None:
    conn = await asyncpg.connect(db)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(sql, *args)
    finally:
        await conn.close()


async def _halted_visibly(worker: Running, error: str, check: str) -> None:
    await eventually(lambda: worker.service.status.phase == "halted", what="halted")
    ready = await worker.get("/readyz")
    assert ready.status_code == 503
    assert any(f"integrity failure: {error}" in p and check in p
               for p in ready.json()["problems"]), ready.json()
    assert "audit_integrity_failures_total 1.0" in (await worker.get("/metrics")).text
    assert (await worker.get("/livez")).status_code == 200  # halted, not wedged


def _one_alert(logs: list[MutableMapping[str, Any]]) -> None:
    critical = [e for e in logs if e["log_level"] == "critical"]
    assert len(critical) == 1 and critical[0]["alert"] == "audit_integrity_failure"
    text = str(logs)
    assert MARKER.decode() not in text and "MRN" not in text and "local:planted" not in text


async def test_head_signed_by_another_key_halts_the_service_at_start(
    settings: WorkerSettings,
) -> None:
    db = settings.database_url.get_secret_value()
    await _store_some(settings, 5)
    other = ec.generate_private_key(ec.SECP256R1())
    head = TreeHead("audit-log", 10**9, b"\x22" * 32, int(time.time() * 1000))
    await _superuser(
        db,
        "INSERT INTO audit.tree_heads (tree_size, root_hash, timestamp_ms, log_id, signature,"
        " signer_ref, frontier) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        head.tree_size, head.root_hash, head.timestamp_ms, head.log_id,
        other.sign(head.signing_input(), ec.ECDSA(hashes.SHA256())), "local:planted",
        MARKER,
    )
    heads = await count(db, HEADS)
    with capture_logs() as logs:
        async with running(settings) as worker:
            await _halted_visibly(worker, "UntrustedHeadError", "size 1000000000) is not signed")
            await worker.service.redis.xadd(settings.stream, {"event": encode(make_event(9))})
            await asyncio.sleep(settings.sign_interval_seconds * 3)  # signer rounds pass
            failure = await worker.stop()
    assert isinstance(failure, UntrustedHeadError)
    assert await count(db) == 5 and await count(db, HEADS) == heads  # nothing written
    _one_alert(logs)


async def test_row_planted_while_running_halts_the_service_before_it_signs(
    settings: WorkerSettings,
) -> None:
    db = settings.database_url.get_secret_value()
    with capture_logs() as logs:
        async with running(settings) as worker:
            for i in range(5):
                await worker.service.redis.xadd(settings.stream, {"event": encode(make_event(i))})
            await eventually(lambda: _at_least(db, 5), what="5 stored and signed")
            conn = await asyncpg.connect(db)
            try:
                data = bytes(await conn.fetchval(
                    "SELECT leaf_data FROM audit.events WHERE log_index = 0"))
            finally:
                await conn.close()
            forged = data.replace(b'{"log_index":0,', b'{"log_index":5,')[:-1] + (
                b',"x":"' + MARKER + b'"}')
            await _superuser(  # right index, right shape, a leaf hash that is not its own
                db,
                "INSERT INTO audit.events SELECT 5, gen_random_uuid(), recorded, occurred,"
                " action, outcome, patient_hmac, actor_hmac, data_key_id, $1, $2"
                " FROM audit.events WHERE log_index = 0",
                forged, hash_leaf(data),
            )
            heads = await count(db, HEADS)
            await _halted_visibly(worker, "AdoptedRowError", "row 5: its leaf data does not hash")
            await worker.service.redis.xadd(settings.stream, {"event": encode(make_event(7))})
            await asyncio.sleep(settings.sign_interval_seconds * 3)  # signer rounds pass
            failure = await worker.stop()
    assert isinstance(failure, AdoptedRowError)
    assert await count(db) == 6 and await count(db, HEADS) == heads
    _one_alert(logs)

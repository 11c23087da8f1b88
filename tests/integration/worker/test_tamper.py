"""Every kind of tampering, done for real with SQL on the stored rows, is detected.

The tamperer is a database superuser: it bypasses the append-only triggers with
``session_replication_role = replica``, as an attacker with the owner's rights could.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from audit_worker.crypto import TreeHead
from audit_worker.merkle import hash_leaf
from audit_worker.service import Assembly
from audit_worker.verify import VerifyReport, verify_log
from tests.support import drain, encode, make_event

EVENTS = 120


@pytest.fixture
async def log(parts: Assembly, producer: aioredis.Redis) -> AsyncIterator[Assembly]:
    """A log of 120 events in 4 batches, each batch followed by a signed tree head."""
    for batch in range(4):
        async with producer.pipeline(transaction=False) as pipe:
            for i in range(EVENTS // 4):
                pipe.xadd(
                    parts.worker.intake.stream, {"event": encode(make_event(batch * 100 + i))}
                )
            await pipe.execute()
        await drain(parts, batch=EVENTS // 4, idle_rounds=1)
        await parts.worker.sign_tree_head()
    yield parts


async def _verify(parts: Assembly, **kwargs: bool) -> VerifyReport:
    pem = parts.worker.signer.public_key_pem()
    async with parts.pool.acquire() as conn:
        return await verify_log(conn, pem, log_id=parts.worker.store.log_id, **kwargs)


async def _tamper(parts: Assembly, *statements: str) -> None:
    async with parts.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        for sql in statements:
            await conn.execute(sql)


def _kinds(report: VerifyReport) -> set[str]:
    return {f.kind for f in report.findings}


async def test_untouched_log_verifies(log: Assembly) -> None:
    report = await _verify(log)
    assert report.ok, report.findings
    assert (report.rows, report.verified_size, report.valid_tree_heads) == (EVENTS, EVENTS, 4)


async def test_changed_row_is_detected_at_its_index(log: Assembly) -> None:
    await _tamper(
        log,
        "UPDATE audit.events SET leaf_data = convert_to(replace(convert_from(leaf_data, 'UTF8'),"
        ' \'"code":"rest-read"\', \'"code":"rest-export"\'), \'UTF8\') WHERE log_index = 42',
    )
    report = await _verify(log)
    changed = [f for f in report.findings if f.kind == "changed_row"]
    assert [f.index for f in changed] == [42]


async def test_changed_row_with_recomputed_leaf_hash_breaks_the_signed_root(log: Assembly) -> None:
    async with log.pool.acquire() as conn:
        data = bytes(await conn.fetchval("SELECT leaf_data FROM audit.events WHERE log_index = 7"))
    forged = data.replace(b'"outcome":0', b'"outcome":4')
    await _tamper(
        log,
        f"UPDATE audit.events SET leaf_data = '\\x{forged.hex()}', outcome = 4,"
        f" leaf_hash = '\\x{hash_leaf(forged).hex()}' WHERE log_index = 7",
    )
    report = await _verify(log)
    assert _kinds(report) == {"root_mismatch"}
    assert report.findings[0].tree_size == EVENTS // 4  # the first head covering index 7


async def test_changed_search_column_is_detected(log: Assembly) -> None:
    await _tamper(
        log, "UPDATE audit.events SET patient_hmac = sha256('someone else') WHERE log_index = 3"
    )
    report = await _verify(log)
    assert [(f.kind, f.index) for f in report.findings] == [("column_mismatch", 3)]
    assert "patient_hmac" in report.findings[0].message


async def test_deleted_row_is_detected(log: Assembly) -> None:
    await _tamper(log, "DELETE FROM audit.events WHERE log_index = 50")
    report = await _verify(log)
    assert ("deleted_row", 50) in {(f.kind, f.index) for f in report.findings}


async def test_reordered_rows_are_detected(log: Assembly) -> None:
    await _tamper(
        log,
        "UPDATE audit.events SET log_index = -1 WHERE log_index = 10",
        "UPDATE audit.events SET log_index = 10 WHERE log_index = 11",
        "UPDATE audit.events SET log_index = 11 WHERE log_index = -1",
    )
    report = await _verify(log)
    assert {(f.kind, f.index) for f in report.findings} >= {
        ("reordered_row", 10),
        ("reordered_row", 11),
    }


async def test_truncated_tail_is_detected(log: Assembly) -> None:
    await _tamper(log, f"DELETE FROM audit.events WHERE log_index >= {EVENTS - 5}")
    report = await _verify(log)
    truncated = [f for f in report.findings if f.kind == "truncated_tail"]
    assert len(truncated) == 1 and "5 row(s) removed" in truncated[0].message


async def test_forged_row_appended_after_the_last_head_is_detected(log: Assembly) -> None:
    async with log.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM audit.events WHERE log_index = 0")
    data = bytes(row["leaf_data"]).replace(b'{"log_index":0,', b'{"log_index":%d,' % EVENTS)
    await _tamper(
        log,
        "INSERT INTO audit.events (log_index, event_id, recorded, occurred, action, outcome,"
        " patient_hmac, actor_hmac, leaf_data, leaf_hash)"
        f" SELECT {EVENTS}, event_id, recorded, occurred, action, outcome, patient_hmac,"
        f" actor_hmac, '\\x{data.hex()}', '\\x{hash_leaf(data).hex()}'"
        " FROM audit.events WHERE log_index = 0",
    )
    report = await _verify(log)
    assert [(f.kind, f.index) for f in report.findings] == [("unsigned_tail", EVENTS)]


async def test_forged_row_inserted_in_the_middle_is_detected(log: Assembly) -> None:
    await _tamper(
        log,
        "INSERT INTO audit.events SELECT log_index, gen_random_uuid(), recorded + interval '1 ms',"
        " occurred, action, outcome, patient_hmac, actor_hmac, data_key_id, leaf_data, leaf_hash"
        " FROM audit.events WHERE log_index = 60",
    )
    report = await _verify(log)
    assert ("duplicate_index", 60) in {(f.kind, f.index) for f in report.findings}


async def test_forged_tree_head_is_detected(log: Assembly) -> None:
    await _tamper(
        log,
        "INSERT INTO audit.tree_heads (tree_size, root_hash, timestamp_ms, log_id, signature,"
        f" signer_ref, frontier) VALUES ({EVENTS + 1000}, sha256('x'), 0, 'audit-log',"
        " '\\x3006020101020101', 'local:forged', '')",
    )
    report = await _verify(log)
    assert ("bad_signature", EVENTS + 1000) in {(f.kind, f.tree_size) for f in report.findings}


async def test_tree_head_re_signed_with_another_key_is_detected(log: Assembly) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    async with log.pool.acquire() as conn:
        head = await conn.fetchrow("SELECT * FROM audit.tree_heads ORDER BY tree_size LIMIT 1")
    forged = TreeHead(head["log_id"], head["tree_size"], b"\x11" * 32, head["timestamp_ms"])
    signature = other.sign(forged.signing_input(), ec.ECDSA(hashes.SHA256()))
    await _tamper(
        log,
        f"UPDATE audit.tree_heads SET root_hash = '\\x{forged.root_hash.hex()}',"
        f" signature = '\\x{signature.hex()}' WHERE tree_size = {head['tree_size']}",
    )
    report = await _verify(log)
    assert ("bad_signature", head["tree_size"]) in {(f.kind, f.tree_size) for f in report.findings}
    assert (
        other.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        != log.worker.signer.public_key_pem()
    )


async def test_verify_cli_exits_nonzero_and_names_the_row(
    log: Assembly, tmp_path: object, fresh_database: str
) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    key = Path(str(tmp_path)) / "pub.pem"
    key.write_bytes(log.worker.signer.public_key_pem())
    await _tamper(log, "DELETE FROM audit.events WHERE log_index = 5")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "audit_worker.cli",
            "verify",
            "--public-key",
            str(key),
            "--database-url",
            fresh_database,
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert {"kind": "deleted_row", "index": 5} in [
        {"kind": f["kind"], "index": f["index"]} for f in report["findings"]
    ]


async def test_appends_are_refused_by_the_trigger_even_for_the_owner(log: Assembly) -> None:
    async with log.pool.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("DELETE FROM audit.events WHERE log_index = 1")


@pytest.mark.parametrize("workers", [1, 2])
async def test_chunked_and_parallel_verification_find_the_same_problems(
    log: Assembly, fresh_database: str, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import audit_worker.verify as verify_module

    # 8-row chunks, so 120 rows make 15 chunks with tree heads falling inside and on edges
    monkeypatch.setattr(verify_module, "_CHUNK", 8)
    clean = await _verify_with(log, fresh_database, workers)
    assert clean.ok and clean.verified_size == EVENTS, clean.findings
    await _tamper(
        log,
        "DELETE FROM audit.events WHERE log_index = 77",
        "UPDATE audit.events SET patient_hmac = sha256('x') WHERE log_index = 20",
    )
    report = await _verify_with(log, fresh_database, workers)
    found = {(f.kind, f.index) for f in report.findings}
    assert {("deleted_row", 77), ("column_mismatch", 20)} <= found
    assert report.verified_size == 60  # the last head before the gap at 77 still checks out


async def _verify_with(parts: Assembly, dsn: str, workers: int) -> VerifyReport:
    pem = parts.worker.signer.public_key_pem()
    async with parts.pool.acquire() as conn:
        return await verify_log(conn, pem, dsn=dsn, workers=workers)


async def test_heads_signed_before_and_after_a_key_rotation_verify_with_both_keys(
    log: Assembly, producer: aioredis.Redis, tmp_path: Path
) -> None:
    from audit_worker.crypto import LocalSigner
    from audit_worker.db.store import StoredTreeHead

    old_key = log.worker.signer.public_key_pem()
    await producer.xadd(log.worker.intake.stream, {"event": encode(make_event(999))})
    await drain(log, idle_rounds=1)
    # a worker restarted with the rotated key signs the next head
    rotated = LocalSigner(tmp_path / "rotated.pem", create=True)
    frontier = log.worker.frontier
    head = TreeHead("audit-log", frontier.size, frontier.root(), 1_900_000_000_000)
    await log.worker.store.insert_tree_head(
        StoredTreeHead(
            head.tree_size, head.root_hash, head.timestamp_ms, head.log_id,
            rotated.sign(head.signing_input()), rotated.ref,
        ),
        frontier,
    )
    new_key = rotated.public_key_pem()
    async with log.pool.acquire() as conn:
        only_old = await verify_log(conn, old_key)
        both = await verify_log(conn, [old_key, new_key])
    assert [(f.kind, f.tree_size) for f in only_old.findings] == [
        ("bad_signature", EVENTS + 1), ("unsigned_tail", None),
    ]
    assert both.ok and both.verified_size == EVENTS + 1


async def test_forged_row_at_a_huge_index_is_found_without_scanning_the_gap(
    log: Assembly,
) -> None:
    import time

    wild = 10**12
    await _tamper(
        log,
        "INSERT INTO audit.events SELECT "
        f"{wild}, event_id, recorded, occurred, action, outcome, patient_hmac, actor_hmac,"
        " data_key_id, leaf_data, leaf_hash FROM audit.events WHERE log_index = 0",
    )
    started = time.perf_counter()
    report = await _verify(log)
    assert time.perf_counter() - started < 10
    found = {(f.kind, f.index) for f in report.findings}
    assert ("deleted_row", EVENTS) in found and ("reordered_row", wild) in found
    assert report.verified_size == EVENTS

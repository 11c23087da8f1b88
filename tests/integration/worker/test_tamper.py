"""Every kind of tampering, done for real with SQL on the stored rows, is detected.

The tamperer is a database superuser: it bypasses the append-only triggers with
``session_replication_role = replica``, as an attacker with the owner's rights could.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
        " patient_hmac, actor_hmac, data_key_id, leaf_data, leaf_hash)"
        f" SELECT {EVENTS}, event_id, recorded, occurred, action, outcome, patient_hmac,"
        f" actor_hmac, data_key_id, '\\x{data.hex()}', '\\x{hash_leaf(data).hex()}'"
        " FROM audit.events WHERE log_index = 0",
    )
    report = await _verify(log)
    # the copy keeps row 0's event id, so it is also that id stored twice
    assert sorted((f.kind, f.index) for f in report.findings) == [
        ("duplicate_event_id", 0), ("unsigned_tail", EVENTS),
    ]


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
            "--log-id",
            log.worker.store.log_id,
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
        return await verify_log(
            conn, pem, log_id=parts.worker.store.log_id, dsn=dsn, workers=workers
        )


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
        only_old = await verify_log(conn, old_key, log_id="audit-log")
        both = await verify_log(conn, [old_key, new_key], log_id="audit-log")
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


# ---- what verify trusts today: log id, keys with windows, time, ids, data keys


def _cli_verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audit_worker.cli", "verify", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


async def _sign_extra_head(
    log: Assembly, producer: aioredis.Redis, signer: Any, timestamp_ms: int
) -> int:
    """One more event, and a head over it signed by `signer` at `timestamp_ms`."""
    from audit_worker.db.store import StoredTreeHead

    await producer.xadd(log.worker.intake.stream, {"event": encode(make_event(4242))})
    await drain(log, idle_rounds=1)
    frontier = log.worker.frontier
    head = TreeHead("audit-log", frontier.size, frontier.root(), timestamp_ms)
    await log.worker.store.insert_tree_head(
        StoredTreeHead(head.tree_size, head.root_hash, head.timestamp_ms, head.log_id,
                       signer.sign(head.signing_input()), signer.ref),
        frontier,
    )
    return frontier.size


async def _newest_head_ms(log: Assembly) -> int:
    async with log.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT max(timestamp_ms) FROM audit.tree_heads"))


def _iso_ms(timestamp_ms: int) -> str:
    moment = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def test_a_head_signed_by_a_rotated_key_after_its_window_is_not_trusted(
    log: Assembly, producer: aioredis.Redis, tmp_path: Path, fresh_database: str
) -> None:
    from audit_worker.crypto import LocalSigner, TrustedKeys

    old = log.worker.signer
    new = LocalSigner(tmp_path / "rotated.pem", create=True)
    rotation = await _newest_head_ms(log) + 1000
    (tmp_path / "old.pem").write_bytes(old.public_key_pem())
    (tmp_path / "new.pem").write_bytes(new.public_key_pem())
    keys_file = tmp_path / "trusted-keys.yaml"
    keys_file.write_text(
        "keys:\n"
        f"  - public_key_file: old.pem\n    valid_until: '{_iso_ms(rotation)}'\n"
        f"  - public_key_file: new.pem\n    valid_from: '{_iso_ms(rotation)}'\n"
    )
    trusted = TrustedKeys.load(keys_file)
    # the key rotated out signs a newer head, dated after its window closed
    size = await _sign_extra_head(log, producer, old, rotation + 5000)
    async with log.pool.acquire() as conn:
        report = await verify_log(conn, trusted, log_id="audit-log")
        for_all_time = await verify_log(conn, old.public_key_pem(), log_id="audit-log")
    assert [(f.kind, f.tree_size) for f in report.findings] == [
        ("key_outside_window", size), ("unsigned_tail", None)]
    assert report.verified_size == EVENTS
    assert for_all_time.ok  # what one --public-key trusted for all time could not see
    done = _cli_verify("--trusted-keys", str(keys_file), "--log-id", "audit-log",
                       "--database-url", fresh_database, "--output", "json")
    assert done.returncode == 1, done.stderr
    assert "key_outside_window" in {f["kind"] for f in json.loads(done.stdout)["findings"]}


async def test_a_head_signed_by_the_new_key_inside_its_window_is_trusted(
    log: Assembly, producer: aioredis.Redis, tmp_path: Path
) -> None:
    from audit_worker.crypto import LocalSigner, TrustedKeys

    old, new = log.worker.signer, LocalSigner(tmp_path / "rotated.pem", create=True)
    rotation = await _newest_head_ms(log) + 1000
    trusted = TrustedKeys.parse({"keys": [
        {"public_key": old.public_key_pem().decode(), "valid_until": _iso_ms(rotation)},
        {"public_key": new.public_key_pem().decode(), "valid_from": _iso_ms(rotation)},
    ]}, base=tmp_path)
    await _sign_extra_head(log, producer, new, rotation)
    async with log.pool.acquire() as conn:
        report = await verify_log(conn, trusted, log_id="audit-log")
    assert report.ok and report.verified_size == EVENTS + 1, report.findings


async def test_a_larger_head_dated_before_a_smaller_one_is_found(
    log: Assembly, producer: aioredis.Redis
) -> None:
    async with log.pool.acquire() as conn:
        first = int(await conn.fetchval("SELECT min(timestamp_ms) FROM audit.tree_heads"))
    size = await _sign_extra_head(log, producer, log.worker.signer, first - 60_000)
    report = await _verify(log)
    assert [(f.kind, f.tree_size) for f in report.findings] == [("timestamp_backwards", size)]
    assert report.verified_size == size  # the head is genuinely signed: only its time is wrong


async def test_an_event_id_stored_twice_is_found_with_both_indices(
    log: Assembly, fresh_database: str
) -> None:
    async with log.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM audit.events WHERE log_index = 10")
    data = bytes(row["leaf_data"]).replace(b'{"log_index":10,', b'{"log_index":%d,' % EVENTS)
    # a superuser bypasses audit.event_keys, which refuses a second row for an id
    await _tamper(
        log,
        "INSERT INTO audit.events (log_index, event_id, recorded, occurred, action, outcome,"
        " patient_hmac, actor_hmac, data_key_id, leaf_data, leaf_hash)"
        f" SELECT {EVENTS}, event_id, recorded, occurred, action, outcome, patient_hmac,"
        f" actor_hmac, data_key_id, '\\x{data.hex()}', '\\x{hash_leaf(data).hex()}'"
        " FROM audit.events WHERE log_index = 10",
    )
    report = await _verify(log, allow_unsigned_tail=True)
    duplicated = [f for f in report.findings if f.kind == "duplicate_event_id"]
    assert [(f.index, f.message.split(" is stored")[0]) for f in duplicated] == [
        (10, f"event id {row['event_id']}")]
    assert f"stored 2 times, at indices 10, {EVENTS}" in duplicated[0].message
    # the same in the parallel path, in the same snapshot
    async with log.pool.acquire() as conn:
        import audit_worker.verify as verify_module

        verify_module_chunk = verify_module._CHUNK
        try:
            verify_module._CHUNK = 16
            parallel = await verify_log(
                conn, log.worker.signer.public_key_pem(), log_id="audit-log",
                allow_unsigned_tail=True, dsn=fresh_database, workers=2,
            )
        finally:
            verify_module._CHUNK = verify_module_chunk
    assert [f.kind for f in parallel.findings] == ["duplicate_event_id"]


async def test_a_changed_data_key_id_is_a_column_mismatch(
    log: Assembly, producer: aioredis.Redis
) -> None:
    unsealed = make_event(777, entity=[{"type": "Observation"}])  # nothing to seal
    del unsealed["detail"]
    await producer.xadd(log.worker.intake.stream, {"event": encode(unsealed)})
    await drain(log, idle_rounds=1)
    await log.worker.sign_tree_head()
    async with log.pool.acquire() as conn:
        sealed = await conn.fetch("SELECT log_index FROM audit.events"
                                  " WHERE data_key_id IS NOT NULL ORDER BY log_index LIMIT 2")
        plain = await conn.fetchval("SELECT min(log_index) FROM audit.events"
                                    " WHERE data_key_id IS NULL")
    assert len(sealed) == 2 and plain is not None, "the fixture needs both kinds of row"
    other, cleared = sealed[0]["log_index"], sealed[1]["log_index"]
    await _tamper(
        log,
        f"UPDATE audit.events SET data_key_id = 'another-key' WHERE log_index = {other}",
        f"UPDATE audit.events SET data_key_id = NULL WHERE log_index = {cleared}",
        f"UPDATE audit.events SET data_key_id = 'invented' WHERE log_index = {plain}",
    )
    report = await _verify(log)
    assert sorted((f.kind, f.index) for f in report.findings) == sorted(
        [("column_mismatch", other), ("column_mismatch", cleared), ("column_mismatch", plain)])
    assert all("data_key_id" in f.message for f in report.findings)


async def test_verify_without_log_id_is_refused(log: Assembly, tmp_path: Path,
                                                fresh_database: str) -> None:
    key = tmp_path / "pub.pem"
    key.write_bytes(log.worker.signer.public_key_pem())
    done = _cli_verify("--public-key", str(key), "--database-url", fresh_database)
    assert done.returncode == 2
    assert "--log-id is required" in done.stderr
    ok = _cli_verify("--public-key", str(key), "--log-id", "audit-log",
                     "--database-url", fresh_database)
    assert ok.returncode == 0, ok.stderr
    assert "limit:" in ok.stderr  # the text output states what it could not check


async def test_verify_refuses_several_public_keys_and_asks_for_windows(
        log: Assembly, tmp_path: Path, fresh_database: str) -> None:
    key = tmp_path / "pub.pem"
    key.write_bytes(log.worker.signer.public_key_pem())
    done = _cli_verify("--public-key", str(key), "--public-key", str(key), "--log-id",
                       "audit-log", "--database-url", fresh_database)
    assert done.returncode == 2
    assert "--trusted-keys" in done.stderr and "window" in done.stderr
    both = _cli_verify("--public-key", str(key), "--trusted-keys", str(key), "--log-id",
                       "audit-log", "--database-url", fresh_database)
    assert both.returncode == 2 and "not both" in both.stderr

"""A worker trusts nothing it reads back: the head it resumes from, and rows it adopts.

The tamperer is a database superuser (as in test_tamper.py) who may insert tree heads
and rows directly. Each attack must stop the worker with a precise integrity error
before it signs or appends anything; a healthy log must resume as before.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import asyncpg
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from audit_worker.config import WorkerSettings
from audit_worker.crypto import LocalSigner, TreeHead
from audit_worker.errors import (
    AdoptedRowError,
    ConfigurationError,
    SequenceError,
    UntrustedHeadError,
)
from audit_worker.merkle import CompactRange, hash_leaf, root_from_leaf_hashes
from audit_worker.service import Assembly
from audit_worker.verify import verify_log
from tests.support import drain, encode, make_event, running_parts, worker_settings

EVENTS = 40
HUGE = 10**9


@pytest.fixture
async def log(parts: Assembly, producer: aioredis.Redis) -> AsyncIterator[Assembly]:
    """A log of 40 events in 2 batches, each followed by a signed tree head."""
    await _add(parts, producer, 0, EVENTS // 2)
    await parts.worker.sign_tree_head()
    await _add(parts, producer, EVENTS // 2, EVENTS // 2)
    await parts.worker.sign_tree_head()
    yield parts


async def _add(parts: Assembly, producer: aioredis.Redis, first: int, n: int) -> None:
    async with producer.pipeline(transaction=False) as pipe:
        for i in range(first, first + n):
            pipe.xadd(parts.worker.intake.stream, {"event": encode(make_event(i))})
        await pipe.execute()
    await drain(parts, idle_rounds=1)


async def _as_superuser(pool: asyncpg.Pool, sql: str, *args: object) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(sql, *args)


async def _plant_head(
    pool: asyncpg.Pool, head: TreeHead, signature: bytes, frontier: bytes
) -> None:
    await _as_superuser(
        pool,
        "INSERT INTO audit.tree_heads (tree_size, root_hash, timestamp_ms, log_id, signature,"
        " signer_ref, frontier) VALUES ($1, $2, $3, $4, $5, 'local:planted', $6)",
        head.tree_size, head.root_hash, head.timestamp_ms, head.log_id, signature, frontier,
    )


def _real_signer(settings: WorkerSettings) -> LocalSigner:
    return LocalSigner(settings.local_key_dir / "signing.pem")


def _fake_frontier(size: int) -> CompactRange:
    """A well-formed compact range of `size` leaves that no log holds."""
    return CompactRange.from_state(size, [os.urandom(32) for _ in range(size.bit_count())])


async def _state(pool: asyncpg.Pool) -> tuple[int, int, int]:
    """(rows, highest index, heads) as stored."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM audit.events),"
            " (SELECT coalesce(max(log_index), -1) FROM audit.events),"
            " (SELECT count(*) FROM audit.tree_heads)"
        )
    assert row is not None
    return row[0], row[1], row[2]


async def _restart_fails(settings: WorkerSettings, error: type[Exception], match: str) -> str:
    with pytest.raises(error, match=match) as caught:
        async with running_parts(settings):
            pytest.fail("the worker resumed from a log it must not trust")
    message = str(caught.value)
    assert "stop the writers and run `audit-worker verify`" in message
    return message


# --------------------------------------------------------------------------- the head


async def test_huge_head_signed_by_another_key_halts_the_restart_and_skips_no_index(
    log: Assembly, settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    fake = _fake_frontier(HUGE)
    head = TreeHead("audit-log", HUGE, fake.root(), int(time.time() * 1000))
    await _plant_head(
        log.pool, head, other.sign(head.signing_input(), ec.ECDSA(hashes.SHA256())),
        b"".join(fake.hashes),
    )
    before = await _state(log.pool)
    message = await _restart_fails(settings, UntrustedHeadError, "not signed by")
    assert f"size {HUGE}" in message
    assert await _state(log.pool) == before  # nothing signed, nothing appended
    # once the operator has removed the planted head, the next event gets index 40
    await _as_superuser(log.pool, f"DELETE FROM audit.tree_heads WHERE tree_size = {HUGE}")
    async with running_parts(settings) as resumed:
        assert resumed.worker.frontier.size == EVENTS
        await _add(resumed, producer, 100, 1)
    assert await _state(log.pool) == (EVENTS + 1, EVENTS, 2)


async def test_real_key_head_whose_frontier_is_not_the_signed_root_halts(
    log: Assembly, settings: WorkerSettings
) -> None:
    head = TreeHead("audit-log", HUGE, os.urandom(32), int(time.time() * 1000))
    signature = _real_signer(settings).sign(head.signing_input())
    await _plant_head(log.pool, head, signature, b"".join(_fake_frontier(HUGE).hashes))
    before = await _state(log.pool)
    await _restart_fails(settings, UntrustedHeadError, "root is not the signed root")
    assert await _state(log.pool) == before


async def test_real_key_head_with_a_frontier_of_the_wrong_length_halts(
    log: Assembly, settings: WorkerSettings
) -> None:
    head = TreeHead("audit-log", HUGE, os.urandom(32), int(time.time() * 1000))
    signature = _real_signer(settings).sign(head.signing_input())
    await _plant_head(log.pool, head, signature, b"")
    await _restart_fails(settings, UntrustedHeadError, "frontier of 0 bytes, want 416")


@pytest.mark.parametrize(
    ("size", "first_checked"),
    [(EVENTS + 10, EVENTS + 8), (EVENTS + 1, EVENTS), (HUGE, HUGE - 512)],
    ids=["ten-more", "one-more", "huge"],
)
async def test_real_key_head_beyond_the_rows_halts_the_restart(
    log: Assembly, settings: WorkerSettings, size: int, first_checked: int
) -> None:
    # a consistent frontier, signed with the real key, over leaves that were never stored
    # (after the true 40, when it is not huge)
    if size == HUGE:
        frontier = _fake_frontier(HUGE)
    else:
        async with log.pool.acquire() as conn:
            leaves = [bytes(r[0]) for r in await conn.fetch(
                "SELECT leaf_hash FROM audit.events ORDER BY log_index")]
        frontier = CompactRange()
        frontier.extend([*leaves, *(os.urandom(32) for _ in range(size - EVENTS))])
    head = TreeHead("audit-log", size, frontier.root(), int(time.time() * 1000))
    signature = _real_signer(settings).sign(head.signing_input())
    await _plant_head(log.pool, head, signature, b"".join(frontier.hashes))
    before = await _state(log.pool)
    message = await _restart_fails(settings, UntrustedHeadError, "which is missing")
    # the first row of the head's rightmost subtree (which the resume check reads)
    assert f"(size {size}) covers row {first_checked}," in message
    assert await _state(log.pool) == before


async def test_changed_last_row_under_the_head_halts_the_restart(
    log: Assembly, settings: WorkerSettings
) -> None:
    last = EVENTS - 1
    async with log.pool.acquire() as conn:
        data = bytes(await conn.fetchval(
            "SELECT leaf_data FROM audit.events WHERE log_index = $1", last))
    forged = data.replace(b'"outcome":0', b'"outcome":8')
    # consistent with itself (leaf hash recomputed), not with the signed frontier
    await _as_superuser(
        log.pool,
        "UPDATE audit.events SET leaf_data = $1, leaf_hash = $2 WHERE log_index = $3",
        forged, hash_leaf(forged), last,
    )
    await _restart_fails(settings, UntrustedHeadError, "do not hash to its stored frontier")


# --------------------------------------------------------------------------- adopted rows


async def _plant_row(pool: asyncpg.Pool, index: int, leaf_data: bytes, leaf_hash: bytes) -> None:
    await _as_superuser(
        pool,
        "INSERT INTO audit.events (log_index, event_id, recorded, occurred, action, outcome,"
        " patient_hmac, actor_hmac, data_key_id, leaf_data, leaf_hash)"
        " SELECT $1, gen_random_uuid(), recorded, occurred, action, outcome, patient_hmac,"
        " actor_hmac, data_key_id, $2, $3 FROM audit.events WHERE log_index = 0",
        index, leaf_data, leaf_hash,
    )


async def _row_zero(pool: asyncpg.Pool) -> bytes:
    async with pool.acquire() as conn:
        return bytes(await conn.fetchval("SELECT leaf_data FROM audit.events WHERE log_index = 0"))


async def _planted_with_wrong_hash(pool: asyncpg.Pool) -> None:
    data = (await _row_zero(pool)).replace(b'{"log_index":0,', b'{"log_index":%d,' % EVENTS)
    await _plant_row(pool, EVENTS, data, hash_leaf(data + b" "))


async def _planted_for_another_index(pool: asyncpg.Pool) -> None:
    data = await _row_zero(pool)  # hashes to its leaf hash, but names index 0
    await _plant_row(pool, EVENTS, data, hash_leaf(data))


PLANTS = {
    "wrong-leaf-hash": (_planted_with_wrong_hash, "does not hash to its stored leaf hash"),
    "claims-another-index": (_planted_for_another_index, "written for another log index"),
}


@pytest.mark.parametrize("plant", PLANTS, ids=list(PLANTS))
async def test_planted_row_halts_a_catching_up_worker_before_it_appends_or_signs(
    log: Assembly, producer: aioredis.Redis, plant: str
) -> None:
    make, match = PLANTS[plant]
    await make(log.pool)
    await producer.xadd(log.worker.intake.stream, {"event": encode(make_event(500))})
    entries = await log.worker.intake.read_batch(10, 20)
    with pytest.raises(AdoptedRowError, match=match) as caught:
        await log.worker.process(entries)  # the append's catch-up meets the row
    assert f"row {EVENTS}:" in str(caught.value)
    with pytest.raises(AdoptedRowError, match=match):
        await log.worker.sign_tree_head(force=True)  # so does the signer's
    assert await _state(log.pool) == (EVENTS + 1, EVENTS, 2)  # only the planted row
    assert log.worker.frontier.size == EVENTS


@pytest.mark.parametrize("plant", PLANTS, ids=list(PLANTS))
async def test_planted_row_halts_a_restart(
    log: Assembly, settings: WorkerSettings, plant: str
) -> None:
    make, match = PLANTS[plant]
    await make(log.pool)
    await _restart_fails(settings, AdoptedRowError, match)


async def test_without_a_head_the_range_is_rebuilt_from_every_row_rehashed(
    parts: Assembly, settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    await _add(parts, producer, 0, 10)  # no head signed
    async with parts.pool.acquire() as conn:
        leaves = [bytes(r[0]) for r in await conn.fetch(
            "SELECT leaf_hash FROM audit.events ORDER BY log_index")]
    async with running_parts(settings) as resumed:
        assert resumed.worker.frontier.size == 10
        assert resumed.worker.frontier.root() == root_from_leaf_hashes(leaves)
    await _as_superuser(
        parts.pool, "UPDATE audit.events SET leaf_hash = sha256(leaf_hash) WHERE log_index = 3"
    )
    message = await _restart_fails(settings, AdoptedRowError, "row 3: its leaf data does not")
    assert "MRN" not in message


async def test_gap_after_the_head_is_still_a_sequence_error(
    log: Assembly, settings: WorkerSettings
) -> None:
    data = (await _row_zero(log.pool)).replace(b'{"log_index":0,', b'{"log_index":45,')
    await _plant_row(log.pool, 45, data, hash_leaf(data))
    await _restart_fails(settings, SequenceError, f"log index 45 found where {EVENTS}")


# --------------------------------------------------------------------------- key rotation


def _rotated_settings(settings: WorkerSettings, tmp_path: Path, **extra: object) -> WorkerSettings:
    """The same log, restarted with a new signing key (the data master key is kept)."""
    keys = tmp_path / "rotated-keys"
    keys.mkdir(exist_ok=True)
    shutil.copy(settings.local_key_dir / "master.key", keys / "master.key")
    LocalSigner(keys / "signing.pem", create=True)
    return settings.model_copy(update={"local_key_dir": keys, **extra})


def _trusted_file(settings: WorkerSettings, tmp_path: Path, window: str) -> Path:
    (tmp_path / "signing-old.pem").write_bytes(_real_signer(settings).public_key_pem())
    path = tmp_path / "trusted-keys.yaml"
    path.write_text(f"keys:\n  - public_key_file: signing-old.pem\n    {window}\n")
    return path


async def test_head_signed_by_a_rotated_out_key_in_the_trusted_file_resumes(
    log: Assembly, settings: WorkerSettings, producer: aioredis.Redis, tmp_path: Path
) -> None:
    until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    trusted = _trusted_file(settings, tmp_path, f"valid_until: '{until}'")
    rotated = _rotated_settings(settings, tmp_path, trusted_keys_file=trusted)
    async with running_parts(rotated) as resumed:
        assert resumed.worker.frontier.size == EVENTS
        await _add(resumed, producer, 100, 5)
        await resumed.worker.sign_tree_head()
        new_key = resumed.worker.signer.public_key_pem()
    old_key = _real_signer(settings).public_key_pem()
    async with log.pool.acquire() as conn:
        report = await verify_log(
            cast(asyncpg.Connection, conn), [old_key, new_key], log_id="audit-log"
        )
    assert report.ok and report.verified_size == EVENTS + 5, report.findings
    # the new key's head is now the newest: the same worker resumes without the file
    async with running_parts(rotated.model_copy(update={"trusted_keys_file": None})) as again:
        assert again.worker.frontier.size == EVENTS + 5


async def test_rotated_out_key_outside_its_window_halts_the_restart(
    log: Assembly, settings: WorkerSettings, tmp_path: Path
) -> None:
    trusted = _trusted_file(settings, tmp_path, "valid_until: '2001-01-01T00:00:00Z'")
    rotated = _rotated_settings(settings, tmp_path, trusted_keys_file=trusted)
    before = await _state(log.pool)
    await _restart_fails(rotated, UntrustedHeadError, "window does not cover")
    assert await _state(log.pool) == before


async def test_rotated_key_without_the_trusted_file_halts_the_restart(
    log: Assembly, settings: WorkerSettings, tmp_path: Path
) -> None:
    await _restart_fails(_rotated_settings(settings, tmp_path), UntrustedHeadError,
                         f"size {EVENTS}\\) is not signed by")


async def test_unusable_trusted_keys_file_is_a_configuration_error(
    log: Assembly, settings: WorkerSettings, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("keys: []\n")
    with pytest.raises(ConfigurationError, match=r"AUDIT_TRUSTED_KEYS_FILE: .*non-empty list"):
        async with running_parts(settings.model_copy(update={"trusted_keys_file": broken})):
            pass
    with pytest.raises(ValueError, match=r"absent\.yaml is not a file: mount"):
        worker_settings(
            settings.database_url.get_secret_value(), settings.redis_url.get_secret_value(),
            tmp_path, trusted_keys_file=str(tmp_path / "absent.yaml"),
        )


# --------------------------------------------------------------------------- healthy logs


async def test_healthy_restart_resumes_at_the_signed_head(
    log: Assembly, settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    async with running_parts(settings) as resumed:
        assert resumed.worker.frontier.size == EVENTS
        assert resumed.worker.frontier.root() == log.worker.frontier.root()
        await _add(resumed, producer, 100, 7)  # sizes 47: the odd last leaf is checked
        await resumed.worker.sign_tree_head()
    async with running_parts(settings) as again:
        assert again.worker.frontier.size == EVENTS + 7


async def test_two_workers_appending_alternately_adopt_each_others_rows(
    log: Assembly, settings: WorkerSettings, producer: aioredis.Redis
) -> None:
    async with running_parts(settings.model_copy(update={"consumer_name": "second"})) as other:
        for turn in range(6):
            await _add(other if turn % 2 else log, producer, 1000 + turn * 10, 10)
        first = await log.worker.sign_tree_head()
        second = await other.worker.sign_tree_head()
        assert first is not None and second is not None
        assert (first.tree_size, first.root_hash) == (second.tree_size, second.root_hash)
    pem = log.worker.signer.public_key_pem()
    async with log.pool.acquire() as conn:
        report = await verify_log(cast(asyncpg.Connection, conn), pem, log_id="audit-log")
    assert report.ok and report.verified_size == EVENTS + 60, report.findings

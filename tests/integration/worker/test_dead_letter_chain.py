"""Dead letters are hash-chained (migration 0004): every edit and every removal but the
newest ones is found by `verify`, the witness API finds the rest, and every way a row
reaches the table (this release, the release before, the migration) chains it alike.

Tampering is done for real as a database superuser: the append-only trigger is bypassed
with ``session_replication_role = replica`` (which also skips the chain trigger).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from audit_worker.db.migrate import migrate
from audit_worker.db.store import (
    DeadLetter,
    dead_letter_chain_head,
    verify_dead_letter_chain,
)
from audit_worker.deadletter_chain import GENESIS
from audit_worker.errors import DeadLetterChainError, IntegrityError
from audit_worker.events import Rejection
from audit_worker.service import Assembly
from audit_worker.verify import VerifyReport, verify_log
from tests.support import drain, encode, make_event

LETTERS = 6


def letter(n: int, payload: bytes | None = b"sealed bytes") -> DeadLetter:
    return DeadLetter(
        Rejection("occurred", "string", "bad_timestamp", "occurred is not a date-time"),
        stream_entry_id=f"1700000000000-{n}", delivery_count=1 + n % 3,
        payload_sealed=payload, data_key_id="dk-1" if payload is not None else None,
    )


@pytest.fixture
async def chained(parts: Assembly, producer: aioredis.Redis) -> AsyncIterator[Assembly]:
    """Six dead letters: two refused by the worker itself, four appended in two batches."""
    stream = parts.worker.intake.stream
    await producer.xadd(stream, {"event": b"{not json"})
    await producer.xadd(stream, {"event": encode(make_event(1, action="Z"))})
    await drain(parts, idle_rounds=1)
    frontier = parts.worker.frontier
    await parts.worker.store.append(frontier, [], dead_letters=[letter(2), letter(3, None)])
    await parts.worker.store.append(frontier, [], dead_letters=[letter(4), letter(5)])
    await parts.worker.sign_tree_head()
    yield parts


async def _verify(parts: Assembly) -> VerifyReport:
    async with parts.pool.acquire() as conn:
        return await verify_log(conn, parts.worker.signer.public_key_pem(),
                                log_id=parts.worker.store.log_id)


async def _tamper(parts: Assembly, *statements: str) -> None:
    async with parts.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        for sql in statements:
            await conn.execute(sql)


async def _head(parts: Assembly) -> tuple[int, bytes]:
    async with parts.pool.acquire() as conn:
        return await dead_letter_chain_head(conn)


async def _recompute(parts: Assembly, start: int = 0, start_hash: bytes = GENESIS
                     ) -> tuple[int, bytes]:
    async with parts.pool.acquire() as conn:
        return await verify_dead_letter_chain(conn, start, start_hash)


def _found(report: VerifyReport) -> list[tuple[str, int | None]]:
    return [(f.kind, f.index) for f in report.findings]


async def test_the_workers_dead_letters_form_one_chain_that_verifies(chained: Assembly) -> None:
    report = await _verify(chained)
    assert report.ok, report.findings
    head = await _head(chained)
    assert head[0] == LETTERS
    assert (report.dead_letters, report.dead_letter_chain_hash) == head
    assert await _recompute(chained) == head
    async with chained.pool.acquire() as conn:
        rows = await conn.fetch("SELECT chain_index FROM audit.dead_letters ORDER BY id")
    assert [r["chain_index"] for r in rows] == list(range(LETTERS))


async def test_the_report_says_deleting_the_newest_dead_letters_needs_a_witness(
        chained: Assembly) -> None:
    report = await _verify(chained)
    assert any("newest ones deleted" in limit for limit in report.limits)
    assert report.as_dict()["dead_letter_chain_hash"] == report.dead_letter_chain_hash.hex()


async def test_an_entry_dead_lettered_again_is_skipped_without_a_gap(chained: Assembly) -> None:
    before = await _head(chained)
    await chained.worker.store.append(chained.worker.frontier, [],
                                      dead_letters=[letter(4), letter(9), letter(9)])
    count, _ = await _head(chained)
    assert count == before[0] + 1
    assert (await _verify(chained)).ok


async def test_a_batch_without_dead_letters_leaves_the_chain_alone(chained: Assembly) -> None:
    before = await _head(chained)
    await chained.worker.store.append(chained.worker.frontier, [])
    assert await _head(chained) == before


async def test_an_edited_dead_letter_is_found_at_its_chain_index(chained: Assembly) -> None:
    await _tamper(chained, "UPDATE audit.dead_letters SET rule = 'schema' WHERE chain_index = 2")
    report = await _verify(chained)
    assert _found(report) == [("dead_letter_changed", 2)]
    assert report.findings[0].dead_letter_id is not None
    with pytest.raises(DeadLetterChainError) as caught:
        await _recompute(chained)
    assert (caught.value.index, caught.value.check) == (2, "hash")
    assert isinstance(caught.value, IntegrityError)


async def test_an_edited_payload_is_found(chained: Assembly) -> None:
    await _tamper(chained, "UPDATE audit.dead_letters SET payload_sealed = 'other'"
                           " WHERE chain_index = 4")
    assert _found(await _verify(chained)) == [("dead_letter_changed", 4)]


async def test_an_edit_with_its_chain_hash_recomputed_breaks_the_next_link(
        chained: Assembly) -> None:
    # the forger recomputes row 1's hash with the database's own function, not row 2's
    await _tamper(
        chained,
        "UPDATE audit.dead_letters d SET message = 'nothing to see',"
        " chain_hash = audit.dead_letter_chain_hash(p.chain_hash, d.chain_index,"
        " d.stream_entry_id, d.received_at, d.field, d.value_class, d.rule, 'nothing to see',"
        " d.delivery_count, d.payload_sealed, d.data_key_id)"
        " FROM audit.dead_letters p WHERE d.chain_index = 1 AND p.chain_index = 0",
    )
    assert _found(await _verify(chained)) == [("dead_letter_changed", 2)]


async def test_a_dead_letter_deleted_in_the_middle_is_a_gap(chained: Assembly) -> None:
    await _tamper(chained, "DELETE FROM audit.dead_letters WHERE chain_index = 3")
    report = await _verify(chained)
    assert _found(report) == [("dead_letter_deleted", 3)]
    assert report.dead_letters == LETTERS  # the rows after the gap still count and check
    with pytest.raises(DeadLetterChainError) as caught:
        await _recompute(chained)
    assert (caught.value.index, caught.value.check) == (3, "index")


async def test_deleting_the_newest_dead_letter_is_seen_only_against_a_witnessed_head(
        chained: Assembly) -> None:
    witnessed = await _head(chained)
    await _tamper(chained, f"DELETE FROM audit.dead_letters WHERE chain_index = {LETTERS - 1}")
    report = await _verify(chained)
    assert report.ok  # what one database cannot show, as its limits say
    assert (report.dead_letters, report.dead_letter_chain_hash) != witnessed
    assert report.dead_letters == LETTERS - 1
    with pytest.raises(DeadLetterChainError) as caught:
        await _recompute(chained, *witnessed)
    assert (caught.value.index, caught.value.check) == (LETTERS - 1, "start")


async def test_the_witness_api_extends_a_witnessed_head(chained: Assembly) -> None:
    witnessed = await _head(chained)
    await chained.worker.store.append(chained.worker.frontier, [], dead_letters=[letter(7)])
    count, latest = await _recompute(chained, *witnessed)
    assert (count, latest) == await _head(chained) and count == LETTERS + 1
    assert await _recompute(chained, count, latest) == (count, latest)  # nothing new
    with pytest.raises(DeadLetterChainError, match="holds another chain hash"):
        await _recompute(chained, count, bytes(32))
    with pytest.raises(ValueError, match="32 bytes"):
        await _recompute(chained, 0, b"short")


async def test_a_dead_letter_inserted_with_triggers_bypassed_is_unchained(
        chained: Assembly) -> None:
    await _tamper(chained, "INSERT INTO audit.dead_letters (field, value_class, rule, message)"
                           " VALUES ('f', 'c', 'r', 'planted')")
    report = await _verify(chained)
    assert [f.kind for f in report.findings] == ["dead_letter_unchained"]
    assert report.findings[0].dead_letter_id is not None


async def test_an_insert_by_the_previous_release_is_chained_by_the_database(
        chained: Assembly) -> None:
    """The release before 0004 knows no chain columns and lets received_at default (in
    microseconds): the trigger's SQL must give the bytes the Python verifier recomputes."""
    async with chained.pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO audit.dead_letters (stream_entry_id, field, value_class, rule,"
            " message, delivery_count, payload_sealed, data_key_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (stream_entry_id) DO NOTHING",
            [("old-1", "event", "missing", "required", "é ünïcode", 5, b"\x00\xff", "dk"),
             (None, "(event)", "bytes", "not_utf8", "m", 1, None, None)],
        )
    await chained.worker.store.append(chained.worker.frontier, [], dead_letters=[letter(8)])
    report = await _verify(chained)
    assert report.ok, report.findings
    assert report.dead_letters == LETTERS + 3


async def test_rows_from_before_0004_are_chained_by_the_migration_in_id_order(
        fresh_database: str) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        await migrate(conn, target=3)
        await conn.execute(
            "INSERT INTO audit.dead_letters (stream_entry_id, field, value_class, rule, message,"
            " payload_sealed, data_key_id) SELECT 's-' || g, 'f', 'c', 'r', 'message ' || g,"
            " CASE WHEN g % 2 = 0 THEN sha256(g::text::bytea) END, 'dk'"
            " FROM generate_series(1, 5) g"
        )
        await migrate(conn)
        rows = await conn.fetch("SELECT id, chain_index FROM audit.dead_letters ORDER BY id")
        assert [r["chain_index"] for r in rows] == list(range(5))
        assert await verify_dead_letter_chain(conn, 0, GENESIS) == await dead_letter_chain_head(
            conn)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("UPDATE audit.dead_letters SET rule = 'x'")  # trigger back on
    finally:
        await conn.close()

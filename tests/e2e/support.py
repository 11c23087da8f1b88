"""Helpers of the end-to-end tests (see conftest.py for the environment)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx

from audit_worker.verify import VerifyReport, verify_log
from auditctl.gates import Thresholds

# Shorter waits than production's defaults; the checks themselves are the same.
FAST = Thresholds(
    readiness_timeout_seconds=30, smoke_timeout_seconds=20, analysis_seconds=1.0,
)


def wait_ready_sync(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {timeout}s")


async def stored_counts(url: str, event_ids: list[str]) -> tuple[int, int]:
    """(distinct of these ids in the log, rows holding them)."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT count(DISTINCT event_id) AS distinct_ids, count(*) AS rows"
            " FROM audit.events WHERE event_id = ANY($1::uuid[])", event_ids,
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["distinct_ids"]), int(row["rows"])


async def wait_all_stored(url: str, event_ids: list[str], timeout: float = 60) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        distinct, rows = await stored_counts(url, event_ids)
        if distinct == len(event_ids) or time.monotonic() > deadline:
            return distinct, rows
        await asyncio.sleep(0.2)


async def verify(url: str, public_key_pem: bytes, log_id: str) -> VerifyReport:
    conn = await asyncpg.connect(url)
    try:
        return await verify_log(conn, public_key_pem, log_id=log_id, allow_unsigned_tail=True)
    finally:
        await conn.close()


async def duplicate_rows(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) - count(DISTINCT event_id) FROM audit.events"
        ))
    finally:
        await conn.close()

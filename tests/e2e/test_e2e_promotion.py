"""Blue-green promotion on the local platform, for real: worker processes per slot, the
control key in Redis, the log in PostgreSQL. The tests share one environment and run in
order; each starts from whatever slot the previous one left active."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import asyncpg
import pytest

from audit_worker.client import prepare
from audit_worker.localenv.platform import LocalStack, producing
from auditctl.gates import Thresholds
from auditctl.platforms.local import LocalPlatform
from auditctl.promotion import Phase, PromotionRecord, other
from auditctl.release import PromoteOptions, promote, rollback
from tests.e2e.support import FAST, duplicate_rows, verify, wait_all_stored

pytestmark = pytest.mark.e2e


async def _promote(
    platform: LocalPlatform,
    image: str | None,
    *,
    auto_promote: bool = True,
    yes: bool = False,
    scale_down_delay_seconds: float | None = None,
    thresholds: Thresholds = FAST,
) -> PromotionRecord:
    return await promote(
        platform,
        PromoteOptions(image, yes=yes, scale_down_delay_seconds=scale_down_delay_seconds,
                       thresholds=thresholds),
        environment="local", auto_promote=auto_promote, scale_down_delay_seconds=30,
    )


async def _serving(platform: LocalPlatform, count: int = 20) -> None:
    """Events written now are stored: some slot is consuming."""
    events = []
    for _ in range(count):
        parsed, _ = prepare(action="R", code="rest-read", outcome=0, source={"observer": "e2e"},
                            agent={"who": "e2e-check", "role": "physician"})
        events.append(parsed.model_dump(mode="json", exclude_none=True))
    await platform.submit_events(events, via_slot=None)
    distinct, _ = await wait_all_stored(await platform.database_url(),
                                        [str(e["event_id"]) for e in events], timeout=20)
    assert distinct == count


async def test_promotion_under_load_loses_nothing_and_the_log_verifies(
    platform: LocalPlatform, local_stack: LocalStack
) -> None:
    before = await platform.control()
    assert before is not None
    async with producing(local_stack.state_dir, rate=300) as producer:
        await asyncio.sleep(1.0)
        record = await _promote(platform, "0.2.0", scale_down_delay_seconds=1.0)
        await asyncio.sleep(1.0)
    assert record.phase is Phase.COMPLETED, (record.reason, record.failed_gates())
    assert record.to_slot == other(before.slot)
    gates = {(g.stage, g.name): g for g in record.gates}
    assert gates[("post-switch", "consistency")].passed
    assert gates[("pre-switch", "smoke")].passed and gates[("post-switch", "smoke")].passed
    assert record.switch_seconds is not None and record.switch_seconds < 1.0
    print(f"\nslot switch under {producer.rate:.0f} events/s: "
          f"{record.switch_seconds * 1000:.0f} ms until both slots acknowledged")

    ids = producer.all_ids()
    assert len(ids) > 300 and producer.errors == 0
    url = await platform.database_url()
    distinct, rows = await wait_all_stored(url, ids)
    assert (distinct, rows) == (len(ids), len(ids)), "events lost or stored twice"
    assert await duplicate_rows(url) == 0
    report = await verify(url, await platform.public_key_pem(), platform.log_id)
    assert report.ok, report.findings[:5]
    slots = await platform.slots()
    assert slots[record.to_slot].running == 1 and slots[record.from_slot].running == 0
    after = await platform.control()
    assert after is not None and after.slot == record.to_slot and after.epoch > before.epoch


async def test_a_broken_image_fails_readiness_and_leaves_the_old_slot_serving(
    platform: LocalPlatform,
) -> None:
    before = await platform.control()
    assert before is not None
    record = await _promote(
        platform, "0.3.0-broken", thresholds=dataclasses.replace(
            FAST, readiness_timeout_seconds=4)
    )
    assert record.phase is Phase.ABORTED
    assert [g.name for g in record.failed_gates()] == ["readiness"]
    assert await platform.control() == before  # same slot, same epoch: never written
    slots = await platform.slots()
    assert slots[record.to_slot].running == 0
    assert (await platform.probe(before.slot, "/readyz")).ok
    await _serving(platform)


async def test_a_contract_migration_is_refused_and_nothing_changes(
    platform: LocalPlatform,
) -> None:
    before = await platform.control()
    url = await platform.database_url()
    conn = await asyncpg.connect(url)
    try:
        versions = await conn.fetch("SELECT version FROM audit.schema_migrations")
        record = await _promote(platform, "0.3.0-contract")
        after_versions = await conn.fetch("SELECT version FROM audit.schema_migrations")
        index = await conn.fetchval("SELECT to_regclass('audit.events_actor_idx')")
    finally:
        await conn.close()
    assert record.phase is Phase.ABORTED
    assert [g.name for g in record.failed_gates()] == ["migrations"]
    assert "contract migration" in (record.reason or "")
    assert after_versions == versions and index is not None
    assert await platform.control() == before
    assert (await platform.slots())[record.to_slot].running == 0
    await _serving(platform)


async def test_an_expand_migration_is_applied_before_the_new_slot_starts(
    platform: LocalPlatform,
) -> None:
    record = await _promote(platform, "0.4.0-expand", scale_down_delay_seconds=0.5)
    assert record.phase is Phase.COMPLETED, (record.reason, record.failed_gates())
    assert record.migrations_applied and "dead_letter_triage" in record.migrations_applied[0]
    conn = await asyncpg.connect(await platform.database_url())
    try:
        column = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'audit'"
            " AND table_name = 'dead_letters' AND column_name = 'triaged_at'"
        )
    finally:
        await conn.close()
    assert column == 1


async def test_rollback_within_the_scale_down_window_switches_back(
    platform: LocalPlatform, local_stack: LocalStack
) -> None:
    before = await platform.control()
    assert before is not None
    async with producing(local_stack.state_dir, rate=200) as producer:
        task = asyncio.create_task(_promote(platform, "0.5.0", scale_down_delay_seconds=60))
        deadline = time.monotonic() + 60
        while True:
            record = await platform.load_promotion()
            if record is not None and record.image == "0.5.0" and \
                    record.phase is Phase.SCALE_DOWN_DELAY:
                break
            assert not task.done(), task.result()
            assert time.monotonic() < deadline, "promotion did not reach its scale-down delay"
            await asyncio.sleep(0.1)
        rolled = await rollback(platform, environment="local")
        promoted = await asyncio.wait_for(task, 10)
        await asyncio.sleep(0.5)
    assert rolled.phase is Phase.ROLLED_BACK and promoted.phase is Phase.ROLLED_BACK
    assert rolled.rollback_seconds is not None and rolled.rollback_seconds < 1.0
    print(f"\nrollback switch: {rolled.rollback_seconds * 1000:.0f} ms")
    now = await platform.control()
    assert now is not None and now.slot == before.slot and now.epoch == before.epoch + 2
    slots = await platform.slots()
    assert slots[before.slot].running == 1 and slots[other(before.slot)].running == 0
    ids = producer.all_ids()
    distinct, rows = await wait_all_stored(await platform.database_url(), ids)
    assert (distinct, rows) == (len(ids), len(ids))
    await _serving(platform)


async def test_manual_promotion_pauses_before_the_switch_until_confirmed(
    platform: LocalPlatform,
) -> None:
    before = await platform.control()
    assert before is not None
    paused = await _promote(platform, "0.6.0", auto_promote=False)
    assert paused.phase is Phase.PAUSED
    assert await platform.control() == before
    assert (await platform.slots())[paused.to_slot].running == 1
    resumed = await _promote(platform, None, auto_promote=False, yes=True,
                             scale_down_delay_seconds=0.5)
    assert resumed.phase is Phase.COMPLETED, (resumed.reason, resumed.failed_gates())
    assert [h.event.value for h in resumed.history][-5:] == [
        "pause", "approve", "switched", "analysis-passed", "delay-elapsed"]
    after = await platform.control()
    assert after is not None and after.slot == paused.to_slot

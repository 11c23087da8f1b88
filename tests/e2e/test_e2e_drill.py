"""DR drill and failback on the local platform, for real: a streaming replica promoted
with pg_promote(), the old primary rebuilt with pg_rewind, producers following the local
endpoint record. The tests run in order on one environment: drill, then failback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from audit_worker.localenv.platform import LocalStack, producing
from auditctl.errors import PlatformError
from auditctl.failover import DrillOptions, drill, failback, preflight_only
from auditctl.platforms.local import LocalPlatform
from auditctl.promotion import Phase
from auditctl.release import PromoteOptions, promote, rollback
from tests.e2e.support import FAST, duplicate_rows, verify, wait_all_stored, wait_ready_sync

pytestmark = pytest.mark.e2e

RTO_GOAL_SECONDS = 30.0


async def test_a_drill_waits_until_no_promotion_is_in_flight(
    platform: LocalPlatform, local_stack: LocalStack
) -> None:
    options = DrillOptions(reports_dir=local_stack.state_dir.parent / "reports",
                           write_reports=False)
    paused = await promote(
        platform, PromoteOptions("0.2.0", thresholds=FAST), environment="local",
        auto_promote=False, scale_down_delay_seconds=30,
    )
    assert paused.phase is Phase.PAUSED
    _, checks = await preflight_only(platform, options)
    gate = next(c for c in checks if c.name == "no-release-in-flight")
    assert not gate.passed and "paused" in gate.detail
    aborted = await rollback(platform, environment="local")
    assert aborted.phase is Phase.ABORTED
    _, checks = await preflight_only(platform, options)
    assert all(c.passed for c in checks), [c.detail for c in checks if not c.passed]


class FailingPromotion(LocalPlatform):
    async def promote_database(self, site: str) -> str:
        raise PlatformError("simulated: the replica refuses to promote")


async def test_a_drill_that_fails_before_the_promotion_restarts_prods_consumers(
    local_stack: LocalStack,
) -> None:
    platform = FailingPromotion(local_stack)
    report = await drill(platform, DrillOptions(
        reports_dir=local_stack.state_dir.parent / "reports", write_reports=False))
    assert not report.ok
    steps = {e.key: e.ok for e in report.timeline}
    assert steps["freeze"] and not steps["promote"] and steps["unfreeze"]
    assert "simulated" in " ".join(report.verdict())
    topology = await platform.topology()
    assert topology.primary == "prod" and topology.replica == "dr"
    control = await platform.control()
    assert control is not None
    wait_ready_sync(local_stack.worker_url("prod", control.slot))
    assert any("started again" in line for line in report.leaves_behind)


async def test_drill_under_load_measures_rto_and_rpo_and_writes_the_report(
    platform: LocalPlatform, local_stack: LocalStack, tmp_path: object
) -> None:
    reports = local_stack.state_dir.parent / "reports"
    options = DrillOptions(reports_dir=reports)
    # 1 entry in 50 is bad input: dead-lettered, and not an event RPO may count as lost.
    async with producing(local_stack.state_dir, rate=200, malformed_every=50) as producer:
        await asyncio.sleep(1.5)
        report = await drill(platform, options)
        await asyncio.sleep(1.0)  # producers now write to DR
    assert report.ok, report.verdict()
    assert report.rto_seconds is not None and report.rto_seconds < RTO_GOAL_SECONDS
    assert report.rpo is not None
    assert report.rpo.missing == 0 and report.rpo.acknowledged > 0  # planned switchover: RPO 0
    assert report.rpo.lag_at_t0_seconds is not None
    assert report.consistency is not None and report.consistency.verified
    print(f"\nlocal drill under {producer.rate:.0f} events/s: RTO {report.rto_seconds:.2f} s, "
          f"RPO {report.rpo.missing} events of {report.rpo.acknowledged}, lag at T0 "
          f"{report.rpo.lag_at_t0_seconds * 1000:.0f} ms, handed off {report.rpo.handed_off}")

    paths = options.report_paths
    assert set(paths) == {"markdown", "json", "html"}
    data = json.loads(paths["json"].read_text())
    assert data["ok"] and data["rpo"]["missing"] == 0
    html = paths["html"].read_text()
    assert "<svg" in html and "<script" not in html
    assert "RTO" in paths["markdown"].read_text()

    topology = await platform.topology()
    assert topology.primary == "dr" and topology.endpoint_site == "dr"
    assert producer.acked["dr"], "producers did not follow the endpoint record to DR"
    dr_url = await platform.database_url("dr")
    ids = producer.all_ids()
    distinct, rows = await wait_all_stored(dr_url, ids)
    assert (distinct, rows) == (len(ids), len(ids)), "acknowledged events lost or duplicated"
    assert await duplicate_rows(dr_url) == 0
    result = await verify(dr_url, await platform.public_key_pem("dr"), platform.log_id)
    assert result.ok, result.findings[:5]


async def test_failback_rewinds_prod_and_switches_back_without_loss(
    platform: LocalPlatform, local_stack: LocalStack
) -> None:
    options = DrillOptions(reports_dir=local_stack.state_dir.parent / "reports")
    async with producing(local_stack.state_dir, rate=200) as producer:
        await asyncio.sleep(1.0)
        report = await failback(platform, options)
        await asyncio.sleep(1.0)
    assert report.ok, report.verdict()
    assert report.rpo is not None and report.rpo.missing == 0
    rebuild = next(e for e in report.timeline if e.key == "rebuild")
    assert "rewind" in rebuild.detail or "Done" in rebuild.detail
    print(f"\nlocal failback: RTO {report.rto_seconds:.2f} s, RPO {report.rpo.missing}")
    topology = await platform.topology()
    assert topology.primary == "prod" and topology.replica == "dr"
    assert topology.endpoint_site == "prod"
    replica = await platform.replica()
    assert replica is not None and replica.state == "streaming"
    prod_url = await platform.database_url("prod")
    ids = producer.all_ids()
    distinct, rows = await wait_all_stored(prod_url, ids)
    assert (distinct, rows) == (len(ids), len(ids))
    result = await verify(prod_url, await platform.public_key_pem("prod"), platform.log_id)
    assert result.ok, result.findings[:5]


def test_the_cli_finds_the_environment_from_another_process(local_stack: LocalStack) -> None:
    reply = subprocess.run(
        [sys.executable, "-m", "auditctl.cli", "status", "local", "--output", "json"],
        env={**os.environ, "AUDITCTL_LOCAL_DIR": str(local_stack.state_dir)},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert reply.returncode == 0, reply.stderr
    status = json.loads(reply.stdout)
    assert status["status"] == "Healthy"
    assert status["primary_site"] == "prod" and status["replica"]["state"] == "streaming"

"""DR drill and failback, written once against `FailoverPlatform`.

Both run the planned switchover of `auditctl.drill` from the primary's site (source) to the
site of its streaming replica (target); failback first rebuilds the old primary as a
replica (and afterwards the other site), then switches back. Everything the steps measure
goes into a `DrillReport`, written as Markdown, JSON and HTML under ``reports/``.

Replication lag is measured with heartbeat writes: a row in ``auditctl.heartbeat`` on the
primary, timed until the replica shows it, and the WAL distance (bytes) at that moment.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from audit_worker.client import prepare
from audit_worker.crypto import SignatureError, public_key_fingerprint
from auditctl.drill import (
    Canary,
    ConsistencyResult,
    DrillPlan,
    DrillReport,
    Kind,
    compute_rpo,
    make_plan,
)
from auditctl.errors import AuditctlError, Refused
from auditctl.gates import GateResult
from auditctl.logcheck import (
    check_signature,
    event_ids_since,
    log_size,
    newest_head,
    open_log,
    present,
    prove_extends,
    wait_for_head,
    wait_for_signed_inclusion,
)
from auditctl.platform import FailoverPlatform
from auditctl.progress import Progress, Silent
from auditctl.report import write_reports

HOME_SITE = "prod"
HEARTBEAT_DDL = (
    "CREATE SCHEMA IF NOT EXISTS auditctl;"
    " CREATE TABLE IF NOT EXISTS auditctl.heartbeat ("
    " source text PRIMARY KEY, seq bigint NOT NULL, beat_at timestamptz NOT NULL)"
)


@dataclass
class DrillOptions:
    reports_dir: Path
    rto_target_seconds: float = 30.0
    rpo_target_events: int = 0
    rpo_window_seconds: float = 900.0
    max_replica_lag_seconds: float = 5.0
    catch_up_timeout_seconds: float = 60.0
    canaries: int = 3
    canary_timeout_seconds: float = 30.0
    settle_timeout_seconds: float = 30.0
    write_reports: bool = True
    report_paths: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Heartbeat:
    seconds: float
    lag_bytes: int


async def heartbeat(
    primary_url: str, replica_url: str, *, name: str = "auditctl", timeout: float = 30.0
) -> Heartbeat:
    """Write a heartbeat on the primary and time until the replica shows it."""
    primary = await asyncpg.connect(primary_url, timeout=5)
    replica = await asyncpg.connect(replica_url, timeout=5)
    try:
        await primary.execute(HEARTBEAT_DDL)
        position = await primary.fetchval("SELECT pg_current_wal_insert_lsn()")
        replayed = await replica.fetchval("SELECT pg_last_wal_replay_lsn()")
        lag_bytes = int(position) - int(replayed) if replayed is not None else -1
        seq = await primary.fetchval(
            "INSERT INTO auditctl.heartbeat (source, seq, beat_at)"
            " VALUES ($1, 1, clock_timestamp()) ON CONFLICT (source) DO UPDATE"
            " SET seq = auditctl.heartbeat.seq + 1, beat_at = clock_timestamp()"
            " RETURNING seq", name,
        )
        written = time.monotonic()
        while True:
            try:
                seen = await replica.fetchval(
                    "SELECT seq FROM auditctl.heartbeat WHERE source = $1", name
                )
            except asyncpg.UndefinedTableError:
                seen = None
            if seen is not None and seen >= seq:
                return Heartbeat(time.monotonic() - written, max(0, lag_bytes))
            if time.monotonic() - written > timeout:
                raise TimeoutError(f"heartbeat {seq} not on the replica after {timeout:g}s")
            await asyncio.sleep(0.005)
    finally:
        await primary.close()
        await replica.close()


async def wait_caught_up(primary_url: str, replica_url: str, timeout: float) -> tuple[float, int]:
    """Wait until the replica replayed the primary's current insert position; return
    (seconds, bytes it was behind)."""
    primary = await asyncpg.connect(primary_url, timeout=5)
    try:
        position = int(await primary.fetchval("SELECT pg_current_wal_insert_lsn()"))
    finally:
        await primary.close()
    replica = await asyncpg.connect(replica_url, timeout=5)
    started = time.monotonic()
    behind: int | None = None
    try:
        while True:
            value = await replica.fetchval("SELECT pg_last_wal_replay_lsn()")
            replayed = int(value) if value is not None else 0
            if behind is None:
                behind = max(0, position - replayed)
            if replayed >= position:
                return time.monotonic() - started, behind
            if time.monotonic() - started > timeout:
                raise TimeoutError(
                    f"replica replayed {replayed}, primary wrote {position}: not caught up "
                    f"after {timeout:g}s"
                )
            await asyncio.sleep(0.01)
    finally:
        await replica.close()


def canary_events(count: int, kind: Kind, target: str) -> list[dict[str, Any]]:
    events = []
    for i in range(count):
        event, _ = prepare(
            event_id=str(uuid.uuid4()), action="E", code="dr-canary", outcome=0,
            occurred=datetime.now(UTC).isoformat(),
            agent={"who": "auditctl", "role": "dr-drill"},
            source={"observer": "auditctl", "site": target},
            entity=[{"type": "Drill", "id": f"{kind}#{i}"}],
            detail=f"{kind} canary {i + 1}/{count} in {target}",
        )
        events.append(event.model_dump(mode="json", exclude_none=True))
    return events


class _StepFailed(AuditctlError):
    pass


class Switchover:
    """One planned switchover source -> target, recorded into `report`."""

    def __init__(
        self,
        platform: FailoverPlatform,
        report: DrillReport,
        options: DrillOptions,
        progress: Progress,
    ) -> None:
        self.platform = platform
        self.report = report
        self.options = options
        self.progress = progress
        self.source = report.source
        self.target = report.target

    async def step(self, key: str, work: Callable[[], Awaitable[str]]) -> str:
        title = next((s.title for s in self.report.plan.steps if s.key == key), key)
        self.progress.step(title)
        started = time.time()
        try:
            detail = await work()
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"
            self.report.record(key, started, time.time(), False, detail)
            self.progress.done(title, False, detail, time.time() - started)
            raise _StepFailed(detail) from exc
        entry = self.report.record(key, started, time.time(), True, detail)
        self.progress.done(title, True, detail, entry.seconds)
        return detail

    async def preflight(self) -> bool:
        started = time.time()
        passed = await self._preflight()
        failed = [g.name for g in self.report.preflight if not g.passed]
        self.report.record("preflight", started, time.time(), passed,
                           "all checks passed" if passed else "failed: " + ", ".join(failed),
                           problem=False)
        return passed

    async def _preflight(self) -> bool:
        p, o = self.platform, self.options
        source_url = await p.database_url(self.source)
        target_url = await p.database_url(self.target)
        gates: list[GateResult] = []
        try:
            beat = await heartbeat(source_url, target_url, timeout=o.max_replica_lag_seconds * 4)
            gates.append(GateResult(
                "replica-lag", "drill", beat.seconds <= o.max_replica_lag_seconds,
                f"heartbeat visible on {self.target} after {beat.seconds * 1000:.0f} ms "
                f"({beat.lag_bytes:,} WAL bytes behind; limit {o.max_replica_lag_seconds:g}s)",
                beat.seconds, {"lag_seconds": round(beat.seconds, 4), "lag_bytes": beat.lag_bytes},
            ))
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            gates.append(GateResult("replica-lag", "drill", False, f"heartbeat failed: {exc}"))
        gates.append(await p.capacity(self.target))
        gates.append(await self.keys_gate(source_url))
        gates.append(await self.release_gate())
        self.report.preflight = gates
        for gate in gates:
            self.progress.done(f"pre-flight {gate.name}", gate.passed, gate.detail)
        return all(g.passed for g in gates)

    async def release_gate(self) -> GateResult:
        """No blue-green promotion may be in flight: its scale-down would act on the wrong
        site once the target is the primary."""
        record = await self.platform.load_promotion()
        if record is None or record.finished:
            return GateResult("no-release-in-flight", "drill", True, "no promotion in flight")
        return GateResult(
            "no-release-in-flight", "drill", False,
            f"the promotion of {record.image} is {record.phase}: let it finish or "
            f"`auditctl rollback {self.platform.environment}` first",
        )

    async def keys_gate(self, source_url: str) -> GateResult:
        source_pem = await self.platform.public_key_pem(self.source)
        try:
            target_pem = await self.platform.public_key_pem(self.target)
        except Exception as exc:
            return GateResult("keys", "drill", False, f"{self.target}'s signing key: {exc}")
        same = public_key_fingerprint(source_pem) == public_key_fingerprint(target_pem)
        async with open_log(source_url, self.platform.log_id) as store:
            head = await newest_head(store)
        verifies = True
        if head is not None:
            try:
                check_signature(target_pem, head)
            except SignatureError:
                verifies = False
        ok = same and verifies
        return GateResult(
            "keys", "drill", ok,
            f"{self.target}'s signing key is {self.source}'s "
            f"({public_key_fingerprint(target_pem)[:16]}…) and verifies its newest tree head"
            if ok else f"{self.target}'s signing key differs from {self.source}'s or does not "
            "verify its tree heads",
            measured={"fingerprint": public_key_fingerprint(target_pem)[:16]},
        )

    def done(self, key: str) -> bool:
        return any(e.key == key and e.ok for e in self.report.timeline)

    async def undo_freeze(self) -> None:
        """A step failed after the freeze but before the promotion: the source is still the
        primary, so its consumers start again."""
        if not self.done("freeze") or self.done("promote"):
            return
        started = time.time()
        try:
            detail = await self.platform.unfreeze(self.source)
        except Exception as exc:
            detail = f"could not restart {self.source}'s consumers: {exc}"
            self.report.record("unfreeze", started, time.time(), False, detail)
            return
        self.report.record("unfreeze", started, time.time(), True, detail)
        self.progress.done("unfreeze", True, detail)

    async def run(self) -> None:
        p, o, r = self.platform, self.options, self.report
        source_url = await p.database_url(self.source)
        target_url = await p.database_url(self.target)
        self.progress.step("declare (T0)")
        r.declared_at = time.time()
        t0_beat: Heartbeat | None
        try:
            t0_beat = await heartbeat(source_url, target_url, timeout=o.catch_up_timeout_seconds)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            t0_beat = None
        r.record("declare", r.declared_at, time.time(), True,
                 "replication lag at T0: " + (
                     f"{t0_beat.seconds * 1000:.0f} ms, {t0_beat.lag_bytes:,} WAL bytes"
                     if t0_beat else "not measurable"))
        window_start = r.declared_at - o.rpo_window_seconds

        await self.step("freeze", lambda: p.freeze(self.source))
        source_pem = await p.public_key_pem(self.source)
        async with open_log(source_url, p.log_id) as store:
            source_head = await newest_head(store)
            source_rows = await log_size(store)
            stored_by_source = await event_ids_since(store, window_start)
        if source_head is None:
            r.problems.append(f"{self.source} has no signed tree head to extend")
            raise _StepFailed(r.problems[-1])
        r.figures["source_last_signed_tree_size"] = source_head.tree_size
        r.figures["source_unsigned_tail"] = source_rows - source_head.tree_size

        async def catch_up() -> str:
            seconds, behind = await wait_caught_up(source_url, target_url,
                                                   o.catch_up_timeout_seconds)
            return f"caught up in {seconds * 1000:.0f} ms ({behind:,} WAL bytes behind)"

        await self.step("catch-up", catch_up)
        await self.step("promote", lambda: p.promote_database(self.target))
        await self.step("fence", lambda: p.fence(self.source))
        await self.step("activate", lambda: p.activate(self.target))
        ttl = 0.0

        async def switch() -> str:
            nonlocal ttl
            detail, ttl = await p.switch_endpoint(self.target)
            return f"{detail} (TTL {ttl:g}s)"

        await self.step("switch-endpoint", switch)
        handed = 0

        async def hand_off() -> str:
            nonlocal handed
            await asyncio.sleep(ttl)  # producers may write to the source until the TTL ends
            handed = await p.handoff(self.source, self.target)
            return f"{handed} entries moved after the {ttl:g}s TTL"

        await self.step("handoff", hand_off)
        target_pem = await p.public_key_pem(self.target)

        async def canaries() -> str:
            events = canary_events(o.canaries, r.kind, self.target)
            await p.submit_canaries(self.target, events)
            async with open_log(target_url, p.log_id) as store:
                proofs = await wait_for_signed_inclusion(
                    store, target_pem, [str(e["event_id"]) for e in events],
                    timeout=o.canary_timeout_seconds, poll=0.02,
                )
            r.canaries = [
                Canary(x.event_id, x.log_index, x.tree_size, x.verified, x.verified_at)
                for x in proofs
            ]
            bad = [x for x in proofs if not x.verified]
            if bad:
                raise _StepFailed("; ".join(f"{x.event_id}: {x.detail}" for x in bad))
            return (f"{len(proofs)} canaries proven in {self.target}'s signed tree of "
                    f"{proofs[-1].tree_size}; RTO {r.rto_seconds:.2f}s")

        await self.step("canary", canaries)

        async def consistency() -> str:
            async with open_log(target_url, p.log_id) as store:
                head = await wait_for_head(store, source_head.tree_size, timeout=10)
                if head is None:
                    raise _StepFailed(f"{self.target} has no signed head of size >= "
                                      f"{source_head.tree_size}")
                ext = await prove_extends(store, source_head, head,
                                          old_key_pem=source_pem, new_key_pem=target_pem)
            r.consistency = ConsistencyResult(ext.old_size, ext.new_size, ext.old_root,
                                              ext.new_root, ext.verified, ext.detail)
            if not ext.verified:
                raise _StepFailed(ext.detail)
            return f"{self.target}'s tree of {ext.new_size} extends {self.source}'s " \
                   f"{ext.old_size}: {ext.detail}"

        await self.step("consistency", consistency)

        async def rpo() -> str:
            late = await p.handoff(self.source, self.target)
            acknowledged = stored_by_source | await p.acknowledged(self.source, window_start)
            wanted = sorted(acknowledged)
            deadline = time.monotonic() + o.settle_timeout_seconds
            conn = await asyncpg.connect(target_url)
            try:
                while True:
                    found = await present(conn, wanted)
                    if len(found) == len(wanted) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
            finally:
                await conn.close()
            r.rpo = compute_rpo(
                acknowledged, found, handed_off=handed + late,
                lag_at_t0_seconds=t0_beat.seconds if t0_beat else None,
                lag_at_t0_bytes=t0_beat.lag_bytes if t0_beat else None,
                window_seconds=o.rpo_window_seconds,
            )
            return (f"{r.rpo.missing} of {r.rpo.acknowledged} events acknowledged by "
                    f"{self.source} missing in {self.target} ({late} late entries handed off)")

        await self.step("rpo", rpo)


async def make_drill_plan(
    platform: FailoverPlatform, kind: Kind, options: DrillOptions
) -> DrillPlan:
    topology = await platform.topology()
    if kind == "failback":
        source, target = topology.primary, HOME_SITE
    else:
        source, target = topology.primary, topology.replica or "(no replica)"
    return make_plan(
        kind, platform.environment, platform.name, source, target, platform.describe_steps(),
        rto_target_seconds=options.rto_target_seconds, rpo_target_events=options.rpo_target_events,
    )


async def preflight_only(
    platform: FailoverPlatform, options: DrillOptions, progress: Progress | None = None
) -> tuple[DrillPlan, list[GateResult]]:
    """``drill --plan``: the plan, and the pre-flight checks run now (a heartbeat row is the
    only write)."""
    plan = await make_drill_plan(platform, "drill", options)
    topology = await platform.topology()
    if topology.replica is None:
        return plan, [GateResult("replica-lag", "drill", False,
                                 f"{topology.primary} has no streaming replica")]
    report = DrillReport("drill", platform.environment, platform.name, plan.source, plan.target,
                         plan, time.time())
    switchover = Switchover(platform, report, options, progress or Silent())
    await switchover.preflight()
    return plan, report.preflight


def _finish(report: DrillReport, options: DrillOptions) -> DrillReport:
    report.finished_at = time.time()
    if options.write_reports:
        options.report_paths = write_reports(report, options.reports_dir)
    return report


async def drill(
    platform: FailoverPlatform, options: DrillOptions, progress: Progress | None = None
) -> DrillReport:
    """Execute a DR drill (planned switchover to the replica's site) and write the report."""
    progress = progress or Silent()
    topology = await platform.topology()
    if topology.replica is None:
        raise Refused(
            f"{topology.primary} has no streaming replica to fail over to"
            + (f": run `auditctl failback {platform.environment}` first"
               if topology.primary != HOME_SITE else "")
        )
    plan = await make_drill_plan(platform, "drill", options)
    report = DrillReport("drill", platform.environment, platform.name, plan.source, plan.target,
                         plan, time.time())
    switchover = Switchover(platform, report, options, progress)
    if await switchover.preflight():
        try:
            await switchover.run()
        except _StepFailed:
            await switchover.undo_freeze()
    report.leaves_behind = _leaves_behind(report, platform.environment)
    return _finish(report, options)


async def failback(
    platform: FailoverPlatform, options: DrillOptions, progress: Progress | None = None
) -> DrillReport:
    """Rebuild the home site as a replica (pg_rewind), switch back to it, and rebuild the
    other site as its replica again."""
    progress = progress or Silent()
    topology = await platform.topology()
    if topology.primary == HOME_SITE:
        raise Refused(f"{HOME_SITE} is already the primary: nothing to fail back")
    plan = await make_drill_plan(platform, "failback", options)
    report = DrillReport("failback", platform.environment, platform.name, plan.source,
                         plan.target, plan, time.time())
    switchover = Switchover(platform, report, options, progress)
    try:
        await switchover.step("rebuild", lambda: _rebuild(platform, plan.target, options))
        if await switchover.preflight():
            await switchover.run()
            await switchover.step(
                "restore-replica", lambda: _rebuild(platform, plan.source, options)
            )
    except _StepFailed:
        await switchover.undo_freeze()
    report.leaves_behind = _leaves_behind(report, platform.environment)
    return _finish(report, options)


async def _rebuild(platform: FailoverPlatform, site: str, options: DrillOptions) -> str:
    detail = await platform.rebuild_replica(site)
    primary = await platform.database_url(None)
    beat = await heartbeat(primary, await platform.database_url(site),
                           timeout=options.catch_up_timeout_seconds)
    return f"{detail}; streaming (heartbeat {beat.seconds * 1000:.0f} ms)"


def _leaves_behind(report: DrillReport, environment: str) -> list[str]:
    done = {e.key for e in report.timeline if e.ok}
    s, t = report.source, report.target
    if report.declared_at is None:
        return [f"nothing changed: the drill stopped at pre-flight; {s} is still the primary"]
    out = []
    if "promote" in done:
        out.append(f"{t}'s database is the primary; its active slot consumes {t}'s intake")
    elif "unfreeze" in done:
        out.append(f"{s} is still the primary; the drill stopped before the promotion and "
                   f"{s}'s consumers were started again")
    else:
        out.append(f"{s} is still the primary; the drill stopped before the promotion")
        if "freeze" in done:
            out.append(f"{s}'s workers are stopped: start its active slot again")
    if "fence" in done:
        out.append(f"{s}'s database is stopped (fenced) and its workers scaled down")
    if "switch-endpoint" in done:
        out.append(f"the intake and database records name {t}")
    if "handoff" in done:
        out.append(f"entries {s}'s intake held unread were handed off to {t} and acknowledged "
                   f"in {s}'s consumer group")
    if report.kind == "drill" and "promote" in done:
        out.append(f"to return: `auditctl failback {environment}` (pg_rewind {s} into a "
                   f"replica of {t}, switch back, rebuild {t} as the replica)")
    if report.kind == "failback" and "restore-replica" in done:
        out.append(f"{s}'s database streams from {t} again: the environment is as before "
                   "the drill")
    return out

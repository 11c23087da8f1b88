"""Blue-green promotion and rollback, written once against `ReleasePlatform`.

`promote` drives the state machine of `auditctl.promotion`: migrations (expand only),
deploy to the idle slot, readiness with a deadline, the pre-switch gates, the pause for a
person where the environment wants one, the switch (a compare-and-set of the control key,
timed until both slots acknowledge the new epoch), the post-switch gates, and the
scale-down delay during which `rollback` switches back instantly. The promotion record is
saved after every step, so another command (``auditctl rollback``) can act on it; both
take the platform's promotion lock around the moments that must not interleave.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from audit_worker.client import prepare
from audit_worker.db.store import StoredTreeHead
from audit_worker.slots import SwitchRefused
from auditctl.errors import Refused
from auditctl.gates import (
    GateResult,
    MetricsSample,
    Stage,
    Thresholds,
    dead_letter_gate,
    error_rate_gate,
    latency_gate,
    parse_metrics,
    readiness_gate,
    window,
    worker_metrics_gate,
)
from auditctl.logcheck import (
    dead_letters_for,
    newest_head,
    open_log,
    prove_extends,
    wait_for_signed_inclusion,
)
from auditctl.platform import ReleasePlatform
from auditctl.progress import Progress, Silent
from auditctl.promotion import (
    AFTER_SWITCH,
    BEFORE_SWITCH,
    Event,
    Phase,
    PromotionRecord,
    Slot,
    other,
)

DEPENDENCY_CHECKS = ("/healthz/database", "/healthz/redis", "/healthz/external")
SWITCH_ACK_TIMEOUT = 10.0


@dataclass
class PromoteOptions:
    image: str | None
    yes: bool = False
    detach: bool = False
    scale_down_delay_seconds: float | None = None  # None: the environment's setting
    thresholds: Thresholds = field(default_factory=Thresholds)


class _Stopped(Exception):
    """Another command changed the promotion (aborted or rolled it back)."""

    def __init__(self, record: PromotionRecord) -> None:
        super().__init__(record.phase.value)
        self.record = record


# --------------------------------------------------------------------------- helpers


def smoke_events(count: int, record: PromotionRecord, stage: Stage) -> list[dict[str, Any]]:
    """Synthetic, PHI-free events that name the release they test; validated exactly as
    the worker validates them."""
    events = []
    for i in range(count):
        event, _ = prepare(
            event_id=str(uuid.uuid4()),
            action="E",
            code="release-smoke-test",
            outcome=0,
            occurred=datetime.now(UTC).isoformat(),
            agent={"who": "auditctl", "role": "release-gate"},
            source={"observer": "auditctl", "site": f"{record.to_slot}-{stage}"},
            entity=[{"type": "Release", "id": f"{record.image}#{i}"}],
            detail=f"smoke test {i + 1}/{count} of image {record.image} ({stage})",
        )
        events.append(event.model_dump(mode="json", exclude_none=True))
    return events


async def read_metrics(platform: ReleasePlatform, slot: Slot) -> MetricsSample | None:
    probe = await platform.probe(slot, "/metrics")
    if not probe.ok or not isinstance(probe.body, str):
        return None
    return parse_metrics(probe.body)


async def wait_ready(
    platform: ReleasePlatform, slot: Slot, deadline_seconds: float
) -> GateResult:
    started = time.monotonic()
    problems: list[str] = []
    while True:
        probe = await platform.probe(slot, "/readyz")
        if probe.ok:
            return readiness_gate(True, [], time.monotonic() - started, deadline_seconds)
        problems = probe.problems()
        if time.monotonic() - started >= deadline_seconds:
            return readiness_gate(False, problems, time.monotonic() - started, deadline_seconds)
        await asyncio.sleep(0.2)


def _slot_view(probe_body: Any) -> dict[str, Any]:
    """The ``slot`` part of a ``/readyz`` answer (name, active, state, epoch)."""
    slot = probe_body.get("slot") if isinstance(probe_body, dict) else None
    return dict(slot) if isinstance(slot, dict) else {}


async def wait_switched(
    platform: ReleasePlatform, active: Slot, epoch: int, *, timeout: float = SWITCH_ACK_TIMEOUT
) -> bool:
    """Until `active` reports itself active at `epoch` and the other slot standby at it."""
    idle = other(active)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new, old = await asyncio.gather(
            platform.probe(active, "/readyz", timeout=1.0), platform.probe(idle, "/readyz", 1.0)
        )
        a, b = _slot_view(new.body), _slot_view(old.body)
        old_done = old.status == 0 or (b.get("active") is False and b.get("epoch") == epoch)
        if a.get("active") is True and a.get("epoch") == epoch and old_done:
            return True
        await asyncio.sleep(0.01)
    return False


async def switch_back(
    platform: ReleasePlatform, record: PromotionRecord, event: Event, note: str
) -> None:
    """Make the previous slot active again (compare-and-set on the epoch the promotion
    switched to), wait until both slots acknowledge, and record it. The caller holds the
    promotion lock and scales the new slot down afterwards."""
    assert record.epoch_after is not None
    started = time.perf_counter()
    epoch = await platform.switch(record.from_slot, expected_epoch=record.epoch_after)
    await wait_switched(platform, record.from_slot, epoch)
    record.rollback_seconds = time.perf_counter() - started
    record.epoch_rolled_back = epoch
    record.apply(event, time.time(), note)
    await platform.save_promotion(record)


async def dependency_gate(platform: ReleasePlatform, slot: Slot) -> GateResult:
    started = time.monotonic()
    probes = await asyncio.gather(*(platform.probe(slot, p, 15.0) for p in DEPENDENCY_CHECKS))
    failing = [
        f"{path}: {'; '.join(probe.problems()) or probe.status}"
        for path, probe in zip(DEPENDENCY_CHECKS, probes, strict=True) if not probe.ok
    ]
    return GateResult(
        "dependencies", "pre-switch", not failing,
        "; ".join(failing) or "database, redis and external (keys, archive) checks ok",
        time.monotonic() - started,
    )


async def smoke_gates(
    platform: ReleasePlatform,
    record: PromotionRecord,
    th: Thresholds,
    stage: Stage,
    via_slot: Slot | None,
) -> list[GateResult]:
    """Smoke events proven in the log, and the dead-letter count around them."""
    started = time.monotonic()
    pem = await platform.public_key_pem()
    async with open_log(await platform.database_url(), platform.log_id) as store:
        dead_before = await store.dead_letter_count()
        events = smoke_events(th.smoke_events, record, stage)
        ids = [str(e["event_id"]) for e in events]
        try:
            stream_ids = await platform.submit_events(events, via_slot=via_slot)
        except Exception as exc:  # the new slot's intake refused or failed
            return [GateResult(
                "smoke", stage, False, f"could not submit smoke events: {exc}",
                time.monotonic() - started,
            )]
        proofs = await wait_for_signed_inclusion(
            store, pem, ids, timeout=th.smoke_timeout_seconds
        )
        dead_after = await store.dead_letter_count()
        smoke_dead = await dead_letters_for(store, stream_ids)
    seconds = time.monotonic() - started
    failed = [p for p in proofs if not p.verified]
    route = f"{via_slot}'s intake" if via_slot else "the stream"
    if failed:
        detail = "; ".join(f"{p.event_id}: {p.detail}" for p in failed)
    else:
        detail = (
            f"{len(proofs)} smoke events via {route} proven by inclusion proofs against "
            f"the signed tree of {proofs[-1].tree_size} leaves"
        )
    smoke = GateResult(
        "smoke", stage, not failed, detail, seconds,
        measured={"events": len(proofs), "verified": len(proofs) - len(failed),
                  "tree_size": proofs[-1].tree_size if proofs else None},
    )
    return [smoke, dead_letter_gate(dead_before, dead_after, smoke_dead, th, stage)]


# --------------------------------------------------------------------------- the workflow


class Promotion:
    """One run of `promote` (a new promotion, or the resumption of a paused one)."""

    def __init__(
        self,
        platform: ReleasePlatform,
        record: PromotionRecord,
        options: PromoteOptions,
        progress: Progress,
    ) -> None:
        self.platform = platform
        self.record = record
        self.options = options
        self.th = options.thresholds
        self.progress = progress

    # ---- bookkeeping
    async def save(self) -> None:
        await self.platform.save_promotion(self.record)

    async def sync(self) -> None:
        """Stop if another command aborted or rolled back this promotion."""
        stored = await self.platform.load_promotion()
        if (
            stored is not None and stored.started_at == self.record.started_at
            and stored.phase != self.record.phase
        ):
            self.record = stored
            raise _Stopped(stored)

    async def advance(self, event: Event, note: str = "") -> None:
        await self.sync()
        self.record.apply(event, time.time(), note)
        await self.save()

    def gate(self, result: GateResult) -> bool:
        self.record.add_gate(result)
        self.progress.done(f"gate {result.name} ({result.stage})", result.passed, result.detail,
                           result.seconds)
        return result.passed

    async def timed(self, name: str, work: Callable[[], Awaitable[Any]]) -> Any:
        self.progress.step(name)
        started = time.monotonic()
        result = await work()
        self.progress.done(name, True, "", time.monotonic() - started)
        return result

    async def abort(self, reason: str) -> PromotionRecord:
        """Before the switch: the active slot is untouched; scale the preview down."""
        self.progress.note(f"aborting: {reason}")
        await self.platform.scale_down(self.record.to_slot)
        self.record.apply(Event.FAIL, time.time(), reason)
        await self.save()
        self.progress.done("abort", True, self.record.aftermath().summary)
        return self.record

    async def roll_back(self, reason: str) -> PromotionRecord:
        """After the switch: switch back to the previous slot, then scale the new one down."""
        self.progress.note(f"rolling back: {reason}")
        r = self.record
        async with self.platform.lock():
            await self.sync()
            try:
                await switch_back(self.platform, r, Event.FAIL, reason)
            except SwitchRefused as exc:
                r.reason = f"{reason}; switching back was refused ({exc}): check `auditctl status`"
                await self.save()
                raise Refused(r.reason) from None
        await self.platform.scale_down(r.to_slot)
        self.progress.done("roll back", True, r.aftermath().summary, r.rollback_seconds)
        return r

    # ---- phases
    async def run(self) -> PromotionRecord:
        try:
            if self.record.phase is Phase.PENDING:
                return await self._from_start()
            if self.record.phase is Phase.PAUSED:
                return await self._resume()
            raise Refused(f"cannot continue a promotion in phase {self.record.phase}")
        except _Stopped as stopped:
            self.progress.note(f"stopped: another command moved the promotion to "
                               f"{stopped.record.phase}")
            return stopped.record
        except Refused:
            raise
        except Exception as exc:  # a platform step failed: end the promotion safely
            reason = f"{type(exc).__name__}: {exc}"
            if self.record.phase in BEFORE_SWITCH:
                return await self.abort(reason)
            if self.record.phase in AFTER_SWITCH:
                try:
                    return await self.roll_back(reason)
                except _Stopped as stopped:
                    return stopped.record
            raise

    async def _from_start(self) -> PromotionRecord:
        r, p = self.record, self.platform
        await self.advance(Event.START)
        started = time.monotonic()
        self.progress.step("migrations")
        plan = await p.migration_plan(r.image, old_slot=r.from_slot)
        if not plan.ok:
            self.gate(plan.gate(time.monotonic() - started))
            return await self.abort(plan.reason or "migration refused")
        r.migrations_applied = await p.apply_migrations(r.image, plan)
        self.gate(plan.gate(time.monotonic() - started))
        await self.advance(Event.MIGRATED, ", ".join(r.migrations_applied) or "none")

        await self.timed(f"deploy {r.image} to {r.to_slot}", lambda: p.deploy(r.to_slot, r.image))
        await self.advance(Event.DEPLOYED)

        self.progress.step(f"readiness of {r.to_slot}",
                           f"deadline {self.th.readiness_timeout_seconds:g}s")
        if not self.gate(await wait_ready(p, r.to_slot, self.th.readiness_timeout_seconds)):
            return await self.abort(f"{r.to_slot} ({r.image}) did not become ready")
        await self.advance(Event.READY)

        if not await self._pre_gates():
            failed = ", ".join(g.name for g in r.failed_gates())
            return await self.abort(f"pre-switch gate(s) failed: {failed}")
        if not (r.auto_promote or self.options.yes):
            await self.advance(Event.PAUSE, "manual promotion: waiting for a person")
            self.progress.note(
                f"paused before the switch: {r.to_slot} runs {r.image} and passed the gates; "
                f"confirm with `auditctl promote {r.environment} --yes`, or abort with "
                f"`auditctl rollback {r.environment}`"
            )
            return r
        await self.advance(
            Event.GATES_PASSED, "automatic promotion" if r.auto_promote else "confirmed (--yes)"
        )
        return await self._switch_and_after()

    async def _resume(self) -> PromotionRecord:
        r = self.record
        if not self.options.yes:
            raise Refused(
                f"the promotion of {r.image} to {r.to_slot} is paused for a person: confirm "
                f"with `auditctl promote {r.environment} --yes`"
            )
        self.progress.step(f"readiness of {r.to_slot} (again, before the switch)")
        if not self.gate(await wait_ready(self.platform, r.to_slot,
                                          self.th.readiness_timeout_seconds)):
            return await self.abort(f"{r.to_slot} is no longer ready")
        await self.advance(Event.APPROVE, "confirmed (--yes)")
        return await self._switch_and_after()

    async def _pre_gates(self) -> bool:
        r, p = self.record, self.platform
        ok = self.gate(await dependency_gate(p, r.to_slot))
        before = await read_metrics(p, r.to_slot) or MetricsSample()
        for result in await smoke_gates(p, r, self.th, "pre-switch", via_slot=r.to_slot):
            ok = self.gate(result) and ok
        after = await read_metrics(p, r.to_slot)
        if after is None:
            ok = self.gate(GateResult("worker-metrics", "pre-switch", False,
                                      f"{r.to_slot} does not answer /metrics")) and ok
        else:
            ok = self.gate(worker_metrics_gate(after, window(before, after))) and ok
        return ok

    async def _switch_and_after(self) -> PromotionRecord:
        r, p = self.record, self.platform
        async with open_log(await p.database_url(), p.log_id) as store:
            head_before = await newest_head(store)
            dead_at_switch = await store.dead_letter_count()
        metrics_before = await read_metrics(p, r.to_slot) or MetricsSample()
        self.progress.step(f"switch {r.from_slot} -> {r.to_slot}")
        async with p.lock():
            await self.sync()
            started = time.perf_counter()
            try:
                epoch = await p.switch(r.to_slot, expected_epoch=r.epoch_before)
            except SwitchRefused as exc:
                self.gate(GateResult("switch", "pre-switch", False, str(exc)))
                return await self.abort(f"the control key moved: {exc}")
            acknowledged = await wait_switched(p, r.to_slot, epoch)
            seconds = time.perf_counter() - started
            r.switched(epoch, seconds, time.time())
            await self.save()
        self.progress.done(
            f"switch {r.from_slot} -> {r.to_slot}", True,
            f"epoch {epoch}; both slots acknowledged in {seconds * 1000:.0f} ms"
            if acknowledged else f"epoch {epoch}; not acknowledged within "
            f"{SWITCH_ACK_TIMEOUT:g}s", seconds,
        )
        if not await self._post_gates(head_before, dead_at_switch, metrics_before, acknowledged):
            failed = ", ".join(g.name for g in r.failed_gates())
            return await self.roll_back(f"post-switch gate(s) failed: {failed}")
        delay = (
            self.options.scale_down_delay_seconds
            if self.options.scale_down_delay_seconds is not None
            else r.scale_down_delay_seconds
        )
        r.scale_down_delay_seconds = delay
        r.scale_down_at = time.time() + delay
        await self.advance(Event.ANALYSIS_PASSED, f"scale-down in {delay:g}s")
        if self.options.detach:
            until = time.strftime("%H:%M:%S", time.localtime(r.scale_down_at))
            self.progress.note(
                f"{r.from_slot} stays up until {until} for an instant `auditctl rollback "
                f"{r.environment}`; the next promote scales it down"
            )
            return r
        return await self._scale_down_after_delay()

    async def _post_gates(
        self,
        head_before: StoredTreeHead | None,
        dead_at_switch: int,
        metrics_before: MetricsSample,
        acknowledged: bool,
    ) -> bool:
        r, p, th = self.record, self.platform, self.th
        switched_at = time.monotonic()
        ok = self.gate(await self._old_slot_standby(acknowledged))
        smoke, _ = await smoke_gates(p, r, th, "post-switch", via_slot=None)
        ok = self.gate(smoke) and ok
        pem = await p.public_key_pem()
        async with open_log(await p.database_url(), p.log_id) as store:
            head_after = await newest_head(store)
            if head_before is None or head_after is None:
                ok = self.gate(GateResult(
                    "consistency", "post-switch", False, "no signed tree head to compare"
                )) and ok
            else:
                ext = await prove_extends(store, head_before, head_after,
                                          old_key_pem=pem, new_key_pem=pem)
                ok = self.gate(GateResult(
                    "consistency", "post-switch", ext.verified,
                    f"signed tree of {ext.new_size} extends the one of {ext.old_size} "
                    f"before the switch: {ext.detail}" if ext.verified else ext.detail,
                    measured={"old_size": ext.old_size, "new_size": ext.new_size},
                )) and ok
            dead_now = await store.dead_letter_count()
        ok = self.gate(dead_letter_gate(dead_at_switch, dead_now, 0, th, "post-switch")) and ok
        remaining = th.analysis_seconds - (time.monotonic() - switched_at)
        if remaining > 0:
            await asyncio.sleep(remaining)
        after = await read_metrics(p, r.to_slot)
        if after is None:
            self.gate(GateResult("error-rate", "post-switch", False,
                                 f"{r.to_slot} does not answer /metrics"))
            return False
        win = window(metrics_before, after)
        ok = self.gate(error_rate_gate(win, th)) and ok
        ok = self.gate(latency_gate(win, th)) and ok
        return ok

    async def _old_slot_standby(self, acknowledged: bool) -> GateResult:
        r = self.record
        probe = await self.platform.probe(r.from_slot, "/readyz")
        view = _slot_view(probe.body)
        standby = view.get("active") is False and view.get("epoch") == r.epoch_after
        return GateResult(
            "old-slot-standby", "post-switch", acknowledged and standby,
            f"{r.from_slot} reports {view.get('state', 'nothing')} at epoch {view.get('epoch')}"
            + ("" if acknowledged else "; the switch was not acknowledged in time"),
        )

    async def _scale_down_after_delay(self) -> PromotionRecord:
        r = self.record
        assert r.scale_down_at is not None
        self.progress.step(
            f"scale-down delay: {r.from_slot} kept {r.scale_down_delay_seconds:g}s for rollback"
        )
        while time.time() < r.scale_down_at:
            await asyncio.sleep(min(0.2, max(0.0, r.scale_down_at - time.time())))
            await self.sync()
        return await finish_scale_down(self.platform, r, self.progress)


async def finish_scale_down(
    platform: ReleasePlatform, record: PromotionRecord, progress: Progress
) -> PromotionRecord:
    """End a promotion whose scale-down delay is over: scale the old slot down."""
    async with platform.lock():
        stored = await platform.load_promotion()
        if stored is not None and stored.started_at == record.started_at:
            record = stored
        if record.phase is not Phase.SCALE_DOWN_DELAY:
            return record
        control = await platform.control()
        if control is None or control.slot != record.to_slot:
            raise Refused(
                f"the control key no longer names {record.to_slot}: not scaling "
                f"{record.from_slot} down; check `auditctl status {record.environment}`"
            )
        await platform.scale_down(record.from_slot)
        record.apply(Event.DELAY_ELAPSED, time.time(), f"{record.from_slot} scaled down")
        await platform.save_promotion(record)
    progress.done(f"scale down {record.from_slot}", True, record.aftermath().summary)
    return record


async def promote(
    platform: ReleasePlatform,
    options: PromoteOptions,
    *,
    environment: str,
    auto_promote: bool,
    scale_down_delay_seconds: float,
    progress: Progress | None = None,
) -> PromotionRecord:
    """Promote `options.image` (or resume a paused promotion); see the module docstring."""
    progress = progress or Silent()
    existing = await platform.load_promotion()
    if existing is not None and not existing.finished:
        if existing.phase is Phase.SCALE_DOWN_DELAY:
            if existing.scale_down_at is not None and time.time() < existing.scale_down_at:
                raise Refused(
                    f"the promotion of {existing.image} is in its scale-down window until "
                    f"{time.strftime('%H:%M:%S', time.localtime(existing.scale_down_at))}: wait, "
                    f"or roll it back with `auditctl rollback {environment}`"
                )
            existing = await finish_scale_down(platform, existing, progress)
        elif existing.phase is Phase.PAUSED and options.image in (None, existing.image):
            return await Promotion(platform, existing, options, progress).run()
        else:
            raise Refused(
                f"a promotion of {existing.image} is in flight (phase {existing.phase}): wait "
                f"for it, or abort it with `auditctl rollback {environment}`"
            )
    if options.image is None:
        raise Refused("nothing to promote: pass --image TAG (or resume a paused promotion)")
    control = await platform.control()
    if control is None:
        raise Refused(
            "no slot is active (the control key is missing or invalid): activate one first"
        )
    slots = await platform.slots()
    previous = slots[control.slot].image
    if previous == options.image:
        raise Refused(f"{options.image} already runs in the active slot {control.slot}")
    record = PromotionRecord(
        environment=environment, image=options.image, previous_image=previous,
        from_slot=control.slot, to_slot=other(control.slot), epoch_before=control.epoch,
        auto_promote=auto_promote, scale_down_delay_seconds=scale_down_delay_seconds,
        started_at=time.time(),
    )
    await platform.save_promotion(record)
    return await Promotion(platform, record, options, progress).run()


async def rollback(
    platform: ReleasePlatform, *, environment: str, progress: Progress | None = None
) -> PromotionRecord:
    """Abort a promotion before its switch, or switch back within the scale-down window."""
    progress = progress or Silent()
    async with platform.lock():
        record = await platform.load_promotion()
        if record is None:
            raise Refused(f"no promotion recorded for {environment}: nothing to roll back")
        if record.phase is Phase.COMPLETED:
            raise Refused(
                f"the promotion of {record.image} completed: {record.from_slot} is scaled down, "
                f"so there is no instant rollback. Promote the previous image instead: "
                f"`auditctl promote {environment} --image {record.previous_image}`"
            )
        if record.finished:
            raise Refused(f"the last promotion ({record.image}) already ended {record.phase}")
        if record.phase in BEFORE_SWITCH:
            progress.step(f"abort the promotion of {record.image} (phase {record.phase})")
            record.apply(Event.ABORT, time.time(), "aborted by `auditctl rollback`")
            await platform.save_promotion(record)
            scale_down: Slot = record.to_slot
        else:
            slots = await platform.slots()
            if slots[record.from_slot].running == 0:
                raise Refused(
                    f"{record.from_slot} is already scaled down: promote "
                    f"{record.previous_image} again instead"
                )
            progress.step(f"switch back {record.to_slot} -> {record.from_slot}")
            await switch_back(platform, record, Event.ABORT, "rolled back by `auditctl rollback`")
            progress.done(f"switch back {record.to_slot} -> {record.from_slot}", True,
                          f"epoch {record.epoch_rolled_back}", record.rollback_seconds)
            scale_down = record.to_slot
    await platform.scale_down(scale_down)
    progress.done("rollback", True, record.aftermath().summary)
    return record

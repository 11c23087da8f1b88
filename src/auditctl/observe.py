"""``auditctl status``: gather what an operator looks at, then judge it (pure `assess`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from audit_worker.slots import ControlValue
from auditctl.logcheck import log_size, newest_head, open_log
from auditctl.platform import SLOTS, FailoverPlatform, ReleasePlatform, ReplicaInfo, StreamStats
from auditctl.promotion import AFTER_SWITCH, Phase, PromotionRecord, Slot

Health = Literal["Healthy", "Progressing", "Paused", "Degraded"]


@dataclass(frozen=True)
class SlotView:
    slot: Slot
    image: str
    roles: tuple[str, ...]  # stable, active, preview
    running: int
    ready: bool | None  # None: not running
    state: str  # the worker's own slot state (active, standby ...)
    epoch: int | None
    age_seconds: float | None
    problems: tuple[str, ...] = ()


@dataclass
class StatusView:
    environment: str
    platform: str
    control: ControlValue | None
    slots: list[SlotView]
    stream: StreamStats | None
    tree_size: int | None
    rows: int | None
    head_age_seconds: float | None
    dead_letters: int | None
    replica: ReplicaInfo | None
    endpoint_site: str | None
    primary_site: str | None
    promotion: PromotionRecord | None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        health, problems = assess(self)
        return {
            "environment": self.environment,
            "platform": self.platform,
            "status": health,
            "problems": problems,
            "active_slot": self.control.slot if self.control else None,
            "epoch": self.control.epoch if self.control else None,
            "slots": [asdict(s) for s in self.slots],
            "stream": asdict(self.stream) if self.stream else None,
            "log": {"tree_size": self.tree_size, "rows": self.rows,
                    "last_signed_tree_head_age_seconds": self.head_age_seconds,
                    "dead_letters": self.dead_letters},
            "replica": asdict(self.replica) if self.replica else None,
            "primary_site": self.primary_site,
            "endpoint_site": self.endpoint_site,
            "promotion": (
                {"image": self.promotion.image, "phase": self.promotion.phase.value,
                 "from_slot": self.promotion.from_slot, "to_slot": self.promotion.to_slot,
                 "scale_down_at": self.promotion.scale_down_at,
                 "aftermath": self.promotion.aftermath().summary}
                if self.promotion else None
            ),
        }


def assess(view: StatusView) -> tuple[Health, list[str]]:
    """Healthy only when the active slot is ready, the control key is valid, no promotion is
    in flight and the replica (where there is one) streams."""
    problems = list(view.errors)
    if view.control is None:
        problems.append("no active slot: the control key is missing or invalid")
    else:
        active = next((s for s in view.slots if s.slot == view.control.slot), None)
        if active is None or not active.running:
            problems.append(f"the active slot {view.control.slot} is not running")
        elif not active.ready:
            problems.append(f"the active slot {view.control.slot} is not ready: "
                            + "; ".join(active.problems))
    if view.replica is not None and view.replica.state != "streaming":
        problems.append(f"replica at {view.replica.replica_site}: {view.replica.state}")
    if problems:
        return "Degraded", problems
    record = view.promotion
    if record is not None and record.phase is Phase.PAUSED:
        return "Paused", [f"promotion of {record.image} waits for a person (auditctl promote "
                          f"{view.environment} --yes)"]
    if record is not None and not record.finished:
        detail = f"promotion of {record.image}: {record.phase}"
        if record.phase in AFTER_SWITCH and record.scale_down_at:
            detail += f", {record.from_slot} scaled down in " \
                      f"{max(0.0, record.scale_down_at - time.time()):.0f}s"
        return "Progressing", [detail]
    return "Healthy", []


def _roles(slot: Slot, control: ControlValue | None, running: int) -> tuple[str, ...]:
    if control is not None and control.slot == slot:
        return ("stable", "active")
    return ("preview",) if running else ()


async def gather(platform: ReleasePlatform, failover: FailoverPlatform | None) -> StatusView:
    errors: list[str] = []
    control = await platform.control()
    infos = await platform.slots()
    probes = await asyncio.gather(*(platform.probe(s, "/readyz") for s in SLOTS))
    slots = []
    now = time.time()
    for slot, probe in zip(SLOTS, probes, strict=True):
        info = infos[slot]
        view = probe.body.get("slot", {}) if isinstance(probe.body, dict) else {}
        slots.append(SlotView(
            slot, info.image, _roles(slot, control, info.running), info.running,
            probe.ok if info.running else None, str(view.get("state", "-")), view.get("epoch"),
            (now - info.started_at) if info.started_at else None,
            tuple(probe.problems()) if info.running and not probe.ok else (),
        ))
    stream: StreamStats | None = None
    try:
        stream = await platform.stream_stats()
    except Exception as exc:
        errors.append(f"stream: {exc}")
    tree_size = rows = dead = None
    age = None
    try:
        async with open_log(await platform.database_url(), platform.log_id) as store:
            head = await newest_head(store)
            rows = await log_size(store)
            dead = await store.dead_letter_count()
        if head is not None:
            tree_size, age = head.tree_size, max(0.0, now - head.timestamp_ms / 1000)
    except Exception as exc:
        errors.append(f"log database: {exc}")
    replica = await platform.replica()
    endpoint = primary = None
    if failover is not None:
        topology = await failover.topology()
        endpoint, primary = topology.endpoint_site, topology.primary
    return StatusView(
        platform.environment, platform.name, control, slots, stream, tree_size, rows, age,
        dead, replica, endpoint, primary, await platform.load_promotion(), errors,
    )

"""DR drill and failback: the plan, the timeline, RTO and RPO. Pure: the workflow
(`auditctl.failover`) runs the steps and hands the measurements in.

A drill is a *planned switchover* from the site whose database is the primary (the source)
to the site that holds its streaming replica (the target):

* **RTO** is counted from the declaration (T0) to the first canary event that is proven,
  by an inclusion proof against a signed tree head, to be in the target's log.
* **RPO** is counted in events: those the source acknowledged (its intake accepted them,
  or its log stored them) in the window before T0 and after it, that are missing from the
  target's log once the drill is over; together with the replication lag measured at T0
  (heartbeat seconds and WAL bytes), which bounds what an *unplanned* failover at T0 would
  have lost. A planned switchover freezes, catches up and hands off, so its RPO is 0.

Failback is the same switchover in the other direction, preceded by rebuilding the old
primary as a replica of the current one (``pg_rewind`` on the local platform) and followed
by rebuilding the other side as a replica again, so the environment ends as it began.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from auditctl.gates import GateResult

Kind = Literal["drill", "failback"]


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    what: str


SWITCHOVER_STEPS: tuple[Step, ...] = (
    Step("preflight", "Pre-flight",
         "measure replica lag with heartbeat writes; check the target's capacity and that "
         "its keys verify the source's signed tree heads"),
    Step("declare", "Declare (T0)", "the disaster is declared: RTO is counted from here"),
    Step("freeze", "Freeze the primary's consumers",
         "stop the source's workers: each finishes its batch and signs a final tree head"),
    Step("catch-up", "Wait for the replica",
         "until the replica has replayed everything the primary wrote"),
    Step("promote", "Promote the replica", "the replica becomes a writable primary"),
    Step("fence", "Fence the old primary", "nothing may write to the old primary any more"),
    Step("activate", "Activate workers at the target",
         "start the target's active slot against the promoted database"),
    Step("switch-endpoint", "Switch DNS",
         "the intake and database records name the target; producers follow within the TTL"),
    Step("handoff", "Hand off the intake backlog",
         "entries the source's intake acknowledged but its frozen consumers never read go to "
         "the target's intake (the log stores each event id once)"),
    Step("canary", "Canary events",
         "write canaries to the target and prove each is in its log: the first verified "
         "canary ends RTO"),
    Step("consistency", "Consistency proof",
         "prove that the target's log extends the source's last signed tree head"),
    Step("rpo", "Measure RPO",
         "events the source acknowledged that are missing from the target's log"),
)
FAILBACK_BEFORE = Step(
    "rebuild", "Rebuild the old primary as a replica",
    "pg_rewind the old primary onto the current primary's timeline and let it stream",
)
FAILBACK_AFTER = Step(
    "restore-replica", "Restore the replica",
    "rebuild the other site as a streaming replica of the primary again",
)


def plan_steps(kind: Kind) -> tuple[Step, ...]:
    if kind == "failback":
        return (FAILBACK_BEFORE, *SWITCHOVER_STEPS, FAILBACK_AFTER)
    return SWITCHOVER_STEPS


@dataclass(frozen=True)
class PlannedStep:
    key: str
    title: str
    what: str
    how: str


@dataclass(frozen=True)
class DrillPlan:
    kind: Kind
    environment: str
    platform: str
    source: str
    target: str
    steps: tuple[PlannedStep, ...]
    rto_target_seconds: float
    rpo_target_events: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(
    kind: Kind, environment: str, platform: str, source: str, target: str,
    how: dict[str, str], *, rto_target_seconds: float, rpo_target_events: int = 0,
) -> DrillPlan:
    """The steps in order, each with what it does and how this platform does it."""
    return DrillPlan(
        kind, environment, platform, source, target,
        tuple(PlannedStep(s.key, s.title, s.what, how.get(s.key, "")) for s in plan_steps(kind)),
        rto_target_seconds, rpo_target_events,
    )


# --------------------------------------------------------------------------- timeline


@dataclass
class TimelineEntry:
    key: str
    title: str
    started_at: float
    ended_at: float
    ok: bool
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.ended_at - self.started_at


@dataclass(frozen=True)
class Rpo:
    acknowledged: int
    missing: int
    missing_sample: tuple[str, ...]
    handed_off: int
    lag_at_t0_seconds: float | None
    lag_at_t0_bytes: int | None
    window_seconds: float


def compute_rpo(
    acknowledged: Iterable[str],
    present: Iterable[str],
    *,
    handed_off: int,
    lag_at_t0_seconds: float | None,
    lag_at_t0_bytes: int | None,
    window_seconds: float,
    sample: int = 10,
) -> Rpo:
    """Events acknowledged by the source and absent from the target's log."""
    acked = set(acknowledged)
    missing = sorted(acked - set(present))
    return Rpo(
        len(acked), len(missing), tuple(missing[:sample]), handed_off,
        lag_at_t0_seconds, lag_at_t0_bytes, window_seconds,
    )


def compute_rto(declared_at: float, first_verified_canary_at: float | None) -> float | None:
    if first_verified_canary_at is None:
        return None
    return max(0.0, first_verified_canary_at - declared_at)


@dataclass(frozen=True)
class Canary:
    event_id: str
    log_index: int | None
    tree_size: int | None
    verified: bool
    verified_at: float | None


@dataclass(frozen=True)
class ConsistencyResult:
    old_size: int
    new_size: int
    old_root: str
    new_root: str
    verified: bool
    detail: str


@dataclass
class DrillReport:
    kind: Kind
    environment: str
    platform: str
    source: str
    target: str
    plan: DrillPlan
    started_at: float
    declared_at: float | None = None
    finished_at: float | None = None
    preflight: list[GateResult] = field(default_factory=list)
    timeline: list[TimelineEntry] = field(default_factory=list)
    canaries: list[Canary] = field(default_factory=list)
    consistency: ConsistencyResult | None = None
    rpo: Rpo | None = None
    figures: dict[str, float | int | str | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    leaves_behind: list[str] = field(default_factory=list)

    # ---- recording
    def record(
        self, key: str, started_at: float, ended_at: float, ok: bool, detail: str = "",
        *, problem: bool = True,
    ) -> TimelineEntry:
        """Add a step to the timeline; a failed step is a problem unless `problem` is
        False (pre-flight, whose checks speak for themselves)."""
        title = next((s.title for s in self.plan.steps if s.key == key), key)
        entry = TimelineEntry(key, title, started_at, ended_at, ok, detail)
        self.timeline.append(entry)
        if not ok and problem:
            self.problems.append(f"{title}: {detail}")
        return entry

    # ---- results
    @property
    def rto_seconds(self) -> float | None:
        verified = [c.verified_at for c in self.canaries if c.verified and c.verified_at]
        if self.declared_at is None or not verified:
            return None
        return compute_rto(self.declared_at, min(verified))

    @property
    def ok(self) -> bool:
        rto = self.rto_seconds
        return (
            not self.problems
            and all(g.passed for g in self.preflight)
            and rto is not None and rto <= self.plan.rto_target_seconds
            and self.rpo is not None and self.rpo.missing <= self.plan.rpo_target_events
            and self.consistency is not None and self.consistency.verified
        )

    def verdict(self) -> list[str]:
        """Why the drill did not pass (empty when it did)."""
        out = list(self.problems)
        out += [f"pre-flight {g.name}: {g.detail}" for g in self.preflight if not g.passed]
        rto = self.rto_seconds
        if rto is None:
            out.append("RTO not measured: no canary was verified in the target's log")
        elif rto > self.plan.rto_target_seconds:
            out.append(f"RTO {rto:.1f}s exceeds the target {self.plan.rto_target_seconds:g}s")
        if self.rpo is None:
            out.append("RPO not measured")
        elif self.rpo.missing > self.plan.rpo_target_events:
            out.append(
                f"RPO {self.rpo.missing} event(s) missing (target {self.plan.rpo_target_events})"
            )
        if self.consistency is None or not self.consistency.verified:
            out.append("the target's log was not proven to extend the source's tree head")
        return list(dict.fromkeys(out))

    def relative(self, at: float) -> float:
        """Seconds since T0 (negative before the declaration)."""
        return at - (self.declared_at if self.declared_at is not None else self.started_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "environment": self.environment,
            "platform": self.platform,
            "source": self.source,
            "target": self.target,
            "ok": self.ok,
            "verdict": self.verdict(),
            "started_at": self.started_at,
            "declared_at": self.declared_at,
            "finished_at": self.finished_at,
            "rto_seconds": None if self.rto_seconds is None else round(self.rto_seconds, 3),
            "rto_target_seconds": self.plan.rto_target_seconds,
            "rpo": asdict(self.rpo) if self.rpo else None,
            "rpo_target_events": self.plan.rpo_target_events,
            "consistency": asdict(self.consistency) if self.consistency else None,
            "canaries": [asdict(c) for c in self.canaries],
            "preflight": [g.to_dict() for g in self.preflight],
            "timeline": [
                {**asdict(e), "seconds": round(e.seconds, 3),
                 "t_start": round(self.relative(e.started_at), 3),
                 "t_end": round(self.relative(e.ended_at), 3)}
                for e in self.timeline
            ],
            "figures": self.figures,
            "leaves_behind": self.leaves_behind,
            "plan": self.plan.to_dict(),
        }

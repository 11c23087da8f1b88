"""The blue-green promotion as a state machine. Pure: no I/O, time is passed in.

::

    pending ─start─▶ migrating ─migrated─▶ deploying ─deployed─▶ waiting-ready ─ready─▶ pre-gates
                                                                                      │
                 ┌────────────────────── gates-passed (automatic promotion) ──────────┤
                 ▼                                                                    │ pause
            switching ◀──────────────────── approve ──────────────────────── paused ◀─┘
                 │ switched
                 ▼
            post-gates ─analysis-passed─▶ scale-down-delay ─delay-elapsed─▶ completed

    fail or abort before the switch (pending … switching)  ─▶ aborted
    fail or abort after the switch (post-gates, scale-down-delay) ─▶ rolled-back

What each end leaves behind (`Aftermath`):

* **completed**: the new slot is active; the old slot is scaled down after the delay.
* **aborted**: the active slot is untouched (same slot, same epoch: the control key was
  never written); the preview slot that ran the new image is scaled down.
* **rolled-back**: the previous slot is active again with a new, higher epoch; the slot
  that ran the new image is scaled down.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal

from auditctl.errors import InvalidTransition
from auditctl.gates import GateResult

Slot = Literal["blue", "green"]


class Phase(StrEnum):
    PENDING = "pending"
    MIGRATING = "migrating"
    DEPLOYING = "deploying"
    WAITING_READY = "waiting-ready"
    PRE_GATES = "pre-gates"
    PAUSED = "paused"
    SWITCHING = "switching"
    POST_GATES = "post-gates"
    SCALE_DOWN_DELAY = "scale-down-delay"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled-back"


class Event(StrEnum):
    START = "start"
    MIGRATED = "migrated"
    DEPLOYED = "deployed"
    READY = "ready"
    GATES_PASSED = "gates-passed"
    PAUSE = "pause"
    APPROVE = "approve"
    SWITCHED = "switched"
    ANALYSIS_PASSED = "analysis-passed"
    DELAY_ELAPSED = "delay-elapsed"
    FAIL = "fail"  # a gate or a step failed
    ABORT = "abort"  # an operator asked (`auditctl rollback` / `abort`)


BEFORE_SWITCH = frozenset({
    Phase.PENDING, Phase.MIGRATING, Phase.DEPLOYING, Phase.WAITING_READY, Phase.PRE_GATES,
    Phase.PAUSED, Phase.SWITCHING,
})
AFTER_SWITCH = frozenset({Phase.POST_GATES, Phase.SCALE_DOWN_DELAY})
TERMINAL = frozenset({Phase.COMPLETED, Phase.ABORTED, Phase.ROLLED_BACK})

_FORWARD: dict[tuple[Phase, Event], Phase] = {
    (Phase.PENDING, Event.START): Phase.MIGRATING,
    (Phase.MIGRATING, Event.MIGRATED): Phase.DEPLOYING,
    (Phase.DEPLOYING, Event.DEPLOYED): Phase.WAITING_READY,
    (Phase.WAITING_READY, Event.READY): Phase.PRE_GATES,
    (Phase.PRE_GATES, Event.GATES_PASSED): Phase.SWITCHING,
    (Phase.PRE_GATES, Event.PAUSE): Phase.PAUSED,
    (Phase.PAUSED, Event.APPROVE): Phase.SWITCHING,
    (Phase.SWITCHING, Event.SWITCHED): Phase.POST_GATES,
    (Phase.POST_GATES, Event.ANALYSIS_PASSED): Phase.SCALE_DOWN_DELAY,
    (Phase.SCALE_DOWN_DELAY, Event.DELAY_ELAPSED): Phase.COMPLETED,
}


def advance(phase: Phase, event: Event) -> Phase:
    """The phase after `event`; raises `InvalidTransition` when it does not apply."""
    if event in (Event.FAIL, Event.ABORT):
        if phase in BEFORE_SWITCH:
            return Phase.ABORTED
        if phase in AFTER_SWITCH:
            return Phase.ROLLED_BACK
        raise InvalidTransition(phase, event)
    try:
        return _FORWARD[(phase, event)]
    except KeyError:
        raise InvalidTransition(phase, event) from None


def other(slot: Slot) -> Slot:
    return "green" if slot == "blue" else "blue"


@dataclass(frozen=True)
class Aftermath:
    """Which slot serves and which slots run once a promotion ends (or if it were aborted
    now), in words for the summary and as data for ``--output json``."""

    active_slot: Slot
    running: tuple[Slot, ...]
    scaled_down: tuple[Slot, ...]
    control_key: str
    summary: str


@dataclass(frozen=True)
class HistoryEntry:
    at: float
    phase: Phase
    event: Event
    note: str = ""


@dataclass
class PromotionRecord:
    """One promotion, persisted by the platform so that another command (a rollback)
    can act on it. Times are Unix seconds."""

    environment: str
    image: str
    previous_image: str
    from_slot: Slot
    to_slot: Slot
    epoch_before: int
    auto_promote: bool
    scale_down_delay_seconds: float
    started_at: float
    phase: Phase = Phase.PENDING
    epoch_after: int | None = None
    epoch_rolled_back: int | None = None
    switch_seconds: float | None = None
    rollback_seconds: float | None = None
    switched_at: float | None = None
    scale_down_at: float | None = None
    reason: str | None = None
    migrations_applied: list[str] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)

    # ---- transitions
    def apply(self, event: Event, now: float, note: str = "") -> Phase:
        self.phase = advance(self.phase, event)
        self.history.append(HistoryEntry(now, self.phase, event, note))
        if event in (Event.FAIL, Event.ABORT) and self.reason is None:
            self.reason = note or event.value
        return self.phase

    def switched(self, epoch: int, seconds: float, now: float) -> None:
        self.epoch_after = epoch
        self.switch_seconds = seconds
        self.switched_at = now
        self.apply(Event.SWITCHED, now, f"epoch {epoch}, {seconds * 1000:.0f} ms")

    def add_gate(self, result: GateResult) -> GateResult:
        self.gates.append(result)
        return result

    # ---- questions
    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL

    @property
    def in_rollback_window(self) -> bool:
        return self.phase in AFTER_SWITCH

    @property
    def succeeded(self) -> bool:
        return self.phase is Phase.COMPLETED

    def failed_gates(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def aftermath(self) -> Aftermath:
        """What this promotion leaves behind now, or would if it were aborted now."""
        old, new = self.from_slot, self.to_slot
        key_then = f"epoch {self.epoch_before} names {old}"
        if self.phase in BEFORE_SWITCH or self.phase is Phase.ABORTED:
            return Aftermath(
                old, (old,), (new,), f"unchanged ({key_then})",
                f"{old} stays active on {self.previous_image} ({key_then}, never written); "
                f"{new} ({self.image}) is scaled down",
            )
        if self.phase in AFTER_SWITCH or self.phase is Phase.ROLLED_BACK:
            epoch = self.epoch_rolled_back or ((self.epoch_after or self.epoch_before) + 1)
            return Aftermath(
                old, (old,), (new,), f"epoch {epoch} names {old}",
                f"{old} is active again on {self.previous_image} (epoch {epoch}); "
                f"{new} ({self.image}) is scaled down",
            )
        return Aftermath(
            new, (new,), (old,), f"epoch {self.epoch_after} names {new}",
            f"{new} is active on {self.image} (epoch {self.epoch_after}); "
            f"{old} ({self.previous_image}) was scaled down after "
            f"{self.scale_down_delay_seconds:g}s",
        )

    # ---- persistence
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["phase"] = self.phase.value
        data["history"] = [
            {"at": h.at, "phase": h.phase.value, "event": h.event.value, "note": h.note}
            for h in self.history
        ]
        data["gates"] = [g.to_dict() for g in self.gates]
        data["aftermath"] = asdict(self.aftermath())
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromotionRecord:
        values = {k: v for k, v in data.items() if k not in ("aftermath",)}
        values["phase"] = Phase(values["phase"])
        values["history"] = [
            HistoryEntry(h["at"], Phase(h["phase"]), Event(h["event"]), h.get("note", ""))
            for h in values.get("history", [])
        ]
        values["gates"] = [GateResult.from_dict(g) for g in values.get("gates", [])]
        return cls(**values)

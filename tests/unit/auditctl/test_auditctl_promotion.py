"""The promotion state machine (pure): transitions, failures on either side of the switch,
and what each end leaves behind."""

from __future__ import annotations

import json

import pytest

from auditctl.errors import InvalidTransition
from auditctl.gates import GateResult
from auditctl.promotion import (
    AFTER_SWITCH,
    BEFORE_SWITCH,
    TERMINAL,
    Event,
    Phase,
    PromotionRecord,
    advance,
    other,
)

HAPPY_PATH = [
    (Event.START, Phase.MIGRATING),
    (Event.MIGRATED, Phase.DEPLOYING),
    (Event.DEPLOYED, Phase.WAITING_READY),
    (Event.READY, Phase.PRE_GATES),
    (Event.GATES_PASSED, Phase.SWITCHING),
    (Event.SWITCHED, Phase.POST_GATES),
    (Event.ANALYSIS_PASSED, Phase.SCALE_DOWN_DELAY),
    (Event.DELAY_ELAPSED, Phase.COMPLETED),
]


def record(**overrides: object) -> PromotionRecord:
    values: dict[str, object] = {
        "environment": "local", "image": "0.2.0", "previous_image": "0.1.0",
        "from_slot": "blue", "to_slot": "green", "epoch_before": 4, "auto_promote": True,
        "scale_down_delay_seconds": 30.0, "started_at": 1000.0,
    }
    values.update(overrides)
    return PromotionRecord(**values)  # type: ignore[arg-type]


def test_the_phases_are_split_into_before_after_and_terminal() -> None:
    assert set(Phase) == BEFORE_SWITCH | AFTER_SWITCH | TERMINAL
    assert not BEFORE_SWITCH & AFTER_SWITCH
    assert not (BEFORE_SWITCH | AFTER_SWITCH) & TERMINAL


def test_the_happy_path_reaches_completed() -> None:
    phase = Phase.PENDING
    for event, expected in HAPPY_PATH:
        phase = advance(phase, event)
        assert phase is expected


def test_a_manual_promotion_pauses_then_is_approved() -> None:
    assert advance(Phase.PRE_GATES, Event.PAUSE) is Phase.PAUSED
    assert advance(Phase.PAUSED, Event.APPROVE) is Phase.SWITCHING


@pytest.mark.parametrize("phase", sorted(BEFORE_SWITCH))
@pytest.mark.parametrize("event", [Event.FAIL, Event.ABORT])
def test_failing_or_aborting_before_the_switch_aborts(phase: Phase, event: Event) -> None:
    assert advance(phase, event) is Phase.ABORTED


@pytest.mark.parametrize("phase", sorted(AFTER_SWITCH))
@pytest.mark.parametrize("event", [Event.FAIL, Event.ABORT])
def test_failing_or_aborting_after_the_switch_rolls_back(phase: Phase, event: Event) -> None:
    assert advance(phase, event) is Phase.ROLLED_BACK


@pytest.mark.parametrize("phase", sorted(TERMINAL))
@pytest.mark.parametrize("event", list(Event))
def test_a_finished_promotion_takes_no_event(phase: Phase, event: Event) -> None:
    with pytest.raises(InvalidTransition, match=phase.value):
        advance(phase, event)


@pytest.mark.parametrize(
    ("phase", "event"),
    [(Phase.PENDING, Event.SWITCHED), (Phase.PRE_GATES, Event.APPROVE),
     (Phase.WAITING_READY, Event.GATES_PASSED), (Phase.POST_GATES, Event.DELAY_ELAPSED),
     (Phase.PAUSED, Event.GATES_PASSED)],
)
def test_skipping_a_step_is_refused(phase: Phase, event: Event) -> None:
    with pytest.raises(InvalidTransition):
        advance(phase, event)


def test_other_slot() -> None:
    assert other("blue") == "green" and other("green") == "blue"


def test_an_abort_before_the_switch_leaves_the_active_slot_untouched() -> None:
    r = record()
    for event, _ in HAPPY_PATH[:4]:
        r.apply(event, 1001.0)
    r.apply(Event.FAIL, 1002.0, "smoke gate failed")
    after = r.aftermath()
    assert r.phase is Phase.ABORTED and r.reason == "smoke gate failed"
    assert after.active_slot == "blue"
    assert after.running == ("blue",) and after.scaled_down == ("green",)
    assert "epoch 4 names blue" in after.control_key and "never written" in after.summary


def test_a_failure_after_the_switch_rolls_back_to_the_previous_slot() -> None:
    r = record()
    for event, _ in HAPPY_PATH[:5]:
        r.apply(event, 1001.0)
    r.switched(5, 0.12, 1003.0)
    assert r.phase is Phase.POST_GATES and r.in_rollback_window
    r.epoch_rolled_back = 6
    r.apply(Event.FAIL, 1004.0, "latency")
    after = r.aftermath()
    assert r.phase is Phase.ROLLED_BACK
    assert after.active_slot == "blue" and after.control_key == "epoch 6 names blue"
    assert after.scaled_down == ("green",)


def test_completed_leaves_the_new_slot_active_and_the_old_scaled_down() -> None:
    r = record()
    for event, _ in HAPPY_PATH[:5]:
        r.apply(event, 1001.0)
    r.switched(5, 0.1, 1002.0)
    r.apply(Event.ANALYSIS_PASSED, 1003.0)
    r.apply(Event.DELAY_ELAPSED, 1033.0)
    after = r.aftermath()
    assert r.succeeded and r.finished
    assert after.active_slot == "green" and after.scaled_down == ("blue",)
    assert "after 30s" in after.summary


def test_what_an_abort_would_leave_while_in_flight() -> None:
    r = record()
    r.apply(Event.START, 1001.0)
    assert r.aftermath().active_slot == "blue"  # before the switch: the same slot


def test_the_record_survives_a_json_round_trip() -> None:
    r = record()
    r.apply(Event.START, 1001.0, "go")
    r.add_gate(GateResult("migrations", "pre-switch", True, "schema already current", 0.1,
                          {"applied": 0}))
    r.migrations_applied = ["0002_x"]
    data = json.loads(json.dumps(r.to_dict()))
    again = PromotionRecord.from_dict(data)
    assert again == r
    assert data["aftermath"]["active_slot"] == "blue"
    assert data["history"][0] == {"at": 1001.0, "phase": "migrating", "event": "start",
                                  "note": "go"}

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
    HistoryEntry,
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


# ---- persisted names and fields: a rename would silently break every stored record

def test_stored_phase_names_are_pinned() -> None:
    assert {p.name: p.value for p in Phase} == {
        "PENDING": "pending", "MIGRATING": "migrating", "DEPLOYING": "deploying",
        "WAITING_READY": "waiting-ready", "PRE_GATES": "pre-gates", "PAUSED": "paused",
        "SWITCHING": "switching", "POST_GATES": "post-gates",
        "SCALE_DOWN_DELAY": "scale-down-delay", "COMPLETED": "completed",
        "ABORTED": "aborted", "ROLLED_BACK": "rolled-back",
    }


def test_stored_event_names_are_pinned() -> None:
    assert {e.name: e.value for e in Event} == {
        "START": "start", "MIGRATED": "migrated", "DEPLOYED": "deployed", "READY": "ready",
        "GATES_PASSED": "gates-passed", "PAUSE": "pause", "APPROVE": "approve",
        "SWITCHED": "switched", "ANALYSIS_PASSED": "analysis-passed",
        "DELAY_ELAPSED": "delay-elapsed", "FAIL": "fail", "ABORT": "abort",
    }


def rolled_back() -> PromotionRecord:
    """A promotion that switched, failed its analysis and was rolled back."""
    r = record()
    for event, _ in HAPPY_PATH[:5]:
        r.apply(event, 1001.0)
    r.add_gate(GateResult("smoke", "pre-switch", True, "3 events in the log", 0.5,
                          {"events": 3}))
    r.switched(5, 0.12, 1003.0)
    r.add_gate(GateResult("latency", "post-switch", False, "p99 3.1s > 2s", 2.0,
                          {"p99_seconds": 3.1}))
    r.epoch_rolled_back = 6
    r.rollback_seconds = 0.08
    r.apply(Event.FAIL, 1006.0, "latency")
    return r


def test_a_fresh_record_is_stored_with_empty_timings_and_no_gates() -> None:
    assert record().to_dict() == {
        "environment": "local", "image": "0.2.0", "previous_image": "0.1.0",
        "from_slot": "blue", "to_slot": "green", "epoch_before": 4, "auto_promote": True,
        "scale_down_delay_seconds": 30.0, "started_at": 1000.0, "phase": "pending",
        "epoch_after": None, "epoch_rolled_back": None, "switch_seconds": None,
        "rollback_seconds": None, "switched_at": None, "scale_down_at": None,
        "reason": None, "migrations_applied": [], "gates": [], "history": [],
        "aftermath": {
            "active_slot": "blue", "running": ("blue",), "scaled_down": ("green",),
            "control_key": "unchanged (epoch 4 names blue)",
            "summary": "blue stays active on 0.1.0 (epoch 4 names blue, never written); "
                       "green (0.2.0) is scaled down",
        },
    }


def test_the_stored_record_pins_timing_gate_and_history_fields() -> None:
    data = json.loads(json.dumps(rolled_back().to_dict()))
    assert {k: data[k] for k in ("phase", "epoch_before", "epoch_after", "epoch_rolled_back",
                                  "switch_seconds", "rollback_seconds", "switched_at",
                                  "scale_down_at", "reason")} == {
        "phase": "rolled-back", "epoch_before": 4, "epoch_after": 5, "epoch_rolled_back": 6,
        "switch_seconds": 0.12, "rollback_seconds": 0.08, "switched_at": 1003.0,
        "scale_down_at": None, "reason": "latency",
    }
    assert data["gates"] == [
        {"name": "smoke", "stage": "pre-switch", "passed": True,
         "detail": "3 events in the log", "seconds": 0.5, "measured": {"events": 3}},
        {"name": "latency", "stage": "post-switch", "passed": False,
         "detail": "p99 3.1s > 2s", "seconds": 2.0, "measured": {"p99_seconds": 3.1}},
    ]
    assert data["history"][-2:] == [
        {"at": 1003.0, "phase": "post-gates", "event": "switched", "note": "epoch 5, 120 ms"},
        {"at": 1006.0, "phase": "rolled-back", "event": "fail", "note": "latency"},
    ]
    assert data["history"][0] == {"at": 1001.0, "phase": "migrating", "event": "start",
                                  "note": ""}
    assert data["aftermath"] == {
        "active_slot": "blue", "running": ["blue"], "scaled_down": ["green"],
        "control_key": "epoch 6 names blue",
        "summary": "blue is active again on 0.1.0 (epoch 6); green (0.2.0) is scaled down",
    }


def test_a_reloaded_record_holds_phase_and_event_values_not_strings() -> None:
    again = PromotionRecord.from_dict(json.loads(json.dumps(rolled_back().to_dict())))
    assert again == rolled_back()
    assert type(again.phase) is Phase and again.phase is Phase.ROLLED_BACK
    assert all(type(h.phase) is Phase and type(h.event) is Event for h in again.history)
    assert [type(g) for g in again.gates] == [GateResult, GateResult]


def test_a_record_stored_without_history_gates_or_notes_reloads_empty() -> None:
    data = record().to_dict()
    del data["history"], data["gates"]
    assert PromotionRecord.from_dict(data) == record()
    data["history"] = [{"at": 1001.0, "phase": "migrating", "event": "start"}]
    (entry,) = PromotionRecord.from_dict(data).history
    assert entry.note == ""


# ---- transitions and what they record

def test_a_refused_transition_names_the_phase_and_the_event() -> None:
    for phase, event in ((Phase.PENDING, Event.SWITCHED), (Phase.COMPLETED, Event.FAIL)):
        with pytest.raises(InvalidTransition) as caught:
            advance(phase, event)
        assert (caught.value.phase, caught.value.event) == (phase, event)
        assert str(caught.value) == (
            f"a promotion in phase {phase!r} cannot take event {event!r}")


def test_only_a_failure_or_an_abort_records_a_reason() -> None:
    r = record()
    r.apply(Event.START, 1001.0, "go")
    assert r.reason is None


@pytest.mark.parametrize("event", [Event.FAIL, Event.ABORT])
def test_the_abort_reason_is_the_note_or_else_the_event(event: Event) -> None:
    r = record()
    r.apply(event, 1001.0)
    assert r.reason == event.value


def test_the_first_reason_is_kept() -> None:
    r = record(reason="operator rollback")
    r.apply(Event.ABORT, 1001.0, "later note")
    assert r.reason == "operator rollback"


def test_switched_records_epoch_duration_and_time() -> None:
    r = record()
    for event, _ in HAPPY_PATH[:5]:
        r.apply(event, 1001.0)
    r.switched(5, 0.1234, 1003.0)
    assert (r.epoch_after, r.switch_seconds, r.switched_at) == (5, 0.1234, 1003.0)
    assert r.history[-1] == HistoryEntry(1003.0, Phase.POST_GATES, Event.SWITCHED,
                                         "epoch 5, 123 ms")


def test_failed_gates_are_the_ones_that_did_not_pass() -> None:
    r = rolled_back()
    assert [g.name for g in r.failed_gates()] == ["latency"]


def test_the_predicted_rollback_epoch_is_one_above_the_switch_epoch() -> None:
    r = record()
    for event, _ in HAPPY_PATH[:5]:
        r.apply(event, 1001.0)
    r.switched(5, 0.1, 1002.0)
    after = r.aftermath()  # in the rollback window, nothing rolled back yet
    assert (after.active_slot, after.running, after.scaled_down) == ("blue", ("blue",),
                                                                     ("green",))
    assert after.control_key == "epoch 6 names blue"
    r.epoch_after = None  # a record from before the switch epoch was stored
    assert r.aftermath().control_key == "epoch 5 names blue"


def test_a_completed_promotion_says_which_slot_serves_at_which_epoch() -> None:
    r = record()
    for event, _ in HAPPY_PATH[:5]:
        r.apply(event, 1001.0)
    r.switched(5, 0.1, 1002.0)
    r.apply(Event.ANALYSIS_PASSED, 1003.0)
    r.apply(Event.DELAY_ELAPSED, 1033.0)
    after = r.aftermath()
    assert (after.active_slot, after.running, after.scaled_down) == ("green", ("green",),
                                                                     ("blue",))
    assert after.control_key == "epoch 5 names green"
    assert after.summary == ("green is active on 0.2.0 (epoch 5); blue (0.1.0) was scaled "
                             "down after 30s")


@pytest.mark.parametrize("phase", sorted(AFTER_SWITCH))
def test_the_rollback_window_is_the_phases_after_the_switch(phase: Phase) -> None:
    assert record(phase=phase).in_rollback_window
    assert not record(phase=Phase.SWITCHING).in_rollback_window
    assert not record(phase=Phase.ROLLED_BACK).in_rollback_window


@pytest.mark.parametrize("phase", list(Phase))
def test_finished_and_succeeded_follow_the_phase(phase: Phase) -> None:
    r = record(phase=phase)
    assert r.finished is (phase in TERMINAL)
    assert r.succeeded is (phase is Phase.COMPLETED)


def test_a_history_entry_has_no_note_unless_given() -> None:
    assert HistoryEntry(1.0, Phase.PENDING, Event.START).note == ""

"""Blue-green gating decisions: which control-key values let a slot consume (pure logic)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from audit_worker.slots import (
    SLOTS,
    UNGATED,
    ControlValue,
    EpochMemory,
    SlotDecision,
    decide,
    parse_control,
)


def value(slot: str, epoch: int, **extra: object) -> bytes:
    return json.dumps({"slot": slot, "epoch": epoch, **extra}).encode()


def test_the_named_slot_is_active_and_the_other_stands_by() -> None:
    blue, _ = decide("blue", value("blue", 1), EpochMemory())
    green, _ = decide("green", value("blue", 1), EpochMemory())
    assert (blue.active, blue.reason) == (True, "active")
    assert (green.active, green.reason) == (False, "standby")


def test_missing_or_unreadable_key_activates_nobody() -> None:
    for raw, reason in (
        (None, "no_control_key"),
        (b"blue", "invalid_control_value"),
        (b"{}", "invalid_control_value"),
        (value("purple", 1), "invalid_control_value"),
        (value("blue", 0), "invalid_control_value"),
        (value("blue", True), "invalid_control_value"),
        (value("blue", "3"), "invalid_control_value"),
        (b"\xff\xfe", "invalid_control_value"),
        (b"[1, 2]", "invalid_control_value"),
    ):
        decision, memory = decide("blue", raw, EpochMemory(4, "blue"))
        assert (decision.active, decision.reason) == (False, reason), raw
        assert memory == EpochMemory(4, "blue")  # nothing learnt from a bad value


def test_a_stale_epoch_never_resumes_a_worker() -> None:
    memory = EpochMemory()
    decision, memory = decide("blue", value("blue", 7), memory)
    assert decision.active
    decision, memory = decide("blue", value("green", 8), memory)
    assert (decision.active, decision.reason) == (False, "standby")
    # a Redis restored from an old snapshot says blue again, at an older epoch
    decision, memory = decide("blue", value("blue", 7), memory)
    assert (decision.active, decision.reason) == (False, "stale_epoch")
    assert decision.highest_epoch == 8
    decision, memory = decide("blue", value("blue", 9), memory)
    assert decision.active


def test_same_epoch_naming_another_slot_is_a_conflict_until_the_epoch_rises() -> None:
    _, memory = decide("blue", value("blue", 3), EpochMemory())
    decision, memory = decide("blue", value("green", 3), memory)
    assert (decision.active, decision.reason) == (False, "epoch_conflict")
    decision, memory = decide("blue", value("blue", 3), memory)  # same value as before: fine
    assert decision.active
    decision, _ = decide("green", value("green", 4), EpochMemory(3, "blue"))
    assert decision.active


def test_extra_fields_in_the_value_are_ignored() -> None:
    assert parse_control(value("green", 2, changed_at_ms=1, by="auditctl")) == ControlValue(
        "green", 2
    )


def test_describe_says_why() -> None:
    decision, _ = decide("blue", value("blue", 2), EpochMemory(5, "green"))
    assert "older than epoch 5" in decision.describe()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["blue", "green"]), st.integers(min_value=1, max_value=20)),
            st.none(),
        ),
        max_size=30,
    )
)
def test_property_never_active_below_the_highest_epoch_seen(
    history: list[tuple[str, int] | None],
) -> None:
    memory = EpochMemory()
    highest = 0
    for item in history:
        raw = None if item is None else value(*item)
        decision, memory = decide("blue", raw, memory)
        if decision.active:
            assert item is not None and item[0] == "blue" and item[1] >= highest
        if item is not None and decision.reason in ("active", "standby"):
            highest = max(highest, item[1])
        assert memory.epoch == highest


# ---- each decision in full, and what it says in logs and /readyz

def test_every_decision_carries_the_value_and_the_highest_epoch() -> None:
    seen = EpochMemory(5, "green")
    assert decide("blue", None, seen) == (SlotDecision(False, "no_control_key", None, 5), seen)
    assert decide("blue", b"[]", seen) == (
        SlotDecision(False, "invalid_control_value", None, 5), seen)
    assert decide("blue", value("blue", 4), seen) == (
        SlotDecision(False, "stale_epoch", ControlValue("blue", 4), 5), seen)
    assert decide("blue", value("blue", 5), seen) == (
        SlotDecision(False, "epoch_conflict", ControlValue("blue", 5), 5), seen)
    assert decide("blue", value("blue", 6), seen) == (
        SlotDecision(True, "active", ControlValue("blue", 6), 6), EpochMemory(6, "blue"))
    assert decide("green", value("blue", 6), seen) == (
        SlotDecision(False, "standby", ControlValue("blue", 6), 6), EpochMemory(6, "blue"))


def test_a_decision_describes_itself_for_operators() -> None:
    blue7 = ControlValue("blue", 7)
    assert [SlotDecision(*d).describe() for d in (
        (True, "active", blue7, 7), (False, "standby", blue7, 7), (True, "ungated", None, 0),
        (False, "no_control_key", None, 0), (False, "invalid_control_value", None, 3),
        (False, "stale_epoch", blue7, 8), (False, "epoch_conflict", blue7, 7),
    )] == [
        "active (epoch 7 names blue)",
        "standby: epoch 7 names blue",
        "no slot configured: always consuming",
        "no control key: no slot is active",
        "control key does not hold {slot, epoch} JSON",
        "epoch 7 names blue, older than epoch 8 seen before: not resuming",
        "epoch 7 names blue, but epoch 7 named another slot before: not resuming until the "
        "epoch is raised",
    ]
    assert SlotDecision(False, "standby", None, 0).describe() == "standby: no value"
    assert SlotDecision(True, "ungated", None, 0) == UNGATED


def test_the_control_value_is_written_as_slot_and_epoch_json() -> None:
    assert ControlValue("green", 8).encode() == b'{"slot": "green", "epoch": 8}'
    assert parse_control(ControlValue("green", 8).encode()) == ControlValue("green", 8)
    assert SLOTS == ("blue", "green")
    assert EpochMemory() == EpochMemory(0, None)

"""Blue-green gating decisions: which control-key values let a slot consume (pure logic)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from audit_worker.slots import ControlValue, EpochMemory, decide, parse_control


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

"""Blue-green slot gating: a worker consumes only while the control key names its slot.

The control key (``settings.control_key``) holds JSON ``{"slot": "green", "epoch": 7}``.
Every switch raises the epoch (`activate` does both in one atomic Lua script). A worker
remembers the highest epoch it has seen and the slot that epoch named, and refuses:

* a value with an *older* epoch (``stale_epoch``): after a switch to green at epoch 8, a
  Redis restored from an old snapshot or a stray write of ``{"slot": "blue", "epoch": 7}``
  never wakes blue up again;
* a value with the *same* epoch naming another slot (``epoch_conflict``): someone wrote the
  key without raising the epoch, so nobody can tell which write is newer;
* a missing or unreadable key (``no_control_key``, ``invalid_control_value``): no slot is
  active until an operator (or `slot_bootstrap`) sets one.

The decision is re-taken before every batch; an idle worker polls every
``slot_poll_seconds``. A worker that loses the key finishes the batch in hand and stops;
nothing is lost, because unacknowledged entries stay in the stream, and nothing is stored
twice, because the sequencer skips event ids already in the log.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

from redis.asyncio import Redis

from audit_worker.config import Slot

SLOTS: tuple[Slot, ...] = ("blue", "green")
Reason = Literal[
    "active",  # the key names this slot
    "standby",  # the key names the other slot
    "ungated",  # no slot configured: the worker always consumes
    "no_control_key",
    "invalid_control_value",
    "stale_epoch",
    "epoch_conflict",
]


@dataclass(frozen=True, slots=True)
class ControlValue:
    slot: Slot
    epoch: int

    def encode(self) -> bytes:
        return json.dumps({"slot": self.slot, "epoch": self.epoch}).encode()


@dataclass(frozen=True, slots=True)
class EpochMemory:
    """The highest epoch a worker has seen, and the slot that epoch named."""

    epoch: int = 0
    slot: Slot | None = None


@dataclass(frozen=True, slots=True)
class SlotDecision:
    active: bool
    reason: Reason
    value: ControlValue | None
    highest_epoch: int

    def describe(self) -> str:
        seen = f"epoch {self.value.epoch} names {self.value.slot}" if self.value else "no value"
        return {
            "active": f"active ({seen})",
            "standby": f"standby: {seen}",
            "ungated": "no slot configured: always consuming",
            "no_control_key": "no control key: no slot is active",
            "invalid_control_value": "control key does not hold {slot, epoch} JSON",
            "stale_epoch": f"{seen}, older than epoch {self.highest_epoch} seen before: "
            "not resuming",
            "epoch_conflict": f"{seen}, but epoch {self.highest_epoch} named another slot "
            "before: not resuming until the epoch is raised",
        }[self.reason]


def parse_control(raw: bytes | str | None) -> ControlValue | None:
    """The control value, or None when the key is missing or does not hold one."""
    if raw is None:
        return None
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    slot, epoch = data.get("slot"), data.get("epoch")
    if slot not in SLOTS or isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        return None
    return ControlValue(cast(Slot, slot), epoch)


def decide(
    my_slot: Slot, raw: bytes | str | None, memory: EpochMemory
) -> tuple[SlotDecision, EpochMemory]:
    """Whether `my_slot` may consume given the key's raw value; pure (unit-tested)."""
    if raw is None:
        return SlotDecision(False, "no_control_key", None, memory.epoch), memory
    value = parse_control(raw)
    if value is None:
        return SlotDecision(False, "invalid_control_value", None, memory.epoch), memory
    if value.epoch < memory.epoch:
        return SlotDecision(False, "stale_epoch", value, memory.epoch), memory
    if value.epoch == memory.epoch and memory.slot is not None and value.slot != memory.slot:
        return SlotDecision(False, "epoch_conflict", value, memory.epoch), memory
    remembered = EpochMemory(value.epoch, value.slot)
    active = value.slot == my_slot
    return SlotDecision(active, "active" if active else "standby", value, value.epoch), remembered


UNGATED = SlotDecision(True, "ungated", None, 0)


class SlotGate:
    """One worker's view of the control key. Not shared between workers."""

    def __init__(self, slot: Slot, key: str, *, bootstrap: bool = False) -> None:
        self.slot = slot
        self.key = key
        self.bootstrap = bootstrap
        self.memory = EpochMemory()
        self.last: SlotDecision | None = None

    async def check(self, redis: Redis) -> SlotDecision:
        """Read the key and decide (one GET; raises on Redis errors)."""
        raw = await redis.get(self.key)
        if raw is None and self.bootstrap:
            await redis.set(self.key, ControlValue(self.slot, 1).encode(), nx=True)
            raw = await redis.get(self.key)
        decision, self.memory = decide(self.slot, raw, self.memory)
        self.last = decision
        return decision


# Atomic switch: read the epoch, write {slot, epoch + 1} (or `min_epoch` when higher).
# With an expected epoch, refuse (return -1) when someone else switched in between.
_ACTIVATE = """
local current = redis.call('GET', KEYS[1])
local epoch = 0
if current then
  local ok, value = pcall(cjson.decode, current)
  if ok and type(value) == 'table' and tonumber(value['epoch']) then
    epoch = math.floor(tonumber(value['epoch']))
  end
end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= epoch then
  return {-1, epoch}
end
local new = math.max(epoch + 1, tonumber(ARGV[3]))
redis.call('SET', KEYS[1], '{"slot": "' .. ARGV[1] .. '", "epoch": ' .. string.format('%d', new)
  .. ', "changed_at_ms": ' .. ARGV[4] .. '}')
return {new, epoch}
"""


class SwitchRefused(Exception):
    """The control key's epoch was not the one the caller expected."""


async def activate(
    redis: Redis,
    key: str,
    slot: Slot,
    *,
    expected_epoch: int | None = None,
    min_epoch: int = 1,
) -> int:
    """Make `slot` the active one with a new, higher epoch; return that epoch.

    `expected_epoch` makes the switch conditional (compare-and-set). `min_epoch` lets an
    operator jump past epochs that workers saw before a control key was lost.
    """
    if slot not in SLOTS:
        raise ValueError(f"slot must be blue or green, not {slot!r}")
    reply = await redis.eval(
        _ACTIVATE, 1, key, slot,
        "" if expected_epoch is None else str(expected_epoch),
        str(min_epoch), str(int(time.time() * 1000)),
    )
    new, current = int(reply[0]), int(reply[1])
    if new < 0:
        raise SwitchRefused(f"control key is at epoch {current}, not {expected_epoch}")
    return new


async def read_control(redis: Redis, key: str) -> ControlValue | None:
    return parse_control(await redis.get(key))

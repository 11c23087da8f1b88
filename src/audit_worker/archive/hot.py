"""Where the hot database starts once its first months were detached, from what the
database alone can prove: the newest detached month's end range, whose root a trusted key
signed in the checkpoint that ``audit.archived_months`` keeps. Used by `verify` (without
``--archive``) and by the archive reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Any

from audit_worker.archive.bundle import month_text
from audit_worker.crypto import TrustedKeys
from audit_worker.crypto.checkpoint import CheckpointError, open_note
from audit_worker.merkle import CompactRange


@dataclass
class HotStart:
    start: CompactRange | None = None  # None: the hot rows start at index 0
    months: list[date] = field(default_factory=list)  # the detached months, oldest first
    problems: list[str] = field(default_factory=list)


async def detached_start(conn: Any, trusted: TrustedKeys, log_id: str) -> HotStart:
    """The compact range the hot rows continue from (run inside the caller's snapshot)."""
    result = HotStart()
    if not await conn.fetchval("SELECT to_regclass('audit.detached_months') IS NOT NULL"):
        return result
    rows = await conn.fetch(
        "SELECT a.month, a.end_index, a.end_root, a.end_range, a.checkpoint"
        " FROM audit.detached_months d JOIN audit.archived_months a USING (month)"
        " ORDER BY a.month"
    )
    if not rows:
        return result
    result.months = [r["month"] for r in rows]
    last = rows[-1]
    name = month_text(last["month"])
    try:
        end = CompactRange.from_packed(last["end_index"], bytes(last["end_range"]))
        checkpoint, _ = open_note(bytes(last["checkpoint"]), trusted)
    except (ValueError, CheckpointError) as exc:
        result.problems.append(
            f"detached month {name}: its recorded end range or checkpoint does not verify "
            f"({exc}); the hot rows cannot be checked from it: verify with --archive"
        )
        return result
    if (
        checkpoint.origin != log_id
        or checkpoint.tree_size != end.size
        or checkpoint.root_hash != end.root()
        or bytes(last["end_root"]) != end.root()
    ):
        result.problems.append(
            f"detached month {name}: audit.archived_months holds an end range that its "
            "signed checkpoint does not sign: verify with --archive"
        )
        return result
    result.start = end
    return result

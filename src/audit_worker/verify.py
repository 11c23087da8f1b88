"""Independent verification of a stored log: needs only the database and the public key.

Every leaf hash is recomputed from the stored leaf bytes, every signed tree head's root is
recomputed from those leaves, and every indexed column is checked against its leaf. The
report names each problem with its index or tree size, so an auditor can go to the row.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import asyncpg

from audit_worker.crypto import SignatureError, TreeHead, verify_tree_head
from audit_worker.merkle import CompactRange, hash_leaf
from audit_worker.records import parse_leaf

FindingKind = Literal[
    "bad_signature",
    "wrong_log_id",
    "changed_row",
    "column_mismatch",
    "reordered_row",
    "duplicate_index",
    "deleted_row",
    "root_mismatch",
    "truncated_tail",
    "unsigned_tail",
    "unparseable_row",
]

_PAGE = 20_000
# The server renders the indexed columns in the leaf's own text forms, on its own core,
# so the comparison here is string equality.
_ISO_MS = """'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'"""
_SELECT_ROWS = (
    "SELECT log_index, recorded, leaf_data, leaf_hash, event_id::text AS event_id,"
    f" to_char(recorded AT TIME ZONE 'UTC', {_ISO_MS}) AS recorded_iso,"
    f" to_char(occurred AT TIME ZONE 'UTC', {_ISO_MS}) AS occurred_iso,"
    " action, outcome, encode(patient_hmac, 'hex') AS patient_hex,"
    " encode(actor_hmac, 'hex') AS actor_hex FROM audit.events"
)
_MAX_FINDINGS_PER_KIND = 50  # a wholesale rewrite should not produce a million-line report


@dataclass(frozen=True)
class Finding:
    kind: FindingKind
    message: str
    index: int | None = None
    tree_size: int | None = None


@dataclass
class VerifyReport:
    rows: int = 0
    tree_heads: int = 0
    valid_tree_heads: int = 0
    verified_size: int = 0  # leaves covered by a valid, matching signed tree head
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    suppressed: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows": self.rows,
            "tree_heads": self.tree_heads,
            "valid_tree_heads": self.valid_tree_heads,
            "verified_size": self.verified_size,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rate),
            "findings": [asdict(f) for f in self.findings],
            "suppressed": self.suppressed,
        }


class _Collector:
    def __init__(self, report: VerifyReport) -> None:
        self.report = report
        self._counts: dict[str, int] = {}

    def add(self, finding: Finding) -> None:
        n = self._counts.get(finding.kind, 0) + 1
        self._counts[finding.kind] = n
        if n <= _MAX_FINDINGS_PER_KIND:
            self.report.findings.append(finding)
        else:
            self.report.suppressed[finding.kind] = n - _MAX_FINDINGS_PER_KIND


# (column in the SELECT above, key in the leaf, name reported)
_CHECKED_COLUMNS = (
    ("event_id", "event_id", "event_id"),
    ("action", "action", "action"),
    ("outcome", "outcome", "outcome"),
    ("patient_hex", "patient_hmac", "patient_hmac"),
    ("actor_hex", "actor_hmac", "actor_hmac"),
    ("occurred_iso", "occurred", "occurred"),
    ("recorded_iso", "recorded", "recorded"),
)


def _column_problems(row: asyncpg.Record, leaf: dict[str, Any]) -> list[str]:
    return [name for column, key, name in _CHECKED_COLUMNS if leaf.get(key) != row[column]]


async def _verified_heads(
    conn: asyncpg.Connection, public_key_pem: bytes, log_id: str | None, out: _Collector
) -> dict[int, bytes]:
    rows = await conn.fetch(
        "SELECT tree_size, root_hash, timestamp_ms, log_id, signature FROM audit.tree_heads"
        " ORDER BY tree_size"
    )
    out.report.tree_heads = len(rows)
    roots: dict[int, bytes] = {}
    for r in rows:
        size = r["tree_size"]
        if log_id is not None and r["log_id"] != log_id:
            out.add(Finding(
                "wrong_log_id", f"tree head at size {size} is for log {r['log_id']!r}, "
                f"want {log_id!r}", tree_size=size,
            ))
            continue
        try:
            head = TreeHead(r["log_id"], size, bytes(r["root_hash"]), r["timestamp_ms"])
            verify_tree_head(public_key_pem, head, bytes(r["signature"]))
        except (SignatureError, ValueError):
            out.add(Finding(
                "bad_signature",
                f"tree head at size {size}: signature does not verify with the given public "
                "key (forged or re-signed head)",
                tree_size=size,
            ))
            continue
        roots[size] = head.root_hash
    out.report.valid_tree_heads = len(roots)
    return roots


async def verify_log(
    conn: asyncpg.Connection,
    public_key_pem: bytes,
    *,
    log_id: str | None = None,
    allow_unsigned_tail: bool = False,
) -> VerifyReport:
    """Verify the whole log in one consistent snapshot."""
    started = time.perf_counter()
    report = VerifyReport()
    out = _Collector(report)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        roots = await _verified_heads(conn, public_key_pem, log_id, out)
        frontier = CompactRange()
        broken_at: int | None = None  # after a gap, later roots cannot be recomputed
        last_key: tuple[Any, ...] = ()
        while True:
            # Keyset pages: bounded memory, and duplicates or wild indices still come through.
            where = "WHERE (log_index, recorded) > ($2, $3)" if last_key else ""
            rows = await conn.fetch(
                f"{_SELECT_ROWS} {where} ORDER BY log_index, recorded LIMIT $1",
                _PAGE, *last_key,
            )
            if not rows:
                break
            last_key = (rows[-1]["log_index"], rows[-1]["recorded"])
            for row in rows:
                index = row["log_index"]
                report.rows += 1
                expected = frontier.size
                if index < expected:
                    out.add(Finding(
                        "duplicate_index", f"a second row claims index {index}", index=index
                    ))
                    continue
                if index > expected:
                    missing = index - expected
                    out.add(Finding(
                        "deleted_row",
                        f"{missing} row(s) missing at index {expected}"
                        + (f"..{index - 1}" if missing > 1 else ""),
                        index=expected,
                    ))
                    broken_at = expected if broken_at is None else broken_at
                    # Keep checking rows; pad so the indices line up again.
                    for _ in range(missing):
                        frontier.append(b"\x00" * 32)
                leaf_data = bytes(row["leaf_data"])
                leaf_hash = hash_leaf(leaf_data)
                if leaf_hash != bytes(row["leaf_hash"]):
                    out.add(Finding(
                        "changed_row",
                        f"row {index}: its data no longer hashes to the leaf hash written "
                        "with it",
                        index=index,
                    ))
                prefix = b'{"log_index":%d,' % index
                if not leaf_data.startswith(prefix):
                    out.add(Finding(
                        "reordered_row",
                        f"row stored at index {index} was written for another index "
                        f"({leaf_data[:40].split(b',')[0].decode(errors='replace')})",
                        index=index,
                    ))
                else:
                    try:
                        problems = _column_problems(row, parse_leaf(leaf_data))
                    except ValueError:
                        out.add(Finding(
                            "unparseable_row", f"row {index}: leaf is not JSON", index=index
                        ))
                        problems = []
                    if problems:
                        out.add(Finding(
                            "column_mismatch",
                            f"row {index}: column(s) {', '.join(problems)} differ from the "
                            "logged leaf (searches would return wrong rows)",
                            index=index,
                        ))
                frontier.append(leaf_hash)
                signed_root = roots.get(frontier.size)
                if signed_root is not None and broken_at is None:
                    computed = frontier.root()
                    if computed != signed_root:
                        out.add(Finding(
                            "root_mismatch",
                            f"tree head at size {frontier.size} signs root "
                            f"{signed_root.hex()[:16]}…, the rows give {computed.hex()[:16]}…",
                            tree_size=frontier.size,
                        ))
                        broken_at = frontier.size
                    else:
                        report.verified_size = frontier.size
    size = frontier.size
    signed_sizes = sorted(roots)
    largest = signed_sizes[-1] if signed_sizes else 0
    if largest > size:
        out.add(Finding(
            "truncated_tail",
            f"the log ends at {size} rows but a tree head was signed at size {largest}: "
            f"{largest - size} row(s) removed from the end",
            tree_size=largest,
        ))
    if size > largest and not allow_unsigned_tail:
        out.add(Finding(
            "unsigned_tail",
            f"{size - largest} row(s) from index {largest} are not covered by any valid signed "
            "tree head (inserted after the last head, or the writer died before signing)",
            index=largest,
        ))
    report.seconds = time.perf_counter() - started
    return report

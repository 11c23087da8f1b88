"""Reading the archive: every month bundle verified and chained (month k starts where
month k-1 ended, the first at index 0), tied to the live log (`verify --archive`), and
archived leaf hashes for inclusion proofs of events that left the database."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from hashlib import sha256
from typing import Any

import asyncpg

from audit_worker.archive.bundle import (
    BundleError,
    VerifiedBundle,
    month_from_key,
    month_prefix,
    month_text,
    verify_bundle,
)
from audit_worker.crypto import TreeHead, TrustedKeys
from audit_worker.merkle import NODE_PREFIX, CompactRange, root_from_leaf_hashes
from audit_worker.objectstore import ObjectStore
from audit_worker.verify import Finding, VerifyReport, verify_log

__all__ = [
    "ArchiveCheck",
    "archived_months",
    "check_archive",
    "inclusion_path",
    "prove_archived",
    "verify_with_archive",
]

_NODE = bytes([NODE_PREFIX])


@dataclass
class ArchiveCheck:
    bundles: list[VerifiedBundle] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    chain_ok: bool = True  # every bundle verified and chained from index 0

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.bundles)

    def ending_at(self, index: int) -> VerifiedBundle | None:
        return next((b for b in self.bundles if b.end_index == index), None)


def archived_months(store: ObjectStore, log_id: str) -> list[date]:
    """Months that have a manifest in the archive, oldest first."""
    keys = store.keys(f"{log_id}/months/", limit=10**7)
    return sorted({m for k in keys if (m := month_from_key(k, log_id)) is not None})


def _fetcher(store: ObjectStore, log_id: str, month: date) -> Callable[[str], bytes | None]:
    prefix = month_prefix(log_id, month)
    return lambda key: store.get(prefix + key)


def check_archive(
    store: ObjectStore,
    trusted: TrustedKeys,
    log_id: str,
    *,
    signed_roots: Mapping[int, bytes] | None = None,
    recorded: Sequence[date] = (),
    on_rows: Callable[[int], None] | None = None,
) -> ArchiveCheck:
    """Verify every bundle and the chain between them (blocking: run it in a thread).
    `recorded`: months the database says it exported (each must be in the archive);
    `signed_roots`: the database's verified heads, compared where a month covers them."""
    started = time.perf_counter()
    check = ArchiveCheck()
    months = archived_months(store, log_id)
    for month in sorted(set(recorded) - set(months)):
        check.findings.append(Finding(
            "missing_month",
            f"month {month_text(month)} is recorded in audit.archived_months but its bundle "
            f"is not in {store.url}",
        ))
        check.chain_ok = False
    previous: CompactRange | None = CompactRange()
    for month in months:
        fetch = _fetcher(store, log_id, month)
        manifest = fetch("manifest.json")
        try:
            assert manifest is not None  # listed a moment ago; Object Lock keeps it
            bundle = verify_bundle(
                manifest, fetch, trusted, log_id=log_id, month=month, expected_start=None,
                signed_roots=signed_roots, on_rows=on_rows,
            )
        except (BundleError, AssertionError) as exc:
            check.findings.append(Finding(
                "archive_mismatch", str(exc) or f"month {month_text(month)}: manifest vanished"
            ))
            check.chain_ok = False
            previous = None
            continue
        if previous is not None and (
            bundle.start_range.size != previous.size
            or bundle.start_range.hashes != previous.hashes
        ):
            check.findings.append(Finding(
                "missing_month",
                f"month {month_text(month)} starts at index {bundle.first_index}, but the "
                f"archive before it ends at {previous.size} (or ends with another range): a "
                "month is missing from the archive, or one was rewritten",
                index=previous.size,
            ))
            check.chain_ok = False
        check.bundles.append(bundle)
        previous = bundle.end_range
    check.seconds = time.perf_counter() - started
    return check


async def _signed_roots(conn: Any, trusted: TrustedKeys, log_id: str) -> dict[int, bytes]:
    """Roots of the database's heads that verify (verify_log reports the others)."""
    roots = {}
    for r in await conn.fetch(
        "SELECT tree_size, root_hash, timestamp_ms, log_id, signature FROM audit.tree_heads"
    ):
        try:
            head = TreeHead(r["log_id"], r["tree_size"], bytes(r["root_hash"]), r["timestamp_ms"])
        except (TypeError, ValueError):
            continue
        if r["log_id"] == log_id and trusted.check_head(head, bytes(r["signature"])) == "ok":
            roots[head.tree_size] = head.root_hash
    return roots


async def _recorded_months(conn: Any) -> list[date]:
    if not await conn.fetchval("SELECT to_regclass('audit.archived_months') IS NOT NULL"):
        return []
    return [r["month"] for r in await conn.fetch("SELECT month FROM audit.archived_months")]


async def verify_with_archive(
    conn: asyncpg.Connection,
    store: ObjectStore,
    trusted: TrustedKeys,
    *,
    log_id: str,
    on_rows: Callable[[int], None] | None = None,
    **verify_kwargs: Any,
) -> VerifyReport:
    """Verify the archived months, then the live log from the last detached month's end:
    the first hot index must be where an archived month ends, the database's signed heads
    inside archived months must match the archived rows."""
    roots = await _signed_roots(conn, trusted, log_id)
    recorded = await _recorded_months(conn)
    hot_min = await conn.fetchval("SELECT min(log_index) FROM audit.events")
    check = await asyncio.to_thread(
        check_archive, store, trusted, log_id, signed_roots=roots, recorded=recorded,
        on_rows=on_rows,
    )
    start: CompactRange | None = None
    problems: list[Finding] = []
    if hot_min is not None and hot_min > 0:
        bundle = check.ending_at(hot_min) if check.chain_ok else None
        if bundle is not None:
            start = bundle.end_range
        elif check.chain_ok:
            end = check.bundles[-1].end_index if check.bundles else 0
            problems.append(Finding(
                "missing_month",
                f"the hot rows start at index {hot_min}, but the archive "
                + (f"ends at {end}" if end < hot_min else f"has no month ending at {hot_min}")
                + f": rows {min(end, hot_min)}..{max(end, hot_min) - 1} are neither in the "
                "archive nor in the database, or overlap it",
                index=min(end, hot_min),
            ))
    report = await verify_log(conn, trusted, log_id=log_id, start=start, **verify_kwargs)
    if hot_min is not None and hot_min > 0 and start is None:
        report.limits.append(
            "hot rows: checked without the archive's end range (the archive did not verify "
            "up to the first hot index)"
        )
    report.findings[:0] = check.findings + problems
    report.archive_checked = True
    report.archived_rows = check.rows
    report.archived_months = len(check.bundles)
    report.archive_seconds = check.seconds
    return report


# ---------------------------------------------------------------------- proofs
def _manifest_range(manifest: bytes, month: date) -> tuple[int, int]:
    try:
        document = json.loads(manifest)
        first, end = document["first_index"], document["end_index"]
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"month {month_text(month)}: manifest.json is malformed") from None
    if not isinstance(first, int) or not isinstance(end, int):
        raise BundleError(f"month {month_text(month)}: manifest index range is malformed")
    return first, end


def _split(count: int) -> int:
    return 1 << ((count - 1).bit_length() - 1)


def inclusion_path(
    start: CompactRange, leaves: Sequence[bytes], index: int, size: int
) -> tuple[list[bytes], bytes]:
    """RFC 9162 inclusion proof (leaf to root) of `index` in the tree of `size` leaves and
    its root, from the compact range at F = start.size and the leaf hashes [F, size).
    Requires F <= index < size == F + len(leaves). The proof's nodes left of F are always
    subtrees of the compact range: O(size - F) hashing, no leaf below F needed."""
    first = start.size
    if not first <= index < size or size != first + len(leaves):
        raise ValueError(f"need {first} <= index {index} < size {size} = {first} + leaves")
    nodes: dict[tuple[int, int], bytes] = {}
    low = 0
    for bit in reversed(range(first.bit_length())):
        if first >> bit & 1:
            nodes[(low, low + (1 << bit))] = start.hashes[len(nodes)]
            low += 1 << bit

    def mth(lo: int, hi: int) -> bytes:
        if (lo, hi) in nodes:
            return nodes[(lo, hi)]
        if lo >= first:
            return root_from_leaf_hashes(leaves[lo - first : hi - first])
        if hi - lo == 1:
            raise ValueError(f"leaf {lo} is below the start range and not one of its subtrees")
        k = _split(hi - lo)
        return sha256(_NODE + mth(lo, lo + k) + mth(lo + k, hi)).digest()

    path: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(mth(lo + k, hi))
            hi = lo + k
        else:
            path.append(mth(lo, lo + k))
            lo = lo + k
    path.reverse()
    return path, mth(0, size)


@dataclass(frozen=True)
class ArchivedProof:
    event_id: uuid.UUID
    log_index: int
    tree_size: int
    leaf_hash: bytes
    path: list[bytes]
    root: bytes
    month: str


async def prove_archived(
    conn: Any,
    store: ObjectStore,
    trusted: TrustedKeys,
    *,
    log_id: str,
    event_id: uuid.UUID,
    tree_size: int,
) -> ArchivedProof:
    """Inclusion proof of an event whose month may have left the database: the leaves of
    its month and later come from verified bundles, the rest from the hot rows."""
    index = await conn.fetchval(
        "SELECT log_index FROM audit.event_keys WHERE event_id = $1", event_id
    )
    if index is None:
        index = await conn.fetchval(
            "SELECT log_index FROM audit.events WHERE event_id = $1", event_id
        )
    if index is None:
        raise LookupError(f"event {event_id} is not in the log")
    if index >= tree_size:
        raise LookupError(f"event {event_id} has index {index}, beyond tree size {tree_size}")
    hot_min = await conn.fetchval("SELECT min(log_index) FROM audit.events")
    hot_min = tree_size if hot_min is None else min(hot_min, tree_size)

    def archived() -> tuple[CompactRange, list[bytes], str]:
        # Only the months from the event's (or, for a hot event, the last archived one)
        # up to the hot rows are read. A month's start range needs no earlier month: its
        # rows hash from it to the root its own signed checkpoint signs.
        low = min(index, hot_min - 1)
        needed: list[tuple[date, bytes]] = []
        for month in archived_months(store, log_id):
            manifest = _fetcher(store, log_id, month)("manifest.json")
            if manifest is None:
                continue
            first, end = _manifest_range(manifest, month)
            if end > low and first < hot_min:
                needed.append((month, manifest))
        start: CompactRange | None = None
        leaves: list[bytes] = []
        previous: CompactRange | None = None
        for month, manifest in needed:
            bundle = verify_bundle(
                manifest, _fetcher(store, log_id, month), trusted, log_id=log_id, month=month,
                expected_start=previous, keep_leaves=True,
            )
            assert bundle.leaf_hashes is not None
            start = start or bundle.start_range
            leaves += bundle.leaf_hashes
            previous = bundle.end_range
        if start is None or previous is None:
            raise LookupError(
                f"no archived month covers index {low}: run `audit-worker verify --archive`"
            )
        if index >= hot_min:  # a hot event: only the archive's end range is needed
            return previous, [], "hot"
        return start, leaves, month_text(needed[0][0])

    leaves: list[bytes]
    if index >= hot_min and hot_min == 0:
        start, leaves, name = CompactRange(), [], "hot"
    else:
        start, leaves, name = await asyncio.to_thread(archived)
    if start.size + len(leaves) < hot_min:
        raise LookupError(
            f"the archive ends at index {start.size + len(leaves)} but the hot rows start at "
            f"{hot_min}: run `audit-worker verify --archive`"
        )
    leaves = leaves[: max(0, tree_size - start.size)]
    upto = start.size + len(leaves)
    if upto < tree_size:
        rows = await conn.fetch(
            "SELECT log_index, leaf_hash FROM audit.events WHERE log_index >= $1"
            " AND log_index < $2 ORDER BY log_index", upto, tree_size,
        )
        if [r["log_index"] for r in rows] != list(range(upto, tree_size)):
            raise LookupError(f"the log lacks rows between {upto} and {tree_size}")
        leaves += [bytes(r["leaf_hash"]) for r in rows]
    if index < start.size:
        raise LookupError(f"event {event_id}: index {index} is below the archive's start")
    path, root = inclusion_path(start, leaves, index, tree_size)
    return ArchivedProof(event_id, index, tree_size, leaves[index - start.size], path, root,
                         name)

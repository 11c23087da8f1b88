"""Independent verification of a stored log: needs only the database and the public key.

Every leaf hash is recomputed from the stored leaf bytes, every signed tree head's root is
recomputed from those leaves, and every indexed column is checked against its leaf. The
report names each problem with its index or tree size, so an auditor can go to the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import asyncpg

from audit_worker.crypto import SignatureError, TreeHead, verify_tree_head
from audit_worker.merkle import CompactRange, hash_children, hash_leaf

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
]

_PAGE = 20_000
_MAX_FINDINGS_PER_KIND = 50  # a wholesale rewrite should not produce a million-line report
_YIELD_EVERY = 2_000
_CHUNK = 1 << 16  # rows per chunk; a power of two (see _chunks)
# The server renders each indexed column as the exact fragment it must appear as in the
# canonical leaf (``,"key":value,``), on its own core; checking a column is then a substring
# test instead of a JSON parse. In canonical JSON a raw quote or newline cannot occur inside a
# value and no nested object reuses these keys, so a fragment can only match its own key.
_ISO_MS = """'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'"""
_CHECKED = (
    ("event_id", "'\"' || event_id::text || '\"'"),
    ("action", "'\"' || action::text || '\"'"),
    ("outcome", "outcome::text"),
    ("patient_hmac", "coalesce('\"' || encode(patient_hmac, 'hex') || '\"', 'null')"),
    ("actor_hmac", "'\"' || encode(actor_hmac, 'hex') || '\"'"),
    ("occurred", f"'\"' || to_char(occurred AT TIME ZONE 'UTC', {_ISO_MS}) || '\"'"),
    ("recorded", f"'\"' || to_char(recorded AT TIME ZONE 'UTC', {_ISO_MS}) || '\"'"),
)
_SELECT_ROWS = (
    "SELECT log_index, leaf_data, leaf_hash, convert_to(concat_ws(E'\\n', "
    + ", ".join(f"',\"{key}\":' || {expr} || ','" for key, expr in _CHECKED)
    + "), 'UTF8') AS fragments FROM audit.events"
)


def _column_problems(fragments: bytes, leaf_data: bytes) -> list[str]:
    parts = fragments.split(b"\n")
    if len(parts) != len(_CHECKED):
        return [key for key, _ in _CHECKED]
    return [key for (key, _), part in zip(_CHECKED, parts, strict=True) if part not in leaf_data]


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


def _signed_by_any(public_keys: Sequence[bytes], head: TreeHead, signature: bytes) -> bool:
    for pem in public_keys:
        try:
            verify_tree_head(pem, head, signature)
        except (SignatureError, ValueError):
            continue
        return True
    return False


async def _verified_heads(
    conn: asyncpg.Connection, public_keys: Sequence[bytes], log_id: str | None, out: _Collector
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
            out.add(
                Finding(
                    "wrong_log_id",
                    f"tree head at size {size} is for log {r['log_id']!r}, want {log_id!r}",
                    tree_size=size,
                )
            )
            continue
        try:
            head = TreeHead(r["log_id"], size, bytes(r["root_hash"]), r["timestamp_ms"])
        except ValueError:
            head = None
        if head is None or not _signed_by_any(public_keys, head, bytes(r["signature"])):
            out.add(
                Finding(
                    "bad_signature",
                    f"tree head at size {size}: signature does not verify with the given public "
                    "key(s) (forged or re-signed head)",
                    tree_size=size,
                )
            )
            continue
        roots[size] = head.root_hash
    out.report.valid_tree_heads = len(roots)
    return roots


async def _pages(
    conn: asyncpg.Connection,
    queue: asyncio.Queue[list[asyncpg.Record] | BaseException | None],
    lo: int,
    hi: int,
) -> None:
    """Fetch [lo, hi) in pages of _PAGE indices, ahead of the checker, so the server renders
    the next page while this process hashes the current one. Pages are index ranges, not
    row counts, so every row of an index comes in the same page, duplicates included.
    A failure is handed to the consumer rather than leaving it waiting."""
    try:
        for start in range(lo, hi, _PAGE):
            rows = await conn.fetch(
                f"{_SELECT_ROWS} WHERE log_index >= $1 AND log_index < $2 ORDER BY log_index",
                start,
                min(start + _PAGE, hi),
            )
            if rows:
                await queue.put(rows)
        await queue.put(None)
    except BaseException as exc:
        await queue.put(exc)
        raise


@dataclass
class _Chunk:
    """The result of checking the index range [lo, hi): content findings, where the range
    stops being a gapless run (if it does), and the subtree hashes the tree needs."""

    lo: int
    hi: int
    rows: int = 0
    findings: list[Finding] = field(default_factory=list)
    broken_at: int | None = None
    # compact range of [lo, s) for every signed size s in (lo, hi]: with the subtrees left of
    # lo (aligned chunks), it gives the root at s
    partials: dict[int, list[bytes]] = field(default_factory=dict)
    root: bytes | None = None  # the perfect subtree of a complete, gapless chunk


def _check_row(row: asyncpg.Record, findings: list[Finding]) -> bytes:
    """Checks that need no other row; returns the recomputed leaf hash."""
    index = row["log_index"]
    leaf_data = row["leaf_data"]
    leaf_hash = hash_leaf(leaf_data)
    if leaf_hash != row["leaf_hash"]:
        findings.append(
            Finding(
                "changed_row",
                f"row {index}: its data no longer hashes to the leaf hash written with it",
                index=index,
            )
        )
    if not leaf_data.startswith(b'{"log_index":%d,' % index):
        claimed = leaf_data[:40].split(b",")[0].decode(errors="replace")
        findings.append(
            Finding(
                "reordered_row",
                f"row stored at index {index} was written for another index ({claimed})",
                index=index,
            )
        )
        return leaf_hash
    fragments = row["fragments"]
    if not all(part in leaf_data for part in fragments.split(b"\n")):
        findings.append(
            Finding(
                "column_mismatch",
                f"row {index}: column(s) {', '.join(_column_problems(fragments, leaf_data))} "
                "differ from the logged leaf (searches would return wrong rows)",
                index=index,
            )
        )
    return leaf_hash


class _ChunkChecker:
    def __init__(self, lo: int, hi: int, signed_sizes: list[int]) -> None:
        self.chunk = _Chunk(lo, hi)
        self.expected = lo
        self.range = CompactRange()
        self.wanted = set(signed_sizes)

    def feed(self, rows: list[asyncpg.Record]) -> None:
        chunk, findings = self.chunk, self.chunk.findings
        append, wanted = self.range.append, self.wanted
        chunk.rows += len(rows)
        for row in rows:
            index = row["log_index"]
            if index != self.expected:
                if index < self.expected:
                    findings.append(
                        Finding(
                            "duplicate_index", f"a second row claims index {index}", index=index
                        )
                    )
                    continue
                self._gap(index)
            self.expected = index + 1
            leaf_hash = _check_row(row, findings)
            if chunk.broken_at is None:
                append(leaf_hash)
                if index + 1 in wanted:
                    chunk.partials[index + 1] = self.range.hashes

    def _gap(self, index: int) -> None:
        missing = index - self.expected
        self.chunk.findings.append(
            Finding(
                "deleted_row",
                f"{missing} row(s) missing at index {self.expected}"
                + (f"..{index - 1}" if missing > 1 else ""),
                index=self.expected,
            )
        )
        if self.chunk.broken_at is None:
            self.chunk.broken_at = self.expected

    def finish(self) -> _Chunk:
        chunk = self.chunk
        if self.expected < chunk.hi:
            self._gap(chunk.hi)
        if chunk.broken_at is None and self.range.size == chunk.hi - chunk.lo:
            chunk.root = self.range.root()
        return chunk


async def _check_chunk(
    conn: asyncpg.Connection, lo: int, hi: int, signed_sizes: list[int]
) -> _Chunk:
    checker = _ChunkChecker(lo, hi, signed_sizes)
    queue: asyncio.Queue[list[asyncpg.Record] | BaseException | None] = asyncio.Queue(2)
    reader = asyncio.create_task(_pages(conn, queue, lo, hi))
    try:
        while (rows := await queue.get()) is not None:
            if isinstance(rows, BaseException):
                raise rows
            for start in range(0, len(rows), _YIELD_EVERY):
                checker.feed(rows[start : start + _YIELD_EVERY])
                await asyncio.sleep(0)  # let the reader take in the next page
        await reader
    finally:
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
    return checker.finish()


async def _check_chunk_in_snapshot(
    dsn: str, snapshot: str, lo: int, hi: int, signed_sizes: list[int]
) -> _Chunk:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            return await _check_chunk(conn, lo, hi, signed_sizes)
    finally:
        await conn.close()


def _check_chunk_process(
    dsn: str, snapshot: str, lo: int, hi: int, signed_sizes: list[int]
) -> _Chunk:
    """Entry point of a worker process: one index range, in the coordinator's snapshot."""
    return asyncio.run(_check_chunk_in_snapshot(dsn, snapshot, lo, hi, signed_sizes))


class _Assembler:
    """Joins chunk results in index order and compares every signed root."""

    def __init__(self, roots: dict[int, bytes], out: _Collector) -> None:
        self.roots = roots
        self.out = out
        self.left = CompactRange()  # perfect subtrees of the complete chunks so far
        self.broken = False
        self.next_lo = 0  # where the next chunk should start

    def add(self, chunk: _Chunk) -> None:
        if chunk.lo > self.next_lo:
            missing = chunk.lo - self.next_lo
            self.out.add(
                Finding(
                    "deleted_row",
                    f"{missing} row(s) missing at index {self.next_lo}..{chunk.lo - 1}",
                    index=self.next_lo,
                )
            )
            self.broken = True
        self.next_lo = chunk.hi
        for finding in chunk.findings:
            self.out.add(finding)
        self.out.report.rows += chunk.rows
        if self.broken:
            return
        for size in sorted(chunk.partials):
            if self.broken:
                break
            self._compare(size, self.left.hashes + chunk.partials[size])
        if chunk.broken_at is not None or chunk.root is None:
            self.broken = True  # a gap, or a short last chunk: nothing further lines up
        else:
            self.left.append(chunk.root)

    def _compare(self, size: int, hashes: list[bytes]) -> None:
        computed = hashes[-1]
        for node in reversed(hashes[:-1]):
            computed = hash_children(node, computed)
        signed = self.roots[size]
        if computed != signed:
            self.out.add(
                Finding(
                    "root_mismatch",
                    f"tree head at size {size} signs root {signed.hex()[:16]}…, "
                    f"the rows give {computed.hex()[:16]}…",
                    tree_size=size,
                )
            )
            self.broken = True
        else:
            self.out.report.verified_size = size


async def _plan_chunks(
    conn: asyncpg.Connection, end: int, roots: dict[int, bytes]
) -> list[tuple[int, int, list[int]]]:
    """Aligned ranges of _CHUNK indices (a power of two, so each complete chunk is one
    perfect subtree) that hold rows, with the signed sizes that fall inside each. Empty
    regions are skipped by seeking the next stored index, so a forged row at a huge index
    costs one seek, not billions of empty ranges."""
    sizes = sorted(roots)
    plan = []
    lo = 0
    while lo < end:
        hi = min(lo + _CHUNK, end)
        plan.append((lo, hi, [s for s in sizes if lo < s <= hi]))
        following = await conn.fetchval(
            "SELECT min(log_index) FROM audit.events WHERE log_index >= $1", hi
        )
        if following is None:
            break
        lo = max(hi, following - following % _CHUNK)
    return plan


async def _check_all(
    conn: asyncpg.Connection,
    roots: dict[int, bytes],
    out: _Collector,
    dsn: str | None,
    workers: int,
) -> int:
    """Check every row; returns the size of the log (one past the highest index)."""
    bounds = await conn.fetchrow("SELECT min(log_index), max(log_index) FROM audit.events")
    assert bounds is not None  # an aggregate always returns a row
    low, high = bounds["min"], bounds["max"]
    if low is None:
        return 0
    if low < 0:
        out.add(Finding("reordered_row", f"a row claims the impossible index {low}", index=low))
    end = int(high) + 1
    assembler = _Assembler(roots, out)
    plan = await _plan_chunks(conn, end, roots)
    if dsn and workers > 1 and len(plan) > 1:
        snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")  # never fork a running event loop
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [
                loop.run_in_executor(pool, _check_chunk_process, dsn, snapshot, lo, hi, sizes)
                for lo, hi, sizes in plan
            ]
            for future in futures:  # in index order: the tree needs them in order
                assembler.add(await future)
    else:
        for lo, hi, sizes in plan:
            assembler.add(await _check_chunk(conn, lo, hi, sizes))
    return end


async def verify_log(
    conn: asyncpg.Connection,
    public_keys: bytes | Sequence[bytes],
    *,
    log_id: str | None = None,
    allow_unsigned_tail: bool = False,
    dsn: str | None = None,
    workers: int = 1,
) -> VerifyReport:
    """Verify the whole log in one consistent snapshot.

    `public_keys` is the signer's PEM public key, or several when the signing key was
    rotated: a tree head passes when any of them verifies it.

    With `dsn` and `workers` > 1, the per-row checks of large logs run in that many
    processes, each reading an index range in the same snapshot; the tree is still built
    here, in order.
    """
    started = time.perf_counter()
    report = VerifyReport()
    out = _Collector(report)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        keys = [public_keys] if isinstance(public_keys, bytes) else list(public_keys)
        roots = await _verified_heads(conn, keys, log_id, out)
        size = await _check_all(conn, roots, out, dsn, workers)
    largest = max(roots, default=0)
    if largest > size:
        out.add(
            Finding(
                "truncated_tail",
                f"the log ends at {size} rows but a tree head was signed at size {largest}: "
                f"{largest - size} row(s) removed from the end",
                tree_size=largest,
            )
        )
    if size > largest and not allow_unsigned_tail:
        out.add(
            Finding(
                "unsigned_tail",
                f"{size - largest} row(s) from index {largest} are not covered by any valid signed "
                "tree head (inserted after the last head, or the writer died before signing)",
                index=largest,
            )
        )
    report.seconds = time.perf_counter() - started
    return report

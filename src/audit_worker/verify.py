"""Independent verification of a stored log: needs only the database and the trusted keys.

Every leaf hash is recomputed from the stored leaf bytes, every signed tree head's root is
recomputed from those leaves, and every indexed column is checked against its leaf. A head
counts only when it names the expected log and a key valid at the head's time signed it;
heads must not go back in time as the tree grows; an event id is stored once; the
dead-letter hash chain is recomputed. The report names each problem with its index or tree
size, so an auditor can go to the row, and lists in `limits` what it could not check.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import asyncpg

from audit_worker import tls
from audit_worker.crypto import TreeHead, TrustedKeys
from audit_worker.crypto.checkpoint import Checkpoint
from audit_worker.deadletter_chain import GENESIS, ChainChecker
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
    "timestamp_backwards",
    "key_outside_window",
    "duplicate_event_id",
    "dead_letter_changed",
    "dead_letter_deleted",
    "dead_letter_unchained",
    "archive_mismatch",
    "missing_month",
    "rolled_back",
    "witness_mismatch",
    "witness_forged",
    "dead_letters_rolled_back",
    "dead_letter_witness_mismatch",
]

_PAGE = 20_000
_MAX_FINDINGS_PER_KIND = 50  # a wholesale rewrite should not produce a million-line report
_YIELD_EVERY = 2_000
# A verify of a large log runs for minutes, and its first connection waits idle in its
# transaction while processes check chunks: whatever timeouts the login has by default
# (a worker login has both, see the deployment guide), they must not cut it.
_UNBOUNDED = "SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = 0"
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
# data_key_id sits inside the sealed object (``"sealed":{"ct":"…","key_id":"…"}``, keys
# sorted), so its fragment ends with ``}``; a text column is JSON-quoted by the server, so a
# forged value cannot close the string and match more of the leaf. NULL must mean no sealed
# fields at all: the leaf then holds ``"sealed":null``, and no ``"key_id"``.
_KEY_ID_FRAGMENT = (
    "coalesce(',\"key_id\":' || to_json(data_key_id)::text || '}', ',\"sealed\":null,')"
)
_FRAGMENTS = [f"',\"{key}\":' || {expr} || ','" for key, expr in _CHECKED] + [_KEY_ID_FRAGMENT]
_COLUMNS = [key for key, _ in _CHECKED] + ["data_key_id"]
_SELECT_ROWS = (
    "SELECT log_index, leaf_data, leaf_hash, convert_to(concat_ws(E'\\n', "
    + ", ".join(_FRAGMENTS)
    + "), 'UTF8') AS fragments FROM audit.events"
)


def _column_problems(fragments: bytes, leaf_data: bytes) -> list[str]:
    parts = fragments.split(b"\n")
    if len(parts) != len(_COLUMNS):
        return list(_COLUMNS)
    return [key for key, part in zip(_COLUMNS, parts, strict=True) if part not in leaf_data]


@dataclass(frozen=True)
class Finding:
    kind: FindingKind
    message: str
    index: int | None = None  # log index; for dead_letter_* findings, the chain index
    tree_size: int | None = None
    dead_letter_id: int | None = None  # audit.dead_letters.id, for dead_letter_* findings


@dataclass
class VerifyReport:
    rows: int = 0
    tree_heads: int = 0
    valid_tree_heads: int = 0
    verified_size: int = 0  # leaves covered by a valid, matching signed tree head
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    suppressed: dict[str, int] = field(default_factory=dict)
    # What this run could not check (a reader must not take "ok" for more than it is).
    limits: list[str] = field(default_factory=list)
    # The dead-letter chain as checked: its length and the hash of its last row (what a
    # witness of the chain head is compared with).
    dead_letters: int = 0
    dead_letter_chain_hash: bytes = GENESIS
    witnessed_size: int | None = None  # the witnessed checkpoint checked against, if any
    # With --archive (archive_checked): rows and months verified in the archive's month
    # bundles, and how long.
    archive_checked: bool = False
    archived_rows: int = 0
    archived_months: int = 0
    archive_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return self._archive_dict() | {
            "ok": self.ok,
            "rows": self.rows,
            "tree_heads": self.tree_heads,
            "valid_tree_heads": self.valid_tree_heads,
            "verified_size": self.verified_size,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rate),
            "findings": [asdict(f) for f in self.findings],
            "suppressed": self.suppressed,
            "limits": self.limits,
            "dead_letters": self.dead_letters,
            "dead_letter_chain_hash": self.dead_letter_chain_hash.hex(),
            "witnessed_size": self.witnessed_size,
        }

    def _archive_dict(self) -> dict[str, Any]:
        if not self.archive_checked:
            return {}
        return {
            "archived_rows": self.archived_rows,
            "archived_months": self.archived_months,
            "archive_seconds": round(self.archive_seconds, 3),
            "archived_rows_per_second": round(
                self.archived_rows / self.archive_seconds if self.archive_seconds > 0 else 0
            ),
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


def _iso(timestamp_ms: int) -> str:
    try:
        moment = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return f"{timestamp_ms} ms"


def _check_heads(
    rows: Sequence[asyncpg.Record | Mapping[str, Any]],
    trusted: TrustedKeys,
    log_id: str,
    out: _Collector,
) -> dict[int, bytes]:
    """The roots of the heads this verifier trusts (rows in tree-size order): the head
    names `log_id` and a key of `trusted` whose window covers the head's timestamp signed
    it. Trusted heads must not go back in time as the tree grows (equal times are fine)."""
    out.report.tree_heads = len(rows)
    roots: dict[int, bytes] = {}
    latest: tuple[int, int] | None = None  # (timestamp_ms, tree_size) of the latest-dated
    for r in rows:
        size = r["tree_size"]
        if r["log_id"] != log_id:
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
        except (TypeError, ValueError):
            head = None
        verdict = "bad_signature" if head is None else trusted.check_head(
            head, bytes(r["signature"])
        )
        if verdict == "outside_window":
            out.add(
                Finding(
                    "key_outside_window",
                    f"tree head at size {size}, dated {_iso(r['timestamp_ms'])}, is signed by a "
                    "trusted key whose validity window does not cover that time (a key "
                    "rotated out, or not yet in use, signed it)",
                    tree_size=size,
                )
            )
            continue
        if head is None or verdict != "ok":
            out.add(
                Finding(
                    "bad_signature",
                    f"tree head at size {size}: signature does not verify with the trusted "
                    "key(s) (forged or re-signed head)",
                    tree_size=size,
                )
            )
            continue
        if latest is not None and head.timestamp_ms < latest[0]:
            out.add(
                Finding(
                    "timestamp_backwards",
                    f"tree head at size {size} is dated {_iso(head.timestamp_ms)}, before the "
                    f"head at the smaller size {latest[1]} ({_iso(latest[0])}): a larger tree "
                    "cannot have been signed earlier (head back-dated, or the signer's clock "
                    "went back)",
                    tree_size=size,
                )
            )
        if latest is None or head.timestamp_ms > latest[0]:
            latest = (head.timestamp_ms, size)
        roots[size] = head.root_hash
    out.report.valid_tree_heads = len(roots)
    return roots


async def _verified_heads(
    conn: asyncpg.Connection, trusted: TrustedKeys, log_id: str, out: _Collector
) -> dict[int, bytes]:
    rows = await conn.fetch(
        "SELECT tree_size, root_hash, timestamp_ms, log_id, signature FROM audit.tree_heads"
        " ORDER BY tree_size"
    )
    return _check_heads(rows, trusted, log_id, out)


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
    # the whole tree's compact range at hi, for the first chunk after archived months
    left: list[bytes] | None = None


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
    dsn: str, snapshot: str, lo: int, hi: int, signed_sizes: list[int], ca_file: Path
) -> _Chunk:
    conn = await tls.connect(dsn, ca_file=ca_file)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            await conn.execute(_UNBOUNDED)
            return await _check_chunk(conn, lo, hi, signed_sizes)
    finally:
        await conn.close()


def _check_chunk_process(
    dsn: str, snapshot: str, lo: int, hi: int, signed_sizes: list[int], ca_file: Path
) -> _Chunk:
    """Entry point of a worker process: one index range, in the coordinator's snapshot."""
    return asyncio.run(_check_chunk_in_snapshot(dsn, snapshot, lo, hi, signed_sizes, ca_file))


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
        if chunk.left is not None:  # see _StartChunkChecker
            self.left = CompactRange.from_state(chunk.hi // _CHUNK, chunk.left)
        elif chunk.broken_at is not None or chunk.root is None:
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
    conn: asyncpg.Connection, end: int, roots: dict[int, bytes], lo: int = 0
) -> list[tuple[int, int, list[int]]]:
    """Aligned ranges of _CHUNK indices (a power of two, so each complete chunk is one
    perfect subtree) that hold rows, with the signed sizes that fall inside each. Empty
    regions are skipped by seeking the next stored index, so a forged row at a huge index
    costs one seek, not billions of empty ranges."""
    sizes = sorted(roots)
    plan = []
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
    start: CompactRange | None = None,
    ca_file: Path = tls.DEFAULT_DATABASE_CA_FILE,
) -> int:
    """Check every row (from `start` on, when the first months left the database);
    returns the size of the log (one past the highest index)."""
    bounds = await conn.fetchrow("SELECT min(log_index), max(log_index) FROM audit.events")
    assert bounds is not None  # an aggregate always returns a row
    low, high = bounds["min"], bounds["max"]
    if low is None:
        return 0 if start is None else start.size
    if low < 0:
        out.add(Finding("reordered_row", f"a row claims the impossible index {low}", index=low))
    end = int(high) + 1
    assembler = _Assembler(roots, out)
    first = 0 if start is None else await _check_start(conn, start, end, roots, assembler)
    plan = await _plan_chunks(conn, end, roots, first) if first < end else []
    if dsn and workers > 1 and len(plan) > 1:
        snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")  # never fork a running event loop
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [
                loop.run_in_executor(
                    pool, _check_chunk_process, dsn, snapshot, lo, hi, sizes, ca_file
                )
                for lo, hi, sizes in plan
            ]
            # This connection is idle while the processes check chunks: the server
            # aggregates event ids meanwhile, in the same snapshot.
            duplicates = asyncio.create_task(_duplicate_event_ids(conn))
            try:
                for future in futures:  # in index order: the tree needs them in order
                    assembler.add(await future)
                found = await duplicates
            finally:
                if not duplicates.done():
                    duplicates.cancel()
                    with contextlib.suppress(BaseException):
                        await duplicates
    else:
        for lo, hi, sizes in plan:
            assembler.add(await _check_chunk(conn, lo, hi, sizes))
        found = await _duplicate_event_ids(conn)
    for finding in found:
        out.add(finding)
    return end


async def _duplicate_event_ids(conn: asyncpg.Connection) -> list[Finding]:
    """Event ids stored more than once, with the indices of their rows. audit.event_keys
    makes an id unique for writers, but whoever bypasses it (a superuser, a copied row) can
    store one twice: the aggregate runs over the events' own event_id index, on the server,
    so it costs no per-row work here whatever the log's size."""
    ids = [
        r["event_id"]
        for r in await conn.fetch(
            "SELECT event_id FROM audit.events GROUP BY event_id HAVING count(*) > 1"
        )
    ]
    if not ids:
        return []
    rows = await conn.fetch(
        "SELECT event_id, array_agg(log_index ORDER BY log_index) AS indices FROM audit.events"
        " WHERE event_id = ANY($1::uuid[]) GROUP BY event_id ORDER BY min(log_index)",
        ids,
    )
    # The id is a random UUID chosen by the producer, not PHI: shown so it can be looked up.
    return [
        Finding(
            "duplicate_event_id",
            f"event id {r['event_id']} is stored {len(r['indices'])} times, at indices "
            f"{', '.join(str(i) for i in r['indices'][:20])}"
            + (", …" if len(r["indices"]) > 20 else "")
            + " (each event is logged once: a copied or replayed row)",
            index=r["indices"][0],
        )
        for r in rows
    ]


_NO_WITNESS_DEAD_LETTERS = (
    "dead letters: the chain shows a dead letter changed or removed before the newest one, "
    "but not the newest ones deleted (or the whole chain rewritten): only a (count, hash) "
    "of the chain kept outside the database shows that"
)


async def _check_dead_letters(conn: asyncpg.Connection, out: _Collector) -> None:
    """Recompute the dead-letter hash chain (migration 0004) in this snapshot."""
    report = out.report
    chained = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'audit.dead_letters'::regclass"
        " AND attname = 'chain_hash' AND NOT attisdropped)"
    )
    if not chained:
        report.limits.append(
            "dead letters: not checked, the schema predates their hash chain (migration "
            "0004): run `audit-worker migrate`"
        )
        return
    # Imported here: the processes that check chunks import this module and need none of
    # the store's imports.
    from audit_worker.db.store import chained_dead_letters

    checker = ChainChecker()
    async for page in chained_dead_letters(conn):
        checker.feed(page)
    for problem in checker.problems:
        kind: FindingKind = (
            "dead_letter_deleted" if problem.kind == "deleted" else "dead_letter_changed"
        )
        out.add(
            Finding(kind, problem.message, index=problem.chain_index,
                    dead_letter_id=problem.dead_letter_id)
        )
    report.dead_letters, report.dead_letter_chain_hash = checker.expected, checker.previous
    # Only inserts with the chain trigger bypassed leave a row unchained (see 0004).
    for r in await conn.fetch(
        "SELECT id FROM audit.dead_letters WHERE chain_index IS NULL ORDER BY id"
    ):
        out.add(
            Finding(
                "dead_letter_unchained",
                f"dead letter id {r['id']} is outside the hash chain (inserted with the "
                "database's triggers bypassed, or its chain columns cleared)",
                dead_letter_id=r["id"],
            )
        )
    report.limits.append(_NO_WITNESS_DEAD_LETTERS)


class _StartChunkChecker(_ChunkChecker):
    """The first, unaligned chunk [start.size, next chunk boundary) of a log whose first
    months left the database: its range grows from the archived end range, so its
    partials are whole-tree ranges, and once complete it is the assembler's left."""

    def __init__(self, lo: int, hi: int, signed_sizes: list[int], start: CompactRange) -> None:
        super().__init__(lo, hi, signed_sizes)
        self.range = start.copy()

    def finish(self) -> _Chunk:
        chunk = self.chunk
        if self.expected < chunk.hi:
            self._gap(chunk.hi)
        if chunk.broken_at is None and self.range.size == chunk.hi and chunk.hi % _CHUNK == 0:
            chunk.left = self.range.hashes
        return chunk


async def _check_start(
    conn: asyncpg.Connection,
    start: CompactRange,
    end: int,
    roots: dict[int, bytes],
    assembler: _Assembler,
) -> int:
    """Check the rows from `start` to the next aligned chunk; returns where the aligned
    chunks begin. Heads below start.size are not checked here (their rows are archived)."""
    assembler.next_lo = start.size
    if start.size in roots:
        assembler._compare(start.size, start.hashes or [start.root()])
    if start.size % _CHUNK == 0:
        assembler.left = CompactRange.from_state(start.size // _CHUNK, start.hashes)
        return start.size
    hi = min(start.size - start.size % _CHUNK + _CHUNK, end)
    checker = _StartChunkChecker(start.size, hi, [s for s in roots if start.size < s <= hi], start)
    rows = await conn.fetch(
        f"{_SELECT_ROWS} WHERE log_index >= $1 AND log_index < $2 ORDER BY log_index",
        start.size, hi,
    )
    checker.feed(rows)
    assembler.add(checker.finish())
    return hi


async def _detached_start(
    conn: asyncpg.Connection,
    trusted: TrustedKeys,
    log_id: str,
    roots: dict[int, bytes],
    out: _Collector,
) -> CompactRange | None:
    """The hot rows' start when months were detached and no archive was given."""
    from audit_worker.archive.hot import detached_start

    hot = await detached_start(conn, trusted, log_id)
    for problem in hot.problems:
        out.add(Finding("archive_mismatch", problem))
    if hot.start is None:
        return None
    below = sum(1 for size in roots if size < hot.start.size)
    out.report.limits.append(
        f"archived rows: indices 0..{hot.start.size - 1} ({len(hot.months)} detached "
        f"month(s)) are in the archive only and were not checked, nor the {below} signed "
        "head(s) below that size; the hot rows were checked from the detached months' "
        "signed end range: pass --archive to check the archived months too"
    )
    return hot.start


_NO_WITNESS_ROWS = (
    "log entries: rows removed from the end together with every tree head that covers "
    "them leave a shorter log that verifies; only a witnessed checkpoint (--witness) "
    "shows that"
)


@dataclass(frozen=True)
class WitnessedCheckpoint:
    """The newest checkpoint that verified in the witness, and where it was read."""

    checkpoint: Checkpoint
    where: str  # the store URL and object key, for the report


def _add_witness(
    roots: dict[int, bytes], witness: WitnessedCheckpoint, start: CompactRange | None,
    out: _Collector,
) -> bool:
    """Put the witnessed size among the sizes whose root is recomputed from the rows.
    True when it is compared there (not already a database head, not archived)."""
    cp = witness.checkpoint
    if start is not None and cp.tree_size < start.size:
        out.report.limits.append(
            f"witness: the witnessed size {cp.tree_size} lies in the archived months; "
            "check it with --archive"
        )
        return False
    signed = roots.get(cp.tree_size)
    if signed is None:
        roots[cp.tree_size] = cp.root_hash
        return True
    if signed != cp.root_hash:
        out.add(Finding(
            "witness_mismatch",
            f"the database's tree head at size {cp.tree_size} signs root {signed.hex()[:16]}…, "
            f"the witnessed checkpoint ({witness.where}) root {cp.root_hash.hex()[:16]}…: "
            "the log was rewritten or forked after it was witnessed",
            tree_size=cp.tree_size,
        ))
    return False


async def _check_witness(
    conn: asyncpg.Connection, witness: WitnessedCheckpoint, size: int, compared: bool,
    out: _Collector,
) -> None:
    """After the rows and dead letters are checked: the database must hold at least what
    was witnessed, with the same root and chain hash there."""
    cp, report = witness.checkpoint, out.report
    if compared:
        # The assembler compared the recomputed root at the witnessed size like a head's.
        for n, finding in enumerate(report.findings):
            if finding.kind == "root_mismatch" and finding.tree_size == cp.tree_size:
                report.findings[n] = Finding(
                    "witness_mismatch",
                    f"the rows give another root at size {cp.tree_size} than the witnessed "
                    f"checkpoint ({witness.where}): the log was rewritten or forked after it "
                    "was witnessed",
                    tree_size=cp.tree_size,
                )
    if size < cp.tree_size:
        out.add(Finding(
            "rolled_back",
            f"the database holds {size} log entries, but the checkpoint witnessed at "
            f"{witness.where} covers {cp.tree_size}: {cp.tree_size - size} entries, and every "
            "tree head above them, were removed from the end",
            tree_size=cp.tree_size,
        ))
    if report.dead_letters < cp.dead_letters:
        out.add(Finding(
            "dead_letters_rolled_back",
            f"the database's dead-letter chain has {report.dead_letters} entries, the witnessed "
            f"checkpoint {cp.dead_letters}: {cp.dead_letters - report.dead_letters} dead "
            "letters were removed from the end",
        ))
    elif cp.dead_letters > 0:
        # The chain was recomputed in this snapshot; its stored link at the witnessed
        # length is what the witness must match (a changed row is reported on its own).
        stored = await conn.fetchval(
            "SELECT chain_hash FROM audit.dead_letters WHERE chain_index = $1",
            cp.dead_letters - 1,
        )
        if stored is None or bytes(stored) != cp.dead_letter_hash:
            out.add(Finding(
                "dead_letter_witness_mismatch",
                f"the dead-letter chain at length {cp.dead_letters} differs from the witnessed "
                "checkpoint's: dead letters were rewritten after they were witnessed",
                index=cp.dead_letters - 1,
            ))
    report.witnessed_size = cp.tree_size
    report.limits = [
        limit for limit in report.limits
        if limit not in (_NO_WITNESS_ROWS, _NO_WITNESS_DEAD_LETTERS)
    ]
    report.limits.append(
        f"witness: entries and dead letters added after the newest witnessed checkpoint "
        f"(size {cp.tree_size}, {cp.dead_letters} dead letters) can still be removed unseen"
    )


def note_witness_read(
    report: VerifyReport, refused: Sequence[tuple[str, str]], *, found: bool
) -> None:
    """What reading the witness showed, beside the database's findings: every object in
    the history that does not verify is a finding (someone wrote it)."""
    for where, reason in refused:
        report.findings.append(Finding(
            "witness_forged", f"the witness object {where} is refused: {reason}"
        ))
    if not found:
        report.limits.append(
            "witness: no checkpoint of this log in the witness verifies, so the database "
            "was checked against nothing outside it"
            + (" (the newest objects there are forged: see the findings)" if refused else "")
        )


async def verify_log(
    conn: asyncpg.Connection,
    trusted: TrustedKeys | bytes | Sequence[bytes],
    *,
    log_id: str,
    allow_unsigned_tail: bool = False,
    dsn: str | None = None,
    workers: int = 1,
    start: CompactRange | None = None,
    witness: WitnessedCheckpoint | None = None,
    ca_file: Path = tls.DEFAULT_DATABASE_CA_FILE,
) -> VerifyReport:
    """Verify the whole log and its dead letters in one consistent snapshot.

    `witness`: the newest checkpoint that verified in the evidence store outside the
    database (`audit_worker.witness`); the database must hold at least its size, with the
    same root and dead-letter chain hash. Without it, `limits` says what a rollback of the
    newest entries could hide.

    `start`: the compact range the hot rows continue from when the log's first months
    left the database (the archive's verified end range, see `audit_worker.archive`).
    Without it, the newest detached month's signed end range in the database is used,
    and `limits` says that the archived rows were not checked.

    `trusted` holds the signing keys with their validity windows (a rotation lists each
    key with its window); a tree head counts only when it names `log_id` and a key whose
    window covers the head's timestamp signed it. A PEM, or a sequence of PEMs, is a key
    trusted for all time (`TrustedKeys.from_pems`).

    With `dsn` and `workers` > 1, the per-row checks of large logs run in that many
    processes, each reading an index range in the same snapshot; the tree is still built
    here, in order; they connect with the same TLS checks, against `ca_file` (see
    `audit_worker.tls`).
    """
    started = time.perf_counter()
    report = VerifyReport()
    out = _Collector(report)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(_UNBOUNDED)
        if not isinstance(trusted, TrustedKeys):
            trusted = TrustedKeys.from_pems([trusted] if isinstance(trusted, bytes) else trusted)
        roots = await _verified_heads(conn, trusted, log_id, out)
        largest = max(roots, default=0)  # of the database's own heads
        if start is None:
            start = await _detached_start(conn, trusted, log_id, roots, out)
        compared = witness is not None and _add_witness(roots, witness, start, out)
        size = await _check_all(conn, roots, out, dsn, workers, start, ca_file)
        await _check_dead_letters(conn, out)
        if witness is None:
            report.limits.insert(0, _NO_WITNESS_ROWS)
        else:
            await _check_witness(conn, witness, size, compared, out)
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

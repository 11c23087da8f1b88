"""Export closed monthly partitions of ``audit.events`` to the archive, verify the uploaded
copy, record it in ``audit.archived_months``, and (when enabled) let the month leave the hot
database through ``audit.detach_archived_month``.

One exporter at a time (a session advisory lock per log); months strictly in order, each
only after it ended plus ``archive_grace_seconds`` and once a signed head covers its last
row. A month is refused, with the reason, when its rows are not one contiguous index range
that continues the previous month. Nothing is detached before the copy read back from the
archive verified: rows hash from the previous month's end range to a root that a trusted
key signed in the bundle's checkpoint.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import asyncpg
import structlog

from audit_worker.archive.bundle import (
    BundleError,
    BundleWriter,
    VerifiedBundle,
    checkpoint_key,
    manifest_key,
    month_bounds,
    month_prefix,
    month_text,
    verify_bundle,
)
from audit_worker.crypto import TreeHead, TreeHeadSigner, TrustedKey, TrustedKeys
from audit_worker.crypto.checkpoint import CheckpointError, open_note
from audit_worker.db.store import HEAD_SUBTREE_CHECK
from audit_worker.errors import AuditError
from audit_worker.merkle import CompactRange, hash_leaf
from audit_worker.objectstore import ObjectExists, ObjectStore

__all__ = [
    "ArchiveExporter",
    "ExportRefusedError",
    "ExportResult",
    "export_lock_key",
    "monthly_partitions",
    "next_due",
]

log = structlog.stdlib.get_logger("audit_worker.archive")
PAGE_ROWS = 20_000
_PARTITION = "events_%04d_%02d"
Status = Literal["exported", "detached", "waiting", "busy"]
Progress = Callable[[date, int, int], None]


class ExportRefusedError(AuditError):
    """A month cannot be exported (or detached) as it stands; the message says why and what
    to do. The partition stays in the hot database; the next round tries again."""


def export_lock_key(log_id: str) -> int:
    return zlib.crc32(f"audit-kit/archive-export/{log_id}".encode())


@dataclass(frozen=True)
class ExportResult:
    month: str
    status: Status
    first_index: int = 0
    end_index: int = 0
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    detail: str = ""

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3),
                "rows_per_second": round(self.rate)}


async def monthly_partitions(conn: asyncpg.Connection) -> list[date]:
    """Months that have a partition ``audit.events_YYYY_MM``, oldest first."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'audit.events'::regclass"
    )
    months = []
    for r in rows:
        name = r["relname"]
        if len(name) == 14 and name.startswith("events_") and name[11] == "_":
            year, month = name[7:11], name[12:14]
            if year.isdigit() and month.isdigit() and 1 <= int(month) <= 12:
                months.append(date(int(year), int(month), 1))
    return sorted(months)


def _same_part(existing: bytes, ours: bytes) -> bool:
    """An object left by an interrupted export is kept when it holds the same lines
    (another zlib may compress them to other bytes)."""
    if existing == ours:
        return True
    try:
        return gzip.decompress(existing) == gzip.decompress(ours)
    except (OSError, EOFError, zlib.error):
        return False


class ArchiveExporter:
    """Exports the log's closed months to `store`; see the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: ObjectStore,
        *,
        log_id: str,
        signer: TreeHeadSigner,
        own_key: TrustedKey,
        trusted: TrustedKeys,
        grace_seconds: float,
        detach: bool,
        acquire_timeout: float = 10.0,
        progress: Progress | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.store = store
        self.log_id = log_id
        self.signer = signer
        self.own_key = own_key
        self.trusted = trusted
        self.grace = timedelta(seconds=grace_seconds)
        self.detach = detach
        self.acquire_timeout = acquire_timeout
        self.progress = progress
        self.clock = clock

    # ------------------------------------------------------------------ entry point
    async def run(self, *, only: date | None = None) -> list[ExportResult]:
        """Export every due month in order (or only `only`), then detach verified months
        when enabled. Raises `ExportRefusedError` or `BundleError` at the first month that
        cannot go; the months before it are done."""
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            if await conn.fetchval("SELECT pg_is_in_recovery()"):
                # A DR standby's replica: the primary's workers export; nothing to do here.
                return [ExportResult("-", "waiting", detail="the database is a read replica")]
            key = export_lock_key(self.log_id)
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                return [ExportResult("-", "busy", detail="another exporter holds the lock")]
            try:
                return await self._run(conn, only)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)

    async def _run(self, conn: Any, only: date | None) -> list[ExportResult]:
        now = datetime.fromtimestamp(self.clock(), UTC)
        archived = {r["month"]: r for r in await conn.fetch(
            "SELECT * FROM audit.archived_months ORDER BY month")}
        results: list[ExportResult] = []
        for month in await monthly_partitions(conn):
            if month in archived:
                continue
            if only is not None and month != only:
                if month < only:
                    raise ExportRefusedError(
                        f"month {month_text(month)} comes before {month_text(only)} and is not "
                        "exported yet: months are exported in order; export it first"
                    )
                continue
            if month_bounds(month)[1] + self.grace > now:
                if only is not None:
                    results.append(ExportResult(
                        month_text(month), "waiting",
                        detail="the month has not ended plus AUDIT_ARCHIVE_GRACE_SECONDS yet",
                    ))
                break
            previous = max((m for m in archived if m < month), default=None)
            if archived and max(archived) > month:
                raise ExportRefusedError(
                    f"month {month_text(month)} has a partition but later months are already "
                    "archived: a partition was created for a past month; it cannot join the "
                    "archive's chain (see docs/audit-log.md)"
                )
            result, row = await self._export(conn, month, archived.get(previous)
                                             if previous else None)
            results.append(result)
            if row is None:
                break  # waiting for a signed head
            archived[month] = row
        if self.detach:
            results += await self._detach_verified(conn, archived)
        if only is not None and not results:
            results.append(ExportResult(month_text(only), "waiting",
                                        detail="no such partition, or already exported"))
        return results

    # ------------------------------------------------------------------ one month
    async def _previous_end(self, previous: asyncpg.Record) -> CompactRange:
        """The previous month's end range, as its archived checkpoint signs it."""
        month: date = previous["month"]
        prefix = month_prefix(self.log_id, month)

        def read() -> tuple[bytes | None, bytes | None]:
            return self.store.get(prefix + "manifest.json"), self.store.get(prefix + "checkpoint")

        manifest, note = await asyncio.to_thread(read)
        name = month_text(month)
        if manifest is None or note is None:
            raise BundleError(
                f"month {name} is recorded as archived but its bundle is missing from "
                f"{self.store.url}: run `audit-worker verify --archive` and restore it"
            )
        try:
            checkpoint, _ = open_note(note, self.trusted)
        except CheckpointError as exc:
            raise BundleError(f"month {name}: archived checkpoint: {exc}") from None
        end = CompactRange.from_packed(previous["end_index"], bytes(previous["end_range"]))
        if (
            checkpoint.tree_size != end.size
            or checkpoint.root_hash != end.root()
            or bytes(previous["end_root"]) != end.root()
        ):
            raise BundleError(
                f"month {name}: audit.archived_months and the archived checkpoint disagree on "
                "the month's end: run `audit-worker verify --archive`"
            )
        return end

    async def _partition_rows(
        self, conn: Any, month: date, start: int
    ) -> tuple[int, int]:
        """(first index, end index) of the month's rows; refuses a month that is not one
        contiguous index range continuing at `start`."""
        part = _PARTITION % (month.year, month.month)  # from integers: a safe identifier
        stats = await conn.fetchrow(
            f"SELECT count(*) AS n, min(log_index) AS lo, max(log_index) AS hi FROM audit.{part}"
        )
        name = month_text(month)
        if stats["n"] == 0:
            return start, start
        lo, hi, n = stats["lo"], stats["hi"], stats["n"]
        if n != hi - lo + 1:
            raise ExportRefusedError(
                f"month {name}: audit.{part} holds {n} rows over indices {lo}..{hi}, not one "
                "contiguous index range (rows of other months interleave: `recorded` went "
                "backwards with log_index, or rows are duplicated); it stays in the hot "
                "database: run `audit-worker verify` and see docs/audit-log.md"
            )
        overlapping = await conn.fetchval(
            "SELECT count(*) FROM audit.events WHERE log_index >= $1 AND log_index <= $2", lo, hi
        )
        if overlapping != n:
            raise ExportRefusedError(
                f"month {name}: {overlapping - n} row(s) outside audit.{part} have indices "
                f"inside its range {lo}..{hi} (in audit.events_default or another month): "
                "not one contiguous index range; it stays: run `audit-worker verify`"
            )
        if lo != start:
            stray = await conn.fetchval(
                "SELECT count(*) FROM audit.events_default WHERE log_index >= $1"
                " AND log_index < $2", min(start, lo), max(start, lo),
            )
            raise ExportRefusedError(
                f"month {name} starts at index {lo}, but the archive continues at {start}: "
                f"indices {min(start, lo)}..{max(start, lo) - 1} are in no earlier exported "
                f"month ({stray} of them in audit.events_default, outside every monthly "
                "partition); it stays: see docs/audit-log.md"
            )
        return lo, hi + 1

    async def _covering_head(self, conn: Any, size: int) -> TreeHead | None:
        """The first head past `size` leaves that a trusted key signed for this log."""
        rows = await conn.fetch(
            "SELECT tree_size, root_hash, timestamp_ms, log_id, signature FROM audit.tree_heads"
            " WHERE tree_size >= $1 ORDER BY tree_size LIMIT 8", size,
        )
        return next(
            (h for r in rows if (h := self.trusted.stored_head(self.log_id, r)) is not None),
            None,
        )

    async def _signed_through(
        self, conn: Any, name: str, end_range: CompactRange, head: TreeHead
    ) -> None:
        """Before the month is signed for six years: its rows, continued to `head` (the
        first trusted head past its end), must give that head's root. Rows an insider
        rewrote (leaf hashes recomputed) are refused here instead of laundered into the
        archive."""
        extended = end_range.copy()
        for page in range(end_range.size, head.tree_size, PAGE_ROWS):
            rows = await conn.fetch(
                "SELECT log_index, leaf_data FROM audit.events WHERE log_index >= $1"
                " AND log_index < $2 ORDER BY log_index",
                page, min(page + PAGE_ROWS, head.tree_size),
            )
            for row in rows:
                if row["log_index"] != extended.size:
                    break
                extended.append(hash_leaf(bytes(row["leaf_data"])))
        if extended.size != head.tree_size or extended.root() != head.root_hash:
            raise ExportRefusedError(
                f"month {name}: its rows and those after it up to the head signed at size "
                f"{head.tree_size} do not give that head's root (rows changed after they "
                "were signed): it stays; run `audit-worker verify`"
            )

    async def _export(
        self, conn: Any, month: date, previous: asyncpg.Record | None
    ) -> tuple[ExportResult, asyncpg.Record | None]:
        started = time.perf_counter()
        name = month_text(month)
        start = await self._previous_end(previous) if previous is not None else CompactRange()
        part = _PARTITION % (month.year, month.month)
        # No transaction: the month is closed, its rows do not change, and a snapshot held
        # while parts upload would meet the login's idle-in-transaction timeout.
        first, end = await self._partition_rows(conn, month, start.size)
        head = await self._covering_head(conn, end) if end > first else None
        if end > first and head is None:
            return ExportResult(
                name, "waiting", first, end, end - first,
                detail=f"no signed head covers index {end - 1} yet",
            ), None
        writer = BundleWriter(self.log_id, month, start)
        prefix = month_prefix(self.log_id, month)
        for page in range(first, end, PAGE_ROWS):
            rows = await conn.fetch(
                f"SELECT log_index, leaf_data, leaf_hash FROM audit.{part}"
                " WHERE log_index >= $1 AND log_index < $2 ORDER BY log_index",
                page, min(page + PAGE_ROWS, end),
            )
            batch = [(r["log_index"], bytes(r["leaf_data"]), bytes(r["leaf_hash"]))
                     for r in rows]
            await asyncio.to_thread(self._add, writer, prefix, batch)
            if self.progress is not None:
                self.progress(month, writer.end_index - first, end - first)
        if writer.end_index != end:
            raise BundleError(
                f"month {name}: read rows up to index {writer.end_index}, want {end}"
            )
        if head is not None:
            await self._signed_through(conn, name, writer.range, head)
        await asyncio.to_thread(self._finish, writer, prefix)
        verified = await asyncio.to_thread(self._read_back, month, start)
        if verified.end_range.hashes != writer.range.hashes:
            raise BundleError(f"month {name}: the archived copy is not what was exported")
        row = await conn.fetchrow(
            "INSERT INTO audit.archived_months (month, first_index, end_index, rows, end_root,"
            " end_range, checkpoint, archive_url, manifest_key, object_keys, bytes,"
            " verified_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now())"
            " RETURNING *",
            month, first, end, end - first, verified.end_range.root(),
            verified.end_range.packed(), verified.note, self.store.url,
            manifest_key(self.log_id, month),
            [prefix + k for k in ("manifest.json", "checkpoint", *verified.part_keys)],
            verified.size_bytes,
        )
        seconds = time.perf_counter() - started
        result = ExportResult(
            name, "exported", first, end, end - first, verified.size_bytes, seconds
        )
        log.info("archive month exported and verified", month=name, first_index=first,
                 end_index=end, bytes=verified.size_bytes, seconds=round(seconds, 2))
        return result, row

    def _put_once(self, key: str, data: bytes, same: Callable[[bytes], bool]) -> bytes:
        """Write once; an object an interrupted export left is kept if it is the same."""
        try:
            self.store.put(key, data)
            return data
        except ObjectExists:
            existing = self.store.get(key)
            if existing is not None and same(existing):
                return existing
            raise ExportRefusedError(
                f"the archive already holds {key} with other content (written by another "
                "release or by hand): it cannot be replaced under Object Lock; investigate "
                "with `audit-worker verify --archive`"
            ) from None

    def _add(self, writer: BundleWriter, prefix: str, rows: list[tuple[int, bytes, bytes]]) -> None:
        for part in writer.add(rows):
            self._store_part(writer, prefix, part)

    def _store_part(self, writer: BundleWriter, prefix: str, part: Any) -> None:
        stored = self._put_once(prefix + part.key, part.data, lambda e: _same_part(e, part.data))
        if stored is not part.data:
            writer.parts.pop()
            writer.note_part(part.key, part.first_index, part.rows, stored)

    def _finish(self, writer: BundleWriter, prefix: str) -> None:
        last = writer.finish()
        if last is not None:
            self._store_part(writer, prefix, last)
        key = checkpoint_key(self.log_id, writer.month)
        existing = self.store.get(key)
        note: bytes | None = None
        if existing is not None:
            try:
                checkpoint, _ = open_note(existing, self.trusted)
            except CheckpointError:
                checkpoint = None
            if checkpoint is not None and (checkpoint.tree_size, checkpoint.root_hash) == (
                writer.range.size, writer.range.root()
            ):
                note = existing  # an interrupted export signed it already
        if note is None:
            note = writer.sign(int(self.clock() * 1000), self.signer, self.own_key)
            self._put_once(key, note, lambda e: e == note)
        manifest = writer.manifest()
        self._put_once(manifest_key(self.log_id, writer.month), manifest,
                       lambda e: e == manifest)

    def _read_back(self, month: date, start: CompactRange) -> VerifiedBundle:
        prefix = month_prefix(self.log_id, month)
        manifest = self.store.get(prefix + "manifest.json")
        if manifest is None:
            raise BundleError(f"month {month_text(month)}: the uploaded manifest is missing")
        return verify_bundle(
            manifest, lambda key: self.store.get(prefix + key), self.trusted,
            log_id=self.log_id, month=month, expected_start=start,
        )

    # ------------------------------------------------------------------ detach
    async def _detach_verified(
        self, conn: Any, archived: dict[date, asyncpg.Record]
    ) -> list[ExportResult]:
        """Detach archived months whose partition is still there, oldest first, keeping
        the hot rows one contiguous range (a month waits for the one before it)."""
        present = set(await monthly_partitions(conn))
        detached = {r["month"] for r in await conn.fetch("SELECT month FROM audit.detached_months")}
        newest = await conn.fetchval("SELECT max(tree_size) FROM audit.tree_heads") or 0
        results = []
        for month in sorted(archived):
            if month in detached or month not in present:
                continue
            row = archived[month]
            name = month_text(month)
            # A restarting worker rehashes the rows under its newest head (up to
            # HEAD_SUBTREE_CHECK of them): they must still be hot.
            if newest < row["end_index"] + HEAD_SUBTREE_CHECK and row["rows"] > 0:
                results.append(ExportResult(
                    name, "waiting", row["first_index"], row["end_index"], row["rows"],
                    detail=f"detached once the newest signed head is {HEAD_SUBTREE_CHECK} "
                    "rows past the month's end",
                ))
                break
            try:
                rows = await conn.fetchval("SELECT audit.detach_archived_month($1)", month)
            except asyncpg.InsufficientPrivilegeError:
                raise ExportRefusedError(
                    f"month {name} not detached: this login may not detach months; grant it "
                    "the role audit_archiver (GRANT audit_archiver TO <login>), or turn "
                    "AUDIT_ARCHIVE_DETACH_VERIFIED_MONTHS off"
                ) from None
            except asyncpg.PostgresError as exc:
                raise ExportRefusedError(f"month {name} not detached: {exc}") from None
            results.append(ExportResult(name, "detached", row["first_index"], row["end_index"],
                                        rows))
            log.info("archived month detached from the hot database", month=name, rows=rows)
        return results


def next_due(month: date, grace_seconds: float) -> datetime:
    """When `month` becomes due for export."""
    return month_bounds(month)[1] + timedelta(seconds=grace_seconds)


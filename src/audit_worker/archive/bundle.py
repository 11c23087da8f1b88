"""The month bundle: one closed monthly partition of the log, as objects that verify
themselves with nothing but SHA-256 and the log's public key. Pure: no I/O.

Layout under the evidence store (``<log_id>/months/YYYY-MM/``)::

    entries/NNNNNN.jsonl.gz   the rows: each line is one row's leaf data, in log-index
                              order; part N holds the indices N*65536 .. N*65536+65535
                              that fall in the month (gzip, no file name, mtime 0)
    checkpoint                C2SP signed note at the month's end: tree size = one past
                              the month's last index, root of the whole tree at that size
    manifest.json             written last: the month's index range, the compact range
                              at its first index (``start_range``) and at its end
                              (``end_range``), and each part's size and SHA-256

A bundle verifies when: every part has its SHA-256; line k of the month is the leaf data of
index ``first_index + k`` (it says so in its leading ``"log_index"``); appending
SHA-256(0x00 || line) for every line to ``start_range`` gives ``end_range``;
``end_range``'s root is the checkpoint's root at ``end_index``; a trusted key signed the
checkpoint. Chained: month k's ``start_range`` is month k-1's ``end_range``, and
the first month starts from the empty range at index 0.

Why not C2SP tlog-tiles' entry bundles and hash tiles: months do not start or end on
256-entry tile boundaries, and tlog-tiles defines partial tiles only at the right edge of a
tree, so a month cut out of the log is not a set of tlog tiles. Leaf data is canonical JSON
(it holds no raw newline), so one line per entry lets ``jq`` read the rows and lets an
auditor hash each line with ``sha256sum``; tlog-tiles' uint16 length prefixes would have fit
(leaves stay far below 64 KiB: MAX_EVENT_BYTES is 16 KiB) but need a program to split.
See docs/audit-log.md for the reader's guide.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from audit_worker.crypto import TreeHeadSigner, TrustedKey, TrustedKeys
from audit_worker.crypto.checkpoint import Checkpoint, CheckpointError, open_note, sign_note
from audit_worker.errors import IntegrityError
from audit_worker.merkle import CompactRange, hash_leaf

__all__ = [
    "FORMAT",
    "PART_ROWS",
    "BundleError",
    "BundleWriter",
    "VerifiedBundle",
    "checkpoint_key",
    "manifest_key",
    "month_from_key",
    "month_prefix",
    "month_text",
    "part_key",
    "verify_bundle",
]

FORMAT = "audit-kit/month-bundle/v1"
# Parts are aligned on absolute log indices (2^16 = 256 tlog tiles of 256 entries), so the
# part that holds an index is known without reading the manifest.
PART_ROWS = 1 << 16
GZIP_LEVEL = 6
_MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")
_PART_KEY = re.compile(r"entries/[0-9]{6}\.jsonl\.gz")
# Largest part accepted when reading back (a month part is at most 65536 leaves of at most
# a few tens of KiB): a bigger object is not one of ours, and would exhaust memory.
MAX_PART_BYTES = 1 << 32


class BundleError(IntegrityError):
    """A month bundle is missing, malformed or does not verify; the message names the
    month, the object and the check (never row content)."""


def month_text(month: date) -> str:
    return f"{month.year:04d}-{month.month:02d}"


def month_prefix(log_id: str, month: date) -> str:
    return f"{log_id}/months/{month_text(month)}/"


def manifest_key(log_id: str, month: date) -> str:
    return month_prefix(log_id, month) + "manifest.json"


def checkpoint_key(log_id: str, month: date) -> str:
    return month_prefix(log_id, month) + "checkpoint"


def part_key(part: int) -> str:
    """The part's key relative to the month's prefix."""
    return f"entries/{part:06d}.jsonl.gz"


def month_from_key(key: str, log_id: str) -> date | None:
    """The month of a ``<log_id>/months/YYYY-MM/manifest.json`` key, else None."""
    prefix = f"{log_id}/months/"
    if not key.startswith(prefix) or not key.endswith("/manifest.json"):
        return None
    text = key[len(prefix) : -len("/manifest.json")]
    if not _MONTH.fullmatch(text):
        return None
    return date(int(text[:4]), int(text[5:]), 1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def _range_json(compact: CompactRange) -> dict[str, Any]:
    return {"size": compact.size, "hashes": [h.hex() for h in compact.hashes]}


def _range_from_json(value: Any, what: str, month: str) -> CompactRange:
    if not isinstance(value, dict) or set(value) != {"size", "hashes"}:
        raise BundleError(f"month {month}: manifest {what} must be {{size, hashes}}")
    size, hashes = value["size"], value["hashes"]
    if not isinstance(size, int) or isinstance(size, bool) or not isinstance(hashes, list):
        raise BundleError(f"month {month}: manifest {what} has a bad size or hash list")
    try:
        raw = [bytes.fromhex(h) for h in hashes]
        return CompactRange.from_state(size, raw)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"month {month}: manifest {what}: {exc}") from None


def _compress(data: bytes) -> bytes:
    # mtime 0 and no file name: the same rows always give the same bytes with one zlib.
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


@dataclass
class _Part:
    number: int
    first_index: int
    lines: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class WrittenPart:
    key: str  # relative to the month's prefix
    first_index: int
    rows: int
    data: bytes  # the object: gzip of the lines

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class BundleWriter:
    """Builds one month's bundle from its rows, in log-index order.

    Requires rows ``first_index, first_index + 1, ...`` with no gap; every row is checked
    (leaf data names its index, hashes to its stored leaf hash, has no newline) before it
    is archived, and `BundleError` names the first that
    fails. `add` returns the parts that filled up, for the caller to upload as it goes."""

    def __init__(self, log_id: str, month: date, start: CompactRange) -> None:
        self.log_id = log_id
        self.month = month
        self.start = start.copy()
        self.range = start.copy()
        self.parts: list[dict[str, Any]] = []
        self._open: _Part | None = None

    @property
    def end_index(self) -> int:
        return self.range.size

    def add(self, rows: Iterable[tuple[int, bytes, bytes]]) -> list[WrittenPart]:
        """Append rows ``(log_index, leaf_data, leaf_hash)``."""
        done: list[WrittenPart] = []
        name = month_text(self.month)
        for index, leaf_data, leaf_hash in rows:
            if index != self.range.size:
                raise BundleError(
                    f"month {name}: row {index} came where row {self.range.size} was expected "
                    "(rows missing or out of order)"
                )
            if not leaf_data.startswith(b'{"log_index":%d,' % index):
                raise BundleError(
                    f"month {name}: row {index}: its leaf data was written for another index "
                    "(moved or planted row); run `audit-worker verify`"
                )
            if b"\n" in leaf_data:
                raise BundleError(
                    f"month {name}: row {index}: its leaf data holds a newline, which canonical "
                    "JSON never does (planted row); run `audit-worker verify`"
                )
            computed = hash_leaf(leaf_data)
            if computed != leaf_hash:
                raise BundleError(
                    f"month {name}: row {index}: its leaf data does not hash to its stored leaf "
                    "hash (changed row); run `audit-worker verify`"
                )
            number = index // PART_ROWS
            if self._open is not None and self._open.number != number:
                done.append(self._close())
            if self._open is None:
                self._open = _Part(number, index)
            self._open.lines.append(leaf_data)
            self.range.append(computed)
        return done

    def _close(self) -> WrittenPart:
        part = self._open
        assert part is not None
        self._open = None
        data = _compress(b"\n".join(part.lines) + b"\n")
        written = WrittenPart(part_key(part.number), part.first_index, len(part.lines), data)
        self.note_part(written.key, written.first_index, written.rows, written.data)
        return written

    def note_part(self, key: str, first_index: int, rows: int, data: bytes) -> None:
        """Record the part as stored (the caller may keep an identical copy already there)."""
        self.parts.append(
            {
                "key": key,
                "first_index": first_index,
                "rows": rows,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )

    def finish(self) -> WrittenPart | None:
        """Close the last part; returns it (None when the month has no row left open)."""
        return self._close() if self._open is not None else None

    def checkpoint(self, timestamp_ms: int) -> Checkpoint:
        """The month's end checkpoint. The dead-letter fields are (0, 32 zero bytes): a
        month bundle vouches for the log's rows only; dead letters are covered by the
        witnessed checkpoints of the database's heads."""
        return Checkpoint(self.log_id, self.range.size, self.range.root(), timestamp_ms)

    def sign(self, timestamp_ms: int, signer: TreeHeadSigner, key: TrustedKey) -> bytes:
        return sign_note(self.checkpoint(timestamp_ms), signer, key)

    def manifest(self) -> bytes:
        """The manifest, deterministic for given rows and parts (no time in it)."""
        document = {
            "format": FORMAT,
            "log_id": self.log_id,
            "month": month_text(self.month),
            "first_index": self.start.size,
            "end_index": self.range.size,
            "rows": self.range.size - self.start.size,
            "start_range": _range_json(self.start),
            "end_range": _range_json(self.range),
            "end_root": self.range.root().hex(),
            "checkpoint": "checkpoint",
            "parts": self.parts,
        }
        return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class VerifiedBundle:
    month: date
    first_index: int
    end_index: int
    start_range: CompactRange
    end_range: CompactRange
    checkpoint: Checkpoint
    note: bytes
    signed_by: TrustedKey
    part_keys: list[str]
    size_bytes: int  # manifest, checkpoint and parts
    leaf_hashes: list[bytes] | None = None  # with keep_leaves

    @property
    def rows(self) -> int:
        return self.end_index - self.first_index


Fetch = Callable[[str], bytes | None]


def _manifest(raw: bytes, month: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BundleError(f"month {month}: manifest.json is not JSON") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BundleError(f"month {month}: manifest.json is not a {FORMAT} manifest")
    return document


def _int(document: Mapping[str, Any], name: str, month: str) -> int:
    value = document.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BundleError(f"month {month}: manifest {name} must be a non-negative integer")
    return value


def _parts(document: Mapping[str, Any], first: int, end: int, month: str) -> list[dict[str, Any]]:
    parts = document.get("parts")
    if not isinstance(parts, list):
        raise BundleError(f"month {month}: manifest parts must be a list")
    expected = first
    for n, part in enumerate(parts):
        if (
            not isinstance(part, dict)
            or set(part) != {"key", "first_index", "rows", "bytes", "sha256"}
            or not isinstance(part["key"], str)
            or not _PART_KEY.fullmatch(part["key"])
            or not isinstance(part["sha256"], str)
        ):
            raise BundleError(f"month {month}: manifest part {n} is malformed")
        start, rows = _int(part, "first_index", month), _int(part, "rows", month)
        number = start // PART_ROWS
        if (
            start != expected
            or part["key"] != part_key(number)
            or rows == 0
            or start + rows > min(end, (number + 1) * PART_ROWS)
        ):
            raise BundleError(
                f"month {month}: manifest part {n} covers indices {start}..{start + rows - 1}, "
                f"want parts aligned on {PART_ROWS} indices from {expected}"
            )
        expected = start + rows
    if expected != end:
        raise BundleError(
            f"month {month}: manifest parts end at index {expected}, want end_index {end}"
        )
    return parts


def verify_bundle(
    manifest: bytes,
    fetch: Fetch,
    keys: TrustedKeys,
    *,
    log_id: str,
    month: date,
    expected_start: CompactRange | None,
    signed_roots: Mapping[int, bytes] | None = None,
    keep_leaves: bool = False,
    on_rows: Callable[[int], None] | None = None,
) -> VerifiedBundle:
    """Verify one month's bundle (see the module docstring for the checks).

    `fetch(key)` reads an object of the month by its key relative to the month's prefix.
    `expected_start` is the previous month's verified end range (the empty range for the
    first month); None skips that check (the caller then reports it). `signed_roots`
    (tree size -> root of signed heads from elsewhere, e.g. the database) are compared
    with the rows where the month covers their size. Raises `BundleError`."""
    name = month_text(month)
    document = _manifest(manifest, name)
    if document.get("log_id") != log_id or document.get("month") != name:
        raise BundleError(f"month {name}: manifest is for another log or another month")
    first, end = _int(document, "first_index", name), _int(document, "end_index", name)
    if end < first or _int(document, "rows", name) != end - first:
        raise BundleError(f"month {name}: manifest index range and row count disagree")
    start = _range_from_json(document.get("start_range"), "start_range", name)
    stated_end = _range_from_json(document.get("end_range"), "end_range", name)
    if start.size != first or stated_end.size != end:
        raise BundleError(f"month {name}: manifest ranges do not sit at first_index/end_index")
    if expected_start is not None and (
        expected_start.size != start.size or expected_start.hashes != start.hashes
    ):
        raise BundleError(
            f"month {name}: its start range (size {start.size}) is not the previous month's "
            f"end range (size {expected_start.size}): a month is missing or was rewritten"
        )
    parts = _parts(document, first, end, name)
    if document.get("checkpoint") != "checkpoint":
        raise BundleError(f"month {name}: manifest checkpoint must be `checkpoint`")
    note = fetch("checkpoint")
    if note is None:
        raise BundleError(f"month {name}: the checkpoint object is missing")
    try:
        checkpoint, signer = open_note(note, keys)
    except CheckpointError as exc:
        raise BundleError(f"month {name}: checkpoint: {exc}") from None
    if checkpoint.origin != log_id or checkpoint.tree_size != end:
        raise BundleError(
            f"month {name}: checkpoint is for size {checkpoint.tree_size}, want {end}"
        )
    total = len(manifest) + len(note)
    work = start.copy()
    roots = {s: r for s, r in (signed_roots or {}).items() if first < s <= end}
    leaves: list[bytes] | None = [] if keep_leaves else None
    for part in parts:
        key = part["key"]
        data = fetch(key)
        if data is None:
            raise BundleError(f"month {name}: part {key} is missing")
        total += len(data)
        if len(data) != part["bytes"] or hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise BundleError(f"month {name}: part {key} does not have its SHA-256 (changed)")
        try:
            text = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            raise BundleError(f"month {name}: part {key} is not gzip") from None
        lines = text.split(b"\n")
        if lines[-1] != b"" or len(lines) - 1 != part["rows"]:
            raise BundleError(
                f"month {name}: part {key} holds {len(lines) - 1} lines, want {part['rows']}"
            )
        for line in lines[:-1]:
            index = work.size
            if not line.startswith(b'{"log_index":%d,' % index):
                raise BundleError(
                    f"month {name}: row {index} in {key} was written for another index "
                    "(moved, added or removed rows)"
                )
            leaf = hash_leaf(line)
            work.append(leaf)
            if leaves is not None:
                leaves.append(leaf)
            if work.size in roots and work.root() != roots[work.size]:
                raise BundleError(
                    f"month {name}: the signed head at size {work.size} does not match the "
                    "archived rows"
                )
        if on_rows is not None:
            on_rows(part["rows"])
    if work.hashes != stated_end.hashes:
        raise BundleError(
            f"month {name}: the rows do not hash to the manifest's end range (changed, "
            "added or removed rows)"
        )
    if work.root() != checkpoint.root_hash:
        raise BundleError(
            f"month {name}: the rows give root {work.root().hex()[:16]}… at size {end}, the "
            f"signed checkpoint says {checkpoint.root_hash.hex()[:16]}…"
        )
    return VerifiedBundle(
        month, first, end, start, work, checkpoint, note, signer,
        [p["key"] for p in parts], total, leaves,
    )


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """[first instant, first instant of the next month) in UTC."""
    following = next_month(month)
    return (
        datetime(month.year, month.month, 1, tzinfo=UTC),
        datetime(following.year, following.month, 1, tzinfo=UTC),
    )

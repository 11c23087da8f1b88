"""Dead letters: list them, open one for review, replay the ones that are now valid.

A dead letter is a row of `audit.dead_letters`: why an entry was refused (field, value
class, rule) and, when the entry had an ``event`` field, its raw payload sealed with
AES-GCM under a data key (associated data: the stream entry id). Listing never touches the
payload. `open_payload` unseals it for `show --decrypt` and for replay; nothing else here
returns or prints anything derived from a payload (results carry ids, rules and counts).

Replay re-validates the payload with `parse_event` and, when it passes, adds it to the
stream again (``XADD <stream> * event <payload>``), exactly as a producer would. The
worker then stores it like any other event and skips its `event_id` if the log has it
already, so replaying a dead letter twice never stores the event twice. Every replay that
reached a verdict is recorded in the append-only `audit.dead_letter_replays`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import asyncpg
from redis.asyncio import Redis

from audit_worker.crypto import DataKeyManager, DecryptionError, FieldCipher, KeyWrapper
from audit_worker.errors import AuditError, MigrationError
from audit_worker.events import AuditEvent, parse_event
from audit_worker.intake import EVENT_FIELD

__all__ = [
    "DeadLetterError",
    "DeadLetterRow",
    "PayloadOpener",
    "ReplayOutcome",
    "ReplayReport",
    "ReplayResult",
    "SealedPayload",
    "Selection",
    "UnknownDeadLetters",
    "fetch_sealed",
    "list_dead_letters",
    "parse_time",
    "replay",
]

# Sealed payloads are fetched and replayed this many at a time, so a large selection
# never holds every ciphertext in memory at once.
REPLAY_CHUNK = 200


class DeadLetterError(AuditError):
    """A dead-letter command cannot do what was asked (the message says why)."""


class UnknownDeadLetters(DeadLetterError):
    """Ids that are not in `audit.dead_letters`."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = list(ids)
        shown = ", ".join(str(i) for i in self.ids)
        super().__init__(f"no dead letter with id {shown}")


def parse_time(value: str, option: str) -> datetime:
    """An ISO 8601 date or date-time given to `option`; without an offset it is UTC."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise DeadLetterError(
            f"{option}: {value!r} is not an ISO 8601 date or date-time "
            "(e.g. 2026-01-05 or 2026-01-05T10:00:00+00:00)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command works on: every given condition must hold."""

    ids: tuple[int, ...] = ()
    rules: tuple[str, ...] = ()
    since: datetime | None = None  # received_at >= since
    until: datetime | None = None  # received_at < until
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.since and self.until and self.since >= self.until:
            raise DeadLetterError("--since must be earlier than --until")
        if self.limit is not None and self.limit < 1:
            raise DeadLetterError("--limit must be at least 1")

    @property
    def is_empty(self) -> bool:
        return not (self.ids or self.rules or self.since or self.until)

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition on alias ``d`` and its arguments ($1, $2, ...)."""
        clauses: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if self.ids:
            clauses.append(f"d.id = ANY({arg(list(self.ids))}::bigint[])")
        if self.rules:
            clauses.append(f"d.rule = ANY({arg(list(self.rules))}::text[])")
        if self.since is not None:
            clauses.append(f"d.received_at >= {arg(self.since)}")
        if self.until is not None:
            clauses.append(f"d.received_at < {arg(self.until)}")
        return (" AND ".join(clauses) or "true"), args


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """A dead letter as an operator may see it: the reason, never the payload."""

    id: int
    stream_entry_id: str | None
    received_at: datetime
    field: str
    value_class: str
    rule: str
    message: str
    delivery_count: int
    has_payload: bool
    data_key_id: str | None
    replays: int
    last_replay: str | None  # outcome of the newest replay, None if never replayed

    @property
    def replayed(self) -> bool:
        return self.replays > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "received_at": self.received_at.isoformat(),
            "stream_entry_id": self.stream_entry_id,
            "field": self.field,
            "rule": self.rule,
            "value_class": self.value_class,
            "message": self.message,
            "delivery_count": self.delivery_count,
            "has_payload": self.has_payload,
            "data_key_id": self.data_key_id,
            "replayed": self.replayed,
            "replays": self.replays,
            "last_replay": self.last_replay,
        }


# payload_sealed is only tested for NULL: its bytes never leave the database here.
_ROWS = """
SELECT d.id, d.stream_entry_id, d.received_at, d.field, d.value_class, d.rule, d.message,
       d.delivery_count, d.payload_sealed IS NOT NULL AS has_payload, d.data_key_id,
       (SELECT count(*) FROM audit.dead_letter_replays r
         WHERE r.dead_letter_id = d.id) AS replays,
       (SELECT r.outcome FROM audit.dead_letter_replays r
         WHERE r.dead_letter_id = d.id ORDER BY r.id DESC LIMIT 1) AS last_replay
FROM audit.dead_letters d
"""


async def _require_schema(conn: asyncpg.Connection) -> None:
    if not await conn.fetchval("SELECT to_regclass('audit.dead_letter_replays') IS NOT NULL"):
        raise MigrationError(
            "audit.dead_letter_replays does not exist: run `audit-worker migrate` first"
        )


def _row(record: asyncpg.Record) -> DeadLetterRow:
    return DeadLetterRow(
        id=record["id"],
        stream_entry_id=record["stream_entry_id"],
        received_at=record["received_at"],
        field=record["field"],
        value_class=record["value_class"],
        rule=record["rule"],
        message=record["message"],
        delivery_count=record["delivery_count"],
        has_payload=record["has_payload"],
        data_key_id=record["data_key_id"],
        replays=record["replays"],
        last_replay=record["last_replay"],
    )


async def _check_ids(conn: asyncpg.Connection, ids: Sequence[int]) -> None:
    if not ids:
        return
    found = {
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM audit.dead_letters WHERE id = ANY($1::bigint[])", list(ids)
        )
    }
    missing = sorted(set(ids) - found)
    if missing:
        raise UnknownDeadLetters(missing)


async def list_dead_letters(
    conn: asyncpg.Connection, selection: Selection, *, newest_first: bool = True
) -> list[DeadLetterRow]:
    """Dead letters matching `selection` (newest first by default), with their replays.
    Raises `UnknownDeadLetters` when an id asked for does not exist."""
    await _require_schema(conn)
    await _check_ids(conn, selection.ids)
    where, args = selection.where()
    order = "DESC" if newest_first else "ASC"
    limit = f" LIMIT {int(selection.limit)}" if selection.limit is not None else ""
    records = await conn.fetch(f"{_ROWS} WHERE {where} ORDER BY d.id {order}{limit}", *args)
    return [_row(r) for r in records]


@dataclass(frozen=True, slots=True)
class SealedPayload:
    """What it takes to open one dead letter's payload (ciphertext and wrapped key)."""

    dead_letter_id: int
    stream_entry_id: str | None
    ciphertext: bytes | None
    data_key_id: str | None
    wrapped_key: bytes | None
    key_purpose: str | None


async def fetch_sealed(conn: asyncpg.Connection, ids: Sequence[int]) -> list[SealedPayload]:
    """The sealed payloads of `ids`, in id order, each with its wrapped data key."""
    records = await conn.fetch(
        "SELECT d.id, d.stream_entry_id, d.payload_sealed, d.data_key_id,"
        " k.wrapped, k.purpose FROM audit.dead_letters d"
        " LEFT JOIN audit.data_keys k ON k.key_id = d.data_key_id"
        " WHERE d.id = ANY($1::bigint[]) ORDER BY d.id",
        list(ids),
    )
    return [
        SealedPayload(
            r["id"],
            r["stream_entry_id"],
            bytes(r["payload_sealed"]) if r["payload_sealed"] is not None else None,
            r["data_key_id"],
            bytes(r["wrapped"]) if r["wrapped"] is not None else None,
            r["purpose"],
        )
        for r in records
    ]


class PayloadOpener:
    """Opens sealed payloads, unwrapping each data key once (a KMS call per key)."""

    def __init__(self, wrapper: KeyWrapper) -> None:
        self._wrapper = wrapper
        self._keys: dict[str, DataKeyManager] = {}  # by purpose; used only to look keys up
        self._cipher = FieldCipher()

    def open(self, sealed: SealedPayload) -> bytes:
        """The plaintext payload. `DecryptionError` (or `KeyUnavailableError`) when the key
        is missing, wrong or unreachable or the ciphertext was changed; messages name key
        ids and dead-letter ids only."""
        which = f"dead letter {sealed.dead_letter_id}"
        if sealed.ciphertext is None:
            raise DeadLetterError(f"{which} has no stored payload")
        if sealed.data_key_id is None or sealed.wrapped_key is None or not sealed.key_purpose:
            raise DecryptionError(
                f"{which}: its data key {sealed.data_key_id} is not in audit.data_keys"
            )
        if sealed.stream_entry_id is None:
            # The entry id is the associated data: without it nothing can be authenticated.
            raise DecryptionError(f"{which} has no stream entry id to authenticate it with")
        purpose = sealed.key_purpose
        manager = self._keys.get(purpose)
        if manager is None:
            manager = self._keys[purpose] = DataKeyManager(self._wrapper, purpose=purpose)
        # get() checks that the blob matches the key id, then unwraps; never generates.
        key = manager.get(sealed.data_key_id, sealed.wrapped_key)
        try:
            return self._cipher.decrypt(key, sealed.ciphertext, sealed.stream_entry_id.encode())
        except DecryptionError:
            raise DecryptionError(
                f"{which} does not decrypt under data key {key.key_id}: the ciphertext, its "
                "stream entry id or its key id was changed, or the key is not the one used"
            ) from None


class ReplayOutcome(StrEnum):
    resubmitted = "resubmitted"  # valid now, added to the stream again (recorded)
    rejected = "rejected"  # still invalid; `rule` says why (recorded)
    valid = "valid"  # --dry-run: would be resubmitted (not recorded)
    not_replayable = "not_replayable"  # the entry had no payload (not recorded)
    undecryptable = "undecryptable"  # the payload would not open (not recorded)


@dataclass(frozen=True, slots=True)
class ReplayResult:
    dead_letter_id: int
    outcome: ReplayOutcome
    rule: str | None = None  # the rule that still fails (rejected)
    stream_entry_id: str | None = None  # the new stream entry (resubmitted)
    error: str | None = None  # why it would not open (undecryptable); key ids only
    replay_id: int | None = None  # row of audit.dead_letter_replays, when recorded

    def as_dict(self) -> dict[str, Any]:
        return {
            "dead_letter_id": self.dead_letter_id,
            "outcome": self.outcome.value,
            "rule": self.rule,
            "stream_entry_id": self.stream_entry_id,
            "error": self.error,
            "replay_id": self.replay_id,
        }


@dataclass
class ReplayReport:
    dry_run: bool
    stream: str
    results: list[ReplayResult] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        tally = {outcome.value: 0 for outcome in ReplayOutcome}
        for result in self.results:
            tally[result.outcome.value] += 1
        return tally

    @property
    def ok(self) -> bool:
        """False when a payload would not open: that needs a person (key or tampering)."""
        return all(r.outcome is not ReplayOutcome.undecryptable for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "stream": self.stream,
            "selected": len(self.results),
            "counts": self.counts(),
            "results": [r.as_dict() for r in self.results],
        }


async def _record(
    conn: asyncpg.Connection, dead_letter_id: int, outcome: ReplayOutcome,
    rule: str | None, entry_id: str | None,
) -> int:
    # replayed_by defaults to current_user: the login, not a name typed on the command line.
    replay_id = await conn.fetchval(
        "INSERT INTO audit.dead_letter_replays (dead_letter_id, outcome, rule, stream_entry_id)"
        " VALUES ($1, $2, $3, $4) RETURNING id",
        dead_letter_id, outcome.value, rule, entry_id,
    )
    return int(replay_id)


async def _replay_one(
    conn: asyncpg.Connection,
    redis: Redis,
    stream: str,
    opener: PayloadOpener,
    sealed: SealedPayload,
    *,
    max_future_skew: float,
    dry_run: bool,
) -> ReplayResult:
    dl = sealed.dead_letter_id
    if sealed.ciphertext is None:
        return ReplayResult(dl, ReplayOutcome.not_replayable)
    try:
        payload = await asyncio.to_thread(opener.open, sealed)
    except DecryptionError as exc:
        # One bad row must not hold up the rest; the exit code still reports it. A key
        # service that does not answer (KeyUnavailableError) stops the run instead.
        return ReplayResult(dl, ReplayOutcome.undecryptable, error=str(exc))
    verdict = parse_event(payload, max_future_skew=max_future_skew)
    if not isinstance(verdict, AuditEvent):
        if dry_run:
            return ReplayResult(dl, ReplayOutcome.rejected, rule=verdict.rule)
        replay_id = await _record(conn, dl, ReplayOutcome.rejected, verdict.rule, None)
        return ReplayResult(dl, ReplayOutcome.rejected, rule=verdict.rule, replay_id=replay_id)
    if dry_run:
        return ReplayResult(dl, ReplayOutcome.valid)
    # The original bytes, not a re-serialisation: the worker sees what the producer sent.
    added = await redis.xadd(stream, {EVENT_FIELD: payload})
    entry_id = added.decode() if isinstance(added, bytes) else str(added)
    replay_id = await _record(conn, dl, ReplayOutcome.resubmitted, None, entry_id)
    return ReplayResult(dl, ReplayOutcome.resubmitted, stream_entry_id=entry_id,
                        replay_id=replay_id)


async def replay(
    conn: asyncpg.Connection,
    redis: Redis,
    selection: Selection,
    opener: PayloadOpener,
    *,
    stream: str,
    max_future_skew: float,
    dry_run: bool = False,
) -> ReplayReport:
    """Replay the selected dead letters, oldest first. Raises `UnknownDeadLetters` before
    doing anything when an id asked for does not exist; a Redis or database failure
    midway stops the run with what was done so far recorded."""
    if selection.is_empty:
        raise DeadLetterError(
            "say which dead letters to replay: ids, --rule, --since or --until"
        )
    await _require_schema(conn)
    await _check_ids(conn, selection.ids)
    where, args = selection.where()
    limit = f" LIMIT {int(selection.limit)}" if selection.limit is not None else ""
    ids = [
        r["id"]
        for r in await conn.fetch(
            f"SELECT d.id FROM audit.dead_letters d WHERE {where} ORDER BY d.id{limit}", *args
        )
    ]
    report = ReplayReport(dry_run=dry_run, stream=stream)
    for start in range(0, len(ids), REPLAY_CHUNK):
        for sealed in await fetch_sealed(conn, ids[start : start + REPLAY_CHUNK]):
            report.results.append(
                await _replay_one(
                    conn, redis, stream, opener, sealed,
                    max_future_skew=max_future_skew, dry_run=dry_run,
                )
            )
    return report

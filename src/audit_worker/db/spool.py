"""The HTTP intake's spool in PostgreSQL (``audit.intake_spool``), for Redis outages.

While the stream is unreachable, ``POST /v1/events`` seals each accepted event with
AES-GCM under the worker's current data key (the event id is the associated data) and
inserts the batch here in one transaction, together with the data key's wrapped form, so
any worker can open it. The active worker moves the rows into the log in ``spool_id``
order; `LogStore.append` deletes them in the transaction that appends the events, and the
log's event-id dedupe skips an event another worker already moved, so each spooled event
reaches the log at most once.

The spool is a queue, not evidence: it is not hash-chained, and a login with DELETE on it
can drop accepted events before they reach the log.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from audit_worker.crypto import DataKey, DecryptionError, FieldCipher, KeyWrapper, data_key_id
from audit_worker.intake import SPOOL_ENTRY_PREFIX, StreamEntry

__all__ = ["SPOOL_ENTRY_PREFIX", "IntakeSpool", "SpoolOpener", "SpoolRow", "seal"]
KEY_PURPOSE = "phi"


@dataclass(frozen=True, slots=True)
class SpoolRow:
    spool_id: int
    received_ms: int
    event_id: uuid.UUID
    payload_sealed: bytes
    data_key_id: str
    wrapped_key: bytes | None  # from audit.data_keys; None when that row is missing


def seal(cipher: FieldCipher, key: DataKey, event_id: uuid.UUID, payload: bytes) -> bytes:
    """The sealed form stored in the spool: bound to its event id, so a ciphertext moved
    to another row does not open."""
    return cipher.encrypt(key, payload, event_id.bytes)


class IntakeSpool:
    """Insert, read and count spooled events. Safe to share between tasks."""

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout: float = 10.0) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout

    async def insert(
        self,
        sealed: Sequence[tuple[uuid.UUID, bytes]],
        key: DataKey,
        *,
        timeout: float | None = None,
        purpose: str = KEY_PURPOSE,
    ) -> None:
        """Spool (event id, sealed payload) pairs sealed under `key`: all or none. The key
        is stored in the same transaction, so whoever drains can unwrap it."""
        if not sealed:
            return
        async with (
            self.pool.acquire(timeout=timeout or self.acquire_timeout) as conn,
            conn.transaction(),
        ):
            await conn.execute(
                "INSERT INTO audit.data_keys (key_id, purpose, wrapped, wrapper_ref) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (key_id) DO NOTHING",
                key.key_id, purpose, key.wrapped, key.wrapper_ref, timeout=timeout,
            )
            await conn.executemany(
                "INSERT INTO audit.intake_spool (event_id, payload_sealed, data_key_id)"
                " VALUES ($1, $2, $3)",
                [(event_id, blob, key.key_id) for event_id, blob in sealed],
                timeout=timeout,
            )

    async def fetch(
        self, limit: int, *, after: int = 0, skip: Sequence[int] = (),
        timeout: float | None = None,
    ) -> list[SpoolRow]:
        """The oldest `limit` rows with a spool id above `after` and not in `skip`, in spool
        order (rows stay until an append deletes them)."""
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            rows = await conn.fetch(
                "SELECT s.spool_id, s.received_at, s.event_id, s.payload_sealed,"
                " s.data_key_id, k.wrapped FROM audit.intake_spool s"
                " LEFT JOIN audit.data_keys k ON k.key_id = s.data_key_id"
                " WHERE s.spool_id > $2 AND NOT (s.spool_id = ANY($3::bigint[]))"
                " ORDER BY s.spool_id LIMIT $1",
                limit, after, list(skip), timeout=timeout,
            )
        return [
            SpoolRow(
                r["spool_id"], int(r["received_at"].timestamp() * 1000), r["event_id"],
                bytes(r["payload_sealed"]), r["data_key_id"],
                bytes(r["wrapped"]) if r["wrapped"] is not None else None,
            )
            for r in rows
        ]

    async def depth(self, *, timeout: float | None = None) -> int:
        async with self.pool.acquire(timeout=timeout or self.acquire_timeout) as conn:
            return int(
                await conn.fetchval("SELECT count(*) FROM audit.intake_spool", timeout=timeout)
            )


class SpoolOpener:
    """Turns spool rows into stream entries for `Worker.commit`. Each data key is unwrapped
    once (in a thread: KMS is a blocking HTTP call) and cached."""

    def __init__(
        self, cipher: FieldCipher, wrapper: KeyWrapper, *, purpose: str = KEY_PURPOSE,
        cache_size: int = 64,
    ) -> None:
        self.cipher = cipher
        self.wrapper = wrapper
        self.purpose = purpose
        self._cache_size = cache_size
        self._keys: OrderedDict[str, DataKey | None] = OrderedDict()  # None: does not open

    def remember(self, key: DataKey) -> None:
        """A key this process sealed with: no unwrap needed to open its rows."""
        self._keys[key.key_id] = key
        self._keys.move_to_end(key.key_id)
        while len(self._keys) > self._cache_size:
            self._keys.popitem(last=False)

    async def _key(self, key_id: str, wrapped: bytes | None) -> DataKey | None:
        if key_id in self._keys:
            return self._keys[key_id]
        if wrapped is None or data_key_id(wrapped) != key_id:
            return None  # the key row is missing or does not belong to this id
        try:
            plaintext = await asyncio.to_thread(self.wrapper.unwrap, wrapped, self.purpose)
        except DecryptionError:
            key = None  # another master key, or a changed blob: never opens
        else:
            key = DataKey(key_id, plaintext, wrapped, self.wrapper.ref, 0.0)
        self._keys[key_id] = key
        while len(self._keys) > self._cache_size:
            self._keys.popitem(last=False)
        return key

    async def entries(self, rows: Sequence[SpoolRow]) -> list[StreamEntry]:
        """One entry per row, in order. A payload that does not open becomes an entry
        without payload, which the caller must leave in the spool (its ciphertext is the
        only copy of an accepted event); a key service that does not answer raises
        `KeyUnavailableError` (retried)."""
        out: list[StreamEntry] = []
        for row in rows:
            key = await self._key(row.data_key_id, row.wrapped_key)
            payload: bytes | None = None
            if key is not None:
                try:
                    payload = self.cipher.decrypt(key, row.payload_sealed, row.event_id.bytes)
                except DecryptionError:
                    payload = None
            out.append(
                StreamEntry(
                    f"{SPOOL_ENTRY_PREFIX}{row.spool_id}", payload, 1,
                    spool_id=row.spool_id, spooled_ms=row.received_ms,
                )
            )
        return out

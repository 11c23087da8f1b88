"""Evidence from the log itself: events proven by inclusion proofs against a signed tree
head, and one signed tree head proven to extend another by a consistency proof.

Proofs come from `audit_worker.proofs` (computed from the stored leaves) and are checked
with `audit_worker.merkle` against roots taken from *signed* tree heads whose signatures
are verified with the public key first: the database alone cannot vouch for itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from audit_worker.crypto import SignatureError, TreeHead, verify_tree_head
from audit_worker.db.store import LogStore, StoredTreeHead
from audit_worker.merkle import ProofError, RootMismatchError, verify_consistency, verify_inclusion
from audit_worker.proofs import prove_consistency, prove_inclusion
from audit_worker.service import open_pool


@asynccontextmanager
async def open_log(database_url: str, log_id: str) -> AsyncIterator[LogStore]:
    pool = await open_pool(database_url, size=2, command_timeout=60)
    try:
        yield LogStore(pool, log_id)
    finally:
        await pool.close()


async def newest_head(store: LogStore) -> StoredTreeHead | None:
    async with store.pool.acquire(timeout=store.acquire_timeout) as conn:
        row = await conn.fetchrow(
            "SELECT tree_size, root_hash, timestamp_ms, log_id, signature, signer_ref"
            " FROM audit.tree_heads ORDER BY tree_size DESC LIMIT 1"
        )
    if row is None:
        return None
    return StoredTreeHead(
        row["tree_size"], bytes(row["root_hash"]), row["timestamp_ms"], row["log_id"],
        bytes(row["signature"]), row["signer_ref"],
    )


async def log_size(store: LogStore) -> int:
    """Rows in the log (the next log index)."""
    async with store.pool.acquire(timeout=store.acquire_timeout) as conn:
        value = await conn.fetchval("SELECT coalesce(max(log_index) + 1, 0) FROM audit.events")
    return int(value)


def check_signature(public_key_pem: bytes, head: StoredTreeHead) -> None:
    """Raise `SignatureError` unless `head` is signed by the key."""
    verify_tree_head(
        public_key_pem, TreeHead(head.log_id, head.tree_size, head.root_hash, head.timestamp_ms),
        head.signature,
    )


@dataclass(frozen=True)
class Inclusion:
    event_id: str
    log_index: int | None
    tree_size: int | None
    verified: bool
    detail: str
    verified_at: float | None = None


async def located(store: LogStore, event_ids: Sequence[str]) -> dict[str, int]:
    """Log index of each event id found in the log."""
    async with store.pool.acquire(timeout=store.acquire_timeout) as conn:
        rows = await conn.fetch(
            "SELECT event_id::text AS id, log_index FROM audit.events"
            " WHERE event_id = ANY($1::uuid[])", list(event_ids),
        )
    return {r["id"]: r["log_index"] for r in rows}


async def wait_for_signed_inclusion(
    store: LogStore,
    public_key_pem: bytes,
    event_ids: Sequence[str],
    *,
    timeout: float,
    poll: float = 0.05,
) -> list[Inclusion]:
    """Wait until every event is stored and covered by a signed tree head, then prove
    each against that head. Events not stored (or not covered) by the deadline come back
    unverified with the reason; each verified one carries the time it was verified."""
    deadline = time.monotonic() + timeout
    found: dict[str, int] = {}
    head: StoredTreeHead | None = None
    while True:
        found = await located(store, event_ids)
        head = await newest_head(store)
        covered = bool(found) and head is not None and max(found.values()) < head.tree_size
        if (len(found) == len(event_ids) and covered) or time.monotonic() > deadline:
            break
        await asyncio.sleep(poll)
    out = []
    for event_id in event_ids:
        index = found.get(event_id)
        if index is None:
            out.append(Inclusion(event_id, None, None, False,
                                 f"not in the log after {timeout:g}s"))
            continue
        if head is None or index >= head.tree_size:
            out.append(Inclusion(event_id, index, None, False,
                                 f"index {index} not yet covered by a signed tree head"))
            continue
        out.append(await prove_event(store, public_key_pem, event_id, head))
    return out


async def prove_event(
    store: LogStore, public_key_pem: bytes, event_id: str, head: StoredTreeHead
) -> Inclusion:
    """Inclusion proof of one event against one signed head, verified."""
    try:
        check_signature(public_key_pem, head)
        proof = await prove_inclusion(store, uuid.UUID(event_id), head.tree_size)
        verify_inclusion(proof.log_index, head.tree_size, proof.leaf_hash, proof.path,
                         head.root_hash)
    except (SignatureError, ProofError, RootMismatchError, LookupError, ValueError) as exc:
        return Inclusion(event_id, None, head.tree_size, False, f"{type(exc).__name__}: {exc}")
    return Inclusion(
        event_id, proof.log_index, head.tree_size, True,
        f"index {proof.log_index} in signed tree of {head.tree_size} "
        f"({len(proof.path)} proof hashes)", time.time(),
    )


@dataclass(frozen=True)
class Extension:
    old_size: int
    new_size: int
    old_root: str
    new_root: str
    verified: bool
    detail: str


async def prove_extends(
    store: LogStore,
    old: StoredTreeHead,
    new: StoredTreeHead,
    *,
    old_key_pem: bytes,
    new_key_pem: bytes,
) -> Extension:
    """Consistency proof, from `store`'s leaves, that signed head `new` extends signed
    head `old` (which may come from another database: prod's head checked in DR)."""
    try:
        check_signature(old_key_pem, old)
        check_signature(new_key_pem, new)
        if old.tree_size == 0:
            detail = "the old tree is empty: every tree extends it"
            path_len = 0
        else:
            proof = await prove_consistency(store, old.tree_size, new.tree_size)
            verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash,
                               proof.path)
            path_len = len(proof.path)
            detail = f"{path_len} proof hashes; both heads' signatures verified"
    except (SignatureError, ProofError, RootMismatchError, LookupError, ValueError) as exc:
        return Extension(old.tree_size, new.tree_size, old.root_hash.hex(), new.root_hash.hex(),
                         False, f"{type(exc).__name__}: {exc}")
    return Extension(old.tree_size, new.tree_size, old.root_hash.hex(), new.root_hash.hex(),
                     True, detail)


async def wait_for_head(store: LogStore, min_size: int, *, timeout: float) -> StoredTreeHead | None:
    """The newest signed head once it covers at least `min_size` leaves (None at timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        head = await newest_head(store)
        if head is not None and head.tree_size >= min_size:
            return head
        if time.monotonic() > deadline:
            return head if head is not None and head.tree_size >= min_size else None
        await asyncio.sleep(0.05)


async def dead_letters_for(store: LogStore, stream_ids: Sequence[str]) -> int:
    """How many of these stream entries ended up as dead letters."""
    if not stream_ids:
        return 0
    async with store.pool.acquire(timeout=store.acquire_timeout) as conn:
        value = await conn.fetchval(
            "SELECT count(*) FROM audit.dead_letters WHERE stream_entry_id = ANY($1::text[])",
            list(stream_ids),
        )
    return int(value)


async def event_ids_since(store: LogStore, since: float) -> set[str]:
    """Event ids the log recorded since `since` (Unix seconds)."""
    async with store.pool.acquire(timeout=store.acquire_timeout) as conn:
        rows = await conn.fetch(
            "SELECT event_id::text AS id FROM audit.events WHERE recorded >= to_timestamp($1)",
            since,
        )
    return {r["id"] for r in rows}


async def present(conn: asyncpg.Connection, event_ids: Sequence[str]) -> set[str]:
    """Which of these event ids are in the log."""
    found: set[str] = set()
    for start in range(0, len(event_ids), 10_000):
        chunk = list(event_ids[start:start + 10_000])
        rows = await conn.fetch(
            "SELECT event_id::text AS id FROM audit.events WHERE event_id = ANY($1::uuid[])",
            chunk,
        )
        found.update(r["id"] for r in rows)
    return found

"""Witnessed tree heads: signed checkpoints kept outside the database.

Whoever holds the database can delete the newest rows together with every tree head that
covers them, and what is left is a shorter log that verifies. A head published where the
database's owner cannot delete it (the S3 Object Lock archive, replicated to DR) turns that
rollback into a finding: the database must hold at least the witnessed size, with the same
root there.

Layout under the evidence store, per log::

    <log_id>/checkpoint                     the newest checkpoint (replaced each time), where
                                            tlog tooling looks for it
    <log_id>/checkpoints/<99…9 - size>      every published checkpoint, written once; the
                                            name counts down, so a listing's first key is
                                            the largest size (one LIST, however long the
                                            log's history)

Every object is a C2SP signed note (see audit_worker.crypto.checkpoint). Readers never trust
a note's name or the `checkpoint` object: they verify the signature, and take the largest
size among notes that verify.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from audit_worker.crypto import TreeHeadSigner, TrustedKey, TrustedKeys
from audit_worker.crypto.checkpoint import Checkpoint, CheckpointError, open_note, sign_note
from audit_worker.objectstore import ObjectExists, ObjectStore

__all__ = [
    "NEWEST_SCAN",
    "DeadLetterChainTracker",
    "WitnessLog",
    "WitnessPublisher",
    "WitnessRead",
    "Witnessed",
    "history_key",
]

_SPAN = 10**20 - 1  # 20 digits: larger than any tree size a checkpoint can state
# Notes examined from the top of the history before giving up: forged notes written by
# someone with PutObject rights sort first if they claim huge sizes; each is reported.
NEWEST_SCAN = 32


_HISTORY_NAME = re.compile(r"[0-9]{20}")
UNEXPECTED_NAME = "(an object with an unexpected name)"


def history_key(log_id: str, tree_size: int) -> str:
    return f"{log_id}/checkpoints/{_SPAN - tree_size:020d}"


def latest_key(log_id: str) -> str:
    return f"{log_id}/checkpoint"


@dataclass(frozen=True)
class Witnessed:
    checkpoint: Checkpoint
    key: str  # object key in the store
    signer: TrustedKey


@dataclass
class WitnessRead:
    """The newest checkpoint that verifies, and the notes refused on the way to it."""

    newest: Witnessed | None = None
    refused: list[tuple[str, str]] = field(default_factory=list)  # (object key, reason)
    examined: int = 0


class WitnessLog:
    """Publishes and reads one log's checkpoints in an evidence store (blocking calls)."""

    def __init__(self, store: ObjectStore, log_id: str, keys: TrustedKeys) -> None:
        self.store = store
        self.log_id = log_id
        self.keys = keys

    @property
    def url(self) -> str:
        return f"{self.store.url.rstrip('/')}/{self.log_id}/"

    def publish(self, note: bytes, tree_size: int) -> bool:
        """Write the note under its size (once) and as the newest. False when a note for
        this size was already witnessed (by this worker or another): nothing is replaced.
        `checkpoint` is replaced only by a larger size, so tlog tooling never sees it move
        back when two slots publish (each replacement is a version Object Lock keeps)."""
        try:
            self.store.put(history_key(self.log_id, tree_size), note)
        except ObjectExists:
            return False
        try:
            current = self.read(latest_key(self.log_id)).checkpoint.tree_size
        except CheckpointError:
            current = -1  # none yet, or not one of ours: ours replaces it
        if tree_size > current:
            self.store.put(latest_key(self.log_id), note, replace=True)
        return True

    def read(self, key: str) -> Witnessed:
        """Open one stored note; CheckpointError when it does not verify or is not this
        log's note for the size its name says."""
        data = self.store.get(key)
        if data is None:
            raise CheckpointError("the object is gone")
        checkpoint, signer = open_note(data, self.keys)
        if checkpoint.origin != self.log_id:
            raise CheckpointError(f"checkpoint is for log {checkpoint.origin!r}")
        if key != latest_key(self.log_id) and key != history_key(
            self.log_id, checkpoint.tree_size
        ):
            raise CheckpointError("checkpoint is stored under another size's name")
        return Witnessed(checkpoint, key, signer)

    def newest(self, *, scan: int = NEWEST_SCAN) -> WitnessRead:
        """Walk the history from the largest size down until a note verifies, opening at
        most `scan` notes. Objects whose names are not a size's are refused unopened, and
        their names are not repeated (anyone with PutObject chooses them)."""
        result = WitnessRead()
        prefix = f"{self.log_id}/checkpoints/"
        after: str | None = None
        while result.examined < scan:
            keys = self.store.keys(prefix, limit=100, after=after)
            if not keys:
                break
            for key in keys:
                if not _HISTORY_NAME.fullmatch(key[len(prefix):]):
                    result.refused.append((UNEXPECTED_NAME, "not named for a tree size"))
                    continue
                result.examined += 1
                try:
                    result.newest = self.read(key)
                except CheckpointError as exc:
                    result.refused.append((key, str(exc)))
                    if result.examined >= scan:
                        break
                    continue
                return result
            after = keys[-1]
        return result


ChainHead = Callable[[], Awaitable[tuple[int, bytes]]]
VerifyChain = Callable[[Any, int, bytes], Awaitable[tuple[int, bytes]]]


class DeadLetterChainTracker:
    """The dead-letter chain's head as this worker verified it: each call recomputes only
    the dead letters added since the last one, and raises the chain's integrity error when
    a stored link does not recompute (the worker vouches only for what it checked)."""

    def __init__(self, pool: Any, acquire_timeout: float, verify_chain: VerifyChain) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        self.verify_chain = verify_chain
        self.count = 0
        self.hash = bytes(32)

    async def head(self) -> tuple[int, bytes]:
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            self.count, self.hash = await self.verify_chain(conn, self.count, self.hash)
        return self.count, self.hash


class WitnessPublisher:
    """Turns heads this worker signed into witnessed checkpoints, at most one per interval.

    `chain_head` returns the dead-letter chain's (count, hash), verified by the caller, so
    the witness covers dead letters too. Signing uses the tree-head key, in a thread (KMS
    Sign is a blocking HTTP call)."""

    def __init__(
        self,
        log: WitnessLog,
        signer: TreeHeadSigner,
        public_key: TrustedKey,
        chain_head: ChainHead,
        *,
        interval_seconds: float,
    ) -> None:
        self.log = log
        self.signer = signer
        self.public_key = public_key
        self.chain_head = chain_head
        self.interval = interval_seconds
        self.published_size = -1
        self.published_at = 0.0  # time.time() of the last publication, 0 before

    def due(self, tree_size: int, now: float) -> bool:
        return tree_size > self.published_size and now - self.published_at >= self.interval

    async def publish(self, tree_size: int, root_hash: bytes, timestamp_ms: int) -> bool:
        """Witness the head (tree_size, root_hash, timestamp_ms) this worker signed."""
        count, chain = await self.chain_head()
        checkpoint = Checkpoint(
            self.log.log_id, tree_size, root_hash, timestamp_ms, count, chain
        )
        note = await asyncio.to_thread(sign_note, checkpoint, self.signer, self.public_key)
        # A signer that changed key must not leave an unverifiable witness behind.
        open_note(note, TrustedKeys((self.public_key,)))
        fresh = await asyncio.to_thread(self.log.publish, note, tree_size)
        self.published_size = tree_size
        self.published_at = time.time()
        return fresh

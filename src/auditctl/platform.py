"""The small interface the workflows are written against, and the values it returns.

Two platforms implement it:

* `auditctl.platforms.local.LocalPlatform`: processes on this machine (PostgreSQL primary
  and streaming replica, Redis per site, one worker process per blue-green slot).
* `auditctl.platforms.aws.AwsKubernetesPlatform`: Pulumi stack config for images and the
  active slot, the Kubernetes API for rollout status and scaling, RDS and Route 53 for the
  failover.

`ReleasePlatform` is what promotion, rollback and status need; `FailoverPlatform` what a
DR drill and failback need. Both platforms implement both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from audit_worker.slots import ControlValue
from auditctl.gates import GateResult, MigrationPlan
from auditctl.promotion import PromotionRecord, Slot

SLOTS: tuple[Slot, Slot] = ("blue", "green")


@dataclass(frozen=True)
class Probe:
    """One HTTP answer from a worker slot (``status`` 0: no answer)."""

    status: int
    body: Any
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    def problems(self) -> list[str]:
        if self.error:
            return [self.error]
        if isinstance(self.body, Mapping):
            return [str(p) for p in self.body.get("problems", [])]
        return [] if self.ok else [f"HTTP {self.status}"]


@dataclass(frozen=True)
class SlotInfo:
    slot: Slot
    image: str
    desired: int  # replicas (processes) wanted
    running: int  # replicas (processes) up
    started_at: float | None = None


@dataclass(frozen=True)
class StreamStats:
    length: int
    lag: int | None  # entries not yet delivered to the consumer group
    pending: int  # delivered, not acknowledged
    lag_capped: bool = False


@dataclass(frozen=True)
class ReplicaInfo:
    primary_site: str
    replica_site: str
    state: str  # streaming, stopped, promoted ...
    lag_bytes: int | None
    lag_seconds: float | None


@dataclass(frozen=True)
class SiteInfo:
    name: str
    database_role: Literal["primary", "replica", "stopped", "unknown"]
    workers_running: int
    intake: bool  # the intake record names this site


@dataclass(frozen=True)
class Topology:
    primary: str
    replica: str | None
    endpoint_site: str
    sites: dict[str, SiteInfo] = field(default_factory=dict)


class ReleasePlatform(Protocol):
    """What blue-green promotion, rollback and status need."""

    name: str
    environment: str
    log_id: str

    async def control(self) -> ControlValue | None:
        """The control key: which slot consumes, at which epoch."""
        ...

    async def slots(self) -> dict[Slot, SlotInfo]:
        ...

    async def probe(self, slot: Slot, path: str, timeout: float = 3.0) -> Probe:
        """GET `path` (``/readyz``, ``/metrics`` ...) on a worker of `slot`."""
        ...

    async def migration_plan(self, image: str, *, old_slot: Slot) -> MigrationPlan:
        ...

    async def apply_migrations(self, image: str, plan: MigrationPlan) -> list[str]:
        ...

    async def deploy(self, slot: Slot, image: str) -> None:
        """Run `image` in `slot` (scaled up, not consuming: the control key names the
        other slot)."""
        ...

    async def scale_down(self, slot: Slot) -> None:
        ...

    async def switch(self, slot: Slot, *, expected_epoch: int) -> int:
        """Make `slot` the active one if the control key is still at `expected_epoch`
        (compare-and-set); return the new epoch. Raises `SwitchRefused` otherwise."""
        ...

    async def submit_events(
        self, events: Sequence[Mapping[str, Any]], *, via_slot: Slot | None
    ) -> list[str]:
        """Write events through `via_slot`'s HTTP intake (None: straight to the stream);
        return the stream entry ids."""
        ...

    async def database_url(self, site: str | None = None) -> str:
        """A connection URL of a site's database (None: the primary)."""
        ...

    async def public_key_pem(self, site: str | None = None) -> bytes:
        """The tree-head signer's public key as a site's workers use it."""
        ...

    def lock(self) -> AbstractAsyncContextManager[None]:
        """Serialises the moments of promote and rollback that must not interleave (the
        switch, the end of the scale-down delay, a rollback) across commands."""
        ...

    async def load_promotion(self) -> PromotionRecord | None:
        ...

    async def save_promotion(self, record: PromotionRecord) -> None:
        ...

    async def stream_stats(self) -> StreamStats:
        ...

    async def replica(self) -> ReplicaInfo | None:
        ...


class FailoverPlatform(Protocol):
    """What a DR drill and a failback need, on top of the databases' SQL."""

    name: str
    environment: str
    log_id: str

    async def topology(self) -> Topology:
        ...

    async def load_promotion(self) -> PromotionRecord | None:
        """The primary site's promotion record (a drill waits for it to finish)."""
        ...

    def describe_steps(self) -> dict[str, str]:
        """How this platform performs each drill step (for ``drill --plan``)."""
        ...

    async def database_url(self, site: str | None = None) -> str:
        ...

    async def public_key_pem(self, site: str | None = None) -> bytes:
        ...

    async def capacity(self, site: str) -> GateResult:
        """Can `site` run the workload once it is the primary?"""
        ...

    async def freeze(self, site: str) -> str:
        """Stop `site`'s consumers (each finishes its batch and signs a final head)."""
        ...

    async def unfreeze(self, site: str) -> str:
        """Undo `freeze`: start `site`'s active slot again (a drill that stopped before
        the promotion)."""
        ...

    async def promote_database(self, site: str) -> str:
        ...

    async def fence(self, site: str) -> str:
        ...

    async def activate(self, site: str) -> str:
        """Start `site`'s active slot against its (now primary) database."""
        ...

    async def switch_endpoint(self, site: str) -> tuple[str, float]:
        """Point the intake and database records at `site`; return (detail, TTL seconds)."""
        ...

    async def handoff(self, source: str, target: str) -> int:
        """Copy intake entries `source` acknowledged but never delivered to its consumers
        to `target`'s intake; return how many."""
        ...

    async def submit_canaries(self, site: str, events: Sequence[Mapping[str, Any]]) -> None:
        ...

    async def acknowledged(self, site: str, since: float) -> set[str]:
        """Event ids `site`'s intake acknowledged since `since` (Unix seconds)."""
        ...

    async def rebuild_replica(self, site: str) -> str:
        """Make `site`'s database a streaming replica of the current primary."""
        ...

    async def slot_probe(self, site: str, path: str) -> Probe:
        """`path` on `site`'s active slot."""
        ...

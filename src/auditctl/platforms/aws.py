"""The ``aws-kubernetes`` platform: the same workflows on the Pulumi stacks in AWS.

* **Pulumi Automation API** for what the stacks declare: the image of each slot
  (``audit-kit:blueImage`` / ``greenImage``), the active slot (``audit-kit:activeSlot``:
  it moves the active and preview Services) and the preview replicas
  (``audit-kit:previewReplicas``), each followed by ``stack.up()``. The chart's migration
  Job runs the new image's ``audit-worker migrate`` during that ``up`` (and refuses a
  contract migration by itself).
* **Kubernetes API** for what must be immediate or observed: each slot's Deployment
  status, scaling a slot down (or DR's active slot up), the workers' health endpoints
  through the API server's service proxy, the connection Secret, and the promotion record
  (a ConfigMap).
* **Redis** (the ElastiCache endpoint from the connection Secret) for the control key, the
  smoke and canary events, and the stream hand-off; **PostgreSQL** (from the same Secret)
  for proofs and heartbeats.
* **boto3**: RDS ``promote_read_replica`` (and ``stop_db_instance`` to fence the old
  primary, ``create_db_instance_read_replica`` to rebuild one, with the target region's
  key, subnet group, security groups and parameter group from its stack outputs); the
  traffic switch through ARC's data plane (``route53-recovery-cluster``
  ``UpdateRoutingControlStates`` / ``GetRoutingControlState`` on the cluster's regional
  endpoints, tried in turn), which turns one site's routing control On and the other's Off
  so that Route 53's failover TXT records answer with that site's endpoint names (no
  Route 53 or us-east-1 control-plane call); KMS ``GetPublicKey`` for the tree-head key in
  each region.

It runs from a machine inside the VPC with the Pulumi CLI, cluster credentials and AWS
credentials. None of these exist where this kit is developed: the tests drive this module
with a fake Pulumi stack, a fake Kubernetes API (no API server can run here), moto in
server mode for AWS, and a real Redis.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from cryptography.hazmat.primitives import serialization
from redis.asyncio import Redis

from audit_worker.client import AuditClient
from audit_worker.slots import ControlValue, activate, read_control
from auditctl.environments import Profile
from auditctl.errors import PlatformError, Refused
from auditctl.gates import GateResult, MigrationPlan
from auditctl.platform import SLOTS, Probe, ReplicaInfo, SiteInfo, SlotInfo, StreamStats, Topology
from auditctl.promotion import PromotionRecord, Slot
from auditctl.streams import STREAM, acknowledged, handoff, stream_stats

CONTROL_KEY = "audit:control:active-slot"
LOCK_KEY = "audit:auditctl:lock"
LOCK_TTL_MS = 120_000
DATABASE_URL_KEY = "database-url"
REDIS_URL_KEY = "redis-url"
RECORD_KEY = "record.json"
ARC_RETRYABLE = frozenset({"ThrottlingException", "InternalServerException",
                           "EndpointTemporarilyUnavailableException"})
"""ARC data-plane errors after which the next regional endpoint is tried (any other error,
e.g. a safety rule's ConflictException or a ValidationException, is final)."""
MIGRATION_NOTE = (
    "applied by the chart's migration Job during the deploy (`audit-worker migrate` in the "
    "new image, which refuses contract migrations)"
)
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class PulumiStack(Protocol):
    """The part of `pulumi.automation.Stack` used here."""

    name: str

    def get_config(self, key: str, *, path: bool = False) -> Any: ...

    def set_config(self, key: str, value: Any, *, path: bool = False) -> None: ...

    def up(self, **kwargs: Any) -> Any: ...

    def outputs(self) -> Mapping[str, Any]: ...


def config_value(value: str) -> Any:
    from pulumi.automation import ConfigValue

    return ConfigValue(value=value)


@dataclass
class AwsSite:
    """One stack (prod or dr): its outputs, its cluster, its region."""

    name: str
    stack: PulumiStack
    apps: Any  # kubernetes.client.AppsV1Api of the site's cluster
    core: Any  # kubernetes.client.CoreV1Api
    aws: dict[str, Any] = field(default_factory=dict)  # boto3.client kwargs (region ...)
    outputs: dict[str, Any] = field(default_factory=dict)
    clients: Callable[[str], Any] | None = None
    """service -> client; None (the default): ``boto3.client(service, **aws)``. Tests pass
    real botocore clients with a Stubber here."""

    def load_outputs(self) -> dict[str, Any]:
        self.outputs = {
            key: getattr(value, "value", value) for key, value in self.stack.outputs().items()
        }
        return self.outputs

    @property
    def namespace(self) -> str:
        return str(self.outputs["namespace"])

    @property
    def release(self) -> str:
        return str(self.outputs["releaseName"])

    def deployment(self, slot: str) -> str:
        return f"{self.release}-{slot}"

    def client(self, service: str) -> Any:
        if self.clients is not None:
            return self.clients(service)
        import boto3

        return boto3.client(service, **self.aws)

    def config(self, key: str) -> str:
        return str(getattr(self.stack.get_config(f"audit-kit:{key}"), "value", ""))


class AwsKubernetesPlatform:
    """`ReleasePlatform` and `FailoverPlatform` on the Pulumi stacks (see module doc)."""

    name = "aws-kubernetes"

    def __init__(
        self,
        environment: str,
        log_id: str,
        sites: dict[str, AwsSite],
        *,
        home: str,
        on_output: Callable[[str], None] | None = None,
        waiter_delay: int = 30,
        arc_client: Callable[[str, str], Any] | None = None,
    ) -> None:
        self.environment = environment
        self.log_id = log_id
        self.sites = sites
        self.home = home
        self.on_output = on_output
        self.waiter_delay = waiter_delay
        self.arc_client = arc_client or _arc_client
        """(region, endpoint URL) -> a ``route53-recovery-cluster`` client."""
        for site in sites.values():
            if not site.outputs:
                site.load_outputs()

    @classmethod
    def connect(cls, profile: Profile) -> AwsKubernetesPlatform:
        """Select the environment's stack (and, for dr, prod's) and the clusters from the
        kubeconfig (context = the stack's ``clusterName`` output, or the current one)."""
        try:
            import pulumi.automation as auto

            stack = auto.select_stack(stack_name=profile.name, work_dir=str(profile.root))
            sites = {profile.name: _site(profile.name, stack, profile.region)}
            if profile.name == "dr":
                primary = sites["dr"].outputs["primaryStack"]
                prod = auto.select_stack(stack_name=str(primary), work_dir=str(profile.root))
                sites["prod"] = _site("prod", prod, str(sites["dr"].outputs["primaryRegion"]))
        except FileNotFoundError as exc:
            raise PlatformError(
                f"the aws-kubernetes platform needs the Pulumi CLI ({exc.filename} not found), "
                "the stack's backend and cluster credentials; run auditctl from the platform's "
                "runner inside the VPC"
            ) from None
        except Exception as exc:
            raise PlatformError(f"cannot reach the {profile.name} stack or its cluster: "
                                f"{type(exc).__name__}: {exc}") from None
        return cls(profile.name, profile.log_id, sites, home=profile.name)

    # ------------------------------------------------------------------ helpers
    @property
    def site(self) -> AwsSite:
        return self.sites[self.home]

    def _site(self, name: str | None) -> AwsSite:
        try:
            return self.sites[name or self.home]
        except KeyError:
            raise Refused(f"{self.environment} has no site {name!r}: the DR drill runs from "
                          "the dr environment (`auditctl drill dr ...`)") from None

    async def _secret(self, site: AwsSite, key: str) -> str:
        name = str(site.outputs.get("connectionsSecretName", "audit-worker-connections"))
        secret = await asyncio.to_thread(site.core.read_namespaced_secret, name, site.namespace)
        return base64.b64decode(secret.data[key]).decode()

    @asynccontextmanager
    async def _redis(self, site: AwsSite) -> AsyncIterator[Redis]:
        client = Redis.from_url(await self._secret(site, REDIS_URL_KEY), socket_timeout=5)
        try:
            yield client
        finally:
            await client.aclose()

    async def _up(self, site: AwsSite, **config: str) -> None:
        def run() -> None:
            for key, value in config.items():
                site.stack.set_config(f"audit-kit:{key}", config_value(value))
            site.stack.up(on_output=self.on_output, color="never")
            site.load_outputs()

        await asyncio.to_thread(run)

    async def _scale(self, site: AwsSite, slot: str, replicas: int) -> None:
        await asyncio.to_thread(
            site.apps.patch_namespaced_deployment_scale, site.deployment(slot), site.namespace,
            {"spec": {"replicas": replicas}},
        )

    def _service_for(self, site: AwsSite, slot: str) -> str:
        role = "active" if site.config("activeSlot") == slot else "preview"
        return str(site.outputs[f"{role}ServiceName"])

    async def _proxy(self, site: AwsSite, service: str, path: str) -> Probe:
        from kubernetes.client.exceptions import ApiException

        try:
            reply = await asyncio.to_thread(
                site.core.connect_get_namespaced_service_proxy_with_path,
                f"{service}:http", site.namespace, path.lstrip("/"), _preload_content=False,
            )
        except ApiException as exc:
            body: Any = exc.body
            with suppress(ValueError):
                body = json.loads(exc.body) if exc.body else None
            return Probe(int(exc.status or 0), body)
        except Exception as exc:
            return Probe(0, None, f"no answer from {service}{path}: {type(exc).__name__}")
        raw = reply.data.decode() if isinstance(reply.data, bytes) else str(reply.data)
        try:
            return Probe(int(reply.status), json.loads(raw))
        except ValueError:
            return Probe(int(reply.status), raw)

    # ------------------------------------------------------------------ release
    async def control(self) -> ControlValue | None:
        async with self._redis(self.site) as redis:
            return await read_control(redis, CONTROL_KEY)

    async def slots(self) -> dict[Slot, SlotInfo]:
        site = self.site
        out: dict[Slot, SlotInfo] = {}
        for slot in SLOTS:
            deployment = await asyncio.to_thread(
                site.apps.read_namespaced_deployment, site.deployment(slot), site.namespace
            )
            created = deployment.metadata.creation_timestamp
            out[slot] = SlotInfo(
                slot, site.config(f"{slot}Image"), int(deployment.spec.replicas or 0),
                int(deployment.status.ready_replicas or 0),
                created.timestamp() if created is not None else None,
            )
        return out

    async def probe(self, slot: Slot, path: str, timeout: float = 3.0) -> Probe:
        return await self._proxy(self.site, self._service_for(self.site, slot), path)

    async def slot_probe(self, site: str, path: str) -> Probe:
        target = self._site(site)
        return await self._proxy(target, str(target.outputs["activeServiceName"]), path)

    async def migration_plan(self, image: str, *, old_slot: Slot) -> MigrationPlan:
        return MigrationPlan((), (), note=MIGRATION_NOTE)

    async def apply_migrations(self, image: str, plan: MigrationPlan) -> list[str]:
        return []

    async def deploy(self, slot: Slot, image: str) -> None:
        replicas = str(self.site.outputs.get("workerReplicas", 1))
        await self._up(self.site, **{f"{slot}Image": image, "previewReplicas": replicas})

    async def scale_down(self, slot: Slot) -> None:
        """Scale now through the Kubernetes API; the stack config follows (previewReplicas
        0), applied by the next ``up``."""
        await self._scale(self.site, slot, 0)
        await asyncio.to_thread(self.site.stack.set_config, "audit-kit:previewReplicas",
                                config_value("0"))

    async def switch(self, slot: Slot, *, expected_epoch: int) -> int:
        """The control key first (consumption moves at once, compare-and-set), then the
        stack: ``activeSlot`` moves the Services, ``previewReplicas`` keeps the old slot
        up for the scale-down delay."""
        async with self._redis(self.site) as redis:
            epoch = await activate(redis, CONTROL_KEY, slot, expected_epoch=expected_epoch)
        replicas = str(self.site.outputs.get("workerReplicas", 1))
        await self._up(self.site, activeSlot=slot, previewReplicas=replicas)
        return epoch

    async def submit_events(
        self, events: Sequence[Mapping[str, Any]], *, via_slot: Slot | None
    ) -> list[str]:
        # The API server's service proxy carries no request body: smoke events go to the
        # stream, which every slot's intake writes to as well.
        async with self._redis(self.site) as redis:
            logged = await AuditClient(redis, stream=STREAM).log_many(events)
        return [e.stream_id for e in logged]

    async def database_url(self, site: str | None = None) -> str:
        return await self._secret(self._site(site), DATABASE_URL_KEY)

    async def public_key_pem(self, site: str | None = None) -> bytes:
        target = self._site(site)
        kms = target.client("kms")
        reply = await asyncio.to_thread(kms.get_public_key, KeyId=target.outputs["signingKeyId"])
        key = serialization.load_der_public_key(bytes(reply["PublicKey"]))
        return key.public_bytes(serialization.Encoding.PEM,
                                serialization.PublicFormat.SubjectPublicKeyInfo)

    @asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        token = secrets.token_hex(16)
        async with self._redis(self.site) as redis:
            deadline = time.monotonic() + 60
            while not await redis.set(LOCK_KEY, token, nx=True, px=LOCK_TTL_MS):
                if time.monotonic() > deadline:
                    raise PlatformError(f"{LOCK_KEY} is held by another auditctl for over 60s")
                await asyncio.sleep(0.2)
            try:
                yield
            finally:
                await redis.eval(_UNLOCK, 1, LOCK_KEY, token)

    def _record_name(self) -> str:
        return f"{self.site.release}-promotion"

    async def load_promotion(self) -> PromotionRecord | None:
        from kubernetes.client.exceptions import ApiException

        site = self.site
        try:
            cm = await asyncio.to_thread(site.core.read_namespaced_config_map,
                                         self._record_name(), site.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return PromotionRecord.from_dict(json.loads(cm.data[RECORD_KEY]))

    async def save_promotion(self, record: PromotionRecord) -> None:
        from kubernetes.client.exceptions import ApiException

        site = self.site
        body = {
            "metadata": {"name": self._record_name(), "namespace": site.namespace,
                         "labels": {"app.kubernetes.io/managed-by": "auditctl"}},
            "data": {RECORD_KEY: json.dumps(record.to_dict())},
        }
        try:
            await asyncio.to_thread(site.core.replace_namespaced_config_map,
                                    self._record_name(), site.namespace, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            await asyncio.to_thread(site.core.create_namespaced_config_map, site.namespace,
                                    body)

    async def stream_stats(self) -> StreamStats:
        async with self._redis(self.site) as redis:
            return await stream_stats(redis)

    async def replica(self) -> ReplicaInfo | None:
        if "dr" not in self.sites or "prod" not in self.sites:
            return None
        instance = await self._db_instance("dr")
        state = "streaming" if instance.get("ReadReplicaSourceDBInstanceIdentifier") else \
            "promoted"
        infos = instance.get("StatusInfos") or []
        detail = next((i.get("Status") for i in infos if i.get("StatusType") == "read replication"),
                      None)
        if detail and detail != "replicating":
            state = str(detail)
        return ReplicaInfo("prod", "dr", state, None, None)

    # ------------------------------------------------------------------ failover
    async def _db_instance(self, site: str) -> dict[str, Any]:
        target = self._site(site)
        ident = target.outputs.get("dbReplicaIdentifier") or target.outputs["dbInstanceIdentifier"]
        rds = target.client("rds")
        reply = await asyncio.to_thread(rds.describe_db_instances, DBInstanceIdentifier=ident)
        return cast(dict[str, Any], reply["DBInstances"][0])

    async def _arc(self, operation: str, **params: Any) -> dict[str, Any]:
        """One ARC data-plane call, tried on each of the cluster's regional endpoints in a
        random order until one answers: any one of the five can serve it, so a region that
        is down costs a retry, not the switch."""
        from botocore.exceptions import BotoCoreError, ClientError

        endpoints = list(self._site("dr").outputs.get("arcClusterEndpoints") or [])
        if not endpoints:
            raise PlatformError("the dr stack exports no arcClusterEndpoints: run `pulumi up` "
                                "on dr (the ARC traffic switch, infra/dr.py)")
        random.shuffle(endpoints)
        failures: list[str] = []
        for endpoint in endpoints:
            client = self.arc_client(str(endpoint["region"]), str(endpoint["endpoint"]))
            try:
                return cast(dict[str, Any],
                            await asyncio.to_thread(getattr(client, operation), **params))
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code not in ARC_RETRYABLE:
                    raise
                failures.append(f"{endpoint['region']}: {code}")
            except BotoCoreError as exc:  # connection refused, timeout, DNS
                failures.append(f"{endpoint['region']}: {type(exc).__name__}")
        raise PlatformError("no ARC cluster endpoint answered: " + "; ".join(failures))

    def _routing_controls(self) -> dict[str, str]:
        arns = self._site("dr").outputs.get("routingControlArns") or {}
        if set(arns) != {"prod", "dr"}:
            raise PlatformError("the dr stack exports no routingControlArns for prod and dr")
        return {site: str(arn) for site, arn in arns.items()}

    async def _endpoint_site(self) -> str:
        """The site whose records Route 53 answers with: DR only when DR's routing control
        is On and prod's Off (both Off: Route 53 answers with the PRIMARY, prod)."""
        states = {}
        for site, arn in self._routing_controls().items():
            reply = await self._arc("get_routing_control_state", RoutingControlArn=arn)
            states[site] = reply["RoutingControlState"]
        return "dr" if states["dr"] == "On" and states["prod"] != "On" else "prod"

    async def topology(self) -> Topology:
        dr = await self._db_instance("dr")
        prod = await self._db_instance("prod")
        replicating = bool(dr.get("ReadReplicaSourceDBInstanceIdentifier"))
        primary = "prod" if replicating else "dr"
        endpoint = await self._endpoint_site()
        sites = {}
        for name, instance in (("prod", prod), ("dr", dr)):
            status = instance.get("DBInstanceStatus")
            role: Any = "stopped" if status == "stopped" else (
                "primary" if name == primary else "replica")
            site = self._site(name)
            running = 0
            for slot in SLOTS:
                deployment = await asyncio.to_thread(
                    site.apps.read_namespaced_deployment, site.deployment(slot), site.namespace)
                running += int(deployment.status.ready_replicas or 0)
            sites[name] = SiteInfo(name, role, running, endpoint == name)
        replica = "dr" if replicating else (
            "prod" if sites["prod"].database_role == "replica" else None)
        return Topology(primary, replica, endpoint, sites)

    def describe_steps(self) -> dict[str, str]:
        return {
            "rebuild": "rds.create_db_instance_read_replica from the current primary (then "
                       "`pulumi up` on the stack that owns it reconciles)",
            "preflight": "heartbeat row on the primary read back on the replica (through the "
                         "connection Secrets); DR cluster nodes Ready and its active Deployment "
                         "present; KMS GetPublicKey in both regions gives the same key",
            "freeze": "Kubernetes: scale both slot Deployments of the source to 0",
            "catch-up": "pg_last_wal_replay_lsn() on the replica >= the primary's insert "
                        "position",
            "promote": "rds.promote_read_replica(dbReplicaIdentifier), then the "
                       "db_instance_available waiter",
            "fence": "rds.stop_db_instance on the old primary",
            "activate": "Kubernetes: scale DR's active Deployment to prod's replicas; raise DR's "
                        "control-key epoch",
            "switch-endpoint": "route53-recovery-cluster.update_routing_control_states: the "
                               "target site's routing control On, the other's Off (ARC data "
                               "plane, any of the cluster's five regional endpoints)",
            "handoff": "XRANGE prod's stream after the group's last-delivered id, XADD to DR's",
            "canary": "XADD canaries to DR's Redis; inclusion proofs in DR's log",
            "consistency": "consistency proof from DR's leaves to prod's last signed head",
            "rpo": "event ids in prod's stream and log since the window start, looked up in "
                   "DR's log",
            "restore-replica": "rds.create_db_instance_read_replica in the other region, with "
                               "that region's KmsKeyId, DBSubnetGroupName, "
                               "VpcSecurityGroupIds, DBParameterGroupName and SourceRegion",
        }

    async def capacity(self, site: str) -> GateResult:
        target = self._site(site)
        problems = []
        nodes = await asyncio.to_thread(target.core.list_node)
        ready = sum(
            1 for node in nodes.items
            if any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        )
        if ready == 0:
            problems.append(f"no Ready node in {site}'s cluster")
        slot = target.config("activeSlot") or "blue"
        try:
            await asyncio.to_thread(target.apps.read_namespaced_deployment,
                                    target.deployment(slot), target.namespace)
        except Exception as exc:
            problems.append(f"{site}'s active Deployment: {type(exc).__name__}")
        return GateResult(
            "capacity", "drill", not problems,
            "; ".join(problems) or f"{site}: {ready} Ready node(s), active Deployment present",
            measured={"ready_nodes": ready},
        )

    async def freeze(self, site: str) -> str:
        target = self._site(site)
        for slot in SLOTS:
            await self._scale(target, slot, 0)
        return f"{site}'s slot Deployments scaled to 0"

    async def unfreeze(self, site: str) -> str:
        target = self._site(site)
        slot = target.config("activeSlot") or "blue"
        replicas = int(target.outputs.get("workerReplicas", 1))
        await self._scale(target, slot, replicas)
        return f"{site}/{slot} scaled back to {replicas}"

    async def promote_database(self, site: str) -> str:
        target = self._site(site)
        ident = target.outputs["dbReplicaIdentifier"]
        rds = target.client("rds")
        await asyncio.to_thread(rds.promote_read_replica, DBInstanceIdentifier=ident,
                                BackupRetentionPeriod=35)
        waiter = rds.get_waiter("db_instance_available")
        await asyncio.to_thread(waiter.wait, DBInstanceIdentifier=ident,
                                WaiterConfig={"Delay": self.waiter_delay, "MaxAttempts": 60})
        return f"rds.promote_read_replica({ident}): available"

    async def fence(self, site: str) -> str:
        target = self._site(site)
        ident = target.outputs["dbInstanceIdentifier"]
        await asyncio.to_thread(target.client("rds").stop_db_instance,
                                DBInstanceIdentifier=ident)
        return f"rds.stop_db_instance({ident})"

    async def activate(self, site: str) -> str:
        target = self._site(site)
        slot = cast(Slot, target.config("activeSlot") or "blue")
        replicas = int(self.sites["prod"].outputs.get("workerReplicas", 1))
        async with self._redis(target) as redis:
            epoch = await activate(redis, CONTROL_KEY, slot)
        await self._scale(target, slot, replicas)
        return f"{site}/{slot} scaled to {replicas}, control epoch {epoch}"

    async def switch_endpoint(self, site: str) -> tuple[str, float]:
        """Turn `site`'s routing control On and the other's Off, in one request (the safety
        rule that keeps one site On judges the pair, not each half)."""
        dr = self._site("dr")
        controls = self._routing_controls()
        other = "prod" if site == "dr" else "dr"
        await self._arc("update_routing_control_states", UpdateRoutingControlStateEntries=[
            {"RoutingControlArn": controls[site], "RoutingControlState": "On"},
            {"RoutingControlArn": controls[other], "RoutingControlState": "Off"},
        ])
        ttl = float(dr.outputs.get("dnsTtlSeconds", 60))
        records = ", ".join(str(dr.outputs.get(k, "")) for k in
                            ("intakeRecordName", "databaseRecordName") if dr.outputs.get(k))
        return (f"ARC routing control {site} On, {other} Off: {records or 'the failover records'}"
                f" answer with {site}'s endpoint names", ttl)

    async def handoff(self, source: str, target: str) -> int:
        async with self._redis(self._site(source)) as src, \
                self._redis(self._site(target)) as dst:
            return await handoff(src, dst)

    async def submit_canaries(self, site: str, events: Sequence[Mapping[str, Any]]) -> None:
        async with self._redis(self._site(site)) as redis:
            await AuditClient(redis, stream=STREAM).log_many(events)

    async def acknowledged(self, site: str, since: float) -> set[str]:
        async with self._redis(self._site(site)) as redis:
            return await acknowledged(redis, since)

    async def rebuild_replica(self, site: str) -> str:
        """A promoted RDS instance cannot be rewound: a new cross-region read replica of the
        current primary is created at `site`, built like the stack's own instance there."""
        target = self._site(site)
        source = self._site("dr" if site == "prod" else "prod")
        primary = await self._db_instance(source.name)
        ident = f"{target.outputs['dbInstanceIdentifier']}-rebuilt-{int(time.time())}"
        request = replica_request(target, source, primary, ident)
        rds = target.client("rds")
        await asyncio.to_thread(rds.create_db_instance_read_replica, **request)
        waiter = rds.get_waiter("db_instance_available")
        await asyncio.to_thread(waiter.wait, DBInstanceIdentifier=ident,
                                WaiterConfig={"Delay": self.waiter_delay, "MaxAttempts": 120})
        return (f"read replica {ident} of {primary['DBInstanceIdentifier']} available; "
                f"import it into the {site} stack (`pulumi import`) before its next `up`")


REPLICA_OUTPUTS: tuple[str, ...] = (
    "dbKmsKeyArn", "dbSubnetGroupName", "dbSecurityGroupIds", "dbParameterGroupName")
"""The target stack's outputs a rebuilt replica needs (infra/__main__.py exports them)."""


def replica_request(target: AwsSite, source: AwsSite, primary: Mapping[str, Any],
                    ident: str) -> dict[str, Any]:
    """``CreateDBInstanceReadReplica`` parameters for a cross-region replica at `target`.

    An encrypted cross-region replica needs a key of its own region (KmsKeyId); without the
    subnet group and security groups RDS puts it in the default VPC, and without the
    parameter group it runs without ``rds.force_ssl`` and pgaudit
    (https://docs.aws.amazon.com/AmazonRDS/latest/APIReference/API_CreateDBInstanceReadReplica.html).
    SourceRegion makes boto3 sign the PreSignedUrl the cross-region call needs.
    """
    missing = [k for k in REPLICA_OUTPUTS if not target.outputs.get(k)]
    if missing:
        raise PlatformError(f"the {target.name} stack exports no {', '.join(missing)}: run "
                            f"`pulumi up` on {target.name} first")
    source_region = source.aws.get("region_name")
    if not source_region:
        raise PlatformError(f"no region for the {source.name} site")
    return {
        "DBInstanceIdentifier": ident,
        "SourceDBInstanceIdentifier": primary["DBInstanceArn"],
        "DBInstanceClass": primary.get("DBInstanceClass", "db.r6g.xlarge"),
        "KmsKeyId": str(target.outputs["dbKmsKeyArn"]),
        "DBSubnetGroupName": str(target.outputs["dbSubnetGroupName"]),
        "VpcSecurityGroupIds": [str(g) for g in target.outputs["dbSecurityGroupIds"]],
        "DBParameterGroupName": str(target.outputs["dbParameterGroupName"]),
        "MultiAZ": bool(primary.get("MultiAZ", True)),
        "StorageType": "gp3",
        "PubliclyAccessible": False,
        "EnableIAMDatabaseAuthentication": bool(
            primary.get("IAMDatabaseAuthenticationEnabled", False)),
        "CopyTagsToSnapshot": True,
        "SourceRegion": str(source_region),
    }


def _arc_client(region: str, endpoint: str) -> Any:
    import boto3

    return boto3.client("route53-recovery-cluster", region_name=region, endpoint_url=endpoint)


def _site(name: str, stack: Any, region: str) -> AwsSite:
    from kubernetes import client, config

    outputs = {k: getattr(v, "value", v) for k, v in stack.outputs().items()}
    context = outputs.get("clusterName")
    try:
        api = config.new_client_from_config(context=str(context)) if context else \
            config.new_client_from_config()
    except config.ConfigException:
        api = config.new_client_from_config()
    return AwsSite(name, stack, client.AppsV1Api(api), client.CoreV1Api(api),
                   {"region_name": region}, outputs)

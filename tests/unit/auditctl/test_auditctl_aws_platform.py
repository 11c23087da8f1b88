"""The aws-kubernetes platform's calls.

What runs for real here: AWS APIs against moto in server mode (RDS, Route 53, KMS) and the
control key, hand-off and lock against the test Redis. What is faked, because it cannot run
on this machine: the Pulumi stack (`FakeStack`: there is no Pulumi CLI) and the Kubernetes
API (`FakeKube`: there is no API server). The fakes record the calls, so the tests check
which stack config keys change, when ``up`` runs, and which Deployments are scaled.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from kubernetes.client.exceptions import ApiException

from audit_worker.localenv.workload import malformed_event, synthetic_event
from audit_worker.slots import SwitchRefused, read_control
from auditctl.environments import load_profile
from auditctl.errors import PlatformError
from auditctl.platforms.aws import CONTROL_KEY, MIGRATION_NOTE, AwsKubernetesPlatform, AwsSite
from auditctl.promotion import PromotionRecord


class FakeStack:
    """Stands in for `pulumi.automation.Stack` (no Pulumi CLI here)."""

    def __init__(self, name: str, config: dict[str, str], outputs: dict[str, Any]) -> None:
        self.name = name
        self.config = dict(config)
        self._outputs = outputs
        self.calls: list[tuple[Any, ...]] = []

    def get_config(self, key: str, *, path: bool = False) -> Any:
        return SimpleNamespace(value=self.config[key])

    def set_config(self, key: str, value: Any, *, path: bool = False) -> None:
        self.calls.append(("set_config", key, value.value))
        self.config[key] = value.value

    def up(self, **kwargs: Any) -> Any:
        self.calls.append(("up",))
        return SimpleNamespace(summary=SimpleNamespace(result="succeeded"))

    def outputs(self) -> dict[str, Any]:
        return {k: SimpleNamespace(value=v) for k, v in self._outputs.items()}


class FakeKube:
    """Stands in for AppsV1Api and CoreV1Api (no Kubernetes API server here)."""

    def __init__(self, redis_url: str, database_url: str = "postgresql://db/audit") -> None:
        self.replicas = {"audit-worker-blue": 3, "audit-worker-green": 0}
        self.scaled: list[tuple[str, int]] = []
        self.secrets = {"audit-worker-connections": {
            "redis-url": base64.b64encode(redis_url.encode()).decode(),
            "database-url": base64.b64encode(database_url.encode()).decode(),
        }}
        self.config_maps: dict[str, Any] = {}
        self.proxy: dict[tuple[str, str], tuple[int, str]] = {}
        self.ready_nodes = 2

    # AppsV1Api
    def read_namespaced_deployment(self, name: str, namespace: str) -> Any:
        if name not in self.replicas:
            raise ApiException(status=404, reason="Not Found")
        n = self.replicas[name]
        return SimpleNamespace(spec=SimpleNamespace(replicas=n),
                               status=SimpleNamespace(ready_replicas=n or None),
                               metadata=SimpleNamespace(creation_timestamp=None))

    def patch_namespaced_deployment_scale(self, name: str, namespace: str, body: Any) -> None:
        self.replicas[name] = body["spec"]["replicas"]
        self.scaled.append((name, body["spec"]["replicas"]))

    # CoreV1Api
    def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        return SimpleNamespace(data=self.secrets[name])

    def connect_get_namespaced_service_proxy_with_path(
        self, name: str, namespace: str, path: str, **kwargs: Any
    ) -> Any:
        status, body = self.proxy[(name, path)]
        if status >= 400:
            raise ApiException(status=status, reason="Service Unavailable") from None
        return SimpleNamespace(status=status, data=body.encode())

    def read_namespaced_config_map(self, name: str, namespace: str) -> Any:
        if name not in self.config_maps:
            raise ApiException(status=404, reason="Not Found")
        return SimpleNamespace(data=self.config_maps[name]["data"])

    def replace_namespaced_config_map(self, name: str, namespace: str, body: Any) -> None:
        if name not in self.config_maps:
            raise ApiException(status=404, reason="Not Found")
        self.config_maps[name] = body

    def create_namespaced_config_map(self, namespace: str, body: Any) -> None:
        self.config_maps[body["metadata"]["name"]] = body

    def list_node(self) -> Any:
        ready = SimpleNamespace(status=SimpleNamespace(
            conditions=[SimpleNamespace(type="Ready", status="True")]))
        return SimpleNamespace(items=[ready] * self.ready_nodes)


OUTPUTS = {
    "namespace": "audit", "releaseName": "audit-worker", "workerReplicas": 3,
    "activeServiceName": "audit-worker-active", "previewServiceName": "audit-worker-preview",
    "connectionsSecretName": "audit-worker-connections",
}
CONFIG = {"audit-kit:activeSlot": "blue", "audit-kit:blueImage": "1.0.0",
          "audit-kit:greenImage": "1.0.0", "audit-kit:previewReplicas": "0"}


@pytest.fixture
def single(fresh_redis: str) -> Iterator[tuple[AwsKubernetesPlatform, FakeStack, FakeKube]]:
    stack = FakeStack("staging", CONFIG, OUTPUTS)
    kube = FakeKube(fresh_redis)
    site = AwsSite("staging", stack, kube, kube)
    platform = AwsKubernetesPlatform("staging", "audit-staging", {"staging": site}, home="staging")
    client = redis.Redis.from_url(fresh_redis)
    client.set(CONTROL_KEY, json.dumps({"slot": "blue", "epoch": 4}))
    client.close()
    yield platform, stack, kube


async def test_deploy_sets_the_slot_image_and_preview_replicas_then_runs_up(
    single: tuple[AwsKubernetesPlatform, FakeStack, FakeKube],
) -> None:
    platform, stack, _ = single
    await platform.deploy("green", "1.1.0")
    assert stack.calls == [
        ("set_config", "audit-kit:greenImage", "1.1.0"),
        ("set_config", "audit-kit:previewReplicas", "3"),
        ("up",),
    ]
    slots = await platform.slots()
    assert slots["green"].image == "1.1.0" and slots["blue"].running == 3


async def test_the_migration_gate_defers_to_the_charts_job(
    single: tuple[AwsKubernetesPlatform, FakeStack, FakeKube],
) -> None:
    platform, _, _ = single
    plan = await platform.migration_plan("1.1.0", old_slot="blue")
    assert plan.ok and plan.gate().detail == MIGRATION_NOTE
    assert await platform.apply_migrations("1.1.0", plan) == []


async def test_switch_moves_the_control_key_first_then_the_services(
    single: tuple[AwsKubernetesPlatform, FakeStack, FakeKube],
) -> None:
    platform, stack, _ = single
    epoch = await platform.switch("green", expected_epoch=4)
    assert epoch == 5
    control = await platform.control()
    assert control is not None and (control.slot, control.epoch) == ("green", 5)
    assert stack.calls == [
        ("set_config", "audit-kit:activeSlot", "green"),
        ("set_config", "audit-kit:previewReplicas", "3"),  # the old slot stays up
        ("up",),
    ]


async def test_a_switch_from_a_stale_epoch_is_refused_and_the_stack_untouched(
    single: tuple[AwsKubernetesPlatform, FakeStack, FakeKube],
) -> None:
    platform, stack, _ = single
    with pytest.raises(SwitchRefused, match="epoch 4, not 3"):
        await platform.switch("green", expected_epoch=3)
    assert stack.calls == []


async def test_scale_down_is_immediate_and_recorded_for_the_next_up(
    single: tuple[AwsKubernetesPlatform, FakeStack, FakeKube],
) -> None:
    platform, stack, kube = single
    await platform.scale_down("blue")
    assert kube.scaled == [("audit-worker-blue", 0)]
    assert stack.calls == [("set_config", "audit-kit:previewReplicas", "0")]  # no up


async def test_probes_go_through_the_api_servers_service_proxy(
    single: tuple[AwsKubernetesPlatform, FakeStack, FakeKube],
) -> None:
    platform, _, kube = single
    kube.proxy[("audit-worker-preview:http", "readyz")] = (200, json.dumps({"status": "ok"}))
    kube.proxy[("audit-worker-active:http", "metrics")] = (200, "audit_tree_size 5.0\n")
    kube.proxy[("audit-worker-active:http", "readyz")] = (503, "")
    assert (await platform.probe("green", "/readyz")).body == {"status": "ok"}
    assert (await platform.probe("blue", "/metrics")).body == "audit_tree_size 5.0\n"
    assert (await platform.probe("blue", "/readyz")).status == 503


async def test_the_promotion_record_is_kept_in_a_config_map(
    single: tuple[AwsKubernetesPlatform, FakeStack, FakeKube],
) -> None:
    platform, _, kube = single
    assert await platform.load_promotion() is None
    record = PromotionRecord("staging", "1.1.0", "1.0.0", "blue", "green", 4, True, 30.0,
                             time.time())
    await platform.save_promotion(record)
    record.reason = "second save replaces the first"
    await platform.save_promotion(record)
    assert list(kube.config_maps) == ["audit-worker-promotion"]
    assert await platform.load_promotion() == record


async def test_the_promotion_lock_is_exclusive(
    single: tuple[AwsKubernetesPlatform, FakeStack, FakeKube], fresh_redis: str
) -> None:
    platform, _, _ = single
    client = redis.Redis.from_url(fresh_redis)
    try:
        async with platform.lock():
            holder = client.get("audit:auditctl:lock")
            assert holder is not None
            assert not client.set("audit:auditctl:lock", "someone-else", nx=True)
        assert client.get("audit:auditctl:lock") is None
    finally:
        client.close()


# ------------------------------------------------------------------ DR: moto for AWS


@pytest.fixture
def dr(
    aws_kwargs: dict[str, str], fresh_redis: str
) -> Iterator[tuple[AwsKubernetesPlatform, dict[str, Any]]]:
    """prod (us-east-1) with an RDS primary, dr (us-west-2) with its cross-region read
    replica, a Route 53 zone with a failover health check, KMS signing keys: in moto."""
    suffix = uuid.uuid4().hex[:8]
    east = {**aws_kwargs, "region_name": "us-east-1"}
    west = {**aws_kwargs, "region_name": "us-west-2"}
    rds_east, rds_west = boto3.client("rds", **east), boto3.client("rds", **west)
    prod_id, dr_id = f"audit-prod-{suffix}", f"audit-dr-{suffix}"
    rds_east.create_db_instance(
        DBInstanceIdentifier=prod_id, DBInstanceClass="db.r6g.xlarge", Engine="postgres",
        MasterUsername="audit", MasterUserPassword="not-a-real-password-1", AllocatedStorage=200,
    )
    prod_arn = rds_east.describe_db_instances(DBInstanceIdentifier=prod_id)["DBInstances"][0][
        "DBInstanceArn"]
    rds_west.create_db_instance_read_replica(
        DBInstanceIdentifier=dr_id, SourceDBInstanceIdentifier=prod_arn,
        DBInstanceClass="db.r6g.xlarge",
    )
    route53 = boto3.client("route53", **east)
    zone_name = f"audit-{suffix}.example.org"
    zone = route53.create_hosted_zone(Name=zone_name, CallerReference=suffix)["HostedZone"]["Id"]
    check = route53.create_health_check(CallerReference=suffix, HealthCheckConfig={
        "Type": "HTTPS", "FullyQualifiedDomainName": f"health.{zone_name}", "Port": 443,
        "ResourcePath": "/readyz", "RequestInterval": 30, "FailureThreshold": 3,
    })["HealthCheck"]["Id"]
    route53.change_resource_record_sets(HostedZoneId=zone, ChangeBatch={"Changes": [
        {"Action": "UPSERT", "ResourceRecordSet": {
            "Name": f"intake.{zone_name}", "Type": "CNAME", "TTL": 60, "SetIdentifier": ident,
            "Failover": role, **({"HealthCheckId": check} if role == "PRIMARY" else {}),
            "ResourceRecords": [{"Value": target}]}}
        for ident, role, target in (("intake-prod", "PRIMARY", "prod.cache.internal"),
                                    ("intake-dr", "SECONDARY", "dr.cache.internal"))
    ]})
    signing = boto3.client("kms", **east).create_key(
        KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    prod_kube, dr_kube = FakeKube(fresh_redis), FakeKube(fresh_redis.replace("/0", "/1"))
    prod = AwsSite("prod", FakeStack("prod", CONFIG, {
        **OUTPUTS, "dbInstanceIdentifier": prod_id, "signingKeyId": signing,
    }), prod_kube, prod_kube, east)
    dr_site = AwsSite("dr", FakeStack("dr", CONFIG, {
        **OUTPUTS, "dbInstanceIdentifier": dr_id, "dbReplicaIdentifier": dr_id,
        "hostedZoneId": zone, "hostedZoneName": zone_name, "healthCheckId": check,
        "intakeRecordName": f"intake.{zone_name}", "signingKeyId": signing,
    }), dr_kube, dr_kube, west)
    platform = AwsKubernetesPlatform("dr", "audit-prod", {"prod": prod, "dr": dr_site},
                                     home="dr", waiter_delay=1)
    yield platform, {"prod_id": prod_id, "dr_id": dr_id, "zone": zone, "check": check,
                     "east": east, "west": west, "signing": signing, "dr_kube": dr_kube,
                     "prod_kube": prod_kube, "zone_name": zone_name}


async def test_topology_reads_the_replica_from_rds_and_the_endpoint_from_route53(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]],
) -> None:
    platform, _ = dr
    topology = await platform.topology()
    assert (topology.primary, topology.replica, topology.endpoint_site) == ("prod", "dr", "prod")
    assert topology.sites["dr"].database_role == "replica"


async def test_promote_database_promotes_the_rds_read_replica(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]],
) -> None:
    platform, env = dr
    detail = await platform.promote_database("dr")
    assert "promote_read_replica" in detail
    instance = boto3.client("rds", **env["west"]).describe_db_instances(
        DBInstanceIdentifier=env["dr_id"])["DBInstances"][0]
    assert instance["DBInstanceStatus"] == "available"
    assert instance["BackupRetentionPeriod"] == 35


async def test_fence_stops_the_old_primary(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]],
) -> None:
    platform, env = dr
    await platform.fence("prod")
    instance = boto3.client("rds", **env["east"]).describe_db_instances(
        DBInstanceIdentifier=env["prod_id"])["DBInstances"][0]
    assert instance["DBInstanceStatus"] == "stopped"
    assert (await platform.topology()).sites["prod"].database_role == "stopped"


async def test_switch_endpoint_inverts_the_health_check_and_marks_the_active_site(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]],
) -> None:
    platform, env = dr
    detail, ttl = await platform.switch_endpoint("dr")
    route53 = boto3.client("route53", **env["east"])
    config = route53.get_health_check(HealthCheckId=env["check"])["HealthCheck"][
        "HealthCheckConfig"]
    assert config["Inverted"] is True and ttl == 60 and "inverted" in detail
    records = route53.list_resource_record_sets(HostedZoneId=env["zone"])["ResourceRecordSets"]
    marker = next(r for r in records if r["Name"].startswith("_audit-active."))
    assert "site=dr" in marker["ResourceRecords"][0]["Value"]
    assert (await platform.topology()).endpoint_site == "dr"
    await platform.switch_endpoint("prod")  # failback restores it
    config = route53.get_health_check(HealthCheckId=env["check"])["HealthCheck"][
        "HealthCheckConfig"]
    assert config["Inverted"] is False


async def test_the_public_key_comes_from_kms(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]],
) -> None:
    platform, env = dr
    pem = await platform.public_key_pem("prod")
    der = boto3.client("kms", **env["east"]).get_public_key(KeyId=env["signing"])["PublicKey"]
    assert serialization.load_pem_public_key(pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == der


async def test_rebuild_creates_a_cross_region_read_replica_of_the_primary(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]],
) -> None:
    platform, env = dr
    detail = await platform.rebuild_replica("prod")
    assert "read replica" in detail and "pulumi import" in detail
    replicas = [
        i for i in boto3.client("rds", **env["east"]).describe_db_instances()["DBInstances"]
        if i["DBInstanceIdentifier"].startswith(f"{env['prod_id']}-rebuilt-")
    ]
    assert len(replicas) == 1
    assert replicas[0]["ReadReplicaSourceDBInstanceIdentifier"].endswith(env["dr_id"])


async def test_freeze_and_activate_scale_the_sites_and_raise_drs_epoch(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]], fresh_redis: str
) -> None:
    platform, env = dr
    await platform.freeze("prod")
    assert env["prod_kube"].scaled == [("audit-worker-blue", 0), ("audit-worker-green", 0)]
    detail = await platform.activate("dr")
    assert env["dr_kube"].scaled == [("audit-worker-blue", 3)]
    assert "control epoch 1" in detail
    from redis.asyncio import Redis

    client = Redis.from_url(fresh_redis.replace("/0", "/1"))
    try:
        control = await read_control(client, CONTROL_KEY)
    finally:
        await client.aclose()
    assert control is not None and control.slot == "blue"
    capacity = await platform.capacity("dr")
    assert capacity.passed and capacity.measured["ready_nodes"] == 2


async def test_handoff_moves_what_prods_frozen_consumers_never_read(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]], fresh_redis: str
) -> None:
    platform, _ = dr
    prod = redis.Redis.from_url(fresh_redis)
    try:
        prod.xgroup_create("audit:events", "audit-workers", id="0", mkstream=True)
        events = [synthetic_event(n) for n in range(5)]
        for event in events:
            prod.xadd("audit:events", {"event": json.dumps(event)})
        prod.xadd("audit:events", {"event": malformed_event(1)})  # dead-lettered: no event
        prod.xreadgroup("audit-workers", "w1", {"audit:events": ">"}, count=2)
        prod.xack("audit:events", "audit-workers", *[
            e[0] for e in prod.xrange("audit:events", count=1)])
        moved = await platform.handoff("prod", "dr")
        again = await platform.handoff("prod", "dr")
        since = await platform.acknowledged("dr", 0)
    finally:
        prod.close()
    assert moved == 5  # one pending (read, not acked) + four never delivered
    assert again == 0
    assert since == {e["event_id"] for e in events[1:]}


def test_connect_says_what_is_missing_without_the_pulumi_cli(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PlatformError, match="needs the Pulumi CLI"):
        AwsKubernetesPlatform.connect(load_profile("staging"))

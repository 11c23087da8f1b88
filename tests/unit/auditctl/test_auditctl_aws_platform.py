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
import botocore.session
import pytest
import redis
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from cryptography.hazmat.primitives import serialization
from kubernetes.client.exceptions import ApiException

from audit_worker.localenv.workload import malformed_event, synthetic_event
from audit_worker.slots import SwitchRefused, read_control
from auditctl.environments import load_profile
from auditctl.errors import PlatformError
from auditctl.platforms.aws import (
    CONTROL_KEY,
    MIGRATION_NOTE,
    AwsKubernetesPlatform,
    AwsSite,
    replica_request,
)
from auditctl.promotion import PromotionRecord
from tests.aws_stub import StubbedClients, stubbed


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


ARC_PANEL = "arn:aws:route53-recovery-control::111122223333:controlpanel/abc"
ROUTING_CONTROLS = {"prod": f"{ARC_PANEL}/routingcontrol/prod1",
                    "dr": f"{ARC_PANEL}/routingcontrol/dr1"}
ARC_ENDPOINTS = [{"region": r, "endpoint": f"https://c1.route53-recovery-cluster.{r}.amazonaws.com"}
                 for r in ("us-east-1", "us-west-2", "eu-west-1", "ap-northeast-1",
                           "ap-southeast-2")]


class StubbedArc:
    """ARC's data plane (``route53-recovery-cluster``): moto has no ARC, so a real botocore
    client with a `Stubber`, which validates every request against botocore's service model.
    The factory hands the same client out for every regional endpoint and notes which."""

    def __init__(self) -> None:
        session = botocore.session.get_session()
        self.client = session.create_client(
            "route53-recovery-cluster", region_name="us-west-2",
            aws_access_key_id="testing", aws_secret_access_key="testing")
        self.stub = Stubber(self.client)
        self.stub.activate()
        self.endpoints: list[str] = []

    def factory(self, region: str, endpoint: str) -> Any:
        self.endpoints.append(region)
        return self.client

    def states(self, **states: str) -> None:
        """Queue GetRoutingControlState answers (prod first, then dr)."""
        for site in ("prod", "dr"):
            self.stub.add_response(
                "get_routing_control_state",
                {"RoutingControlArn": ROUTING_CONTROLS[site],
                 "RoutingControlState": states[site]},
                {"RoutingControlArn": ROUTING_CONTROLS[site]})


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


def rebuild_outputs(kwargs: dict[str, str], suffix: str, site: str,
                    mirror: dict[str, str] | None = None) -> dict[str, Any]:
    """What a stack exports for a failback rebuild in its region, made real in moto: a VPC,
    two subnets, the subnet group, a security group, the parameter group, the database key."""
    ec2, rds = boto3.client("ec2", **kwargs), boto3.client("rds", **kwargs)
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    zones = [z["ZoneName"] for z in ec2.describe_availability_zones()["AvailabilityZones"]][:2]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24", AvailabilityZone=z)[
        "Subnet"]["SubnetId"] for i, z in enumerate(zones)]
    group = f"audit-{site}-db-{suffix}"
    rds.create_db_subnet_group(DBSubnetGroupName=group, DBSubnetGroupDescription="db",
                               SubnetIds=subnets)
    if mirror is not None:
        # moto resolves a cross-region replica's subnet group in the *source* region's
        # backend (it copies the source instance before switching backends); real RDS uses
        # the replica's region. A same-named group there lets moto take the real request.
        mirror_ec2, mirror_rds = boto3.client("ec2", **mirror), boto3.client("rds", **mirror)
        mirror_vpc = mirror_ec2.create_vpc(CidrBlock="10.8.0.0/16")["Vpc"]["VpcId"]
        mirror_zones = [z["ZoneName"] for z in
                        mirror_ec2.describe_availability_zones()["AvailabilityZones"]][:2]
        mirror_rds.create_db_subnet_group(
            DBSubnetGroupName=group, DBSubnetGroupDescription="moto mirror",
            SubnetIds=[mirror_ec2.create_subnet(VpcId=mirror_vpc, CidrBlock=f"10.8.{i}.0/24",
                                                AvailabilityZone=z)["Subnet"]["SubnetId"]
                       for i, z in enumerate(mirror_zones)])
    sg = ec2.create_security_group(GroupName=group, Description="db", VpcId=vpc)["GroupId"]
    params = f"audit-{site}-params-{suffix}"
    rds.create_db_parameter_group(DBParameterGroupName=params, DBParameterGroupFamily="postgres16",
                                  Description="force_ssl, pgaudit")
    key = boto3.client("kms", **kwargs).create_key()["KeyMetadata"]["Arn"]
    return {"dbKmsKeyArn": key, "dbSubnetGroupName": group, "dbSecurityGroupIds": [sg],
            "dbParameterGroupName": params}


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
        **rebuild_outputs(east, suffix, "prod", mirror=west),
    }), prod_kube, prod_kube, east)
    dr_site = AwsSite("dr", FakeStack("dr", CONFIG, {
        **OUTPUTS, "dbInstanceIdentifier": dr_id, "dbReplicaIdentifier": dr_id,
        "hostedZoneId": zone, "hostedZoneName": zone_name, "healthCheckId": check,
        "intakeRecordName": f"intake.{zone_name}", "signingKeyId": signing,
        "databaseRecordName": f"db.{zone_name}", "dnsTtlSeconds": 60,
        "routingControlArns": ROUTING_CONTROLS, "arcClusterEndpoints": ARC_ENDPOINTS,
        **rebuild_outputs(west, suffix, "dr"),
    }), dr_kube, dr_kube, west)
    arc = StubbedArc()
    platform = AwsKubernetesPlatform("dr", "audit-prod", {"prod": prod, "dr": dr_site},
                                     home="dr", waiter_delay=1, arc_client=arc.factory)
    yield platform, {"arc": arc, "prod_id": prod_id, "dr_id": dr_id, "zone": zone, "check": check,
                     "east": east, "west": west, "signing": signing, "dr_kube": dr_kube,
                     "prod_kube": prod_kube, "zone_name": zone_name}


async def test_topology_reads_the_replica_from_rds_and_the_endpoint_from_arc(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]],
) -> None:
    platform, env = dr
    env["arc"].states(prod="On", dr="Off")
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
    env["arc"].states(prod="Off", dr="Off")  # both Off: Route 53 answers with the PRIMARY
    await platform.fence("prod")
    instance = boto3.client("rds", **env["east"]).describe_db_instances(
        DBInstanceIdentifier=env["prod_id"])["DBInstances"][0]
    assert instance["DBInstanceStatus"] == "stopped"
    assert (await platform.topology()).sites["prod"].database_role == "stopped"


def _switch_request(on: str, off: str) -> dict[str, Any]:
    return {"UpdateRoutingControlStateEntries": [
        {"RoutingControlArn": ROUTING_CONTROLS[on], "RoutingControlState": "On"},
        {"RoutingControlArn": ROUTING_CONTROLS[off], "RoutingControlState": "Off"}]}


async def test_switch_endpoint_turns_the_target_on_and_the_other_off_in_one_arc_request(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]],
) -> None:
    platform, env = dr
    arc: StubbedArc = env["arc"]
    arc.stub.add_response("update_routing_control_states", {}, _switch_request("dr", "prod"))
    detail, ttl = await platform.switch_endpoint("dr")
    assert ttl == 60 and "dr On, prod Off" in detail and f"intake.{env['zone_name']}" in detail
    arc.states(prod="Off", dr="On")
    assert (await platform.topology()).endpoint_site == "dr"
    arc.stub.add_response("update_routing_control_states", {}, _switch_request("prod", "dr"))
    await platform.switch_endpoint("prod")  # failback
    arc.stub.assert_no_pending_responses()
    # No Route 53 control-plane change: the records and health checks are the stack's.
    route53 = boto3.client("route53", **env["east"])
    config = route53.get_health_check(HealthCheckId=env["check"])["HealthCheck"][
        "HealthCheckConfig"]
    assert not config.get("Inverted")


async def test_switch_endpoint_tries_the_next_regional_endpoint_when_one_is_throttled(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]],
) -> None:
    platform, env = dr
    arc: StubbedArc = env["arc"]
    arc.stub.add_client_error("update_routing_control_states", "ThrottlingException",
                              expected_params=_switch_request("dr", "prod"))
    arc.stub.add_response("update_routing_control_states", {}, _switch_request("dr", "prod"))
    await platform.switch_endpoint("dr")
    assert len(arc.endpoints) == 2 and len(set(arc.endpoints)) == 2


async def test_a_safety_rule_refusal_is_final_not_retried_elsewhere(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]],
) -> None:
    platform, env = dr
    arc: StubbedArc = env["arc"]
    arc.stub.add_client_error("update_routing_control_states", "ConflictException",
                              expected_params=_switch_request("dr", "prod"))
    with pytest.raises(ClientError, match="ConflictException"):
        await platform.switch_endpoint("dr")
    assert len(arc.endpoints) == 1


async def test_the_switch_requests_are_valid_for_botocores_arc_model() -> None:
    """The Stubber refuses a request the model refuses: a state outside On/Off is caught."""
    arc = StubbedArc()
    arc.stub.add_response("update_routing_control_states", {})
    from botocore.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="RoutingControlState"):
        arc.client.update_routing_control_states(UpdateRoutingControlStateEntries=[
            {"RoutingControlArn": ROUTING_CONTROLS["dr"], "RoutingControlState": 1}])


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
    prod = platform.sites["prod"].outputs
    assert replicas[0]["DBSubnetGroup"]["DBSubnetGroupName"] == prod["dbSubnetGroupName"]
    assert [g["VpcSecurityGroupId"] for g in replicas[0]["VpcSecurityGroups"]] == prod[
        "dbSecurityGroupIds"]
    assert [g["DBParameterGroupName"] for g in replicas[0]["DBParameterGroups"]] == [
        prod["dbParameterGroupName"]]


async def test_rebuild_request_carries_the_target_regions_key_network_and_parameters(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]],
) -> None:
    """Stubber checks the request against botocore's RDS model, and that it carries each
    parameter a cross-region, encrypted, force_ssl replica needs."""
    platform, env = dr
    prod, dr_site = platform.sites["prod"], platform.sites["dr"]
    primary = {"DBInstanceArn": f"arn:aws:rds:us-west-2:111122223333:db:{env['dr_id']}",
               "DBInstanceIdentifier": env["dr_id"], "DBInstanceClass": "db.r6g.xlarge",
               "MultiAZ": True, "IAMDatabaseAuthenticationEnabled": True}
    request = replica_request(prod, dr_site, primary, "audit-prod-rebuilt-1")
    assert {k: request[k] for k in ("KmsKeyId", "DBSubnetGroupName", "VpcSecurityGroupIds",
                                    "DBParameterGroupName", "SourceRegion")} == {
        "KmsKeyId": prod.outputs["dbKmsKeyArn"],
        "DBSubnetGroupName": prod.outputs["dbSubnetGroupName"],
        "VpcSecurityGroupIds": prod.outputs["dbSecurityGroupIds"],
        "DBParameterGroupName": prod.outputs["dbParameterGroupName"],
        "SourceRegion": "us-west-2"}
    assert ":us-east-1:" in request["KmsKeyId"]  # the target region's key, not the source's
    client = botocore.session.get_session().create_client(
        "rds", region_name="us-east-1", aws_access_key_id="testing",
        aws_secret_access_key="testing")
    with Stubber(client) as stub:
        stub.add_response("create_db_instance_read_replica", {"DBInstance": {
            "DBInstanceIdentifier": "audit-prod-rebuilt-1"}}, request)
        client.create_db_instance_read_replica(**request)
        stub.assert_no_pending_responses()


def test_rebuild_refuses_a_target_stack_without_the_replica_outputs(
    dr: tuple[AwsKubernetesPlatform, dict[str, Any]],
) -> None:
    platform, _ = dr
    prod = platform.sites["prod"]
    del prod.outputs["dbParameterGroupName"]
    with pytest.raises(PlatformError, match="dbParameterGroupName"):
        replica_request(prod, platform.sites["dr"], {"DBInstanceArn": "arn:x"}, "x")


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


# ------------------------------------------------------------------ DR: botocore's RDS model
# The same code paths as above, on real botocore clients behind a Stubber (tests/aws_stub.py)
# handed to the sites through `AwsSite.clients`: moto accepts more than RDS does (any
# BackupRetentionPeriod, a replica without its region's key), the model and the exact
# expected parameters do not.

PROD_ARN = "arn:aws:rds:us-east-1:111122223333:db:audit-prod"
DR_ARN = "arn:aws:rds:us-west-2:111122223333:db:audit-dr"


@pytest.fixture
def stubbed_dr() -> Iterator[tuple[AwsKubernetesPlatform, StubbedClients, StubbedClients]]:
    """prod (us-east-1) and dr (us-west-2) whose AWS clients are stubbed botocore clients;
    no moto. Every queued answer must be used."""
    east, west = StubbedClients("us-east-1"), StubbedClients("us-west-2")
    kube = FakeKube("redis://unused:6379/0")
    prod = AwsSite("prod", FakeStack("prod", CONFIG, {
        **OUTPUTS, "dbInstanceIdentifier": "audit-prod", "signingKeyId": "alias/audit-sth",
        "dbKmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/prod-db",
        "dbSubnetGroupName": "audit-prod-db", "dbSecurityGroupIds": ["sg-0prod"],
        "dbParameterGroupName": "audit-prod-params",
    }), kube, kube, {"region_name": "us-east-1"}, clients=east.factory)
    dr_site = AwsSite("dr", FakeStack("dr", CONFIG, {
        **OUTPUTS, "dbInstanceIdentifier": "audit-dr", "dbReplicaIdentifier": "audit-dr",
        "routingControlArns": ROUTING_CONTROLS, "arcClusterEndpoints": ARC_ENDPOINTS,
    }), kube, kube, {"region_name": "us-west-2"}, clients=west.factory)
    platform = AwsKubernetesPlatform("dr", "audit-prod", {"prod": prod, "dr": dr_site},
                                     home="dr", waiter_delay=1)
    yield platform, east, west
    east.assert_no_pending_responses()
    west.assert_no_pending_responses()


def _available(ident: str) -> dict[str, Any]:
    return {"DBInstances": [{"DBInstanceIdentifier": ident, "DBInstanceStatus": "available"}]}


async def test_promote_database_sends_a_promotion_the_rds_model_accepts_then_waits(
    stubbed_dr: tuple[AwsKubernetesPlatform, StubbedClients, StubbedClients],
) -> None:
    platform, _, west = stubbed_dr
    west["rds"].add_response(
        "promote_read_replica", {"DBInstance": {"DBInstanceIdentifier": "audit-dr"}},
        {"DBInstanceIdentifier": "audit-dr", "BackupRetentionPeriod": 35})
    # The db_instance_available waiter polls DescribeDBInstances for the same instance.
    west["rds"].add_response("describe_db_instances", _available("audit-dr"),
                             {"DBInstanceIdentifier": "audit-dr"})
    assert await platform.promote_database("dr") == (
        "rds.promote_read_replica(audit-dr): available")


async def test_promote_database_fails_a_stub_that_expects_other_parameters(
    stubbed_dr: tuple[AwsKubernetesPlatform, StubbedClients, StubbedClients],
) -> None:
    """The check above can fail: expected parameters that differ from what the code sends
    (a 7-day retention) are refused before any answer."""
    from botocore.exceptions import StubAssertionError

    platform, _, west = stubbed_dr
    west["rds"].add_response(
        "promote_read_replica", {"DBInstance": {"DBInstanceIdentifier": "audit-dr"}},
        {"DBInstanceIdentifier": "audit-dr", "BackupRetentionPeriod": 7})
    with pytest.raises(StubAssertionError, match="BackupRetentionPeriod"):
        await platform.promote_database("dr")
    west.stubs["rds"].deactivate()
    west.stubs.clear()  # the unused answer is this test's point, not a leftover


def test_the_rds_model_refuses_a_parameter_name_it_does_not_define() -> None:
    """A stubbed client is no accept-anything double: a misspelt parameter never reaches
    the queued answer."""
    from botocore.exceptions import ParamValidationError

    with stubbed("rds") as (client, stub):
        stub.add_response("promote_read_replica", {})
        with pytest.raises(ParamValidationError, match="BackupRetention"):
            client.promote_read_replica(DBInstanceIdentifier="audit-dr", BackupRetention=35)
        client.promote_read_replica(DBInstanceIdentifier="audit-dr", BackupRetentionPeriod=35)


async def test_fence_sends_a_stop_the_rds_model_accepts_for_the_old_primary(
    stubbed_dr: tuple[AwsKubernetesPlatform, StubbedClients, StubbedClients],
) -> None:
    platform, east, _ = stubbed_dr
    east["rds"].add_response("stop_db_instance",
                             {"DBInstance": {"DBInstanceIdentifier": "audit-prod"}},
                             {"DBInstanceIdentifier": "audit-prod"})
    assert await platform.fence("prod") == "rds.stop_db_instance(audit-prod)"


async def test_rebuild_replica_sends_its_own_request_through_the_rds_model(
    stubbed_dr: tuple[AwsKubernetesPlatform, StubbedClients, StubbedClients],
) -> None:
    """rebuild_replica end to end (describe the primary in its region, create the replica
    in the target's, wait): each request as the code builds it, checked by the model."""
    from botocore.stub import ANY

    platform, east, west = stubbed_dr
    west["rds"].add_response("describe_db_instances", {"DBInstances": [{
        "DBInstanceIdentifier": "audit-dr", "DBInstanceArn": DR_ARN,
        "DBInstanceClass": "db.r6g.xlarge", "MultiAZ": True,
        "IAMDatabaseAuthenticationEnabled": True, "DBInstanceStatus": "available"}]},
        {"DBInstanceIdentifier": "audit-dr"})
    east["rds"].add_response("create_db_instance_read_replica", {"DBInstance": {
        "DBInstanceIdentifier": "audit-prod-rebuilt"}}, {
        "DBInstanceIdentifier": ANY, "SourceDBInstanceIdentifier": DR_ARN,
        "DBInstanceClass": "db.r6g.xlarge",
        "KmsKeyId": "arn:aws:kms:us-east-1:111122223333:key/prod-db",
        "DBSubnetGroupName": "audit-prod-db", "VpcSecurityGroupIds": ["sg-0prod"],
        "DBParameterGroupName": "audit-prod-params", "MultiAZ": True, "StorageType": "gp3",
        "PubliclyAccessible": False, "EnableIAMDatabaseAuthentication": True,
        "CopyTagsToSnapshot": True, "SourceRegion": "us-west-2"})
    east["rds"].add_response("describe_db_instances", _available("audit-prod-rebuilt"),
                             {"DBInstanceIdentifier": ANY})
    detail = await platform.rebuild_replica("prod")
    assert detail.startswith("read replica audit-prod-rebuilt-") and "of audit-dr" in detail


async def test_the_public_key_request_names_the_sites_signing_key(
    stubbed_dr: tuple[AwsKubernetesPlatform, StubbedClients, StubbedClients],
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    platform, east, _ = stubbed_dr
    der = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    east["kms"].add_response("get_public_key", {"KeyId": "alias/audit-sth", "PublicKey": der},
                             {"KeyId": "alias/audit-sth"})
    pem = await platform.public_key_pem("prod")
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")

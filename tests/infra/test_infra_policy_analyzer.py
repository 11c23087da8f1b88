"""The HIPAA policy pack through pulumi-policy's own analyzer (`analyzer.py`).

The engine does not call the validate functions with dicts: it sends protobuf requests that
the pack's ``_PolicyAnalyzerServicer`` decodes into ``unknown_checking_proxy`` objects. Each
test here goes through that path, with the servicer that ``infra/policy/__main__.py``'s real
`PolicyPack` builds:

- every resource and the stack of dev, staging, prod and dr pass every policy;
- every policy in `hipaa.POLICIES` rejects its failing examples (`FAILING`);
- compliant resources whose nested values are proxies pass (the accessors once took only
  list / dict, so these failed and open security groups passed);
- the pack starts as ``pulumi preview --policy-pack infra/policy`` starts it.
"""

from __future__ import annotations

import copy
import selectors
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import analyzer
import grpc
import pytest
import stackkit
import yaml
from analyzer import Diagnostic, analyze_resource, analyze_stack_of
from google.protobuf import empty_pb2
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc
from pulumi_policy.proxy import UNKNOWN_STRING_VALUE
from stackkit import STACKS

from infra.policy import hipaa

ACCOUNT = "111122223333"
CMK = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/0c1d2e3f-aaaa-bbbb-cccc-000000000001"
PROD = {"environment": "prod"}

GOOD_DB: dict[str, Any] = {
    "storageEncrypted": True, "kmsKeyId": CMK, "publiclyAccessible": False,
    "parameterGroupName": "database-params-1", "backupRetentionPeriod": 35,
    "deletionProtection": True, "skipFinalSnapshot": False,
    "finalSnapshotIdentifier": "audit-kit-prod-final", "tags": PROD,
}
GOOD_REDIS: dict[str, Any] = {
    "atRestEncryptionEnabled": True, "kmsKeyId": CMK, "transitEncryptionEnabled": True,
    "transitEncryptionMode": "required", "subnetGroupName": "cache-subnets",
    "securityGroupIds": ["sg-0123"], "tags": PROD,
}
SSE_KMS: dict[str, Any] = {"bucket": "b1", "rules": [{"applyServerSideEncryptionByDefault": {
    "sseAlgorithm": "aws:kms", "kmsMasterKeyId": CMK}, "bucketKeyEnabled": True}]}
EKS_ENCRYPTED: dict[str, Any] = {"encryptionConfig": {"provider": {"keyArn": CMK},
                                                      "resources": ["secrets"]}}
FORCE_SSL_GROUP: dict[str, Any] = {"family": "postgres16", "parameters": [
    {"name": "rds.force_ssl", "value": "1", "applyMethod": "pending-reboot"},
    {"name": "shared_preload_libraries", "value": "pgaudit,pg_stat_statements"},
    {"name": "pgaudit.log", "value": "ddl,role,write,misc_set"},
    {"name": "pgaudit.log_parameter", "value": "0"},
]}


def with_(base: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# --- The failing examples: one table, keyed by policy name -----------------------------------


@dataclass(frozen=True)
class Bad:
    """A resource that the named policy must reject; `expect` is in one of its messages."""

    type_: str
    props: Mapping[str, Any]
    expect: str = ""
    protect: bool = False

    def run(self) -> list[Diagnostic]:
        found: list[Diagnostic] = analyze_resource(self.type_, self.props,
                                                   protect=self.protect)
        return found


@dataclass(frozen=True)
class BadStack:
    """A stack (resources and outputs) that the named stack policy must reject."""

    resources: list[tuple[str, Mapping[str, Any]]]
    outputs: Mapping[str, Any] = field(default_factory=dict)
    expect: str = ""

    def run(self) -> list[Diagnostic]:
        found: list[Diagnostic] = analyze_stack_of(self.resources, self.outputs)
        return found


ALIAS_ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:alias/aws/"
ARCHIVE_TAGS = {"purpose": "audit-archive", "environment": "prod"}

FAILING: dict[str, list[Bad | BadStack]] = {
    # To extend: add the new policy's name with at least one failing example.
    "cmk-encryption-at-rest": [
        Bad(hipaa.RDS_INSTANCE, with_(GOOD_DB, kmsKeyId=None), "kmsKeyId must name"),
        Bad(hipaa.RDS_INSTANCE, with_(GOOD_DB, kmsKeyId="alias/aws/rds"), "AWS-managed"),
        Bad(hipaa.RDS_INSTANCE, with_(GOOD_DB, performanceInsightsEnabled=True,
                                      performanceInsightsKmsKeyId=ALIAS_ARN + "rds"),
            "performanceInsightsKmsKeyId is"),
        Bad(hipaa.REDIS_GROUP, with_(GOOD_REDIS, kmsKeyId=ALIAS_ARN + "elasticache"),
            "AWS-managed"),
        Bad(hipaa.S3_SSE[0], {"rules": [{"applyServerSideEncryptionByDefault": {
            "sseAlgorithm": "AES256"}}]}, "aws:kms"),
        Bad(hipaa.S3_SSE[0], {"rules": [{"applyServerSideEncryptionByDefault": {
            "sseAlgorithm": "aws:kms", "kmsMasterKeyId": "alias/aws/s3"}}]},
            "rules[0].applyServerSideEncryptionByDefault.kmsMasterKeyId is 'alias/aws/s3'"),
        Bad(hipaa.EKS_CLUSTER, {"encryptionConfig": {"provider": {"keyArn": CMK},
                                                     "resources": ["configmaps"]}},
            "encryptionConfig"),
        Bad(hipaa.EKS_CLUSTER, {"encryptionConfig": {
            "provider": {"keyArn": ALIAS_ARN + "eks"}, "resources": ["secrets"]}},
            "encryptionConfig.provider.keyArn is"),
        Bad(hipaa.SECRET, {"kmsKeyId": "alias/aws/secretsmanager"}, "AWS-managed"),
        Bad("aws:s3/bucketReplicationConfig:BucketReplicationConfig", {"rules": [{
            "destination": {"encryptionConfiguration": {
                "replicaKmsKeyId": "arn:aws-us-gov:kms:us-gov-west-1:1:alias/aws/s3"}}}]},
            "replicaKmsKeyId is"),
        Bad("aws:cloudwatch/logGroup:LogGroup", {"kmsKeyId": "alias/aws/logs"}, "AWS-managed"),
    ],
    "kms-symmetric-key-rotation": [
        Bad(hipaa.KMS_KEY, {"enableKeyRotation": False}, "enableKeyRotation"),
        Bad(hipaa.KMS_KEY, {"keyUsage": "ENCRYPT_DECRYPT"}, "enableKeyRotation"),
    ],
    "no-public-data-stores": [
        Bad(hipaa.RDS_INSTANCE, with_(GOOD_DB, publiclyAccessible=True), "publiclyAccessible"),
        Bad(hipaa.SECURITY_GROUP, {"ingress": [
            {"fromPort": 443, "toPort": 443, "protocol": "tcp", "securityGroups": ["sg-1"]},
            {"fromPort": 5432, "toPort": 5432, "protocol": "tcp",
             "cidrBlocks": ["10.0.0.0/8", "0.0.0.0/0"]}]}, "0.0.0.0/0"),
        Bad(hipaa.SECURITY_GROUP, {"ingress": [{"fromPort": 6379, "toPort": 6379,
                                                "protocol": "tcp",
                                                "ipv6CidrBlocks": ["::/0"]}]}, "::/0"),
        Bad(hipaa.INGRESS_RULES[0], {"cidrIpv4": "0.0.0.0/0", "fromPort": 5432,
                                     "toPort": 5432, "ipProtocol": "tcp"}, "0.0.0.0/0"),
        Bad(hipaa.INGRESS_RULES[0], {"cidrIpv6": "::/0", "ipProtocol": "-1"}, "::/0"),
        Bad(hipaa.REDIS_GROUP, with_(GOOD_REDIS, securityGroupIds=[]), "securityGroupIds"),
        Bad(hipaa.REDIS_GROUP, with_(GOOD_REDIS, securityGroupIds=None), "securityGroupIds"),
        Bad(hipaa.S3_PUBLIC_ACCESS, {"blockPublicAcls": True, "blockPublicPolicy": False,
                                     "ignorePublicAcls": True, "restrictPublicBuckets": True},
            "blockPublicPolicy"),
    ],
    "tls-in-transit": [
        Bad(hipaa.RDS_PARAMETER_GROUP, with_(FORCE_SSL_GROUP, parameters=[
            {"name": "rds.force_ssl", "value": "0"}]), "rds.force_ssl"),
        Bad(hipaa.REDIS_GROUP, with_(GOOD_REDIS, transitEncryptionEnabled=False),
            "transitEncryptionEnabled"),
        Bad(hipaa.S3_POLICY, {"policy": {"Statement": [{"Effect": "Deny", "Action": ["s3:Get*"],
                                                        "Condition": {"Bool": {
                                                            "aws:SecureTransport": "false"}}}]}},
            "aws:SecureTransport"),
    ],
    "database-audit-logging": [
        Bad(hipaa.RDS_PARAMETER_GROUP, with_(FORCE_SSL_GROUP, parameters=[
            {"name": "rds.force_ssl", "value": "1"}]), "pgaudit"),
    ],
    "backup-retention": [
        Bad(hipaa.RDS_INSTANCE, with_(GOOD_DB, backupRetentionPeriod=7), ">= 35 in prod"),
    ],
    "deletion-protection": [
        Bad(hipaa.RDS_INSTANCE, GOOD_DB, "protect=True", protect=False),
        Bad(hipaa.RDS_INSTANCE, with_(GOOD_DB, deletionProtection=False), "deletionProtection",
            protect=True),
    ],
    "archive-object-lock": [
        Bad(hipaa.S3_BUCKET, {"tags": ARCHIVE_TAGS}, "objectLockEnabled"),
        Bad(hipaa.S3_LOCK[0], {"rule": {"defaultRetention": {"mode": "GOVERNANCE",
                                                             "years": 6}}}),
    ],
    "containers-run-as-non-root": [
        Bad(hipaa.NAMESPACE, {"metadata": {"labels": {}}}, "restricted"),
        Bad("kubernetes:apps/v1:Deployment", {"spec": {"template": {"spec": {
            "containers": [{"name": "worker", "securityContext": {"runAsUser": 0}}]}}}},
            "'worker'"),
        # Nested lists in Helm values arrive as proxies too.
        Bad(hipaa.HELM_RELEASES[0], {"values": {"extraContainers": [
            {"name": "sidecar", "securityContext": {"privileged": True}}]}},
            "extraContainers[0].securityContext.privileged=True"),
    ],
    "archive-buckets-fully-protected": [
        BadStack([(hipaa.S3_BUCKET, {"bucket": "b1", "tags": ARCHIVE_TAGS}),
                  (hipaa.S3_SSE[0], SSE_KMS)], expect="a public access block"),
    ],
    "no-plaintext-secret-outputs": [
        BadStack([], {"dbPassword": "hunter2hunter2"}, "named like a credential"),
        # A credential nested in an object output (a proxy once hid it from json.dumps).
        BadStack([], {"endpoints": {"cache": {"url": "rediss://:t0ken-t0ken@redis:6379/0"}}},
                 "a URL with a password"),
    ],
    # Added to the pack after this table was written (HIPAA-control policies).
    "vpc-flow-logs": [
        BadStack([("awsx:ec2:Vpc", {"vpcId": "vpc-0a1b"})], expect="no flow log"),
    ],
    "audit-trail": [
        BadStack([], expect="no CloudTrail trail"),
    ],
    "log-groups-retained-and-encrypted": [
        BadStack([("aws:cloudwatch/logGroup:LogGroup", {"name": "/aws/eks/c/cluster",
                                                         "retentionInDays": 365})],
                 expect="kmsKeyId"),
    ],
    "backups-copied-and-locked": [
        BadStack([(hipaa.RDS_INSTANCE, {"identifier": "db1", "tags": PROD,
                                        "arn": f"arn:aws:rds:us-east-1:{ACCOUNT}:db:db1"})],
                 expect="no AWS Backup plan"),
    ],
}

POLICIES_AT_START = frozenset({
    "cmk-encryption-at-rest", "kms-symmetric-key-rotation", "no-public-data-stores",
    "tls-in-transit", "database-audit-logging", "backup-retention", "deletion-protection",
    "archive-object-lock", "containers-run-as-non-root", "archive-buckets-fully-protected",
    "no-plaintext-secret-outputs",
})
"""The pack when these tests were written: each must keep a failing example. A policy added
later without one is skipped (with a message) rather than failed."""

POLICY_NAMES = [p.name for p in hipaa.POLICIES]


def _examples(name: str) -> list[Bad | BadStack]:
    examples = FAILING.get(name, [])
    if not examples:
        if name in POLICIES_AT_START:
            pytest.fail(f"policy {name!r} has no failing example in FAILING")
        pytest.skip(f"policy {name!r} was added after this table: add a failing example to "
                    "FAILING in tests/infra/test_infra_policy_analyzer.py")
    return examples


def _mandatory(diagnostics: list[Diagnostic]) -> list[str]:
    return [f"{d.policy}: {d.message}" for d in diagnostics if d.mandatory]


# --- The pack's entry point ------------------------------------------------------------------


def test_the_pack_main_builds_a_policy_pack_with_every_policy_mandatory() -> None:
    servicer = analyzer.run_pack_main()
    info = servicer.GetAnalyzerInfo(empty_pb2.Empty(), analyzer.FakeContext())
    assert info.name == "audit-kit-hipaa"
    assert [p.name for p in info.policies] == POLICY_NAMES
    assert {p.enforcementLevel for p in info.policies} == {analyzer.MANDATORY}
    stack_policies = {p.name for p in hipaa.STACK_POLICIES}
    assert {p.name for p in info.policies
            if p.policy_type == analyzer_pb2.POLICY_TYPE_STACK} == stack_policies


def test_the_pack_is_a_python_policy_pack_in_the_repository_virtualenv() -> None:
    spec = yaml.safe_load((analyzer.PACK_DIR / "PulumiPolicy.yaml").read_text())
    assert spec["runtime"]["name"] == "python"
    venv = analyzer.PACK_DIR / spec["runtime"]["options"]["virtualenv"]
    assert (venv / "bin" / "python").exists(), venv
    assert not spec.get("main"), "the pack's program is the directory's __main__.py"


@pytest.fixture(scope="module")
def served_pack() -> Iterator[analyzer_pb2_grpc.AnalyzerStub]:
    """The pack as ``pulumi preview --policy-pack infra/policy`` runs it: ``python -m
    pulumi.policy <engine address> <pack dir>`` in the pack directory, which prints the port
    its gRPC analyzer listens on."""
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "pulumi.policy", "127.0.0.1:1", str(analyzer.PACK_DIR)],
        cwd=analyzer.PACK_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=60):
            pytest.fail("the policy pack printed no port within 60 s")
        port = process.stdout.readline().strip()
        if not port.isdigit():
            process.kill()
            pytest.fail(f"the policy pack did not start: {port!r} {process.communicate()[1]}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield analyzer_pb2_grpc.AnalyzerStub(channel)
    finally:
        process.kill()  # the pack serves until killed, as under the engine
        process.wait(timeout=30)


def test_the_served_pack_over_grpc_lists_every_policy_and_rejects_an_open_group(
        served_pack: analyzer_pb2_grpc.AnalyzerStub) -> None:
    info = served_pack.GetAnalyzerInfo(empty_pb2.Empty(), timeout=30)
    assert [p.name for p in info.policies] == POLICY_NAMES
    open_group = analyzer.analyze_request("unit", analyzer.make_resource(
        hipaa.SECURITY_GROUP, {"ingress": [{"cidrBlocks": ["0.0.0.0/0"], "fromPort": 22,
                                            "toPort": 22, "protocol": "tcp"}]}))
    response = served_pack.Analyze(open_group, timeout=30)
    assert [(d.policyName, d.enforcementLevel) for d in response.diagnostics] == [
        ("no-public-data-stores", analyzer.MANDATORY)]
    encrypted = analyzer.analyze_request("unit", analyzer.make_resource(
        hipaa.EKS_CLUSTER, EKS_ENCRYPTED))
    assert not served_pack.Analyze(encrypted, timeout=30).diagnostics


# --- Every recorded stack passes -------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_every_recorded_resource_passes_every_policy_through_the_analyzer(stack: str) -> None:
    resources = stackkit.resources(stack)
    index = {f"{r['type']}::{r['name']}": r for r in resources}
    failures: list[str] = []
    for resource in resources:
        for d in analyzer.analyze(analyzer.analyze_request(stack, resource, index)):
            # Advisory ones too: with recorded (known) values, "can't run" means a bug.
            failures.append(f"{resource['type']} {resource['name']}: {d.policy} "
                            f"[{'mandatory' if d.mandatory else d.level}] {d.message}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("stack", STACKS)
def test_every_recorded_stack_passes_the_stack_policies_through_the_analyzer(
        stack: str) -> None:
    request = analyzer.recorded_stack_request(stack)
    assert any(r.type == analyzer.STACK for r in request.resources)
    diagnostics = analyzer.analyze_stack(request)
    assert not diagnostics, "\n".join(f"{d.policy}: {d.message}" for d in diagnostics)


# --- Every policy rejects its failing examples -----------------------------------------------


def test_every_policy_at_start_has_a_failing_example() -> None:
    assert set(POLICY_NAMES) >= POLICIES_AT_START
    assert set(FAILING) <= set(POLICY_NAMES), "FAILING names a policy not in the pack"
    assert all(FAILING[name] for name in POLICIES_AT_START)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_each_policy_rejects_its_failing_examples_through_the_analyzer(policy: str) -> None:
    problems: list[str] = []  # every example is run, so one report shows all that passed
    for example in _examples(policy):
        diagnostics = example.run()
        own = [d for d in diagnostics if d.policy == policy and d.mandatory]
        if not own:
            problems.append(f"passed {example}: {diagnostics}")
        elif not any(example.expect in d.message for d in own):
            problems.append(f"on {example}: no message with {example.expect!r} in "
                            f"{[d.message for d in own]}")
    assert not problems, f"{policy}:\n" + "\n".join(problems)


# --- The old bug class: nested values arrive as proxies --------------------------------------


@pytest.mark.parametrize(("type_", "props"), [
    pytest.param(hipaa.RDS_PARAMETER_GROUP, FORCE_SSL_GROUP, id="force-ssl-parameter-group"),
    pytest.param(hipaa.S3_SSE[0], SSE_KMS, id="sse-kms-configuration"),
    pytest.param(hipaa.EKS_CLUSTER, EKS_ENCRYPTED, id="eks-encryption-config"),
    pytest.param(hipaa.SECURITY_GROUP, {"ingress": [
        {"fromPort": 5432, "toPort": 5432, "protocol": "tcp", "cidrBlocks": ["10.20.0.0/16"],
         "ipv6CidrBlocks": []}]}, id="private-security-group"),
    pytest.param(hipaa.REDIS_GROUP, GOOD_REDIS, id="redis-with-security-groups"),
    pytest.param(hipaa.S3_POLICY, {"policy": {"Statement": [{
        "Effect": "Deny", "Action": ["s3:*"], "Principal": "*",
        "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]}},
        id="tls-only-policy-object"),
    pytest.param("kubernetes:apps/v1:Deployment", {"spec": {"template": {"spec": {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
        "containers": [{"name": "worker"}], "initContainers": [{"name": "migrate"}]}}}},
        id="non-root-deployment"),
])
def test_compliant_resources_with_nested_proxies_pass_the_analyzer(
        type_: str, props: dict[str, Any]) -> None:
    diagnostics = analyze_resource(type_, props)
    assert not diagnostics, "\n".join(f"{d.policy}: {d.message}" for d in diagnostics)


def test_the_accessors_take_the_analyzers_proxies() -> None:
    from pulumi_policy.proxy import unknown_checking_proxy

    props = unknown_checking_proxy({"rules": [{"a": {"b": 1}}], "ids": [], "name": "x"})
    assert hipaa._get(props, "rules", "a", "b") == 1
    assert hipaa._list(props["ids"]) == []
    assert len(hipaa._list(props["rules"])) == 1
    assert hipaa._list(props["name"]) == ["x"]  # a str is one value, not a sequence


# --- Unknown values (preview) ----------------------------------------------------------------


def test_an_unknown_elsewhere_does_not_stop_the_aws_managed_key_check() -> None:
    diagnostics = analyze_resource(hipaa.SECRET, {
        "kmsKeyId": "alias/aws/secretsmanager", "name": UNKNOWN_STRING_VALUE,
        "replica": [{"region": UNKNOWN_STRING_VALUE}]})
    assert any(d.policy == "cmk-encryption-at-rest" and d.mandatory
               and "AWS-managed" in d.message for d in diagnostics), diagnostics


def test_an_unknown_key_is_reported_as_unknowable_not_as_a_violation() -> None:
    diagnostics = analyze_resource(hipaa.SECRET, {"kmsKeyId": UNKNOWN_STRING_VALUE})
    assert [(d.policy, d.level) for d in diagnostics] == [
        ("cmk-encryption-at-rest", analyzer.ADVISORY)]
    assert "can't be known during preview" in diagnostics[0].message

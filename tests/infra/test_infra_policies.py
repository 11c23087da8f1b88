"""The HIPAA policy pack: each policy passes a good resource and fails a bad one, and every
resource of every stack (as recorded under mocks) passes every policy.

Only ``infra.policy.hipaa`` is imported: building the `PolicyPack` (in ``__main__.py``) would
start the policy server.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import stackkit
from pulumi_policy import ResourceValidationArgs, StackValidationArgs
from stackkit import STACKS, Violations, make_resource_args, make_stack_args

from infra.archive import tls_only_policy
from infra.policy import hipaa

ResourceCheck = Callable[[ResourceValidationArgs, Violations], None]
StackCheck = Callable[[StackValidationArgs, Violations], None]


def check(validate: ResourceCheck, type_: str, props: dict[str, Any], *,
          protect: bool = False) -> Violations:
    violations = Violations()
    validate(make_resource_args(type_, props, protect=protect), violations)
    return violations


def check_stack(validate: StackCheck, resources: list[tuple[str, dict[str, Any]]]) -> Violations:
    violations = Violations()
    validate(make_stack_args(resources), violations)
    return violations


PROD = {"environment": "prod"}
GOOD_DB: dict[str, Any] = {
    "storageEncrypted": True, "kmsKeyId": "arn:aws:kms:us-east-1:1:key/db",
    "performanceInsightsEnabled": True, "performanceInsightsKmsKeyId": "arn:...:key/db",
    "manageMasterUserPassword": True, "masterUserSecretKmsKeyId": "arn:...:key/secrets",
    "publiclyAccessible": False, "parameterGroupName": "database-params-1",
    "backupRetentionPeriod": 35, "deletionProtection": True, "skipFinalSnapshot": False,
    "finalSnapshotIdentifier": "audit-kit-prod-final", "tags": PROD,
}
GOOD_REDIS: dict[str, Any] = {
    "atRestEncryptionEnabled": True, "kmsKeyId": "arn:...:key/cache",
    "transitEncryptionEnabled": True, "transitEncryptionMode": "required",
    "subnetGroupName": "cache-subnets", "securityGroupIds": ["sg-1"], "tags": PROD,
}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# --- cmk-encryption-at-rest ------------------------------------------------------------------


def test_cmk_encryption_passes_encrypted_stores() -> None:
    v = hipaa.cmk_encryption_at_rest
    assert not check(v, hipaa.RDS_INSTANCE, GOOD_DB)
    assert not check(v, hipaa.REDIS_GROUP, GOOD_REDIS)
    assert not check(v, hipaa.S3_SSE[0], {"rules": [{"applyServerSideEncryptionByDefault": {
        "sseAlgorithm": "aws:kms", "kmsMasterKeyId": "arn:...:key/archive"}}]})
    assert not check(v, hipaa.EKS_CLUSTER, {"encryptionConfig": {
        "provider": {"keyArn": "arn:...:key/secrets"}, "resources": ["secrets"]}})
    assert not check(v, hipaa.SECRET, {"kmsKeyId": "arn:...:key/secrets"})


@pytest.mark.parametrize(("type_", "props", "reason"), [
    (hipaa.RDS_INSTANCE, with_(GOOD_DB, storageEncrypted=False), "storageEncrypted"),
    (hipaa.RDS_INSTANCE, with_(GOOD_DB, kmsKeyId=None), "kmsKeyId"),
    (hipaa.RDS_INSTANCE, with_(GOOD_DB, performanceInsightsKmsKeyId=None),
     "performanceInsightsKmsKeyId"),
    (hipaa.REDIS_GROUP, with_(GOOD_REDIS, kmsKeyId=None), "kmsKeyId"),
    (hipaa.REDIS_GROUP, with_(GOOD_REDIS, atRestEncryptionEnabled=False),
     "atRestEncryptionEnabled"),
    (hipaa.S3_SSE[0], {"rules": [{"applyServerSideEncryptionByDefault": {
        "sseAlgorithm": "AES256"}}]}, "aws:kms"),
    (hipaa.EKS_CLUSTER, {}, "encryptionConfig"),
    (hipaa.SECRET, {"description": "uses aws/secretsmanager"}, "kmsKeyId"),
    (hipaa.SECRET, {"kmsKeyId": "alias/aws/secretsmanager"}, "AWS-managed"),
    (hipaa.REDIS_GROUP, with_(GOOD_REDIS, kmsKeyId="arn:aws:kms:us-east-1:1:alias/aws/elasticache"),
     "AWS-managed"),
])
def test_cmk_encryption_fails_without_a_customer_managed_key(
        type_: str, props: dict[str, Any], reason: str) -> None:
    violations = check(hipaa.cmk_encryption_at_rest, type_, props)
    assert violations and reason in " ".join(violations)


# --- kms-symmetric-key-rotation --------------------------------------------------------------


def test_key_rotation_required_for_symmetric_keys_only() -> None:
    v = hipaa.kms_symmetric_key_rotation
    assert not check(v, hipaa.KMS_KEY, {"enableKeyRotation": True})
    assert not check(v, hipaa.KMS_KEY, {"keyUsage": "SIGN_VERIFY",
                                        "customerMasterKeySpec": "ECC_NIST_P256",
                                        "enableKeyRotation": False})
    assert check(v, hipaa.KMS_KEY, {"enableKeyRotation": False})
    assert check(v, hipaa.KMS_KEY, {"customerMasterKeySpec": "SYMMETRIC_DEFAULT"})


# --- no-public-data-stores -------------------------------------------------------------------


def test_private_data_stores_pass() -> None:
    v = hipaa.no_public_data_stores
    assert not check(v, hipaa.RDS_INSTANCE, GOOD_DB)
    assert not check(v, hipaa.REDIS_GROUP, GOOD_REDIS)
    assert not check(v, hipaa.INGRESS_RULES[0], {"referencedSecurityGroupId": "sg-1",
                                                 "fromPort": 5432, "toPort": 5432})
    assert not check(v, hipaa.S3_PUBLIC_ACCESS, {k: True for k in (
        "blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")})


@pytest.mark.parametrize(("type_", "props", "reason"), [
    (hipaa.RDS_INSTANCE, with_(GOOD_DB, publiclyAccessible=True), "publiclyAccessible"),
    (hipaa.RDS_INSTANCE, with_(GOOD_DB, publiclyAccessible=None), "publiclyAccessible"),
    (hipaa.REDIS_GROUP, with_(GOOD_REDIS, subnetGroupName=None), "subnetGroupName"),
    (hipaa.REDIS_GROUP, with_(GOOD_REDIS, securityGroupIds=[]), "securityGroupIds"),
    (hipaa.INGRESS_RULES[0], {"cidrIpv6": "::/0", "fromPort": 443, "toPort": 443}, "::/0"),
    (hipaa.INGRESS_RULES[0], {"cidrIpv4": "0.0.0.0/0", "fromPort": 5432, "toPort": 5432},
     "0.0.0.0/0"),
    (hipaa.SECURITY_GROUP, {"ingress": [{"cidrBlocks": ["0.0.0.0/0"], "fromPort": 6379,
                                         "toPort": 6379}]}, "0.0.0.0/0"),
    (hipaa.S3_PUBLIC_ACCESS, {"blockPublicAcls": True, "blockPublicPolicy": False,
                              "ignorePublicAcls": True, "restrictPublicBuckets": True},
     "blockPublicPolicy"),
])
def test_public_data_stores_fail(type_: str, props: dict[str, Any], reason: str) -> None:
    violations = check(hipaa.no_public_data_stores, type_, props)
    assert violations and reason in " ".join(violations)


# --- tls-in-transit --------------------------------------------------------------------------


def test_tls_everywhere_passes() -> None:
    v = hipaa.tls_in_transit
    assert not check(v, hipaa.RDS_PARAMETER_GROUP, {"family": "postgres16", "parameters": [
        {"name": "rds.force_ssl", "value": "1"}]})
    assert not check(v, hipaa.RDS_INSTANCE, GOOD_DB)
    assert not check(v, hipaa.REDIS_GROUP, GOOD_REDIS)
    assert not check(v, hipaa.S3_POLICY, {"policy": json.dumps(
        tls_only_policy("arn:aws:s3:::b"))})


@pytest.mark.parametrize(("type_", "props", "reason"), [
    (hipaa.RDS_PARAMETER_GROUP, {"family": "postgres16", "parameters": [
        {"name": "rds.force_ssl", "value": "0"}]}, "rds.force_ssl"),
    (hipaa.RDS_INSTANCE, with_(GOOD_DB, parameterGroupName="default.postgres16"),
     "parameterGroupName"),
    (hipaa.REDIS_GROUP, with_(GOOD_REDIS, transitEncryptionEnabled=False),
     "transitEncryptionEnabled"),
    (hipaa.REDIS_GROUP, with_(GOOD_REDIS, transitEncryptionMode="preferred"),
     "transitEncryptionMode"),
    (hipaa.S3_POLICY, {"policy": json.dumps({"Statement": [{"Effect": "Allow",
                                                           "Action": "s3:GetObject"}]})},
     "aws:SecureTransport"),
])
def test_plaintext_transport_fails(type_: str, props: dict[str, Any], reason: str) -> None:
    violations = check(hipaa.tls_in_transit, type_, props)
    assert violations and reason in " ".join(violations)


# --- database-audit-logging ------------------------------------------------------------------


def _postgres_group(**parameters: str) -> dict[str, Any]:
    values = {"shared_preload_libraries": "pgaudit,pg_stat_statements",
              "pgaudit.log": "ddl,role,write,misc_set", "pgaudit.log_parameter": "0",
              **parameters}
    return {"family": "postgres16", "parameters": [
        {"name": name, "value": value} for name, value in values.items()]}


@pytest.mark.parametrize("logged", ["ddl,role,write,misc_set", "DDL, ROLE, WRITE, MISC",
                                    "all", "all,-read,-function"])
def test_database_audit_logging_passes_pgaudit_recording_the_ways_past_the_triggers(
        logged: str) -> None:
    assert not check(hipaa.database_audit_logging, hipaa.RDS_PARAMETER_GROUP,
                     _postgres_group(**{"pgaudit.log": logged}))


@pytest.mark.parametrize(("parameters", "reason"), [
    ({"shared_preload_libraries": "pg_stat_statements"}, "must include pgaudit"),
    ({"pgaudit.log": "ddl,role"}, "must record write, misc_set (it is 'ddl,role'"),
    ({"pgaudit.log": "all,-write"}, "must record write"),
    ({"pgaudit.log": "ddl,role,write,misc,-misc"}, "must record misc_set"),
    ({"pgaudit.log_parameter": "1"}, "pgaudit.log_parameter must be 0"),
])
def test_database_audit_logging_fails_a_group_that_would_miss_an_insider(
        parameters: dict[str, str], reason: str) -> None:
    violations = check(hipaa.database_audit_logging, hipaa.RDS_PARAMETER_GROUP,
                       _postgres_group(**parameters))
    assert violations and reason in " ".join(violations)


def test_database_audit_logging_ignores_other_engines() -> None:
    assert not check(hipaa.database_audit_logging, hipaa.RDS_PARAMETER_GROUP,
                     {"family": "mysql8.0", "parameters": []})


# --- backup-retention ------------------------------------------------------------------------


def test_backup_retention_by_environment() -> None:
    v = hipaa.backup_retention
    assert not check(v, hipaa.RDS_INSTANCE, GOOD_DB)
    assert not check(v, hipaa.RDS_INSTANCE, with_(GOOD_DB, backupRetentionPeriod=7,
                                                  tags={"environment": "dev"}))
    prod_short = check(v, hipaa.RDS_INSTANCE, with_(GOOD_DB, backupRetentionPeriod=14))
    assert prod_short == ["aws:rds/instance:Instance 'example': backupRetentionPeriod is 14 days,"
                          " must be >= 35 in prod"]
    assert check(v, hipaa.RDS_INSTANCE, with_(GOOD_DB, backupRetentionPeriod=3,
                                              tags={"environment": "staging"}))
    untagged = check(v, hipaa.RDS_INSTANCE, with_(GOOD_DB, tags=None))
    assert untagged and "environment" in untagged[0]


# --- deletion-protection ---------------------------------------------------------------------


def test_deletion_protection_in_prod_and_dr() -> None:
    v = hipaa.deletion_protection
    assert not check(v, hipaa.RDS_INSTANCE, GOOD_DB, protect=True)
    assert not check(v, hipaa.RDS_INSTANCE, with_(GOOD_DB, deletionProtection=False,
                                                  tags={"environment": "dev"}))
    unprotected = check(v, hipaa.RDS_INSTANCE, GOOD_DB, protect=False)
    assert unprotected and "protect=True" in unprotected[0]
    dr = check(v, hipaa.RDS_INSTANCE, with_(GOOD_DB, deletionProtection=False,
                                            skipFinalSnapshot=True,
                                            tags={"environment": "dr"}), protect=True)
    assert len(dr) == 2 and "deletionProtection" in dr[0] and "skipFinalSnapshot" in dr[1]


# --- archive-object-lock ---------------------------------------------------------------------


def test_archive_object_lock_compliance_six_years() -> None:
    v = hipaa.archive_object_lock
    lock = hipaa.S3_LOCK[0]
    assert not check(v, lock, {"rule": {"defaultRetention": {"mode": "COMPLIANCE", "years": 6}}})
    assert not check(v, lock, {"rule": {"defaultRetention": {"mode": "COMPLIANCE",
                                                             "days": 2190}}})
    assert not check(v, hipaa.S3_BUCKET, {"objectLockEnabled": True,
                                          "tags": {"purpose": "audit-archive"}})
    governance = check(v, lock, {"rule": {"defaultRetention": {"mode": "GOVERNANCE",
                                                               "years": 6}}})
    assert governance and "COMPLIANCE" in governance[0]
    short = check(v, lock, {"rule": {"defaultRetention": {"mode": "COMPLIANCE", "years": 5}}})
    assert short and ">= 6 years" in short[0]
    unlocked = check(v, hipaa.S3_BUCKET, {"tags": {"purpose": "audit-archive"}})
    assert unlocked and "objectLockEnabled" in unlocked[0]


# --- containers-run-as-non-root --------------------------------------------------------------

POD_SPEC = {"securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
            "containers": [{"name": "worker", "image": "audit-worker:1"}]}


def test_non_root_workloads_pass() -> None:
    v = hipaa.containers_run_as_non_root
    assert not check(v, hipaa.NAMESPACE, {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted"}}})
    assert not check(v, "kubernetes:apps/v1:Deployment",
                     {"spec": {"template": {"spec": POD_SPEC}}})
    assert not check(v, hipaa.HELM_RELEASES[0], {"values": {"slots": {"blue": {"tag": "1"}}}})


@pytest.mark.parametrize(("type_", "props", "reason"), [
    (hipaa.NAMESPACE, {"metadata": {"labels": {}}}, "restricted"),
    ("kubernetes:apps/v1:Deployment", {"spec": {"template": {"spec": {
        "containers": [{"name": "worker"}]}}}}, "runAsNonRoot"),
    ("kubernetes:batch/v1:Job", {"spec": {"template": {"spec": {
        **POD_SPEC, "containers": [{"name": "migrate",
                                    "securityContext": {"runAsUser": 0}}]}}}}, "migrate"),
    (hipaa.HELM_RELEASES[0], {"values": {"podSecurityContext": {"runAsNonRoot": False}}},
     "podSecurityContext.runAsNonRoot=False"),
    (hipaa.HELM_RELEASES[0], {"values": {"securityContext": {"runAsUser": 0}}},
     "securityContext.runAsUser=0"),
])
def test_root_containers_fail(type_: str, props: dict[str, Any], reason: str) -> None:
    violations = check(hipaa.containers_run_as_non_root, type_, props)
    assert violations and reason in " ".join(violations)


# --- Stack policies --------------------------------------------------------------------------

ARCHIVE_TAGS = {"purpose": "audit-archive", "environment": "prod"}
FULL_BUCKET: list[tuple[str, dict[str, Any]]] = [
    (hipaa.S3_BUCKET, {"bucket": "b1", "tags": ARCHIVE_TAGS}),
    (hipaa.S3_SSE[0], {"bucket": "b1"}),
    (hipaa.S3_PUBLIC_ACCESS, {"bucket": "b1"}),
    (hipaa.S3_POLICY, {"bucket": "b1"}),
    (hipaa.S3_LOCK[0], {"bucket": "b1"}),
]


def test_archive_buckets_fully_protected() -> None:
    v = hipaa.archive_buckets_fully_protected
    assert not check_stack(v, FULL_BUCKET)
    missing = check_stack(v, [r for r in FULL_BUCKET if r[0] != hipaa.S3_POLICY])
    assert missing == ["archive bucket 'b1' has no a TLS-only bucket policy"]


def test_no_plaintext_secret_outputs() -> None:
    v = hipaa.no_plaintext_secret_outputs
    assert not check_stack(v, [(hipaa.STACK, {
        "dbWorkerSecretArn": "arn:aws:secretsmanager:us-east-1:1:secret:x",
        "redisAuthSecretArn": "arn:aws:secretsmanager:us-east-1:1:secret:y",
        "dbEndpoint": "db.example:5432", "kubeconfigSecretName": "platform/kubeconfig",
    })])
    for name, value, reason in [
        ("dbPassword", "hunter2hunter2", "named like a credential"),
        ("redisUrl", "rediss://:t0ken-t0ken@redis:6379/0", "a URL with a password"),
        ("connection", "postgresql://u:p4ssw0rd@db:5432/audit", "a URL with a password"),
        ("signer", "-----BEGIN EC PRIVATE KEY-----\nMHc...", "a private key"),
        ("kubeconfig", json.dumps({"users": [{"user": {"token": "eyJhbGciOiJSUzI1"}}]}),
         "a credential field"),
    ]:
        violations = check_stack(v, [(hipaa.STACK, {name: value})])
        assert violations and reason in " ".join(violations), name


def test_policies_are_plain_objects_with_unique_names() -> None:
    names = [p.name for p in hipaa.POLICIES]
    assert len(names) == len(set(names)) == 15
    assert all(p.description for p in hipaa.POLICIES)


# --- Every recorded resource of every stack passes -------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_every_resource_passes_the_resource_policies(stack: str) -> None:
    failures: list[str] = []
    for resource in stackkit.resources(stack):
        args = stackkit.resource_args(stack, resource)
        for policy in hipaa.RESOURCE_POLICIES:
            violations = Violations()
            policy.validate(args, violations)
            failures += [f"{policy.name}: {m}" for m in violations]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("stack", STACKS)
def test_the_stack_passes_the_stack_policies(stack: str) -> None:
    failures: list[str] = []
    for policy in hipaa.STACK_POLICIES:
        violations = Violations()
        policy.validate(stackkit.stack_args(stack), violations)
        failures += [f"{policy.name}: {m}" for m in violations]
    assert not failures, "\n".join(failures)


def test_policies_catch_a_weakened_prod_database() -> None:
    db = copy.deepcopy(stackkit.one("prod", stackkit.DB))
    db["inputs"].update(backupRetentionPeriod=7, deletionProtection=False,
                        publiclyAccessible=True)
    db["protect"] = False
    args = stackkit.resource_args("prod", db)
    messages: list[str] = []
    for policy in hipaa.RESOURCE_POLICIES:
        violations = Violations()
        policy.validate(args, violations)
        messages += violations
    text = "\n".join(messages)
    for expected in ("must be >= 35 in prod", "deletionProtection must be true",
                     "publiclyAccessible must be false", "protect=True"):
        assert expected in text


def test_stack_policy_sees_the_recorded_buckets() -> None:
    args = stackkit.stack_args("prod")
    args.resources = [r for r in args.resources if r.name != "archive-bucket-encryption"]
    violations = Violations()
    hipaa.archive_buckets_fully_protected(args, violations)
    assert len(violations) == 1 and "has no SSE-KMS encryption" in violations[0]


def test_the_pack_entry_point_builds_the_pack_from_every_policy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``infra/policy/__main__.py`` as Pulumi would, with `PolicyPack` replaced by a fake
    (the real one starts the analyzer server)."""
    import runpy
    import sys

    import pulumi_policy

    built: dict[str, Any] = {}
    monkeypatch.setattr(pulumi_policy, "PolicyPack", lambda **kwargs: built.update(kwargs))
    pack_dir = stackkit.ROOT / "infra" / "policy"
    monkeypatch.syspath_prepend(str(pack_dir))
    monkeypatch.delitem(sys.modules, "hipaa", raising=False)
    runpy.run_path(str(pack_dir), run_name="__main__")
    assert built["name"] == "audit-kit-hipaa"
    assert built["enforcement_level"] == pulumi_policy.EnforcementLevel.MANDATORY
    assert [p.name for p in built["policies"]] == [p.name for p in hipaa.POLICIES]

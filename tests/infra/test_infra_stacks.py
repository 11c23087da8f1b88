"""The Pulumi program under mocks, per stack: what it declares, how it is wired, what it exports.

Each stack runs once, in its own subprocess (see ``conftest.py`` and ``stackkit.py``); the
tests read the recorded resources and outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import stackkit
import yaml
from stackkit import (
    CACHE,
    DB,
    EKS,
    HEALTH_CHECK,
    KEY,
    PROD_OUTPUTS,
    RECORD,
    RELEASE,
    REPLICA_KEY,
    SECRET,
    SECRET_VERSION,
    STACK_REFERENCE,
    STACKS,
    by_name,
    one,
    resources,
    summary,
)

from infra.dr import PRIMARY_OUTPUTS


def key_arn(stack: str, purpose: str) -> str:
    """The ARN of the stack's key for a purpose (a replica key in DR)."""
    name = f"keys-{purpose}-replica" if stack == "dr" else f"keys-{purpose}"
    return str(by_name(stack, name)["outputs"]["arn"])


def output(stack: str, name: str) -> Any:
    return summary(stack)["outputs"][name]["value"]


# --- Evaluation ----------------------------------------------------------------------------


def test_the_four_stacks_evaluate_in_well_under_a_minute() -> None:
    stackkit.evaluate_all()
    wall = stackkit.EVALUATION["wall_seconds"]
    print(f"\n4 stacks under mocks: {wall} s wall clock (parallel subprocesses); "
          f"program time per stack: {stackkit.EVALUATION['program_seconds']}")
    assert wall < 60


@pytest.mark.parametrize("stack", STACKS)
def test_stack_declares_its_layers_as_components(stack: str) -> None:
    components = {r["type"] for r in resources(stack) if r["type"].startswith("audit:infra:")}
    expected = {"audit:infra:Keys", "audit:infra:Network", "audit:infra:Database",
                "audit:infra:Cache", "audit:infra:Cluster", "audit:infra:Workload"}
    expected |= {"audit:infra:Failover"} if stack == "dr" else {"audit:infra:Archive"}
    assert components == expected


@pytest.mark.parametrize("stack", STACKS)
def test_every_resource_is_a_named_child_of_a_component(stack: str) -> None:
    for r in resources(stack):
        if r["type"].startswith("audit:infra:") or r["type"] == STACK_REFERENCE:
            assert r["parent"] is None, r["name"]
            continue
        assert r["parent"] and r["parent"].startswith("audit:infra:"), (r["type"], r["name"])
        component = r["parent"].split("::", 1)[1]
        assert r["name"].startswith(f"{component}-"), (r["type"], r["name"])


UNTAGGABLE = {
    "aws:kms/alias:Alias", "aws:iam/rolePolicy:RolePolicy",
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment",
    "aws:secretsmanager/secretVersion:SecretVersion", "aws:route53/record:Record",
    "aws:s3/bucketOwnershipControls:BucketOwnershipControls",
    "aws:s3/bucketVersioning:BucketVersioning",
    "aws:s3/bucketObjectLockConfiguration:BucketObjectLockConfiguration",
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
    "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", "aws:s3/bucketPolicy:BucketPolicy",
    "aws:s3/bucketReplicationConfig:BucketReplicationConfig",
}


@pytest.mark.parametrize("stack", STACKS)
def test_every_aws_resource_is_tagged_with_its_environment(stack: str) -> None:
    for r in resources(stack):
        if not r["type"].startswith(("aws:", "awsx:")) or r["type"] in UNTAGGABLE:
            continue
        tags = r["inputs"].get("tags") or {}
        assert tags.get("environment") == stack, (r["type"], r["name"], tags)


# --- The environment matrix ----------------------------------------------------------------


def test_prod_database_is_multi_az_protected_with_35_day_backups() -> None:
    db = one("prod", DB)
    i = db["inputs"]
    assert i["multiAz"] is True
    assert i["deletionProtection"] is True
    assert db["protect"] is True
    assert i["backupRetentionPeriod"] == 35
    assert i["skipFinalSnapshot"] is False
    assert i["finalSnapshotIdentifier"] == "audit-kit-prod-final"
    assert output("prod", "dbProtected") is True


def test_dev_database_is_single_az_and_not_protected() -> None:
    db = one("dev", DB)
    i = db["inputs"]
    assert i["multiAz"] is False
    assert i["deletionProtection"] is False
    assert db["protect"] is False
    assert i["skipFinalSnapshot"] is True and "finalSnapshotIdentifier" not in i
    assert i["backupRetentionPeriod"] == 7


@pytest.mark.parametrize("stack", STACKS)
def test_database_is_private_encrypted_and_never_holds_a_password(stack: str) -> None:
    i = one(stack, DB)["inputs"]
    assert i["publiclyAccessible"] is False
    assert i["storageEncrypted"] is True
    assert i["copyTagsToSnapshot"] is True
    assert "password" not in i
    if stack != "dr":
        assert i["manageMasterUserPassword"] is True
        assert i["masterUserSecretKmsKeyId"] == key_arn(stack, "secrets")


@pytest.mark.parametrize("stack", STACKS)
def test_parameter_group_forces_tls_and_loads_pgaudit(stack: str) -> None:
    group = one(stack, "aws:rds/parameterGroup:ParameterGroup")
    params = {p["name"]: p["value"] for p in group["inputs"]["parameters"]}
    assert params["rds.force_ssl"] == "1"
    assert "pgaudit" in params["shared_preload_libraries"].split(",")
    # DDL (DISABLE TRIGGER, DETACH, DROP), grants, writes (TRUNCATE) and SET
    # (session_replication_role): everything that gets past the append-only triggers.
    assert params["pgaudit.log"] == "ddl,role,write,misc_set"
    assert params["pgaudit.log_parameter"] == "0"  # never statement parameters (PHI) in logs
    assert one(stack, DB)["inputs"]["parameterGroupName"] == group["outputs"]["name"]


@pytest.mark.parametrize(("stack", "multi_az", "clusters"),
                         [("dev", False, 1), ("staging", True, 2), ("prod", True, 3),
                          ("dr", True, 3)])
def test_cache_failover_follows_the_settings(stack: str, multi_az: bool, clusters: int) -> None:
    i = one(stack, CACHE)["inputs"]
    assert i["multiAzEnabled"] is multi_az
    assert i["automaticFailoverEnabled"] is multi_az
    assert i["numCacheClusters"] == clusters
    assert i["atRestEncryptionEnabled"] is True
    assert i["transitEncryptionEnabled"] is True


@pytest.mark.parametrize(("stack", "strategy"), [("dev", "Single"), ("prod", "OnePerAz"),
                                                 ("dr", "OnePerAz")])
def test_nat_gateways_single_in_dev_one_per_az_in_prod(stack: str, strategy: str) -> None:
    assert one(stack, "awsx:ec2:Vpc")["inputs"]["natGateways"] == {"strategy": strategy}


def test_staging_uses_the_existing_vpc_and_cluster() -> None:
    assert resources("staging", "awsx:ec2:Vpc") == []
    assert resources("staging", EKS) == []
    tokens = [c["token"] for c in summary("staging")["calls"]]
    assert "aws:ec2/getVpc:getVpc" in tokens
    assert "aws:eks/getCluster:getCluster" in tokens
    assert "aws:secretsmanager/getSecretVersion:getSecretVersion" in tokens
    assert output("staging", "kubeconfigSecretName") == "platform/nonprod-platform/kubeconfig"
    assert "kubeconfig" not in summary("staging")["outputs"]
    # The database and cache admit the existing cluster's node security group.
    rule = by_name("staging", "network-db-from-worker")["inputs"]
    assert rule["referencedSecurityGroupId"].startswith("sg-")
    assert output("staging", "privateSubnetIds") == [
        "subnet-0a1b2c3d4e5f60711", "subnet-0a1b2c3d4e5f60722", "subnet-0a1b2c3d4e5f60733"]


@pytest.mark.parametrize("stack", ["prod", "dr"])
def test_hardened_keys_and_archive_are_protected(stack: str) -> None:
    key_type = REPLICA_KEY if stack == "dr" else KEY
    assert all(k["protect"] for k in resources(stack, key_type))
    assert all(b["protect"] for b in resources(stack, "aws:s3/bucket:Bucket"))


def test_prod_keys_are_multi_region_and_the_signing_key_does_not_rotate() -> None:
    keys = {k["name"]: k["inputs"] for k in resources("prod", KEY)}
    assert all(k["multiRegion"] is True for k in keys.values())
    signing = keys["keys-signing"]
    assert signing["customerMasterKeySpec"] == "ECC_NIST_P256"
    assert signing["keyUsage"] == "SIGN_VERIFY"
    assert signing["enableKeyRotation"] is False
    for purpose in ("database", "cache", "secrets", "data", "archive"):
        assert keys[f"keys-{purpose}"]["enableKeyRotation"] is True
        assert keys[f"keys-{purpose}"]["customerMasterKeySpec"] == "SYMMETRIC_DEFAULT"


# --- Wiring --------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_database_uses_the_database_key(stack: str) -> None:
    i = one(stack, DB)["inputs"]
    assert i["kmsKeyId"] == key_arn(stack, "database")
    if i["performanceInsightsEnabled"]:
        assert i["performanceInsightsKmsKeyId"] == key_arn(stack, "database")
    else:
        assert stack == "dev" and "performanceInsightsKmsKeyId" not in i


@pytest.mark.parametrize("stack", STACKS)
def test_cache_uses_the_cache_key_and_its_token_secret_the_secrets_key(stack: str) -> None:
    assert one(stack, CACHE)["inputs"]["kmsKeyId"] == key_arn(stack, "cache")
    assert by_name(stack, "cache-auth-secret")["inputs"]["kmsKeyId"] == key_arn(stack, "secrets")
    assert by_name(stack, "database-worker-credentials")["inputs"]["kmsKeyId"] == key_arn(
        stack, "secrets")


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_cluster_encrypts_kubernetes_secrets_with_the_secrets_key(stack: str) -> None:
    config = one(stack, EKS)["inputs"]["encryptionConfig"]
    assert config == {"provider": {"keyArn": key_arn(stack, "secrets")}, "resources": ["secrets"]}


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_archive_is_locked_and_encrypted_with_the_archive_key(stack: str) -> None:
    bucket = by_name(stack, "archive-bucket")
    assert bucket["inputs"]["objectLockEnabled"] is True
    lock = by_name(stack, "archive-bucket-object-lock")["inputs"]
    assert lock["rule"] == {"defaultRetention": {"mode": "COMPLIANCE", "years": 6}}
    sse = by_name(stack, "archive-bucket-encryption")["inputs"]["rules"][0]
    assert sse["applyServerSideEncryptionByDefault"] == {
        "sseAlgorithm": "aws:kms", "kmsMasterKeyId": key_arn(stack, "archive")}
    assert sse["bucketKeyEnabled"] is True
    block = by_name(stack, "archive-bucket-public-access")["inputs"]
    assert all(block[k] is True for k in ("blockPublicAcls", "blockPublicPolicy",
                                          "ignorePublicAcls", "restrictPublicBuckets"))
    policy = json.loads(by_name(stack, "archive-bucket-tls-only")["inputs"]["policy"])
    assert policy["Statement"][0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert by_name(stack, "archive-bucket-versioning")["inputs"]["versioningConfiguration"] == {
        "status": "Enabled"}


def test_prod_replicates_the_archive_to_a_locked_bucket_in_the_dr_region() -> None:
    replica = by_name("prod", "archive-replica-bucket")
    assert replica["inputs"]["region"] == "us-west-2"
    assert replica["inputs"]["objectLockEnabled"] is True
    assert by_name("prod", "archive-replica-bucket-object-lock")["inputs"]["region"] == "us-west-2"
    replica_key = by_name("prod", "keys-archive-dr-replica")
    assert replica_key["inputs"]["primaryKeyArn"] == key_arn("prod", "archive")
    assert replica_key["inputs"]["region"] == "us-west-2"
    rule = by_name("prod", "archive-replication")["inputs"]["rules"][0]
    assert rule["destination"]["bucket"] == replica["outputs"]["arn"]
    assert rule["destination"]["encryptionConfiguration"] == {
        "replicaKmsKeyId": replica_key["outputs"]["arn"]}
    assert rule["sourceSelectionCriteria"] == {"sseKmsEncryptedObjects": {"status": "Enabled"}}
    assert output("prod", "archiveReplicaBucketName") == replica["outputs"]["bucket"]
    assert not resources("dev", "aws:s3/bucketReplicationConfig:BucketReplicationConfig")


@pytest.mark.parametrize("stack", STACKS)
def test_database_and_cache_admit_only_the_worker(stack: str) -> None:
    rules = {r["name"]: r["inputs"] for r in
             resources(stack, "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")}
    db_rule, cache_rule = rules["network-db-from-worker"], rules["network-cache-from-worker"]
    assert (db_rule["fromPort"], db_rule["toPort"]) == (5432, 5432)
    assert (cache_rule["fromPort"], cache_rule["toPort"]) == (6379, 6379)
    assert db_rule["referencedSecurityGroupId"] == cache_rule["referencedSecurityGroupId"]
    assert "cidrIpv4" not in db_rule and "cidrIpv4" not in cache_rule
    db_sg = by_name(stack, "network-db-sg")
    assert db_rule["securityGroupId"] == db_sg["id"]
    assert one(stack, DB)["inputs"]["vpcSecurityGroupIds"] == [db_sg["id"]]
    assert one(stack, CACHE)["inputs"]["securityGroupIds"] == [by_name(stack, "network-cache-sg")
                                                               ["id"]]
    for group in resources(stack, "aws:ec2/securityGroup:SecurityGroup"):
        assert "egress" not in group["inputs"] and "ingress" not in group["inputs"]


@pytest.mark.parametrize("stack", ["dev", "prod", "dr"])
def test_new_clusters_nodes_join_the_worker_group_and_require_imdsv2(stack: str) -> None:
    template = one(stack, "aws:ec2/launchTemplate:LaunchTemplate")["inputs"]
    worker_sg = by_name(stack, "network-worker-sg")["id"]
    assert worker_sg in template["vpcSecurityGroupIds"]
    assert template["metadataOptions"]["httpTokens"] == "required"
    assert template["metadataOptions"]["httpPutResponseHopLimit"] == 1
    assert by_name(stack, "network-db-from-worker")["inputs"][
        "referencedSecurityGroupId"] == worker_sg


def _policy(stack: str, name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(by_name(stack, name)["inputs"][
        "policy" if name.endswith("policy") else "assumeRolePolicy"])
    return document


@pytest.mark.parametrize("stack", STACKS)
def test_worker_role_trusts_only_the_audit_worker_service_account(stack: str) -> None:
    trust = _policy(stack, "cluster-worker-role")
    [statement] = trust["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    conditions = statement["Condition"]["StringEquals"]
    subjects = [v for k, v in conditions.items() if k.endswith(":sub")]
    audiences = [v for k, v in conditions.items() if k.endswith(":aud")]
    assert subjects == ["system:serviceaccount:audit:audit-worker"]
    assert audiences == ["sts.amazonaws.com"]
    assert statement["Principal"]["Federated"].startswith(
        "arn:aws:iam::111122223333:oidc-provider/")


@pytest.mark.parametrize("stack", STACKS)
def test_worker_policy_allows_exactly_its_resources_and_no_wildcard(stack: str) -> None:
    policy = _policy(stack, "cluster-worker-policy")
    grants: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert statement["Resource"] != "*" and "*" not in statement["Resource"]
        for action in statement["Action"]:
            assert "*" not in action
            grants.setdefault(action, set()).update(statement["Resource"])
    bucket_arn = output(stack, "archiveBucketArn")
    archive_key = output(stack, "archiveKeyArn")
    assert grants == {
        "kms:GenerateDataKey": {key_arn(stack, "data"), archive_key},
        "kms:Decrypt": {key_arn(stack, "data"), key_arn(stack, "secrets"), archive_key},
        "kms:Sign": {key_arn(stack, "signing")},
        "kms:GetPublicKey": {key_arn(stack, "signing")},
        "secretsmanager:GetSecretValue": {by_name(stack, "database-worker-credentials")[
            "outputs"]["arn"], by_name(stack, "cache-auth-secret")["outputs"]["arn"]},
        "s3:PutObject": {f"{bucket_arn}/*"},
        "s3:GetObject": {f"{bucket_arn}/*"},
        # The worker's /healthz/external: DescribeKey on both keys, HeadBucket on the bucket.
        "kms:DescribeKey": {key_arn(stack, "data"), key_arn(stack, "signing")},
        "s3:ListBucket": {bucket_arn},
    }
    envelope = next(s for s in policy["Statement"] if s["Sid"] == "EnvelopeEncryption")
    assert envelope["Condition"] == {"StringEquals": {"kms:EncryptionContext:app": "audit-kit"}}


@pytest.mark.parametrize("stack", STACKS)
def test_release_values_bind_the_worker_to_this_stack(stack: str) -> None:
    release = one(stack, RELEASE)
    values = release["inputs"]["values"]
    assert release["inputs"]["chart"].endswith("charts/audit-worker")
    assert release["inputs"]["namespace"] == "audit"
    assert values["serviceAccount"]["annotations"]["eks.amazonaws.com/role-arn"] == (
        by_name(stack, "cluster-worker-role")["outputs"]["arn"])
    assert values["keys"] == {"backend": "kms", "kmsDataKeyId": key_arn(stack, "data"),
                              "kmsSigningKeyId": key_arn(stack, "signing")}
    assert values["aws"] == {"region": summary(stack)["config"]["aws:region"],
                             "archiveBucket": output(stack, "archiveBucketName"),
                             "archiveDetachVerifiedMonths": False}
    secret = one(stack, "kubernetes:core/v1:Secret")
    assert values["secrets"]["existingSecret"] == secret["inputs"]["metadata"]["name"]
    assert values["activeSlot"] == output(stack, "activeSlot")
    for r in (release, secret, one(stack, "kubernetes:core/v1:Namespace")):
        assert r["provider"], f"{r['name']} must use the cluster's provider"


@pytest.mark.parametrize("stack", STACKS)
def test_connection_secret_is_secret_and_points_at_this_stacks_stores(stack: str) -> None:
    secret = one(stack, "kubernetes:core/v1:Secret")
    assert secret["inputs"]["metadata"]["name"] == "audit-worker-connections"
    assert "stringData" in secret["secret_inputs"]
    urls = secret["inputs"]["stringData"]
    assert urls["database-url"].startswith("postgresql://audit_worker:")
    assert f"@{output(stack, 'dbAddress')}:5432/audit?sslmode=verify-full" in urls["database-url"]
    assert urls["redis-url"].startswith("rediss://:")
    assert f"@{output(stack, 'redisPrimaryEndpoint')}:6379/0" in urls["redis-url"]


@pytest.mark.parametrize("stack", STACKS)
def test_the_master_password_never_reaches_the_program(stack: str) -> None:
    """The migration login's Secret is the operator's: Pulumi reads no master secret."""
    secret = one(stack, "kubernetes:core/v1:Secret")
    assert set(secret["inputs"]["stringData"]) == {"database-url", "redis-url"}
    assert not any("audit_admin" in json.dumps(r["inputs"]) for r in resources(stack)
                   if r["type"].startswith("kubernetes:"))
    reads = [c["args"].get("secretId") for c in summary(stack)["calls"]
             if c["token"] == "aws:secretsmanager/getSecretVersion:getSecretVersion"]
    if stack != "dr":
        assert output(stack, "dbMasterSecretArn") not in reads
    assert output(stack, "migrationSecretName") == "audit-worker-migration"
    assert one(stack, RELEASE)["inputs"]["values"]["secrets"]["migrationSecret"] == (
        "audit-worker-migration")
    assert not [r for r in resources(stack, "kubernetes:core/v1:Secret")
                if r["inputs"]["metadata"]["name"] == "audit-worker-migration"]


# --- Secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_no_secret_in_plain_outputs(stack: str) -> None:
    for name, out in summary(stack)["outputs"].items():
        if not out["secret"]:
            assert "MOCKSECRET-" not in json.dumps(out["value"]), name
    if stack != "staging":
        assert summary(stack)["outputs"]["kubeconfig"]["secret"] is True


@pytest.mark.parametrize("stack", STACKS)
def test_secret_inputs_are_marked_secret(stack: str) -> None:
    for r in resources(stack):
        if "MOCKSECRET-" in json.dumps(r["inputs"]):
            assert r["secret_inputs"], f"{r['type']} {r['name']} holds a secret in plain inputs"
    assert "authToken" in one(stack, CACHE)["secret_inputs"]
    for version in resources(stack, SECRET_VERSION):
        assert version["secret_inputs"] == ["secretString"]
    assert all(s["inputs"]["kmsKeyId"] for s in resources(stack, SECRET))


# --- DR ------------------------------------------------------------------------------------


def test_dr_reads_the_prod_stack() -> None:
    reference = one("dr", STACK_REFERENCE)
    assert reference["inputs"]["name"] == "organization/audit-kit/prod"


def test_dr_replica_source_is_prods_database_and_uses_the_dr_replica_key() -> None:
    replica = one("dr", DB)
    assert replica["name"] == "database-replica"
    assert replica["inputs"]["replicateSourceDb"] == PROD_OUTPUTS["dbInstanceArn"]
    replica_key = by_name("dr", "keys-database-replica")
    assert replica["inputs"]["kmsKeyId"] == replica_key["outputs"]["arn"]
    assert replica_key["inputs"]["primaryKeyArn"] == PROD_OUTPUTS["keyArns"]["database"]
    assert replica_key["inputs"]["region"] == "us-west-2"
    assert ":us-west-2:" in replica_key["outputs"]["arn"]
    for absent in ("engine", "username", "manageMasterUserPassword", "allocatedStorage"):
        assert absent not in replica["inputs"]
    assert output("dr", "dbReplicaSourceArn") == PROD_OUTPUTS["dbInstanceArn"]
    assert output("dr", "dbReplicaIdentifier") == replica["outputs"]["identifier"]


def test_dr_replicates_every_key_but_the_archive_key() -> None:
    replicas = {k["name"]: k["inputs"]["primaryKeyArn"] for k in resources("dr", REPLICA_KEY)}
    assert replicas == {f"keys-{p}-replica": PROD_OUTPUTS["keyArns"][p]
                        for p in ("database", "cache", "secrets", "data", "signing")}
    assert resources("dr", KEY) == []


def test_dr_uses_prods_replica_archive_bucket() -> None:
    assert resources("dr", "aws:s3/bucket:Bucket") == []
    assert output("dr", "archiveBucketName") == PROD_OUTPUTS["archiveReplicaBucketName"]
    assert output("dr", "archiveKeyArn") == PROD_OUTPUTS["archiveReplicaKeyArn"]


def test_dr_worker_is_a_pilot_light_without_migrations() -> None:
    values = one("dr", RELEASE)["inputs"]["values"]
    active = values["activeSlot"]
    idle = "green" if active == "blue" else "blue"
    assert values["slots"][active]["replicas"] == 1
    assert values["slots"][idle]["replicas"] == 0
    assert values["autoscaling"]["enabled"] is False
    assert values["migration"]["enabled"] is False
    assert values["logId"] == "audit-prod"


def test_dr_failover_records_primary_prod_secondary_dr() -> None:
    health = one("dr", HEALTH_CHECK)["inputs"]
    assert health["fqdn"] == "health.audit.example-hospital.org"
    assert health["resourcePath"] == "/readyz"
    records = {r["name"]: r["inputs"] for r in resources("dr", RECORD)}
    intake_p, intake_s = records["failover-intake-primary"], records["failover-intake-secondary"]
    assert intake_p["failoverRoutingPolicies"] == [{"type": "PRIMARY"}]
    assert intake_s["failoverRoutingPolicies"] == [{"type": "SECONDARY"}]
    assert intake_p["records"] == [PROD_OUTPUTS["redisPrimaryEndpoint"]]
    assert intake_s["records"] == [output("dr", "redisPrimaryEndpoint")]
    assert intake_p["healthCheckId"] == one("dr", HEALTH_CHECK)["id"]
    db_p, db_s = records["failover-db-primary"], records["failover-db-secondary"]
    assert db_p["records"] == [PROD_OUTPUTS["dbAddress"]]
    assert db_s["records"] == [output("dr", "dbAddress")]
    assert {r["zoneId"] for r in records.values()} == {"Z0123456789ABCDEFGHIJ"}
    assert output("dr", "intakeRecordName") == "intake.audit.example-hospital.org"
    assert output("dr", "hostedZoneId") == "Z0123456789ABCDEFGHIJ"


def test_dr_worker_password_comes_from_prods_secret_not_an_output() -> None:
    calls = [c for c in summary("dr")["calls"]
             if c["token"] == "aws:secretsmanager/getSecretVersion:getSecretVersion"]
    assert [c["args"]["secretId"] for c in calls] == [PROD_OUTPUTS["dbWorkerSecretArn"]]
    assert calls[0]["args"]["region"] == "us-east-1"
    generated = [r["name"] for r in resources("dr", "random:index/randomPassword:RandomPassword")]
    assert generated == ["cache-auth-token"]  # no new worker password: the replica has prod's


def test_prod_exports_everything_the_dr_stack_reads() -> None:
    exported = set(summary("prod")["outputs"])
    assert set(PRIMARY_OUTPUTS) <= exported
    assert set(PROD_OUTPUTS) == set(PRIMARY_OUTPUTS)
    assert set(output("prod", "keyArns")) >= {"database", "cache", "secrets", "data", "signing"}


# --- Outputs for the workflows --------------------------------------------------------------

WORKFLOW_OUTPUTS = {
    "dbEndpoint", "dbInstanceArn", "dbInstanceIdentifier", "redisPrimaryEndpoint", "keyArns",
    "signingKeyId", "archiveBucketName", "clusterName", "namespace", "activeSlot", "slotImages",
    "activeServiceName", "previewServiceName", "autoPromote", "scaleDownDelaySeconds",
    "releaseName", "workerReplicas",
}


@pytest.mark.parametrize("stack", STACKS)
def test_exports_what_the_release_and_drill_workflows_need(stack: str) -> None:
    outputs = summary(stack)["outputs"]
    assert outputs.keys() >= WORKFLOW_OUTPUTS
    assert output(stack, "slotImages") == {"blue": "0.1.0", "green": "0.1.0"}
    assert output(stack, "activeServiceName") == "audit-worker-active"
    assert output(stack, "previewServiceName") == "audit-worker-preview"
    if stack == "dr":
        assert outputs.keys() >= {"dbReplicaIdentifier", "hostedZoneId", "hostedZoneName",
                                  "intakeRecordName", "databaseRecordName", "healthCheckId"}


# --- Failing before any resource is declared ------------------------------------------------


def test_an_invalid_settings_file_fails_before_any_resource(tmp_path: Path) -> None:
    data = yaml.safe_load((stackkit.ROOT / "environments" / "prod.yaml").read_text())
    data["database"]["backup_retention_days"] = 7
    path = tmp_path / "prod.yaml"
    path.write_text(yaml.safe_dump(data))
    result = stackkit.evaluate_with("prod", {"audit-kit:environment": str(path)})
    assert result["error"] and "SettingsError" in result["error"]
    assert f"{path}: database.backup_retention_days: must be >= 35 in prod" in result["error"]
    assert result["resources"] == []


def test_a_region_that_disagrees_with_the_settings_fails_before_any_resource() -> None:
    result = stackkit.evaluate_with("prod", {"aws:region": "eu-west-1"})
    assert "aws:region is eu-west-1 but environments/prod.yaml has region us-east-1" in (
        result["error"] or "")
    assert result["resources"] == []


# --- Snapshots -----------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_resource_snapshot(stack: str) -> None:
    counts = stackkit.resource_counts(stack)
    path = stackkit.snapshot_path(stack)
    if stackkit.update_snapshots() or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"stack": stack, "resources": counts}, indent=2) + "\n")
        if not stackkit.update_snapshots():
            pytest.fail(f"wrote a new snapshot {path}; review it and commit it")
    want = json.loads(path.read_text())["resources"]
    assert counts == want, (
        f"{stack}: resource types and counts changed; if intended, rerun with "
        "UPDATE_SNAPSHOTS=1 and review the diff of tests/infra/snapshots/")

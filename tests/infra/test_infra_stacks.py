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

from infra.cluster import WORKER_POD_LABELS
from infra.dr import PRIMARY_OUTPUTS
from infra.settings import load_environment

ROUTING_CONTROL = "aws:route53recoverycontrol/routingControl:RoutingControl"


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
    expected |= {"audit:infra:Compliance"}
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
    "aws:route53recoverycontrol/routingControl:RoutingControl",
    "aws:s3/bucketOwnershipControls:BucketOwnershipControls",
    "aws:s3/bucketVersioning:BucketVersioning",
    "aws:s3/bucketObjectLockConfiguration:BucketObjectLockConfiguration",
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
    "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", "aws:s3/bucketPolicy:BucketPolicy",
    "aws:s3/bucketReplicationConfig:BucketReplicationConfig",
    "aws:eks/accessPolicyAssociation:AccessPolicyAssociation",
    "aws:backup/vaultLockConfiguration:VaultLockConfiguration",
    "aws:backup/selection:Selection",
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
    keys = {k["name"]: k["inputs"] for k in resources("prod", KEY)
            if k["parent"] == "audit:infra:Keys::keys"}  # compliance's keys are single-region
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


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_cluster_encrypts_kubernetes_secrets_with_the_secrets_key(stack: str) -> None:
    config = one(stack, EKS)["inputs"]["encryptionConfig"]
    assert config == {"provider": {"keyArn": key_arn(stack, "secrets")}, "resources": ["secrets"]}


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_archive_is_locked_and_encrypted_with_the_archive_key(stack: str) -> None:
    bucket = by_name(stack, "archive-bucket")
    assert bucket["inputs"]["objectLockEnabled"] is True
    lock = by_name(stack, "archive-bucket-object-lock")["inputs"]
    assert lock["rule"] == {"defaultRetention": load_environment(
        stack).cloud().archive.default_retention()}
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
    # The stores admit the worker's pods only (their own group), not the nodes' group.
    pod_sg = by_name(stack, "network-worker-pod-sg")["id"]
    for store in ("db", "cache"):
        assert by_name(stack, f"network-{store}-from-worker")["inputs"][
            "referencedSecurityGroupId"] == pod_sg != worker_sg


NEW_CLUSTERS = ["dev", "prod", "dr"]
ADDON = "aws:eks/addon:Addon"
ACCESS_ENTRY = "aws:eks/accessEntry:AccessEntry"
ASSOCIATION = "aws:eks/accessPolicyAssociation:AccessPolicyAssociation"
SG_POLICY = "kubernetes:vpcresources.k8s.aws/v1beta1:SecurityGroupPolicy"


@pytest.mark.parametrize("stack", NEW_CLUSTERS)
def test_new_cluster_api_is_public_only_to_the_runners_and_private_inside(stack: str) -> None:
    settings = load_environment(stack).cloud().cluster
    vpc = one(stack, EKS)["inputs"]["vpcConfig"]
    assert vpc["endpointPrivateAccess"] is True
    assert vpc["endpointPublicAccess"] is True
    assert vpc["publicAccessCidrs"] == settings.public_access_cidrs
    assert "0.0.0.0/0" not in vpc["publicAccessCidrs"]


def test_a_private_endpoint_has_no_public_access(tmp_path: Path) -> None:
    data = yaml.safe_load((stackkit.ROOT / "environments" / "prod.yaml").read_text())
    data["cluster"].update(endpoint_access="private", runner_in_vpc=True, public_access_cidrs=[])
    path = tmp_path / "prod.yaml"
    path.write_text(yaml.safe_dump(data))
    result = stackkit.evaluate_with("prod", {"audit-kit:environment": str(path)})
    assert result["error"] is None
    (eks,) = [r for r in result["resources"] if r["type"] == EKS]
    vpc = eks["inputs"]["vpcConfig"]
    assert (vpc["endpointPrivateAccess"], vpc["endpointPublicAccess"]) == (True, False)
    assert "publicAccessCidrs" not in vpc


@pytest.mark.parametrize("stack", NEW_CLUSTERS)
def test_only_the_listed_roles_have_access_each_with_its_policy(stack: str) -> None:
    access = load_environment(stack).cloud().cluster.access
    config = one(stack, EKS)["inputs"]["accessConfig"]
    assert config == {"authenticationMode": "API",
                      "bootstrapClusterCreatorAdminPermissions": False}
    cluster_name = stackkit.state(one(stack, EKS))["name"]
    entries = resources(stack, ACCESS_ENTRY)
    assert sorted(e["inputs"]["principalArn"] for e in entries) == sorted(
        arn for _, arn in access.roles())
    assert {e["inputs"]["clusterName"] for e in entries} == {cluster_name}
    granted = {(a["inputs"]["principalArn"], a["inputs"]["policyArn"],
                json.dumps(a["inputs"]["accessScope"], sort_keys=True))
               for a in resources(stack, ASSOCIATION)}
    policy = "arn:aws:eks::aws:cluster-access-policy/"
    namespace = json.dumps({"namespaces": ["audit"], "type": "namespace"}, sort_keys=True)
    want = {(arn, f"{policy}AmazonEKSClusterAdminPolicy", '{"type": "cluster"}')
            for arn in access.admins}
    want |= {(arn, f"{policy}AmazonEKSEditPolicy", namespace) for arn in access.operators}
    want |= {(arn, f"{policy}AmazonEKSViewPolicy", namespace) for arn in access.viewers}
    assert granted == want and access.admins


def test_dr_drill_role_operates_the_worker_namespace() -> None:
    drill = "arn:aws:iam::111122223333:role/audit-kit-dr-drill"
    (association,) = [a for a in resources("dr", ASSOCIATION)
                      if a["inputs"]["principalArn"] == drill]
    assert association["inputs"]["policyArn"].endswith("/AmazonEKSEditPolicy")
    assert association["inputs"]["accessScope"] == {"type": "namespace",
                                                    "namespaces": ["audit"]}


@pytest.mark.parametrize("stack", NEW_CLUSTERS)
def test_vpc_cni_addon_enforces_network_policy_and_gives_pods_interfaces(stack: str) -> None:
    addon = one(stack, ADDON)["inputs"]
    assert addon["addonName"] == "vpc-cni"
    assert json.loads(addon["configurationValues"]) == {
        "enableNetworkPolicy": "true",
        "env": {"ENABLE_POD_ENI": "true"},
        "init": {"env": {"DISABLE_TCP_EARLY_DEMUX": "true"}},
    }
    assert addon["resolveConflictsOnCreate"] == "OVERWRITE"
    cluster_role = by_name(stack, "cluster-cluster-role")["outputs"]["name"]
    controller = by_name(stack, "cluster-cluster-vpc-resource-controller")["inputs"]
    assert controller == {"role": cluster_role, "policyArn":
                          "arn:aws:iam::aws:policy/AmazonEKSVPCResourceController"}


@pytest.mark.parametrize("stack", NEW_CLUSTERS)
def test_worker_pods_get_their_own_security_group(stack: str) -> None:
    pod_sg = by_name(stack, "network-worker-pod-sg")["id"]
    node_sg = by_name(stack, "network-worker-sg")["id"]
    policy = one(stack, SG_POLICY)
    assert policy["provider"] and policy["inputs"]["metadata"]["namespace"] == "audit"
    assert policy["inputs"]["spec"] == {
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "audit-worker"}},
        "securityGroups": {"groupIds": [pod_sg]}}
    rules = {r["name"]: r["inputs"] for r in resources(stack) if r["type"] in (
        "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
        "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")}
    vpc_cidr = output(stack, "vpcId") and load_environment(stack).cloud().network.vpc_cidr

    def rule(name: str) -> tuple[Any, ...]:
        r = rules[f"network-{name}"]
        return (r["securityGroupId"], r["ipProtocol"], r["fromPort"], r["toPort"],
                r.get("referencedSecurityGroupId") or r.get("cidrIpv4"))

    # Probes, Prometheus and producers come from the nodes; the pods reach their stores, DNS
    # on the nodes and the API endpoints; nothing else involves the pod group.
    assert rule("worker-pod-from-nodes-8080") == (pod_sg, "tcp", 8080, 8080, node_sg)
    assert rule("worker-pod-from-nodes-8081") == (pod_sg, "tcp", 8081, 8081, node_sg)
    assert rule("worker-pod-to-db") == (pod_sg, "tcp", 5432, 5432,
                                        by_name(stack, "network-db-sg")["id"])
    assert rule("worker-pod-to-cache") == (pod_sg, "tcp", 6379, 6379,
                                           by_name(stack, "network-cache-sg")["id"])
    assert rule("worker-pod-to-https") == (pod_sg, "tcp", 443, 443, vpc_cidr)
    assert rule("worker-pod-to-dns-udp") == (pod_sg, "udp", 53, 53, vpc_cidr)
    assert rule("nodes-dns-udp-from-worker-pods") == (node_sg, "udp", 53, 53, pod_sg)
    involved = {n for n, r in rules.items()
                if pod_sg in (r["securityGroupId"], r.get("referencedSecurityGroupId"))}
    assert len(involved) == 11, sorted(involved)


def test_the_policy_selects_the_label_the_chart_puts_on_its_pods() -> None:
    chart = yaml.safe_load((stackkit.ROOT / "charts" / "audit-worker" / "Chart.yaml").read_text())
    helpers = (stackkit.ROOT / "charts" / "audit-worker" / "templates" / "_helpers.tpl").read_text()
    assert 'app.kubernetes.io/name: {{ include "audit-worker.name" . }}' in helpers
    assert chart["name"] == WORKER_POD_LABELS["app.kubernetes.io/name"]
    for stack in NEW_CLUSTERS:
        values = one(stack, RELEASE)["inputs"]["values"]
        assert not values.get("nameOverride"), f"{stack}: the pods' name label would change"


def test_an_existing_cluster_gets_no_pod_security_group_or_access_entries() -> None:
    for type_ in (ADDON, ACCESS_ENTRY, ASSOCIATION, SG_POLICY):
        assert resources("staging", type_) == []
    assert not [r for r in resources("staging") if "worker-pod" in r["name"]]


@pytest.mark.parametrize("stack", NEW_CLUSTERS)
def test_node_group_desired_size_is_left_to_whoever_resizes_it(stack: str) -> None:
    nodes = one(stack, "aws:eks/nodeGroup:NodeGroup")
    assert nodes["ignore_changes"] == ["scalingConfig.desiredSize"]
    lo, want, hi = load_environment(stack).cloud().cluster.node_scaling()
    assert nodes["inputs"]["scalingConfig"] == {"minSize": lo, "desiredSize": want,
                                                "maxSize": hi}
    # Nothing else in the stack ignores changes.
    assert [r["name"] for r in resources(stack) if r.get("ignore_changes")] == [nodes["name"]]


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
        # The Redis AUTH token only: the worker has no database password (IAM auth).
        "secretsmanager:GetSecretValue": {by_name(stack, "cache-auth-secret")["outputs"]["arn"]},
        "rds-db:connect": {_login_arn(stack, "audit_worker")},
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
    # No password: the worker signs in with an RDS IAM token (rds-db:connect).
    assert urls["database-url"].startswith("postgresql://audit_worker@")
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
    assert output("dr", "dbReplicaIdentifier") == stackkit.state(replica)["identifier"]


def test_dr_replicates_every_key_but_the_archive_key() -> None:
    replicas = {k["name"]: k["inputs"]["primaryKeyArn"] for k in resources("dr", REPLICA_KEY)}
    assert replicas == {f"keys-{p}-replica": PROD_OUTPUTS["keyArns"][p]
                        for p in ("database", "cache", "secrets", "data", "signing")}
    assert [k for k in resources("dr", KEY) if k["parent"] == "audit:infra:Keys::keys"] == []


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


def test_dr_failover_records_are_txt_endpoint_names_switched_by_arc_routing_controls() -> None:
    checks = {r["name"]: r for r in resources("dr", HEALTH_CHECK)}
    assert set(checks) == {"failover-prod-health", "failover-dr-health"}
    controls = {r["name"]: r for r in resources("dr", ROUTING_CONTROL)}
    for site in ("prod", "dr"):
        health = checks[f"failover-{site}-health"]["inputs"]
        assert health["type"] == "RECOVERY_CONTROL"  # nothing probes prod: no day-one flip
        assert health["routingControlArn"] == controls[f"failover-{site}"]["id"]
    records = {r["name"]: r["inputs"] for r in resources("dr", RECORD)}
    intake_p, intake_s = records["failover-intake-primary"], records["failover-intake-secondary"]
    assert {r["type"] for r in records.values()} == {"TXT"}  # no CNAME: TLS names hold
    assert intake_p["failoverRoutingPolicies"] == [{"type": "PRIMARY"}]
    assert intake_s["failoverRoutingPolicies"] == [{"type": "SECONDARY"}]
    assert intake_p["records"] == [PROD_OUTPUTS["redisPrimaryEndpoint"]]
    assert intake_s["records"] == [output("dr", "redisPrimaryEndpoint")]
    assert intake_p["healthCheckId"] == checks["failover-prod-health"]["id"]
    assert intake_s["healthCheckId"] == checks["failover-dr-health"]["id"]
    db_p, db_s = records["failover-db-primary"], records["failover-db-secondary"]
    assert db_p["records"] == [PROD_OUTPUTS["dbAddress"]]
    assert db_s["records"] == [output("dr", "dbAddress")]
    assert {r["zoneId"] for r in records.values()} == {"Z0123456789ABCDEFGHIJ"}
    assert output("dr", "intakeRecordName") == "intake.audit.example-hospital.org"
    assert output("dr", "hostedZoneId") == "Z0123456789ABCDEFGHIJ"
    assert set(output("dr", "routingControlArns")) == {"prod", "dr"}
    assert len(output("dr", "arcClusterEndpoints")) == 5


def test_no_stack_has_a_database_password_for_the_worker_or_the_migrations() -> None:
    for stack in STACKS:
        assert not [r for r in resources(stack, "aws:secretsmanager/secret:Secret")
                    if r["name"] == "database-worker-credentials"], stack
        generated = [r["name"] for r in resources(
            stack, "random:index/randomPassword:RandomPassword")]
        assert generated == ["cache-auth-token"], stack


def test_dr_reads_nothing_of_prods_secrets_and_needs_no_password_config() -> None:
    calls = [c for c in summary("dr")["calls"]
             if c["token"] == "aws:secretsmanager/getSecretVersion:getSecretVersion"]
    assert calls == []  # prod's Secrets Manager is in prod's region
    result = stackkit.evaluate_with("dr", {"audit-kit:primaryWorkerPassword": ""})
    assert not result["error"], result["error"]


@pytest.mark.parametrize("stack", STACKS)
def test_the_migration_role_signs_in_as_the_migrator_and_reads_only_the_master_secret(
        stack: str) -> None:
    policy = _policy(stack, "cluster-migration-policy")
    grants = {a: set(st["Resource"]) for st in policy["Statement"] for a in st["Action"]}
    master = summary(stack)["outputs"].get("dbMasterSecretArn", {}).get("value")
    expected: dict[str, set[str]] = {"rds-db:connect": {_login_arn(stack, "auditlog_migrator")}}
    if master:  # a DR replica has no master secret of its own: no bootstrap there
        expected |= {"secretsmanager:GetSecretValue": {master},
                     "kms:Decrypt": {key_arn(stack, "secrets")}}
    assert grants == expected
    trust = json.loads(by_name(stack, "cluster-migration-role")["inputs"]["assumeRolePolicy"])
    (condition,) = [v for k, v in trust["Statement"][0]["Condition"]["StringEquals"].items()
                    if k.endswith(":sub")]
    assert condition == "system:serviceaccount:audit:audit-worker-migrate"


def _login_arn(stack: str, login: str) -> str:
    """What RDS IAM authentication names: region, account, the instance's DbiResourceId."""
    (instance,) = resources(stack, "aws:rds/instance:Instance")
    region = "us-west-2" if stack == "dr" else "us-east-1"
    return (f"arn:aws:rds-db:{region}:111122223333:dbuser:"
            f"{instance['outputs']['resourceId']}/{login}")


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
                                  "intakeRecordName", "databaseRecordName", "healthCheckIds",
                                  "arcClusterEndpoints", "routingControlArns", "drMode"}
    assert outputs.keys() >= {"dbKmsKeyArn", "dbSubnetGroupName", "dbSecurityGroupIds",
                              "dbParameterGroupName"}  # what a failback rebuild needs


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

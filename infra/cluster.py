"""Kubernetes: a new EKS cluster or an existing one, the ``audit`` namespace, and IRSA.

A new cluster (``cluster.create: true``) is plain `aws.eks.Cluster` + a managed node group +
the IAM OIDC provider: Kubernetes Secrets are envelope-encrypted with the secrets key, all
control-plane log types go to CloudWatch, nodes require IMDSv2 with a hop limit of 1 (pods
cannot borrow the node's credentials) and join the worker security group that the database
and cache admit. An existing cluster is reached with a kubeconfig kept in Secrets Manager.

A new cluster is reachable on the first ``pulumi up``: its API endpoint is public only to
``cluster.public_access_cidrs`` (or private when the runner is in the VPC), and Kubernetes
access is by EKS access entries for the roles in ``cluster.access`` only (the creator gets
none; https://docs.aws.amazon.com/eks/latest/userguide/access-entries.html). The Kubernetes
provider waits for those entries. The managed ``vpc-cni`` add-on enforces NetworkPolicy and
gives the worker's pods their own security group (``SecurityGroupPolicy``); nodes start only
after it is configured. The node group's desired size is left to whoever resizes it.

The worker's AWS identity is an IRSA role that only the service account
``audit:audit-worker`` can assume, with exactly the permissions in `worker_policy`; no
statement has a ``"*"`` resource.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from infra.chart_values import MIGRATION_SERVICE_ACCOUNT
from infra.settings import ClusterSettings

__all__ = [
    "ACCESS_POLICIES",
    "NAMESPACE",
    "SERVICE_ACCOUNT",
    "VPC_CNI_CONFIGURATION",
    "WORKER_ENCRYPTION_CONTEXT_APP",
    "WORKER_POD_LABELS",
    "Cluster",
    "ClusterArgs",
    "WorkerAccess",
    "existing_cluster_security_group",
    "kubeconfig",
    "worker_policy",
    "worker_trust_policy",
]

NAMESPACE = "audit"
SERVICE_ACCOUNT = "audit-worker"

_LOG_TYPES = ["api", "audit", "authenticator", "controllerManager", "scheduler"]
_NODE_POLICIES = {
    "worker-node": "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
    "cni": "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
    "ecr-read": "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
}
_ACCESS_POLICY = "arn:aws:eks::aws:cluster-access-policy/"
ACCESS_POLICIES: dict[str, tuple[str, str]] = {
    # level in cluster.access: (EKS access policy, scope)
    "admins": (f"{_ACCESS_POLICY}AmazonEKSClusterAdminPolicy", "cluster"),
    "operators": (f"{_ACCESS_POLICY}AmazonEKSEditPolicy", "namespace"),
    "viewers": (f"{_ACCESS_POLICY}AmazonEKSViewPolicy", "namespace"),
}
"""Namespace scope is the worker's namespace only."""

VPC_CNI_CONFIGURATION: dict[str, Any] = {
    # NetworkPolicy enforcement (the chart's default-deny policy is otherwise inert).
    "enableNetworkPolicy": "true",
    # Branch interfaces, so that pods can have their own security groups.
    "env": {"ENABLE_POD_ENI": "true"},
    # Kubelet TCP probes to pods with their own security group fail without this.
    "init": {"env": {"DISABLE_TCP_EARLY_DEMUX": "true"}},
}
"""The vpc-cni add-on's configuration values (keys of its aws-vpc-cni chart values)."""

WORKER_POD_LABELS: dict[str, str] = {"app.kubernetes.io/name": "audit-worker"}
"""The selector label of every pod of the chart (charts/audit-worker/templates/_helpers.tpl,
``audit-worker.selectorLabels``): both slots and the migration Job."""


@dataclass(frozen=True, kw_only=True)
class WorkerAccess:
    """The resources the worker may use, and nothing else."""

    data_key_arn: pulumi.Input[str]
    signing_key_arn: pulumi.Input[str]
    secrets_key_arn: pulumi.Input[str]
    archive_key_arn: pulumi.Input[str]
    archive_bucket_arn: pulumi.Input[str]
    secret_arns: Sequence[pulumi.Input[str]]
    """The Redis AUTH token (and the worker's database credentials without IAM auth)."""
    database_login_arn: pulumi.Input[str] | None = None
    """``rds-db:connect`` resource of the worker's login (RDS IAM authentication)."""


@dataclass(frozen=True, kw_only=True)
class MigrationAccess:
    """What the migration Job may use: its own login, and the master secret for the
    bootstrap (``audit-worker bootstrap``) where the instance has one (not a DR replica)."""

    database_login_arn: pulumi.Input[str]
    master_secret_arn: pulumi.Input[str] | None
    secrets_key_arn: pulumi.Input[str]


@dataclass(frozen=True, kw_only=True)
class ClusterArgs:
    environment: str
    region: str
    settings: ClusterSettings
    hardened: bool
    subnet_ids: pulumi.Input[Sequence[str]]
    worker_security_group_id: pulumi.Input[str]
    secrets_key_arn: pulumi.Input[str]
    worker_access: WorkerAccess
    migration_access: MigrationAccess | None = None
    worker_pod_security_group_id: pulumi.Input[str] | None = None
    """The worker pod security group (security groups for pods), new clusters only."""
    namespace: str = NAMESPACE
    service_account: str = SERVICE_ACCOUNT
    name: str | None = None
    """A new cluster's name (`infra.compliance.eks_cluster_name`): its control-plane log group
    is named after it and must exist first. Auto-named when None."""
    log_groups: Sequence[pulumi.Resource] = ()
    """Log groups a new cluster writes to, created (encrypted, retained) before it."""


WORKER_ENCRYPTION_CONTEXT_APP = "audit-kit"
"""The ``app`` encryption context the worker puts on every data key (crypto/wrapping.py)."""


def migration_policy(*, database_login_arn: str, master_secret_arn: str | None,
                     secrets_key_arn: str, region: str) -> dict[str, Any]:
    """The migration Job's IAM policy: sign in as the migration login and, for the
    bootstrap, read the RDS-managed master secret (encrypted with the secrets key)."""
    statements: list[dict[str, Any]] = [
        {"Sid": "MigrationLogin", "Effect": "Allow", "Action": ["rds-db:connect"],
         "Resource": [database_login_arn]},
    ]
    if master_secret_arn:
        statements += [
            {"Sid": "ReadMasterSecret", "Effect": "Allow",
             "Action": ["secretsmanager:GetSecretValue"], "Resource": [master_secret_arn]},
            {"Sid": "DecryptMasterSecret", "Effect": "Allow", "Action": ["kms:Decrypt"],
             "Resource": [secrets_key_arn],
             "Condition": {"StringEquals": {
                 "kms:ViaService": f"secretsmanager.{region}.amazonaws.com"}}},
        ]
    return {"Version": "2012-10-17", "Statement": statements}


def worker_policy(*, data_key_arn: str, signing_key_arn: str, secrets_key_arn: str,
                  archive_key_arn: str, archive_bucket_arn: str, secret_arns: Sequence[str],
                  region: str, database_login_arn: str | None = None) -> dict[str, Any]:
    """The worker's IAM policy. Every statement names its resources.

    Beyond its work (data keys, signing, connection secrets, archive objects) the worker's
    ``/healthz/external`` check calls ``kms:DescribeKey`` on both keys and ``HeadBucket``
    (``s3:ListBucket``) on the archive bucket, so those are granted too.
    """
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "EnvelopeEncryption", "Effect": "Allow",
             "Action": ["kms:GenerateDataKey", "kms:Decrypt"], "Resource": [data_key_arn],
             "Condition": {"StringEquals": {
                 "kms:EncryptionContext:app": WORKER_ENCRYPTION_CONTEXT_APP}}},
            {"Sid": "SignTreeHeads", "Effect": "Allow",
             "Action": ["kms:Sign", "kms:GetPublicKey"], "Resource": [signing_key_arn]},
            {"Sid": "HealthCheckKeys", "Effect": "Allow",
             "Action": ["kms:DescribeKey"], "Resource": [data_key_arn, signing_key_arn]},
            {"Sid": "ReadConnectionSecrets", "Effect": "Allow",
             "Action": ["secretsmanager:GetSecretValue"], "Resource": list(secret_arns)},
            # Reading a secret encrypted with a customer-managed key needs Decrypt on that key.
            {"Sid": "DecryptConnectionSecrets", "Effect": "Allow",
             "Action": ["kms:Decrypt"], "Resource": [secrets_key_arn],
             "Condition": {"StringEquals": {
                 "kms:ViaService": f"secretsmanager.{region}.amazonaws.com"}}},
            {"Sid": "ArchiveObjects", "Effect": "Allow",
             "Action": ["s3:PutObject", "s3:GetObject"], "Resource": [f"{archive_bucket_arn}/*"]},
            {"Sid": "HealthCheckBucket", "Effect": "Allow",
             "Action": ["s3:ListBucket"], "Resource": [archive_bucket_arn]},
            # SSE-KMS: PutObject needs GenerateDataKey, GetObject needs Decrypt, through S3 only.
            {"Sid": "ArchiveEncryption", "Effect": "Allow",
             "Action": ["kms:GenerateDataKey", "kms:Decrypt"], "Resource": [archive_key_arn],
             "Condition": {"StringEquals": {"kms:ViaService": f"s3.{region}.amazonaws.com"}}},
            # RDS IAM authentication: sign in as the worker's login, on this instance only.
            *([{"Sid": "DatabaseLogin", "Effect": "Allow", "Action": ["rds-db:connect"],
                "Resource": [database_login_arn]}] if database_login_arn else []),
        ],
    }


def worker_trust_policy(*, oidc_provider_arn: str, issuer_url: str, namespace: str,
                        service_account: str) -> dict[str, Any]:
    """Only ``system:serviceaccount:<namespace>:<service_account>`` may assume the role."""
    issuer = issuer_url.removeprefix("https://")
    return {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Federated": oidc_provider_arn},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {
                f"{issuer}:sub": f"system:serviceaccount:{namespace}:{service_account}",
                f"{issuer}:aud": "sts.amazonaws.com",
            }},
        }],
    }


def kubeconfig(*, cluster_name: str, endpoint: str, ca_data: str, region: str) -> str:
    """A kubeconfig that authenticates with ``aws eks get-token`` (no credential inside)."""
    return json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster_name, "cluster": {
            "server": endpoint, "certificate-authority-data": ca_data}}],
        "contexts": [{"name": cluster_name, "context": {
            "cluster": cluster_name, "user": cluster_name}}],
        "current-context": cluster_name,
        "users": [{"name": cluster_name, "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": "aws",
            "args": ["eks", "get-token", "--cluster-name", cluster_name, "--region", region],
        }}}],
    })


def existing_cluster_security_group(cluster_name: str) -> pulumi.Output[str]:
    """The node security group (EKS cluster security group) of an existing cluster."""
    return aws.eks.get_cluster_output(name=cluster_name).vpc_config.cluster_security_group_id


def _issuer(identities: Sequence[Any]) -> str:
    """The OIDC issuer URL of a cluster, from its ``identities`` output."""
    oidcs = list(identities[0].oidcs or []) if identities else []
    if not oidcs or not oidcs[0].issuer:
        raise ValueError("the EKS cluster has no OIDC issuer; IRSA needs one")
    return str(oidcs[0].issuer)


def _assume(service: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}]})


class Cluster(pulumi.ComponentResource):
    cluster_name: pulumi.Output[str]
    kubeconfig: pulumi.Output[str] | None
    """Only for a cluster created here; for an existing one see ``kubeconfig_secret``."""
    kubeconfig_secret: str | None
    provider: k8s.Provider
    namespace: pulumi.Output[str]
    service_account: str
    oidc_provider_arn: pulumi.Output[str]
    worker_role_arn: pulumi.Output[str]
    migration_role_arn: pulumi.Output[str] | None

    def __init__(self, name: str, args: ClusterArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("audit:infra:Cluster", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        s = args.settings
        self.service_account = args.service_account
        self._access_ready: list[pulumi.Resource] = []

        if s.create:
            config, issuer = self._create(name, args)
            self.kubeconfig = pulumi.Output.secret(config)
            self.kubeconfig_secret = None
        else:
            if not s.existing_cluster_name or not s.existing_kubeconfig_secret:
                raise TypeError("Missing required property 'existing_kubeconfig_secret'")
            invoke = pulumi.InvokeOutputOptions(parent=self)
            stored = aws.secretsmanager.get_secret_version_output(
                secret_id=s.existing_kubeconfig_secret, opts=invoke)
            config = pulumi.Output.secret(stored.secret_string)
            existing = aws.eks.get_cluster_output(name=s.existing_cluster_name, opts=invoke)
            issuer = existing.identities.apply(_issuer)
            self.cluster_name = pulumi.Output.from_input(s.existing_cluster_name)
            self.oidc_provider_arn = aws.iam.get_open_id_connect_provider_output(
                url=issuer, opts=invoke).arn
            self.kubeconfig = None
            self.kubeconfig_secret = s.existing_kubeconfig_secret

        # A new cluster admits nobody until its access entries exist: wait for them.
        self.provider = k8s.Provider(
            f"{name}-k8s", kubeconfig=config, delete_unreachable=False,
            opts=pulumi.ResourceOptions(parent=self, depends_on=self._access_ready))
        namespace = k8s.core.v1.Namespace(
            f"{name}-namespace",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=args.namespace,
                labels={
                    # Pod Security Admission "restricted": non-root, no privilege escalation.
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/audit": "restricted",
                    "app.kubernetes.io/part-of": "audit-kit",
                    "environment": args.environment,
                },
            ),
            opts=pulumi.ResourceOptions(parent=self, provider=self.provider),
        )
        self.namespace = namespace.metadata.apply(lambda m: m.name or args.namespace)
        if s.create and s.pod_security_groups:
            if args.worker_pod_security_group_id is None:
                raise TypeError("Missing required property 'worker_pod_security_group_id'")
            policy = self._pod_security_group_policy(
                name, namespace, args.worker_pod_security_group_id)
            # Pods get their security group when they are created: whatever uses the namespace
            # (the release) waits for the policy.
            self.namespace = pulumi.Output.all(self.namespace, policy.id).apply(lambda v: v[0])

        role = self._irsa_role(f"{name}-worker-role", args, issuer, args.service_account)
        access = args.worker_access
        aws.iam.RolePolicy(
            f"{name}-worker-policy",
            role=role.id,
            policy=pulumi.Output.all(
                access.data_key_arn, access.signing_key_arn, access.secrets_key_arn,
                access.archive_key_arn, access.archive_bucket_arn,
                pulumi.Output.all(*access.secret_arns), access.database_login_arn,
            ).apply(lambda v: json.dumps(worker_policy(
                data_key_arn=v[0], signing_key_arn=v[1], secrets_key_arn=v[2],
                archive_key_arn=v[3], archive_bucket_arn=v[4], secret_arns=list(v[5]),
                region=args.region, database_login_arn=v[6]))),
            opts=child,
        )
        self.worker_role_arn = role.arn
        self.migration_role_arn = (
            self._migration_role(name, args, issuer) if args.migration_access else None)

        self.register_outputs({
            "clusterName": self.cluster_name,
            "namespace": self.namespace,
            "workerRoleArn": self.worker_role_arn,
            "migrationRoleArn": self.migration_role_arn,
            "oidcProviderArn": self.oidc_provider_arn,
        })

    def _irsa_role(self, name: str, args: ClusterArgs, issuer: pulumi.Input[str],
                   service_account: str) -> aws.iam.Role:
        """An IRSA role only `service_account` in the namespace may assume."""
        return aws.iam.Role(
            name,
            description=f"audit-kit {args.environment}: IRSA role of "
                        f"{args.namespace}/{service_account}",
            assume_role_policy=pulumi.Output.all(self.oidc_provider_arn, issuer).apply(
                lambda v: json.dumps(worker_trust_policy(
                    oidc_provider_arn=v[0], issuer_url=v[1], namespace=args.namespace,
                    service_account=service_account))),
            max_session_duration=3600,
            opts=pulumi.ResourceOptions(parent=self),
        )

    def _migration_role(self, name: str, args: ClusterArgs,
                        issuer: pulumi.Input[str]) -> pulumi.Output[str]:
        """The migration Job's IRSA role (`MIGRATION_SERVICE_ACCOUNT`), apart from the
        worker's: only it may read the master secret."""
        access = args.migration_access
        assert access is not None
        child = pulumi.ResourceOptions(parent=self)
        role = self._irsa_role(f"{name}-migration-role", args, issuer,
                               MIGRATION_SERVICE_ACCOUNT)
        aws.iam.RolePolicy(
            f"{name}-migration-policy",
            role=role.id,
            policy=pulumi.Output.all(
                access.database_login_arn, access.master_secret_arn, access.secrets_key_arn,
            ).apply(lambda v: json.dumps(migration_policy(
                database_login_arn=v[0], master_secret_arn=v[1] or None,
                secrets_key_arn=v[2], region=args.region))),
            opts=child,
        )
        return role.arn

    def _create(self, name: str, args: ClusterArgs) -> tuple[pulumi.Output[str],
                                                              pulumi.Output[str]]:
        child = pulumi.ResourceOptions(parent=self)
        s = args.settings
        cluster_role = aws.iam.Role(
            f"{name}-cluster-role", assume_role_policy=_assume("eks.amazonaws.com"), opts=child)
        attachment = aws.iam.RolePolicyAttachment(
            f"{name}-cluster-policy", role=cluster_role.name,
            policy_arn="arn:aws:iam::aws:policy/AmazonEKSClusterPolicy", opts=child)
        # Trunk and branch interfaces for pod security groups are made by the VPC resource
        # controller, acting as the cluster role.
        vpc_controller = aws.iam.RolePolicyAttachment(
            f"{name}-cluster-vpc-resource-controller", role=cluster_role.name,
            policy_arn="arn:aws:iam::aws:policy/AmazonEKSVPCResourceController", opts=child)
        kms_use = aws.iam.RolePolicy(
            f"{name}-cluster-kms",
            role=cluster_role.id,
            policy=pulumi.Output.from_input(args.secrets_key_arn).apply(lambda arn: json.dumps({
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow",
                    "Action": ["kms:Encrypt", "kms:Decrypt", "kms:DescribeKey",
                               "kms:CreateGrant", "kms:ListGrants"],
                    "Resource": [arn],
                }],
            })),
            opts=child,
        )
        cluster = aws.eks.Cluster(
            f"{name}-eks",
            name=args.name,
            role_arn=cluster_role.arn,
            version=s.version,
            vpc_config=aws.eks.ClusterVpcConfigArgs(
                subnet_ids=args.subnet_ids,
                # Private access always: nodes and pods reach the API inside the VPC.
                endpoint_private_access=True,
                endpoint_public_access=s.endpoint_access == "public-restricted",
                public_access_cidrs=list(s.public_access_cidrs) or None,
            ),
            encryption_config=aws.eks.ClusterEncryptionConfigArgs(
                provider=aws.eks.ClusterEncryptionConfigProviderArgs(key_arn=args.secrets_key_arn),
                resources=["secrets"],
            ),
            access_config=aws.eks.ClusterAccessConfigArgs(
                # Access entries only; the roles in cluster.access, not whoever ran up first.
                authentication_mode="API",
                bootstrap_cluster_creator_admin_permissions=False,
            ),
            enabled_cluster_log_types=_LOG_TYPES,
            deletion_protection=args.hardened,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[
                attachment, kms_use, *args.log_groups]),
        )
        self.cluster_name = cluster.name
        self._access_ready = self._access_entries(name, cluster.name, args)
        cni = aws.eks.Addon(
            f"{name}-vpc-cni",
            cluster_name=cluster.name,
            addon_name="vpc-cni",
            configuration_values=json.dumps(VPC_CNI_CONFIGURATION, sort_keys=True),
            # The cluster starts with a self-managed aws-node: take it over.
            resolve_conflicts_on_create="OVERWRITE",
            resolve_conflicts_on_update="OVERWRITE",
            opts=pulumi.ResourceOptions(parent=self, depends_on=[vpc_controller]),
        )

        node_role = aws.iam.Role(
            f"{name}-node-role", assume_role_policy=_assume("ec2.amazonaws.com"), opts=child)
        node_attachments = [
            aws.iam.RolePolicyAttachment(
                f"{name}-node-{role}", role=node_role.name, policy_arn=arn, opts=child)
            for role, arn in _NODE_POLICIES.items()
        ]
        nodes_min, nodes_desired, nodes_max = s.node_scaling()
        template = aws.ec2.LaunchTemplate(
            f"{name}-node-template",
            description=f"audit-kit {args.environment}: EKS nodes",
            metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(
                http_endpoint="enabled",
                http_tokens="required",
                http_put_response_hop_limit=1,
            ),
            vpc_security_group_ids=[
                cluster.vpc_config.cluster_security_group_id,
                args.worker_security_group_id,
            ],
            block_device_mappings=[aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                device_name="/dev/xvda",
                ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                    volume_size=s.node_disk_gb, volume_type="gp3", encrypted="true",
                    delete_on_termination="true"),
            )],
            opts=child,
        )
        aws.eks.NodeGroup(
            f"{name}-nodes",
            cluster_name=cluster.name,
            node_role_arn=node_role.arn,
            subnet_ids=args.subnet_ids,
            instance_types=list(s.node_instance_types),
            ami_type="AL2023_x86_64_STANDARD",
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                min_size=nodes_min, desired_size=nodes_desired, max_size=nodes_max),
            update_config=aws.eks.NodeGroupUpdateConfigArgs(max_unavailable=1),
            launch_template=aws.eks.NodeGroupLaunchTemplateArgs(
                id=template.id, version=template.latest_version.apply(str)),
            # Nodes start with the CNI configured; the desired size belongs to whoever
            # resizes the group (a person, an autoscaler): the next up does not undo it.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*node_attachments, cni],
                                        ignore_changes=["scalingConfig.desiredSize"]),
        )
        issuer = cluster.identities.apply(_issuer)
        oidc = aws.iam.OpenIdConnectProvider(
            f"{name}-oidc",
            url=issuer,
            client_id_lists=["sts.amazonaws.com"],
            opts=child,
        )
        self.oidc_provider_arn = oidc.arn
        config = pulumi.Output.all(cluster.name, cluster.endpoint,
                                   cluster.certificate_authority.data).apply(
            lambda v: kubeconfig(cluster_name=v[0], endpoint=v[1], ca_data=v[2],
                                 region=args.region))
        return config, issuer

    def _access_entries(self, name: str, cluster_name: pulumi.Output[str],
                        args: ClusterArgs) -> list[pulumi.Resource]:
        """One access entry and one access policy association per role in cluster.access."""
        done: list[pulumi.Resource] = []
        for level, arn in args.settings.access.roles():
            policy_arn, scope = ACCESS_POLICIES[level]
            label = re.sub(r"[^A-Za-z0-9-]", "-", arn.split(":role/", 1)[1]).lower()
            entry = aws.eks.AccessEntry(
                f"{name}-access-{label}", cluster_name=cluster_name, principal_arn=arn,
                type="STANDARD", opts=pulumi.ResourceOptions(parent=self))
            done.append(aws.eks.AccessPolicyAssociation(
                f"{name}-access-{label}-{level}",
                cluster_name=cluster_name,
                principal_arn=entry.principal_arn,
                policy_arn=policy_arn,
                access_scope=aws.eks.AccessPolicyAssociationAccessScopeArgs(
                    type=scope, namespaces=[args.namespace] if scope == "namespace" else None),
                opts=pulumi.ResourceOptions(parent=self),
            ))
        return done

    def _pod_security_group_policy(self, name: str, namespace: k8s.core.v1.Namespace,
                                   group_id: pulumi.Input[str]) -> pulumi.CustomResource:
        """The worker's pods (by the chart's selector label) get the worker pod security
        group (https://docs.aws.amazon.com/eks/latest/userguide/security-groups-pods-deployment.html)."""
        return k8s.apiextensions.CustomResource(
            f"{name}-worker-security-group-policy",
            api_version="vpcresources.k8s.aws/v1beta1",
            kind="SecurityGroupPolicy",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name="audit-worker", namespace=namespace.metadata.apply(lambda m: m.name)),
            spec={
                "podSelector": {"matchLabels": dict(WORKER_POD_LABELS)},
                "securityGroups": {"groupIds": [group_id]},
            },
            opts=pulumi.ResourceOptions(parent=self, provider=self.provider),
        )

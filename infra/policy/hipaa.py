"""HIPAA guardrails for the audit kit, as Pulumi CrossGuard policies.

Each policy is a plain `ResourceValidationPolicy` (or `StackValidationPolicy`) whose validate
function takes ``(args, report_violation)``; ``__main__.py`` builds the `PolicyPack` from
`POLICIES`. Nothing here starts a server, so tests import this module directly.

Properties are the resource inputs as the engine sends them (camelCase). Per-environment
rules read the resource's ``environment`` tag, which the program puts on every AWS resource
(``infra/tagging.py``); a resource that should carry it and does not is itself a violation.

Under the real analyzer the properties are ``unknown_checking_proxy`` objects: nested values
are `Mapping` / `Sequence`, never dict / list, so the helpers test only those ABCs. The tests
run the pack through pulumi-policy's own analyzer path (``tests/infra/analyzer.py``: protobuf
requests from every stack's recorded resources into the servicer ``__main__.py``'s
`PolicyPack` builds), besides calling the validate functions with plain dicts.

=================================  =============================================  ============
policy                             checks                                         HIPAA
=================================  =============================================  ============
cmk-encryption-at-rest             RDS, ElastiCache, S3 SSE-KMS, EKS Secrets and  164.312(a)(2)(iv)
                                   Secrets Manager use a customer-managed key;
                                   no kmsKeyId / kmsKeyArn / kmsMasterKeyId (any
                                   resource, any depth) names alias/aws/...
kms-symmetric-key-rotation         symmetric KMS keys rotate                      164.312(a)(2)(iv)
no-public-data-stores              RDS not public; ElastiCache in private         164.312(e)(1)
                                   subnets behind security groups; no 0.0.0.0/0
                                   or ::/0 ingress (security groups, ingress
                                   rules); S3 public access blocked
tls-in-transit                     rds.force_ssl=1; Redis TLS; S3 denies non-TLS  164.312(e)(1)
database-audit-logging             PostgreSQL parameter groups load pgaudit, log  164.312(b)
                                   DDL, roles, writes and SET, never parameters
backup-retention                   RDS backups >= 7 days, >= 35 in prod           164.308(a)(7)
deletion-protection                prod and DR databases: deletion protection,    164.308(a)(7)
                                   final snapshot, Pulumi ``protect``
archive-object-lock                archive buckets: Object Lock COMPLIANCE for    164.316(b)(2)
                                   at least 6 years
containers-run-as-non-root         namespaces enforce the restricted Pod          164.308(a)(4)
                                   Security Standard; workloads and Helm values
                                   never run as root
archive-buckets-fully-protected    (stack) every archive bucket has SSE-KMS, a    164.312(c)(1)
                                   public access block, a TLS-only policy and
                                   Object Lock
no-plaintext-secret-outputs        (stack) no credential in any stack output      164.312(a)(1)
=================================  =============================================  ============

The analyzer receives secrets already decrypted and cannot tell a secret output from a plain
one, so `no-plaintext-secret-outputs` is stricter than "mark it secret": no stack output may
hold a credential at all. Export a Secrets Manager ARN instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)
from pulumi_policy.proxy import UnknownValueError

__all__ = [
    "HARDENED_ENVIRONMENTS",
    "POLICIES",
    "RESOURCE_POLICIES",
    "STACK_POLICIES",
    "archive_buckets_fully_protected",
    "archive_object_lock",
    "audit_trail",
    "backup_retention",
    "backups_copied_and_locked",
    "cmk_encryption_at_rest",
    "containers_run_as_non_root",
    "database_audit_logging",
    "deletion_protection",
    "kms_symmetric_key_rotation",
    "log_groups_retained_and_encrypted",
    "no_plaintext_secret_outputs",
    "no_public_data_stores",
    "tls_in_transit",
    "vpc_flow_logs",
]

HARDENED_ENVIRONMENTS = frozenset({"prod", "dr"})
MIN_BACKUP_DAYS = 7
PROD_BACKUP_DAYS = 35
ARCHIVE_YEARS = 6
ARCHIVE_PURPOSE = "audit-archive"
LOCK_RELAXED_ENVIRONMENTS = frozenset({"dev"})
"""Stacks whose archive lock may be GOVERNANCE (short retention, so that dev can be torn down)."""

RDS_INSTANCE = "aws:rds/instance:Instance"
RDS_PARAMETER_GROUP = "aws:rds/parameterGroup:ParameterGroup"
REDIS_GROUP = "aws:elasticache/replicationGroup:ReplicationGroup"
S3_BUCKET = "aws:s3/bucket:Bucket"
S3_BUCKET_V2 = "aws:s3/bucketV2:BucketV2"
S3_SSE = ("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
          "aws:s3/bucketServerSideEncryptionConfigurationV2:"
          "BucketServerSideEncryptionConfigurationV2")
S3_LOCK = ("aws:s3/bucketObjectLockConfiguration:BucketObjectLockConfiguration",
           "aws:s3/bucketObjectLockConfigurationV2:BucketObjectLockConfigurationV2")
S3_PUBLIC_ACCESS = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
S3_POLICY = "aws:s3/bucketPolicy:BucketPolicy"
EKS_CLUSTER = "aws:eks/cluster:Cluster"
SECRET = "aws:secretsmanager/secret:Secret"
KMS_KEY = "aws:kms/key:Key"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
INGRESS_RULES = ("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
                 "aws:ec2/securityGroupRule:SecurityGroupRule")
NAMESPACE = "kubernetes:core/v1:Namespace"
HELM_RELEASES = ("kubernetes:helm.sh/v3:Release", "kubernetes:helm.sh/v4:Chart",
                 "kubernetes:helm.sh/v3:Chart")
WORKLOADS: dict[str, tuple[str, ...]] = {
    # type -> path from the resource to its pod spec
    "kubernetes:core/v1:Pod": ("spec",),
    "kubernetes:apps/v1:Deployment": ("spec", "template", "spec"),
    "kubernetes:apps/v1:StatefulSet": ("spec", "template", "spec"),
    "kubernetes:apps/v1:DaemonSet": ("spec", "template", "spec"),
    "kubernetes:apps/v1:ReplicaSet": ("spec", "template", "spec"),
    "kubernetes:batch/v1:Job": ("spec", "template", "spec"),
    "kubernetes:batch/v1:CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
STACK = "pulumi:pulumi:Stack"

Validate = Callable[[ResourceValidationArgs, ReportViolation], None]

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _is_sequence(value: Any) -> bool:
    """A list-like value. The analyzer hands policies ``unknown_checking_proxy`` objects (a
    `Sequence` / `Mapping`, never a list / dict), so only the ABCs are tested; a str is a
    Sequence too but is one value here."""
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


def _get(props: Any, *path: str) -> Any:
    """props[path[0]][path[1]]...; None where anything is missing. Lists: first element."""
    current = props
    for key in path:
        if _is_sequence(current):
            current = current[0] if len(current) else None
        if not isinstance(current, Mapping):
            return None
        current = current.get(key)
    return current


def _list(value: Any) -> list[Any]:
    """The elements of a list-like value (one value is a list of one; None is empty)."""
    if value is None:
        return []
    if _is_sequence(value):
        return list(value)
    return [value]


def _plain(value: Any) -> Any:
    """Proxies (nested) as plain dicts and lists, e.g. for `json.dumps`."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if _is_sequence(value):
        return [_plain(v) for v in value]
    return value


def _tags(props: Mapping[str, Any]) -> Mapping[str, Any]:
    tags = props.get("tags")
    return tags if isinstance(tags, Mapping) else {}


def _environment(args: ResourceValidationArgs) -> str | None:
    value = _tags(args.props).get("environment")
    return str(value) if value else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _policy_document(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        try:
            loaded = json.loads(value)
        except ValueError:
            return {}
        return loaded if isinstance(loaded, dict) else {}
    return {}


def _where(args: ResourceValidationArgs) -> str:
    return f"{args.resource_type} '{args.name}'"


# --------------------------------------------------------------------------------------------
# Resource policies
# --------------------------------------------------------------------------------------------


# Key-reference properties (kmsKeyId, performanceInsightsKmsKeyId, kmsMasterKeyId,
# replicaKmsKeyId, kmsKeyArn, provider.keyArn, ...), matched on the lowercased name's end.
_KEY_PROPERTY_SUFFIXES = ("kmskeyid", "kmsmasterkeyid", "keyarn")
# alias/aws/<service> names an AWS-managed key, bare or as an alias ARN in any partition.
_AWS_MANAGED_KEY = re.compile(r"^(arn:aws[a-z-]*:kms:[^:]*:[^:]*:)?alias/aws/", re.IGNORECASE)


def _aws_managed_key_refs(value: Any, path: str = "") -> list[tuple[str, str]]:
    """(path, value) of every key-reference property, at any depth, that names an AWS-managed
    key. Only key-reference values are read: an unknown elsewhere (a preview) is skipped, so
    it cannot turn the whole policy into "can't run during preview"."""
    found: list[tuple[str, str]] = []
    if isinstance(value, Mapping):
        items: Iterable[tuple[str, Any]] = ((str(k), k) for k in value)
    elif _is_sequence(value):
        items = ((f"[{i}]", i) for i in range(len(value)))
    else:
        return found
    for label, key in items:
        here = f"{path}.{label}" if path and not label.startswith("[") else f"{path}{label}"
        is_key_ref = isinstance(key, str) and key.lower().endswith(_KEY_PROPERTY_SUFFIXES)
        try:
            sub = value[key]
        except UnknownValueError:
            if is_key_ref:
                raise  # the engine reports this one as "can't run during preview"
            continue
        if is_key_ref and isinstance(sub, str) and _AWS_MANAGED_KEY.match(sub):
            found.append((here, sub))
        found.extend(_aws_managed_key_refs(sub, here))
    return found


def cmk_encryption_at_rest(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """Data stores are encrypted at rest with a customer-managed KMS key."""
    p, where = args.props, _where(args)
    for path, key in _aws_managed_key_refs(p):
        report_violation(f"{where}: {path} is {key!r}, an AWS-managed key; name a "
                         "customer-managed key", None)
    if args.resource_type == RDS_INSTANCE:
        if p.get("storageEncrypted") is not True:
            report_violation(f"{where}: storageEncrypted must be true", None)
        if not p.get("kmsKeyId"):
            report_violation(f"{where}: kmsKeyId must name a customer-managed key "
                             "(the default aws/rds key cannot be audited or shared)", None)
        if p.get("performanceInsightsEnabled") and not p.get("performanceInsightsKmsKeyId"):
            report_violation(f"{where}: performanceInsightsKmsKeyId must name a "
                             "customer-managed key", None)
        if p.get("manageMasterUserPassword") and not p.get("masterUserSecretKmsKeyId"):
            report_violation(f"{where}: masterUserSecretKmsKeyId must name a customer-managed "
                             "key", None)
    elif args.resource_type == REDIS_GROUP:
        if p.get("atRestEncryptionEnabled") is not True:
            report_violation(f"{where}: atRestEncryptionEnabled must be true", None)
        if not p.get("kmsKeyId"):
            report_violation(f"{where}: kmsKeyId must name a customer-managed key", None)
    elif args.resource_type in S3_SSE:
        rules = _list(p.get("rules"))
        if not rules:
            report_violation(f"{where}: needs a rule with SSE-KMS", None)
        for rule in rules:
            default = _get(rule, "applyServerSideEncryptionByDefault") or {}
            if _get(default, "sseAlgorithm") not in ("aws:kms", "aws:kms:dsse"):
                report_violation(f"{where}: sseAlgorithm must be aws:kms (SSE-KMS), got "
                                 f"{_get(default, 'sseAlgorithm')!r}", None)
            if not _get(default, "kmsMasterKeyId"):
                report_violation(f"{where}: kmsMasterKeyId must name a customer-managed key",
                                 None)
    elif args.resource_type == EKS_CLUSTER:
        configs = _list(p.get("encryptionConfig"))
        if not any(_get(c, "provider", "keyArn") and "secrets" in _list(_get(c, "resources"))
                   for c in configs):
            report_violation(f"{where}: encryptionConfig must encrypt 'secrets' with a "
                             "customer-managed key (provider.keyArn)", None)
    elif args.resource_type == SECRET and not p.get("kmsKeyId"):
        report_violation(f"{where}: kmsKeyId must name a customer-managed key "
                         "(not aws/secretsmanager)", None)


def kms_symmetric_key_rotation(args: ResourceValidationArgs,
                               report_violation: ReportViolation) -> None:
    """Symmetric customer-managed keys rotate (asymmetric keys cannot)."""
    if args.resource_type != KMS_KEY:
        return
    p = args.props
    symmetric = (p.get("customerMasterKeySpec") or "SYMMETRIC_DEFAULT") == "SYMMETRIC_DEFAULT"
    if symmetric and (p.get("keyUsage") or "ENCRYPT_DECRYPT") == "ENCRYPT_DECRYPT" and (
            p.get("enableKeyRotation") is not True):
        report_violation(f"{_where(args)}: enableKeyRotation must be true for a symmetric key",
                         None)


def _open_to_world(cidrs: Iterable[Any]) -> bool:
    return any(str(c) in ("0.0.0.0/0", "::/0") for c in cidrs)


def no_public_data_stores(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """No database, cache or bucket is reachable from the internet."""
    p, where = args.props, _where(args)
    if args.resource_type == RDS_INSTANCE and p.get("publiclyAccessible") is not False:
        report_violation(f"{where}: publiclyAccessible must be false", None)
    elif args.resource_type == REDIS_GROUP:
        if not p.get("subnetGroupName"):
            report_violation(f"{where}: subnetGroupName must place Redis in private subnets",
                             None)
        if not _list(p.get("securityGroupIds")):
            report_violation(f"{where}: securityGroupIds must restrict who reaches Redis", None)
    elif args.resource_type == SECURITY_GROUP:
        for rule in _list(p.get("ingress")):
            if _open_to_world(_list(_get(rule, "cidrBlocks")) +
                              _list(_get(rule, "ipv6CidrBlocks"))):
                report_violation(f"{where}: ingress from 0.0.0.0/0 or ::/0 "
                                 f"(ports {_get(rule, 'fromPort')}-{_get(rule, 'toPort')})", None)
    elif args.resource_type in INGRESS_RULES:
        if args.resource_type.endswith("SecurityGroupRule") and p.get("type") != "ingress":
            return
        if _open_to_world([p.get("cidrIpv4"), p.get("cidrIpv6"),
                           *_list(p.get("cidrBlocks")), *_list(p.get("ipv6CidrBlocks"))]):
            report_violation(f"{where}: ingress from 0.0.0.0/0 or ::/0", None)
    elif args.resource_type == S3_PUBLIC_ACCESS:
        for key in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls",
                    "restrictPublicBuckets"):
            if p.get(key) is not True:
                report_violation(f"{where}: {key} must be true", None)


def _denies_insecure_transport(policy: Mapping[str, Any]) -> bool:
    for statement in _list(policy.get("Statement")):
        if not isinstance(statement, Mapping) or statement.get("Effect") != "Deny":
            continue
        secure = _get(statement, "Condition", "Bool", "aws:SecureTransport")
        actions = _list(statement.get("Action"))
        if str(secure).lower() == "false" and ("s3:*" in actions or "*" in actions):
            return True
    return False


def tls_in_transit(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """PostgreSQL forces TLS, Redis requires TLS, S3 buckets deny requests without TLS."""
    p, where = args.props, _where(args)
    if args.resource_type == RDS_PARAMETER_GROUP and str(p.get("family", "")).startswith(
            "postgres"):
        values = {str(_get(x, "name")): str(_get(x, "value")) for x in _list(p.get("parameters"))}
        if values.get("rds.force_ssl") != "1":
            report_violation(f"{where}: parameter rds.force_ssl must be 1", None)
    elif args.resource_type == RDS_INSTANCE and not p.get("replicateSourceDb"):
        group = str(p.get("parameterGroupName") or "")
        if not group or group.startswith("default."):
            report_violation(f"{where}: parameterGroupName must name a parameter group with "
                             "rds.force_ssl=1 (the default group allows plain connections)",
                             None)
    elif args.resource_type == REDIS_GROUP:
        if p.get("transitEncryptionEnabled") is not True:
            report_violation(f"{where}: transitEncryptionEnabled must be true", None)
        if p.get("transitEncryptionMode") not in (None, "required"):
            report_violation(f"{where}: transitEncryptionMode must be 'required'", None)
    elif args.resource_type == S3_POLICY and not _denies_insecure_transport(
            _policy_document(p.get("policy"))):
        report_violation(f"{where}: the bucket policy must deny s3:* when "
                         "aws:SecureTransport is false", None)


# What gets past the append-only triggers (migration 0003) is DDL (DISABLE TRIGGER, DETACH,
# DROP), a grant, a write, or SET session_replication_role: pgaudit must record each.
PGAUDIT_REQUIRED = ("ddl", "role", "write", "misc_set")
_PGAUDIT_ALL = frozenset({"read", "write", "function", "role", "ddl", "misc", "misc_set"})


def _pgaudit_classes(value: str) -> set[str]:
    """The classes a ``pgaudit.log`` value records (``all``, and ``-class`` subtractions)."""
    items = [item.strip().lower() for item in value.split(",") if item.strip()]
    wanted = {item for item in items if not item.startswith("-")}
    removed = {item[1:] for item in items if item.startswith("-")}
    classes = set(_PGAUDIT_ALL) if "all" in wanted else wanted
    if "misc" in classes:
        classes.add("misc_set")  # misc records every SET as well
    return classes - removed - ({"misc_set"} if "misc" in removed else set())


def database_audit_logging(args: ResourceValidationArgs,
                           report_violation: ReportViolation) -> None:
    """PostgreSQL parameter groups load pgaudit and log DDL, roles, writes and SET, never
    statement parameters (they can be patient data)."""
    p, where = args.props, _where(args)
    if args.resource_type != RDS_PARAMETER_GROUP or not str(p.get("family", "")).startswith(
            "postgres"):
        return
    values = {str(_get(x, "name")): str(_get(x, "value")) for x in _list(p.get("parameters"))}
    libraries = [x.strip() for x in values.get("shared_preload_libraries", "").split(",")]
    if "pgaudit" not in libraries:
        report_violation(f"{where}: parameter shared_preload_libraries must include pgaudit",
                         None)
    logged = values.get("pgaudit.log", "none")
    missing = [c for c in PGAUDIT_REQUIRED if c not in _pgaudit_classes(logged)]
    if missing:
        report_violation(f"{where}: parameter pgaudit.log must record {', '.join(missing)} "
                         f"(it is {logged!r}; use {','.join(PGAUDIT_REQUIRED)})", None)
    if values.get("pgaudit.log_parameter", "0").lower() not in ("0", "off", "false"):
        report_violation(f"{where}: parameter pgaudit.log_parameter must be 0: bound values "
                         "can be patient data", None)


def backup_retention(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """RDS keeps automated backups >= 7 days, >= 35 in prod (from the environment tag)."""
    if args.resource_type != RDS_INSTANCE:
        return
    environment = _environment(args)
    if environment is None:
        report_violation(f"{_where(args)}: missing the 'environment' tag that sets its backup "
                         "rule", None)
        return
    minimum = PROD_BACKUP_DAYS if environment == "prod" else MIN_BACKUP_DAYS
    days = _number(args.props.get("backupRetentionPeriod")) or 0
    if days < minimum:
        report_violation(f"{_where(args)}: backupRetentionPeriod is {days:g} days, must be >= "
                         f"{minimum} in {environment}", None)


def deletion_protection(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """Prod and DR databases: deletion protection, a final snapshot, and Pulumi protect."""
    if args.resource_type != RDS_INSTANCE:
        return
    environment = _environment(args)
    if environment is None:
        report_violation(f"{_where(args)}: missing the 'environment' tag", None)
        return
    if environment not in HARDENED_ENVIRONMENTS:
        return
    p, where = args.props, _where(args)
    if p.get("deletionProtection") is not True:
        report_violation(f"{where}: deletionProtection must be true in {environment}", None)
    # A read replica cannot take a final snapshot (RDS refuses it), so only primaries must.
    replica = bool(p.get("replicateSourceDb"))
    if not replica and (p.get("skipFinalSnapshot") is not False
                        or not p.get("finalSnapshotIdentifier")):
        report_violation(f"{where}: skipFinalSnapshot must be false with a "
                         f"finalSnapshotIdentifier in {environment}", None)
    if not getattr(args.opts, "protect", False):
        report_violation(f"{where}: must be declared with protect=True in {environment}", None)


def _lock_years(retention: Any) -> float:
    years = _number(_get(retention, "years"))
    if years is not None:
        return years
    days = _number(_get(retention, "days"))
    return days / 365 if days is not None else 0.0


def archive_object_lock(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """Archive buckets are under Object Lock, COMPLIANCE mode, for at least six years; only a
    dev stack may use GOVERNANCE (any positive retention) so that it can be torn down."""
    p, where = args.props, _where(args)
    if args.resource_type in (S3_BUCKET, S3_BUCKET_V2):
        if _tags(p).get("purpose") == ARCHIVE_PURPOSE and p.get("objectLockEnabled") is not True:
            report_violation(f"{where}: an archive bucket must have objectLockEnabled true", None)
    elif args.resource_type in S3_LOCK:
        retention = _get(p, "rule", "defaultRetention")
        # The lock configuration takes no tags: the environment is the stack's name in the URN
        # ("urn:pulumi:<stack>::..."). Anything but dev (or no readable name) is held to the rule.
        stack = args.urn.split(":", 3)[2] if args.urn.count(":") >= 3 else ""
        if stack in LOCK_RELAXED_ENVIRONMENTS and _get(retention, "mode") in (
                "GOVERNANCE", "COMPLIANCE"):
            if _lock_years(retention) <= 0:
                report_violation(f"{where}: default retention must be positive", None)
            return
        if _get(retention, "mode") != "COMPLIANCE":
            report_violation(f"{where}: default retention mode must be COMPLIANCE "
                             f"(got {_get(retention, 'mode')!r})", None)
        if _lock_years(retention) < ARCHIVE_YEARS:
            report_violation(f"{where}: default retention must be >= {ARCHIVE_YEARS} years "
                             f"(got {_lock_years(retention):g})", None)


def _root_settings(value: Any, path: str = "") -> list[str]:
    """Paths in (Helm) values that would run a container as root or privileged."""
    found: list[str] = []
    if isinstance(value, Mapping):
        for key, sub in value.items():
            here = f"{path}.{key}" if path else str(key)
            if ((key == "runAsNonRoot" and sub is False)
                    or (key == "runAsUser" and not isinstance(sub, bool) and _number(sub) == 0)
                    or (key in ("privileged", "allowPrivilegeEscalation") and sub is True)):
                found.append(f"{here}={sub}")
            found.extend(_root_settings(sub, here))
    elif _is_sequence(value):
        for i, sub in enumerate(value):
            found.extend(_root_settings(sub, f"{path}[{i}]"))
    return found


def containers_run_as_non_root(args: ResourceValidationArgs,
                               report_violation: ReportViolation) -> None:
    """No container runs as root: namespaces enforce "restricted", workloads say so."""
    p, where = args.props, _where(args)
    if args.resource_type == NAMESPACE:
        labels = _get(p, "metadata", "labels") or {}
        if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
            report_violation(f"{where}: label pod-security.kubernetes.io/enforce must be "
                             "'restricted' (it rejects pods that may run as root)", None)
    elif args.resource_type in HELM_RELEASES:
        for setting in _root_settings(p.get("values")):
            report_violation(f"{where}: values set {setting}", None)
    elif args.resource_type in WORKLOADS:
        spec = _get(p, *WORKLOADS[args.resource_type]) or {}
        pod_non_root = _get(spec, "securityContext", "runAsNonRoot") is True
        pod_user = _get(spec, "securityContext", "runAsUser")
        for container in _list(spec.get("containers")) + _list(spec.get("initContainers")):
            context = _get(container, "securityContext") or {}
            non_root = context.get("runAsNonRoot", pod_non_root) is True
            user = context.get("runAsUser", pod_user)
            if not non_root or _number(user) == 0:
                report_violation(f"{where}: container '{_get(container, 'name')}' must set "
                                 "runAsNonRoot: true (and no runAsUser: 0)", None)


# --------------------------------------------------------------------------------------------
# Stack policies
# --------------------------------------------------------------------------------------------


def archive_buckets_fully_protected(args: StackValidationArgs,
                                    report_violation: ReportViolation) -> None:
    """Every archive bucket has SSE-KMS, a public access block, a TLS policy and Object Lock."""
    buckets = {
        str(r.props.get("bucket") or r.props.get("id") or r.name): r
        for r in args.resources
        if r.resource_type in (S3_BUCKET, S3_BUCKET_V2)
        and _tags(r.props).get("purpose") == ARCHIVE_PURPOSE
    }
    needed = {
        "SSE-KMS encryption": S3_SSE,
        "a public access block": (S3_PUBLIC_ACCESS,),
        "a TLS-only bucket policy": (S3_POLICY,),
        "an Object Lock configuration": S3_LOCK,
    }
    for bucket_name, bucket in buckets.items():
        for what, types in needed.items():
            if not any(r.resource_type in types and str(r.props.get("bucket")) == bucket_name
                       for r in args.resources):
                report_violation(f"archive bucket '{bucket_name}' has no {what}", bucket.urn)


_CREDENTIAL_NAME = re.compile(
    r"(password|passwd|passphrase|secret(value|string|key)?$|auth_?token|api_?key|access_?key|"
    r"private_?key|client_?secret|connection_?string|(database|db|redis)_?url)",
    re.IGNORECASE)
_CREDENTIAL_VALUE = [
    (re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", re.IGNORECASE),
     "a URL with a password"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"\"?(client-key-data|token|password)\"?\s*:\s*\"?[^\s\",}]{8,}"),
     "a credential field"),
]
_ALLOWED_NAME_SUFFIXES = ("arn", "id", "name", "names", "key_id", "keyid", "arns")


def _credential_findings(name: str, value: Any) -> list[str]:
    findings: list[str] = []
    if _CREDENTIAL_NAME.search(name) and not name.lower().endswith(_ALLOWED_NAME_SUFFIXES):
        findings.append(f"output '{name}' is named like a credential")
    # Nested outputs arrive as proxies, which json.dumps would only repr() (hiding them).
    text = value if isinstance(value, str) else json.dumps(_plain(value), default=str)
    for pattern, what in _CREDENTIAL_VALUE:
        if pattern.search(text):
            findings.append(f"output '{name}' holds {what}")
    return findings


def no_plaintext_secret_outputs(args: StackValidationArgs,
                                report_violation: ReportViolation) -> None:
    """No stack output holds a credential (export the Secrets Manager ARN instead)."""
    for r in args.resources:
        if r.resource_type != STACK:
            continue
        for name, value in r.props.items():
            for finding in _credential_findings(str(name), value):
                report_violation(finding, r.urn)


# --------------------------------------------------------------------------------------------
# Stack policies: HIPAA controls of infra/compliance.py
# --------------------------------------------------------------------------------------------

VPC = "aws:ec2/vpc:Vpc"
AWSX_VPC = "awsx:ec2:Vpc"
FLOW_LOG = "aws:ec2/flowLog:FlowLog"
TRAIL = "aws:cloudtrail/trail:Trail"
LOG_GROUP = "aws:cloudwatch/logGroup:LogGroup"
BACKUP_PLAN = "aws:backup/plan:Plan"
BACKUP_SELECTION = "aws:backup/selection:Selection"
BACKUP_VAULT_LOCK = "aws:backup/vaultLockConfiguration:VaultLockConfiguration"
COMPLIANCE_COMPONENT = "audit:infra:Compliance"
LOG_RETENTION_DAYS = frozenset({
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557,
    2922, 3288, 3653})
"""CloudWatch Logs' retention values; a log group without one keeps logs forever."""


def _of_type(args: StackValidationArgs, *types: str) -> list[Any]:
    return [r for r in args.resources if r.resource_type in types]


def _stack_environment(args: StackValidationArgs) -> str | None:
    """The ``environment`` tag the program puts on every taggable resource (the first found)."""
    for r in args.resources:
        value = _tags(r.props).get("environment")
        if value:
            return str(value)
    return None


def _controls(args: StackValidationArgs) -> Mapping[str, Any]:
    """``hipaaControls`` of the stack's `infra.compliance` component (create or existing)."""
    for r in _of_type(args, COMPLIANCE_COMPONENT):
        found = r.props.get("hipaaControls")
        if isinstance(found, Mapping):
            return found
    return {}


def vpc_flow_logs(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    """Every VPC the stack creates has a flow log of ALL traffic."""
    logged = {str(r.props.get("vpcId")) for r in _of_type(args, FLOW_LOG)
              if r.props.get("trafficType") == "ALL"}
    for vpc in _of_type(args, VPC, AWSX_VPC):
        vpc_id = vpc.props.get("vpcId") if vpc.resource_type == AWSX_VPC else vpc.props.get("id")
        if str(vpc_id) not in logged:
            report_violation(f"VPC '{vpc.name}' has no flow log of ALL traffic "
                             "(aws.ec2.FlowLog with traffic_type ALL)", vpc.urn)


def _selector_fields(selector: Any) -> dict[str, Any]:
    return {str(_get(f, "field")): f for f in _list(_get(selector, "fieldSelectors"))}


def _records_management_events(trail: Any) -> bool:
    for selector in _list(trail.props.get("advancedEventSelectors")):
        fields = _selector_fields(selector)
        if "Management" in _list(_get(fields.get("eventCategory"), "equals")) and (
                "readOnly" not in fields):  # a readOnly field keeps only reads or only writes
            return True
    for selector in _list(trail.props.get("eventSelectors")):
        if _get(selector, "includeManagementEvents") is not False and _get(
                selector, "readWriteType") in (None, "All"):
            return True
    # Neither argument: CloudTrail records all management events.
    return not trail.props.get("advancedEventSelectors") and not trail.props.get(
        "eventSelectors")


def _records_objects_of(trail: Any, bucket_arn: str) -> bool:
    for selector in _list(trail.props.get("advancedEventSelectors")):
        fields = _selector_fields(selector)
        if "Data" not in _list(_get(fields.get("eventCategory"), "equals")) or (
                "AWS::S3::Object" not in _list(_get(fields.get("resources.type"), "equals"))):
            continue
        arn_field = fields.get("resources.ARN")
        # No ARN field: every bucket's objects. A startsWith prefix of "<bucket ARN>/" covers
        # every object of the bucket.
        if arn_field is None or any(f"{bucket_arn}/".startswith(str(p)) and str(p) for p in
                                    _list(_get(arn_field, "startsWiths"))):
            return True
    for selector in _list(trail.props.get("eventSelectors")):
        for resource in _list(_get(selector, "dataResources")):
            if _get(resource, "type") == "AWS::S3::Object" and any(
                    str(v) in (f"{bucket_arn}/", "arn:aws:s3") for v in
                    _list(_get(resource, "values"))):
                return True
    return False


def audit_trail(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    """A multi-region trail with log file validation and a customer-managed key records
    management events (read and write, KMS calls among them) and object access on every
    archive bucket; unless the stack declares ``compliance.cloudtrail: existing``."""
    if _controls(args).get("cloudtrail") == "existing":
        return  # the account's trail is outside the stack; the guide lists what it needs
    trails = _of_type(args, TRAIL)
    if not trails:
        report_violation("the stack has no CloudTrail trail (set compliance.cloudtrail: create, "
                         "or existing when the account's trail covers this region)", None)
        return
    good = [t for t in trails if t.props.get("isMultiRegionTrail") is True
            and t.props.get("enableLogFileValidation") is True and t.props.get("kmsKeyId")
            and t.props.get("enableLogging") is not False and _records_management_events(t)]
    if not good:
        report_violation("no trail is multi-region with enableLogFileValidation, a kmsKeyId "
                         "and management events (read and write)", trails[0].urn)
        return
    for bucket in _of_type(args, S3_BUCKET, S3_BUCKET_V2):
        if _tags(bucket.props).get("purpose") != ARCHIVE_PURPOSE:
            continue
        arn = str(bucket.props.get("arn") or "")
        if not any(_records_objects_of(t, arn) for t in good):
            report_violation(f"archive bucket '{bucket.name}': no trail records its object "
                             "access (a data event selector for AWS::S3::Object on it)",
                             bucket.urn)


def log_groups_retained_and_encrypted(args: StackValidationArgs,
                                      report_violation: ReportViolation) -> None:
    """Log groups have a retention and a customer-managed key, and the EKS control-plane and
    RDS log groups exist in the stack (else AWS creates them unencrypted, kept forever)."""
    groups = _of_type(args, LOG_GROUP)
    for group in groups:
        days = _number(group.props.get("retentionInDays"))
        if days is None or int(days) not in LOG_RETENTION_DAYS:
            report_violation(f"log group '{group.name}': retentionInDays must be one of "
                             f"CloudWatch's values (got {group.props.get('retentionInDays')!r})",
                             group.urn)
        if not group.props.get("kmsKeyId"):
            report_violation(f"log group '{group.name}': kmsKeyId must name a "
                             "customer-managed key", group.urn)
    names = {str(g.props.get("name")) for g in groups}
    needed: list[tuple[Any, str]] = []
    for cluster in _of_type(args, EKS_CLUSTER):
        if _list(cluster.props.get("enabledClusterLogTypes")):
            needed.append((cluster, f"/aws/eks/{cluster.props.get('name')}/cluster"))
    for db in _of_type(args, RDS_INSTANCE):
        for log in _list(db.props.get("enabledCloudwatchLogsExports")):
            needed.append((db, f"/aws/rds/instance/{db.props.get('identifier')}/{log}"))
    for owner, name in needed:
        if name not in names:
            report_violation(f"'{owner.name}' logs to {name}, which the stack does not declare "
                             "(with retention and a key)", owner.urn)


def backups_copied_and_locked(args: StackValidationArgs,
                              report_violation: ReportViolation) -> None:
    """Every database is in an AWS Backup selection; in prod and DR the vaults are locked in
    COMPLIANCE mode, and prod's plan copies each backup to another region (DR's own
    backups stay in its region: a copy into prod's region would make a DR `up` need it)."""
    environment = _stack_environment(args)
    hardened = environment is None or environment in HARDENED_ENVIRONMENTS
    plans = {str(p.props.get("id") or p.name): p for p in _of_type(args, BACKUP_PLAN)}
    locks = {str(lock.props.get("backupVaultName")): lock
             for lock in _of_type(args, BACKUP_VAULT_LOCK)}
    selections = _of_type(args, BACKUP_SELECTION)
    for db in _of_type(args, RDS_INSTANCE):
        arn, ident = str(db.props.get("arn") or ""), str(db.props.get("identifier") or "")
        covering = [s for s in selections if any(
            str(r) == arn or (ident and str(r).endswith(f":db:{ident}"))
            for r in _list(s.props.get("resources")))]
        # A selection names its plan by id, which stack policies may not see among a plan's
        # properties: then every plan of the stack counts (each must then pass).
        chosen = [plans[str(s.props.get("planId"))] for s in covering
                  if str(s.props.get("planId")) in plans] or (
            list(plans.values()) if covering else [])
        if not chosen:
            report_violation(f"database '{db.name}' is in no AWS Backup plan's selection",
                             db.urn)
            continue
        if not hardened:
            continue
        rules = [rule for plan in chosen for rule in _list(plan.props.get("rules"))]
        if environment != "dr" and not any(_list(_get(rule, "copyActions")) for rule in rules):
            report_violation(f"database '{db.name}': its backup plan must copy each backup to "
                             f"another region (copyActions) in {environment or 'this stack'}",
                             db.urn)
        for rule in rules:
            vault = str(_get(rule, "targetVaultName"))
            lock = locks.get(vault)
            if lock is None or _number(lock.props.get("changeableForDays")) is None:
                report_violation(f"backup vault '{vault}' must have a COMPLIANCE-mode vault "
                                 "lock (changeableForDays set)", db.urn)
    if hardened:
        for lock in locks.values():
            if _number(lock.props.get("changeableForDays")) is None:
                report_violation(f"vault lock '{lock.name}' must be COMPLIANCE mode "
                                 "(changeableForDays set)", lock.urn)


# --------------------------------------------------------------------------------------------
# The policies
# --------------------------------------------------------------------------------------------

_MANDATORY = EnforcementLevel.MANDATORY


def _resource_policy(name: str, validate: Validate, remediation: str) -> ResourceValidationPolicy:
    return ResourceValidationPolicy(
        name=name,
        description=(validate.__doc__ or name).strip(),
        validate=validate,
        enforcement_level=_MANDATORY,
        remediation_steps=remediation,
    )


RESOURCE_POLICIES: list[ResourceValidationPolicy] = [
    _resource_policy("cmk-encryption-at-rest", cmk_encryption_at_rest,
                     "Pass the layer's key from infra/keys.py (kms_key_id / key_arn)."),
    _resource_policy("kms-symmetric-key-rotation", kms_symmetric_key_rotation,
                     "Set enable_key_rotation=True on the aws.kms.Key."),
    _resource_policy("no-public-data-stores", no_public_data_stores,
                     "Keep data stores in private subnets behind the worker-only groups."),
    _resource_policy("tls-in-transit", tls_in_transit,
                     "Use infra/database.py's parameter group, transit_encryption_enabled, "
                     "and infra/archive.py's tls_only_policy."),
    _resource_policy("database-audit-logging", database_audit_logging,
                     "Use infra/database.py's parameter group (PARAMETERS)."),
    _resource_policy("backup-retention", backup_retention,
                     "Raise database.backup_retention_days in environments/<env>.yaml."),
    _resource_policy("deletion-protection", deletion_protection,
                     "Set database.deletion_protection; Database sets protect in prod and dr."),
    _resource_policy("archive-object-lock", archive_object_lock,
                     "Use infra/archive.py (COMPLIANCE, archive.object_lock_years >= 6)."),
    _resource_policy("containers-run-as-non-root", containers_run_as_non_root,
                     "Label namespaces restricted; never override the chart's securityContext."),
]

STACK_POLICIES: list[StackValidationPolicy] = [
    StackValidationPolicy(
        name="archive-buckets-fully-protected",
        description=(archive_buckets_fully_protected.__doc__ or "").strip(),
        validate=archive_buckets_fully_protected,
        enforcement_level=_MANDATORY,
    ),
    StackValidationPolicy(
        name="no-plaintext-secret-outputs",
        description=(no_plaintext_secret_outputs.__doc__ or "").strip(),
        validate=no_plaintext_secret_outputs,
        enforcement_level=_MANDATORY,
        remediation_steps="Export the Secrets Manager ARN, not the value.",
    ),
]

STACK_POLICIES += [
    StackValidationPolicy(
        name=name, description=(validate.__doc__ or name).strip(), validate=validate,
        enforcement_level=_MANDATORY, remediation_steps=remediation)
    for name, validate, remediation in (
        ("vpc-flow-logs", vpc_flow_logs, "infra/compliance.py declares a FlowLog per new VPC."),
        ("audit-trail", audit_trail,
         "Set compliance.cloudtrail: create (or existing, with the guide's requirements)."),
        ("log-groups-retained-and-encrypted", log_groups_retained_and_encrypted,
         "Declare the log group in infra/compliance.py before the cluster or database."),
        ("backups-copied-and-locked", backups_copied_and_locked,
         "infra/compliance.py: a copy region (dr settings) and backup_vault_lock: compliance."),
    )
]

POLICIES: list[ResourceValidationPolicy | StackValidationPolicy] = [
    *RESOURCE_POLICIES, *STACK_POLICIES]

"""HIPAA controls of a stack: flow logs, CloudTrail, GuardDuty, log groups and AWS Backup.

=================  ==========================================================================
control            what the component declares
=================  ==========================================================================
flow logs          ``aws.ec2.FlowLog`` (ALL traffic) of a VPC created here, to a CloudWatch
                   log group; an IAM role that only VPC Flow Logs of this account can assume
CloudTrail         ``compliance.cloudtrail: create``: a multi-region trail with log file
                   validation, SSE-KMS (trail key), management events read and write, and S3
                   object data events on every archive bucket; to a dedicated, private,
                   TLS-only bucket. ``existing``: none (an account or organization trail must
                   already cover this region and the archive buckets)
GuardDuty          ``compliance.guardduty: create``: the region's detector (one per account
                   and region: ``existing`` when someone already enabled it)
log groups         ``/aws/eks/<cluster>/cluster``, ``/aws/rds/instance/<db>/postgresql`` and
                   ``.../upgrade``, the flow-log group: retention ``log_retention_days`` and
                   the logs key. Created *before* the cluster and the database (they depend on
                   them), else AWS creates them first, unencrypted and kept forever
AWS Backup         a vault (backup key) with a vault lock, a daily plan of the database with
                   ``backup_retention_days``; prod: a locked vault in the DR region (its own
                   key) and a copy action to it. DR copies nowhere (a DR ``up`` must not
                   need prod's region); prod's copies already sit in DR's region
=================  ==========================================================================

Keys are customer-managed and rotate yearly, administered by the account root like
`infra.keys`; each key policy lets only the AWS service that needs the key use it.

- Log groups with KMS: https://docs.aws.amazon.com/AmazonCloudWatch/latest/logs/encrypt-log-data-kms.html
- CloudTrail and KMS: https://docs.aws.amazon.com/awscloudtrail/latest/userguide/create-kms-key-policy-for-cloudtrail.html
- CloudTrail bucket policy: https://docs.aws.amazon.com/awscloudtrail/latest/userguide/create-s3-bucket-policy-for-cloudtrail.html
- Vault lock: https://docs.aws.amazon.com/aws-backup/latest/devguide/vault-lock.html

The component's inputs carry ``hipaaControls`` (``cloudtrail`` / ``guardduty``: create or
existing): the policy pack reads it to know that a stack relies on an existing trail.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pulumi
import pulumi_aws as aws

from infra.archive import Archive, tls_only_policy
from infra.keys import _ADMIN_ACTIONS  # the same key administration as every other key
from infra.network import Network
from infra.settings import ComplianceSettings, EnvironmentSettings

__all__ = [
    "BACKUP_SCHEDULE",
    "COMPONENT_TYPE",
    "VAULT_LOCK_COOLING_OFF_DAYS",
    "Compliance",
    "ComplianceArgs",
    "compliance_args",
    "compliance_key_policy",
    "db_identifier",
    "db_log_group_names",
    "eks_cluster_name",
    "eks_log_group_name",
    "trail_bucket_policy",
    "trail_event_selectors",
]

COMPONENT_TYPE = "audit:infra:Compliance"
BACKUP_SCHEDULE = "cron(0 5 ? * * *)"
"""Daily at 05:00 UTC: after the RDS backup window (03:00-04:00) and its maintenance window."""
VAULT_LOCK_COOLING_OFF_DAYS = 3
"""COMPLIANCE-mode vault lock: removable for this many days, then immutable (3 is the least
AWS Backup accepts)."""
RDS_LOG_EXPORTS: tuple[str, ...] = ("postgresql", "upgrade")
"""``enabled_cloudwatch_logs_exports`` of the instance (`infra.database`)."""
BACKUP_SERVICE_POLICY = "arn:aws:iam::aws:policy/service-role/AWSBackupServiceRolePolicyForBackup"

KeyPurpose = Literal["logs", "trail", "backup"]


def eks_cluster_name(environment: str) -> str:
    """The explicit name of a new EKS cluster (its log group is named after it)."""
    return f"audit-kit-{environment}"


def db_identifier(environment: str) -> str:
    """The explicit RDS identifier (the DR replica's too): its log groups use it."""
    return f"audit-kit-{environment}-db"


def eks_log_group_name(cluster_name: str) -> str:
    return f"/aws/eks/{cluster_name}/cluster"


def db_log_group_names(identifier: str) -> list[str]:
    return [f"/aws/rds/instance/{identifier}/{log}" for log in RDS_LOG_EXPORTS]


def compliance_key_policy(*, account_id: str, region: str, purpose: KeyPurpose,
                          trail_arn: str | None = None) -> dict[str, Any]:
    """Root administers; only the service of ``purpose`` may use the key."""
    root = f"arn:aws:iam::{account_id}:root"
    statements: list[dict[str, Any]] = [{
        "Sid": "KeyAdministration", "Effect": "Allow", "Principal": {"AWS": root},
        "Action": _ADMIN_ACTIONS, "Resource": "*",
    }]
    if purpose == "logs":
        # CloudWatch Logs encrypts with the key for log groups of this account and region only.
        statements.append({
            "Sid": "CloudWatchLogs", "Effect": "Allow",
            "Principal": {"Service": f"logs.{region}.amazonaws.com"},
            "Action": ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*",
                       "kms:Describe*"],
            "Resource": "*",
            "Condition": {"ArnLike": {"kms:EncryptionContext:aws:logs:arn":
                                      f"arn:aws:logs:{region}:{account_id}:log-group:*"}},
        })
    elif purpose == "trail":
        if trail_arn is None:
            raise ValueError("the trail key policy needs the trail's ARN")
        statements += [
            {"Sid": "CloudTrailEncrypt", "Effect": "Allow",
             "Principal": {"Service": "cloudtrail.amazonaws.com"},
             "Action": "kms:GenerateDataKey*", "Resource": "*",
             "Condition": {
                 "StringEquals": {"aws:SourceArn": trail_arn},
                 "StringLike": {"kms:EncryptionContext:aws:cloudtrail:arn":
                                f"arn:aws:cloudtrail:*:{account_id}:trail/*"}}},
            {"Sid": "CloudTrailDescribe", "Effect": "Allow",
             "Principal": {"Service": "cloudtrail.amazonaws.com"},
             "Action": "kms:DescribeKey", "Resource": "*",
             "Condition": {"StringEquals": {"aws:SourceArn": trail_arn}}},
            # Reading the logs (and validating digests) needs Decrypt: IAM of this account
            # decides who, for CloudTrail-encrypted objects only.
            {"Sid": "ReadTrailLogs", "Effect": "Allow", "Principal": {"AWS": root},
             "Action": ["kms:Decrypt", "kms:ReEncryptFrom"], "Resource": "*",
             "Condition": {
                 "StringEquals": {"kms:CallerAccount": account_id},
                 "StringLike": {"kms:EncryptionContext:aws:cloudtrail:arn":
                                f"arn:aws:cloudtrail:*:{account_id}:trail/*"}}},
        ]
    else:  # backup: recovery points and RDS snapshot copies into the vault
        statements.append({
            "Sid": "UseThroughBackupAndRds", "Effect": "Allow", "Principal": {"AWS": root},
            "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*",
                       "kms:DescribeKey", "kms:CreateGrant", "kms:ListGrants"],
            "Resource": "*",
            "Condition": {"StringEquals": {
                "kms:CallerAccount": account_id,
                "kms:ViaService": [f"backup.{region}.amazonaws.com",
                                   f"rds.{region}.amazonaws.com"]}},
        })
    return {"Version": "2012-10-17", "Id": f"audit-kit-{purpose}", "Statement": statements}


def trail_bucket_policy(*, bucket_arn: str, trail_arn: str, account_id: str) -> dict[str, Any]:
    """TLS only, and CloudTrail (for this trail only) may check the ACL and write its logs."""
    policy = tls_only_policy(bucket_arn)
    source = {"aws:SourceArn": trail_arn}
    policy["Statement"] += [
        {"Sid": "CloudTrailAclCheck", "Effect": "Allow",
         "Principal": {"Service": "cloudtrail.amazonaws.com"}, "Action": "s3:GetBucketAcl",
         "Resource": bucket_arn, "Condition": {"StringEquals": source}},
        {"Sid": "CloudTrailWrite", "Effect": "Allow",
         "Principal": {"Service": "cloudtrail.amazonaws.com"}, "Action": "s3:PutObject",
         "Resource": f"{bucket_arn}/AWSLogs/{account_id}/*",
         "Condition": {"StringEquals": {**source,
                                        "s3:x-amz-acl": "bucket-owner-full-control"}}},
    ]
    return policy


def trail_event_selectors(archive_bucket_arns: Sequence[str]) -> list[dict[str, Any]]:
    """Management events (KMS calls are management events), read and write; object-level data
    events on the archive buckets (who read or wrote which log segment)."""
    selectors: list[dict[str, Any]] = [{
        "name": "Management events, read and write",
        "field_selectors": [{"field": "eventCategory", "equals": ["Management"]}],
    }]
    if archive_bucket_arns:
        selectors.append({
            "name": "Archive object access",
            "field_selectors": [
                {"field": "eventCategory", "equals": ["Data"]},
                {"field": "resources.type", "equals": ["AWS::S3::Object"]},
                {"field": "resources.ARN",
                 "starts_withs": [f"{arn}/" for arn in archive_bucket_arns]},
            ],
        })
    return selectors


@dataclass(frozen=True, kw_only=True)
class ComplianceArgs:
    environment: str
    region: str
    settings: ComplianceSettings
    hardened: bool
    deletion_window_days: int
    db_identifier: str
    """The database's identifier (`db_identifier`), for its log groups and backup selection."""
    vpc_id: pulumi.Input[str] | None = None
    """A VPC created by this stack (an existing VPC's flow logs belong to its owner)."""
    cluster_name: str | None = None
    """A cluster created by this stack (`eks_cluster_name`)."""
    archive_bucket_arns: Sequence[pulumi.Input[str]] = ()
    """Archive buckets whose object access the trail records (prod: primary and replica)."""
    copy_region: str | None = None
    """Where backups are copied (prod: DR's region; DR: the primary region)."""


def compliance_args(settings: EnvironmentSettings, network: Network,
                    archive_bucket_arn: pulumi.Input[str],
                    archive: Archive | None) -> ComplianceArgs:
    """The controls of one stack from its settings and the layers they cover."""
    cloud = settings.cloud()
    dr = settings.dr
    # Prod copies each backup into the DR region. DR copies nowhere: a copy vault in prod's
    # region would make a DR `up` depend on the region a failover is for.
    copy_region = dr.dr_region if dr is not None and settings.name == "prod" else None
    buckets: list[pulumi.Input[str]] = [archive_bucket_arn]
    if archive is not None and archive.replica_bucket_arn is not None:
        buckets.append(archive.replica_bucket_arn)
    return ComplianceArgs(
        environment=settings.name,
        region=settings.region,
        settings=settings.compliance,
        hardened=settings.hardened,
        deletion_window_days=settings.keys.deletion_window_days,
        db_identifier=db_identifier(settings.name),
        vpc_id=network.vpc_id if cloud.network.vpc_cidr is not None else None,
        cluster_name=eks_cluster_name(settings.name) if cloud.cluster.create else None,
        archive_bucket_arns=buckets,
        copy_region=copy_region,
    )


class Compliance(pulumi.ComponentResource):
    """The stack's HIPAA controls (see the module's table)."""

    logs_key_arn: pulumi.Output[str]
    log_group_names: list[str]
    cluster_log_groups: list[aws.cloudwatch.LogGroup]
    database_log_groups: list[aws.cloudwatch.LogGroup]
    trail_arn: pulumi.Output[str] | None
    detector_id: pulumi.Output[str] | None
    vault_arn: pulumi.Output[str]
    copy_vault_arn: pulumi.Output[str] | None
    backup_plan_id: pulumi.Output[str]

    def __init__(self, name: str, args: ComplianceArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        s = args.settings
        controls = {"cloudtrail": s.cloudtrail, "guardduty": s.guardduty}
        super().__init__(COMPONENT_TYPE, name, {"hipaaControls": controls}, opts)
        self._name, self._args = name, args
        self._account_id = aws.get_caller_identity_output(
            opts=pulumi.InvokeOutputOptions(parent=self)).account_id
        child = pulumi.ResourceOptions(parent=self)

        # --- Log groups (before the cluster and the database) and flow logs ----------------
        self.logs_key_arn = self._key("logs", args.region)
        self.log_group_names = []
        self.cluster_log_groups = [self._log_group("eks-log-group", eks_log_group_name(
            args.cluster_name))] if args.cluster_name else []
        self.database_log_groups = [
            self._log_group(f"rds-{log}-log-group", group)
            for log, group in zip(RDS_LOG_EXPORTS, db_log_group_names(args.db_identifier),
                                  strict=True)]
        if args.vpc_id is not None:
            self._flow_logs(args.vpc_id)

        # --- CloudTrail and GuardDuty -------------------------------------------------------
        self.trail_arn = self._trail() if s.cloudtrail == "create" else None
        self.detector_id = None
        if s.guardduty == "create":
            self.detector_id = aws.guardduty.Detector(
                f"{name}-guardduty", enable=True, finding_publishing_frequency="FIFTEEN_MINUTES",
                opts=child).id

        # --- AWS Backup ---------------------------------------------------------------------
        vault_name = f"audit-kit-{args.environment}"
        vault = self._vault("vault", vault_name, args.region)
        self.vault_arn = vault.arn
        self.copy_vault_arn = None
        if args.copy_region is not None:
            self.copy_vault_arn = self._vault(
                "copy-vault", f"{vault_name}-copy-from-{args.region}", args.copy_region).arn
        self.backup_plan_id = self._backup_plan(vault.name)

        self.register_outputs({
            "hipaaControls": controls,
            "logGroupNames": self.log_group_names,
            "trailArn": self.trail_arn,
            "vaultArn": self.vault_arn,
            "copyVaultArn": self.copy_vault_arn,
        })

    # -- keys and log groups ---------------------------------------------------------------

    def _key(self, purpose: KeyPurpose, region: str, *, suffix: str = "",
             trail_arn: pulumi.Input[str] | None = None) -> pulumi.Output[str]:
        args = self._args
        policy = pulumi.Output.all(self._account_id, trail_arn).apply(
            lambda v: json.dumps(compliance_key_policy(
                account_id=v[0], region=region, purpose=purpose, trail_arn=v[1])))
        key = aws.kms.Key(
            f"{self._name}-{purpose}{suffix}-key",
            description=f"audit-kit {args.environment}: {purpose} ({region})",
            enable_key_rotation=True,
            rotation_period_in_days=365,
            deletion_window_in_days=args.deletion_window_days,
            policy=policy,
            region=region if region != args.region else None,
            opts=pulumi.ResourceOptions(parent=self, protect=args.hardened),
        )
        aws.kms.Alias(f"{self._name}-{purpose}{suffix}-key-alias",
                      name=f"alias/audit-kit-{args.environment}-{purpose}{suffix}",
                      target_key_id=key.key_id,
                      region=region if region != args.region else None,
                      opts=pulumi.ResourceOptions(parent=self))
        return key.arn

    def _log_group(self, role: str, group_name: str) -> aws.cloudwatch.LogGroup:
        self.log_group_names.append(group_name)
        return aws.cloudwatch.LogGroup(
            f"{self._name}-{role}",
            name=group_name,
            retention_in_days=self._args.settings.log_retention_days,
            kms_key_id=self.logs_key_arn,
            opts=pulumi.ResourceOptions(parent=self, protect=self._args.hardened),
        )

    def _flow_logs(self, vpc_id: pulumi.Input[str]) -> None:
        args, child = self._args, pulumi.ResourceOptions(parent=self)
        group = self._log_group("flow-log-group", f"/aws/vpc/audit-kit-{args.environment}/flow")
        role = aws.iam.Role(
            f"{self._name}-flow-log-role",
            description=f"audit-kit {args.environment}: VPC flow logs to CloudWatch Logs",
            assume_role_policy=self._account_id.apply(lambda acct: json.dumps({
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow", "Principal": {"Service": "vpc-flow-logs.amazonaws.com"},
                    "Action": "sts:AssumeRole",
                    # Only flow logs of this account (confused-deputy protection).
                    "Condition": {
                        "StringEquals": {"aws:SourceAccount": acct},
                        "ArnLike": {"aws:SourceArn":
                                    f"arn:aws:ec2:{args.region}:{acct}:vpc-flow-log/*"}},
                }],
            })),
            opts=child,
        )
        access = aws.iam.RolePolicy(
            f"{self._name}-flow-log-policy",
            role=role.id,
            policy=group.arn.apply(lambda arn: json.dumps({
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow",
                    "Action": ["logs:CreateLogStream", "logs:PutLogEvents",
                               "logs:DescribeLogGroups", "logs:DescribeLogStreams"],
                    "Resource": [arn, f"{arn}:*"],
                }],
            })),
            opts=child,
        )
        aws.ec2.FlowLog(
            f"{self._name}-flow-log",
            vpc_id=vpc_id,
            traffic_type="ALL",
            log_destination_type="cloud-watch-logs",
            log_destination=group.arn,
            iam_role_arn=role.arn,
            max_aggregation_interval=60,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[access]),
        )

    # -- CloudTrail ------------------------------------------------------------------------

    def _trail(self) -> pulumi.Output[str]:
        args, child = self._args, pulumi.ResourceOptions(parent=self)
        trail_name = f"audit-kit-{args.environment}"
        # The trail's ARN is known before it exists: the key and bucket policies name it.
        trail_arn = self._account_id.apply(
            lambda acct: f"arn:aws:cloudtrail:{args.region}:{acct}:trail/{trail_name}")
        key_arn = self._key("trail", args.region, trail_arn=trail_arn)
        bucket = aws.s3.Bucket(
            f"{self._name}-trail-bucket",
            bucket_prefix=f"audit-kit-{args.environment}-trail-",
            force_destroy=False,
            tags={"purpose": "audit-trail"},
            opts=pulumi.ResourceOptions(parent=self, protect=args.hardened),
        )
        aws.s3.BucketOwnershipControls(
            f"{self._name}-trail-bucket-ownership", bucket=bucket.id,
            rule=aws.s3.BucketOwnershipControlsRuleArgs(object_ownership="BucketOwnerEnforced"),
            opts=child)
        aws.s3.BucketVersioning(
            f"{self._name}-trail-bucket-versioning", bucket=bucket.id,
            versioning_configuration=aws.s3.BucketVersioningVersioningConfigurationArgs(
                status="Enabled"),
            opts=child)
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{self._name}-trail-bucket-encryption", bucket=bucket.id,
            rules=[{"apply_server_side_encryption_by_default": {
                "sse_algorithm": "aws:kms", "kms_master_key_id": key_arn},
                "bucket_key_enabled": True}],
            opts=child)
        public_access = aws.s3.BucketPublicAccessBlock(
            f"{self._name}-trail-bucket-public-access", bucket=bucket.id,
            block_public_acls=True, block_public_policy=True, ignore_public_acls=True,
            restrict_public_buckets=True, opts=child)
        bucket_policy = aws.s3.BucketPolicy(
            f"{self._name}-trail-bucket-policy", bucket=bucket.id,
            policy=pulumi.Output.all(bucket.arn, trail_arn, self._account_id).apply(
                lambda v: json.dumps(trail_bucket_policy(
                    bucket_arn=v[0], trail_arn=v[1], account_id=v[2]))),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[public_access]))
        selectors = pulumi.Output.all(*args.archive_bucket_arns).apply(
            lambda arns: [aws.cloudtrail.TrailAdvancedEventSelectorArgs(
                name=selector["name"],
                field_selectors=[aws.cloudtrail.TrailAdvancedEventSelectorFieldSelectorArgs(
                    **field) for field in selector["field_selectors"]])
                for selector in trail_event_selectors([str(a) for a in arns])])
        trail = aws.cloudtrail.Trail(
            f"{self._name}-trail",
            name=trail_name,
            s3_bucket_name=bucket.bucket,
            is_multi_region_trail=True,
            include_global_service_events=True,
            enable_log_file_validation=True,
            enable_logging=True,
            kms_key_id=key_arn,
            advanced_event_selectors=selectors,
            # CloudTrail checks the bucket policy when the trail is created.
            opts=pulumi.ResourceOptions(parent=self, protect=args.hardened,
                                        depends_on=[bucket_policy]),
        )
        return trail.arn

    # -- AWS Backup ------------------------------------------------------------------------

    def _vault(self, role: str, vault_name: str, region: str) -> aws.backup.Vault:
        args, s = self._args, self._args.settings
        local = region == args.region
        key_arn = self._key("backup", region, suffix="" if local else "-copy")
        vault = aws.backup.Vault(
            f"{self._name}-{role}",
            name=vault_name,
            kms_key_arn=key_arn,
            force_destroy=False,
            region=None if local else region,
            opts=pulumi.ResourceOptions(parent=self, protect=args.hardened),
        )
        # Without changeable_for_days the lock is GOVERNANCE mode (IAM can remove it); with it,
        # COMPLIANCE mode: after the cooling-off days nobody can change or delete it.
        aws.backup.VaultLockConfiguration(
            f"{self._name}-{role}-lock",
            backup_vault_name=vault.name,
            min_retention_days=s.backup_retention_days,
            changeable_for_days=(VAULT_LOCK_COOLING_OFF_DAYS
                                 if s.backup_vault_lock == "compliance" else None),
            region=None if local else region,
            opts=pulumi.ResourceOptions(parent=self),
        )
        return vault

    def _backup_plan(self, vault_name: pulumi.Output[str]) -> pulumi.Output[str]:
        args, s, child = self._args, self._args.settings, pulumi.ResourceOptions(parent=self)
        lifecycle = aws.backup.PlanRuleLifecycleArgs(delete_after=s.backup_retention_days)
        copies = [aws.backup.PlanRuleCopyActionArgs(
            destination_vault_arn=self.copy_vault_arn,
            lifecycle=aws.backup.PlanRuleCopyActionLifecycleArgs(
                delete_after=s.backup_retention_days),
        )] if self.copy_vault_arn is not None else None
        plan = aws.backup.Plan(
            f"{self._name}-backup-plan",
            name=f"audit-kit-{args.environment}-database",
            rules=[aws.backup.PlanRuleArgs(
                rule_name="daily",
                target_vault_name=vault_name,
                schedule=BACKUP_SCHEDULE,
                start_window=60,
                completion_window=180,
                lifecycle=lifecycle,
                copy_actions=copies,
            )],
            opts=child,
        )
        role = aws.iam.Role(
            f"{self._name}-backup-role",
            description=f"audit-kit {args.environment}: AWS Backup of the database",
            assume_role_policy=json.dumps({"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": {"Service": "backup.amazonaws.com"},
                "Action": "sts:AssumeRole"}]}),
            opts=child,
        )
        attachment = aws.iam.RolePolicyAttachment(
            f"{self._name}-backup-role-policy", role=role.name, policy_arn=BACKUP_SERVICE_POLICY,
            opts=child)
        # The identifier is explicit, so the ARN is known before the instance exists (the
        # instance is declared after this component: it waits for its log groups).
        db_arn = self._account_id.apply(
            lambda acct: f"arn:aws:rds:{args.region}:{acct}:db:{args.db_identifier}")
        aws.backup.Selection(
            f"{self._name}-backup-selection",
            name=f"audit-kit-{args.environment}-database",
            plan_id=plan.id,
            iam_role_arn=role.arn,
            resources=[db_arn],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[attachment]),
        )
        return plan.id


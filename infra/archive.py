"""The S3 archive: log segments and signed tree heads, kept unalterable for six years.

Every archive bucket (the primary, and in prod its replica in the DR region) has:

- Object Lock in COMPLIANCE mode with a default retention of ``object_lock_years`` (6 by
  HIPAA's documentation retention): nobody, root included, can shorten it or delete a version.
  Only dev may set ``archive.object_lock_mode: GOVERNANCE`` with ``object_lock_days``, so that
  a dev stack can be torn down;
- versioning (Object Lock requires it), bucket-owner-enforced ownership (no ACLs);
- SSE-KMS with the archive key and an S3 bucket key (fewer KMS calls);
- a public access block with all four settings on;
- a bucket policy that denies any request not made over TLS 1.2 or later.

When ``replicate_to_dr`` is set (prod), a replica bucket is declared in the DR region with the
same protections, encrypted with the archive key's replica there, and every new object is
replicated to it with S3 Replication Time Control (15 minutes). The DR stack reads the replica
bucket's name from prod's outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.settings import ArchiveSettings

__all__ = ["Archive", "ArchiveArgs", "ArchiveReplicaArgs", "LockedBucket", "tls_only_policy"]


def tls_only_policy(bucket_arn: str) -> dict[str, Any]:
    """Deny every S3 action on the bucket and its objects over plain HTTP or TLS < 1.2."""
    resources = [bucket_arn, f"{bucket_arn}/*"]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": resources,
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            },
            {
                "Sid": "DenyOutdatedTls",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": resources,
                "Condition": {"NumericLessThan": {"s3:TlsVersion": "1.2"}},
            },
        ],
    }


@dataclass(frozen=True)
class LockedBucket:
    name: pulumi.Output[str]
    arn: pulumi.Output[str]
    versioning: aws.s3.BucketVersioning


@dataclass(frozen=True, kw_only=True)
class ArchiveReplicaArgs:
    region: str
    key_arn: pulumi.Input[str]
    """The archive key's replica in ``region``."""


@dataclass(frozen=True, kw_only=True)
class ArchiveArgs:
    environment: str
    settings: ArchiveSettings
    key_arn: pulumi.Input[str]
    region: str
    replica: ArchiveReplicaArgs | None = None
    protect: bool = False
    """Prod and DR: ``protect`` the buckets."""


class Archive(pulumi.ComponentResource):
    bucket_name: pulumi.Output[str]
    bucket_arn: pulumi.Output[str]
    key_arn: pulumi.Output[str]
    replica_bucket_name: pulumi.Output[str] | None
    replica_bucket_arn: pulumi.Output[str] | None

    def __init__(self, name: str, args: ArchiveArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("audit:infra:Archive", name, None, opts)
        primary = self._locked_bucket(f"{name}-bucket", args, args.key_arn, region=None)
        self.bucket_name = primary.name
        self.bucket_arn = primary.arn
        self.key_arn = pulumi.Output.from_input(args.key_arn)
        self.replica_bucket_name = None
        self.replica_bucket_arn = None

        if args.replica is not None:
            replica = self._locked_bucket(
                f"{name}-replica-bucket", args, args.replica.key_arn, region=args.replica.region)
            self.replica_bucket_name = replica.name
            self.replica_bucket_arn = replica.arn
            self._replicate(name, args, primary, replica, args.replica)

        self.register_outputs({
            "bucketName": self.bucket_name,
            "bucketArn": self.bucket_arn,
            "replicaBucketName": self.replica_bucket_name,
        })

    def _locked_bucket(self, role: str, args: ArchiveArgs, key_arn: pulumi.Input[str],
                       region: str | None) -> LockedBucket:
        child = pulumi.ResourceOptions(parent=self)
        bucket = aws.s3.Bucket(
            role,
            bucket_prefix=f"audit-kit-{args.environment}-archive-",
            object_lock_enabled=True,
            force_destroy=False,
            region=region,
            tags={"purpose": "audit-archive"},
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect),
        )
        aws.s3.BucketOwnershipControls(
            f"{role}-ownership",
            bucket=bucket.id,
            rule=aws.s3.BucketOwnershipControlsRuleArgs(object_ownership="BucketOwnerEnforced"),
            region=region,
            opts=child,
        )
        versioning = aws.s3.BucketVersioning(
            f"{role}-versioning",
            bucket=bucket.id,
            versioning_configuration=aws.s3.BucketVersioningVersioningConfigurationArgs(
                status="Enabled"),
            region=region,
            opts=child,
        )
        aws.s3.BucketObjectLockConfiguration(
            f"{role}-object-lock",
            bucket=bucket.id,
            rule=aws.s3.BucketObjectLockConfigurationRuleArgs(
                # COMPLIANCE for object_lock_years; dev may use GOVERNANCE for some days.
                default_retention=aws.s3.BucketObjectLockConfigurationRuleDefaultRetentionArgs(
                    **args.settings.default_retention()),
            ),
            region=region,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[versioning]),
        )
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{role}-encryption",
            bucket=bucket.id,
            rules=[{
                "apply_server_side_encryption_by_default": {
                    "sse_algorithm": "aws:kms",
                    "kms_master_key_id": key_arn,
                },
                "bucket_key_enabled": True,
            }],
            region=region,
            opts=child,
        )
        public_access = aws.s3.BucketPublicAccessBlock(
            f"{role}-public-access",
            bucket=bucket.id,
            block_public_acls=True,
            block_public_policy=True,
            ignore_public_acls=True,
            restrict_public_buckets=True,
            region=region,
            opts=child,
        )
        aws.s3.BucketPolicy(
            f"{role}-tls-only",
            bucket=bucket.id,
            policy=bucket.arn.apply(lambda arn: json.dumps(tls_only_policy(arn))),
            region=region,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[public_access]),
        )
        return LockedBucket(name=bucket.bucket, arn=bucket.arn, versioning=versioning)

    def _replicate(self, name: str, args: ArchiveArgs, source: LockedBucket,
                   destination: LockedBucket, replica: ArchiveReplicaArgs) -> None:
        child = pulumi.ResourceOptions(parent=self)
        role = aws.iam.Role(
            f"{name}-replication-role",
            description=f"audit-kit {args.environment}: S3 replication of the archive to DR",
            assume_role_policy=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow",
                    "Principal": {"Service": "s3.amazonaws.com"},
                    "Action": "sts:AssumeRole",
                }],
            }),
            opts=child,
        )
        policy = pulumi.Output.all(
            source.arn, destination.arn, args.key_arn, replica.key_arn,
        ).apply(lambda v: json.dumps(replication_policy(
            source_arn=v[0], destination_arn=v[1], source_key_arn=v[2],
            destination_key_arn=v[3], source_region=args.region,
            destination_region=replica.region)))
        role_policy = aws.iam.RolePolicy(
            f"{name}-replication-policy", role=role.id, policy=policy, opts=child)
        aws.s3.BucketReplicationConfig(
            f"{name}-replication",
            bucket=source.name,
            role=role.arn,
            rules=[{
                "id": "archive-to-dr",
                "status": "Enabled",
                "priority": 1,
                "filter": {"prefix": ""},
                "delete_marker_replication": {"status": "Disabled"},
                "source_selection_criteria": {"sse_kms_encrypted_objects": {"status": "Enabled"}},
                "destination": {
                    "bucket": destination.arn,
                    "storage_class": "STANDARD",
                    "encryption_configuration": {"replica_kms_key_id": replica.key_arn},
                    # Replication Time Control: 99.99% of objects within 15 minutes (the RPO).
                    "replication_time": {"status": "Enabled", "time": {"minutes": 15}},
                    "metrics": {"status": "Enabled", "event_threshold": {"minutes": 15}},
                },
            }],
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[source.versioning, destination.versioning, role_policy]),
        )


def replication_policy(*, source_arn: str, destination_arn: str, source_key_arn: str,
                       destination_key_arn: str, source_region: str,
                       destination_region: str) -> dict[str, Any]:
    """What S3 replication needs: read the source versions, write replicas, the two keys."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ReadSourceConfiguration",
                "Effect": "Allow",
                "Action": ["s3:GetReplicationConfiguration", "s3:ListBucket"],
                "Resource": [source_arn],
            },
            {
                "Sid": "ReadSourceVersions",
                "Effect": "Allow",
                "Action": [
                    "s3:GetObjectVersionForReplication", "s3:GetObjectVersionAcl",
                    "s3:GetObjectVersionTagging", "s3:GetObjectRetention",
                    "s3:GetObjectLegalHold",
                ],
                "Resource": [f"{source_arn}/*"],
            },
            {
                "Sid": "WriteReplicas",
                "Effect": "Allow",
                "Action": ["s3:ReplicateObject", "s3:ReplicateTags"],
                "Resource": [f"{destination_arn}/*"],
            },
            {
                "Sid": "DecryptSource",
                "Effect": "Allow",
                "Action": ["kms:Decrypt"],
                "Resource": [source_key_arn],
                "Condition": {"StringLike": {
                    "kms:ViaService": f"s3.{source_region}.amazonaws.com"}},
            },
            {
                "Sid": "EncryptReplica",
                "Effect": "Allow",
                "Action": ["kms:Encrypt", "kms:GenerateDataKey"],
                "Resource": [destination_key_arn],
                "Condition": {"StringLike": {
                    "kms:ViaService": f"s3.{destination_region}.amazonaws.com"}},
            },
        ],
    }

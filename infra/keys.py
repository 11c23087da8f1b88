"""KMS keys, one per purpose, with least-privilege key policies.

========  ===================  ===============================================================
purpose   spec                 used by
========  ===================  ===============================================================
database  SYMMETRIC_DEFAULT    RDS storage and Performance Insights (via rds)
cache     SYMMETRIC_DEFAULT    ElastiCache at rest (via elasticache)
secrets   SYMMETRIC_DEFAULT    Secrets Manager (via secretsmanager), EKS envelope encryption
data      SYMMETRIC_DEFAULT    the worker's envelope encryption of PHI details (GenerateDataKey)
archive   SYMMETRIC_DEFAULT    S3 archive SSE-KMS (via s3)
signing   ECC_NIST_P256        the worker signs Merkle tree heads (Sign / GetPublicKey)
========  ===================  ===============================================================

Symmetric keys rotate yearly. The signing key cannot: AWS KMS does not rotate asymmetric keys
(a new key pair would change the public key that verifiers hold); rotating it is a planned
re-keying recorded in the log, not a KMS setting.

In prod every key is multi-region, so that the DR stack can declare an `aws.kms.ReplicaKey`
of each in its region: the replica of the signing key has the same key material, so tree
heads signed in DR verify with prod's public key. Prod also replicates the archive key into
the DR region itself, for its replica archive bucket (one replica per region is allowed, so
the DR stack does not replicate that one again).

Key policies give the account root only key administration, and delegate use to IAM only for
the actions each purpose needs, through the service that needs them (``kms:ViaService``)
where one does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pulumi
import pulumi_aws as aws

__all__ = [
    "PURPOSES",
    "SYMMETRIC_PURPOSES",
    "KeyHandle",
    "Keys",
    "KeysArgs",
    "key_policy",
]

Purpose = Literal["database", "cache", "secrets", "data", "archive", "signing"]
SYMMETRIC_PURPOSES: tuple[Purpose, ...] = ("database", "cache", "secrets", "data", "archive")
PURPOSES: tuple[Purpose, ...] = (*SYMMETRIC_PURPOSES, "signing")
DR_REPLICATED: tuple[Purpose, ...] = ("database", "cache", "secrets", "data", "signing")
"""Keys the DR stack replicates (archive's DR replica belongs to the prod stack)."""

_ADMIN_ACTIONS = [
    "kms:CancelKeyDeletion", "kms:CreateAlias", "kms:DeleteAlias", "kms:DescribeKey",
    "kms:DisableKey", "kms:DisableKeyRotation", "kms:EnableKey", "kms:EnableKeyRotation",
    "kms:GetKeyPolicy", "kms:GetKeyRotationStatus", "kms:ListAliases", "kms:ListGrants",
    "kms:ListKeyPolicies", "kms:ListResourceTags", "kms:PutKeyPolicy", "kms:ReplicateKey",
    "kms:RevokeGrant", "kms:RotateKeyOnDemand", "kms:ScheduleKeyDeletion", "kms:TagResource",
    "kms:UntagResource", "kms:UpdateAlias", "kms:UpdateKeyDescription", "kms:UpdatePrimaryRegion",
]
_ENVELOPE = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*",
             "kms:DescribeKey"]

# purpose -> [(statement id, actions, service the calls must come through or None)]
_USE: dict[Purpose, list[tuple[str, list[str], str | None]]] = {
    "database": [("UseThroughRds", [*_ENVELOPE, "kms:CreateGrant", "kms:ListGrants"], "rds")],
    "cache": [("UseThroughElastiCache", [*_ENVELOPE, "kms:CreateGrant"], "elasticache")],
    "secrets": [
        ("UseThroughSecretsManager", [*_ENVELOPE, "kms:CreateGrant"], "secretsmanager"),
        # EKS envelope-encrypts Kubernetes Secrets with the cluster role's own credentials.
        ("EksSecretsEncryption",
         ["kms:Encrypt", "kms:Decrypt", "kms:DescribeKey", "kms:CreateGrant", "kms:ListGrants"],
         None),
    ],
    "data": [("WorkerEnvelopeEncryption",
              ["kms:GenerateDataKey", "kms:Decrypt", "kms:DescribeKey"], None)],
    "archive": [("UseThroughS3", _ENVELOPE, "s3")],
    "signing": [("SignTreeHeads", ["kms:Sign", "kms:DescribeKey"], None),
                ("VerifyTreeHeads", ["kms:GetPublicKey", "kms:Verify"], None)],
}


def key_policy(*, account_id: str, region: str, purpose: Purpose) -> dict[str, Any]:
    """The key policy for one purpose: root administers, IAM may grant only the listed use."""
    root = f"arn:aws:iam::{account_id}:root"
    statements: list[dict[str, Any]] = [{
        "Sid": "KeyAdministration",
        "Effect": "Allow",
        "Principal": {"AWS": root},
        "Action": _ADMIN_ACTIONS,
        "Resource": "*",  # in a key policy "*" means "this key"
    }]
    for sid, actions, service in _USE[purpose]:
        condition: dict[str, Any] = {"StringEquals": {"kms:CallerAccount": account_id}}
        if service is not None:
            condition["StringEquals"]["kms:ViaService"] = f"{service}.{region}.amazonaws.com"
        statements.append({
            "Sid": sid,
            "Effect": "Allow",
            "Principal": {"AWS": root},
            "Action": actions,
            "Resource": "*",
            "Condition": condition,
        })
    return {"Version": "2012-10-17", "Id": f"audit-kit-{purpose}", "Statement": statements}


@dataclass(frozen=True)
class KeyHandle:
    """What other layers need of a key."""

    arn: pulumi.Output[str]
    key_id: pulumi.Output[str]
    alias: str


@dataclass(frozen=True, kw_only=True)
class KeysArgs:
    environment: str
    region: str
    deletion_window_days: int
    multi_region: bool = False
    replica_of: Mapping[str, pulumi.Input[str]] | None = None
    """DR: purpose -> ARN of prod's primary key; each becomes an `aws.kms.ReplicaKey` here."""
    archive_replica_region: str | None = None
    """Prod: the DR region, where the archive key gets a replica for the replica bucket."""
    protect: bool = False
    """Prod and DR: ``protect`` every key (deleting one makes its data unreadable)."""


class Keys(pulumi.ComponentResource):
    """One customer-managed key per purpose (or, in DR, a replica of prod's)."""

    database: KeyHandle
    cache: KeyHandle
    secrets: KeyHandle
    data: KeyHandle
    archive: KeyHandle | None
    signing: KeyHandle
    archive_replica: KeyHandle | None

    def __init__(self, name: str, args: KeysArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("audit:infra:Keys", name, None, opts)
        account_id = aws.get_caller_identity_output(
            opts=pulumi.InvokeOutputOptions(parent=self)).account_id
        handles: dict[str, KeyHandle] = {}
        if args.replica_of is not None:
            for purpose in DR_REPLICATED:
                if purpose not in args.replica_of:
                    raise TypeError(f"Missing required property 'replica_of[{purpose!r}]'")
                handles[purpose] = self._replica(
                    f"{name}-{purpose}-replica", args, purpose, args.replica_of[purpose],
                    region=args.region, alias=f"alias/audit-kit-{args.environment}-{purpose}",
                    account_id=account_id)
        else:
            for purpose in PURPOSES:
                handles[purpose] = self._primary(name, args, purpose, account_id)

        self.database = handles["database"]
        self.cache = handles["cache"]
        self.secrets = handles["secrets"]
        self.data = handles["data"]
        self.signing = handles["signing"]
        self.archive = handles.get("archive")
        self.archive_replica = None
        if args.archive_replica_region is not None and self.archive is not None:
            self.archive_replica = self._replica(
                f"{name}-archive-dr-replica", args, "archive", self.archive.arn,
                region=args.archive_replica_region,
                alias=f"alias/audit-kit-{args.environment}-archive-dr-replica",
                account_id=account_id)

        self.register_outputs({
            "arns": self.arns,
            "signingKeyId": self.signing.key_id,
            "archiveReplicaArn": self.archive_replica.arn if self.archive_replica else None,
        })

    @property
    def arns(self) -> dict[str, pulumi.Output[str]]:
        """purpose -> key ARN, for exports and the DR stack."""
        found = {"database": self.database, "cache": self.cache, "secrets": self.secrets,
                 "data": self.data, "archive": self.archive, "signing": self.signing}
        return {purpose: handle.arn for purpose, handle in found.items() if handle is not None}

    def _primary(self, name: str, args: KeysArgs, purpose: Purpose,
                 account_id: pulumi.Output[str]) -> KeyHandle:
        asymmetric = purpose == "signing"
        key = aws.kms.Key(
            f"{name}-{purpose}",
            description=f"audit-kit {args.environment}: {purpose}",
            key_usage="SIGN_VERIFY" if asymmetric else "ENCRYPT_DECRYPT",
            customer_master_key_spec="ECC_NIST_P256" if asymmetric else "SYMMETRIC_DEFAULT",
            # AWS KMS cannot rotate asymmetric keys; symmetric keys rotate every year.
            enable_key_rotation=not asymmetric,
            rotation_period_in_days=None if asymmetric else 365,
            deletion_window_in_days=args.deletion_window_days,
            multi_region=args.multi_region,
            policy=account_id.apply(lambda acct: json.dumps(
                key_policy(account_id=acct, region=args.region, purpose=purpose))),
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect),
        )
        alias = f"alias/audit-kit-{args.environment}-{purpose}"
        aws.kms.Alias(f"{name}-{purpose}-alias", name=alias, target_key_id=key.key_id,
                      opts=pulumi.ResourceOptions(parent=self))
        return KeyHandle(arn=key.arn, key_id=key.key_id, alias=alias)

    def _replica(self, resource_name: str, args: KeysArgs, purpose: Purpose,
                 primary_arn: pulumi.Input[str], *, region: str, alias: str,
                 account_id: pulumi.Output[str]) -> KeyHandle:
        replica = aws.kms.ReplicaKey(
            resource_name,
            primary_key_arn=primary_arn,
            description=f"audit-kit {args.environment}: {purpose} (replica in {region})",
            deletion_window_in_days=args.deletion_window_days,
            region=region,
            policy=account_id.apply(lambda acct: json.dumps(
                key_policy(account_id=acct, region=region, purpose=purpose))),
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect),
        )
        aws.kms.Alias(f"{resource_name}-alias", name=alias, target_key_id=replica.key_id,
                      region=region, opts=pulumi.ResourceOptions(parent=self))
        return KeyHandle(arn=replica.arn, key_id=replica.key_id, alias=alias)

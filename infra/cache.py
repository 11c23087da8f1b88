"""ElastiCache Redis: the event intake stream (Redis Streams consumer group).

Encrypted at rest with the cache key and in transit (TLS required). Clients authenticate with
an AUTH token generated here (`random.RandomPassword`), kept in a Secrets Manager secret
encrypted with the secrets key, and handed to the worker only inside the secret
``audit-worker-connections``. Failover and multi-AZ follow the settings (on in prod and DR).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_random as random

from infra.settings import CacheSettings

__all__ = ["REDIS_PORT", "Cache", "CacheArgs"]

REDIS_PORT = 6379


@dataclass(frozen=True, kw_only=True)
class CacheArgs:
    environment: str
    settings: CacheSettings
    hardened: bool
    subnet_ids: pulumi.Input[Sequence[str]]
    security_group_id: pulumi.Input[str]
    storage_key_arn: pulumi.Input[str]
    """The cache key: data at rest and snapshots."""
    secrets_key_arn: pulumi.Input[str]
    """The secrets key: the AUTH token's Secrets Manager secret."""


class Cache(pulumi.ComponentResource):
    primary_endpoint: pulumi.Output[str]
    reader_endpoint: pulumi.Output[str]
    port: int
    auth_secret_arn: pulumi.Output[str]
    replication_group_id: pulumi.Output[str]

    def __init__(self, name: str, args: CacheArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("audit:infra:Cache", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        s = args.settings
        self.port = REDIS_PORT

        subnets = aws.elasticache.SubnetGroup(
            f"{name}-subnets",
            description=f"audit-kit {args.environment}: private subnets of Redis",
            subnet_ids=args.subnet_ids,
            opts=child,
        )
        # AUTH tokens may not contain '@', '"' or '/': letters and digits only.
        token = random.RandomPassword(f"{name}-auth-token", length=64, special=False, opts=child)
        self._token: pulumi.Output[str] = pulumi.Output.secret(token.result)
        secret = aws.secretsmanager.Secret(
            f"{name}-auth-secret",
            description=f"audit-kit {args.environment}: Redis AUTH token",
            kms_key_id=args.secrets_key_arn,
            recovery_window_in_days=30 if args.hardened else 7,
            opts=child,
        )
        aws.secretsmanager.SecretVersion(
            f"{name}-auth-secret-value",
            secret_id=secret.id,
            secret_string=self._token,
            opts=child,
        )
        group = aws.elasticache.ReplicationGroup(
            f"{name}-redis",
            description=f"audit-kit {args.environment}: audit event intake",
            engine="redis",
            engine_version=s.engine_version,
            node_type=s.node_type,
            port=REDIS_PORT,
            num_cache_clusters=s.num_cache_clusters,
            automatic_failover_enabled=s.automatic_failover,
            multi_az_enabled=s.multi_az,
            at_rest_encryption_enabled=True,
            kms_key_id=args.storage_key_arn,
            transit_encryption_enabled=True,
            transit_encryption_mode="required",
            auth_token=self._token,
            subnet_group_name=subnets.name,
            security_group_ids=[args.security_group_id],
            snapshot_retention_limit=s.snapshot_retention_days,
            snapshot_window="02:00-03:00" if s.snapshot_retention_days else None,
            maintenance_window="sun:05:30-sun:06:30",
            auto_minor_version_upgrade=True,
            apply_immediately=False,
            opts=child,
        )
        self.primary_endpoint = group.primary_endpoint_address
        self.reader_endpoint = group.reader_endpoint_address
        self.auth_secret_arn = secret.arn
        self.replication_group_id = group.id

        self.register_outputs({
            "primaryEndpoint": self.primary_endpoint,
            "readerEndpoint": self.reader_endpoint,
            "authSecretArn": self.auth_secret_arn,
        })

    def url(self) -> pulumi.Output[str]:
        """``rediss://`` URL with the AUTH token; secret."""
        return pulumi.Output.secret(pulumi.Output.all(self._token, self.primary_endpoint).apply(
            lambda v: f"rediss://:{v[0]}@{v[1]}:{self.port}/0"))

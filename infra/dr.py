"""Disaster-recovery wiring of the DR stack: prod's outputs and the Route 53 failover.

`PrimaryStack` reads what DR needs from the prod stack (a `pulumi.StackReference`): the
database ARN (the replica's source), the primary key ARNs (replicated here), the archive
replica bucket and its key in this region, Redis and database endpoints, and the worker's
replica count. `Failover` declares a Route 53 health check on prod's public health endpoint
and two failover record sets in the hosted zone from the settings, each with a PRIMARY record
(prod) and a SECONDARY record (DR):

- ``<intake_record>.<zone>``: where producers send audit events (Redis);
- ``<database_record>.<zone>``: the log database.

The DR drill forces a failover by inverting the health check (``invert_healthcheck``) and
then promoting the replica; failback reverses both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.keys import DR_REPLICATED
from infra.settings import DnsFailoverSettings

__all__ = ["PRIMARY_OUTPUTS", "Failover", "FailoverArgs", "PrimaryStack", "primary_worker_password"]

PRIMARY_OUTPUTS: tuple[str, ...] = (
    "dbInstanceArn", "dbAddress", "dbWorkerSecretArn", "redisPrimaryEndpoint", "keyArns",
    "archiveReplicaBucketName", "archiveReplicaBucketArn", "archiveReplicaKeyArn",
    "workerReplicas", "region",
)
"""The prod stack outputs the DR stack reads."""


class PrimaryStack:
    """Typed access to the prod stack's outputs, through one `pulumi.StackReference`."""

    def __init__(self, stack_name: str) -> None:
        self.stack_name = stack_name
        self.reference = pulumi.StackReference(stack_name)

    def _require(self, output: str) -> pulumi.Output[Any]:
        return self.reference.require_output(output)

    @property
    def db_instance_arn(self) -> pulumi.Output[str]:
        return self._require("dbInstanceArn")

    @property
    def db_address(self) -> pulumi.Output[str]:
        return self._require("dbAddress")

    @property
    def db_worker_secret_arn(self) -> pulumi.Output[str]:
        return self._require("dbWorkerSecretArn")

    @property
    def redis_endpoint(self) -> pulumi.Output[str]:
        return self._require("redisPrimaryEndpoint")

    def key_arn(self, purpose: str) -> pulumi.Output[str]:
        if purpose not in DR_REPLICATED:
            raise ValueError(f"prod's {purpose!r} key is not replicated by the DR stack")
        return self._require("keyArns").apply(lambda arns: str(arns[purpose]))

    @property
    def archive_bucket_name(self) -> pulumi.Output[str]:
        return self._require("archiveReplicaBucketName")

    @property
    def archive_bucket_arn(self) -> pulumi.Output[str]:
        return self._require("archiveReplicaBucketArn")

    @property
    def archive_key_arn(self) -> pulumi.Output[str]:
        return self._require("archiveReplicaKeyArn")

    @property
    def worker_replicas(self) -> pulumi.Output[int]:
        return self._require("workerReplicas").apply(int)


def primary_worker_password(primary: PrimaryStack, primary_region: str) -> pulumi.Output[str]:
    """The worker's password, read from prod's Secrets Manager secret (prod's region).

    The replica carries prod's roles, so DR's worker uses prod's password. It is read at
    deployment time rather than exported by prod, so that no stack output holds a credential;
    deploying the DR stack therefore needs prod's region to answer (a failover does not).
    """
    version = aws.secretsmanager.get_secret_version_output(
        secret_id=primary.db_worker_secret_arn, region=primary_region)
    return pulumi.Output.secret(version.secret_string.apply(
        lambda s: str(json.loads(s)["password"])))


@dataclass(frozen=True, kw_only=True)
class FailoverArgs:
    environment: str
    dns: DnsFailoverSettings
    primary_intake: pulumi.Input[str]
    secondary_intake: pulumi.Input[str]
    primary_database: pulumi.Input[str]
    secondary_database: pulumi.Input[str]


class Failover(pulumi.ComponentResource):
    health_check_id: pulumi.Output[str]
    hosted_zone_id: str
    zone_name: str
    intake_record: str
    database_record: str

    def __init__(self, name: str, args: FailoverArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("audit:infra:Failover", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        dns = args.dns
        health = aws.route53.HealthCheck(
            f"{name}-primary-health",
            type="HTTPS",
            fqdn=dns.health_check_fqdn,
            port=443,
            resource_path=dns.health_check_path,
            request_interval=30,
            failure_threshold=3,
            enable_sni=True,
            reference_name=f"audit-{args.environment}-prod"[:28],
            opts=child,
        )
        self.health_check_id = health.id
        self.hosted_zone_id = dns.hosted_zone_id
        self.zone_name = dns.zone_name
        self.intake_record = f"{dns.intake_record}.{dns.zone_name}"
        self.database_record = f"{dns.database_record}.{dns.zone_name}"

        for role, record, primary, secondary in (
            ("intake", self.intake_record, args.primary_intake, args.secondary_intake),
            ("db", self.database_record, args.primary_database, args.secondary_database),
        ):
            for kind, target, check in (("primary", primary, health.id),
                                        ("secondary", secondary, None)):
                aws.route53.Record(
                    f"{name}-{role}-{kind}",
                    zone_id=dns.hosted_zone_id,
                    name=record,
                    type="CNAME",
                    ttl=dns.ttl_seconds,
                    records=[target],
                    set_identifier=f"{role}-{'prod' if kind == 'primary' else 'dr'}",
                    failover_routing_policies=[
                        aws.route53.RecordFailoverRoutingPolicyArgs(type=kind.upper())],
                    health_check_id=check,
                    opts=child,
                )

        self.register_outputs({
            "healthCheckId": self.health_check_id,
            "intakeRecord": self.intake_record,
            "databaseRecord": self.database_record,
        })

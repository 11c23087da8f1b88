"""Disaster-recovery wiring of the DR stack: prod's outputs and the traffic switch.

`PrimaryStack` reads what DR needs from the prod stack (a `pulumi.StackReference`, which is
the Pulumi backend, not an AWS region): the database ARN (the replica's source), the primary
key ARNs (replicated here), the archive replica bucket and its key in this region, Redis and
database endpoints, and the worker's replica count. A DR ``up`` calls no AWS API in prod's
region: the worker's password is DR stack config (`primary_worker_password`), not a read of
prod's Secrets Manager.

`Failover` is the traffic switch, built on Route 53 Application Recovery Controller (ARC):

- one ARC cluster, control panel and a routing control per site (``prod``, ``dr``), with a
  safety rule that keeps at least one of them On. ARC's configuration API exists only in
  us-west-2, so these use an explicit us-west-2 provider (`ARC_REGION`);
- a Route 53 health check of type ``RECOVERY_CONTROL`` per routing control: it is healthy
  exactly when that control is On. Nothing probes prod, so the switch cannot flip by itself
  (a drill's state holds until someone changes it), and it cannot point at DR on day one
  because a health endpoint is missing;
- failover TXT records ``<intake_record>.<zone>`` and ``<database_record>.<zone>``: PRIMARY
  (prod, prod's health check) and SECONDARY (DR, DR's health check). Their value is the
  active site's real endpoint host name (ElastiCache, RDS). A client reads the TXT record and
  connects by that name, so TLS ``verify-full`` checks the name on the certificate (a CNAME
  would make the client check the CNAME, which the certificate does not carry). The workers
  need none of this: each site's worker connects to its own site's endpoints.

A drill flips traffic with ARC's data plane (``UpdateRoutingControlStates`` on any of the
cluster's five regional endpoints, `src/auditctl/platforms/aws.py`): no control-plane call in
the failed region, and no Route 53 change. While both controls are Off (right after the first
``up``), Route 53 treats both records as unhealthy and answers with the PRIMARY (prod); the
runbook turns ``prod`` On once after that first ``up``. ARC clusters are billed by the hour
(https://docs.aws.amazon.com/r53recovery/latest/dg/routing-control.create.html).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.keys import DR_REPLICATED
from infra.settings import DnsFailoverSettings

__all__ = [
    "ARC_REGION",
    "PRIMARY_OUTPUTS",
    "SITES",
    "Failover",
    "FailoverArgs",
    "PrimaryStack",
    "primary_worker_password",
]

ARC_REGION = "us-west-2"
"""ARC's recovery control configuration API is served only in US West (Oregon):
https://docs.aws.amazon.com/recovery-cluster/latest/api/what-is-recovery-control.html"""
SITES: tuple[str, str] = ("prod", "dr")


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


def primary_worker_password(config: pulumi.Config, key: str) -> pulumi.Output[str]:
    """The worker's password in DR: prod's (the replica carries prod's roles), from the DR
    stack's secret config `key` (``audit-kit:primaryWorkerPassword``).

    Kept as a secret in the DR stack's own config (encrypted with the DR region's KMS key,
    ``environments/Pulumi.dr.yaml``) rather than read from prod's Secrets Manager at deploy
    time, so that a DR ``up`` never needs prod's region. The operator sets it once, while prod
    is up, and again whenever prod's worker password rotates (docs/runbooks/dr-drill.md).
    """
    # The raw lookup sees an unset or empty value without Pulumi's "use get_secret" warning.
    if not pulumi.runtime.get_config(f"{config.name}:{key}"):
        raise ValueError(
            f"audit-kit:{key} is not set: the DR stack needs prod's worker "
            "password as a secret config value. Fix: pulumi config set --secret "
            f"audit-kit:{key} (value from prod's dbWorkerSecretArn)")
    return config.require_secret(key)


@dataclass(frozen=True, kw_only=True)
class FailoverArgs:
    environment: str
    dns: DnsFailoverSettings
    primary_intake: pulumi.Input[str]
    secondary_intake: pulumi.Input[str]
    primary_database: pulumi.Input[str]
    secondary_database: pulumi.Input[str]


class Failover(pulumi.ComponentResource):
    """ARC routing controls, their Route 53 health checks, and failover TXT records."""

    cluster_arn: pulumi.Output[str]
    cluster_endpoints: pulumi.Output[list[dict[str, str]]]
    routing_control_arns: dict[str, pulumi.Output[str]]
    health_check_ids: dict[str, pulumi.Output[str]]
    hosted_zone_id: str
    zone_name: str
    intake_record: str
    database_record: str
    ttl_seconds: int

    def __init__(self, name: str, args: FailoverArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("audit:infra:Failover", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        dns = args.dns
        arc_provider = aws.Provider(f"{name}-arc", region=ARC_REGION, opts=child)
        arc = pulumi.ResourceOptions(parent=self, provider=arc_provider)
        prefix = f"audit-kit-{args.environment}"
        cluster = aws.route53recoverycontrol.Cluster(f"{name}-cluster", name=prefix, opts=arc)
        panel = aws.route53recoverycontrol.ControlPanel(
            f"{name}-panel", name=prefix, cluster_arn=cluster.arn, opts=arc)
        controls = {
            site: aws.route53recoverycontrol.RoutingControl(
                f"{name}-{site}", name=f"{prefix}-{site}", cluster_arn=cluster.arn,
                control_panel_arn=panel.arn, opts=arc)
            for site in SITES
        }
        # At least one site On at any time: an operator cannot switch all traffic off.
        aws.route53recoverycontrol.SafetyRule(
            f"{name}-one-site-on",
            name=f"{prefix}-one-site-on",
            control_panel_arn=panel.arn,
            asserted_controls=[c.arn for c in controls.values()],
            rule_config=aws.route53recoverycontrol.SafetyRuleRuleConfigArgs(
                inverted=False, threshold=1, type="ATLEAST"),
            wait_period_ms=5000,
            opts=arc,
        )
        checks = {
            site: aws.route53.HealthCheck(
                f"{name}-{site}-health",
                type="RECOVERY_CONTROL",
                routing_control_arn=control.arn,
                reference_name=f"audit-{args.environment}-{site}"[:28],
                opts=child,
            )
            for site, control in controls.items()
        }
        self.cluster_arn = cluster.arn
        self.cluster_endpoints = cluster.cluster_endpoints.apply(
            lambda eps: [{"region": str(e.region), "endpoint": str(e.endpoint)}
                         for e in eps or []])
        self.routing_control_arns = {site: c.arn for site, c in controls.items()}
        self.health_check_ids = {site: c.id for site, c in checks.items()}
        self.hosted_zone_id = dns.hosted_zone_id
        self.zone_name = dns.zone_name
        self.intake_record = f"{dns.intake_record}.{dns.zone_name}"
        self.database_record = f"{dns.database_record}.{dns.zone_name}"
        self.ttl_seconds = dns.ttl_seconds

        for role, record, primary, secondary in (
            ("intake", self.intake_record, args.primary_intake, args.secondary_intake),
            ("db", self.database_record, args.primary_database, args.secondary_database),
        ):
            for site, kind, host in (("prod", "PRIMARY", primary), ("dr", "SECONDARY", secondary)):
                aws.route53.Record(
                    f"{name}-{role}-{kind.lower()}",
                    zone_id=dns.hosted_zone_id,
                    name=record,
                    type="TXT",
                    ttl=dns.ttl_seconds,
                    records=[host],  # the real host name: clients verify TLS against it
                    set_identifier=f"{role}-{site}",
                    failover_routing_policies=[
                        aws.route53.RecordFailoverRoutingPolicyArgs(type=kind)],
                    health_check_id=checks[site].id,
                    opts=child,
                )

        self.register_outputs({
            "clusterArn": self.cluster_arn,
            "routingControlArns": self.routing_control_arns,
            "healthCheckIds": self.health_check_ids,
            "intakeRecord": self.intake_record,
            "databaseRecord": self.database_record,
        })

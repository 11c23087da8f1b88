"""Typed environment settings: one YAML file per environment in ``environments/``.

Every setting an environment has lives in ``environments/<name>.yaml`` and nowhere else.
`load_environment` reads one file, validates it against `EnvironmentSettings` (unknown keys
are errors), then applies the cross-field rules that make prod and DR "hardened". Any problem
raises `SettingsError` naming the file, the key path and the reason, for example::

    environments/prod.yaml: database.backup_retention_days: must be >= 35 in prod (got 14)
    environments/prod.yaml: database.multi_az2: unknown key 'multi_az2' (did you mean 'multi_az'?)

The Pulumi program calls `load_environment` before it declares any resource, so a bad file
fails `pulumi preview` with that message and nothing else.

``local`` is the no-cloud environment that ``make demo`` runs on this machine (PostgreSQL and
Redis as local processes, local keys). It is valid for the schema but is not a Pulumi stack:
it has a ``local`` section instead of the cloud sections.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra import capacity

__all__ = [
    "DEFAULT_INGRESS_NAMESPACES",
    "ENVIRONMENTS_DIR",
    "ENVIRONMENT_NAMES",
    "HEALTH_CHECKS",
    "LOG_RETENTION_DAYS",
    "STACK_ENVIRONMENTS",
    "ArchiveSettings",
    "CacheSettings",
    "CloudSettings",
    "ClusterAccessSettings",
    "ClusterSettings",
    "ComplianceSettings",
    "DatabaseSettings",
    "DnsFailoverSettings",
    "DrSettings",
    "EnvironmentSettings",
    "IngressPodSettings",
    "KeySettings",
    "LocalSettings",
    "NetworkSettings",
    "ProbeSettings",
    "ProbesSettings",
    "SettingsError",
    "WorkerSettings",
    "environment_matrix",
    "load_environment",
]

ENVIRONMENTS_DIR = Path(__file__).resolve().parent.parent / "environments"
"""Where the settings files live (``environments/`` at the repository root)."""

EnvironmentName = Literal["dev", "staging", "prod", "dr", "local"]
ENVIRONMENT_NAMES: tuple[str, ...] = ("dev", "staging", "prod", "dr", "local")
STACK_ENVIRONMENTS: tuple[str, ...] = ("dev", "staging", "prod", "dr")
"""Environments that are Pulumi stacks (``local`` is not)."""

HARDENED: frozenset[str] = frozenset({"prod", "dr"})
"""Environments that must be multi-AZ, deletion-protected and protected in Pulumi state."""

ConfigurationLevel = Literal["basic", "production-like", "hardened", "mirror-production"]
MonitoringLevel = Literal["standard", "enhanced", "comprehensive", "critical"]

# Patterns match whole values: pydantic's engine searches, so each pattern it uses has both
# anchors, and Python code uses re.fullmatch (re.match with "$" accepts a trailing newline). Digits
# are [0-9]: "\d" also matches other scripts' digits.
_AWS_REGION = r"^[a-z]{2}(-gov)?-[a-z]+-[0-9]$"
_K8S_CPU = r"^[0-9]+(\.[0-9]+)?m?$"
_K8S_MEMORY = r"^[0-9]+(Ki|Mi|Gi|Ti|K|M|G|T)?$"
_K8S_NAMESPACE = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
# Label keys and values are checked in Python only (re.fullmatch): no anchors needed.
_K8S_LABEL_KEY = r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?" \
                 r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_K8S_LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?"
DEFAULT_INGRESS_NAMESPACES: tuple[str, ...] = ("monitoring",)
"""Namespaces admitted to the worker's port 8080 when an environment lists none: Prometheus."""

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One invalid setting: its dotted key path and what is wrong with it."""

    path: str
    reason: str


class SettingsError(ValueError):
    """An environment file is missing, unreadable or invalid.

    ``str(error)`` has one line per problem: ``<file>: <key.path>: <reason>``.
    """

    def __init__(self, file: Path | str, problems: list[Problem]) -> None:
        self.file = str(file)
        self.problems = problems
        lines = [f"{self.file}: {p.path}: {p.reason}" if p.path else f"{self.file}: {p.reason}"
                 for p in problems]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSettings(_Model):
    """Either a new VPC (``vpc_cidr`` + ``availability_zones``) or an existing one by id."""

    vpc_cidr: str | None = None
    availability_zones: int | None = Field(default=None, ge=2, le=6)
    nat_gateways: Literal["single", "one-per-az"] | None = None
    existing_vpc_id: str | None = Field(default=None, pattern=r"^vpc-[0-9a-f]{8,17}$")
    existing_private_subnet_ids: list[str] = Field(default_factory=list)

    @field_validator("vpc_cidr")
    @classmethod
    def _cidr(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                network = ipaddress.IPv4Network(value)
            except ValueError as exc:
                raise ValueError(f"not an IPv4 CIDR: {exc}") from None
            if network.prefixlen > 20:
                raise ValueError(
                    f"/{network.prefixlen} is too small for per-AZ subnets; use /20 or larger")
        return value

    @field_validator("existing_private_subnet_ids")
    @classmethod
    def _subnets(cls, value: list[str]) -> list[str]:
        bad = [s for s in value if not re.fullmatch(r"subnet-[0-9a-f]{8,17}", s)]
        if bad:
            raise ValueError(f"not subnet ids: {', '.join(bad)}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> NetworkSettings:
        new = self.vpc_cidr is not None
        existing = self.existing_vpc_id is not None
        if new == existing:
            raise ValueError("set either vpc_cidr (new VPC) or existing_vpc_id (existing VPC)")
        if new and (self.availability_zones is None or self.nat_gateways is None):
            missing = "availability_zones" if self.availability_zones is None else "nat_gateways"
            raise ValueError(f"{missing}: required for a new VPC")
        if existing and len(self.existing_private_subnet_ids) < 2:
            raise ValueError("existing_private_subnet_ids: an existing VPC needs two or more")
        if existing and (self.availability_zones is not None or self.nat_gateways is not None):
            raise ValueError("availability_zones and nat_gateways apply only to a new VPC")
        return self


class DatabaseSettings(_Model):
    """RDS PostgreSQL. In the DR environment these describe the cross-region read replica."""

    instance_class: str = Field(pattern=r"^db\.[a-z0-9]+\.[a-z0-9]+$")
    allocated_storage_gb: int = Field(ge=20, le=65536)
    max_allocated_storage_gb: int = Field(ge=20, le=65536)
    engine_version: str = Field(
        description="PostgreSQL MAJOR.MINOR, e.g. '16.4'. Minor upgrades are off "
        "(auto_minor_version_upgrade=False): bump this pin to upgrade (migration guide).")
    multi_az: bool
    backup_retention_days: int = Field(ge=0, le=35)
    deletion_protection: bool
    performance_insights: bool
    iam_auth: bool
    database_name: str = Field(default="audit", pattern=r"^[a-z][a-z0-9_]{0,62}$")
    worker_username: str = Field(default="audit_worker", pattern=r"^[a-z][a-z0-9_]{0,62}$")
    backup_window: str = Field(default="03:00-04:00",
                               pattern=r"^[0-9]{2}:[0-9]{2}-[0-9]{2}:[0-9]{2}$")
    maintenance_window: str = "sun:04:30-sun:05:30"

    @field_validator("engine_version")
    @classmethod
    def _major_minor(cls, value: str) -> str:
        # A major alone ("16") lets RDS choose the minor; with minor upgrades off the pin must
        # name it exactly, or the next `up` would try to move the instance to another minor.
        if not re.fullmatch(r"[0-9]{2}\.[0-9]{1,3}", value):
            raise ValueError(f"must be PostgreSQL MAJOR.MINOR such as '16.4' (got {value!r}): "
                             "pin the exact minor version the instance runs")
        return value

    @model_validator(mode="after")
    def _storage(self) -> DatabaseSettings:
        if self.max_allocated_storage_gb < self.allocated_storage_gb:
            raise ValueError("max_allocated_storage_gb: must be >= allocated_storage_gb")
        return self

    @property
    def parameter_group_family(self) -> str:
        """``postgres16`` for engine version ``16.4``."""
        return f"postgres{self.engine_version.split('.')[0]}"


class CacheSettings(_Model):
    """ElastiCache Redis replication group (the event intake stream)."""

    node_type: str = Field(pattern=r"^cache\.[a-z0-9]+\.[a-z0-9]+$")
    num_cache_clusters: int = Field(ge=1, le=6)
    automatic_failover: bool
    multi_az: bool
    engine_version: str = Field(default="7.1", pattern=r"^[0-9]+\.[0-9]+$")
    snapshot_retention_days: int = Field(default=0, ge=0, le=35)

    @model_validator(mode="after")
    def _failover(self) -> CacheSettings:
        if self.automatic_failover and self.num_cache_clusters < 2:
            raise ValueError("num_cache_clusters: must be >= 2 with automatic_failover")
        if self.multi_az and not self.automatic_failover:
            raise ValueError("multi_az: needs automatic_failover: true")
        return self


class ArchiveSettings(_Model):
    """S3 archive of log segments and signed tree heads, under Object Lock.

    COMPLIANCE (nobody, root included, can shorten retention or delete a locked version) is
    required outside dev. Dev may use GOVERNANCE with a retention in days, so that a dev stack
    can be torn down: a principal with ``s3:BypassGovernanceRetention`` can delete versions.
    https://docs.aws.amazon.com/AmazonS3/latest/userguide/object-lock.html
    """

    object_lock_mode: Literal["COMPLIANCE", "GOVERNANCE"] = "COMPLIANCE"
    object_lock_years: int = Field(
        default=6, ge=6, le=100,
        description="HIPAA keeps documentation 6 years (45 CFR 164.316(b)(2)); never less.",
    )
    object_lock_days: int | None = Field(
        default=None, ge=1, le=36500,
        description="GOVERNANCE only (dev): default retention in days instead of "
        "object_lock_years.")
    replicate_to_dr: bool = False
    detach_verified_months: bool = Field(
        default=False,
        description="Remove a month from the hot database once its archived bundle is "
        "verified (AUDIT_ARCHIVE_DETACH_VERIFIED_MONTHS): hot storage stays bounded; the "
        "rows stay provable from the archive.",
    )

    @model_validator(mode="after")
    def _lock_period(self) -> ArchiveSettings:
        if self.object_lock_days is not None and self.object_lock_mode != "GOVERNANCE":
            raise ValueError("object_lock_days: only with object_lock_mode GOVERNANCE "
                             "(COMPLIANCE uses object_lock_years)")
        return self

    def default_retention(self) -> dict[str, Any]:
        """The bucket's default retention: mode and either days or years (never both)."""
        if self.object_lock_days is not None:
            return {"mode": self.object_lock_mode, "days": self.object_lock_days}
        return {"mode": self.object_lock_mode, "years": self.object_lock_years}


_IAM_ROLE_ARN = r"arn:aws(-cn|-us-gov)?:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}"
"""An IAM role ARN (partition, 12-digit account, ``role/`` and an optional path)."""

EndpointAccess = Literal["public-restricted", "private"]


class ClusterAccessSettings(_Model):
    """IAM roles granted Kubernetes access through EKS access entries.

    https://docs.aws.amazon.com/eks/latest/userguide/access-entries.html: ``admins`` get
    AmazonEKSClusterAdminPolicy on the cluster (the CI role that runs ``pulumi up`` must be
    one: the cluster creator gets no access of its own); ``operators`` (also the DR drill
    role) AmazonEKSEditPolicy in the worker's namespace; ``viewers`` AmazonEKSViewPolicy.
    """

    admins: list[str] = Field(default_factory=list)
    operators: list[str] = Field(default_factory=list)
    viewers: list[str] = Field(default_factory=list)

    @field_validator("admins", "operators", "viewers")
    @classmethod
    def _roles(cls, value: list[str]) -> list[str]:
        bad = [arn for arn in value if not re.fullmatch(_IAM_ROLE_ARN, arn)]
        if bad:
            raise ValueError(f"not IAM role ARNs (arn:aws:iam::<12 digits>:role/<name>): "
                             f"{', '.join(bad)}")
        repeated = sorted({arn for arn in value if value.count(arn) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return value

    @model_validator(mode="after")
    def _one_level_each(self) -> ClusterAccessSettings:
        # EKS has one access entry per principal: a role in two lists would be two entries.
        seen: dict[str, str] = {}
        for level in ("admins", "operators", "viewers"):
            for arn in getattr(self, level):
                if arn in seen:
                    raise ValueError(f"{level}: {arn} is already in {seen[arn]}; give each "
                                     "role one level")
                seen[arn] = level
        return self

    def roles(self) -> list[tuple[str, str]]:
        """(level, role ARN) of every listed role, admins first."""
        return [(level, arn) for level in ("admins", "operators", "viewers")
                for arn in getattr(self, level)]


LOG_RETENTION_DAYS: tuple[int, ...] = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557,
    2922, 3288, 3653)
"""The retention values CloudWatch Logs accepts (PutRetentionPolicy)."""

HARDENED_LOG_RETENTION_DAYS = 365
"""Least log retention in prod and DR (the environments' files keep 2192 days: 6 years)."""


class ComplianceSettings(_Model):
    """HIPAA controls of `infra.compliance`: flow logs, CloudTrail, GuardDuty, log groups,
    AWS Backup. ``existing`` means the account already has that control (one GuardDuty
    detector per account and region; an organization or account trail may already exist)."""

    cloudtrail: Literal["create", "existing"] = "create"
    guardduty: Literal["create", "existing"] = "create"
    log_retention_days: int = Field(
        default=365, description="VPC flow logs, EKS control plane and RDS PostgreSQL logs; "
        "one of CloudWatch's retention values; >= 365 in prod and dr.")
    backup_retention_days: int = Field(default=35, ge=1, le=36500)
    backup_vault_lock: Literal["governance", "compliance"] = Field(
        default="governance", description="compliance: immutable once changeable_for_days "
        "have passed (required in prod and dr); governance: removable by IAM (dev).")

    @field_validator("log_retention_days")
    @classmethod
    def _retention(cls, value: int) -> int:
        if value not in LOG_RETENTION_DAYS:
            raise ValueError(f"must be one of CloudWatch Logs' retention values "
                             f"{', '.join(map(str, LOG_RETENTION_DAYS))} (got {value})")
        return value


class ClusterSettings(_Model):
    """A new EKS cluster (``create: true``) or an existing one reached by a stored kubeconfig.

    A new cluster's API endpoint (https://docs.aws.amazon.com/eks/latest/userguide/
    cluster-endpoint.html) is ``public-restricted`` by default: public access limited to
    ``public_access_cidrs`` (the runners of ``pulumi up``), private access on, so nodes and
    pods use the private path. ``private`` turns the public endpoint off; it is refused unless
    ``runner_in_vpc: true`` says the machine running ``pulumi up`` reaches the VPC (a runner
    inside it, a VPN or peering): otherwise the Kubernetes provider could not reach the API.
    """

    create: bool
    version: str | None = Field(default=None, pattern=r"^1\.[0-9]{2}$")
    node_instance_types: list[str] = Field(default_factory=list)
    node_min_size: int | None = Field(default=None, ge=1)
    node_desired_size: int | None = Field(default=None, ge=1)
    node_max_size: int | None = Field(default=None, ge=1)
    node_disk_gb: int = Field(default=50, ge=20)
    endpoint_access: EndpointAccess = "public-restricted"
    public_access_cidrs: list[str] = Field(default_factory=list)
    runner_in_vpc: bool = False
    access: ClusterAccessSettings = Field(default_factory=ClusterAccessSettings)
    pod_security_groups: bool = Field(
        default=True,
        description="Give the worker's pods their own security group (the only source the "
        "database and cache admit); needs trunking-capable instance types.")
    existing_cluster_name: str | None = None
    existing_kubeconfig_secret: str | None = None

    def node_scaling(self) -> tuple[int, int, int]:
        """(min, desired, max) nodes of a new cluster."""
        if self.node_min_size is None or self.node_desired_size is None or (
                self.node_max_size is None):
            raise ValueError("node sizes apply only to a new cluster (create: true)")
        return self.node_min_size, self.node_desired_size, self.node_max_size

    @field_validator("public_access_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        bad = []
        for cidr in value:
            try:
                ipaddress.IPv4Network(cidr, strict=True)
            except ValueError:
                bad.append(cidr)
        if bad:
            raise ValueError(f"not IPv4 CIDRs (network address/prefix): {', '.join(bad)}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ClusterSettings:
        node_fields = (self.node_min_size, self.node_desired_size, self.node_max_size)
        if self.create:
            if self.version is None or not self.node_instance_types or None in node_fields:
                raise ValueError(
                    "create: a new cluster needs version, node_instance_types, node_min_size, "
                    "node_desired_size and node_max_size"
                )
            lo, want, hi = (int(n or 0) for n in node_fields)
            if not lo <= want <= hi:
                raise ValueError("node_desired_size: must satisfy node_min_size <= "
                                 "node_desired_size <= node_max_size")
            if self.existing_kubeconfig_secret or self.existing_cluster_name:
                raise ValueError("existing_* apply only when create is false")
            self._endpoint()
        else:
            if not self.existing_kubeconfig_secret or not self.existing_cluster_name:
                raise ValueError(
                    "create: an existing cluster needs existing_cluster_name and "
                    "existing_kubeconfig_secret (a Secrets Manager secret holding the kubeconfig)"
                )
            if self.version is not None or self.node_instance_types or any(
                n is not None for n in node_fields
            ):
                raise ValueError("version and node_* apply only when create is true")
            # The platform owns an existing cluster's endpoint, access and CNI.
            owned = sorted({"endpoint_access", "public_access_cidrs", "runner_in_vpc", "access",
                            "pod_security_groups"} & self.model_fields_set)
            if owned:
                raise ValueError(f"{', '.join(owned)} apply only when create is true (the "
                                 "platform manages an existing cluster)")
        return self

    def _endpoint(self) -> None:
        if self.endpoint_access == "public-restricted":
            if not self.public_access_cidrs:
                raise ValueError("public_access_cidrs: required with endpoint_access "
                                 "public-restricted (the addresses of the pulumi up runners)")
            if "0.0.0.0/0" in self.public_access_cidrs:
                raise ValueError("public_access_cidrs: 0.0.0.0/0 is not restricted; list the "
                                 "runners' addresses")
        else:
            if self.public_access_cidrs:
                raise ValueError("public_access_cidrs: only with endpoint_access "
                                 "public-restricted (a private endpoint has no public CIDRs)")
            if not self.runner_in_vpc:
                raise ValueError("endpoint_access: 'private' needs runner_in_vpc: true (the "
                                 "machine running pulumi up must reach the VPC, or the "
                                 "Kubernetes provider cannot reach the API)")


class IngressPodSettings(_Model):
    """Pods admitted to the worker's port 8080: a label selector in one namespace."""

    namespace: str = Field(
        pattern=_K8S_NAMESPACE,
        description="Namespace of the pods (by name); the release's own namespace is 'audit'.")
    match_labels: dict[str, str] = Field(min_length=1)

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [f"{k}={v}" for k, v in value.items()
               if not re.fullmatch(_K8S_LABEL_KEY, k) or not re.fullmatch(_K8S_LABEL_VALUE, v)]
        if bad:
            raise ValueError(f"not Kubernetes labels: {', '.join(bad)}")
        return value


class WorkerSettings(_Model):
    """The audit worker Deployment (both blue-green slots) and its release behaviour.

    ``ingress_namespaces`` and ``ingress_pods`` are everything the chart's default-deny
    NetworkPolicy admits to port 8080 (metrics, health, HTTP intake). Every pod of a listed
    namespace is admitted; ``ingress_pods`` admits only the pods a selector matches.
    """

    image_repository: str = Field(min_length=1)
    log_id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    replicas: int = Field(ge=1, le=100)
    min_replicas: int = Field(ge=1, le=100)
    max_replicas: int = Field(ge=1, le=100)
    target_cpu_percent: int = Field(default=70, ge=10, le=100)
    cpu_request: str = Field(pattern=_K8S_CPU)
    cpu_limit: str = Field(pattern=_K8S_CPU)
    memory_request: str = Field(pattern=_K8S_MEMORY)
    memory_limit: str = Field(pattern=_K8S_MEMORY)
    batch_size: int = Field(ge=1, le=10_000)
    sign_interval_seconds: int = Field(ge=1, le=3600)
    shutdown_grace_seconds: int = Field(ge=1, le=600)
    auto_promote: bool
    scale_down_delay_seconds: int = Field(default=30, ge=0, le=86_400)
    ingress_namespaces: list[str] = Field(
        default_factory=lambda: list(DEFAULT_INGRESS_NAMESPACES),
        description="Namespaces whose pods may reach port 8080: monitoring, then producers'.")
    ingress_pods: list[IngressPodSettings] = Field(default_factory=list)

    @field_validator("ingress_namespaces")
    @classmethod
    def _namespaces(cls, value: list[str]) -> list[str]:
        bad = [n for n in value if not re.fullmatch(_K8S_NAMESPACE, n)]
        if bad:
            raise ValueError(f"not namespace names: {', '.join(bad)}")
        repeated = sorted({n for n in value if value.count(n) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> WorkerSettings:
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError("replicas: must satisfy min_replicas <= replicas <= max_replicas")
        return self


class ProbeSettings(_Model):
    period_seconds: int = Field(ge=1, le=3600)
    timeout_seconds: int = Field(ge=1, le=600)

    @model_validator(mode="after")
    def _timeout(self) -> ProbeSettings:
        if self.timeout_seconds > self.period_seconds:
            raise ValueError("timeout_seconds: must be <= period_seconds")
        return self


HEALTH_CHECKS: dict[str, tuple[int, int]] = {
    "liveness": (30, 5),
    "readiness": (10, 3),
    "database": (60, 10),
    "redis": (30, 5),
    "external": (120, 15),
}
"""The design's health-check table: check -> (period seconds, timeout seconds). Only
liveness and readiness are settings (``probes``): the kubelet polls them. Nothing in the
kit polls database, redis and external on a period (``auditctl promote`` calls them once,
as a gate; their timeouts are the worker's own budgets in audit_worker.health), so a
setting for their period would configure nothing; the guides give these periods to
whoever adds a poller."""


def _probe(check: str) -> ProbeSettings:
    period, timeout = HEALTH_CHECKS[check]
    return ProbeSettings(period_seconds=period, timeout_seconds=timeout)


class ProbesSettings(_Model):
    """The kubelet's probes (chart ``probes.liveness`` / ``probes.readiness``); the defaults
    are the design's table and env files rarely override them."""

    liveness: ProbeSettings = Field(default_factory=lambda: _probe("liveness"))
    readiness: ProbeSettings = Field(default_factory=lambda: _probe("readiness"))


class DnsFailoverSettings(_Model):
    """Route 53 failover TXT records (PRIMARY prod, SECONDARY DR), declared by the DR stack.

    Each record's value is the real endpoint host name (RDS, ElastiCache) of the active site,
    so clients connect by that name and ``verify-full`` checks the certificate's name. Which
    record answers is decided by ARC routing controls (infra/dr.py), not by probing prod.
    """

    hosted_zone_id: str = Field(pattern=r"^Z[A-Z0-9]{4,32}$")
    zone_name: str = Field(pattern=r"^([a-z0-9-]+\.)+[a-z]{2,}$")
    intake_record: str = Field(default="intake", pattern=r"^[a-z0-9-]+$")
    database_record: str = Field(default="db", pattern=r"^[a-z0-9-]+$")
    ttl_seconds: int = Field(default=60, ge=5, le=3600)


class DrSettings(_Model):
    """Disaster recovery: in ``dr`` where the primary is; in ``prod`` where DR is."""

    strategy: Literal["pilot-light", "warm-standby"] | None = None
    primary_stack: str | None = Field(default=None, pattern=r"^[\w.-]+/[\w.-]+/[\w.-]+$")
    primary_region: str | None = Field(default=None, pattern=_AWS_REGION)
    dr_region: str | None = Field(default=None, pattern=_AWS_REGION)
    dns: DnsFailoverSettings | None = None
    mode: Literal["standby", "promoted"] | None = Field(
        default=None,
        description="DR only. standby: the database is a cross-region read replica of prod's "
        "and the worker follows the strategy. promoted: after a drill or failover promoted "
        "it, the same instance without a replication source, prod-sized workers (then "
        "`pulumi up --refresh`).",
    )

    @property
    def promoted(self) -> bool:
        return self.mode == "promoted"


class KeySettings(_Model):
    backend: Literal["kms", "local"] = "kms"
    deletion_window_days: int = Field(default=30, ge=7, le=30)
    multi_region: bool = False


class LocalSettings(_Model):
    """The ``local`` platform of ``make demo``: processes on this machine, no cloud."""

    postgres_port: int = Field(ge=1024, le=65535)
    replica_port: int = Field(ge=1024, le=65535)
    redis_port: int = Field(ge=1024, le=65535)
    data_dir: str = Field(min_length=1)
    key_dir: str = Field(min_length=1)


class EnvironmentSettings(_Model):
    """Everything about one environment. Cloud sections are absent only in ``local``."""

    name: EnvironmentName
    purpose: str = Field(min_length=3)
    configuration_level: ConfigurationLevel
    monitoring_level: MonitoringLevel
    region: str = Field(pattern=_AWS_REGION)
    network: NetworkSettings | None = None
    database: DatabaseSettings | None = None
    cache: CacheSettings | None = None
    archive: ArchiveSettings | None = None
    cluster: ClusterSettings | None = None
    worker: WorkerSettings
    probes: ProbesSettings = Field(default_factory=ProbesSettings)
    dr: DrSettings | None = None
    keys: KeySettings = Field(default_factory=KeySettings)
    compliance: ComplianceSettings = Field(default_factory=ComplianceSettings)
    local: LocalSettings | None = None

    @property
    def hardened(self) -> bool:
        """Prod and DR: multi-AZ, deletion protection, ``protect`` in Pulumi state."""
        return self.name in HARDENED

    def cloud(self) -> CloudSettings:
        """The cloud sections, all present; raises `SettingsError` for ``local``."""
        if (
            self.network is None or self.database is None or self.cache is None
            or self.archive is None or self.cluster is None
        ):
            raise SettingsError(
                f"environment {self.name}",
                [Problem("", f"'{self.name}' is not a cloud environment (no Pulumi stack)")],
            )
        return CloudSettings(
            network=self.network, database=self.database, cache=self.cache,
            archive=self.archive, cluster=self.cluster,
        )


@dataclass(frozen=True)
class CloudSettings:
    """The sections every Pulumi stack has, without the ``| None`` of the schema."""

    network: NetworkSettings
    database: DatabaseSettings
    cache: CacheSettings
    archive: ArchiveSettings
    cluster: ClusterSettings


# --------------------------------------------------------------------------------------------
# Cross-field rules
# --------------------------------------------------------------------------------------------

_CLOUD_SECTIONS = ("network", "database", "cache", "archive", "cluster")


def _rules(s: EnvironmentSettings) -> list[Problem]:
    """Rules that span sections or depend on the environment's name."""
    out: list[Problem] = []

    def need(ok: bool, path: str, reason: str) -> None:
        if not ok:
            out.append(Problem(path, reason))

    if s.name == "local":
        for section in _CLOUD_SECTIONS:
            need(getattr(s, section) is None, section,
                 "not used by the local environment (it has no cloud resources)")
        need(s.local is not None, "local", "required in the local environment")
        need(s.keys.backend == "local", "keys.backend", "must be 'local' in the local environment")
        need("compliance" not in s.model_fields_set, "compliance",
             "not used by the local environment (it has no cloud resources)")
        return out

    need(s.local is None, "local", "only the local environment has a local section")
    for section in _CLOUD_SECTIONS:
        need(getattr(s, section) is not None, section, f"required in {s.name}")
    need(s.keys.backend == "kms", "keys.backend", f"must be 'kms' in {s.name}")
    if out:
        return out
    cloud = s.cloud()
    db, cache, net = cloud.database, cloud.cache, cloud.network

    minimum_backups = 35 if s.name == "prod" else 7
    need(db.backup_retention_days >= minimum_backups, "database.backup_retention_days",
         f"must be >= {minimum_backups} in {s.name} (got {db.backup_retention_days})")

    if s.hardened:
        need(db.multi_az, "database.multi_az", f"must be true in {s.name}")
        need(db.deletion_protection, "database.deletion_protection", f"must be true in {s.name}")
        need(cache.multi_az, "cache.multi_az", f"must be true in {s.name}")
        need(cache.automatic_failover, "cache.automatic_failover", f"must be true in {s.name}")
        need(net.nat_gateways in (None, "one-per-az"), "network.nat_gateways",
             f"must be 'one-per-az' in {s.name} (one NAT gateway is a single point of failure)")
        need(not s.worker.auto_promote, "worker.auto_promote",
             f"must be false in {s.name}: promotion there needs a person")

    archive, compliance = cloud.archive, s.compliance
    need(archive.object_lock_mode == "COMPLIANCE" or s.name == "dev",
         "archive.object_lock_mode", f"must be COMPLIANCE in {s.name} (GOVERNANCE only in dev)")
    if s.hardened:
        need(compliance.log_retention_days >= HARDENED_LOG_RETENTION_DAYS,
             "compliance.log_retention_days",
             f"must be >= {HARDENED_LOG_RETENTION_DAYS} in {s.name} "
             f"(got {compliance.log_retention_days})")
        need(compliance.backup_vault_lock == "compliance", "compliance.backup_vault_lock",
             f"must be 'compliance' in {s.name}")
    if s.name == "prod":
        need(compliance.cloudtrail == "create", "compliance.cloudtrail",
             "must be 'create' in prod: the primary site owns the multi-region trail")

    if s.name == "prod":
        need(s.keys.multi_region, "keys.multi_region",
             "must be true in prod (DR replicates every key)")
        dr = s.dr
        need(dr is not None and dr.dr_region is not None, "dr.dr_region", "required in prod")
        if dr is not None:
            need(dr.strategy is None and dr.primary_stack is None and dr.primary_region is None
                 and dr.dns is None and dr.mode is None, "dr", "prod sets only dr.dr_region")
            need(dr.dr_region != s.region, "dr.dr_region", "must differ from region")
    elif s.name == "dr":
        dr = s.dr
        if dr is None:
            out.append(Problem(
                "dr", "required in dr (strategy, primary_stack, primary_region, dns)"))
        else:
            need(dr.strategy is not None, "dr.strategy",
                 "required in dr (pilot-light or warm-standby)")
            need(dr.primary_stack is not None, "dr.primary_stack",
                 "required in dr (e.g. organization/audit-kit/prod)")
            need(dr.primary_region is not None, "dr.primary_region", "required in dr")
            need(dr.primary_region != s.region, "dr.primary_region", "must differ from region")
            need(dr.dns is not None, "dr.dns", "required in dr (hosted zone and record names)")
            need(dr.dr_region is None, "dr.dr_region", "set only in prod")
            need(dr.mode is not None, "dr.mode", "required in dr (standby or promoted)")
        need(not s.keys.multi_region, "keys.multi_region",
             "must be false in dr: its keys are replicas of prod's multi-region keys")
        need(not cloud.archive.replicate_to_dr, "archive.replicate_to_dr", "not allowed in dr")
    else:
        need(s.dr is None, "dr", f"not used in {s.name}")

    if cloud.archive.replicate_to_dr:
        need(s.dr is not None and s.dr.dr_region is not None, "archive.replicate_to_dr",
             "needs dr.dr_region")
    if cloud.cluster.create:
        out.extend(_cluster_rules(s.name, cloud.cluster, s.worker))
    return out


def _cluster_rules(env: str, c: ClusterSettings, w: WorkerSettings) -> list[Problem]:
    """A new cluster: someone can administer it, and its nodes hold the worker's pods."""
    out: list[Problem] = []
    if not c.access.admins:
        out.append(Problem("cluster.access.admins", (
            f"at least one admin role is required in {env}" if env in HARDENED
            else "at least one admin role is required") + ": the cluster creator gets no "
            "access, so the role that runs pulumi up must be listed"))
    unknown = [t for t in c.node_instance_types if t not in capacity.INSTANCE_TYPES]
    if unknown:
        out.append(Problem("cluster.node_instance_types", (
            f"no capacity figures for {', '.join(unknown)} (known: "
            f"{', '.join(capacity.INSTANCE_TYPES)}; add its limits to infra/capacity.py)")))
        return out
    if c.pod_security_groups:
        plain = [t for t in c.node_instance_types
                 if not capacity.INSTANCE_TYPES[t].security_groups_for_pods]
        if plain:
            out.append(Problem("cluster.node_instance_types", (
                f"{', '.join(plain)} cannot give pods security groups (not trunking "
                "compatible; no t-family type is); use e.g. m6i.large or set "
                "cluster.pod_security_groups: false")))
            return out
    pod = capacity.PodSize(cpu_m=capacity.cpu_millicores(w.cpu_request),
                           memory_mib=capacity.memory_mib(w.memory_request))
    lo, _, hi = c.node_scaling()
    for field, nodes, replicas, what in (
            ("cluster.node_min_size", lo, w.replicas, "worker.replicas"),
            ("cluster.node_max_size", hi, w.max_replicas, "worker.max_replicas")):
        pods = capacity.worker_pods(replicas)
        # The group may launch any of its types: the smallest decides.
        fits = [(t, capacity.nodes_needed(capacity.INSTANCE_TYPES[t], pod, pods,
                                          branch_interfaces=c.pod_security_groups))
                for t in c.node_instance_types]
        worst, fit = max(fits, key=lambda f: (f[1].per_node == 0, f[1].nodes))
        if fit.per_node == 0:
            out.append(Problem("cluster.node_instance_types", (
                f"one worker pod (worker.cpu_request {w.cpu_request}, worker.memory_request "
                f"{w.memory_request}) does not fit a {worst} node ({fit.limit})")))
            return out
        if fit.nodes > nodes:
            surge = capacity.surge(replicas)
            out.append(Problem(field, (
                f"{nodes} {worst} node(s) cannot hold {pods} pods: 2 slots x ({what} "
                f"{replicas} + surge {surge}) + 1 migration pod, at worker.cpu_request "
                f"{w.cpu_request} and worker.memory_request {w.memory_request}, plus 2 "
                f"CoreDNS pods; that needs {fit.nodes} nodes ({fit.per_node} worker pod(s) per "
                f"node, limited by {fit.limit})")))
    return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _path_of(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + part)
    return "".join(parts)


def _known_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names valid at ``loc`` (the parent of an unknown key)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (
                isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        current = candidates[0]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _problems_from(exc: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for err in exc.errors():
        # Drop pydantic's union-branch markers such as "NetworkSettings" or "function-after[...]".
        loc = tuple(p for p in err["loc"]
                    if isinstance(p, int) or (not p[:1].isupper() and "[" not in p))
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            reason = f"unknown key '{key}'"
            close = difflib.get_close_matches(key, _known_keys(EnvironmentSettings, loc[:-1]), n=1)
            if close:
                reason += f" (did you mean '{close[0]}'?)"
        elif err["type"] == "missing":
            reason = "required key is missing"
        else:
            reason = str(err["msg"]).removeprefix("Value error, ")
            # A model validator says "<field>: <reason>": move the field into the key path.
            field, sep, rest = reason.partition(": ")
            if sep and field in _known_keys(EnvironmentSettings, loc):
                loc, reason = (*loc, field), rest
            elif "input" in err and not isinstance(err["input"], dict | list):
                reason += f" (got {err['input']!r})"
        problems.append(Problem(_path_of(loc), reason))
    return problems


# yaml.safe_load with libyaml's parser where PyYAML has it (the same documents, ten times
# faster: the tests load hundreds of variants).
_SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _resolve(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if isinstance(name_or_path, str) and name_or_path in ENVIRONMENT_NAMES:
        return ENVIRONMENTS_DIR / f"{name_or_path}.yaml"
    return candidate


def load_environment(name_or_path: str | Path) -> EnvironmentSettings:
    """Load and validate ``environments/<name>.yaml`` (or the file at a path).

    Raises `SettingsError` naming the file, each key path and the reason.
    """
    path = _resolve(name_or_path)
    try:
        shown: Path | str = path.resolve().relative_to(ENVIRONMENTS_DIR.parent)
    except ValueError:
        shown = path
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_SAFE_LOADER)
    except FileNotFoundError:
        known = ", ".join(ENVIRONMENT_NAMES)
        raise SettingsError(shown, [Problem("", f"no such settings file (environments: {known})")]
                            ) from None
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(shown, [Problem("", f"cannot read: {exc}")]) from exc
    if not isinstance(raw, dict):
        raise SettingsError(shown, [Problem("", "the top level must be a mapping of settings")])
    try:
        settings = EnvironmentSettings.model_validate(raw)
    except ValidationError as exc:
        raise SettingsError(shown, _problems_from(exc)) from None
    if path.stem in ENVIRONMENT_NAMES and path.stem != settings.name:
        raise SettingsError(shown, [Problem("name", f"must be '{path.stem}' in {path.name} "
                                                    f"(got '{settings.name}')")])
    problems = _rules(settings)
    if problems:
        raise SettingsError(shown, problems)
    return settings


def environment_matrix() -> list[dict[str, str]]:
    """One row per environment, for the docs: name, purpose, configuration and monitoring level."""
    rows: list[dict[str, str]] = []
    for name in ENVIRONMENT_NAMES:
        s = load_environment(name)
        rows.append({
            "name": s.name,
            "purpose": s.purpose,
            "configuration_level": s.configuration_level,
            "monitoring_level": s.monitoring_level,
        })
    return rows

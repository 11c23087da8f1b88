"""Values for the ``charts/audit-worker`` Helm chart, computed from an environment's settings.

`chart_values` is a pure function of plain values (no Pulumi outputs), so the tests can check
its result against the chart's ``values.schema.json`` for every environment. The program
calls it inside an ``Output.apply`` once the ARNs, names and CIDRs it needs are known.

The result is merged by Helm over the chart's own ``values.yaml``: keys that are left out
(startup probe, metrics, DNS egress, ...) keep the chart's defaults.

Secrets: the worker reads ``audit-worker-connections`` (written by ``infra/workload.py``).
The migration Job reads ``migration-database-url`` from ``audit-worker-migration``, a Secret
that Pulumi never creates, reads or manages: it holds a URL of the login that owns schema
``audit``, which the operator creates once per database with the RDS master credentials
(docs/guides/migration-guide.md, "Running migrations on AWS"). Keeping it out of the
Pulumi-managed Secret keeps it out of Pulumi state, where a managed Secret's live data is
recorded on every update and refresh. The HTTP intake stays off (``secrets.intakeTokensKey``
empty): producers in the cloud environments use the Redis stream.

Network policy: port 8080 admits the pods of ``worker.ingress_namespaces`` and
``worker.ingress_pods`` (Prometheus in ``monitoring`` by default) and nothing else.

Blue-green: the active slot runs the environment's replica count (in DR: one replica for a
pilot light, prod's count for a warm standby); the idle slot runs ``preview_replicas``, 0 at
rest, set by the release workflow while a new version is previewed or while the old one is
kept for an instant rollback.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from infra.settings import EnvironmentSettings

__all__ = [
    "CONNECTIONS_SECRET",
    "DATABASE_URL_KEY",
    "MIGRATION_DATABASE_URL_KEY",
    "MIGRATION_SECRET",
    "REDIS_URL_KEY",
    "RELEASE_NAME",
    "SLOTS",
    "WorkerBindings",
    "active_replica_count",
    "chart_values",
    "service_names",
    "validate_image_tag",
]

RELEASE_NAME = "audit-worker"
CONNECTIONS_SECRET = "audit-worker-connections"
DATABASE_URL_KEY = "database-url"
REDIS_URL_KEY = "redis-url"
MIGRATION_SECRET = "audit-worker-migration"
"""Created once by the operator, never by Pulumi: it holds MIGRATION_DATABASE_URL_KEY."""
MIGRATION_DATABASE_URL_KEY = "migration-database-url"
RDS_CA_FILE = "/etc/ssl/certs/rds-global-bundle.pem"
"""Where the image installs the RDS global CA bundle (Dockerfile; the worker's default
``database_ca_file``): the stacks' URLs say ``sslmode=verify-full``. Redis (ElastiCache)
needs no file: its certificates chain to a public CA in the image's system trust store."""
MIGRATION_SERVICE_ACCOUNT = "audit-worker-migrate"
"""The migration Job's ServiceAccount; `infra.cluster` trusts it in the migration role."""
SLOTS: tuple[str, str] = ("blue", "green")
FAILURE_THRESHOLD = 3
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")

Slot = Literal["blue", "green"]


@dataclass(frozen=True, kw_only=True)
class WorkerBindings:
    """What the worker is bound to in the cloud, resolved to plain strings."""

    data_key_id: str
    signing_key_id: str
    archive_bucket: str
    service_account_role_arn: str
    postgres_cidrs: Sequence[str] = field(default_factory=list)
    redis_cidrs: Sequence[str] = field(default_factory=list)
    aws_api_cidrs: Sequence[str] = field(default_factory=list)
    database_auth: str = "password"
    """``iam`` when the instance has IAM authentication: the URLs carry no password."""
    migration_role_arn: str = ""
    migration_database_url: str = ""
    bootstrap_database_url: str = ""
    master_secret_arn: str = ""
    """The RDS-managed master secret; empty where there is none (a DR replica): then the
    logins replicated from prod are used and the bootstrap does not run."""


def split_image(ref: str) -> tuple[str, str]:
    """``"1.4.2@sha256:<hex>"`` -> ``("1.4.2", "sha256:<hex>")``; a tag alone -> ``(tag, "")``."""
    tag, _, digest = ref.partition("@")
    return tag, digest


def validate_image_tag(key: str, tag: str) -> str:
    """Return ``tag`` if it is an OCI image tag, optionally pinned by a digest
    (``1.4.2@sha256:<64 hex>``, which checkov's CKV_K8S_43 asks for); raise ValueError
    naming the config key."""
    tag_part, digest = split_image(tag)
    if "@" in tag and not _DIGEST.match(digest):
        raise ValueError(
            f"{key}: {tag!r}: the digest after '@' must be sha256:<64 lower-case hex digits>. "
            f"Fix: pulumi config set {key} <tag>@sha256:<digest>")
    if not _TAG.match(tag_part):
        raise ValueError(
            f"{key}: {tag!r} is not an image tag (letters, digits, '_', '.', '-'; at most 128; "
            f"not starting with '.' or '-'). Fix: pulumi config set {key} <tag>")
    return tag


def service_names(release: str = RELEASE_NAME) -> dict[str, str]:
    """The chart's Services: ``<fullname>-active`` and ``<fullname>-preview``."""
    return {"active": f"{release}-active", "preview": f"{release}-preview"}


def active_replica_count(settings: EnvironmentSettings, primary_replicas: int | None = None) -> int:
    """Replicas of the active slot: the setting, or in a DR standby what the strategy calls
    for (a promoted DR runs its own prod-sized setting)."""
    w = settings.worker
    if settings.dr is not None and settings.dr.promoted:
        return w.replicas
    if settings.dr is not None and settings.dr.strategy == "pilot-light":
        return 1
    if settings.dr is not None and settings.dr.strategy == "warm-standby" and primary_replicas:
        return max(w.min_replicas, min(primary_replicas, w.max_replicas))
    return w.replicas


def chart_values(
    settings: EnvironmentSettings,
    *,
    active_slot: str,
    blue_image: str,
    green_image: str,
    bindings: WorkerBindings,
    preview_replicas: int = 0,
    primary_replicas: int | None = None,
) -> dict[str, Any]:
    """The chart values for one environment (camelCase, as ``values.schema.json`` wants).

    ``blue_image`` and ``green_image`` are image tags, each optionally pinned by a digest
    (``1.4.2@sha256:...``); ``primary_replicas`` is prod's replica count, used by a DR warm
    standby.
    """
    if active_slot not in SLOTS:
        raise ValueError(f"active_slot must be 'blue' or 'green', got {active_slot!r}")
    if preview_replicas < 0:
        raise ValueError(f"preview_replicas must be >= 0, got {preview_replicas}")
    refs = {"blue": validate_image_tag("blueImage", blue_image),
            "green": validate_image_tag("greenImage", green_image)}
    tags = {slot: split_image(ref)[0] for slot, ref in refs.items()}
    digests = {slot: split_image(ref)[1] for slot, ref in refs.items()}
    w = settings.worker
    idle = "green" if active_slot == "blue" else "blue"
    pilot_light = (settings.dr is not None and settings.dr.strategy == "pilot-light"
                   and not settings.dr.promoted)
    # A DR standby's database is a read-only replica: no migrations until it is promoted.
    is_dr = settings.name == "dr" and not (settings.dr is not None and settings.dr.promoted)
    active = active_replica_count(settings, primary_replicas)
    idle_replicas = 0 if pilot_light else preview_replicas
    replicas = {active_slot: active, idle: idle_replicas}
    autoscaling = not pilot_light and w.max_replicas > w.min_replicas
    multi_az = settings.network is not None and (
        settings.network.availability_zones is None or settings.network.availability_zones > 1)
    # While a preview of a different image runs, the migration Job runs that image (expand).
    promoting = idle_replicas > 0 and refs[idle] != refs[active_slot]

    values: dict[str, Any] = {
        "environment": settings.name,
        "logId": w.log_id,
        # A digest pins an image for good, so a node's copy is the right one; a tag alone
        # may have been moved since, so every pod start asks the registry.
        "image": {"repository": w.image_repository,
                  "pullPolicy": "IfNotPresent" if all(digests.values()) else "Always"},
        "activeSlot": active_slot,
        "slots": {slot: {"tag": tags[slot], "replicas": replicas[slot],
                         **({"digest": digests[slot]} if digests[slot] else {})}
                  for slot in SLOTS},
        "worker": {
            "batchSize": w.batch_size,
            "signIntervalSeconds": w.sign_interval_seconds,
            "shutdownGraceSeconds": w.shutdown_grace_seconds,
        },
        "keys": {
            "backend": settings.keys.backend,
            "kmsDataKeyId": bindings.data_key_id,
            "kmsSigningKeyId": bindings.signing_key_id,
        },
        "aws": {
            "region": settings.region,
            "archiveBucket": bindings.archive_bucket,
            "archiveDetachVerifiedMonths": (
                settings.archive is not None and settings.archive.detach_verified_months
            ),
        },
        "tls": {"databaseCaFile": RDS_CA_FILE, "redisCaFile": ""},
        "secrets": {
            "existingSecret": CONNECTIONS_SECRET,
            "databaseUrlKey": DATABASE_URL_KEY,
            "redisUrlKey": REDIS_URL_KEY,
            "migrationSecret": MIGRATION_SECRET,
            "migrationDatabaseUrlKey": MIGRATION_DATABASE_URL_KEY,
            "intakeTokensKey": "",  # HTTP intake off: producers use the Redis stream
        },
        "serviceAccount": {
            "create": True,
            "name": "audit-worker",
            "annotations": {
                "eks.amazonaws.com/role-arn": bindings.service_account_role_arn,
                "eks.amazonaws.com/sts-regional-endpoints": "true",
            },
            # No Kubernetes API token: the worker never calls the API, and IRSA's STS token
            # is a projected volume of its own that the EKS pod identity webhook adds.
            "automountToken": False,
        },
        "probes": {
            check: {
                "periodSeconds": probe.period_seconds,
                "timeoutSeconds": probe.timeout_seconds,
                "failureThreshold": FAILURE_THRESHOLD,
            }
            for check, probe in (("liveness", settings.probes.liveness),
                                 ("readiness", settings.probes.readiness))
        },
        "resources": {
            "requests": {"cpu": w.cpu_request, "memory": w.memory_request},
            "limits": {"cpu": w.cpu_limit, "memory": w.memory_limit},
        },
        "podDisruptionBudget": (
            {"minAvailable": active - 1, "maxUnavailable": 1} if active >= 2
            else {"maxUnavailable": 1}
        ),
        "autoscaling": {
            "enabled": autoscaling,
            "minReplicas": w.min_replicas,
            "maxReplicas": w.max_replicas,
            "targetCPUUtilizationPercentage": w.target_cpu_percent,
        },
        "podAntiAffinity": {"preset": "soft" if active >= 2 else ""},
        "topologySpread": {
            "enabled": multi_az and active >= 2,
            "whenUnsatisfiable": "DoNotSchedule" if settings.hardened else "ScheduleAnyway",
        },
        "networkPolicy": {
            "enabled": True,
            "ingress": {
                "namespaces": list(dict.fromkeys(w.ingress_namespaces)),
                "pods": [{"namespace": pod.namespace, "matchLabels": dict(pod.match_labels)}
                         for pod in w.ingress_pods],
            },
            "egress": {
                "postgresCidrs": list(dict.fromkeys(bindings.postgres_cidrs)),
                "redisCidrs": list(dict.fromkeys(bindings.redis_cidrs)),
                "awsApiCidrs": list(dict.fromkeys(bindings.aws_api_cidrs)),
            },
        },
        # DR's database is a read replica until a failover promotes it: no migrations there.
        "databaseAuth": bindings.database_auth,
        "migration": {
            "enabled": not is_dr, "slot": idle if promoting else "",
            "databaseUrl": bindings.migration_database_url,
            "bootstrap": {
                "enabled": bool(bindings.database_auth == "iam" and bindings.master_secret_arn),
                "databaseUrl": bindings.bootstrap_database_url,
                "masterSecretArn": bindings.master_secret_arn,
            },
            "serviceAccount": {
                "name": MIGRATION_SERVICE_ACCOUNT,
                "annotations": ({"eks.amazonaws.com/role-arn": bindings.migration_role_arn,
                                 "eks.amazonaws.com/sts-regional-endpoints": "true"}
                                if bindings.migration_role_arn else {}),
            },
        },
    }
    return values

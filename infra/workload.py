"""The audit worker on Kubernetes: the ``charts/audit-worker`` Helm release and its Secret.

The chart holds no secret values. The database and Redis URLs (with the worker's password
and the Redis AUTH token) go into the Secret ``audit-worker-connections``, built here from
the other layers' outputs and marked secret, so they are encrypted in Pulumi state and never
shown. The release's values come from `infra.chart_values.chart_values`.

The migration Job needs a login that owns schema ``audit`` (the worker's login holds only
``audit_writer``). This program does not build that URL: the only owner it knows is the RDS
master user, whose password RDS keeps (and rotates) in Secrets Manager; reading it here
would put it into Pulumi state, through the Secret's inputs and the live data recorded as
its outputs. The operator creates the Secret ``audit-worker-migration`` (key
``migration-database-url``) once per database instead, and Pulumi never manages it, so it
stays out of state; see docs/guides/migration-guide.md, "Running migrations on AWS". Until it
exists, the Job fails at once with a message naming the Secret and the key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra.chart_values import (
    CONNECTIONS_SECRET,
    DATABASE_URL_KEY,
    MIGRATION_SECRET,
    REDIS_URL_KEY,
    RELEASE_NAME,
    WorkerBindings,
    chart_values,
    service_names,
)
from infra.settings import EnvironmentSettings

__all__ = ["CHART_DIR", "Workload", "WorkloadArgs"]

CHART_DIR = Path(__file__).resolve().parent.parent / "charts" / "audit-worker"


def _chart_path() -> str:
    # Relative to the working directory, so that the release's inputs do not change with the
    # checkout's location on disk.
    return os.path.relpath(CHART_DIR, Path.cwd())


@dataclass(frozen=True, kw_only=True)
class WorkloadArgs:
    settings: EnvironmentSettings
    provider: k8s.Provider
    namespace: pulumi.Input[str]
    active_slot: str
    blue_image: str
    green_image: str
    preview_replicas: int
    database_url: pulumi.Output[str]
    redis_url: pulumi.Output[str]
    data_key_arn: pulumi.Input[str]
    signing_key_arn: pulumi.Input[str]
    archive_bucket: pulumi.Input[str]
    service_account_role_arn: pulumi.Input[str]
    postgres_cidrs: pulumi.Input[Sequence[str]]
    redis_cidrs: pulumi.Input[Sequence[str]]
    aws_api_cidrs: pulumi.Input[Sequence[str]]
    primary_replicas: pulumi.Input[int] | None = None
    """DR warm standby: prod's replica count (from the stack reference)."""
    database_auth: str = "password"
    migration_role_arn: pulumi.Input[str] | None = None
    migration_database_url: pulumi.Input[str] | None = None
    bootstrap_database_url: pulumi.Input[str] | None = None
    master_secret_arn: pulumi.Input[str] | None = None


class Workload(pulumi.ComponentResource):
    release_name: pulumi.Output[str]
    active_service: str
    preview_service: str
    connections_secret: str
    migration_secret: str
    """Created by the operator, never by this program (see the module docstring)."""
    values: pulumi.Output[dict[str, Any]]

    def __init__(self, name: str, args: WorkloadArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("audit:infra:Workload", name, None, opts)
        on_cluster = pulumi.ResourceOptions(parent=self, provider=args.provider)
        connection_urls: pulumi.Output[dict[str, str]] = pulumi.Output.secret(
            pulumi.Output.all(args.database_url, args.redis_url).apply(
                lambda urls: {DATABASE_URL_KEY: urls[0], REDIS_URL_KEY: urls[1]}))

        secret = k8s.core.v1.Secret(
            f"{name}-connections",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=CONNECTIONS_SECRET,
                namespace=args.namespace,
                labels={"app.kubernetes.io/part-of": "audit-kit"},
            ),
            type="Opaque",
            string_data=connection_urls,
            opts=on_cluster,
        )

        settings = args.settings
        self.values = pulumi.Output.all(
            args.data_key_arn, args.signing_key_arn, args.archive_bucket,
            args.service_account_role_arn, args.postgres_cidrs, args.redis_cidrs,
            args.aws_api_cidrs, args.primary_replicas, args.migration_role_arn,
            args.migration_database_url, args.bootstrap_database_url, args.master_secret_arn,
        ).apply(lambda v: chart_values(
            settings,
            active_slot=args.active_slot,
            blue_image=args.blue_image,
            green_image=args.green_image,
            preview_replicas=args.preview_replicas,
            primary_replicas=int(v[7]) if v[7] is not None else None,
            bindings=WorkerBindings(
                data_key_id=v[0], signing_key_id=v[1], archive_bucket=v[2],
                service_account_role_arn=v[3], postgres_cidrs=list(v[4]),
                redis_cidrs=list(v[5]), aws_api_cidrs=list(v[6]),
                database_auth=args.database_auth, migration_role_arn=v[8] or "",
                migration_database_url=v[9] or "", bootstrap_database_url=v[10] or "",
                master_secret_arn=v[11] or ""),
        ))

        release = k8s.helm.v3.Release(
            f"{name}-release",
            name=RELEASE_NAME,
            chart=_chart_path(),
            namespace=args.namespace,
            values=self.values,
            atomic=True,
            cleanup_on_fail=True,
            max_history=10,
            timeout=600,
            opts=pulumi.ResourceOptions(parent=self, provider=args.provider,
                                        depends_on=[secret]),
        )
        self.release_name = release.name.apply(lambda n: n or RELEASE_NAME)
        services = service_names(RELEASE_NAME)
        self.active_service = services["active"]
        self.preview_service = services["preview"]
        self.connections_secret = CONNECTIONS_SECRET
        self.migration_secret = MIGRATION_SECRET

        self.register_outputs({
            "releaseName": self.release_name,
            "activeService": self.active_service,
            "previewService": self.preview_service,
        })

"""RDS PostgreSQL for the Merkle-tree log, or in DR a cross-region read replica of prod's.

- Encrypted at rest with the database key (storage and Performance Insights).
- The master password is managed by RDS in Secrets Manager, encrypted with the secrets key:
  it is never in Pulumi state or in any output.
- TLS only (``rds.force_ssl=1``) and pgaudit for DDL, role changes, writes and ``SET``: what
  the owner would do to get past the append-only triggers (migration 0003). pgaudit never
  logs statement parameters, which would put PHI into the PostgreSQL log.
- The worker connects as its own login role (``worker_username``), whose generated password
  is kept in a Secrets Manager secret encrypted with the secrets key. Pulumi cannot reach the
  private instance, so a one-time bootstrap (with the master secret) creates that login with
  this password, grants it ``audit_writer``, the NOLOGIN role of migration 0001 (SELECT
  and INSERT only), and sets its session timeouts (docs/guides/deployment-patterns.md,
  "The worker's database login"). In DR the replica already has the role, so the DR
  stack passes prod's worker password in (`DatabaseArgs.worker_password`).
- Migrations run as a third login that owns schema ``audit``, created by the same bootstrap
  and stored by the operator in the Kubernetes Secret ``audit-worker-migration``; Pulumi never
  sees its password (see `infra.workload`).
- Prod and DR: multi-AZ, deletion protection, a final snapshot, and ``protect`` in Pulumi.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

import pulumi
import pulumi_aws as aws
import pulumi_random as random

from infra.settings import DatabaseSettings

__all__ = ["PARAMETERS", "Database", "DatabaseArgs"]

PARAMETERS: dict[str, tuple[str, str]] = {
    # name: (value, apply method)
    "rds.force_ssl": ("1", "pending-reboot"),
    "ssl_min_protocol_version": ("TLSv1.2", "pending-reboot"),
    "shared_preload_libraries": ("pgaudit,pg_stat_statements", "pending-reboot"),
    # DDL (DISABLE TRIGGER, DETACH, DROP), grants, every write including TRUNCATE, and SET
    # (session_replication_role = replica silences the append-only row triggers).
    "pgaudit.log": ("ddl,role,write,misc_set", "immediate"),
    "pgaudit.log_catalog": ("0", "immediate"),
    "pgaudit.log_parameter": ("0", "immediate"),
    "pgaudit.role": ("rds_pgaudit", "immediate"),
    "log_connections": ("1", "immediate"),
    "log_disconnections": ("1", "immediate"),
    "password_encryption": ("scram-sha-256", "immediate"),
}
"""The parameter group of every instance (primary and replica)."""

MASTER_USERNAME = "audit_admin"


@dataclass(frozen=True, kw_only=True)
class DatabaseArgs:
    environment: str
    settings: DatabaseSettings
    hardened: bool
    subnet_ids: pulumi.Input[Sequence[str]]
    security_group_id: pulumi.Input[str]
    storage_key_arn: pulumi.Input[str]
    """The database key: storage and Performance Insights."""
    secrets_key_arn: pulumi.Input[str]
    """The secrets key: the RDS-managed master secret and the worker's credentials secret."""
    replicate_source_db: pulumi.Input[str] | None = None
    """DR: ARN of prod's instance; this instance becomes its cross-region read replica."""
    worker_password: pulumi.Input[str] | None = None
    """DR: prod's worker password (the replica has prod's roles). Generated when None."""


class Database(pulumi.ComponentResource):
    instance_arn: pulumi.Output[str]
    identifier: pulumi.Output[str]
    address: pulumi.Output[str]
    endpoint: pulumi.Output[str]
    port: pulumi.Output[int]
    master_secret_arn: pulumi.Output[str] | None
    worker_secret_arn: pulumi.Output[str]
    database_name: str
    worker_username: str
    is_replica: bool
    protected: bool
    """Whether the instance has ``protect=True`` (mocks cannot see resource options)."""

    def __init__(self, name: str, args: DatabaseArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("audit:infra:Database", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        s = args.settings
        self.database_name = s.database_name
        self.worker_username = s.worker_username
        self.is_replica = args.replicate_source_db is not None
        self.protected = args.hardened

        subnets = aws.rds.SubnetGroup(
            f"{name}-subnets",
            description=f"audit-kit {args.environment}: private subnets of the database",
            subnet_ids=args.subnet_ids,
            opts=child,
        )
        parameters = aws.rds.ParameterGroup(
            f"{name}-params",
            family=s.parameter_group_family,
            description=f"audit-kit {args.environment}: TLS only, pgaudit",
            parameters=[
                aws.rds.ParameterGroupParameterArgs(name=key, value=value, apply_method=method)
                for key, (value, method) in PARAMETERS.items()
            ],
            opts=child,
        )

        replica = args.replicate_source_db is not None
        primary_only = not replica  # a replica inherits engine, storage, users and database
        instance = aws.rds.Instance(
            f"{name}-replica" if replica else f"{name}-instance",
            replicate_source_db=args.replicate_source_db,
            engine="postgres" if primary_only else None,
            engine_version=s.engine_version if primary_only else None,
            allocated_storage=s.allocated_storage_gb if primary_only else None,
            db_name=s.database_name if primary_only else None,
            username=MASTER_USERNAME if primary_only else None,
            manage_master_user_password=True if primary_only else None,
            master_user_secret_kms_key_id=args.secrets_key_arn if primary_only else None,
            instance_class=s.instance_class,
            max_allocated_storage=s.max_allocated_storage_gb,
            storage_type="gp3",
            storage_encrypted=True,
            kms_key_id=args.storage_key_arn,
            iam_database_authentication_enabled=s.iam_auth,
            backup_retention_period=s.backup_retention_days,
            backup_window=s.backup_window,
            maintenance_window=s.maintenance_window,
            multi_az=s.multi_az,
            deletion_protection=s.deletion_protection,
            # RDS refuses a final snapshot of a read replica: only a primary takes one.
            skip_final_snapshot=replica or not args.hardened,
            final_snapshot_identifier=(
                f"audit-kit-{args.environment}-final" if args.hardened and not replica
                else None),
            delete_automated_backups=not args.hardened,
            performance_insights_enabled=s.performance_insights,
            performance_insights_kms_key_id=(
                args.storage_key_arn if s.performance_insights else None),
            performance_insights_retention_period=7 if s.performance_insights else None,
            publicly_accessible=False,
            copy_tags_to_snapshot=True,
            db_subnet_group_name=subnets.name,
            vpc_security_group_ids=[args.security_group_id],
            parameter_group_name=parameters.name,
            enabled_cloudwatch_logs_exports=["postgresql", "upgrade"],
            auto_minor_version_upgrade=True,
            apply_immediately=False,
            ca_cert_identifier="rds-ca-rsa2048-g1",
            opts=pulumi.ResourceOptions(parent=self, protect=args.hardened),
        )
        self.master_secret_arn = None if replica else instance.master_user_secrets.apply(
            lambda secrets: str(secrets[0].secret_arn or "") if secrets else "")

        self.instance_arn = instance.arn
        self.identifier = instance.identifier
        self.address = instance.address
        self.endpoint = instance.endpoint
        self.port = instance.port

        password: pulumi.Input[str]
        if args.worker_password is None:
            password = random.RandomPassword(
                f"{name}-worker-password", length=40, special=False, opts=child).result
        else:
            password = args.worker_password
        self._worker_password: pulumi.Output[str] = pulumi.Output.secret(password)
        credentials: pulumi.Output[str] = pulumi.Output.secret(pulumi.Output.json_dumps({
            "engine": "postgres",
            "username": s.worker_username,
            "password": self._worker_password,
            "host": self.address,
            "port": self.port,
            "dbname": s.database_name,
        }))
        worker_secret = aws.secretsmanager.Secret(
            f"{name}-worker-credentials",
            description=f"audit-kit {args.environment}: PostgreSQL credentials of the worker role",
            kms_key_id=args.secrets_key_arn,
            recovery_window_in_days=30 if args.hardened else 7,
            opts=child,
        )
        aws.secretsmanager.SecretVersion(
            f"{name}-worker-credentials-value",
            secret_id=worker_secret.id,
            secret_string=credentials,
            opts=child,
        )
        self.worker_secret_arn = worker_secret.arn

        self.register_outputs({
            "instanceArn": self.instance_arn,
            "identifier": self.identifier,
            "address": self.address,
            "port": self.port,
            "masterSecretArn": self.master_secret_arn,
            "workerSecretArn": self.worker_secret_arn,
        })

    def worker_url(self) -> pulumi.Output[str]:
        """``postgresql://`` URL of the worker role, TLS with certificate checks; secret."""
        return pulumi.Output.secret(pulumi.Output.all(
            self._worker_password, self.address, self.port,
        ).apply(lambda v: (
            f"postgresql://{self.worker_username}:{quote(str(v[0]), safe='')}@{v[1]}:{v[2]}/"
            f"{self.database_name}?sslmode=verify-full"
        )))


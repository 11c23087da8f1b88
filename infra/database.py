"""RDS PostgreSQL for the Merkle-tree log, or in DR a cross-region read replica of prod's.

- Encrypted at rest with the database key (storage and Performance Insights).
- The master password is managed by RDS in Secrets Manager, encrypted with the secrets key:
  it is never in Pulumi state or in any output.
- TLS only (``rds.force_ssl=1``) and pgaudit for DDL, role changes, writes and ``SET``: what
  the owner would do to get past the append-only triggers (migration 0003). pgaudit never
  logs statement parameters, which would put PHI into the PostgreSQL log.
- With ``iam_auth`` (every stack of the kit) the worker (``worker_username``) and the
  migration login (``migrator_username``) sign in with RDS IAM tokens: no password of theirs
  exists, in Pulumi state or anywhere. The chart's migration Job creates both logins
  (``audit-worker bootstrap``, run as the master login with the RDS-managed secret) before
  every migration, so a first ``up`` on an empty account needs no out-of-band step. IAM
  grants name the login per instance (`Database.login_arn`); the DR replica carries prod's
  roles and needs nothing from prod's region.
- Without ``iam_auth`` the worker's generated password is kept in a Secrets Manager secret
  encrypted with the secrets key (and the operator creates the migration login by hand).
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


MIGRATOR_USERNAME = "auditlog_migrator"
"""The login that owns schema ``audit`` (created by ``audit-worker bootstrap``)."""


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
    """DR standby: ARN of prod's instance; this instance becomes its cross-region read replica."""
    promoted_replica: bool = False
    """DR promoted (``dr.mode: promoted``): the replica after its promotion. The same logical
    resource as in standby, without ``replicate_source_db``: Pulumi updates it in place (RDS
    promotes a replica whose source is removed), never replaces it."""
    worker_password: pulumi.Input[str] | None = None
    """DR: prod's worker password (the replica has prod's roles). Generated when None."""
    identifier: str | None = None
    """The instance identifier (`infra.compliance.db_identifier`): its log groups are named
    after it and must exist first. Auto-named when None."""
    log_groups: Sequence[pulumi.Resource] = ()
    """Log groups the instance exports to, created (encrypted, retained) before it."""


class Database(pulumi.ComponentResource):
    instance_arn: pulumi.Output[str]
    identifier: pulumi.Output[str]
    address: pulumi.Output[str]
    endpoint: pulumi.Output[str]
    port: pulumi.Output[int]
    master_secret_arn: pulumi.Output[str] | None
    worker_secret_arn: pulumi.Output[str] | None
    """None with ``iam_auth``: the worker has no password."""
    resource_id: pulumi.Output[str]
    """The DbiResourceId, which IAM's ``rds-db:connect`` ARNs name."""
    database_name: str
    worker_username: str
    is_replica: bool
    subnet_group_name: pulumi.Output[str]
    parameter_group_name: pulumi.Output[str]
    security_group_ids: pulumi.Output[list[str]]
    kms_key_arn: pulumi.Output[str]
    """What a rebuilt read replica in this region needs (auditctl's failback)."""
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

        if args.promoted_replica and args.replicate_source_db is not None:
            raise ValueError("a promoted replica has no replicate_source_db")
        replica = args.replicate_source_db is not None
        # A replica inherits engine, storage, users and database, and keeps them when promoted:
        # setting them afterwards would ask RDS to replace the instance.
        primary_only = not replica and not args.promoted_replica
        instance = aws.rds.Instance(
            f"{name}-replica" if replica or args.promoted_replica else f"{name}-instance",
            identifier=args.identifier,
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
            # Off: engine_version pins MAJOR.MINOR, and an AWS-applied minor upgrade would make
            # the next `up` try to go back to the pinned minor (RDS refuses downgrades). Upgrade
            # by bumping the pin (docs/guides/migration-guide.md, "PostgreSQL minor upgrades").
            auto_minor_version_upgrade=False,
            apply_immediately=False,
            ca_cert_identifier="rds-ca-rsa2048-g1",
            opts=pulumi.ResourceOptions(parent=self, protect=args.hardened,
                                        depends_on=list(args.log_groups)),
        )
        self.master_secret_arn = None if not primary_only else instance.master_user_secrets.apply(
            lambda secrets: str(secrets[0].secret_arn or "") if secrets else "")

        self.instance_arn = instance.arn
        self.identifier = instance.identifier
        self.address = instance.address
        self.endpoint = instance.endpoint
        self.port = instance.port
        self.subnet_group_name = subnets.name
        self.parameter_group_name = parameters.name
        self.security_group_ids = pulumi.Output.from_input(args.security_group_id).apply(
            lambda sg: [str(sg)])
        self.kms_key_arn = pulumi.Output.from_input(args.storage_key_arn)

        self.resource_id = instance.resource_id
        self.iam_auth = s.iam_auth
        self.worker_secret_arn = None
        self._worker_password: pulumi.Output[str] | None = None
        if not s.iam_auth:
            password: pulumi.Input[str]
            if args.worker_password is None:
                password = random.RandomPassword(
                    f"{name}-worker-password", length=40, special=False, opts=child).result
            else:
                password = args.worker_password
            self._worker_password = pulumi.Output.secret(password)
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
                description=f"audit-kit {args.environment}: PostgreSQL credentials of the "
                            "worker role",
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
        self._region = aws.get_region_output(opts=pulumi.InvokeOutputOptions(parent=self)).region
        self._account = aws.get_caller_identity_output(
            opts=pulumi.InvokeOutputOptions(parent=self)).account_id

        self.register_outputs({
            "instanceArn": self.instance_arn,
            "identifier": self.identifier,
            "address": self.address,
            "port": self.port,
            "masterSecretArn": self.master_secret_arn,
            "workerSecretArn": self.worker_secret_arn,
        })

    def worker_url(self) -> pulumi.Output[str]:
        """``postgresql://`` URL of the worker role, TLS with certificate checks; secret
        (without ``iam_auth`` it holds the password; with it, only the login)."""
        return self._url(self.worker_username, self._worker_password)

    def migrator_url(self) -> pulumi.Output[str]:
        """The migration login's URL (``iam_auth``: no password, an IAM token signs in)."""
        return self._url(MIGRATOR_USERNAME, None)

    def bootstrap_url(self) -> pulumi.Output[str]:
        """The instance's database without a login: the bootstrap takes the master login
        and password from the RDS-managed secret (`master_secret_arn`)."""
        return pulumi.Output.all(self.address, self.port).apply(
            lambda v: f"postgresql://{v[0]}:{v[1]}/{self.database_name}?sslmode=verify-full")

    def login_arn(self, login: str) -> pulumi.Output[str]:
        """``rds-db:connect`` resource of `login` on this instance (RDS IAM authentication,
        https://docs.aws.amazon.com/AmazonRDS/latest/UserGuide/UsingWithRDS.IAMDBAuth.IAMPolicy.html)."""
        return pulumi.Output.all(self._region, self._account, self.resource_id).apply(
            lambda v: f"arn:aws:rds-db:{v[0]}:{v[1]}:dbuser:{v[2]}/{login}")

    def _url(self, login: str, password: pulumi.Output[str] | None) -> pulumi.Output[str]:
        secret = password if password is not None else pulumi.Output.from_input("")
        return pulumi.Output.secret(pulumi.Output.all(secret, self.address, self.port).apply(
            lambda v: (
                f"postgresql://{login}{':' + quote(str(v[0]), safe='') if v[0] else ''}"
                f"@{v[1]}:{v[2]}/{self.database_name}?sslmode=verify-full")))

"""Deploys one environment of the tamper-evident audit log (stacks dev, staging, prod, dr).

Per stack: KMS keys per purpose; a VPC with private subnets and AWS API endpoints; RDS
PostgreSQL with pgaudit and TLS only (in DR: a cross-region read replica of prod's); Redis
with TLS and an AUTH token; the S3 archive under Object Lock (COMPLIANCE, 6 years), replicated
from prod to the DR region; an EKS cluster (or an existing one) with the ``audit`` namespace
and the worker's IRSA role; the ``charts/audit-worker`` release (blue and green slots); in DR,
the traffic switch (ARC routing controls and Route 53 failover TXT records, infra/dr.py).
Settings come from ``environments/<environment>.yaml`` and are
validated before anything is declared; the release workflow changes only the stack config
``activeSlot``, ``blueImage``, ``greenImage`` (and ``previewReplicas``).
"""

import sys
from pathlib import Path

# Pulumi runs this directory as a script; make the `infra` package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pulumi

from infra.archive import Archive, ArchiveArgs, ArchiveReplicaArgs
from infra.cache import Cache, CacheArgs
from infra.chart_values import validate_image_tag
from infra.cluster import (
    Cluster,
    ClusterArgs,
    MigrationAccess,
    WorkerAccess,
    existing_cluster_security_group,
)
from infra.compliance import Compliance, compliance_args, db_identifier, eks_cluster_name
from infra.database import MIGRATOR_USERNAME, Database, DatabaseArgs
from infra.dr import Failover, FailoverArgs, PrimaryStack, primary_worker_password
from infra.keys import DR_REPLICATED, Keys, KeysArgs
from infra.network import Network, NetworkArgs
from infra.settings import load_environment
from infra.tagging import register_tagging
from infra.workload import Workload, WorkloadArgs

# --- Settings and release configuration ------------------------------------------------------
config = pulumi.Config("audit-kit")
settings = load_environment(config.require("environment"))
cloud = settings.cloud()
if (aws_region := pulumi.Config("aws").require("region")) != settings.region:
    raise ValueError(f"aws:region is {aws_region} but environments/{settings.name}.yaml has "
                     f"region {settings.region}. Fix: pulumi config set aws:region "
                     f"{settings.region}")
active_slot = config.require("activeSlot")
if active_slot not in ("blue", "green"):
    raise ValueError(f"audit-kit:activeSlot must be blue or green, got {active_slot!r}")
blue_image = validate_image_tag("audit-kit:blueImage", config.require("blueImage"))
green_image = validate_image_tag("audit-kit:greenImage", config.require("greenImage"))
preview_replicas = config.get_int("previewReplicas") or 0
register_tagging(settings.name)

# --- DR: the primary (prod) stack ------------------------------------------------------------
dr = settings.dr if settings.name == "dr" else None
primary = PrimaryStack(dr.primary_stack) if dr and dr.primary_stack else None
dr_promoted = bool(dr and dr.promoted)  # dr.mode: promoted (docs/runbooks/dr-drill.md)

# --- 1. Keys ---------------------------------------------------------------------------------
keys = Keys("keys", KeysArgs(
    environment=settings.name,
    region=settings.region,
    deletion_window_days=settings.keys.deletion_window_days,
    multi_region=settings.keys.multi_region,
    replica_of={p: primary.key_arn(p) for p in DR_REPLICATED} if primary else None,
    archive_replica_region=(settings.dr.dr_region
                            if settings.dr and cloud.archive.replicate_to_dr else None),
    protect=settings.hardened,
))

# --- 2. Network ------------------------------------------------------------------------------
network = Network("network", NetworkArgs(
    environment=settings.name,
    region=settings.region,
    settings=cloud.network,
    worker_security_group_id=(
        None if cloud.cluster.create
        else existing_cluster_security_group(str(cloud.cluster.existing_cluster_name))),
    pod_security_group=cloud.cluster.create and cloud.cluster.pod_security_groups,
))

# --- 2b. Archive (DR: prod's replica bucket in this region) ----------------------------------
archive: Archive | None = None
if primary is None:
    if keys.archive is None:
        raise TypeError("Missing required property 'archive' key")
    archive = Archive("archive", ArchiveArgs(
        environment=settings.name,
        settings=cloud.archive,
        key_arn=keys.archive.arn,
        region=settings.region,
        replica=(ArchiveReplicaArgs(region=settings.dr.dr_region, key_arn=keys.archive_replica.arn)
                 if settings.dr and settings.dr.dr_region and keys.archive_replica else None),
        protect=settings.hardened,
    ))
    archive_bucket, archive_bucket_arn = archive.bucket_name, archive.bucket_arn
    archive_key_arn = archive.key_arn
else:
    archive_bucket, archive_bucket_arn = primary.archive_bucket_name, primary.archive_bucket_arn
    archive_key_arn = primary.archive_key_arn

# --- 2c. HIPAA controls: flow logs, trail, GuardDuty, log groups, backups (infra/compliance.py);
# before the database and the cluster, which wait for their log groups --------------------------
compliance = Compliance("compliance", compliance_args(
    settings, network, archive_bucket_arn, archive))

# --- 3. Database (DR standby: cross-region read replica of prod's; promoted: the same
# instance without its source) ---------------------------------------------------------------
database = Database("database", DatabaseArgs(
    environment=settings.name,
    settings=cloud.database,
    hardened=settings.hardened,
    subnet_ids=network.private_subnet_ids,
    security_group_id=network.database_security_group_id,
    storage_key_arn=keys.database.arn,
    secrets_key_arn=keys.secrets.arn,
    replicate_source_db=primary.db_instance_arn if primary and not dr_promoted else None,
    promoted_replica=dr_promoted,
    # With IAM auth the worker has no password, and DR needs nothing of prod's.
    worker_password=(primary_worker_password(config, "primaryWorkerPassword")
                     if primary and not cloud.database.iam_auth else None),
    identifier=db_identifier(settings.name),
    log_groups=compliance.database_log_groups,
))

# --- 4. Cache --------------------------------------------------------------------------------
cache = Cache("cache", CacheArgs(
    environment=settings.name,
    settings=cloud.cache,
    hardened=settings.hardened,
    subnet_ids=network.private_subnet_ids,
    security_group_id=network.cache_security_group_id,
    storage_key_arn=keys.cache.arn,
    secrets_key_arn=keys.secrets.arn,
))

# --- 6. Cluster, namespace and the worker's IRSA role ----------------------------------------
cluster = Cluster("cluster", ClusterArgs(
    environment=settings.name,
    region=settings.region,
    settings=cloud.cluster,
    hardened=settings.hardened,
    subnet_ids=network.private_subnet_ids,
    worker_security_group_id=network.worker_security_group_id,
    worker_pod_security_group_id=network.worker_pod_security_group_id,
    secrets_key_arn=keys.secrets.arn,
    worker_access=WorkerAccess(
        data_key_arn=keys.data.arn,
        signing_key_arn=keys.signing.arn,
        secrets_key_arn=keys.secrets.arn,
        archive_key_arn=archive_key_arn,
        archive_bucket_arn=archive_bucket_arn,
        secret_arns=[arn for arn in (database.worker_secret_arn, cache.auth_secret_arn)
                     if arn is not None],
        database_login_arn=(database.login_arn(cloud.database.worker_username)
                            if cloud.database.iam_auth else None),
    ),
    migration_access=(MigrationAccess(
        database_login_arn=database.login_arn(MIGRATOR_USERNAME),
        master_secret_arn=database.master_secret_arn,
        secrets_key_arn=keys.secrets.arn,
    ) if cloud.database.iam_auth else None),
    name=eks_cluster_name(settings.name) if cloud.cluster.create else None,
    log_groups=compliance.cluster_log_groups,
))

# --- 7. Workload: the Helm release (blue and green slots) ------------------------------------
vpc_cidrs = network.vpc_cidr.apply(lambda cidr: [cidr])
workload = Workload("workload", WorkloadArgs(
    settings=settings,
    provider=cluster.provider,
    namespace=cluster.namespace,
    active_slot=active_slot,
    blue_image=blue_image,
    green_image=green_image,
    preview_replicas=preview_replicas,
    database_url=database.worker_url(),
    redis_url=cache.url(),
    data_key_arn=keys.data.arn,
    signing_key_arn=keys.signing.arn,
    archive_bucket=archive_bucket,
    service_account_role_arn=cluster.worker_role_arn,
    postgres_cidrs=vpc_cidrs,
    redis_cidrs=vpc_cidrs,
    aws_api_cidrs=vpc_cidrs,
    primary_replicas=primary.worker_replicas if primary and not dr_promoted else None,
    # IAM auth: the Job bootstraps the logins (master secret) and migrates with a token.
    database_auth="iam" if cloud.database.iam_auth else "password",
    migration_role_arn=cluster.migration_role_arn,
    migration_database_url=database.migrator_url() if cloud.database.iam_auth else None,
    bootstrap_database_url=database.bootstrap_url() if cloud.database.iam_auth else None,
    master_secret_arn=database.master_secret_arn,
))

# --- 8. DR: the traffic switch (ARC routing controls; failover TXT records) -------------------
failover: Failover | None = None
if primary is not None and dr is not None and dr.dns is not None:
    failover = Failover("failover", FailoverArgs(
        environment=settings.name,
        dns=dr.dns,
        primary_intake=primary.redis_endpoint,
        secondary_intake=cache.primary_endpoint,
        primary_database=primary.db_address,
        secondary_database=database.address,
    ))

# --- Outputs: what the release and drill workflows (and the DR stack) read -------------------
pulumi.export("environment", settings.name)
pulumi.export("region", settings.region)
pulumi.export("vpcId", network.vpc_id)
pulumi.export("privateSubnetIds", network.private_subnet_ids)

pulumi.export("dbInstanceArn", database.instance_arn)
pulumi.export("dbInstanceIdentifier", database.identifier)
pulumi.export("dbEndpoint", database.endpoint)
pulumi.export("dbAddress", database.address)
pulumi.export("dbPort", database.port)
pulumi.export("dbName", database.database_name)
pulumi.export("dbWorkerUser", database.worker_username)
pulumi.export("dbWorkerSecretArn", database.worker_secret_arn)
pulumi.export("dbProtected", database.protected)
# What auditctl's failback needs to rebuild a read replica in this region (KmsKeyId, ...).
pulumi.export("dbKmsKeyArn", database.kms_key_arn)
pulumi.export("dbSubnetGroupName", database.subnet_group_name)
pulumi.export("dbSecurityGroupIds", database.security_group_ids)
pulumi.export("dbParameterGroupName", database.parameter_group_name)
if database.master_secret_arn is not None:
    pulumi.export("dbMasterSecretArn", database.master_secret_arn)

pulumi.export("redisPrimaryEndpoint", cache.primary_endpoint)
pulumi.export("redisReaderEndpoint", cache.reader_endpoint)
pulumi.export("redisPort", cache.port)
pulumi.export("redisAuthSecretArn", cache.auth_secret_arn)

pulumi.export("keyArns", keys.arns)
pulumi.export("keyAliases", {p: h.alias for p, h in (
    ("database", keys.database), ("cache", keys.cache), ("secrets", keys.secrets),
    ("data", keys.data), ("signing", keys.signing), ("archive", keys.archive)) if h})
pulumi.export("signingKeyId", keys.signing.key_id)
pulumi.export("dataKeyId", keys.data.key_id)

pulumi.export("archiveBucketName", archive_bucket)
pulumi.export("archiveBucketArn", archive_bucket_arn)
pulumi.export("archiveKeyArn", archive_key_arn)
if archive is not None and archive.replica_bucket_name is not None and keys.archive_replica:
    pulumi.export("archiveReplicaBucketName", archive.replica_bucket_name)
    pulumi.export("archiveReplicaBucketArn", archive.replica_bucket_arn)
    pulumi.export("archiveReplicaKeyArn", keys.archive_replica.arn)
    pulumi.export("drRegion", settings.dr.dr_region if settings.dr else None)

pulumi.export("clusterName", cluster.cluster_name)
if cluster.kubeconfig is not None:
    pulumi.export("kubeconfig", cluster.kubeconfig)  # secret: endpoint and CA, no credential
else:
    pulumi.export("kubeconfigSecretName", cluster.kubeconfig_secret)
pulumi.export("namespace", cluster.namespace)
pulumi.export("serviceAccountName", cluster.service_account)
pulumi.export("workerRoleArn", cluster.worker_role_arn)

pulumi.export("releaseName", workload.release_name)
pulumi.export("connectionsSecretName", workload.connections_secret)
pulumi.export("migrationSecretName", workload.migration_secret)  # created by the operator
pulumi.export("activeSlot", active_slot)
pulumi.export("slotImages", {"blue": blue_image, "green": green_image})
pulumi.export("imageRepository", settings.worker.image_repository)
pulumi.export("activeServiceName", workload.active_service)
pulumi.export("previewServiceName", workload.preview_service)
pulumi.export("workerReplicas", settings.worker.replicas)
pulumi.export("autoPromote", settings.worker.auto_promote)
pulumi.export("scaleDownDelaySeconds", settings.worker.scale_down_delay_seconds)
pulumi.export("logId", settings.worker.log_id)

if primary is not None and dr is not None:
    pulumi.export("primaryStack", primary.stack_name)
    pulumi.export("primaryRegion", dr.primary_region)
    pulumi.export("drStrategy", dr.strategy)
    pulumi.export("drMode", dr.mode)
    pulumi.export("dbReplicaIdentifier", database.identifier)
    if not dr_promoted:
        pulumi.export("dbReplicaSourceArn", primary.db_instance_arn)
if failover is not None:
    pulumi.export("hostedZoneId", failover.hosted_zone_id)
    pulumi.export("hostedZoneName", failover.zone_name)
    pulumi.export("intakeRecordName", failover.intake_record)
    pulumi.export("databaseRecordName", failover.database_record)
    pulumi.export("dnsTtlSeconds", failover.ttl_seconds)
    pulumi.export("healthCheckIds", failover.health_check_ids)
    pulumi.export("arcClusterArn", failover.cluster_arn)
    pulumi.export("arcClusterEndpoints", failover.cluster_endpoints)
    pulumi.export("routingControlArns", failover.routing_control_arns)

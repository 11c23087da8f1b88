"""Settings: every environment file loads; bad values fail naming file, key path and reason."""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import stackkit
import yaml
from pydantic import ValidationError

from infra.settings import (
    DEFAULT_INGRESS_NAMESPACES,
    ENVIRONMENT_NAMES,
    ENVIRONMENTS_DIR,
    HEALTH_CHECKS,
    STACK_ENVIRONMENTS,
    ArchiveSettings,
    ClusterSettings,
    DnsFailoverSettings,
    DrSettings,
    EnvironmentSettings,
    KeySettings,
    NetworkSettings,
    Problem,
    SettingsError,
    environment_matrix,
    load_environment,
)


@functools.cache
def _parsed(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ENVIRONMENTS_DIR / f"{name}.yaml").read_text())
    return loaded


def raw(name: str) -> dict[str, Any]:
    """The settings file of ``name`` as data, a fresh copy to change."""
    return copy.deepcopy(_parsed(name))


def write(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML, and dumps ten times faster
    return path


@pytest.mark.parametrize("name", ENVIRONMENT_NAMES)
def test_every_environment_file_loads(name: str) -> None:
    settings = load_environment(name)
    assert isinstance(settings, EnvironmentSettings)
    assert settings.name == name


def test_environment_matrix_matches_the_design() -> None:
    assert environment_matrix() == [
        {"name": "dev", "purpose": "feature development", "configuration_level": "basic",
         "monitoring_level": "standard"},
        {"name": "staging", "purpose": "pre-production testing",
         "configuration_level": "production-like", "monitoring_level": "enhanced"},
        {"name": "prod", "purpose": "live operations", "configuration_level": "hardened",
         "monitoring_level": "comprehensive"},
        {"name": "dr", "purpose": "disaster recovery, second region",
         "configuration_level": "mirror-production", "monitoring_level": "critical"},
        {"name": "local", "purpose": "this machine, no cloud", "configuration_level": "basic",
         "monitoring_level": "standard"},
    ]


@pytest.mark.parametrize("name", ENVIRONMENT_NAMES)
def test_probes_follow_the_health_check_table(name: str) -> None:
    probes = load_environment(name).probes
    # Only what the kubelet polls is a setting: a period nothing uses would configure nothing.
    assert set(type(probes).model_fields) == {"liveness", "readiness"}
    for check in ("liveness", "readiness"):
        probe = getattr(probes, check)
        period, timeout = HEALTH_CHECKS[check]
        assert (probe.period_seconds, probe.timeout_seconds) == (period, timeout), check
    assert HEALTH_CHECKS == {"liveness": (30, 5), "readiness": (10, 3), "database": (60, 10),
                             "redis": (30, 5), "external": (120, 15)}


@pytest.mark.parametrize("name", ["prod", "dr"])
def test_hardened_environments_are_multi_az_and_deletion_protected(name: str) -> None:
    cloud = load_environment(name).cloud()
    assert cloud.database.multi_az and cloud.database.deletion_protection
    assert cloud.cache.multi_az and cloud.cache.automatic_failover
    assert not load_environment(name).worker.auto_promote


def test_prod_keeps_backups_35_days_and_multi_region_keys() -> None:
    prod = load_environment("prod")
    assert prod.cloud().database.backup_retention_days >= 35
    assert prod.keys.multi_region
    assert prod.dr is not None and prod.dr.dr_region == "us-west-2"


def test_dev_is_single_az_and_unprotected() -> None:
    dev = load_environment("dev").cloud()
    assert not dev.database.multi_az and not dev.database.deletion_protection
    assert dev.network.nat_gateways == "single"


def test_local_is_valid_but_not_a_cloud_environment() -> None:
    local = load_environment("local")
    assert local.local is not None and local.keys.backend == "local"
    assert "local" not in STACK_ENVIRONMENTS
    with pytest.raises(SettingsError, match="not a cloud environment"):
        local.cloud()


def test_worker_defaults_scale_down_delay_to_30_seconds(tmp_path: Path) -> None:
    data = raw("dev")
    del data["worker"]["scale_down_delay_seconds"]
    assert load_environment(write(tmp_path, "dev", data)).worker.scale_down_delay_seconds == 30


@pytest.mark.parametrize("stack", STACK_ENVIRONMENTS)
def test_every_stack_admits_the_monitoring_namespace_to_the_worker(stack: str) -> None:
    worker = load_environment(stack).worker
    assert "ingress_namespaces" in raw(stack)["worker"], "the env file says it explicitly"
    assert "monitoring" in worker.ingress_namespaces


def test_prod_admits_only_prometheus_to_the_worker() -> None:
    worker = load_environment("prod").worker
    assert worker.ingress_namespaces == ["monitoring"]
    assert worker.ingress_pods == []


def test_worker_ingress_defaults_to_the_monitoring_namespace(tmp_path: Path) -> None:
    data = raw("dev")
    del data["worker"]["ingress_namespaces"]
    del data["worker"]["ingress_pods"]
    worker = load_environment(write(tmp_path, "dev", data)).worker
    assert worker.ingress_namespaces == list(DEFAULT_INGRESS_NAMESPACES) == ["monitoring"]
    assert worker.ingress_pods == []


def test_worker_ingress_takes_producers_namespaces_and_pod_selectors(tmp_path: Path) -> None:
    data = raw("staging")
    data["worker"]["ingress_namespaces"] = ["monitoring", "ehr-producers"]
    data["worker"]["ingress_pods"] = [
        {"namespace": "gateway", "match_labels": {"app.kubernetes.io/name": "audit-gateway"}}]
    worker = load_environment(write(tmp_path, "staging", data)).worker
    assert worker.ingress_namespaces == ["monitoring", "ehr-producers"]
    (pod,) = worker.ingress_pods
    assert (pod.namespace, pod.match_labels) == (
        "gateway", {"app.kubernetes.io/name": "audit-gateway"})


@pytest.mark.parametrize("stack", STACK_ENVIRONMENTS)
def test_stack_files_agree_with_the_settings(stack: str) -> None:
    doc = yaml.safe_load((ENVIRONMENTS_DIR / f"Pulumi.{stack}.yaml").read_text())
    settings = load_environment(stack)
    config = doc["config"]
    assert config["audit-kit:environment"] == stack
    assert config["aws:region"] == settings.region
    assert config["audit-kit:activeSlot"] in ("blue", "green")
    assert {"audit-kit:blueImage", "audit-kit:greenImage"} <= set(config)
    assert doc["secretsprovider"] == (
        f"awskms://alias/audit-kit-{stack}-pulumi?region={settings.region}")


def test_project_file_points_at_infra_and_environments() -> None:
    project = yaml.safe_load((stackkit.ROOT / "Pulumi.yaml").read_text())
    assert project["name"] == "audit-kit"
    assert project["main"] == "infra/"
    assert project["stackConfigDir"] == "environments"
    assert project["runtime"] == {"name": "python",
                                  "options": {"toolchain": "pip", "virtualenv": ".venv"}}


DELETE = object()


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data[key]
    if value is DELETE:
        del data[last]
    else:
        data[last] = value


def problems(tmp_path: Path, env: str, changes: dict[str, Any]) -> list[tuple[str, str]]:
    """(key path, reason) of each problem in ``env``'s file with ``changes`` made to it."""
    data = raw(env)
    for path, value in changes.items():
        _set(data, path, value)
    file = write(tmp_path, env, data)
    try:
        load_environment(file)
    except SettingsError as caught:
        assert caught.file == str(file)
        assert str(caught) == "\n".join(f"{file}: {p.path}: {p.reason}" if p.path
                                        else f"{file}: {p.reason}" for p in caught.problems)
        return [(p.path, p.reason) for p in caught.problems]
    return []


class Contains(str):
    """A reason pydantic words: only this part of it is pinned."""


def has_problem(found: list[tuple[str, str]], path: str, reason: str) -> bool:
    if isinstance(reason, Contains):
        return any(p == path and reason in r for p, r in found)
    return (path, reason) in found


# (environment, changes, expected key path, expected reason): every rule, by the input it
# refuses. Reasons are exact, except pydantic's own (Contains).
REFUSED: list[Any] = [
    # ---- API endpoint of a new EKS cluster
    *(pytest.param(env, {"cluster.public_access_cidrs": []}, "cluster.public_access_cidrs",
                   "required with endpoint_access public-restricted (the addresses of the "
                   "pulumi up runners)", id=f"{env}-public-endpoint-without-allowlist")
      for env in ("dev", "prod", "dr")),
    *(pytest.param(env, {"cluster.public_access_cidrs": ["203.0.113.0/24", "0.0.0.0/0"]},
                   "cluster.public_access_cidrs",
                   "0.0.0.0/0 is not restricted; list the runners' addresses",
                   id=f"{env}-public-endpoint-open-to-everyone")
      for env in ("dev", "prod", "dr")),
    pytest.param("prod", {"cluster.public_access_cidrs": ["198.51.100.10/24"]},
                 "cluster.public_access_cidrs",
                 Contains("not IPv4 CIDRs (network address/prefix): 198.51.100.10/24"),
                 id="cidr-with-host-bits"),
    pytest.param("prod", {"cluster.public_access_cidrs": ["198.51.100.300/32"]},
                 "cluster.public_access_cidrs",
                 Contains("not IPv4 CIDRs (network address/prefix): 198.51.100.300/32"),
                 id="not-a-cidr"),
    pytest.param("prod", {"cluster.endpoint_access": "public"}, "cluster.endpoint_access",
                 Contains("'public-restricted' or 'private'"), id="unknown-endpoint-access"),
    pytest.param("prod", {"cluster.endpoint_access": "private",
                          "cluster.public_access_cidrs": []}, "cluster.endpoint_access",
                 "'private' needs runner_in_vpc: true (the machine running pulumi up must "
                 "reach the VPC, or the Kubernetes provider cannot reach the API)",
                 id="private-endpoint-without-a-runner-in-the-vpc"),
    pytest.param("prod", {"cluster.endpoint_access": "private", "cluster.runner_in_vpc": True},
                 "cluster.public_access_cidrs",
                 "only with endpoint_access public-restricted (a private endpoint has no "
                 "public CIDRs)", id="private-endpoint-with-cidrs"),
    pytest.param("dev", {"cluster.endpoint_public_access": True}, "cluster.endpoint_public_access",
                 "unknown key 'endpoint_public_access' (did you mean 'endpoint_access'?)",
                 id="old-endpoint-key"),
    *(pytest.param("staging", {f"cluster.{key}": value}, "cluster",
                   f"{key} apply only when create is true (the platform manages an existing "
                   "cluster)", id=f"existing-cluster-with-{key}")
      for key, value in [("endpoint_access", "private"),
                         ("public_access_cidrs", ["203.0.113.0/24"]),
                         ("runner_in_vpc", True), ("access", {"admins": []}),
                         ("pod_security_groups", True)]),
    # ---- access entries
    *(pytest.param(env, {"cluster.access.admins": []}, "cluster.access.admins",
                   f"at least one admin role is required{suffix}: the cluster creator gets "
                   "no access, so the role that runs pulumi up must be listed",
                   id=f"{env}-without-admins")
      for env, suffix in (("prod", " in prod"), ("dr", " in dr"), ("dev", ""))),
    *(pytest.param("prod", {f"cluster.access.{level}": [arn]}, f"cluster.access.{level}",
                   "not IAM role ARNs (arn:aws:iam::<12 digits>:role/<name>): " + arn,
                   id=f"{level}-{case}")
      for level in ("admins", "operators", "viewers")
      for case, arn in [("user-arn", "arn:aws:iam::111122223333:user/ci"),
                        ("short-account", "arn:aws:iam::11112222333:role/ci"),
                        ("no-name", "arn:aws:iam::111122223333:role/"),
                        ("trailing-text", "arn:aws:iam::111122223333:role/ci extra"),
                        ("sts-session", "arn:aws:sts::111122223333:assumed-role/ci/s")]),
    pytest.param("prod", {"cluster.access.viewers": ["arn:aws:iam::111122223333:role/v"] * 2},
                 "cluster.access.viewers",
                 "listed more than once: arn:aws:iam::111122223333:role/v", id="viewer-twice"),
    pytest.param("prod", {"cluster.access.viewers": [
        "arn:aws:iam::111122223333:role/audit-kit-ci-deploy"]}, "cluster.access.viewers",
                 "arn:aws:iam::111122223333:role/audit-kit-ci-deploy is already in admins; give "
                 "each role one level", id="role-at-two-levels"),
    # ---- node capacity and security groups for pods
    pytest.param("prod", {"cluster.node_instance_types": ["m6i.large"],
                          "cluster.node_max_size": 9}, "cluster.node_max_size",
                 "9 m6i.large node(s) cannot hold 27 pods: 2 slots x (worker.max_replicas 10 + "
                 "surge 3) + 1 migration pod, at worker.cpu_request 1 and worker.memory_request "
                 "1Gi, plus 2 CoreDNS pods; that needs 27 nodes (1 worker pod(s) per node, "
                 "limited by cpu)", id="prod-draft-nodes-cannot-hold-the-peak"),
    pytest.param("prod", {"cluster.node_max_size": 8}, "cluster.node_max_size",
                 "8 m6i.xlarge node(s) cannot hold 27 pods: 2 slots x (worker.max_replicas 10 + "
                 "surge 3) + 1 migration pod, at worker.cpu_request 1 and worker.memory_request "
                 "1Gi, plus 2 CoreDNS pods; that needs 9 nodes (3 worker pod(s) per node, "
                 "limited by cpu)", id="one-node-short-of-the-peak"),
    pytest.param("prod", {"cluster.node_min_size": 2, "cluster.node_desired_size": 2},
                 "cluster.node_min_size",
                 "2 m6i.xlarge node(s) cannot hold 9 pods: 2 slots x (worker.replicas 3 + "
                 "surge 1) + 1 migration pod, at worker.cpu_request 1 and worker.memory_request "
                 "1Gi, plus 2 CoreDNS pods; that needs 3 nodes (3 worker pod(s) per node, "
                 "limited by cpu)", id="floor-below-a-release-at-rest"),
    pytest.param("prod", {"worker.cpu_request": "4"}, "cluster.node_instance_types",
                 "one worker pod (worker.cpu_request 4, worker.memory_request 1Gi) does not fit "
                 "a m6i.xlarge node (cpu)", id="worker-pod-larger-than-a-node"),
    pytest.param("dev", {"cluster.node_instance_types": ["t3.large"]},
                 "cluster.node_instance_types",
                 "t3.large cannot give pods security groups (not trunking compatible; no "
                 "t-family type is); use e.g. m6i.large or set cluster.pod_security_groups: "
                 "false", id="t3-with-pod-security-groups"),
    pytest.param("dev", {"cluster.node_instance_types": ["m6i.large", "t3.large"]},
                 "cluster.node_instance_types",
                 "t3.large cannot give pods security groups (not trunking compatible; no "
                 "t-family type is); use e.g. m6i.large or set cluster.pod_security_groups: "
                 "false", id="t3-among-the-types"),
    pytest.param("dev", {"cluster.node_instance_types": ["c7i.large"]},
                 "cluster.node_instance_types",
                 "no capacity figures for c7i.large (known: m6i.large, m6i.xlarge, "
                 "m6i.2xlarge, m6i.4xlarge, t3.large; add its limits to infra/capacity.py)",
                 id="unknown-instance-type"),
    # ---- a new or an existing cluster
    *(pytest.param("dev", {key: value}, "cluster.create",
                   "a new cluster needs version, node_instance_types, node_min_size, "
                   "node_desired_size and node_max_size", id=f"new-cluster-without-{name}")
      for name, key, value in [
          ("version", "cluster.version", DELETE),
          ("node-types", "cluster.node_instance_types", []),
          ("min-size", "cluster.node_min_size", DELETE),
          ("desired-size", "cluster.node_desired_size", DELETE),
          ("max-size", "cluster.node_max_size", DELETE)]),
    pytest.param("dev", {"cluster.node_desired_size": 4}, "cluster.node_desired_size",
                 "must satisfy node_min_size <= node_desired_size <= node_max_size",
                 id="desired-size-above-max"),
    pytest.param("dev", {"cluster.node_min_size": 3}, "cluster.node_desired_size",
                 "must satisfy node_min_size <= node_desired_size <= node_max_size",
                 id="desired-size-below-min"),
    pytest.param("dev", {"cluster.existing_cluster_name": "shared"}, "cluster",
                 "existing_* apply only when create is false", id="new-cluster-with-name"),
    pytest.param("dev", {"cluster.existing_kubeconfig_secret": "kubeconfig"}, "cluster",
                 "existing_* apply only when create is false", id="new-cluster-with-secret"),
    pytest.param("staging", {"cluster.existing_cluster_name": DELETE}, "cluster.create",
                 "an existing cluster needs existing_cluster_name and existing_kubeconfig_secret "
                 "(a Secrets Manager secret holding the kubeconfig)",
                 id="existing-cluster-without-name"),
    pytest.param("staging", {"cluster.existing_kubeconfig_secret": DELETE}, "cluster.create",
                 "an existing cluster needs existing_cluster_name and existing_kubeconfig_secret "
                 "(a Secrets Manager secret holding the kubeconfig)",
                 id="existing-cluster-without-secret"),
    *(pytest.param("staging", {key: value}, "cluster",
                   "version and node_* apply only when create is true",
                   id=f"existing-cluster-with-{key.rpartition('.')[2]}")
      for key, value in [("cluster.version", "1.31"), ("cluster.node_instance_types", ["m6i"]),
                         ("cluster.node_min_size", 1), ("cluster.node_desired_size", 1),
                         ("cluster.node_max_size", 1)]),
    # ---- network
    pytest.param("dev", {"network.existing_vpc_id": "vpc-0123abcd"}, "network",
                 "set either vpc_cidr (new VPC) or existing_vpc_id (existing VPC)",
                 id="new-and-existing-vpc"),
    pytest.param("dev", {"network.vpc_cidr": DELETE}, "network",
                 "set either vpc_cidr (new VPC) or existing_vpc_id (existing VPC)",
                 id="no-vpc"),
    pytest.param("dev", {"network.availability_zones": DELETE}, "network.availability_zones",
                 "required for a new VPC", id="new-vpc-without-zones"),
    pytest.param("dev", {"network.nat_gateways": DELETE}, "network.nat_gateways",
                 "required for a new VPC", id="new-vpc-without-nat"),
    pytest.param("dev", {"network": {"existing_vpc_id": "vpc-0123abcd",
                                     "existing_private_subnet_ids": ["subnet-0123abcd"]}},
                 "network.existing_private_subnet_ids", "an existing VPC needs two or more",
                 id="existing-vpc-with-one-subnet"),
    *(pytest.param("dev", {"network": {"existing_vpc_id": "vpc-0123abcd", key: value,
                                       "existing_private_subnet_ids": ["subnet-0123abcd",
                                                                       "subnet-4567abcd"]}},
                   "network", "availability_zones and nat_gateways apply only to a new VPC",
                   id=f"existing-vpc-with-{key}")
      for key, value in [("availability_zones", 2), ("nat_gateways", "single")]),
    pytest.param("dev", {"network.vpc_cidr": "10.0.0.0/21"}, "network.vpc_cidr",
                 "/21 is too small for per-AZ subnets; use /20 or larger (got '10.0.0.0/21')",
                 id="vpc-cidr-below-20"),
    pytest.param("dev", {"network.vpc_cidr": "10.0.0.0/33"}, "network.vpc_cidr",
                 Contains("not an IPv4 CIDR: "), id="vpc-cidr-not-a-cidr"),
    pytest.param("dev", {"network": {"existing_vpc_id": "vpc-0123abcd",
                                     "existing_private_subnet_ids": [
                                         "subnet-0123abcd", "subnet-0123abc", "subnet-4567abcd\n",
                                         "xsubnet-0123abcd"]}},
                 "network.existing_private_subnet_ids",
                 "not subnet ids: subnet-0123abc, subnet-4567abcd\n, xsubnet-0123abcd",
                 id="subnet-ids-not-whole-ids"),
    # ---- database, cache, archive
    pytest.param("dev", {"database.allocated_storage_gb": 101},
                 "database.max_allocated_storage_gb", "must be >= allocated_storage_gb",
                 id="max-storage-below-storage"),
    pytest.param("prod", {"database.backup_retention_days": 34}, "database.backup_retention_days",
                 "must be >= 35 in prod (got 34)", id="prod-backups-below-35-days"),
    pytest.param("staging", {"database.backup_retention_days": 6},
                 "database.backup_retention_days", "must be >= 7 in staging (got 6)",
                 id="staging-backups-below-7-days"),
    pytest.param("dev", {"database.backup_retention_days": 0}, "database.backup_retention_days",
                 "must be >= 7 in dev (got 0)", id="dev-without-backups"),
    pytest.param("dev", {"database.backup_retention_days": -1},
                 "database.backup_retention_days", Contains("greater than or equal to 0"),
                 id="negative-backup-retention"),
    pytest.param("prod", {"database.deletion_protection": False},
                 "database.deletion_protection", "must be true in prod",
                 id="prod-database-deletable"),
    pytest.param("dr", {"database.multi_az": False}, "database.multi_az", "must be true in dr",
                 id="dr-database-single-az"),
    pytest.param("dev", {"cache.multi_az": True}, "cache.multi_az",
                 "needs automatic_failover: true", id="multi-az-cache-without-failover"),
    pytest.param("prod", {"cache.multi_az": False, "cache.automatic_failover": False},
                 "cache.automatic_failover", "must be true in prod", id="prod-cache-no-failover"),
    pytest.param("dr", {"cache.multi_az": False}, "cache.multi_az", "must be true in dr",
                 id="dr-cache-single-az"),
    pytest.param("dev", {"archive.replicate_to_dr": True}, "archive.replicate_to_dr",
                 "needs dr.dr_region", id="replication-without-dr-region"),
    pytest.param("dr", {"archive.replicate_to_dr": True}, "archive.replicate_to_dr",
                 "not allowed in dr", id="dr-replicates-its-archive"),
    # ---- prod and DR
    pytest.param("prod", {"dr": DELETE}, "dr.dr_region", "required in prod", id="prod-without-dr"),
    pytest.param("prod", {"dr.dr_region": DELETE}, "dr.dr_region", "required in prod",
                 id="prod-without-dr-region"),
    pytest.param("prod", {"dr": DELETE}, "archive.replicate_to_dr", "needs dr.dr_region",
                 id="prod-replicates-without-dr-region"),
    *(pytest.param("prod", {f"dr.{key}": value}, "dr", "prod sets only dr.dr_region",
                   id=f"prod-with-dr-{key}")
      for key, value in [("strategy", "pilot-light"), ("primary_stack", "o/audit-kit/prod"),
                         ("primary_region", "us-east-2"),
                         ("dns", {"hosted_zone_id": "Z0123", "zone_name": "a.org"}),
                         ("mode", "standby")]),
    pytest.param("prod", {"dr.dr_region": "us-east-1"}, "dr.dr_region", "must differ from region",
                 id="prod-dr-region-is-its-region"),
    pytest.param("prod", {"keys.multi_region": False}, "keys.multi_region",
                 "must be true in prod (DR replicates every key)", id="prod-single-region-keys"),
    pytest.param("prod", {"network.nat_gateways": "single"}, "network.nat_gateways",
                 "must be 'one-per-az' in prod (one NAT gateway is a single point of failure)",
                 id="prod-one-nat-gateway"),
    pytest.param("prod", {"worker.auto_promote": True}, "worker.auto_promote",
                 "must be false in prod: promotion there needs a person", id="prod-auto-promotes"),
    pytest.param("dr", {"worker.auto_promote": True}, "worker.auto_promote",
                 "must be false in dr: promotion there needs a person", id="dr-auto-promotes"),
    pytest.param("dr", {"dr": DELETE}, "dr",
                 "required in dr (strategy, primary_stack, primary_region, dns)",
                 id="dr-without-dr"),
    pytest.param("dr", {"dr.strategy": DELETE}, "dr.strategy",
                 "required in dr (pilot-light or warm-standby)", id="dr-without-strategy"),
    pytest.param("dr", {"dr.primary_stack": DELETE}, "dr.primary_stack",
                 "required in dr (e.g. organization/audit-kit/prod)", id="dr-without-primary"),
    pytest.param("dr", {"dr.primary_region": DELETE}, "dr.primary_region", "required in dr",
                 id="dr-without-primary-region"),
    pytest.param("dr", {"dr.primary_region": "us-west-2"}, "dr.primary_region",
                 "must differ from region", id="dr-primary-region-is-its-region"),
    pytest.param("dr", {"dr.dns": DELETE}, "dr.dns",
                 "required in dr (hosted zone and record names)", id="dr-without-dns"),
    pytest.param("dr", {"dr.mode": DELETE}, "dr.mode", "required in dr (standby or promoted)",
                 id="dr-without-mode"),
    pytest.param("dr", {"dr.dr_region": "us-east-2"}, "dr.dr_region", "set only in prod",
                 id="dr-with-dr-region"),
    pytest.param("dr", {"keys.multi_region": True}, "keys.multi_region",
                 "must be false in dr: its keys are replicas of prod's multi-region keys",
                 id="dr-multi-region-keys"),
    pytest.param("staging", {"dr": {"dr_region": "us-west-2"}}, "dr", "not used in staging",
                 id="staging-with-dr"),
    pytest.param("dev", {"dr": {"dr_region": "us-west-2"}}, "dr", "not used in dev",
                 id="dev-with-dr"),
    # ---- keys and the local environment
    pytest.param("dev", {"keys.backend": "local"}, "keys.backend", "must be 'kms' in dev",
                 id="cloud-with-local-keys"),
    pytest.param("local", {"keys.backend": "kms"}, "keys.backend",
                 "must be 'local' in the local environment", id="local-with-kms-keys"),
    pytest.param("local", {"local": DELETE}, "local", "required in the local environment",
                 id="local-without-local-section"),
    pytest.param("dev", {"local": {"postgres_port": 55432, "replica_port": 55433,
                                   "redis_port": 56379, "data_dir": "d", "key_dir": "k"}},
                 "local", "only the local environment has a local section",
                 id="cloud-with-local-section"),
    pytest.param("dev", {"database": DELETE}, "database", "required in dev",
                 id="cloud-without-database"),
    *(pytest.param("local", {section: raw("dev")[section]}, section,
                   "not used by the local environment (it has no cloud resources)",
                   id=f"local-with-{section}")
      for section in ("network", "database", "cache", "archive", "cluster")),
    # ---- worker, probes, names
    pytest.param("staging", {"cache.num_cache_clusters": 1}, "cache.num_cache_clusters",
                 "must be >= 2 with automatic_failover", id="failover-with-one-node"),
    pytest.param("prod", {"worker.ingress_pods": [{"namespace": "gateway", "match_labels": {
        "a" * 64: "x", "app": "x" * 64, "ok": "ab"}}]},
                 "worker.ingress_pods[0].match_labels",
                 f"not Kubernetes labels: {'a' * 64}=x, app={'x' * 64}",
                 id="labels-of-64-characters"),
    pytest.param("dev", {"worker.replicas": 3}, "worker.replicas",
                 "must satisfy min_replicas <= replicas <= max_replicas", id="replicas-above-max"),
    pytest.param("dev", {"worker.min_replicas": 2}, "worker.replicas",
                 "must satisfy min_replicas <= replicas <= max_replicas", id="replicas-below-min"),
    pytest.param("dev", {"probes": {"liveness": {"period_seconds": 5, "timeout_seconds": 6}}},
                 "probes.liveness.timeout_seconds", "must be <= period_seconds",
                 id="probe-timeout-above-period"),
    pytest.param("prod", {"worker.ingress_namespaces": ["Monitoring", "ok", "-x"]},
                 "worker.ingress_namespaces", "not namespace names: Monitoring, -x",
                 id="namespaces-not-names"),
    pytest.param("prod", {"worker.ingress_namespaces": ["monitoring\n"]},
                 "worker.ingress_namespaces", "not namespace names: monitoring\n",
                 id="namespace-with-newline"),
    pytest.param("prod", {"worker.ingress_namespaces": ["b", "a", "b", "a", "c"]},
                 "worker.ingress_namespaces", "listed more than once: a, b",
                 id="namespaces-repeated"),
    pytest.param("prod", {"worker.ingress_namespaces": "monitoring"}, "worker.ingress_namespaces",
                 Contains("valid list"), id="namespaces-not-a-list"),
    pytest.param("prod", {"worker.ingress_pods": [{"namespace": "gateway"}]},
                 "worker.ingress_pods[0].match_labels", "required key is missing",
                 id="pod-selector-without-labels"),
    pytest.param("prod", {"worker.ingress_pods": [{"namespace": "gateway", "match_labels": {}}]},
                 "worker.ingress_pods[0].match_labels", Contains("at least 1 item"),
                 id="pod-selector-empty"),
    pytest.param("prod", {"worker.ingress_pods": [
        {"namespace": "gateway", "match_labels": {"app": "not a label", "ok": "yes",
                                                  "app\n": "x", "tier": "web\n"}}]},
                 "worker.ingress_pods[0].match_labels",
                 "not Kubernetes labels: app=not a label, app\n=x, tier=web\n",
                 id="pod-selector-not-labels"),
    pytest.param("prod", {"worker.ingress_pods": [{"namespace": "gateway",
                                                   "selector": {"app": "x"}}]},
                 "worker.ingress_pods[0].selector", "unknown key 'selector'",
                 id="pod-selector-unknown-key"),
    pytest.param("dev", {"name": "staging"}, "name", "must be 'dev' in dev.yaml (got 'staging')",
                 id="name-differs-from-file"),
    pytest.param("dev", {"monitoring_level": "verbose"}, "monitoring_level",
                 Contains("Input should be"), id="unknown-monitoring-level"),
    pytest.param("dev", {"worker.batch_size": DELETE}, "worker.batch_size",
                 "required key is missing", id="required-key-missing"),
    pytest.param("prod", {"database.multi_az2": True}, "database.multi_az2",
                 "unknown key 'multi_az2' (did you mean 'multi_az'?)", id="misspelt-key"),
    pytest.param("prod", {"regoin": "us-east-1"}, "regoin",
                 "unknown key 'regoin' (did you mean 'region'?)", id="misspelt-top-level-key"),
    pytest.param("prod", {"worker.zzzz": 1}, "worker.zzzz", "unknown key 'zzzz'",
                 id="unknown-key"),
    pytest.param("dev", {"worker.replicas": "three"}, "worker.replicas",
                 Contains("valid integer, unable to parse string as an integer (got 'three')"),
                 id="scalar-of-the-wrong-type"),
]


@pytest.mark.parametrize(("env", "changes", "path", "reason"), REFUSED)
def test_each_rule_refuses_the_input_it_is_for(
        tmp_path: Path, env: str, changes: dict[str, Any], path: str, reason: str) -> None:
    found = problems(tmp_path, env, changes)
    assert has_problem(found, path, reason), found


def test_public_endpoint_without_allowlist_is_the_only_problem(tmp_path: Path) -> None:
    assert problems(tmp_path, "prod", {"cluster.public_access_cidrs": []}) == [
        ("cluster.public_access_cidrs", "required with endpoint_access public-restricted (the "
         "addresses of the pulumi up runners)")]


def test_public_endpoint_open_to_0_0_0_0_is_refused(tmp_path: Path) -> None:
    assert problems(tmp_path, "dr", {"cluster.public_access_cidrs": ["0.0.0.0/0"]}) == [
        ("cluster.public_access_cidrs", "0.0.0.0/0 is not restricted; list the runners' "
         "addresses")]


def test_pod_security_groups_off_admits_t3_nodes(tmp_path: Path) -> None:
    # The refusal is about branch interfaces, not t3 as such.
    assert problems(tmp_path, "dev", {"cluster.node_instance_types": ["t3.large"],
                                      "cluster.pod_security_groups": False}) == []


def test_a_collection_or_mapping_value_is_not_echoed_in_the_reason(tmp_path: Path) -> None:
    (found,) = problems(tmp_path, "dev", {"worker.replicas": [1]})
    assert found[0] == "worker.replicas" and "(got" not in found[1]


# (environment, changes): inputs at the edge of a rule that it lets through.
ACCEPTED: list[Any] = [
    pytest.param("dev", {"cluster.node_desired_size": 1}, id="desired-size-at-min"),
    pytest.param("dev", {"cluster.node_desired_size": 3}, id="desired-size-at-max"),
    *(pytest.param(env, {"cluster.endpoint_access": "private", "cluster.runner_in_vpc": True,
                         "cluster.public_access_cidrs": []}, id=f"{env}-private-endpoint")
      for env in ("dev", "prod", "dr")),
    pytest.param("prod", {"cluster.public_access_cidrs": ["198.51.100.10/32", "10.0.0.0/8"]},
                 id="host-and-network-cidrs"),
    pytest.param("prod", {"cluster.access": {"admins": [
        "arn:aws:iam::111122223333:role/ci", "arn:aws-us-gov:iam::111122223333:role/a/b/c-d"]}},
                 id="admins-only-with-a-role-path"),
    pytest.param("prod", {"cluster.node_max_size": 9}, id="prod-nodes-exactly-at-the-peak"),
    pytest.param("prod", {"cluster.node_instance_types": ["m6i.2xlarge"],
                          "cluster.node_max_size": 5}, id="fewer-larger-nodes"),
    pytest.param("dev", {"network.vpc_cidr": "10.0.0.0/20"}, id="vpc-cidr-of-20"),
    pytest.param("dev", {"network": {"existing_vpc_id": "vpc-0123abcd",
                                     "existing_private_subnet_ids": ["subnet-0123abcd",
                                                                     "subnet-" + "a" * 17]}},
                 id="existing-vpc-with-two-subnets"),
    pytest.param("prod", {"network": {"existing_vpc_id": "vpc-0123abcd",
                                      "existing_private_subnet_ids": ["subnet-0123abcd",
                                                                      "subnet-4567abcd"]}},
                 id="prod-in-an-existing-vpc"),
    pytest.param("dev", {"database.allocated_storage_gb": 100}, id="max-storage-equal-to-storage"),
    pytest.param("prod", {"database.backup_retention_days": 35}, id="prod-backups-35-days"),
    pytest.param("staging", {"database.backup_retention_days": 7}, id="staging-backups-7-days"),
    pytest.param("dr", {"database.backup_retention_days": 7}, id="dr-backups-7-days"),
    pytest.param("dev", {"cache.num_cache_clusters": 2, "cache.automatic_failover": True},
                 id="failover-with-two-nodes"),
    pytest.param("staging", {"cluster": {"create": False, "existing_cluster_name": "shared",
                                         "existing_kubeconfig_secret": "kubeconfig"}},
                 id="existing-cluster"),
    pytest.param("dev", {"worker.replicas": 2, "cluster.node_min_size": 2},
                 id="replicas-at-max"),  # 7 pods at rest: 2 dev nodes
    pytest.param("dev", {"probes": {"liveness": {"period_seconds": 5, "timeout_seconds": 5}}},
                 id="probe-timeout-equal-to-period"),
    pytest.param("prod", {"worker.ingress_pods": [
        {"namespace": "a" * 63, "match_labels": {
            "app.kubernetes.io/name": "x" * 63, "a" * 63: "", "k8s.io/a_b.c-d": "A-b_c.D"}}]},
                 id="longest-labels-and-namespace"),
    pytest.param("prod", {"worker.ingress_namespaces": ["monitoring", "a", "a" * 63]},
                 id="namespaces-of-1-and-63-characters"),
    pytest.param("dr", {"dr.strategy": "warm-standby"}, id="warm-standby-dr"),
    pytest.param("dr", {"dr.dns.zone_name": "audit.io"}, id="two-letter-top-level-domains"),
    pytest.param("dr", {"dr.mode": "promoted"}, id="promoted-dr"),
]


@pytest.mark.parametrize(("env", "changes"), ACCEPTED)
def test_input_at_the_edge_of_a_rule_is_accepted(
        tmp_path: Path, env: str, changes: dict[str, Any]) -> None:
    assert problems(tmp_path, env, changes) == []


# (environment, changes that make the field valid, key path, accepted, refused): every
# pattern matches whole values; each refused value is a valid one with a bad prefix or
# suffix, or one past a length.
PATTERNS: list[Any] = [
    pytest.param("dev", {}, "region", ["us-east-1", "us-gov-west-1", "ap-southeast-2"],
                 ["us-east-1x", "xus-east-1", "us-east-12", "us-east-", "useast-1",
                  "us-east-1\n", "us-east-\u0661", "US-EAST-1", "u-east-1"], id="region"),
    pytest.param("prod", {}, "dr.dr_region", ["us-west-2"], ["us-west-2a", "1us-west-2"],
                 id="dr-region"),
    pytest.param("dr", {}, "dr.primary_region", ["us-east-1"], ["us-east-1 ", "eu-us-east-1"],
                 id="primary-region"),
    pytest.param("dev", {"network": {"existing_private_subnet_ids": ["subnet-0123abcd",
                                                                     "subnet-4567abcd"]}},
                 "network.existing_vpc_id", ["vpc-0123abcd", "vpc-" + "f" * 17],
                 ["vpc-0123abc", "vpc-" + "f" * 18, "vpc-0123abcd!", "xvpc-0123abcd",
                  "vpc-0123ABCD"], id="vpc-id"),
    pytest.param("dev", {}, "database.instance_class", ["db.r6g.xlarge", "db.t3.micro"],
                 ["db.r6g.xlarge!", "xdb.r6g.xlarge", "db.r6g", "t3.micro", "db.R6G.large"],
                 id="instance-class"),
    *(pytest.param("dev", {}, f"database.{key}", ["a", "a" + "b_9" * 20 + "cd"],
                   ["a" * 64, "1abc", "abc-", "Abc", "_abc", ""], id=key)
      for key in ("database_name", "worker_username")),
    pytest.param("dev", {}, "database.backup_window", ["03:00-04:00"],
                 ["03:00-04:00x", "x03:00-04:00", "3:00-04:00", "03:00-04:000"],
                 id="backup-window"),
    pytest.param("dev", {}, "cache.node_type", ["cache.t4g.small"],
                 ["cache.t4g.small!", "xcache.t4g.small", "cache.t4g", "cache.T4G.small"],
                 id="cache-node-type"),
    pytest.param("dev", {}, "cache.engine_version", ["7.1", "10.12"],
                 ["7", "7.1.2", "v7.1", "7.1x"], id="redis-version"),
    pytest.param("dev", {}, "cluster.version", ["1.31", "1.09"],
                 ["1.3", "1.310", "11.31", "1.31x", "x1.31", "2.31"], id="kubernetes-version"),
    pytest.param("dev", {}, "worker.log_id", ["a", "9", "a" + "._-" * 20 + "bc"],
                 ["a" * 64, "-a", ".a", "a!", "!a", "A", ""], id="log-id"),
    # Worker sizes in staging (an existing cluster): no node capacity check gets in the way.
    *(pytest.param("staging", {}, f"worker.{key}", ["250m", "1", "0.5", "10"],
                   ["250mm", "m250", "1.", ".5", "x1", "1x", ""], id=key)
      for key in ("cpu_request", "cpu_limit")),
    *(pytest.param("staging", {}, f"worker.{key}", ["256Mi", "1Gi", "2Ti", "8Ki", "1G", "512"],
                   ["256Mb", "Mi256", "256 Mi", "x256Mi", "256Mii", "Gi"], id=key)
      for key in ("memory_request", "memory_limit")),
    pytest.param("prod", {"worker.ingress_pods": [{"match_labels": {"app": "x"}}]},
                 "worker.ingress_pods.0.namespace", ["a", "a" * 63, "a-b-9"],
                 ["a" * 64, "-a", "a-", "A", "a_b", "a\n", ""], id="pod-namespace"),
    pytest.param("dr", {}, "dr.dns.hosted_zone_id", ["Z0123", "Z" + "A" * 32],
                 ["Z012", "Z" + "A" * 33, "Z0123x", "xZ0123", "z0123"], id="hosted-zone-id"),
    *(pytest.param("dr", {}, f"dr.dns.{key}", ["a.org", "audit.example-hospital.org"],
                   ["a.o", "a.org.", ".a.org", "a.org!", "!a.org", "org", "A.org"], id=key)
      for key in ("zone_name",)),
    *(pytest.param("dr", {}, f"dr.dns.{key}", ["intake", "db-1"],
                   ["intake!", "!intake", "in take", "Intake", ""], id=key)
      for key in ("intake_record", "database_record")),
    pytest.param("dr", {}, "dr.primary_stack", ["organization/audit-kit/prod", "o.1/p_2/s-3"],
                 ["organization/audit-kit", "o/p/s/x", "o/p/s x", "/o/p/s", "o/p/s/"],
                 id="primary-stack"),
]


def _item_path(path: str) -> str:
    """``worker.ingress_pods.0.namespace`` is reported as ``worker.ingress_pods[0].namespace``."""
    return re.sub(r"\.(\d+)", r"[\1]", path)


@pytest.mark.parametrize(("env", "context", "path", "accepted", "refused"), PATTERNS)
def test_a_pattern_accepts_whole_values_only(
        tmp_path: Path, env: str, context: dict[str, Any], path: str, accepted: list[str],
        refused: list[str]) -> None:
    def set_value(value: str) -> dict[str, Any]:
        changes = copy.deepcopy(context)
        if ".0." in path:  # a list item: the value goes into the context's item
            prefix, _, key = path.partition(".0.")
            changes[prefix][0][key] = value
        else:
            changes[path] = value
        return changes

    for value in accepted:
        assert problems(tmp_path, env, set_value(value)) == [], value
    for value in refused:
        found = problems(tmp_path, env, set_value(value))
        assert has_problem(found, _item_path(path), Contains("should match pattern")), (
            value, found)


# (environment, changes that make room, key path, lowest accepted, highest accepted or None)
BOUNDS: list[Any] = [
    pytest.param("dev", {}, "network.availability_zones", 2, 6, id="availability-zones"),
    pytest.param("dev", {"database.max_allocated_storage_gb": 65536},
                 "database.allocated_storage_gb", 20, 65536, id="storage"),
    pytest.param("dev", {"database.allocated_storage_gb": 20},
                 "database.max_allocated_storage_gb", 20, 65536, id="max-storage"),
    pytest.param("prod", {}, "database.backup_retention_days", 35, 35, id="prod-backups"),
    pytest.param("dev", {}, "cache.num_cache_clusters", 1, 6, id="cache-nodes"),
    pytest.param("dev", {}, "cache.snapshot_retention_days", 0, 35, id="cache-snapshots"),
    pytest.param("dev", {}, "archive.object_lock_years", 6, 100, id="object-lock-years"),
    pytest.param("dev", {"cluster.node_desired_size": 1}, "cluster.node_min_size", 1, None,
                 id="min-nodes"),
    pytest.param("dev", {"cluster.node_min_size": 1}, "cluster.node_desired_size", 1, None,
                 id="desired-nodes"),
    pytest.param("dev", {"cluster.node_min_size": 1, "cluster.node_desired_size": 1,
                         "worker.max_replicas": 1}, "cluster.node_max_size", 1, None,
                 id="max-nodes"),  # 5 pods at the peak fit one m6i.large node
    pytest.param("dev", {}, "cluster.node_disk_gb", 20, None, id="node-disk"),
    pytest.param("staging", {"worker.min_replicas": 1, "worker.max_replicas": 100},
                 "worker.replicas", 1, 100, id="replicas"),
    pytest.param("staging", {"worker.replicas": 100, "worker.max_replicas": 100},
                 "worker.min_replicas", 1, 100, id="min-replicas"),
    pytest.param("staging", {"worker.replicas": 1, "worker.min_replicas": 1},
                 "worker.max_replicas", 1, 100, id="max-replicas"),
    pytest.param("dev", {}, "worker.target_cpu_percent", 10, 100, id="target-cpu"),
    pytest.param("dev", {}, "worker.batch_size", 1, 10_000, id="batch-size"),
    pytest.param("dev", {}, "worker.sign_interval_seconds", 1, 3600, id="sign-interval"),
    pytest.param("dev", {}, "worker.shutdown_grace_seconds", 1, 600, id="shutdown-grace"),
    pytest.param("dev", {}, "worker.scale_down_delay_seconds", 0, 86_400, id="scale-down-delay"),
    pytest.param("dev", {"probes": {"liveness": {"period_seconds": 3600, "timeout_seconds": 1}}},
                 "probes.liveness.period_seconds", 1, 3600, id="probe-period"),
    pytest.param("dev", {"probes": {"liveness": {"period_seconds": 3600, "timeout_seconds": 1}}},
                 "probes.liveness.timeout_seconds", 1, 600, id="probe-timeout"),
    pytest.param("dr", {}, "dr.dns.ttl_seconds", 5, 3600, id="dns-ttl"),
    pytest.param("dev", {}, "keys.deletion_window_days", 7, 30, id="key-deletion-window"),
    *(pytest.param("local", {}, f"local.{key}", 1024, 65535, id=key)
      for key in ("postgres_port", "replica_port", "redis_port")),
]


@pytest.mark.parametrize(("env", "context", "path", "lowest", "highest"), BOUNDS)
def test_a_bound_accepts_its_limit_and_refuses_one_past_it(
        tmp_path: Path, env: str, context: dict[str, Any], path: str, lowest: int,
        highest: int | None) -> None:
    assert problems(tmp_path, env, {**context, path: lowest}) == []
    below = problems(tmp_path, env, {**context, path: lowest - 1})
    assert has_problem(below, path, Contains(f"greater than or equal to {lowest}")) or (
        path == "database.backup_retention_days"), below
    if highest is not None:
        assert problems(tmp_path, env, {**context, path: highest}) == []
        above = problems(tmp_path, env, {**context, path: highest + 1})
        assert has_problem(above, path, Contains(f"less than or equal to {highest}")), above


@pytest.mark.parametrize(("env", "path", "shortest"), [
    ("dev", "purpose", 3), ("dev", "worker.image_repository", 1), ("local", "local.data_dir", 1),
    ("local", "local.key_dir", 1)])
def test_a_text_setting_has_a_minimum_length(
        tmp_path: Path, env: str, path: str, shortest: int) -> None:
    assert problems(tmp_path, env, {path: "x" * shortest}) == []
    found = problems(tmp_path, env, {path: "x" * (shortest - 1)})
    assert has_problem(found, path, Contains(f"at least {shortest} character")), found


# --------------------------------------------------------------------------------------------
# Defaults, derived values and loading
# --------------------------------------------------------------------------------------------


def test_optional_settings_default_to_the_safe_values() -> None:
    archive, keys = ArchiveSettings(), KeySettings()
    assert (archive.object_lock_years, archive.replicate_to_dr) == (6, False)
    assert (keys.backend, keys.deletion_window_days, keys.multi_region) == ("kms", 30, False)
    assert DrSettings() == DrSettings(strategy=None, primary_stack=None, primary_region=None,
                                      dr_region=None, dns=None)
    cluster = ClusterSettings(create=False, existing_cluster_name="c",
                              existing_kubeconfig_secret="s")
    assert (cluster.public_access_cidrs, cluster.node_disk_gb,
            cluster.version, cluster.node_instance_types) == ([], 50, None, [])
    new = ClusterSettings(create=True, version="1.31", node_instance_types=["m6i.large"],
                          node_min_size=1, node_desired_size=1, node_max_size=1,
                          public_access_cidrs=["198.51.100.10/32"])
    assert (new.existing_cluster_name, new.existing_kubeconfig_secret) == (None, None)
    # The endpoint is public to the listed CIDRs unless the runner is declared in the VPC;
    # pods get their own security group; nobody has access unless listed.
    assert (new.endpoint_access, new.runner_in_vpc, new.pod_security_groups) == (
        "public-restricted", False, True)
    assert new.access.roles() == []
    with pytest.raises(ValidationError, match="public_access_cidrs: required"):
        ClusterSettings(create=True, version="1.31", node_instance_types=["m6i.large"],
                        node_min_size=1, node_desired_size=1, node_max_size=1)
    assert NetworkSettings(vpc_cidr="10.0.0.0/16", availability_zones=2,
                           nat_gateways="single").existing_private_subnet_ids == []
    dns = DnsFailoverSettings(hosted_zone_id="Z0123", zone_name="a.org")
    assert (dns.intake_record, dns.database_record, dns.ttl_seconds) == ("intake", "db", 60)


def test_database_cache_and_worker_defaults(tmp_path: Path) -> None:
    data = raw("dev")
    for key in ("database_name", "worker_username", "backup_window", "maintenance_window"):
        data["database"].pop(key, None)
    data["cache"].pop("engine_version", None)
    data["cache"].pop("snapshot_retention_days", None)
    data["worker"].pop("target_cpu_percent", None)
    settings = load_environment(write(tmp_path, "dev", data))
    db, cache = settings.cloud().database, settings.cloud().cache
    assert (db.database_name, db.worker_username, db.backup_window, db.maintenance_window) == (
        "audit", "audit_worker", "03:00-04:00", "sun:04:30-sun:05:30")
    assert (cache.engine_version, cache.snapshot_retention_days) == ("7.1", 0)
    assert settings.worker.target_cpu_percent == 70
    assert settings.keys == KeySettings(deletion_window_days=7)


def test_an_environment_without_a_keys_section_gets_kms_keys(tmp_path: Path) -> None:
    data = raw("dev")
    del data["keys"]
    assert load_environment(write(tmp_path, "dev", data)).keys == KeySettings()


def test_settings_cannot_be_changed_once_loaded() -> None:
    settings = load_environment("prod")
    with pytest.raises(ValidationError):
        settings.region = "us-west-2"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.cloud().database.deletion_protection = False  # type: ignore[misc]


@pytest.mark.parametrize(("env", "hardened"), [
    ("dev", False), ("staging", False), ("prod", True), ("dr", True), ("local", False)])
def test_only_prod_and_dr_are_hardened(env: str, hardened: bool) -> None:
    assert load_environment(env).hardened is hardened


def test_the_parameter_group_family_follows_the_major_version() -> None:
    db = load_environment("dev").cloud().database
    assert db.parameter_group_family == "postgres16"
    assert db.model_copy(update={"engine_version": "17.2"}).parameter_group_family == (
        "postgres17")


def test_node_scaling_is_min_desired_max_of_a_new_cluster() -> None:
    assert load_environment("dev").cloud().cluster.node_scaling() == (1, 2, 3)
    with pytest.raises(ValueError, match=r"^node sizes apply only to a new cluster "
                                         r"\(create: true\)$"):
        load_environment("staging").cloud().cluster.node_scaling()


def test_the_cloud_sections_of_a_stack_are_all_there() -> None:
    settings = load_environment("prod")
    cloud = settings.cloud()
    assert (cloud.network, cloud.database, cloud.cache, cloud.archive, cloud.cluster) == (
        settings.network, settings.database, settings.cache, settings.archive, settings.cluster)


def test_a_settings_error_without_a_key_path_names_only_the_file() -> None:
    with pytest.raises(SettingsError) as caught:
        load_environment("local").cloud()
    assert str(caught.value) == (
        "environment local: 'local' is not a cloud environment (no Pulumi stack)")
    assert caught.value.problems == [
        Problem("", "'local' is not a cloud environment (no Pulumi stack)")]


@pytest.mark.parametrize("section", ["network", "database", "cache", "archive", "cluster"])
def test_an_environment_missing_any_cloud_section_is_not_a_cloud_environment(
        section: str) -> None:
    partial = load_environment("prod").model_copy(update={section: None})
    with pytest.raises(SettingsError, match="'prod' is not a cloud environment"):
        partial.cloud()


def test_an_environment_file_may_be_given_as_a_path_string(tmp_path: Path) -> None:
    assert load_environment(str(write(tmp_path, "dev", raw("dev")))).name == "dev"


@pytest.mark.parametrize(("content", "reason"), [
    ("a: [", Contains("cannot read: while parsing")),
    ("- a\n- b\n", "the top level must be a mapping of settings"),
    ("", "the top level must be a mapping of settings"),
])
def test_a_file_that_is_not_a_mapping_of_settings_is_refused(
        tmp_path: Path, content: str, reason: str) -> None:
    file = tmp_path / "dev.yaml"
    file.write_text(content)
    with pytest.raises(SettingsError) as caught:
        load_environment(file)
    (problem,) = caught.value.problems
    assert problem.path == "" and has_problem([("", problem.reason)], "", reason)
    assert str(caught.value) == f"{file}: {problem.reason}"


def test_an_unreadable_file_is_refused_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "dev.yaml"
    folder.mkdir()
    with pytest.raises(SettingsError, match=r"dev\.yaml: cannot read: "):
        load_environment(folder)


def test_a_file_named_after_no_environment_may_hold_any(tmp_path: Path) -> None:
    assert load_environment(write(tmp_path, "my-dev", raw("dev"))).name == "dev"


def test_missing_environment_file_names_it() -> None:
    with pytest.raises(SettingsError) as caught:
        load_environment(Path("/tmp/does-not-exist/nowhere.yaml"))
    assert str(caught.value) == ("/tmp/does-not-exist/nowhere.yaml: no such settings file "
                                 "(environments: dev, staging, prod, dr, local)")
    assert [p.path for p in caught.value.problems] == [""]


def test_an_environment_by_name_is_reported_relative_to_the_repository(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    envs = tmp_path / "environments"
    envs.mkdir()
    data = raw("prod")
    data["database"]["backup_retention_days"] = 30
    write(envs, "prod", data)
    monkeypatch.setattr("infra.settings.ENVIRONMENTS_DIR", envs)
    with pytest.raises(SettingsError) as caught:
        load_environment("prod")
    assert str(caught.value) == (
        "environments/prod.yaml: database.backup_retention_days: must be >= 35 in prod (got 30)")


def test_local_rejects_cloud_sections(tmp_path: Path) -> None:
    data = raw("local")
    data["database"] = raw("dev")["database"]
    with pytest.raises(SettingsError, match=r"local\.yaml: database: not used by the local"):
        load_environment(write(tmp_path, "local", data))

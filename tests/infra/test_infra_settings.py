"""Settings: every environment file loads; bad values fail naming file, key path and reason."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import stackkit
import yaml

from infra.settings import (
    DEFAULT_INGRESS_NAMESPACES,
    ENVIRONMENT_NAMES,
    ENVIRONMENTS_DIR,
    HEALTH_CHECKS,
    STACK_ENVIRONMENTS,
    EnvironmentSettings,
    SettingsError,
    environment_matrix,
    load_environment,
)


def raw(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ENVIRONMENTS_DIR / f"{name}.yaml").read_text())
    return loaded


def write(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
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
    for check, (period, timeout) in HEALTH_CHECKS.items():
        probe = getattr(probes, check)
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


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data[key]
    data[last] = value


def _delete(data: dict[str, Any], path: str) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data[key]
    del data[last]


# (environment, key path to change, new value or DELETE, expected key path, expected reason)
DELETE = object()
BAD_VALUES: list[tuple[str, str, Any, str | None, str]] = [
    ("prod", "database.backup_retention_days", 14, "database.backup_retention_days",
     "must be >= 35 in prod (got 14)"),
    ("staging", "database.backup_retention_days", 3, "database.backup_retention_days",
     "must be >= 7 in staging (got 3)"),
    ("prod", "database.multi_az2", True, "database.multi_az2",
     "unknown key 'multi_az2' (did you mean 'multi_az'?)"),
    ("prod", "database.multi_az", False, "database.multi_az", "must be true in prod"),
    ("dr", "database.deletion_protection", False, "database.deletion_protection",
     "must be true in dr"),
    ("prod", "cache.multi_az", False, "cache.multi_az", "must be true in prod"),
    ("prod", "keys.multi_region", False, "keys.multi_region", "must be true in prod"),
    ("prod", "worker.auto_promote", True, "worker.auto_promote", "must be false in prod"),
    ("prod", "network.nat_gateways", "single", "network.nat_gateways",
     "must be 'one-per-az' in prod"),
    ("dev", "cache.num_cache_clusters", 1, None, ""),  # valid: no failover in dev
    ("staging", "cache.num_cache_clusters", 1, "cache.num_cache_clusters",
     "must be >= 2 with automatic_failover"),
    ("dev", "worker.replicas", 5, "worker.replicas",
     "must satisfy min_replicas <= replicas <= max_replicas"),
    ("dev", "worker.replicas", "three", "worker.replicas", "valid integer"),
    ("dev", "archive.object_lock_years", 5, "archive.object_lock_years",
     "greater than or equal to 6"),
    ("dev", "database.instance_class", "t3.micro", "database.instance_class",
     "should match pattern"),
    ("dev", "network.vpc_cidr", "10.0.0.0/24", "network.vpc_cidr", "is too small"),
    ("dev", "probes", {"liveness": {"period_seconds": 5, "timeout_seconds": 10}},
     "probes.liveness.timeout_seconds", "must be <= period_seconds"),
    ("dev", "cluster.create", False, "cluster.create",
     "an existing cluster needs existing_cluster_name"),
    ("dr", "dr.strategy", DELETE, "dr.strategy", "required in dr"),
    ("dr", "dr.primary_stack", "prod", "dr.primary_stack", "should match pattern"),
    ("prod", "dr.dr_region", "us-east-1", "dr.dr_region", "must differ from region"),
    ("dev", "name", "staging", "name", "must be 'dev' in dev.yaml"),
    ("dev", "monitoring_level", "verbose", "monitoring_level", "Input should be"),
    ("dev", "worker.batch_size", DELETE, "worker.batch_size", "required key is missing"),
    ("prod", "worker.ingress_namespaces", ["Monitoring"], "worker.ingress_namespaces",
     "not namespace names: Monitoring"),
    ("prod", "worker.ingress_namespaces", ["monitoring", "monitoring"],
     "worker.ingress_namespaces", "listed more than once: monitoring"),
    ("prod", "worker.ingress_namespaces", "monitoring", "worker.ingress_namespaces",
     "valid list"),
    ("prod", "worker.ingress_pods", [{"namespace": "gateway"}],
     "worker.ingress_pods[0].match_labels", "required key is missing"),
    ("prod", "worker.ingress_pods", [{"namespace": "gateway", "match_labels": {}}],
     "worker.ingress_pods[0].match_labels", "at least 1 item"),
    ("prod", "worker.ingress_pods",
     [{"namespace": "gateway", "match_labels": {"app": "not a label"}}],
     "worker.ingress_pods[0].match_labels", "not Kubernetes labels: app=not a label"),
    ("prod", "worker.ingress_pods", [{"namespace": "Gateway", "match_labels": {"app": "x"}}],
     "worker.ingress_pods[0].namespace", "should match pattern"),
    ("prod", "worker.ingress_pods", [{"namespace": "gateway", "selector": {"app": "x"}}],
     "worker.ingress_pods[0].selector", "unknown key 'selector'"),
]


@pytest.mark.parametrize(("env", "path", "value", "want_path", "want_reason"), BAD_VALUES,
                         ids=[f"{e}-{p}-{v}" for e, p, v, *_ in BAD_VALUES])
def test_bad_value_fails_naming_file_key_path_and_reason(
        tmp_path: Path, env: str, path: str, value: Any, want_path: str | None,
        want_reason: str) -> None:
    data = copy.deepcopy(raw(env))
    if value is DELETE:
        _delete(data, path)
    else:
        _set(data, path, value)
    file = write(tmp_path, env, data)
    if want_path is None:
        load_environment(file)
        return
    with pytest.raises(SettingsError) as caught:
        load_environment(file)
    message = str(caught.value)
    line = next((ln for ln in message.splitlines() if f": {want_path}: " in ln), None)
    assert line is not None, f"no line for {want_path} in:\n{message}"
    assert line.startswith(str(file)), message
    assert want_reason in line, message
    assert caught.value.file == str(file)
    assert any(p.path == want_path for p in caught.value.problems)


def test_missing_environment_file_names_it() -> None:
    with pytest.raises(SettingsError, match=r"nowhere\.yaml: no such settings file"):
        load_environment(Path("/tmp/does-not-exist/nowhere.yaml"))


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

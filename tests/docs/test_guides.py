"""The guides, the runbooks and the monitoring files, checked against the code.

A guide that names something the kit does not have fails here:

* commands: ``audit-worker`` and ``auditctl`` subcommands and their options (read from the
  typer apps, including choices of positional arguments), ``make`` targets (the Makefile),
  ``python -m`` modules;
* settings: ``AUDIT_*`` variables (fields of ``audit_worker.config.WorkerSettings``),
  ``AUDITKIT_*`` test and tooling variables (read somewhere in the source),
  dotted environment keys (``worker.auto_promote``: ``infra/settings.py``), dotted chart
  values (``metrics.serviceMonitor.enabled``: ``charts/audit-worker/values.yaml``), stack
  config keys (``audit-kit:activeSlot``: ``infra/__main__.py``);
* metrics: every ``audit_*`` name against a worker's registry (``audit_worker.metrics``);
* files, links and anchors; Python references (``audit_worker.slots.activate``,
  ``Worker.triage``); exception classes; alert names;
* alerts and dashboard: every PromQL expression names only exported metrics (or
  Prometheus' ``up``) and known labels; every alert has a runbook that exists and has the
  four sections;
* quoted outputs: blocks marked ``<!-- runnable -->`` run in a temporary directory that
  links to the checkout (a following ``<!-- output -->`` block must match stdout);
  ``<!-- refusal: ... -->`` blocks must be what the code says; ``<!-- excerpt: path -->``
  blocks must be in that file;
* generated tables (``docs/guides/_generate.py``) must be current.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parents[2]
GUIDES_DIR = ROOT / "docs" / "guides"
RUNBOOKS_DIR = ROOT / "docs" / "runbooks"
RULES_FILE = ROOT / "docs" / "monitoring" / "prometheus-rules.yaml"
DASHBOARD_FILE = ROOT / "docs" / "monitoring" / "grafana-dashboard.json"
GUIDE_NAMES = ("error-handling", "testing-strategies", "deployment-patterns", "migration-guide")
GUIDES = [GUIDES_DIR / f"{name}.md" for name in GUIDE_NAMES]
SECTIONS = ("Overview and principles", "Implementation patterns", "Configuration examples",
            "Troubleshooting", "Best practices", "Monitoring and alerting")
RUNBOOK_SECTIONS = ("## What it means", "## Immediate checks", "## Remediation",
                    "## Escalation")
RUN_TIMEOUT = 120


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_guides_generate",
                                                  GUIDES_DIR / "_generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts the checkout and src/ on sys.path
    return module


GEN = _load_generator()


def _alerts() -> list[dict[str, Any]]:
    return GEN.load_alerts()  # type: ignore[no-any-return]


def _own_runbooks() -> list[Path]:
    books = {ROOT / rule["annotations"]["runbook_url"] for rule in _alerts()}
    return [*sorted(books), RUNBOOKS_DIR / "README.md"]


DOCS = GUIDES + _own_runbooks()


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------- markdown


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    lang: str
    body: str
    marker: str  # the HTML comment right above the fence, or ""

    @property
    def where(self) -> str:
        return f"{_rel(self.doc)}:{self.line}"


_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")


def blocks(doc: Path) -> list[Block]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, lang, start = len(match["indent"]), match["lang"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        marker = ""
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and lines[j].strip().startswith("<!--"):
            marker = lines[j].strip()
        out.append(Block(doc, start + 1, lang, "\n".join(body) + "\n", marker))
        i += 1
    return out


def prose(doc: Path) -> str:
    """The document without its fenced blocks."""
    text = doc.read_text(encoding="utf-8")
    return re.sub(r"^ *```[\w-]*\s*$.*?^ *```\s*$", "", text, flags=re.DOTALL | re.MULTILINE)


def code_spans(doc: Path) -> list[str]:
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose(doc))]


SHELL_LANGS = {"bash", "sh", "shell", "console"}


def shell_lines(doc: Path) -> list[tuple[str, str]]:
    """(where, line) for every shell line and every inline code span."""
    out = []
    for block in blocks(doc):
        if block.lang in SHELL_LANGS:
            for line in block.body.replace("\\\n", " ").splitlines():
                out.append((block.where, line))
    out += [(_rel(doc), span) for span in code_spans(doc)]
    return out


# --------------------------------------------------------------------------- the CLIs


def _cli(module: str) -> Any:
    """The click command tree of a typer app (typer vendors its own click, so the tree is
    read by duck typing: ``commands``, ``params``, ``opts``, ``is_flag``)."""
    app = importlib.import_module(module).app
    return typer.main.get_command(app)


CLIS = {"audit-worker": _cli("audit_worker.cli"), "auditctl": _cli("auditctl.cli")}
_SEPARATORS = re.compile(r"\s(?:\||;|&&|\|\||>|2>|<<|#)|[)'`]|\s>$")
_PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*|<.*>|\[.*\]|[\"$].*|…|\.\.\.|.*…)$")
_HELP = object()


def _option(command: Any, name: str) -> Any:
    if name == "--help":
        return _HELP
    for param in command.params:
        if param.param_type_name == "option" and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def _choices(param: Any) -> list[str] | None:
    """The allowed values of a parameter typed with an Enum (or a click Choice)."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(member.value) for member in annotation]
    choices = getattr(getattr(param, "type", None), "choices", None)
    return [str(c) for c in choices] if choices is not None else None


def _takes_value(param: Any) -> bool:
    return param is not _HELP and not param.is_flag and not getattr(param, "count", False)


def check_invocation(program: str, rest: str) -> list[str]:
    """Problems with one ``audit-worker ...`` / ``auditctl ...`` invocation."""
    tokens = [t.strip("\"'") for t in rest.split()]
    command = CLIS[program]
    path = [program]
    positional = 0
    problems: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token:
            continue
        if token.startswith("-") and token not in ("-", "--"):
            name = token.split("=", 1)[0]
            param = _option(command, name)
            if param is None:
                problems.append(f"`{' '.join(path)}` has no option {name}")
            elif _takes_value(param):
                value = token.split("=", 1)[1] if "=" in token else (
                    tokens[i] if i < len(tokens) else "")
                i += 0 if "=" in token else 1  # skip its value
                choices = _choices(param)
                if choices and value and not _PLACEHOLDER.match(value) and value not in choices:
                    problems.append(f"`{' '.join(path)} {name}`: {value!r} is not one of "
                                    f"{', '.join(choices)}")
            continue
        if token == "--":
            break
        if hasattr(command, "commands"):
            if _PLACEHOLDER.match(token):
                break
            sub = command.commands.get(token)
            if sub is None:
                problems.append(f"`{' '.join(path)}` has no subcommand {token!r}")
                break
            command, path = sub, [*path, token]
            continue
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        if positional < len(arguments):
            choices = _choices(arguments[positional])
            if choices is not None and not _PLACEHOLDER.match(token) and token not in choices:
                problems.append(f"`{' '.join(path)}`: {token!r} is not one of "
                                f"{', '.join(choices)}")
        positional += 1
    return problems


_COMMAND_POSITION = re.compile(r"(?:^|--|;|&&|\|\||\||\(|'|\bexec|\btime)$")


def invocations(line: str) -> Iterator[tuple[str, str]]:
    """``(program, arguments)`` for each call of a CLI in a command position."""
    for match in re.finditer(r"(?<![\w/.:=-])(audit-worker|auditctl)(?![\w.:/=-])", line):
        if not _COMMAND_POSITION.search(line[: match.start()].rstrip()):
            continue
        rest = line[match.end():]
        cut = _SEPARATORS.search(rest)
        yield match.group(1), rest[: cut.start()] if cut else rest


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m for m in re.findall(r"^([A-Za-z][\w-]*):", text, re.MULTILINE)}


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_commands_and_options_exist(doc: Path) -> None:
    problems = []
    targets = makefile_targets()
    for where, line in shell_lines(doc):
        for program, rest in invocations(line):
            problems += [f"{where}: {p}" for p in check_invocation(program, rest)]
        for target in re.findall(r"(?<![\w-])make\s+([a-z][\w-]*)", line):
            if target not in targets:
                problems.append(f"{where}: no make target {target!r}")
        for module in re.findall(r"python -m ([\w.]+)", line):
            if importlib.util.find_spec(module) is None:
                problems.append(f"{where}: no module {module!r} for python -m")
    assert not problems, "\n".join(problems)


def test_the_command_checker_catches_what_it_should() -> None:
    assert check_invocation("audit-worker", "migrate --allow-contract --check") == []
    assert check_invocation("auditctl", "local up --free-ports") == []
    assert check_invocation("audit-worker", "health readyz --output text") == []
    assert check_invocation("audit-worker", "migrate --allow-contracts")
    assert check_invocation("auditctl", "promote prod --rollback")
    assert check_invocation("auditctl", "release prod")
    assert check_invocation("audit-worker", "health ready")
    assert check_invocation("audit-worker", "health readyz --output txt")


# --------------------------------------------------------------------------- settings


def _worker_fields() -> set[str]:
    from audit_worker.config import WorkerSettings

    return set(WorkerSettings.model_fields)


def _source_mentions(name: str) -> bool:
    for folder in ("src", "tests", "infra", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "test_guides.py" and name in path.read_text(encoding="utf-8"):
                return True
    return False


def _env_key_ok(path: list[str]) -> bool:
    from pydantic import BaseModel

    from infra.settings import EnvironmentSettings

    model: Any = EnvironmentSettings
    for i, part in enumerate(path):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return False
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i == len(path) - 1:
            return True
        candidates = [a for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        model = candidates[0] if candidates else None
    return True


CHART_VALUES = yaml.safe_load((ROOT / "charts" / "audit-worker" / "values.yaml").read_text())


def _chart_key_ok(path: list[str]) -> bool:
    node: Any = CHART_VALUES
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _env_top() -> set[str]:
    from infra.settings import EnvironmentSettings

    return set(EnvironmentSettings.model_fields)


_FILE_EXT = re.compile(r"\.(py|ya?ml|md|json|sql|tpl|txt|sh|pem|html|j2|toml)$")


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_settings_exist(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    fields = _worker_fields()
    problems = []
    for var in sorted(set(re.findall(r"\bAUDIT_[A-Z0-9_]+\b", text))):
        field = var.removeprefix("AUDIT_").lower()
        if field not in fields and not _source_mentions(var):
            problems.append(f"{var}: not a worker setting (WorkerSettings has no {field!r})")
    for var in sorted(set(re.findall(r"\bAUDITCTL_[A-Z0-9_]+\b", text))):
        if not _source_mentions(var):
            problems.append(f"{var}: auditctl reads no such variable")
    # The kit's test and tooling variables (not worker settings: AUDIT_ means a setting).
    for var in sorted(set(re.findall(r"\bAUDITKIT_[A-Z0-9_]+\b", text))):
        if not _source_mentions(f'"{var}"'):
            problems.append(f"{var}: nothing in the kit reads such a variable")
    env_top, chart_top = _env_top(), set(CHART_VALUES)
    for span in code_spans(doc):
        if not re.fullmatch(r"[a-z][A-Za-z_]*(\.[A-Za-z_]+)+", span) or _FILE_EXT.search(span):
            continue
        path = span.split(".")
        if path[0] not in env_top | chart_top:
            continue
        if not (_env_key_ok(path) or _chart_key_ok(path)):
            problems.append(f"`{span}`: neither an environment setting (infra/settings.py) "
                            "nor a chart value (charts/audit-worker/values.yaml)")
    main = (ROOT / "infra" / "__main__.py").read_text()
    for key in sorted(set(re.findall(r"audit-kit:([A-Za-z]+)", text))):
        if f'"{key}"' not in main:
            problems.append(f"audit-kit:{key}: the Pulumi program reads no such config key")
    assert not problems, f"{_rel(doc)}:\n" + "\n".join(problems)


def test_setting_checks_catch_what_they_should() -> None:
    assert _env_key_ok(["worker", "auto_promote"])
    assert _env_key_ok(["probes", "readiness", "period_seconds"])
    assert not _env_key_ok(["probes", "database", "period_seconds"])  # not a setting
    assert not _env_key_ok(["worker", "autopromote"])
    assert _chart_key_ok(["metrics", "serviceMonitor", "enabled"])
    assert not _chart_key_ok(["metrics", "serviceMonitor", "enable"])


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Exported:
    names: frozenset[str]  # every name a query may use (sample names and histogram bases)
    labels: frozenset[str]


def exported() -> Exported:
    from prometheus_client.parser import text_string_to_metric_families

    from audit_worker.metrics import Metrics

    metrics = Metrics()
    metrics.set_info(slot="blue", log_id="audit-example")
    names: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        name, kind = family.name, family.type
        if kind == "counter":
            names.add(name + "_total")
        elif kind == "histogram":
            names |= {name, name + "_bucket", name + "_sum", name + "_count"}
        elif kind == "summary":
            names |= {name, name + "_sum", name + "_count"}
        elif kind == "info":
            names.add(name + "_info")
        else:
            names.add(name)
        for sample in family.samples:
            labels |= set(sample.labels)
    for family in GEN.exported_families():
        labels |= set(family["labels"])
    return Exported(frozenset(names), frozenset(labels | {"le"}))


EXPORTED = exported()
# Labels that Prometheus adds when it scrapes through the chart's ServiceMonitor.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "endpoint", "container",
                 "audit_worker_slot"}


def _non_metric_tokens() -> dict[str, bool]:
    """``audit_*`` words that are not metrics, each with proof that the kit has it."""
    slot_key = re.search(r'define "audit-worker.slotLabelKey" -}}\s*(\S+)',
                         (ROOT / "charts/audit-worker/templates/_helpers.tpl").read_text())
    return {
        "audit_worker": (ROOT / "src" / "audit_worker").is_dir(),
        "audit_writer": "audit_writer" in (
            ROOT / "src/audit_worker/db/migrations/0001_initial.sql").read_text(),
        "audit_integrity_failure": _source_mentions('alert="audit_integrity_failure"'),
        "audit_configuration_failure": _source_mentions('alert="audit_configuration_failure"'),
        "audit_event_conflict": _source_mentions('alert="audit_event_conflict"'),
        "audit_events_refused": _source_mentions('alert="audit_events_refused"'),
        "audit_spool_unopened": _source_mentions('alert="audit_spool_unopened"'),
        "audit_witness_forged": _source_mentions('alert="audit_witness_forged"'),
        "audit_log_rolled_back": _source_mentions('alert="audit_log_rolled_back"'),
        "audit_admin": "audit_admin" in (ROOT / "infra/database.py").read_text(),
        "audit_archiver": "CREATE ROLE audit_archiver" in (
            ROOT / "src/audit_worker/db/migrations/0005_archived_months.sql").read_text(),
        "audit_worker_slot": bool(slot_key) and re.sub(
            r"[^a-z0-9]", "_", slot_key.group(1)) == "audit_worker_slot",
    }


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_metrics_named_are_exported(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    others = _non_metric_tokens()
    problems = []
    for token in sorted(set(re.findall(r"\b((?:audit|process|python_gc)_[a-z0-9_]+)\b", text))):
        if token in EXPORTED.names:
            continue
        if others.get(token):
            continue
        problems.append(token)
    assert not problems, (f"{_rel(doc)} names metrics the worker does not export: {problems} "
                          f"(exported: {sorted(n for n in EXPORTED.names if n[:6] == 'audit_')})")


_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "rate", "irate", "increase", "delta", "idelta", "deriv",
    "histogram_quantile", "abs", "absent", "absent_over_time", "ceil", "floor", "round",
    "clamp_min", "clamp_max", "max_over_time", "min_over_time", "avg_over_time",
    "sum_over_time", "count_over_time", "last_over_time", "predict_linear", "label_replace",
    "label_join", "time", "timestamp", "vector", "scalar", "sort", "sort_desc", "changes",
    "resets", "and", "or", "unless", "bool", "offset", "label_values",
}
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) used by a PromQL expression."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels: set[str] = set()
    for body in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    text = re.sub(r"\{[^}]*\}", " ", text)
    for body in re.findall(_GROUPING, text):
        labels |= {part.strip() for part in body.split(",") if part.strip()}
    text = re.sub(_GROUPING, " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[smhdwy]?\b", " ", text)
    label_values = re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)", expr)
    labels |= {label for _, label in label_values}
    text = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)", r" \1 ", text)
    names = {t for t in re.findall(r"[A-Za-z_:][\w:]*", text) if t not in _PROMQL_WORDS}
    return names, labels


def _check_expr(where: str, expr: str) -> list[str]:
    names, labels = promql_names(expr)
    problems = [f"{where}: {n} is not exported (nor a PromQL word)"
                for n in sorted(names - EXPORTED.names - {"up"})]
    problems += [f"{where}: label {label!r} is neither exported nor a target label"
                 for label in sorted(labels - EXPORTED.labels - TARGET_LABELS)]
    return problems


def test_promql_checker_catches_what_it_should() -> None:
    names, labels = promql_names(
        'sum by (namespace) (rate(audit_events_stored_total{code=~"5.."}[5m])) > 0.5')
    assert names == {"audit_events_stored_total"} and labels == {"namespace", "code"}
    assert _check_expr("x", "rate(audit_events_stored[5m])")
    assert _check_expr("x", "max by (tenant) (audit_tree_size)")
    assert not _check_expr("x", "up{job=~\"audit-worker.*\"} == 0")


# --------------------------------------------------------------------------- alerts


def test_prometheus_rule_is_a_prometheus_rule() -> None:
    doc = yaml.safe_load(RULES_FILE.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"] and doc["spec"]["groups"]
    names = [rule["alert"] for rule in _alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"


@pytest.mark.parametrize("rule", _alerts(), ids=lambda r: r["alert"])
def test_alert_uses_exported_metrics_and_has_a_runbook(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    assert re.fullmatch(r"Audit[A-Z][A-Za-z]+", name), name
    assert rule["labels"]["severity"] in ("critical", "warning")
    assert rule["annotations"]["summary"]
    assert not _check_expr(name, rule["expr"]), _check_expr(name, rule["expr"])
    runbook = ROOT / rule["annotations"]["runbook_url"]
    assert runbook.is_file(), f"{name}: runbook {runbook} does not exist"
    assert runbook.parent == RUNBOOKS_DIR
    text = runbook.read_text(encoding="utf-8")
    assert text.startswith(f"# {name}\n"), f"{runbook.name} must start with '# {name}'"
    missing = [s for s in RUNBOOK_SECTIONS if s not in text]
    assert not missing, f"{runbook.name} lacks {missing}"


def test_every_alert_runbook_belongs_to_an_alert() -> None:
    used = {Path(rule["annotations"]["runbook_url"]).name for rule in _alerts()}
    orphans = {p.name for p in RUNBOOKS_DIR.glob("audit-*.md")} - used
    assert not orphans, f"runbooks without an alert: {orphans}"


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    assert dashboard["uid"] and dashboard["title"]
    problems = []
    exprs = 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs += 1
            problems += _check_expr(f"panel {panel['title']!r}", target["expr"])
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            problems += _check_expr(f"variable {variable['name']}", variable["definition"])
    assert exprs >= 10
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- files, links


def _ignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".gitignore").read_text().splitlines()
                if p.strip() and not p.startswith(("#", "!"))]
    return any(path.startswith(p) if p.endswith("/") else fnmatch.fnmatch(path, p)
               for p in patterns)


_PATH = re.compile(
    r"(?<![\w./@:-])((?:src|infra|charts|environments|tests|docs|bench|scripts|reports|\.ci|"
    r"\.local)/(?:[\w./*-]|<[a-z-]+>)*[\w*>/](?:::\w+)?|Makefile|Dockerfile|Pulumi\.yaml"
    r"|pyproject\.toml"
    r"|README\.md)(?![\w])")


def _as_glob(path: str) -> str:
    path = re.sub(r"<[^>]*>", "*", path)
    return "/".join("*" if re.fullmatch(r"[A-Z]{2,}", part) else
                    re.sub(r"(?<![A-Za-z])[A-Z]{3,}(?![a-z])", "*", part)
                    for part in path.split("/"))


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose(doc), re.MULTILINE)}


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_files_and_links_exist(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    problems = []
    for raw in sorted(set(_PATH.findall(text))):
        path, _, test_name = raw.partition("::")
        path = path.rstrip("/.")
        if _ignored(path) or _ignored(path + "/"):
            continue
        matches = list(ROOT.glob(_as_glob(path)))
        if not matches and not _source_mentions(path):
            problems.append(f"{raw}: no such file")
        elif test_name and not any(re.search(rf"def {test_name}\b", m.read_text())
                                   for m in matches):
            problems.append(f"{raw}: no such test")
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc)):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.exists():
            problems.append(f"link {target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"link {target}: no heading #{anchor} in {resolved.name}")
    assert not problems, f"{_rel(doc)}:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- code references


def _resolve_python(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _class_files(name: str) -> list[Path]:
    return [p for p in (ROOT / "src").rglob("*.py")
            if re.search(rf"^class {name}\b", p.read_text(encoding="utf-8"), re.MULTILINE)]


def _exception_exists(name: str) -> bool:
    import asyncpg
    import redis.exceptions

    return (isinstance(getattr(builtins, name, None), type)
            or hasattr(asyncpg.exceptions, name) or hasattr(redis.exceptions, name)
            or bool(_class_files(name)))


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_code_references_exist(doc: Path) -> None:
    problems = []
    alerts = {rule["alert"] for rule in _alerts()}
    for span in code_spans(doc):
        call = re.sub(r"\(.*\)$", "", span)
        if call in alerts:
            continue
        if re.fullmatch(r"(audit_worker|auditctl|infra)(\.[A-Za-z_]\w*)+", call):
            if not _resolve_python(call):
                problems.append(f"`{span}`: no such Python object")
        elif re.fullmatch(r"[A-Z]\w+\.[a-z_]\w*", call):
            cls, method = call.split(".")
            files = _class_files(cls)
            if not any(re.search(rf"def {method}\b", f.read_text()) for f in files):
                problems.append(f"`{span}`: no method {method} on a class {cls} in src/")
        elif (re.fullmatch(r"[A-Z][A-Za-z]+(Error|Unavailable|Open|Refused|Rejected)", call)
              and not _exception_exists(call)):
            problems.append(f"`{span}`: no such exception class")
    for name in sorted(set(re.findall(r"\bAudit[A-Z][A-Za-z]+\b", doc.read_text()))):
        if name not in alerts and not _class_files(name):
            problems.append(f"{name}: neither an alert nor a class in src/")
    assert not problems, f"{_rel(doc)}:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("doc", GUIDES, ids=_rel)
def test_guide_has_the_six_parts_and_healthcare_context(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    headings = re.findall(r"^## (?:\d\. )?(.+)$", prose(doc), re.MULTILINE)
    positions = []
    for section in SECTIONS:
        assert section in headings, f"{doc.name}: no '## {section}' section"
        positions.append(headings.index(section))
    assert positions == sorted(positions), f"{doc.name}: the six parts are out of order"
    for word in ("HIPAA", "GDPR", "PHI"):
        assert word in text, f"{doc.name} never mentions {word}"


def test_seed_tables_are_present() -> None:
    text = {p.stem: p.read_text(encoding="utf-8") for p in GUIDES}
    assert "### Error classes and recovery" in text["error-handling"]
    assert "<!-- BEGIN generated:environment-matrix -->" in text["deployment-patterns"]
    assert "<!-- BEGIN generated:health-checks -->" in text["deployment-patterns"]
    assert "Risk classes and their rollback" in text["migration-guide"]
    assert "### Data migration patterns" in text["migration-guide"]
    assert "## What this machine cannot test" in text["testing-strategies"]


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_no_phi_in_examples(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    assert not re.findall(r"MRN-(?!TEST-)\w", text), "identifiers must be MRN-TEST-…"
    assert not re.search(r"SELECT \*", text), "select named, non-PHI columns only"
    assert not re.search(r"SELECT[^;]*\b(payload_sealed|leaf_data)\b", text), (
        "never ask an operator to read payloads or leaves")


def test_generated_tables_are_current() -> None:
    stale = GEN.stale()
    assert not stale, ("generated tables are out of date in "
                       f"{sorted(_rel(p) for p in stale)}: run python docs/guides/_generate.py")


# --------------------------------------------------------------------------- quoted output


def _blocks_with(prefix: str) -> list[tuple[Block, Block | None]]:
    """Blocks whose marker starts with `prefix`, each with the output block after it."""
    out = []
    for doc in DOCS:
        found = blocks(doc)
        for i, block in enumerate(found):
            if block.marker.startswith(prefix):
                following = found[i + 1] if i + 1 < len(found) else None
                if following is not None and following.marker != "<!-- output -->":
                    following = None
                out.append((block, following))
    return out


RUNNABLE = _blocks_with("<!-- runnable -->")


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary directory that looks like the checkout (links to its top-level
    entries), so examples use the repository's paths and write only here."""
    work = tmp_path_factory.mktemp("guides")
    skip = {".git", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache", "reports",
            ".local"}
    for entry in ROOT.iterdir():
        if entry.name not in skip:
            (work / entry.name).symlink_to(entry)
    return work


def test_there_are_runnable_examples_in_every_guide() -> None:
    docs = {block.doc for block, _ in RUNNABLE}
    assert set(GUIDES) <= docs, f"no runnable example in {set(GUIDES) - docs}"


@pytest.mark.parametrize(("block", "output"), RUNNABLE, ids=[b.where for b, _ in RUNNABLE])
def test_runnable_examples_run(block: Block, output: Block | None, workdir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_", "AUDITCTL_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               COLUMNS="200", NO_COLOR="1", TERM="dumb")
    done = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", block.body], cwd=workdir, env=env,
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )
    assert done.returncode == 0, (
        f"{block.where} exited {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n"
        f"{done.stderr}")
    if output is not None:
        assert _normalise(done.stdout) == _normalise(output.body), (
            f"{block.where}: the output shown at {output.where} is not what it prints:\n"
            f"{done.stdout}")


def _refusal(name: str) -> Block:
    found = [b for b, _ in _blocks_with(f"<!-- refusal: {name} -->")]
    assert len(found) == 1, f"one '<!-- refusal: {name} -->' block expected"
    return found[0]


def test_checksum_refusal_is_quoted_as_the_code_says_it() -> None:
    from audit_worker.db import migrate as m
    from audit_worker.errors import MigrationError

    block = _refusal("checksum")
    shown = re.search(r"checksum (\w+) in the database", block.body)
    assert shown is not None
    fake = shown.group(1).ljust(64, "0")
    with pytest.raises(MigrationError) as caught:
        m._check_checksums({1: fake}, m.load_migrations())
    assert _normalise(block.body) == f"error: {caught.value}"


class _FakeConnection:
    """Just enough of asyncpg for `migrate` to reach its contract check."""

    def __init__(self, applied: dict[int, str]) -> None:
        self.applied = applied

    async def execute(self, *_args: Any) -> None:
        return None

    async def fetchval(self, *_args: Any) -> bool:
        return True

    async def fetch(self, *_args: Any) -> list[dict[str, Any]]:
        return [{"version": v, "checksum": c} for v, c in self.applied.items()]


def test_contract_refusal_is_quoted_as_the_code_says_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from audit_worker.db import migrate as m
    from audit_worker.errors import MigrationError

    block = _refusal("contract")
    shipped = m.load_migrations()
    name = re.search(r"error: (\d{4})_(\w+) is a contract", block.body)
    assert name is not None
    contract = m.Migration(int(name.group(1)), name.group(2), "contract",
                           "-- kind: contract\nSELECT 1;\n")
    monkeypatch.setattr(m, "load_migrations", lambda: [*shipped, contract])
    connection = _FakeConnection({x.version: x.checksum for x in shipped})
    with pytest.raises(MigrationError) as caught:
        asyncio.run(m.migrate(connection))  # type: ignore[arg-type]
    assert _normalise(block.body) == f"error: {caught.value}"


def test_excerpts_are_in_their_files() -> None:
    found = _blocks_with("<!-- excerpt:")
    assert found
    for block, _ in found:
        source = ROOT / block.marker.removeprefix("<!-- excerpt:").removesuffix("-->").strip()
        lines = [line.rstrip() for line in source.read_text().splitlines()]
        position = 0
        for line in (x.rstrip() for x in block.body.splitlines() if x.strip()):
            assert line in lines[position:], f"{block.where}: {line!r} is not in {source}"
            position = lines.index(line, position) + 1


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_dead_letter_rules_named_are_the_workers_own(doc: Path) -> None:
    # pydantic's error types are folded into the worker's vocabulary: a runbook that tells
    # an operator to filter on `extra_forbidden` would find nothing.
    from audit_worker.events import _PYDANTIC_RULES, RULES

    named = set(re.findall(r"`([a-z][a-z0-9_]+)`", doc.read_text(encoding="utf-8")))
    stale = sorted(n for n in named if n in _PYDANTIC_RULES and n not in RULES)
    assert not stale, f"{_rel(doc)} names pydantic error types, not rules: {stale}"

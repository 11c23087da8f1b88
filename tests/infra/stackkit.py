"""Evaluates the four stacks under mocks (one subprocess each) and serves their summaries.

Importing this module puts the repository root on ``sys.path`` (so ``infra`` imports work
whatever pytest's import mode) and gives the tests:

- `summary(stack)`: the JSON summary written by ``conftest.py`` for that stack. The first call
  evaluates all four stacks in parallel subprocesses; later calls reuse the results;
- `EVALUATION`: the wall-clock and per-stack seconds of that evaluation;
- `resource_args` / `stack_args`: the shim that turns recorded resources into the arguments
  of the policy pack's validate functions;
- `resource_counts`: the snapshot of resource types and counts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pulumi_policy import (  # noqa: E402  (after the sys.path line, like the tests' imports)
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    StackValidationArgs,
)

STACKS: tuple[str, ...] = ("dev", "staging", "prod", "dr")

# Resource types the tests look for.
CACHE = "aws:elasticache/replicationGroup:ReplicationGroup"
DB = "aws:rds/instance:Instance"
EKS = "aws:eks/cluster:Cluster"
HEALTH_CHECK = "aws:route53/healthCheck:HealthCheck"
KEY = "aws:kms/key:Key"
RECORD = "aws:route53/record:Record"
RELEASE = "kubernetes:helm.sh/v3:Release"
REPLICA_KEY = "aws:kms/replicaKey:ReplicaKey"
SECRET = "aws:secretsmanager/secret:Secret"
SECRET_VERSION = "aws:secretsmanager/secretVersion:SecretVersion"
STACK_REFERENCE = "pulumi:pulumi:StackReference"
RUNNER = Path(__file__).resolve().parent / "conftest.py"
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"



def _load_runner() -> ModuleType:
    """``conftest.py`` as a plain module (pytest may have loaded another ``conftest``)."""
    spec = importlib.util.spec_from_file_location("audit_kit_infra_mocks", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MOCKS = _load_runner()
PROD_OUTPUTS: dict[str, Any] = MOCKS.prod_stack_outputs()
"""The prod outputs the mocks answer the DR stack's StackReference with."""

_summaries: dict[str, dict[str, Any]] = {}
EVALUATION: dict[str, Any] = {}


def _run(stack: str, out: Path, overrides: dict[str, str] | None = None) -> dict[str, Any]:
    args = [sys.executable, str(RUNNER), stack, str(out)]
    args += [f"{k}={v}" for k, v in (overrides or {}).items()]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"stack {stack} failed under mocks:\n{done.stderr[-6000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    if result["error"] and not overrides:
        raise RuntimeError(f"stack {stack} failed under mocks: {result['error']}")
    return result


def evaluate_all() -> dict[str, dict[str, Any]]:
    """Evaluate every stack once (in parallel) and keep the summaries."""
    if not _summaries:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="audit-kit-stacks-") as tmp, \
                ThreadPoolExecutor(max_workers=len(STACKS)) as pool:
            futures = {s: pool.submit(_run, s, Path(tmp) / f"{s}.json") for s in STACKS}
            for stack, future in futures.items():
                _summaries[stack] = future.result()
        EVALUATION["wall_seconds"] = round(time.perf_counter() - started, 2)
        EVALUATION["program_seconds"] = {s: _summaries[s]["seconds"] for s in STACKS}
    return _summaries


def evaluate_with(stack: str, overrides: dict[str, str]) -> dict[str, Any]:
    """Evaluate one stack with config overrides (not cached)."""
    with tempfile.TemporaryDirectory(prefix="audit-kit-stack-") as tmp:
        return _run(stack, Path(tmp) / f"{stack}.json", overrides)


def summary(stack: str) -> dict[str, Any]:
    return evaluate_all()[stack]


def resources(stack: str, type_: str | None = None) -> list[dict[str, Any]]:
    found = summary(stack)["resources"]
    return [r for r in found if type_ is None or r["type"] == type_]


def one(stack: str, type_: str, name: str | None = None) -> dict[str, Any]:
    """The single resource of a type (and name), failing clearly otherwise."""
    found = [r for r in resources(stack, type_) if name is None or r["name"] == name]
    assert len(found) == 1, (
        f"{stack}: expected one {type_}{f' named {name}' if name else ''}, found "
        f"{[r['name'] for r in found]}")
    return found[0]


def by_name(stack: str, name: str) -> dict[str, Any]:
    found = [r for r in resources(stack) if r["name"] == name]
    assert len(found) == 1, f"{stack}: expected one resource named {name}, found {len(found)}"
    return found[0]


def state(resource: dict[str, Any]) -> dict[str, Any]:
    """Inputs and mock outputs together: what the engine would hold after an update."""
    return {**resource["inputs"], **resource["outputs"]}


def urn(stack: str, resource: dict[str, Any]) -> str:
    parent = resource.get("parent")
    qualified = f"{parent.split('::')[0]}${resource['type']}" if parent else resource["type"]
    return f"urn:pulumi:{stack}::audit-kit::{qualified}::{resource['name']}"


def _options(resource: dict[str, Any]) -> PolicyResourceOptions:
    return PolicyResourceOptions(
        protect=bool(resource.get("protect")),
        ignore_changes=list(resource.get("ignore_changes") or []), delete_before_replace=None,
        aliases=[], custom_timeouts=PolicyCustomTimeouts(0, 0, 0),
        additional_secret_outputs=[], parent=resource.get("parent"))


def resource_args(stack: str, resource: dict[str, Any]) -> ResourceValidationArgs:
    """The args a resource policy would get for this recorded resource (props = inputs)."""
    return ResourceValidationArgs(
        resource_type=resource["type"], props=resource["inputs"], urn=urn(stack, resource),
        name=resource["name"], opts=_options(resource), provider=None)


def make_resource_args(type_: str, props: dict[str, Any], *, name: str = "example",
                       protect: bool = False) -> ResourceValidationArgs:
    """Args for a hand-written resource (policy unit tests)."""
    return resource_args("unit", {"type": type_, "name": name, "inputs": props,
                                  "protect": protect, "parent": None})


def stack_args(stack: str) -> StackValidationArgs:
    """The args a stack policy would get: every resource's state plus the stack's outputs."""
    found = summary(stack)
    policy_resources = [
        PolicyResource(r["type"], state(r), urn(stack, r), r["name"], _options(r), None, None,
                       [], {})
        for r in found["resources"]
    ]
    outputs = {k: v["value"] for k, v in found["outputs"].items()}
    policy_resources.append(PolicyResource(
        "pulumi:pulumi:Stack", outputs, f"urn:pulumi:{stack}::audit-kit::pulumi:pulumi:Stack::"
        f"audit-kit-{stack}", f"audit-kit-{stack}", _options({}), None, None, [], {}))
    return StackValidationArgs(policy_resources)


def make_stack_args(resources_: list[tuple[str, dict[str, Any]]]) -> StackValidationArgs:
    """Stack args for hand-written (type, props) pairs (policy unit tests)."""
    return StackValidationArgs([
        PolicyResource(t, p, f"urn:pulumi:unit::audit-kit::{t}::r{i}", f"r{i}",
                       _options({}), None, None, [], {})
        for i, (t, p) in enumerate(resources_)
    ])


class Violations(list[str]):
    """A `report_violation` callback that keeps the messages."""

    def __call__(self, message: str, urn: str | None = None) -> None:
        self.append(message)


def resource_counts(stack: str) -> dict[str, int]:
    """Resource types and how many of each: the snapshot reviewed in git."""
    return dict(sorted(Counter(r["type"] for r in resources(stack)).items()))


def snapshot_path(stack: str) -> Path:
    return SNAPSHOTS / f"{stack}.json"


def update_snapshots() -> bool:
    return os.environ.get("UPDATE_SNAPSHOTS") == "1"

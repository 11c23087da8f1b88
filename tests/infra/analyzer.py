"""Runs the HIPAA policy pack through pulumi-policy's own analyzer, the way the engine does.

``pulumi preview --policy-pack infra/policy`` starts ``python -m pulumi.policy <engine>
infra/policy``, which runs ``infra/policy/__main__.py``; its `PolicyPack` builds a
``_PolicyAnalyzerServicer`` and serves it over gRPC. The engine then sends an
``AnalyzeRequest`` per resource and one ``AnalyzeStackRequest``, with properties as a
protobuf ``Struct``; the servicer decodes them and hands the policies
``unknown_checking_proxy`` objects (Mapping / Sequence, never dict / list).

This module does the same without a server:

- `pack_servicer()` runs ``infra/policy/__main__.py`` as the runner does and keeps the
  servicer the real `PolicyPack` built (it stops the pack just before it would start serving);
- `analyze_request` / `stack_request` build engine-shaped requests from a stack's recorded
  resources (or hand-written ones), secrets marked as the engine marks them;
- `analyze` / `analyze_stack` call the servicer's ``Analyze`` / ``AnalyzeStack`` and return
  the diagnostics as `Diagnostic` tuples.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple
from unittest import mock

import stackkit
from google.protobuf import struct_pb2
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc

PACK_DIR = stackkit.ROOT / "infra" / "policy"
PROJECT = "audit-kit"
STACK = "pulumi:pulumi:Stack"
SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"
MANDATORY = analyzer_pb2.MANDATORY
ADVISORY = analyzer_pb2.ADVISORY


class Diagnostic(NamedTuple):
    policy: str
    level: int  # analyzer_pb2.EnforcementLevel
    message: str
    urn: str

    @property
    def mandatory(self) -> bool:
        return self.level == MANDATORY


class FakeContext:
    """The servicer never touches its gRPC context; this stands in for one."""

    def is_active(self) -> bool:
        return True


class _Served(Exception):
    """Raised where the pack would start serving, carrying the servicer it built."""

    def __init__(self, servicer: Any) -> None:
        super().__init__("policy pack servicer captured")
        self.servicer = servicer


def _capture(servicer: Any, _server: Any) -> None:
    raise _Served(servicer)


def run_pack_main() -> Any:
    """Run ``infra/policy/__main__.py`` as ``python -m pulumi.policy`` does (`runpy.run_path`
    on the pack directory, which puts it first on ``sys.path``) and return the analyzer
    servicer the real `PolicyPack` constructed."""
    saved_path = list(sys.path)
    saved_hipaa = sys.modules.pop("hipaa", None)  # the pack imports it as a top-level module
    try:
        with mock.patch.object(analyzer_pb2_grpc, "add_AnalyzerServicer_to_server", _capture):
            runpy.run_path(str(PACK_DIR), run_name="__main__")
    except _Served as served:
        return served.servicer
    finally:
        sys.path[:] = saved_path
        sys.modules.pop("hipaa", None)
        if saved_hipaa is not None:
            sys.modules["hipaa"] = saved_hipaa
    raise AssertionError("infra/policy/__main__.py did not build a PolicyPack")


_SERVICER: list[Any] = []


def pack_servicer() -> Any:
    """The servicer of the real pack (built once per process)."""
    if not _SERVICER:
        _SERVICER.append(run_pack_main())
    return _SERVICER[0]


# -- requests ----------------------------------------------------------------------------------


def to_struct(props: Mapping[str, Any]) -> struct_pb2.Struct:
    """Properties as the engine sends them (numbers become doubles, as on the wire)."""
    message = struct_pb2.Struct()
    message.update(dict(props))
    return message


def secret(value: Any) -> dict[str, Any]:
    """A value marked secret, as the engine marshals it to analyzers."""
    return {SECRET_SIG_KEY: SECRET_SIG, "value": value}


def _mark_secrets(props: Mapping[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """Wrap the recorded secret inputs that are top-level properties (nested ones stay
    plain: the policies see the same value either way)."""
    out = dict(props)
    for path in paths:
        if path in out:
            out[path] = secret(out[path])
    return out


def _provider(stack: str, type_: str) -> analyzer_pb2.AnalyzerProviderResource:
    package = type_.split(":", 1)[0]
    name = f"default_{package}"
    return analyzer_pb2.AnalyzerProviderResource(
        type=f"pulumi:providers:{package}", name=name, properties=to_struct({}),
        urn=f"urn:pulumi:{stack}::{PROJECT}::pulumi:providers:{package}::{name}")


def _parent_urn(stack: str, resource: Mapping[str, Any],
                by_key: Mapping[str, Mapping[str, Any]]) -> str:
    parent = resource.get("parent")
    if not parent:
        return ""
    found = by_key.get(parent)
    if found is not None:
        return str(stackkit.urn(stack, dict(found)))
    type_, _, name = str(parent).partition("::")
    return f"urn:pulumi:{stack}::{PROJECT}::{type_}::{name}"


def _options(resource: Mapping[str, Any], parent_urn: str) -> analyzer_pb2.AnalyzerResourceOptions:
    return analyzer_pb2.AnalyzerResourceOptions(
        protect=bool(resource.get("protect")), parent=parent_urn,
        customTimeouts=analyzer_pb2.AnalyzerResourceOptions.CustomTimeouts())


def _index(resources: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {f"{r['type']}::{r['name']}": r for r in resources}


def analyze_request(stack: str, resource: Mapping[str, Any],
                    by_key: Mapping[str, Mapping[str, Any]] | None = None,
                    ) -> analyzer_pb2.AnalyzeRequest:
    """The engine's ``Analyze`` request for one recorded resource (its inputs)."""
    parent_urn = _parent_urn(stack, resource, by_key or {})
    request = analyzer_pb2.AnalyzeRequest(
        type=resource["type"], name=resource["name"], urn=stackkit.urn(stack, dict(resource)),
        properties=to_struct(_mark_secrets(resource["inputs"],
                                           resource.get("secret_inputs", ()))),
        options=_options(resource, parent_urn))
    if resource.get("custom", True):  # components have no provider
        request.provider.CopyFrom(_provider(stack, resource["type"]))
    return request


def make_resource(type_: str, props: Mapping[str, Any], *, name: str = "example",
                  protect: bool = False) -> dict[str, Any]:
    """A hand-written resource, shaped like a recorded one."""
    return {"type": type_, "name": name, "inputs": dict(props), "outputs": {},
            "protect": protect, "parent": None, "custom": True, "secret_inputs": []}


def _analyzer_resource(stack: str, resource: Mapping[str, Any], props: Mapping[str, Any],
                       by_key: Mapping[str, Mapping[str, Any]]) -> analyzer_pb2.AnalyzerResource:
    parent_urn = _parent_urn(stack, resource, by_key)
    message = analyzer_pb2.AnalyzerResource(
        type=resource["type"], name=resource["name"], urn=stackkit.urn(stack, dict(resource)),
        properties=to_struct(props), options=_options(resource, parent_urn),
        parent=parent_urn)
    if resource.get("custom", True):
        message.provider.CopyFrom(_provider(stack, resource["type"]))
    return message


def stack_request(stack: str, resources: Sequence[Mapping[str, Any]],
                  outputs: Mapping[str, Mapping[str, Any]] | None = None,
                  ) -> analyzer_pb2.AnalyzeStackRequest:
    """The engine's ``AnalyzeStack`` request: every resource's state (inputs and outputs),
    and the root ``pulumi:pulumi:Stack`` resource whose properties are the stack outputs
    (``{"value": ..., "secret": bool}`` per output, as the stack summary records them)."""
    by_key = _index(resources)
    messages = [
        _analyzer_resource(stack, r, _mark_secrets(stackkit.state(dict(r)),
                                                   r.get("secret_inputs", ())), by_key)
        for r in resources
    ]
    exported = {k: secret(v["value"]) if v.get("secret") else v["value"]
                for k, v in (outputs or {}).items()}
    root = {"type": STACK, "name": f"{PROJECT}-{stack}", "parent": None,
            "custom": False, "protect": False}
    message = _analyzer_resource(stack, root, exported, by_key)
    message.urn = f"urn:pulumi:{stack}::{PROJECT}::{STACK}::{PROJECT}-{stack}"
    messages.append(message)
    return analyzer_pb2.AnalyzeStackRequest(resources=messages)


def recorded_stack_request(stack: str) -> analyzer_pb2.AnalyzeStackRequest:
    found = stackkit.summary(stack)
    return stack_request(stack, found["resources"], found["outputs"])


# -- calls -------------------------------------------------------------------------------------


def _diagnostics(response: Any) -> list[Diagnostic]:
    return [Diagnostic(d.policyName, d.enforcementLevel, d.message, d.urn)
            for d in response.diagnostics]


def analyze(request: analyzer_pb2.AnalyzeRequest, servicer: Any = None) -> list[Diagnostic]:
    return _diagnostics((servicer or pack_servicer()).Analyze(request, FakeContext()))


def analyze_stack(request: analyzer_pb2.AnalyzeStackRequest,
                  servicer: Any = None) -> list[Diagnostic]:
    return _diagnostics((servicer or pack_servicer()).AnalyzeStack(request, FakeContext()))


def analyze_resource(type_: str, props: Mapping[str, Any], *, protect: bool = False,
                     stack: str = "unit") -> list[Diagnostic]:
    """Diagnostics for one hand-written resource."""
    return analyze(analyze_request(stack, make_resource(type_, props, protect=protect)))


def analyze_stack_of(resources: Sequence[tuple[str, Mapping[str, Any]]],
                     outputs: Mapping[str, Any] | None = None,
                     stack: str = "unit") -> list[Diagnostic]:
    """Diagnostics for a hand-written stack of (type, props), plus its outputs."""
    made = [make_resource(t, p, name=f"r{i}") for i, (t, p) in enumerate(resources)]
    wrapped = {k: {"value": v, "secret": False} for k, v in (outputs or {}).items()}
    return analyze_stack(stack_request(stack, made, wrapped))

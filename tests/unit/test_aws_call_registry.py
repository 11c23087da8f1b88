"""Every AWS call the kit makes at run time is registered here with the tests that drive it
through a real botocore client (moto in server mode, or a `Stubber`), and nothing else.

How the calls are found (`scan`): ``src/`` is parsed with `ast`, never imported or run.

* The services are the string literals passed as the first argument of a call named
  ``client`` or ``_client`` (``boto3.client("s3")``, ``target.client("rds")``,
  ``self._client("kms")``). A new service makes `test_the_services_in_src_are_the_registered_ones`
  fail until it is registered.
* A call is an attribute whose name is an operation of one of those services (botocore's
  snake_case names, from the installed service models) or a client-level method
  (``get_waiter``, ``generate_db_auth_token`` ...), on a receiver named like a client: the
  name of the variable, attribute or accessor it comes from ends in ``client``, ``kms``,
  ``rds``, ``s3``, ``arc`` or ``secretsmanager`` (``self._client.sign``,
  ``self._rds().generate_db_auth_token``, ``target.client("rds").stop_db_instance``). Bare
  references count as well as calls (``asyncio.to_thread(rds.promote_read_replica, ...)``).
* Operation names with an underscore (``put_object``, ``describe_key``) are distinctive:
  they count on any receiver, so a client held under another name is still found. Only
  one-word operations (KMS ``sign``, ``decrypt``, ``encrypt``, ``verify``, which
  `cryptography` keys have too) and the names in `SHARED_NAMES` (``get_secret_value`` of
  pydantic's SecretStr, ``generate_data_key`` of the kit's KeyWrapper) need the
  client-like name.
* A string literal that is an operation name, passed first to a call named like a client
  (the ARC dispatcher ``self._arc("update_routing_control_states", ...)`` runs
  ``getattr(client, op)``).

The scan is exact on a given tree (no timing, no network, no imports of ``src``), so the
test is not flaky; it can fail both ways (an unregistered call, a registered call that is
gone), and `test_the_scan_finds_a_planted_call` shows it finds one. On top of the registry,
`test_keywords_in_src_are_members_of_each_operations_input` checks each call's literal
keyword arguments against the operation's input shape, statically, for every call site.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore import xform_name

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"

CLIENT_NAME = re.compile(r"(?:^|_)(?:client|kms|rds|s3|arc|secretsmanager)$")
"""Names the kit gives its boto3 clients (and the accessors that return them)."""
CLIENT_METHODS = frozenset({"generate_db_auth_token", "get_waiter", "get_paginator",
                            "generate_presigned_url", "generate_presigned_post"})
"""botocore client methods that are not operations of the service model."""
CLIENT_FACTORIES = frozenset({"client", "_client"})
SHARED_NAMES = {
    "get_secret_value": "pydantic's SecretStr (settings, tokens)",
    "generate_data_key": "audit_worker.crypto.KeyWrapper, which KmsKeyWrapper implements",
}
"""Operation names the kit's own objects also have: counted on client-like names only."""


@dataclass(frozen=True)
class Validated:
    service: str
    tests: tuple[str, ...]
    """``path::test_name`` of tests that drive this call through a real botocore client."""
    note: str = ""


PLATFORM = "tests/unit/auditctl/test_auditctl_aws_platform.py::"
KMS_MOTO = "tests/integration/test_kms.py::"
KMS_STUB = "tests/unit/crypto/test_crypto_kms_errors.py::"
S3_MOTO = "tests/integration/test_evidence_store_s3.py::"
WORKER_STUB = "tests/unit/worker/test_aws_requests.py::"

REGISTRY: dict[tuple[str, str], Validated] = {
    # auditctl: the aws-kubernetes platform
    ("src/auditctl/platforms/aws.py", "get_public_key"): Validated("kms", (
        PLATFORM + "test_the_public_key_comes_from_kms",
        PLATFORM + "test_the_public_key_request_names_the_sites_signing_key")),
    ("src/auditctl/platforms/aws.py", "describe_db_instances"): Validated("rds", (
        PLATFORM + "test_topology_reads_the_replica_from_rds_and_the_endpoint_from_arc",
        PLATFORM + "test_rebuild_replica_sends_its_own_request_through_the_rds_model")),
    ("src/auditctl/platforms/aws.py", "promote_read_replica"): Validated("rds", (
        PLATFORM + "test_promote_database_promotes_the_rds_read_replica",
        PLATFORM + "test_promote_database_sends_a_promotion_the_rds_model_accepts_then_waits")),
    ("src/auditctl/platforms/aws.py", "get_waiter"): Validated("rds", (
        PLATFORM + "test_promote_database_promotes_the_rds_read_replica",
        PLATFORM + "test_promote_database_sends_a_promotion_the_rds_model_accepts_then_waits",
        PLATFORM + "test_rebuild_replica_sends_its_own_request_through_the_rds_model"),
        "db_instance_available: DescribeDBInstances polled by botocore's waiter model"),
    ("src/auditctl/platforms/aws.py", "stop_db_instance"): Validated("rds", (
        PLATFORM + "test_fence_stops_the_old_primary",
        PLATFORM + "test_fence_sends_a_stop_the_rds_model_accepts_for_the_old_primary")),
    ("src/auditctl/platforms/aws.py", "create_db_instance_read_replica"): Validated("rds", (
        PLATFORM + "test_rebuild_creates_a_cross_region_read_replica_of_the_primary",
        PLATFORM + "test_rebuild_replica_sends_its_own_request_through_the_rds_model",
        PLATFORM + "test_rebuild_request_carries_the_target_regions_key_network_and_parameters")),
    ("src/auditctl/platforms/aws.py", "get_routing_control_state"): Validated(
        "route53-recovery-cluster", (
            PLATFORM + "test_topology_reads_the_replica_from_rds_and_the_endpoint_from_arc",),
        "moto has no ARC data plane: Stubber only"),
    ("src/auditctl/platforms/aws.py", "update_routing_control_states"): Validated(
        "route53-recovery-cluster", (
            PLATFORM + "test_switch_endpoint_turns_the_target_on_and_the_other_off_in_one_"
                       "arc_request",
            PLATFORM + "test_switch_endpoint_tries_the_next_regional_endpoint_when_one_is_"
                       "throttled",
            PLATFORM + "test_a_safety_rule_refusal_is_final_not_retried_elsewhere"),
        "moto has no ARC data plane: Stubber only"),
    # the worker
    ("src/audit_worker/crypto/signing.py", "sign"): Validated("kms", (
        KMS_MOTO + "test_signer_verifies_offline",
        KMS_MOTO + "test_kms_signature_is_der_p256_sha256")),
    ("src/audit_worker/crypto/signing.py", "get_public_key"): Validated("kms", (
        KMS_MOTO + "test_signer_verifies_offline",
        KMS_STUB + "test_signer_unsupported_operation")),
    ("src/audit_worker/crypto/wrapping.py", "generate_data_key"): Validated("kms", (
        KMS_MOTO + "test_wrapper_round_trip", KMS_STUB + "test_request_parameters")),
    ("src/audit_worker/crypto/wrapping.py", "decrypt"): Validated("kms", (
        KMS_MOTO + "test_wrapper_round_trip", KMS_STUB + "test_request_parameters")),
    ("src/audit_worker/objectstore.py", "put_object"): Validated("s3", (
        S3_MOTO + "test_put_once_refuses_an_existing_key_with_a_conditional_put",
        WORKER_STUB + "test_a_write_once_put_is_a_conditional_put_with_a_sha256_checksum",
        WORKER_STUB + "test_a_replacing_put_carries_no_condition")),
    ("src/audit_worker/objectstore.py", "get_object"): Validated("s3", (
        S3_MOTO + "test_keys_lists_under_the_prefix_in_order",
        WORKER_STUB + "test_get_and_a_paged_listing_send_what_the_s3_model_defines")),
    ("src/audit_worker/objectstore.py", "list_objects_v2"): Validated("s3", (
        S3_MOTO + "test_keys_lists_under_the_prefix_in_order",
        WORKER_STUB + "test_get_and_a_paged_listing_send_what_the_s3_model_defines")),
    ("src/audit_worker/health.py", "describe_key"): Validated("kms", (
        "tests/integration/service/test_health_endpoints.py::"
        "test_external_checks_kms_keys_and_the_archive_bucket",
        WORKER_STUB + "test_the_external_check_describes_both_keys_and_heads_the_bucket")),
    ("src/audit_worker/health.py", "head_bucket"): Validated("s3", (
        "tests/integration/service/test_health_endpoints.py::"
        "test_external_checks_kms_keys_and_the_archive_bucket",
        WORKER_STUB + "test_the_external_check_describes_both_keys_and_heads_the_bucket")),
    ("src/audit_worker/db/bootstrap.py", "get_secret_value"): Validated("secretsmanager", (
        "tests/integration/worker/test_bootstrap.py::"
        "test_bootstrap_reads_the_master_login_from_the_rds_managed_secret",
        WORKER_STUB + "test_the_master_login_is_read_with_get_secret_value")),
    ("src/audit_worker/db/credentials.py", "generate_db_auth_token"): Validated("rds", (
        "tests/unit/worker/test_iam_token_provider.py::"
        "test_the_token_is_a_presigned_rds_db_connect_request_for_the_login",),
        "no model operation: botocore presigns rds-db:connect locally (SigV4); the test "
        "uses a real botocore client and checks the signed query"),
}


# ------------------------------------------------------------------ the scan
@dataclass(frozen=True)
class CallSite:
    path: str
    method: str
    line: int
    keywords: tuple[str, ...] | None
    """Literal keyword names, or None when the call is not visible (a bare reference)."""
    open_kwargs: bool  # a ``**mapping`` is passed too
    first_arg: str | None  # a string literal first argument (get_waiter's name)


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _name(node.func)
    if isinstance(node, ast.Subscript):
        return _name(node.value)
    return ""


def _trees(root: Path) -> dict[str, ast.Module]:
    return {path.relative_to(root.parent).as_posix(): ast.parse(path.read_text("utf-8"))
            for path in sorted(root.rglob("*.py"))}


def services(trees: dict[str, ast.Module]) -> set[str]:
    found = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and _name(node.func) in CLIENT_FACTORIES
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                found.add(node.args[0].value)
    return found


@cache
def model(service: str) -> Any:
    return botocore.session.get_session().get_service_model(service)


@cache
def operations(service: str) -> dict[str, str]:
    """snake_case name -> API operation name."""
    return {xform_name(op): op for op in model(service).operation_names}


def _call_of(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.Call | None:
    """The call that passes this operation its parameters: ``x.op(...)``, or
    ``to_thread(x.op, ...)`` (the keywords go through)."""
    parent = parents.get(node)
    if isinstance(parent, ast.Call):
        if parent.func is node:
            return parent
        if parent.args and parent.args[0] is node and _name(parent.func) == "to_thread":
            return parent
    return None


def _site(path: str, method: str, node: ast.AST, call: ast.Call | None, *,
          skip_first: bool = False) -> CallSite:
    if call is None:
        return CallSite(path, method, getattr(node, "lineno", 0), None, False, None)
    args = call.args[1:] if skip_first or _name(call.func) == "to_thread" else call.args
    first = args[0] if args else None
    literal = first.value if isinstance(first, ast.Constant) and isinstance(
        first.value, str) else None
    return CallSite(path, method, call.lineno,
                    tuple(k.arg for k in call.keywords if k.arg is not None),
                    any(k.arg is None for k in call.keywords), literal)


def scan(trees: dict[str, ast.Module]) -> list[CallSite]:
    used = services(trees)
    ops = {name for service in used if service in _known() for name in operations(service)}
    found: list[CallSite] = []
    for path, tree in trees.items():
        parents = {child: parent for parent in ast.walk(tree)
                   for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (node.attr in ops or
                                                    node.attr in CLIENT_METHODS):
                distinctive = "_" in node.attr and node.attr not in CLIENT_METHODS and (
                    node.attr not in SHARED_NAMES)
                if distinctive or CLIENT_NAME.search(_name(node.value)):
                    found.append(_site(path, node.attr, node, _call_of(node, parents)))
            elif (isinstance(node, ast.Call) and CLIENT_NAME.search(_name(node.func))
                  and node.args and isinstance(node.args[0], ast.Constant)
                  and node.args[0].value in ops):
                found.append(_site(path, str(node.args[0].value), node, node, skip_first=True))
    return found


@cache
def _known() -> frozenset[str]:
    return frozenset(botocore.session.get_session().get_available_services())


@cache
def src_trees() -> dict[str, ast.Module]:
    return _trees(SRC)


# ------------------------------------------------------------------ the tests
def test_every_aws_call_in_src_is_registered_and_every_registered_call_is_there() -> None:
    found = {(s.path, s.method): s.line for s in scan(src_trees())}
    unregistered = sorted(f"{path}:{line} {method}" for (path, method), line in found.items()
                          if (path, method) not in REGISTRY)
    gone = sorted(f"{path} {method}" for path, method in REGISTRY if (path, method) not in found)
    assert not unregistered, (
        "AWS calls without a test through a real botocore client: add one (moto server, or "
        "tests/aws_stub.py) and register it in REGISTRY: " + "; ".join(unregistered))
    assert not gone, "registered calls no longer in src/ (remove them): " + "; ".join(gone)


def test_the_services_in_src_are_the_registered_ones() -> None:
    assert services(src_trees()) == {v.service for v in REGISTRY.values()}


def test_each_registered_call_is_an_operation_or_a_method_of_a_real_botocore_client() -> None:
    session = botocore.session.get_session()
    for (path, method), entry in REGISTRY.items():
        assert entry.service in _known(), f"{path} {method}: no botocore model {entry.service}"
        if method in CLIENT_METHODS:
            client = session.create_client(entry.service, region_name="us-east-1",
                                           aws_access_key_id="x", aws_secret_access_key="x")
            assert callable(getattr(client, method, None)), f"{entry.service} has no {method}"
        else:
            assert method in operations(entry.service), f"{entry.service} has no {method}"


@cache
def _test_names(path: str) -> frozenset[str]:
    tree = ast.parse((ROOT / path).read_text("utf-8"))
    return frozenset(n.name for n in ast.walk(tree)
                     if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def test_each_registered_call_names_tests_that_exist() -> None:
    for (path, method), entry in REGISTRY.items():
        assert entry.tests, f"{path} {method}: no validating test"
        for ref in entry.tests:
            file, _, name = ref.partition("::")
            assert name.startswith("test_") and name in _test_names(file), (
                f"{path} {method}: {ref} does not exist")


def _shape_problems(sites: list[CallSite], service_of: dict[tuple[str, str], str]
                    ) -> list[str]:
    session = botocore.session.get_session()
    problems = []
    for site in sites:
        service = service_of.get((site.path, site.method))
        if service is None or site.keywords is None:
            continue
        where = f"{site.path}:{site.line} {site.method}"
        if site.method == "get_waiter":
            client = session.create_client(service, region_name="us-east-1",
                                           aws_access_key_id="x", aws_secret_access_key="x")
            if site.first_arg not in client.waiter_names:
                problems.append(f"{where}: {service} has no waiter {site.first_arg!r}")
            continue
        if site.method in CLIENT_METHODS:
            continue
        shape = model(service).operation_model(operations(service)[site.method]).input_shape
        members = set(shape.members) if shape is not None else set()
        for name in site.keywords:
            if name not in members:
                problems.append(f"{where}: {name} is not a parameter of "
                                f"{operations(service)[site.method]}")
        if not site.open_kwargs and shape is not None:
            for name in set(shape.required_members) - set(site.keywords):
                problems.append(f"{where}: required {name} is missing")
    return problems


def test_keywords_in_src_are_members_of_each_operations_input() -> None:
    """Every call site, including those no test reaches with these exact arguments."""
    service_of = {key: entry.service for key, entry in REGISTRY.items()}
    assert _shape_problems(scan(src_trees()), service_of) == []


# ------------------------------------------------------------------ the checks can fail
def _tree_of(tmp_path: Path, files: dict[str, str]) -> dict[str, ast.Module]:
    root = tmp_path / "src"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, "utf-8")
    return _trees(root)


PLANTED = '''
import asyncio, boto3

class Store:
    def __init__(self):
        self._client = boto3.client("s3")
        self._key = object()

    def drop(self, key):
        self._client.delete_object(Bucket="b", Key=key)

    def seal(self, data):
        return self._key.sign(data)  # a cryptography key, not KMS

async def fence(target):
    rds = target.client("rds")
    await asyncio.to_thread(rds.reboot_db_instance, DBInstanceIdentifier="x")
'''


def test_the_scan_finds_a_planted_call_and_ignores_a_non_client_receiver(
    tmp_path: Path,
) -> None:
    trees = _tree_of(tmp_path, {"pkg/store.py": PLANTED})
    assert services(trees) == {"s3", "rds"}
    assert {(s.path, s.method) for s in scan(trees)} == {
        ("src/pkg/store.py", "delete_object"), ("src/pkg/store.py", "reboot_db_instance")}


def test_the_scan_finds_a_call_on_a_client_under_any_name(tmp_path: Path) -> None:
    trees = _tree_of(tmp_path, {"pkg/x.py": 'import boto3\nthing = boto3.client("kms")\n'
                                            'thing.describe_key(KeyId="k")\n'})
    assert [s.method for s in scan(trees)] == ["describe_key"]


@pytest.mark.parametrize(("path", "old", "new", "problem"), [
    ("src/auditctl/platforms/aws.py", "BackupRetentionPeriod=35", "BackupRetention=35",
     "BackupRetention is not a parameter of PromoteReadReplica"),
    ("src/audit_worker/objectstore.py", "Bucket=self.bucket, Key=self.prefix + key)",
     "Key=self.prefix + key)", "required Bucket is missing"),
    ("src/auditctl/platforms/aws.py", '"db_instance_available"', '"db_instance_up"',
     "rds has no waiter 'db_instance_up'"),
])
def test_the_shape_check_refuses_a_mutated_source(
    tmp_path: Path, path: str, old: str, new: str, problem: str,
) -> None:
    text = (ROOT / path).read_text("utf-8")
    assert old in text
    trees = {path: ast.parse(text.replace(old, new, 1))}
    service_of = {key: entry.service for key, entry in REGISTRY.items()}
    assert any(problem in p for p in _shape_problems(scan(trees), service_of))
    assert _shape_problems(scan({path: ast.parse(text)}), service_of) == []

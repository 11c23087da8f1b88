"""The AWS constraints the kit depends on (``aws_constraints.py``), against examples and stacks.

Each constraint must reject its own failing example and accept the fixed one (so a check that
always or never fires fails here); then every constraint runs over the four stacks' recorded
resources, and over copies of the real stacks broken the way AWS would refuse, which proves the
checks read the shapes the mocks actually record (including across stacks, through the DR
stack's StackReference to prod).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import stackkit
from aws_constraints import (
    BUCKET,
    CONSTRAINTS,
    DB,
    EKS,
    PARAMETER_GROUP,
    PASSWORD,
    RECORD,
    REPLICA_KEY,
    SSE,
    Account,
    Constraint,
)

pytestmark = pytest.mark.infra

BY_ID = {c.id: c for c in CONSTRAINTS}
IDS = [c.id for c in CONSTRAINTS]


def _summaries() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = stackkit.evaluate_all()
    return found


def test_every_constraint_has_a_reference_a_rule_and_both_examples() -> None:
    assert len(BY_ID) == len(CONSTRAINTS), "constraint ids must be unique"
    for c in CONSTRAINTS:
        assert c.url.startswith(("https://docs.aws.amazon.com/", "https://docs.amazonaws.cn/")), \
            f"{c.id}: the reference must be AWS documentation"
        assert len(c.rule) > 40 and c.types, f"{c.id}: say the rule and what it examines"
        assert callable(c.failing) and callable(c.passing), f"{c.id}: needs both examples"


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=IDS)
def test_constraint_rejects_its_failing_example(constraint: Constraint) -> None:
    found = constraint.findings(constraint.failing())
    assert found, f"{constraint.id}: its failing example passed"
    assert {f.constraint for f in found} == {constraint.id}


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=IDS)
def test_constraint_accepts_its_fixed_example(constraint: Constraint) -> None:
    assert constraint.findings(constraint.passing()) == []


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=IDS)
def test_stacks_satisfy_constraint(constraint: Constraint) -> None:
    summaries = _summaries()
    examined = [r for s in summaries.values() for r in s["resources"]
                if r["type"] in constraint.types]
    if not examined:
        pytest.skip(f"no stack declares {', '.join(constraint.types)} yet")
    found = constraint.findings(Account(summaries))
    assert not found, "AWS would refuse:\n" + "\n".join(map(str, found))


# --------------------------------------------------------------------------- broken real stacks


def _resource(summaries: dict[str, Any], stack: str, type_: str, name: str) -> dict[str, Any]:
    found = [r for r in summaries[stack]["resources"] if r["type"] == type_ and r["name"] == name]
    assert len(found) == 1, f"{stack}: no single {type_} {name}"
    resource: dict[str, Any] = found[0]
    return resource


def _drop_replica_key(s: dict[str, Any]) -> None:
    del _resource(s, "dr", DB, "database-replica")["inputs"]["kmsKeyId"]


def _prod_without_backups(s: dict[str, Any]) -> None:
    _resource(s, "prod", DB, "database-instance")["inputs"]["backupRetentionPeriod"] = 0


def _token_with_default_specials(s: dict[str, Any]) -> None:
    _resource(s, "prod", PASSWORD, "cache-auth-token")["inputs"]["special"] = True


def _replica_bucket_without_lock(s: dict[str, Any]) -> None:
    _resource(s, "prod", BUCKET, "archive-replica-bucket")["inputs"]["objectLockEnabled"] = False


def _dr_replicates_the_archive_key_again(s: dict[str, Any]) -> None:
    reference = next(r for r in s["dr"]["resources"] if r["type"] == stackkit.STACK_REFERENCE)
    canned = reference["outputs"]["outputs"]["keyArns"]["archive"]
    s["dr"]["resources"].append({
        "type": REPLICA_KEY, "name": "keys-archive-replica", "id": "keys-archive-replica",
        "inputs": {"primaryKeyArn": canned, "region": "us-west-2"}, "outputs": {}})


def _primary_record_without_health_check(s: dict[str, Any]) -> None:
    del _resource(s, "dr", RECORD, "failover-db-primary")["inputs"]["healthCheckId"]


def _replica_encryption_in_the_wrong_region(s: dict[str, Any]) -> None:
    del _resource(s, "prod", SSE, "archive-replica-bucket-encryption")["inputs"]["region"]


def _old_parameter_group_family(s: dict[str, Any]) -> None:
    _resource(s, "dev", PARAMETER_GROUP, "database-params")["inputs"]["family"] = "postgres15"


def _prod_cluster_in_config_map_mode(s: dict[str, Any]) -> None:
    cluster = next(r for r in s["prod"]["resources"] if r["type"] == EKS)
    cluster["inputs"]["accessConfig"]["authenticationMode"] = "CONFIG_MAP"


BROKEN: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    "prod-access-entries-on-a-config-map-cluster": ("eks-access-entries-mode",
                                                    _prod_cluster_in_config_map_mode),
    "dr-replica-without-its-region-key": ("rds-cross-region-replica-kms", _drop_replica_key),
    "prod-source-without-backups": ("rds-replica-source-backups", _prod_without_backups),
    "auth-token-with-default-specials": ("elasticache-auth-token-format",
                                         _token_with_default_specials),
    "replica-bucket-without-object-lock": ("s3-replication-object-lock",
                                           _replica_bucket_without_lock),
    "second-replica-of-the-archive-key": ("kms-replica-keys",
                                          _dr_replicates_the_archive_key_again),
    "primary-record-without-health-check": ("route53-failover-records",
                                            _primary_record_without_health_check),
    "replica-bucket-encryption-in-prod-region": ("kms-key-in-resource-region",
                                                 _replica_encryption_in_the_wrong_region),
    "parameter-group-of-another-major": ("rds-parameter-group-family",
                                         _old_parameter_group_family),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_constraint_catches_a_broken_copy_of_the_real_stacks(case: str) -> None:
    constraint_id, breaks = BROKEN[case]
    constraint = BY_ID[constraint_id]
    summaries = copy.deepcopy(_summaries())
    before = {str(f) for f in constraint.findings(Account(summaries))}
    breaks(summaries)
    after = {str(f) for f in constraint.findings(Account(summaries))}
    assert after - before, f"{constraint_id} did not notice: {case}"


def test_the_dr_replica_source_is_resolved_through_the_stack_reference() -> None:
    # The mocks answer DR's StackReference with canned ARNs; the checks must reach prod's
    # actual instance, or every cross-stack rule would pass by not finding its subject.
    account = Account(_summaries())
    replica = _resource(_summaries(), "dr", DB, "database-replica")
    found = account.find("dr", replica["inputs"]["replicateSourceDb"], DB)
    assert found is not None
    owner, source = found
    assert (owner, source["name"]) == ("prod", "database-instance")
    assert json.dumps(source["inputs"]["backupRetentionPeriod"]) != "0"

"""The DR stack: what a DR ``up`` needs from prod's region (nothing, but named exceptions),
and ``dr.mode: promoted`` (the same replica resource without its source, prod-sized workers).

The region check reads what the mocks record (``conftest.py``): every resource's ``region``
input, every explicit provider's region, every invoke's ``region`` argument, and the inputs
that make the provider call another region (a KMS replica key is created by ReplicateKey in
its primary's region; a read replica names its source).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import stackkit
import yaml
from stackkit import DB, HEALTH_CHECK, RELEASE, REPLICA_KEY, one, resources, summary

PRIMARY_REGION = "us-east-1"
PROVIDER = "pulumi:providers:aws"

# (type, resource name prefix, input) that may name or reach prod's region, and why.
ALLOWED: dict[tuple[str, str, str], str] = {
    (REPLICA_KEY, "keys-", "primaryKeyArn"):
        "ReplicateKey runs in the primary's region, on creation only (the replica exists "
        "before any failover); reads and updates go to the replica's region",
    (DB, "database-replica", "replicateSourceDb"):
        "standby only: CreateDBInstanceReadReplica runs in DR's region and names its source",
}
REACHING_INPUTS = ("region", "primaryKeyArn", "replicateSourceDb", "kmsKeyArn", "rules")


def _in_region(value: Any, region: str) -> bool:
    if isinstance(value, Mapping):
        return any(_in_region(v, region) for v in value.values())
    if isinstance(value, list):
        return any(_in_region(v, region) for v in value)
    text = str(value)
    return text == region or f":{region}:" in text


def _allowed(type_: str, name: str, key: str) -> bool:
    return any(t == type_ and name.startswith(prefix) and k == key
               for t, prefix, k in ALLOWED)


def primary_region_uses(found: Mapping[str, Any], region: str = PRIMARY_REGION) -> Iterator[str]:
    """Everything in a stack summary that would make its ``up`` call `region` and is not in
    `ALLOWED`."""
    providers = {r["name"]: r for r in found["resources"] if r["type"] == PROVIDER}
    for name, provider in providers.items():
        if provider["inputs"].get("region") == region:
            yield f"provider {name} is in {region}"
    for r in found["resources"]:
        if r["type"] == PROVIDER:
            continue
        for key in REACHING_INPUTS:
            if key in r["inputs"] and _in_region(r["inputs"][key], region) and not _allowed(
                    r["type"], r["name"], key):
                yield f"{r['type']} {r['name']}: {key} is in {region}"
        if r.get("provider_name") in providers and providers[r["provider_name"]]["inputs"].get(
                "region") == region:
            yield f"{r['type']} {r['name']} uses a {region} provider"
    for call in found["calls"]:
        if call["args"].get("region") == region:
            yield f"invoke {call['token']} in {region}"


def test_the_region_check_fails_on_a_read_of_prods_secret_and_a_prod_provider() -> None:
    bad = {"resources": [
        {"type": PROVIDER, "name": "east", "inputs": {"region": PRIMARY_REGION}},
        {"type": "aws:s3/bucket:Bucket", "name": "b", "inputs": {}, "provider_name": "east"},
        {"type": DB, "name": "database-instance",
         "inputs": {"replicateSourceDb": f"arn:aws:rds:{PRIMARY_REGION}:1:db:x"}},
    ], "calls": [{"token": "aws:secretsmanager/getSecretVersion:getSecretVersion",
                  "args": {"secretId": "arn:...", "region": PRIMARY_REGION}}]}
    assert len(list(primary_region_uses(bad))) == 4


def test_a_dr_up_calls_nothing_in_prods_region_but_the_named_exceptions() -> None:
    assert list(primary_region_uses(summary("dr"))) == []


def test_arc_configuration_uses_an_explicit_us_west_2_provider() -> None:
    found = summary("dr")["resources"]
    arc = [r for r in found if r["type"].startswith("aws:route53recoverycontrol/")]
    assert len(arc) == 5  # cluster, control panel, two routing controls, safety rule
    providers = {r["name"]: r for r in found if r["type"] == PROVIDER}
    assert {providers[r["provider_name"]]["inputs"]["region"] for r in arc} == {"us-west-2"}


@pytest.fixture(scope="module")
def promoted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data = yaml.safe_load((stackkit.ROOT / "environments" / "dr.yaml").read_text())
    data["dr"]["mode"] = "promoted"
    path: Path = tmp_path_factory.mktemp("dr-promoted") / "dr.yaml"
    path.write_text(yaml.safe_dump(data))
    result = stackkit.evaluate_with("dr", {"audit-kit:environment": str(path)})
    assert result["error"] is None, result["error"]
    return result


def _one(found: dict[str, Any], type_: str) -> dict[str, Any]:
    matching = [r for r in found["resources"] if r["type"] == type_]
    assert len(matching) == 1, [r["name"] for r in matching]
    return matching[0]


def test_promoted_mode_keeps_the_replica_resource_and_drops_its_source(
        promoted: dict[str, Any]) -> None:
    standby, after = one("dr", DB), _one(promoted, DB)
    assert standby["name"] == after["name"] == "database-replica"  # an update, not a replace
    assert "replicateSourceDb" in standby["inputs"]
    assert "replicateSourceDb" not in after["inputs"]
    for inherited in ("engine", "username", "dbName", "allocatedStorage"):  # would replace it
        assert inherited not in after["inputs"]
    assert after["inputs"]["skipFinalSnapshot"] is False  # a primary now: a final snapshot
    assert after["inputs"]["kmsKeyId"] == standby["inputs"]["kmsKeyId"]
    assert "dbReplicaSourceArn" not in promoted["outputs"]
    assert promoted["outputs"]["drMode"]["value"] == "promoted"


def test_promoted_mode_runs_prod_sized_workers_with_autoscaling_and_migrations(
        promoted: dict[str, Any]) -> None:
    settings = yaml.safe_load((stackkit.ROOT / "environments" / "dr.yaml").read_text())
    standby = one("dr", RELEASE)["inputs"]["values"]
    after = _one(promoted, RELEASE)["inputs"]["values"]
    active = after["activeSlot"]
    assert standby["slots"][active]["replicas"] == 1  # pilot light while standing by
    assert after["slots"][active]["replicas"] == settings["worker"]["replicas"]
    assert after["autoscaling"]["enabled"] is True
    assert after["migration"]["enabled"] is True  # the database is writable now


def test_promoted_mode_calls_nothing_in_prods_region_but_the_named_exceptions(
        promoted: dict[str, Any]) -> None:
    assert list(primary_region_uses(promoted)) == []
    assert not any(r["type"] == DB and "replicateSourceDb" in r["inputs"]
                   for r in promoted["resources"])


def test_the_switch_is_the_same_in_both_modes(promoted: dict[str, Any]) -> None:
    checks = sorted(r["name"] for r in promoted["resources"] if r["type"] == HEALTH_CHECK)
    assert checks == sorted(r["name"] for r in resources("dr", HEALTH_CHECK))

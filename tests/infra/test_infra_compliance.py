"""HIPAA controls (infra/compliance.py), the policies that require them, the PostgreSQL
version pin and the dev archive lock: each stack passes; each policy rejects a bad example."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import stackkit
import yaml
from pulumi_policy import StackValidationArgs
from stackkit import STACKS, Violations, make_stack_args, resource_args, resources

from infra.compliance import compliance_key_policy, db_log_group_names, eks_log_group_name
from infra.policy import hipaa
from infra.settings import SettingsError, load_environment

pytestmark = pytest.mark.infra

NEW_POLICIES = (hipaa.vpc_flow_logs, hipaa.audit_trail, hipaa.log_groups_retained_and_encrypted,
                hipaa.backups_copied_and_locked)


def _stack_check(validate: Any, args: StackValidationArgs) -> Violations:
    found = Violations()
    validate(args, found)
    return found


def _recorded(stack: str) -> list[tuple[str, dict[str, Any]]]:
    """The stack's resources as (type, state) pairs, to break one and re-check."""
    return [(r["type"], copy.deepcopy(stackkit.state(r))) for r in resources(stack)]


def _one(pairs: list[tuple[str, dict[str, Any]]], type_: str) -> dict[str, Any]:
    found = [p for t, p in pairs if t == type_]
    assert found, type_
    return found[0]


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("validate", NEW_POLICIES, ids=lambda v: v.__name__)
def test_each_stack_passes_the_hipaa_control_policies(stack: str, validate: Any) -> None:
    assert not _stack_check(validate, stackkit.stack_args(stack))


def test_a_vpc_without_a_flow_log_fails() -> None:
    pairs = [(t, p) for t, p in _recorded("prod") if t != hipaa.FLOW_LOG]
    assert any("no flow log" in m for m in _stack_check(hipaa.vpc_flow_logs,
                                                       make_stack_args(pairs)))


@pytest.mark.parametrize(("change", "reason"), [
    ({"enableLogFileValidation": False}, "enableLogFileValidation"),
    ({"kmsKeyId": None}, "kmsKeyId"),
    ({"isMultiRegionTrail": False}, "multi-region"),
])
def test_a_weak_trail_fails(change: dict[str, Any], reason: str) -> None:
    pairs = _recorded("prod")
    trail = _one(pairs, hipaa.TRAIL)
    trail.update(change)
    found = _stack_check(hipaa.audit_trail, make_stack_args(pairs))
    assert any(reason in m for m in found), found


def test_a_trail_without_archive_object_events_fails() -> None:
    pairs = _recorded("prod")
    trail = _one(pairs, hipaa.TRAIL)
    trail["advancedEventSelectors"] = trail["advancedEventSelectors"][:1]  # management only
    found = _stack_check(hipaa.audit_trail, make_stack_args(pairs))
    assert sum("no trail records its object access" in m for m in found) == 2  # both buckets


def test_no_trail_fails_unless_the_stack_uses_an_existing_one() -> None:
    pairs = [(t, p) for t, p in _recorded("dev") if t != hipaa.TRAIL]
    assert _stack_check(hipaa.audit_trail, make_stack_args(pairs))
    _one(pairs, hipaa.COMPLIANCE_COMPONENT)["hipaaControls"]["cloudtrail"] = "existing"
    assert not _stack_check(hipaa.audit_trail, make_stack_args(pairs))


def test_dr_relies_on_prods_trail_and_creates_none() -> None:
    assert not resources("dr", hipaa.TRAIL)
    assert load_environment("dr").compliance.cloudtrail == "existing"


@pytest.mark.parametrize("change", [{"retentionInDays": None}, {"retentionInDays": 10},
                                    {"kmsKeyId": None}])
def test_a_log_group_without_retention_or_key_fails(change: dict[str, Any]) -> None:
    pairs = _recorded("prod")
    _one(pairs, hipaa.LOG_GROUP).update(change)
    assert _stack_check(hipaa.log_groups_retained_and_encrypted, make_stack_args(pairs))


@pytest.mark.parametrize("missing", ["/cluster", "/postgresql"])
def test_a_cluster_or_database_without_its_log_group_fails(missing: str) -> None:
    pairs = [(t, p) for t, p in _recorded("prod")
             if not (t == hipaa.LOG_GROUP and str(p["name"]).endswith(missing))]
    found = _stack_check(hipaa.log_groups_retained_and_encrypted, make_stack_args(pairs))
    assert any(missing in m for m in found), found


@pytest.mark.parametrize("stack", ["dev", "prod", "dr"])
def test_log_groups_are_named_as_the_cluster_and_database_log(stack: str) -> None:
    eks = stackkit.one(stack, stackkit.EKS)
    db = stackkit.one(stack, stackkit.DB)
    names = {r["inputs"]["name"] for r in resources(stack, hipaa.LOG_GROUP)}
    assert eks_log_group_name(eks["inputs"]["name"]) in names
    assert set(db_log_group_names(db["inputs"]["identifier"])) <= names
    assert len(db_log_group_names(db["inputs"]["identifier"])) == len(
        db["inputs"]["enabledCloudwatchLogsExports"])


def test_logs_key_lets_only_this_accounts_log_groups_use_it() -> None:
    policy = compliance_key_policy(account_id="111122223333", region="us-east-1",
                                   purpose="logs")
    (logs,) = [s for s in policy["Statement"] if s["Sid"] == "CloudWatchLogs"]
    assert logs["Principal"] == {"Service": "logs.us-east-1.amazonaws.com"}
    assert logs["Condition"] == {"ArnLike": {"kms:EncryptionContext:aws:logs:arn":
                                             "arn:aws:logs:us-east-1:111122223333:log-group:*"}}


@pytest.mark.parametrize("stack", ["prod", "dr"])
def test_a_hardened_plan_without_copy_or_compliance_lock_fails(stack: str) -> None:
    pairs = _recorded(stack)
    if stack == "prod":
        _one(pairs, hipaa.BACKUP_PLAN)["rules"][0].pop("copyActions")
        found = _stack_check(hipaa.backups_copied_and_locked, make_stack_args(pairs))
        assert any("copyActions" in m for m in found), found
    else:  # DR copies nowhere: its stack must not need prod's region
        assert "copyActions" not in _one(pairs, hipaa.BACKUP_PLAN)["rules"][0]
    pairs = _recorded(stack)
    for t, p in pairs:
        if t == hipaa.BACKUP_VAULT_LOCK:
            p.pop("changeableForDays")
    found = _stack_check(hipaa.backups_copied_and_locked, make_stack_args(pairs))
    assert any("COMPLIANCE" in m for m in found), found


def test_a_database_outside_every_backup_selection_fails() -> None:
    pairs = [(t, p) for t, p in _recorded("dev") if t != hipaa.BACKUP_SELECTION]
    found = _stack_check(hipaa.backups_copied_and_locked, make_stack_args(pairs))
    assert any("in no AWS Backup plan" in m for m in found), found


def test_dev_backups_need_no_copy_and_may_use_a_governance_lock() -> None:
    plan = stackkit.one("dev", hipaa.BACKUP_PLAN)["inputs"]
    assert "copyActions" not in plan["rules"][0]
    assert "changeableForDays" not in stackkit.one("dev", hipaa.BACKUP_VAULT_LOCK)["inputs"]


def test_prod_copies_backups_to_a_locked_vault_in_the_dr_region() -> None:
    copy_vault = stackkit.by_name("prod", "compliance-copy-vault")["inputs"]
    assert copy_vault["region"] == "us-west-2"
    assert ":us-west-2:" in copy_vault["kmsKeyArn"]
    lock = stackkit.by_name("prod", "compliance-copy-vault-lock")["inputs"]
    assert lock["region"] == "us-west-2" and lock["changeableForDays"] == 3


def test_guardduty_detector_only_where_the_setting_creates_it() -> None:
    for stack in STACKS:
        want = load_environment(stack).compliance.guardduty == "create"
        assert bool(resources(stack, "aws:guardduty/detector:Detector")) is want, stack


@pytest.mark.parametrize("stack", STACKS)
def test_the_database_and_cluster_wait_for_their_log_groups(stack: str) -> None:
    # Options are invisible to mocks; the program passes the log groups as depends_on.
    source = (stackkit.ROOT / "infra" / "__main__.py").read_text()
    assert "log_groups=compliance.database_log_groups" in source
    assert "log_groups=compliance.cluster_log_groups" in source


# --- Version pin -------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_minor_upgrades_are_off_so_the_pin_holds(stack: str) -> None:
    db = stackkit.one(stack, stackkit.DB)["inputs"]
    assert db["autoMinorVersionUpgrade"] is False


def _write(tmp_path: Path, env: str, change: Any) -> Path:
    data = yaml.safe_load((stackkit.ROOT / "environments" / f"{env}.yaml").read_text())
    change(data)
    path = tmp_path / f"{env}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("value", ["16", "16.", "v16.4", "16.4.1", "1\u0666.4", "160"])
def test_engine_version_must_pin_major_and_minor(tmp_path: Path, value: str) -> None:
    path = _write(tmp_path, "dev", lambda d: d["database"].update(engine_version=value))
    with pytest.raises(SettingsError, match=r"database\.engine_version: must be PostgreSQL "
                                            r"MAJOR\.MINOR such as '16\.4'"):
        load_environment(path)


@pytest.mark.parametrize("value", ["16.4", "17.2", "16.10"])
def test_engine_version_major_minor_is_accepted(tmp_path: Path, value: str) -> None:
    path = _write(tmp_path, "dev", lambda d: d["database"].update(engine_version=value))
    settings = load_environment(path)
    assert settings.cloud().database.parameter_group_family == f"postgres{value.split('.')[0]}"


# --- Settings rules of the controls and the archive lock -------------------------------------


@pytest.mark.parametrize(("env", "change", "message"), [
    ("prod", lambda d: d["compliance"].update(log_retention_days=180),
     "compliance.log_retention_days: must be >= 365 in prod"),
    ("dev", lambda d: d["compliance"].update(log_retention_days=100),
     "compliance.log_retention_days: must be one of CloudWatch Logs' retention values"),
    ("dr", lambda d: d["compliance"].update(backup_vault_lock="governance"),
     "compliance.backup_vault_lock: must be 'compliance' in dr"),
    ("prod", lambda d: d["compliance"].update(cloudtrail="existing"),
     "compliance.cloudtrail: must be 'create' in prod"),
    ("staging", lambda d: d["archive"].update(object_lock_mode="GOVERNANCE"),
     "archive.object_lock_mode: must be COMPLIANCE in staging"),
    ("prod", lambda d: d["archive"].update(object_lock_mode="GOVERNANCE"),
     "archive.object_lock_mode: must be COMPLIANCE in prod"),
    ("dev", lambda d: d["archive"].update(object_lock_mode="COMPLIANCE"),
     "archive.object_lock_days: only with object_lock_mode GOVERNANCE"),
])
def test_control_settings_are_refused_with_their_key(
        tmp_path: Path, env: str, change: Any, message: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_environment(_write(tmp_path, env, change))
    assert message in str(error.value), str(error.value)


def test_dev_archive_uses_a_short_governance_lock_and_others_compliance() -> None:
    assert load_environment("dev").cloud().archive.default_retention() == {
        "mode": "GOVERNANCE", "days": 7}
    for env in ("staging", "prod"):
        assert load_environment(env).cloud().archive.default_retention() == {
            "mode": "COMPLIANCE", "years": 6}


def _lock(stack: str, mode: str, **period: int) -> Violations:
    found = Violations()
    hipaa.archive_object_lock(resource_args(stack, {
        "type": hipaa.S3_LOCK[0], "name": "archive-bucket-object-lock", "parent": None,
        "inputs": {"bucket": "b", "rule": {"defaultRetention": {"mode": mode, **period}}}}),
        found)
    return found


def test_archive_lock_policy_allows_governance_only_in_dev() -> None:
    assert not _lock("dev", "GOVERNANCE", days=7)
    assert _lock("dev", "GOVERNANCE", days=0)
    for stack in ("staging", "prod", "dr", "unit"):
        assert any("COMPLIANCE" in m for m in _lock(stack, "GOVERNANCE", days=7)), stack
        assert any(">= 6 years" in m for m in _lock(stack, "COMPLIANCE", years=1)), stack
        assert not _lock(stack, "COMPLIANCE", years=6), stack


def test_trail_bucket_policy_admits_cloudtrail_for_this_trail_only() -> None:
    trail = stackkit.one("prod", hipaa.TRAIL)
    policy = json.loads(stackkit.by_name("prod", "compliance-trail-bucket-policy")
                        ["inputs"]["policy"])
    writes = [s for s in policy["Statement"] if s["Sid"] == "CloudTrailWrite"]
    assert writes[0]["Condition"]["StringEquals"]["aws:SourceArn"].endswith(
        f":trail/{trail['inputs']['name']}")

"""The CLI's surface (no environment needed): help with synopsis, examples and what each
command leaves behind; argument errors; the local platform's modelled images and state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit_worker.db.migrate import load_migrations
from audit_worker.localenv.platform import (
    UNREACHABLE_DATABASE,
    SiteRecord,
    StackState,
    WorkerRecord,
    image_spec,
)
from auditctl.cli import app
from auditctl.environments import load_profile

runner = CliRunner()
COMMANDS = ["status", "promote", "rollback", "abort", "drill", "failback"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_synopsis_and_examples(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert f"auditctl {command} ENV" in result.output
    assert "Examples" in result.output and "# " in result.output
    assert "--output" in result.output


@pytest.mark.parametrize("command", ["promote", "rollback", "drill", "failback"])
def test_commands_that_change_things_say_what_they_leave_behind(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert "What it leaves behind" in result.output


def test_drill_needs_exactly_one_of_plan_and_execute() -> None:
    assert runner.invoke(app, ["drill", "local"]).exit_code == 2
    assert runner.invoke(app, ["drill", "local", "--plan", "--execute"]).exit_code == 2


def test_an_unknown_environment_is_a_usage_error() -> None:
    result = runner.invoke(app, ["status", "qa"])
    assert result.exit_code == 2 and "unknown environment 'qa'" in result.output


def test_status_of_a_local_environment_that_is_not_up(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "local", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 1 and "auditctl local up" in result.output


def test_prod_promotes_manually_and_local_automatically() -> None:
    assert not load_profile("prod").auto_promote
    assert not load_profile("dr").auto_promote
    assert load_profile("local").auto_promote
    assert load_profile("dev").scale_down_delay_seconds == 30
    assert load_profile("dr").dr_strategy == "pilot-light"


def test_local_images_are_worker_versions() -> None:
    assert image_spec("0.2.0").env == {} and image_spec("0.2.0").migrations == ()
    assert image_spec("0.3.0-broken").env == {"AUDIT_DATABASE_URL": UNREACHABLE_DATABASE}
    (contract,) = image_spec("0.3.0-contract").migrations
    (expand,) = image_spec("0.3.0-expand").migrations
    assert contract.kind == "contract" and expand.kind == "expand"
    assert contract.version == expand.version == len(load_migrations()) + 1
    assert "DROP INDEX" in contract.sql and "ADD COLUMN IF NOT EXISTS" in expand.sql


def test_the_local_state_file_round_trips() -> None:
    state = StackState(
        state_dir="/x", log_id="audit-local", fast=True, primary="prod", created_at=1.0,
        sites={"prod": SiteRecord(
            name="prod", pg_port=1, pg_dir="/x/prod/postgres", redis_port=2,
            redis_dir="/x/prod/redis", redis_pid=3, key_dir="/x/prod/keys",
            workers={"blue": WorkerRecord("blue", "0.1.0", 4, pid=5, started_at=6.0)},
        )},
    )
    again = StackState.from_json(state.to_json())
    assert again == state and again.replica == "dr"
    assert json.loads(state.to_json())["sites"]["prod"]["workers"]["blue"]["port"] == 4
    assert again.site("prod").database_url == "postgresql://postgres@127.0.0.1:1/postgres"

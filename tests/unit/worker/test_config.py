"""Settings: environment over file over defaults; errors name the setting, never a secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit_worker.cli import app
from audit_worker.config import load_settings
from audit_worker.errors import ConfigurationError

DB = "postgresql://writer:s3cret-password@db:5432/audit"


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text(f"database_url: {DB}\nredis_url: redis://r:6379/0\nbatch_size: 200\n")
    monkeypatch.setenv("AUDIT_BATCH_SIZE", "300")
    settings = load_settings(path)
    assert settings.batch_size == 300
    assert settings.database_url.get_secret_value() == DB


def test_bad_values_are_named_with_their_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_DATABASE_URL", "mysql://x")
    monkeypatch.setenv("AUDIT_REDIS_URL", "redis://r:6379/0")
    monkeypatch.setenv("AUDIT_BATCH_SIZE", "0")
    with pytest.raises(ConfigurationError) as err:
        load_settings()
    text = str(err.value)
    assert "database_url (AUDIT_DATABASE_URL)" in text
    assert "batch_size (AUDIT_BATCH_SIZE)" in text


def test_secret_values_never_appear_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_DATABASE_URL", "postgresql://u:hunter2@db/audit")
    monkeypatch.setenv("AUDIT_REDIS_URL", "http://:hunter2@redis")
    with pytest.raises(ConfigurationError) as err:
        load_settings()
    assert "hunter2" not in str(err.value)


def test_kms_backend_requires_key_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_DATABASE_URL", DB)
    monkeypatch.setenv("AUDIT_REDIS_URL", "redis://r:6379/0")
    monkeypatch.setenv("AUDIT_KEY_BACKEND", "kms")
    with pytest.raises(ConfigurationError, match="AUDIT_KMS_DATA_KEY_ID, AUDIT_KMS_SIGNING_KEY_ID"):
        load_settings()


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text(f"database_url: {DB}\nredis_url: redis://r\nbatch_sise: 5\n")
    with pytest.raises(ConfigurationError, match="batch_sise"):
        load_settings(path)


@pytest.fixture
def urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_DATABASE_URL", DB)
    monkeypatch.setenv("AUDIT_REDIS_URL", "redis://r:6379/0")


@pytest.mark.usefixtures("urls")
def test_misspelt_environment_variable_is_refused_with_suggestion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUDIT_LOGID", "site-a")
    with pytest.raises(ConfigurationError) as err:
        load_settings()
    assert "AUDIT_LOGID is not a worker setting; did you mean AUDIT_LOG_ID?" in str(err.value)


@pytest.mark.usefixtures("urls")
def test_every_unknown_variable_is_listed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_LOGID", "site-a")
    monkeypatch.setenv("AUDIT_BATCH_SZIE", "500")
    monkeypatch.setenv("AUDIT_MY_TOOL_DIR", "/opt/tool")
    monkeypatch.setenv("AUDIT_SLOT", "purple")  # a bad value is reported alongside
    with pytest.raises(ConfigurationError) as err:
        load_settings()
    text = str(err.value)
    assert "AUDIT_BATCH_SZIE is not a worker setting; did you mean AUDIT_BATCH_SIZE?" in text
    assert "AUDIT_LOGID is not a worker setting; did you mean AUDIT_LOG_ID?" in text
    assert "AUDIT_MY_TOOL_DIR is not a worker setting (nor close to one)" in text
    assert "slot (AUDIT_SLOT)" in text
    assert "AUDITKIT_" in text  # where the kit's own non-setting variables went


@pytest.mark.usefixtures("urls")
def test_unknown_variable_value_is_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_DATABASE_URI", "postgresql://u:hunter2@db/audit")
    monkeypatch.setenv("AUDIT_INTAKE_TOKEN", "token-hunter2-aaaaaaaa")
    with pytest.raises(ConfigurationError) as err:
        load_settings()
    text = str(err.value)
    assert "did you mean AUDIT_DATABASE_URL?" in text
    assert "did you mean AUDIT_INTAKE_TOKENS?" in text
    assert "hunter2" not in text


@pytest.mark.usefixtures("urls")
def test_lower_case_variable_is_checked_as_the_worker_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pydantic-settings matches AUDIT_* in any case, so a misspelling in any case matters.
    monkeypatch.setenv("audit_batch_size", "300")
    assert load_settings().batch_size == 300
    monkeypatch.setenv("audit_batch_sise", "400")
    with pytest.raises(ConfigurationError, match="audit_batch_sise is not a worker setting"):
        load_settings()


@pytest.mark.usefixtures("urls")
def test_config_file_variable_is_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text("batch_size: 200\n")
    monkeypatch.setenv("AUDIT_CONFIG_FILE", str(path))
    assert load_settings().batch_size == 200


@pytest.mark.usefixtures("urls")
def test_misspelt_config_file_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_CONFIG_FLIE", "worker.yaml")
    with pytest.raises(ConfigurationError, match="did you mean AUDIT_CONFIG_FILE"):
        load_settings()


@pytest.mark.usefixtures("urls")
def test_tooling_variables_outside_the_prefix_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUDITKIT_TEST_POSTGRES_URL", "postgresql://u:p@db/x")
    monkeypatch.setenv("AUDITCTL_IMAGE", "audit-worker:0.1.0")
    assert load_settings().log_id == "audit-log"


def test_unknown_file_key_gets_the_same_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text(
        f"database_url: {DB}\nredis_url: redis://r\nbatch_sise: 5\nlogid: site-a\n"
        "zzz_token: hunter2\n"
    )
    with pytest.raises(ConfigurationError) as err:
        load_settings(path)
    text = str(err.value)
    assert "batch_sise is not a worker setting; did you mean batch_size?" in text
    assert "logid is not a worker setting; did you mean log_id?" in text
    assert "zzz_token is not a worker setting" in text and "hunter2" not in text
    assert "AUDITKIT_" not in text  # the prefix note is for variables only


@pytest.mark.usefixtures("urls")
def test_unknown_file_keys_and_variables_are_reported_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text("batch_sise: 5\n")
    monkeypatch.setenv("AUDIT_LOGID", "site-a")
    with pytest.raises(ConfigurationError) as err:
        load_settings(path)
    text = str(err.value)
    assert f"file {path} and environment" in text
    assert "batch_sise is not a worker setting" in text
    assert "AUDIT_LOGID is not a worker setting" in text


def test_lower_case_environment_variable_still_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text(f"database_url: {DB}\nredis_url: redis://r:6379/0\nbatch_size: 200\n")
    monkeypatch.setenv("audit_batch_size", "300")
    assert load_settings(path).batch_size == 300


@pytest.mark.usefixtures("urls")
@pytest.mark.parametrize(
    "args", [["run"], ["public-key"], ["search-key", "patient", "p-1"]], ids=lambda a: a[0]
)
def test_commands_that_load_settings_refuse_an_unknown_variable(
    monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    monkeypatch.setenv("AUDIT_LOGID", "site-a")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "did you mean AUDIT_LOG_ID?" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)

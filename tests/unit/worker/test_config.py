"""Settings: environment over file over defaults; errors name the setting, never a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

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

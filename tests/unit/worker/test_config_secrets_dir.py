"""Secrets as files: AUDIT_SECRETS_DIR, laid out as the kubelet lays out a Secret volume.

The Helm chart mounts AUDIT_DATABASE_URL, AUDIT_REDIS_URL and AUDIT_INTAKE_TOKENS from the
Secret into one directory instead of passing them as variables (checkov CKV_K8S_35). The
kubelet writes each file into a timestamped folder and links it through ``..data``; the
worker must read through those links, and variables must still win (the local platform).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from audit_worker.config import SECRETS_DIR_VARIABLE, load_settings
from audit_worker.errors import ConfigurationError

DB = "postgresql://writer:s3cret-password@db:5432/audit"
REDIS = "rediss://:redis-secret@cache:6379/0"
TOKENS = "token-aaaaaaaaaaaaaaaa,token-bbbbbbbbbbbbbbbb"


def kubelet_secret_volume(root: Path, files: dict[str, str]) -> Path:
    """A directory as the kubelet's atomic writer makes it: the data in ``..<timestamp>``,
    ``..data`` linking to it, and each name linking through ``..data``."""
    root.mkdir()
    stamp = root / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir()
    for name, value in files.items():
        (stamp / name).write_text(value)
    os.symlink(stamp.name, root / "..data")
    for name in files:
        os.symlink(f"..data/{name}", root / name)
    return root


@pytest.fixture(autouse=True)
def no_audit_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("AUDIT_"):
            monkeypatch.delenv(name)


def test_secrets_are_read_from_the_files_of_a_secret_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Secret created from a file often ends in a newline: it must not reach the URL.
    secrets = kubelet_secret_volume(tmp_path / "secrets", {
        "AUDIT_DATABASE_URL": DB + "\n", "AUDIT_REDIS_URL": REDIS,
        "AUDIT_INTAKE_TOKENS": TOKENS + "\n"})
    monkeypatch.setenv(SECRETS_DIR_VARIABLE, str(secrets))
    settings = load_settings()
    assert settings.database_url.get_secret_value() == DB
    assert settings.redis_url.get_secret_value() == REDIS
    assert [t.get_secret_value() for t in settings.intake_tokens] == TOKENS.split(",")


def test_an_absent_intake_tokens_file_leaves_the_intake_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = kubelet_secret_volume(tmp_path / "secrets", {
        "AUDIT_DATABASE_URL": DB, "AUDIT_REDIS_URL": REDIS})
    monkeypatch.setenv(SECRETS_DIR_VARIABLE, str(secrets))
    assert load_settings().intake_tokens == []


def test_environment_variables_win_over_secret_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = kubelet_secret_volume(tmp_path / "secrets", {
        "AUDIT_DATABASE_URL": DB, "AUDIT_REDIS_URL": REDIS})
    monkeypatch.setenv(SECRETS_DIR_VARIABLE, str(secrets))
    monkeypatch.setenv("AUDIT_REDIS_URL", "redis://127.0.0.1:6379/0")
    settings = load_settings()
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert settings.database_url.get_secret_value() == DB


def test_variables_alone_still_work_without_a_secrets_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUDIT_DATABASE_URL", DB)
    monkeypatch.setenv("AUDIT_REDIS_URL", REDIS)
    assert load_settings().database_url.get_secret_value() == DB


def test_a_secret_file_is_validated_and_its_value_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = kubelet_secret_volume(tmp_path / "secrets", {
        "AUDIT_DATABASE_URL": "mysql://u:hunter2@db/audit", "AUDIT_REDIS_URL": REDIS})
    monkeypatch.setenv(SECRETS_DIR_VARIABLE, str(secrets))
    with pytest.raises(ConfigurationError) as err:
        load_settings()
    text = str(err.value)
    assert "database_url (AUDIT_DATABASE_URL)" in text and f"secret files in {secrets}" in text
    assert "hunter2" not in text


def test_a_missing_secrets_dir_is_named_not_mistaken_for_missing_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRETS_DIR_VARIABLE, str(tmp_path / "not-mounted"))
    with pytest.raises(ConfigurationError, match=r"AUDIT_SECRETS_DIR=.*not-mounted is not a dir"):
        load_settings()


def test_the_secrets_dir_variable_is_not_refused_as_an_unknown_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = kubelet_secret_volume(tmp_path / "secrets", {
        "AUDIT_DATABASE_URL": DB, "AUDIT_REDIS_URL": REDIS})
    monkeypatch.setenv(SECRETS_DIR_VARIABLE, str(secrets))
    monkeypatch.setenv("AUDIT_SECRET_DIR", str(secrets))  # misspelt: refused, with a hint
    with pytest.raises(ConfigurationError) as err:
        load_settings()
    assert "AUDIT_SECRET_DIR is not a worker setting; did you mean AUDIT_SECRETS_DIR?" in str(
        err.value)

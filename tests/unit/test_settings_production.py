"""Settings added for production operation: validated, and secrets never echoed."""

from __future__ import annotations

import pytest

from audit_worker.config import load_settings
from audit_worker.errors import ConfigurationError


@pytest.fixture(autouse=True)
def urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_DATABASE_URL", "postgresql://w@db/audit")
    monkeypatch.setenv("AUDIT_REDIS_URL", "redis://r:6379/0")


def test_intake_tokens_are_comma_separated_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_INTAKE_TOKENS", "token-aaaaaaaaaaaaaaaa, token-bbbbbbbbbbbbbbbb")
    settings = load_settings()
    assert [t.get_secret_value() for t in settings.intake_tokens] == [
        "token-aaaaaaaaaaaaaaaa", "token-bbbbbbbbbbbbbbbb",
    ]
    assert "token-aaaa" not in repr(settings)


def test_weak_tokens_are_refused_without_showing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_INTAKE_TOKENS", "hunter2")
    with pytest.raises(ConfigurationError) as err:
        load_settings()
    assert "AUDIT_INTAKE_TOKENS" in str(err.value) and "hunter2" not in str(err.value)


def test_empty_values_from_the_helm_chart_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_ARCHIVE_BUCKET", "")
    monkeypatch.setenv("AUDIT_KMS_DATA_KEY_ID", "")
    monkeypatch.setenv("AUDIT_KMS_SIGNING_KEY_ID", " ")
    monkeypatch.setenv("AUDIT_SLOT", "green")
    settings = load_settings()
    assert (settings.archive_bucket, settings.kms_data_key_id, settings.slot) == (
        None, None, "green",
    )


def test_kms_backend_still_needs_both_key_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_KEY_BACKEND", "kms")
    monkeypatch.setenv("AUDIT_KMS_DATA_KEY_ID", "")
    monkeypatch.setenv("AUDIT_KMS_SIGNING_KEY_ID", "alias/sign")
    with pytest.raises(ConfigurationError, match="AUDIT_KMS_DATA_KEY_ID"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AUDIT_SLOT", "purple"),
        ("AUDIT_RETRY_MAX_SECONDS", "0"),
        ("AUDIT_BREAKER_FAILURE_THRESHOLD", "0"),
        ("AUDIT_INTAKE_MAX_BODY_BYTES", "10"),
        ("AUDIT_SLOT_POLL_SECONDS", "0"),
        ("AUDIT_LIVENESS_STALL_SECONDS", "1"),
    ],
)
def test_out_of_range_values_are_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        load_settings()


def test_retry_ceiling_must_not_be_below_the_first_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_RETRY_INITIAL_SECONDS", "3")
    monkeypatch.setenv("AUDIT_RETRY_MAX_SECONDS", "1")
    with pytest.raises(ConfigurationError, match="retry_max_seconds"):
        load_settings()

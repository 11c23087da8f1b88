"""Worker settings, from ``AUDIT_*`` environment variables and/or a YAML file.

Precedence: environment variables over the file over defaults. The file is named by
``AUDIT_CONFIG_FILE`` or passed explicitly. Errors name the setting, the value class and
the rule, never a secret's value.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from audit_worker.errors import ConfigurationError

Slot = Literal["blue", "green"]


class WorkerSettings(BaseSettings):
    """Everything the worker reads at start-up. Field ``x`` is variable ``AUDIT_X``."""

    model_config = SettingsConfigDict(env_prefix="AUDIT_", extra="forbid", frozen=True)

    environment: str = "local"
    log_id: str = Field(default="audit-log", pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    database_url: SecretStr
    redis_url: SecretStr
    slot: Slot | None = None
    consumer_name: str = Field(default_factory=lambda: socket.gethostname())

    stream: str = "audit:events"
    consumer_group: str = "audit-workers"
    dead_letter_stream: str = "audit:dead-letters"
    control_key: str = "audit:control:active-slot"

    batch_size: int = Field(default=1000, ge=1, le=10_000)
    block_ms: int = Field(default=200, ge=1, le=60_000)
    claim_idle_ms: int = Field(default=15_000, ge=100)
    max_deliveries: int = Field(default=5, ge=1, le=100)
    sign_interval_seconds: float = Field(default=1.0, gt=0, le=3600)
    shutdown_grace_seconds: float = Field(default=20.0, gt=0, le=600)
    max_future_skew_seconds: float = Field(default=300.0, ge=0)

    key_backend: Literal["local", "kms"] = "local"
    local_key_dir: Path = Path(".local/keys")
    kms_data_key_id: str | None = None
    kms_signing_key_id: str | None = None
    aws_region: str = "us-east-1"
    aws_endpoint_url: str | None = None
    data_key_rotate_seconds: float = Field(default=3600.0, gt=0)

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port (logged)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Production operation (see README "Running the worker in production").
    archive_bucket: str | None = None  # S3 bucket checked by /healthz/external when set
    database_pool_size: int = Field(default=6, ge=2, le=64)
    database_command_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    # Blue-green: poll interval of an idle worker; whether a worker may create the control
    # key (naming its own slot, epoch 1) when it does not exist yet.
    slot_poll_seconds: float = Field(default=0.1, gt=0, le=10)
    slot_bootstrap: bool = False
    # Retry with exponential backoff and full jitter; circuit breakers per dependency.
    retry_initial_seconds: float = Field(default=0.1, gt=0, le=60)
    retry_max_seconds: float = Field(default=2.0, gt=0, le=300)
    breaker_failure_threshold: int = Field(default=3, ge=1, le=100)
    breaker_reset_seconds: float = Field(default=2.0, gt=0, le=300)
    # Gauges refreshed in the background (stream lag and pending, newest tree head).
    stats_interval_seconds: float = Field(default=5.0, gt=0, le=300)
    # Housekeeping: monthly partitions kept ahead, and stream entries trimmed once they are
    # acknowledged and older than the retention (raw events hold identifiers: GDPR storage
    # limitation). 0 keeps the stream untrimmed.
    maintenance_interval_seconds: float = Field(default=3600.0, gt=0, le=86_400)
    stream_retention_seconds: float = Field(default=3600.0, ge=0)
    # Liveness fails when the main loop has not moved for this long (a wedged process).
    liveness_stall_seconds: float = Field(default=120.0, ge=5, le=3600)
    # HTTP intake (POST /v1/events): bearer tokens, comma-separated; none = intake off.
    intake_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    intake_max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    intake_max_events: int = Field(default=1000, ge=1, le=10_000)

    @field_validator("database_url")
    @classmethod
    def _postgres_scheme(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// (the value is not shown: it is secret)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis:// or rediss:// (the value is not shown)")
        return value

    @field_validator("intake_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("intake_tokens")
    @classmethod
    def _strong_tokens(cls, value: list[SecretStr]) -> list[SecretStr]:
        for token in value:
            secret = token.get_secret_value()
            if len(secret) < 16 or any(c.isspace() for c in secret):
                raise ValueError(
                    "each token needs at least 16 characters and no whitespace "
                    "(the value is not shown: it is secret)"
                )
        return value

    @field_validator("archive_bucket", "kms_data_key_id", "kms_signing_key_id", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # The Helm chart always sets these variables, empty when not used.
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _retry_bounds(self) -> WorkerSettings:
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError("retry_max_seconds must be >= retry_initial_seconds")
        return self

    @model_validator(mode="after")
    def _kms_needs_key_ids(self) -> WorkerSettings:
        if self.key_backend == "kms":
            missing = [
                f"AUDIT_{name.upper()}"
                for name in ("kms_data_key_id", "kms_signing_key_id")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(f"key_backend 'kms' needs {', '.join(missing)}")
        return self


def _describe(errors: list[Any], source: str) -> str:
    lines = [f"invalid worker settings ({source}):"]
    for err in errors:
        field = ".".join(str(part) for part in err["loc"]) or "(settings)"
        variable = f"AUDIT_{field.upper()}" if err["loc"] else ""
        where = f"{field} ({variable})" if variable else field
        lines.append(f"  - {where}: {err['msg']}")
    return "\n".join(lines)


def load_settings(
    config_file: Path | None = None, **overrides: Any
) -> WorkerSettings:
    """Read settings; raise `ConfigurationError` naming every bad setting."""
    path = config_file or (Path(p) if (p := os.environ.get("AUDIT_CONFIG_FILE")) else None)
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read settings file {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"settings file {path}: top level must be a mapping")
        env_names = {k[len("AUDIT_"):].lower() for k in os.environ if k.startswith("AUDIT_")}
        file_values = {k: v for k, v in loaded.items() if k not in env_names}
    try:
        return WorkerSettings(**{**file_values, **overrides})
    except ValidationError as exc:
        source = f"file {path} and environment" if path else "environment"
        raise ConfigurationError(_describe(exc.errors(), source)) from None

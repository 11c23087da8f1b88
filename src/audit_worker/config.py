"""Worker settings, from ``AUDIT_*`` environment variables and/or a YAML file.

Precedence: environment variables over the file over defaults. The file is named by
``AUDIT_CONFIG_FILE`` or passed explicitly. Errors name the setting, the value class and
the rule, never a secret's value.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    http_port: int = Field(default=8080, ge=0, le=65535)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

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

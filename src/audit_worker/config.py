"""Worker settings, from ``AUDIT_*`` environment variables and/or a YAML file.

Precedence: environment variables over the file over defaults. The file is named by
``AUDIT_CONFIG_FILE`` or passed explicitly. Errors name the setting, the value class and
the rule, never a secret's value.

The ``AUDIT_`` prefix means exactly "a worker setting": any other ``AUDIT_*`` variable
(in any letter case, as pydantic-settings matches them) is refused like an unknown key in
the file, with the closest setting as a suggestion. A misspelt variable would otherwise be
ignored and its default applied: a wrong ``AUDIT_LOG_ID`` makes two workers disagree.
The kit's own test and tooling variables use ``AUDITKIT_``.

Secrets may also be files: ``AUDIT_SECRETS_DIR`` names a directory holding one file per
setting, named as its variable (``AUDIT_DATABASE_URL``, ``AUDIT_REDIS_URL``,
``AUDIT_INTAKE_TOKENS``; surrounding whitespace is dropped), as the Helm chart mounts them
from the Secret. A file fills only a setting that no variable, no settings file and no
override sets, so the local platform's variables keep working.
"""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from audit_worker.db.credentials import DatabaseAuth, iam_provider_for_url
from audit_worker.errors import ConfigurationError
from audit_worker.tls import DEFAULT_DATABASE_CA_FILE

Slot = Literal["blue", "green"]

PREFIX = "AUDIT_"
CONFIG_FILE_VARIABLE = "AUDIT_CONFIG_FILE"  # read by load_settings, not a field
SECRETS_DIR_VARIABLE = "AUDIT_SECRETS_DIR"  # read by load_settings, not a field
LOADER_VARIABLES = frozenset({CONFIG_FILE_VARIABLE, SECRETS_DIR_VARIABLE})
"""``AUDIT_*`` variables that name where settings come from rather than a setting."""


class WorkerSettings(BaseSettings):
    """Everything the worker reads at start-up. Field ``x`` is variable ``AUDIT_X``."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="forbid", frozen=True)

    environment: str = "local"
    log_id: str = Field(default="audit-log", pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    database_url: SecretStr
    # password: the URL's own. iam (the AWS stacks): the URL names the login only and each
    # new connection signs an RDS IAM token (audit_worker.db.credentials).
    database_auth: DatabaseAuth = "password"
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
    # Tries the worker gives an entry that fails in it for no known reason before that entry
    # is dead-lettered (rule delivery_limit_exceeded). Redeliveries after crashes or
    # outages never count.
    max_deliveries: int = Field(default=5, ge=1, le=100)
    # While a configuration or permission error (e.g. SQLSTATE 42501) halts the writer, the
    # batch in hand is tried again this often, each failure logged at critical.
    configuration_recheck_seconds: float = Field(default=30.0, gt=0, le=3600)
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
    # Public keys, each with a validity window, that signed this log's heads before a
    # signing-key rotation (format: audit_worker.crypto.trusted_keys). A worker resumes
    # only from a head signed by its own key or by one of these within its window.
    trusted_keys_file: Path | None = None

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port (logged)
    # POST /v1/events has a listener of its own, with its own connection limit, so that
    # producers can never take the connections the kubelet's probes need on http_port.
    intake_port: int = Field(default=8081, ge=0, le=65535)  # 0: any free port (logged)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Production operation (see README "Running the worker in production").
    archive_bucket: str | None = None  # S3 bucket checked by /healthz/external when set
    # Evidence outside the database: signed heads are witnessed and closed months archived
    # here (s3://bucket/prefix, or a directory for dev and tests). Unset with archive_bucket
    # set: s3://<archive_bucket>/. Unset with neither: no witness (the worker warns).
    archive_url: str | None = None
    # A head is witnessed at least this often while the log grows.
    witness_interval_seconds: float = Field(default=10.0, gt=0, le=3600)
    # A monthly partition is exported to the archive this long after its month ended
    # (rows sequenced just before midnight commit a little later; clocks differ).
    archive_grace_seconds: float = Field(default=86_400.0, ge=0, le=31 * 86_400)
    # Whether a month exported and verified in the archive then leaves the hot database
    # (partition detached and dropped), so hot storage stays bounded.
    archive_detach_verified_months: bool = False
    database_pool_size: int = Field(default=6, ge=2, le=64)
    database_command_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    # Longest wait for a pooled connection: a full pool fails (and is retried) rather
    # than leaving a batch, a request or a loop waiting forever.
    database_acquire_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # Server-side bounds of every worker session (statement_timeout and
    # idle_in_transaction_session_timeout), set by the pool: a session whose client hangs
    # or vanishes mid-transaction cannot hold the sequencer's lock or a snapshot for long.
    # The statement bound is a backstop behind the command timeout, so never below it.
    database_statement_timeout_seconds: float = Field(default=120.0, ge=1, le=3600)
    database_idle_in_transaction_timeout_seconds: float = Field(default=30.0, ge=1, le=3600)
    # TLS roots (audit_worker.tls). The database's CA is read when database_url asks for
    # sslmode=verify-full or verify-ca; the default is the RDS global bundle the image
    # ships. Redis' CA (rediss://) is added to the system trust store; unset, that store
    # alone (ElastiCache's certificates chain to a public CA).
    database_ca_file: Path = DEFAULT_DATABASE_CA_FILE
    redis_ca_file: Path | None = None
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
    # Intake listener limits (slow or idle clients are cut off, never queued without bound):
    # open connections (beyond: 503 and closed), seconds to send a complete request head
    # (else closed; after a response, keep-alive idle time plus this), seconds for the whole
    # body (else 408 and closed), seconds a kept-alive connection may sit idle.
    intake_max_connections: int = Field(default=256, ge=1, le=10_000)
    intake_header_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    intake_body_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    intake_keep_alive_seconds: int = Field(default=5, ge=1, le=300)

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

    @field_validator(
        "archive_bucket", "archive_url", "kms_data_key_id", "kms_signing_key_id", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # The Helm chart always sets these variables, empty when not used.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("archive_url")
    @classmethod
    def _archive_url(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith(("s3://", "file://")):
            raise ValueError("must be s3://bucket/prefix, file:///path or a directory path")
        if value is not None and value.startswith("s3://") and len(value) <= len("s3://"):
            raise ValueError("an s3:// URL needs a bucket name (s3://bucket/prefix)")
        return value

    @property
    def evidence_url(self) -> str | None:
        """Where heads are witnessed and months archived, or None when nowhere."""
        if self.archive_url is not None:
            return self.archive_url
        return f"s3://{self.archive_bucket}/" if self.archive_bucket else None

    @field_validator("trusted_keys_file", "redis_ca_file", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: Any) -> Any:
        # The Helm chart always sets the variable, empty when not used.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("trusted_keys_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(
                f"{value} is not a file: mount the trusted-keys file there, or unset the "
                "setting when the signing key was never rotated"
            )
        return value

    @model_validator(mode="after")
    def _distinct_ports(self) -> WorkerSettings:
        if self.intake_port and self.intake_port == self.http_port:
            raise ValueError(
                f"intake_port and http_port are both {self.http_port}: the intake needs a "
                f"port of its own (set {PREFIX}INTAKE_PORT, or 0 for any free one)"
            )
        return self

    @model_validator(mode="after")
    def _statement_timeout_outlasts_the_command_timeout(self) -> WorkerSettings:
        statement = self.database_statement_timeout_seconds
        command = self.database_command_timeout_seconds
        if statement < command:
            raise ValueError(
                f"database_statement_timeout_seconds ({statement:g}) is below "
                f"database_command_timeout_seconds ({command:g}): the server would cancel "
                "statements the worker still waits for; raise "
                f"{PREFIX}DATABASE_STATEMENT_TIMEOUT_SECONDS or lower "
                f"{PREFIX}DATABASE_COMMAND_TIMEOUT_SECONDS"
            )
        return self

    @model_validator(mode="after")
    def _retry_bounds(self) -> WorkerSettings:
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError("retry_max_seconds must be >= retry_initial_seconds")
        return self

    @model_validator(mode="after")
    def _iam_url(self) -> WorkerSettings:
        if self.database_auth == "iam":
            try:
                iam_provider_for_url(self.database_url.get_secret_value(),
                                     region=self.aws_region)
            except ConfigurationError as exc:
                raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _kms_needs_key_ids(self) -> WorkerSettings:
        if self.key_backend == "kms":
            missing = [
                f"{PREFIX}{name.upper()}"
                for name in ("kms_data_key_id", "kms_signing_key_id")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(f"key_backend 'kms' needs {', '.join(missing)}")
        return self


# Said once under the list: a stray variable is often a tool's, not a misspelt setting.
PREFIX_NOTE = (
    f"{PREFIX}* names only worker settings; other variables need another prefix "
    "(the kit's tooling uses AUDITKIT_*)."
)


def _describe(
    errors: list[Any], source: str, unknown: list[str], unknown_variables: bool = False
) -> str:
    lines = [f"invalid worker settings ({source}):"]
    lines += [f"  - {line}" for line in unknown]
    for err in errors:
        field = ".".join(str(part) for part in err["loc"]) or "(settings)"
        variable = f"{PREFIX}{field.upper()}" if err["loc"] else ""
        where = f"{field} ({variable})" if variable else field
        lines.append(f"  - {where}: {err['msg']}")
    if unknown_variables:
        lines.append(PREFIX_NOTE)
    return "\n".join(lines)


def _not_a_setting(
    shown: str, key: str, candidates: Collection[str], spell: Callable[[str], str]
) -> str:
    """One line for a name that is no setting; only the name, never its value (a secret)."""
    match = difflib.get_close_matches(key, sorted(candidates), n=1)
    hint = f"; did you mean {spell(match[0])}?" if match else " (nor close to one)"
    return f"{shown} is not a worker setting{hint}"


def _audit_variables() -> list[str]:
    """``AUDIT_*`` names in the environment, in any case: pydantic-settings reads them so."""
    return sorted(name for name in os.environ if name.upper().startswith(PREFIX))


def _setting_of(variable: str) -> str:
    return variable[len(PREFIX):].lower()


def _unknown_variables(variables: Collection[str]) -> list[str]:
    """A line per ``AUDIT_*`` variable that is not a setting."""
    fields = set(WorkerSettings.model_fields)
    # Suggest the loader variables too, but accept only their exact spelling: they are
    # read so.
    candidates = fields | {_setting_of(name) for name in LOADER_VARIABLES}
    return [
        _not_a_setting(name, _setting_of(name), candidates, lambda f: f"{PREFIX}{f.upper()}")
        for name in sorted(variables)
        if name not in LOADER_VARIABLES and _setting_of(name) not in fields
    ]


def _secrets_dir() -> Path | None:
    """The directory named by AUDIT_SECRETS_DIR; an error if it is set but not one (a
    missing mount must not look like a missing setting)."""
    value = os.environ.get(SECRETS_DIR_VARIABLE)
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise ConfigurationError(
            f"{SECRETS_DIR_VARIABLE}={value} is not a directory: mount the secrets there "
            "(one file per setting, named as its variable) or unset it"
        )
    return path


def _unknown_keys(keys: Collection[Any]) -> list[str]:
    """A line per file key that is not a setting (keys match fields in any case, as in
    pydantic-settings)."""
    fields = set(WorkerSettings.model_fields)
    return [
        _not_a_setting(str(key), str(key).lower(), fields, str)
        for key in keys
        if str(key).lower() not in fields
    ]


def load_settings(
    config_file: Path | None = None, **overrides: Any
) -> WorkerSettings:
    """Read settings; raise `ConfigurationError` naming every bad setting, and every
    ``AUDIT_*`` variable or file key that is not one."""
    path = config_file or (Path(p) if (p := os.environ.get(CONFIG_FILE_VARIABLE)) else None)
    variables = _audit_variables()
    bad_variables = _unknown_variables(variables)
    bad_keys: list[str] = []
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read settings file {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"settings file {path}: top level must be a mapping")
        bad_keys = _unknown_keys(list(loaded))
        env_names = {_setting_of(name) for name in variables}
        # Unknown keys are reported above, not passed on (pydantic would say less).
        file_values = {
            str(k): v for k, v in loaded.items()
            if str(k).lower() in WorkerSettings.model_fields and str(k).lower() not in env_names
        }
    secrets_dir = _secrets_dir()
    source = f"file {path} and environment" if path else "environment"
    if secrets_dir is not None:
        source += f" and secret files in {secrets_dir}"
    unknown = bad_keys + bad_variables
    # Lowest precedence: pydantic-settings reads a file only for a field nothing else set.
    values: dict[str, Any] = {**file_values, **overrides}
    try:
        # _secrets_dir is a BaseSettings init option, not a field: mypy sees only fields.
        settings = WorkerSettings(**values, _secrets_dir=secrets_dir)  # type: ignore[call-arg]
    except ValidationError as exc:
        message = _describe(exc.errors(), source, unknown, bool(bad_variables))
        raise ConfigurationError(message) from None
    if unknown:
        raise ConfigurationError(_describe([], source, unknown, bool(bad_variables)))
    return settings

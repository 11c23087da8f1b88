"""Which environment a command is about, read from ``environments/<name>.yaml``.

The settings are validated by the same schema the Pulumi program uses
(`infra.settings.load_environment`), so a setting lives in one place. auditctl reads only
what the workflows need: the promotion mode (``worker.auto_promote``: prod and DR need a
person), the scale-down delay, the log id, the DR strategy, and, for ``local``, where the
local environment lives.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from auditctl.errors import SettingsProblem

PlatformName = Literal["local", "aws-kubernetes"]


@dataclass(frozen=True)
class Profile:
    name: str
    platform: PlatformName
    auto_promote: bool
    scale_down_delay_seconds: float
    log_id: str
    region: str
    dr_strategy: str | None
    root: Path
    local_ports: tuple[int, int, int] | None = None  # postgres, replica, redis
    local_dir: Path | None = None

    @property
    def promotion_mode(self) -> str:
        return "automatic" if self.auto_promote else "manual (a person confirms the switch)"


def project_root(start: Path | None = None) -> Path:
    """The checkout: ``$AUDITCTL_PROJECT_DIR``, else the nearest directory up from the
    working directory holding ``environments/`` and ``Pulumi.yaml``, else the checkout
    this package was installed from (an editable install)."""
    env = os.environ.get("AUDITCTL_PROJECT_DIR")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "environments").is_dir() and (candidate / "Pulumi.yaml").is_file():
            return candidate
    installed = Path(__file__).resolve().parents[2]
    if (installed / "environments").is_dir():
        return installed
    raise SettingsProblem(
        "cannot find the audit-kit checkout (a directory with environments/ and Pulumi.yaml): "
        "run auditctl inside it or set AUDITCTL_PROJECT_DIR"
    )


def load_profile(name: str, root: Path | None = None) -> Profile:
    """Read and validate ``environments/<name>.yaml``; raise `SettingsProblem`."""
    root = root or project_root()
    if str(root) not in sys.path:
        sys.path.append(str(root))  # `infra` lives at the root of the checkout
    from infra.settings import ENVIRONMENT_NAMES, SettingsError, load_environment

    if name not in ENVIRONMENT_NAMES:
        raise SettingsProblem(
            f"unknown environment {name!r}: one of {', '.join(ENVIRONMENT_NAMES)}"
        )
    try:
        settings = load_environment(root / "environments" / f"{name}.yaml")
    except SettingsError as exc:
        raise SettingsProblem(str(exc)) from None
    local = settings.local
    return Profile(
        name=settings.name,
        platform="local" if local is not None else "aws-kubernetes",
        auto_promote=settings.worker.auto_promote,
        scale_down_delay_seconds=float(settings.worker.scale_down_delay_seconds),
        log_id=settings.worker.log_id,
        region=settings.region,
        dr_strategy=settings.dr.strategy if settings.dr else None,
        root=root,
        local_ports=(local.postgres_port, local.replica_port, local.redis_port) if local else None,
        local_dir=(root / local.data_dir) if local else None,
    )

"""Platforms the workflows run on: ``local`` (this machine) and ``aws-kubernetes``."""

from __future__ import annotations

from pathlib import Path

from auditctl.environments import Profile
from auditctl.errors import EnvironmentNotRunning


def local_state_dir(profile: Profile, override: Path | None = None) -> Path:
    """Where the local environment keeps its state (``.local/platform`` by default)."""
    if override is not None:
        return override
    if profile.local_dir is None:
        raise EnvironmentNotRunning(f"{profile.name} is not the local environment")
    return profile.local_dir

"""auditctl's exceptions. Each message says what happened and what to do next.

    AuditctlError                 anything auditctl reports before exiting non-zero
    ├── SettingsProblem           the environment's settings cannot be read or are invalid
    ├── EnvironmentNotRunning     the local environment is not started (``auditctl local up``)
    ├── PlatformError             a platform call failed (a process, a cloud API, the cluster)
    ├── InvalidTransition         the promotion state machine refused an event
    └── Refused                   the workflow will not start: a promotion is already in
                                  flight, there is nothing to roll back, the window is over
"""

from __future__ import annotations


class AuditctlError(Exception):
    """Base class: auditctl prints the message and exits 1."""


class SettingsProblem(AuditctlError):
    pass


class EnvironmentNotRunning(AuditctlError):
    pass


class PlatformError(AuditctlError):
    pass


class InvalidTransition(AuditctlError):
    def __init__(self, phase: str, event: str) -> None:
        super().__init__(f"a promotion in phase {phase!r} cannot take event {event!r}")
        self.phase = phase
        self.event = event


class Refused(AuditctlError):
    pass

"""How workflows report progress: the CLI prints it with rich, tests record it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Progress(Protocol):
    def step(self, name: str, detail: str = "") -> None:
        """A step starts."""
        ...

    def done(self, name: str, ok: bool, detail: str = "", seconds: float | None = None) -> None:
        """A step ended."""
        ...

    def note(self, message: str) -> None:
        ...


class Silent:
    def step(self, name: str, detail: str = "") -> None:
        pass

    def done(self, name: str, ok: bool, detail: str = "", seconds: float | None = None) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@dataclass
class Recorder:
    """Keeps every call, for tests and for ``--output json``."""

    events: list[tuple[str, str, bool | None, str]] = field(default_factory=list)

    def step(self, name: str, detail: str = "") -> None:
        self.events.append(("step", name, None, detail))

    def done(self, name: str, ok: bool, detail: str = "", seconds: float | None = None) -> None:
        self.events.append(("done", name, ok, detail))

    def note(self, message: str) -> None:
        self.events.append(("note", "", None, message))

    def finished(self) -> list[str]:
        return [name for kind, name, _, _ in self.events if kind == "done"]

"""Diagnostics: every problem found in a spec tree, with file, line and column.

Loading and validation collect diagnostics instead of stopping at the first
problem (as Terraform does), so a user fixes a whole revision in one go.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Diagnostic", "Position", "Severity"]


class Severity(enum.StrEnum):
    ERROR = "error"  # the revision cannot be applied
    WARNING = "warning"  # applied, but probably not what was meant


@dataclass(frozen=True, slots=True)
class Position:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    severity: Severity
    message: str
    position: Position | None = None
    kind: str | None = None
    name: str | None = None
    hint: str | None = None

    @property
    def resource(self) -> str | None:
        if self.kind and self.name:
            return f"{self.kind}/{self.name}"
        return self.kind or None

    def __str__(self) -> str:
        parts = [str(self.position) if self.position else "<spec>"]
        if self.resource:
            parts.append(self.resource)
        text = ": ".join(parts) + f": {self.severity}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    def to_json(self) -> dict[str, object]:
        position = self.position
        return {
            "file": position.file if position else None,
            "line": position.line if position else None,
            "column": position.column if position else None,
            "kind": self.kind,
            "name": self.name,
            "severity": str(self.severity),
            "message": self.message,
            "hint": self.hint,
        }

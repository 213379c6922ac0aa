"""Diagnostics: every problem found in a spec tree, with file, line and column.

Loading and validation collect diagnostics instead of stopping at the first
problem (as Terraform does), so a user fixes a whole revision in one go.
Each diagnostic prints as one line: control characters in a file name, a
message or a hint (a newline in a file's name, a value quoted in a message)
are shown escaped. A file shows at most `MAX_DIAGNOSTICS_PER_FILE` problems,
then one line that says how many more it has (`cap_per_file`).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["MAX_DIAGNOSTICS_PER_FILE", "Diagnostic", "Position", "Severity", "cap_per_file", "one_line"]

MAX_DIAGNOSTICS_PER_FILE = 50


def one_line(text: str) -> str:
    """`text` with every character that is not printable escaped (`\\n`, `\\x1b`), so it stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class Severity(enum.StrEnum):
    ERROR = "error"  # the revision cannot be applied
    WARNING = "warning"  # applied, but probably not what was meant


@dataclass(frozen=True, slots=True)
class Position:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{one_line(self.file)}:{self.line}:{self.column}"


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
            parts.append(one_line(self.resource))
        text = ": ".join(parts) + f": {self.severity}: {one_line(self.message)}"
        return f"{text} ({one_line(self.hint)})" if self.hint else text

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


def cap_per_file(
    diagnostics: Iterable[Diagnostic], limit: int = MAX_DIAGNOSTICS_PER_FILE, *, notes: Mapping[str, str] | None = None
) -> tuple[Diagnostic, ...]:
    """At most `limit` diagnostics per file, in their order, then one that says how many more there are
    (an error when any of those is), with the file's entry of `notes` added. Diagnostics without a
    position are all kept."""
    kept: list[Diagnostic] = []
    shown: Counter[str] = Counter()
    dropped: dict[str, list[Diagnostic]] = {}
    for diagnostic in diagnostics:
        file = diagnostic.position.file if diagnostic.position else None
        if file is None:
            kept.append(diagnostic)
        elif shown[file] < limit:
            shown[file] += 1
            kept.append(diagnostic)
        else:
            dropped.setdefault(file, []).append(diagnostic)
    last = {d.position.file: d.position for d in kept if d.position}
    for file in dict.fromkeys([*dropped, *(notes or {})]):
        rest = dropped.get(file, [])
        severity = Severity.WARNING if rest and all(d.severity is Severity.WARNING for d in rest) else Severity.ERROR
        parts = [f"{len(rest)} more problem{'s' if len(rest) > 1 else ''} in this file"] if rest else []
        if notes and file in notes:
            parts.append(notes[file])
        position = rest[0].position if rest else last.get(file)
        kept.append(Diagnostic(severity, "... and " + "; ".join(parts), position, hint="fix the ones above first"))
    return tuple(kept)

"""Broken spec trees produce exactly the diagnostics their expected.txt lists: right file, line and column.

Each folder under tests/specs/broken/ is one case: a small spec tree with one kind of mistake,
and an `expected.txt` with one line per diagnostic,

    file:line:col: severity: message substring

where `file` is relative to the case folder and the substring is matched against the message
followed by its hint in parentheses (as `reconciler validate` prints them). Lines starting
with '#' are comments. Every diagnostic must be listed, and nothing may raise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.spec.diagnostics import Diagnostic, Severity
from reconciler.spec.validate import load_and_validate

BROKEN = Path(__file__).resolve().parent / "specs" / "broken"
CASES = sorted(path for path in BROKEN.iterdir() if path.is_dir())
# Cases the validator does not catch yet: strict xfail, so a fix asks for the entry to be removed.
KNOWN_GAPS: dict[str, str] = {}
LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<column>\d+): (?P<severity>error|warning): (?P<text>.+)$")


@dataclass(frozen=True)
class Expected:
    file: str
    line: int
    column: int
    severity: Severity
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.severity}: {self.text}"


def _expected(case: Path) -> list[Expected]:
    found = []
    for number, raw in enumerate((case / "expected.txt").read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() or raw.startswith("#"):
            continue
        match = LINE.match(raw)
        assert match, f"{case.name}/expected.txt:{number}: not 'file:line:col: severity: text': {raw!r}"
        found.append(
            Expected(
                match["file"], int(match["line"]), int(match["column"]), Severity(match["severity"]), match["text"]
            )
        )
    return found


def _key(diagnostic: Diagnostic, case: Path) -> tuple[str, int, int, Severity, str]:
    position = diagnostic.position
    assert position is not None, f"no position: {diagnostic}"
    file = Path(position.file).relative_to(case).as_posix()
    text = diagnostic.message + (f" ({diagnostic.hint})" if diagnostic.hint else "")
    return file, position.line, position.column, diagnostic.severity, text


def _matches(expected: Expected, actual: tuple[str, int, int, Severity, str]) -> bool:
    file, line, column, severity, text = actual
    return (file, line, column, severity) == (expected.file, expected.line, expected.column, expected.severity) and (
        expected.text in text
    )


def test_cases_are_found() -> None:
    names = {case.name for case in CASES}
    assert {
        "syntax-error", "unknown-field", "duplicate-name", "duplicate-key", "dangling-gpu", "dangling-role",
        "dangling-host", "dangling-group", "duplicate-vmid", "port-clash", "gpu-vm-and-lxc", "vram-overcommit",
        "group-active-missing", "root-pam-token", "non-utf8", "size-without-unit",
    } <= names  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[case.name]))
        if case.name in KNOWN_GAPS
        else case
        for case in CASES
    ],
    ids=lambda p: p.name,
)
def test_broken_tree_reports_exactly_the_expected_diagnostics(case: Path) -> None:
    expected = _expected(case)
    assert expected, f"{case.name}: expected.txt lists no diagnostic"
    result = load_and_validate(case)
    actual = [_key(d, case) for d in result.diagnostics]
    unmatched = list(actual)
    missing = []
    for want in expected:
        hit = next((got for got in unmatched if _matches(want, got)), None)
        if hit is None:
            missing.append(str(want))
        else:
            unmatched.remove(hit)
    shown = "\n".join(str(d) for d in result.diagnostics)
    assert not missing, f"{case.name}: expected but not reported:\n" + "\n".join(missing) + f"\n--- reported:\n{shown}"
    assert not unmatched, f"{case.name}: reported but not expected:\n" + "\n".join(map(str, unmatched))
    assert not result.ok


def test_non_utf8_case_really_holds_a_latin1_byte() -> None:
    data = (BROKEN / "non-utf8" / "guests.yaml").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")


def test_empty_tree_reports_that_it_is_empty(tmp_path: Path) -> None:
    result = load_and_validate(tmp_path)
    assert [(d.severity, d.position) for d in result.diagnostics] == [(Severity.ERROR, None)]
    assert result.diagnostics[0].message == f"no spec documents found in {tmp_path}"
    assert result.state.resources == ()


def test_tree_of_empty_and_comment_only_files_is_empty(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# nothing yet\n---\n# still nothing\n")
    (tmp_path / "notes.txt").write_text("kind: Lab\n")
    result = load_and_validate(tmp_path)
    assert [d.message for d in result.diagnostics] == [f"no spec documents found in {tmp_path}"]


def test_missing_tree_is_a_diagnostic(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = load_and_validate(missing)
    assert (f"{missing}:1:1", "no such file or folder") == (
        str(result.diagnostics[0].position),
        result.diagnostics[0].message,
    )
    assert all(d.message.startswith("no spec documents found") for d in result.diagnostics[1:])

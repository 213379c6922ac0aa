"""The project's size rules, measured on its own source with `ast`: no function in reconciler/ over 60 lines
(its docstring aside: `pve.classify` documents its table there), no class over 300 lines.

`python tests/test_sizes.py` prints the five longest functions and classes.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "reconciler"
MAX_FUNCTION = 60
MAX_CLASS = 300


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return (first.end_lineno or first.lineno) - first.lineno + 1
    return 0


def sizes() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(lines, where) of every function (docstring aside) and every class under reconciler/, longest first."""
    functions: list[tuple[int, str]] = []
    classes: list[tuple[int, str]] = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            where = f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}"
            if isinstance(node, ast.ClassDef):
                classes.append((lines, where))
            else:
                functions.append((lines - _docstring_lines(node), where))
    return sorted(functions, reverse=True), sorted(classes, reverse=True)


def test_no_function_over_60_lines_and_no_class_over_300() -> None:
    functions, classes = sizes()
    assert functions and classes  # the walk found the source
    assert [f for f in functions if f[0] > MAX_FUNCTION] == []
    assert [c for c in classes if c[0] > MAX_CLASS] == []


if __name__ == "__main__":
    functions, classes = sizes()
    for title, found in (("functions (docstring aside)", functions), ("classes", classes)):
        print(title)
        for lines, where in found[:5]:
            print(f"  {lines:4d}  {where}")

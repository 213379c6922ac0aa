"""The `reconciler` command: parse, call, print. No logic of its own lives here.

Exit codes follow `terraform plan -detailed-exitcode`: 0 nothing to do (or
valid), 1 error, 2 a plan with changes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from reconciler.cli.render import print_diagnostics, print_plan
from reconciler.errors import ReconcilerError
from reconciler.spec.diagnostics import Severity
from reconciler.spec.loader import LoadResult
from reconciler.spec.schema import write_schemas
from reconciler.spec.validate import load_and_validate

__all__ = ["app", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CHANGES = 2

app = typer.Typer(
    name="reconciler",
    help="GitOps for GPU homelabs: Proxmox guests, Docker containers and model servers from a spec in git.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

SpecPath = Annotated[Path, typer.Argument(help="spec tree (a folder of YAML files) or one file")]
JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]


def _load(path: Path, *, as_json: bool) -> LoadResult:
    result = load_and_validate(path)
    if as_json:
        return result
    if result.diagnostics:
        print_diagnostics(err if result.ok else console, result.diagnostics)
    return result


@app.command()
def validate(path: SpecPath = Path("specs"), as_json: JsonFlag = False) -> None:
    """Check a spec tree: syntax, fields, references, conflicts. Exit 0 when valid, 1 when not."""
    result = load_and_validate(path)
    if as_json:
        console.print_json(json.dumps([d.to_json() for d in result.diagnostics]))
    else:
        print_diagnostics(console, result.diagnostics)
        errors = sum(d.severity is Severity.ERROR for d in result.diagnostics)
        warnings = len(result.diagnostics) - errors
        count = len(result.state.resources)
        if result.ok:
            console.print(f"[green]valid[/]: {count} resources in {path}" + (f", {warnings} warning(s)" if warnings else ""))
        else:
            console.print(f"[red]invalid[/]: {errors} error(s), {warnings} warning(s) in {path}")
    raise typer.Exit(EXIT_OK if result.ok else EXIT_ERROR)


@app.command()
def schema(out: Annotated[Path, typer.Option(help="folder to write the JSON Schema files into")] = Path("schemas")) -> None:
    """Write the JSON Schema of every kind (generated from the models)."""
    for written in write_schemas(out):
        console.print(str(written))


@app.command()
def plan(
    path: SpecPath = Path("specs"),
    as_json: JsonFlag = False,
    out: Annotated[Path | None, typer.Option("--out", help="save the plan for `apply --plan`")] = None,
) -> None:
    """Show what would change on the live lab (a dry run). Exit 0: no changes, 2: changes, 1: error."""
    from reconciler.engine.connect import connect
    from reconciler.engine.observe import observe
    from reconciler.planning.planner import make_plan

    result = _load(path, as_json=as_json)
    if not result.ok:
        if as_json:
            console.print_json(json.dumps({"diagnostics": [d.to_json() for d in result.diagnostics]}))
        raise typer.Exit(EXIT_ERROR)
    try:
        with connect(result.state, os.environ) as readers:
            planned = make_plan(result.state, observe(result.state, readers))
    except ReconcilerError as exc:
        err.print(f"[red]error[/]: {exc}")
        raise typer.Exit(EXIT_ERROR) from None
    if out is not None:
        out.write_text(planned.dumps(), encoding="utf-8")
    if as_json:
        sys.stdout.write(planned.dumps())
    else:
        print_plan(console, planned)
        if out is not None:
            console.print(f"Saved the plan to {out}; `reconciler apply --plan {out}` executes exactly this plan.")
    if not planned.applicable:
        raise typer.Exit(EXIT_ERROR)
    raise typer.Exit(EXIT_OK if planned.empty else EXIT_CHANGES)


def main() -> None:
    app()

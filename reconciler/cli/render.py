"""Turn Plans and Diagnostics into text for people. Everything printed about a plan comes from the Plan.

Plans look like `terraform plan`: `+` create, `~` update, `-/+` replace,
`-` delete, `>` start, `.` stop; restarts and replacements carry their
reason; each volume a replace or delete destroys gets a `! destroys` line;
sensitive values are masked (the Plan holds no secret value, and a
sensitive field is shown through `FieldChange.shown`). What an apply reports
(a step's detail, a health check's words, the failure) is scrubbed of every
secret the process holds before it is printed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape

from reconciler import redact
from reconciler.engine.apply import ApplyReport, StepReport
from reconciler.engine.journal import RunRecord, RunResult
from reconciler.planning.plan import SENSITIVE, Action, Backend, Change, JsonValue, Plan, Timing
from reconciler.spec.diagnostics import Diagnostic, Severity, one_line

__all__ = ["print_diagnostics", "print_history", "print_plan", "print_report", "print_status", "print_step"]

_MARK: dict[Action, tuple[str, str]] = {
    Action.CREATE: ("+", "green"),
    Action.UPDATE: ("~", "yellow"),
    Action.UPDATE_RESTART: ("~", "yellow"),
    Action.REPLACE: ("-/+", "magenta"),
    Action.DELETE: ("-", "red"),
    Action.START: (">", "cyan"),
    Action.STOP: (".", "cyan"),
}


def print_diagnostics(console: Console, diagnostics: Iterable[Diagnostic]) -> None:
    for d in diagnostics:
        colour = "red" if d.severity is Severity.ERROR else "yellow"
        where = str(d.position) if d.position else "<spec>"  # a file name's control characters come escaped
        resource = f" {one_line(d.resource)}:" if d.resource else ""
        line = f"[bold]{escape(where)}[/]:{escape(resource)} [{colour}]{d.severity}[/]: {escape(one_line(d.message))}"
        if d.hint:
            line += f"\n    [dim]{escape(one_line(d.hint))}[/]"
        console.print(line, highlight=False)


def print_plan(console: Console, plan: Plan) -> None:
    for change in plan.changes:
        _print_change(console, change)
    for title, problems, colour in (
        ("Conflict", plan.conflicts, "red"),
        ("Blocked", plan.blockers, "red"),
        ("Warning", plan.warnings, "yellow"),
    ):
        for problem in problems:
            hint = f"\n    [dim]{escape(problem.hint)}[/]" if problem.hint else ""
            console.print(
                f"[{colour}]{title}:[/] {escape(str(problem.resource))}: {escape(problem.message)}{hint}",
                highlight=False,
            )
    console.print(f"\n[bold]{escape(plan.summary())}[/]", highlight=False)
    if not plan.applicable:
        console.print("[red]This plan cannot be applied until the problems above are resolved.[/]", highlight=False)


def _print_change(console: Console, change: Change) -> None:
    mark, colour = _MARK[change.action]
    tags = []
    if change.action is Action.UPDATE_RESTART:
        tags.append("needs restart")
    if change.action is Action.REPLACE:
        tags.append("replace")
    if change.drift:
        tags.append("drift")
    suffix = f" [dim]({', '.join(tags)})[/]" if tags else ""
    console.print(f"[{colour}]{mark} {escape(change.address)}[/] [dim]{change.action}[/]{suffix}", highlight=False)
    if change.reason:
        console.print(f"    [dim]# {escape(change.reason)}[/]", highlight=False)
    for volume in change.loses:
        console.print(f"    [bold red]! destroys {escape(volume)}: its data is lost[/]", highlight=False)
    if change.action is Action.CREATE and change.after is not None:
        # The created guest or container's settings, as its typed intent writes them (secrets by reference).
        for key, value in _flatten(change.after.to_json()):
            console.print(f"    [green]+ {escape(key)}[/] = {escape(_show(value))}", highlight=False)
    for field in change.fields:
        before, after = field.shown()
        note = ""
        if field.timing is Timing.RESTART:
            note = " [dim](after restart)[/]"
        elif field.timing is Timing.REPLACE and change.backend is Backend.PROXMOX:
            note = " [magenta](forces replacement)[/]"
        console.print(
            f"    [yellow]~ {escape(field.path)}[/]: {escape(_show(before))} -> {escape(_show(after))}{note}",
            highlight=False,
        )
    console.print()


def _flatten(data: JsonValue, prefix: str = "") -> list[tuple[str, JsonValue]]:
    """Show a created object's settings one per line; secret_env shows names, never values."""
    rows: list[tuple[str, JsonValue]] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if value in (None, [], {}, ()):
                continue
            if isinstance(value, Mapping) and key not in ("secret_env",):
                rows.extend(_flatten(value, path))
            elif key == "secret_env" and isinstance(value, Mapping):
                rows.extend((f"{path}.{k}", f"{SENSITIVE} from ${v}") for k, v in value.items())
            else:
                rows.append((path, value))
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, str):
        return json.dumps(value)
    return json.dumps(value, default=str)


def print_step(console: Console, step: StepReport) -> None:
    mark = "[green]ok[/]" if step.ok else "[red]FAILED[/]"
    detail = f" [dim]{escape(redact.scrub(step.detail))}[/]" if step.detail else ""
    console.print(f"  {step.phase:<9} {escape(step.address)} {escape(step.action)}: {mark}{detail}", highlight=False)


def print_report(console: Console, report: ApplyReport) -> None:
    match report.result:
        case RunResult.APPLIED | RunResult.NOTHING:
            console.print(f"[green]Applied[/] (run {report.run_id}): every change made, every health check passed.")
        case RunResult.ROLLED_BACK:
            console.print(f"[yellow]Rolled back[/] (run {report.run_id}): {escape(redact.scrub(report.failure or ''))}")
            console.print("Every applied step was undone; the revision is marked failed until something changes.")
        case _:
            failure = redact.scrub(report.failure or "")
            console.print(f"[bold red]ROLLBACK INCOMPLETE[/] (run {report.run_id}): {escape(failure)}")
            for error in report.rollback_errors:
                console.print(f"  [red]{escape(redact.scrub(error))}[/]", highlight=False)
            console.print("[bold red]The lab is in a mixed state and needs a person: see `reconciler history`.[/]")


def print_history(console: Console, runs: Iterable[RunRecord]) -> None:
    import datetime as dt

    for run in runs:
        started = dt.datetime.fromtimestamp(run.started, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        took = f"{run.ended - run.started:.1f}s" if run.ended else "-"
        summary = run.plan.get("summary", "")
        message = f" ({run.message})" if run.message else ""
        console.print(
            f"{run.id:>5}  {started}  {run.result!s:<16} {took:>8}  {run.revision or '-'}  {escape(summary)}"
            f"{escape(message)}",
            highlight=False,
        )


def print_status(console: Console, applied: RunRecord | None, last: RunRecord | None) -> None:
    console.print(
        f"last applied revision:   {applied.revision if applied else '(none)'}"
        + (f" (run {applied.id})" if applied else ""),
        highlight=False,
    )
    if last is None:
        console.print("last attempted revision: (none)")
        return
    console.print(
        f"last attempted revision: {last.revision} (run {last.id}): {last.result}"
        + (f": {escape(last.message)}" if last.message else ""),
        highlight=False,
    )

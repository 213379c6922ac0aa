"""The `reconciler` command: parse, call, print. No logic of its own lives here.

Exit codes follow `terraform plan -detailed-exitcode`: 0 nothing to do (or
valid), 1 error, 2 a plan with changes.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from reconciler import redact
from reconciler.cli.render import print_diagnostics, print_history, print_plan, print_report, print_status, print_step
from reconciler.errors import ReconcilerError
from reconciler.planning.plan import Plan
from reconciler.spec.diagnostics import Severity
from reconciler.spec.loader import LoadResult
from reconciler.spec.schema import write_schemas
from reconciler.spec.validate import load_and_validate

if TYPE_CHECKING:  # the engine is imported by the commands that use it, so `--help` and `validate` stay quick
    from reconciler.engine.apply import ApplyReport
    from reconciler.engine.run import ApplyOptions
    from reconciler.spec.state import DesiredState

__all__ = ["app", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CHANGES = 2
MIN_INTERVAL = 0.1  # seconds between drift passes, at least: shorter would hammer the Proxmox API for nothing

app = typer.Typer(
    name="reconciler",
    help="GitOps for GPU homelabs: Proxmox guests, Docker containers and model servers from a spec in git.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# emoji=False: `:x:` in a file name, a message or a value from a backend is printed as written, never as an emoji.
console = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

SpecPath = Annotated[Path, typer.Argument(help="spec tree (a folder of YAML files) or one file")]
JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]


RefOption = Annotated[
    str | None,
    typer.Option("--ref", help="read the spec from this git commit, branch or tag (PATH is then inside the repo)"),
]
RepoOption = Annotated[
    str | None, typer.Option("--repo", help="git repository (path or URL) for --ref; default: the one holding PATH")
]


@contextmanager
def _errors_exit() -> Iterator[None]:
    """Our own errors end the command with their message and exit 1; anything else is a bug and shows a traceback."""
    try:
        yield
    except ReconcilerError as exc:
        err.print(f"[red]error[/]: {escape(redact.scrub(str(exc)))}")
        raise typer.Exit(EXIT_ERROR) from None


def _read(path: Path, ref: str | None, repo: str | None, state_dir: Path | None = None) -> LoadResult:
    """The spec at PATH: committed at `ref` when given (the normal case), else the folder as it is (a preview)."""
    if ref is None:
        return load_and_validate(path)
    from reconciler.sources.git import load_commit

    repository = repo or str(path if path.is_dir() else path.parent)
    inside = "" if repo else _path_in_repo(path)
    return load_commit(repository, ref=ref, path=str(path) if repo else inside, cache=_state_dir(state_dir))


def _path_in_repo(path: Path) -> str:
    """`path` inside the git working copy holding it ("" when git does not know it)."""
    from reconciler.sources.git import locate

    found = locate(path)
    return found[1] if found else ""


def _repo_top(path: Path) -> str:
    """The top folder of the git repository holding `path` (the path itself when git does not know it)."""
    from reconciler.sources.git import locate

    found = locate(path)
    return str(found[0]) if found else str(path)


def _load(path: Path, *, as_json: bool, ref: str | None = None, repo: str | None = None) -> LoadResult:
    result = _read(path, ref, repo)
    if as_json:
        return result
    if result.diagnostics:
        print_diagnostics(err, result.diagnostics)  # stdout carries the plan alone
    return result


@app.command()
def validate(
    path: SpecPath = Path("specs"), as_json: JsonFlag = False, ref: RefOption = None, repo: RepoOption = None
) -> None:
    """Check a spec tree: syntax, fields, references, conflicts. Exit 0 when valid, 1 when not."""
    with _errors_exit():
        result = _read(path, ref, repo)
    if as_json:
        console.print_json(json.dumps([d.to_json() for d in result.diagnostics]))
    else:
        print_diagnostics(console, result.diagnostics)
        errors = sum(d.severity is Severity.ERROR for d in result.diagnostics)
        warnings = len(result.diagnostics) - errors
        count = len(result.state.resources)
        if result.ok:
            console.print(
                f"[green]valid[/]: {count} resources in {path}" + (f", {warnings} warning(s)" if warnings else "")
            )
        else:
            console.print(f"[red]invalid[/]: {errors} error(s), {warnings} warning(s) in {path}")
    raise typer.Exit(EXIT_OK if result.ok else EXIT_ERROR)


@app.command()
def schema(
    out: Annotated[Path, typer.Option(help="folder to write the JSON Schema files into")] = Path("schemas"),
) -> None:
    """Write the JSON Schema of every kind (generated from the models)."""
    for written in write_schemas(out):
        console.print(str(written))


AllowDelete = Annotated[bool, typer.Option("--allow-delete", help="allow more deletions than the lab's max_deletes")]
AdoptOrphans = Annotated[
    bool,
    typer.Option(
        "--adopt-orphans",
        help="take over what carries an owner tag or label this lab's journal does not list (listed as warnings)",
    ),
]


@app.command()
def plan(
    path: SpecPath = Path("specs"),
    as_json: JsonFlag = False,
    out: Annotated[Path | None, typer.Option("--out", help="save the plan for `apply --plan`")] = None,
    ref: RefOption = None,
    repo: RepoOption = None,
    state_dir: StateDir = None,
    allow_delete: AllowDelete = False,
    adopt_orphans: AdoptOrphans = False,
) -> None:
    """Show what would change on the live lab (a dry run). Exit 0: no changes, 2: changes, 1: error."""
    from reconciler.engine.connect import connect
    from reconciler.engine.journal import Journal
    from reconciler.engine.run import plan_pass

    with _errors_exit():
        result = _load(path, as_json=as_json, ref=ref, repo=repo)
    if not result.ok:
        if as_json:
            console.print_json(json.dumps({"diagnostics": [d.to_json() for d in result.diagnostics]}))
        raise typer.Exit(EXIT_ERROR)
    with _errors_exit():
        journal_path = _state_dir(state_dir) / "journal.sqlite"
    with _errors_exit(), connect(result.state, os.environ, state_dir=journal_path.parent) as readers:
        # The journal, when there is one, tells spec edits from drift; planning never creates it.
        journal = Journal(journal_path) if journal_path.exists() else None
        planned = plan_pass(result.state, readers, journal, allow_delete=allow_delete, adopt_orphans=adopt_orphans)
        if journal is not None:
            journal.close()
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


HealthTimeout = Annotated[float | None, typer.Option("--health-timeout", help="cap every health check (seconds)")]
StateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", envvar="RECONCILER_STATE_DIR", help="journal and lock (default: the user's state dir)"),
]


def _state_dir(state_dir: Path | None) -> Path:
    """The state directory; StateError when something that is not a folder stands there."""
    import platformdirs

    from reconciler.errors import StateError

    folder = state_dir or Path(platformdirs.user_state_dir("reconciler"))
    if folder.exists() and not folder.is_dir():
        raise StateError(
            f"the state directory {folder} is a file, not a folder",
            hint="point --state-dir (or RECONCILER_STATE_DIR) at a folder, or move that file aside",
        )
    return folder


@app.command()
def apply(
    path: SpecPath = Path("specs"),
    plan_file: Annotated[Path | None, typer.Option("--plan", help="execute this saved plan exactly")] = None,
    auto_approve: Annotated[bool, typer.Option("--auto-approve", help="do not ask for confirmation")] = False,
    allow_delete: AllowDelete = False,
    adopt_orphans: AdoptOrphans = False,
    retry: Annotated[bool, typer.Option("--retry", help="try a revision that failed before")] = False,
    wait: Annotated[float, typer.Option("--wait", help="seconds to wait for another apply to finish")] = 0.0,
    health_timeout: HealthTimeout = None,
    state_dir: StateDir = None,
    ref: RefOption = None,
    repo: RepoOption = None,
) -> None:
    """Apply the spec: show the plan, confirm, apply in order, verify health, roll back on failure.

    Exit 0: applied and healthy (or nothing to do); 1: failed and rolled back (or an error before any change);
    3: failed and the rollback did not complete.
    """
    from reconciler.engine.apply import HealthPolicy
    from reconciler.engine.run import ApplyOptions

    with _errors_exit():
        result = _load(path, as_json=False, ref=ref, repo=repo)
    if not result.ok:
        raise typer.Exit(EXIT_ERROR)
    with _errors_exit():
        saved = _saved_plan(plan_file) if plan_file else None
        folder = _state_dir(state_dir)

    options = ApplyOptions(
        allow_delete=allow_delete,
        adopt_orphans=adopt_orphans,
        retry=retry,
        health=HealthPolicy(max_timeout=health_timeout),
        on_output=lambda address, step, line: console.print(f"  {address} {step} | {line}", markup=False),
    )
    with _errors_exit():
        planned, report = _apply_pass(
            result.state, folder, wait=wait, options=options, saved=saved, ask=not auto_approve and saved is None
        )
    if report is None:
        _not_applied(planned)
    print_report(console, report)
    raise typer.Exit(report.exit_code)


def _apply_pass(
    state: DesiredState, folder: Path, *, wait: float, options: ApplyOptions, saved: Plan | None, ask: bool
) -> tuple[Plan, ApplyReport | None]:
    """One apply under the state lock, with the lab's backends and the journal open, printing each step."""
    from dataclasses import replace

    from reconciler.cli.progress import live_progress
    from reconciler.engine.connect import connect, docker_settings
    from reconciler.engine.journal import Journal
    from reconciler.engine.lock import state_lock
    from reconciler.engine.run import apply_pass

    with state_lock(folder, wait=wait), connect(state, os.environ, state_dir=folder) as backends:
        journal = Journal(folder / "journal.sqlite")
        endpoints = {name: s.endpoint for name, s in docker_settings(state, os.environ).items()}
        try:
            with live_progress(console) as progress:  # a model loading for minutes shows its phase and time
                options = replace(options, health=replace(options.health, progress=progress))
                return apply_pass(
                    state,
                    backends,
                    proxmox=backends.proxmox,
                    docker=backends.docker,
                    journal=journal,
                    env=os.environ,
                    docker_endpoints=endpoints,
                    options=options,
                    saved_plan=saved,
                    confirm=_confirmer(ask=ask),
                    on_step=lambda step: print_step(console, step),
                )
        finally:
            journal.close()


MAX_PLAN_BYTES = 32 * 1024 * 1024  # far more than any plan of a lab; the bound on reading a hostile file


MAX_PLAN_NESTING = 64  # a plan nests a few levels; a deeper one would recurse while it is compared


def _nesting(value: object) -> int:
    """How deeply JSON lists and objects nest in `value`, counted without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in children)
    return deepest


def _read_plan_file(path: Path) -> bytes:
    """A plan file's bytes: a regular file of at most MAX_PLAN_BYTES (a FIFO or a device would block or never end)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(f"{path} is not a regular file")
        data = handle.read(MAX_PLAN_BYTES + 1)
    if len(data) > MAX_PLAN_BYTES:
        raise OSError(f"{path} is larger than {MAX_PLAN_BYTES // (1024 * 1024)} MiB")
    return data


def _confirmer(*, ask: bool) -> Callable[[Plan], bool]:
    """Show the plan; with `ask`, go on only if the person says yes (a saved plan or --auto-approve does not ask)."""

    def confirm(planned: Plan) -> bool:
        print_plan(console, planned)
        return typer.confirm("Apply these changes?", default=False) if ask else True

    return confirm


def _not_applied(planned: Plan) -> NoReturn:
    """End an apply that changed nothing: blocked (exit 1), nothing to do or declined (exit 0)."""
    if not planned.applicable:
        print_plan(console, planned)
        for problem in (*planned.conflicts, *planned.blockers):
            err.print(f"[red]error[/]: {escape(str(problem))}", highlight=False)
        raise typer.Exit(EXIT_ERROR)
    if planned.empty and planned.warnings:  # orphans, protected leftovers: say so even when nothing changes
        print_plan(console, planned)
    console.print("Nothing to do." if planned.empty else "Not applied.")
    raise typer.Exit(EXIT_OK)


def _saved_plan(path: Path) -> Plan:
    """A saved plan, read with care: a file is hostile input. Its format is checked before anything else."""
    from reconciler.errors import PlanError
    from reconciler.planning.plan import PLAN_FORMAT

    hint = "make one with `reconciler plan --out`"
    try:
        data = json.loads(_read_plan_file(path).decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path} is not a saved plan ({type(exc).__name__}: {exc})", hint=hint) from None
    except RecursionError:
        raise PlanError(f"{path} is not a saved plan (nested too deeply)", hint=hint) from None
    if not isinstance(data, dict):
        raise PlanError(f"{path} is not a saved plan (not a JSON object)", hint=hint)
    if _nesting(data) > MAX_PLAN_NESTING:
        raise PlanError(f"{path} is not a saved plan (nested too deeply)", hint=hint)
    if data.get("format") != PLAN_FORMAT:
        raise PlanError(
            f"{path} has plan format {data.get('format')!r}; this reconciler reads format {PLAN_FORMAT}",
            hint="plans are not carried across versions: " + hint,
        )
    try:
        return Plan.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PlanError(f"{path} is not a saved plan ({type(exc).__name__}: {exc})", hint=hint) from None


@app.command()
def history(limit: Annotated[int, typer.Option(help="how many runs")] = 20, state_dir: StateDir = None) -> None:
    """List recent apply runs from the journal."""
    from reconciler.engine.journal import Journal

    with _errors_exit():
        journal = Journal(_state_dir(state_dir) / "journal.sqlite")
        try:
            print_history(console, journal.runs(limit))
        finally:
            journal.close()


@app.command()
def status(state_dir: StateDir = None) -> None:
    """The last applied and the last attempted revision, and how that attempt ended."""
    from reconciler.engine.journal import Journal

    with _errors_exit():
        journal = Journal(_state_dir(state_dir) / "journal.sqlite")
        try:
            print_status(console, journal.last_run(applied=True), journal.last_run())
        finally:
            journal.close()


@app.command()
def forget(
    addresses: Annotated[list[str], typer.Argument(help="e.g. container/llm (a whole host) or container/llm/router")],
    state_dir: StateDir = None,
) -> None:
    """Drop resources from the journal's inventory (and what is below them) without touching the lab.

    For what was removed by hand, or lives on a host that is gone: the reconciler stops
    counting it as its own. A guest's provisioning records go too (its steps run again on
    a new guest), and the host key its provisioning recorded. Exit 1 when nothing matched.
    """
    from reconciler.engine.journal import Journal
    from reconciler.engine.lock import state_lock
    from reconciler.engine.provision_apply import forget_guest_access

    with _errors_exit(), state_lock(folder := _state_dir(state_dir)):
        journal = Journal(folder / "journal.sqlite")
        try:
            forgotten = [address for prefix in addresses for address in journal.forget_under(prefix)]
            forgotten += [line for prefix in addresses for line in forget_guest_access(journal, prefix)]
        finally:
            journal.close()
    for address in forgotten:
        console.print(f"forgot {address}")
    if not forgotten:
        err.print(f"nothing in the inventory under {', '.join(addresses)}; `reconciler status` shows the journal")
        raise typer.Exit(EXIT_ERROR)


@app.command()
def run(
    path: Annotated[str, typer.Argument(help="the spec tree inside the repository")] = "specs",
    repo: Annotated[
        str | None, typer.Option("--repo", help="git repository (path or URL); default: the one holding PATH")
    ] = None,
    branch: Annotated[str, typer.Option("--branch", help="the branch to follow")] = "main",
    interval: Annotated[str, typer.Option("--interval", help="drift interval (60s, 5m)")] = "60s",
    once: Annotated[bool, typer.Option("--once", help="one pass, then exit with apply's exit codes")] = False,
    verify_signatures: Annotated[
        bool, typer.Option("--verify-signatures", help="apply only commits signed by a key of --keyring")
    ] = False,
    keyring: Annotated[
        Path | None, typer.Option("--keyring", help="a GnuPG home folder, or an ssh allowed-signers file")
    ] = None,
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT of the HTTP API, status, metrics and webhooks; none: no server")
    ] = "127.0.0.1:9450",
    log_format: Annotated[str, typer.Option("--log-format", help="text or json (JSON lines on stderr)")] = "text",
    health_timeout: HealthTimeout = None,
    allow_delete: AllowDelete = False,
    adopt_orphans: AdoptOrphans = False,
    state_dir: StateDir = None,
) -> None:
    """Keep the lab equal to a git branch: a pass on every commit, every interval (drift) and on request.

    One daemon per state directory. SIGTERM/SIGINT finish the current step and exit 0. With --once: exit 0
    applied (or nothing to do), 1 failed or refused, 3 rollback incomplete.
    """
    from reconciler.cli import daemon
    from reconciler.engine.apply import HealthPolicy
    from reconciler.engine.run import ApplyOptions
    from reconciler.sources.git import GitSource

    with _errors_exit():
        chosen_format = daemon.setup_logging(log_format)
        address = daemon.listen_address(listen)
        seconds = daemon.parse_interval(interval, minimum=MIN_INTERVAL)
        trusted = daemon.checked_keyring(keyring) if verify_signatures else None
        repository, inside = (repo, path.strip("/")) if repo else (_repo_top(Path(path)), _path_in_repo(Path(path)))
        folder = _state_dir(state_dir)
        settings = daemon.DaemonSettings(
            source=GitSource(repository, branch=branch, path=inside, cache=folder),
            state_dir=folder,
            interval=seconds,
            once=once,
            keyring=trusted,
            listen=address,
            log_format=chosen_format,
            apply=ApplyOptions(
                allow_delete=allow_delete, adopt_orphans=adopt_orphans, health=HealthPolicy(max_timeout=health_timeout)
            ),
        )
        code = daemon.run_daemon(settings, console)
    raise typer.Exit(code)


ListenOption = Annotated[str, typer.Option("--listen", help="where the daemon's HTTP API listens")]


def _ask_daemon(verb: str, listen: str, done: str) -> None:
    from reconciler.cli.daemon import call_api
    from reconciler.server import api_token_from_env

    with _errors_exit():  # the token as the daemon reads it: RECONCILER_API_TOKEN or RECONCILER_API_TOKEN_FILE
        answer = call_api(listen, verb, token=api_token_from_env())
    console.print(done + (f" ({escape(json.dumps(answer))})" if answer else ""))


@app.command()
def reconcile(listen: ListenOption = "127.0.0.1:9450") -> None:
    """Ask the running daemon for a pass now (RECONCILER_API_TOKEN)."""
    _ask_daemon("reconcile", listen, "pass requested")


@app.command()
def suspend(listen: ListenOption = "127.0.0.1:9450") -> None:
    """Suspend the running daemon: it keeps observing and reporting, and writes nothing."""
    _ask_daemon("suspend", listen, "suspended")


@app.command()
def resume(listen: ListenOption = "127.0.0.1:9450") -> None:
    """Resume the running daemon; a pass follows at once."""
    _ask_daemon("resume", listen, "resumed")


@app.command()
def demo() -> None:
    """Run the embedded demo lab (specs/) against in-memory Proxmox and Docker and the fake NVML library."""
    from reconciler.cli.demo import run_demo

    raise typer.Exit(run_demo(console))


def main() -> None:
    """Run the command. A bug's traceback is still shown, scrubbed of every secret the process holds."""
    redact.register_environment(os.environ)  # before anything can fail and say what it holds
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - a bug: shown as Python would show it, minus secrets
        import traceback

        sys.stderr.write(redact.scrub("".join(traceback.format_exception(exc))))
        sys.exit(EXIT_ERROR)

"""`reconciler run`: the loop as a daemon (or one pass with `--once`), and the client of its HTTP API.

Who calls it: the `run`, `reconcile`, `suspend` and `resume` commands in `cli/__init__.py`.
It builds the pieces (source, journal, backends, pass runner, controller), holds
the state directory's lock for the daemon's whole life (one daemon per lab),
watches a local repository's refs, starts the HTTP server when there is one,
and turns SIGTERM/SIGINT into "finish the current step, record it, exit 0".
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape

from reconciler.engine.journal import Journal
from reconciler.engine.lock import state_lock
from reconciler.engine.run import ApplyOptions
from reconciler.errors import ConfigError, ReconcilerError, TemporaryError
from reconciler.loop.controller import Controller
from reconciler.loop.events import LoopControl, Outcome, PassRecord, SourceInfo, Trigger
from reconciler.loop.passes import LoopOptions, PassRunner
from reconciler.loop.wiring import Connector, LabConnector
from reconciler.sources.git import GitSource
from reconciler.sources.watch import RefWatcher
from reconciler.spec.units import parse_duration

__all__ = ["DaemonSettings", "call_api", "exit_code", "print_pass", "run_daemon"]

log = logging.getLogger("reconciler.loop")

EXIT_OK, EXIT_FAILED, EXIT_ROLLBACK_INCOMPLETE = 0, 1, 3
_COLOUR = {
    Outcome.APPLIED: "green",
    Outcome.NO_CHANGES: "dim",
    Outcome.ROLLED_BACK: "red",
    Outcome.ROLLBACK_INCOMPLETE: "bold red",
    Outcome.INVALID: "red",
    Outcome.REFUSED: "yellow",
    Outcome.SUSPENDED: "cyan",
    Outcome.ERROR: "yellow",
}


@dataclass(frozen=True)
class DaemonSettings:
    source: GitSource
    state_dir: Path
    interval: float = 60.0
    once: bool = False
    keyring: Path | None = None
    listen: str = "127.0.0.1:9450"
    apply: ApplyOptions = field(default_factory=ApplyOptions)


class _Closable(Protocol):
    def close(self) -> None: ...


def exit_code(record: PassRecord | None) -> int:
    """`run --once` exits as `apply` does: 0 applied or nothing to do, 1 failed or refused, 3 rollback incomplete."""
    if record is None:  # stopped by a signal: the journal keeps the run for the next start
        return EXIT_OK
    if record.outcome in (Outcome.APPLIED, Outcome.NO_CHANGES, Outcome.SUSPENDED):
        return EXIT_OK
    if record.outcome is Outcome.ROLLBACK_INCOMPLETE:
        return EXIT_ROLLBACK_INCOMPLETE
    return EXIT_FAILED


def print_pass(console: Console, record: PassRecord) -> None:
    """One pass as a line (plus its changes, drift and diagnostics) for the terminal or the journal of systemd."""
    colour = _COLOUR[record.outcome]
    revision = (record.revision or "-")[:12]
    console.print(
        f"pass {record.number} ({record.trigger}) {revision}: [{colour}]{record.outcome}[/] in {record.duration:.2f}s"
        + (f" - {escape(record.message)}" if record.message else "")
    )
    for change in record.changes:
        console.print(f"  {escape(change)}")
    for drift in record.drift:
        done = "corrected" if drift.corrected else f"drift: {drift.policy}, not corrected"
        console.print(f"  drift {drift.address}: {', '.join(drift.fields)} ({done})")
    for line in record.diagnostics:
        console.print(f"  {escape(line)}")


def build_controller(
    settings: DaemonSettings, journal: Journal, connector: Connector, *, notes: bool = True
) -> Controller:
    source = settings.source
    options = LoopOptions(interval=settings.interval, keyring=settings.keyring, apply=settings.apply, notes=notes)
    runner = PassRunner(source, connector, journal, options)
    runner.restore()
    return Controller(
        runner,
        source=SourceInfo(source.shown, source.branch, source.path),
        interval=settings.interval,
        suspend_file=settings.state_dir / "suspended",
    )


def run_daemon(settings: DaemonSettings, console: Console) -> int:
    """Hold the lab, run passes until a signal (or one pass with `once`); the exit code."""
    with ExitStack() as stack:
        try:
            stack.enter_context(state_lock(settings.state_dir, holder=f"reconciler run {settings.source.shown}"))
        except TemporaryError as exc:
            raise ConfigError(
                f"{settings.state_dir} is held by another reconciler: {exc.message}",
                hint="one daemon per lab: stop the other one, or give this one its own --state-dir",
            ) from None
        journal = Journal(settings.state_dir / "journal.sqlite")
        stack.callback(journal.close)
        connector = LabConnector(dict(os.environ))
        stack.callback(connector.close)
        controller = build_controller(settings, journal, connector)
        controller.subscribe(lambda record: print_pass(console, record))
        stack.enter_context(_stop_on_signals(controller.stop))
        if settings.once:
            return exit_code(controller.run_once(Trigger.START))
        if settings.source.local:
            stack.callback(RefWatcher(settings.source.git_dir(), _on_ref_change(controller, settings.source)).close)
        server = start_server(controller, listen=settings.listen, token=os.environ.get("RECONCILER_API_TOKEN"))
        if server is not None:
            stack.callback(server.close)
        console.print(
            f"watching {escape(settings.source.shown)} {settings.source.branch}:{settings.source.path or '/'}"
            f" every {settings.interval:g}s" + (f", API on http://{settings.listen}" if server else "")
        )
        controller.serve()
        console.print("stopped")
    return EXIT_OK


def _on_ref_change(controller: Controller, source: GitSource) -> Callable[[], None]:
    def changed() -> None:
        try:
            head = source.head()
        except ReconcilerError:
            return  # a branch being rewritten; the next event or the interval will see it
        if head != controller.runner.head:
            controller.request_pass(Trigger.COMMIT)

    return changed


@contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT ask the loop to stop after the current step; the previous handlers come back after."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def start_server(control: LoopControl, *, listen: str, token: str | None) -> _Closable | None:
    """MERGE POINT: the HTTP server (status, metrics, webhooks) is `reconciler.server.serve`.

    Looked up at run time so this branch works without it; once the server is merged, this
    starts it. Returns its handle, or None when there is no server in this build.
    """
    try:
        server = importlib.import_module("reconciler.server")
    except ImportError:
        return None
    serve: Callable[..., _Closable] = server.serve
    return serve(control, listen=listen, token=token)


def call_api(listen: str, verb: str, *, token: str | None, timeout: float = 10.0) -> dict[str, Any]:
    """POST /api/v1/VERB to a running daemon with the bearer token; its JSON answer."""
    if not token:
        raise ConfigError("RECONCILER_API_TOKEN is not set", hint="export the token the daemon was started with")
    request = urllib.request.Request(
        f"http://{listen}/api/v1/{verb}",
        data=b"{}",
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ConfigError("the daemon refused the token", hint="check RECONCILER_API_TOKEN") from None
        raise TemporaryError(f"the daemon at {listen} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TemporaryError(
            f"no daemon answers at {listen} ({reason})", hint="is `reconciler run` running, with this --listen?"
        ) from None
    try:
        answer = json.loads(body or b"{}")
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def parse_interval(text: str, *, minimum: float) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"--interval {text!r}: {exc}") from None
    if seconds < minimum:
        raise ConfigError(f"--interval {text!r} is too short", hint=f"at least {minimum:g}s")
    return seconds


def checked_keyring(keyring: Path | None) -> Path:
    """--verify-signatures needs a keyring that exists: a GnuPG home folder or an allowed-signers file."""
    if keyring is None or not keyring.exists():
        raise ConfigError(
            "--verify-signatures needs --keyring" if keyring is None else f"keyring {keyring} does not exist",
            hint="a GnuPG home folder or an ssh allowed-signers file",
        )
    return keyring


def configure_logging(log_format: str) -> None:
    """MERGE POINT: `--log-format json` is the server's JSON-lines formatter (`reconciler.server`).

    Text: warnings and errors on stderr (each pass is printed as a line anyway).
    """
    if log_format not in ("text", "json"):
        raise ConfigError(f"--log-format {log_format!r}: give text or json")
    if log_format == "json":
        try:
            server = importlib.import_module("reconciler.server")
        except ImportError:
            server = None
        if server is not None and hasattr(server, "configure_logging"):
            server.configure_logging("json")
            return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

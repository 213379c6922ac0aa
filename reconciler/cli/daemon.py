"""`reconciler run`: the loop as a daemon (or one pass with `--once`), and the client of its HTTP API.

Who calls it: the `run`, `reconcile`, `suspend` and `resume` commands in `cli/__init__.py`.
It builds the pieces (source, journal, backends, pass runner, controller), holds
the state directory's lock for the daemon's whole life (one daemon per lab),
watches a local repository's refs, starts the HTTP server (unless `--listen none`)
and the notifiers of the Lab in force, and turns SIGTERM/SIGINT into "finish the
current step, record it, exit 0". The demo attaches the same services
(`daemon_services`) to its own loop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.markup import escape

from reconciler.engine.journal import Journal
from reconciler.engine.lock import state_lock
from reconciler.engine.run import ApplyOptions
from reconciler.errors import ConfigError, ReconcilerError, TemporaryError
from reconciler.logs import LogFormat, configure_logging, fields
from reconciler.loop.controller import Controller
from reconciler.loop.events import Outcome, PassRecord, SourceInfo, Trigger
from reconciler.loop.notify import Notifier
from reconciler.loop.passes import LoopOptions, PassRunner
from reconciler.loop.wiring import Connector, LabConnector
from reconciler.server import DEFAULT_LISTEN, ServerHandle, WebhookSecrets, api_token_from_env, parse_listen, serve
from reconciler.sources.git import GitSource
from reconciler.sources.watch import RefWatcher
from reconciler.spec.state import DesiredState
from reconciler.spec.units import parse_duration

__all__ = [
    "DaemonSettings",
    "call_api",
    "daemon_services",
    "exit_code",
    "listen_address",
    "print_pass",
    "run_daemon",
    "setup_logging",
]

log = logging.getLogger("reconciler.loop")

EXIT_OK, EXIT_FAILED, EXIT_ROLLBACK_INCOMPLETE = 0, 1, 3
NOTIFY_DRAIN = 5.0  # seconds a stopping daemon (or `run --once`) gives its notifiers to send what is queued
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
    listen: str | None = DEFAULT_LISTEN  # None: no HTTP server (`--listen none`)
    log_format: LogFormat = LogFormat.HUMAN
    apply: ApplyOptions = field(default_factory=ApplyOptions)


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
    text = settings.log_format is LogFormat.HUMAN
    api_token, webhooks = (
        (None, WebhookSecrets()) if settings.once else (api_token_from_env(), WebhookSecrets.from_env())
    )
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
        connector = LabConnector(dict(os.environ), state_dir=settings.state_dir)
        stack.callback(connector.close)
        controller = build_controller(settings, journal, connector)
        if text:  # in JSON, the "pass finished" log event is the pass's line
            controller.subscribe(lambda record: print_pass(console, record))
        stack.enter_context(_stop_on_signals(controller.stop))
        if settings.once:
            with daemon_services(controller, listen=None):
                return exit_code(controller.run_once(Trigger.START))
        if settings.source.local:
            stack.callback(RefWatcher(settings.source.git_dir(), _on_ref_change(controller, settings.source)).close)
        server = stack.enter_context(
            daemon_services(controller, listen=settings.listen, api_token=api_token, webhooks=webhooks)
        )
        _announce(console, settings, server, text=text)
        controller.serve()
        if text:
            console.print("stopped")
        log.info("daemon stopped")
    return EXIT_OK


@contextmanager
def daemon_services(
    controller: Controller,
    *,
    listen: str | None,
    api_token: str | None = None,
    webhooks: WebhookSecrets | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[ServerHandle | None]:
    """The loop's outlets while the block runs: the Lab's notifiers and (unless `listen` is None) the HTTP server.

    On the way out the server stops (its port is free again) and the notifiers send what they
    still hold for at most NOTIFY_DRAIN seconds, then stop. Stop the loop before leaving the block.
    """
    with ExitStack() as stack:
        notifier = follow_notifications(controller, environ)
        stack.callback(notifier.close, NOTIFY_DRAIN, drain=True)
        server = None
        if listen is not None:
            server = serve(controller, listen=listen, api_token=api_token, webhooks=webhooks or WebhookSecrets())
            stack.callback(server.close)
        yield server


def follow_notifications(controller: Controller, environ: Mapping[str, str] | None = None) -> Notifier:
    """A `Notifier` on the loop, configured from the Lab of the revision in force, and again each time a
    new revision changes the Lab's name or `notifications:` (a rejected revision's Lab is never read)."""
    notifier = Notifier("", (), environ=environ)
    configured: list[object] = [None]

    def follow(desired: DesiredState) -> None:
        wanted = (desired.lab.name, desired.lab.notifications)
        if wanted != configured[0]:
            configured[0] = wanted
            notifier.configure(*wanted, environ=environ)

    controller.runner.on_new_revision(follow)
    controller.subscribe(notifier)
    return notifier


def _announce(console: Console, settings: DaemonSettings, server: ServerHandle | None, *, text: bool) -> None:
    source = settings.source
    api = server.url if server is not None else None
    if text:
        console.print(
            f"watching {escape(source.shown)} {source.branch}:{source.path or '/'} every {settings.interval:g}s"
            + (f", API on {api}" if api else ", no HTTP API (--listen none)")
        )
    log.info(
        "daemon started",
        extra=fields(
            repository=source.shown, branch=source.branch, path=source.path, interval=settings.interval, api=api
        ),
    )


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
        log.info("stop requested", extra=fields(signal=signal.Signals(signum).name))
        stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def listen_address(text: str) -> str | None:
    """`--listen HOST:PORT` checked now (ConfigError), or `none`: no HTTP server."""
    if text.strip().lower() == "none":
        return None
    parse_listen(text)
    return text


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


class _PrintedOnStdout(logging.Filter):
    """In text mode the daemon's start, each pass and its stop are printed on stdout; their log events
    would say them twice (in JSON they are the only record)."""

    PRINTED = frozenset({"daemon started", "pass finished", "daemon stopped"})

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "reconciler.loop" and record.msg in self.PRINTED)


def setup_logging(log_format: str) -> LogFormat:
    """`--log-format text` (human-readable lines on stderr, passes on stdout) or `json` (JSON lines on stderr only)."""
    match log_format.strip().lower():
        case "text" | "human":
            chosen = LogFormat.HUMAN
        case "json":
            chosen = LogFormat.JSON
        case _:
            raise ConfigError(f"--log-format {log_format!r}: give text or json")
    handler = configure_logging(chosen)
    if chosen is LogFormat.HUMAN:
        handler.addFilter(_PrintedOnStdout())
    return chosen

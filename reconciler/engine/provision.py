"""Run a guest's provisioning steps over SSH, in order, and record each one's hash and outcome.

Who calls it: the applier, after a guest it created (or whose steps changed) is running, with the
steps the plan lists (`planning.provision.steps_to_run`) and an open `SshSession`. Each step:

1. its check first: `creates: PATH` that exists, or `unless: COMMAND` that succeeds, skips it (the
   hash is recorded as `skipped`, so it is not checked again until it changes);
2. otherwise its script is sent over the session's stdin into a private temporary file and run,
   with its inputs as environment variables, under the guest's `timeout` command (exit 124 is
   reported as a timeout); every output line goes to `on_line` as it comes;
3. its outcome is recorded in the journal (`ok`, `skipped` or `failed`, exit code, last lines).

The first failing step (non-zero exit, or past its timeout) stops the run: later steps depend on
the earlier ones. The report carries its last output lines for the apply report; the applier then
rolls back what this apply did (a guest it created is destroyed), as for a failed health check.
SSH errors other than a command's timeout (unreachable, auth, host key) are raised as they are.
"""

from __future__ import annotations

import enum
import math
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from reconciler.backends.ssh import CommandResult, CommandTimedOut
from reconciler.planning.provision import PlannedStep

__all__ = ["CommandRunner", "ProvisionReport", "StepJournal", "StepResult", "StepStatus", "provision_guest"]

CHECK_TIMEOUT: Final = 300.0  # an `unless` or `creates` check is a quick test, never a second step
TIMED_OUT: Final = 124  # coreutils' and busybox's `timeout` exit code
GRACE: Final = 15.0  # how much longer than the guest's own timeout the session waits
# Send the script into a private file, run it with nothing on stdin under the guest's `timeout` (which
# kills it: closing an SSH channel does not stop a command), and remove the file whatever happens.
RUNNER: Final = (
    'd="$(mktemp -d)" && trap \'rm -rf "$d"\' EXIT && cat > "$d/step" && chmod 700 "$d/step" && '
    'if command -v timeout >/dev/null 2>&1; then timeout -k 5 {seconds} "$d/step"; else "$d/step"; fi </dev/null'
)


class CommandRunner(Protocol):
    def run(
        self,
        command: str,
        *,
        timeout: float,
        on_line: Callable[[str], None] | None = None,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        tail: int = ...,
    ) -> CommandResult: ...


class StepJournal(Protocol):
    def record_provision_step(
        self,
        address: str,
        step: str,
        *,
        step_hash: str,
        outcome: str,
        exit_code: int | None = None,
        tail: tuple[str, ...] = (),
        run_id: int | None = None,
    ) -> None: ...


class StepStatus(enum.StrEnum):
    OK = "ok"  # ran and exited 0
    SKIPPED = "skipped"  # its `creates` path exists or its `unless` command succeeded
    FAILED = "failed"  # exited non-zero or ran past its timeout


@dataclass(frozen=True)
class StepResult:
    key: str
    hash: str
    status: StepStatus
    reason: str  # what happened, for the report: "exit 0", "exit 3", "timed out after 10s", "/etc/x exists"
    exit_code: int | None = None
    tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProvisionReport:
    address: str
    results: tuple[StepResult, ...]

    @property
    def failed(self) -> StepResult | None:
        return next((r for r in self.results if r.status is StepStatus.FAILED), None)

    @property
    def ok(self) -> bool:
        return self.failed is None


def _check(session: CommandRunner, step: PlannedStep) -> str | None:
    """Why the step's check says it is done already, or None when it must run."""
    timeout = min(step.timeout, CHECK_TIMEOUT)
    if step.creates is not None and session.run(f"test -e {shlex.quote(step.creates)}", timeout=timeout).ok:
        return f"{step.creates} exists"
    if step.unless is not None and session.run(step.unless, timeout=timeout).ok:
        return "its 'unless' check succeeded"
    return None


def _run_step(session: CommandRunner, step: PlannedStep, on_line: Callable[[str], None] | None) -> StepResult:
    try:
        skipped = _check(session, step)
    except CommandTimedOut as exc:
        return StepResult(step.key, step.hash, StepStatus.FAILED, "its check timed out", None, exc.tail)
    if skipped is not None:
        return StepResult(step.key, step.hash, StepStatus.SKIPPED, skipped)
    env = {**step.inputs, "RECONCILER_STEP": step.key}
    command = RUNNER.format(seconds=math.ceil(step.timeout))
    timed_out = f"timed out after {step.timeout:g}s"
    try:
        result = session.run(command, timeout=step.timeout + GRACE, on_line=on_line, stdin=step.script, env=env)
    except CommandTimedOut as exc:
        return StepResult(step.key, step.hash, StepStatus.FAILED, timed_out, None, exc.tail)
    if result.ok:
        return StepResult(step.key, step.hash, StepStatus.OK, "exit 0", 0, result.tail)
    reason = timed_out if result.exit_code == TIMED_OUT else f"exit {result.exit_code}"
    return StepResult(step.key, step.hash, StepStatus.FAILED, reason, result.exit_code, result.tail)


def provision_guest(
    address: str,
    steps: Sequence[PlannedStep],
    *,
    session: CommandRunner,
    journal: StepJournal,
    run_id: int | None = None,
    on_line: Callable[[str, str], None] | None = None,
) -> ProvisionReport:
    """Run `steps` in the guest at `address` (`lxc/955`) in order; stop at the first that fails.

    `on_line(step, line)` sees every output line as it comes (scrubbed by the SSH backend). Every
    attempted step is recorded in `journal`, the failed one too (its hash is not taken as done).
    """
    results: list[StepResult] = []
    for step in steps:

        def forward(line: str, key: str = step.key) -> None:
            if on_line is not None:
                on_line(key, line)

        result = _run_step(session, step, forward)
        journal.record_provision_step(
            address,
            step.key,
            step_hash=step.hash,
            outcome=result.status.value,
            exit_code=result.exit_code,
            tail=result.tail,
            run_id=run_id,
        )
        results.append(result)
        if result.status is StepStatus.FAILED:
            break
    return ProvisionReport(address, tuple(results))

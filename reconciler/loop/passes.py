"""One pass of the loop: resolve the branch, judge its head, reconcile the lab, say what happened.

Who calls it: the controller, one pass at a time. The pass itself is the
engine's (`apply_pass`, or `plan_pass` when suspended); this module decides
what to reconcile to and turns the result into a `PassRecord`.

What it reconciles to:
- the branch's head, once it is judged good: signed by a trusted key when a
  keyring is given, and valid;
- otherwise the last good revision (from this process, or the journal's last
  applied run at start), so drift is still corrected while a bad head waits
  for the next commit. A rejected head (invalid, unsigned, failed before) is
  reported once with its own outcome; later passes are drift passes against
  the last good revision and say that the head is held back.

A stop request (SIGTERM) is honoured after the step in progress has ended and
been journaled: `PassInterrupted` leaves the run open in the journal, and the
next start resumes it by the crash rule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, assert_never

from reconciler.engine.apply import ApplyReport, StepReport
from reconciler.engine.health import Progress
from reconciler.engine.journal import Journal, RunResult
from reconciler.engine.run import ApplyOptions, apply_pass, plan_pass
from reconciler.errors import PlanError, ReconcilerError
from reconciler.logs import fields
from reconciler.loop.events import DriftReport, GpuStatus, Outcome, PassRecord, Trigger
from reconciler.loop.report import drift_reports, gpu_statuses, note_text
from reconciler.loop.wiring import Connector
from reconciler.planning.plan import Plan
from reconciler.spec.diagnostics import Severity
from reconciler.spec.loader import LoadResult
from reconciler.spec.state import DesiredState

__all__ = ["LoopOptions", "PassInterrupted", "PassRunner", "SpecSource"]

log = logging.getLogger("reconciler.loop")

MAX_VERDICTS = 64  # heads remembered (a head is judged once)


class SpecSource(Protocol):
    """A branch to follow (sources.git.GitSource)."""

    @property
    def local(self) -> bool: ...

    def fetch(self) -> None: ...

    def head(self) -> str: ...

    def load(self, sha: str) -> LoadResult: ...

    def verify(self, sha: str, keyring: Path) -> str | None: ...

    def note(self, sha: str, text: str) -> None: ...

    def read_note(self, sha: str) -> str | None: ...


@dataclass(frozen=True)
class LoopOptions:
    interval: float = 60.0  # seconds between drift passes
    keyring: Path | None = None  # --verify-signatures: a GnuPG home or an ssh allowed-signers file
    apply: ApplyOptions = field(default_factory=ApplyOptions)
    notes: bool = True  # write git notes on a local repository


class PassInterrupted(Exception):
    """A stop was requested between two steps; the journal keeps the run open for the next start."""


@dataclass(frozen=True)
class _Verdict:
    desired: DesiredState | None  # None: rejected
    outcome: Outcome | None = None  # INVALID or REFUSED when rejected
    message: str = ""
    diagnostics: tuple[str, ...] = ()


@dataclass
class _Result:
    outcome: Outcome
    plan: Plan | None = None
    message: str = ""
    error: ReconcilerError | None = None


class PassRunner:
    def __init__(self, source: SpecSource, connector: Connector, journal: Journal, options: LoopOptions) -> None:
        self.source = source
        self.connector = connector
        self.journal = journal
        self.options = options
        self.head: str | None = None
        self.last_good: DesiredState | None = None
        self.last_plan: Plan | None = None
        self.gpus: tuple[GpuStatus, ...] = ()
        self.last_error: ReconcilerError | None = None  # of the last pass: the controller's backoff reads it
        self.progress: Progress | None = None  # the long wait in progress (a model loading), for the status
        self._verdicts: dict[str, _Verdict] = {}
        self._noted: dict[str, str] = {}  # sha -> the last note body written on it by this process
        self._restored = False
        self._revision_listeners: list[Callable[[DesiredState], None]] = []

    def on_new_revision(self, listener: Callable[[DesiredState], None]) -> None:
        """Call `listener` (on the loop's thread) with each new revision in force, and now with the current one.

        The daemon re-reads the Lab's notification targets this way. A revision is in force once a pass
        applied it (or found nothing to do), or when the journal says it was the last one applied.
        """
        self._revision_listeners.append(listener)
        if self.last_good is not None:
            _tell(listener, self.last_good)

    def _hold(self, target: DesiredState) -> None:
        previous, self.last_good = self.last_good, target
        if previous is None or previous.revision != target.revision:
            for listener in list(self._revision_listeners):
                _tell(listener, target)

    def restore(self) -> None:
        """Start from the journal: the last revision applied is the last good one, if git still has it.

        Called by the first pass that reached the repository (a remote's mirror exists only then).
        """
        self._restored = True
        for run in self.journal.runs(50):
            if run.result in (RunResult.APPLIED, RunResult.NOTHING) and run.revision:
                try:
                    loaded = self.source.load(run.revision)
                except ReconcilerError:
                    return
                if loaded.ok:
                    self._hold(loaded.state)
                return

    def run(self, number: int, trigger: Trigger, *, suspended: bool, stopping: Callable[[], bool]) -> PassRecord:
        started, clock = time.time(), time.monotonic()

        def record(result: _Result, revision: str | None, target: DesiredState | None) -> PassRecord:
            self.last_error = result.error
            plan = result.plan
            return PassRecord(
                number=number,
                trigger=trigger,
                revision=revision,
                started=started,
                duration=time.monotonic() - clock,
                outcome=result.outcome,
                changes=tuple(f"{c.action} {c.address}" for c in plan.changes) if plan else (),
                drift=self._drift(plan, target, result.outcome),
                message=result.message,
                reconciled_revision=target.revision if target else None,
            )

        try:
            if not self.source.local:
                self.source.fetch()
            head = self.source.head()
        except ReconcilerError as exc:
            return record(_Result(Outcome.ERROR, message=str(exc), error=exc), self.head, None)
        self.head = head
        if not self._restored:
            self.restore()
        verdict, first = self._judge(head)
        if verdict.desired is None and (first or self.last_good is None):
            assert verdict.outcome is not None
            rejected = record(_Result(verdict.outcome, message=verdict.message), head, None)
            return self._noted_record(replace(rejected, diagnostics=verdict.diagnostics))
        target, held = self._target(head, verdict)
        if target is None:
            return record(_Result(Outcome.REFUSED, message=held), head, None)
        result = self._reconcile(target, suspended=suspended, stopping=stopping)
        if result.outcome in (Outcome.APPLIED, Outcome.NO_CHANGES):
            self._hold(target)
        if held and not result.message:
            result.message = held
        return self._noted_record(record(result, head, target))

    def _judge(self, head: str) -> tuple[_Verdict, bool]:
        """What the head commit is worth (judged once per commit); True the first time."""
        known = self._verdicts.get(head)
        if known is not None:
            return known, False
        verdict = self._verdict(head)
        if len(self._verdicts) >= MAX_VERDICTS:
            self._verdicts.pop(next(iter(self._verdicts)))
        self._verdicts[head] = verdict
        return verdict, True

    def _verdict(self, head: str) -> _Verdict:
        if self.options.keyring is not None:
            try:
                refusal = self.source.verify(head, self.options.keyring)
            except ReconcilerError as exc:
                refusal = f"the signature of {head[:12]} cannot be checked: {exc}"
            if refusal is not None:
                return _Verdict(None, Outcome.REFUSED, f"{refusal}; nothing is applied from it")
        try:
            loaded = self.source.load(head)
        except ReconcilerError as exc:
            return _Verdict(None, Outcome.INVALID, str(exc))
        if not loaded.ok:
            errors = tuple(str(d) for d in loaded.diagnostics if d.severity is Severity.ERROR)
            return _Verdict(None, Outcome.INVALID, errors[0] if errors else "invalid", errors)
        return _Verdict(loaded.state)

    def _target(self, head: str, verdict: _Verdict) -> tuple[DesiredState | None, str]:
        """The revision to hold the lab to, and why it is not the head (empty when it is)."""
        good = self.last_good
        kept = f"; the lab is held to {good.revision[:12]}" if good and good.revision else ""
        if verdict.desired is None:
            return good, f"revision {head[:12]} is {verdict.outcome}: {verdict.message}{kept}"
        failed = None if self.options.apply.retry else self.journal.failed_revision(head)
        if failed is not None:
            why = f"revision {head[:12]} failed before ({failed}); it waits for a new commit{kept}"
            return (good if good is not None and good.revision != head else None), why
        return verdict.desired, ""

    def _progress(self, note: Progress) -> None:
        self.progress = note  # one reference swapped: the status thread reads the latest whole note
        if self.options.apply.health.progress is not None:  # and whoever else listens (a terminal)
            self.options.apply.health.progress(note)

    def _reconcile(self, target: DesiredState, *, suspended: bool, stopping: Callable[[], bool]) -> _Result:
        health = self.options.apply.health

        def on_step(step: StepReport) -> None:
            self.progress = None
            if stopping() and step.ok and step.phase in ("apply", "verify"):
                raise PassInterrupted(f"stopped after {step.phase} {step.address}")

        try:
            wiring = self.connector.wiring(target)
            if suspended:
                plan = plan_pass(target, wiring.readers, self.journal)
                report = None
            else:
                plan, report = apply_pass(
                    target,
                    wiring.readers,
                    proxmox=wiring.proxmox,
                    docker=wiring.docker,
                    journal=self.journal,
                    env=wiring.env,
                    docker_endpoints=wiring.docker_endpoints,
                    options=replace(self.options.apply, health=replace(health, progress=self._progress)),
                    on_step=on_step,
                )
            self.gpus = gpu_statuses(wiring.readers)
        except PlanError as exc:
            return _Result(Outcome.REFUSED, message=str(exc), error=exc)
        except ReconcilerError as exc:
            self.connector.close()  # the next pass connects afresh (an expired session, a restarted API)
            return _Result(Outcome.ERROR, message=str(exc), error=exc)
        self.last_plan = plan
        if suspended:
            return _Result(Outcome.SUSPENDED, plan, "suspended: observed only, nothing written")
        if report is None:
            if not plan.applicable:
                first = (*plan.conflicts, *plan.blockers)[0]
                return _Result(Outcome.REFUSED, plan, str(first))
            return _Result(Outcome.NO_CHANGES, plan)
        return _Result(_outcome(report), plan, report.failure or "")

    def _drift(self, plan: Plan | None, target: DesiredState | None, outcome: Outcome) -> tuple[DriftReport, ...]:
        if plan is None or target is None:
            return ()
        return drift_reports(plan, target, corrected=outcome is Outcome.APPLIED)

    def _noted_record(self, record: PassRecord) -> PassRecord:
        """Write the pass's result as a git note on its commit, when there is news for that commit."""
        sha = record.revision
        body = note_text(record, with_time=False)
        if not self.options.notes or not self.source.local or sha is None or body is None:
            return record
        seen = self._noted.get(sha)
        if seen is not None and (seen == body or record.outcome is Outcome.NO_CHANGES):
            return record
        try:
            if seen is None and record.outcome is Outcome.NO_CHANGES and self.source.read_note(sha) is not None:
                self._noted[sha] = body  # a note from an earlier run says more than "no changes"
                return record
        except ReconcilerError:
            return record
        try:
            self.source.note(sha, note_text(record, with_time=True) or body)
        except ReconcilerError:
            return record
        self._noted[sha] = body
        return record


def _tell(listener: Callable[[DesiredState], None], revision: DesiredState) -> None:
    try:
        listener(revision)
    except Exception:  # a watcher's bug must not stop reconciliation
        log.exception("revision listener failed", extra=fields(listener=repr(listener)))


def _outcome(report: ApplyReport) -> Outcome:
    match report.result:
        case RunResult.APPLIED:
            return Outcome.APPLIED
        case RunResult.NOTHING:
            return Outcome.NO_CHANGES
        case RunResult.ROLLED_BACK:
            return Outcome.ROLLED_BACK
        case RunResult.ROLLBACK_FAILED:
            return Outcome.ROLLBACK_INCOMPLETE
        case RunResult.RUNNING | RunResult.INTERRUPTED:
            return Outcome.ERROR
        case _ as unreachable:
            assert_never(unreachable)

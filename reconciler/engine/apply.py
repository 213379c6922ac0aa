"""Apply a Plan: run its changes in order, verify health, and roll back on failure.

Who calls it: `reconciler apply` (and the demo), with the very Plan that was
printed. Every step is written to the journal before it runs (intent and the
state to restore) and after it ends. What cannot be undone is done last, once
everything else is healthy: deleting a guest, removing the old container of a
replace (until then it is kept, stopped and renamed, so a rollback can bring
it back).

When a step or a health check fails, the steps already applied are undone in
reverse order and the restored resources are checked too. The revision is
recorded as failed so the loop does not retry it until something changes.
A guest destroyed by a delete or a replace cannot come back: its undo fails,
naming the guest and the volumes whose data is lost, so the run ends
`rollback-failed` (exit 3), never "rolled back". A volume moved to another
storage is undone by moving it back.

Crash rule (resume): a run found still `running` in the journal was
interrupted. The next apply marks it `interrupted`, plans afresh from the live
state (so what was done is not done again, and what was not is done now) and
takes over the interrupted run's completed steps: if this attempt fails, they
are undone too, so the lab returns to the state before the first attempt; if
it succeeds, their leftovers (renamed old containers) are cleaned up.

The `Applier` sequences, journals and rolls back; what one change does to a
backend, how it is undone and checked, is in `engine.steps_proxmox`,
`engine.steps_docker` and `engine.steps_gpu` (their shared types in
`engine.steps`); what is refused before anything is touched, in `engine.preflight`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, assert_never

from reconciler.engine.health import ProbeResult
from reconciler.engine.journal import Journal, RunResult, StepOutcome, StepRecord
from reconciler.engine.preflight import preflight
from reconciler.engine.provision_apply import Connect, Provisioner
from reconciler.engine.steps import Done, HealthPolicy, host_and_name
from reconciler.engine.steps_docker import ContainerBackend, DockerSteps, Prober, resolve_secrets
from reconciler.engine.steps_gpu import GpuSetter, GpuSteps
from reconciler.engine.steps_proxmox import GuestBackend, ProxmoxSteps
from reconciler.engine.switch import GpuMemory, GpuQuery, SwitchHooks
from reconciler.errors import PlanError, ReconcilerError
from reconciler.planning.container_run import ContainerRun, ContainerSeen
from reconciler.planning.gpu_values import GpuValues
from reconciler.planning.intents import GuestIntent, GuestSeen
from reconciler.planning.inventory import OLD_SUFFIX, spec_hash
from reconciler.planning.plan import Action, Address, Backend, Change, Plan
from reconciler.planning.provision_intent import ProvisionIntent, ProvisionSeen
from reconciler.spec.models import PowerState
from reconciler.spec.state import DesiredState

__all__ = [
    "EXIT_APPLIED",
    "EXIT_ROLLBACK_INCOMPLETE",
    "EXIT_ROLLED_BACK",
    "Applier",
    "ApplyReport",
    "ContainerBackend",
    "GuestBackend",
    "HealthPolicy",
    "StepRecord",
    "StepReport",
    "resolve_secrets",
]

EXIT_APPLIED = 0
EXIT_ROLLED_BACK = 1
EXIT_ROLLBACK_INCOMPLETE = 3


@dataclass
class StepReport:
    address: str
    action: str
    phase: str
    ok: bool
    detail: str = ""


@dataclass
class ApplyReport:
    run_id: int
    result: RunResult
    steps: list[StepReport] = field(default_factory=list)
    failure: str | None = None
    rollback_errors: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.result in (RunResult.APPLIED, RunResult.NOTHING):
            return EXIT_APPLIED
        if self.result is RunResult.ROLLED_BACK:
            return EXIT_ROLLED_BACK
        return EXIT_ROLLBACK_INCOMPLETE


class _StepFailed(Exception):
    def __init__(self, message: str, change: Change) -> None:
        super().__init__(message)
        self.change = change


class Applier:
    """Runs a Plan's changes through the per-backend steps, journaling each, and rolls back on failure."""

    def __init__(
        self,
        *,
        proxmox: GuestBackend | None,
        docker: ContainerBackend | None,
        journal: Journal,
        env: Mapping[str, str],
        docker_endpoints: Mapping[str, str],
        health: HealthPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_step: Callable[[StepReport], None] | None = None,
        prober: Prober | None = None,
        gpus: GpuMemory | None = None,
        gpu_setter: GpuSetter | None = None,
        ssh_connect: Connect | None = None,
        on_output: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.gpus = gpus  # NVML, read between stopping and starting members of an exclusive group
        self.gpu_settings = GpuSteps(gpu_setter)  # NVML where the reconciler runs sets GPU settings
        self.proxmox = proxmox
        self.docker = docker
        self.journal = journal
        self.env = env
        self.health = health or HealthPolicy()
        self.on_step = on_step
        self.guests = ProxmoxSteps(proxmox, self.health, sleep, env=env)
        self.ssh_connect = ssh_connect  # replaces SSH (the demo's guests run provisioning steps in memory)
        self.on_output = on_output  # each provisioning output line as it comes (the terminal)
        # `prober` replaces network probes (the demo's in-memory containers answer them).
        self.containers = DockerSteps(docker, self.health, env, docker_endpoints, sleep=sleep, prober=prober)

    # ---- the run -------------------------------------------------------------------------

    def apply(self, plan: Plan, desired: DesiredState) -> ApplyReport:
        if not plan.applicable:
            raise PlanError("the plan has conflicts or blockers; it cannot be applied")
        preflight(
            plan,
            has_proxmox=self.proxmox is not None,
            has_docker=self.docker is not None,
            gpu_settings=self.gpu_settings,
            env=self.env,
        )
        engine = self.docker if isinstance(self.docker, GpuQuery) else None  # GPUs local NVML does not see
        self.containers.switch = SwitchHooks.of(desired, gpus=self.gpus, progress=self.health.progress, engine=engine)
        self.provisioner = Provisioner(
            self.journal,
            self.env,
            desired,
            self.ssh_connect,
            connect_timeout=self.health.guest_timeout,
            on_output=self.on_output,
        )
        inherited, resumed_from = self._take_over_interrupted()
        run_id = self.journal.start_run(revision=plan.revision, plan=plan.to_json(), resumed_from=resumed_from)
        report = ApplyReport(run_id, RunResult.RUNNING)
        done: list[Done] = list(inherited)
        self.seq = 0
        deferred = [c for c in plan.changes if _irreversible(c)]
        # A replaced guest is provisioned after it is made again, not in the guest that is about to go.
        deferred += [
            c for c in plan.changes if c.backend is Backend.SSH and {d.address for d in deferred} & {*c.depends_on}
        ]
        try:
            for change in plan.changes:
                if change in deferred:
                    continue
                self._step(run_id, change, report, done)
                self._verify(run_id, change, report)
            for change in deferred:  # what cannot be undone: a failure now is reported with what was lost
                self._step(run_id, change, report, done)
                self._verify(run_id, change, report)
        except _StepFailed as failure:
            report.failure = str(failure)
            self._rollback(run_id, done, report)
            report.result = RunResult.ROLLED_BACK if not report.rollback_errors else RunResult.ROLLBACK_FAILED
            self.journal.end_run(run_id, report.result, report.failure)
            if plan.revision:
                self.journal.mark_failed(plan.revision, run_id=run_id, reason=report.failure)
            return report
        self._finalize(run_id, done, report)
        _record_inventory(self.journal, run_id, plan, desired)
        # A run that took over an interrupted one completed that run's steps: it applied them.
        report.result = RunResult.APPLIED if plan.changes or inherited else RunResult.NOTHING
        self.journal.end_run(run_id, report.result)
        if plan.revision:
            self.journal.clear_failed(plan.revision)
        return report

    def _take_over_interrupted(self) -> tuple[list[Done], int | None]:
        inherited: list[Done] = []
        resumed_from = None
        for run in self.journal.unfinished_runs():
            resumed_from = run.id
            for step in self.journal.steps(run.id):
                if step.phase == "apply" and step.outcome in (StepOutcome.OK, StepOutcome.PENDING):
                    inherited.append(Done(Change.from_json(step.intent), step.before, step.id, inherited=True))
            self.journal.end_run(run.id, RunResult.INTERRUPTED, "interrupted; resumed by a later run")
        return inherited, resumed_from

    def _begin(
        self,
        run_id: int,
        *,
        phase: str,
        address: str,
        action: str,
        intent: Mapping[str, Any],
        before: Mapping[str, Any] | None,
    ) -> int:
        """Journal a step's intent before it runs; its id ends it."""
        self.seq += 1
        return self.journal.begin_step(
            run_id, seq=self.seq, phase=phase, address=address, action=action, intent=intent, before=before
        )

    def _emit(self, report: ApplyReport, entry: StepReport) -> None:
        report.steps.append(entry)
        if self.on_step is not None:
            self.on_step(entry)

    def _step(self, run_id: int, change: Change, report: ApplyReport, done: list[Done]) -> None:
        """Run one change. It joins `done` before it runs: a step that fails half-way is undone too."""
        before = self._capture(change)
        step_id = self._begin(
            run_id,
            phase="apply",
            address=change.address,
            action=str(change.action),
            intent=change.to_json(),
            before=before,
        )
        done.append(Done(change, before, step_id))
        try:
            match change.backend:
                case Backend.PROXMOX:
                    self.guests.do(change)
                case Backend.DOCKER:
                    self.containers.do(change, before)
                case Backend.GPU:
                    self.gpu_settings.do(change)
                case Backend.SSH:
                    self.provisioner.run(change, run_id=run_id)
                case _:
                    assert_never(change.backend)
        except ReconcilerError as exc:
            done[-1].failed = True
            self.journal.end_step(step_id, StepOutcome.FAILED, error=str(exc))
            self._emit(report, StepReport(change.address, str(change.action), "apply", False, str(exc)))
            # A failed step may have half-happened: undo it with the others.
            raise _StepFailed(f"{change.address}: {change.action} failed: {exc}", change) from exc
        self.journal.end_step(step_id, StepOutcome.OK)
        self._emit(report, StepReport(change.address, str(change.action), "apply", True))

    def _verify(self, run_id: int, change: Change, report: ApplyReport) -> None:
        try:
            result = self._check(change)
        except ReconcilerError as exc:  # the backend failed while checking: unhealthy, so roll back
            result = ProbeResult(False, f"health check could not be made: {exc}")
        if result is None:
            return
        step_id = self._begin(
            run_id,
            phase="verify",
            address=change.address,
            action="health",
            intent={"address": change.address},
            before=None,
        )
        outcome = StepOutcome.OK if result.healthy else StepOutcome.FAILED
        self.journal.end_step(
            step_id, outcome, error=None if result.healthy else result.detail, health=[result.to_json()]
        )
        self._emit(report, StepReport(change.address, "health", "verify", result.healthy, result.detail))
        if not result.healthy:
            raise _StepFailed(f"{change.address}: health check failed: {result.detail}", change)

    def _check(self, change: Change) -> ProbeResult | None:
        """Health after a step that starts something; None when the step needs no check."""
        after = change.after
        if isinstance(after, GpuValues):
            return self.gpu_settings.check(change)
        if isinstance(after, ProvisionIntent):
            return None  # a provisioning step's exit code is its check
        if change.action in (Action.STOP, Action.DELETE) or after is None or after.state is not PowerState.RUNNING:
            return None
        match after:
            case GuestIntent():
                return self.guests.check_running(after)
            case ContainerRun():
                return self.containers.check_healthy(change, after.probe, load=after.load)
            case _:
                assert_never(after)

    # ---- rollback and finishing -----------------------------------------------------------------

    def _rollback(self, run_id: int, done: list[Done], report: ApplyReport) -> None:
        for item in reversed(done):
            change = item.change
            step_id = self._begin(
                run_id,
                phase="rollback",
                address=change.address,
                action=f"undo {change.action}",
                intent=change.to_json(),
                before=item.before,
            )
            try:
                match change.backend:
                    case Backend.PROXMOX:
                        self.guests.undo(item)
                    case Backend.DOCKER:
                        self.containers.undo(item)
                    case Backend.GPU:
                        self.gpu_settings.undo(change)
                    case Backend.SSH:
                        self.provisioner.undo(change)
                    case _:
                        assert_never(change.backend)
                restored = self._check_restored(item)
            except ReconcilerError as exc:
                message = f"{change.address}: undo {change.action} failed: {exc}"
                report.rollback_errors.append(message)
                self.journal.end_step(step_id, StepOutcome.FAILED, error=message)
                self._emit(report, StepReport(change.address, f"undo {change.action}", "rollback", False, str(exc)))
                continue
            if restored is not None and not restored.healthy:
                message = f"{change.address}: restored but not healthy: {restored.detail}"
                report.rollback_errors.append(message)
                self.journal.end_step(step_id, StepOutcome.FAILED, error=message, health=[restored.to_json()])
                self._emit(
                    report, StepReport(change.address, f"undo {change.action}", "rollback", False, restored.detail)
                )
                continue
            self.journal.end_step(step_id, StepOutcome.UNDONE, health=[restored.to_json()] if restored else None)
            if item.step_id is not None and not item.failed:
                self.journal.end_step(item.step_id, StepOutcome.UNDONE)
            self._emit(report, StepReport(change.address, f"undo {change.action}", "rollback", True))

    def _check_restored(self, item: Done) -> ProbeResult | None:
        """After an undo, what was running before runs again (containers: and is healthy by Docker's word)."""
        before = item.before or {}
        if item.change.backend is Backend.GPU:
            return self.gpu_settings.check(item.change, undone=True)
        if before.get("status") not in ("running", "restarting"):
            return None
        seen = item.change.before
        match seen:
            case GuestSeen():
                return self.guests.check_running(seen)
            case ContainerSeen() | None:
                return self.containers.check_healthy(item.change, None)
            case GpuValues() | ProvisionSeen():
                return None  # a GPU's settings are checked above; what ran in a guest cannot be undone
            case _:
                assert_never(seen)

    def _finalize(self, run_id: int, done: list[Done], report: ApplyReport) -> None:
        """Everything is healthy: remove what was kept for a rollback."""
        if self.docker is None:
            return
        for item in done:
            if item.change.backend is not Backend.DOCKER or item.change.action not in (Action.REPLACE, Action.DELETE):
                continue
            host, name = host_and_name(item.change)
            step_id = self._begin(
                run_id,
                phase="finalize",
                address=item.change.address,
                action="remove old",
                intent={"container": name + OLD_SUFFIX},
                before=None,
            )
            try:
                self.docker.remove_container(host, name + OLD_SUFFIX, force=True)
            except ReconcilerError as exc:
                self.journal.end_step(step_id, StepOutcome.FAILED, error=str(exc))
                self._emit(report, StepReport(item.change.address, "remove old", "finalize", False, str(exc)))
                continue
            self.journal.end_step(step_id, StepOutcome.OK)

    def _capture(self, change: Change) -> dict[str, Any] | None:
        """The state to restore: for containers, what Docker holds right now."""
        if change.backend is not Backend.DOCKER:
            return change.before.to_json() if change.before else None
        return self.containers.capture(change)


def _irreversible(change: Change) -> bool:
    return change.backend is Backend.PROXMOX and change.action in (Action.DELETE, Action.REPLACE)


def _record_inventory(journal: Journal, run_id: int, plan: Plan, desired: DesiredState) -> None:
    """What this run leaves owned, with the spec it was applied from (later differences read as drift)."""
    for change in plan.changes:
        if change.action is Action.DELETE:
            journal.forget_under(change.address)
            if change.backend is Backend.PROXMOX:  # the containers of a Docker engine in it went with it
                journal.forget_under(f"container/{change.where.name}")
    for resource in desired.resources:
        address = Address.of(resource)
        if address is not None:
            journal.record_owned(
                str(address),
                resource=resource.ref,
                backend=address.backend,
                spec_hash=spec_hash(resource, desired),
                protected=resource.protect,
                run_id=run_id,
                vmid=getattr(resource, "vmid", None),
            )

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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, assert_never

from reconciler import redact
from reconciler.engine.guest_create import create_guest
from reconciler.engine.health import ProbeResult, endpoint_address, ollama_load, poll, probe_http, probe_tcp
from reconciler.engine.journal import Journal, RunResult, StepOutcome, StepRecord
from reconciler.engine.provision_apply import Connect, Provisioner
from reconciler.errors import ConfigError, NotFoundError, PermanentError, PlanError, ReconcilerError
from reconciler.planning import pve
from reconciler.planning.container_run import ContainerHealthcheck, ContainerRun
from reconciler.planning.intents import GuestIntent
from reconciler.planning.inventory import OLD_SUFFIX, spec_hash
from reconciler.planning.observed import ContainerPort, ContainerVolume, GuestKind, ObservedContainer, ObservedGuest
from reconciler.planning.plan import Action, Address, Backend, Change, Plan
from reconciler.planning.pve_access import TemplateRow
from reconciler.spec.state import DesiredState

__all__ = ["EXIT_APPLIED", "EXIT_ROLLBACK_INCOMPLETE", "EXIT_ROLLED_BACK", "Applier", "ApplyReport", "HealthPolicy"]

EXIT_APPLIED = 0
EXIT_ROLLED_BACK = 1
EXIT_ROLLBACK_INCOMPLETE = 3


class GuestBackend(Protocol):
    def observe_guest(self, guest_type: GuestKind, node: str, vmid: int) -> ObservedGuest: ...
    def create_lxc(self, node: str, vmid: int, *, config: Mapping[str, str], timeout: float | None = None) -> None: ...
    def create_vm(self, node: str, vmid: int, *, config: Mapping[str, str], timeout: float | None = None) -> None: ...
    def update_config(
        self,
        guest_type: GuestKind,
        node: str,
        vmid: int,
        *,
        config: Mapping[str, str],
        delete: list[str] | tuple[str, ...] = (),
        digest: str | None = None,
    ) -> None: ...
    def start(self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float | None = None) -> None: ...
    def shutdown(
        self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float = 60.0, force_stop_after: bool = True
    ) -> None: ...
    def delete(self, guest_type: GuestKind, node: str, vmid: int, *, purge: bool = True) -> None: ...
    def resize(self, guest_type: GuestKind, node: str, vmid: int, *, disk: str, size: str) -> None: ...
    def move_volume(self, guest_type: GuestKind, node: str, vmid: int, *, disk: str, storage: str) -> None: ...
    def clone_vm(
        self, node: str, template: int, newid: int, *, params: Mapping[str, str], timeout: float | None = None
    ) -> None: ...
    def templates(self) -> list[TemplateRow]: ...


class ContainerBackend(Protocol):
    def container_state(self, host: str, name: str) -> ObservedContainer | None: ...
    def ensure_image(self, host: str, image: str) -> None: ...
    def create_container(self, host: str, spec: ContainerRun) -> str: ...
    def start_container(self, host: str, name: str) -> None: ...
    def stop_container(self, host: str, name: str, *, timeout: float = 10.0) -> None: ...
    def remove_container(self, host: str, name: str, *, force: bool = False) -> None: ...
    def rename_container(self, host: str, name: str, *, new_name: str) -> None: ...


@dataclass(frozen=True)
class HealthPolicy:
    """How long to wait. `max_timeout` caps every probe (tests and impatient people)."""

    guest_timeout: float = 300.0
    container_start_timeout: float = 60.0
    shutdown_timeout: float = 120.0
    max_timeout: float | None = None
    interval: float | None = None

    def cap(self, timeout: float) -> float:
        return min(timeout, self.max_timeout) if self.max_timeout is not None else timeout


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


@dataclass
class _Done:
    """An applied step, with what its undo needs."""

    change: Change
    before: dict[str, Any] | None
    step_id: int | None = None
    failed: bool = False  # the step itself failed: its journal entry keeps saying so (and why)
    inherited: bool = False  # taken over from an interrupted run: how far it got is not known


class Applier:
    def __init__(
        self,
        *,
        proxmox: GuestBackend | None,
        docker: ContainerBackend | None,
        journal: Journal,
        env: Mapping[str, str],
        docker_endpoints: Mapping[str, str],
        health: HealthPolicy | None = None,
        container_run: Callable[[Mapping[str, Any], Mapping[str, str]], ContainerRun] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_step: Callable[[StepReport], None] | None = None,
        prober: Callable[[str, Mapping[str, Any]], ProbeResult] | None = None,
        ssh_connect: Connect | None = None,
    ) -> None:
        self.proxmox = proxmox
        self.docker = docker
        self.journal = journal
        self.env = env
        self.endpoints = docker_endpoints
        self.health = health or HealthPolicy()
        self.container_run = container_run or container_run_from
        self.sleep = sleep
        self.on_step = on_step
        self.prober = prober  # replaces network probes (the demo's in-memory containers answer them)
        self.destroyed: set[str] = set()  # guests whose destroy was asked for in this run
        self.ssh_connect = ssh_connect  # replaces SSH (the demo's guests run steps in memory)

    # ---- the run -------------------------------------------------------------------------

    def apply(self, plan: Plan, desired: DesiredState) -> ApplyReport:
        if not plan.applicable:
            raise PlanError("the plan has conflicts or blockers; it cannot be applied")
        self._preflight(plan)
        self.provisioner = Provisioner(
            self.journal, self.env, desired, self.ssh_connect, connect_timeout=self.health.guest_timeout
        )
        inherited, resumed_from = self._take_over_interrupted()
        run_id = self.journal.start_run(revision=plan.revision, plan=plan.to_json(), resumed_from=resumed_from)
        report = ApplyReport(run_id, RunResult.RUNNING)
        done: list[_Done] = list(inherited)
        self.seq = 0
        deferred = [c for c in plan.changes if _irreversible(c)]
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
        self._record_inventory(run_id, plan, desired)
        # A run that took over an interrupted one completed that run's steps: it applied them.
        report.result = RunResult.APPLIED if plan.changes or inherited else RunResult.NOTHING
        self.journal.end_run(run_id, report.result)
        if plan.revision:
            self.journal.clear_failed(plan.revision)
        return report

    def _preflight(self, plan: Plan) -> None:
        """Refuse before touching anything: secrets that are not set, a backend that is not configured."""
        for change in plan.changes:
            if change.backend is Backend.DOCKER and self.docker is None:
                raise ConfigError(
                    "the plan changes containers but no Docker host is configured", resource=change.address
                )
            if change.backend is Backend.PROXMOX and self.proxmox is None:
                raise ConfigError("the plan changes guests but Proxmox is not configured", resource=change.address)
            for variable in (change.after or {}).get("secret_env", {}).values():
                if variable not in self.env:
                    raise ConfigError(
                        f"the secret variable {variable} is not set",
                        resource=change.resource,
                        hint="export it in the reconciler's environment",
                    )

    def _take_over_interrupted(self) -> tuple[list[_Done], int | None]:
        inherited: list[_Done] = []
        resumed_from = None
        for run in self.journal.unfinished_runs():
            resumed_from = run.id
            for step in self.journal.steps(run.id):
                if step.phase == "apply" and step.outcome in (StepOutcome.OK, StepOutcome.PENDING):
                    inherited.append(_Done(Change.from_json(step.intent), step.before, step.id, inherited=True))
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

    def _step(self, run_id: int, change: Change, report: ApplyReport, done: list[_Done]) -> None:
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
        done.append(_Done(change, before, step_id))
        try:
            match change.backend:
                case Backend.PROXMOX:
                    self._guest(change)
                case Backend.DOCKER:
                    self._container(change, before)
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

    # ---- Proxmox steps ------------------------------------------------------------------------

    def _guest(self, change: Change) -> None:
        assert self.proxmox is not None
        intent = GuestIntent.of(change)
        before = change.before or {}
        kind, node, vmid, running = intent.kind, intent.node, intent.vmid, intent.running
        match change.action:
            case Action.CREATE:
                create_guest(self.proxmox, intent, change.after or {}, self.env)
                if running:
                    self.proxmox.start(kind, node, vmid)
            case Action.UPDATE | Action.UPDATE_RESTART:
                restart = change.action is Action.UPDATE_RESTART and before.get("status") == "running"
                if restart:  # stop, set, start: a GPU is released before anything else claims it
                    self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
                self.proxmox.update_config(
                    kind,
                    node,
                    vmid,
                    config=intent.send,
                    delete=list(intent.delete),
                    digest=None if restart else before.get("digest"),
                )
                self._move_volumes(kind, node, vmid, intent.moves, intent.config)
                for disk, size in intent.grow.items():
                    self.proxmox.resize(kind, node, vmid, disk=disk, size=size)
                if running and (restart or before.get("status") != "running"):
                    self.proxmox.start(kind, node, vmid)
                elif not running and before.get("status") == "running":
                    self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
            case Action.START:
                self.proxmox.start(kind, node, vmid)
            case Action.STOP:
                self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
            case Action.DELETE | Action.REPLACE:
                self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
                self.destroyed.add(change.address)  # from here on, the guest's data may be gone
                self.proxmox.delete(kind, node, vmid)
                if change.action is Action.REPLACE:
                    create_guest(self.proxmox, intent, change.after or {}, self.env)
                    if running:
                        self.proxmox.start(kind, node, vmid)
            case _:
                assert_never(change.action)

    def _move_volumes(
        self, kind: GuestKind, node: str, vmid: int, moves: Mapping[str, str], desired: Mapping[str, str]
    ) -> None:
        """Move each volume with its data; then set what else the spec changes on it (`backup`, `mp`...), over the
        moved volume's new id."""
        assert self.proxmox is not None
        for disk, storage in sorted(moves.items()):
            self.proxmox.move_volume(kind, node, vmid, disk=disk, storage=storage)
        if not moves:
            return
        live = self.proxmox.observe_guest(kind, node, vmid).config
        rest = {
            disk: pve.update_value(kind, disk, desired[disk], live.get(disk))
            for disk in moves
            if disk in desired
            and any(f.name != "size" for d in pve.compare_config(kind, {disk: desired[disk]}, live) for f in d.fields)
        }
        if rest:
            self.proxmox.update_config(kind, node, vmid, config=rest)

    def _move_back(self, kind: GuestKind, node: str, vmid: int, done: _Done) -> list[str]:
        """Undo the moves of an update: each volume not on its old storage goes back there. Returns their keys."""
        assert self.proxmox is not None
        old = (done.change.before or {}).get("config", {})
        moves = (done.change.after or {}).get("move", {})
        live = self.proxmox.observe_guest(kind, node, vmid)
        back = {
            disk: storage
            for disk in moves
            if (storage := pve.volume_storage(kind, disk, old.get(disk)))
            and pve.volume_storage(kind, disk, live.config.get(disk)) not in (None, storage)
        }
        if back and kind == "lxc" and live.status == "running":  # a CT's volume moves only while it is stopped
            self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
        for disk, storage in sorted(back.items()):
            self.proxmox.move_volume(kind, node, vmid, disk=disk, storage=storage)
        return sorted(moves)

    def _undo_guest(self, done: _Done) -> None:
        assert self.proxmox is not None
        change = done.change
        after, before = change.after or {}, change.before or {}
        kind = GuestKind((after or before)["type"])
        node, vmid = (after or before)["node"], (after or before)["vmid"]
        was_running = before.get("status") == "running"
        match change.action:
            case Action.CREATE:
                try:
                    self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
                    self.proxmox.delete(kind, node, vmid)
                except NotFoundError:
                    pass  # the create never happened
            case Action.UPDATE | Action.UPDATE_RESTART:
                # Restore only what differs now: the step may have failed before changing anything (a lock,
                # a 500), and the same fault must not fail its undo too.
                moved = self._move_back(kind, node, vmid, done)
                old = before.get("config", {})
                keys = sorted({f.path.split(".")[0] for f in change.fields} - set(moved))
                live = self.proxmox.observe_guest(kind, node, vmid)
                now = {**live.config, **live.pending}
                for key in live.pending_delete:
                    now.pop(key, None)
                for key in set(after.get("resize", {})) & set(old):
                    # A grown disk keeps its new size (PVE cannot shrink one); its other fields go back.
                    old = {**old, key: pve.with_size_of(kind, key, old[key], now.get(key))}
                restore = {k: old[k] for k in keys if k in old and now.get(k) != old[k]}
                remove = [k for k in keys if k not in old and k in now]
                restart = change.action is Action.UPDATE_RESTART and was_running and bool(restore or remove)
                if restart:
                    self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
                self.proxmox.update_config(kind, node, vmid, config=restore, delete=remove)
                if was_running:
                    self.proxmox.start(kind, node, vmid)
                else:
                    self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
            case Action.START:
                self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
            case Action.STOP:
                self.proxmox.start(kind, node, vmid)
            case Action.DELETE | Action.REPLACE:
                self._undo_destroy(done, kind, node, vmid, was_running=was_running)
            case _:
                assert_never(change.action)

    def _undo_destroy(self, done: _Done, kind: GuestKind, node: str, vmid: int, *, was_running: bool) -> None:
        """A guest not yet destroyed gets its power state back; a destroyed one cannot come back: say what is lost.

        Destroyed: its destroy was asked for in this run (PVE removes the disks first, so a failed destroy
        may have lost data too), or an interrupted run's replace or delete left it in an unknown state.
        """
        assert self.proxmox is not None
        change = done.change
        live: ObservedGuest | None = None
        if change.address not in self.destroyed:
            try:
                live = self.proxmox.observe_guest(kind, node, vmid)
            except NotFoundError:
                live = None
        unsure = done.inherited and change.action is Action.REPLACE  # the new guest may stand where the old one was
        if live is not None and not unsure:
            if was_running and live.status != "running":
                self.proxmox.start(kind, node, vmid)
            return
        lost = "; ".join(change.loses) or "its volumes"
        raise PermanentError(
            f"{kind} {vmid} was destroyed and cannot be restored by a rollback; lost with it: {lost}",
            resource=change.address,
            hint="restore it from a backup (vzdump) if there is one",
        )

    # ---- Docker steps ---------------------------------------------------------------------------

    def _container(self, change: Change, before: Mapping[str, Any] | None) -> None:
        assert self.docker is not None
        after = change.after or {}
        host, name = _host_and_name(change)
        match change.action:
            case Action.CREATE:
                self.docker.ensure_image(host, after["image"])
                self.docker.create_container(host, self.container_run(after, self.env))
                if after.get("state") == "running":
                    self.docker.start_container(host, name)
            case Action.REPLACE:
                self.docker.ensure_image(host, after["image"])  # fail before the old container is touched
                old = self.docker.container_state(host, name)
                if old is not None:
                    if old.status in ("running", "restarting") and _holds_exclusive(old):
                        self.docker.stop_container(host, name, timeout=self.health.shutdown_timeout)
                    self.docker.rename_container(host, name, new_name=name + OLD_SUFFIX)
                self.docker.create_container(host, self.container_run(after, self.env))
                if after.get("state") == "running":
                    self.docker.start_container(host, name)
                if old is not None and old.status in ("running", "restarting"):
                    self.docker.stop_container(host, name + OLD_SUFFIX, timeout=self.health.shutdown_timeout)
            case Action.START:
                self.docker.start_container(host, name)
            case Action.STOP:
                self.docker.stop_container(host, name, timeout=self.health.shutdown_timeout)
            case Action.DELETE:
                self.docker.stop_container(host, name, timeout=self.health.shutdown_timeout)
                self.docker.rename_container(host, name, new_name=name + OLD_SUFFIX)
            case Action.UPDATE | Action.UPDATE_RESTART:
                raise PlanError("containers are replaced, not updated", resource=change.address)
            case _:
                assert_never(change.action)

    def _undo_container(self, done: _Done) -> None:
        assert self.docker is not None
        change = done.change
        host, name = _host_and_name(change)
        before = done.before or {}
        was_running = before.get("status") in ("running", "restarting")
        match change.action:
            case Action.CREATE:
                self.docker.remove_container(host, name, force=True)
            case Action.REPLACE | Action.DELETE:
                if change.action is Action.REPLACE:
                    self.docker.remove_container(host, name, force=True)
                if self.docker.container_state(host, name + OLD_SUFFIX) is not None:
                    self.docker.rename_container(host, name + OLD_SUFFIX, new_name=name)
                if was_running:
                    self.docker.start_container(host, name)
            case Action.START:
                self.docker.stop_container(host, name, timeout=self.health.shutdown_timeout)
            case Action.STOP:
                self.docker.start_container(host, name)
            case Action.UPDATE | Action.UPDATE_RESTART:
                pass
            case _:
                assert_never(change.action)

    # ---- health ------------------------------------------------------------------------------------

    def _check(self, change: Change) -> ProbeResult | None:
        """Health after a step that starts something; None when the step needs no check."""
        after = change.after or {}
        if change.action in (Action.STOP, Action.DELETE) or after.get("state") != "running":
            return None
        match change.backend:
            case Backend.PROXMOX:
                return self._guest_running(after)
            case Backend.DOCKER:
                return self._container_healthy(change, after.get("probe"), load=after.get("load"))
            case Backend.SSH:
                return None  # a step's own exit code is its check
            case _:
                assert_never(change.backend)

    def _guest_running(self, after: Mapping[str, Any]) -> ProbeResult:
        assert self.proxmox is not None
        kind, node, vmid = after["type"], after["node"], after["vmid"]

        def check() -> ProbeResult:
            status = self.proxmox.observe_guest(kind, node, vmid).status  # type: ignore[union-attr]
            return ProbeResult(status == "running", f"{kind}/{vmid} is {status}")

        return poll(
            check,
            timeout=self.health.cap(self.health.guest_timeout),
            interval=self.health.interval or 2.0,
            sleep=self.sleep,
        )

    def _container_healthy(
        self, change: Change, probe: Mapping[str, Any] | None, *, load: str | None = None
    ) -> ProbeResult:
        """Running (and Docker-healthy, and answering `probe`); with `load`, also holding that Ollama model."""
        assert self.docker is not None
        host, name = _host_and_name(change)
        first = self.docker.container_state(host, name)
        restarts = first.restart_count if first else 0

        def died() -> str | None:
            state = self.docker.container_state(host, name)  # type: ignore[union-attr]
            if state is None:
                return "the container is gone"
            if state.status in ("exited", "dead"):
                return f"the container {state.status} while starting"
            if state.restart_count > restarts or state.status == "restarting":
                return "the container restarted while starting"
            if state.health == "unhealthy":
                return "Docker reports the container unhealthy"
            return None

        def check() -> ProbeResult:
            state = self.docker.container_state(host, name)  # type: ignore[union-attr]
            if state is None or state.status != "running":
                return ProbeResult(False, f"container is {state.status if state else 'gone'}")
            if state.health not in (None, "healthy"):
                return ProbeResult(False, f"Docker health is {state.health}")
            if not probe:
                return ProbeResult(True, "container running" + (" and healthy" if state.health else ""))
            return self._probe(host, probe)

        timeout = float(probe.get("timeout", 60.0)) if probe else self.health.container_start_timeout
        interval = self.health.interval or (float(probe.get("interval", 2.0)) if probe else 1.0)
        result = poll(check, timeout=self.health.cap(timeout), interval=interval, still_starting=died, sleep=self.sleep)
        if not result.healthy or not load:
            return result
        # The server answers; the model it is there for must be pulled and sit on its GPUs too.
        port = (probe or {}).get("port")
        return self._probe(host, {"ollama_load": load, "port": port, "timeout": timeout})

    def _probe(self, host: str, probe: Mapping[str, Any]) -> ProbeResult:
        if self.prober is not None:
            return self.prober(host, probe)
        address = endpoint_address(self.endpoints.get(host, "unix:///"))
        if probe.get("ollama_load"):
            timeout = self.health.cap(float(probe.get("timeout", 900.0)))
            return ollama_load(f"http://{address}:{probe.get('port')}", str(probe["ollama_load"]), timeout=timeout)
        if probe.get("http"):
            url = str(probe["http"])
            if url.startswith("/"):
                url = f"http://{address}:{probe.get('port')}{url}"
            return probe_http(url, status=int(probe.get("status", 200)), body=probe.get("body"))
        target = str(probe["tcp"])
        return probe_tcp(target if ":" in target else f"{address}:{target}")

    # ---- rollback and finishing -----------------------------------------------------------------

    def _rollback(self, run_id: int, done: list[_Done], report: ApplyReport) -> None:
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
                        self._undo_guest(item)
                    case Backend.DOCKER:
                        self._undo_container(item)
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

    def _check_restored(self, item: _Done) -> ProbeResult | None:
        """After an undo, what was running before runs again (containers: and is healthy by Docker's word)."""
        before = item.before or {}
        if before.get("status") not in ("running", "restarting"):
            return None
        match item.change.backend:
            case Backend.PROXMOX:
                return self._guest_running(item.change.before or {})
            case Backend.DOCKER:
                return self._container_healthy(item.change, None)
            case Backend.SSH:
                return None
            case _:
                assert_never(item.change.backend)

    def _finalize(self, run_id: int, done: list[_Done], report: ApplyReport) -> None:
        """Everything is healthy: remove what was kept for a rollback."""
        if self.docker is None:
            return
        for item in done:
            if item.change.backend is not Backend.DOCKER or item.change.action not in (Action.REPLACE, Action.DELETE):
                continue
            host, name = _host_and_name(item.change)
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

    def _record_inventory(self, run_id: int, plan: Plan, desired: DesiredState) -> None:
        """What this run leaves owned, with the spec it was applied from (later differences read as drift)."""
        for change in plan.changes:
            if change.action is Action.DELETE:
                self.journal.forget_under(change.address)
                if change.backend is Backend.PROXMOX:  # the containers of a Docker engine in it went with it
                    self.journal.forget_under(f"container/{change.where.name}")
        for resource in desired.resources:
            address = Address.of(resource)
            if address is not None:
                self.journal.record_owned(
                    str(address),
                    resource=resource.ref,
                    backend=address.backend,
                    spec_hash=spec_hash(resource, desired),
                    protected=resource.protect,
                    run_id=run_id,
                    vmid=getattr(resource, "vmid", None),
                )

    def _capture(self, change: Change) -> dict[str, Any] | None:
        """The state to restore: for containers, what Docker holds right now."""
        if change.backend is not Backend.DOCKER:
            return dict(change.before) if change.before else None
        assert self.docker is not None
        host, name = _host_and_name(change)
        state = self.docker.container_state(host, name)
        if state is None:
            return None
        return {
            "status": state.status,
            "health": state.health,
            "image": state.image,
            "id": state.id,
            "restart_count": state.restart_count,
        }


def _irreversible(change: Change) -> bool:
    return change.backend is Backend.PROXMOX and change.action in (Action.DELETE, Action.REPLACE)


def _holds_exclusive(container: ObservedContainer) -> bool:
    """A container that publishes host ports or holds GPUs must stop before its replacement starts."""
    return bool(container.ports or container.gpus)


def _host_and_name(change: Change) -> tuple[str, str]:
    where = change.where
    assert where.host is not None, "a Docker change has a container address"
    return where.host, where.name


def container_run_from(after: Mapping[str, Any], env: Mapping[str, str]) -> ContainerRun:
    """The container a planned `Change.after` describes, with its secret references resolved from `env` now."""
    variables = dict(after.get("env", {}))
    for key, variable in after.get("secret_env", {}).items():
        variables[key] = env[variable]
        redact.register(variables[key])  # read now, hidden from every message from now on
    health = after.get("healthcheck")
    return ContainerRun(
        name=after["name"],
        image=after["image"],
        command=tuple(after["command"]) if after.get("command") is not None else None,
        entrypoint=tuple(after["entrypoint"]) if after.get("entrypoint") is not None else None,
        env=variables,
        labels=dict(after.get("labels", {})),
        ports=tuple(ContainerPort(bind=p[0], host=p[1], container=p[2], protocol=p[3]) for p in after.get("ports", ())),
        volumes=tuple(ContainerVolume(host=v[0], path=v[1], readonly=v[2]) for v in after.get("volumes", ())),
        gpus=tuple(after.get("gpus", ())),
        devices=tuple(after.get("devices", ())),
        restart=after.get("restart", "unless-stopped"),
        shm_size=after.get("shm_size"),
        ipc=after.get("ipc"),
        network_mode=after.get("network_mode"),
        healthcheck=ContainerHealthcheck(
            test=tuple(health["test"]),
            interval=health["interval"],
            timeout=health["timeout"],
            retries=health["retries"],
            start_period=health["start_period"],
        )
        if health
        else None,
    )


__all__ += ["StepRecord", "container_run_from"]

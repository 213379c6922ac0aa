"""One reconcile pass for `apply`: observe, plan, check the guard rails, confirm, apply, verify.

The CLI and the demo call `apply_pass` with backends they built (real or in
memory). A saved plan is executed only if it is for this lab, this revision
and this plan format, and planning again now gives the same plan in every
field (otherwise it is stale or edited, and refused before anything is
touched). The guard rails (`max_deletes`, `protect`) are the plan's own
blockers, so `plan` shows them too.

Protection takes effect from the revision that declares it: before anything
else, an apply records `protect` as declared for the resources that exist
already, whether or not the plan changes anything, and whatever the run's
outcome.

After a crash, a Proxmox task the killed run was waiting for goes on without
it: a guest being created is locked and not yet tagged, and would read as
someone else's. So before a pass that resumes an interrupted run observes for
its plan, it waits (up to `settle_timeout`) until the guests of that run's
unfinished steps are no longer locked by a create or a destroy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from reconciler.engine.apply import Applier, ApplyReport, ContainerBackend, GuestBackend, HealthPolicy, StepReport
from reconciler.engine.journal import Journal, StepOutcome
from reconciler.engine.observe import Readers, observe
from reconciler.engine.provision_apply import Connect, with_provisioning
from reconciler.engine.steps_docker import Prober
from reconciler.engine.steps_gpu import GpuSetter
from reconciler.engine.switch import GpuMemory
from reconciler.errors import PlanError, TemporaryError
from reconciler.planning.plan import Action, Address, Backend, Plan
from reconciler.planning.planner import make_plan
from reconciler.spec.models import Lxc, Vm
from reconciler.spec.state import DesiredState

__all__ = ["ApplyOptions", "apply_pass", "check_saved_plan", "plan_pass", "record_protection"]


@dataclass(frozen=True)
class ApplyOptions:
    allow_delete: bool = False
    adopt_orphans: bool = False  # take over what carries an owner mark this lab cannot prove is its own
    retry: bool = False
    health: HealthPolicy = field(default_factory=HealthPolicy)
    prober: Prober | None = None  # the demo answers probes in memory
    ssh_connect: Connect | None = None  # the demo's guests run provisioning steps in memory
    on_output: Callable[[str, str, str], None] | None = None  # a provisioning step's output line: address, step, line
    settle_timeout: float = 600.0  # how long to wait for the tasks an interrupted run left running
    settle_interval: float = 1.0


# The locks PVE holds on a guest while a create or destroy task runs.
TASK_LOCKS = frozenset({"create", "destroyed"})


def plan_pass(
    desired: DesiredState,
    readers: Readers,
    journal: Journal | None = None,
    *,
    allow_delete: bool = False,
    adopt_orphans: bool = False,
) -> Plan:
    inventory = journal.inventory() if journal is not None else None
    observed = observe(desired, readers)
    plan = make_plan(desired, observed, inventory, allow_delete=allow_delete, adopt_orphans=adopt_orphans)
    return with_provisioning(plan, desired, observed, journal)


def apply_pass(
    desired: DesiredState,
    readers: Readers,
    *,
    proxmox: GuestBackend | None,
    docker: ContainerBackend | None,
    journal: Journal,
    env: Mapping[str, str],
    docker_endpoints: Mapping[str, str],
    options: ApplyOptions = ApplyOptions(),
    saved_plan: Plan | None = None,
    confirm: Callable[[Plan], bool] = lambda plan: True,
    on_step: Callable[[StepReport], None] | None = None,
) -> tuple[Plan, ApplyReport | None]:
    """Plan and apply. Returns the plan, and the report (None when not confirmed or nothing to do)."""
    if desired.revision and not options.retry:
        failed = journal.failed_revision(desired.revision)
        if failed is not None:
            raise PlanError(
                f"revision {desired.revision} failed before ({failed}); it is not retried until something changes",
                hint="commit a fix, or pass --retry to try it again",
            )
    _settle_interrupted(journal, readers, options)
    plan = plan_pass(desired, readers, journal, allow_delete=options.allow_delete, adopt_orphans=options.adopt_orphans)
    if saved_plan is not None:
        check_saved_plan(saved_plan, plan)
    record_protection(journal, desired, plan)
    if not plan.applicable:
        return plan, None
    if (plan.empty and not journal.unfinished_runs()) or not confirm(plan):
        return plan, None
    applier = Applier(
        proxmox=proxmox,
        docker=docker,
        journal=journal,
        env=env,
        docker_endpoints=docker_endpoints,
        health=options.health,
        on_step=on_step,
        prober=options.prober,
        gpus=readers.nvml if isinstance(readers.nvml, GpuMemory) else None,  # waited on in exclusive switches
        gpu_setter=readers.nvml if isinstance(readers.nvml, GpuSetter) else None,  # sets GPU settings
        ssh_connect=options.ssh_connect,
        on_output=options.on_output,
    )
    return plan, applier.apply(plan, desired)


def check_saved_plan(saved: Plan, fresh: Plan) -> None:
    """Refuse a saved plan unless it is exactly what planning now gives: same lab, format, revision, and
    every change, before and after, field by field. Then the fresh plan is executed, never the file."""
    if saved.format != fresh.format:
        raise PlanError(
            f"the saved plan has format {saved.format}; this reconciler reads format {fresh.format}",
            hint="run `reconciler plan --out` again",
        )
    if saved.lab != fresh.lab:
        raise PlanError(
            f"the saved plan is for lab {saved.lab!r}, the spec is lab {fresh.lab!r}",
            hint="apply it with that lab's spec, or run `reconciler plan --out` again",
        )
    if saved.revision != fresh.revision:
        raise PlanError(
            f"the saved plan is for revision {saved.revision}, the spec is at {fresh.revision}",
            hint="run `reconciler plan --out` again",
        )
    if saved.observed_digest != fresh.observed_digest:
        raise PlanError(
            "the live state changed since the plan was saved (stale plan)", hint="run `reconciler plan --out` again"
        )
    if saved.to_json() != fresh.to_json():
        raise PlanError(
            f"the saved plan differs from what planning gives now: {_first_difference(saved, fresh)}; "
            "it was edited, or made with other options; nothing was applied",
            hint="run `reconciler plan --out` again and review it",
        )


def _first_difference(saved: Plan, fresh: Plan) -> str:
    theirs, ours = saved.to_json(), fresh.to_json()
    for key in ours:
        if key != "changes" and theirs.get(key) != ours[key]:
            return f"its {key} differ"
    for index, (one, other) in enumerate(zip(saved.changes, fresh.changes, strict=False)):
        mine, its = one.to_json(), other.to_json()
        if mine != its:
            fields = sorted(k for k in its if mine.get(k) != its.get(k))
            return f"change {index + 1} ({other.address}) differs in {', '.join(fields)}"
    return f"it has {len(saved.changes)} changes, planning now gives {len(fresh.changes)}"


def record_protection(journal: Journal, desired: DesiredState, plan: Plan) -> None:
    """Record `protect` as declared for every resource that exists now (not being created by this plan)."""
    created = {c.address for c in plan.changes if c.action is Action.CREATE}
    disputed = {p.resource for p in plan.conflicts}
    for resource in desired.resources:
        if resource.ref in disputed:
            continue
        where = Address.of(resource)
        if where is None or str(where) in created:
            continue
        vmid = resource.vmid if isinstance(resource, Lxc | Vm) else None
        journal.record_protection(
            str(where), resource=resource.ref, backend=where.backend, protected=resource.protect, vmid=vmid
        )


def _settle_interrupted(
    journal: Journal, readers: Readers, options: ApplyOptions, *, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Wait until no guest of an interrupted run's unfinished step is locked by a create or destroy task."""
    touched: set[int] = set()
    for run in journal.unfinished_runs():
        for step in journal.steps(run.id):
            if step.phase != "apply" or step.outcome is not StepOutcome.PENDING:
                continue
            if step.intent.get("backend") != Backend.PROXMOX:
                continue
            side = step.intent.get("after") or step.intent.get("before") or {}
            if side.get("vmid") is not None:
                touched.add(int(side["vmid"]))
    if not touched or readers.proxmox is None:
        return
    deadline = time.monotonic() + options.settle_timeout
    while True:
        seen = readers.proxmox.observe()
        busy = sorted(g.vmid for g in seen.guests if g.vmid in touched and g.lock in TASK_LOCKS)
        if not busy:
            return
        if time.monotonic() >= deadline:
            raise TemporaryError(
                f"guests {', '.join(map(str, busy))} are still locked by tasks an interrupted run started",
                hint="wait for the tasks to end, then apply again",
            )
        sleep(options.settle_interval)

"""One reconcile pass for `apply`: observe, plan, check the guard rails, confirm, apply, verify.

The CLI and the demo call `apply_pass` with backends they built (real or in
memory). A saved plan is executed only if planning again now gives the same
plan from the same revision (otherwise it is stale and refused).

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
from typing import Any

from reconciler.engine.apply import Applier, ApplyReport, ContainerBackend, GuestBackend, HealthPolicy, StepReport
from reconciler.engine.health import ProbeResult
from reconciler.engine.journal import Journal, StepOutcome
from reconciler.engine.observe import Readers, observe
from reconciler.errors import PlanError, TemporaryError
from reconciler.planning.plan import Action, Plan
from reconciler.planning.planner import make_plan
from reconciler.spec.state import DesiredState

__all__ = ["ApplyOptions", "apply_pass", "plan_pass"]


@dataclass(frozen=True)
class ApplyOptions:
    allow_delete: bool = False
    retry: bool = False
    health: HealthPolicy = field(default_factory=HealthPolicy)
    prober: Callable[[str, Mapping[str, Any]], ProbeResult] | None = None  # the demo answers probes in memory
    settle_timeout: float = 600.0  # how long to wait for the tasks an interrupted run left running
    settle_interval: float = 1.0


# The locks PVE holds on a guest while a create or destroy task runs.
TASK_LOCKS = frozenset({"create", "destroyed"})


def plan_pass(desired: DesiredState, readers: Readers, journal: Journal | None = None) -> Plan:
    inventory = journal.inventory() if journal is not None else None
    return make_plan(desired, observe(desired, readers), inventory)


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
    plan = plan_pass(desired, readers, journal)
    if saved_plan is not None:
        if saved_plan.revision != plan.revision:
            raise PlanError(
                f"the saved plan is for revision {saved_plan.revision}, the spec is at {plan.revision}",
                hint="run `reconciler plan --out` again",
            )
        if saved_plan.observed_digest != plan.observed_digest:
            raise PlanError(
                "the live state changed since the plan was saved (stale plan)", hint="run `reconciler plan --out` again"
            )
        plan = saved_plan
    destructive = sum(
        1 for c in plan.changes if c.action is Action.DELETE or (c.action is Action.REPLACE and c.backend == "proxmox")
    )
    if destructive > desired.lab.max_deletes and not options.allow_delete:
        raise PlanError(
            f"the plan deletes or recreates {destructive} resources; the lab allows {desired.lab.max_deletes}",
            hint="review the plan, then pass --allow-delete",
        )
    for change in plan.changes:
        resource = desired.find(change.resource)
        if (
            resource is not None
            and resource.protect
            and change.action in (Action.DELETE, Action.REPLACE)
            and change.backend == "proxmox"
        ):
            raise PlanError(f"{change.address} is protected and the plan would recreate it", resource=change.resource)
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
    )
    return plan, applier.apply(plan, desired)


def _settle_interrupted(
    journal: Journal, readers: Readers, options: ApplyOptions, *, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Wait until no guest of an interrupted run's unfinished step is locked by a create or destroy task."""
    touched: set[int] = set()
    for run in journal.unfinished_runs():
        for step in journal.steps(run.id):
            if step.phase != "apply" or step.outcome is not StepOutcome.PENDING:
                continue
            if step.intent.get("backend") != "proxmox":
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

"""Provisioning steps as changes of the plan: `provision/llm`, shown, saved and applied like any change.

Pure. Who calls it: the pass (`engine/run.py`'s plan_pass), after `make_plan`, with the built-in
scripts, the inputs observed on the host (its NVIDIA driver version, from NVML) and the step hashes the
journal recorded per guest. It adds one change per guest or Docker host whose steps are due
(`planning.provision`: new, or changed script, version, inputs or check), placed right after the
guest's own change (a guest is created and started before anything runs in it) and before the first
container change on that host (Docker must be there before its containers).

The change's `after` is a `ProvisionIntent`: the SSH target, the steps with their source, hash and
why each runs, the inputs, the guest address and `fresh` (the guest is created or replaced by this
plan: every step runs, and what was recorded for the old one is forgotten). The script text is never
in it; the applier takes the scripts from the same revision and checks each hash before it runs a step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from reconciler.planning.plan import Action, Address, AddressKind, Backend, Change, FieldChange, Plan, Problem, Timing
from reconciler.planning.provision import (
    DRIVER_VERSION_INPUT,
    BuiltinScript,
    ProvisionChange,
    RunReason,
    StepInputMissing,
    plan_provisioning,
)
from reconciler.planning.provision_intent import DueStep, ProvisionIntent, ProvisionSeen
from reconciler.spec.access import BuiltinStep
from reconciler.spec.models import DockerHost, ExclusiveGroup, Lxc, PowerState, Vm
from reconciler.spec.placement import member_of
from reconciler.spec.state import DesiredState

__all__ = ["add_provisioning", "provision_address", "step_inputs"]


def provision_address(name: str) -> str:
    """Where a guest's (or Docker host's) provisioning lives in plans and in the journal: `provision/llm`."""
    return str(Address(AddressKind.PROVISION, name))


def step_inputs(driver_version: str | None) -> dict[str, str]:
    """The inputs built-in steps read, from what was observed (the host's NVIDIA driver, through NVML)."""
    return {DRIVER_VERSION_INPUT: driver_version} if driver_version else {}


def add_provisioning(
    plan: Plan,
    desired: DesiredState,
    *,
    builtins: Mapping[BuiltinStep, BuiltinScript],
    inputs: Mapping[str, str],
    recorded: Mapping[str, Mapping[str, str]],
) -> Plan:
    """`plan` with a provisioning change for each guest or Docker host that has steps due."""
    changes = list(plan.changes)
    blockers = list(plan.blockers)
    guest_changes = {c.where.name: c for c in plan.changes if c.backend is Backend.PROXMOX}
    hosts: list[Lxc | Vm | DockerHost] = [*desired.of(Lxc), *desired.of(Vm), *desired.of(DockerHost)]
    for resource in hosts:
        if not resource.provision:
            continue
        guest_change = guest_changes.get(resource.name)
        fresh = guest_change is not None and guest_change.action in (Action.CREATE, Action.REPLACE)
        address = provision_address(resource.name)
        try:
            found = plan_provisioning(
                resource,
                files=desired.files,
                builtins=builtins,
                observed=inputs,
                recorded={} if fresh else recorded.get(address, {}),
            )
        except StepInputMissing as exc:
            blockers.append(Problem(resource.ref, str(exc), "check the host's NVIDIA driver (NVML)"))
            continue
        if found is None:
            continue
        if isinstance(resource, Lxc | Vm) and _kept_stopped(resource, desired):
            continue  # nothing runs in a stopped guest: its steps run once it is declared (or made) running
        change = _change(found, resource, recorded.get(address, {}), guest_change, fresh=fresh, inputs=inputs)
        changes.insert(_position(changes, resource.name, guest_change), change)
    return dataclasses.replace(plan, changes=tuple(changes), blockers=tuple(blockers))


def _change(
    found: ProvisionChange,
    resource: Lxc | Vm | DockerHost,
    recorded: Mapping[str, str],
    guest_change: Change | None,
    *,
    fresh: bool,
    inputs: Mapping[str, str],
) -> Change:
    used = sorted({name for step, _ in found.due for name in step.inputs})
    after = ProvisionIntent(
        resource=found.ref,
        ssh=str(found.target),
        steps=tuple(DueStep(step.key, step.source, step.hash, reason) for step, reason in found.due),
        guest=guest_change.address if guest_change is not None else None,
        fresh=fresh,
        inputs={name: inputs[name] for name in used},
        timeouts={step.key: step.timeout for step, _ in found.due},
    )
    before = None if fresh or not recorded else ProvisionSeen(dict(sorted(recorded.items())))
    fields = tuple(
        FieldChange(f"steps.{step.key}", None if fresh else recorded.get(step.key), step.hash, Timing.LIVE)
        for step, _ in found.due
    )
    reasons = "; ".join(f"{step.key} ({step.source}): {_why(reason)}" for step, reason in found.due)
    return Change(
        provision_address(resource.name),
        Action.CREATE if all(reason is RunReason.NEW for _, reason in found.due) else Action.UPDATE,
        resource.ref,
        Backend.SSH,
        before=before,
        after=after,
        fields=fields,
        reason=f"runs over ssh://{found.target}: {reasons}",
        depends_on=(guest_change.address,) if guest_change is not None else (),
    )


def _kept_stopped(guest: Lxc | Vm, desired: DesiredState) -> bool:
    """Declared stopped, or an inactive member of its exclusive group (kept stopped by the planner)."""
    if guest.state is PowerState.STOPPED:
        return True
    group = desired.get(ExclusiveGroup, guest.exclusive.group) if guest.exclusive is not None else None
    return group is not None and group.active != member_of(guest)


def _why(reason: RunReason) -> str:
    match reason:
        case RunReason.NEW:
            return "new, never run here"
        case RunReason.CHANGED:
            return "changed (its script, version, inputs or check)"


def _position(changes: list[Change], name: str, guest_change: Change | None) -> int:
    """After the guest's change; else before the first container change on that host; else at the end."""
    if guest_change is not None and guest_change in changes:
        return changes.index(guest_change) + 1
    for index, change in enumerate(changes):
        if change.backend is Backend.DOCKER and change.where.host == name:
            return index
    return len(changes)

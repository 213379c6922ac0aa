"""What a pass found, in the words of `events`: drift reports, resource states, GPUs, the git note text.

Who calls it: the pass runner (after each pass) and the controller (for the
status snapshot). Pure functions of the plan, the spec and one NVML reading.
"""

from __future__ import annotations

import time

from reconciler.engine.observe import Readers
from reconciler.errors import ReconcilerError
from reconciler.loop.events import DriftReport, GpuStatus, Outcome, PassRecord, ResourceStatus
from reconciler.planning.plan import Change, Plan
from reconciler.spec.models import DriftPolicy, Lxc, Vm
from reconciler.spec.state import DesiredState

__all__ = ["drift_reports", "gpu_statuses", "note_text", "resource_address", "resource_statuses"]


def drift_reports(plan: Plan, target: DesiredState, *, corrected: bool) -> tuple[DriftReport, ...]:
    """Every drift in the plan: what the pass corrects (`correct`) and what `warn` leaves alone.

    Drift under `ignore` is not reported: the spec says it is nobody's business.
    """
    reports = [DriftReport(c.address, _paths(c), str(DriftPolicy.CORRECT), corrected) for c in plan.changes if c.drift]
    for change in plan.held_drift:
        resource = target.find(change.resource)
        policy = resource.drift if resource is not None else DriftPolicy.WARN
        if policy is DriftPolicy.WARN:
            reports.append(DriftReport(change.address, _paths(change), str(policy), False))
    return tuple(reports)


def _paths(change: Change) -> tuple[str, ...]:
    return tuple(f.path for f in change.fields) or (str(change.action),)


def resource_address(resource: object) -> str:
    """The plan's address of a guest or workload: lxc/llm, qemu/desktop, container/llm/qwen-7b."""
    if isinstance(resource, Lxc):
        return f"lxc/{resource.name}"
    if isinstance(resource, Vm):
        return f"qemu/{resource.name}"
    return f"container/{getattr(resource, 'host', '')}/{getattr(resource, 'name', '')}"


def resource_statuses(
    target: DesiredState | None, plan: Plan | None, last: PassRecord | None
) -> tuple[ResourceStatus, ...]:
    """Each guest and workload of the revision in force, as the last pass left it."""
    if target is None:
        return ()
    changes = {c.address: c for c in plan.changes} if plan is not None else {}
    held = {d.address for d in drift_reports(plan, target, corrected=False) if not d.corrected} if plan else set()
    outcome = last.outcome if last is not None else None
    statuses = []
    for resource in (*target.guests(), *target.workloads()):
        address = resource_address(resource)
        change = changes.get(address)
        if change is not None:
            statuses.append(ResourceStatus(address, _state_of(change, outcome), f"{change.action}: {change.reason}"))
        elif address in held:
            statuses.append(ResourceStatus(address, "drifted", f"drift: {resource.drift}"))
        else:
            statuses.append(ResourceStatus(address, "in-sync"))
    return tuple(statuses)


def _state_of(change: Change, outcome: Outcome | None) -> str:
    if outcome is Outcome.APPLIED:
        return "in-sync"
    if outcome in (Outcome.ROLLED_BACK, Outcome.ROLLBACK_INCOMPLETE):
        return "failed"
    return "drifted" if change.drift else "changing"  # not applied (yet): suspended, refused, an error


def gpu_statuses(readers: Readers) -> tuple[GpuStatus, ...]:
    """One NVML reading of every GPU; nothing when NVML is not configured or cannot be read."""
    if readers.nvml is None:
        return ()
    try:
        seen = readers.nvml.observe()
    except ReconcilerError:
        return ()
    return tuple(
        GpuStatus(
            name=gpu.name,
            uuid=gpu.uuid,
            memory_used=gpu.memory_used,
            memory_total=gpu.memory_total,
            utilization=float(gpu.utilization) if gpu.utilization is not None else None,
            temperature=float(gpu.temperature) if gpu.temperature is not None else None,
            power=gpu.power_usage,
        )
        for gpu in seen.gpus
        if not gpu.lost
    )


# Outcomes worth a line in the commit's note; temporary errors and suspended passes are not.
_NOTED = frozenset(
    {
        Outcome.APPLIED,
        Outcome.NO_CHANGES,
        Outcome.ROLLED_BACK,
        Outcome.ROLLBACK_INCOMPLETE,
        Outcome.INVALID,
        Outcome.REFUSED,
    }
)


def note_text(record: PassRecord, *, with_time: bool) -> str | None:
    """The git note line(s) for a pass, or None when it is not news for the commit."""
    if record.outcome not in _NOTED:
        return None
    when = time.strftime(" at %Y-%m-%dT%H:%M:%SZ", time.gmtime(record.started)) if with_time else ""
    lines = [f"reconciler: {record.outcome}{when} (pass {record.number}, {record.trigger})"]
    lines += [f"  {change}" for change in record.changes]
    lines += [
        f"  drift {d.address}: {', '.join(d.fields)} ({'corrected' if d.corrected else d.policy})" for d in record.drift
    ]
    if record.message:
        lines.append(f"  {record.message}")
    lines += [f"  {d}" for d in record.diagnostics[:20]]
    return "\n".join(lines)

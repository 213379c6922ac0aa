"""What an exclusive switch costs, said in the plan: which models stop and start, the VRAM that moves, the waits.

Called by `make_plan` on the ordered changes (pure: no I/O). A group switches when the plan stops (or
deletes) some of its members and starts (or creates, or replaces) others; each starting member's
`reason` then says what the switch does, for people reading the plan (never used for decisions). The
VRAM is the declared `vram` per GPU, or vLLM's `gpu_memory_utilization` x the GPU's size (what vLLM
takes); "?" where neither is known. The applier waits as it says (engine/switch.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

from reconciler.planning.container_run import ContainerRun
from reconciler.planning.plan import Action, Change
from reconciler.spec.models import Gpu, Model, PowerState, Workload
from reconciler.spec.placement import member_of
from reconciler.spec.state import DesiredState

__all__ = ["describe_switches"]

_STOPPING = (Action.STOP, Action.DELETE)
_STARTING = (Action.CREATE, Action.START, Action.REPLACE)
_PHASES = "starting, ready (/v1/models lists it), working (one token)"
GIB = 2**30


def describe_switches(changes: Sequence[Change], desired: DesiredState) -> tuple[Change, ...]:
    """The changes, with the starting members of each switching group told the cost of the switch."""
    members: dict[str, list[tuple[Change, Workload]]] = defaultdict(list)
    for change in changes:
        resource = desired.find(change.resource)
        if isinstance(resource, Workload) and resource.exclusive is not None:
            members[resource.exclusive.group].append((change, resource))
    told: dict[str, str] = {}
    for group, entries in sorted(members.items()):
        stopping = [w for c, w in entries if c.action in _STOPPING]
        starting = [(c, w) for c, w in entries if c.action in _STARTING and _starts(c)]
        if not stopping or not starting:
            continue
        to = member_of(starting[0][1])
        frees = "; ".join(f"{w.name} {_footprint(w, desired)}" for w in stopping)
        for change, workload in starting:
            waits = _PHASES if isinstance(workload, Model) else "running"
            told[change.address] = (
                f"{change.reason}; switch of group {group} to {to}: stops {frees}; starts {workload.name}"
                f" {_footprint(workload, desired)} once NVML shows that memory free, then waits for {waits}"
            ).lstrip("; ")
    return tuple(replace(c, reason=told[c.address]) if c.address in told else c for c in changes)


def _starts(change: Change) -> bool:
    return isinstance(change.after, ContainerRun) and change.after.state is PowerState.RUNNING


def _footprint(workload: Workload, desired: DesiredState) -> str:
    """`(21.1 GiB on gpu0, 21.6 GiB on gpu1)`: what the workload holds on each of its GPUs."""
    if not workload.gpus:
        return "(no GPU)"
    sizes = {g.name: g.vram for g in desired.of(Gpu)}
    fraction = _vllm_fraction(workload)
    parts = []
    for name in workload.gpus:
        if workload.vram is not None:
            held = f"{workload.vram / GIB:.1f} GiB"
        elif fraction is not None and name in sizes:
            held = f"{fraction * sizes[name] / GIB:.1f} GiB"
        else:
            held = "? GiB"
        parts.append(f"{held} on {name}")
    return f"({', '.join(parts)})"


def _vllm_fraction(workload: Workload) -> float | None:
    if not isinstance(workload, Model) or workload.engine.value != "vllm":
        return None
    value = workload.args.get("gpu_memory_utilization", 0.9)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

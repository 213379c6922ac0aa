"""The planner's GPU decisions for one pass: where role work runs, which hand-started VMs are respected.

Pure. The planner's GPU piece calls `gpu_decisions()` once, before it plans
containers; it reads what the spec asks (roles, priorities, VMs and their
passthrough), what was seen (`gpuview.GpuSight`: lost and missing GPUs; the
running guests; where each container runs now and since when; the model
files' shapes) and answers:

- `seats`: for each running workload that asks for a role, its GPUs or a
  stop, with the reason of any move (`planning.placement`);
- `respected`: VMs that run although the spec would stop them (started by
  hand), kept running because no work of a strictly higher priority needs
  their GPUs; their GPUs are taken for this pass;
- `warnings`: one per move, stop and respected VM, saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from reconciler.planning.gpuload import Seat as LoadSeat
from reconciler.planning.gpuload import gpu_load
from reconciler.planning.gpusettings import settings_changes
from reconciler.planning.gpuview import GpuSight, gpu_sight
from reconciler.planning.observed import Observed, ObservedContainer
from reconciler.planning.placement import Ask, GpuState, Pinned, Seat, place, vm_holds_by_priority
from reconciler.planning.plan import Backend, Change, Problem
from reconciler.planning.vram import GpuSlot, footprint_of
from reconciler.spec.models import Gpu, GpuRole, Model, PowerState, Vm, Workload
from reconciler.spec.placement import place_role
from reconciler.spec.state import DesiredState

__all__ = ["GpuDecisions", "GpuFinish", "GpuPass", "gpu_decisions"]

PowerOf = Callable[[Vm | Workload], PowerState]


@dataclass(frozen=True, slots=True)
class GpuDecisions:
    seats: Mapping[str, Seat]  # workload name -> seat
    respected: frozenset[str]  # names of VMs kept running as they were started by hand
    warnings: tuple[Problem, ...]
    now: Mapping[str, tuple[str, ...]]  # workload name -> the GPUs it runs on now (names, or unknown UUIDs)


def gpu_decisions(desired: DesiredState, observed: Observed, sight: GpuSight, power: PowerOf) -> GpuDecisions:
    """Seats for role work and respected VMs, by the rules of `planning.placement`."""
    gpus = {gpu.name: gpu for gpu in desired.of(Gpu)}
    roles = {role.name: role for role in desired.of(GpuRole)}
    running = [w for w in desired.workloads() if power(w) is PowerState.RUNNING]
    respected = _respected(desired, observed, roles, gpus, running, power)
    taken = {
        p.gpu: vm.name
        for vm in desired.of(Vm)
        if power(vm) is PowerState.RUNNING or vm.name in respected
        for p in vm.gpus
    }
    states = [
        GpuState(
            name,
            gpu.role,
            max(_total(gpu, sight) - gpu.reserve, 0),
            lost=sight.gone(name) and name not in taken,  # a GPU passed through to a running VM leaves the host
            taken_by=taken.get(name),
        )
        for name, gpu in sorted(gpus.items())
    ]
    live = _live(observed)
    uuids = _uuid_names(gpus.values(), sight)
    asks, pinned = [], []
    for work in running:
        sizes = {name: _size(work, gpu, sight, observed) for name, gpu in gpus.items()}
        if work.gpus:
            pinned.append(Pinned(work.name, work.gpus, max((sizes.get(g, 0) for g in work.gpus), default=0)))
        elif work.role is not None:
            container = live.get((work.host, work.name))
            # A GPU no longer seen (passed through to a VM since, gone) is named by the UUID the container has.
            now = tuple(uuids.get(u.lower(), u) for u in container.gpus) if container else ()
            asks.append(Ask(work.name, work.role, work.host, sizes, now, _ran_for(container, observed)))
    seats = place(states, roles, asks, pinned)
    warnings = [Problem(vm.ref, _respect_note(vm, roles, gpus)) for vm in _vms(desired, respected)]
    for work in running:
        seat = seats.get(work.name)
        if seat is not None and seat.why is not None and (seat.moved or seat.held or not seat.gpus):
            warnings.append(Problem(work.ref, seat.why))
    return GpuDecisions(seats, frozenset(respected), tuple(warnings), {ask.name: ask.now for ask in asks})


def _uuid_names(gpus: Iterable[Gpu], sight: GpuSight) -> dict[str, str]:
    """NVML UUID (lower case) -> spec GPU name: the spec's UUIDs, and those seen."""
    names = {gpu.uuid.lower(): gpu.name for gpu in gpus if gpu.uuid}
    names.update({found.uuid.lower(): name for name, found in sight.seen.items() if found.uuid})
    return names


def _respected(
    desired: DesiredState,
    observed: Observed,
    roles: Mapping[str, GpuRole],
    gpus: Mapping[str, Gpu],
    running: Sequence[Workload],
    power: PowerOf,
) -> set[str]:
    """VMs running now that the spec would stop, whose GPUs no strictly higher-priority work needs."""
    if observed.proxmox is None:
        return set()
    status = {guest.vmid: guest.status for guest in observed.proxmox.guests}
    found = set()
    for vm in desired.of(Vm):
        if not vm.gpus or status.get(vm.vmid) != "running" or power(vm) is not PowerState.STOPPED:
            continue
        held = {p.gpu for p in vm.gpus}
        own = _priority(held, roles, gpus)
        wanting = [
            _wanting(work, roles, gpus) for work in running if work.host != vm.name and _wants(work, held, roles, gpus)
        ]
        if vm_holds_by_priority(own, wanting):
            found.add(vm.name)
    return found


def _priority(names: set[str], roles: Mapping[str, GpuRole], gpus: Mapping[str, Gpu]) -> int:
    found = [roles[role].priority for n in names if n in gpus and (role := gpus[n].role) is not None and role in roles]
    return max(found, default=0)


def _wants(work: Workload, held: set[str], roles: Mapping[str, GpuRole], gpus: Mapping[str, Gpu]) -> bool:
    """Whether the work could run on one of `held`: it names one, or its role prefers, carries or fails over to it."""
    if work.gpus:
        return bool(held & set(work.gpus))
    role = roles.get(work.role or "")
    if role is None:
        return False
    return bool(held & ({n for n, g in gpus.items() if g.role == role.name} | {*role.prefer, *role.failover}))


def _wanting(work: Workload, roles: Mapping[str, GpuRole], gpus: Mapping[str, Gpu]) -> int:
    if work.role is not None and work.role in roles:
        return roles[work.role].priority
    return _priority(set(work.gpus), roles, gpus)


def _vms(desired: DesiredState, names: set[str]) -> list[Vm]:
    return [vm for vm in desired.of(Vm) if vm.name in names]


def _respect_note(vm: Vm, roles: Mapping[str, GpuRole], gpus: Mapping[str, Gpu]) -> str:
    held = sorted(p.gpu for p in vm.gpus)
    return (
        f"runs although the spec would stop it (started by hand?); kept running: its GPUs ({', '.join(held)}, "
        f"priority {_priority(set(held), roles, gpus)}) are not needed by work of a higher priority"
    )


def _total(gpu: Gpu, sight: GpuSight) -> int:
    seen = sight.seen.get(gpu.name)
    return min(gpu.vram, seen.memory_total) if seen is not None and seen.memory_total and not seen.lost else gpu.vram


def _size(work: Workload, gpu: Gpu, sight: GpuSight, observed: Observed) -> int:
    """The workload's footprint if it ran on `gpu` alone: declared, estimated, or 0 for an unknown Container."""
    if isinstance(work, Model):
        files = observed.models.get(work.name)
        shape = files.shape if files is not None else None
        return footprint_of(work, [GpuSlot(gpu.name, _total(gpu, sight))], shape).on(gpu.name)
    return work.vram or 0


def _live(observed: Observed) -> dict[tuple[str, str], ObservedContainer]:
    return {
        (host, c.name): c
        for host, seen in observed.docker.items()
        if seen.reachable
        for c in seen.containers
        if c.status in ("running", "restarting")
    }


def _ran_for(container: ObservedContainer | None, observed: Observed) -> float | None:
    if container is None or container.started_at is None or observed.observed_at is None:
        return None
    return max(observed.observed_at - container.started_at, 0.0)


class GpuPass:
    """The planner's GPU piece's state for one pass: what is seen, where role work goes, what the GPUs hold.

    Built once with the planner's own power rule (exclusive groups, `state`); the planner then asks
    `power()` (which keeps a respected VM running and stops work no GPU can take), `gpus_for()`,
    `resolve()` (GPU name -> NVML UUID, and why not), and at the end `finish()` (the VRAM check and
    the GPU settings changes).
    """

    def __init__(self, desired: DesiredState, observed: Observed, power: PowerOf) -> None:
        self.desired = desired
        self.observed = observed
        self.sight = gpu_sight(desired, observed)
        self.decisions = gpu_decisions(desired, observed, self.sight, power)
        self._power = power

    def power(self, resource: Vm | Workload, planned: PowerState) -> PowerState:
        """The power the plan gives `resource`, given the planner's own answer `planned`."""
        if isinstance(resource, Vm):
            return PowerState.RUNNING if resource.name in self.decisions.respected else planned
        seat = self.decisions.seats.get(resource.name)
        return PowerState.STOPPED if seat is not None and not seat.gpus else planned

    def gpus_for(self, workload: Workload) -> tuple[str, ...]:
        """Its GPUs: named, or its seat; a workload that will not run keeps the role's usual GPUs."""
        if workload.gpus:
            return workload.gpus
        seat = self.decisions.seats.get(workload.name)
        if seat is not None and seat.gpus:
            return seat.gpus
        now = self.decisions.now.get(workload.name, ())
        if seat is not None and now and all(self.desired.get(Gpu, name) for name in now):
            return now  # it stops where it runs: its container is stopped, not recreated elsewhere
        role = self.desired.get(GpuRole, workload.role or "")
        return place_role(role, self.desired.of(Gpu)) if role is not None else ()

    def unavailable(self) -> set[str]:
        """GPUs no work may use now: lost, gone, or passed through to a running VM."""
        taken = {
            p.gpu
            for vm in self.desired.of(Vm)
            if self.power(vm, self._power(vm)) is PowerState.RUNNING
            for p in vm.gpus
        }
        return {gpu.name for gpu in self.desired.of(Gpu) if self.sight.gone(gpu.name)} | taken

    def resolve(self) -> tuple[dict[str, str], dict[str, str]]:
        """GPU name -> NVML UUID (the spec's, else the one seen), and why the others failed."""
        resolved: dict[str, str] = {}
        problems: dict[str, str] = {}
        for gpu in self.desired.of(Gpu):
            seen = self.sight.seen.get(gpu.name)
            if gpu.uuid:
                resolved[gpu.name] = gpu.uuid
            elif seen is not None and not seen.lost:
                resolved[gpu.name] = seen.uuid
            elif seen is not None:
                problems[gpu.name] = f"it is lost ({seen.error or 'GPU is lost'})"
            else:
                problems[gpu.name] = self.sight.problems.get(gpu.name, "it is not seen")
        return resolved, problems

    def finish(self, changes: Sequence[Change]) -> GpuFinish:
        """The VRAM check of the planned containers, and the GPU settings changes."""
        changed = {c.address for c in changes if c.backend is Backend.DOCKER}
        seats = [
            LoadSeat(
                work,
                self.gpus_for(work),
                f"container/{work.host}/{work.name}",
                running=self.power(work, self._power(work)) is PowerState.RUNNING,
            )
            for work in self.desired.workloads()
        ]
        load = gpu_load(self.desired, self.observed, self.sight, seats, changed=changed)
        settings = settings_changes(self.desired, self.sight)
        return GpuFinish(
            changes=settings.changes,
            blockers=(*load.blockers, *settings.blockers),
            warnings=(*self.decisions.warnings, *settings.warnings),
            summary=load.summary,
        )


@dataclass(frozen=True, slots=True)
class GpuFinish:
    changes: tuple[Change, ...]
    blockers: tuple[Problem, ...]
    warnings: tuple[Problem, ...]
    summary: tuple[str, ...]

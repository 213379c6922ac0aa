"""The VRAM check of a plan: what each GPU will hold once the plan is applied, and whether it fits.

Pure. The planner calls `gpu_load()` once the containers are planned, with
where each workload will run (`Seat`s) and the addresses its changes touch.
It builds, per GPU, the inputs of `planning.gpufit.check_fit`:

- capacity: the spec's `vram` and `reserve`, NVML's total and free memory
  (when the GPU is seen), lost or not;
- placements: each workload that will run there, with its footprint from
  `planning.vram` (a Model's declared `vram`, else the estimate from the files
  observe read; a Container's declared `vram`, else nothing is known and it
  is not counted). A workload running there now that no change touches is
  already in NVML's "used";
- releases: our running containers on the GPU that the plan stops, replaces
  or deletes free their footprint;
- foreign processes: the processes NVML lists on a GPU where none of our
  containers runs (NVML's pids cannot be tied to a container, so where one
  of ours runs, its processes are taken as ours; the live check still counts
  all of them through NVML's free memory).

The answer holds blockers (a GPU over-committed, a model whose footprint
cannot be known or whose engine would refuse to start) and one line per GPU
saying what it will hold and whether each number is declared or estimated.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from reconciler.planning.gpufit import ForeignProcess, GpuCapacity, Placement, Release, check_fit
from reconciler.planning.gpuview import GpuSight
from reconciler.planning.observed import Observed, ObservedContainer
from reconciler.planning.plan import Problem
from reconciler.planning.vram import Footprint, GpuSlot, declared, footprint_of, gib
from reconciler.spec.models import Engine, Gpu, Model, Workload
from reconciler.spec.state import DesiredState

__all__ = ["GpuLoad", "Seat", "gpu_load"]

_FIT_HINT = (
    "place a model elsewhere, lower its footprint (context, gpu_memory_utilization, quantisation), "
    "or stop what else holds the GPU"
)


@dataclass(frozen=True, slots=True)
class Seat:
    """Where a workload will be: its GPUs (empty when it will not run) and its container's address."""

    workload: Workload
    gpus: tuple[str, ...]
    address: str
    running: bool  # it will run


@dataclass(frozen=True, slots=True)
class GpuLoad:
    """The verdict: blockers, and per GPU one line of what it will hold (declared or estimated)."""

    blockers: tuple[Problem, ...]
    summary: tuple[str, ...]


def gpu_load(
    desired: DesiredState,
    observed: Observed,
    sight: GpuSight,
    seats: Sequence[Seat],
    *,
    changed: Collection[str],
) -> GpuLoad:
    """Check every GPU a seat uses, or that one of our changed containers frees. `changed`: the container
    addresses the plan creates, replaces, starts, stops or deletes."""
    gpus = {gpu.name: gpu for gpu in desired.of(Gpu)}
    uuids = {found.uuid.lower(): name for name, found in sight.seen.items() if found.uuid}
    live = _live_containers(observed, desired)
    blockers: list[Problem] = []
    placements: list[Placement] = []
    workloads: dict[str, Workload] = {}
    for seat in seats:
        workloads[seat.address] = seat.workload
        footprint = _footprint(seat.workload, seat.gpus, gpus, sight, observed)
        if footprint is not None and seat.running and seat.gpus:
            blockers.extend(_refusals(desired, seat.workload, footprint))
            now = live.get(seat.address)
            stays = now is not None and seat.address not in changed and _gpus_of(now, uuids) == seat.gpus
            placements.extend(
                Placement(
                    gpu,
                    seat.workload.name,
                    footprint.on(gpu),
                    footprint.source,
                    running=stays,
                    read_through=footprint.read_through,
                )
                for gpu in seat.gpus
                if gpu in gpus
            )
    releases = _releases(live, workloads, changed, uuids, gpus, sight, observed)
    used = {p.gpu for p in placements} | {r.gpu for r in releases}
    occupied = {gpu for c in live.values() for gpu in _gpus_of(c, uuids)}
    capacities = [_capacity(gpus[name], sight) for name in sorted(used)]
    foreign = [
        ForeignProcess(name, process.pid, process.used_memory, process.name)
        for name in sorted(used - occupied)
        if name in sight.seen
        for process in sight.seen[name].processes
    ]
    fits = check_fit(capacities, placements, releases=releases, foreign=foreign)
    summary = []
    for fit in fits:
        blockers.extend(Problem(gpus[fit.gpu].ref, problem, _FIT_HINT) for problem in fit.problems)
        held = [p for p in placements if p.gpu == fit.gpu]
        terms = " + ".join(f"{p.resource} {gib(p.size)}" for p in held) or "nothing of ours"
        summary.append(
            f"GPU {fit.gpu}: {terms} of {gib(fit.capacity)} usable" + (f" ({fit.basis})" if fit.basis else "")
        )
    return GpuLoad(tuple(blockers), tuple(summary))


def _releases(
    live: Mapping[str, ObservedContainer],
    workloads: Mapping[str, Workload],
    changed: Collection[str],
    uuids: Mapping[str, str],
    gpus: Mapping[str, Gpu],
    sight: GpuSight,
    observed: Observed,
) -> list[Release]:
    """What our changed containers free, measured on the GPUs they hold where they run now."""
    releases: list[Release] = []
    for address, container in live.items():
        work = workloads.get(address)
        if work is None or address not in changed:
            continue
        on = _gpus_of(container, uuids)  # what it holds where it runs now, not where it goes
        freed = _footprint(work, on, gpus, sight, observed)
        if freed is not None:
            releases.extend(Release(gpu, container.name, freed.on(gpu)) for gpu in on)
    return releases


def _live_containers(observed: Observed, desired: DesiredState) -> dict[str, ObservedContainer]:
    """Running containers of the spec's workloads, by their address."""
    names = {(w.host, w.name) for w in desired.workloads()}
    return {
        f"container/{host}/{container.name}": container
        for host, seen in sorted(observed.docker.items())
        if seen.reachable
        for container in seen.containers
        if (host, container.name) in names and container.status in ("running", "restarting")
    }


def _gpus_of(container: ObservedContainer | None, uuids: Mapping[str, str]) -> tuple[str, ...]:
    if container is None:
        return ()
    return tuple(uuids[uuid.lower()] for uuid in container.gpus if uuid.lower() in uuids)


def _footprint(
    workload: Workload, on: Iterable[str], gpus: Mapping[str, Gpu], sight: GpuSight, observed: Observed
) -> Footprint | None:
    """A workload's footprint on its GPUs; None for a Container that declares no `vram` (unknown)."""
    slots = [_slot(gpus[name], sight) for name in on if name in gpus]
    if isinstance(workload, Model):
        files = observed.models.get(workload.name)
        shape = files.shape if files is not None else None
        unread = files.unread if files is not None else "observe did not read them"
        return footprint_of(workload, slots, shape, unread=unread)
    if workload.vram is None:
        return None
    # A Container has no engine; the footprint's engine is not read by the fit check.
    return declared(Engine.LLAMACPP, workload.vram, slots)


def _slot(gpu: Gpu, sight: GpuSight) -> GpuSlot:
    seen = sight.seen.get(gpu.name)
    total = seen.memory_total if seen is not None and seen.memory_total and not seen.lost else gpu.vram
    return GpuSlot(gpu.name, min(total, gpu.vram))


def _capacity(gpu: Gpu, sight: GpuSight) -> GpuCapacity:
    seen = sight.seen.get(gpu.name)
    if seen is None or seen.lost or seen.error:
        return GpuCapacity(gpu.name, gpu.vram, gpu.reserve, lost=seen is not None and seen.lost)
    return GpuCapacity(gpu.name, gpu.vram, gpu.reserve, nvml_total=seen.memory_total, nvml_free=seen.memory_free)


def _refusals(desired: DesiredState, workload: Workload, footprint: Footprint) -> list[Problem]:
    """Why the footprint cannot be trusted or the engine would not start, with where the Model is written."""
    if not footprint.refusals:
        return []
    where = desired.position(workload, "vram")
    at = f"{where.file}:{where.line}: " if where is not None else ""
    return [Problem(workload.ref, f"{at}{refusal}") for refusal in footprint.refusals]

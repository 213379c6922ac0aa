"""Which seen GPU each spec `Gpu` is, wherever it was seen: the host's NVML, NVML inside a VM, a host's engine.

Pure. The planner calls `gpu_sight(desired, observed)` once a pass and reads
from the answer each GPU's NVML UUID (handed to containers), whether it is
lost, its memory and processes (the VRAM fit), and its settings (power limit,
persistence and compute mode). Matching is `gpusight.match_gpus`, per view:

- the local NVML is the host's (`HostView`: PCI addresses are the spec's),
  unless the Lab says the reconciler runs inside a VM (`nvml.inside`): then it
  sees that VM's passed-through GPUs at the VM's own addresses (`GuestView`),
  matched by UUID or by passthrough order;
- GPUs read through a Docker host's engine (`Observed.host_gpus`) are seen as
  that host sees them: inside a Vm, the VM's view; on an Lxc or a DockerHost,
  the host's (an LXC shares the host's kernel and its PCI addresses).

A GPU seen by several sources takes the first match (the host's engine before
the local NVML). A GPU no source matches gets a problem naming why, and what
to do (most often: give it its `uuid`).

`hosts_to_query(desired, nvml)` tells observe which Docker hosts to read
through their engines: those with GPU workloads whose GPUs the local NVML
does not see.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from reconciler.planning.gpusight import GuestView, HostView, MatchedBy, match_gpus
from reconciler.planning.observed import NvmlObservation, Observed, ObservedGpu
from reconciler.spec.models import DockerHost, Gpu, Lxc, Vm
from reconciler.spec.state import DesiredState

__all__ = ["GpuSight", "SightSource", "gpu_sight", "hosts_to_query", "sources"]


@dataclass(frozen=True, slots=True)
class SightSource:
    """One place GPUs were seen, how to read its addresses, and which spec GPUs it can see."""

    label: str  # "NVML", "NVML inside VM infer", "Docker host infer"
    nvml: NvmlObservation
    view: HostView | GuestView
    expected: tuple[Gpu, ...]


@dataclass(frozen=True, slots=True)
class GpuSight:
    """Spec GPU name -> the GPU seen (and how, and where); the others -> why not."""

    seen: Mapping[str, ObservedGpu] = field(default_factory=dict)
    how: Mapping[str, MatchedBy] = field(default_factory=dict)
    where: Mapping[str, str] = field(default_factory=dict)
    problems: Mapping[str, str] = field(default_factory=dict)
    expected: frozenset[str] = frozenset()  # GPUs a source that was read should have seen

    def gone(self, name: str) -> bool:
        """Lost, or missing where a source that was read expected it (NVML "GPU is lost", or gone from the list)."""
        return self.lost(name) or (name in self.expected and name not in self.seen)

    def lost(self, name: str) -> bool:
        found = self.seen.get(name)
        return found is not None and found.lost


def sources(desired: DesiredState, observed: Observed) -> list[SightSource]:
    """Every GPU observation with its view, the hosts' engines first."""
    gpus = {gpu.name: gpu for gpu in desired.of(Gpu)}
    found: list[SightSource] = []
    for host, nvml in sorted(observed.host_gpus.items()):
        guest = desired.get(Vm, host)
        if guest is not None:
            names = tuple(p.gpu for p in guest.gpus)
            found.append(_source(f"Docker host {host}", nvml, GuestView(host, names), names, gpus))
            continue
        lxc = desired.get(Lxc, host)
        names = lxc.gpus if lxc is not None else tuple(sorted(gpus))
        found.append(_source(f"Docker host {host}", nvml, HostView(), names, gpus))
    if observed.nvml is not None:
        inside = desired.lab.nvml.inside
        vm = desired.get(Vm, inside) if inside else None
        if vm is not None:
            names = tuple(p.gpu for p in vm.gpus)
            found.append(_source(f"NVML inside VM {vm.name}", observed.nvml, GuestView(vm.name, names), names, gpus))
        else:
            found.append(_source("NVML", observed.nvml, HostView(), tuple(sorted(gpus)), gpus))
    return found


def _source(
    label: str, nvml: NvmlObservation, view: HostView | GuestView, names: Sequence[str], gpus: Mapping[str, Gpu]
) -> SightSource:
    return SightSource(label, nvml, view, tuple(gpus[name] for name in names if name in gpus))


def gpu_sight(desired: DesiredState, observed: Observed) -> GpuSight:
    """Match every spec GPU in every source; deterministic, never raises."""
    seen: dict[str, ObservedGpu] = {}
    how: dict[str, MatchedBy] = {}
    where: dict[str, str] = {}
    problems: dict[str, str] = {}
    expected: set[str] = set()
    for source in sources(desired, observed):
        if not source.nvml.available:
            for gpu in source.expected:
                problems.setdefault(gpu.name, f"{source.label} is not available ({source.nvml.error})")
            continue
        expected.update(gpu.name for gpu in source.expected)
        wanted = [gpu for gpu in source.expected if gpu.name not in seen]
        match = match_gpus(wanted, source.nvml.gpus, source.view)
        for name, found in match.matched.items():
            seen[name], how[name], where[name] = found, match.how[name], source.label
            problems.pop(name, None)
        for gpu in wanted:
            if gpu.name not in seen:  # the first source's word stands: the host's engine before the local NVML
                problems.setdefault(
                    gpu.name, _problem_of(gpu.name, match.problems) or f"{source.label} does not see it"
                )
    inside = desired.lab.nvml.inside
    if inside and desired.get(Vm, inside) is None:
        for gpu in desired.of(Gpu):
            problems.setdefault(gpu.name, f"the Lab's nvml.inside names {inside!r}, which is not a Vm of the spec")
    for gpu in desired.of(Gpu):
        if gpu.name not in seen:
            problems.setdefault(gpu.name, "NVML was not read" if observed.nvml is None else "no NVML source sees it")
    return GpuSight(seen, how, where, problems, frozenset(expected))


def _problem_of(name: str, problems: Sequence[str]) -> str | None:
    """The diagnostic of `match_gpus` about GPU `name`: its own line, else one naming it among others."""
    for problem in problems:
        if problem.startswith(f"Gpu {name}:"):
            return problem.split(":", 1)[1].strip()
    word = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
    return next((problem for problem in problems if word.search(problem)), None)


def hosts_to_query(desired: DesiredState, nvml: NvmlObservation | None) -> tuple[str, ...]:
    """Docker hosts to read GPUs through: a workload there asks for GPUs, and the local NVML misses one of them."""
    seen = gpu_sight(desired, Observed(nvml=nvml)).seen
    wanted: dict[str, set[str]] = {}
    for workload in desired.workloads():
        if workload.gpus or workload.role:
            wanted.setdefault(workload.host, set()).update(_host_gpus(desired, workload.host, workload.gpus))
    return tuple(sorted(host for host, names in wanted.items() if any(name not in seen for name in names)))


def _host_gpus(desired: DesiredState, host: str, named: Sequence[str]) -> Sequence[str]:
    """The spec GPUs a workload on `host` may hold: a Vm's passed-through ones, an Lxc's, else those named
    (or, placed by role, every GPU of the DockerHost's node)."""
    vm, lxc = desired.get(Vm, host), desired.get(Lxc, host)
    if vm is not None:
        return [p.gpu for p in vm.gpus]
    if lxc is not None:
        return lxc.gpus
    if named:
        return named
    docker_host = desired.get(DockerHost, host)
    node = docker_host.node if docker_host is not None else None
    return [gpu.name for gpu in desired.of(Gpu) if node is None or gpu.node == node]

"""Observe: read Proxmox, every Docker host and NVML at once, into one `Observed`.

Called by `plan` and `apply`. The three readers are protocols, so the real
backends and the in-memory ones of the demo are interchangeable. Reads run
concurrently; a backend that fails to read is turned into a blocker-bearing
observation by the planner, not an exception here, except for configuration
errors (no secret, no URL), which the user must fix first.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from reconciler.planning.observed import DockerObservation, NvmlObservation, Observed, ProxmoxObservation
from reconciler.spec.state import DesiredState

__all__ = ["DockerReader", "NvmlReader", "ProxmoxReader", "Readers", "observe"]


class ProxmoxReader(Protocol):
    def observe(self, *, nodes: Iterable[str] | None = None) -> ProxmoxObservation: ...


class DockerReader(Protocol):
    def observe(
        self, names_of_interest: Collection[str] | Mapping[str, Collection[str]] = ()
    ) -> dict[str, DockerObservation]: ...


class NvmlReader(Protocol):
    def observe(self) -> NvmlObservation: ...


@dataclass(frozen=True)
class Readers:
    proxmox: ProxmoxReader | None
    docker: DockerReader | None
    nvml: NvmlReader | None


def observe(desired: DesiredState, readers: Readers) -> Observed:
    """Read everything the spec talks about, concurrently."""
    names: dict[str, set[str]] = {}
    for workload in desired.workloads():
        names.setdefault(workload.host, set()).add(workload.name)
    nodes = sorted({*desired.lab.nodes, *(g.node for g in desired.guests())})
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="observe") as pool:
        proxmox = pool.submit(readers.proxmox.observe, nodes=nodes or None) if readers.proxmox else None
        docker = pool.submit(readers.docker.observe, names) if readers.docker else None
        nvml = pool.submit(readers.nvml.observe) if readers.nvml else None
        return Observed(
            proxmox=proxmox.result() if proxmox else None,
            docker=docker.result() if docker else {},
            nvml=nvml.result() if nvml else None,
        )

"""Observe: read Proxmox, every Docker host and NVML at once, into one `Observed`.

Called by `plan` and `apply`. The three readers are protocols, so the real
backends and the in-memory ones of the demo are interchangeable. Reads run
concurrently; a backend that fails to read is turned into a blocker-bearing
observation by the planner, not an exception here, except for configuration
errors (no secret, no URL), which the user must fix first.

Each Model that declares no `vram` has its files' headers read here
(`backends.modelfiles`) where the reconciler can reach them, so the planner
can estimate its footprint; a file it cannot read is recorded with the reason,
and the planner then asks for a declared `vram` (never a silent 0). Files that
sit only on a remote GPU host are not read through that host yet.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from reconciler.backends.modelfiles import model_shape
from reconciler.errors import BackendError
from reconciler.planning.observed import (
    DockerObservation,
    ModelFiles,
    NvmlObservation,
    Observed,
    ProxmoxObservation,
)
from reconciler.spec.models import Model
from reconciler.spec.state import DesiredState

__all__ = ["DockerReader", "NvmlReader", "ProxmoxReader", "Readers", "observe", "read_model_files"]


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
    observed_at = time.time()
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="observe") as pool:
        proxmox = pool.submit(readers.proxmox.observe, nodes=nodes or None) if readers.proxmox else None
        docker = pool.submit(readers.docker.observe, names) if readers.docker else None
        nvml = pool.submit(readers.nvml.observe) if readers.nvml else None
        models = pool.submit(read_model_files, desired.of(Model))
        return Observed(
            proxmox=proxmox.result() if proxmox else None,
            docker=docker.result() if docker else {},
            nvml=nvml.result() if nvml else None,
            models=models.result(),
            observed_at=observed_at,
        )


def read_model_files(models: Iterable[Model]) -> dict[str, ModelFiles]:
    """The shape of each Model's files that declares no `vram`, or why it could not be read. Never raises
    for a file: a missing, unreadable or malformed one is recorded, and the planner decides."""
    found: dict[str, ModelFiles] = {}
    for model in models:
        if model.vram is not None:
            continue  # declared: the plan uses it, the files need not be read
        try:
            found[model.name] = ModelFiles(model_shape(model))
        except BackendError as exc:
            found[model.name] = ModelFiles(None, _unread(exc))
    return found


def _unread(exc: BackendError) -> str:
    text = exc.message
    return text if len(text) <= 300 else text[:297] + "..."

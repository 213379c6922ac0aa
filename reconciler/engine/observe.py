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

GPUs the local NVML does not see (passed through to a VM, in an LXC on another
machine) are read through the engine of each Docker host whose workloads ask
for them (`planning.gpuview.hosts_to_query`): `nvidia-smi` in a short-lived
container of the Lab's `images.gpu_query`. A host whose engine cannot be
reached, or whose query fails, is recorded as an unavailable observation with
the reason; the planner turns it into a problem naming the host.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from reconciler.backends.modelfiles import model_shape
from reconciler.errors import BackendError, NotFoundError, ReconcilerError
from reconciler.planning.gpuview import hosts_to_query
from reconciler.planning.observed import (
    DockerObservation,
    ModelFiles,
    NvmlObservation,
    Observed,
    ProxmoxObservation,
)
from reconciler.spec.models import Model
from reconciler.spec.state import DesiredState

__all__ = [
    "GPU_QUERY_TIMEOUT",
    "DockerReader",
    "HostGpuReader",
    "NvmlReader",
    "ProxmoxReader",
    "Readers",
    "observe",
    "read_host_gpus",
    "read_model_files",
]

GPU_QUERY_TIMEOUT = 30.0  # seconds the nvidia-smi container may run; the engine's own timeout bounds the calls


class ProxmoxReader(Protocol):
    def observe(self, *, nodes: Iterable[str] | None = None) -> ProxmoxObservation: ...


class DockerReader(Protocol):
    def observe(
        self, names_of_interest: Collection[str] | Mapping[str, Collection[str]] = ()
    ) -> dict[str, DockerObservation]: ...


@runtime_checkable
class HostGpuReader(Protocol):
    """A Docker reader that can also read a host's GPUs through its engine (DockerBackend)."""

    def query_gpus(self, host: str, *, image: str, timeout: float = 60.0) -> NvmlObservation: ...


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
        local = nvml.result() if nvml else None
        engine = readers.docker if isinstance(readers.docker, HostGpuReader) else None
        host_gpus = read_host_gpus(engine, hosts_to_query(desired, local), desired.lab.images.gpu_query)
        return Observed(
            proxmox=proxmox.result() if proxmox else None,
            docker=docker.result() if docker else {},
            nvml=local,
            host_gpus=host_gpus,
            models=models.result(),
            observed_at=observed_at,
        )


def read_host_gpus(engine: HostGpuReader | None, hosts: Collection[str], image: str) -> dict[str, NvmlObservation]:
    """Each host's GPUs read through its engine, concurrently. Never raises for a host: an engine that cannot
    be reached or a query that fails is an unavailable observation saying why."""
    if not hosts or engine is None:  # no engine to read through (the demo's in-memory Docker): nothing seen
        return {}
    with ThreadPoolExecutor(max_workers=min(len(hosts), 8), thread_name_prefix="host-gpus") as pool:
        futures = {host: pool.submit(_query, engine, host, image) for host in sorted(hosts)}
        return {host: future.result() for host, future in futures.items()}


def _query(engine: HostGpuReader, host: str, image: str) -> NvmlObservation:
    try:
        return engine.query_gpus(host, image=image, timeout=GPU_QUERY_TIMEOUT)
    except NotFoundError as exc:
        reason = (
            f"its GPUs cannot be read through its engine: {exc}; pull the Lab's images.gpu_query ({image}) "
            "on that host, or name an image it has"
        )
        return NvmlObservation(available=False, error=reason)
    except ReconcilerError as exc:
        return NvmlObservation(available=False, error=f"its GPUs cannot be read through its engine: {exc}")


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

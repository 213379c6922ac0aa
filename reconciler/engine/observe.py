"""Observe: read Proxmox, every Docker host and NVML at once, into one `Observed`.

Called by `plan` and `apply`. The three readers are protocols, so the real
backends and the in-memory ones of the demo are interchangeable. Reads run
concurrently; a backend that fails to read is turned into a blocker-bearing
observation by the planner, not an exception here, except for configuration
errors (no secret, no URL), which the user must fix first.

Each Model that declares no `vram` has its files' headers read here
(`backends.modelfiles`) where the reconciler can reach them, so the planner
can estimate its footprint; a file it cannot read is recorded with the reason,
and the planner then asks for a declared `vram` (never a silent 0). A file that
cannot be read here but sits on the model's Docker host (the path its container
mounts) is read through that host's SSH access (`read_model_files_over_ssh`):
only its heads, bounded, one connection per host, hosts at once.

GPUs the local NVML does not see (passed through to a VM, in an LXC on another
machine) are read through the engine of each Docker host whose workloads ask
for them (`planning.gpuview.hosts_to_query`): `nvidia-smi` in a short-lived
container of the Lab's `images.gpu_query`. A host whose engine cannot be
reached, or whose query fails, is recorded as an unavailable observation with
the reason; the planner turns it into a problem naming the host.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from reconciler.backends import ssh
from reconciler.backends.modelfiles import model_shape, read_remote_model_shape
from reconciler.engine.provision_apply import ENV_TARGET_PREFIX
from reconciler.errors import BackendError, NotFoundError, ReconcilerError
from reconciler.planning.gpuview import hosts_to_query
from reconciler.planning.observed import (
    DockerObservation,
    ModelFiles,
    NvmlObservation,
    Observed,
    ProxmoxObservation,
)
from reconciler.spec.access import SshTarget
from reconciler.spec.access_checks import ssh_target_of
from reconciler.spec.models import Engine, Model
from reconciler.spec.state import DesiredState

__all__ = [
    "GPU_QUERY_TIMEOUT",
    "DockerReader",
    "HostGpuReader",
    "ModelAccess",
    "NvmlReader",
    "ProxmoxReader",
    "Readers",
    "observe",
    "read_host_gpus",
    "read_model_files",
    "read_model_files_over_ssh",
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
class ModelAccess:
    """How model files on a Docker host are reached: SSH credentials from `env`, host keys in `known_hosts`."""

    env: Mapping[str, str]
    known_hosts: Path
    timeout: float = 20.0  # per connection and per SFTP request
    budget: float = 60.0  # per host: a model not begun by then is left unread, with the reason


@dataclass(frozen=True)
class Readers:
    proxmox: ProxmoxReader | None
    docker: DockerReader | None
    nvml: NvmlReader | None
    model_access: ModelAccess | None = None  # None: model files are read only where the reconciler runs


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
        models = pool.submit(_model_files, desired, readers.model_access)
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


def _model_files(desired: DesiredState, access: ModelAccess | None) -> dict[str, ModelFiles]:
    found = read_model_files(desired.of(Model))
    return found if access is None else read_model_files_over_ssh(desired, found, access)


def read_model_files_over_ssh(
    desired: DesiredState, found: Mapping[str, ModelFiles], access: ModelAccess
) -> dict[str, ModelFiles]:
    """`found`, with the files not readable here read through their Docker host's SSH access instead.
    A host that cannot be reached leaves its models unread, the reason added to the local one."""
    by_host: dict[str, list[Model]] = {}
    for model in desired.of(Model):
        files = found.get(model.name)
        if files is not None and files.shape is None and _remote_candidate(model):
            by_host.setdefault(model.host, []).append(model)
    result = dict(found)
    if not by_host:
        return result
    with ThreadPoolExecutor(max_workers=min(4, len(by_host)), thread_name_prefix="model-files") as pool:
        reads = [pool.submit(_read_on_host, desired, host, models, access) for host, models in by_host.items()]
        for future in reads:
            for name, files in future.result().items():
                local = result[name].unread
                result[name] = files if files.shape is not None else ModelFiles(None, _join(local, files.unread))
    return result


def _remote_candidate(model: Model) -> bool:
    """A llama.cpp or vLLM model whose host path cannot be read here (Ollama's store is not read remotely yet)."""
    if model.engine is Engine.OLLAMA:
        return False
    return model.source.startswith("/") and not os.access(model.source, os.R_OK)


def _target(desired: DesiredState, host: str, env: Mapping[str, str]) -> SshTarget | str:
    """The host's SSH target, as provisioning finds it (RECONCILER_SSH_HOST_<NAME> first); else why there is none."""
    variable = f"{ENV_TARGET_PREFIX}{host.upper().replace('-', '_')}"
    override = env.get(variable, "").strip()
    if override:
        try:
            return SshTarget.model_validate(override)
        except ValueError:
            return f"{variable} is not user@host[:port]"
    resource = desired.docker_hosts().get(host)
    target = ssh_target_of(resource) if resource is not None else None
    return target if target is not None else f"host {host} has no SSH access to read them through"


def _read_on_host(desired: DesiredState, host: str, models: list[Model], access: ModelAccess) -> dict[str, ModelFiles]:
    """One SSH connection to `host`, its models' heads read over SFTP; every failure recorded, none raised."""
    target = _target(desired, host, access.env)
    if isinstance(target, str):
        return {m.name: ModelFiles(None, target) for m in models}
    label = f"ssh://{target}"
    try:
        credentials = ssh.credentials_from(access.env)
        session = ssh.connect(target, credentials=credentials, known_hosts=access.known_hosts, timeout=access.timeout)
    except ReconcilerError as exc:
        return {m.name: ModelFiles(None, f"through {label}: {exc.message}") for m in models}
    found: dict[str, ModelFiles] = {}
    with session:
        try:
            files = session.files(timeout=access.timeout)
        except BackendError as exc:
            return {m.name: ModelFiles(None, f"through {label}: {exc.message}") for m in models}
        deadline = time.monotonic() + access.budget
        for model in models:
            if time.monotonic() >= deadline:
                found[model.name] = ModelFiles(None, f"through {label}: not read within {access.budget:g}s")
                continue
            try:
                found[model.name] = ModelFiles(read_remote_model_shape(model.source, files, label=label))
            except BackendError as exc:
                found[model.name] = ModelFiles(None, f"through {label}: {_unread(exc)}")
    return found


def _join(local: str | None, remote: str | None) -> str:
    return _unread_text("; ".join(part for part in (local, remote) if part))


def _unread(exc: BackendError) -> str:
    return _unread_text(exc.message)


def _unread_text(text: str) -> str:
    return text if len(text) <= 300 else text[:297] + "..."

"""Build the real backends for a lab from its spec, with the environment overriding connection settings.

Environment (documented in the README):
    RECONCILER_PROXMOX_URL, RECONCILER_PROXMOX_TOKEN, RECONCILER_PROXMOX_USER,
    RECONCILER_PROXMOX_PASSWORD, RECONCILER_PROXMOX_CA, RECONCILER_PROXMOX_VERIFY_TLS
        read by backends.proxmox.settings_from
    DOCKER_HOST                       endpoint of the lab's only DockerHost
    RECONCILER_DOCKER_HOST_<NAME>     endpoint of any Docker host (NAME upper case, '-' as '_')
    RECONCILER_NVML_LIBRARY           path to libnvidia-ml.so.1
    RECONCILER_SSH_KEY, RECONCILER_SSH_HOST_<NAME>
        model files on a Docker host are read over SSH with these (engine.observe), when a state
        directory is given: its known_hosts records host keys, as for provisioning
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from reconciler import redact
from reconciler.backends.docker import DockerBackend, DockerHostSettings
from reconciler.backends.nvml import NvmlBackend
from reconciler.backends.proxmox import ProxmoxBackend, settings_from
from reconciler.engine.observe import ModelAccess, Readers
from reconciler.engine.provision_apply import KNOWN_HOSTS
from reconciler.planning.ownership import LEGACY_OWNER
from reconciler.spec.models import DockerHost, Lxc, Vm
from reconciler.spec.state import DesiredState

__all__ = ["Backends", "connect", "docker_settings"]


class Backends(Readers):
    """The readers, which are also the writers the applier uses."""

    proxmox: ProxmoxBackend | None
    docker: DockerBackend | None
    nvml: NvmlBackend | None


def docker_settings(desired: DesiredState, env: Mapping[str, str]) -> dict[str, DockerHostSettings]:
    hosts: dict[str, DockerHostSettings] = {}
    plain = desired.of(DockerHost)
    for name, host in desired.docker_hosts().items():
        endpoint = host.docker if isinstance(host, Lxc | Vm) else host
        assert endpoint is not None
        settings = DockerHostSettings.from_spec(name, endpoint)
        if isinstance(host, DockerHost) and len(plain) == 1 and env.get("DOCKER_HOST"):
            settings = replace(settings, endpoint=env["DOCKER_HOST"])
        override = env.get(f"RECONCILER_DOCKER_HOST_{name.upper().replace('-', '_')}")
        if override:
            settings = replace(settings, endpoint=override)
        hosts[name] = settings
    return hosts


@contextmanager
def connect(desired: DesiredState, env: Mapping[str, str], *, state_dir: Path | None = None) -> Iterator[Backends]:
    """Open the backends the lab needs; close them afterwards. Raises ConfigError for missing settings.

    Every secret the environment holds is registered with `reconciler.redact` first, so that no message
    from here on (a backend's error, a log line) can show one.
    """
    redact.register_environment(env)
    for workload in desired.workloads():  # the secrets containers get: an engine's error may quote them
        redact.register(*(env.get(variable) for variable in workload.secret_env.values()))
    lab = desired.lab
    proxmox = ProxmoxBackend(settings_from(lab.proxmox, env)) if lab.proxmox is not None else None
    hosts = docker_settings(desired, env)
    docker = DockerBackend(hosts, owner_label=lab.owner, listed_owners=(LEGACY_OWNER,)) if hosts else None
    nvml = NvmlBackend(library=env.get("RECONCILER_NVML_LIBRARY") or lab.nvml.library) if lab.nvml.enabled else None
    try:
        models = ModelAccess(env, state_dir / KNOWN_HOSTS) if state_dir is not None else None
        yield Backends(proxmox=proxmox, docker=docker, nvml=nvml, model_access=models)
    finally:
        if docker is not None:
            docker.close()
        if proxmox is not None and hasattr(proxmox, "close"):
            proxmox.close()

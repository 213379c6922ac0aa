"""What an apply checks before it touches anything: every backend the plan needs is configured, and
every secret its containers read is set.

Who calls it: `Applier.apply`, first. A refusal here is a ConfigError naming the change or the resource
and what to do; nothing was written and nothing needs undoing.
"""

from __future__ import annotations

from collections.abc import Mapping

from reconciler.engine.steps_gpu import GpuSteps
from reconciler.errors import ConfigError
from reconciler.planning.container_run import ContainerRun
from reconciler.planning.plan import Backend, Plan

__all__ = ["preflight"]


def preflight(
    plan: Plan, *, has_proxmox: bool, has_docker: bool, gpu_settings: GpuSteps, env: Mapping[str, str]
) -> None:
    """Refuse the plan before touching anything: secrets that are not set, a backend that is not configured."""
    for change in plan.changes:
        if change.backend is Backend.DOCKER and not has_docker:
            raise ConfigError("the plan changes containers but no Docker host is configured", resource=change.address)
        if change.backend is Backend.GPU:
            gpu_settings.require(change)
        if change.backend is Backend.PROXMOX and not has_proxmox:
            raise ConfigError("the plan changes guests but Proxmox is not configured", resource=change.address)
        secrets = change.after.secret_env if isinstance(change.after, ContainerRun) else {}
        for variable in secrets.values():
            if variable not in env:
                raise ConfigError(
                    f"the secret variable {variable} is not set",
                    resource=change.resource,
                    hint="export it in the reconciler's environment",
                )

"""The container a Docker backend creates: one frozen value, built by the applier from the plan.

The planner's `Change.after` for a container is its JSON (secrets as references); the applier
resolves the references and builds a `ContainerRun` (`engine.apply.container_run_from`), and
every Docker backend (`backends.docker`, `backends.memory`) takes this one type. `env` values may be
secrets: they stay out of repr, and nothing here is ever written to a plan or journal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.planning.observed import ContainerPort, ContainerVolume

__all__ = ["ContainerHealthcheck", "ContainerRun"]


@dataclass(frozen=True, slots=True)
class ContainerHealthcheck:
    """Docker's own HEALTHCHECK. Durations are seconds; the engine wants nanoseconds."""

    test: tuple[str, ...]  # ("CMD", "wget", "-q", "-O-", "http://127.0.0.1:8000/health") or ("CMD-SHELL", "...")
    interval: float = 30.0
    timeout: float = 10.0
    retries: int = 3
    start_period: float = 0.0


@dataclass(frozen=True, slots=True)
class ContainerRun:
    """Everything needed to create one container. `env` values may be secrets: they stay out of repr."""

    name: str
    image: str
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[ContainerPort, ...] = ()
    volumes: tuple[ContainerVolume, ...] = ()
    gpus: tuple[str, ...] = ()  # NVML UUIDs, or ("all",)
    devices: tuple[str, ...] = ()  # "/dev/dri:/dev/dri" or "/dev/x:/dev/y:rwm"
    restart: str = "unless-stopped"  # no | always | unless-stopped | on-failure
    shm_size: int | None = None  # bytes
    ipc: str | None = None
    network_mode: str | None = None
    healthcheck: ContainerHealthcheck | None = None

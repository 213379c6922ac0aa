"""What the backends saw, in plain frozen values the planner can compare with the spec.

Backends fill these (reads only) and never hand SDK objects upward. Proxmox
configs stay as the strings PVE stores; parsing them into fields is the
planner's job (`planning.pve`), so both sides are normalised by the same code.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.planning.vram import ModelShape

__all__ = [
    "ComputeMode",
    "ContainerPort",
    "ContainerVolume",
    "DockerObservation",
    "GpuProcess",
    "GuestKind",
    "ModelFiles",
    "NvmlObservation",
    "Observed",
    "ObservedContainer",
    "ObservedGpu",
    "ObservedGuest",
    "ObservedNode",
    "ObservedPciDevice",
    "PciMapping",
    "ProxmoxObservation",
    "TemplateRow",
]


class GuestKind(enum.StrEnum):
    LXC = "lxc"
    QEMU = "qemu"


@dataclass(frozen=True, slots=True)
class ObservedGuest:
    type: GuestKind
    vmid: int
    node: str
    name: str
    status: str  # running | stopped | paused | ...
    tags: tuple[str, ...]
    config: Mapping[str, str]  # current values, as PVE stores them (GET config?current=1)
    pending: Mapping[str, str] = field(default_factory=dict)  # key -> value waiting for a restart
    pending_delete: frozenset[str] = frozenset()
    digest: str | None = None
    lock: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.type}/{self.vmid}"


@dataclass(frozen=True, slots=True)
class ObservedNode:
    name: str
    online: bool


@dataclass(frozen=True, slots=True)
class ObservedPciDevice:
    node: str
    address: str  # 0000:01:00.0
    vendor: str  # 0x10de
    device: str
    vendor_name: str | None = None
    device_name: str | None = None
    iommu_group: int | None = None


@dataclass(frozen=True, slots=True)
class PciMapping:
    """A cluster PCI resource mapping: a name usable by `hostpciN: mapping=NAME`."""

    name: str
    paths: Mapping[str, tuple[str, ...]]  # node -> PCI addresses


@dataclass(frozen=True, slots=True)
class ProxmoxObservation:
    version: str | None
    nodes: tuple[ObservedNode, ...]
    guests: tuple[ObservedGuest, ...]
    pci_devices: tuple[ObservedPciDevice, ...] = ()
    mappings: tuple[PciMapping, ...] = ()
    templates: tuple[TemplateRow, ...] = ()  # VM templates: sources of clones, not guests of the lab


@dataclass(frozen=True, slots=True)
class TemplateRow:
    """A VM as `/cluster/resources?type=vm` lists it: enough to find a template by id or name.

    `local_storage`: whether one of its volumes is on storage only its node sees (PVE then cannot clone
    it onto another node); None when it was not read."""

    vmid: int
    name: str | None
    node: str
    template: bool
    local_storage: bool | None = None


@dataclass(frozen=True, slots=True)
class ContainerPort:
    host: int
    container: int
    bind: str = "0.0.0.0"
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True)
class ContainerVolume:
    host: str
    path: str
    readonly: bool


@dataclass(frozen=True, slots=True)
class ObservedContainer:
    host: str  # name of the Docker host in the spec
    id: str
    name: str
    image: str  # as configured (Config.Image)
    image_id: str
    command: tuple[str, ...] | None
    entrypoint: tuple[str, ...] | None
    env: Mapping[str, str] = field(repr=False)  # may hold secret values
    labels: Mapping[str, str]
    ports: tuple[ContainerPort, ...]
    volumes: tuple[ContainerVolume, ...]
    gpus: tuple[str, ...]  # device ids handed over (NVML UUIDs), "all" when every GPU
    devices: tuple[str, ...]
    restart: str
    status: str  # created | running | restarting | exited | paused | dead
    health: str | None = None  # starting | healthy | unhealthy, when the container has a health check
    restart_count: int = 0
    shm_size: int | None = None
    ipc: str | None = None
    network_mode: str | None = None
    started_at: float | None = None  # when it last started (epoch seconds): how long work has run where it is


@dataclass(frozen=True, slots=True)
class DockerObservation:
    host: str
    reachable: bool
    error: str | None = None
    containers: tuple[ObservedContainer, ...] = ()
    images: frozenset[str] = frozenset()  # tags present on the host


class ComputeMode(enum.StrEnum):
    """NVML's compute modes (nvmlComputeMode_t), by what they allow."""

    DEFAULT = "default"  # any number of processes
    EXCLUSIVE_THREAD = "exclusive_thread"  # removed from current drivers
    PROHIBITED = "prohibited"  # no compute process
    EXCLUSIVE_PROCESS = "exclusive_process"  # one process at a time


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    used_memory: int | None  # bytes; None when NVML does not say
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ObservedGpu:
    index: int
    uuid: str
    pci_bus_id: str  # normalised 0000:01:00.0, lower case
    name: str
    memory_total: int
    memory_used: int
    memory_free: int
    utilization: int | None = None  # percent
    temperature: int | None = None  # Celsius
    power_usage: float | None = None  # watts
    power_limit: float | None = None  # watts
    processes: tuple[GpuProcess, ...] = ()
    lost: bool = False
    error: str | None = None
    power_limit_min: float | None = None  # watts: what the power limit may be set to
    power_limit_max: float | None = None
    power_limit_default: float | None = None
    persistence_mode: bool | None = None
    compute_mode: ComputeMode | None = None


@dataclass(frozen=True, slots=True)
class NvmlObservation:
    available: bool
    error: str | None = None
    driver_version: str | None = None
    gpus: tuple[ObservedGpu, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """A Model's files as observe read them: their shape, or why they could not be read."""

    shape: ModelShape | None
    unread: str | None = None


@dataclass(frozen=True, slots=True)
class Observed:
    """Everything one pass saw. A None part was not read (no Proxmox in the lab, NVML off)."""

    proxmox: ProxmoxObservation | None = None
    docker: Mapping[str, DockerObservation] = field(default_factory=dict)
    nvml: NvmlObservation | None = None
    host_gpus: Mapping[str, NvmlObservation] = field(default_factory=dict)  # read through a Docker host's engine
    models: Mapping[str, ModelFiles] = field(default_factory=dict)  # Model name -> what its files say
    observed_at: float | None = None  # wall-clock seconds when the pass observed (hold times compare with it)

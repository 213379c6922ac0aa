"""A whole lab in memory, seeded from a spec: for the demo and for engine tests that need no server.

Proxmox gets the spec's nodes and one NVIDIA PCI device per declared GPU;
Docker gets every Docker host of the spec; NVML reports the declared GPUs
(through the fake libnvidia-ml when a C compiler is there, else in memory).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.backends.memory import MemoryDocker, MemoryNvml, MemoryProxmox
from reconciler.backends.ssh import CommandResult
from reconciler.engine.health import ProbeResult
from reconciler.engine.observe import NvmlReader, Readers
from reconciler.fakes.nvml import FakeGpu, FakeNvmlBuildError, build_library, write_state
from reconciler.loop.wiring import Wiring
from reconciler.planning.container_run import ContainerProbe
from reconciler.planning.observed import NvmlObservation, ObservedGpu
from reconciler.spec.access import SshTarget
from reconciler.spec.models import Gpu, Vm
from reconciler.spec.state import DesiredState

__all__ = ["MemoryConnector", "MemoryLab", "fake_gpus", "fake_uuid", "memory_lab"]


def fake_uuid(gpu: Gpu) -> str:
    """A stable NVML-style UUID for a declared GPU that has none."""
    if gpu.uuid:
        return gpu.uuid
    digest = hashlib.sha256(f"{gpu.node}/{gpu.pci}".encode()).hexdigest()
    return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def fake_gpus(desired: DesiredState) -> list[FakeGpu]:
    """The GPUs NVML sees where the reconciler runs: the host's, at their host addresses; or, when the Lab
    says it runs inside a VM (`nvml.inside`), that VM's passed-through GPUs at the VM's own addresses
    (q35 puts hostpciN behind root port N+1: bus N+1), as a real VM shows them."""
    inside = desired.get(Vm, desired.lab.nvml.inside) if desired.lab.nvml.inside else None
    if inside is not None:
        by_name = {g.name: g for g in desired.of(Gpu)}
        passed = [by_name[p.gpu] for p in inside.gpus if p.gpu in by_name]
        return [_fake(i, g, f"0000:{i + 1:02x}:00.0") for i, g in enumerate(passed)]
    gpus = sorted(desired.of(Gpu), key=lambda g: (g.node, g.pci_function0 or ""))
    return [_fake(i, g, g.pci_function0 or f"0000:{i + 1:02x}:00.0") for i, g in enumerate(gpus)]


_COMPUTE_MODES = {"default": 0, "prohibited": 2, "exclusive_process": 3}


def _fake(index: int, gpu: Gpu, address: str) -> FakeGpu:
    """A GPU as its spec describes it, its settings already as declared (a lab set up before)."""
    limit = float(gpu.power_limit) if gpu.power_limit is not None else 250.0
    return FakeGpu(
        index=index,
        uuid=fake_uuid(gpu),
        pci_bus_id=address,
        name=f"NVIDIA GeForce {gpu.model or gpu.name}",
        memory_total=gpu.vram,
        power_limit_w=limit,
        power_min_w=min(100.0, limit),
        power_max_w=max(600.0, limit),
        power_default_w=limit,
        persistence_mode=bool(gpu.persistence_mode),
        compute_mode=_COMPUTE_MODES[str(gpu.compute_mode or "default")],
    )


@dataclass
class MemoryLab:
    proxmox: MemoryProxmox
    docker: MemoryDocker
    nvml: NvmlReader
    nvml_note: str
    shells: dict[str, MemoryShell] = field(default_factory=dict)  # SSH target -> the guest shell the demo reaches

    @property
    def readers(self) -> Readers:
        return Readers(proxmox=self.proxmox, docker=self.docker, nvml=self.nvml)

    def connector(self) -> MemoryConnector:
        """The loop's view of this lab: the same in-memory backends for every revision."""
        return MemoryConnector(self)

    def ssh_connect(self, target: SshTarget) -> MemoryShell:
        """A guest's shell in memory, for the demo's provisioning steps (see `MemoryShell`)."""
        return self.shells.setdefault(str(target), MemoryShell(str(target)))

    def probe(self, host: str, probe: ContainerProbe, load: str | None = None) -> ProbeResult:
        """In memory, a container answers its probe (and loads its Ollama model) when it runs and publishes the
        port probed."""
        target = probe.tcp or ""
        port = int(target.rsplit(":", 1)[1]) if target.rpartition(":")[2].isdigit() else probe.port
        for container in self.docker.containers.get(host, {}).values():
            if container.status == "running" and any(p.host == port for p in container.ports):
                return ProbeResult(True, f"{host}:{port} answers (in memory)")
        return ProbeResult(False, f"nothing answers on {host}:{port}")


class MemoryShell:
    """The demo's guests over SSH: every command is recorded; a step "runs" (exit 0, one line of output) and a
    `creates` path exists once a step that ran said it creates it. No test relies on it: tests use a real sshd."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.commands: list[str] = []

    def run(
        self,
        command: str,
        *,
        timeout: float,
        on_line: Callable[[str], None] | None = None,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        tail: int = 20,
    ) -> CommandResult:
        self.commands.append(command)
        if stdin is None:  # a `creates` or `unless` check: nothing is there yet in memory
            return CommandResult(1, ())
        line = f"(in memory) {self.target}: step {(env or {}).get('RECONCILER_STEP', '?')} ran"
        if on_line is not None:
            on_line(line)
        return CommandResult(0, (line,))

    def close(self) -> None:
        """Nothing to close."""


class MemoryConnector:
    def __init__(self, lab: MemoryLab) -> None:
        self.lab = lab

    def wiring(self, desired: DesiredState) -> Wiring:
        return Wiring(
            readers=self.lab.readers,
            proxmox=self.lab.proxmox,
            docker=self.lab.docker,
            docker_endpoints={name: "unix:///demo.sock" for name in desired.docker_hosts()},
            env={},
        )

    def close(self) -> None:
        """Nothing to close: the lab lives as long as its owner keeps it."""


def seed_templates(proxmox: MemoryProxmox, desired: DesiredState) -> None:
    """The cloud-init templates the spec's VMs are cloned from, as `qm template` leaves them: a small disk in
    the VM's first disk slot (which the clone grows), a cloud-init drive and a NIC. By VMID, or by name (then
    VMID 9000 and up)."""
    spare = itertools.count(9000)
    for vm in desired.of(Vm):
        if vm.clone is None:
            continue
        ref = vm.clone.template
        if any(ref in (t.vmid, t.name) for t in proxmox.templates()):
            continue
        vmid = ref if isinstance(ref, int) else next(v for v in spare if v not in proxmox.templates_)
        slot = vm.disks[0].slot if vm.disks else "scsi0"
        proxmox.add_template(
            vmid,
            ref if isinstance(ref, str) else f"template-{vmid}",
            node=vm.clone.node or vm.node,
            config={slot: f"local-lvm:base-{vmid}-disk-0,size=3G", "ide2": f"local-lvm:vm-{vmid}-cloudinit,media=cdrom",
                    "net0": "virtio=BC:24:11:AA:00:01,bridge=vmbr0", "serial0": "socket", "scsihw": "virtio-scsi-pci"},
        )  # fmt: skip


def memory_lab(desired: DesiredState, *, work_dir: Path) -> MemoryLab:
    proxmox = MemoryProxmox(desired.lab.nodes or ("pve1",))
    for gpu in desired.of(Gpu):
        if gpu.pci_function0:
            proxmox.add_nvidia_gpu(gpu.node, gpu.pci_function0, name=f"GeForce {gpu.model or gpu.name}")
    seed_templates(proxmox, desired)
    docker = MemoryDocker(desired.docker_hosts(), owner_label=desired.lab.owner)
    gpus = fake_gpus(desired)
    try:
        library = build_library(work_dir / "fake-nvml")
    except FakeNvmlBuildError as exc:
        observed = NvmlObservation(
            True,
            driver_version="580.105.08",
            gpus=tuple(
                ObservedGpu(g.index, g.uuid, g.pci_bus_id, g.name, g.memory_total or 0, 0, g.memory_total or 0)
                for g in gpus
            ),
        )
        return MemoryLab(proxmox, docker, MemoryNvml(observed), f"NVML in memory ({exc})")
    from reconciler.backends.nvml import NvmlBackend

    state = work_dir / "fake-nvml" / "gpus.state"
    write_state(state, gpus)
    os.environ["FAKE_NVML_STATE"] = str(state)
    return MemoryLab(proxmox, docker, NvmlBackend(library=str(library)), f"NVML through the fake {library}")

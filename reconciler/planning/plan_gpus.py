"""The planner's GPU piece: which GPUs a workload gets, which are available, and a guest's GPU devices.

Part of the planner composed by `planning.planner.make_plan`: the workload piece asks it for a
workload's GPUs (a role placed on the GPUs available now, failing over when it must) and their NVML
UUIDs; the guest piece for an LXC's /dev/nvidiaN nodes and a VM's hostpci entries. Pure.
"""

from __future__ import annotations

from typing import Any

from reconciler.planning.gpudev import nvidia_numbers
from reconciler.planning.observed import NvmlObservation, ProxmoxObservation
from reconciler.planning.plan import Problem
from reconciler.planning.plan_context import PlanContext
from reconciler.spec.models import Gpu, Lxc, PowerState, Vm, Workload
from reconciler.spec.placement import place_role

__all__ = ["NVIDIA_SHARED_DEVICES", "GpuPlanning"]

NVIDIA_SHARED_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


class GpuPlanning(PlanContext):
    """GPU placement and resolution for workloads, GPU devices for guests."""

    def gpus_for(self, workload: Workload, available: set[str], *, quiet: bool = False) -> tuple[str, ...]:
        """GPU names for a workload; a role lands on the GPUs available now, failing over when it must."""
        if workload.gpus:
            return workload.gpus
        if workload.role is None or workload.role not in self.roles:
            return ()
        role = self.roles[workload.role]
        placed = place_role(role, self.gpus.values(), available=available)
        if quiet:  # a workload kept stopped claims nothing now: no failover to report
            return placed or place_role(role, self.gpus.values())
        if not placed:
            placed = place_role(role, self.gpus.values())
            self.warnings.append(
                Problem(workload.ref, f"no available GPU for role {role.name!r}; planned on {', '.join(placed)}")
            )
        elif placed != place_role(role, self.gpus.values()):
            self.warnings.append(Problem(workload.ref, f"role {role.name!r} failed over to {', '.join(placed)}"))
        return placed

    def available_gpus(self) -> set[str]:
        """Declared GPUs that are neither lost (NVML) nor passed through to a running VM."""
        nvml = self.observed.nvml
        lost: set[str] = set()
        if nvml is not None and nvml.available:
            for gpu in self.gpus.values():
                seen = _nvml_gpu(gpu, nvml)
                if seen is not None and seen.lost:
                    lost.add(gpu.name)
        taken = {p.gpu for vm in self.desired.of(Vm) if self.desired_power(vm) is PowerState.RUNNING for p in vm.gpus}
        return set(self.gpus) - lost - taken | {n for n in taken if self._inside_vm_only(n)}

    def _inside_vm_only(self, gpu_name: str) -> bool:
        # A GPU passed through to a VM stays available to workloads that run in that VM.
        return any(
            w.host == vm.name
            for vm in self.desired.of(Vm)
            for w in self.desired.resources
            if isinstance(w, Workload) and any(p.gpu == gpu_name for p in vm.gpus)
        )

    def resolve_gpus(self) -> tuple[dict[str, str], dict[str, str]]:
        """GPU name -> NVML UUID, from the spec or from NVML by PCI address; and why the others failed."""
        resolved: dict[str, str] = {}
        problems: dict[str, str] = {}
        nvml = self.observed.nvml
        for gpu in self.gpus.values():
            seen = _nvml_gpu(gpu, nvml) if nvml is not None and nvml.available else None
            if gpu.uuid:
                resolved[gpu.name] = gpu.uuid
                if seen is not None and seen.uuid.lower() != gpu.uuid.lower():
                    self.warnings.append(
                        Problem(gpu.ref, f"NVML reports {seen.uuid} at {seen.pci_bus_id}, the spec says {gpu.uuid}")
                    )
            elif seen is not None and not seen.lost:
                resolved[gpu.name] = seen.uuid
            elif seen is not None:
                problems[gpu.name] = f"the GPU at {gpu.pci_function0} is lost ({seen.error or 'GPU is lost'})"
            elif nvml is None:
                problems[gpu.name] = "NVML was not read"
            elif not nvml.available:
                problems[gpu.name] = f"NVML is not available ({nvml.error})"
            else:
                problems[gpu.name] = f"NVML has no GPU at {gpu.pci_function0}"
        return resolved, problems

    def lxc_devices(self, lxc: Lxc, proxmox: ProxmoxObservation) -> list[str]:
        """/dev/nvidiaN per GPU (N: its rank by PCI address among the node's NVIDIA GPUs), then the shared nodes."""
        if not lxc.gpus:
            return []
        numbers = nvidia_numbers(lxc.node, self.gpus.values(), proxmox.pci_devices)
        devices = []
        for name in lxc.gpus:
            if name not in numbers:
                self.blockers.append(
                    Problem(
                        lxc.ref, f"cannot tell the /dev/nvidia number of Gpu {name!r}", "give the Gpu its 'pci' address"
                    )
                )
                continue
            devices.append(f"/dev/nvidia{numbers[name]}")
        return devices + list(NVIDIA_SHARED_DEVICES)

    def hostpci(self, vm: Vm) -> list[str]:
        rendered = []
        for passthrough in vm.gpus:
            gpu = self.gpus[passthrough.gpu]
            options = {"pcie": passthrough.pcie, "x-vga": passthrough.x_vga, "rombar": passthrough.rombar}
            flags = ",".join(f"{k}={int(v)}" for k, v in options.items() if v is not None and (v or k == "rombar"))
            if gpu.mapping:
                head = f"mapping={gpu.mapping}"
            else:
                assert gpu.pci_function0 is not None  # validation guarantees pci or mapping
                head = gpu.pci_function0.rsplit(".", 1)[0] if passthrough.all_functions else gpu.pci_function0
            rendered.append(f"{head},{flags}" if flags else head)
        return rendered


def _nvml_gpu(gpu: Gpu, nvml: NvmlObservation | None) -> Any:
    if nvml is None:
        return None
    for seen in nvml.gpus:
        if gpu.uuid and seen.uuid.lower() == gpu.uuid.lower():
            return seen
        if gpu.pci_function0 and seen.pci_bus_id.lower() == gpu.pci_function0:
            return seen
    return None

"""The planner's GPU piece: which GPUs a workload gets, which are available, and a guest's GPU devices.

Part of the planner composed by `planning.planner.make_plan`: the workload piece asks it for a
workload's GPUs (a role placed on the GPUs available now, failing over when it must) and their NVML
UUIDs; the guest piece for an LXC's /dev/nvidiaN nodes and a VM's hostpci entries. Pure.
"""

from __future__ import annotations

from functools import cached_property

from reconciler.planning.gpudev import nvidia_numbers
from reconciler.planning.gpuplan import GpuPass
from reconciler.planning.observed import ProxmoxObservation
from reconciler.planning.plan import Problem
from reconciler.planning.plan_context import PlanContext
from reconciler.spec.models import Lxc, PowerState, Vm, Workload

__all__ = ["NVIDIA_SHARED_DEVICES", "GpuPlanning"]

NVIDIA_SHARED_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


class GpuPlanning(PlanContext):
    """GPU placement and resolution for workloads, GPU devices for guests."""

    @cached_property
    def gpu(self) -> GpuPass:
        """This pass's GPU decisions (planning.gpuplan), over the exclusive groups' power rule."""
        return GpuPass(self.desired, self.observed, lambda resource: PlanContext.desired_power(self, resource))

    def desired_power(self, resource: Lxc | Vm | Workload) -> PowerState:
        """The groups' rule, then the GPUs': a VM started by hand is respected, work no GPU can take stops."""
        power = PlanContext.desired_power(self, resource)
        return power if isinstance(resource, Lxc) else self.gpu.power(resource, power)

    def gpus_for(self, workload: Workload, available: set[str], *, quiet: bool = False) -> tuple[str, ...]:
        """GPU names for a workload: named, or where placement seats its role (`available` is not read)."""
        return self.gpu.gpus_for(workload)

    def available_gpus(self) -> set[str]:
        """Declared GPUs that are neither lost nor gone (NVML) nor passed through to a running VM."""
        return set(self.gpus) - self.gpu.unavailable()

    def resolve_gpus(self) -> tuple[dict[str, str], dict[str, str]]:
        """GPU name -> NVML UUID (the spec's, else the one seen where it is used); and why the others failed."""
        return self.gpu.resolve()

    def finish_gpus(self) -> tuple[str, ...]:
        """After the containers: the VRAM check and the GPU settings changes; what each GPU will hold."""
        finish = self.gpu.finish(self.changes)
        self.changes.extend(finish.changes)
        self.blockers.extend(finish.blockers)
        self.warnings.extend(finish.warnings)
        return finish.summary

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

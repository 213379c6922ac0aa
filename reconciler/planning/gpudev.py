"""Which GPU an LXC's `devN: /dev/nvidiaN` is: N is the GPU's rank by PCI address on its node.

The NVIDIA driver numbers a node's GPUs by PCI bus order. The ranking uses every NVIDIA device PVE
sees on the node (so an undeclared GPU still takes its number); when PVE lists none, the declared
Gpus of the node stand in. The planner asks `nvidia_numbers` to write an LXC's devN, and the orderer
asks it to read back which GPUs a live CT holds: both sides read the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from reconciler.planning.observed import ObservedPciDevice
from reconciler.spec.models import Gpu

__all__ = ["NVIDIA_VENDOR", "gpu_of_device", "nvidia_numbers"]

NVIDIA_VENDOR = "0x10de"


def _device(address: str) -> str:
    """`0000:01:00.0` -> `0000:01:00` (the device, whatever its function)."""
    return address.rsplit(".", 1)[0]


def nvidia_numbers(node: str, gpus: Iterable[Gpu], pci_devices: Iterable[ObservedPciDevice]) -> dict[str, int]:
    """Gpu name -> N of its /dev/nvidiaN on `node`; a Gpu whose number cannot be told is left out."""
    on_node = [g for g in gpus if g.node == node]
    seen = sorted({_device(d.address) for d in pci_devices if d.node == node and d.vendor == NVIDIA_VENDOR})
    order = seen or sorted({_device(g.pci_function0) for g in on_node if g.pci_function0})
    return {
        g.name: order.index(_device(g.pci_function0))
        for g in on_node
        if g.pci_function0 and _device(g.pci_function0) in order
    }


def gpu_of_device(value: str, numbers: Mapping[str, int]) -> str | None:
    """The Gpu a devN value (`/dev/nvidia1`, `/dev/nvidia1,mode=0666`) gives, by `nvidia_numbers`; None if none."""
    path = value.split(",", 1)[0]
    number = path.removeprefix("/dev/nvidia")
    if path == number or not number.isdigit():
        return None
    return next((name for name, n in numbers.items() if n == int(number)), None)

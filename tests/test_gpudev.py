"""Which GPU an LXC's devN holds: one numbering, written by the planner and read back by the orderer."""

from __future__ import annotations

import pytest

from reconciler.planning.gpudev import gpu_of_device, nvidia_numbers
from reconciler.planning.observed import ObservedPciDevice
from reconciler.spec.models import Gpu


def _gpu(name: str, pci: str | None, node: str = "thor") -> Gpu:
    uuid = None if pci else "GPU-0000aaaa-1111-2222-3333-444455556666"
    return Gpu(name=name, node=node, pci=pci, uuid=uuid, vram="24GiB")  # type: ignore[arg-type]


def _nvidia(address: str, node: str = "thor", vendor: str = "0x10de") -> ObservedPciDevice:
    return ObservedPciDevice(node=node, address=address, vendor=vendor, device="0x2204")


def test_an_undeclared_gpu_on_the_node_takes_its_number() -> None:
    gpus = [_gpu("big", "0000:41:00")]
    seen = [
        _nvidia("0000:01:00.0"),
        _nvidia("0000:01:00.1"),
        _nvidia("0000:41:00.0"),
        _nvidia("0000:02:00.0", vendor="0x8086"),
    ]
    numbers = nvidia_numbers("thor", gpus, seen)
    assert numbers == {"big": 1}
    assert gpu_of_device("/dev/nvidia1", numbers) == "big"
    assert gpu_of_device("/dev/nvidia0", numbers) is None  # the undeclared one


def test_without_pve_devices_the_declared_gpus_of_the_node_are_ranked() -> None:
    gpus = [
        _gpu("b", "0000:41:00.0"),
        _gpu("a", "0000:01:00"),
        _gpu("elsewhere", "0000:00:10", node="odin"),
        _gpu("no-pci", None),
    ]
    assert nvidia_numbers("thor", gpus, []) == {"a": 0, "b": 1}


@pytest.mark.parametrize(
    "value",
    [
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia",
        "/dev/nvidia7",
        "/dev/nvidiaX",
        "/dev/sda",
        "",
        "/dev/nvidia0x",
    ],
)
def test_a_dev_value_that_is_no_known_gpu_holds_none(value: str) -> None:
    assert gpu_of_device(value, {"a": 0, "b": 1}) is None


def test_options_after_the_path_are_ignored() -> None:
    assert gpu_of_device("/dev/nvidia1,mode=0666,uid=0", {"a": 0, "b": 1}) == "b"

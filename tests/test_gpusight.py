"""nvidia-smi output read into observations, and spec GPUs matched to what is seen (planning/gpusight.py)."""

from __future__ import annotations

import pytest

from reconciler.planning.gpusight import (
    SECTION_MARK,
    GuestView,
    HostView,
    MatchedBy,
    match_gpus,
    normalise_bus_id,
    parse_nvidia_smi,
)
from reconciler.planning.observed import GpuProcess, ObservedGpu
from reconciler.spec.models import Gpu

MIB = 1024**2

# What `nvidia-smi --query-gpu=... --format=csv,noheader,nounits` prints on a host with two RTX 3090.
TWO_3090 = """\
0, GPU-11111111-2222-3333-4444-555555555555, 00000000:41:00.0, NVIDIA GeForce RTX 3090, 24576, 18300, 5936, 87, 64, 291.42, 350.00, 580.105.08
1, GPU-66666666-7777-8888-9999-000000000000, 00000000:C1:00.0, NVIDIA GeForce RTX 3090, 24576, 3, 24183, 0, 31, 21.07, 350.00, 580.105.08
"""
APPS = """\
GPU-11111111-2222-3333-4444-555555555555, 4242, 17800
GPU-11111111-2222-3333-4444-555555555555, 5151, [N/A]
"""


def test_two_gpus_and_their_processes_are_read() -> None:
    observed = parse_nvidia_smi(TWO_3090 + SECTION_MARK + "\n" + APPS)

    assert observed.available
    assert observed.driver_version == "580.105.08"
    first, second = observed.gpus
    assert first == ObservedGpu(
        index=0,
        uuid="GPU-11111111-2222-3333-4444-555555555555",
        pci_bus_id="0000:41:00.0",
        name="NVIDIA GeForce RTX 3090",
        memory_total=24576 * MIB,
        memory_used=18300 * MIB,
        memory_free=5936 * MIB,
        utilization=87,
        temperature=64,
        power_usage=291.42,
        power_limit=350.0,
        processes=(GpuProcess(pid=4242, used_memory=17800 * MIB), GpuProcess(pid=5151, used_memory=None)),
    )
    assert (second.pci_bus_id, second.processes, second.memory_free) == ("0000:c1:00.0", (), 24183 * MIB)


def test_not_available_readings_are_none() -> None:
    line = "0, GPU-aa, 00000000:01:00.0, Tesla P4, [N/A], [N/A], [N/A], [Not Supported], N/A, [N/A], [Unknown Error], 470.1\n"

    (gpu,) = parse_nvidia_smi(line).gpus

    assert (gpu.utilization, gpu.temperature, gpu.power_usage, gpu.power_limit) == (None, None, None, None)
    assert (gpu.memory_total, gpu.memory_used, gpu.memory_free) == (0, 0, 0)
    assert gpu.error is not None
    assert "memory" in gpu.error


def test_control_characters_never_reach_a_terminal() -> None:
    line = "0, GPU-1\x1b[2J, 01:00.0, evil\x00\x1b]0;owned\x07name, 1, 1, 0, 0, 0, 0, 0, 580\x1b[0m\n"

    (gpu,) = parse_nvidia_smi(line).gpus

    assert (gpu.uuid, gpu.name) == ("GPU-1[2J", "evil]0;ownedname")
    assert parse_nvidia_smi(line).driver_version == "580[0m"


def test_no_gpus_is_an_empty_observation() -> None:
    observed = parse_nvidia_smi("\n\n")
    assert observed.available
    assert (observed.gpus, observed.driver_version) == ((), None)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("0, GPU-x, 01:00.0, name\n", "line 1: expected 12 fields, got 4"),
        (TWO_3090.replace("24576", "lots", 1), "memory.total 'lots' is not a number"),
        (TWO_3090.replace("291.42", "-5", 1), "power.draw -5 is out of range"),
        (TWO_3090.replace("291.42", "nan", 1), "out of range"),
        (TWO_3090.replace("291.42", "1e400", 1), "out of range"),
        (TWO_3090 + SECTION_MARK + "\nGPU-1, 12\n", "expected gpu_uuid, pid, used_memory"),
        (TWO_3090 + SECTION_MARK + "\nGPU-1, twelve, 3\n", "pid 'twelve' is not a number"),
        ("x\n" * 5000, "more than 4096"),
        ("0, " + "A" * 200_000 + "\n", "not CSV"),
        ('0, "unterminated\n1, x\n', "expected 12 fields"),
    ],
    ids=["short", "memory-text", "negative", "nan", "inf", "apps-short", "pid-text", "flood", "huge-field", "quote"],
)
def test_malformed_output_is_refused_naming_the_line(text: str, said: str) -> None:
    with pytest.raises(ValueError, match=r".*") as raised:
        parse_nvidia_smi(text)
    assert said in str(raised.value)


def test_an_error_line_instead_of_csv_is_refused() -> None:
    """What nvidia-smi prints when a GPU fell off the bus: not a GPU line, and not taken for one."""
    text = "Unable to determine the device handle for GPU0000:41:00.0: GPU is lost.  Reboot the system to recover\n"
    with pytest.raises(ValueError, match="line 1"):
        parse_nvidia_smi(text)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("00000000:0A:00.0", "0000:0a:00.0"),
        ("0a:00.0", "0000:0a:00.0"),
        ("0001:c1:00.1", "0001:c1:00.1"),
        ("junk", "junk"),
    ],
)
def test_bus_ids_are_normalised(raw: str, normal: str) -> None:
    assert normalise_bus_id(raw) == normal


# ---- matching -------------------------------------------------------------------------------------------


def _gpu(name: str, *, pci: str | None = None, uuid: str | None = None) -> Gpu:
    return Gpu(name=name, node="thor", pci=pci, uuid=uuid, vram="24GiB")  # type: ignore[arg-type]


def _seen(index: int, bus: str, uuid: str) -> ObservedGpu:
    return ObservedGpu(index, uuid, bus, "NVIDIA GeForce RTX 3090", 24 * 1024**3, 0, 24 * 1024**3)


HOST_SEEN = (_seen(0, "0000:41:00.0", "GPU-aaaa"), _seen(1, "0000:c1:00.0", "GPU-bbbb"))
# The same two cards inside the inference VM (q35): hostpci0 behind root port 1, hostpci1 behind root port 2.
VM_SEEN = (_seen(0, "0000:01:00.0", "GPU-aaaa"), _seen(1, "0000:02:00.0", "GPU-bbbb"))


def test_on_the_host_pci_addresses_match() -> None:
    spec = [_gpu("gpu0", pci="0000:41:00"), _gpu("gpu1", pci="0000:c1:00")]

    match = match_gpus(spec, HOST_SEEN, HostView())

    assert match.problems == ()
    assert {name: gpu.uuid for name, gpu in match.matched.items()} == {"gpu0": "GPU-aaaa", "gpu1": "GPU-bbbb"}
    assert set(match.how.values()) == {MatchedBy.PCI}


def test_inside_a_vm_pci_addresses_are_not_trusted_and_passthrough_order_matches() -> None:
    """inference-vm: the spec names host addresses 41:00 and c1:00; the VM sees 01:00 and 02:00."""
    spec = [_gpu("gpu0", pci="0000:41:00"), _gpu("gpu1", pci="0000:c1:00")]

    match = match_gpus(spec, tuple(reversed(VM_SEEN)), GuestView(vm="infer", passthrough=("gpu0", "gpu1")))

    assert match.problems == ()
    assert {name: gpu.pci_bus_id for name, gpu in match.matched.items()} == {
        "gpu0": "0000:01:00.0",
        "gpu1": "0000:02:00.0",
    }
    assert set(match.how.values()) == {MatchedBy.PASSTHROUGH_ORDER}


def test_the_passthrough_order_is_the_vms_not_the_specs() -> None:
    spec = [_gpu("gpu0", pci="0000:41:00"), _gpu("gpu1", pci="0000:c1:00")]
    match = match_gpus(spec, VM_SEEN, GuestView(vm="infer", passthrough=("gpu1", "gpu0")))
    assert match.matched["gpu1"].pci_bus_id == "0000:01:00.0"


def test_uuid_wins_wherever_the_gpu_is_seen() -> None:
    spec = [_gpu("gpu0", pci="0000:41:00", uuid="GPU-BBBB"), _gpu("gpu1", pci="0000:c1:00")]

    match = match_gpus(spec, VM_SEEN, GuestView(vm="infer", passthrough=("gpu0", "gpu1")))

    assert match.problems == ()
    assert (match.matched["gpu0"].uuid, match.how["gpu0"]) == ("GPU-bbbb", MatchedBy.UUID)
    assert (match.matched["gpu1"].uuid, match.how["gpu1"]) == ("GPU-aaaa", MatchedBy.PASSTHROUGH_ORDER)


def test_inside_a_vm_an_ambiguous_order_asks_for_the_uuid() -> None:
    spec = [_gpu("gpu0", pci="0000:41:00"), _gpu("gpu1", pci="0000:c1:00")]

    match = match_gpus(spec, VM_SEEN[:1], GuestView(vm="infer", passthrough=("gpu0", "gpu1")))

    assert match.matched == {}
    (problem,) = match.problems
    assert "inside VM infer" in problem
    assert "give each Gpu its 'uuid'" in problem
    assert "nvidia-smi -L" in problem


def test_a_gpu_not_passed_through_cannot_be_matched_by_order() -> None:
    spec = [_gpu("gpu0", pci="0000:41:00"), _gpu("stray", pci="0000:05:00")]
    match = match_gpus(spec, VM_SEEN, GuestView(vm="infer", passthrough=("gpu0",)))
    assert match.matched == {}
    assert "stray" in match.problems[0]


def test_missing_gpus_are_named_with_what_is_seen() -> None:
    spec = [_gpu("gpu0", uuid="GPU-cccc"), _gpu("gpu1", pci="0000:09:00")]

    match = match_gpus(spec, HOST_SEEN, HostView())

    assert match.problems == (
        "Gpu gpu0: no GPU with UUID GPU-cccc is seen on this host (seen: 0000:41:00.0 GPU-aaaa, 0000:c1:00.0 GPU-bbbb)",
        "Gpu gpu1: NVML has no GPU at 0000:09:00.0 (seen: 0000:41:00.0 GPU-aaaa, 0000:c1:00.0 GPU-bbbb)",
    )


def test_a_uuid_at_another_address_than_the_spec_says_is_reported_on_the_host() -> None:
    match = match_gpus([_gpu("gpu0", pci="0000:c1:00", uuid="GPU-aaaa")], HOST_SEEN, HostView())
    assert match.matched["gpu0"].uuid == "GPU-aaaa"
    assert match.problems == ("Gpu gpu0: UUID GPU-aaaa is at 0000:41:00.0, the spec says 0000:c1:00.0",)


def test_two_spec_gpus_cannot_claim_one_card() -> None:
    spec = [_gpu("gpu0", uuid="GPU-aaaa"), _gpu("again", pci="0000:41:00")]
    match = match_gpus(spec, HOST_SEEN, HostView())
    assert list(match.matched) == ["gpu0"]
    assert "matched twice" in match.problems[0]

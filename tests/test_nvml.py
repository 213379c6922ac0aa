"""NvmlBackend over the real nvidia-ml-py bindings and the fake libnvidia-ml.so.1 (tests/support/nvml.py)."""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from reconciler.backends.nvml import NvmlBackend
from reconciler.errors import NotFoundError, PermanentError, PermissionDenied, TemporaryError
from reconciler.fakes.nvml import FakeGpu, FakeProcess
from reconciler.planning.gpufit import ForeignProcess, GpuCapacity, Placement, check_fit
from reconciler.planning.observed import ComputeMode, GpuProcess, NvmlObservation, ObservedGpu
from reconciler.planning.vram import FootprintSource
from tests.support.nvml import FakeNvml, fake_nvml_fixture  # noqa: F401 - the fake_nvml fixture

pytestmark = pytest.mark.nvml

GIB = 1024**3
MIB = 1024**2

RTX_5070_TI = FakeGpu(
    index=0,
    uuid="GPU-6f1c2a9e-3b7d-4c52-9e0a-51d7b2c4e801",
    pci_bus_id="0000:01:00.0",
    name="NVIDIA GeForce RTX 5070 Ti",
    memory_total=16 * GIB,
    memory_used=9 * GIB,
    memory_reserved=300 * MIB,
    utilization=35,
    temperature=52,
    power_usage_w=87.5,
    power_limit_w=300.0,
    power_min_w=250.0,
    power_max_w=350.0,
    power_default_w=300.0,
    persistence_mode=True,
    compute_mode=3,
    processes=(FakeProcess(pid=4242, used_memory=9 * GIB, name="/usr/bin/llama-server"),),
)

GTX_970 = FakeGpu(
    index=1,
    uuid="GPU-0b3e8d21-77aa-4f0c-8c1e-9d2f6a4b3c10",
    pci_bus_id="0000:0A:00.0",
    name="NVIDIA GeForce GTX 970",
    memory_total=4 * GIB,
    memory_used=0,
    utilization=0,
    temperature=34,
    power_usage_w=13.25,
    power_limit_w=145.0,
)


def test_two_mismatched_gpus_are_read_in_full(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(RTX_5070_TI, GTX_970, driver_version="580.105.08")

    observed = fake_nvml.backend().observe()

    assert observed == NvmlObservation(
        available=True,
        driver_version="580.105.08",
        gpus=(
            ObservedGpu(
                index=0,
                uuid="GPU-6f1c2a9e-3b7d-4c52-9e0a-51d7b2c4e801",
                pci_bus_id="0000:01:00.0",
                name="NVIDIA GeForce RTX 5070 Ti",
                memory_total=16 * GIB,
                memory_used=9 * GIB + 300 * MIB,  # reserved memory counts as used
                memory_free=16 * GIB - 9 * GIB - 300 * MIB,
                utilization=35,
                temperature=52,
                power_usage=87.5,
                power_limit=300.0,
                processes=(GpuProcess(pid=4242, used_memory=9 * GIB, name="/usr/bin/llama-server"),),
                power_limit_min=250.0,
                power_limit_max=350.0,
                power_limit_default=300.0,
                persistence_mode=True,
                compute_mode=ComputeMode.EXCLUSIVE_PROCESS,
            ),
            ObservedGpu(
                index=1,
                uuid="GPU-0b3e8d21-77aa-4f0c-8c1e-9d2f6a4b3c10",
                pci_bus_id="0000:0a:00.0",  # NVML says 00000000:0A:00.0
                name="NVIDIA GeForce GTX 970",
                memory_total=4 * GIB,
                memory_used=0,
                memory_free=4 * GIB,
                utilization=0,
                temperature=34,
                power_usage=13.25,
                power_limit=145.0,
                persistence_mode=False,  # constraints not given: NOT_SUPPORTED, read as None
                compute_mode=ComputeMode.DEFAULT,
            ),
        ),
    )


def test_free_memory_changed_between_observes_is_seen(fake_nvml: FakeNvml) -> None:
    backend = fake_nvml.backend()
    fake_nvml.set(RTX_5070_TI, GTX_970)
    before = backend.observe()

    fake_nvml.set(RTX_5070_TI, replace(GTX_970, memory_used=3 * GIB + 512 * MIB))
    after = backend.observe()

    assert before.gpus[1].memory_free == 4 * GIB
    assert after.gpus[1].memory_free == 512 * MIB
    assert after.gpus[1].memory_used == 3 * GIB + 512 * MIB
    assert after.gpus[0] == before.gpus[0]


def test_a_foreign_process_is_seen(fake_nvml: FakeNvml) -> None:
    backend = fake_nvml.backend()
    fake_nvml.set(RTX_5070_TI, GTX_970)
    assert backend.observe().gpus[1].processes == ()

    stranger = FakeProcess(pid=31337, used_memory=2 * GIB, name="/opt/game/bin/game.x86_64")
    fake_nvml.set(RTX_5070_TI, replace(GTX_970, memory_used=2 * GIB, processes=(stranger,)))
    gtx = backend.observe().gpus[1]

    assert gtx.processes == (GpuProcess(pid=31337, used_memory=2 * GIB, name="/opt/game/bin/game.x86_64"),)
    assert gtx.memory_free == 2 * GIB


def test_process_without_memory_or_name_reads_as_none(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(replace(GTX_970, index=0, processes=(FakeProcess(pid=77, used_memory=None),)))

    assert fake_nvml.backend().observe().gpus[0].processes == (GpuProcess(pid=77, used_memory=None, name=None),)


def test_a_lost_gpu_is_reported_lost_and_the_other_reads_fine(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(replace(RTX_5070_TI, lost=True), GTX_970)

    observed = fake_nvml.backend().observe()

    assert observed.available
    rtx, gtx = observed.gpus
    assert rtx.index == 0
    assert rtx.lost
    assert rtx.error is not None
    assert "NVML_ERROR_GPU_IS_LOST" in rtx.error
    assert (rtx.memory_total, rtx.processes) == (0, ())
    assert not gtx.lost
    assert gtx.error is None
    assert (gtx.uuid, gtx.memory_free) == (GTX_970.uuid, 4 * GIB)


def test_a_gpu_lost_after_its_handle_keeps_what_was_read(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(RTX_5070_TI, replace(GTX_970, failures={"nvmlDeviceGetPowerUsage": 15}))

    gtx = fake_nvml.backend().observe().gpus[1]

    assert gtx.lost
    assert (gtx.index, gtx.uuid, gtx.pci_bus_id, gtx.name) == (1, GTX_970.uuid, "0000:0a:00.0", GTX_970.name)
    assert gtx.error is not None
    assert "nvmlDeviceGetPowerUsage" in gtx.error


def test_unsupported_readings_come_back_none(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(replace(GTX_970, index=0, utilization=None, temperature=None, power_usage_w=None, power_limit_w=None))

    gtx = fake_nvml.backend().observe().gpus[0]

    assert (gtx.utilization, gtx.temperature, gtx.power_usage, gtx.power_limit) == (None, None, None, None)
    assert (gtx.memory_total, gtx.memory_free, gtx.lost, gtx.error) == (4 * GIB, 4 * GIB, False, None)


def test_unsupported_memory_is_zero_with_an_error(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(replace(GTX_970, index=0, memory_total=None))

    gtx = fake_nvml.backend().observe().gpus[0]

    assert (gtx.memory_total, gtx.memory_used, gtx.memory_free, gtx.lost) == (0, 0, 0, False)
    assert gtx.error is not None
    assert "NOT_SUPPORTED" in gtx.error
    assert gtx.temperature == 34


def test_older_driver_without_v2_calls_falls_back(fake_nvml: FakeNvml) -> None:
    missing_in_old_driver = {
        "nvmlDeviceGetMemoryInfo_v2": 13,
        "nvmlDeviceGetTemperatureV": 13,
        "nvmlDeviceGetComputeRunningProcesses_v3": 13,
    }
    fake_nvml.set(replace(RTX_5070_TI, failures=missing_in_old_driver))

    rtx = fake_nvml.backend().observe().gpus[0]

    assert (rtx.memory_total, rtx.memory_used, rtx.memory_free) == (
        16 * GIB,
        9 * GIB + 300 * MIB,
        16 * GIB - 9 * GIB - 300 * MIB,
    )
    assert rtx.temperature == 52
    assert rtx.processes == (GpuProcess(pid=4242, used_memory=9 * GIB, name="/usr/bin/llama-server"),)


def test_a_wrong_library_path_is_unavailable(fake_nvml: FakeNvml, tmp_path: Path) -> None:
    fake_nvml.set(RTX_5070_TI)
    path = tmp_path / "nowhere" / "libnvidia-ml.so.1"

    observed = NvmlBackend(library=str(path)).observe()

    assert not observed.available
    assert observed.gpus == ()
    assert observed.error is not None
    assert str(path) in observed.error


def test_a_library_that_is_not_nvml_is_unavailable_even_after_the_fake_was_used(fake_nvml: FakeNvml) -> None:
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand in for a wrong library")
    fake_nvml.set(RTX_5070_TI)
    assert fake_nvml.backend().observe().available  # the bindings now hold the fake's function pointers

    observed = NvmlBackend(library=libm).observe()

    assert not observed.available
    assert observed.error is not None
    assert "NVML_ERROR_FUNCTION_NOT_FOUND" in observed.error
    assert fake_nvml.backend().observe().gpus[0].uuid == RTX_5070_TI.uuid


def test_the_default_library_is_not_the_fake(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(RTX_5070_TI)
    assert fake_nvml.backend().observe().available

    observed = NvmlBackend().observe()  # libnvidia-ml.so.1 by name: a real one, or none here

    assert RTX_5070_TI.uuid not in {gpu.uuid for gpu in observed.gpus}
    if ctypes.util.find_library("nvidia-ml") is None:
        assert not observed.available
        assert observed.error is not None
        assert "NVML_ERROR_LIBRARY_NOT_FOUND" in observed.error


def test_two_copies_of_the_library_take_turns(fake_nvml: FakeNvml, tmp_path: Path) -> None:
    other = tmp_path / "other" / "libnvidia-ml.so.1"
    other.parent.mkdir()
    shutil.copy(fake_nvml.library, other)
    fake_nvml.set(RTX_5070_TI, GTX_970)

    first = fake_nvml.backend().observe()
    second = NvmlBackend(library=str(other)).observe()
    third = fake_nvml.backend().observe()

    assert first == second == third
    assert len(first.gpus) == 2


@pytest.mark.parametrize(
    ("code", "reason"),
    [(9, "NVML_ERROR_DRIVER_NOT_LOADED"), (18, "NVML_ERROR_LIB_RM_VERSION_MISMATCH"), (4, "NO_PERMISSION")],
)
def test_init_failures_meaning_no_nvml_are_unavailable(fake_nvml: FakeNvml, code: int, reason: str) -> None:
    fake_nvml.set(RTX_5070_TI, failures={"nvmlInit": code})

    observed = fake_nvml.backend().observe()

    assert not observed.available
    assert observed.error is not None
    assert reason in observed.error


def test_a_transient_init_failure_is_a_temporary_error(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(RTX_5070_TI, failures={"nvmlInit": 999})

    with pytest.raises(TemporaryError) as raised:
        fake_nvml.backend().observe()

    assert raised.value.retryable
    assert raised.value.resource == "nvml"


def test_no_state_file_reads_as_no_driver(fake_nvml: FakeNvml) -> None:
    fake_nvml.state.unlink()

    observed = fake_nvml.backend().observe()

    assert not observed.available
    assert observed.error is not None
    assert "NVML_ERROR_DRIVER_NOT_LOADED" in observed.error


@pytest.mark.parametrize(
    ("failures", "error"),
    [
        ({"nvmlDeviceGetMemoryInfo_v2": 10}, TemporaryError),
        ({"nvmlDeviceGetComputeRunningProcesses_v3": 4}, PermissionDenied),
        ({"nvmlDeviceGetUUID": 14}, PermanentError),
    ],
)
def test_other_gpu_errors_are_translated_by_code(
    fake_nvml: FakeNvml, failures: dict[str, int], error: type[Exception]
) -> None:
    fake_nvml.set(RTX_5070_TI, replace(GTX_970, failures=failures))

    with pytest.raises(error) as raised:
        fake_nvml.backend().observe()

    assert getattr(raised.value, "resource", None) == "gpu/1"
    assert next(iter(failures)) in str(raised.value)


def _fake_init_count_is_zero(library: Path) -> bool:
    """True when the fake library is not initialised: a device call answers NVML_ERROR_UNINITIALIZED."""
    count = ctypes.c_uint(0)
    return bool(ctypes.CDLL(str(library)).nvmlDeviceGetCount_v2(ctypes.byref(count)) == 1)


def test_every_observe_shuts_nvml_down(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(RTX_5070_TI, replace(GTX_970, failures={"nvmlDeviceGetMemoryInfo_v2": 10}))
    with pytest.raises(TemporaryError):
        fake_nvml.backend().observe()
    assert _fake_init_count_is_zero(fake_nvml.library)

    fake_nvml.set(RTX_5070_TI, GTX_970)
    assert fake_nvml.backend().observe().available
    assert _fake_init_count_is_zero(fake_nvml.library)


def test_concurrent_observes_all_read_the_same(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(RTX_5070_TI, GTX_970)
    backends = [fake_nvml.backend() for _ in range(4)]
    results: list[NvmlObservation] = []
    lock = threading.Lock()

    def observe(backend: NvmlBackend) -> None:
        for _ in range(10):
            observed = backend.observe()
            with lock:
                results.append(observed)

    threads = [threading.Thread(target=observe, args=(backend,)) for backend in backends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 40
    assert all(result == results[0] for result in results)
    assert results[0].gpus[1].name == "NVIDIA GeForce GTX 970"
    assert _fake_init_count_is_zero(fake_nvml.library)


# The fake library itself, through ctypes: the NVML contract the bindings rely on.


def test_fake_library_follows_the_nvml_contract(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(RTX_5070_TI, GTX_970)
    lib = ctypes.CDLL(str(fake_nvml.library))
    lib.nvmlErrorString.restype = ctypes.c_char_p
    handle = ctypes.c_void_p()
    count = ctypes.c_uint(0)

    assert lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) == 1  # UNINITIALIZED
    assert lib.nvmlShutdown() == 1
    assert lib.nvmlInit_v2() == 0
    try:
        assert lib.nvmlErrorString(15) == b"GPU is lost"
        short = ctypes.create_string_buffer(8)
        assert lib.nvmlSystemGetDriverVersion(short, 8) == 7  # INSUFFICIENT_SIZE
        assert lib.nvmlDeviceGetHandleByIndex_v2(2, ctypes.byref(handle)) == 2  # INVALID_ARGUMENT
        assert lib.nvmlDeviceGetHandleByUUID(b"GPU-nope", ctypes.byref(handle)) == 6  # NOT_FOUND
        gtx = ctypes.c_void_p()
        assert lib.nvmlDeviceGetHandleByPciBusId_v2(b"0a:00.0", ctypes.byref(gtx)) == 0
        index = ctypes.c_uint(99)
        assert lib.nvmlDeviceGetIndex(gtx, ctypes.byref(index)) == 0
        assert index.value == 1
        name = ctypes.create_string_buffer(8)
        assert lib.nvmlDeviceGetName(gtx, name, 8) == 7
        assert lib.nvmlDeviceGetHandleByUUID(RTX_5070_TI.uuid.encode(), ctypes.byref(handle)) == 0
        assert lib.nvmlDeviceGetComputeRunningProcesses_v3(handle, ctypes.byref(count), None) == 7
        assert count.value == 1
        assert lib.nvmlDeviceGetTemperature(handle, 1, ctypes.byref(index)) == 2  # only the GPU sensor

        fake_nvml.set(RTX_5070_TI)  # GPU 1 leaves while a handle to it is held
        assert lib.nvmlDeviceGetIndex(gtx, ctypes.byref(index)) == 15  # GPU_IS_LOST
        assert lib.nvmlDeviceGetHandleByPciBusId_v2(b"0000:0A:00.0", ctypes.byref(handle)) == 6
    finally:
        assert lib.nvmlShutdown() == 0


# ---- what issue 10 needs of the fake: full GPUs, strangers, late frees, settings ------------------------


def test_a_full_gpu_reads_no_free_memory_and_the_fit_check_refuses_a_start(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(replace(GTX_970, index=0, memory_used=4 * GIB - 200 * MIB, memory_reserved=200 * MIB))

    gtx = fake_nvml.backend().observe().gpus[0]
    (fit,) = check_fit(
        [GpuCapacity("small", vram=4 * GIB, nvml_total=gtx.memory_total, nvml_free=gtx.memory_free)],
        [Placement("small", "whisper", 1 * GIB, FootprintSource.DECLARED)],
    )

    assert (gtx.memory_free, gtx.memory_used) == (0, 4 * GIB)
    assert fit.problems == (
        "GPU small (4.0 GiB) now: whisper 1.0 GiB would start, NVML shows 0.0 GiB free = 0.0 GiB, short by 1.0 GiB",
    )


def test_a_foreign_process_read_through_nvml_shows_in_the_diagnostic(fake_nvml: FakeNvml) -> None:
    stranger = FakeProcess(pid=4242, used_memory=1 * GIB + 410 * MIB, name="/opt/game/game.x86_64")
    fake_nvml.set(replace(RTX_5070_TI, memory_used=1 * GIB + 410 * MIB, processes=(stranger,)))

    rtx = fake_nvml.backend().observe().gpus[0]
    foreign = [ForeignProcess("big", p.pid, p.used_memory, p.name) for p in rtx.processes]
    placed = [
        Placement("big", "qwen-14b", int(11.2 * GIB), FootprintSource.ESTIMATED),
        Placement("big", "llama-8b", int(6.1 * GIB), FootprintSource.DECLARED),
    ]
    (fit,) = check_fit([GpuCapacity("big", vram=16 * GIB)], placed, foreign=foreign)

    assert fit.problems[0] == (
        "GPU big (16.0 GiB): qwen-14b 11.2 GiB + llama-8b 6.1 GiB + pid 4242 (not managed) 1.4 GiB = 18.7 GiB, "
        "over by 2.7 GiB"
    )


def test_memory_of_a_stopped_process_is_freed_late(fake_nvml: FakeNvml) -> None:
    """The old member of a group has exited, but the driver frees its 14 GiB only on the third read."""
    backend = fake_nvml.backend()
    exited = FakeProcess(pid=5151, used_memory=14 * GIB, gone=True, release_after=2)
    fake_nvml.set(replace(RTX_5070_TI, memory_used=0, memory_reserved=0, processes=(exited,)))

    reads = [backend.observe().gpus[0] for _ in range(3)]

    assert [gpu.memory_free for gpu in reads] == [2 * GIB, 2 * GIB, 16 * GIB]
    assert all(gpu.processes == () for gpu in reads)  # gone: no longer listed, even while its memory is held
    fake_nvml.set(replace(RTX_5070_TI, memory_used=0, memory_reserved=0, processes=(exited,)))
    assert backend.observe().gpus[0].memory_free == 2 * GIB  # a new state file starts counting again


def test_power_limit_is_set_and_read_back(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(RTX_5070_TI, GTX_970)
    backend = fake_nvml.backend()

    backend.set_power_limit(RTX_5070_TI.uuid, 280.5)

    rtx, gtx = backend.observe().gpus
    assert (rtx.power_limit, rtx.power_limit_min, rtx.power_limit_max, rtx.power_limit_default) == (
        280.5,
        250.0,
        350.0,
        300.0,
    )
    assert gtx.power_limit == GTX_970.power_limit_w
    assert _fake_init_count_is_zero(fake_nvml.library)
    fake_nvml.set(RTX_5070_TI, GTX_970)  # a state written anew forgets what was set
    assert backend.observe().gpus[0].power_limit == 300.0


def test_a_power_limit_outside_the_gpus_range_is_refused_with_the_range(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(RTX_5070_TI)

    with pytest.raises(PermanentError) as raised:
        fake_nvml.backend().set_power_limit(RTX_5070_TI.uuid, 450)

    assert "allows 250 to 350 W" in str(raised.value)
    assert fake_nvml.backend().observe().gpus[0].power_limit == 300.0


@pytest.mark.parametrize("watts", [float("nan"), float("inf"), -10.0, 0.0, 1e9])
def test_nonsense_power_limits_never_reach_nvml(fake_nvml: FakeNvml, watts: float) -> None:
    fake_nvml.set(RTX_5070_TI)
    with pytest.raises(PermanentError):
        fake_nvml.backend().set_power_limit(RTX_5070_TI.uuid, watts)
    assert fake_nvml.backend().observe().gpus[0].power_limit == 300.0


def test_a_gpu_without_power_management_cannot_have_its_limit_set(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(replace(GTX_970, index=0))
    with pytest.raises(PermanentError) as raised:
        fake_nvml.backend().set_power_limit(GTX_970.uuid, 120)
    assert "cannot change that setting" in str(raised.value)


def test_persistence_and_compute_mode_are_set_and_read_back(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(replace(GTX_970, index=0))
    backend = fake_nvml.backend()
    assert backend.observe().gpus[0].persistence_mode is False

    backend.set_persistence_mode(GTX_970.uuid, True)
    backend.set_compute_mode(GTX_970.uuid, ComputeMode.EXCLUSIVE_PROCESS)
    after = backend.observe().gpus[0]
    backend.set_compute_mode(GTX_970.uuid, ComputeMode.DEFAULT)  # a rollback puts the old value back

    assert (after.persistence_mode, after.compute_mode) == (True, ComputeMode.EXCLUSIVE_PROCESS)
    assert backend.observe().gpus[0].compute_mode is ComputeMode.DEFAULT


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.set_power_limit(RTX_5070_TI.uuid, 280),
        lambda b: b.set_persistence_mode(RTX_5070_TI.uuid, True),
        lambda b: b.set_compute_mode(RTX_5070_TI.uuid, ComputeMode.PROHIBITED),
    ],
    ids=["power", "persistence", "compute"],
)
def test_settings_without_root_are_permission_denied(fake_nvml: FakeNvml, change: Any) -> None:
    fake_nvml.set(RTX_5070_TI, root=False)

    with pytest.raises(PermissionDenied) as raised:
        change(fake_nvml.backend())

    assert raised.value.hint is not None
    assert "root on the GPU's host" in raised.value.hint
    rtx = fake_nvml.backend().observe().gpus[0]
    assert (rtx.power_limit, rtx.persistence_mode, rtx.compute_mode) == (300.0, True, ComputeMode.EXCLUSIVE_PROCESS)


def test_settings_of_an_unknown_or_lost_gpu_are_refused(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(replace(RTX_5070_TI, lost=True))
    backend = fake_nvml.backend()

    with pytest.raises(NotFoundError):
        backend.set_persistence_mode("GPU-00000000-0000-0000-0000-000000000000", True)
    with pytest.raises(PermanentError) as raised:
        backend.set_power_limit(RTX_5070_TI.uuid, 280)
    assert "GPU_IS_LOST" in str(raised.value)
    with pytest.raises(PermanentError):
        backend.set_compute_mode(RTX_5070_TI.uuid, ComputeMode.EXCLUSIVE_THREAD)


def test_a_transient_failure_while_setting_is_temporary(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(replace(RTX_5070_TI, failures={"nvmlDeviceSetPersistenceMode": 10}))
    with pytest.raises(TemporaryError):
        fake_nvml.backend().set_persistence_mode(RTX_5070_TI.uuid, False)
    assert fake_nvml.backend().observe().gpus[0].persistence_mode is True
    assert _fake_init_count_is_zero(fake_nvml.library)


def test_setting_without_nvml_is_an_error_not_a_silent_skip(fake_nvml: FakeNvml) -> None:
    fake_nvml.state.unlink()
    with pytest.raises(PermanentError) as raised:
        fake_nvml.backend().set_power_limit(RTX_5070_TI.uuid, 280)
    assert "DRIVER_NOT_LOADED" in str(raised.value)


class _Clock:
    """A clock that moves only when slept on: waits are counted in reads, not measured in time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def test_a_switch_waits_until_the_memory_is_freed(fake_nvml: FakeNvml) -> None:
    exited = FakeProcess(pid=5151, used_memory=14 * GIB, gone=True, release_after=3)
    fake_nvml.set(replace(RTX_5070_TI, memory_used=0, memory_reserved=0, processes=(exited,)))
    clock = _Clock()

    gpu = fake_nvml.backend().wait_for_free(RTX_5070_TI.uuid, 12 * GIB, timeout=30, clock=clock, sleep=clock.sleep)

    assert gpu.memory_free == 16 * GIB
    assert clock.sleeps == 3  # three reads still showed the exited process's memory


def test_a_switch_whose_memory_is_never_freed_times_out(fake_nvml: FakeNvml) -> None:
    exited = FakeProcess(pid=5151, used_memory=14 * GIB, gone=True, release_after=1000)
    fake_nvml.set(replace(RTX_5070_TI, memory_used=0, memory_reserved=0, processes=(exited,)))
    clock = _Clock()

    with pytest.raises(TemporaryError) as raised:
        fake_nvml.backend().wait_for_free(
            RTX_5070_TI.uuid, 12 * GIB, timeout=5, interval=1, clock=clock, sleep=clock.sleep
        )

    assert "2.0 GiB free after 5 s, 12.0 GiB needed" in str(raised.value)
    assert clock.sleeps == 5


def test_waiting_on_a_lost_or_missing_gpu_fails_at_once(fake_nvml: FakeNvml) -> None:
    clock = _Clock()
    backend = fake_nvml.backend()
    fake_nvml.set(replace(RTX_5070_TI, lost=True))
    with pytest.raises(PermanentError) as lost:
        backend.wait_for_free(RTX_5070_TI.uuid, 1, timeout=5, clock=clock, sleep=clock.sleep)
    fake_nvml.set(RTX_5070_TI, replace(GTX_970, failures={"nvmlDeviceGetPowerUsage": 15}))  # lost after its UUID
    with pytest.raises(PermanentError) as lost_later:
        backend.wait_for_free(GTX_970.uuid, 1, timeout=5, clock=clock, sleep=clock.sleep)
    with pytest.raises(NotFoundError):
        backend.wait_for_free("GPU-00000000-0000-0000-0000-000000000000", 1, timeout=5, clock=clock, sleep=clock.sleep)

    assert not isinstance(lost.value, NotFoundError)
    assert "NVML_ERROR_GPU_IS_LOST" in str(lost.value)
    assert "NVML_ERROR_GPU_IS_LOST" in str(lost_later.value)
    assert clock.sleeps == 0

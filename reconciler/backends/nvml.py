"""NVML backend: reads this host's NVIDIA GPUs (VRAM, load, compute processes, settings) through nvidia-ml-py.

The engine's observe step calls `NvmlBackend.observe()` once a pass, on the
host the reconciler runs on, so the planner can place models by the VRAM each
GPU has free and see processes it did not start; /metrics reads utilization,
temperature and power from the same observation. The apply step calls the
setters (`set_power_limit`, `set_persistence_mode`, `set_compute_mode`) for a
`Gpu` whose settings differ from the spec; a rollback calls them with the
values observed before. This is the only module of the project that imports
`pynvml`: binding objects never leave it, and NVML return codes are
translated here, by code and never by message text, into `planning.observed`
values or the project's error tree.

What is reported rather than raised:

- no NVML on this host (library missing, no driver loaded, e.g. a Proxmox host
  whose GPUs are bound to vfio-pci, driver/library version mismatch, no
  permission): `NvmlObservation(available=False, error=...)`;
- a GPU that is lost (`NVML_ERROR_GPU_IS_LOST`) or needs a reset: that GPU
  with `lost=True` and an error, keeping whatever was read before; the other
  GPUs read normally;
- a reading the GPU or driver does not offer (`NOT_SUPPORTED`, or a function
  this driver lacks): None for that field (memory, which is not optional in
  `ObservedGpu`, becomes 0 with an error on the GPU).

Setters find the GPU by its NVML UUID (stable across reboots and PCI moves)
and raise: `PermissionDenied` without root on the GPU's host
(NVML_ERROR_NO_PERMISSION), `NotFoundError` for a UUID NVML does not know,
`PermanentError` for a value the GPU refuses (outside its power limits: the
message gives them), a setting it does not support, a lost GPU, or no NVML.

Any other NVML error aborts the observation as a `BackendError` subclass:
`TemporaryError` for codes a later pass may not see again (timeout, unknown,
out of memory, ...), `PermanentError` (or `PermissionDenied`, `NotFoundError`)
for the rest.

Library loading: pynvml keeps the library in the module global `nvmlLib` and
caches function pointers in `_nvmlGetFunctionPointer_cache`, and offers no
way to pick a file. So, holding the bindings' `libLoadLock`, `observe()`
points `nvmlLib` at `ctypes.CDLL(library)` (a path, for WSL2 or unusual
installs, or the fake library in tests) and clears that cache whenever the
wanted library is not the loaded one; with `library=None` it leaves loading
to the bindings' default (`libnvidia-ml.so.1` by name). The same path is not
reloaded: the dynamic loader would hand back the copy already mapped anyway.
Every observe runs under one process-wide lock, from pointing at the library
through `nvmlInit` to `nvmlShutdown`, so backends with different libraries
and concurrent callers never mix.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, assert_never

import pynvml

from reconciler.errors import (
    BackendError,
    NotFoundError,
    PermanentError,
    PermissionDenied,
    TemporaryError,
)
from reconciler.planning.gpusight import normalise_bus_id
from reconciler.planning.observed import ComputeMode, GpuProcess, NvmlObservation, ObservedGpu

__all__ = ["DEFAULT_LIBRARY", "NvmlBackend", "wait_for_free"]

log = logging.getLogger(__name__)

DEFAULT_LIBRARY = "libnvidia-ml.so.1"

# pynvml's state is process-wide: every use of it in this process holds this lock.
_LOCK = threading.Lock()

# NVML return codes (nvml.h), as the bindings name them.
_NOT_SUPPORTED: int = pynvml.NVML_ERROR_NOT_SUPPORTED
_FUNCTION_NOT_FOUND: int = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
_ARGUMENT_VERSION_MISMATCH: int = pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
_NO_PERMISSION: int = pynvml.NVML_ERROR_NO_PERMISSION
_NOT_FOUND: int = pynvml.NVML_ERROR_NOT_FOUND
_INVALID_ARGUMENT: int = pynvml.NVML_ERROR_INVALID_ARGUMENT

_COMPUTE_MODES: dict[int, ComputeMode] = {
    pynvml.NVML_COMPUTEMODE_DEFAULT: ComputeMode.DEFAULT,
    pynvml.NVML_COMPUTEMODE_EXCLUSIVE_THREAD: ComputeMode.EXCLUSIVE_THREAD,
    pynvml.NVML_COMPUTEMODE_PROHIBITED: ComputeMode.PROHIBITED,
    pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS: ComputeMode.EXCLUSIVE_PROCESS,
}
_ROOT_HINT = "changing GPU settings needs root on the GPU's host: run the reconciler there as root"

# A reading that this GPU or driver does not offer: the field is None.
_UNSUPPORTED = frozenset({_NOT_SUPPORTED, _FUNCTION_NOT_FOUND, _ARGUMENT_VERSION_MISMATCH})

# The GPU itself is gone or unusable until a reset or reboot: reported as lost.
_GPU_GONE = frozenset({pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED})

# nvmlInit failures meaning "no usable NVML here", with what to do about it.
_UNAVAILABLE_HINTS: dict[int, str] = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "install the NVIDIA driver, or set the path of libnvidia-ml.so.1 "
    "(WSL2: /usr/lib/wsl/lib/libnvidia-ml.so.1)",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "no NVIDIA kernel driver is loaded on this host "
    "(GPUs bound to vfio-pci for passthrough have none)",
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: "libnvidia-ml and the loaded kernel module differ in version: "
    "reboot or reload the nvidia module after a driver upgrade",
    _FUNCTION_NOT_FOUND: "this library lacks a function the bindings need: is it libnvidia-ml, and recent enough?",
    _NO_PERMISSION: "this user may not open the NVIDIA devices (/dev/nvidia*)",
    pynvml.NVML_ERROR_OPERATING_SYSTEM: "the operating system blocked access to the GPUs",
}

_TEMPORARY = frozenset(
    {
        pynvml.NVML_ERROR_UNINITIALIZED,
        pynvml.NVML_ERROR_TIMEOUT,
        pynvml.NVML_ERROR_IRQ_ISSUE,
        pynvml.NVML_ERROR_IN_USE,
        pynvml.NVML_ERROR_MEMORY,
        pynvml.NVML_ERROR_NO_DATA,
        pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES,
        pynvml.NVML_ERROR_NOT_READY,
        pynvml.NVML_ERROR_UNKNOWN,
    }
)

_CODE_NAMES: dict[int, str] = {getattr(pynvml, name): name for name in dir(pynvml) if name.startswith("NVML_ERROR_")}


def _code(error: Exception) -> int:
    return int(getattr(error, "value", pynvml.NVML_ERROR_UNKNOWN))


def _describe(function: str, code: int) -> str:
    return f"{function} returned {_CODE_NAMES.get(code, 'an unknown NVML code')} ({code})"


class _NvmlFailure(Exception):
    """An NVML call failed with a code that the caller must act on (internal; never leaves this module)."""

    def __init__(self, function: str, code: int) -> None:
        super().__init__(_describe(function, code))
        self.function = function
        self.code = code

    def translate(self, resource: str) -> BackendError:
        message = str(self)
        if self.code in _TEMPORARY:
            return TemporaryError(message, resource=resource)
        if self.code == _NO_PERMISSION:
            return PermissionDenied(message, resource=resource)
        if self.code in {_NOT_FOUND, pynvml.NVML_ERROR_GPU_NOT_FOUND}:
            return NotFoundError(message, resource=resource)
        if self.code in _CODE_NAMES:
            return PermanentError(message, resource=resource)
        return BackendError(message, resource=resource)


def _call(function: str, call: Callable[[], Any]) -> Any:
    """Run one binding call; an NVML error becomes `_NvmlFailure` naming `function`."""
    try:
        return call()
    except pynvml.NVMLError as exc:
        raise _NvmlFailure(function, _code(exc)) from exc


def _optional(*attempts: tuple[str, Callable[[], Any]]) -> Any:
    """The first attempt the GPU supports, trying the next on an unsupported code; None when none is."""
    for function, call in attempts:
        try:
            return call()
        except pynvml.NVMLError as exc:
            if _code(exc) not in _UNSUPPORTED:
                raise _NvmlFailure(function, _code(exc)) from exc
    return None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


@dataclass(slots=True)
class _Reading:
    """What has been read of one GPU so far, so a GPU lost half-way keeps its identity."""

    index: int
    uuid: str = ""
    pci_bus_id: str = ""
    name: str = ""

    def lost(self, failure: _NvmlFailure) -> ObservedGpu:
        return ObservedGpu(
            index=self.index,
            uuid=self.uuid,
            pci_bus_id=self.pci_bus_id,
            name=self.name,
            memory_total=0,
            memory_used=0,
            memory_free=0,
            lost=True,
            error=f"GPU {self.index} is unusable: {failure}; a reboot or GPU reset is needed to recover it",
        )


@dataclass(frozen=True, slots=True)
class _Power:
    """Watts: draw, enforced limit, the limits it may be set to, and the default limit."""

    usage: float | None
    limit: float | None
    low: float | None
    high: float | None
    default: float | None


class NvmlBackend:
    """Reads the GPUs NVML sees. `library`: path of libnvidia-ml.so.1; None loads it by name."""

    def __init__(self, library: str | None = None) -> None:
        self._library = library

    @property
    def library(self) -> str:
        return self._library if self._library is not None else DEFAULT_LIBRARY

    def observe(self) -> NvmlObservation:
        """Init NVML, read every GPU, shut NVML down. See the module docstring for what is raised."""
        with _LOCK:
            problem = self._use_library()
            if problem is not None:
                return NvmlObservation(available=False, error=problem)
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                code = _code(exc)
                hint = _UNAVAILABLE_HINTS.get(code)
                if hint is not None:
                    return NvmlObservation(available=False, error=f"{_describe('nvmlInit', code)}: {hint}")
                raise _NvmlFailure("nvmlInit", code).translate("nvml") from exc
            try:
                return self._read()
            finally:
                try:
                    pynvml.nvmlShutdown()
                except pynvml.NVMLError as exc:
                    log.warning("nvml shutdown failed", extra={"library": self.library, "code": _code(exc)})

    def _use_library(self) -> str | None:
        """Point the bindings at this backend's library; the reason when it cannot be loaded."""
        with pynvml.libLoadLock:
            current = pynvml.nvmlLib
            if current is not None and getattr(current, "_name", None) == self.library:
                return None
            pynvml.nvmlLib = None
            cache = getattr(pynvml, "_nvmlGetFunctionPointer_cache", None)
            if isinstance(cache, dict):
                cache.clear()
            if self._library is None:
                return None  # nvmlInit loads the default by name, the bindings' own way
            try:
                pynvml.nvmlLib = ctypes.CDLL(self._library)
            except OSError as exc:
                return f"cannot load the NVML library {self._library}: {exc}"
            return None

    def _read(self) -> NvmlObservation:
        try:
            driver = _optional(("nvmlSystemGetDriverVersion", pynvml.nvmlSystemGetDriverVersion))
            count = int(_call("nvmlDeviceGetCount", pynvml.nvmlDeviceGetCount))
        except _NvmlFailure as failure:
            raise failure.translate("nvml") from failure
        gpus = []
        for index in range(count):
            try:
                gpus.append(self._read_gpu(index))
            except _NvmlFailure as failure:
                raise failure.translate(f"gpu/{index}") from failure
        return NvmlObservation(
            available=True,
            driver_version=None if driver is None else _text(driver),
            gpus=tuple(gpus),
        )

    def _read_gpu(self, index: int) -> ObservedGpu:
        reading = _Reading(index)
        try:
            handle = _call("nvmlDeviceGetHandleByIndex", lambda: pynvml.nvmlDeviceGetHandleByIndex(index))
            reading.uuid = _text(_optional(("nvmlDeviceGetUUID", lambda: pynvml.nvmlDeviceGetUUID(handle))))
            pci = _optional(("nvmlDeviceGetPciInfo_v3", lambda: pynvml.nvmlDeviceGetPciInfo_v3(handle)))
            if pci is not None:
                reading.pci_bus_id = normalise_bus_id(_text(pci.busId) or _text(pci.busIdLegacy))
            reading.name = _text(_optional(("nvmlDeviceGetName", lambda: pynvml.nvmlDeviceGetName(handle))))
            return self._read_state(reading, handle)
        except _NvmlFailure as failure:
            if failure.code in _GPU_GONE:
                return reading.lost(failure)
            raise

    def _read_state(self, reading: _Reading, handle: Any) -> ObservedGpu:
        memory = _optional(
            ("nvmlDeviceGetMemoryInfo_v2", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle, pynvml.nvmlMemory_v2)),
            ("nvmlDeviceGetMemoryInfo", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle)),
        )
        utilization = _optional(("nvmlDeviceGetUtilizationRates", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle)))
        temperature = _optional(*self._temperature_attempts(handle))
        processes = _optional(
            (
                "nvmlDeviceGetComputeRunningProcesses_v3",
                lambda: pynvml.nvmlDeviceGetComputeRunningProcesses_v3(handle),
            ),
            (
                "nvmlDeviceGetComputeRunningProcesses_v2",
                lambda: pynvml.nvmlDeviceGetComputeRunningProcesses_v2(handle),
            ),
        )
        power = _read_power(handle)
        persistence, compute = _read_modes(handle)
        if memory is None:
            total = used = free = 0
            error: str | None = "NVML does not report memory for this GPU (NVML_ERROR_NOT_SUPPORTED)"
        else:
            # Driver-reserved memory (memory_v2) counts as used: total == used + free either way.
            total, free = int(memory.total), int(memory.free)
            used, error = total - free, None
        return ObservedGpu(
            index=reading.index,
            uuid=reading.uuid,
            pci_bus_id=reading.pci_bus_id,
            name=reading.name,
            memory_total=total,
            memory_used=used,
            memory_free=free,
            utilization=None if utilization is None else int(utilization.gpu),
            temperature=None if temperature is None else int(temperature),
            processes=tuple(self._process(info) for info in processes or ()),
            error=error,
            power_usage=power.usage,
            power_limit=power.limit,
            power_limit_min=power.low,
            power_limit_max=power.high,
            power_limit_default=power.default,
            persistence_mode=persistence,
            compute_mode=compute,
        )

    # -- waiting

    def wait_for_free(
        self,
        uuid: str,
        needed: int,
        *,
        timeout: float,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> ObservedGpu:
        """Observe GPU `uuid` until `needed` bytes are free; the reading that showed it.

        A switch calls this between stopping the old model and starting the new one: the driver
        may free a stopped process's memory seconds after the process is gone. Raises
        `TemporaryError` when `timeout` seconds pass first (naming what is free and what is
        needed), `NotFoundError` when NVML does not list the GPU, `PermanentError` when it is lost
        or NVML is unavailable.
        """
        return wait_for_free(
            self.observe, uuid, needed, source="NVML", timeout=timeout, interval=interval, clock=clock, sleep=sleep
        )

    # -- settings

    def set_power_limit(self, uuid: str, watts: float) -> None:
        """Set the GPU's power management limit (the value `nvidia-smi -pl` sets); needs root."""
        if not math.isfinite(watts) or not 0 < watts < 100_000:
            raise PermanentError(f"{watts!r} W is not a power limit", resource=f"gpu/{uuid}")
        milliwatts = round(watts * 1000)
        with self._device(uuid) as handle:
            try:
                _call(
                    "nvmlDeviceSetPowerManagementLimit",
                    lambda: pynvml.nvmlDeviceSetPowerManagementLimit(handle, milliwatts),
                )
            except _NvmlFailure as failure:
                if failure.code != _INVALID_ARGUMENT:
                    raise
                bounds = _optional(
                    (
                        "nvmlDeviceGetPowerManagementLimitConstraints",
                        lambda: pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle),
                    )
                )
                allowed = "" if bounds is None else f": it allows {_watts(bounds[0]):g} to {_watts(bounds[1]):g} W"
                raise PermanentError(
                    f"GPU {uuid} refuses a power limit of {watts:g} W{allowed}", resource=f"gpu/{uuid}"
                ) from failure

    def set_persistence_mode(self, uuid: str, enabled: bool) -> None:
        """Keep the driver loaded while no process uses the GPU (persistence mode); needs root."""
        mode = pynvml.NVML_FEATURE_ENABLED if enabled else pynvml.NVML_FEATURE_DISABLED
        with self._device(uuid) as handle:
            _call("nvmlDeviceSetPersistenceMode", lambda: pynvml.nvmlDeviceSetPersistenceMode(handle, mode))

    def set_compute_mode(self, uuid: str, mode: ComputeMode) -> None:
        """Set who may run compute work on the GPU; needs root."""
        match mode:
            case ComputeMode.DEFAULT:
                code = pynvml.NVML_COMPUTEMODE_DEFAULT
            case ComputeMode.EXCLUSIVE_PROCESS:
                code = pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
            case ComputeMode.PROHIBITED:
                code = pynvml.NVML_COMPUTEMODE_PROHIBITED
            case ComputeMode.EXCLUSIVE_THREAD:
                raise PermanentError("exclusive_thread compute mode is no longer supported by the driver")
            case _:
                assert_never(mode)
        with self._device(uuid) as handle:
            _call("nvmlDeviceSetComputeMode", lambda: pynvml.nvmlDeviceSetComputeMode(handle, code))

    @contextmanager
    def _device(self, uuid: str) -> Iterator[Any]:
        """NVML initialised, and the handle of the GPU with this UUID; NVML failures translated."""
        resource = f"gpu/{uuid}"
        with _LOCK:
            problem = self._use_library()
            if problem is not None:
                raise PermanentError(problem, resource=resource)
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                raise _init_failure(_code(exc), resource) from exc
            try:
                try:
                    handle = _call("nvmlDeviceGetHandleByUUID", lambda: pynvml.nvmlDeviceGetHandleByUUID(uuid))
                    yield handle
                except _NvmlFailure as failure:
                    raise _setting_failure(failure, uuid) from failure
            finally:
                try:
                    pynvml.nvmlShutdown()
                except pynvml.NVMLError as exc:
                    log.warning("nvml shutdown failed", extra={"library": self.library, "code": _code(exc)})

    @staticmethod
    def _temperature_attempts(handle: Any) -> list[tuple[str, Callable[[], Any]]]:
        sensor = pynvml.NVML_TEMPERATURE_GPU
        attempts: list[tuple[str, Callable[[], Any]]] = []
        if hasattr(pynvml, "nvmlDeviceGetTemperatureV"):  # bindings >= 12.570; the old call goes in CUDA 14
            attempts.append(("nvmlDeviceGetTemperatureV", lambda: pynvml.nvmlDeviceGetTemperatureV(handle, sensor)))
        attempts.append(("nvmlDeviceGetTemperature", lambda: pynvml.nvmlDeviceGetTemperature(handle, sensor)))
        return attempts

    @staticmethod
    def _process(info: Any) -> GpuProcess:
        pid = int(info.pid)
        used = info.usedGpuMemory  # None when NVML says "not available" (WDDM, some containers)
        try:
            name = _optional(("nvmlSystemGetProcessName", lambda: pynvml.nvmlSystemGetProcessName(pid)))
        except _NvmlFailure as failure:
            if failure.code not in {_NOT_FOUND, _NO_PERMISSION}:  # gone since listed, or another user's
                raise
            name = None
        return GpuProcess(
            pid=pid,
            used_memory=None if used is None else int(used),
            name=None if name is None else _text(name) or None,
        )


def _watts(milliwatts: Any) -> float | None:
    return None if milliwatts is None else int(milliwatts) / 1000.0


def _init_failure(code: int, resource: str) -> BackendError:
    """nvmlInit failed where something must be changed: no NVML here is an error, not an observation."""
    if code == _NO_PERMISSION:
        return PermissionDenied(_describe("nvmlInit", code), resource=resource, hint=_UNAVAILABLE_HINTS[code])
    hint = _UNAVAILABLE_HINTS.get(code)
    if hint is not None:
        return PermanentError(_describe("nvmlInit", code), resource=resource, hint=hint)
    return _NvmlFailure("nvmlInit", code).translate(resource)


def _setting_failure(failure: _NvmlFailure, uuid: str) -> BackendError:
    resource = f"gpu/{uuid}"
    if failure.code == _NO_PERMISSION:
        return PermissionDenied(str(failure), resource=resource, hint=_ROOT_HINT)
    if failure.code in {_NOT_FOUND, pynvml.NVML_ERROR_GPU_NOT_FOUND}:
        return NotFoundError(f"NVML knows no GPU with UUID {uuid} ({failure})", resource=resource)
    if failure.code in _UNSUPPORTED:
        return PermanentError(f"this GPU or driver cannot change that setting ({failure})", resource=resource)
    if failure.code in _GPU_GONE:
        return PermanentError(f"{failure}; a reboot or GPU reset is needed first", resource=resource)
    return failure.translate(resource)


def _read_power(handle: Any) -> _Power:
    """Power draw and limits, in watts (NVML answers milliwatts)."""
    usage = _optional(("nvmlDeviceGetPowerUsage", lambda: pynvml.nvmlDeviceGetPowerUsage(handle)))
    limit = _optional(("nvmlDeviceGetEnforcedPowerLimit", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle)))
    bounds = _optional(
        (
            "nvmlDeviceGetPowerManagementLimitConstraints",
            lambda: pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle),
        )
    )
    default = _optional(
        (
            "nvmlDeviceGetPowerManagementDefaultLimit",
            lambda: pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle),
        )
    )
    low, high = (None, None) if bounds is None else bounds
    return _Power(_watts(usage), _watts(limit), _watts(low), _watts(high), _watts(default))


def _read_modes(handle: Any) -> tuple[bool | None, ComputeMode | None]:
    persistence = _optional(("nvmlDeviceGetPersistenceMode", lambda: pynvml.nvmlDeviceGetPersistenceMode(handle)))
    compute = _optional(("nvmlDeviceGetComputeMode", lambda: pynvml.nvmlDeviceGetComputeMode(handle)))
    return (
        None if persistence is None else int(persistence) == pynvml.NVML_FEATURE_ENABLED,
        None if compute is None else _COMPUTE_MODES.get(int(compute)),
    )


def wait_for_free(
    observe: Callable[[], NvmlObservation],
    uuid: str,
    needed: int,
    *,
    source: str,
    timeout: float,
    interval: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ObservedGpu:
    """Read GPUs through `observe` (local NVML, or `nvidia-smi` through a host's engine, named by `source`)
    until GPU `uuid` has `needed` bytes free; the reading that showed it. Errors as `NvmlBackend.wait_for_free`."""
    resource = f"gpu/{uuid}"
    deadline = clock() + timeout
    while True:
        observed = observe()
        if not observed.available:
            raise PermanentError(f"{source} is not available: {observed.error}", resource=resource)
        gpu = next((g for g in observed.gpus if g.uuid.lower() == uuid.lower()), None)
        if gpu is None:
            unknown = [g for g in observed.gpus if g.lost and not g.uuid]  # lost before its UUID was read
            if unknown:
                raise PermanentError(f"GPU {uuid} is not listed, and {unknown[0].error}", resource=resource)
            raise NotFoundError(f"{source} lists no GPU with UUID {uuid}", resource=resource)
        if gpu.lost:
            raise PermanentError(gpu.error or "the GPU is lost", resource=resource)
        if gpu.memory_free >= needed:
            return gpu
        if clock() >= deadline:
            raise TemporaryError(
                f"{gpu.memory_free / 2**30:.1f} GiB free after {timeout:g} s, {needed / 2**30:.1f} GiB needed",
                resource=resource,
                hint="a process still holds the memory (nvidia-smi lists it), or the wait is too short",
            )
        sleep(interval)

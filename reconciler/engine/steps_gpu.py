"""The applier's steps for a `gpu/<name>` change: set a GPU's power limit, persistence and compute mode.

`engine.apply.Applier` calls `GpuSteps` for changes of `Backend.GPU` (planned
by `planning.gpusettings`), as it calls `steps_proxmox` and `steps_docker`
for theirs: `do` sets the values of `after`, `undo` sets back those of
`before` (what NVML read when the plan was made), `check` reads the GPU again
and says whether it holds what was set (after an undo: what it held before). The setter is the NVML
backend of the host the reconciler runs on; without root, NVML refuses and
the backend raises `PermissionDenied` with what to do, which fails the step
and rolls the run back. The change's `before`/`after` are `GpuValues`
(the UUID and the settings that change).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from reconciler.engine.health import ProbeResult
from reconciler.errors import ConfigError, PermanentError
from reconciler.planning.gpu_values import GpuValues, Setting
from reconciler.planning.observed import ComputeMode, NvmlObservation, ObservedGpu
from reconciler.planning.plan import Change

__all__ = ["GpuSetter", "GpuSteps", "check_gpu_settings", "set_gpu_settings", "undo_gpu_settings"]


@runtime_checkable
class GpuSetter(Protocol):
    def observe(self) -> NvmlObservation: ...
    def set_power_limit(self, uuid: str, watts: float) -> None: ...
    def set_persistence_mode(self, uuid: str, enabled: bool) -> None: ...
    def set_compute_mode(self, uuid: str, mode: ComputeMode) -> None: ...


def _apply(setter: GpuSetter, values: GpuValues, resource: str) -> None:
    # Persistence first: with it on, the driver keeps the other settings while no process runs.
    if values.persistence_mode is not None:
        setter.set_persistence_mode(values.uuid, values.persistence_mode)
    if values.power_limit is not None:
        setter.set_power_limit(values.uuid, values.power_limit)
    if values.compute_mode is not None:
        try:
            mode = ComputeMode(values.compute_mode)
        except ValueError:
            raise PermanentError(f"{values.compute_mode!r} is not a compute mode", resource=resource) from None
        setter.set_compute_mode(values.uuid, mode)


def _values(value: object, change: Change) -> GpuValues:
    if not isinstance(value, GpuValues):
        raise PermanentError("a GPU settings change holds no GPU settings", resource=change.address)
    return value


def set_gpu_settings(setter: GpuSetter, change: Change) -> None:
    """Set what the change's `after` asks for."""
    _apply(setter, _values(change.after, change), change.address)


def undo_gpu_settings(setter: GpuSetter, change: Change) -> None:
    """Set back what NVML read before, where the GPU no longer holds it (so a step that set nothing, e.g.
    refused for want of root, undoes nothing); a setting NVML did not report is left as it is."""
    before = _values(change.before, change)
    seen = next((g for g in setter.observe().gpus if g.uuid == before.uuid), None)
    if seen is not None:
        now = _read(seen)
        before = GpuValues.of(before.uuid, {k: v for k, v in before.settings().items() if now.get(k) != v})
    _apply(setter, before, change.address)


def _read(seen: ObservedGpu) -> dict[str, Setting | None]:
    return {
        "power_limit": seen.power_limit,
        "persistence_mode": seen.persistence_mode,
        "compute_mode": None if seen.compute_mode is None else str(seen.compute_mode),
    }


def check_gpu_settings(setter: GpuSetter, change: Change, *, undone: bool = False) -> ProbeResult:
    """Whether the GPU now reads what was set (or, after an undo, what it read before)."""
    values = _values(change.before if undone else change.after, change)
    seen = next((g for g in setter.observe().gpus if g.uuid == values.uuid), None)
    if seen is None:
        return ProbeResult(False, f"NVML no longer lists GPU {values.uuid}")
    read, asked = _read(seen), values.settings()
    wrong = [f"{key} reads {read[key]}, {value} was set" for key, value in sorted(asked.items()) if read[key] != value]
    if wrong:
        return ProbeResult(False, "; ".join(wrong))
    return ProbeResult(True, f"GPU {values.uuid} reads " + ", ".join(f"{k} {read[k]}" for k in sorted(asked)))


class GpuSteps:
    """The GPU settings steps, over the NVML of the host the reconciler runs on (None: not available here)."""

    def __init__(self, setter: GpuSetter | None) -> None:
        self.setter = setter

    def require(self, change: Change) -> GpuSetter:
        """The setter; a ConfigError before anything is applied when there is none."""
        if self.setter is None:
            raise ConfigError(
                "the plan changes GPU settings but NVML is not available where the reconciler runs",
                resource=change.address,
                hint="run the reconciler on the GPU's host (as root), or remove the settings from the Gpu",
            )
        return self.setter

    def do(self, change: Change) -> None:
        set_gpu_settings(self.require(change), change)

    def undo(self, change: Change) -> None:
        undo_gpu_settings(self.require(change), change)

    def check(self, change: Change, *, undone: bool = False) -> ProbeResult:
        return check_gpu_settings(self.require(change), change, undone=undone)

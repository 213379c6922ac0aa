"""The applier's steps for a `gpu/<name>` change: set a GPU's power limit, persistence and compute mode.

`engine.apply.Applier` calls `GpuSteps` for changes of `Backend.GPU` (planned
by `planning.gpusettings`), as it calls `steps_proxmox` and `steps_docker`
for theirs: `do` sets the values of `after`, `undo` sets back those of
`before` (what NVML read when the plan was made), `check` reads the GPU again
and says whether it holds what was set (after an undo: what it held before). The setter is the NVML
backend of the host the reconciler runs on; without root, NVML refuses and
the backend raises `PermissionDenied` with what to do, which fails the step
and rolls the run back. The change's `before`/`after` are plain dicts
(`uuid` and the settings that change) until change content is typed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from reconciler.engine.health import ProbeResult
from reconciler.errors import ConfigError, PermanentError
from reconciler.planning.observed import ComputeMode, NvmlObservation, ObservedGpu
from reconciler.planning.plan import Change

__all__ = ["GpuSetter", "GpuSteps", "check_gpu_settings", "set_gpu_settings", "undo_gpu_settings"]


@runtime_checkable
class GpuSetter(Protocol):
    def observe(self) -> NvmlObservation: ...
    def set_power_limit(self, uuid: str, watts: float) -> None: ...
    def set_persistence_mode(self, uuid: str, enabled: bool) -> None: ...
    def set_compute_mode(self, uuid: str, mode: ComputeMode) -> None: ...


def _apply(setter: GpuSetter, values: Mapping[str, Any], resource: str) -> None:
    uuid = values.get("uuid")
    if not isinstance(uuid, str) or not uuid:
        raise PermanentError("the change names no GPU UUID", resource=resource)
    # Persistence first: with it on, the driver keeps the other settings while no process runs.
    if isinstance(values.get("persistence_mode"), bool):
        setter.set_persistence_mode(uuid, values["persistence_mode"])
    if isinstance(values.get("power_limit"), int | float):
        setter.set_power_limit(uuid, float(values["power_limit"]))
    if isinstance(values.get("compute_mode"), str):
        try:
            mode = ComputeMode(values["compute_mode"])
        except ValueError:
            raise PermanentError(f"{values['compute_mode']!r} is not a compute mode", resource=resource) from None
        setter.set_compute_mode(uuid, mode)


def set_gpu_settings(setter: GpuSetter, change: Change) -> None:
    """Set what the change's `after` asks for."""
    _apply(setter, change.after or {}, change.address)


def undo_gpu_settings(setter: GpuSetter, change: Change) -> None:
    """Set back what NVML read before, where the GPU no longer holds it (so a step that set nothing, e.g.
    refused for want of root, undoes nothing); a setting NVML did not report is left as it is."""
    before = dict(change.before or {})
    seen = next((g for g in setter.observe().gpus if g.uuid == before.get("uuid")), None)
    if seen is not None:
        now = _read(seen)
        before = {k: v for k, v in before.items() if k == "uuid" or (k in now and now[k] != v)}
    _apply(setter, before, change.address)


def _read(seen: ObservedGpu) -> dict[str, Any]:
    return {
        "power_limit": seen.power_limit,
        "persistence_mode": seen.persistence_mode,
        "compute_mode": None if seen.compute_mode is None else str(seen.compute_mode),
    }


def check_gpu_settings(setter: GpuSetter, change: Change, *, undone: bool = False) -> ProbeResult:
    """Whether the GPU now reads what was set (or, after an undo, what it read before)."""
    values = (change.before if undone else change.after) or {}
    uuid = str(values.get("uuid", ""))
    seen = next((g for g in setter.observe().gpus if g.uuid == uuid), None)
    if seen is None:
        return ProbeResult(False, f"NVML no longer lists GPU {uuid}")
    read = _read(seen)
    wrong = [
        f"{key} reads {read[key]}, {value} was set"
        for key, value in sorted(values.items())
        if key in read and value is not None and read[key] != value
    ]
    if wrong:
        return ProbeResult(False, "; ".join(wrong))
    return ProbeResult(True, f"GPU {uuid} reads " + ", ".join(f"{k} {read[k]}" for k in sorted(values) if k in read))


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

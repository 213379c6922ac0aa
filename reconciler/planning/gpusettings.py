"""GPU settings as desired state: a `Gpu`'s power limit, persistence mode and compute mode against NVML.

Pure. The planner's GPU piece calls `settings_changes(desired, sight)`: one
`gpu/<name>` update per GPU whose declared settings differ from what NVML
reads, with a field per setting, applied by `engine.gpu_settings` through
NVML (root on the GPU's host). `before` holds the values read, so a rollback
sets them back. A GPU not seen by the local NVML (lost, passed through to a
running VM, seen only through a host's engine) cannot be compared or set from
here: a warning says so, and the rest of the plan goes on (failover must not
wait for a lost GPU's power limit). A limit outside the GPU's range blocks.

`before` and `after` are `GpuValues`: the UUID and only the settings that change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler.planning.gpu_values import GpuValues
from reconciler.planning.gpuview import GpuSight
from reconciler.planning.observed import ObservedGpu
from reconciler.planning.plan import Action, Backend, Change, FieldChange, Problem, Timing
from reconciler.spec.models import Gpu
from reconciler.spec.state import DesiredState

__all__ = ["GpuSettings", "settings_changes", "wanted_settings"]

_LOCAL = ("NVML", "NVML inside VM")  # the sources whose GPUs this process's NVML can set


@dataclass(frozen=True, slots=True)
class GpuSettings:
    changes: tuple[Change, ...]
    blockers: tuple[Problem, ...]
    warnings: tuple[Problem, ...]


def wanted_settings(gpu: Gpu) -> dict[str, Any]:
    """The settings a Gpu declares, as NVML values (watts, bool, compute mode name)."""
    wanted: dict[str, Any] = {}
    if gpu.power_limit is not None:
        wanted["power_limit"] = float(gpu.power_limit)
    if gpu.persistence_mode is not None:
        wanted["persistence_mode"] = gpu.persistence_mode
    if gpu.compute_mode is not None:
        wanted["compute_mode"] = str(gpu.compute_mode)
    return wanted


def _read(seen: ObservedGpu) -> dict[str, Any]:
    return {
        "power_limit": seen.power_limit,
        "persistence_mode": seen.persistence_mode,
        "compute_mode": None if seen.compute_mode is None else str(seen.compute_mode),
    }


def settings_changes(desired: DesiredState, sight: GpuSight) -> GpuSettings:
    """One update per GPU whose declared settings differ from NVML's; warnings for what cannot be set."""
    changes: list[Change] = []
    blockers: list[Problem] = []
    warnings: list[Problem] = []
    for gpu in sorted(desired.of(Gpu), key=lambda g: g.name):
        wanted = wanted_settings(gpu)
        if not wanted:
            continue
        seen = sight.seen.get(gpu.name)
        where = sight.where.get(gpu.name, "")
        if seen is None or seen.lost or not where.startswith(_LOCAL):
            why = sight.problems.get(gpu.name) or (seen.error if seen and seen.lost else None) or f"seen by {where}"
            warnings.append(
                Problem(
                    gpu.ref,
                    f"its settings ({', '.join(sorted(wanted))}) are not compared or set in this pass: {why}",
                    "they are set where the reconciler's NVML sees this GPU (as root)",
                )
            )
            continue
        change = _change(gpu, seen, wanted, blockers)
        if change is not None:
            changes.append(change)
    return GpuSettings(tuple(changes), tuple(blockers), tuple(warnings))


def _change(gpu: Gpu, seen: ObservedGpu, wanted: dict[str, Any], blockers: list[Problem]) -> Change | None:
    read = _read(seen)
    fields = [
        FieldChange(key, read[key], value, Timing.LIVE)
        for key, value in sorted(wanted.items())
        if read[key] is None or read[key] != value
    ]
    low, high = seen.power_limit_min, seen.power_limit_max
    limit = wanted.get("power_limit")
    if limit is not None and low is not None and high is not None and not low <= limit <= high:
        blockers.append(
            Problem(gpu.ref, f"power_limit {limit:g} W is outside what the GPU allows ({low:g} to {high:g} W)")
        )
        return None
    if not fields:
        return None
    return Change(
        f"gpu/{gpu.name}",
        Action.UPDATE,
        gpu.ref,
        Backend.GPU,
        before=GpuValues.of(seen.uuid, {f.path: read[f.path] for f in fields}),
        after=GpuValues.of(seen.uuid, {f.path: wanted[f.path] for f in fields}),
        fields=tuple(fields),
        reason="NVML reads " + ", ".join(f"{f.path} {f.before}" for f in fields) + "; the spec asks otherwise",
    )

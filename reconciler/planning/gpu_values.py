"""A GPU settings change's content, typed: the settings NVML read (`before`) and those the spec asks (`after`).

Planned by `planning.gpusettings` as a `gpu/<name>` change's `before` and `after`, set by
`engine.steps_gpu`. Each holds the GPU's UUID and only the settings that change; None is "not
read" (before) or "not asked" (after). They become JSON only at the plan-file and journal boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reconciler.planning.plan import JsonObject

__all__ = ["GpuValues", "Setting"]

Setting = float | bool | str  # watts, persistence on/off, a compute mode's name


@dataclass(frozen=True, slots=True)
class GpuValues:
    uuid: str
    power_limit: float | None = None
    persistence_mode: bool | None = None
    compute_mode: str | None = None

    @classmethod
    def of(cls, uuid: str, settings: Mapping[str, Setting | None]) -> GpuValues:
        """From NVML-style values by name (`power_limit`, `persistence_mode`, `compute_mode`); others refused."""
        return cls.from_json({"uuid": uuid, **settings})

    def settings(self) -> dict[str, Setting]:
        """The settings held, by name; what is None is left out."""
        named: dict[str, Setting | None] = {
            "power_limit": self.power_limit,
            "persistence_mode": self.persistence_mode,
            "compute_mode": self.compute_mode,
        }
        return {name: value for name, value in named.items() if value is not None}

    def to_json(self) -> JsonObject:
        return {"uuid": self.uuid, **self.settings()}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> GpuValues:
        unknown = set(data) - {"uuid", "power_limit", "persistence_mode", "compute_mode"}
        if unknown:
            raise ValueError(f"not a GPU setting: {', '.join(sorted(unknown))}")
        uuid, limit = data.get("uuid"), data.get("power_limit")
        persistence, mode = data.get("persistence_mode"), data.get("compute_mode")
        if not isinstance(uuid, str) or not uuid:
            raise ValueError("a GPU settings change names no GPU UUID")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float)):
            raise ValueError(f"power_limit must be a number of watts, got {type(limit).__name__}")
        if persistence is not None and not isinstance(persistence, bool):
            raise ValueError(f"persistence_mode must be true or false, got {type(persistence).__name__}")
        if mode is not None and not isinstance(mode, str):
            raise ValueError(f"compute_mode must be text, got {type(mode).__name__}")
        return cls(uuid, None if limit is None else float(limit), persistence, mode)

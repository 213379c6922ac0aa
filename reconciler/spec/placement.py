"""Which GPUs serve a role, and which exclusive-group member a resource belongs to.

Pure helpers shared by validation (is the spec placeable at all?) and the
planner (where does a role land on the GPUs that exist now?). A role takes
the GPUs that carry it, by name order; when there are not enough of them
(a GPU lost, taken, or not bought yet) it falls back to its failover GPUs
in the order the role lists them.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

from reconciler.spec.models import Gpu, GpuRole, Resource

__all__ = ["member_of", "place_role"]


def place_role(role: GpuRole, gpus: Iterable[Gpu], *, available: Container[str] | None = None) -> tuple[str, ...]:
    """The GPU names a workload of `role` runs on; empty when the role cannot be placed.

    `available` (names) restricts the choice to GPUs that exist and are free now;
    None means every declared GPU is available.
    """
    by_name = {gpu.name: gpu for gpu in gpus}

    def usable(name: str) -> bool:
        gpu = by_name.get(name)
        if gpu is None or (available is not None and name not in available):
            return False
        return role.min_vram is None or gpu.vram >= role.min_vram

    chosen = [name for name in sorted(by_name) if by_name[name].role == role.name and usable(name)]
    for name in role.failover:
        if len(chosen) >= role.gpus:
            break
        if name not in chosen and usable(name):
            chosen.append(name)
    return tuple(chosen[: role.gpus]) if len(chosen) >= role.gpus else ()


def member_of(resource: Resource) -> str:
    """The exclusive-group member a resource belongs to (its own name unless it says otherwise)."""
    membership = getattr(resource, "exclusive", None)
    if membership is None:
        return resource.name
    return membership.member or resource.name

"""Whether the models placed on each GPU fit, with the numbers a person needs to fix it when they do not.

Pure. The planner gathers, per GPU: its capacity (the spec's `vram`, NVML's
total and free memory, a reserve kept free), the footprints placed there
(declared or estimated, `planning.vram`), what our own models that this plan
stops will free, and the processes NVML lists that we do not manage.
`check_fit()` answers one `GpuFit` per GPU, in the order given. Two checks:

- by size: every footprint placed on the GPU plus the foreign processes must
  fit in its VRAM minus the reserve; e.g. ``GPU big (16.0 GiB): qwen-14b
  11.2 GiB + llama-8b 6.1 GiB + pid 4242 (not managed) 1.4 GiB = 18.7 GiB,
  over by 2.7 GiB`` (one line);
- live, when NVML was read: what starts on the GPU must fit in what NVML
  says is free now plus what the plan's stops will free, minus the reserve.
  Footprints already running stay where they are and are in NVML's "used".

A lost GPU (NVML_ERROR_GPU_IS_LOST) takes nothing. `GpuFit.basis` says, per
model, whether its number is the declared `vram` or the estimate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from reconciler.planning.vram import FootprintSource, gib

__all__ = [
    "ForeignProcess",
    "GpuCapacity",
    "GpuFit",
    "Placement",
    "Release",
    "check_fit",
]


@dataclass(frozen=True, slots=True)
class GpuCapacity:
    """One GPU as the fit check sees it. Sizes in bytes; NVML's are None where it was not read."""

    name: str
    vram: int  # the spec's `vram`
    reserve: int = 0  # kept free for the driver, the desktop, a margin
    nvml_total: int | None = None
    nvml_free: int | None = None
    lost: bool = False

    @property
    def size(self) -> int:
        """The smaller of the spec's size and NVML's: a card reports a little less than its label."""
        return self.vram if self.nvml_total is None else min(self.vram, self.nvml_total)


@dataclass(frozen=True, slots=True)
class Placement:
    """A footprint placed on one GPU. `running`: it runs there already and stays (NVML counts it as used)."""

    gpu: str
    resource: str  # the name people know it by: "qwen-14b"
    size: int
    source: FootprintSource
    running: bool = False
    read_through: str = ""  # an estimate from files read through this host access (ssh://...)


@dataclass(frozen=True, slots=True)
class Release:
    """Memory one of our own models frees on a GPU when the plan stops or replaces it."""

    gpu: str
    resource: str
    size: int


@dataclass(frozen=True, slots=True)
class ForeignProcess:
    """A process NVML lists on a GPU that no managed container explains."""

    gpu: str
    pid: int
    used_memory: int | None  # None: NVML does not say (counted as 0, and said so)
    name: str | None = None


@dataclass(frozen=True, slots=True)
class GpuFit:
    """The verdict for one GPU. `problems` hold the diagnostics, empty when everything fits."""

    gpu: str
    capacity: int  # usable: size minus reserve
    demand: int  # placements plus foreign processes
    problems: tuple[str, ...] = ()
    basis: str = ""  # "qwen-14b: declared vram; llama-8b: estimated from its files"

    @property
    def fits(self) -> bool:
        return not self.problems


def check_fit(
    capacities: Sequence[GpuCapacity],
    placements: Iterable[Placement],
    *,
    releases: Iterable[Release] = (),
    foreign: Iterable[ForeignProcess] = (),
) -> tuple[GpuFit, ...]:
    """One verdict per GPU in `capacities`. Placements on GPUs not listed are ignored (the caller names them)."""
    placed, freed, strangers = list(placements), list(releases), sorted(foreign, key=lambda p: (p.gpu, p.pid))
    return tuple(
        _check_one(
            capacity,
            [p for p in placed if p.gpu == capacity.name],
            [r for r in freed if r.gpu == capacity.name],
            [f for f in strangers if f.gpu == capacity.name],
        )
        for capacity in capacities
    )


def _check_one(
    capacity: GpuCapacity, placed: list[Placement], freed: list[Release], strangers: list[ForeignProcess]
) -> GpuFit:
    usable = max(capacity.size - capacity.reserve, 0)
    demand = sum(p.size for p in placed) + sum(f.used_memory or 0 for f in strangers)
    basis = "; ".join(f"{p.resource}: {_basis(p)}" for p in placed)
    if capacity.lost:
        names = ", ".join(p.resource for p in placed) or "nothing"
        problem = f"GPU {capacity.name} is lost (NVML_ERROR_GPU_IS_LOST): {names} cannot run there until it is reset"
        return GpuFit(capacity.name, usable, demand, (problem,) if placed else (), basis)
    problems = []
    if demand > usable:
        problems.append(_over(capacity, placed, strangers, demand, usable))
    live = _live(capacity, placed, freed)
    if live is not None:
        problems.append(live)
    return GpuFit(capacity.name, usable, demand, tuple(problems), basis)


def _basis(placed: Placement) -> str:
    if placed.source is FootprintSource.DECLARED:
        return "declared vram"
    return (
        f"estimated from its files, read through {placed.read_through}"
        if placed.read_through
        else ("estimated from its files")
    )


def _header(capacity: GpuCapacity) -> str:
    reserved = f", {gib(capacity.reserve)} reserved" if capacity.reserve else ""
    return f"GPU {capacity.name} ({gib(capacity.size)}{reserved})"


def _over(
    capacity: GpuCapacity, placed: list[Placement], strangers: list[ForeignProcess], demand: int, usable: int
) -> str:
    terms = [f"{p.resource} {gib(p.size)}" for p in placed]
    for process in strangers:
        amount = "memory not reported" if process.used_memory is None else gib(process.used_memory)
        terms.append(f"pid {process.pid} (not managed) {amount}")
    return f"{_header(capacity)}: {' + '.join(terms)} = {gib(demand)}, over by {gib(demand - usable)}"


def _live(capacity: GpuCapacity, placed: list[Placement], freed: list[Release]) -> str | None:
    """What starts must fit in NVML's free memory plus what the plan frees, minus the reserve."""
    if capacity.nvml_free is None:
        return None
    starting = [p for p in placed if not p.running]
    needed = sum(p.size for p in starting)
    released = sum(r.size for r in freed)
    available = capacity.nvml_free + released - capacity.reserve
    if not starting or needed <= available:
        return None
    have = " + ".join(
        [
            f"NVML shows {gib(capacity.nvml_free)} free",
            *(f"{gib(r.size)} freed by stopping {r.resource}" for r in freed),
        ]
    )
    if capacity.reserve:
        have += f" - {gib(capacity.reserve)} reserved"
    starts = " + ".join(f"{p.resource} {gib(p.size)}" for p in starting)
    return (
        f"{_header(capacity)} now: {starts} would start, {have} = {gib(max(available, 0))}, "
        f"short by {gib(needed - available)}"
    )

"""GPUs as seen from where they are used: `nvidia-smi` output read, and spec GPUs matched to what is seen.

Pure. Two callers:

- `backends.docker.DockerBackend.query_gpus()` runs `nvidia-smi` in a
  short-lived container on a Docker host (the reconciler often runs outside
  the machine that holds the GPU) and hands its output to
  `parse_nvidia_smi()`, which answers the same `NvmlObservation` the local
  NVML backend does. Hostile or odd output never crashes it: a malformed line
  raises `ValueError` naming the line, which the backend translates.
- the planner, with `match_gpus()`: a spec `Gpu` is matched to a seen GPU by
  its NVML UUID when the spec has one; by PCI address only when the GPUs are
  seen from the host whose addresses the spec names (`HostView`); inside a
  VM (`GuestView`) the addresses are the VM's own, so GPUs without a UUID are
  matched by passthrough order (hostpci0 is the GPU with the lowest guest bus
  address: PVE's q35 machine puts hostpciN behind root port N+1, i440fx in
  slot order), or a diagnostic asks for the UUID.
"""

from __future__ import annotations

import csv
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from reconciler.planning.observed import GpuProcess, NvmlObservation, ObservedGpu
from reconciler.spec.models import Gpu

__all__ = [
    "COMPUTE_APPS_QUERY",
    "GPU_QUERY",
    "SECTION_MARK",
    "GpuMatch",
    "GuestView",
    "HostView",
    "MatchedBy",
    "match_gpus",
    "normalise_bus_id",
    "parse_nvidia_smi",
]

GPU_QUERY = (
    "index,uuid,pci.bus_id,name,memory.total,memory.used,memory.free,"
    "utilization.gpu,temperature.gpu,power.draw,power.limit,driver_version"
)
COMPUTE_APPS_QUERY = "gpu_uuid,pid,used_memory"
SECTION_MARK = "--- compute-apps"  # what the container prints between the two queries
_GPU_FIELDS = len(GPU_QUERY.split(","))
_MIB = 1024**2
_MAX_LINES = 4096


def normalise_bus_id(raw: str) -> str:
    """`00000000:01:00.0` (NVML, nvidia-smi) as Linux writes it: `0000:01:00.0`, lower case."""
    text = raw.strip().lower()
    parts = text.split(":")
    if len(parts) == 2:
        parts.insert(0, "0")
    if len(parts) != 3:
        return text
    domain, bus, slot = parts
    device, _, function = slot.partition(".")
    try:
        return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{int(function or '0', 16):x}"
    except ValueError:
        return text


# ---- nvidia-smi --------------------------------------------------------------------------------------


def _missing(value: str) -> bool:
    """nvidia-smi's ways of saying "no reading": [N/A], [Not Supported], [Unknown Error], N/A, empty."""
    text = value.strip()
    return not text or text.startswith("[") or text.upper() == "N/A"


def _clean(value: str) -> str:
    """Text for people: no control characters (they would reach a terminal), at most 128 characters."""
    return "" if _missing(value) else "".join(c for c in value if c.isprintable())[:128]


def _number(value: str, line: int, what: str) -> float | None:
    if _missing(value):
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"nvidia-smi line {line}: {what} {value.strip()[:40]!r} is not a number") from None
    if not 0 <= number < 1e15:  # also refuses NaN and infinities
        raise ValueError(f"nvidia-smi line {line}: {what} {number:g} is out of range")
    return number


def _rows(text: str) -> list[tuple[int, list[str]]]:
    lines = text.splitlines()
    if len(lines) > _MAX_LINES:
        raise ValueError(f"nvidia-smi printed {len(lines)} lines; more than {_MAX_LINES} is not a GPU list")
    try:
        return [
            (number, [cell.strip() for cell in row])
            for number, row in enumerate(csv.reader(lines, skipinitialspace=True), start=1)
            if row and any(cell.strip() for cell in row)
        ]
    except csv.Error as exc:  # a field past csv's size limit, a NUL byte: not a GPU list either
        raise ValueError(f"nvidia-smi output is not CSV: {exc}") from None


def _gpu(line: int, cells: list[str], processes: Mapping[str, tuple[GpuProcess, ...]]) -> ObservedGpu:
    index, uuid, bus_id, name, total, used, free, util, temp, draw, limit, _driver = cells
    position = _number(index, line, "index")
    memory = [_number(v, line, k) for v, k in ((total, "memory.total"), (used, "memory.used"), (free, "memory.free"))]
    known = all(m is not None for m in memory)
    total_b, used_b, free_b = (int((m or 0) * _MIB) for m in memory) if known else (0, 0, 0)
    utilization, temperature = _number(util, line, "utilization.gpu"), _number(temp, line, "temperature.gpu")
    return ObservedGpu(
        index=int(position) if position is not None else line - 1,
        uuid=_clean(uuid),
        pci_bus_id=normalise_bus_id(_clean(bus_id)),
        name=_clean(name),
        memory_total=total_b,
        memory_used=used_b,
        memory_free=free_b,
        utilization=None if utilization is None else int(utilization),
        temperature=None if temperature is None else int(temperature),
        power_usage=_number(draw, line, "power.draw"),
        power_limit=_number(limit, line, "power.limit"),
        processes=processes.get(_clean(uuid), ()),
        error=None if known else "nvidia-smi does not report memory for this GPU ([N/A])",
    )


def _compute_apps(text: str, offset: int) -> dict[str, tuple[GpuProcess, ...]]:
    found: dict[str, list[GpuProcess]] = {}
    for line, cells in _rows(text):
        if len(cells) != 3:
            raise ValueError(f"nvidia-smi line {line + offset}: expected gpu_uuid, pid, used_memory")
        uuid, pid, used = cells
        number = _number(pid, line + offset, "pid")
        if number is None:
            continue
        memory = _number(used, line + offset, "used_memory")
        process = GpuProcess(pid=int(number), used_memory=None if memory is None else int(memory * _MIB))
        found.setdefault(_clean(uuid), []).append(process)
    return {uuid: tuple(processes) for uuid, processes in found.items()}


def parse_nvidia_smi(text: str) -> NvmlObservation:
    """The output of `--query-gpu=GPU_QUERY`, then optionally SECTION_MARK and `--query-compute-apps`.

    Both with `--format=csv,noheader,nounits` (MiB, W, %, C). Raises ValueError for a malformed line.
    """
    gpus_text, _, apps_text = text.partition(SECTION_MARK)
    offset = gpus_text.count("\n") + 1
    processes = _compute_apps(apps_text, offset) if apps_text else {}
    gpus: list[ObservedGpu] = []
    driver: str | None = None
    for line, cells in _rows(gpus_text):
        if len(cells) != _GPU_FIELDS:
            raise ValueError(f"nvidia-smi line {line}: expected {_GPU_FIELDS} fields, got {len(cells)}")
        gpus.append(_gpu(line, cells, processes))
        if driver is None and _clean(cells[-1]):
            driver = _clean(cells[-1])
    return NvmlObservation(available=True, driver_version=driver, gpus=tuple(gpus))


# ---- matching ------------------------------------------------------------------------------------------


class MatchedBy(enum.StrEnum):
    UUID = "uuid"
    PCI = "pci"  # the host's address
    PASSTHROUGH_ORDER = "passthrough order"


@dataclass(frozen=True, slots=True)
class HostView:
    """GPUs seen from the host that holds them: PCI addresses are the ones the spec names."""


@dataclass(frozen=True, slots=True)
class GuestView:
    """GPUs seen from inside VM `vm`, which passes through `passthrough` (spec GPU names, hostpci0 first)."""

    vm: str
    passthrough: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GpuMatch:
    """Spec GPU name -> the GPU seen, and how; `problems` name what could not be matched and what to do."""

    matched: Mapping[str, ObservedGpu] = field(default_factory=dict)
    how: Mapping[str, MatchedBy] = field(default_factory=dict)
    problems: tuple[str, ...] = ()


_Take = Callable[[Gpu, ObservedGpu, "MatchedBy"], None]


def match_gpus(expected: Sequence[Gpu], seen: Sequence[ObservedGpu], view: HostView | GuestView) -> GpuMatch:
    """Match the spec GPUs expected in this view to the GPUs seen there. Deterministic; never raises."""
    matched: dict[str, ObservedGpu] = {}
    how: dict[str, MatchedBy] = {}
    problems: list[str] = []
    taken: set[int] = set()

    def take(gpu: Gpu, found: ObservedGpu, by: MatchedBy) -> None:
        if found.index in taken:
            problems.append(f"Gpu {gpu.name}: the GPU at {found.pci_bus_id or found.uuid} is matched twice")
            return
        taken.add(found.index)
        matched[gpu.name], how[gpu.name] = found, by

    by_uuid = {g.uuid.lower(): g for g in seen if g.uuid}
    for gpu in expected:
        if gpu.uuid is None:
            continue
        found = by_uuid.get(gpu.uuid.lower())
        if found is None:
            problems.append(f"Gpu {gpu.name}: no GPU with UUID {gpu.uuid} is seen {_where(view)}{_listing(seen)}")
            continue
        take(gpu, found, MatchedBy.UUID)
        if isinstance(view, HostView) and gpu.pci_function0 and found.pci_bus_id != gpu.pci_function0:
            problems.append(
                f"Gpu {gpu.name}: UUID {gpu.uuid} is at {found.pci_bus_id}, the spec says {gpu.pci_function0}"
            )
    rest = [gpu for gpu in expected if gpu.uuid is None]
    if isinstance(view, HostView):
        by_pci = {g.pci_bus_id: g for g in seen}
        for gpu in rest:
            found = by_pci.get(gpu.pci_function0 or "")
            if found is None:
                problems.append(f"Gpu {gpu.name}: NVML has no GPU at {gpu.pci_function0}{_listing(seen)}")
            else:
                take(gpu, found, MatchedBy.PCI)
    else:
        _by_order(view, rest, [g for g in seen if g.index not in taken], take, problems)
    return GpuMatch(matched=matched, how=how, problems=tuple(problems))


def _by_order(view: GuestView, rest: list[Gpu], free: list[ObservedGpu], take: _Take, problems: list[str]) -> None:
    """Inside a VM: the GPUs without a UUID, in passthrough order, to the unmatched GPUs by guest address."""
    if not rest:
        return
    order = {name: position for position, name in enumerate(view.passthrough)}
    outside = [gpu.name for gpu in rest if gpu.name not in order]
    ordered = sorted((gpu for gpu in rest if gpu.name in order), key=lambda gpu: order[gpu.name])
    free = sorted(free, key=lambda g: (g.pci_bus_id, g.index))
    if outside or len(ordered) != len(free):
        names = ", ".join(gpu.name for gpu in rest)
        problems.append(
            f"inside VM {view.vm} the GPU addresses are the VM's own, and {names} cannot be told apart by "
            f"passthrough order ({len(ordered)} passed through without a UUID, {len(free)} seen unmatched"
            f"{_listing(free)}): give each Gpu its 'uuid' (nvidia-smi -L inside the VM prints them)"
        )
        return
    for gpu, found in zip(ordered, free, strict=True):
        take(gpu, found, MatchedBy.PASSTHROUGH_ORDER)


def _where(view: HostView | GuestView) -> str:
    return "on this host" if isinstance(view, HostView) else f"inside VM {view.vm}"


def _listing(seen: Sequence[ObservedGpu]) -> str:
    if not seen:
        return " (none is seen)"
    return " (seen: " + ", ".join(f"{g.pci_bus_id} {g.uuid}".strip() for g in seen) + ")"

"""Where work that asks for a GPU role runs: by priority, by VRAM fit, by sharing, with failover and a hold.

Pure and deterministic: the same input gives the same seats. The planner
builds the input from the spec and the observation (which GPUs are lost,
which are passed through to a running VM, where each workload runs now and
for how long) and calls `place()`; each `Seat` says where a workload goes and,
when that is not its own GPU or not where it runs now, why.

The rules, in order:

- Roles are placed by priority, highest first (then by name): a higher
  role takes a GPU before a lower one can, so the lower one's work moves.
- A role's candidates are its `prefer` GPUs in the order listed, then the GPUs
  carrying it (the one that leaves the least VRAM free first: packing), then
  its `failover` GPUs in the order listed.
- A GPU is not a candidate when it is lost, passed through to a running VM
  (unless the work runs inside that VM), smaller than the role's `min_vram`,
  or too full for the footprint. A GPU whose own role is exclusive takes
  nothing else: its role's one workload, or, while that is not there, the
  work of one other role (borrowing it).
- Work running on GPUs it may still use stays there while it has run there
  less than its role's `hold`: it moves back to its own GPU only after that,
  so a GPU taken and freed in quick succession does not make it flap. The
  hold is measured on the observation (the container's start, the pass's
  time), never on a clock read here.
- When no candidate is left, the work stops, and the seat says why.

`vm_holds_by_priority()` decides whether a VM started by hand, which the spec
would stop (an inactive member of an exclusive group), is respected: it is,
unless work of a strictly higher priority needs its GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from reconciler.planning.vram import gib
from reconciler.spec.models import GpuRole, Sharing

__all__ = ["Ask", "GpuState", "Pinned", "Seat", "place", "vm_holds_by_priority"]


@dataclass(frozen=True, slots=True)
class GpuState:
    """A spec GPU as placement sees it. `usable`: VRAM minus its reserve."""

    name: str
    role: str | None
    usable: int
    lost: bool = False
    taken_by: str | None = None  # the running VM it is passed through to


@dataclass(frozen=True, slots=True)
class Ask:
    """A workload asking for a role. `sizes`: its footprint on each GPU it could use (bytes)."""

    name: str
    role: str
    host: str
    sizes: Mapping[str, int] = field(default_factory=dict)
    now: tuple[str, ...] = ()  # the GPUs it runs on now
    ran_for: float | None = None  # seconds it has run there, from the observation


@dataclass(frozen=True, slots=True)
class Pinned:
    """Work that names its GPUs: it occupies them whatever placement decides."""

    name: str
    gpus: tuple[str, ...]
    size: int


@dataclass(frozen=True, slots=True)
class Seat:
    """Where one asking workload goes. Empty `gpus`: it stops, and `why` says why."""

    name: str
    gpus: tuple[str, ...]
    why: str | None = None  # for people: the reason of a move, a hold or a stop
    moved: bool = False  # it runs now elsewhere
    held: bool = False  # kept where it runs for its role's hold


@dataclass
class _Gpu:
    state: GpuState
    exclusive: bool  # its own role is exclusive
    used: int = 0
    tenants: list[tuple[str, str | None]] = field(default_factory=list)  # name, role

    def refusal(self, ask: Ask, role: GpuRole, size: int) -> str | None:
        """Why this GPU cannot take `ask`, or None."""
        gpu = self.state
        others = [t for t in self.tenants if t[0] != ask.name]
        if gpu.lost:
            return f"{gpu.name} is lost"
        if gpu.taken_by is not None and gpu.taken_by != ask.host:
            return f"{gpu.name} is passed through to the running VM {gpu.taken_by}"
        if role.min_vram is not None and gpu.usable < role.min_vram:
            return f"{gpu.name} is smaller than role {role.name}'s min_vram {gib(role.min_vram)}"
        if self.exclusive:
            # An exclusive role's GPU takes nothing else: its own work alone, or, while that is not there,
            # the work of one other role.
            strangers = [t for t in others if t[1] != role.name or role.name == gpu.role]
            if strangers:
                names = ", ".join(t[0] for t in strangers)
                return f"{gpu.name} holds {names} (role {strangers[0][1]}, exclusive)"
        if self.used + size > gpu.usable:
            return f"{gpu.name} has {gib(max(gpu.usable - self.used, 0))} left, {ask.name} needs {gib(size)}"
        return None

    def take(self, ask: Ask, role: GpuRole, size: int) -> None:
        self.used += size
        self.tenants.append((ask.name, role.name))


def place(
    gpus: Sequence[GpuState], roles: Mapping[str, GpuRole], asks: Sequence[Ask], pinned: Sequence[Pinned] = ()
) -> dict[str, Seat]:
    """A seat for every ask whose role exists, by the rules of the module docstring."""
    board = {gpu.name: _Gpu(gpu, _exclusive(roles.get(gpu.role or ""))) for gpu in gpus}
    for work in pinned:
        for name in work.gpus:
            if name in board:
                board[name].used += work.size
                board[name].tenants.append((work.name, board[name].state.role))
    seats: dict[str, Seat] = {}
    ordered = sorted((a for a in asks if a.role in roles), key=lambda a: (-roles[a.role].priority, a.role, a.name))
    for ask in ordered:
        seats[ask.name] = _seat(board, roles[ask.role], ask)
    return seats


def _exclusive(role: GpuRole | None) -> bool:
    return role is not None and role.sharing is Sharing.EXCLUSIVE


def _candidates(board: Mapping[str, _Gpu], role: GpuRole, ask: Ask) -> list[str]:
    """Its preferred GPUs, its own (the fullest that still fits first), then its failover GPUs."""
    own = [name for name in sorted(board) if board[name].state.role == role.name]
    own.sort(key=lambda name: board[name].state.usable - board[name].used - ask.sizes.get(name, 0))
    ordered = [*role.prefer, *own, *role.failover]
    return [name for index, name in enumerate(ordered) if name in board and name not in ordered[:index]]


def _seat(board: Mapping[str, _Gpu], role: GpuRole, ask: Ask) -> Seat:
    candidates = _candidates(board, role, ask)
    refusals: dict[str, str] = {}
    chosen: list[str] = []
    for name in candidates:
        if len(chosen) == role.gpus:
            break
        why = board[name].refusal(ask, role, ask.sizes.get(name, 0))
        if why is None:
            chosen.append(name)
        else:
            refusals[name] = why
    if len(chosen) < role.gpus:
        tried = "; ".join(refusals.values()) or f"role {role.name} has no GPU"
        return Seat(ask.name, (), f"no GPU for role {role.name} can take it: {tried}", moved=bool(ask.now))
    held = _held(board, role, ask, tuple(chosen))
    if held is not None:
        return held
    for name in chosen:
        board[name].take(ask, role, ask.sizes.get(name, 0))
    return Seat(ask.name, tuple(chosen), _reason(role, ask, tuple(chosen), refusals), moved=_moved(ask, chosen))


def _moved(ask: Ask, chosen: Sequence[str]) -> bool:
    return bool(ask.now) and set(ask.now) != set(chosen)


def _held(board: Mapping[str, _Gpu], role: GpuRole, ask: Ask, chosen: tuple[str, ...]) -> Seat | None:
    """Keep work where it runs while it has run there less than the hold, if it may still run there."""
    if not _moved(ask, chosen) or len(ask.now) != role.gpus or ask.ran_for is None or ask.ran_for >= role.hold:
        return None
    if any(name not in board or board[name].refusal(ask, role, ask.sizes.get(name, 0)) for name in ask.now):
        return None
    for name in ask.now:
        board[name].take(ask, role, ask.sizes.get(name, 0))
    left = role.hold - ask.ran_for
    why = (
        f"stays on {', '.join(ask.now)} for role {role.name}'s hold: moves to {', '.join(chosen)} "
        f"once it has run {role.hold:g} s where it is ({left:.0f} s left)"
    )
    return Seat(ask.name, ask.now, why, held=True)


def _reason(role: GpuRole, ask: Ask, chosen: tuple[str, ...], refusals: Mapping[str, str]) -> str | None:
    """Why it is not on its own GPU, or why it moves; None when it is home and stays."""
    skipped = [why for name, why in refusals.items() if name not in chosen]
    if _moved(ask, chosen):
        cause = f": {'; '.join(skipped)}" if skipped else f": {', '.join(ask.now)} is no longer its best place"
        return f"moves from {', '.join(ask.now)} to {', '.join(chosen)} (role {role.name}){cause}"
    if skipped:
        return f"runs on {', '.join(chosen)} (role {role.name}): {'; '.join(skipped)}"
    return None


def vm_holds_by_priority(vm_priority: int, wanting: Sequence[int]) -> bool:
    """Whether a VM running by hand keeps its GPUs: unless some work wanting them has a strictly higher priority."""
    return all(priority <= vm_priority for priority in wanting)

"""What every piece of the planner shares: its inputs, what the plan collects, and the helpers all use.

`planning.planner.make_plan` composes one planner from the pieces for guests (`plan_guests`, with
`plan_guest_diff`), workloads (`plan_workloads`) and GPUs (`plan_gpus`); each piece extends
`PlanContext`, so they read the same inputs and append to the same lists of changes and problems.
Pure: no I/O, no clock, no logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reconciler.planning.inventory import Inventory, spec_hash
from reconciler.planning.observed import Observed
from reconciler.planning.ownership import Ownership
from reconciler.planning.plan import Action, Address, Backend, Change, Problem
from reconciler.spec.models import DriftPolicy, ExclusiveGroup, Gpu, GpuRole, Lxc, PowerState, Resource, Vm, Workload
from reconciler.spec.placement import member_of
from reconciler.spec.state import DesiredState

__all__ = ["UNPROTECT", "PlanContext", "key_matches"]

UNPROTECT = "to delete it, declare it again with 'protect: false' and apply, then remove it"


@dataclass
class PlanContext:
    """The planner's inputs and what it collects; the pieces of the planner extend it."""

    desired: DesiredState
    observed: Observed
    inventory: Inventory
    ownership: Ownership
    changes: list[Change] = field(default_factory=list)
    conflicts: list[Problem] = field(default_factory=list)
    blockers: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    held_drift: list[Change] = field(default_factory=list)  # drift a `warn` or `ignore` policy left alone

    def __post_init__(self) -> None:
        self.lab = self.desired.lab
        self.owner = self.ownership.owner
        self.gpus = {g.name: g for g in self.desired.of(Gpu)}
        self.roles = {r.name: r for r in self.desired.of(GpuRole)}
        self.active = {g.name: g.active for g in self.desired.of(ExclusiveGroup)}
        self.guest_changes: dict[str, Change] = {}

    def desired_power(self, resource: Lxc | Vm | Workload) -> PowerState:
        """Inactive members of an exclusive group are kept stopped."""
        group = resource.exclusive
        if group is not None and self.active.get(group.group, member_of(resource)) != member_of(resource):
            return PowerState.STOPPED
        return resource.state

    def warn_unwatched_hosts(self) -> None:
        """Containers the reconciler made on a Docker host the spec no longer names are not observed, so never
        removed: say so, unless the guest they run in is deleted by this plan (they go with it)."""
        hosts = self.desired.docker_hosts()
        deleted = {c.where.name for c in self.changes if c.backend is Backend.PROXMOX and c.action is Action.DELETE}
        stranded: dict[str, list[str]] = {}
        for address in map(Address.parse, self.inventory.owned):
            host, name = address.host, address.name
            if host is not None and host not in hosts and host not in deleted and host not in self.observed.docker:
                stranded.setdefault(host, []).append(name)
        for host, names in sorted(stranded.items()):
            self.warnings.append(
                Problem(
                    f"container/{host}",
                    f"Docker host {host!r} is no longer in the spec; the containers made there "
                    f"({', '.join(sorted(names))}) are not watched and will not be removed",
                    "name the host again with no workloads and apply to remove them, "
                    f"or run `reconciler forget container/{host}` once they are gone",
                )
            )

    def is_drift(self, resource: Resource) -> bool:
        return self.inventory.spec_hashes.get(resource.ref) == spec_hash(resource, self.desired)

    def keep(self, change: Change, resource: Resource) -> None:
        """Record a change, unless it is drift the resource's policy says to leave alone."""
        if change.drift and resource.drift is not DriftPolicy.CORRECT:
            self.held_drift.append(change)
            if resource.drift is DriftPolicy.WARN:
                paths = ", ".join(f.path for f in change.fields) or str(change.action)
                self.warnings.append(Problem(resource.ref, f"drift not corrected (drift: warn): {paths}"))
            return
        self.changes.append(change)


def key_matches(key: str, prefix: str) -> bool:
    return key == prefix or (key.startswith(prefix) and key[len(prefix) :].isdigit())

"""The planner: (desired, observed, inventory) -> Plan. Pure: no I/O, no clock, no logging.

Called by `reconciler plan`, by `apply` (which executes the very Plan it
prints) and by the loop. Compares only what the spec declares, field by field
(Proxmox property strings parsed by `planning.pve`, container settings one by
one), so values Proxmox or Docker fill in never show as drift.

Ownership (see `planning.ownership`): guests carry the lab's owner tag,
containers its `<owner>.managed` label, the owner naming the lab. A spec that
names an existing guest or container the lab does not own is a conflict unless
the spec says `adopt`. What the spec no longer names is deleted only when the
lab can prove it is its own, and never when the inventory says it is protected;
the rest is an orphan warning until `--adopt-orphans`. The guard rails
(`max_deletes`, `protect`) are blockers of the plan itself.

The planner is composed of pieces, each extending `plan_context.PlanContext`
(the inputs and what the plan collects): guests (`plan_guests`, their diff in
`plan_guest_diff`), workloads (`plan_workloads`) and GPUs (`plan_gpus`). Then
`planning.order` orders the changes and `planning.ownership` adds the guard rails.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from reconciler.planning.gpudev import nvidia_numbers
from reconciler.planning.inventory import Inventory
from reconciler.planning.observed import Observed
from reconciler.planning.order import order_changes
from reconciler.planning.ownership import Ownership, guard_rails
from reconciler.planning.plan import Change, Plan
from reconciler.planning.plan_guests import GuestPlanning
from reconciler.planning.plan_workloads import WorkloadPlanning
from reconciler.spec.models import Gpu
from reconciler.spec.state import DesiredState

__all__ = ["make_plan"]


def make_plan(
    desired: DesiredState,
    observed: Observed,
    inventory: Inventory | None = None,
    *,
    allow_delete: bool = False,
    adopt_orphans: bool = False,
) -> Plan:
    """The plan. `allow_delete` lifts the `max_deletes` blocker; `adopt_orphans` takes over what carries an
    owner mark without proof (see `planning.ownership`)."""
    inventory = inventory or Inventory()
    ownership = Ownership(desired.lab.owner, adopt_orphans=adopt_orphans)
    planner = _Planner(desired, observed, inventory, ownership)
    planner.plan_guests()
    planner.plan_containers()
    planner.warn_unwatched_hosts()
    pci_devices = observed.proxmox.pci_devices if observed.proxmox else ()
    gpus = desired.of(Gpu)
    numbers = {node: nvidia_numbers(node, gpus, pci_devices) for node in {g.node for g in gpus}}
    changes = order_changes(planner.changes, desired, nvidia=numbers)
    return Plan(
        changes=changes,
        revision=desired.revision,
        conflicts=tuple(planner.conflicts),
        blockers=(*planner.blockers, *guard_rails(changes, desired, allow_delete=allow_delete)),
        warnings=tuple(planner.warnings),
        observed_digest=_digest(changes),
        held_drift=tuple(planner.held_drift),
        lab=desired.lab.name,
    )


def _digest(changes: Iterable[Change]) -> str:
    body = [[c.address, str(c.action), c.to_json()["before"]] for c in changes]
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Planner(GuestPlanning, WorkloadPlanning):
    """The pieces composed: guests (with their diff), workloads, and the GPUs both use."""

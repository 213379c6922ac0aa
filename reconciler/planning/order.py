"""Put a plan's changes in a safe order, as a dependency graph.

Rules, each an edge "this before that":
- a guest exists (and runs) before the containers inside it are created or started;
- containers are stopped or deleted before the guest they run in is stopped, replaced or deleted;
- in an exclusive group, the old member stops before the new one starts;
- a GPU is freed (its VM stopped, its container stopped, removed or replaced) before it is claimed.
Ties are broken by a fixed phase order, then by address, so the same inputs
always give the same plan.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from reconciler.planning import pve
from reconciler.planning.container_run import ContainerRun, ContainerSeen
from reconciler.planning.gpu_values import GpuValues
from reconciler.planning.gpudev import gpu_of_device
from reconciler.planning.intents import GuestSeen
from reconciler.planning.plan import Action, AddressKind, Backend, Change
from reconciler.planning.provision_intent import ProvisionIntent, ProvisionSeen
from reconciler.spec.models import Gpu, Lxc, PowerState, Resource, Vm
from reconciler.spec.placement import member_of
from reconciler.spec.state import DesiredState

__all__ = ["order_changes"]

_STARTING = {Action.CREATE, Action.START, Action.REPLACE, Action.UPDATE, Action.UPDATE_RESTART}
_STOPPING = {Action.STOP, Action.DELETE, Action.REPLACE}  # take down what runs inside first


def _phase(change: Change) -> int:
    """Default order when no edge decides: take things down, then build up from guests to containers."""
    container = change.backend is Backend.DOCKER
    if change.action in (Action.STOP, Action.DELETE):
        return 0 if container else 1
    return 3 if container else 2


def order_changes(
    changes: Iterable[Change], desired: DesiredState, *, nvidia: Mapping[str, Mapping[str, int]] | None = None
) -> tuple[Change, ...]:
    """The changes in a safe order, each with what it depends on. `nvidia` is node -> Gpu -> N of its
    /dev/nvidiaN (`gpudev.nvidia_numbers`), to tell which GPUs a live CT holds."""
    items = list(changes)
    by_address = {c.address: c for c in items}
    edges: dict[str, set[str]] = defaultdict(set)  # before -> afters

    def edge(first: Change, then: Change) -> None:
        if first.address != then.address:
            edges[first.address].add(then.address)

    guest_by_name = {c.where.name: c for c in items if c.backend is Backend.PROXMOX}
    for change in items:
        if change.backend is not Backend.DOCKER:
            continue
        host = _container_host(change)
        guest = guest_by_name.get(host) if host else None
        if guest is None:
            continue
        if change.action in _STARTING and guest.action in _STARTING:
            edge(guest, change)
        if change.action in _STOPPING and guest.action in (
            Action.STOP,
            Action.DELETE,
            Action.REPLACE,
            Action.UPDATE_RESTART,
        ):
            edge(change, guest)

    _group_edges(items, desired, edge)
    _gpu_edges(items, desired, edge, nvidia or {})
    return _topological(items, edges, by_address)


def _group_edges(items: list[Change], desired: DesiredState, edge: Any) -> None:
    members: dict[str, list[tuple[str, Change]]] = defaultdict(list)
    for change in items:
        resource = _resource(desired, change.resource)
        group = getattr(resource, "exclusive", None) if resource is not None else None
        if group is not None and resource is not None:
            members[group.group].append((member_of(resource), change))
    for entries in members.values():
        stopping = [c for _, c in entries if c.action in (Action.STOP, Action.DELETE)]
        starting = [c for _, c in entries if c.action in (Action.CREATE, Action.START, Action.REPLACE)]
        for old in stopping:
            for new in starting:
                edge(old, new)


def _gpu_edges(items: list[Change], desired: DesiredState, edge: Any, nvidia: Mapping[str, Mapping[str, int]]) -> None:
    """A change that lets go of a GPU goes before a change that takes it."""
    names_by_uuid = {g.uuid.lower(): g.name for g in desired.of(Gpu) if g.uuid}
    for change in items:
        planned = change.after
        if isinstance(planned, ContainerRun):
            for name, uuid in zip(planned.gpu_names, planned.gpus, strict=False):
                names_by_uuid.setdefault(uuid.lower(), name)
    releases: dict[str, list[Change]] = defaultdict(list)
    claims: dict[str, list[Change]] = defaultdict(list)
    for change in items:
        held_before = _held_before(change, desired, names_by_uuid, nvidia)
        held_after = _held_after(change, desired)
        for gpu in held_before - held_after:
            releases[gpu].append(change)
        for gpu in held_after if change.action is Action.REPLACE else held_after - held_before:
            claims[gpu].append(change)
    for gpu, freeing in releases.items():
        for release in freeing:
            for claim in claims.get(gpu, ()):
                if claim.address != release.address:
                    edge(release, claim)


def _held_before(
    change: Change, desired: DesiredState, names_by_uuid: Mapping[str, str], nvidia: Mapping[str, Mapping[str, int]]
) -> set[str]:
    before = change.before
    if (
        before is None
        or isinstance(before, GpuValues | ProvisionSeen)
        or before.status not in ("running", "restarting")
    ):
        return set()  # a GPU's settings or a guest's provisioning hold no GPU
    if isinstance(before, ContainerSeen):
        return {names_by_uuid.get(u.lower(), u) for u in before.gpus}
    held = _gpus_in_config(before, desired, nvidia)
    if change.action is Action.REPLACE:
        held |= _held_after(change, desired)
    return held


def _held_after(change: Change, desired: DesiredState) -> set[str]:
    after = change.after
    if change.action in (Action.STOP, Action.DELETE) or after is None or isinstance(after, GpuValues | ProvisionIntent):
        return set()
    if after.state is not PowerState.RUNNING:
        return set()
    if isinstance(after, ContainerRun):
        return set(after.gpu_names)
    resource = _resource(desired, change.resource)
    if isinstance(resource, Vm):
        return {p.gpu for p in resource.gpus}
    if isinstance(resource, Lxc):
        return set(resource.gpus)
    return set()


def _gpus_in_config(
    before: GuestSeen | None, desired: DesiredState, nvidia: Mapping[str, Mapping[str, int]] | None = None
) -> set[str]:
    """The GPUs a guest holds now, read from its live config (hostpciN by address or mapping, devN by number)."""
    if before is None:
        return set()
    node = before.node
    gpus = [g for g in desired.of(Gpu) if g.node == node]
    numbers = (nvidia or {}).get(str(node), {})
    held: set[str] = set()
    for key, value in (before.config or {}).items():
        text = str(value)
        if key.startswith("hostpci"):
            held.update(gpu.name for gpu in gpus if _passes_through(text, gpu))
        elif key.startswith("dev"):
            gpu = gpu_of_device(text, numbers)
            if gpu is not None:
                held.add(gpu)
    return held


def _passes_through(hostpci: str, gpu: Gpu) -> bool:
    """Whether a hostpciN value gives `gpu` to the VM: by its mapping name, or by its device's host address."""
    fields = pve.parse_property(hostpci, "host")
    if "mapping" in fields:
        return gpu.mapping is not None and fields["mapping"] == gpu.mapping
    if not gpu.pci_function0:
        return False
    device = _device(gpu.pci_function0)
    return any(_device(address) == device for address in fields.get("host", "").split(";") if address)


def _device(address: str) -> str:
    """`0000:01:00.0` and `01:00` both name device `0000:01:00`."""
    return pve.pci_address_key(address).split(".", 1)[0]


def _topological(
    items: list[Change], edges: Mapping[str, set[str]], by_address: Mapping[str, Change]
) -> tuple[Change, ...]:
    incoming: dict[str, set[str]] = defaultdict(set)
    for first, thens in edges.items():
        for then in thens:
            if then in by_address and first in by_address:
                incoming[then].add(first)
    remaining = {c.address: set(incoming.get(c.address, ())) for c in items}
    ready = [(_phase(c), c.address) for c in items if not remaining[c.address]]
    heapq.heapify(ready)
    ordered: list[Change] = []
    while ready or remaining:
        if not ready:
            # A cycle: fall back to the phase order for what is left, rather than plan nothing.
            address = min(remaining, key=lambda a: (_phase(by_address[a]), a))
            remaining[address] = set()
            heapq.heappush(ready, (_phase(by_address[address]), address))
        _, address = heapq.heappop(ready)
        if address not in remaining:
            continue
        del remaining[address]
        ordered.append(by_address[address])
        for then in sorted(edges.get(address, ())):
            waiting = remaining.get(then)
            if waiting is None:
                continue
            waiting.discard(address)
            if not waiting:
                heapq.heappush(ready, (_phase(by_address[then]), then))
    return tuple(
        replace(change, depends_on=tuple(sorted(a for a in incoming.get(change.address, ()) if a in by_address)))
        for change in ordered
    )


def _container_host(change: Change) -> str | None:
    where = change.where
    return where.host if where.kind is AddressKind.CONTAINER else None


def _resource(desired: DesiredState, ref: str) -> Resource | None:
    return desired.find(ref)

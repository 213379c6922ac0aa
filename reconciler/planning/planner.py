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

A guest change that PVE cannot make in place is a replace: its create carries
every create-time key, and `Change.loses` names the volumes it destroys. A
volume asked for on another storage is moved in place instead (`after["move"]`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.planning import pve
from reconciler.planning.containers import DesiredContainer, desired_container, label_keys
from reconciler.planning.gpudev import nvidia_numbers
from reconciler.planning.guest_access import access_config, with_create_access
from reconciler.planning.inventory import OLD_SUFFIX, Inventory, spec_hash
from reconciler.planning.observed import (
    DockerObservation,
    GuestKind,
    NvmlObservation,
    Observed,
    ObservedContainer,
    ObservedGuest,
    ProxmoxObservation,
)
from reconciler.planning.order import order_changes
from reconciler.planning.ownership import LEGACY_OWNER, Claim, Ownership, guard_rails, volumes_lost
from reconciler.planning.plan import (
    SENSITIVE,
    Action,
    Address,
    Backend,
    Change,
    FieldChange,
    Plan,
    Problem,
    Timing,
    fingerprint,
    is_hidden,
)
from reconciler.spec.models import DriftPolicy, ExclusiveGroup, Gpu, GpuRole, Lxc, PowerState, Resource, Vm, Workload
from reconciler.spec.placement import member_of, place_role
from reconciler.spec.state import DesiredState

__all__ = ["make_plan"]

_UNPROTECT = "to delete it, declare it again with 'protect: false' and apply, then remove it"
NVIDIA_SHARED_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")

# Spec fields -> the Proxmox config keys they become (for `ignore:`).
_PVE_KEYS_OF_FIELD: dict[str, tuple[str, ...]] = {
    "network": ("net",),
    "mounts": ("mp",),
    "volumes": ("mp",),
    "gpus": ("dev", "hostpci"),
    "disks": ("scsi", "virtio", "sata", "ide"),
    "hostname": ("hostname",),
    "rootfs": ("rootfs",),
}


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


@dataclass
class _Planner:
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

    # ---- shared ------------------------------------------------------------------------

    def desired_power(self, resource: Lxc | Vm | Workload) -> PowerState:
        """Inactive members of an exclusive group are kept stopped."""
        group = resource.exclusive
        if group is not None and self.active.get(group.group, member_of(resource)) != member_of(resource):
            return PowerState.STOPPED
        return resource.state

    def volume_growth(self, guest: Lxc | Vm, diff: pve.FieldDiff) -> str | None:
        """The new size of a volume that grows; a blocker (and None) for one that would shrink."""
        sizes = [(before, after) for sub, before, after in diff.fields if sub == "size"]
        live, wanted = sizes[0] if sizes else (None, None)
        if live is None or wanted is None:
            return None
        try:
            shrinks = pve.parse_pve_size(wanted) < pve.parse_pve_size(live)
        except ValueError:
            return None
        if shrinks:
            self.blockers.append(
                Problem(
                    guest.ref,
                    f"{diff.key} is {live} and the spec asks for {wanted}: Proxmox cannot shrink a disk",
                    f"set its size back to at least {live}, or move the data to a new, smaller volume",
                )
            )
            return None
        return wanted

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

    # ---- Proxmox guests ------------------------------------------------------------------

    def plan_guests(self) -> None:
        guests: list[Lxc | Vm] = [*self.desired.of(Lxc), *self.desired.of(Vm)]
        proxmox = self.observed.proxmox
        if guests and proxmox is None:
            for guest in guests:
                self.blockers.append(Problem(guest.ref, "Proxmox was not observed", "configure the Lab's proxmox"))
            return
        if proxmox is None:
            return
        live = {g.vmid: g for g in proxmox.guests}
        wanted = {g.vmid for g in guests}
        for guest in guests:
            self.plan_guest(guest, live.get(guest.vmid), proxmox)
        for vmid, seen in sorted(live.items()):
            marks = self.ownership.of_tags(seen.tags)
            if vmid in wanted or not marks.any:
                continue
            address = f"{seen.type}/{seen.name or vmid}"
            if vmid in self.inventory.protected_vmids or address in self.inventory.protected:
                self.warnings.append(
                    Problem(address, "owned but no longer in the spec; protected, so kept", _UNPROTECT)
                )
                continue
            claim = self.ownership.claim(marks, recorded=vmid in self.inventory.owned_vmids)
            if claim is Claim.ORPHAN:
                self.warnings.append(self.ownership.orphan(address, marks))
                continue
            if claim is Claim.FOREIGN:
                continue
            lost = volumes_lost(seen.type, seen.config)
            self.changes.append(
                Change(
                    address,
                    Action.DELETE,
                    address,
                    Backend.PROXMOX,
                    before={
                        "type": str(seen.type),
                        "node": seen.node,
                        "vmid": vmid,
                        "name": seen.name,
                        "status": seen.status,
                    },
                    after=None,
                    reason="owned by this lab and no longer in the spec"
                    + ("; its volumes and their data are lost" if lost else ""),
                    loses=lost,
                )
            )

    def plan_guest(self, guest: Lxc | Vm, seen: ObservedGuest | None, proxmox: ProxmoxObservation) -> None:
        kind = GuestKind.LXC if isinstance(guest, Lxc) else GuestKind.QEMU
        power = self.desired_power(guest)
        config = self.guest_config(guest, proxmox)
        if config is None:
            return
        if seen is None:
            change = Change(
                f"{kind}/{guest.name}",
                Action.CREATE,
                guest.ref,
                Backend.PROXMOX,
                before=None,
                after=with_create_access(
                    self.guest_after(guest, kind, config, power, create=True), guest, self.desired.files
                ),
                reason=f"{guest.ref} does not exist",
            )
            self.guest_changes[guest.name] = change
            self.changes.append(change)
            return
        tagged = self.guest_usable(guest, kind, seen)
        if tagged is not None:
            self.update_guest(guest, kind, seen, config, power, tagged=tagged)

    def guest_usable(self, guest: Lxc | Vm, kind: GuestKind, seen: ObservedGuest) -> bool | None:
        """Whether the live guest carries this lab's tag; None when it cannot be planned (a conflict or a
        blocker is recorded): another kind, not ours and not adopted, its node silent or another node."""
        if seen.type is not kind:
            self.conflicts.append(
                Problem(guest.ref, f"vmid {guest.vmid} is a {seen.type} guest ({seen.name}), not {kind}")
            )
            return None
        marks = self.ownership.of_tags(seen.tags)
        owned = self.ownership.owns_named(marks, recorded=guest.vmid in self.inventory.owned_vmids)
        if not owned and not guest.adopt:
            if marks.legacy:
                self.conflicts.append(self.ownership.orphan(guest.ref, marks, named=True))
                return None
            self.conflicts.append(
                Problem(
                    guest.ref,
                    f"vmid {guest.vmid} exists ({seen.name} on {seen.node}) and is not managed by this lab",
                    "set 'adopt: true' to take it over, or choose another vmid",
                )
            )
            return None
        if seen.status == "unknown":
            self.blockers.append(
                Problem(
                    guest.ref,
                    f"its node {seen.node!r} does not answer; it cannot be compared",
                    "bring the node back, or wait",
                )
            )
            return None
        if seen.node != guest.node:
            self.blockers.append(
                Problem(
                    guest.ref,
                    f"is on node {seen.node!r}, the spec says {guest.node!r}",
                    "migrate it by hand or change 'node'",
                )
            )
            return None
        return marks.ours  # an adopted guest, or one with the old default tag, gets this lab's tag

    def update_guest(
        self,
        guest: Lxc | Vm,
        kind: GuestKind,
        seen: ObservedGuest,
        config: Mapping[str, str],
        power: PowerState,
        *,
        tagged: bool,
    ) -> None:
        """The change that brings an existing guest to its spec, if any: config, volumes, power."""
        running = seen.status == "running"
        diff = self.guest_diff(guest, kind, seen, config)
        fields = diff.fields
        # Adopting a guest adds the owner tag; the tags compared above already do when the spec sets tags.
        adopt_tags = ";".join(pve.normalise_tags([*seen.tags, self.owner]))
        if not tagged and not any(f.path == "tags" for f in fields):
            fields.append(FieldChange("tags", ";".join(seen.tags), adopt_tags, Timing.LIVE))
        power_change = (power is PowerState.RUNNING) != running
        if not fields and not power_change:
            return
        drift = self.is_drift(guest)  # after the common no-change return: it hashes the spec
        before = {
            "type": kind,
            "node": seen.node,
            "vmid": seen.vmid,
            "status": seen.status,
            "digest": seen.digest,
            "config": {k: seen.config.get(k) for k in sorted({*diff.desired, *diff.removed}) if k in seen.config},
        }
        after = self.guest_update_after(guest, kind, seen, diff, power, adopt_tags=None if tagged else adopt_tags)
        lost: tuple[str, ...] = ()
        if fields:
            action = _guest_action(fields, running)
            reason = _guest_reason(fields, action, drift=drift, moves=diff.moves)
            if action is Action.REPLACE:
                # Destroyed and created again from the spec: every create-time key (ostemplate...), a new disk.
                after = with_create_access(
                    self.guest_after(guest, kind, config, power, create=True), guest, self.desired.files
                )
                lost = volumes_lost(kind, seen.config)
                reason += "; the guest is destroyed and created again: its volumes and their data are lost"
            if power_change:
                reason += f"; then {'start' if power is PowerState.RUNNING else 'stop'}"
        else:
            action = Action.START if power is PowerState.RUNNING else Action.STOP
            reason = f"is {seen.status}, should be {power}"
        change = Change(
            f"{kind}/{guest.name}",
            action,
            guest.ref,
            Backend.PROXMOX,
            before=before,
            after=after,
            fields=tuple(fields),
            reason=reason,
            drift=drift,
            loses=lost,
        )
        self.guest_changes[guest.name] = change
        self.keep(change, guest)

    def guest_update_after(
        self,
        guest: Lxc | Vm,
        kind: GuestKind,
        seen: ObservedGuest,
        diff: _GuestDiff,
        power: PowerState,
        *,
        adopt_tags: str | None,
    ) -> dict[str, Any]:
        """An update's `after`: the config to send, what to delete, grow and move."""
        # What to send keeps what PVE added to the live value (a NIC's MAC, a volume's id); a revert is
        # rendered over the current value, so that it equals it and PVE drops the pending one.
        to_send = {
            key: pve.update_value(kind, key, value, (seen.config if key in diff.reverting else diff.effective).get(key))
            for key, value in diff.desired.items()
        }
        if adopt_tags is not None:
            to_send.setdefault("tags", adopt_tags)  # `ignore: [tags]` leaves them out of the spec's config
        after = self.guest_after(guest, kind, to_send, power, create=False)
        after["delete"] = diff.removed
        if diff.grow:
            after["resize"] = diff.grow
        if diff.moves:
            after["move"] = diff.moves
        return after

    def guest_diff(
        self, guest: Lxc | Vm, kind: GuestKind, seen: ObservedGuest, config: Mapping[str, str]
    ) -> _GuestDiff:
        """How the live guest (its pending changes included) differs from the config the spec asks for."""
        running = seen.status == "running"
        pending, pending_delete = _real_pending(kind, seen)
        effective = {**seen.config, **pending}
        for key in pending_delete:
            effective.pop(key, None)
        desired_cfg = {k: v for k, v in config.items() if k not in pve.CREATE_ONLY[kind]}
        diffs = pve.compare_config(kind, desired_cfg, effective)
        # A key whose pending change (or pending delete) the spec undoes: the guest runs with the desired
        # value already, and setting it again cancels the pending one at once (PVE's cleanup_pending).
        reverting = {
            key
            for key in desired_cfg
            if (key in pending or key in pending_delete)
            and key in seen.config
            and not pve.compare_config(kind, {key: desired_cfg[key]}, seen.config)
        }
        hotplug = seen.config.get("hotplug")  # what the running VM can take live follows its current setting
        fields, grow, moves = self.config_fields(
            guest, kind, diffs, reverting=reverting, running=running, hotplug=hotplug
        )
        removed = _removed_keys(guest, desired_cfg, effective)
        for key in removed:
            timing = pve.classify(kind, key, running, delete=True, hotplug=hotplug)
            fields.append(FieldChange(key, effective[key], None, timing))
        pending_restart = running and any(key in desired_cfg for key in (*pending, *pending_delete))
        if pending_restart and not fields:
            fields = [
                FieldChange(key, seen.config.get(key), pending.get(key), Timing.RESTART)
                for key in sorted({*pending, *pending_delete})
                if key in desired_cfg
            ]
        return _GuestDiff(fields, desired_cfg, effective, reverting, removed, grow, moves)

    def config_fields(
        self,
        guest: Lxc | Vm,
        kind: GuestKind,
        diffs: list[pve.FieldDiff],
        *,
        reverting: set[str],
        running: bool,
        hotplug: str | None,
    ) -> tuple[list[FieldChange], dict[str, str], dict[str, str]]:
        """The field changes of a guest's config differences, when each takes effect, and the volumes that
        grow (key -> size, PVE's resize call) or move (key -> storage, PVE's move_volume / move_disk)."""
        fields: list[FieldChange] = []
        grow: dict[str, str] = {}
        moves: dict[str, str] = {}
        for diff in diffs:
            if diff.resize and not diff.replace:
                size = self.volume_growth(guest, diff)
                if size is not None:
                    grow[diff.key] = size
            if diff.replace:
                timing = Timing.REPLACE
            elif diff.move:
                moves[diff.key] = str(pve.volume_storage(kind, diff.key, diff.after))
                # a CT volume moves stopped
                timing = Timing.RESTART if kind is GuestKind.LXC and running else Timing.LIVE
            elif diff.key in reverting or (diff.key in grow and all(sub == "size" for sub, _, _ in diff.fields)):
                timing = Timing.LIVE  # a disk grows online, on a running guest too
            else:
                new, gone = diff.before is None, diff.after is None
                timing = pve.classify(kind, diff.key, running, new=new, delete=gone, hotplug=hotplug)
            if diff.fields and diff.before is not None and diff.after is not None:
                fields.extend(
                    FieldChange(f"{diff.key}.{sub}", before, after, timing) for sub, before, after in diff.fields
                )
            else:
                fields.append(FieldChange(diff.key, diff.before, diff.after, timing))
        return fields, grow, moves

    def guest_after(
        self, guest: Lxc | Vm, kind: str, config: Mapping[str, str], power: PowerState, *, create: bool
    ) -> dict[str, Any]:
        after: dict[str, Any] = {
            "type": kind,
            "node": guest.node,
            "vmid": guest.vmid,
            "state": str(power),
            "config": dict(sorted(config.items())),
        }
        if not create:
            after["delete"] = []
        return after

    def guest_config(self, guest: Lxc | Vm, proxmox: ProxmoxObservation) -> dict[str, str] | None:
        tagged = guest.model_copy(update={"tags": tuple(sorted({*guest.tags, self.owner}))})
        ignored = _ignored_prefixes(guest)
        if isinstance(tagged, Lxc):
            devices = self.lxc_devices(tagged, proxmox)
            config = pve.lxc_config(tagged, gpu_devices=devices)
        else:
            config = pve.vm_config(tagged, hostpci=self.hostpci(tagged))
        config.update(access_config(tagged, self.desired.files))
        return {k: v for k, v in config.items() if not any(_key_matches(k, p) for p in ignored)}

    def lxc_devices(self, lxc: Lxc, proxmox: ProxmoxObservation) -> list[str]:
        """/dev/nvidiaN per GPU (N: its rank by PCI address among the node's NVIDIA GPUs), then the shared nodes."""
        if not lxc.gpus:
            return []
        numbers = nvidia_numbers(lxc.node, self.gpus.values(), proxmox.pci_devices)
        devices = []
        for name in lxc.gpus:
            if name not in numbers:
                self.blockers.append(
                    Problem(
                        lxc.ref, f"cannot tell the /dev/nvidia number of Gpu {name!r}", "give the Gpu its 'pci' address"
                    )
                )
                continue
            devices.append(f"/dev/nvidia{numbers[name]}")
        return devices + list(NVIDIA_SHARED_DEVICES)

    def hostpci(self, vm: Vm) -> list[str]:
        rendered = []
        for passthrough in vm.gpus:
            gpu = self.gpus[passthrough.gpu]
            options = {"pcie": passthrough.pcie, "x-vga": passthrough.x_vga, "rombar": passthrough.rombar}
            flags = ",".join(f"{k}={int(v)}" for k, v in options.items() if v is not None and (v or k == "rombar"))
            if gpu.mapping:
                head = f"mapping={gpu.mapping}"
            else:
                assert gpu.pci_function0 is not None  # validation guarantees pci or mapping
                head = gpu.pci_function0.rsplit(".", 1)[0] if passthrough.all_functions else gpu.pci_function0
            rendered.append(f"{head},{flags}" if flags else head)
        return rendered

    # ---- Docker containers ----------------------------------------------------------------

    def plan_containers(self) -> None:
        workloads: list[Workload] = [w for w in self.desired.resources if isinstance(w, Workload)]
        resolved, problems = self.resolve_gpus()
        available = self.available_gpus()
        wanted: dict[str, set[str]] = {}
        for workload in workloads:
            names = self.gpus_for(workload, available, quiet=self.desired_power(workload) is PowerState.STOPPED)
            container = desired_container(
                workload, lab=self.lab, gpu_names=names, gpu_uuids=resolved, revision=self.desired.revision
            )
            for name in container.unresolved_gpus:
                self.blockers.append(
                    Problem(
                        workload.ref,
                        f"Gpu {name!r} could not be resolved to an NVML UUID: {problems[name]}",
                        "give the Gpu its 'uuid', or run where NVML sees it",
                    )
                )
            power = self.desired_power(workload)
            if power is not container.state:
                container = _with_state(container, power)
            wanted.setdefault(workload.host, set()).add(workload.name)
            self.plan_container(workload, container)
        for host, seen in sorted(self.observed.docker.items()):
            if not seen.reachable:
                continue
            for live in seen.containers:
                marks = self.ownership.of_labels(live.labels)
                if not marks.any or live.name in wanted.get(host, set()):
                    continue
                keys = label_keys(self.owner if marks.ours else LEGACY_OWNER)
                if live.labels.get(keys["host"], host) != host:
                    continue  # one engine serving two hosts of the spec: the other host's container
                if live.name.endswith(OLD_SUFFIX):
                    continue  # kept by an apply for its rollback; the apply removes it
                address = f"container/{host}/{live.name}"
                if address in self.inventory.protected:
                    self.warnings.append(
                        Problem(address, "owned but no longer in the spec; protected, so kept", _UNPROTECT)
                    )
                    continue
                claim = self.ownership.claim(marks, recorded=address in self.inventory.owned)
                if claim is not Claim.MINE:
                    if claim is Claim.ORPHAN:
                        self.warnings.append(self.ownership.orphan(address, marks))
                    continue
                self.changes.append(
                    Change(
                        address,
                        Action.DELETE,
                        address,
                        Backend.DOCKER,
                        before=_container_view(live),
                        after=None,
                        reason="owned by this lab and no longer in the spec",
                    )
                )

    def plan_container(self, workload: Workload, container: DesiredContainer) -> None:
        host = self.observed.docker.get(workload.host)
        if host is None or not host.reachable:
            self.plan_container_unseen(workload, container, host)
            return
        host_label = label_keys(self.owner)["host"]
        live = next(
            (
                c
                for c in host.containers
                if c.name == container.name and c.labels.get(host_label, workload.host) == workload.host
            ),
            None,
        )
        if live is None:
            self.changes.append(
                Change(
                    container.address,
                    Action.CREATE,
                    workload.ref,
                    Backend.DOCKER,
                    before=None,
                    after=container.to_json(),
                    reason=f"{workload.ref} has no container on {workload.host!r}",
                )
            )
            return
        if self.container_usable(workload, container, live):
            self.update_container(workload, container, live)

    def plan_container_unseen(
        self, workload: Workload, container: DesiredContainer, host: DockerObservation | None
    ) -> None:
        """A container on a host not observed: created once its guest is, else the plan is blocked."""
        guest_change = self.guest_changes.get(workload.host)
        if guest_change is not None and guest_change.action in (Action.CREATE, Action.START):
            self.changes.append(
                Change(
                    container.address,
                    Action.CREATE,
                    workload.ref,
                    Backend.DOCKER,
                    before=None,
                    after=container.to_json(),
                    reason=f"its host {workload.host!r} is being created or started",
                )
            )
            return
        why = host.error if host is not None and host.error else "not observed"
        self.blockers.append(
            Problem(
                workload.ref,
                f"Docker host {workload.host!r} is unreachable: {why}",
                "check the host's docker endpoint",
            )
        )

    def container_usable(self, workload: Workload, container: DesiredContainer, live: ObservedContainer) -> bool:
        """Whether the lab may change the live container of that name; a conflict is recorded when not."""
        marks = self.ownership.of_labels(live.labels)
        owned = self.ownership.owns_named(marks, recorded=container.address in self.inventory.owned)
        if owned or workload.adopt:
            return True
        if marks.legacy:
            self.conflicts.append(self.ownership.orphan(workload.ref, marks, named=True))
            return False
        self.conflicts.append(
            Problem(
                workload.ref,
                f"container {live.name!r} on {workload.host!r} exists and is not managed by this lab",
                "set 'adopt: true' to replace it, or rename",
            )
        )
        return False

    def update_container(self, workload: Workload, container: DesiredContainer, live: ObservedContainer) -> None:
        """The change that brings a live container to its spec, if any: recreated when a field differs."""
        keys = label_keys(self.owner)
        fields = _container_fields(container, live, keys, ignored=set(workload.ignore))
        running = live.status in ("running", "restarting")
        want_running = container.state is PowerState.RUNNING
        drift = self.is_drift(workload)
        before = _container_view(live)
        after = container.to_json()
        if fields:
            why = ", ".join(sorted({f.path.split(".")[0] for f in fields}))
            change = Change(
                container.address,
                Action.REPLACE,
                workload.ref,
                Backend.DOCKER,
                before=before,
                after=after,
                fields=tuple(fields),
                reason=f"{'drift' if drift else 'spec'}: {why} (containers are recreated)",
                drift=drift,
            )
        elif want_running != running or (want_running and live.health == "unhealthy"):
            action = Action.START if want_running else Action.STOP
            reason = (
                f"is {live.status}" + (f" ({live.health})" if live.health else "") + f", should be {container.state}"
            )
            change = Change(
                container.address,
                action,
                workload.ref,
                Backend.DOCKER,
                before=before,
                after=after,
                reason=reason,
                drift=drift,
            )
        else:
            return
        self.keep(change, workload)

    def gpus_for(self, workload: Workload, available: set[str], *, quiet: bool = False) -> tuple[str, ...]:
        """GPU names for a workload; a role lands on the GPUs available now, failing over when it must."""
        if workload.gpus:
            return workload.gpus
        if workload.role is None or workload.role not in self.roles:
            return ()
        role = self.roles[workload.role]
        placed = place_role(role, self.gpus.values(), available=available)
        if quiet:  # a workload kept stopped claims nothing now: no failover to report
            return placed or place_role(role, self.gpus.values())
        if not placed:
            placed = place_role(role, self.gpus.values())
            self.warnings.append(
                Problem(workload.ref, f"no available GPU for role {role.name!r}; planned on {', '.join(placed)}")
            )
        elif placed != place_role(role, self.gpus.values()):
            self.warnings.append(Problem(workload.ref, f"role {role.name!r} failed over to {', '.join(placed)}"))
        return placed

    def available_gpus(self) -> set[str]:
        """Declared GPUs that are neither lost (NVML) nor passed through to a running VM."""
        nvml = self.observed.nvml
        lost: set[str] = set()
        if nvml is not None and nvml.available:
            for gpu in self.gpus.values():
                seen = _nvml_gpu(gpu, nvml)
                if seen is not None and seen.lost:
                    lost.add(gpu.name)
        taken = {p.gpu for vm in self.desired.of(Vm) if self.desired_power(vm) is PowerState.RUNNING for p in vm.gpus}
        return set(self.gpus) - lost - taken | {n for n in taken if self._inside_vm_only(n)}

    def _inside_vm_only(self, gpu_name: str) -> bool:
        # A GPU passed through to a VM stays available to workloads that run in that VM.
        return any(
            w.host == vm.name
            for vm in self.desired.of(Vm)
            for w in self.desired.resources
            if isinstance(w, Workload) and any(p.gpu == gpu_name for p in vm.gpus)
        )

    def resolve_gpus(self) -> tuple[dict[str, str], dict[str, str]]:
        """GPU name -> NVML UUID, from the spec or from NVML by PCI address; and why the others failed."""
        resolved: dict[str, str] = {}
        problems: dict[str, str] = {}
        nvml = self.observed.nvml
        for gpu in self.gpus.values():
            seen = _nvml_gpu(gpu, nvml) if nvml is not None and nvml.available else None
            if gpu.uuid:
                resolved[gpu.name] = gpu.uuid
                if seen is not None and seen.uuid.lower() != gpu.uuid.lower():
                    self.warnings.append(
                        Problem(gpu.ref, f"NVML reports {seen.uuid} at {seen.pci_bus_id}, the spec says {gpu.uuid}")
                    )
            elif seen is not None and not seen.lost:
                resolved[gpu.name] = seen.uuid
            elif seen is not None:
                problems[gpu.name] = f"the GPU at {gpu.pci_function0} is lost ({seen.error or 'GPU is lost'})"
            elif nvml is None:
                problems[gpu.name] = "NVML was not read"
            elif not nvml.available:
                problems[gpu.name] = f"NVML is not available ({nvml.error})"
            else:
                problems[gpu.name] = f"NVML has no GPU at {gpu.pci_function0}"
        return resolved, problems


def _nvml_gpu(gpu: Gpu, nvml: NvmlObservation | None) -> Any:
    if nvml is None:
        return None
    for seen in nvml.gpus:
        if gpu.uuid and seen.uuid.lower() == gpu.uuid.lower():
            return seen
        if gpu.pci_function0 and seen.pci_bus_id.lower() == gpu.pci_function0:
            return seen
    return None


def _real_pending(kind: GuestKind, seen: ObservedGuest) -> tuple[dict[str, str], frozenset[str]]:
    """The pending changes that change something: a pending value equal to the current one, or a pending
    delete of a key the config does not hold, is none.

    PVE drops those itself when it writes a config (cleanup_pending, by string equality); one left
    behind (fakepve keeps a VM's; PVE keeps a value equal but spelled differently) must not read as a
    change waiting for a restart, which would plan a restart on every pass.
    """
    pending = {
        key: value
        for key, value in seen.pending.items()
        if key not in seen.config
        or pve.compare_config(kind, {key: value}, seen.config)
        or pve.compare_config(kind, {key: seen.config[key]}, {key: value})
    }
    return pending, frozenset(key for key in seen.pending_delete if key in seen.config)


@dataclass(frozen=True, slots=True)
class _GuestDiff:
    """A live guest against its spec: the field changes, and what to send, remove, grow and move."""

    fields: list[FieldChange]
    desired: dict[str, str]  # the spec's config, create-time keys left out
    effective: dict[str, str]  # the live config with its pending changes
    reverting: set[str]  # keys whose pending change the spec undoes
    removed: list[str]
    grow: dict[str, str]
    moves: dict[str, str]


def _guest_reason(fields: list[FieldChange], action: Action, *, drift: bool, moves: Mapping[str, str]) -> str:
    why = ", ".join(sorted({f.path.split(".")[0] for f in fields}))
    reason = f"{'drift' if drift else 'spec'}: {why}"
    if moves:
        reason += " (" + ", ".join(f"{k} moves to {v} with its data" for k, v in sorted(moves.items())) + ")"
    if action is Action.UPDATE_RESTART:
        reason += " (takes effect after a restart)"
    return reason


def _guest_action(fields: list[FieldChange], running: bool) -> Action:
    if any(f.timing is Timing.REPLACE for f in fields):
        return Action.REPLACE
    if running and any(f.timing is Timing.RESTART for f in fields):
        return Action.UPDATE_RESTART
    return Action.UPDATE


# Spec fields whose Proxmox keys are a numbered family the spec owns as a whole once it sets the field:
# a key of the family that the spec no longer renders is removed. Disks are never removed (data).
_OWNED_FAMILIES: dict[str, dict[str, str]] = {
    "Lxc": {"gpus": "dev", "mounts": "mp", "volumes": "mp", "network": "net"},
    "Vm": {"gpus": "hostpci", "network": "net"},
}


def _removed_keys(guest: Lxc | Vm, desired: Mapping[str, str], live: Mapping[str, str]) -> list[str]:
    families = {
        prefix
        for name, prefix in _OWNED_FAMILIES[guest.kind].items()
        if name in guest.model_fields_set and name not in guest.ignore
    }
    return sorted(
        (key for key in live if key not in desired and any(_key_matches(key, p) and key != p for p in families)),
        key=lambda k: (k.rstrip("0123456789"), int(k[len(k.rstrip("0123456789")) :] or 0)),
    )


def _ignored_prefixes(resource: Resource) -> list[str]:
    prefixes: list[str] = []
    for name in resource.ignore:
        top = name.split(".")[0]
        prefixes.extend(_PVE_KEYS_OF_FIELD.get(top, (top,)))
    return prefixes


def _key_matches(key: str, prefix: str) -> bool:
    return key == prefix or (key.startswith(prefix) and key[len(prefix) :].isdigit())


def _with_state(container: DesiredContainer, state: PowerState) -> DesiredContainer:
    from dataclasses import replace

    return replace(container, state=state)


def _container_view(live: ObservedContainer) -> dict[str, Any]:
    return {
        "host": live.host,
        "name": live.name,
        "id": live.id[:12],
        "image": live.image,
        "status": live.status,
        "health": live.health,
        "gpus": list(live.gpus),
    }


# Container settings compared as a whole: an item added to a list is shown with the whole list.
_WHOLE_FIELDS = frozenset({"command", "entrypoint", "ports", "volumes", "gpus", "devices"})


def _container_fields(
    desired: DesiredContainer, live: ObservedContainer, keys: Mapping[str, str], *, ignored: set[str]
) -> list[FieldChange]:
    """Field differences between the container wanted and the one running (declared fields only).

    Both sides become the same nested view, and deepdiff finds what differs, per env var and label.
    """
    before, after = _container_views(desired, live, keys)
    for name in ignored:
        before.pop(name, None)
        after.pop(name, None)
    if before == after:
        if live.labels.get(keys["spec_hash"]) != desired.labels.get(keys["spec_hash"]):
            # Nothing declared differs, yet the spec did (a health check, a removed setting).
            old, new = live.labels.get(keys["spec_hash"]), desired.labels.get(keys["spec_hash"])
            return [FieldChange("spec", old, new, Timing.REPLACE)]
        return []
    # Imported only when something differs: deepdiff brings numpy (~35 MB), which a steady daemon never needs.
    from deepdiff import DeepDiff

    changes: dict[str, FieldChange] = {}
    for levels in DeepDiff(before, after, ignore_order=True, view="tree").tree.values():
        for level in levels:
            path = [str(part) for part in level.path(output_format="list")]
            if path[0] in _WHOLE_FIELDS or len(path) == 1:
                key, old, new = path[0], before.get(path[0]), after.get(path[0])
            else:
                key, old, new = ".".join(path[:2]), before[path[0]].get(path[1]), after[path[0]].get(path[1])
            sensitive = path[0] == "env" and len(path) > 1 and (path[1] in desired.secret_env or is_hidden(old))
            changes.setdefault(key, FieldChange(key, old, new, Timing.REPLACE, sensitive))
    return [changes[key] for key in sorted(changes)]


def _container_views(
    desired: DesiredContainer, live: ObservedContainer, keys: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the spec declares of a container, from the spec and from the live container, side by side."""
    before: dict[str, Any] = {"image": live.image, "restart": live.restart or "no"}
    after: dict[str, Any] = {"image": desired.image, "restart": desired.restart}
    for name, wanted, seen in (
        ("command", desired.command, live.command),
        ("entrypoint", desired.entrypoint, live.entrypoint),
    ):
        if wanted is not None:
            before[name], after[name] = list(seen or ()), list(wanted)
    previous_keys = _label_list(live, keys["env_keys"])
    plain = sorted({*desired.env, *previous_keys} - set(desired.secret_env))
    before["env"] = {key: _live_env(desired, live, key, keys) for key in plain}
    after["env"] = {key: desired.env.get(key) for key in plain}
    for key in desired.secret_env:  # secret values are never read by the planner: only whether one is set
        before["env"][key], after["env"][key] = ("set" if key in live.env else None), "set"
    before["ports"] = sorted([p.bind, p.host, p.container, p.protocol] for p in live.ports)
    after["ports"] = sorted(list(p) for p in desired.ports)
    before["volumes"] = sorted([v.host, v.path, v.readonly] for v in live.volumes)
    after["volumes"] = sorted(list(v) for v in desired.volumes)
    before["gpus"], after["gpus"] = sorted(live.gpus), sorted(desired.gpus)
    before["devices"], after["devices"] = sorted(live.devices), sorted(desired.devices)
    optional: tuple[tuple[str, object, object], ...] = (
        ("shm_size", desired.shm_size, live.shm_size),
        ("ipc", desired.ipc, live.ipc),
        ("network_mode", desired.network_mode, live.network_mode),
    )
    for setting, wanted_value, seen_value in optional:
        if wanted_value is not None:
            before[setting], after[setting] = seen_value, wanted_value
    volatile = {keys["revision"], keys["spec_hash"], keys["env_keys"], keys["secret_env_keys"]}
    declared = [key for key in desired.labels if key not in volatile]
    before["labels"] = {key: live.labels.get(key) for key in declared}
    after["labels"] = {key: desired.labels[key] for key in declared}
    return before, after


def _label_list(live: ObservedContainer, label: str) -> set[str]:
    return {item for item in live.labels.get(label, "").split(",") if item}


def _live_env(desired: DesiredContainer, live: ObservedContainer, key: str, keys: Mapping[str, str]) -> str | None:
    """A live env value as the plan may hold it: never a secret, and never a value the spec does not declare.

    Equal to the spec: the spec's value (nothing to show). Listed as secret by the container's label (a
    secret once stays one, even when the spec no longer says so): SENSITIVE. Set by the reconciler from a
    plain spec value (the container says which keys it set, and which of those were secret): in clear.
    Anything else (a container made by hand or by an older reconciler, an adopted one): a fingerprint.
    """
    value = live.env.get(key)
    if value is None or value == desired.env.get(key):
        return value
    if key in _label_list(live, keys["secret_env_keys"]):
        return SENSITIVE
    if keys["secret_env_keys"] in live.labels and key in _label_list(live, keys["env_keys"]):
        return value
    return fingerprint(value, salt=f"{desired.address}/{key}")

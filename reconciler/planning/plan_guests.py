"""The planner's guest piece: each Lxc and Vm against the Proxmox guest of its vmid.

Part of the planner composed by `planning.planner.make_plan`. A guest that is missing is created;
one that differs is updated (live, or after a restart), or replaced when PVE cannot change it in
place (its create then carries every create-time key, and `Change.loses` names the volumes it
destroys); a volume asked for on another storage is moved in place (`GuestIntent.moves`). A guest the
lab owns and the spec no longer names is deleted. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from reconciler.planning import pve
from reconciler.planning.guest_access import access_config, clone_problem, with_create_access
from reconciler.planning.intents import GuestIntent, GuestSeen, send_keys
from reconciler.planning.observed import GuestKind, ObservedGuest, ProxmoxObservation
from reconciler.planning.ownership import Claim, volumes_lost
from reconciler.planning.plan import Action, Backend, Change, FieldChange, Problem, Timing
from reconciler.planning.plan_context import UNPROTECT, key_matches
from reconciler.planning.plan_gpus import GpuPlanning
from reconciler.planning.plan_guest_diff import GuestDiff, GuestDiffing
from reconciler.spec.models import Lxc, PowerState, Resource, Vm

__all__ = ["GuestPlanning"]

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


class GuestPlanning(GuestDiffing, GpuPlanning):
    """Creates, updates, replaces and deletes of Proxmox guests."""

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
                self.warnings.append(Problem(address, "owned but no longer in the spec; protected, so kept", UNPROTECT))
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
                    before=GuestSeen(seen.type, seen.node, vmid, seen.status, name=seen.name),
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
            self.check_clone(guest, proxmox)
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

    def check_clone(self, guest: Lxc | Vm, proxmox: ProxmoxObservation | None) -> None:
        """A blocker when the template a create (or replace) clones is not there to clone, before apply finds it."""
        templates = proxmox.templates if proxmox is not None else ()
        problem = clone_problem(guest, templates, self.desired.position(guest, "clone", "template"))
        if problem is not None:
            self.blockers.append(problem)

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
        kept = {k: seen.config[k] for k in sorted({*diff.desired, *diff.removed}) if k in seen.config}
        before = GuestSeen(kind, seen.node, seen.vmid, seen.status, digest=seen.digest, config=kept)
        adopting = None if tagged else adopt_tags
        after = self.guest_update_after(guest, kind, seen, diff, power, adopt_tags=adopting, fields=fields)
        lost: tuple[str, ...] = ()
        if fields:
            action = _guest_action(fields, running)
            reason = _guest_reason(fields, action, drift=drift, moves=diff.moves)
            if action is Action.REPLACE:
                # Destroyed and created again from the spec: every create-time key (ostemplate...), a new disk.
                after = with_create_access(
                    self.guest_after(guest, kind, config, power, create=True), guest, self.desired.files
                )
                self.check_clone(guest, self.observed.proxmox)
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
        diff: GuestDiff,
        power: PowerState,
        *,
        adopt_tags: str | None,
        fields: Iterable[FieldChange],
    ) -> GuestIntent:
        """An update's `after`: the config to send (only the keys `fields` change), what to delete, grow and move."""
        # What to send keeps what PVE added to the live value (a NIC's MAC, a volume's id); a revert is
        # rendered over the current value, so that it equals it and PVE drops the pending one.
        to_send = {
            key: pve.update_value(kind, key, value, (seen.config if key in diff.reverting else diff.effective).get(key))
            for key, value in diff.desired.items()
        }
        if adopt_tags is not None:
            to_send.setdefault("tags", adopt_tags)  # `ignore: [tags]` leaves them out of the spec's config
        send = send_keys((f.path for f in fields), to_send, grow=diff.grow, moves=diff.moves)
        return replace(
            self.guest_after(guest, kind, to_send, power, create=False),
            send=send,
            delete=tuple(diff.removed),
            grow=dict(diff.grow),
            moves=dict(diff.moves),
        )

    def guest_after(
        self, guest: Lxc | Vm, kind: GuestKind, config: Mapping[str, str], power: PowerState, *, create: bool
    ) -> GuestIntent:
        return GuestIntent(kind, guest.node, guest.vmid, power, config=dict(sorted(config.items())), create=create)

    def guest_config(self, guest: Lxc | Vm, proxmox: ProxmoxObservation) -> dict[str, str] | None:
        tagged = guest.model_copy(update={"tags": tuple(sorted({*guest.tags, self.owner}))})
        ignored = _ignored_prefixes(guest)
        if isinstance(tagged, Lxc):
            devices = self.lxc_devices(tagged, proxmox)
            config = pve.lxc_config(tagged, gpu_devices=devices)
        else:
            config = pve.vm_config(tagged, hostpci=self.hostpci(tagged))
        config.update(access_config(tagged, self.desired.files))
        return {k: v for k, v in config.items() if not any(key_matches(k, p) for p in ignored)}


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


def _ignored_prefixes(resource: Resource) -> list[str]:
    prefixes: list[str] = []
    for name in resource.ignore:
        top = name.split(".")[0]
        prefixes.extend(_PVE_KEYS_OF_FIELD.get(top, (top,)))
    return prefixes

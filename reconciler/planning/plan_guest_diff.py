"""The planner's guest-diff piece: how a live guest differs from its spec, and when each change takes effect.

Part of the planner composed by `planning.planner.make_plan`; the guest piece (`plan_guests`) calls
`guest_diff` for a guest that exists. Proxmox property strings are compared parsed (`planning.pve`),
pending changes included, so values PVE fills in never show as drift. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from reconciler.planning import pve
from reconciler.planning.observed import GuestKind, ObservedGuest
from reconciler.planning.plan import FieldChange, Problem, Timing
from reconciler.planning.plan_context import PlanContext, key_matches
from reconciler.spec.models import Lxc, Vm

__all__ = ["GuestDiff", "GuestDiffing"]


class GuestDiffing(PlanContext):
    """The field changes of a live guest against the config its spec renders."""

    def guest_diff(self, guest: Lxc | Vm, kind: GuestKind, seen: ObservedGuest, config: Mapping[str, str]) -> GuestDiff:
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
        return GuestDiff(fields, desired_cfg, effective, reverting, removed, grow, moves)

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
class GuestDiff:
    """A live guest against its spec: the field changes, and what to send, remove, grow and move."""

    fields: list[FieldChange]
    desired: dict[str, str]  # the spec's config, create-time keys left out
    effective: dict[str, str]  # the live config with its pending changes
    reverting: set[str]  # keys whose pending change the spec undoes
    removed: list[str]
    grow: dict[str, str]
    moves: dict[str, str]


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
        (key for key in live if key not in desired and any(key_matches(key, p) and key != p for p in families)),
        key=lambda k: (k.rstrip("0123456789"), int(k[len(k.rstrip("0123456789")) :] or 0)),
    )

"""What a guest's access fields add to its planned change: keys, cloud-init, firmware volumes, NUMA, clone.

Pure. Who calls it: the planner's guest piece, with each guest it plans (`access_config` for the config
it compares and sends, `with_create_access` for a create's whole intent, with what only a create sends);
the applier reads the clone from `GuestIntent.clone`. The PVE formats are `pve_access`'s; this module
decides which of them go where:

- compared on every pass (PVE keeps them as sent): a VM's `ciuser`, `sshkeys`, `ipconfigN`,
  `nameserver`, `searchdomain`, `cicustom`, `ciupgrade`, `numaN`, `efidisk0`, `tpmstate0`;
- sent by a create only: an LXC's `ssh-public-keys` (PVE writes them into root's authorized_keys and
  keeps nothing), and a VM's cloud-init drive (`ide2: <storage>:cloudinit`) when it is not a clone (a
  cloud-init template brings its own). A password is neither: the applier reads it from the
  environment at the last moment (`pve_access.secret_create_params`).

A clone is planned as the template's reference (VMID or name, node, full, storage). The planner checks
it against the observed templates (`clone_problem`: missing, ambiguous by name, not a template, or on
another node with local storage) and shows a blocker; the applier resolves it again when it clones, and
grows its disks then to the declared sizes, never shrunk (`pve_access.clone_resizes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Final

from reconciler.planning.intents import CloneIntent, GuestIntent
from reconciler.planning.observed import TemplateRow
from reconciler.planning.plan import Problem
from reconciler.planning.pve import format_pve_size
from reconciler.planning.pve_access import TemplateUnresolved, lxc_create_access, resolve_template, vm_access_config
from reconciler.spec.diagnostics import Position
from reconciler.spec.models import Lxc, Vm

__all__ = [
    "CLOUDINIT_SLOT",
    "CloneIntent",
    "access_config",
    "clone_intent",
    "clone_problem",
    "create_extras",
    "with_create_access",
]

CLOUDINIT_SLOT: Final = "ide2"  # where PVE's UI and `qm set --ide2 <storage>:cloudinit` put the drive


def access_config(guest: Lxc | Vm, files: Mapping[str, bytes]) -> dict[str, str]:
    """The config keys of a guest's access fields that PVE keeps, to merge into its config (compared each pass)."""
    return vm_access_config(guest, files) if isinstance(guest, Vm) else {}


def create_extras(guest: Lxc | Vm, files: Mapping[str, bytes]) -> dict[str, str]:
    """What a create call adds for access and PVE does not keep: an LXC's keys, a new VM's cloud-init drive."""
    if isinstance(guest, Lxc):
        return lxc_create_access(guest, files)
    if guest.cloud_init is None or guest.clone is not None or any(d.slot == CLOUDINIT_SLOT for d in guest.disks):
        return {}
    storage = guest.disks[0].storage if guest.disks else "local-lvm"
    return {CLOUDINIT_SLOT: f"{storage}:cloudinit"}


def clone_intent(guest: Lxc | Vm) -> CloneIntent | None:
    if not isinstance(guest, Vm) or guest.clone is None:
        return None
    clone = guest.clone
    return CloneIntent(clone.template, clone.node, clone.full, clone.storage)


def clone_problem(guest: Lxc | Vm, templates: Iterable[TemplateRow], where: Position | None) -> Problem | None:
    """Why the template a VM's `clone` names cannot be cloned into it, as a blocker naming the spec line; None
    when it can (or the guest is no clone). A create or replace that clones is checked before it is applied."""
    if not isinstance(guest, Vm) or guest.clone is None:
        return None
    clone = guest.clone
    try:
        resolve_template(clone.template, templates, node=clone.node, target=guest.node)
    except TemplateUnresolved as exc:
        at = f"{where.file}:{where.line}: " if where is not None else ""
        return Problem(
            guest.ref,
            f"{at}clone: {exc}",
            "create or convert the template (qm template), name it by VMID, set 'clone.node', "
            "or put it on shared storage",
        )
    return None


def with_create_access(intent: GuestIntent, guest: Lxc | Vm, files: Mapping[str, bytes]) -> GuestIntent:
    """A create's (or replace's) intent with its access: create-only keys in its config, the clone and the
    declared disk sizes it is grown to, and the password parameter as the name of the variable holding it."""
    config = {**intent.config, **create_extras(guest, files)}
    clone = clone_intent(guest)
    sizes = {disk.slot: format_pve_size(disk.size) for disk in guest.disks} if isinstance(guest, Vm) else {}
    secrets: dict[str, str] = {}
    if isinstance(guest, Lxc) and guest.password_env is not None:
        secrets["password"] = guest.password_env
    if isinstance(guest, Vm) and guest.cloud_init is not None and guest.cloud_init.password_env is not None:
        secrets["cipassword"] = guest.cloud_init.password_env
    return replace(
        intent,
        config=dict(sorted(config.items())),
        clone=clone,
        disk_sizes=sizes if clone is not None else {},
        secret_params=secrets,
    )

"""What a guest's access fields add to its planned change: keys, cloud-init, firmware volumes, NUMA, clone.

Pure. Who calls it: the planner's guest piece, with each guest it plans (`access_config` for the config
it compares and sends, `create_extras` for what only a create sends, `clone_intent` for a VM made as a
clone of a template); the applier reads the clone back with `CloneIntent.of`. The PVE formats are
`pve_access`'s; this module decides which of them go where:

- compared on every pass (PVE keeps them as sent): a VM's `ciuser`, `sshkeys`, `ipconfigN`,
  `nameserver`, `searchdomain`, `cicustom`, `ciupgrade`, `numaN`, `efidisk0`, `tpmstate0`;
- sent by a create only: an LXC's `ssh-public-keys` (PVE writes them into root's authorized_keys and
  keeps nothing), and a VM's cloud-init drive (`ide2: <storage>:cloudinit`) when it is not a clone (a
  cloud-init template brings its own). A password is neither: the applier reads it from the
  environment at the last moment (`pve_access.secret_create_params`).

A clone is planned as the template's reference (VMID or name, node, full, storage), resolved when the
change is applied (the templates are not part of the observed lab), and its disks are grown then to
the declared sizes, never shrunk (`pve_access.clone_resizes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from reconciler.planning.pve import format_pve_size
from reconciler.planning.pve_access import lxc_create_access, vm_access_config
from reconciler.spec.models import Lxc, Vm

__all__ = [
    "CLOUDINIT_SLOT",
    "CloneIntent",
    "access_config",
    "clone_intent",
    "create_after",
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


@dataclass(frozen=True, slots=True)
class CloneIntent:
    """The template a VM is cloned from, as the spec names it; `Change.after["clone"]` in JSON."""

    template: int | str
    node: str | None
    full: bool
    storage: str | None

    def to_json(self) -> dict[str, Any]:
        return {"template": self.template, "node": self.node, "full": self.full, "storage": self.storage}

    @classmethod
    def of(cls, after: Mapping[str, Any]) -> CloneIntent | None:
        """The clone of a planned create (`after`), or None for a plain create."""
        data = after.get("clone")
        if not isinstance(data, Mapping):
            return None
        template = data["template"]
        return cls(
            template if isinstance(template, int) else str(template),
            None if data.get("node") is None else str(data["node"]),
            bool(data.get("full", True)),
            None if data.get("storage") is None else str(data["storage"]),
        )


def clone_intent(guest: Lxc | Vm) -> CloneIntent | None:
    if not isinstance(guest, Vm) or guest.clone is None:
        return None
    clone = guest.clone
    return CloneIntent(clone.template, clone.node, clone.full, clone.storage)


def create_after(guest: Lxc | Vm, files: Mapping[str, bytes]) -> dict[str, Any]:
    """What a planned create of `guest` adds to its `after`: the clone, the declared disk sizes a clone is grown
    to, and the password parameter as the name of the variable holding it (never its value)."""
    extra: dict[str, Any] = {}
    clone = clone_intent(guest)
    if clone is not None and isinstance(guest, Vm):
        extra["clone"] = clone.to_json()
        extra["disk_sizes"] = {disk.slot: format_pve_size(disk.size) for disk in guest.disks}
    if isinstance(guest, Lxc) and guest.password_env is not None:
        extra["secret_params"] = {"password": guest.password_env}
    if isinstance(guest, Vm) and guest.cloud_init is not None and guest.cloud_init.password_env is not None:
        extra["secret_params"] = {"cipassword": guest.cloud_init.password_env}
    return extra


def with_create_access(after: Mapping[str, Any], guest: Lxc | Vm, files: Mapping[str, bytes]) -> dict[str, Any]:
    """A create's (or replace's) `after` with its access: create-only keys in its config, and `create_after`."""
    config = {**after["config"], **create_extras(guest, files)}
    return {**after, "config": dict(sorted(config.items())), **create_after(guest, files)}

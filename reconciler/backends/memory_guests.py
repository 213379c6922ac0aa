"""The in-memory Proxmox's guest record, and its VM templates and clones (a mixin of `MemoryProxmox`).

Apart from `backends/memory.py` so that each stays readable: `MemoryTemplates` seeds templates, lists
them as `/cluster/resources` does (template=1) and clones them as PVE does. Who uses it: `MemoryProxmox`
(the demo and the engine tests' lab), and `fakes/lab.py` through it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from reconciler.errors import NotFoundError, PermanentError
from reconciler.planning import pve
from reconciler.planning.observed import GuestKind, TemplateRow

__all__ = ["MemoryGuest", "MemoryTemplates", "is_volume_key", "planned_fault", "without_mac"]


@dataclass
class MemoryGuest:
    type: GuestKind
    vmid: int
    node: str
    config: dict[str, str]
    status: str = "stopped"
    pending: dict[str, str] = field(default_factory=dict)
    pending_delete: set[str] = field(default_factory=set)
    lock: str | None = None

    @property
    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.config, sort_keys=True).encode()).hexdigest()


class MemoryTemplates:
    """VM templates and clones of `MemoryProxmox`, which holds the state this reads and writes."""

    nodes: list[str]
    guests: dict[int, MemoryGuest]
    templates_: dict[int, MemoryGuest]  # VM templates: not guests of the lab, sources of clones
    requests: list[tuple[str, str]]
    fail_next: dict[str, Exception]
    _lock: threading.Lock
    _with_mac: Callable[[GuestKind, str, str | None], str]

    def add_template(self, vmid: int, name: str, *, node: str = "pve1", config: Mapping[str, str] = {}) -> None:
        """A VM template (a cloud-init image, say): its disks are `local-lvm:base-VMID-disk-N,size=...`."""
        stored = {"name": name, "template": "1", **config}
        self.templates_[vmid] = MemoryGuest(GuestKind.QEMU, vmid, node, stored)

    def templates(self) -> list[TemplateRow]:
        """Every VM template of the cluster, as `/cluster/resources?type=vm` lists them (template=1)."""
        with self._lock:
            self.requests.append(("GET", "templates"))
            return [TemplateRow(t.vmid, t.config.get("name"), t.node, True) for t in self.templates_.values()]

    def template_rows(self) -> tuple[TemplateRow, ...]:
        """The templates as `observe` lists them (the caller holds the lock); none uses local storage here."""
        return tuple(
            TemplateRow(t.vmid, t.config.get("name"), t.node, True, local_storage=False)
            for t in sorted(self.templates_.values(), key=lambda t: t.vmid)
        )

    def clone_vm(
        self, node: str, template: int, newid: int, *, params: Mapping[str, str], timeout: float | None = None
    ) -> None:
        """Clone a template as PVE does: its config copied, each disk a new volume of the same size (linked or
        full), a cloud-init drive of the clone's own, new MACs, on `target` when given."""
        planned_fault(self.fail_next, "clone")
        with self._lock:
            self.requests.append(("POST", f"qemu/{template}/clone"))
            source = self.templates_.get(template) or self.guests.get(template)
            if source is None or source.node != node:
                raise NotFoundError(f"qemu {template} does not exist on {node}", resource=f"qemu/{newid}")
            if newid in self.guests or newid in self.templates_:
                raise PermanentError(
                    f"unable to create VM {newid}: config file already exists", resource=f"qemu/{newid}"
                )
            target = params.get("target", node)
            if target not in self.nodes:
                raise NotFoundError(f"no such cluster node {target!r}", resource=f"qemu/{newid}")
            disks = itertools.count()
            config: dict[str, str] = {}
            for key, value in source.config.items():
                if key == "template":
                    continue
                if is_volume_key(key):
                    value = _cloned_volume(key, value, newid, template, disks, params)
                elif key.startswith("net") and key[3:].isdigit():
                    value = self._with_mac(GuestKind.QEMU, without_mac(value), None)
                config[key] = value
            config["name"] = params.get("name", f"Copy-of-VM-{source.config.get('name', template)}")
            self.guests[newid] = MemoryGuest(GuestKind.QEMU, newid, target, config)


def planned_fault(fail_next: dict[str, Exception], operation: str) -> None:
    """Raise the error a test planned for the next call of `operation`, once."""
    error = fail_next.pop(operation, None)
    if error is not None:
        raise error


def without_mac(value: str) -> str:
    """A VM NIC without its MAC (`virtio=BC:...,bridge=vmbr0` -> `virtio,bridge=vmbr0`): a clone gets a new one."""
    head, _, rest = value.partition(",")
    return head.split("=", 1)[0] + (f",{rest}" if rest else "")


def _cloned_volume(
    key: str, value: str, newid: int, template: int, disks: Iterable[int], params: Mapping[str, str]
) -> str:
    """A template's drive in its clone: the cloud-init drive and each disk become volumes of the clone's own."""
    fields = pve.parse_property(value, "file")
    storage, _, name = fields.get("file", "").partition(":")
    if not name or (fields.get("media") == "cdrom" and not name.endswith("cloudinit")):
        return value
    if name.endswith("cloudinit"):
        fields["file"] = f"{storage}:vm-{newid}-cloudinit"
    elif params.get("full", "1") == "1":
        fields["file"] = f"{params.get('storage', storage)}:vm-{newid}-disk-{next(iter(disks))}"
    else:  # a linked clone: a thin snapshot of the base volume on the template's storage (LVM-thin's naming)
        fields["file"] = f"{storage}:vm-{newid}-disk-{next(iter(disks))}"
    return pve.format_property(fields, "file")


def is_volume_key(key: str) -> bool:
    return key == "rootfs" or bool(re.fullmatch(r"(mp|scsi|virtio|sata|ide)\d+", key))

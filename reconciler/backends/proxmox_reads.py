"""Reads of the Proxmox VE backend: the cluster as `observe` sees it, and one guest.

Who calls it: the engine's observe step, through `ProxmoxBackend` (which is a `ProxmoxReads`).
One pass costs one inventory read (`/cluster/resources`: guests, templates and storages) plus one read per guest
(`.../pending`, which lists every key with its current value, its pending value and pending
deletes, and in real PVE the config `digest`), made concurrently, plus a fixed few (`/version`,
`/nodes`, each online node's PCI devices, the cluster's PCI mappings). Nothing here writes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

from reconciler.backends.proxmox_transport import ProxmoxTransport
from reconciler.errors import NotFoundError, PermissionDenied
from reconciler.planning import pve
from reconciler.planning.observed import (
    GuestKind,
    ObservedGuest,
    ObservedNode,
    ObservedPciDevice,
    PciMapping,
    ProxmoxObservation,
    TemplateRow,
)

__all__ = ["NVIDIA_VENDOR", "ProxmoxReads", "guest_ref"]

NVIDIA_VENDOR: Final = "0x10de"

_log = logging.getLogger("reconciler.backends.proxmox")


def guest_ref(kind: GuestKind, vmid: int) -> str:
    """The resource name errors and logs give a guest: `lxc/955`."""
    return f"{GuestKind(kind).value}/{vmid}"


class ProxmoxReads:
    """The read half of `ProxmoxBackend`: everything here only GETs, through `_pve`."""

    _pve: ProxmoxTransport
    _workers: int

    def observe(self, *, nodes: Iterable[str] | None = None) -> ProxmoxObservation:
        """Read the cluster: version, nodes, every guest's config and pending changes, NVIDIA PCI devices, PCI mappings.

        `nodes` limits the nodes (and their guests) read; None reads all. Guests
        that are templates are left out of the guests and listed as `templates` (of every node, with
        whether a volume of theirs is on local storage: one read of its `pending` each), for the planner to
        check each clone's source; storage sharing comes from the same inventory rows.
        A guest on an offline node is listed with the inventory's status (`unknown`) and an empty
        config: it cannot be read, and the planner must leave it alone. Raises the first error of any read
        except PCI devices and mappings, which degrade to none (with a warning)
        when the credentials may not read them.
        """
        wanted = None if nodes is None else frozenset(nodes)
        version = self._pve.get("version", resource="version")
        node_rows = self._pve.get("nodes", resource="nodes")
        observed_nodes = tuple(
            ObservedNode(name=str(row["node"]), online=row.get("status") == "online")
            for row in sorted(node_rows, key=lambda r: str(r.get("node")))
            if wanted is None or row.get("node") in wanted
        )
        online = frozenset(n.name for n in observed_nodes if n.online)
        resources = self._pve.get("cluster/resources", resource="cluster/resources") or ()
        rows = [
            row
            for row in resources
            if row.get("type") in ("lxc", "qemu")
            and not row.get("template")
            and (wanted is None or row.get("node") in wanted)
        ]
        template_rows = [r for r in resources if r.get("type") == "qemu" and r.get("template") and r.get("vmid")]
        shared = _shared_storages(resources)
        with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="pve-observe") as pool:
            try:
                guest_futures = [pool.submit(self._observe_row, row, online) for row in rows]
                template_futures = [pool.submit(self._template, row, online, shared) for row in template_rows]
                pci_futures = [pool.submit(self._pci_devices, node) for node in sorted(online)]
                mappings_future: Future[tuple[PciMapping, ...]] = pool.submit(self._mappings)
                guests = [g for g in (f.result() for f in guest_futures) if g is not None]
                templates = [f.result() for f in template_futures]
                devices = [d for f in pci_futures for d in f.result()]
                mappings = mappings_future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return ProxmoxObservation(
            version=str(version.get("version")) if isinstance(version, Mapping) and version.get("version") else None,
            nodes=observed_nodes,
            guests=tuple(sorted(guests, key=lambda g: g.vmid)),
            pci_devices=tuple(sorted(devices, key=lambda d: (d.node, d.address))),
            mappings=mappings,
            templates=tuple(sorted(templates, key=lambda t: t.vmid)),
        )

    def observe_guest(self, guest_type: GuestKind, node: str, vmid: int) -> ObservedGuest:
        """One guest as `observe` sees it (two reads: status and pending config). NotFoundError if it is gone."""
        kind = GuestKind(guest_type)
        ref = guest_ref(kind, vmid)
        status = self._pve.get(f"nodes/{node}/{kind.value}/{vmid}/status/current", resource=ref)
        items = self._pve.get(f"nodes/{node}/{kind.value}/{vmid}/pending", resource=ref)
        return _guest(
            kind,
            vmid,
            node,
            name=str(status.get("name") or ""),
            status=str(status.get("status") or "unknown"),
            items=items,
            inventory_lock=status.get("lock"),
            inventory_tags=str(status.get("tags") or ""),
        )

    def templates(self) -> list[TemplateRow]:
        """The VM templates (`/cluster/resources?type=vm` rows with template=1): where a clone comes from."""
        rows = self._pve.get("cluster/resources", resource="cluster/resources", params={"type": "vm"})
        return [
            TemplateRow(int(row["vmid"]), row.get("name"), str(row.get("node")), True)
            for row in rows or ()
            if row.get("type") == GuestKind.QEMU.value and row.get("template") and row.get("vmid") is not None
        ]

    def _template(self, row: Mapping[str, Any], online: frozenset[str], shared: frozenset[str]) -> TemplateRow:
        """A template row, with whether it uses local storage (None when its node is down or its config unreadable)."""
        vmid, node = int(row["vmid"]), str(row.get("node"))
        name = str(row["name"]) if row.get("name") else None
        if node not in online:
            return TemplateRow(vmid, name, node, True)
        try:  # `.../pending`, as for a guest: every key with its value
            items = self._pve.get(f"nodes/{node}/qemu/{vmid}/pending", resource=guest_ref(GuestKind.QEMU, vmid))
        except (PermissionDenied, NotFoundError):
            return TemplateRow(vmid, name, node, True)
        storages = {
            pve.volume_storage(GuestKind.QEMU, str(item.get("key", "")), _text(item["value"]))
            for item in items or ()
            if isinstance(item, Mapping) and item.get("value") is not None
        }
        local = any(storage is not None and storage not in shared for storage in storages)
        return TemplateRow(vmid, name, node, True, local_storage=local)

    def _observe_row(self, row: Mapping[str, Any], online: frozenset[str]) -> ObservedGuest | None:
        kind = GuestKind(str(row["type"]))
        vmid = int(row["vmid"])
        node = str(row["node"])
        name = str(row.get("name") or "")
        status = str(row.get("status") or "unknown")
        if node not in online:
            return ObservedGuest(
                type=kind,
                vmid=vmid,
                node=node,
                name=name,
                status=status,
                tags=pve.normalise_tags(str(row.get("tags") or "")),
                config={},
                lock=row.get("lock") or None,
            )
        try:
            items = self._pve.get(f"nodes/{node}/{kind.value}/{vmid}/pending", resource=guest_ref(kind, vmid))
        except NotFoundError:
            return None  # gone since the inventory was read
        return _guest(
            kind,
            vmid,
            node,
            name=name,
            status=status,
            items=items,
            inventory_lock=row.get("lock"),
            inventory_tags=str(row.get("tags") or ""),
        )

    def _pci_devices(self, node: str) -> list[ObservedPciDevice]:
        try:
            rows = self._pve.get(f"nodes/{node}/hardware/pci", resource=f"node/{node}")
        except (PermissionDenied, NotFoundError) as exc:
            _log.warning("proxmox pci devices not readable", extra={"node": node, "error": str(exc)})
            return []
        devices = []
        for row in rows or ():
            vendor = str(row.get("vendor") or "").lower()
            if vendor != NVIDIA_VENDOR or not row.get("id"):
                continue
            group = row.get("iommugroup")
            devices.append(
                ObservedPciDevice(
                    node=node,
                    address=pve.pci_address_key(str(row["id"])),
                    vendor=vendor,
                    device=str(row.get("device") or "").lower(),
                    vendor_name=row.get("vendor_name") or None,
                    device_name=row.get("device_name") or None,
                    iommu_group=int(group) if group is not None and int(group) >= 0 else None,
                )
            )
        return devices

    def _mappings(self) -> tuple[PciMapping, ...]:
        try:
            rows = self._pve.get("cluster/mapping/pci", resource="cluster/mapping/pci")
        except (PermissionDenied, NotFoundError) as exc:
            _log.warning("proxmox pci mappings not readable", extra={"error": str(exc)})
            return ()
        mappings = []
        for row in rows or ():
            if not isinstance(row, Mapping) or not row.get("id"):
                continue
            paths: dict[str, list[str]] = {}
            for entry in row.get("map") or ():
                try:
                    fields = pve.parse_property(str(entry), None)
                except ValueError:
                    continue
                if fields.get("node") and fields.get("path"):
                    addresses = [pve.pci_address_key(p) for p in fields["path"].split(";") if p]
                    paths.setdefault(fields["node"], []).extend(addresses)
            mappings.append(PciMapping(name=str(row["id"]), paths={n: tuple(a) for n, a in sorted(paths.items())}))
        return tuple(sorted(mappings, key=lambda m: m.name))


def _shared_storages(resources: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The storages `/cluster/resources` marks shared (one row per node and storage)."""
    return frozenset(str(r["storage"]) for r in resources if r.get("type") == "storage" and r.get("shared"))


def _text(value: Any) -> str:
    """A config value as the string PVE stores (PVE's JSON sends some numbers as numbers)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


_SECRET_KEYS = frozenset({"cipassword"})
_MASK = "**********"
"""Config keys PVE shows masked (`cipassword`: stored hashed, read as asterisks); masked here too, whatever
the server sends (fakepve sends it in clear), so a password never reaches an observation, a plan or a log."""


def _guest(
    kind: GuestKind,
    vmid: int,
    node: str,
    *,
    name: str,
    status: str,
    items: Any,
    inventory_lock: Any,
    inventory_tags: str,
) -> ObservedGuest:
    """An ObservedGuest from the `.../pending` list: value = current, pending = next start, delete = pending removal."""
    config: dict[str, str] = {}
    pending: dict[str, str] = {}
    deletes: set[str] = set()
    digest: str | None = None
    for item in items or ():
        key = str(item.get("key", ""))
        if not key:
            continue
        if key == "digest":  # real PVE lists the config digest as a key of its own
            digest = _text(item["value"]) if item.get("value") is not None else None
            continue
        if item.get("value") is not None:
            config[key] = _MASK if key in _SECRET_KEYS else _text(item["value"])
        if item.get("pending") is not None:
            pending[key] = _MASK if key in _SECRET_KEYS else _text(item["pending"])
        if item.get("delete"):
            deletes.add(key)
    lock = config.get("lock") or (str(inventory_lock) if inventory_lock else None)
    tags = config.get("tags", inventory_tags)
    return ObservedGuest(
        type=kind,
        vmid=vmid,
        node=node,
        name=name,
        status=status,
        tags=pve.normalise_tags(tags),
        config=config,
        pending=pending,
        pending_delete=frozenset(deletes),
        digest=digest,
        lock=lock,
    )

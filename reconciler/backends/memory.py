"""In-memory Proxmox and Docker for the demo and for engine tests that need no server.

They store what the real systems store, the way they store it, so the
planner meets the same shapes: PVE turns `local-lvm:64` into
`local-lvm:vm-955-disk-0,size=64G`, adds a MAC to every NIC, drops create-only
parameters, normalises tags, keeps changes that need a reboot pending on a
running VM, and guards updates with a digest. Docker keeps containers with
their labels and the environment the image adds. Writes are recorded in
`requests` so tests can count them. VM templates and clones, and the guest record, are in
`memory_guests.py` (a mixin of `MemoryProxmox`).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace

from reconciler.backends.memory_guests import MemoryGuest, MemoryTemplates, is_volume_key, planned_fault
from reconciler.errors import NotFoundError, PermanentError, TaskFailed, TemporaryError
from reconciler.planning import pve
from reconciler.planning.container_run import ContainerRun
from reconciler.planning.observed import (
    DockerObservation,
    GuestKind,
    NvmlObservation,
    ObservedContainer,
    ObservedGuest,
    ObservedNode,
    ObservedPciDevice,
    ProxmoxObservation,
)
from reconciler.planning.plan import Timing

__all__ = ["MemoryDocker", "MemoryGuest", "MemoryNvml", "MemoryProxmox"]

_VOLUME_RE = re.compile(r"^([^:/\s]+):(\d+(?:\.\d+)?)$")
_IMAGE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


class MemoryProxmox(MemoryTemplates):
    """A Proxmox cluster in memory: nodes, guests, NVIDIA PCI devices. Same methods as ProxmoxBackend."""

    def __init__(self, nodes: Iterable[str] = ("pve1",), *, version: str = "9.0.10") -> None:
        self.version = version
        self.nodes = list(nodes)
        self.guests: dict[int, MemoryGuest] = {}
        self.templates_: dict[int, MemoryGuest] = {}  # VM templates: not guests of the lab, sources of clones
        self.authorized_keys: dict[int, str] = {}  # vmid -> the `ssh-public-keys` an LXC was created with
        self.pci_devices: list[ObservedPciDevice] = []
        self.requests: list[tuple[str, str]] = []  # (method, what)
        self.fail_next: dict[str, Exception] = {}  # operation name -> error raised once
        self._macs = itertools.count(0x10)
        self._lock = threading.Lock()

    # ---- seeding -----------------------------------------------------------------------

    def add_nvidia_gpu(self, node: str, address: str, *, device: str = "0x2c05", name: str = "NVIDIA GPU") -> None:
        self.pci_devices.append(
            ObservedPciDevice(node, address, "0x10de", device, "NVIDIA Corporation", name, len(self.pci_devices) + 10)
        )

    # ---- reading -------------------------------------------------------------------------

    def observe(self, *, nodes: Iterable[str] | None = None) -> ProxmoxObservation:
        with self._lock:
            self.requests.append(("GET", "observe"))
            guests = tuple(self._view(g) for g in sorted(self.guests.values(), key=lambda g: g.vmid))
            templates = self.template_rows()
            seen_nodes = tuple(ObservedNode(n, True) for n in self.nodes)
            return ProxmoxObservation(self.version, seen_nodes, guests, tuple(self.pci_devices), (), templates)

    def observe_guest(self, guest_type: GuestKind, node: str, vmid: int) -> ObservedGuest:
        with self._lock:
            self.requests.append(("GET", f"{guest_type}/{vmid}"))
            guest = self.guests.get(vmid)
            if guest is None or guest.type != guest_type or guest.node != node:
                raise NotFoundError(f"{guest_type} {vmid} does not exist on {node}", resource=f"{guest_type}/{vmid}")
            return self._view(guest)

    @staticmethod
    def _view(g: MemoryGuest) -> ObservedGuest:
        return ObservedGuest(
            type=GuestKind(g.type),
            vmid=g.vmid,
            node=g.node,
            name=g.config.get("hostname") or g.config.get("name", ""),
            status=g.status,
            tags=pve.normalise_tags(g.config.get("tags", "")),
            config=dict(g.config),
            pending=dict(g.pending),
            pending_delete=frozenset(g.pending_delete),
            digest=g.digest,
            lock=g.lock,
        )

    # ---- writing ---------------------------------------------------------------------------

    def create_lxc(self, node: str, vmid: int, *, config: Mapping[str, str], timeout: float | None = None) -> None:
        self._create(GuestKind.LXC, node, vmid, config)

    def create_vm(self, node: str, vmid: int, *, config: Mapping[str, str], timeout: float | None = None) -> None:
        self._create(GuestKind.QEMU, node, vmid, config)

    def update_config(
        self,
        guest_type: GuestKind,
        node: str,
        vmid: int,
        *,
        config: Mapping[str, str],
        delete: Sequence[str] = (),
        digest: str | None = None,
    ) -> None:
        planned_fault(self.fail_next, "update_config")
        if not config and not delete:
            return
        with self._lock:
            self.requests.append(("PUT", f"{guest_type}/{vmid}/config"))
            guest = self._guest(guest_type, node, vmid)
            if digest is not None and digest != guest.digest:
                raise TemporaryError(
                    "the config changed since it was read; update refused", resource=f"{guest_type}/{vmid}"
                )
            running = guest.status == "running"
            for key, value in self._stored(guest_type, vmid, config, guest.config).items():
                timing = pve.classify(guest_type, key, running, new=key not in guest.config)
                if timing is Timing.REPLACE:
                    raise PermanentError(
                        f"parameter '{key}' cannot be changed on an existing guest", resource=f"{guest_type}/{vmid}"
                    )
                if timing is Timing.RESTART:
                    guest.pending[key] = value
                else:
                    guest.config[key] = value
            for key in delete:
                if running and pve.classify(guest_type, key, running, delete=True) is Timing.RESTART:
                    guest.pending_delete.add(key)
                else:
                    guest.config.pop(key, None)

    def start(self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float | None = None) -> None:
        planned_fault(self.fail_next, "start")
        with self._lock:
            guest = self._guest(guest_type, node, vmid)
            if guest.status == "running":
                return
            self.requests.append(("POST", f"{guest_type}/{vmid}/status/start"))
            self._apply_pending(guest)
            guest.status = "running"

    def shutdown(
        self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float = 60.0, force_stop_after: bool = True
    ) -> None:
        self.stop(guest_type, node, vmid)

    def stop(self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float | None = None) -> None:
        planned_fault(self.fail_next, "stop")
        with self._lock:
            guest = self._guest(guest_type, node, vmid)
            if guest.status == "stopped":
                return
            self.requests.append(("POST", f"{guest_type}/{vmid}/status/stop"))
            guest.status = "stopped"

    def reboot(self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float = 60.0) -> None:
        planned_fault(self.fail_next, "reboot")
        with self._lock:
            guest = self._guest(guest_type, node, vmid)
            if guest.status != "running":
                return
            self.requests.append(("POST", f"{guest_type}/{vmid}/status/reboot"))
            self._apply_pending(guest)

    def delete(self, guest_type: GuestKind, node: str, vmid: int, *, purge: bool = True) -> None:
        planned_fault(self.fail_next, "delete")
        with self._lock:
            self.requests.append(("DELETE", f"{guest_type}/{vmid}"))
            guest = self._guest(guest_type, node, vmid)
            if guest.status == "running":
                raise TaskFailed(f"{guest_type} {vmid} is running - destroy failed", resource=f"{guest_type}/{vmid}")
            del self.guests[vmid]

    def resize(self, guest_type: GuestKind, node: str, vmid: int, *, disk: str, size: str) -> None:
        """Grow a volume to `size` (PVE's resize call); refuse to shrink, as PVE does."""
        planned_fault(self.fail_next, "resize")
        with self._lock:
            self.requests.append(("PUT", f"{guest_type}/{vmid}/resize"))
            guest = self._guest(guest_type, node, vmid)
            default = pve.default_key_for(guest_type, disk)
            if disk not in guest.config or default is None:
                raise PermanentError(f"no volume {disk}", resource=f"{guest_type}/{vmid}")
            fields = pve.parse_property(guest.config[disk], default)
            wanted, current = pve.parse_pve_size(size), pve.parse_pve_size(fields.get("size", "0"))
            if wanted < current:
                raise TaskFailed("unable to shrink disk size", resource=f"{guest_type}/{vmid}")
            fields["size"] = pve.format_pve_size(wanted)
            guest.config[disk] = pve.format_property(fields, default)

    def move_volume(self, guest_type: GuestKind, node: str, vmid: int, *, disk: str, storage: str) -> None:
        """Move a volume to another storage with its data (PVE's move_volume / move_disk)."""
        planned_fault(self.fail_next, "move")
        with self._lock:
            self.requests.append(("POST", f"{guest_type}/{vmid}/move"))
            guest = self._guest(guest_type, node, vmid)
            default = pve.default_key_for(guest_type, disk)
            if disk not in guest.config or default is None:
                raise PermanentError(f"no volume {disk}", resource=f"{guest_type}/{vmid}")
            if guest_type == GuestKind.LXC and guest.status == "running":
                raise TaskFailed("cannot move volumes of a running container", resource=f"{guest_type}/{vmid}")
            fields = pve.parse_property(guest.config[disk], default)
            name = fields[default].split(":", 1)[-1]
            fields[default] = f"{storage}:{name}"
            guest.config[disk] = pve.format_property(fields, default)

    # ---- PVE's ways --------------------------------------------------------------------------

    def _create(self, guest_type: GuestKind, node: str, vmid: int, config: Mapping[str, str]) -> None:
        planned_fault(self.fail_next, "create")
        with self._lock:
            self.requests.append(("POST", f"{guest_type}/{vmid}"))
            if vmid in self.guests:
                raise PermanentError(
                    f"unable to create {guest_type} {vmid}: config file already exists", resource=f"{guest_type}/{vmid}"
                )
            if node not in self.nodes:
                raise NotFoundError(f"no such node {node!r}", resource=f"{guest_type}/{vmid}")
            stored = self._stored(guest_type, vmid, config, {})
            if guest_type == GuestKind.LXC and config.get("ssh-public-keys"):
                self.authorized_keys[vmid] = config["ssh-public-keys"]  # written into root's authorized_keys
            stored.update(
                {"arch": "amd64", "ostype": "debian"}
                if guest_type == GuestKind.LXC
                else {
                    "meta": "creation-qemu=9.2.0,ctime=1700000000",
                    "vmgenid": f"{vmid:08x}-0000-4000-8000-000000000000",
                    "smbios1": f"uuid={vmid:08x}-0000-4000-8000-000000000000",
                }
            )
            self.guests[vmid] = MemoryGuest(guest_type, vmid, node, stored)

    def _stored(
        self, guest_type: GuestKind, vmid: int, config: Mapping[str, str], current: Mapping[str, str]
    ) -> dict[str, str]:
        """What PVE writes to the config file for these parameters."""
        stored: dict[str, str] = {}
        disks = itertools.count(sum(1 for k in current if is_volume_key(k)))
        for key, value in config.items():
            if key in pve.CREATE_ONLY[guest_type]:
                continue
            if key == "tags":
                value = ";".join(pve.normalise_tags(value))
            elif is_volume_key(key):
                value = self._allocate(vmid, key, value, current.get(key), disks)
            elif key.startswith("net") and key[3:].isdigit():
                value = self._with_mac(guest_type, value, current.get(key))
            stored[key] = value
        return stored

    def _allocate(self, vmid: int, key: str, value: str, existing: str | None, disks: Iterable[int]) -> str:
        default = "volume" if key in ("rootfs",) or key.startswith("mp") else "file"
        fields = pve.parse_property(value, default)
        volume = fields.get(default, "")
        match = _VOLUME_RE.match(volume)
        if match is None:
            return value
        storage, size = match.groups()
        old_volume = pve.parse_property(existing, default).get(default) if existing else None
        fields[default] = old_volume or f"{storage}:vm-{vmid}-disk-{next(iter(disks))}"
        fields["size"] = f"{size}G"
        return pve.format_property(fields, default)

    def _with_mac(self, guest_type: GuestKind, value: str, existing: str | None) -> str:
        if guest_type == GuestKind.LXC:
            fields = pve.parse_property(value, None)
            old = pve.parse_property(existing, None) if existing else {}
            fields.setdefault("hwaddr", old.get("hwaddr") or self._mac())
            fields.setdefault("type", "veth")
            return pve.format_property(fields, None)
        fields = pve.parse_property(value, pve.default_key_for(GuestKind.QEMU, "net0"))
        old = pve.parse_property(existing, pve.default_key_for(GuestKind.QEMU, "net0")) if existing else {}
        model = fields.pop("model", "virtio")
        mac = fields.pop("macaddr", None) or old.get("macaddr") or self._mac()
        rest = pve.format_property(fields, None)
        return f"{model}={mac}" + (f",{rest}" if rest else "")

    def _mac(self) -> str:
        n = next(self._macs)
        return f"BC:24:11:00:{n >> 8 & 0xFF:02X}:{n & 0xFF:02X}"

    @staticmethod
    def _apply_pending(guest: MemoryGuest) -> None:
        guest.config.update(guest.pending)
        for key in guest.pending_delete:
            guest.config.pop(key, None)
        guest.pending.clear()
        guest.pending_delete.clear()

    def _guest(self, guest_type: GuestKind, node: str, vmid: int) -> MemoryGuest:
        guest = self.guests.get(vmid)
        if guest is None or guest.type != guest_type or guest.node != node:
            raise NotFoundError(f"{guest_type} {vmid} does not exist on {node}", resource=f"{guest_type}/{vmid}")
        if guest.lock:
            raise TemporaryError(f"{guest_type} {vmid} is locked ({guest.lock})", resource=f"{guest_type}/{vmid}")
        return guest


class MemoryDocker:
    """Docker engines in memory, one per host name. Same methods as DockerBackend."""

    def __init__(self, hosts: Iterable[str], *, owner_label: str = "reconciler", images: Collection[str] = ()) -> None:
        self.owner_label = owner_label
        self.containers: dict[str, dict[str, ObservedContainer]] = {h: {} for h in hosts}
        self.images: dict[str, set[str]] = {h: set(images) for h in self.containers}
        self.unreachable: dict[str, str] = {}
        self.fail_next: dict[str, Exception] = {}  # method name -> error raised once
        self.requests: list[tuple[str, str]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def observe(
        self, names_of_interest: Collection[str] | Mapping[str, Collection[str]] = ()
    ) -> dict[str, DockerObservation]:
        managed = f"{self.owner_label}.managed"
        result: dict[str, DockerObservation] = {}
        with self._lock:
            for host, containers in self.containers.items():
                self.requests.append(("GET", f"{host}/containers"))
                if host in self.unreachable:
                    result[host] = DockerObservation(host, False, self.unreachable[host])
                    continue
                names = names_of_interest.get(host, ()) if isinstance(names_of_interest, Mapping) else names_of_interest
                seen = tuple(c for c in containers.values() if c.labels.get(managed) == "true" or c.name in names)
                result[host] = DockerObservation(host, True, None, seen, frozenset(self.images[host]))
        return result

    def container_state(self, host: str, name: str) -> ObservedContainer | None:
        with self._lock:
            return self._host(host).get(name)

    def ensure_image(self, host: str, image: str) -> None:
        with self._lock:
            self._host(host)
            self.images[host].add(image)

    def create_container(self, host: str, spec: ContainerRun) -> str:
        planned_fault(self.fail_next, "create_container")
        with self._lock:
            self.requests.append(("POST", f"{host}/containers/{spec.name}"))
            containers = self._host(host)
            if spec.name in containers:
                raise PermanentError(f"container name {spec.name!r} is already in use", resource=f"{host}/{spec.name}")
            container_id = f"{next(self._ids):064x}"
            containers[spec.name] = ObservedContainer(
                host=host,
                id=container_id,
                name=spec.name,
                image=spec.image,
                image_id=f"sha256:{hashlib.sha256(spec.image.encode()).hexdigest()}",
                command=spec.command,
                entrypoint=spec.entrypoint,
                env={**_IMAGE_ENV, **spec.env},
                labels={**spec.labels, f"{self.owner_label}.managed": "true"},
                ports=tuple(spec.ports),
                volumes=tuple(spec.volumes),
                gpus=tuple(spec.gpus),
                devices=tuple(spec.devices),
                restart=spec.restart,
                status="created",
                health=None,
                shm_size=spec.shm_size,
                ipc=spec.ipc,
                network_mode=spec.network_mode,
            )
            return container_id

    def start_container(self, host: str, name: str) -> None:
        self._set(host, name, status="running", health="healthy" if self._has_health(host, name) else None)

    def stop_container(self, host: str, name: str, *, timeout: float = 10.0) -> None:
        self._set(host, name, status="exited")

    def remove_container(self, host: str, name: str, *, force: bool = False) -> None:
        with self._lock:
            self.requests.append(("DELETE", f"{host}/containers/{name}"))
            containers = self._host(host)
            if name not in containers:
                return
            if containers[name].status == "running" and not force:
                raise PermanentError(f"container {name!r} is running", resource=f"{host}/{name}")
            del containers[name]

    def rename_container(self, host: str, name: str, *, new_name: str) -> None:
        with self._lock:
            self.requests.append(("POST", f"{host}/containers/{name}/rename"))
            containers = self._host(host)
            if name not in containers:
                raise NotFoundError(f"no container {name!r}", resource=f"{host}/{name}")
            if new_name in containers:
                raise PermanentError(f"container name {new_name!r} is already in use", resource=f"{host}/{new_name}")
            containers[new_name] = replace(containers.pop(name), name=new_name)

    def close(self) -> None:
        return None

    def _has_health(self, host: str, name: str) -> bool:
        return False

    def _set(self, host: str, name: str, **changes: object) -> None:
        with self._lock:
            self.requests.append(("POST", f"{host}/containers/{name}/{changes.get('status')}"))
            containers = self._host(host)
            if name not in containers:
                raise NotFoundError(f"no container {name!r}", resource=f"{host}/{name}")
            containers[name] = replace(containers[name], **changes)  # type: ignore[arg-type]

    def _host(self, host: str) -> dict[str, ObservedContainer]:
        if host in self.unreachable:
            raise TemporaryError(f"Docker host {host!r} is unreachable: {self.unreachable[host]}", resource=host)
        if host not in self.containers:
            raise NotFoundError(f"no Docker host named {host!r}", resource=host)
        return self.containers[host]


class MemoryNvml:
    """NVML as a fixed observation, for a demo machine without a C compiler for the fake library."""

    def __init__(self, observation: NvmlObservation) -> None:
        self.observation = observation

    def observe(self) -> NvmlObservation:
        return self.observation

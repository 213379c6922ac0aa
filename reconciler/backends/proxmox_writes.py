"""Writes of the Proxmox VE backend: create, clone, update, resize, move a volume, delete.

Who calls it: the engine's apply step, through `ProxmoxBackend`. Every write is idempotent by its
state check and runs again as a whole on a retryable error (`ProxmoxTransport.write`): a create
whose answer was lost finds its guest and waits for it. A write that starts a task waits for it.
LXC `devN`, bind mounts and raw `hostpciN` addresses are refused up front unless the login is
root@pam with a password: PVE checks the user name, so every API token fails (fakepve lets a root
token through; PVE does not).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from reconciler.backends.proxmox_power import ProxmoxPower
from reconciler.backends.proxmox_reads import guest_ref
from reconciler.backends.proxmox_transport import ConfigChanged, TaskStillRunning
from reconciler.errors import BackendError, PermanentError, PermissionDenied, TemporaryError
from reconciler.planning import pve
from reconciler.planning.observed import GuestKind

__all__ = ["ProxmoxWrites"]


class ProxmoxWrites(ProxmoxPower):
    """Create, change and delete guests through `_pve` (power operations come from `ProxmoxPower`)."""

    def create_lxc(self, node: str, vmid: int, *, config: Mapping[str, str], timeout: float | None = None) -> None:
        """Create a container (POST /nodes/{node}/lxc) and wait for the task. `config` includes `ostemplate`.

        Raises PermanentError when the vmid is taken, PermissionDenied for root-only
        keys without a root@pam password login, TaskFailed if the task fails.
        """
        self._create(GuestKind.LXC, node, vmid, config, timeout)

    def create_vm(self, node: str, vmid: int, *, config: Mapping[str, str], timeout: float | None = None) -> None:
        """Create a VM (POST /nodes/{node}/qemu) and wait for the task; errors as `create_lxc`."""
        self._create(GuestKind.QEMU, node, vmid, config, timeout)

    def clone_vm(
        self, node: str, template: int, newid: int, *, params: Mapping[str, str], timeout: float | None = None
    ) -> None:
        """Clone VM `template` on `node` into `newid` (POST .../qemu/{template}/clone) and wait for the task.

        `params` are `pve_access.clone_params`' (name, full, target, storage). A retry after a lost
        answer finds the new VM locked by its clone and waits for it, as a create does; a vmid taken
        by anything else is a PermanentError.
        """
        ref = guest_ref(GuestKind.QEMU, newid)

        def clone(attempt: int) -> None:
            taken = self._inventory_row(newid)
            if taken is not None and attempt > 0 and taken.get("type") == GuestKind.QEMU.value:
                self._await_unlocked(GuestKind.QEMU, str(taken.get("node")), newid, lock="clone", timeout=timeout)
                return
            if taken is not None:
                raise PermanentError(
                    f"vmid {newid} is already taken by {taken.get('type')}/{newid} ({taken.get('name')})", resource=ref
                )
            path = f"nodes/{node}/qemu/{template}/clone"
            upid = self._pve.call("POST", path, resource=ref, params={**params, "newid": newid})
            self._pve.wait(upid, resource=ref, timeout=timeout)

        self._pve.write(clone, resource=ref, action="clone")

    def _create(self, kind: GuestKind, node: str, vmid: int, config: Mapping[str, str], timeout: float | None) -> None:
        ref = guest_ref(kind, vmid)
        self._check_root_only(kind, config, resource=ref)

        def create(attempt: int) -> None:
            taken = self._inventory_row(vmid)
            if taken is not None and attempt > 0 and taken.get("type") == kind.value and taken.get("node") == node:
                # The vmid was free before our first try, whose answer was lost: the guest is ours, being made.
                self._await_unlocked(kind, node, vmid, lock="create", timeout=timeout)
                return
            if taken is not None:
                raise PermanentError(
                    f"vmid {vmid} is already taken by {taken.get('type')}/{vmid} ({taken.get('name')}) "
                    f"on {taken.get('node')}",
                    resource=ref,
                )
            params = {**config, "vmid": vmid}
            upid = self._pve.call("POST", f"nodes/{node}/{kind.value}", resource=ref, params=params)
            self._pve.wait(upid, resource=ref, timeout=timeout)

        self._pve.write(create, resource=ref, action="create")

    def _await_unlocked(self, kind: GuestKind, node: str, vmid: int, *, lock: str, timeout: float | None) -> None:
        """Wait while the guest holds `lock` (its create task runs); NotFoundError if the guest goes away."""
        ref = guest_ref(kind, vmid)
        deadline = time.monotonic() + (self._pve.task_timeout if timeout is None else timeout)
        while True:
            row = self._inventory_row(vmid)
            if row is None:
                raise TemporaryError(f"{ref} disappeared while it was being created", resource=ref)
            if row.get("lock") != lock:
                return
            if time.monotonic() >= deadline:
                raise TaskStillRunning(f"{ref} is still locked ({lock})", resource=ref)
            time.sleep(self._pve.poll_interval)

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
        """Set and delete config keys (PUT .../config, synchronous). Nothing to change: no call.

        What is sent is the planner's decision (`GuestIntent.send`: only the keys that
        change, rendered by `planning.pve.update_value`; a create-only or replace key
        makes the change a replace, never an update): it is sent as it is. Only a key
        that is not a plain option name is refused (PermanentError) before sending.

        With `digest` (from the observation), PVE refuses the update if the config
        changed since: that raises ConfigChanged (retryable: re-plan). On a running
        guest some keys go pending until a restart (see `planning.pve.classify`).
        A TemporaryError (a lock timeout, a dropped connection) is retried while the
        digest still matches, so an update that did happen is never sent twice
        against a config it has changed.
        """
        kind = GuestKind(guest_type)
        ref = guest_ref(kind, vmid)
        if not config and not delete:
            return
        _refuse_odd_keys((*config, *delete), resource=ref)
        self._check_root_only(kind, config, resource=ref)
        params: dict[str, Any] = dict(config)
        if delete:
            params["delete"] = ",".join(delete)
        if digest:
            params["digest"] = digest

        def put(attempt: int) -> None:
            try:
                self._pve.call("PUT", f"nodes/{node}/{kind.value}/{vmid}/config", resource=ref, params=params)
            except TemporaryError as exc:
                if digest and self._digest_changed(kind, node, vmid, digest):
                    raise ConfigChanged(
                        "the config changed since it was read; update refused",
                        resource=ref,
                        hint="the next pass reads it again",
                    ) from exc
                raise

        self._pve.write(put, resource=ref, action="update config")

    def resize(self, guest_type: GuestKind, node: str, vmid: int, *, disk: str, size: str) -> None:
        """Grow volume `disk` (`rootfs`, `mp0`, `scsi0`...) to `size` (`16G`); nothing if it is that big already.

        PVE refuses to shrink a disk; the planner never asks it to. A VM's resize
        answers with a task on PVE 8 and with nothing on older releases: both are fine.
        """
        kind = GuestKind(guest_type)
        ref = guest_ref(kind, vmid)
        wanted = pve.parse_pve_size(size)

        def resize(attempt: int) -> None:
            config = self._pve.get(f"nodes/{node}/{kind.value}/{vmid}/config", resource=ref, params={"current": 1})
            value = config.get(disk) if isinstance(config, Mapping) else None
            default = pve.default_key_for(kind, disk)
            if not isinstance(value, str) or default is None:
                raise PermanentError(f"{ref} has no volume {disk}", resource=ref)
            current = pve.parse_property(value, default).get("size")
            if current is not None and pve.parse_pve_size(current) >= wanted:
                return
            params = {"disk": disk, "size": pve.format_pve_size(wanted)}
            answer = self._pve.call("PUT", f"nodes/{node}/{kind.value}/{vmid}/resize", resource=ref, params=params)
            if isinstance(answer, str) and answer.startswith("UPID:"):
                self._pve.wait(answer, resource=ref)

        self._pve.write(resize, resource=ref, action="resize")

    def move_volume(self, guest_type: GuestKind, node: str, vmid: int, *, disk: str, storage: str) -> None:
        """Move volume `disk` (`rootfs`, `mp0`, `scsi0`...) with its data to `storage`; nothing if it is there.

        A CT's volume moves only while the CT is stopped (PVE refuses otherwise); a VM's disk
        moves online. The source volume is removed once copied (`delete=1`), as a move should.
        """
        kind = GuestKind(guest_type)
        ref = guest_ref(kind, vmid)

        def move(attempt: int) -> None:
            config = self._pve.get(f"nodes/{node}/{kind.value}/{vmid}/config", resource=ref, params={"current": 1})
            value = config.get(disk) if isinstance(config, Mapping) else None
            if not isinstance(value, str) or pve.volume_storage(kind, disk, value) is None:
                raise PermanentError(f"{ref} has no volume {disk}", resource=ref)
            if pve.volume_storage(kind, disk, value) == storage:
                return
            if kind is GuestKind.LXC:
                path, params = "move_volume", {"volume": disk, "storage": storage, "delete": 1}
            else:
                path, params = "move_disk", {"disk": disk, "storage": storage, "delete": 1}
            upid = self._pve.call("POST", f"nodes/{node}/{kind.value}/{vmid}/{path}", resource=ref, params=params)
            self._pve.wait(upid, resource=ref)

        self._pve.write(move, resource=ref, action="move volume")

    def delete(self, guest_type: GuestKind, node: str, vmid: int, *, purge: bool = True) -> None:
        """Destroy a guest and its disks, stopping it first; nothing if it does not exist.

        `purge` also removes it from backup jobs, replication and HA. The guest is
        looked up in the inventory, so a vmid on another node or of another type
        is refused (PermanentError) rather than deleted.
        """
        kind = GuestKind(guest_type)
        ref = guest_ref(kind, vmid)

        def delete(attempt: int) -> None:
            row = self._inventory_row(vmid)
            if row is None:
                return
            if row.get("type") != kind.value or row.get("node") != node:
                raise PermanentError(f"vmid {vmid} is {row.get('type')}/{vmid} on {row.get('node')}", resource=ref)
            if row.get("lock"):
                raise TemporaryError(
                    f"guest is locked ({row.get('lock')})", resource=ref, hint="retry when the lock is gone"
                )
            if row.get("status") == "running":
                self._stop_once(kind, node, vmid, None)
            params = {"purge": 1 if purge else 0, "destroy-unreferenced-disks": 1}
            upid = self._pve.call("DELETE", f"nodes/{node}/{kind.value}/{vmid}", resource=ref, params=params)
            self._pve.wait(upid, resource=ref)

        self._pve.write(delete, resource=ref, action="delete")

    # ---- helpers ----

    def _digest_changed(self, kind: GuestKind, node: str, vmid: int, digest: str) -> bool:
        try:
            current = self._pve.call(
                "GET", f"nodes/{node}/{kind.value}/{vmid}/config", resource=guest_ref(kind, vmid), params={"current": 1}
            )
        except BackendError:
            return False
        return isinstance(current, Mapping) and bool(current.get("digest")) and current.get("digest") != digest

    def _check_root_only(self, kind: GuestKind, config: Mapping[str, str], *, resource: str) -> None:
        """Refuse what PVE allows only to a root@pam password login, before sending it."""
        if self._pve.settings.is_root_pam:
            return
        refused = sorted(key for key, value in config.items() if _root_only(kind, key, value))
        if refused:
            raise PermissionDenied(
                f"only a root@pam password login may set {', '.join(refused)} (PVE refuses every API token)",
                resource=resource,
                hint="log in as root@pam with a password, or pass GPUs to VMs through a PCI mapping",
            )


def _root_only(kind: GuestKind, key: str, value: str) -> bool:
    if kind is GuestKind.LXC:
        if key.startswith("dev") and key[3:].isdigit():
            return True
        if key == "rootfs" or (key.startswith("mp") and key[2:].isdigit()):
            try:
                volume = pve.parse_property(value, "volume").get("volume", "")
            except ValueError:
                return False
            return volume.startswith("/")
        return False
    if key.startswith("hostpci") and key[7:].isdigit():
        try:
            return "mapping" not in pve.parse_property(value, "host")
        except ValueError:
            return True
    return False


_OPTION_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


def _refuse_odd_keys(keys: Iterable[str], *, resource: str) -> None:
    """The backend's own safety, whoever planned the call: deletes travel comma-joined in one field, so a
    key holding `,` (or any character outside PVE's option names) would delete or set more than it names."""
    odd = sorted(repr(key) for key in keys if not _OPTION_NAME.fullmatch(key))
    if odd:
        raise PermanentError(f"not a Proxmox config option: {', '.join(odd)}", resource=resource)

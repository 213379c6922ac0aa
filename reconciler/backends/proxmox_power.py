"""Power operations of the Proxmox VE backend (start, shutdown, stop, reboot) and the state checks writes share.

Who calls it: the engine's apply step, through `ProxmoxBackend`. Each operation is idempotent by a
state check (starting a running guest, stopping a stopped one do nothing), waits for the PVE task
it starts, and runs again as a whole on a retryable error (`ProxmoxTransport.write`). A guest
holding a lock (backup, migrate, snapshot...) is refused before the call with a retryable
TemporaryError, since PVE would fail inside the task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from reconciler.backends.proxmox_reads import guest_ref
from reconciler.backends.proxmox_transport import ProxmoxTransport
from reconciler.errors import NotFoundError, TemporaryError
from reconciler.planning.observed import GuestKind

__all__ = ["ProxmoxPower"]


class ProxmoxPower:
    """Power a guest on and off through `_pve`; also the guest lookups the other writes share."""

    _pve: ProxmoxTransport

    def start(self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float | None = None) -> None:
        """Start a guest and wait for it; nothing if it runs already.

        A locked guest is waited for (retried with backoff), then TemporaryError; NotFoundError if it does not exist.
        """
        kind = GuestKind(guest_type)
        ref = guest_ref(kind, vmid)

        def start(attempt: int) -> None:
            status = self._status(kind, node, vmid)
            if status.get("status") == "running":
                return
            self._refuse_locked(status, resource=ref, allowed=("suspended",) if kind is GuestKind.QEMU else ())
            upid = self._pve.call("POST", f"nodes/{node}/{kind.value}/{vmid}/status/start", resource=ref)
            self._pve.wait(upid, resource=ref, timeout=timeout)

        self._pve.write(start, resource=ref, action="start")

    def shutdown(
        self,
        guest_type: GuestKind,
        node: str,
        vmid: int,
        *,
        timeout: float = 60.0,
        force_stop_after: bool = True,
    ) -> None:
        """Ask the guest OS to power off within `timeout` seconds; then stop it hard if `force_stop_after`.

        Nothing if it is stopped; NotFoundError if it does not exist. Without `force_stop_after`, a guest
        that does not power off in time makes the task fail (TaskFailed).
        """
        kind = GuestKind(guest_type)
        ref = guest_ref(kind, vmid)

        def shutdown(attempt: int) -> None:
            status = self._status(kind, node, vmid)
            if status.get("status") == "stopped":
                return
            self._refuse_locked(status, resource=ref)
            params = {"timeout": int(timeout), "forceStop": 1 if force_stop_after else 0}
            path = f"nodes/{node}/{kind.value}/{vmid}/status/shutdown"
            upid = self._pve.call("POST", path, resource=ref, params=params)
            self._pve.wait(upid, resource=ref, timeout=self._pve.task_timeout + timeout)

        self._pve.write(shutdown, resource=ref, action="shutdown")

    def stop(self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float | None = None) -> None:
        """Stop a guest at once (no clean shutdown); nothing if it is stopped."""
        kind = GuestKind(guest_type)
        ref = guest_ref(kind, vmid)

        self._pve.write(lambda attempt: self._stop_once(kind, node, vmid, timeout), resource=ref, action="stop")

    def _stop_once(self, kind: GuestKind, node: str, vmid: int, timeout: float | None) -> None:
        ref = guest_ref(kind, vmid)
        status = self._status(kind, node, vmid)
        if status.get("status") == "stopped":
            return
        self._refuse_locked(status, resource=ref)
        upid = self._pve.call("POST", f"nodes/{node}/{kind.value}/{vmid}/status/stop", resource=ref)
        self._pve.wait(upid, resource=ref, timeout=timeout)

    def reboot(self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float = 60.0) -> None:
        """Reboot a running guest (applies its pending changes); nothing if it is stopped (its next start will)."""
        kind = GuestKind(guest_type)
        ref = guest_ref(kind, vmid)

        def reboot(attempt: int) -> None:
            status = self._status(kind, node, vmid)
            if status.get("status") != "running":
                return
            self._refuse_locked(status, resource=ref)
            params = {"timeout": int(timeout)}
            path = f"nodes/{node}/{kind.value}/{vmid}/status/reboot"
            upid = self._pve.call("POST", path, resource=ref, params=params)
            self._pve.wait(upid, resource=ref, timeout=self._pve.task_timeout + timeout)

        self._pve.write(reboot, resource=ref, action="reboot")

    # ---- state checks shared with the other writes ----

    def _status(self, kind: GuestKind, node: str, vmid: int) -> Mapping[str, Any]:
        """The guest's current status; NotFoundError when it does not exist there.

        PVE answers a missing guest with 500 (no config file), as it does a lock timeout: the
        inventory tells them apart.
        """
        ref = guest_ref(kind, vmid)
        path = f"nodes/{node}/{kind.value}/{vmid}/status/current"
        try:
            status = self._pve.call("GET", path, resource=ref)
        except TemporaryError:
            row = self._inventory_row(vmid)
            if row is None or row.get("type") != kind.value or row.get("node") != node:
                raise NotFoundError(f"{ref} does not exist on {node}", resource=ref) from None
            status = self._pve.get(path, resource=ref)
        return status if isinstance(status, Mapping) else {}

    def _inventory_row(self, vmid: int) -> Mapping[str, Any] | None:
        rows = self._pve.get("cluster/resources", resource="cluster/resources", params={"type": "vm"})
        return next((row for row in rows or () if int(row.get("vmid", -1)) == vmid), None)

    @staticmethod
    def _refuse_locked(status: Mapping[str, Any], *, resource: str, allowed: Sequence[str] = ()) -> None:
        lock = status.get("lock")
        if lock and lock not in allowed:
            raise TemporaryError(f"guest is locked ({lock})", resource=resource, hint="retry when the lock is gone")

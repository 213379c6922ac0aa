"""The Proxmox steps of an apply: do, undo and check one guest change.

Called by `engine.apply.Applier` for each change whose backend is Proxmox, with the typed
`GuestIntent` of the change: create, update (stop-set-start when it needs a restart), start, stop,
delete and replace; a volume moved with its data is moved back by the undo. A guest destroyed by
this run cannot come back: its undo raises a PermanentError naming what is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, assert_never

from reconciler.engine.guest_create import create_guest
from reconciler.engine.health import ProbeResult, poll
from reconciler.engine.steps import Done, HealthPolicy
from reconciler.errors import NotFoundError, PermanentError
from reconciler.planning import pve
from reconciler.planning.intents import GuestIntent, GuestSeen
from reconciler.planning.observed import GuestKind, ObservedGuest
from reconciler.planning.plan import Action, Change
from reconciler.planning.pve_access import TemplateRow

__all__ = ["GuestBackend", "ProxmoxSteps"]


class GuestBackend(Protocol):
    def observe_guest(self, guest_type: GuestKind, node: str, vmid: int) -> ObservedGuest: ...
    def create_lxc(self, node: str, vmid: int, *, config: Mapping[str, str], timeout: float | None = None) -> None: ...
    def create_vm(self, node: str, vmid: int, *, config: Mapping[str, str], timeout: float | None = None) -> None: ...
    def update_config(
        self,
        guest_type: GuestKind,
        node: str,
        vmid: int,
        *,
        config: Mapping[str, str],
        delete: list[str] | tuple[str, ...] = (),
        digest: str | None = None,
    ) -> None: ...
    def start(self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float | None = None) -> None: ...
    def shutdown(
        self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float = 60.0, force_stop_after: bool = True
    ) -> None: ...
    def delete(self, guest_type: GuestKind, node: str, vmid: int, *, purge: bool = True) -> None: ...
    def resize(self, guest_type: GuestKind, node: str, vmid: int, *, disk: str, size: str) -> None: ...
    def move_volume(self, guest_type: GuestKind, node: str, vmid: int, *, disk: str, storage: str) -> None: ...
    def clone_vm(
        self, node: str, template: int, newid: int, *, params: Mapping[str, str], timeout: float | None = None
    ) -> None: ...
    def templates(self) -> list[TemplateRow]: ...


@dataclass
class ProxmoxSteps:
    """Guest changes, against one Proxmox backend (None when the Lab has no Proxmox)."""

    proxmox: GuestBackend | None
    health: HealthPolicy
    sleep: Callable[[float], None] = time.sleep
    destroyed: set[str] = field(default_factory=set)  # guests whose destroy was asked for in this run
    env: Mapping[str, str] = field(default_factory=dict)  # where a create's password is read (issue 11)

    def do(self, change: Change) -> None:
        assert self.proxmox is not None
        intent = GuestIntent.of(change)
        seen = _seen(change)
        status, digest = (seen.status, seen.digest) if seen else (None, None)
        kind, node, vmid, running = intent.kind, intent.node, intent.vmid, intent.running
        match change.action:
            case Action.CREATE:
                create_guest(self.proxmox, intent, self.env)
                if running:
                    self.proxmox.start(kind, node, vmid)
            case Action.UPDATE | Action.UPDATE_RESTART:
                restart = change.action is Action.UPDATE_RESTART and status == "running"
                if restart:  # stop, set, start: a GPU is released before anything else claims it
                    self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
                self.proxmox.update_config(
                    kind,
                    node,
                    vmid,
                    config=intent.send,
                    delete=list(intent.delete),
                    digest=None if restart else digest,
                )
                self._move_volumes(kind, node, vmid, intent.moves, intent.config)
                for disk, size in intent.grow.items():
                    self.proxmox.resize(kind, node, vmid, disk=disk, size=size)
                if running and (restart or status != "running"):
                    self.proxmox.start(kind, node, vmid)
                elif not running and status == "running":
                    self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
            case Action.START:
                self.proxmox.start(kind, node, vmid)
            case Action.STOP:
                self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
            case Action.DELETE | Action.REPLACE:
                self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
                self.destroyed.add(change.address)  # from here on, the guest's data may be gone
                self.proxmox.delete(kind, node, vmid)
                if change.action is Action.REPLACE:
                    create_guest(self.proxmox, intent, self.env)
                    if running:
                        self.proxmox.start(kind, node, vmid)
            case _:
                assert_never(change.action)

    def _move_volumes(
        self, kind: GuestKind, node: str, vmid: int, moves: Mapping[str, str], desired: Mapping[str, str]
    ) -> None:
        """Move each volume with its data; then set what else the spec changes on it (`backup`, `mp`...), over the
        moved volume's new id."""
        assert self.proxmox is not None
        for disk, storage in sorted(moves.items()):
            self.proxmox.move_volume(kind, node, vmid, disk=disk, storage=storage)
        if not moves:
            return
        live = self.proxmox.observe_guest(kind, node, vmid).config
        rest = {
            disk: pve.update_value(kind, disk, desired[disk], live.get(disk))
            for disk in moves
            if disk in desired
            and any(f.name != "size" for d in pve.compare_config(kind, {disk: desired[disk]}, live) for f in d.fields)
        }
        if rest:
            self.proxmox.update_config(kind, node, vmid, config=rest)

    def _move_back(self, kind: GuestKind, node: str, vmid: int, done: Done) -> list[str]:
        """Undo the moves of an update: each volume not on its old storage goes back there. Returns their keys."""
        assert self.proxmox is not None
        seen = _seen(done.change)
        old = (seen.config if seen else None) or {}
        moves = GuestIntent.of(done.change).moves
        live = self.proxmox.observe_guest(kind, node, vmid)
        back = {
            disk: storage
            for disk in moves
            if (storage := pve.volume_storage(kind, disk, old.get(disk)))
            and pve.volume_storage(kind, disk, live.config.get(disk)) not in (None, storage)
        }
        if back and kind == "lxc" and live.status == "running":  # a CT's volume moves only while it is stopped
            self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
        for disk, storage in sorted(back.items()):
            self.proxmox.move_volume(kind, node, vmid, disk=disk, storage=storage)
        return sorted(moves)

    def undo(self, done: Done) -> None:
        assert self.proxmox is not None
        change = done.change
        intent, seen = GuestIntent.of(change), _seen(change)
        kind, node, vmid = intent.kind, intent.node, intent.vmid
        was_running = seen is not None and seen.running
        match change.action:
            case Action.CREATE:
                try:
                    self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
                    self.proxmox.delete(kind, node, vmid)
                except NotFoundError:
                    pass  # the create never happened
            case Action.UPDATE | Action.UPDATE_RESTART:
                # Restore only what differs now: the step may have failed before changing anything (a lock,
                # a 500), and the same fault must not fail its undo too.
                moved = self._move_back(kind, node, vmid, done)
                old = dict((seen.config if seen else None) or {})
                keys = sorted({f.path.split(".")[0] for f in change.fields} - set(moved))
                live = self.proxmox.observe_guest(kind, node, vmid)
                now = {**live.config, **live.pending}
                for key in live.pending_delete:
                    now.pop(key, None)
                for key in set(intent.grow) & set(old):
                    # A grown disk keeps its new size (PVE cannot shrink one); its other fields go back.
                    old = {**old, key: pve.with_size_of(kind, key, old[key], now.get(key))}
                restore = {k: old[k] for k in keys if k in old and now.get(k) != old[k]}
                remove = [k for k in keys if k not in old and k in now]
                restart = change.action is Action.UPDATE_RESTART and was_running and bool(restore or remove)
                if restart:
                    self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
                self.proxmox.update_config(kind, node, vmid, config=restore, delete=remove)
                if was_running:
                    self.proxmox.start(kind, node, vmid)
                else:
                    self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
            case Action.START:
                self.proxmox.shutdown(kind, node, vmid, timeout=self.health.shutdown_timeout)
            case Action.STOP:
                self.proxmox.start(kind, node, vmid)
            case Action.DELETE | Action.REPLACE:
                self._undo_destroy(done, kind, node, vmid, was_running=was_running)
            case _:
                assert_never(change.action)

    def _undo_destroy(self, done: Done, kind: GuestKind, node: str, vmid: int, *, was_running: bool) -> None:
        """A guest not yet destroyed gets its power state back; a destroyed one cannot come back: say what is lost.

        Destroyed: its destroy was asked for in this run (PVE removes the disks first, so a failed destroy
        may have lost data too), or an interrupted run's replace or delete left it in an unknown state.
        """
        assert self.proxmox is not None
        change = done.change
        live: ObservedGuest | None = None
        if change.address not in self.destroyed:
            try:
                live = self.proxmox.observe_guest(kind, node, vmid)
            except NotFoundError:
                live = None
        unsure = done.inherited and change.action is Action.REPLACE  # the new guest may stand where the old one was
        if live is not None and not unsure:
            if was_running and live.status != "running":
                self.proxmox.start(kind, node, vmid)
            return
        lost = "; ".join(change.loses) or "its volumes"
        raise PermanentError(
            f"{kind} {vmid} was destroyed and cannot be restored by a rollback; lost with it: {lost}",
            resource=change.address,
            hint="restore it from a backup (vzdump) if there is one",
        )

    def check_running(self, where: GuestIntent | GuestSeen) -> ProbeResult:
        """Poll until the guest runs."""
        assert self.proxmox is not None
        kind, node, vmid = where.kind, where.node, where.vmid

        def check() -> ProbeResult:
            status = self.proxmox.observe_guest(kind, node, vmid).status  # type: ignore[union-attr]
            return ProbeResult(status == "running", f"{kind}/{vmid} is {status}")

        return poll(
            check,
            timeout=self.health.cap(self.health.guest_timeout),
            interval=self.health.interval or 2.0,
            sleep=self.sleep,
        )


def _seen(change: Change) -> GuestSeen | None:
    """The guest as the planner saw it; None for a create."""
    before = change.before
    assert before is None or isinstance(before, GuestSeen), "a guest change's before is a GuestSeen"
    return before

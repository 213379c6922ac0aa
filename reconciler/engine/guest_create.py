"""Create a guest as its planned change says: a plain create, or a clone of a template set up and grown.

Who calls it: the applier, for a guest's create (and the create half of a replace). The planner wrote
the `GuestIntent` (`planning/guest_access.py`): the config, and `clone` (the template by VMID or name,
node, full or linked, storage), `disk_sizes` and `secret_params` (the password parameter and the name
of the variable holding it).

- A password is read from the environment here, at the last moment, registered as a secret (so no
  message shows it) and sent with the create (an LXC's `password`) or the config (a VM's `cipassword`).
- A clone: the template is resolved among the cluster's templates now (by name it must be unique),
  cloned into the VM's vmid (onto its node), then the VM's config is set (every key the spec declares
  but the disks the clone brought), and each such disk is grown to its declared size. A disk of the
  template larger than declared is an error: PVE cannot shrink it. A failure here fails the step, and
  the rollback destroys what was cloned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from reconciler import redact
from reconciler.errors import ConfigError, PermanentError
from reconciler.planning import pve
from reconciler.planning.intents import GuestIntent
from reconciler.planning.observed import GuestKind, ObservedGuest
from reconciler.planning.pve_access import TemplateRow, TemplateUnresolved, resolve_template

__all__ = ["CloningBackend", "create_guest", "secret_params"]


class CloningBackend(Protocol):
    def observe_guest(self, guest_type: GuestKind, node: str, vmid: int) -> ObservedGuest: ...
    def create_lxc(self, node: str, vmid: int, *, config: Mapping[str, str], timeout: float | None = None) -> None: ...
    def create_vm(self, node: str, vmid: int, *, config: Mapping[str, str], timeout: float | None = None) -> None: ...
    def clone_vm(
        self, node: str, template: int, newid: int, *, params: Mapping[str, str], timeout: float | None = None
    ) -> None: ...
    def templates(self) -> list[TemplateRow]: ...
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
    def resize(self, guest_type: GuestKind, node: str, vmid: int, *, disk: str, size: str) -> None: ...


def secret_params(intent: GuestIntent, env: Mapping[str, str], *, resource: str) -> dict[str, str]:
    """The password parameters of a create, read from the environment now; ConfigError naming the variable."""
    found: dict[str, str] = {}
    for parameter, variable in intent.secret_params.items():
        value = env.get(variable, "")
        if not value:
            raise ConfigError(
                f"the environment variable {variable} is not set", resource=resource, hint="export it, then apply"
            )
        redact.register(value)
        found[str(parameter)] = value
    return found


def create_guest(proxmox: CloningBackend, intent: GuestIntent, env: Mapping[str, str]) -> None:
    """Create the guest `intent` describes (not started: the applier starts it)."""
    resource = f"{intent.kind}/{intent.vmid}"
    secrets = secret_params(intent, env, resource=resource)
    clone = intent.clone
    if clone is None:
        create = proxmox.create_lxc if intent.kind is GuestKind.LXC else proxmox.create_vm
        create(intent.node, intent.vmid, config={**intent.config, **secrets})
        return
    try:
        template = resolve_template(clone.template, proxmox.templates(), node=clone.node)
    except TemplateUnresolved as exc:
        raise PermanentError(str(exc), resource=resource, hint="name an existing template in 'clone'") from None
    params = {"newid": str(intent.vmid), "full": "1" if clone.full else "0"}
    if "name" in intent.config:
        params["name"] = intent.config["name"]
    if template.node != intent.node:
        params["target"] = intent.node
    if clone.full and clone.storage is not None:
        params["storage"] = clone.storage
    proxmox.clone_vm(template.node, template.vmid, intent.vmid, params=params)
    _set_up_clone(proxmox, intent, intent.disk_sizes, secrets)


def _set_up_clone(
    proxmox: CloningBackend, intent: GuestIntent, sizes: Mapping[str, str], secrets: Mapping[str, str]
) -> None:
    """The clone's config set to the spec's (its own disks kept, their options set) and its disks grown."""
    kind, node, vmid = GuestKind.QEMU, intent.node, intent.vmid
    live = proxmox.observe_guest(kind, node, vmid).config
    send = {key: value for key, value in intent.config.items() if key not in pve.CREATE_ONLY[kind]}
    for slot in sizes:
        if slot not in live or slot not in send:
            continue
        declared = send.pop(slot)
        if any(
            f.name not in ("size", "file") for d in pve.compare_config(kind, {slot: declared}, live) for f in d.fields
        ):
            send[slot] = pve.update_value(kind, slot, declared, live[slot])
    proxmox.update_config(kind, node, vmid, config={**send, **secrets})
    for slot, size in sorted(sizes.items()):
        value = live.get(slot)
        if value is None:
            continue  # a new disk: allocated by the config above
        current = pve.parse_property(value, pve.default_key_for(kind, slot)).get("size")
        if current is not None and pve.parse_pve_size(current) > pve.parse_pve_size(size):
            raise PermanentError(
                f"the template's {slot} is {current}, larger than the {size} declared: Proxmox cannot shrink a disk",
                resource=f"{kind}/{vmid}",
                hint=f"declare {slot} at least {current}",
            )
        if current is None or pve.parse_pve_size(current) < pve.parse_pve_size(size):
            proxmox.resize(kind, node, vmid, disk=slot, size=size)

"""PVE parameters for guest access and the VM fields of issue 11: keys, cloud-init, clone, EFI/TPM, NUMA.

Pure: no I/O, no SDK. Who calls it: the planner, to add to a guest's create config what the spec's
`ssh_keys`, `cloud_init`, `efidisk0`, `tpmstate0` and `numa_nodes` ask for (`lxc_create_access`,
`vm_access_config`), to turn `clone` into the clone call (`resolve_template`, `clone_params`) and to
grow a cloned disk to its declared size (`clone_resizes`); the applier, to add a password from the
environment to a create call at the last moment (`secret_create_params`), so it is never in a plan.

Formats, as PVE 8/9 documents them:

- LXC `ssh-public-keys`: the keys as text, one a line (a create parameter, not kept in the config).
- VM `sshkeys`: the same text URL-encoded (format `urlencoded`: PVE accepts only
  `A-Za-z0-9-_.!~*'()%`, so this is JavaScript's encodeURIComponent, as the PVE UI sends it); PVE
  keeps it encoded in the config.
- `ipconfigN`: `ip=<dhcp|CIDR>,gw=<IPv4>,ip6=<dhcp|auto|CIDR>,gw6=<IPv6>`.
- `cicustom`: `user=<storage>:snippets/<file>`; `nameserver`/`searchdomain`: space-separated lists.
- `efidisk0`: `<storage>:1,efitype=4m,pre-enrolled-keys=1` (PVE sizes the volume itself: the `1` of
  the allocation syntax is ignored); `tpmstate0`: `<storage>:1,version=v2.0`.
- `numaN`: `cpus=0-7;16-23,hostnodes=0,memory=<MiB>,policy=bind` (no unnamed first element).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

from reconciler.planning.observed import GuestKind, TemplateRow
from reconciler.planning.pve import (
    default_key_for,
    format_property,
    format_pve_size,
    parse_property,
    parse_pve_size,
)
from reconciler.spec.access import CloudInit, EfiDisk, IpConfig, NumaNode, SshKey, TpmState, parse_public_keys
from reconciler.spec.models import Lxc, Vm

__all__ = [
    "CloneCall",
    "DiskGrow",
    "TemplateRow",
    "TemplateUnresolved",
    "clone_params",
    "clone_resizes",
    "cloud_init_config",
    "efidisk_value",
    "ipconfig_value",
    "lxc_create_access",
    "lxc_ssh_public_keys",
    "numa_value",
    "parse_sshkeys",
    "qemu_sshkeys",
    "resolve_keys",
    "resolve_template",
    "secret_create_params",
    "tpmstate_value",
    "vm_access_config",
]

MIB: Final = 1024**2
_URI_SAFE: Final = "-_.!~*'()"  # what encodeURIComponent leaves alone, and PVE's `urlencoded` format accepts


# ---- public keys ------------------------------------------------------------------------------


def resolve_keys(keys: Iterable[SshKey], files: Mapping[str, bytes]) -> tuple[str, ...]:
    """The keys a spec lists, inline ones and those of the files it names, once each, in order.

    `files` is `DesiredState.files`; the loader has checked that every named file is there and holds
    keys, so a missing one here is a programming error (KeyError).
    """
    found: dict[str, None] = {}
    for key in keys:
        if key.key is not None:
            found.setdefault(key.key, None)
        elif key.file is not None:
            for line in parse_public_keys(files[key.file].decode("utf-8")):
                found.setdefault(line, None)
    return tuple(found)


def lxc_ssh_public_keys(keys: Sequence[str]) -> str:
    """The LXC create parameter `ssh-public-keys`: the keys, one a line."""
    return "".join(f"{key}\n" for key in keys)


def qemu_sshkeys(keys: Sequence[str]) -> str:
    """A VM's `sshkeys`: the keys one a line, URL-encoded as PVE's `urlencoded` format wants (`%20`, `%0A`)."""
    return quote(lxc_ssh_public_keys(keys), safe=_URI_SAFE)


def parse_sshkeys(value: str) -> frozenset[str]:
    """The keys in a VM's `sshkeys` as PVE keeps it (encoded) or as sent: for comparison, order and comments aside."""
    text = unquote(value)
    return frozenset(" ".join(line.split()[:2]) for line in text.splitlines() if line.strip())


def lxc_create_access(spec: Lxc, files: Mapping[str, bytes]) -> dict[str, str]:
    """What an `Lxc`'s `ssh_keys` add to its create call (create-only: PVE does not keep them)."""
    keys = resolve_keys(spec.ssh_keys, files)
    return {"ssh-public-keys": lxc_ssh_public_keys(keys)} if keys else {}


def secret_create_params(spec: Lxc | Vm, env: Mapping[str, str]) -> dict[str, str]:
    """The password parameter of a create call, read from the environment variable the spec names.

    Called by the applier just before the call, never by the planner, so the value is in no plan,
    journal or log. Raises LookupError naming the variable (never its value) when it is unset or empty.
    """
    if isinstance(spec, Lxc):
        name, parameter = spec.password_env, "password"
    else:
        name, parameter = (spec.cloud_init.password_env if spec.cloud_init else None), "cipassword"
    if name is None:
        return {}
    value = env.get(name, "")
    if not value:
        raise LookupError(f"{spec.kind}/{spec.name}: the environment variable {name} is not set")
    return {parameter: value}


# ---- VM config keys ------------------------------------------------------------------------


def ipconfig_value(config: IpConfig) -> str:
    fields = {"ip": config.ip, "gw": config.gw, "ip6": config.ip6, "gw6": config.gw6}
    return format_property({name: value for name, value in fields.items() if value is not None}, None)


def cloud_init_config(cloud_init: CloudInit, files: Mapping[str, bytes]) -> dict[str, str]:
    """The cloud-init keys a VM's `cloud_init` declares (not `cipassword`: see `secret_create_params`)."""
    config: dict[str, str] = {}
    if cloud_init.user is not None:
        config["ciuser"] = cloud_init.user
    keys = resolve_keys(cloud_init.ssh_keys, files)
    if keys:
        config["sshkeys"] = qemu_sshkeys(keys)
    for index, ipconfig in enumerate(cloud_init.ipconfig):
        config[f"ipconfig{index}"] = ipconfig_value(ipconfig)
    if cloud_init.nameserver:
        config["nameserver"] = " ".join(cloud_init.nameserver)
    if cloud_init.searchdomain:
        config["searchdomain"] = " ".join(cloud_init.searchdomain)
    if cloud_init.user_data is not None:
        config["cicustom"] = f"user={cloud_init.user_data}"
    if cloud_init.upgrade is not None:
        config["ciupgrade"] = "1" if cloud_init.upgrade else "0"
    return config


def efidisk_value(disk: EfiDisk) -> str:
    fields = {"file": f"{disk.storage}:1", "efitype": disk.efitype.value}
    if disk.pre_enrolled_keys is not None:
        fields["pre-enrolled-keys"] = "1" if disk.pre_enrolled_keys else "0"
    return format_property(fields, "file")


def tpmstate_value(state: TpmState) -> str:
    return format_property({"file": f"{state.storage}:1", "version": state.version}, "file")


def numa_value(node: NumaNode) -> str:
    fields = {"cpus": node.cpus}
    if node.hostnodes is not None:
        fields["hostnodes"] = node.hostnodes
    fields["memory"] = str(node.memory // MIB)
    if node.policy is not None:
        fields["policy"] = node.policy.value
    return format_property(fields, None)


def vm_access_config(spec: Vm, files: Mapping[str, bytes]) -> dict[str, str]:
    """The config keys of a `Vm`'s issue-11 fields, to merge into `pve.vm_config`'s result."""
    config: dict[str, str] = {}
    if spec.efidisk0 is not None:
        config["efidisk0"] = efidisk_value(spec.efidisk0)
    if spec.tpmstate0 is not None:
        config["tpmstate0"] = tpmstate_value(spec.tpmstate0)
    for index, node in enumerate(spec.numa_nodes):
        config[f"numa{index}"] = numa_value(node)
    if spec.cloud_init is not None:
        config.update(cloud_init_config(spec.cloud_init, files))
    return config


# ---- clone -------------------------------------------------------------------------------


class TemplateUnresolved(ValueError):
    """The spec's template cannot be found, is ambiguous, or is not a template; the message says which."""


def resolve_template(
    ref: int | str, rows: Iterable[TemplateRow], *, node: str | None = None, target: str | None = None
) -> TemplateRow:
    """The template a `clone.template` names (by VMID or by name, on `node` when given); with `target`,
    also one PVE can clone onto that node (a template on another node must not use local storage)."""
    candidates = [r for r in rows if (r.vmid == ref if isinstance(ref, int) else r.name == ref)]
    if node is not None:
        candidates = [r for r in candidates if r.node == node]
    where = f" on node {node}" if node else ""
    if not candidates:
        raise TemplateUnresolved(f"no VM {ref!r}{where} to clone")
    if len(candidates) > 1:
        ids = ", ".join(str(r.vmid) for r in sorted(candidates, key=lambda r: r.vmid))
        raise TemplateUnresolved(f"{len(candidates)} VMs are named {ref!r}{where} ({ids}); name the template by VMID")
    found = candidates[0]
    if not found.template:
        raise TemplateUnresolved(f"VM {found.vmid} ({found.name}) is not a template; convert it first")
    if target is not None and found.node != target and found.local_storage:
        raise TemplateUnresolved(
            f"template {found.vmid} ({found.name}) is on node {found.node} and uses local storage: "
            f"PVE cannot clone it onto node {target}"
        )
    return found


@dataclass(frozen=True, slots=True)
class CloneCall:
    """`POST /nodes/{node}/qemu/{vmid}/clone` with `params`: node and vmid are the template's."""

    node: str
    vmid: int
    params: Mapping[str, str]


def clone_params(spec: Vm, template: TemplateRow) -> CloneCall:
    """The clone call that makes `spec` from `template`: the new VMID and name, the target node when
    the template lives elsewhere, full or linked, and the storage of a full clone."""
    assert spec.clone is not None
    params: dict[str, str] = {"newid": str(spec.vmid), "name": spec.name, "full": "1" if spec.clone.full else "0"}
    if template.node != spec.node:
        params["target"] = spec.node
    if spec.clone.full and spec.clone.storage is not None:
        params["storage"] = spec.clone.storage
    return CloneCall(template.node, template.vmid, params)


@dataclass(frozen=True, slots=True)
class DiskGrow:
    """A cloned disk to grow to its declared size (PVE's resize call), or, with `shrink`, one that cannot."""

    disk: str
    size: str  # PVE's spelling of the declared size: `64G`
    current: str | None
    shrink: bool = False


def clone_resizes(spec: Vm, cloned: Mapping[str, str]) -> list[DiskGrow]:
    """What a fresh clone's disks need to reach the sizes `spec.disks` declares.

    A disk smaller than declared grows; one larger comes back with `shrink=True`, which the planner
    shows as a blocker (PVE cannot shrink a disk); a declared disk the clone does not have is not
    here (it is a new disk to add through the config).
    """
    grows: list[DiskGrow] = []
    for disk in spec.disks:
        value = cloned.get(disk.slot)
        default = default_key_for(GuestKind.QEMU, disk.slot)
        if value is None or default is None:
            continue
        try:
            current = parse_property(value, default).get("size")
            current_bytes = parse_pve_size(current) if current is not None else None
        except ValueError:
            current, current_bytes = None, None
        wanted = format_pve_size(disk.size)
        if current_bytes is None or current_bytes < disk.size:
            grows.append(DiskGrow(disk.slot, wanted, current))
        elif current_bytes > disk.size:
            grows.append(DiskGrow(disk.slot, wanted, current, shrink=True))
    return grows

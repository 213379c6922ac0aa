"""Proxmox config values as fields: parse, render, compare and time them. Pure: no I/O, no SDK.

Who calls it: the planner, to turn an `Lxc` or `Vm` spec into the config keys
to send (`lxc_config`, `vm_config`), to compare them with what a guest holds
(`compare_config`), to render the value that changes a key of an existing
guest without losing what PVE added to it (`update_value`), and to say when a
change takes effect (`classify`); the Proxmox backend, to normalise tags and
PCI addresses the same way.

Why fields and not strings: PVE stores property strings as they were sent
(`net0: name=eth0,bridge=vmbr0` and `net0: bridge=vmbr0,name=eth0` are the same
NIC), adds sub-fields of its own (`hwaddr`, `type=veth`), writes a MAC as
`virtio=BC:24:11:..` and sizes as `64G` or `65536M`, and normalises tags.
Comparing the strings gives a diff on every pass, the perpetual-diff bug of the
Terraform Proxmox providers. Here both sides are parsed with the same code and
only what the spec declares is compared:

- a key the desired config does not declare is never compared (Proxmox
  defaults never show as drift);
- inside a property string only the sub-fields the desired value declares are
  compared (`net0: name=eth0,bridge=vmbr0,ip=dhcp` equals the live
  `name=eth0,bridge=vmbr0,hwaddr=BC:..,ip=dhcp,type=veth`);
- sizes compare as bytes (`64G` == `65536M`), booleans as booleans (`1` ==
  `yes`), numbers as numbers, tags as normalised sets, MACs and PCI addresses
  case-insensitively;
- a volume to allocate (`local-lvm:64`, storage and size in GiB) compares the
  storage and the size only with the live volume (`local-lvm:vm-955-disk-0,size=64G`);
- a VM's machine type without a version (`q35`) equals any version of it
  (`pc-q35-9.2+pve1`, which PVE pins when it creates a Windows VM).

Everything here is a function of its arguments; `compare_config` is meant to be
called for thousands of guests per pass, so parsing is cached per string.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeAlias
from urllib.parse import unquote

from reconciler.planning.observed import GuestKind
from reconciler.planning.plan import Timing
from reconciler.spec.models import Lxc, Network, Startup, Vm

__all__ = [
    "CREATE_ONLY",
    "NIC_MODELS",
    "REPLACE_KEYS",
    "FieldDiff",
    "PropertyChange",
    "classify",
    "compare_config",
    "default_key_for",
    "format_property",
    "format_pve_size",
    "guest_volumes",
    "lxc_config",
    "normalise_tags",
    "parse_bool",
    "parse_hotplug",
    "parse_property",
    "parse_pve_size",
    "pci_address_key",
    "update_value",
    "vm_config",
    "volume_storage",
]


NIC_MODELS: Final = frozenset(
    {
        "e1000", "e1000-82540em", "e1000-82544gc", "e1000-82545em", "e1000e", "i82551", "i82557b",
        "i82559er", "ne2k_isa", "ne2k_pci", "pcnet", "rtl8139", "virtio", "vmxnet3",
    }
)  # fmt: skip
"""QEMU NIC models; in a VM's netN, `virtio=MAC` means model=virtio, macaddr=MAC."""

CREATE_ONLY: Final[Mapping[GuestKind, frozenset[str]]] = {
    GuestKind.LXC: frozenset({"ostemplate", "storage", "password", "ssh-public-keys", "pool", "start", "restore",
                      "force", "unique", "ignore-unpack-errors", "bwlimit", "ha-managed"}),
    GuestKind.QEMU: frozenset({"archive", "storage", "pool", "start", "force", "unique", "live-restore", "bwlimit",
                       "ha-managed", "import-working-storage"}),
}  # fmt: skip
"""Parameters of the create call that PVE does not keep in the config, so they cannot be compared later."""

REPLACE_KEYS: Final[Mapping[GuestKind, frozenset[str]]] = {
    GuestKind.LXC: frozenset({"ostemplate", "unprivileged", "arch"}),
    GuestKind.QEMU: frozenset(),
}
"""Keys that cannot change on an existing guest: a different value means recreating it."""

GIB: Final = 1024**3
MIB: Final = 1024**2
_SIZE_UNITS: Final = {"": 1, "K": 1024, "M": MIB, "G": GIB, "T": 1024**4}
_SIZE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTkmgt]?)\s*$")
_ALLOCATE_RE: Final = re.compile(r"^([^:/\s]+):(\d+(?:\.\d+)?)$")  # storage:GiB, a volume still to allocate
_TAG_SPLIT_RE: Final = re.compile(r"[;,\s]+")
_INDEXED_RE: Final = re.compile(r"^([a-z]+)(\d+)$")
_DISK_PREFIXES: Final = frozenset({"scsi", "virtio", "sata", "ide"})
_TRUE: Final = frozenset({"1", "yes", "on", "true"})
_FALSE: Final = frozenset({"0", "no", "off", "false"})


# ---- property strings ---------------------------------------------------------------


def parse_property(value: str, default_key: str | None) -> dict[str, str]:
    """Parse a PVE property string into key -> value, in the order written.

    The first element without `=` goes to `default_key` (`volume` for rootfs/mpN,
    `file` for VM disks, `host` for hostpciN, `path` for devN, `model` for a VM's
    netN). With `default_key="model"`, a NIC model used as a key (`virtio=BC:..`)
    becomes `model` plus `macaddr`, as PVE writes it. Raises ValueError for an
    element without a key that cannot go to a default key (PVE refuses those too).
    Quoting is not handled: PVE emits none for the keys compared here.
    """
    fields: dict[str, str] = {}
    if not value:
        return fields
    first = True
    for part in value.split(","):
        if not part:
            continue
        name, eq, rest = part.partition("=")
        if eq:
            if default_key == "model" and name in NIC_MODELS:
                fields["model"] = name
                fields["macaddr"] = rest
            else:
                fields[name] = rest
        elif first and default_key is not None:
            fields[default_key] = part
        else:
            raise ValueError(f"property string {value!r} has a value without a key: {part!r}")
        first = False
    return fields


def format_property(fields: Mapping[str, str], default_key: str | None) -> str:
    """Render fields as a PVE property string; the inverse of `parse_property`.

    The default key goes first, bare (or as `model=MAC` for a VM NIC with a MAC),
    the rest follow in the mapping's order, so the same fields always render the
    same string. A default value that is empty or holds `=` is written `key=value`.
    """
    parts: list[str] = []
    rest = dict(fields)
    if default_key == "model" and rest.get("model") in NIC_MODELS and "macaddr" in rest:
        parts.append(f"{rest.pop('model')}={rest.pop('macaddr')}")
    elif default_key is not None and default_key in rest:
        head = rest.pop(default_key)
        parts.append(head if head and "=" not in head else f"{default_key}={head}")
    parts.extend(f"{name}={value}" for name, value in rest.items())
    return ",".join(parts)


# ---- normalisers --------------------------------------------------------------------


def normalise_tags(value: str | Iterable[str]) -> tuple[str, ...]:
    """Tags as PVE keeps them: lower case, unique, sorted. Accepts `;`, `,` and spaces as separators."""
    text = value if isinstance(value, str) else ";".join(value)
    return tuple(sorted({tag.lower() for tag in _TAG_SPLIT_RE.split(text) if tag}))


def parse_bool(value: str) -> bool:
    """A PVE boolean: 1/0, yes/no, on/off, true/false (any case). Raises ValueError otherwise."""
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def parse_pve_size(value: str) -> int:
    """Bytes in a PVE disk size: `64G`, `512M`, `1T`, `100K`; a bare number is bytes (PVE::JSONSchema::parse_size).

    Note the two exceptions elsewhere in PVE: `memory`/`swap` in a config are MiB
    as bare numbers, and the allocation syntax `storage:64` is GiB. Neither goes
    through this function.
    """
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"not a PVE size: {value!r}")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.upper()])


def format_pve_size(size: int) -> str:
    """PVE's spelling of a byte count: the largest unit that divides it (68719476736 -> `64G`)."""
    for unit in ("T", "G", "M", "K"):
        factor = _SIZE_UNITS[unit]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def pci_address_key(address: str) -> str:
    """A PCI address in one spelling: lower case, with its domain (`01:00` -> `0000:01:00`).

    The function number is kept when given: `0000:01:00` (every function of the
    device) and `0000:01:00.0` (one function) are different things to PVE.
    """
    text = address.strip().lower()
    if text.count(":") == 1:
        text = "0000:" + text
    return text


def parse_hotplug(value: str | None) -> frozenset[str]:
    """A VM's `hotplug` option as a set: unset or `1` is PVE's default `network,disk,usb`; `0` is none."""
    if value is None or value.strip() == "1":
        return frozenset({"network", "disk", "usb"})
    if value.strip() == "0":
        return frozenset()
    return frozenset(part.strip() for part in value.split(",") if part.strip())


# ---- spec -> config -----------------------------------------------------------------


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _mib(size: int) -> str:
    """Bytes as whole MiB, rounded up (PVE's memory and swap unit)."""
    return str(-(-size // MIB))


def _gib(size: int) -> str:
    """Bytes as GiB for the allocation syntax `storage:N` (a decimal when not whole)."""
    if size % GIB == 0:
        return str(size // GIB)
    return f"{size / GIB:.10g}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _startup(startup: Startup) -> str | None:
    fields: dict[str, str] = {}
    if startup.order is not None:
        fields["order"] = str(startup.order)
    if startup.up is not None:
        fields["up"] = str(math.ceil(startup.up))
    if startup.down is not None:
        fields["down"] = str(math.ceil(startup.down))
    return format_property(fields, None) if fields else None


def _lxc_net(net: Network) -> str:
    fields = {"name": net.name, "bridge": net.bridge}
    optional: dict[str, str | None] = {
        "ip": net.ip,
        "gw": net.gateway,
        "ip6": net.ip6,
        "tag": None if net.vlan is None else str(net.vlan),
        "firewall": None if net.firewall is None else _flag(net.firewall),
        "mtu": None if net.mtu is None else str(net.mtu),
        "hwaddr": None if net.hwaddr is None else net.hwaddr.upper(),
    }
    fields.update({name: value for name, value in optional.items() if value is not None})
    return format_property(fields, None)


def _vm_net(net: Network) -> str:
    fields: dict[str, str] = {"model": net.model}
    if net.hwaddr is not None:
        fields["macaddr"] = net.hwaddr.upper()
    fields["bridge"] = net.bridge
    optional: dict[str, str | None] = {
        "tag": None if net.vlan is None else str(net.vlan),
        "firewall": None if net.firewall is None else _flag(net.firewall),
        "mtu": None if net.mtu is None else str(net.mtu),
    }
    fields.update({name: value for name, value in optional.items() if value is not None})
    return format_property(fields, "model")


def _common_tail(config: dict[str, str], spec: Lxc | Vm) -> None:
    if spec.onboot is not None:
        config["onboot"] = _flag(spec.onboot)
    if spec.startup is not None:
        startup = _startup(spec.startup)
        if startup is not None:
            config["startup"] = startup
    if spec.tags:
        config["tags"] = ";".join(normalise_tags(spec.tags))


def lxc_config(spec: Lxc, *, gpu_devices: Sequence[str]) -> dict[str, str]:
    """The config keys an `Lxc` declares, rendered as they are sent on create (and on update, except `ostemplate`).

    Only keys the spec sets appear; a field left None is not declared, so its
    Proxmox default is never compared. `rootfs` and volume mount points use the
    allocation syntax `storage:GiB`, which `compare_config` compares by storage
    and size. `mpN` come from `mounts` (bind mounts, `/host,mp=/path,ro=0|1`),
    then `volumes`; `devN` are `gpu_devices` as given (each a devN value: a device
    path such as `/dev/nvidia0`, optionally with options), which only a root@pam
    password login may set.
    """
    config: dict[str, str] = {
        "ostemplate": spec.template,
        "hostname": spec.hostname or spec.name,
        "unprivileged": _flag(spec.unprivileged),
        "cores": str(spec.cores),
        "memory": _mib(spec.memory),
    }
    if spec.cpulimit is not None:
        config["cpulimit"] = _number(spec.cpulimit)
    if spec.swap is not None:
        config["swap"] = _mib(spec.swap)
    config["rootfs"] = f"{spec.rootfs.storage}:{_gib(spec.rootfs.size)}"
    index = 0
    for mount in spec.mounts:
        fields = {"volume": mount.host, "mp": mount.path, "ro": _flag(mount.readonly)}
        if mount.backup is not None:
            fields["backup"] = _flag(mount.backup)
        config[f"mp{index}"] = format_property(fields, "volume")
        index += 1
    for volume in spec.volumes:
        fields = {"volume": f"{volume.storage}:{_gib(volume.size)}", "mp": volume.path}
        if volume.backup is not None:
            fields["backup"] = _flag(volume.backup)
        config[f"mp{index}"] = format_property(fields, "volume")
        index += 1
    for number, net in enumerate(spec.network):
        config[f"net{number}"] = _lxc_net(net)
    if spec.nameserver is not None:
        config["nameserver"] = spec.nameserver
    features: dict[str, str] = {}
    for name in ("nesting", "keyctl", "fuse", "mknod"):
        flag: bool | None = getattr(spec.features, name)
        if flag is not None:
            features[name] = _flag(flag)
    if spec.features.mount is not None:
        features["mount"] = ";".join(spec.features.mount)
    if features:
        config["features"] = format_property(features, None)
    for number, device in enumerate(gpu_devices):
        config[f"dev{number}"] = device
    _common_tail(config, spec)
    return config


def vm_config(spec: Vm, *, hostpci: Sequence[str]) -> dict[str, str]:
    """The config keys a `Vm` declares, rendered as they are sent on create and update.

    `hostpci` are the rendered hostpciN values, in order (`0000:01:00,pcie=1,x-vga=1`
    or `mapping=NAME,pcie=1`); the caller picks raw addresses or mappings, since a
    raw address needs a root@pam password login. Disks use the allocation syntax
    `storage:GiB` plus their options; `discard` renders as `on`/`ignore`.
    """
    config: dict[str, str] = {"name": spec.name, "cores": str(spec.cores), "sockets": str(spec.sockets)}
    if spec.numa is not None:
        config["numa"] = _flag(spec.numa)
    if spec.hugepages is not None:
        config["hugepages"] = spec.hugepages
    if spec.cpu is not None:
        config["cpu"] = spec.cpu
    if spec.machine is not None:
        config["machine"] = spec.machine
    if spec.bios is not None:
        config["bios"] = spec.bios
    if spec.ostype is not None:
        config["ostype"] = spec.ostype
    config["memory"] = _mib(spec.memory)
    if spec.balloon is not None:
        config["balloon"] = _mib(spec.balloon)
    for disk in spec.disks:
        fields = {"file": f"{disk.storage}:{_gib(disk.size)}"}
        if disk.ssd is not None:
            fields["ssd"] = _flag(disk.ssd)
        if disk.discard is not None:
            fields["discard"] = "on" if disk.discard else "ignore"
        if disk.iothread is not None:
            fields["iothread"] = _flag(disk.iothread)
        if disk.cache is not None:
            fields["cache"] = disk.cache
        config[disk.slot] = format_property(fields, "file")
    for number, net in enumerate(spec.network):
        config[f"net{number}"] = _vm_net(net)
    for number, value in enumerate(hostpci):
        config[f"hostpci{number}"] = value
    if spec.agent is not None:
        config["agent"] = _flag(spec.agent)
    _common_tail(config, spec)
    return config


# ---- comparison ---------------------------------------------------------------------


class PropertyChange(NamedTuple):
    """One sub-field of a property string that differs: `(name, before, after)`, raw strings, None when absent."""

    name: str
    before: str | None
    after: str | None


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """A config key whose live value differs from the desired one.

    `before`/`after` are the raw live and desired strings (None when absent).
    `fields` lists the differing sub-fields of a property string (empty for a
    plain value). `replace` is True when the change cannot be made in place (a
    create-only key, or a named volume on another storage). `resize` is True when
    a volume's size differs: that is not a config change but PVE's resize call
    (grow only). `move` is True when an existing volume is asked for on another
    storage: PVE moves it there with its data (`move_volume`, `move_disk`), in place.
    """

    key: str
    before: str | None
    after: str | None
    fields: tuple[PropertyChange, ...] = ()
    replace: bool = False
    resize: bool = False
    move: bool = False


_Norm: TypeAlias = Callable[[str], object]


def _int(value: str) -> int:
    return int(value.strip())


def _float(value: str) -> float:
    return float(value.strip())


def _words(value: str) -> tuple[str, ...]:
    return tuple(value.split())


def _semicolon_set(value: str) -> frozenset[str]:
    return frozenset(part for part in value.split(";") if part)


def _comma_set(value: str) -> frozenset[str]:
    return frozenset(part.strip() for part in value.split(",") if part.strip())


def _pci_list(value: str) -> tuple[str, ...]:
    return tuple(pci_address_key(part) for part in value.split(";") if part)


def _sshkeys(value: str) -> frozenset[str]:
    """A VM's `sshkeys` (URL-encoded, one key a line) as a set of `TYPE BASE64`: order and comments aside."""
    return frozenset(" ".join(line.split()[:2]) for line in unquote(value).splitlines() if line.strip())


def _path(value: str) -> str:
    return value.rstrip("/") or "/"


_SUB_BOOL: Final = frozenset(
    {
        "acl", "backup", "deny-write", "enabled", "firewall", "fstrim_cloned_disks", "fuse", "host-managed",
        "iothread", "keyctl", "link_down", "mknod", "nesting", "pcie", "quota", "replicate", "ro", "rombar",
        "shared", "ssd", "x-vga", "freeze-fs-on-backup", "lazytime",
    }
)  # fmt: skip
_SUB_NORMALISE: Final[Mapping[str, _Norm]] = {
    **dict.fromkeys(_SUB_BOOL, parse_bool),
    **dict.fromkeys(("tag", "mtu", "queues", "order", "up", "down", "gid", "uid", "current", "cpus"), _int),
    "rate": _float,
    "size": parse_pve_size,
    "hwaddr": str.upper,
    "macaddr": str.upper,
    "host": _pci_list,
    "mp": _path,
    "mount": _semicolon_set,
    "mountoptions": _semicolon_set,
}
_SUB_DEFAULTS: Final[Mapping[str, str]] = {
    **dict.fromkeys(_SUB_BOOL - {"acl", "rombar", "replicate"}, "0"),
    "rombar": "1",
    "replicate": "1",
    "discard": "ignore",
    "cache": "none",
}
"""Sub-field values PVE assumes when a property string leaves them out."""


class _KeySpec(NamedTuple):
    norm: _Norm | None  # a plain value: how to normalise it; None for a property string
    default_key: str | None = None  # a property string's unnamed first element
    volume: bool = False  # the default key is a volume (storage comparison, size, replacement)
    sized: bool = True  # a volume whose size the spec declares (efidisk0/tpmstate0: PVE sizes them itself)


_STR: Final = _KeySpec(str.strip)
_LXC_KEYS: Final[Mapping[str, _KeySpec]] = {
    **dict.fromkeys(("memory", "swap", "cores", "cpuunits", "tty"), _KeySpec(_int)),
    "cpulimit": _KeySpec(_float),
    **dict.fromkeys(("onboot", "unprivileged", "protection", "template", "console", "debug"), _KeySpec(parse_bool)),
    "tags": _KeySpec(normalise_tags),
    "nameserver": _KeySpec(_words),
    "searchdomain": _KeySpec(_words),
    "rootfs": _KeySpec(None, "volume", volume=True),
    "features": _KeySpec(None),
    "startup": _KeySpec(None, "order"),
}
_LXC_INDEXED: Final[Mapping[str, _KeySpec]] = {
    "mp": _KeySpec(None, "volume", volume=True),
    "unused": _STR,
    "net": _KeySpec(None),
    "dev": _KeySpec(None, "path"),
}
_QEMU_KEYS: Final[Mapping[str, _KeySpec]] = {
    **dict.fromkeys(("cores", "sockets", "vcpus", "balloon", "cpuunits", "shares"), _KeySpec(_int)),
    "cpulimit": _KeySpec(_float),
    **dict.fromkeys(
        ("onboot", "numa", "protection", "template", "acpi", "kvm", "tablet", "localtime", "reboot"),
        _KeySpec(parse_bool),
    ),
    "tags": _KeySpec(normalise_tags),
    "hotplug": _KeySpec(_comma_set),
    "memory": _KeySpec(None, "current"),
    "agent": _KeySpec(None, "enabled"),
    "startup": _KeySpec(None, "order"),
    "cpu": _KeySpec(None, "cputype"),
    "machine": _KeySpec(None, "type"),
    "vga": _KeySpec(None, "type"),
    "boot": _KeySpec(None, "legacy"),
    "rng0": _KeySpec(None, "source"),
    "smbios1": _KeySpec(None),
    "efidisk0": _KeySpec(None, "file", volume=True, sized=False),
    "tpmstate0": _KeySpec(None, "file", volume=True, sized=False),
    "sshkeys": _KeySpec(_sshkeys),
    "nameserver": _KeySpec(_words),
    "searchdomain": _KeySpec(_words),
    "cicustom": _KeySpec(None),
}
_QEMU_INDEXED: Final[Mapping[str, _KeySpec]] = {
    **dict.fromkeys(_DISK_PREFIXES, _KeySpec(None, "file", volume=True)),
    "unused": _STR,
    "net": _KeySpec(None, "model"),
    "hostpci": _KeySpec(None, "host"),
    "usb": _KeySpec(None, "host"),
    "numa": _KeySpec(None),
    "ipconfig": _KeySpec(None),
}
_SCALAR_DEFAULTS: Final[Mapping[GuestKind, Mapping[str, str]]] = {
    GuestKind.LXC: {"onboot": "0", "unprivileged": "0", "protection": "0", "template": "0", "cpulimit": "0"},
    GuestKind.QEMU: {"onboot": "0", "numa": "0", "protection": "0", "template": "0", "cores": "1", "sockets": "1",
             "agent": "0", "cpulimit": "0"},
}  # fmt: skip
"""Values PVE assumes for a key missing from a config."""


@functools.lru_cache(maxsize=1024)
def _key_spec(kind: GuestKind, key: str) -> _KeySpec:
    table, indexed = (_LXC_KEYS, _LXC_INDEXED) if kind == GuestKind.LXC else (_QEMU_KEYS, _QEMU_INDEXED)
    found = table.get(key)
    if found is not None:
        return found
    match = _INDEXED_RE.match(key)
    if match is not None:
        found = indexed.get(match.group(1))
        if found is not None:
            return found
    return _STR


def default_key_for(kind: GuestKind, key: str) -> str | None:
    """The unnamed first element's name in `key`'s property string (`volume`, `file`, `host`, `model`, ...)."""
    return _key_spec(kind, key).default_key


@functools.lru_cache(maxsize=65536)
def _parsed(value: str, default_key: str | None) -> tuple[tuple[str, str], ...]:
    return tuple(parse_property(value, default_key).items())


def _same(norm: _Norm, desired: str, live: str) -> bool:
    if desired == live:
        return True
    try:
        return norm(desired) == norm(live)
    except ValueError:
        return desired.strip() == live.strip()


def _storage(volume: str) -> str | None:
    """The storage of a volume id (`local-lvm:vm-955-disk-0` -> `local-lvm`); None for a path or a keyword."""
    if volume.startswith("/") or ":" not in volume:
        return None
    return volume.split(":", 1)[0]


def _compare_volume(
    name: str,
    desired: str,
    live: str | None,
    desired_fields: Mapping[str, str],
    live_fields: Mapping[str, str],
    *,
    sized: bool = True,
) -> tuple[list[PropertyChange], bool, bool, bool]:
    """Compare a volume (the default key of rootfs, mpN or a disk): (changes, replace, resize, move).

    A volume to allocate (`storage:GiB`) whose live volume sits on another storage is a move: PVE
    moves the volume with its data. Its size is compared as well, so a move and a grow are one plan.
    Volumes PVE sizes itself (`sized=False`: efidisk0, tpmstate0) are never compared by size.
    """
    changes: list[PropertyChange] = []
    replace = resize = move = False
    allocate = _ALLOCATE_RE.match(desired)
    if allocate is not None:
        live_storage = _storage(live) if live is not None else None
        if live_storage != allocate.group(1):
            changes.append(PropertyChange(name, live, desired))
            move = live_storage is not None
        if sized and live_storage is not None and "size" not in desired_fields and "size" in live_fields:
            wanted = int(float(allocate.group(2)) * GIB)
            try:
                same_size = parse_pve_size(live_fields["size"]) == wanted
            except ValueError:
                same_size = False
            if not same_size:
                changes.append(PropertyChange("size", live_fields["size"], format_pve_size(wanted)))
                resize = True
    elif live is None or _path(desired) != _path(live):
        changes.append(PropertyChange(name, live, desired))
        desired_storage, live_storage = _storage(desired), (_storage(live) if live is not None else None)
        replace = desired_storage is not None and live_storage is not None and desired_storage != live_storage
    return changes, replace, resize, move


_MACHINE_RE: Final = re.compile(r"^(?:pc-(?P<family>q35|i440fx)-|pc-|virt-)\d+(?:\.\d+)+(?:\+pve\d+)?(?P<pxe>\.pxe)?$")
"""A versioned QEMU machine type, as PVE's `machine` format allows it (virt has no .pxe variant)."""


def _machine_family(machine: str) -> str:
    """A QEMU machine type without its version: `pc-q35-9.2+pve1` -> `q35`, `pc-i440fx-8.1` -> `pc`."""
    text = machine.strip()
    match = _MACHINE_RE.match(text)
    if match is None:
        return text
    if text.startswith("virt-"):
        return "virt"
    return ("q35" if match.group("family") == "q35" else "pc") + (match.group("pxe") or "")


def _same_machine(desired: str, live: str) -> bool:
    """A machine type without a version (`q35`) is met by any version of it (`pc-q35-9.2+pve1`).

    PVE pins the version when it creates a Windows VM (qemu-server's create_vm: "always pin Windows'
    machine version on create"), through the API and so through the UI, so an unversioned spec must
    not differ from what PVE made of it. A versioned spec is compared as it is.
    """
    return _machine_family(desired) == desired.strip() and _machine_family(live) == desired.strip()


_ALTERNATIVES: Final[Mapping[str, tuple[frozenset[str], ...]]] = {
    "hostpci": (frozenset({"host", "mapping"}),),
    "usb": (frozenset({"host", "mapping"}),),
}
"""Sub-fields of a VM's property string that exclude each other (PVE: "Cannot set both 'host' and 'mapping'")."""


def _superseded(kind: GuestKind, key: str, want: Mapping[str, str], have: Mapping[str, str]) -> list[str]:
    """Live sub-fields that the desired value replaces with an alternative: a raw `host` when it asks for a
    `mapping`, and the other way round. Kept, they would make a value PVE refuses."""
    match = _INDEXED_RE.match(key)
    if kind != GuestKind.QEMU or match is None:
        return []
    gone: list[str] = []
    for group in _ALTERNATIVES.get(match.group(1), ()):
        if group & set(want):
            gone.extend(name for name in sorted(group) if name in have and name not in want)
    return gone


def _compare_property(kind: GuestKind, key: str, spec: _KeySpec, desired: str, live: str) -> FieldDiff | None:
    try:
        want = dict(_parsed(desired, spec.default_key))
        have = dict(_parsed(live, spec.default_key))
    except ValueError:
        if desired.strip() == live.strip():
            return None
        return FieldDiff(key, live, desired)
    changes: list[PropertyChange] = []
    replace = resize = move = False
    volume_key = spec.default_key if spec.volume else None
    if volume_key is not None and volume_key in want:
        changes, replace, resize, move = _compare_volume(
            volume_key, want[volume_key], have.get(volume_key), want, have, sized=spec.sized
        )
    backup_default = "1" if kind == GuestKind.QEMU and spec.volume else "0"
    for name, wanted in want.items():
        if name == volume_key:
            continue
        current = have.get(name)
        if current is None:
            current = backup_default if name == "backup" else _SUB_DEFAULTS.get(name)
            if current is None:
                changes.append(PropertyChange(name, None, wanted))
                continue
        norm = _SUB_NORMALISE.get(name)
        if wanted == current or (norm is not None and _same(norm, wanted, current)):
            continue
        if kind == GuestKind.QEMU and key == "machine" and name == "type" and _same_machine(wanted, current):
            continue
        changes.append(PropertyChange(name, have.get(name), wanted))
        if name == "size" and spec.volume:
            resize = True
    changes.extend(PropertyChange(name, have[name], None) for name in _superseded(kind, key, want, have))
    if not changes:
        return None
    return FieldDiff(key, live, desired, tuple(changes), replace=replace, resize=resize, move=move)


def compare_config(kind: GuestKind, desired: Mapping[str, str], live: Mapping[str, str]) -> list[FieldDiff]:
    """The keys of `desired` whose live value differs, compared by parsed fields, in key order.

    Only keys `desired` declares are compared, and inside a property string only
    the sub-fields it declares (see the module docstring for the equalities). A
    key missing from `live` compares against PVE's default where there is a
    well-known one (`onboot`, `unprivileged`, a VM's `cores`/`sockets`, boolean
    sub-fields, `discard=ignore`), else it differs with `before=None`. A create
    parameter PVE does not store (`ostemplate`) is skipped unless `live` holds it.
    `replace` is set for `REPLACE_KEYS` and for a named volume on another storage;
    `move` for a volume to allocate on another storage than the live one's.

    Pass as `live` the config the guest will have (current values overlaid with
    its pending ones) so that a change already pending is not planned again.
    A value that does not parse is compared as a string rather than raising.
    """
    diffs: list[FieldDiff] = []
    create_only = CREATE_ONLY[kind]
    replace_keys = REPLACE_KEYS[kind]
    defaults = _SCALAR_DEFAULTS[kind]
    for key in sorted(desired, key=_natural):
        wanted = desired[key]
        current = live.get(key)
        if current is None and key in create_only:
            continue
        spec = _key_spec(kind, key)
        compared = current if current is not None else defaults.get(key)
        replace = key in replace_keys
        if compared is None:
            try:
                fields = tuple(PropertyChange(n, None, v) for n, v in _parsed(wanted, spec.default_key))
            except ValueError:
                fields = ()
            diffs.append(FieldDiff(key, None, wanted, fields if spec.norm is None else (), replace=replace))
        elif spec.norm is None:
            diff = _compare_property(kind, key, spec, wanted, compared)
            if diff is not None:
                diffs.append(
                    FieldDiff(key, current, wanted, diff.fields, diff.replace or replace, diff.resize, diff.move)
                )
        elif not _same(spec.norm, wanted, compared):
            diffs.append(FieldDiff(key, current, wanted, replace=replace))
    return diffs


def update_value(kind: GuestKind, key: str, desired: str, live: str | None) -> str:
    """The value to send to change `key` of an existing guest from `live` towards `desired`.

    Sending a desired property string as it is would lose what PVE added to the
    live one: a container NIC without its `hwaddr` gets a new MAC (and a new DHCP
    lease), and a volume in allocation syntax (`local-lvm:8,mp=/data`) allocates
    a new, empty volume and leaves the old one unused. So the live sub-fields are
    kept and the desired ones laid over them, and a volume to allocate on the
    storage the live volume is on keeps the live volume id (its size changes
    through PVE's resize call, not here). A plain value, a new key, a volume on
    another storage (a replacement) or a value that does not parse is `desired`.
    """
    spec = _key_spec(kind, key)
    if live is None or spec.norm is not None:
        return desired
    try:
        want = parse_property(desired, spec.default_key)
        merged = parse_property(live, spec.default_key)
    except ValueError:
        return desired
    if spec.volume and spec.default_key in want and spec.default_key in merged:
        allocate = _ALLOCATE_RE.match(want[spec.default_key])
        if allocate is not None:
            if _storage(merged[spec.default_key]) != allocate.group(1):
                return desired
            want.pop(spec.default_key)
    for name in _superseded(kind, key, want, merged):
        merged.pop(name)
    merged.update(want)
    return format_property(merged, spec.default_key)


def volume_storage(kind: GuestKind, key: str, value: str | None) -> str | None:
    """The storage a config value's volume is on (`local-lvm:vm-955-disk-0,size=8G` -> `local-lvm`);
    None for a bind mount, a path, or a key that holds no volume."""
    spec = _key_spec(kind, key)
    if value is None or not spec.volume:
        return None
    try:
        volume = parse_property(value, spec.default_key).get(spec.default_key or "")
    except ValueError:
        return None
    return _storage(volume) if volume else None


def guest_volumes(kind: GuestKind, config: Mapping[str, str]) -> list[tuple[str, str, str | None]]:
    """The storage volumes a guest config holds, as (key, volume id, size): what destroying it loses.

    Bind mounts, paths and CD-ROM media are not the guest's data and are left out.
    """
    found: list[tuple[str, str, str | None]] = []
    for key in sorted(config, key=lambda k: (k != "rootfs", _natural(k))):
        spec = _key_spec(kind, key)
        if not spec.volume or spec.default_key is None:
            continue
        try:
            fields = parse_property(str(config[key]), spec.default_key)
        except ValueError:
            continue
        volume = fields.get(spec.default_key, "")
        if _storage(volume) is None or fields.get("media") == "cdrom":
            continue
        found.append((key, volume, fields.get("size")))
    return found


def with_size_of(kind: GuestKind, key: str, value: str, source: str | None) -> str:
    """`value` with the `size` of `source`: what restoring a volume's other fields after a grow sends,
    since PVE cannot shrink a disk back."""
    spec = _key_spec(kind, key)
    if source is None or not spec.volume:
        return value
    try:
        fields, size = parse_property(value, spec.default_key), parse_property(source, spec.default_key).get("size")
    except ValueError:
        return value
    if size is None:
        return value
    fields["size"] = size
    return format_property(fields, spec.default_key)


def _natural(key: str) -> tuple[str, int]:
    match = _INDEXED_RE.match(key)
    return (match.group(1), int(match.group(2))) if match else (key, -1)


# ---- when a change takes effect -----------------------------------------------------


_QEMU_FAST: Final = frozenset(
    {"name", "description", "onboot", "protection", "startup", "tags", "hookscript", "lock", "vmstatestorage"}
)
_LXC_LIVE: Final = frozenset(
    {
        "description", "onboot", "startup", "protection", "hostname", "hookscript", "cores", "tags", "lock",
        "memory", "swap", "cpulimit", "cpuunits",
    }
)  # fmt: skip


def classify(
    kind: GuestKind,
    key: str,
    running: bool,
    *,
    new: bool = False,
    delete: bool = False,
    hotplug: str | None = None,
) -> Timing:
    """When setting (or, with `delete`, removing) config `key` takes effect, following PVE 8/9.

    `new` says the key is not in the config yet (a new mpN, devN or disk);
    `hotplug` is the VM's `hotplug` option (None: PVE's default `network,disk,usb`).

    On a stopped guest every change is LIVE, except the REPLACE keys.

    ============  ==========================================  ======================================
    guest         LIVE on a running guest                     RESTART (pending until a restart)
    ============  ==========================================  ======================================
    VM (qemu)     name, description, onboot, protection,      hostpciN, cores, sockets, cpu, machine,
                  startup, tags, hookscript, lock;            bios, numa, numaN, hugepages, args,
                  cpulimit, cpuunits, balloon;                agent, ostype, vga, boot, efidisk0,
                  memory if hotplug has `memory`;             tpmstate0, ide/sata disks, options of
                  vcpus if hotplug has `cpu`;                 an existing disk, and every key not
                  netN if hotplug has `network`;              listed here; memory, vcpus, netN,
                  a new or removed scsi/virtio disk if        usbN and disks without their
                  hotplug has `disk`; usbN if it has `usb`    hotplug feature
    CT (lxc)      description, onboot, startup, protection,   rootfs, changing or removing an
                  hostname, hookscript, cores, tags, lock,    existing mpN or devN, features,
                  memory, swap, cpulimit, cpuunits, netN,     nameserver, searchdomain, ostype,
                  a new mpN or devN, removing unusedN         and every key not listed here
    ============  ==========================================  ======================================

    REPLACE, running or not: an LXC's `ostemplate`, `unprivileged` and `arch`.
    `balloon` is live as in PVE's hotplug code, except switching the balloon
    device on or off (0), which PVE also keeps pending. A disk's size is not
    a config change at all (see `FieldDiff.resize`).
    """
    if key in REPLACE_KEYS[kind]:
        return Timing.REPLACE
    if not running:
        return Timing.LIVE
    match = _INDEXED_RE.match(key)
    prefix = match.group(1) if match else None
    if kind == GuestKind.LXC:
        if key in _LXC_LIVE or prefix == "net" or (prefix == "unused" and delete):
            return Timing.LIVE
        if prefix in ("mp", "dev") and new and not delete:
            return Timing.LIVE
        return Timing.RESTART
    if key in _QEMU_FAST or key in ("cpulimit", "cpuunits", "balloon"):
        return Timing.LIVE
    features = parse_hotplug(hotplug)
    if key == "memory":
        return Timing.LIVE if "memory" in features else Timing.RESTART
    if key == "vcpus":
        return Timing.LIVE if "cpu" in features else Timing.RESTART
    if prefix == "net":
        return Timing.LIVE if "network" in features else Timing.RESTART
    if prefix == "usb":
        return Timing.LIVE if "usb" in features else Timing.RESTART
    if prefix in ("scsi", "virtio") and "disk" in features and (new or delete):
        return Timing.LIVE
    if prefix == "unused" and delete:
        return Timing.LIVE
    return Timing.RESTART

"""What Proxmox and Docker accept in each spec field that reaches them, checked at spec load.

Who uses it: models.py annotates its fields with these types. Why: PVE config
values are property strings (`key=value,key=value`) that nobody escapes, so a
`,` or `=` in a bridge name adds options to a NIC, a newline in a hostname adds
a line to the guest's config, and `..` in a template or a bind source reaches
outside the folder meant. Instead of escaping, every value is held to the
grammar PVE documents for its field (pve-common's JSONSchema formats:
`pve-storage-id`, `dns-name`, `pve-lxc-mp-string`, `mac-addr`, the LXC
`netN` patterns, ...), which never contains a separator; a value outside it is
a spec error with file and line. Paths are normalised (`/srv//x/` is `/srv/x`)
and refused when they climb (`..`).
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from typing import Annotated, Final

from pydantic import AfterValidator, WithJsonSchema

__all__ = [
    "ApiUrl",
    "BindAddress",
    "BridgeId",
    "CpuType",
    "DevicePath",
    "DnsName",
    "DockerEndpointUrl",
    "EnvName",
    "FsType",
    "Gateway4",
    "HostPath",
    "IPv4Config",
    "IPv6Config",
    "ImageRef",
    "MacAddress",
    "ModelSource",
    "Nameservers",
    "NetworkMode",
    "NvmlLibrary",
    "OsTemplate",
    "ProbeTarget",
    "ProbeUrl",
    "ReconcilerEnvName",
    "StorageId",
    "check_path",
]

STORAGE_ID_PATTERN: Final = r"^[A-Za-z][A-Za-z0-9_.-]*[A-Za-z0-9]$"
BRIDGE_PATTERN: Final = r"^[A-Za-z0-9_.-]{1,64}$"
_DNS_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
DNS_NAME_PATTERN: Final = rf"^(?:{_DNS_LABEL}\.)*{_DNS_LABEL}$"
CPU_TYPE_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAC_PATTERN: Final = r"^[0-9A-Fa-f][02468aceACE](:[0-9A-Fa-f]{2}){5}$"
ENV_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]*$"
FS_TYPE_PATTERN: Final = r"^[A-Za-z0-9_]+$"
TEMPLATE_PATTERN: Final = r"^[A-Za-z][A-Za-z0-9_.-]*[A-Za-z0-9]:(vztmpl|backup)/[A-Za-z0-9][A-Za-z0-9_.+~-]*$"
OLLAMA_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]*$"
PATH_PATTERN: Final = r"^/[^,=\x00-\x1f\x7f]*$"
_IMAGE_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_DOMAIN: Final = rf"(?:{_DNS_LABEL}(?:\.{_DNS_LABEL})*(?::[0-9]+)?/)"
IMAGE_PATTERN: Final = (
    rf"^{_IMAGE_DOMAIN}?{_IMAGE_COMPONENT}(?:/{_IMAGE_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
    r"(?:@sha256:[a-f0-9]{64})?$"
)
NETWORK_MODE_PATTERN: Final = r"^(?:container:)?[A-Za-z0-9][A-Za-z0-9_.-]*$"
_USER_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

RECONCILER_ENV_PREFIX: Final = "RECONCILER_"
RECONCILER_OWN_ENV: Final = frozenset({"DOCKER_HOST"})
"""Environment variables holding the reconciler's own credentials: a workload may not be handed them."""

_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MAX_TEXT: Final = 4096


def _shown(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _matches(pattern: str, what: str, rule: str) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if len(value) > _MAX_TEXT or not compiled.fullmatch(value):
            raise ValueError(f"not a valid {what}: {_shown(value)} ({rule})")
        return value

    return AfterValidator(check)


def _schema(pattern: str | None = None, **extra: object) -> WithJsonSchema:
    schema: dict[str, object] = {"type": "string", **extra}
    if pattern is not None:
        schema["pattern"] = pattern
    return WithJsonSchema(schema)


# ---- Proxmox identifiers -------------------------------------------------------------

StorageId = Annotated[
    str,
    _matches(STORAGE_ID_PATTERN, "Proxmox storage id", "letters, digits, '-', '_' and '.', starting with a letter"),
    _schema(STORAGE_ID_PATTERN),
]
BridgeId = Annotated[
    str,
    _matches(BRIDGE_PATTERN, "bridge name", "letters, digits, '-', '_' and '.'"),
    _schema(BRIDGE_PATTERN),
]
CpuType = Annotated[
    str,
    _matches(CPU_TYPE_PATTERN, "CPU type", "a QEMU CPU model such as 'host' or 'x86-64-v2-AES', without options"),
    _schema(CPU_TYPE_PATTERN),
]
MacAddress = Annotated[
    str,
    _matches(MAC_PATTERN, "MAC address", "six hex pairs joined by ':', unicast (the first byte even)"),
    _schema(MAC_PATTERN),
]
FsType = Annotated[
    str,
    _matches(FS_TYPE_PATTERN, "file system type", "letters, digits and '_', as used with mount -t"),
    _schema(FS_TYPE_PATTERN),
]
OsTemplate = Annotated[
    str,
    _matches(
        TEMPLATE_PATTERN,
        "container template",
        "write it as STORAGE:vztmpl/FILE, a file name without '/' or '..'",
    ),
    AfterValidator(lambda value: _no_climb(value, "container template")),
    _schema(TEMPLATE_PATTERN, examples=["local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"]),
]


def _dns_name(value: str) -> str:
    if len(value) > 255 or not re.fullmatch(DNS_NAME_PATTERN, value):
        raise ValueError(
            f"not a valid host name: {_shown(value)} (DNS labels of letters, digits and '-', joined by '.')"
        )
    return value


DnsName = Annotated[str, AfterValidator(_dns_name), _schema(DNS_NAME_PATTERN, maxLength=255)]


# ---- addresses -------------------------------------------------------------------------


def _interface(value: str, version: int, keywords: frozenset[str]) -> str:
    if value in keywords:
        return value
    address, slash, prefix = value.partition("/")
    try:
        if not slash or not prefix.isdigit() or len(prefix) > 3:
            raise ValueError
        parsed = ipaddress.ip_interface(value)
        if parsed.version != version or "%" in address:
            raise ValueError
    except ValueError:
        words = ", ".join(sorted(keywords))
        raise ValueError(f"not an IPv{version} address with prefix or one of {words}: {_shown(value)}") from None
    return value


def _gateway4(value: str) -> str:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"not an IPv4 address: {_shown(value)}") from None
    return value


def _ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"not an IP address: {_shown(value)}") from None
    return value


def _nameservers(value: str) -> str:
    servers = value.split(" ")
    for server in servers:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise ValueError(
                f"not a list of name server addresses: {_shown(value)} (IP addresses separated by one space)"
            ) from None
    return value


IPv4Config = Annotated[
    str,
    AfterValidator(lambda value: _interface(value, 4, frozenset({"dhcp", "manual"}))),
    _schema(description="dhcp, manual or an IPv4 address with prefix (10.0.0.5/24)"),
]
IPv6Config = Annotated[
    str,
    AfterValidator(lambda value: _interface(value, 6, frozenset({"auto", "dhcp", "manual"}))),
    _schema(description="auto, dhcp, manual or an IPv6 address with prefix"),
]
Gateway4 = Annotated[str, AfterValidator(_gateway4), _schema(description="an IPv4 address")]
BindAddress = Annotated[str, AfterValidator(_ip), _schema(description="an IP address to publish on")]
Nameservers = Annotated[str, AfterValidator(_nameservers), _schema(description="IP addresses separated by one space")]


# ---- paths -----------------------------------------------------------------------------


def _no_climb(value: str, what: str) -> str:
    if ".." in value.split("/") or ".." in value.split(":"):
        raise ValueError(f"{what} {_shown(value)} may not contain '..'")
    return value


def check_path(value: str, what: str = "path") -> str:
    """An absolute path, normalised (`//`, `/./` and a trailing `/` removed); refused when it climbs
    (`..`) or holds `,`, `=` or a control character (each would be read differently by PVE)."""
    if not value.startswith("/"):
        raise ValueError(f"{what} {_shown(value)} must be absolute (start with '/')")
    if len(value) > _MAX_TEXT or _CONTROL_RE.search(value) or "," in value or "=" in value:
        raise ValueError(f"{what} {_shown(value)} may not contain ',', '=' or control characters")
    _no_climb(value, what)
    parts = [part for part in value.split("/") if part not in ("", ".")]
    return "/" + "/".join(parts)


HostPath = Annotated[
    str,
    AfterValidator(check_path),
    _schema(PATH_PATTERN, description="absolute path; no '..', ',' or '='"),
]


def _device(value: str) -> str:
    """A Docker device mapping: HOST[:CONTAINER[:PERMISSIONS]], both paths absolute."""
    parts = value.split(":")
    if len(parts) > 3 or (len(parts) == 3 and not re.fullmatch(r"[rwm]{1,3}", parts[2])):
        raise ValueError(f"not a device mapping: {_shown(value)} (write /dev/HOST[:/dev/CONTAINER[:rwm]])")
    paths = [check_path(part, "device path") for part in parts[:2]]
    return ":".join([*paths, *parts[2:]])


DevicePath = Annotated[
    str, AfterValidator(_device), _schema(description="HOST[:CONTAINER[:rwm]], e.g. /dev/dri:/dev/dri")
]


def _model_source(value: str) -> str:
    if value.startswith("/"):
        return check_path(value, "model source")
    if len(value) > _MAX_TEXT or not re.fullmatch(OLLAMA_NAME_PATTERN, value):
        raise ValueError(f"not a model path or name: {_shown(value)} (an absolute path, or a name like 'llama3.1:8b')")
    return _no_climb(value, "model source")


ModelSource = Annotated[
    str,
    AfterValidator(_model_source),
    _schema(description="absolute path on the host (vllm, llamacpp) or a model name (ollama)"),
]


# ---- environment -----------------------------------------------------------------------


def _env_name(value: str) -> str:
    if len(value) > 256 or not re.fullmatch(ENV_NAME_PATTERN, value):
        raise ValueError(f"not an environment variable name: {_shown(value)} (letters, digits and '_')")
    return value


def _reconciler_env(value: str) -> str:
    _env_name(value)
    if value.startswith(RECONCILER_ENV_PREFIX) or value in RECONCILER_OWN_ENV:
        raise ValueError(
            f"{value!r} holds the reconciler's own credentials or settings and cannot be handed to a workload"
        )
    return value


EnvName = Annotated[str, AfterValidator(_env_name), _schema(ENV_NAME_PATTERN)]
ReconcilerEnvName = Annotated[
    str,
    AfterValidator(_reconciler_env),
    _schema(ENV_NAME_PATTERN, description="an environment variable of the reconciler, not RECONCILER_* or DOCKER_HOST"),
]


# ---- endpoints and images ------------------------------------------------------------------


def _host(host: str | None) -> bool:
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return len(host) <= 255 and re.fullmatch(DNS_NAME_PATTERN, host) is not None
    return True


def _parts(value: str) -> urllib.parse.SplitResult | None:
    if _CONTROL_RE.search(value) or " " in value or len(value) > _MAX_TEXT:
        return None
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return None
    return parts


def _without_credentials(value: str) -> str:
    """An address as it may be shown: what precedes '@' in it could be a password."""
    return _shown(re.sub(r"//[^/]*@", "//***@", value))


def _docker_endpoint(value: str) -> str:
    """unix:///socket, tcp://host:port, ssh://[user@]host[:port] or npipe:////./pipe/name."""
    parts = _parts(value)
    ok = parts is not None
    if parts is not None and parts.scheme == "unix":
        ok = not parts.netloc and parts.path.startswith("/") and ".." not in parts.path.split("/")
    elif parts is not None and parts.scheme in ("tcp", "ssh"):
        user = parts.username
        ok = (
            _host(parts.hostname)
            and parts.path in ("", "/")
            and not parts.query
            and not parts.fragment
            and parts.password is None
            and (user is None or (parts.scheme == "ssh" and _USER_RE.fullmatch(user) is not None))
        )
    elif parts is not None and parts.scheme == "npipe":
        ok = parts.path.startswith("//./pipe/") or parts.path.startswith("////./pipe/")
    elif parts is not None:
        ok = False
    if not ok:
        raise ValueError(
            f"not a Docker endpoint: {_without_credentials(value)} "
            "(unix:///path/docker.sock, tcp://host:port, ssh://user@host[:port] or npipe:////./pipe/name)"
        )
    return value


def _api_url(value: str) -> str:
    parts = _parts(value)
    if parts is None or parts.scheme not in ("https", "http") or not _host(parts.hostname) or parts.username:
        raise ValueError(
            f"not an API address: {_without_credentials(value)} "
            "(write it like https://pve1.lan:8006; credentials come from the environment)"
        )
    return value


def _image(value: str) -> str:
    if len(value) > 512 or not re.fullmatch(IMAGE_PATTERN, value):
        raise ValueError(f"not an image reference: {_shown(value)} (like 'registry.lan/team/app:1.2' or 'redis:7')")
    return value


DockerEndpointUrl = Annotated[
    str,
    AfterValidator(_docker_endpoint),
    _schema(r"^(unix|tcp|ssh|npipe)://.+", description="unix:///path, tcp://host:port or ssh://user@host"),
]
ApiUrl = Annotated[str, AfterValidator(_api_url), _schema(r"^https?://", description="https://pve1.lan:8006")]
ImageRef = Annotated[str, AfterValidator(_image), _schema(IMAGE_PATTERN, maxLength=512)]
NetworkMode = Annotated[
    str,
    _matches(NETWORK_MODE_PATTERN, "network mode", "host, bridge, none, container:NAME or a network's name"),
    _schema(NETWORK_MODE_PATTERN),
]


def _probe_url(value: str) -> str:
    """A path on the workload's published port (`/health`) or an http(s) URL; never file:// or ftp://."""
    parts = _parts(value)
    if parts is not None and value.startswith("/") and not value.startswith("//"):
        return value
    if parts is None or parts.scheme not in ("http", "https") or not _host(parts.hostname) or parts.username:
        raise ValueError(
            f"not a probe URL: {_without_credentials(value)} (a path like /health, or http(s)://host/path)"
        )
    return value


def _probe_target(value: str) -> str:
    """host:port, [v6]:port, or a port alone (on the workload's host)."""
    host, colon, port = value.rpartition(":")
    port = port if colon else value
    ok = port.isdigit() and 1 <= int(port) <= 65535 and (not colon or _host(host.removeprefix("[").removesuffix("]")))
    if not ok:
        raise ValueError(f"not a TCP probe target: {_shown(value)} (host:port, or a port)")
    return value


ProbeUrl = Annotated[str, AfterValidator(_probe_url), _schema(description="/path or http(s)://host[:port]/path")]
ProbeTarget = Annotated[str, AfterValidator(_probe_target), _schema(description="host:port, or a port")]


def _nvml_library(value: str) -> str:
    """The spec comes from git and this library is loaded into the reconciler: only an absolute path to a
    file named like NVML (libnvidia-ml.so[.N...]) is taken, not any shared object a commit names."""
    path = check_path(value, "NVML library")
    if not re.fullmatch(r"libnvidia-ml\.so(\.[0-9]+)*", path.rsplit("/", 1)[-1]):
        raise ValueError(f"NVML library {_shown(value)} must be a file named libnvidia-ml.so or libnvidia-ml.so.N")
    return path


NvmlLibrary = Annotated[
    str, AfterValidator(_nvml_library), _schema(r"^/.*libnvidia-ml\.so(\.[0-9]+)*$", description="absolute path")
]

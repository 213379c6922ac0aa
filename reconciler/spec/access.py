"""How the reconciler gets into a guest it creates, and what it runs there: the spec's models for issue 11.

Who uses it: `models.py` adds these as fields of `Lxc` (`ssh_keys`, `password_env`), `Vm` (`clone`,
`cloud_init`, `efidisk0`, `tpmstate0`, `numa_nodes`) and of every guest and `DockerHost` (`ssh`,
`provision`); the loader attaches the files they name (`spec/files.py`); the planner renders them as
PVE parameters (`planning/pve_access.py`) and provisioning steps (`planning/provision.py`).

Every value that ends up inside a PVE property string or a shell command line is checked here
against the grammar PVE documents for it (PVE::JSONSchema formats), at load time, so a spec cannot
smuggle `,key=value` into a property string or a newline into a command. Secrets are never fields:
a password is named by the environment variable that holds it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from reconciler.spec.grammar import ReconcilerEnvName
from reconciler.spec.units import Duration, Size

__all__ = [
    "BuiltinStep",
    "Clone",
    "CloudInit",
    "EfiDisk",
    "IpConfig",
    "NumaNode",
    "ProvisionStep",
    "SshKey",
    "SshTarget",
    "TpmState",
    "check_spec_path",
    "parse_public_keys",
]

ENV_NAME: Final = r"^[A-Z_][A-Z0-9_]{0,127}$"
STORAGE_ID: Final = r"^[a-z][a-z0-9._-]*[a-z0-9]$"  # PVE's pve-storage-id
MAX_STEP_TIMEOUT: Final = 24 * 3600.0
# Key types OpenSSH accepts in authorized_keys; the blob inside must name the same type.
SSH_KEY_TYPES: Final = frozenset(
    {
        "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)  # fmt: skip
MAX_KEY_LINE: Final = 16 * 1024
_HOSTNAME: Final = re.compile(
    r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_USER: Final = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")  # a portable Linux user name (useradd's default rule)
_SNIPPET: Final = re.compile(r"^[a-z][a-z0-9._-]*[a-z0-9]:snippets/[A-Za-z0-9._-]+$")
_CPUSET: Final = re.compile(r"^\d{1,4}(-\d{1,4})?(;\d{1,4}(-\d{1,4})?)*$")  # PVE's numaN cpus/hostnodes


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


# ---- paths in the spec repository and public keys -----------------------------------------


def check_spec_path(path: str) -> str:
    """A file path inside the spec repository: relative, POSIX, no `..`, no hidden parts. Raises ValueError."""
    if not path or len(path) > 1024 or any(ch in path for ch in "\\\0\n\r"):
        raise ValueError(f"{path!r} is not a file path in the spec repository")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise ValueError(f"{path!r} is absolute; name a file relative to the spec tree")
    if any(part in ("..", "") or part.startswith(".") for part in pure.parts):
        raise ValueError(f"{path!r} leaves the spec tree or names a hidden file")
    return path


def _blob_type(blob: bytes) -> str | None:
    """The key type named at the start of an SSH public key blob (a length-prefixed string)."""
    if len(blob) < 4:
        return None
    length = int.from_bytes(blob[:4], "big")
    if length > 64 or len(blob) < 4 + length:
        return None
    try:
        return blob[4 : 4 + length].decode("ascii")
    except UnicodeDecodeError:
        return None


def _parse_key_line(line: str) -> str:
    parts = line.split(maxsplit=2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise ValueError(
            "not an OpenSSH public key (want 'TYPE BASE64 [comment]' with TYPE one of "
            f"{', '.join(sorted(SSH_KEY_TYPES))}; authorized_keys options are not allowed)"
        )
    kind, data = parts[0], parts[1]
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the {kind} key's base64 data does not decode") from None
    if _blob_type(blob) != kind:
        raise ValueError(f"the key data is not a {kind} key")
    if not kind.startswith("sk-"):
        # The key material itself must parse (a truncated or corrupted key is refused here, not by sshd later).
        from cryptography.hazmat.primitives.serialization import load_ssh_public_key

        try:
            load_ssh_public_key(f"{kind} {data}".encode())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"the {kind} key does not parse: {exc}") from None
    comment = parts[2].strip() if len(parts) > 2 else ""
    return f"{kind} {data} {comment}".strip()


def parse_public_keys(text: str) -> tuple[str, ...]:
    """OpenSSH public keys, one a line (blank lines and `#` comments skipped), each normalised to
    `TYPE BASE64 [comment]`. Raises ValueError naming the line for anything else, and for no key at all."""
    keys: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_KEY_LINE or any(ord(ch) < 32 and ch != "\t" for ch in line):
            raise ValueError(f"line {number}: not an OpenSSH public key")
        try:
            keys.append(_parse_key_line(line))
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
    if not keys:
        raise ValueError("no public key found")
    return tuple(keys)


class SshKey(_Strict):
    """One authorized key: inline (`- "ssh-ed25519 AAAA... me@lab"`) or a file of keys (`- {file: keys/admin.pub}`)."""

    key: str | None = Field(None, description="an OpenSSH public key")
    file: str | None = Field(None, description="path relative to the spec tree of a file of public keys, one a line")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"key": value} if isinstance(value, str) else value

    @field_validator("key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        keys = parse_public_keys(value)
        if len(keys) != 1:
            raise ValueError("give one key per list item")
        return keys[0]

    @field_validator("file")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return None if value is None else check_spec_path(value)

    @model_validator(mode="after")
    def _one(self) -> SshKey:
        if (self.key is None) == (self.file is None):
            raise ValueError("give exactly one of 'key' or 'file'")
        return self


# ---- how to reach a guest ------------------------------------------------------------------


class SshTarget(_Strict):
    """Where provisioning connects: `user@host[:port]` (an IPv6 address in brackets: `root@[fd00::5]:22`)."""

    user: str = Field("root", pattern=_USER.pattern)
    host: str
    port: int = Field(22, ge=1, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        match = re.fullmatch(
            r"(?:(?P<user>[^@\s]+)@)?(?:\[(?P<ip6>[^\]]+)\]|(?P<host>[^:@\s\[\]]+))(?::(?P<port>\d{1,5}))?", value
        )
        if match is None:
            raise ValueError(f"{value!r} is not user@host[:port]")
        fields: dict[str, Any] = {"host": match.group("ip6") or match.group("host")}
        if match.group("user"):
            fields["user"] = match.group("user")
        if match.group("port"):
            fields["port"] = int(match.group("port"))
        return fields

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if len(value) > 253 or not _HOSTNAME.fullmatch(value):
                raise ValueError(f"{value!r} is not a host name or IP address") from None
        return value

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


# ---- VM: clone, cloud-init, firmware volumes, NUMA ------------------------------------------


class Clone(_Strict):
    """Create the VM as a clone of a template (PVE's `POST /nodes/{node}/qemu/{vmid}/clone`)."""

    template: (
        Annotated[int, Field(ge=100, le=999_999_999)] | Annotated[str, Field(pattern=_HOSTNAME.pattern, max_length=253)]
    ) = Field(description="the template's VMID, or its name (unique in the cluster)")
    node: str | None = Field(
        None, pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", description="the template's node; default: the VM's"
    )
    full: bool = Field(True, description="a full copy; false: a linked clone sharing the template's base volumes")
    storage: str | None = Field(None, pattern=STORAGE_ID, description="target storage of a full clone")

    @field_validator("template", mode="before")
    @classmethod
    def _template(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if not 100 <= value <= 999_999_999:
                raise ValueError("a template VMID is between 100 and 999999999")
            return value
        if not isinstance(value, str) or len(value) > 253 or not _HOSTNAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a VMID or a VM name")
        return value

    @model_validator(mode="after")
    def _linked(self) -> Clone:
        if not self.full and self.storage is not None:
            raise ValueError("'storage' is for a full clone: a linked clone stays on the template's storage")
        return self


def _ipv4_config(value: str) -> str:
    if value == "dhcp":
        return value
    try:
        interface = ipaddress.IPv4Interface(value)
    except ValueError:
        raise ValueError(f"{value!r} is not 'dhcp' or an IPv4 address with prefix (10.0.0.5/24)") from None
    if "/" not in value:
        raise ValueError(f"{value!r} needs a prefix length (10.0.0.5/24)")
    return str(interface)


def _ipv6_config(value: str) -> str:
    if value in ("dhcp", "auto"):
        return value
    try:
        interface = ipaddress.IPv6Interface(value)
    except ValueError:
        raise ValueError(f"{value!r} is not 'dhcp', 'auto' or an IPv6 address with prefix") from None
    if "/" not in value:
        raise ValueError(f"{value!r} needs a prefix length (fd00::5/64)")
    return str(interface)


class IpConfig(_Strict):
    """One NIC's cloud-init address (`ipconfigN`, for the VM's Nth network entry)."""

    ip: str | None = Field(None, description="dhcp or an IPv4 address with prefix")
    gw: str | None = Field(None, description="IPv4 gateway (with a static ip)")
    ip6: str | None = Field(None, description="dhcp, auto or an IPv6 address with prefix")
    gw6: str | None = Field(None, description="IPv6 gateway (with a static ip6)")

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        return None if value is None else _ipv4_config(value)

    @field_validator("ip6")
    @classmethod
    def _ip6(cls, value: str | None) -> str | None:
        return None if value is None else _ipv6_config(value)

    @field_validator("gw")
    @classmethod
    def _gw(cls, value: str | None) -> str | None:
        return None if value is None else str(ipaddress.IPv4Address(value))

    @field_validator("gw6")
    @classmethod
    def _gw6(cls, value: str | None) -> str | None:
        return None if value is None else str(ipaddress.IPv6Address(value))

    @model_validator(mode="after")
    def _gateways(self) -> IpConfig:
        if self.gw is not None and self.ip in (None, "dhcp"):
            raise ValueError("'gw' needs a static 'ip'")
        if self.gw6 is not None and self.ip6 in (None, "dhcp", "auto"):
            raise ValueError("'gw6' needs a static 'ip6'")
        if (
            self.gw is not None
            and self.ip is not None
            and ipaddress.IPv4Address(self.gw) not in ipaddress.IPv4Interface(self.ip).network
        ):
            raise ValueError(f"gateway {self.gw} is not in {self.ip}'s network")
        return self


class CloudInit(_Strict):
    """Cloud-init settings PVE writes to the VM's cloud-init drive (ciuser, sshkeys, ipconfigN, DNS, cicustom)."""

    user: str | None = Field(None, pattern=_USER.pattern, description="the user cloud-init creates (ciuser)")
    password_env: ReconcilerEnvName | None = Field(  # not the reconciler's own: it would be the guest's password
        None, pattern=ENV_NAME, description="environment variable holding its password"
    )
    ssh_keys: tuple[SshKey, ...] = ()
    ipconfig: tuple[IpConfig, ...] = Field((), description="ipconfigN, one per network entry, in order")
    nameserver: tuple[str, ...] = ()
    searchdomain: tuple[str, ...] = ()
    user_data: str | None = Field(
        None, pattern=_SNIPPET.pattern, description="user-data snippet: storage:snippets/file.yaml (cicustom user=)"
    )
    upgrade: bool | None = Field(None, description="upgrade packages on first boot (ciupgrade)")

    @field_validator("nameserver")
    @classmethod
    def _nameservers(cls, servers: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_address(server)) for server in servers)

    @field_validator("searchdomain")
    @classmethod
    def _domains(cls, domains: tuple[str, ...]) -> tuple[str, ...]:
        for domain in domains:
            if len(domain) > 253 or not _HOSTNAME.fullmatch(domain):
                raise ValueError(f"{domain!r} is not a DNS domain")
        return domains


class EfiType(enum.StrEnum):
    SMALL = "2m"
    LARGE = "4m"


class EfiDisk(_Strict):
    """The OVMF variables volume (`efidisk0`); PVE sizes it itself."""

    storage: str = Field(pattern=STORAGE_ID)
    efitype: EfiType = EfiType.LARGE
    pre_enrolled_keys: bool | None = Field(None, description="Microsoft secure-boot keys enrolled (Windows 11)")


class TpmState(_Strict):
    """The software TPM's state volume (`tpmstate0`); Windows 11 needs version v2.0."""

    storage: str = Field(pattern=STORAGE_ID)
    version: Literal["v1.2", "v2.0"] = "v2.0"


class NumaPolicy(enum.StrEnum):
    PREFERRED = "preferred"
    BIND = "bind"
    INTERLEAVE = "interleave"


class NumaNode(_Strict):
    """One guest NUMA node (`numaN`): its vCPUs and memory, pinned to host NUMA nodes."""

    cpus: str = Field(description="guest CPU ids: 0-11 or 0-5;12-17")
    memory: Size
    hostnodes: str | None = Field(None, description="host NUMA nodes: 0 or 0-1")
    policy: NumaPolicy | None = None

    @field_validator("cpus", "hostnodes")
    @classmethod
    def _cpuset(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _CPUSET.fullmatch(value):
            raise ValueError(f"{value!r} is not a list of ids or ranges (0-11;24-35)")
        for part in value.split(";"):
            low, _, high = part.partition("-")
            if high and int(high) < int(low):
                raise ValueError(f"range {part!r} runs backwards")
        return value

    @field_validator("memory")
    @classmethod
    def _whole_mib(cls, memory: int) -> int:
        if memory <= 0 or memory % (1024 * 1024):
            raise ValueError("memory must be a positive whole number of MiB")
        return memory


# ---- provisioning steps -------------------------------------------------------------------


class BuiltinStep(enum.StrEnum):
    """Steps shipped with the reconciler (reconciler/provision/steps/*.sh)."""

    DOCKER = "docker"  # the distribution's Docker engine, enabled and started
    NVIDIA_CONTAINER_TOOLKIT = "nvidia-container-toolkit"
    NVIDIA_USERSPACE = "nvidia-userspace"  # the host driver's userspace, exact version, no kernel module


class ProvisionStep(_Strict):
    """One provisioning step: a built-in or a script file in the spec repository. Shorthand: `- docker`."""

    builtin: BuiltinStep | None = None
    script: str | None = Field(None, description="path of a script relative to the spec tree")
    name: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="defaults to the builtin or script file name"
    )
    creates: str | None = Field(None, description="skip the step when this path exists in the guest")
    unless: str | None = Field(None, description="skip the step when this command succeeds in the guest")
    timeout: Duration = Field(1800.0, description="the step fails when it runs longer")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"builtin": value} if isinstance(value, str) else value

    @field_validator("script")
    @classmethod
    def _script(cls, value: str | None) -> str | None:
        return None if value is None else check_spec_path(value)

    @field_validator("creates")
    @classmethod
    def _creates(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"/[A-Za-z0-9._+@/-]{0,1023}", value):
            raise ValueError(f"{value!r} is not an absolute path of letters, digits and ._+@-/")
        return value

    @field_validator("unless")
    @classmethod
    def _unless(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or len(value) > 4096 or any(ord(c) < 32 for c in value)):
            raise ValueError("'unless' is one line of shell, without control characters")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if not 0 < value <= MAX_STEP_TIMEOUT:
            raise ValueError("timeout must be more than 0 and at most 24h")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> ProvisionStep:
        if (self.builtin is None) == (self.script is None):
            raise ValueError("give exactly one of 'builtin' or 'script'")
        if self.creates is not None and self.unless is not None:
            raise ValueError("give 'creates' or 'unless', not both")
        return self

    @property
    def key(self) -> str:
        """The step's identity in the journal: its name, else the builtin, else the script's file name."""
        if self.name is not None:
            return self.name
        if self.builtin is not None:
            return self.builtin.value
        assert self.script is not None
        return PurePosixPath(self.script).name


def ssh_target_from_endpoint(endpoint: str) -> SshTarget | None:
    """The SSH target of a Docker endpoint `ssh://user@host[:port]`; None for any other scheme or a bad one."""
    if not endpoint.startswith("ssh://"):
        return None
    try:
        return SshTarget.model_validate(endpoint.removeprefix("ssh://").rstrip("/"))
    except ValueError:
        return None

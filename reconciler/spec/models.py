"""The desired-state vocabulary: one frozen pydantic model per `kind`.

Who uses it: the loader validates YAML documents into these; the validator
checks them against each other; the planner compares them with what the
backends observe. Unknown fields are refused (`extra="forbid"`) so a typo is
an error, not a silently ignored setting. Secrets are never fields: a spec
names the environment variable or file that holds one.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Literal, TypeAlias
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from reconciler.spec.access import (
    Clone,
    CloudInit,
    EfiDisk,
    NumaNode,
    ProvisionStep,
    SshKey,
    SshTarget,
    TpmState,
)
from reconciler.spec.grammar import (
    ApiUrl,
    BindAddress,
    BridgeId,
    CpuType,
    DevicePath,
    DnsName,
    DockerEndpointUrl,
    EnvName,
    FsType,
    Gateway4,
    HostPath,
    ImageRef,
    IPv4Config,
    IPv6Config,
    MacAddress,
    ModelSource,
    Nameservers,
    NetworkMode,
    NvmlLibrary,
    OsTemplate,
    ProbeTarget,
    ProbeUrl,
    ReconcilerEnvName,
    StorageId,
)
from reconciler.spec.units import Duration, Size, Timeout, format_size

__all__ = [
    "KINDS",
    "Container",
    "ContainerHealth",
    "DockerEndpoint",
    "DockerHost",
    "DriftPolicy",
    "Engine",
    "ExclusiveGroup",
    "Gpu",
    "GpuComputeMode",
    "GpuRole",
    "Lab",
    "Lxc",
    "Model",
    "Notification",
    "NotifyEvent",
    "NotifyKind",
    "Resource",
    "Sharing",
    "Vm",
    "http_url_problem",
]

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="lower case letters, digits and '-'")]
VmId = Annotated[int, Field(ge=100, le=999_999_999, description="Proxmox guest id")]
Port = Annotated[int, Field(ge=1, le=65535)]
PCI_PATTERN = r"^([0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}(\.[0-7])?$"
GIB = 1024**3
MIB = 1024**2


def _at_least(minimum: int) -> AfterValidator:
    def check(size: int) -> int:
        if size < minimum:
            raise ValueError(f"{format_size(size)} is too small (the least is {format_size(minimum)})")
        return size

    return AfterValidator(check)


PositiveSize = Annotated[Size, _at_least(1)]
Memory = Annotated[Size, _at_least(16 * MIB)]  # Proxmox's minimum for a VM and a CT


def _whole_gib(size: int) -> int:
    """Proxmox allocates rootfs, mount point and disk volumes as STORAGE:GiB; a fraction would be sent
    as a decimal it may read differently."""
    if size % GIB:
        raise ValueError(f"{format_size(size)} is not a whole number of GiB (Proxmox allocates volumes in GiB)")
    return size


DiskSize = Annotated[Size, _at_least(GIB), AfterValidator(_whole_gib)]
VmOsType: TypeAlias = Literal[
    "other", "wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11", "l24", "l26", "solaris"
]
ArgName = Annotated[str, Field(pattern=r"^-*[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


# ---- enums -------------------------------------------------------------------------


class DriftPolicy(enum.StrEnum):
    """What a pass does when live state differs from the spec."""

    CORRECT = "correct"  # plan and apply the fix
    WARN = "warn"  # report it, change nothing
    IGNORE = "ignore"  # neither report nor change


class PowerState(enum.StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"


class Sharing(enum.StrEnum):
    EXCLUSIVE = "exclusive"  # one workload at a time
    SHARED = "shared"  # workloads share VRAM


class Engine(enum.StrEnum):
    VLLM = "vllm"
    LLAMACPP = "llamacpp"
    OLLAMA = "ollama"


class GpuComputeMode(enum.StrEnum):
    """The compute modes a Gpu may ask NVML for (nvidia-smi -c)."""

    DEFAULT = "default"  # any number of processes
    EXCLUSIVE_PROCESS = "exclusive_process"  # one process at a time
    PROHIBITED = "prohibited"  # no compute process


class RestartPolicy(enum.StrEnum):
    NO = "no"
    ALWAYS = "always"
    UNLESS_STOPPED = "unless-stopped"
    ON_FAILURE = "on-failure"


# ---- pieces shared by several kinds --------------------------------------------------


class Resource(_Strict):
    """Fields every kind carries: identity and how the reconciler treats it."""

    kind: str
    name: Name
    description: str | None = None
    drift: DriftPolicy = Field(DriftPolicy.CORRECT, description="what to do about out-of-band changes")
    ignore: tuple[str, ...] = Field((), description="fields whose live value is never compared")
    protect: bool = Field(False, description="never delete, even when removed from the spec")
    adopt: bool = Field(False, description="take over an existing resource not created by the reconciler")

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"


class GroupMembership(_Strict):
    """Membership of an exclusive group: only the active member's workloads run."""

    group: Name
    member: Name | None = Field(None, description="the member this belongs to; defaults to the resource name")


class Startup(_Strict):
    order: int | None = Field(None, ge=0)
    up: Duration | None = None
    down: Duration | None = None


class DockerEndpoint(_Strict):
    """How to reach a Docker engine: unix://, tcp:// or ssh:// (see DOCKER_HOST)."""

    endpoint: DockerEndpointUrl
    tls_verify: bool = False
    ca_file: str | None = None
    timeout: Timeout = 60.0


class Network(_Strict):
    """One guest NIC. For an LXC `name` is the interface inside it (eth0)."""

    name: str = Field("eth0", pattern=r"^[a-zA-Z][a-zA-Z0-9_.-]{0,15}$")
    bridge: BridgeId = "vmbr0"
    model: Literal["virtio", "e1000", "e1000e", "rtl8139", "vmxnet3"] = "virtio"
    ip: IPv4Config | None = Field(None, description="dhcp, manual or an address with prefix (LXC)")
    gateway: Gateway4 | None = None
    ip6: IPv6Config | None = None
    vlan: int | None = Field(None, ge=1, le=4094)
    firewall: bool | None = None
    mtu: int | None = Field(None, ge=576, le=65520)
    hwaddr: MacAddress | None = None


class Probe(_Strict):
    """A health probe: HTTP (status, optional body match) or TCP."""

    http: ProbeUrl | None = Field(None, description="URL or path (a path is joined to the published port)")
    tcp: ProbeTarget | None = Field(None, description="host:port")
    status: int = Field(200, ge=100, le=599)
    body: str | None = Field(None, description="regular expression the body must match")
    timeout: Timeout = 300.0
    interval: Timeout = 2.0

    @model_validator(mode="after")
    def _one_target(self) -> Probe:
        if (self.http is None) == (self.tcp is None):
            raise ValueError("give exactly one of 'http' or 'tcp'")
        if self.body is not None:
            try:
                re.compile(self.body)
            except re.error as exc:
                raise ValueError(f"'body' is not a valid regular expression: {exc}") from None
        return self


# ---- Lab: connections ----------------------------------------------------------------


class ProxmoxAuth(enum.StrEnum):
    TOKEN = "token"  # user@realm!id=secret
    PASSWORD = "password"  # user + password ticket


class ProxmoxConnection(_Strict):
    """How to reach the Proxmox API. The secret itself comes from the environment or a file."""

    url: ApiUrl = Field(description="https://pve1.lan:8006")
    auth: ProxmoxAuth = ProxmoxAuth.TOKEN
    user: str = Field("root@pam", pattern=r"^[^@\s]+@[^@\s!]+$", description="owner of the token, or login user")
    token_id: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9._-]*$", description="token name after '!'")
    secret_env: str = Field("RECONCILER_PROXMOX_TOKEN", pattern=r"^[A-Z_][A-Z0-9_]*$")
    secret_file: str | None = None
    verify_tls: bool = True
    ca_file: str | None = None
    timeout: Timeout = 30.0

    @property
    def is_root_pam(self) -> bool:
        """Only a root@pam password login may set LXC devN and raw hostpciN (PVE checks the user name)."""
        return self.auth is ProxmoxAuth.PASSWORD and self.user == "root@pam"


class NvmlSettings(_Strict):
    enabled: bool = True
    library: NvmlLibrary | None = Field(None, description="path to libnvidia-ml.so.1 (WSL2, unusual installs)")
    inside: Name | None = Field(
        None,
        description="the Vm the reconciler runs in: its NVML sees that VM's passed-through GPUs at the VM's own "
        "PCI addresses, matched to the spec by UUID or by passthrough order",
    )


class EngineImages(_Strict):
    """Container images per engine; pin tags in the lab, not in code."""

    vllm: ImageRef = "vllm/vllm-openai:v0.11.0"
    llamacpp: ImageRef = "ghcr.io/ggml-org/llama.cpp:server-cuda"
    ollama: ImageRef = "ollama/ollama:0.12.6"
    gpu_query: ImageRef = Field(
        "ubuntu:24.04",
        description="image run for a moment on a Docker host whose GPUs the reconciler's own NVML does not see "
        "(passed through to a VM, in an LXC elsewhere), to read them with nvidia-smi: the NVIDIA container "
        "toolkit injects nvidia-smi, the image needs glibc and sh, and must already be on that host",
    )


class NotifyKind(enum.StrEnum):
    GENERIC = "generic"  # a JSON document POSTed to any URL
    NTFY = "ntfy"  # a message to an ntfy topic URL
    DISCORD = "discord"  # a Discord channel webhook


class NotifyEvent(enum.StrEnum):
    """What a pass may be notified for."""

    APPLIED = "applied"  # changes applied and healthy
    FAILED = "failed"  # invalid revision, refused, error, or a rollback that did not complete
    ROLLED_BACK = "rolled-back"  # a failed step or health check, undone
    DRIFT = "drift"  # live state differed from the applied revision


def http_url_problem(url: str) -> str | None:
    """Why `url` is not a usable http(s) URL for a notification, or None. Also checks `url_env` values."""
    if len(url) > 2048 or not url.isprintable() or any(char.isspace() for char in url):
        return "must be a URL of at most 2048 printable characters without spaces"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in {"http", "https"}:
        return "must start with http:// or https://"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials: name an environment variable in 'url_env' or 'token_env'"
    return None


class Notification(_Strict):
    """Where to tell people what a pass did. Secrets (a token, a Discord URL) come from the environment."""

    kind: NotifyKind
    url: str | None = Field(None, description="http(s) URL; for ntfy the topic URL (https://ntfy.sh/my-lab)")
    # Not the reconciler's own credentials: a spec must not send RECONCILER_PROXMOX_TOKEN to a URL it names.
    url_env: ReconcilerEnvName | None = Field(
        None, description="environment variable holding the URL (a Discord webhook URL)"
    )
    token_env: ReconcilerEnvName | None = Field(
        None, description="environment variable holding a bearer token (generic, ntfy)"
    )
    events: tuple[NotifyEvent, ...] = Field(tuple(NotifyEvent), min_length=1, description="what to notify")
    timeout: Duration = Field(10.0, description="per request; at most 60s")

    @model_validator(mode="after")
    def _check(self) -> Notification:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of 'url' or 'url_env'")
        if self.url is not None and (problem := http_url_problem(self.url)) is not None:
            raise ValueError(f"'url' {problem}")
        if self.kind is NotifyKind.DISCORD and (self.url is not None or self.token_env is not None):
            raise ValueError("a Discord webhook URL is its secret: put it in the environment and name it in 'url_env'")
        if not 0 < self.timeout <= 60:
            raise ValueError("'timeout' must be more than 0s and at most 60s")
        return self


class Lab(Resource):
    """The lab's connections and defaults. Exactly one per spec tree."""

    kind: Literal["Lab"] = "Lab"
    nodes: tuple[Name, ...] = Field((), description="Proxmox nodes guests and GPUs may name")
    proxmox: ProxmoxConnection | None = None
    nvml: NvmlSettings = NvmlSettings()
    images: EngineImages = EngineImages()
    owner_tag: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_.-]*$",
        description="tag/label marking what this lab owns; default: reconciler-<lab name>, so that two labs "
        "sharing a cluster never take each other's guests (before, the default was 'reconciler')",
    )
    max_deletes: int = Field(3, ge=0, description="refuse plans deleting more, unless --allow-delete")
    notifications: tuple[Notification, ...] = Field(
        (), max_length=16, description="webhooks, ntfy topics and Discord channels told about passes"
    )

    @property
    def owner(self) -> str:
        """The tag on this lab's guests and the label prefix on its containers: `owner_tag`, or one from its name."""
        return self.owner_tag or f"reconciler-{self.name}"


class DockerHost(Resource):
    """A Docker engine that is not a guest of the lab (the hypervisor itself, a workstation)."""

    kind: Literal["DockerHost"] = "DockerHost"
    endpoint: DockerEndpointUrl
    tls_verify: bool = False
    ca_file: str | None = None
    timeout: Timeout = 60.0
    node: Name | None = Field(None, description="Proxmox node it runs on, when it is the hypervisor")
    ssh: SshTarget | None = Field(None, description="where provisioning connects: user@host[:port]")
    provision: tuple[ProvisionStep, ...] = Field((), description="steps run over SSH, in order (issue 11)")


# ---- GPUs ------------------------------------------------------------------------------


class Gpu(Resource):
    """A physical GPU as the lab expects it. Identity is its PCI address and/or NVML UUID."""

    kind: Literal["Gpu"] = "Gpu"
    node: Name
    pci: str | None = Field(None, pattern=PCI_PATTERN, description="0000:01:00 (all functions) or 0000:01:00.0")
    uuid: str | None = Field(None, pattern=r"^(GPU|MIG)-[0-9a-fA-F-]+$")
    model: str | None = None
    vram: PositiveSize
    role: Name | None = None
    mapping: Name | None = Field(None, description="PCI resource mapping (cluster/mapping/pci) for VM passthrough")
    power_limit: int | None = Field(None, ge=1, le=100_000, description="watts; set through NVML (needs root)")
    persistence_mode: bool | None = Field(None, description="keep the driver loaded when idle; set through NVML")
    compute_mode: GpuComputeMode | None = Field(None, description="who may run compute work; set through NVML")
    reserve: Size = Field(0, description="VRAM kept free of models (the driver, a desktop, a margin)")

    @model_validator(mode="after")
    def _identity(self) -> Gpu:
        if self.pci is None and self.uuid is None:
            raise ValueError("a Gpu needs 'pci' or 'uuid' to be identified")
        return self

    @property
    def pci_function0(self) -> str | None:
        """The PCI address normalised to domain:bus:dev.0, the way NVML reports a device."""
        if self.pci is None:
            return None
        pci = self.pci.lower()
        if pci.count(":") == 1:
            pci = "0000:" + pci
        return pci if "." in pci else pci + ".0"


class GpuRole(Resource):
    """What a GPU is for; workloads may ask for a role instead of naming GPUs."""

    kind: Literal["GpuRole"] = "GpuRole"
    priority: int = Field(0, description="a higher-priority role may take a GPU from a lower one")
    sharing: Sharing = Sharing.EXCLUSIVE
    failover: tuple[Name, ...] = Field((), description="GPUs its work may move to when its own are taken or lost")
    prefer: tuple[Name, ...] = Field(
        (), description="GPUs its work uses before its own while they are free (not lost, taken or held exclusively)"
    )
    gpus: int = Field(1, ge=1, le=16, description="how many GPUs a workload of this role needs")
    min_vram: PositiveSize | None = None
    hold: Duration = Field(
        300.0, description="work moved off its own GPU moves back only once it has run this long where it is"
    )


class ExclusiveGroup(Resource):
    """A set of alternatives of which exactly one member is active; switching is one edit."""

    kind: Literal["ExclusiveGroup"] = "ExclusiveGroup"
    active: Name
    members: tuple[Name, ...] = Field((), description="declared members; when empty, taken from the resources")


# ---- guests ------------------------------------------------------------------------------


class Rootfs(_Strict):
    storage: StorageId = "local-lvm"
    size: DiskSize


class Mount(_Strict):
    """A bind mount from the host (LXC mpN, Docker volume)."""

    host: HostPath
    path: HostPath
    readonly: bool = False
    backup: bool | None = None


class Volume(_Strict):
    """A storage-backed LXC mount point (mpN with a storage volume)."""

    storage: StorageId
    size: DiskSize
    path: HostPath
    backup: bool | None = None


class LxcFeatures(_Strict):
    nesting: bool | None = None
    keyctl: bool | None = None
    fuse: bool | None = None
    mknod: bool | None = None
    mount: tuple[FsType, ...] | None = None


class Lxc(Resource):
    """A Proxmox container. `gpus` become devN entries (/dev/nvidia*), which only root@pam may set."""

    kind: Literal["Lxc"] = "Lxc"
    node: Name
    vmid: VmId
    template: OsTemplate = Field(description="storage:vztmpl/...")
    hostname: DnsName | None = None
    unprivileged: bool = True
    cores: int = Field(1, ge=1, le=8192)
    cpulimit: float | None = Field(None, ge=0, le=8192)
    memory: Memory = Field("512MiB", validate_default=True)
    swap: Size | None = None
    rootfs: Rootfs
    mounts: tuple[Mount, ...] = ()
    volumes: tuple[Volume, ...] = ()
    network: tuple[Network, ...] = ()
    nameserver: Nameservers | None = None
    features: LxcFeatures = LxcFeatures()
    gpus: tuple[Name, ...] = ()
    onboot: bool | None = None
    startup: Startup | None = None
    tags: tuple[str, ...] = ()
    state: PowerState = PowerState.RUNNING
    docker: DockerEndpoint | None = Field(None, description="this guest runs a Docker engine reached here")
    exclusive: GroupMembership | None = None
    ssh_keys: tuple[SshKey, ...] = Field((), description="root's authorized keys, set at creation")
    password_env: ReconcilerEnvName | None = Field(  # not the reconciler's own: it would be the guest's password
        None, pattern=r"^[A-Z_][A-Z0-9_]{0,127}$", description="environment variable holding root's password"
    )
    ssh: SshTarget | None = Field(None, description="where provisioning connects; default: the ssh:// docker endpoint")
    provision: tuple[ProvisionStep, ...] = Field((), description="steps run over SSH after the first start, in order")

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        return _check_tags(tags)


class PciPassthrough(_Strict):
    """One GPU passed through to a VM as hostpciN."""

    gpu: Name
    pcie: bool = True
    x_vga: bool = False
    rombar: bool | None = None
    all_functions: bool = Field(True, description="pass every function (GPU and its audio device)")


class Disk(_Strict):
    slot: str = Field(pattern=r"^(scsi|virtio|sata|ide)\d{1,2}$")
    storage: StorageId
    size: DiskSize
    ssd: bool | None = None
    discard: bool | None = None
    iothread: bool | None = None
    cache: Literal["none", "writeback", "writethrough", "directsync", "unsafe"] | None = None


class Vm(Resource):
    """A Proxmox virtual machine, with GPUs passed through as hostpciN (never recreated to add one)."""

    kind: Literal["Vm"] = "Vm"
    node: Name
    vmid: VmId
    cores: int = Field(1, ge=1, le=8192)
    sockets: int = Field(1, ge=1, le=16)
    numa: bool | None = None
    hugepages: Literal["any", "2", "1024"] | None = None
    cpu: CpuType | None = Field(None, description="CPU type, e.g. host")
    machine: str | None = Field(None, pattern=r"^(q35|pc|pc-i440fx-[\d.]+|pc-q35-[\d.]+)(\+pve\d+)?$")
    bios: Literal["seabios", "ovmf"] | None = None
    ostype: VmOsType | None = None
    memory: Memory
    balloon: Size | None = None
    disks: tuple[Disk, ...] = ()
    network: tuple[Network, ...] = ()
    gpus: tuple[PciPassthrough, ...] = ()
    agent: bool | None = None
    onboot: bool | None = None
    startup: Startup | None = None
    tags: tuple[str, ...] = ()
    state: PowerState = PowerState.RUNNING
    docker: DockerEndpoint | None = None
    exclusive: GroupMembership | None = None
    clone: Clone | None = Field(None, description="create the VM as a clone of a template")
    cloud_init: CloudInit | None = None
    efidisk0: EfiDisk | None = Field(None, description="OVMF variables volume (bios: ovmf)")
    tpmstate0: TpmState | None = Field(None, description="software TPM state volume")
    numa_nodes: tuple[NumaNode, ...] = Field((), description="guest NUMA nodes (numaN), pinned to host nodes")
    ssh: SshTarget | None = Field(None, description="where provisioning connects; default: the ssh:// docker endpoint")
    provision: tuple[ProvisionStep, ...] = Field((), description="steps run over SSH after the first start, in order")

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        return _check_tags(tags)


def _check_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    for tag in tags:
        if not re.fullmatch(r"[a-zA-Z0-9_][a-zA-Z0-9_.+-]*", tag):
            raise ValueError(f"invalid Proxmox tag {tag!r}")
    return tags


# ---- Docker workloads --------------------------------------------------------------------


class PortMapping(_Strict):
    """A published port. Shorthand: "8000", "8000:8000" or "0.0.0.0:8000:8000/tcp"."""

    host: Port
    container: Port
    bind: BindAddress = "0.0.0.0"
    protocol: Literal["tcp", "udp"] = "tcp"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"host": value, "container": value}
        if not isinstance(value, str):
            return value
        protocol = "tcp"
        text = value
        if "/" in text:
            text, protocol = text.rsplit("/", 1)
        parts = text.rsplit(":", 2)
        if not all(part.strip() for part in parts):
            raise ValueError(f"not a port mapping: {value!r}")
        if len(parts) == 1:
            return {"host": parts[0], "container": parts[0], "protocol": protocol}
        if len(parts) == 2:
            return {"host": parts[0], "container": parts[1], "protocol": protocol}
        return {"bind": parts[0], "host": parts[1], "container": parts[2], "protocol": protocol}


class ContainerHealth(_Strict):
    """Docker's own HEALTHCHECK for a container."""

    test: tuple[str, ...] = Field(description='["CMD", "curl", "-f", "http://localhost:8000/health"]')
    interval: Timeout = 30.0
    timeout: Timeout = 10.0
    retries: int = Field(3, ge=0)
    start_period: Duration = 0.0


class Workload(Resource):
    """What Containers and Models share: where they run, on which GPUs, with what footprint."""

    host: Name = Field(description="a DockerHost, or an Lxc/Vm that has 'docker'")
    gpus: tuple[Name, ...] = Field((), description="GPU names; handed over by NVML UUID")
    role: Name | None = Field(None, description="ask for GPUs by role instead of by name")
    vram: PositiveSize | None = Field(None, description="declared VRAM footprint per GPU")
    env: dict[EnvName, str] = {}
    secret_env: dict[EnvName, ReconcilerEnvName] = Field(
        {}, description="container variable -> environment variable holding the value"
    )
    volumes: tuple[Mount, ...] = ()
    restart: RestartPolicy = RestartPolicy.UNLESS_STOPPED
    state: PowerState = PowerState.RUNNING
    probe: Probe | None = Field(None, description="health probe the reconciler runs after a change")
    exclusive: GroupMembership | None = None
    labels: dict[str, str] = {}

    @model_validator(mode="after")
    def _gpus_or_role(self) -> Workload:
        if self.gpus and self.role:
            raise ValueError("give 'gpus' or 'role', not both")
        return self


class Container(Workload):
    """A plain Docker container (Plex, PostgreSQL, a router in front of the models)."""

    kind: Literal["Container"] = "Container"
    image: ImageRef
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    ports: tuple[PortMapping, ...] = ()
    devices: tuple[DevicePath, ...] = Field((), description="host devices, e.g. /dev/dri:/dev/dri")
    shm_size: PositiveSize | None = None
    ipc: Literal["host", "private", "shareable"] | None = None
    network_mode: NetworkMode | None = None
    healthcheck: ContainerHealth | None = None

    @field_validator("command", "entrypoint", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return tuple(value.split()) if isinstance(value, str) else value


class Model(Workload):
    """A model served by an engine; planned as the container its engine preset describes."""

    kind: Literal["Model"] = "Model"
    engine: Engine
    source: ModelSource = Field(description="model path on the host (vllm, llamacpp) or name (ollama)")
    served_name: str | None = Field(None, description="name clients ask for; defaults to the resource name")
    port: Port
    bind: BindAddress = "0.0.0.0"
    context: int | None = Field(None, ge=256, description="context length in tokens")
    quantization: str | None = None
    args: dict[ArgName, str | int | float | bool] = Field({}, description="engine flags, without the leading '--'")
    image: ImageRef | None = Field(None, description="overrides the lab's image for this engine")
    models_dir: HostPath | None = Field(
        None,
        description="host folder of model files, mounted read-only at the same path (Ollama: its store)",
    )


Document: TypeAlias = Lab | DockerHost | Gpu | GpuRole | ExclusiveGroup | Lxc | Vm | Container | Model

KINDS: dict[str, type[Resource]] = {
    cls.model_fields["kind"].default: cls
    for cls in (Lab, DockerHost, Gpu, GpuRole, ExclusiveGroup, Lxc, Vm, Container, Model)
}

"""Checks across documents: what one model cannot see on its own.

Called by `load_and_validate` after the loader. Every check adds diagnostics
and goes on; nothing here raises. Checks that depend on what runs at the same
time (ports, GPU sharing, VRAM) are made for every configuration the spec can
be switched into: the active members of all exclusive groups, and each other
member of each group in turn.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.spec.access_checks import check_access
from reconciler.spec.diagnostics import Diagnostic, Position, Severity, cap_per_file
from reconciler.spec.files import attach_files, tree_reader
from reconciler.spec.loader import LoadResult, load_tree
from reconciler.spec.models import (
    Container,
    DockerHost,
    Engine,
    ExclusiveGroup,
    Gpu,
    GpuRole,
    Lxc,
    Model,
    PowerState,
    Resource,
    Sharing,
    Vm,
    Workload,
)
from reconciler.spec.placement import member_of, place_role
from reconciler.spec.state import DesiredState

__all__ = ["load_and_validate", "validate"]

DEFAULT_VLLM_UTILIZATION = 0.9


def load_and_validate(root: Path) -> LoadResult:
    """Load a spec tree and, when it loaded cleanly, check it across documents."""
    loaded = attach_files(load_tree(root), tree_reader(root))
    if not loaded.ok:
        return loaded
    return LoadResult(loaded.state, (*loaded.diagnostics, *validate(loaded.state)))


def validate(state: DesiredState) -> tuple[Diagnostic, ...]:
    checker = _Checker(state)
    checker.run()
    checker.found.extend(check_access(state))  # issue 11: guest access and provisioning
    unique: dict[tuple[object, ...], Diagnostic] = {}
    for diagnostic in checker.found:
        key = (diagnostic.position, diagnostic.kind, diagnostic.name, diagnostic.message)
        unique.setdefault(key, diagnostic)
    return cap_per_file(sorted(unique.values(), key=_sort_key))


def _sort_key(d: Diagnostic) -> tuple[str, int, int, str]:
    p = d.position
    return (p.file, p.line, p.column, d.message) if p else ("", 0, 0, d.message)


@dataclass
class _Diagnose:
    """The spec indexed by name, and how a check reports: every problem is added, nothing raises."""

    state: DesiredState
    found: list[Diagnostic] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lab = self.state.lab
        self.gpus = {g.name: g for g in self.state.of(Gpu)}
        self.roles = {r.name: r for r in self.state.of(GpuRole)}
        self.groups = {g.name: g for g in self.state.of(ExclusiveGroup)}
        self.hosts = self.state.docker_hosts()
        self.guests: list[Lxc | Vm] = list(self.state.guests())
        self.workloads: list[Workload] = list(self.state.workloads())

    def error(self, resource: Resource, message: str, *path: str | int, hint: str | None = None) -> None:
        self._add(Severity.ERROR, resource, message, path, hint)

    def warning(self, resource: Resource, message: str, *path: str | int, hint: str | None = None) -> None:
        self._add(Severity.WARNING, resource, message, path, hint)

    def _add(
        self, severity: Severity, resource: Resource, message: str, path: tuple[str | int, ...], hint: str | None
    ) -> None:
        position: Position | None = self.state.position(resource, *path)
        self.found.append(Diagnostic(severity, message, position, resource.kind, resource.name, hint))

    def _missing(self, resource: Resource, what: str, name: str, known: Mapping[str, object], *path: str | int) -> None:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else (f"known: {', '.join(sorted(known))}" if known else f"no {what} is declared")
        )
        self.error(resource, f"{what} {name!r} is not declared", *path, hint=hint)

    def _gpus_of(self, workload: Workload) -> tuple[str, ...]:
        if workload.gpus:
            return workload.gpus
        if workload.role is not None and workload.role in self.roles:
            return place_role(self.roles[workload.role], self.gpus.values())
        return ()


class _ConcurrentChecks(_Diagnose):
    """What runs at the same time: ports, guests under workloads, GPU passthrough, sharing and VRAM."""

    def _scenarios(self) -> Iterator[dict[str, str]]:
        """Active members of every group, then each other member of each group in turn."""
        base = {name: group.active for name, group in self.groups.items()}
        yield base
        members: dict[str, set[str]] = defaultdict(set)
        for resource in (*self.guests, *self.workloads):
            if resource.exclusive is not None and resource.exclusive.group in self.groups:
                members[resource.exclusive.group].add(member_of(resource))
        for group, names in sorted(members.items()):
            for member in sorted(names - {base[group]}):
                yield {**base, group: member}

    def _runs(self, resource: Lxc | Vm | Workload, scenario: Mapping[str, str]) -> bool:
        if resource.state is not PowerState.RUNNING:
            return False
        group = resource.exclusive
        return group is None or group.group not in scenario or scenario[group.group] == member_of(resource)

    def _concurrent(self, scenario: Mapping[str, str]) -> None:
        running_guests = [g for g in self.guests if self._runs(g, scenario)]
        running = [w for w in self.workloads if self._runs(w, scenario)]
        self._ports(running)
        self._hosts_run(running_guests, running, scenario)
        self._passthrough(running_guests, running)
        self._gpu_sharing(running)

    def _ports(self, running: list[Workload]) -> None:
        """Two running workloads may not publish one port on one host (0.0.0.0 overlaps every address)."""
        published: dict[tuple[str, str, int], list[tuple[str, Workload]]] = defaultdict(list)
        for workload in running:
            for bind, port, protocol, path in _published(workload):
                taken = published[(workload.host, protocol, port)]
                for other_bind, other in taken:
                    if other is not workload and _overlap(bind, other_bind):
                        self.error(
                            workload,
                            f"port {port}/{protocol} on host {workload.host!r} is also published by {other.ref}",
                            *path,
                            hint="give one of them another port, or put them in an exclusive group",
                        )
                        break
                taken.append((bind, workload))

    def _hosts_run(self, guests: list[Lxc | Vm], running: list[Workload], scenario: Mapping[str, str]) -> None:
        """A running workload needs its guest running in the same configuration."""
        up = {g.name for g in guests}
        for workload in running:
            host = self.hosts.get(workload.host)
            if not isinstance(host, Lxc | Vm) or host.name in up:
                continue
            if host.state is PowerState.STOPPED:
                why = "which is declared stopped"
            else:
                group = host.exclusive.group if host.exclusive else ""
                why = f"which is stopped while {group!r} has {scenario.get(group)!r} active"
            self.error(
                workload,
                f"runs on {host.ref}, {why}",
                "host",
                hint="stop the workload too (put it in the same exclusive group), or move it",
            )

    def _passthrough(self, guests: list[Lxc | Vm], running: list[Workload]) -> None:
        owner: dict[str, Vm] = {}
        for vm in (g for g in guests if isinstance(g, Vm)):
            for index, passthrough in enumerate(vm.gpus):
                first = owner.setdefault(passthrough.gpu, vm)
                if first is not vm:
                    self.error(
                        vm,
                        f"Gpu {passthrough.gpu!r} is passed through to {first.ref}, which runs at the same time",
                        "gpus",
                        index,
                        hint="stop one, or put both in an exclusive group",
                    )
        for lxc in (g for g in guests if isinstance(g, Lxc)):
            for index, name in enumerate(lxc.gpus):
                if name in owner:
                    self.error(
                        lxc,
                        f"Gpu {name!r} is passed through to {owner[name].ref}, which runs at the same time",
                        "gpus",
                        index,
                        hint="a GPU passed through to a VM is gone from the host",
                    )
        for workload in running:
            for index, name in enumerate(self._gpus_of(workload)):
                holder = owner.get(name)
                if holder is not None and workload.host != holder.name:
                    self.error(
                        workload,
                        f"Gpu {name!r} is passed through to {holder.ref}, which runs at the same time",
                        *(("gpus", index) if workload.gpus else ("role",)),
                    )

    def _gpu_sharing(self, running: list[Workload]) -> None:
        users: dict[str, list[Workload]] = defaultdict(list)
        for workload in running:
            for name in self._gpus_of(workload):
                users[name].append(workload)
        for name, on_gpu in users.items():
            gpu = self.gpus.get(name)
            if gpu is None:
                continue
            role = self.roles.get(gpu.role) if gpu.role else None
            if role is not None and role.sharing is Sharing.EXCLUSIVE and len(on_gpu) > 1:
                names = ", ".join(w.ref for w in on_gpu)
                self.error(
                    on_gpu[1],
                    f"Gpu {name!r} has exclusive role {role.name!r} but is used by {names} at the same time",
                    "gpus",
                    hint="make the role 'sharing: shared', or put them in an exclusive group",
                )
            footprint = 0
            for workload in on_gpu:
                footprint += _vram_of(workload, gpu)
            if footprint > gpu.vram:
                names = ", ".join(w.ref for w in on_gpu)
                self.error(
                    on_gpu[-1],
                    f"VRAM on Gpu {name!r} is over-committed: {_gib(footprint)} declared by {names}, "
                    f"the GPU has {_gib(gpu.vram)}",
                    "vram" if on_gpu[-1].vram else "gpus",
                    hint="lower 'vram' or gpu_memory_utilization, or move a workload",
                )


class _Checker(_ConcurrentChecks):
    """Every check across documents, in the order `run` makes them."""

    def run(self) -> None:
        self._ignore_fields()
        self._vmids()
        self._nodes()
        self._gpu_references()
        self._host_references()
        self._groups()
        self._root_pam()
        self._within_resources()
        for scenario in self._scenarios():
            self._concurrent(scenario)

    # ---- identity and references ------------------------------------------------------

    def _ignore_fields(self) -> None:
        for resource in self.state.resources:
            fields = set(type(resource).model_fields) - {"kind", "name"}
            for index, name in enumerate(resource.ignore):
                if name.split(".")[0] not in fields:
                    self._missing(resource, "field", name, dict.fromkeys(fields), "ignore", index)

    def _vmids(self) -> None:
        seen: dict[int, Lxc | Vm] = {}
        for guest in self.guests:
            first = seen.setdefault(guest.vmid, guest)
            if first is not guest:
                self.error(
                    guest,
                    f"vmid {guest.vmid} is also used by {first.ref}",
                    "vmid",
                    hint="vmids are unique in a cluster",
                )

    def _nodes(self) -> None:
        nodes = set(self.lab.nodes)
        placed: list[tuple[Resource, str | None]] = [(g, g.node) for g in self.guests]
        placed += [(g, g.node) for g in self.gpus.values()]
        placed += [(h, h.node) for h in self.state.of(DockerHost)]
        for resource, node in placed:
            if node is None:
                continue
            if not nodes:
                self.error(
                    resource,
                    f"node {node!r} is not declared",
                    "node",
                    hint="list the Proxmox nodes in the Lab's 'nodes'",
                )
            elif node not in nodes:
                self._missing(resource, "node", node, dict.fromkeys(nodes), "node")
        if self.guests and self.lab.proxmox is None:
            self.error(
                self.guests[0],
                "guests are declared but the Lab has no 'proxmox' connection",
                hint="add proxmox: {url: ...} to the Lab",
            )

    def _gpu_references(self) -> None:
        for gpu in self.gpus.values():
            if gpu.role is not None and gpu.role not in self.roles:
                self._missing(gpu, "GpuRole", gpu.role, self.roles, "role")
        for role in self.roles.values():
            for index, name in enumerate(role.failover):
                if name not in self.gpus:
                    # A warning: one role layout serves several hardware phases; placement skips absent GPUs.
                    self.warning(role, f"failover Gpu {name!r} is not declared; it is skipped", "failover", index)
        self._unique_identity("pci", lambda g: (g.node, g.pci_function0) if g.pci else None)
        self._unique_identity("uuid", lambda g: g.uuid.lower() if g.uuid else None)
        for lxc in self.state.of(Lxc):
            for index, name in enumerate(lxc.gpus):
                given = self.gpus.get(name)
                if given is None:
                    self._missing(lxc, "Gpu", name, self.gpus, "gpus", index)
                elif given.node != lxc.node:
                    self.error(lxc, f"Gpu {name!r} is in node {given.node!r}, not {lxc.node!r}", "gpus", index)
        for vm in self.state.of(Vm):
            seen: set[str] = set()
            for index, passthrough in enumerate(vm.gpus):
                passed = self.gpus.get(passthrough.gpu)
                if passthrough.gpu in seen:
                    self.error(vm, f"Gpu {passthrough.gpu!r} is passed through twice", "gpus", index)
                seen.add(passthrough.gpu)
                if passed is None:
                    self._missing(vm, "Gpu", passthrough.gpu, self.gpus, "gpus", index, "gpu")
                elif passed.node != vm.node:
                    self.error(vm, f"Gpu {passed.name!r} is in node {passed.node!r}, not {vm.node!r}", "gpus", index)
                elif passed.pci is None and passed.mapping is None:
                    self.error(
                        vm,
                        f"Gpu {passed.name!r} has neither 'pci' nor 'mapping'",
                        "gpus",
                        index,
                        hint="passthrough needs a PCI address or a PCI resource mapping",
                    )
        for workload in self.workloads:
            for index, name in enumerate(workload.gpus):
                if name not in self.gpus:
                    self._missing(workload, "Gpu", name, self.gpus, "gpus", index)
            if workload.role is not None:
                wanted = self.roles.get(workload.role)
                if wanted is None:
                    self._missing(workload, "GpuRole", workload.role, self.roles, "role")
                elif not place_role(wanted, self.gpus.values()):
                    self.error(
                        workload,
                        f"no Gpu can serve role {wanted.name!r}",
                        "role",
                        hint="give a Gpu this role, or list failover GPUs in the role",
                    )

    def _unique_identity(self, what: str, key_of: Callable[[Gpu], object]) -> None:
        seen: dict[object, Gpu] = {}
        for gpu in self.gpus.values():
            key = key_of(gpu)
            if key is None:
                continue
            first = seen.setdefault(key, gpu)
            if first is not gpu:
                self.error(gpu, f"same {what} as Gpu {first.name!r}", what, hint="each Gpu is one physical device")

    def _host_references(self) -> None:
        for workload in self.workloads:
            host = self.hosts.get(workload.host)
            if host is None:
                self._missing(workload, "Docker host", workload.host, self.hosts, "host")
                continue
            for index, name in enumerate(self._gpus_of(workload)):
                gpu = self.gpus.get(name)
                if gpu is not None and not self._host_reaches(host, gpu):
                    where = ("gpus", index) if workload.gpus else ("role",)
                    self.error(
                        workload,
                        f"Gpu {name!r} is not available on host {host.name!r}",
                        *where,
                        hint=self._reach_hint(host),
                    )
            if isinstance(workload, Model):
                self._model(workload)
            _secrets(self, workload)

    def _host_reaches(self, host: DockerHost | Lxc | Vm, gpu: Gpu) -> bool:
        if isinstance(host, Lxc):
            return gpu.name in host.gpus
        if isinstance(host, Vm):
            return any(p.gpu == gpu.name for p in host.gpus)
        return host.node is None or host.node == gpu.node

    @staticmethod
    def _reach_hint(host: DockerHost | Lxc | Vm) -> str:
        if isinstance(host, Lxc):
            return "add the Gpu to the Lxc's 'gpus'"
        if isinstance(host, Vm):
            return "pass the Gpu through to the Vm ('gpus')"
        return "the Docker host must be on the Gpu's node"

    def _model(self, model: Model) -> None:
        if model.engine is Engine.LLAMACPP and not model.source.endswith(".gguf"):
            self.warning(model, "llama.cpp loads a .gguf file; 'source' does not end in .gguf", "source")
        if model.engine in (Engine.VLLM, Engine.LLAMACPP) and not model.source.startswith("/"):
            self.error(model, f"{model.engine} needs 'source' to be an absolute path on the host", "source")
        for key in model.args:
            if key.startswith("-"):
                self.error(model, f"engine argument {key!r} must be written without leading dashes", "args", key)

    def _groups(self) -> None:
        members: dict[str, set[str]] = defaultdict(set)
        for resource in (*self.guests, *self.workloads):
            if resource.exclusive is None:
                continue
            if resource.exclusive.group not in self.groups:
                self._missing(resource, "ExclusiveGroup", resource.exclusive.group, self.groups, "exclusive", "group")
                continue
            members[resource.exclusive.group].add(member_of(resource))
        for group in self.groups.values():
            found = members.get(group.name, set())
            for index, declared in enumerate(group.members):
                if declared not in found:
                    self.error(group, f"member {declared!r} has no resources", "members", index)
            if not found:
                self.error(group, "the group has no members", hint="set 'exclusive: {group: ...}' on its resources")
            elif group.active not in found:
                close = difflib.get_close_matches(group.active, sorted(found), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"members: {', '.join(sorted(found))}"
                self.error(group, f"active member {group.active!r} is not a member of the group", "active", hint=hint)

    def _root_pam(self) -> None:
        connection = self.lab.proxmox
        if connection is None or connection.is_root_pam:
            return
        who = f"{connection.user} with an API token" if connection.auth == "token" else connection.user
        for lxc in self.state.of(Lxc):
            if lxc.gpus:
                self.error(
                    lxc,
                    f"GPU device entries (devN) can only be set by root@pam; the lab logs in as {who}",
                    "gpus",
                    hint="use auth: password with user root@pam for this lab",
                )
        for vm in self.state.of(Vm):
            for index, passthrough in enumerate(vm.gpus):
                gpu = self.gpus.get(passthrough.gpu)
                if gpu is not None and gpu.mapping is None:
                    self.error(
                        vm,
                        f"raw PCI passthrough of {gpu.name!r} can only be set by root@pam; the lab logs in as {who}",
                        "gpus",
                        index,
                        hint=f"give Gpu {gpu.name!r} a PCI resource 'mapping' (Mapping.Use), or log in as root@pam",
                    )

    def _within_resources(self) -> None:
        for lxc in self.state.of(Lxc):
            _unique(self, lxc, "mounts", [m.path for m in lxc.mounts] + [v.path for v in lxc.volumes], "mount path")
            _unique(self, lxc, "network", [n.name for n in lxc.network], "interface")
            if len(lxc.mounts) + len(lxc.volumes) > 256:
                self.error(lxc, "Proxmox allows at most 256 mount points (mp0..mp255)", "mounts")
        for vm in self.state.of(Vm):
            _unique(self, vm, "disks", [d.slot for d in vm.disks], "disk slot")
            _unique(self, vm, "network", [n.name for n in vm.network], "interface")
            if vm.hugepages and not vm.numa:
                self.warning(vm, "hugepages without numa: Proxmox needs NUMA enabled for hugepages", "hugepages")
        for container in self.state.of(Container):
            _unique(self, container, "volumes", [v.path for v in container.volumes], "volume path")
            _own_ports(self, container)
        _ownership_marks(self)


def _secrets(checker: _Checker, workload: Workload) -> None:
    """A variable is plain or secret, not both; no workload is handed the lab's own Proxmox secret."""
    for key in sorted(set(workload.env) & set(workload.secret_env)):
        checker.error(workload, f"{key!r} is in both env and secret_env", "secret_env", key)
    own = checker.lab.proxmox.secret_env if checker.lab.proxmox else None
    for key, variable in workload.secret_env.items():
        if variable == own:
            checker.error(
                workload,
                f"secret_env {key!r} names {variable!r}, which holds the lab's Proxmox credentials",
                "secret_env",
                key,
                hint="give the workload its own variable",
            )


# A spec that wrote another lab's mark on its resources would make that lab see an orphan to adopt and delete.
_RESERVED_MARK = re.compile(r"^reconciler(?:$|[-.])", re.IGNORECASE)


def _ownership_marks(checker: _Checker) -> None:
    """Ownership tags and labels are the reconciler's to write: a spec may not set any, its lab's or another's."""
    owner = checker.lab.owner.lower()

    def reserved(mark: str) -> bool:
        low = mark.lower()
        return bool(_RESERVED_MARK.match(low)) or low == owner or low.startswith(owner + ".")

    hint = "ownership marks are written by the reconciler itself; use another name"
    for guest in checker.guests:
        for index, tag in enumerate(guest.tags):
            if reserved(tag):
                checker.error(guest, f"tag {tag!r} is an ownership mark", "tags", index, hint=hint)
    for workload in checker.workloads:
        for key in workload.labels:
            if reserved(key):
                checker.error(workload, f"label {key!r} is an ownership mark", "labels", key, hint=hint)


def _own_ports(checker: _Checker, container: Container) -> None:
    """Docker refuses a container that publishes one host port twice (0.0.0.0 overlaps every address)."""
    seen: list[tuple[str, int, str]] = []
    for index, port in enumerate(container.ports):
        if any(p == port.host and q == port.protocol and _overlap(port.bind, b) for b, p, q in seen):
            checker.error(
                container,
                f"host port {port.host}/{port.protocol} is published twice",
                "ports",
                index,
                hint="publish each host port once",
            )
        seen.append((port.bind, port.host, port.protocol))


def _unique(checker: _Checker, resource: Resource, field_name: str, values: list[str], what: str) -> None:
    seen: set[str] = set()
    for index, value in enumerate(values):
        if value in seen:
            checker.error(resource, f"{what} {value!r} appears twice", field_name, index)
        seen.add(value)


def _published(workload: Workload) -> Iterator[tuple[str, int, str, tuple[str | int, ...]]]:
    if isinstance(workload, Model):
        yield workload.bind, workload.port, "tcp", ("port",)
    elif isinstance(workload, Container) and workload.network_mode != "host":
        for index, port in enumerate(workload.ports):
            yield port.bind, port.host, port.protocol, ("ports", index)


def _overlap(bind: str, other: str) -> bool:
    """Two bind addresses clash when equal, or when either is 0.0.0.0 or :: (Docker binds both for either)."""
    try:
        first, second = ipaddress.ip_address(bind), ipaddress.ip_address(other)
    except ValueError:
        return bind == other
    return first == second or first.is_unspecified or second.is_unspecified


def _vram_of(workload: Workload, gpu: Gpu) -> int:
    """Declared footprint; for vLLM, what gpu_memory_utilization reserves; otherwise unknown (0)."""
    if workload.vram is not None:
        return workload.vram
    if isinstance(workload, Model) and workload.engine is Engine.VLLM:
        utilization = workload.args.get("gpu_memory_utilization", DEFAULT_VLLM_UTILIZATION)
        if isinstance(utilization, int | float) and not isinstance(utilization, bool):
            return int(gpu.vram * float(utilization))
    return 0


def _gib(size: int) -> str:
    return f"{size / 1024**3:.1f}GiB"

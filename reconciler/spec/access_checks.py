"""Checks across fields and documents for guest access and provisioning (issue 11).

Called by `validate()` beside its own checks; pure, adds diagnostics and never raises. What one
model sees alone (key syntax, addresses, paths) is checked in `spec/access.py`; here are the rules
that need the whole guest or the lab: a guest that provisions must be reachable, the NVIDIA
userspace step belongs to an LXC sharing the host's driver, `numaN` must add up to the VM, and so on.
"""

from __future__ import annotations

from collections.abc import Iterator

from reconciler.spec.access import BuiltinStep, SshTarget, ssh_target_from_endpoint
from reconciler.spec.diagnostics import Diagnostic, Severity
from reconciler.spec.models import DockerHost, Lxc, Resource, Vm
from reconciler.spec.state import DesiredState

__all__ = ["check_access", "ssh_target_of"]

MIB = 1024 * 1024


def ssh_target_of(resource: Lxc | Vm | DockerHost) -> SshTarget | None:
    """Where provisioning connects: the `ssh` field, else the host of an ssh:// Docker endpoint."""
    if resource.ssh is not None:
        return resource.ssh
    endpoint = (
        resource.endpoint
        if isinstance(resource, DockerHost)
        else (resource.docker.endpoint if resource.docker else None)
    )
    return ssh_target_from_endpoint(endpoint) if endpoint else None


def check_access(state: DesiredState) -> tuple[Diagnostic, ...]:
    return tuple(_checks(state))


def _diagnostic(
    state: DesiredState,
    severity: Severity,
    resource: Resource,
    message: str,
    *where: str | int,
    hint: str | None = None,
) -> Diagnostic:
    return Diagnostic(severity, message, state.position(resource, *where), resource.kind, resource.name, hint)


def _checks(state: DesiredState) -> Iterator[Diagnostic]:
    nodes = set(state.lab.nodes)
    for resource in state.resources:
        if isinstance(resource, Lxc | Vm | DockerHost):
            yield from _provision(state, resource)
        if isinstance(resource, Vm):
            yield from _vm(state, resource, nodes)


def _provision(state: DesiredState, resource: Lxc | Vm | DockerHost) -> Iterator[Diagnostic]:
    if not resource.provision:
        return
    if ssh_target_of(resource) is None:
        yield _diagnostic(
            state, Severity.ERROR, resource, "provisioning needs an SSH target", "provision",
            hint="set 'ssh: user@host[:port]', or a docker endpoint ssh://user@host",
        )  # fmt: skip
    seen: set[str] = set()
    for index, step in enumerate(resource.provision):
        if step.key in seen:
            yield _diagnostic(
                state, Severity.ERROR, resource, f"provisioning step {step.key!r} appears twice", "provision", index,
                hint="give one of them a 'name'",
            )  # fmt: skip
        seen.add(step.key)
        if step.builtin is not BuiltinStep.NVIDIA_USERSPACE:
            continue
        if not isinstance(resource, Lxc):
            yield _diagnostic(
                state, Severity.ERROR, resource,
                "nvidia-userspace installs the host driver's userspace into an LXC; this guest has its own kernel",
                "provision", index, hint="install the full NVIDIA driver in a VM with a script step",
            )  # fmt: skip
        elif not resource.gpus:
            yield _diagnostic(
                state, Severity.WARNING, resource, "nvidia-userspace on an LXC without 'gpus' has no GPU to use",
                "provision", index,
            )  # fmt: skip


def _vm(state: DesiredState, vm: Vm, nodes: set[str]) -> Iterator[Diagnostic]:
    if vm.cloud_init is not None and len(vm.cloud_init.ipconfig) > len(vm.network):
        yield _diagnostic(
            state, Severity.ERROR, vm,
            f"cloud_init has {len(vm.cloud_init.ipconfig)} ipconfig entries for {len(vm.network)} network entries",
            "cloud_init", "ipconfig", hint="ipconfigN configures the Nth entry of 'network'",
        )  # fmt: skip
    if vm.efidisk0 is not None and vm.bios is not None and vm.bios != "ovmf":
        yield _diagnostic(state, Severity.WARNING, vm, "efidisk0 is used by OVMF only; bios is seabios", "efidisk0")
    if vm.clone is not None:
        if vm.clone.template == vm.vmid:
            yield _diagnostic(state, Severity.ERROR, vm, "a VM cannot be cloned from itself", "clone", "template")
        if vm.clone.node is not None and nodes and vm.clone.node not in nodes:
            yield _diagnostic(state, Severity.ERROR, vm, f"node {vm.clone.node!r} is not declared", "clone", "node")
    if vm.numa_nodes:
        yield from _numa(state, vm)


def _numa(state: DesiredState, vm: Vm) -> Iterator[Diagnostic]:
    if not vm.numa:
        yield _diagnostic(state, Severity.ERROR, vm, "numa_nodes need 'numa: true'", "numa_nodes")
    if len(vm.numa_nodes) > 8:
        yield _diagnostic(state, Severity.ERROR, vm, "Proxmox allows at most 8 NUMA nodes (numa0..numa7)", "numa_nodes")
    total = sum(node.memory for node in vm.numa_nodes)
    if total != vm.memory:
        yield _diagnostic(
            state, Severity.ERROR, vm,
            f"numa_nodes hold {total // MIB} MiB but the VM has {vm.memory // MIB} MiB",
            "numa_nodes", hint="Proxmox needs the NUMA nodes' memory to add up to the VM's",
        )  # fmt: skip
    vcpus = vm.cores * vm.sockets
    seen: set[int] = set()
    for index, node in enumerate(vm.numa_nodes):
        for part in node.cpus.split(";"):
            low, _, high = part.partition("-")
            ids = set(range(int(low), int(high or low) + 1))
            if max(ids) >= vcpus:
                yield _diagnostic(
                    state, Severity.ERROR, vm, f"CPU {max(ids)} does not exist: the VM has {vcpus} vCPUs",
                    "numa_nodes", index, "cpus",
                )  # fmt: skip
            if ids & seen:
                yield _diagnostic(
                    state, Severity.ERROR, vm, f"CPUs {part} are in two NUMA nodes", "numa_nodes", index, "cpus"
                )
            seen |= ids

"""`make bench`: speed figures for observe and plan. Prints numbers; asserts nothing.

1. The pure planner on 2,000 synthetic guests (goal: under 1 s), in the steady
   state (live equals spec: the common pass) and from an empty lab.
2. Observe + plan for a lab of 500 guests and 200 containers, Proxmox served
   by fakepve over HTTPS with 10 ms of added latency per request, driven by
   the real proxmoxer; containers from the in-memory Docker with the same
   latency per call (a real engine would spend the run creating 200
   containers). Goal for Proxmox requests: one inventory read plus one config
   read per guest (plus a fixed few: version, nodes, PCI devices, mappings).
3. `validate` on hostile spec trees under 10 MB (goal: each validated or
   refused in under 2 s): see benchmarks/spec_limits.py.
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from benchmarks.spec_limits import bench_spec_limits
from reconciler.backends.memory import MemoryDocker, MemoryProxmox
from reconciler.backends.proxmox import ProxmoxBackend, settings_from
from reconciler.engine.observe import Readers, observe
from reconciler.planning.container_run import ContainerRun
from reconciler.planning.intents import GuestIntent
from reconciler.planning.observed import DockerObservation, Observed
from reconciler.planning.planner import make_plan
from reconciler.spec.models import Container, DockerHost, Lab, Lxc, ProxmoxConnection
from reconciler.spec.state import DesiredState

LATENCY = 0.010


def synthetic_lab(guests: int, containers: int) -> DesiredState:
    lab = Lab(
        name="bench",
        nodes=("pve1", "pve2"),
        proxmox=ProxmoxConnection(url="https://127.0.0.1:8006", auth="password", user="root@pam"),
    )
    resources: list[Any] = [lab, DockerHost(name="ws", endpoint="unix:///bench.sock")]
    for i in range(guests):
        resources.append(
            Lxc(
                name=f"ct{i}",
                node=f"pve{1 + i % 2}",
                vmid=1000 + i,
                template="local:vztmpl/debian-12.tar.zst",
                cores=2,
                memory="2GiB",
                swap="512MiB",
                rootfs={"storage": "local-lvm", "size": "8GiB"},
                network=({"name": "eth0", "bridge": "vmbr0", "ip": "dhcp", "vlan": 110},),
                features={"nesting": True},
                tags=("bench", f"group{i % 7}"),
                mounts=({"host": "/tank/data", "path": "/data", "readonly": True},),
            )
        )
    for i in range(containers):
        resources.append(
            Container(
                name=f"app{i}",
                host="ws",
                image=f"registry.lan/app:{i % 5}",
                env={"MODE": "bench", "INDEX": str(i)},
                ports=(f"{20000 + i}:80",),
            )
        )
    return DesiredState(tuple(resources), revision="bench")


def applied_memory_lab(desired: DesiredState) -> tuple[MemoryProxmox, MemoryDocker]:
    """Live state equal to the spec, stored the way PVE and Docker store it."""
    proxmox = MemoryProxmox(desired.lab.nodes)
    docker = MemoryDocker(("ws",), owner_label=desired.lab.owner)
    plan = make_plan(desired, Observed(proxmox=proxmox.observe(), docker=docker.observe()))
    for change in plan.changes:
        after = change.after
        match after:
            case GuestIntent():
                proxmox.create_lxc(after.node, after.vmid, config=after.config)
                proxmox.start(after.kind, after.node, after.vmid)
            case ContainerRun():
                docker.create_container("ws", after)
                docker.start_container("ws", after.name)
            case None:
                pass
    return proxmox, docker


def bench_planner(guests: int) -> None:
    desired = synthetic_lab(guests, 0)
    proxmox, docker = applied_memory_lab(desired)
    steady = Observed(proxmox=proxmox.observe(), docker=docker.observe())
    empty = Observed(proxmox=MemoryProxmox(desired.lab.nodes).observe(), docker={"ws": DockerObservation("ws", True)})
    for label, observed in (("steady state (no changes)", steady), ("from an empty lab", empty)):
        best = min(_timed(lambda o=observed: make_plan(desired, o)) for _ in range(3))
        plan = make_plan(desired, observed)
        print(f"planner, {guests} guests, {label}: {best * 1000:.0f} ms (best of 3), {len(plan.changes)} changes")


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class SlowDocker:
    """The in-memory Docker with LATENCY per list and per inspect, as the real backend pays them."""

    def __init__(self, docker: MemoryDocker) -> None:
        self.docker = docker

    def observe(
        self, names_of_interest: Collection[str] | Mapping[str, Collection[str]] = ()
    ) -> dict[str, DockerObservation]:
        seen = self.docker.observe(names_of_interest)
        inspects = sum(len(o.containers) for o in seen.values())
        time.sleep(LATENCY * (1 + inspects / 8))  # one list, then inspects on 8 threads, as DockerBackend does
        return seen


def bench_fakepve(guests: int, containers: int) -> None:
    try:
        from tests.support.fakepve import PASSWORD, USER, LabPve, PveServer, _openssl_pki
    except ImportError as exc:
        print(f"observe + plan against fakepve: skipped ({exc})")
        return
    desired = synthetic_lab(guests, containers)
    memory, docker = applied_memory_lab(desired)
    with tempfile.TemporaryDirectory() as scratch:
        pki = _openssl_pki(Path(scratch))
        pve = LabPve(user=USER, password=PASSWORD, host="127.0.0.1", port=0)
        pve.time_scale = 1
        for guest in memory.guests.values():
            pve.add_ct(
                guest.vmid,
                name=guest.config.get("hostname"),
                node=guest.node,
                status=guest.status,
                config=dict(guest.config),
            )
        server = PveServer(pve, pki)
        try:
            env = {**server.env("password")}
            backend = ProxmoxBackend(settings_from(desired.lab.proxmox, env))
            readers = Readers(proxmox=backend, docker=SlowDocker(docker), nvml=None)
            observe(desired, readers)  # log in once, as a long-running loop would have
            server.clear_requests()
            server.call(pve.slow_network, LATENCY)
            start = time.perf_counter()
            observed = observe(desired, readers)
            observed_at = time.perf_counter()
            plan = make_plan(desired, observed)
            done = time.perf_counter()
            requests = server.requests
            server.call(pve.slow_network, 0.0)
            backend.close()
        finally:
            server.stop()
    reads = {path.split("/")[-1] for _, path in requests if path.count("/") >= 4}
    per_guest = sum(1 for _, path in requests if path.endswith("/pending") or path.endswith("/config"))
    print(
        f"observe + plan, {guests} guests + {containers} containers, {LATENCY * 1000:.0f} ms latency: "
        f"{done - start:.2f} s wall (observe {observed_at - start:.2f} s, plan {done - observed_at:.3f} s)"
    )
    print(
        f"  Proxmox requests: {len(requests)} = {per_guest} per-guest config reads + {len(requests) - per_guest} "
        f"fixed (inventory, version, nodes, PCI, mappings); per-guest endpoints: {sorted(reads)[:4]}"
    )
    print(f"  plan: {plan.summary()} {len(plan.blockers)} blockers")


def main() -> None:
    bench_planner(2000)
    bench_fakepve(500, 200)
    bench_spec_limits()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS) of the benchmark process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()

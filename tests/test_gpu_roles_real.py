"""GPU roles, priority, the hold and the VRAM check, end to end: fakepve, a real Docker engine, the fake NVML.

The dual-gpu-roles example as a person lives with it. In gaming mode (Ollama off) transcoding uses
the free RTX 5070 Ti; the gaming VM started by hand in the Proxmox UI is respected (not stopped),
and transcoding moves to the GTX 970; when the VM is shut down, transcoding stays there for the
role's hold and moves back after it. The hold is read from the observation (the container's start
and the pass's time), so the test moves the observation's clock, not the machine's. Then an
over-committed GPU (a process the lab does not manage holds 6 GiB) refuses the switch back to
inference at plan time, and nothing is stopped; and with the GTX 970 lost beside Ollama,
transcoding stops with the reason rather than sharing the exclusive GPU.

Assertions are on what the Docker engine runs (each container's GPU device request) and what
fakepve holds; the fake NVML state is what a real host would show (the RTX gone from the host
while the VM has it).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from reconciler.engine.journal import RunResult
from reconciler.engine.observe import observe
from reconciler.fakes.lab import fake_gpus, fake_uuid
from reconciler.fakes.nvml import FakeProcess, write_state
from reconciler.planning.plan import Action, Plan
from reconciler.planning.planner import make_plan
from reconciler.spec.models import Gpu, GpuRole
from tests.support.reallab import MakeRealLab, RealLab
from tests.test_plan_real import SECRET_VALUE, Tree, appliable, probe_here, rendered

pytestmark = [pytest.mark.docker, pytest.mark.fakepve, pytest.mark.nvml]

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
TRANSCODERS = ("jellyfin", "plex")


def _lab(real_lab: MakeRealLab, tmp_path: Path, *, active: str) -> RealLab:
    folder = appliable(Tree("dual-gpu-roles", ROOT / "examples" / "dual-gpu-roles"), tmp_path)
    _set_active(folder, active)
    lab = real_lab(folder, stand_in=True)
    for workload in lab.load().workloads():
        for variable in workload.secret_env.values():
            lab.env[variable] = SECRET_VALUE
    return lab


def _set_active(folder: Path, member: str) -> None:
    groups = folder / "groups.yaml"
    text = groups.read_text()
    current = next(line for line in text.splitlines() if line.startswith("active: "))
    groups.write_text(text.replace(current, f"active: {member}"))


def _uuid(lab: RealLab, name: str) -> str:
    gpu = lab.load().get(Gpu, name)
    assert gpu is not None
    return fake_uuid(gpu)


def _device_ids(docker_client: Any, name: str) -> tuple[str, list[str]]:
    """(status, GPU UUIDs) of the container as the engine runs it."""
    container = docker_client.containers.get(name)
    requests = container.attrs["HostConfig"].get("DeviceRequests") or []
    return container.status, [uuid for request in requests for uuid in request.get("DeviceIDs") or ()]


def _apply(lab: RealLab) -> Plan:
    plan, report = lab.apply(prober=probe_here, health_timeout=20)
    assert report is not None and report.result is RunResult.APPLIED, (
        [str(p) for p in (*plan.blockers, *plan.conflicts)],
        report,
    )
    return plan


def _gaming_vm(lab: RealLab) -> Any:
    return next(vm for vm in lab.pve.pve.vms if vm.vmid == 110)


def _nvml(lab: RealLab, *, without: str | None = None, lost: str | None = None, stranger: int = 0) -> None:
    """The host's NVML: a GPU passed through to a running VM is gone from it; a lost GPU answers GPU_IS_LOST."""
    gpus = []
    for gpu in fake_gpus(lab.load()):
        if gpu.uuid == without:
            continue
        if gpu.uuid == lost:
            gpu = replace(gpu, lost=True)
        if stranger and gpu.uuid == _uuid(lab, "rtx5070ti"):
            # A process the lab does not manage, beside the two transcoders' own (1 GiB each, as declared).
            ours = (FakeProcess(1001, GIB, "Plex Transcoder"), FakeProcess(1002, GIB, "jellyfin-ffmpeg"))
            gpu = replace(
                gpu, memory_used=stranger + 2 * GIB, processes=(FakeProcess(4242, stranger, "blender"), *ours)
            )
        gpus.append(replace(gpu, index=len(gpus)))
    write_state(lab.nvml.state, gpus)


def _warnings(plan: Plan) -> dict[str, str]:
    return {w.resource: w.message for w in plan.warnings}


def test_transcoding_leaves_the_gpu_the_gaming_vm_takes_and_comes_back_after_the_hold(
    real_lab: MakeRealLab, docker_client: Any, tmp_path: Path
) -> None:
    lab = _lab(real_lab, tmp_path, active="gaming")
    big, small = _uuid(lab, "rtx5070ti"), _uuid(lab, "gtx970")
    _apply(lab)
    for name in TRANSCODERS:
        assert _device_ids(docker_client, name) == ("running", [big]), "the free big GPU's NVENC"
    assert _gaming_vm(lab).status == "stopped", "the reconciler never starts the gaming VM"

    # Someone starts the gaming VM in the Proxmox UI: the RTX is bound to vfio and gone from the host.
    lab.pve.call(setattr, _gaming_vm(lab), "status", "running")
    _nvml(lab, without=big)
    plan = lab.plan()
    assert "qemu/gaming" not in [c.address for c in plan.changes], rendered(plan)
    warnings = _warnings(plan)
    assert "kept running" in warnings["Vm/gaming"] and "priority 100" in warnings["Vm/gaming"]
    for name in TRANSCODERS:
        assert "moves from rtx5070ti to gtx970" in warnings[f"Container/{name}"], "named by its declared UUID"
        assert "passed through to the running VM gaming" in warnings[f"Container/{name}"]
    _apply(lab)
    assert _gaming_vm(lab).status == "running", "respected, not stopped"
    for name in TRANSCODERS:
        assert _device_ids(docker_client, name) == ("running", [small])

    # The VM is shut down from Windows: transcoding holds on the GTX 970 for the role's hold...
    lab.pve.call(setattr, _gaming_vm(lab), "status", "stopped")
    _nvml(lab)
    held = lab.plan()
    assert held.empty and held.applicable, rendered(held)
    assert "stays on gtx970 for role transcode's hold" in _warnings(held)["Container/plex"]

    # ...and moves back once it has run there that long (the observation's clock moved, not the machine's).
    desired = lab.load()
    hold = next(r.hold for r in desired.of(GpuRole) if r.name == "transcode")
    with lab.backends(desired) as backends:
        observed = observe(desired, backends)
    assert observed.observed_at is not None
    later = make_plan(desired, replace(observed, observed_at=observed.observed_at + hold), lab.journal().inventory())
    back = {c.address: c for c in later.changes}
    assert {a for a, c in back.items() if c.action is Action.REPLACE} == {f"container/pve/{n}" for n in TRANSCODERS}
    assert "moves from gtx970 to rtx5070ti" in _warnings(later)["Container/plex"]


def test_an_over_committed_gpu_is_refused_at_plan_time_and_a_lost_gpu_never_puts_transcoding_beside_ollama(
    real_lab: MakeRealLab, docker_client: Any, tmp_path: Path
) -> None:
    lab = _lab(real_lab, tmp_path, active="gaming")
    big, small = _uuid(lab, "rtx5070ti"), _uuid(lab, "gtx970")
    _apply(lab)
    before = {name: docker_client.containers.get(name).id for name in TRANSCODERS}

    # Back to inference while a process the lab does not manage holds 6 GiB of the RTX: Ollama (12 GiB) cannot fit.
    _set_active(lab.spec, "inference")
    _nvml(lab, stranger=6 * GIB)
    plan, report = lab.apply(prober=probe_here, health_timeout=20)
    assert report is None and not plan.applicable, rendered(plan)
    # Where our own containers run, NVML's pids cannot be told from theirs: the live check counts them all.
    assert [b.message for b in plan.blockers if b.resource == "Gpu/rtx5070ti"] == [
        "GPU rtx5070ti (16.0 GiB) now: ollama 12.0 GiB would start, NVML shows 8.0 GiB free + 1.0 GiB freed by "
        "stopping jellyfin + 1.0 GiB freed by stopping plex = 10.0 GiB, short by 2.0 GiB"
    ], rendered(plan)
    assert {name: docker_client.containers.get(name).id for name in TRANSCODERS} == before, "nothing was stopped"
    assert all(_device_ids(docker_client, name) == ("running", [big]) for name in TRANSCODERS)

    # The process ends and the GTX 970 is lost: Ollama takes the RTX alone; transcoding stops, saying why.
    _nvml(lab, lost=small)
    plan = _apply(lab)
    for name in TRANSCODERS:
        why = _warnings(plan)[f"Container/{name}"]
        assert "gtx970 is lost" in why and "rtx5070ti holds ollama (role primary, exclusive)" in why
        status, gpus = _device_ids(docker_client, name)
        assert status != "running", (name, status, gpus)
    assert _device_ids(docker_client, "ollama") == ("running", [big])

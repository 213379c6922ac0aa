"""GPUs read where they are: through each Docker host's engine when the local NVML does not see them.

Against fakepve over HTTPS, the fake NVML library (seeing no GPU at all: the reconciler runs outside the
inference VM) and real private dockerds whose stand-in `nvidia-smi` (tests/support/standin_servers.py)
reports the VM's two RTX 3090 at the VM's own PCI addresses, as a real one inside the VM would.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.backends.docker import DockerBackend, DockerHostSettings
from reconciler.engine.observe import Readers, observe
from reconciler.engine.steps import Done, HealthPolicy
from reconciler.engine.steps_docker import DockerSteps
from reconciler.engine.switch import EngineGpus, ExclusiveSwitch, Member, SwitchHooks, SwitchOutcome, SwitchPolicy
from reconciler.errors import TemporaryError
from reconciler.fakes.nvml import write_state
from reconciler.planning.container_run import ContainerRun, ContainerSeen
from reconciler.planning.plan import Action, Backend, Change
from reconciler.spec.validate import load_and_validate
from tests.support.dockerd import DockerEngine
from tests.support.reallab import MakeRealLab, RealLab
from tests.support.standin_servers import STANDIN_GPUS, Servers, standin_image

pytestmark = [pytest.mark.docker, pytest.mark.fakepve, pytest.mark.nvml]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "inference-vm"
GIB = 2**30
UUID_A = "GPU-3090a000-0000-0000-0000-000000000000"
UUID_B = "GPU-3090b000-0000-0000-0000-000000000000"


def _outside_the_vm(real_lab: MakeRealLab, tmp_path: Path, image: str) -> RealLab:
    """inference-vm with the reconciler outside the VM: no `nvml.inside`, GPUs read with `image` on infer's engine."""
    folder = tmp_path / "inference-vm"
    shutil.copytree(EXAMPLE, folder)
    lab_file = folder / "lab.yaml"
    text = lab_file.read_text(encoding="utf-8").replace("nvml:\n  inside: infer\n", "")
    lab_file.write_text(text.replace("images:\n", f"images:\n  gpu_query: {image}\n"), encoding="utf-8")
    lab = real_lab(folder, stand_in=True)
    write_state(lab.nvml.state, [])  # the local NVML sees none of the VM's GPUs
    return lab


def _with_image(lab: RealLab, old: str, new: str) -> None:
    lab_file = lab.spec / "lab.yaml"
    lab_file.write_text(lab_file.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")


def _gpu_problems(problems: Any) -> list[str]:
    return [str(p) for p in problems if "gpu" in str(p).lower() or "nvml" in str(p).lower()]


def test_a_vms_gpus_seen_only_through_its_engine_plan_without_blockers(
    real_lab: MakeRealLab, tmp_path: Path, docker_client: Any
) -> None:
    tools = standin_image(docker_client).tools
    lab = _outside_the_vm(real_lab, tmp_path, tools)
    desired = lab.load()
    with lab.backends(desired) as backends:
        observed = observe(desired, Readers(backends.proxmox, backends.docker, backends.nvml))
    assert observed.nvml is not None and observed.nvml.gpus == ()
    seen = observed.host_gpus["infer"]
    assert seen.available, seen.error
    assert [(g.uuid, g.pci_bus_id) for g in seen.gpus] == [(UUID_A, "0000:01:00.0"), (UUID_B, "0000:02:00.0")]

    plan = lab.plan()

    assert _gpu_problems(plan.blockers) == []
    assert not any("41:00" in str(p) or "c1:00" in str(p) for p in (*plan.blockers, *plan.warnings))
    assert _probe_containers(docker_client) == []  # the nvidia-smi container is gone


def test_an_engine_whose_gpu_query_fails_is_a_problem_naming_the_host(
    real_lab: MakeRealLab, tmp_path: Path, docker_client: Any
) -> None:
    tools = standin_image(docker_client).tools
    lab = _outside_the_vm(real_lab, tmp_path, tools)
    _with_image(lab, tools, "reconciler-test/no-such-image:1")

    plan = lab.plan()

    problems = _gpu_problems(plan.blockers)
    assert problems, plan.blockers
    assert all("Docker host infer" in p for p in problems), problems
    assert any("reconciler-test/no-such-image:1" in p and "images.gpu_query" in p for p in problems), problems


def test_an_unreachable_engine_is_recorded_for_its_host_not_raised(tmp_path: Path) -> None:
    """observe with a Docker host whose engine socket does not exist: a recorded observation, no exception."""
    folder = tmp_path / "inference-vm"
    shutil.copytree(EXAMPLE, folder)
    desired = load_and_validate(folder).state
    assert desired is not None
    gone = f"unix://{tmp_path / 'no-dockerd.sock'}"
    with DockerBackend({"infer": DockerHostSettings("infer", gone, timeout=5)}) as backend:
        observed = observe(desired, Readers(None, backend, None))
    seen = observed.host_gpus["infer"]
    assert not seen.available
    assert seen.error is not None and "cannot be read through its engine" in seen.error


def _probe_containers(client: Any) -> list[Any]:
    return [c for c in client.containers.list(all=True) if any(k.endswith(".probe") for k in c.labels)]


# ---- a switch on a second engine waits on that engine's GPU memory --------------------------------------


@pytest.fixture
def big_engine(second_docker_engine: DockerEngine) -> Iterator[Any]:
    import docker

    client = docker.DockerClient(base_url=second_docker_engine.endpoint, timeout=60)
    try:
        yield client
    finally:
        client.close()


@pytest.mark.parametrize(("declared", "started"), [(20, True), (30, False)])
def test_a_member_on_a_second_engine_starts_only_once_that_engines_gpus_have_its_memory(
    docker_engine: DockerEngine,
    second_docker_engine: DockerEngine,
    docker_client: Any,
    big_engine: Any,
    declared: int,
    started: bool,
) -> None:
    """Local NVML is absent; `big`'s engine reports two 24 GiB GPUs free: 20 GiB fits, 30 GiB times out."""
    settings = {
        "small": DockerHostSettings(name="small", endpoint=docker_engine.endpoint, timeout=30),
        "big": DockerHostSettings(name="big", endpoint=second_docker_engine.endpoint, timeout=30),
    }
    images = standin_image(big_engine, gpus=STANDIN_GPUS)
    with DockerBackend(settings) as backend:
        big = Servers(backend, images, "big")
        try:
            big.make("deep")
            address = "container/big/deep"
            hooks = SwitchHooks({address: declared * GIB}, None, None, backend, images.tools)
            after = ContainerRun(name="deep", image=images.server, gpus=(UUID_A, UUID_B))
            wait = {"host": "big", "timeout": 0.5, "interval": 0.1, "sleep": lambda s: None}
            if started:
                hooks.wait_before_start(address, after, **wait)  # type: ignore[arg-type]
                backend.start_container("big", "deep")
            else:
                with pytest.raises(TemporaryError, match=rf"24\.0 GiB free .* {declared:.1f} GiB needed"):
                    hooks.wait_before_start(address, after, **wait)  # type: ignore[arg-type]
            status = {c.name: c.status for c in big_engine.containers.list(all=True) if c.name == "deep"}
            assert status == {"deep": "running" if started else "created"}
        finally:
            big.remove()


@pytest.mark.parametrize(
    ("old_needs", "outcome", "old_status"),
    [(20, SwitchOutcome.ROLLED_BACK, "running"), (30, SwitchOutcome.ROLLBACK_FAILED, "exited")],
)
def test_a_rollback_restarts_the_old_member_once_its_memory_is_free(
    docker_engine: DockerEngine, docker_client: Any, old_needs: int, outcome: SwitchOutcome, old_status: str
) -> None:
    """The new member exits while starting; the old one (needing `old_needs` GiB on each 24 GiB GPU the
    engine reports free) is started again only once the engine shows that memory free."""
    images = standin_image(docker_client)
    settings = {"infer": DockerHostSettings(name="infer", endpoint=docker_engine.endpoint, timeout=30)}
    policy = SwitchPolicy(stop_timeout=5, free_timeout=0.5, health_timeout=10, interval=0.1)
    with DockerBackend(settings) as backend:
        servers = Servers(backend, images)
        try:
            fast = servers.make("fast", start=True)
            deep = servers.make("deep", mode="exit")
            old = Member(fast.host, fast.name, fast.server, gpus=(UUID_A, UUID_B), needs=old_needs * GIB)
            gpus = EngineGpus(backend, "infer", images.tools)
            report = ExclusiveSwitch(backend, gpus, policy=policy).run([old], [deep])
            assert report.outcome is outcome, report.rollback_errors
            assert (servers.status("fast"), servers.status("deep")) == (old_status, "exited")
            if old_status == "exited":
                assert any("24.0 GiB free" in error for error in report.rollback_errors), report.rollback_errors
        finally:
            servers.remove()


@pytest.mark.parametrize(("declared", "restarted"), [(20, True), (30, False)])
def test_the_appliers_undo_of_a_stop_restarts_a_member_once_its_engine_shows_its_memory_free(
    docker_engine: DockerEngine, docker_client: Any, declared: int, restarted: bool
) -> None:
    """Undoing `stop container/infer/fast` (a member of an exclusive group holding both GPUs) waits for its
    declared VRAM through infer's engine (no local NVML), and starts it only when that memory is free."""
    images = standin_image(docker_client)
    settings = {"infer": DockerHostSettings(name="infer", endpoint=docker_engine.endpoint, timeout=30)}
    address = "container/infer/fast"
    with DockerBackend(settings) as backend:
        servers = Servers(backend, images)
        try:
            servers.make("fast")
            hooks = SwitchHooks({address: declared * GIB}, None, None, backend, images.tools)
            policy = HealthPolicy(vram_timeout=0.5, interval=0.1)
            steps = DockerSteps(backend, policy, {}, {}, sleep=lambda s: None, switch=hooks)
            seen = ContainerSeen("infer", "fast", "0" * 12, images.server, "running", None, (UUID_A, UUID_B))
            stop = Change(address, Action.STOP, "Model/fast", Backend.DOCKER, seen, None)
            if restarted:
                steps.undo(Done(stop, {"status": "running"}))
            else:
                with pytest.raises(TemporaryError, match=r"24\.0 GiB free"):
                    steps.undo(Done(stop, {"status": "running"}))
            assert servers.status("fast") == ("running" if restarted else "created")
        finally:
            servers.remove()

"""The exclusive switch and phased health against a real Docker engine, stand-in model servers and the fake NVML.

The servers are tests.support.standin_servers' image (busybox, no registry), answering like vLLM,
llama-server and Ollama; the containers are made and driven by the real DockerBackend; GPU memory is
read through the real nvidia-ml-py bindings over the fake libnvidia-ml, or through the host's engine
(`nvidia-smi` in a short-lived container). Assertions are on what the engine holds afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from reconciler.backends.docker import DockerBackend, DockerHostSettings
from reconciler.engine.health import Progress, ollama_load, phased_health, poll, probe_http
from reconciler.engine.switch import EngineGpus, ExclusiveSwitch, Member, SwitchOutcome, SwitchPolicy
from reconciler.fakes.nvml import FakeGpu, FakeProcess
from tests.support.dockerd import DockerEngine
from tests.support.nvml import FakeNvml
from tests.support.standin_servers import Servers, StandinImage, standin_image, standin_server_image  # noqa: F401

pytestmark = pytest.mark.docker

HOST = "infer"
GIB = 2**30
UUID_A = "GPU-3090a000-0000-0000-0000-000000000000"
UUID_B = "GPU-3090b000-0000-0000-0000-000000000000"
FAST = SwitchPolicy(stop_timeout=5, free_timeout=3, health_timeout=10, interval=0.1)


@pytest.fixture
def servers(docker_engine: DockerEngine, standin_server_image: StandinImage) -> Iterator[Servers]:  # noqa: F811
    settings = {HOST: DockerHostSettings(name=HOST, endpoint=docker_engine.endpoint, timeout=30)}
    with DockerBackend(settings) as backend:
        made = Servers(backend, standin_server_image)
        yield made
        made.remove()


def _gpu(uuid: str = UUID_A, *, index: int = 0, used: int = 0, **fields: Any) -> FakeGpu:
    return FakeGpu(index, uuid, f"0000:0{index + 1}:00.0", "NVIDIA GeForce RTX 3090", 24 * GIB, used, **fields)


# ---- phased health ---------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["vllm", "llamacpp", "ollama"])
def test_each_engine_goes_through_starting_ready_and_working(servers: Servers, engine: str) -> None:
    member = servers.make("solo", engine, start=True, load_seconds="0.6")
    assert member.server is not None
    if engine == "ollama":  # as the applier does: once the server answers, it pulls and loads the model
        assert poll(lambda: probe_http(member.server.base_url + "/api/tags"), timeout=10, interval=0.1).healthy
        assert ollama_load(member.server.base_url, member.server.served_name, timeout=10).healthy
    notes: list[Progress] = []
    result = phased_health(member.server, timeout=15, interval=0.1, progress=notes.append)
    assert result.healthy, result.detail
    phases = [n.phase for n in notes]
    assert phases[-1] == "working" and "ready" in phases
    if engine != "ollama":  # vLLM refuses while loading, llama-server answers 503: both are waited for
        assert phases[0] == "starting", notes[0]


@pytest.mark.parametrize(
    ("mode", "failed_in", "says"),
    [
        ("loading", "starting", "gave up after"),
        ("exit", "starting", "the container exited while starting"),
        ("wrong-name", "ready", "serves 'some-other-model', not 'solo-model'"),
        ("huge", "ready", "larger than 1048576 bytes"),
        ("not-json", "ready", "GET http"),
        ("bad-completion", "working", "status 500"),
    ],
)
def test_a_server_that_misbehaves_fails_the_phase_it_is_in(
    servers: Servers, mode: str, failed_in: str, says: str
) -> None:
    member = servers.make("solo", "llamacpp", start=True, mode=mode, load_seconds="0.2")
    switch = ExclusiveSwitch(servers.backend, None, policy=SwitchPolicy(health_timeout=2, interval=0.1))
    report = switch.run([], [member])
    assert report.outcome is SwitchOutcome.ROLLED_BACK
    assert report.failure is not None and report.failure.startswith(f"{HOST}/solo: {failed_in}: "), report.failure
    assert says in report.failure
    assert servers.status("solo") == "exited", "the new member that failed is stopped again"


# ---- the switch, with VRAM read from the fake NVML -----------------------------------------------------


def test_a_switch_waits_until_the_old_members_memory_is_freed(servers: Servers, fake_nvml: FakeNvml) -> None:
    old = servers.make("fast", start=True)
    new = servers.make("deep")
    new = Member(new.host, new.name, new.server, gpus=(UUID_A,), needs=20 * GIB)
    # The old model's process has exited, but the driver frees its 21 GiB only after three memory reads.
    fake_nvml.set(_gpu(processes=(FakeProcess(5151, 21 * GIB, gone=True, release_after=3),)))
    notes: list[Progress] = []
    report = ExclusiveSwitch(servers.backend, fake_nvml.backend(), policy=FAST, progress=notes.append).run([old], [new])
    assert report.outcome is SwitchOutcome.SWITCHED, report.failure
    assert (servers.status("fast"), servers.status("deep")) == ("exited", "running")
    assert len([n for n in notes if n.phase == "freeing"]) == 3, "it waited, reading the GPU again each time"
    assert [n.phase for n in notes if n.subject == "switch"] == ["stop", "free", "start", "health"]


@pytest.mark.parametrize(
    ("gpu", "says"),
    [
        (_gpu(processes=(FakeProcess(5151, 21 * GIB, gone=True, release_after=10**6),)), "GiB free after"),
        (_gpu(used=23 * GIB), "20.0 GiB needed"),  # a full GPU: a process we do not own holds it
        (_gpu(lost=True), "GPU_IS_LOST"),
    ],
    ids=["freed-too-late", "full", "lost"],
)
def test_memory_that_is_not_freed_fails_the_switch_and_brings_the_old_member_back(
    servers: Servers, fake_nvml: FakeNvml, gpu: FakeGpu, says: str
) -> None:
    old = servers.make("fast", start=True)
    new = servers.make("deep")
    new = Member(new.host, new.name, new.server, gpus=(UUID_A,), needs=20 * GIB)
    fake_nvml.set(gpu)
    report = ExclusiveSwitch(servers.backend, fake_nvml.backend(), policy=FAST).run([old], [new])
    assert report.outcome is SwitchOutcome.ROLLED_BACK and not report.rollback_errors
    assert report.failure is not None and says in report.failure, report.failure
    assert servers.status("deep") == "created", "the new member never started"
    assert servers.status("fast") == "running"
    assert old.server is not None and phased_health(old.server, timeout=5, interval=0.1).healthy


@pytest.mark.parametrize("mode", ["bad-completion", "exit", "loading"])
def test_a_new_member_that_fails_health_is_stopped_and_the_old_one_is_healthy_again(
    servers: Servers, fake_nvml: FakeNvml, mode: str
) -> None:
    old = servers.make("fast", start=True)
    new = servers.make("deep", mode=mode)
    fake_nvml.set(_gpu())
    report = ExclusiveSwitch(servers.backend, fake_nvml.backend(), policy=FAST).run([old], [new])
    assert report.outcome is SwitchOutcome.ROLLED_BACK and not report.rollback_errors, report.to_json()
    assert (servers.status("fast"), servers.status("deep")) == ("running", "exited")
    assert old.server is not None and phased_health(old.server, timeout=5, interval=0.1).healthy


# ---- GPUs read through the host's engine ----------------------------------------------------------------


@pytest.mark.parametrize(("needs", "outcome"), [(20, SwitchOutcome.SWITCHED), (30, SwitchOutcome.ROLLED_BACK)])
def test_vram_is_read_through_the_hosts_engine(servers: Servers, needs: int, outcome: SwitchOutcome) -> None:
    old = servers.make("fast", start=True)
    new = servers.make("deep")
    new = Member(new.host, new.name, new.server, gpus=(UUID_A, UUID_B), needs=needs * GIB)
    gpus = EngineGpus(servers.backend, HOST, servers.image.tools)  # nvidia-smi in a short-lived container there
    report = ExclusiveSwitch(servers.backend, gpus, policy=FAST).run([old], [new])
    assert report.outcome is outcome, report.failure
    if outcome is SwitchOutcome.ROLLED_BACK:
        assert report.failure is not None and "24.0 GiB free" in report.failure and "30.0 GiB needed" in report.failure
    expected = ("exited", "running") if outcome is SwitchOutcome.SWITCHED else ("running", "created")
    assert (servers.status("fast"), servers.status("deep")) == expected


# ---- two Docker hosts, two engines ---------------------------------------------------------------------


def test_a_switch_between_two_hosts_touches_each_hosts_own_engine(
    docker_engine: DockerEngine, second_docker_engine: DockerEngine, docker_client: Any
) -> None:
    """fast runs on host `small` (one engine), deep on host `big` (another): as in a lab, not one shared engine."""
    import docker

    other = docker.DockerClient(base_url=second_docker_engine.endpoint, timeout=60)
    settings = {
        "small": DockerHostSettings(name="small", endpoint=docker_engine.endpoint, timeout=30),
        "big": DockerHostSettings(name="big", endpoint=second_docker_engine.endpoint, timeout=30),
    }
    try:
        images = {"small": standin_image(docker_client), "big": standin_image(other)}
        with DockerBackend(settings) as backend:
            small, big = Servers(backend, images["small"], "small"), Servers(backend, images["big"], "big")
            try:
                old = small.make("fast", start=True)
                new = big.make("deep")
                report = ExclusiveSwitch(backend, None, policy=FAST).run([old], [new])
                assert report.outcome is SwitchOutcome.SWITCHED, report.failure
                # What each engine holds, read without the backend: each has its own member and only that.
                assert _names(docker_client, ("fast", "deep")) == {"fast": "exited"}
                assert _names(other, ("fast", "deep")) == {"deep": "running"}
            finally:
                small.remove()
                big.remove()
    finally:
        other.close()


def _names(client: Any, names: tuple[str, ...]) -> dict[str, str]:
    return {c.name: c.status for c in client.containers.list(all=True) if c.name in names}

"""The switch's pieces that need no engine: VRAM needs from a planned container, the model server it is,
and the VRAM wait over the fake NVML (a GPU this reader does not see, a hostile utilization)."""

from __future__ import annotations

import pytest

from reconciler.engine.switch import model_server_for, vram_needs, wait_for_vram
from reconciler.fakes.nvml import FakeGpu
from reconciler.planning.container_run import ContainerProbe, ContainerRun
from tests.support.nvml import FakeNvml

GIB = 2**30
UUID = "GPU-aaaaaaaa-0000-0000-0000-000000000000"


def _run(
    command: list[str] | None, *, gpus: tuple[str, ...] = (), port: int | None = None, load: str | None = None
) -> ContainerRun:
    probe = ContainerProbe(http="/health", port=port) if port is not None else None
    return ContainerRun(
        "m", "img", command=None if command is None else tuple(command), gpus=gpus, probe=probe, load=load
    )


def _vllm(*extra: str) -> ContainerRun:
    command = ["--model", "/m", "--served-model-name", "qwen", "--port", "8000", *extra]
    return _run(command, gpus=(UUID,), port=8000)


@pytest.mark.parametrize(
    ("after", "declared", "needs"),
    [
        (_vllm(), None, {UUID: int(0.9 * 24 * GIB)}),  # vLLM's default utilization
        (_vllm("--gpu-memory-utilization", "0.5"), None, {UUID: 12 * GIB}),
        (_vllm("--gpu-memory-utilization", "7"), None, {UUID: 24 * GIB}),  # clamped: never more than the GPU
        (_vllm("--gpu-memory-utilization", "-1"), None, {UUID: 0}),
        (_vllm("--gpu-memory-utilization", "lots"), None, {}),  # not a number: not waited for, no crash
        (_vllm("--gpu-memory-utilization"), None, {UUID: int(0.9 * 24 * GIB)}),  # a flag with no value
        (_vllm(), 6 * GIB, {UUID: 6 * GIB}),  # a declared footprint wins
        (_run(["--alias", "x"], gpus=(UUID,)), None, {}),  # llama-server without vram: unknown
        (_run(None, gpus=("all",)), 4 * GIB, {}),
    ],
)
def test_vram_needs(after: ContainerRun, declared: int | None, needs: dict[str, int]) -> None:
    assert vram_needs(after, declared=declared, totals={UUID: 24 * GIB}) == needs


def test_the_model_server_a_planned_container_is() -> None:
    vllm = model_server_for(_vllm(), "10.0.0.5")
    assert vllm is not None and (vllm.base_url, vllm.served_name) == ("http://10.0.0.5:8000", "qwen")
    llama = model_server_for(_run(["--alias", "coder"], port=8080), "h")
    assert llama is not None and llama.served_name == "coder"
    ollama = model_server_for(_run(None, load="llama3.1:8b", port=11434), "h")
    assert ollama is not None and (ollama.served_name, ollama.health_path) == ("llama3.1:8b", "/")
    assert model_server_for(_run(["--served-model-name"], port=1), "h") is None
    assert model_server_for(_run(["nginx"], port=80), "h") is None
    assert model_server_for(_run(["--alias", "x"]), "h") is None  # no port to ask


def test_a_gpu_this_reader_does_not_see_is_not_waited_on(fake_nvml: FakeNvml) -> None:
    """GPUs passed through to a VM are not in the host's NVML: the switch goes on, and says so."""
    fake_nvml.set(FakeGpu(0, UUID, "0000:01:00.0", "RTX 3090", 24 * GIB, 23 * GIB))
    other = "GPU-bbbbbbbb-0000-0000-0000-000000000000"
    result = wait_for_vram(fake_nvml.backend(), {other: 20 * GIB}, timeout=1, interval=0.01)
    assert result.healthy and result.detail == f"{other}: not seen here, not waited for"
    full = wait_for_vram(fake_nvml.backend(), {UUID: 20 * GIB}, timeout=0.05, interval=0.01)
    assert not full.healthy and "1.0 GiB free after" in full.detail and "20.0 GiB needed" in full.detail


def test_a_gpu_without_nvml_fails_the_wait_cleanly(fake_nvml: FakeNvml) -> None:
    fake_nvml.set(failures={"nvmlInit": 9})  # the driver is not loaded
    result = wait_for_vram(fake_nvml.backend(), {UUID: GIB}, timeout=1, interval=0.01)
    assert not result.healthy and result.detail.startswith("GPU memory not freed: ")

"""Spec GPUs matched where they are seen (planning.gpuview), and the VRAM load of a plan (planning.gpuload).

Read through the real NVML backend over the fake libnvidia-ml (tests/support/nvml.py), with the
examples loaded from examples/: the inference VM's GPUs seen from inside the VM at the VM's own
addresses, a GPU that cannot be told apart, and an over-committed GPU with the numbers.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.engine.observe import read_model_files
from reconciler.fakes.lab import fake_gpus, fake_uuid
from reconciler.fakes.nvml import FakeProcess
from reconciler.planning.gpuload import Seat, gpu_load
from reconciler.planning.gpusight import MatchedBy
from reconciler.planning.gpuview import gpu_sight, hosts_to_query
from reconciler.planning.observed import Observed
from reconciler.spec.models import Gpu, Model, NvmlSettings
from reconciler.spec.state import DesiredState
from reconciler.spec.validate import load_and_validate
from tests.support.labs import load, write_tree
from tests.support.modelfiles import QWEN25, qwen_gguf_metadata, qwen_gguf_tensors, write_gguf
from tests.support.nvml import FakeNvml

GIB = 1024**3
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _state(name: str) -> DesiredState:
    result = load_and_validate(EXAMPLES / name)
    assert not result.diagnostics, [str(d) for d in result.diagnostics]
    return result.state


def _with_lab(state: DesiredState, **nvml: object) -> DesiredState:
    lab = state.lab.model_copy(update={"nvml": NvmlSettings.model_validate(nvml)})
    return DesiredState(tuple(lab if r is state.lab else r for r in state.resources), state.origins, state.revision)


def test_the_inference_vm_gpus_are_matched_inside_the_vm_by_passthrough_order(fake_nvml: FakeNvml) -> None:
    state = _state("inference-vm")
    assert state.lab.nvml.inside == "infer", "the example says the reconciler runs inside the VM"
    fake_nvml.set(*fake_gpus(state))
    observed = fake_nvml.backend().observe()
    assert [g.pci_bus_id for g in observed.gpus] == ["0000:01:00.0", "0000:02:00.0"], "the VM's own addresses"

    sight = gpu_sight(state, Observed(nvml=observed))

    assert not sight.problems
    assert {name: g.pci_bus_id for name, g in sight.seen.items()} == {"gpu0": "0000:01:00.0", "gpu1": "0000:02:00.0"}
    assert set(sight.how.values()) == {MatchedBy.PASSTHROUGH_ORDER}
    gpu1 = state.get(Gpu, "gpu1")
    assert gpu1 is not None and sight.seen["gpu1"].uuid == fake_uuid(gpu1)


def test_read_as_the_host_the_guest_addresses_match_nothing(fake_nvml: FakeNvml) -> None:
    state = _state("inference-vm")
    fake_nvml.set(*fake_gpus(state))
    sight = gpu_sight(_with_lab(state), Observed(nvml=fake_nvml.backend().observe()))
    assert not sight.seen
    assert "NVML has no GPU at 0000:41:00.0" in sight.problems["gpu0"]


def test_a_gpu_that_cannot_be_told_apart_inside_the_vm_asks_for_its_uuid(fake_nvml: FakeNvml) -> None:
    state = _state("inference-vm")
    first = fake_gpus(state)[0]
    fake_nvml.set(first)  # one GPU seen for two passed through: which is which?
    sight = gpu_sight(state, Observed(nvml=fake_nvml.backend().observe()))
    assert not sight.seen
    assert "give each Gpu its 'uuid'" in sight.problems["gpu0"] and "nvidia-smi -L" in sight.problems["gpu1"]


def test_inside_naming_no_vm_is_said_for_every_gpu() -> None:
    state = _with_lab(_state("inference-vm"), inside="nowhere")
    sight = gpu_sight(state, Observed())
    assert "nvml.inside names 'nowhere', which is not a Vm" in sight.problems["gpu0"]


def _seats(state: DesiredState, *names: str) -> list[Seat]:
    seats = []
    for name in names:
        model = state.get(Model, name)
        assert model is not None
        seats.append(Seat(model, model.gpus, f"container/{model.host}/{model.name}", running=True))
    return seats


def test_an_over_committed_gpu_is_a_blocker_with_the_numbers(fake_nvml: FakeNvml) -> None:
    state = _state("inference-vm")
    small, other = fake_gpus(state)
    stranger = FakeProcess(pid=4242, used_memory=3 * GIB, name="python3")
    fake_nvml.set(replace(small, processes=(stranger,), memory_used=3 * GIB), other)
    observed = Observed(nvml=fake_nvml.backend().observe())
    sight = gpu_sight(state, observed)

    # qwen-7b (0.88 of 24 GiB) and qwen-32b (0.90 of 24 GiB on each GPU) at once: over on both GPUs.
    load = gpu_load(state, observed, sight, _seats(state, "qwen-7b", "qwen-32b"), changed=())

    messages = [p.message for p in load.blockers]
    over = next(m for m in messages if m.startswith("GPU gpu0 (24.0 GiB): "))
    assert "qwen-7b 21.1 GiB + qwen-32b 21.6 GiB + pid 4242 (not managed) 3.0 GiB = 45.7 GiB, over by 21.7 GiB" in over
    assert any(
        m.startswith("GPU gpu0 (24.0 GiB) now: qwen-7b 21.1 GiB + qwen-32b 21.6 GiB would start") for m in messages
    )
    assert all(p.resource in {"Gpu/gpu0", "Gpu/gpu1"} for p in load.blockers)


def test_the_fast_mode_fits_and_says_the_footprints_are_estimated(fake_nvml: FakeNvml) -> None:
    state = _state("inference-vm")
    fake_nvml.set(*fake_gpus(state))
    observed = Observed(nvml=fake_nvml.backend().observe())
    load = gpu_load(state, observed, gpu_sight(state, observed), _seats(state, "qwen-7b", "qwen-14b"), changed=())
    assert not load.blockers
    assert load.summary == (
        "GPU gpu0: qwen-7b 21.1 GiB of 24.0 GiB usable (qwen-7b: estimated from its files)",
        "GPU gpu1: qwen-14b 21.6 GiB of 24.0 GiB usable (qwen-14b: estimated from its files)",
    )


def test_a_model_whose_files_cannot_be_read_and_declares_no_vram_is_a_blocker_naming_where() -> None:
    state = _state("single-active-llamacpp")
    model = next(m for m in state.of(Model) if m.vram is not None)
    bare = model.model_copy(update={"vram": None})
    state = DesiredState(tuple(bare if r is model else r for r in state.resources), state.origins)
    observed = Observed()
    load = gpu_load(state, observed, gpu_sight(state, observed), _seats(state, bare.name), changed=())
    (problem,) = [p for p in load.blockers if p.resource == bare.ref]
    assert "examples/single-active-llamacpp/models.yaml:" in problem.message.replace(str(EXAMPLES) + "/", "examples/")
    assert "declares no 'vram'" in problem.message and "observe did not read them" in problem.message


def _llamacpp_state(tmp_path: Path, source: Path, *, vram: str | None = None) -> DesiredState:
    tree = tmp_path / "spec"
    declared = f"vram: {vram}\n" if vram else ""
    write_tree(
        tree,
        f"""\
        kind: DockerHost
        name: ws
        endpoint: unix:///var/run/docker.sock
        node: pve1
        ---
        kind: Model
        name: qwen
        engine: llamacpp
        host: ws
        gpus: [small]
        source: {source}
        port: 8080
        context: 16384
        """
        + declared,
    )
    return load(tree)


def test_observe_reads_a_gguf_file_and_the_plan_estimates_from_it(tmp_path: Path) -> None:
    layout = QWEN25["7B"]
    source = write_gguf(tmp_path / "q7.gguf", "qwen2", qwen_gguf_metadata(layout), qwen_gguf_tensors(layout))
    state = _llamacpp_state(tmp_path, source)
    files = read_model_files(state.of(Model))
    assert files["qwen"].shape is not None and files["qwen"].unread is None
    observed = Observed(models=files)
    load_ = gpu_load(state, observed, gpu_sight(state, observed), _seats(state, "qwen"), changed=())
    (problem,) = load_.blockers  # Qwen2.5 7B Q4_K_M with 16k context does not fit the 4 GiB GTX 970
    assert problem.resource == "Gpu/small" and problem.message.startswith("GPU small (4.0 GiB): qwen ")
    assert "over by" in problem.message
    assert load_.summary[0].endswith("(qwen: estimated from its files)")


@pytest.mark.parametrize(
    "content",
    [b"", b"GGUF", b"GGUF" + b"\xff" * 64, b"not a model at all\n" * 10],
    ids=["empty", "magic", "junk", "text"],
)
def test_a_hostile_model_file_is_recorded_unread_and_the_plan_asks_for_vram(tmp_path: Path, content: bytes) -> None:
    source = tmp_path / "evil.gguf"
    source.write_bytes(content)
    state = _llamacpp_state(tmp_path, source)
    files = read_model_files(state.of(Model))
    assert files["qwen"].shape is None and files["qwen"].unread
    observed = Observed(models=files)
    load_ = gpu_load(state, observed, gpu_sight(state, observed), _seats(state, "qwen"), changed=())
    (problem,) = load_.blockers
    assert problem.resource == "Model/qwen" and "declares no 'vram'" in problem.message
    assert f"{tmp_path / 'spec' / 'spec.yaml'}:" in problem.message, "names the file and line"


def test_a_declared_vram_is_used_and_the_files_are_not_read(tmp_path: Path) -> None:
    state = _llamacpp_state(tmp_path, tmp_path / "absent.gguf", vram="3GiB")
    assert read_model_files(state.of(Model)) == {}
    observed = Observed()
    load_ = gpu_load(state, observed, gpu_sight(state, observed), _seats(state, "qwen"), changed=())
    assert not load_.blockers
    assert load_.summary == ("GPU small: qwen 3.0 GiB of 4.0 GiB usable (qwen: declared vram)",)


# ---- which Docker hosts have their GPUs read through their engines --------------------------------------


def test_only_hosts_whose_gpus_the_local_nvml_misses_are_queried(fake_nvml: FakeNvml) -> None:
    inside = _state("inference-vm")
    fake_nvml.set(*fake_gpus(inside))
    assert hosts_to_query(inside, fake_nvml.backend().observe()) == ()  # NVML inside the VM sees both

    outside = _with_lab(inside)  # the reconciler runs outside the VM: its NVML sees none of them
    fake_nvml.set()
    assert hosts_to_query(outside, fake_nvml.backend().observe()) == ("infer",)
    assert hosts_to_query(outside, None) == ("infer",)  # NVML off or not read: read them where they are


def test_hosts_without_gpu_workloads_are_never_queried() -> None:
    state = _state("inference-vm")
    without = tuple(
        r.model_copy(update={"gpus": (), "role": None}) if isinstance(r, Model) else r for r in state.resources
    )
    state = DesiredState(without, state.origins, state.revision)
    assert hosts_to_query(_with_lab(state), None) == ()

"""The VRAM estimate (planning/vram.py) and the fit check (planning/gpufit.py): pure functions, exact numbers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.backends.modelfiles import read_model_shape
from reconciler.planning.gpufit import ForeignProcess, GpuCapacity, Placement, Release, check_fit
from reconciler.planning.vram import (
    CUDA_CONTEXT_BYTES,
    Footprint,
    FootprintSource,
    GpuSlot,
    ModelFormat,
    ModelShape,
    declared,
    estimate,
    footprint_of,
)
from reconciler.spec.models import Engine, Model
from tests.support.modelfiles import (
    QWEN25,
    gpt_oss_120b_config,
    gpt_oss_120b_tensors,
    qwen_awq_tensors,
    qwen_gguf_metadata,
    qwen_gguf_tensors,
    write_gguf,
    write_safetensors,
)

GIB = 1024**3
MIB = 1024**2


@pytest.fixture(scope="module")
def qwen7_gguf(tmp_path_factory: pytest.TempPathFactory) -> ModelShape:
    root = tmp_path_factory.mktemp("gguf")
    layout = QWEN25["7B"]
    return read_model_shape(
        write_gguf(root / "q7.gguf", "qwen2", qwen_gguf_metadata(layout), qwen_gguf_tensors(layout))
    )


def _awq(root: Path, size: str) -> ModelShape:
    layout = QWEN25[size]
    folder = root / f"awq-{size}"
    folder.mkdir()
    config = {**layout.config(), "torch_dtype": "float16", "quantization_config": {"quant_method": "awq"}}
    (folder / "config.json").write_text(json.dumps(config))
    write_safetensors(folder / "model.safetensors", qwen_awq_tensors(layout))
    return read_model_shape(folder)


def _shape(**changes: object) -> ModelShape:
    base = ModelShape(
        format=ModelFormat.GGUF,
        architecture="llama",
        block_count=4,
        embedding_length=1024,
        head_count=8,
        head_count_kv=2,
        key_length=128,
        value_length=128,
        context_length=8192,
        vocab_size=32000,
        layer_bytes=(100 * MIB,) * 4,
        input_bytes=50 * MIB,
        output_bytes=60 * MIB,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# ---- llama.cpp ------------------------------------------------------------------------------------------


KV_PER_TOKEN_QWEN7_F16 = 28 * 4 * 128 * 2 * 2  # layers x KV heads x head dim x (K and V) x 2 bytes


@pytest.mark.parametrize(
    ("cache", "bytes_per_element"),
    [("f16", 2), ("q8_0", 34 / 32), ("q4_0", 18 / 32)],
)
def test_llamacpp_kv_cache_follows_context_and_cache_type(
    qwen7_gguf: ModelShape, cache: str, bytes_per_element: float
) -> None:
    big = GpuSlot("big", 24 * GIB)
    args = {"ctx_size": 16384, "cache_type_k": cache, "cache_type_v": cache}

    footprint = estimate(qwen7_gguf, Engine.LLAMACPP, args, [big])

    (share,) = footprint.shares
    assert share.kv_cache == 28 * round(16384 * 4 * 128 * 2 * bytes_per_element)
    assert share.weights == qwen7_gguf.weights_bytes - qwen7_gguf.input_bytes
    assert share.overhead == CUDA_CONTEXT_BYTES
    assert (footprint.layers_on_gpu, footprint.layers_total, footprint.refusals) == (29, 29, ())
    assert footprint.source is FootprintSource.ESTIMATED


def test_llamacpp_default_context_is_the_preset_one(qwen7_gguf: ModelShape) -> None:
    footprint = estimate(qwen7_gguf, Engine.LLAMACPP, {}, [GpuSlot("big", 24 * GIB)])
    assert footprint.shares[0].kv_cache == 8192 * KV_PER_TOKEN_QWEN7_F16
    with_context = estimate(qwen7_gguf, Engine.LLAMACPP, {}, [GpuSlot("big", 24 * GIB)], context=4096)
    assert with_context.shares[0].kv_cache == 4096 * KV_PER_TOKEN_QWEN7_F16
    # An argument beats the Model's `context`, as on the command line the container gets.
    overridden = estimate(qwen7_gguf, Engine.LLAMACPP, {"ctx-size": 2048}, [GpuSlot("big", 24 * GIB)], context=4096)
    assert overridden.shares[0].kv_cache == 2048 * KV_PER_TOKEN_QWEN7_F16
    trained = estimate(qwen7_gguf, Engine.LLAMACPP, {"ctx_size": 0}, [GpuSlot("big", 24 * GIB)], context=4096)
    assert trained.shares[0].kv_cache == 32768 * KV_PER_TOKEN_QWEN7_F16  # 0: the model's own context length


def test_llamacpp_partial_offload_takes_the_last_layers(qwen7_gguf: ModelShape) -> None:
    footprint = estimate(qwen7_gguf, Engine.LLAMACPP, {"n_gpu_layers": 10, "ctx_size": 1024}, [GpuSlot("g", 8 * GIB)])

    (share,) = footprint.shares
    assert share.weights == sum(qwen7_gguf.layer_bytes[18:])  # no output layer: that needs 29
    assert share.kv_cache == 10 * 1024 * 4 * 128 * 2 * 2
    assert (footprint.layers_on_gpu, footprint.layers_total) == (10, 29)


def test_llamacpp_zero_layers_still_has_a_cuda_context_and_buffer(qwen7_gguf: ModelShape) -> None:
    (share,) = estimate(qwen7_gguf, Engine.LLAMACPP, {"n_gpu_layers": 0}, [GpuSlot("g", 8 * GIB)]).shares
    assert (share.weights, share.kv_cache) == (0, 0)
    assert share.compute > 0
    assert share.overhead == CUDA_CONTEXT_BYTES


def test_llamacpp_layer_split_follows_tensor_split(qwen7_gguf: ModelShape) -> None:
    gpus = [GpuSlot("a", 24 * GIB), GpuSlot("b", 24 * GIB)]

    even = estimate(qwen7_gguf, Engine.LLAMACPP, {"ctx_size": 4096}, gpus)
    skewed = estimate(qwen7_gguf, Engine.LLAMACPP, {"ctx_size": 4096, "tensor_split": "3,1"}, gpus)

    kv_layer = 4096 * 4 * 128 * 2 * 2
    a, b = even.shares
    assert (a.kv_cache // kv_layer, b.kv_cache // kv_layer) == (15, 13)  # 29 positions; the output is the 29th, on b
    assert a.weights == sum(qwen7_gguf.layer_bytes[:15])
    assert b.weights == sum(qwen7_gguf.layer_bytes[15:]) + qwen7_gguf.output_bytes
    assert b.compute > a.compute  # the logits of the output layer
    a3, b1 = skewed.shares
    assert (a3.kv_cache // kv_layer, b1.kv_cache // kv_layer) == (22, 6)
    assert a.weights + b.weights == a3.weights + b1.weights == qwen7_gguf.weights_bytes - qwen7_gguf.input_bytes


def test_llamacpp_split_modes_row_and_none(qwen7_gguf: ModelShape) -> None:
    gpus = [GpuSlot("a", 24 * GIB), GpuSlot("b", 24 * GIB)]
    on_gpu = qwen7_gguf.weights_bytes - qwen7_gguf.input_bytes

    row = estimate(qwen7_gguf, Engine.LLAMACPP, {"split_mode": "row", "main_gpu": 1, "ctx_size": 4096}, gpus)
    none = estimate(qwen7_gguf, Engine.LLAMACPP, {"split_mode": "none", "main_gpu": 1, "ctx_size": 4096}, gpus)

    a, b = row.shares
    assert a.weights + b.weights == pytest.approx(on_gpu, abs=64)
    assert a.weights == pytest.approx(on_gpu / 2, abs=64)
    assert (a.kv_cache, b.kv_cache) == (0, 28 * 4096 * 4 * 128 * 2 * 2)  # KV stays on the main GPU
    (only,) = none.shares
    assert (only.gpu, only.weights) == ("b", on_gpu)


def test_llamacpp_without_flash_attention_needs_the_score_matrix(qwen7_gguf: ModelShape) -> None:
    gpus = [GpuSlot("big", 24 * GIB)]
    flash = estimate(qwen7_gguf, Engine.LLAMACPP, {"ctx_size": 32768}, gpus).shares[0]
    plain = estimate(qwen7_gguf, Engine.LLAMACPP, {"ctx_size": 32768, "flash_attn": "off"}, gpus).shares[0]
    assert plain.compute - flash.compute == 4 * 512 * 32768 * 28  # f32 scores: ubatch x context x heads


def test_cpu_moe_keeps_experts_in_host_memory(tmp_path: Path) -> None:
    folder = tmp_path / "oss"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(gpt_oss_120b_config()))
    write_safetensors(folder / "model.safetensors", gpt_oss_120b_tensors())
    shape = read_model_shape(folder)
    gpu = [GpuSlot("big", 32 * GIB)]

    everything = estimate(shape, Engine.LLAMACPP, {"ctx_size": 32768}, gpu)
    cpu_moe = estimate(shape, Engine.LLAMACPP, {"ctx_size": 32768, "cpu_moe": True}, gpu)
    some = estimate(shape, Engine.LLAMACPP, {"ctx_size": 32768, "n_cpu_moe": 20}, gpu)

    experts = sum(shape.layer_expert_bytes)
    assert everything.shares[0].weights - cpu_moe.shares[0].weights == experts
    assert everything.shares[0].weights - some.shares[0].weights == sum(shape.layer_expert_bytes[:20])
    assert everything.total > 32 * GIB > cpu_moe.total  # the 120B model fits a 32 GB card only with --cpu-moe
    assert any("experts of 36 blocks" in note for note in cpu_moe.notes)


def test_ollama_uses_its_defaults_and_its_variables(qwen7_gguf: ModelShape) -> None:
    gpus = [GpuSlot("big", 24 * GIB)]
    default = estimate(qwen7_gguf, Engine.OLLAMA, {}, gpus).shares[0]
    assert default.kv_cache == 4096 * KV_PER_TOKEN_QWEN7_F16

    tuned = estimate(qwen7_gguf, Engine.OLLAMA, {"num_parallel": 2, "kv_cache_type": "q8_0"}, gpus, context=8192)
    assert tuned.shares[0].kv_cache == 28 * round(2 * 8192 * 4 * 128 * 2 * 34 / 32)


@pytest.mark.parametrize(
    "args",
    [
        {"ctx_size": "lots"},
        {"ctx_size": -5},
        {"ctx_size": "nan"},
        {"ctx_size": 1e30},
        {"cache_type_k": "q3_x"},
        {"tensor_split": "1,x"},
        {"tensor_split": "0,0"},
        {"split_mode": "diagonal"},
        {"n_gpu_layers": "many"},
    ],
)
def test_unreadable_llamacpp_arguments_are_refusals_not_crashes(
    qwen7_gguf: ModelShape, args: dict[str, object]
) -> None:
    footprint = estimate(qwen7_gguf, Engine.LLAMACPP, args, [GpuSlot("a", 8 * GIB), GpuSlot("b", 8 * GIB)])  # type: ignore[arg-type]
    assert len(footprint.refusals) == 1
    assert next(iter(args)).replace("_", "-") in footprint.refusals[0]
    assert footprint.total > 0


# ---- vLLM -------------------------------------------------------------------------------------------------


def test_vllm_footprint_is_utilization_times_total_when_it_fits(tmp_path: Path) -> None:
    shape = _awq(tmp_path, "14B")
    gpu = GpuSlot("gpu1", 24 * GIB)
    args = {"gpu_memory_utilization": 0.9, "max_num_seqs": 16, "max_num_batched_tokens": 4096}

    footprint = estimate(shape, Engine.VLLM, args, [gpu], context=16384)

    (share,) = footprint.shares
    assert share.total == int(24 * GIB * 0.9)
    assert share.weights == shape.weights_bytes
    assert footprint.refusals == ()
    one_sequence = 48 * 8 * 128 * 2 * 2 * 16384
    assert share.kv_cache > one_sequence
    assert "sequences of max_model_len" in footprint.notes[0]


def test_vllm_tensor_parallel_splits_weights_and_kv_heads(tmp_path: Path) -> None:
    """inference-vm's deep mode: Qwen2.5-32B AWQ across two RTX 3090 with tensor parallel 2."""
    shape = _awq(tmp_path, "32B")
    gpus = [GpuSlot("gpu0", 24 * GIB), GpuSlot("gpu1", 24 * GIB)]
    args = {"gpu_memory_utilization": 0.9, "max_num_seqs": 8, "max_num_batched_tokens": 2048}

    footprint = estimate(shape, Engine.VLLM, args, gpus, context=16384)

    assert [s.gpu for s in footprint.shares] == ["gpu0", "gpu1"]
    assert all(s.total == int(24 * GIB * 0.9) for s in footprint.shares)
    assert footprint.shares[0].weights == -(-shape.weights_bytes // 2)
    assert footprint.refusals == ()


def test_vllm_refuses_a_model_that_leaves_no_room_for_the_cache(tmp_path: Path) -> None:
    shape = _awq(tmp_path, "32B")
    footprint = estimate(shape, Engine.VLLM, {"gpu_memory_utilization": 0.9}, [GpuSlot("small", 16 * GIB)])

    (refusal,) = footprint.refusals
    assert "no memory for the KV cache on GPU small" in refusal
    assert "gpu_memory_utilization 0.9 x 16.0 GiB = 14.4 GiB" in refusal
    assert "weights take 18.0 GiB" in refusal


def test_vllm_refuses_a_max_model_len_whose_sequence_does_not_fit(tmp_path: Path) -> None:
    shape = _awq(tmp_path, "7B")
    footprint = estimate(
        shape, Engine.VLLM, {"gpu_memory_utilization": 0.5, "max_model_len": 131072}, [GpuSlot("g", 16 * GIB)]
    )

    (refusal,) = footprint.refusals
    assert "max_model_len 131072 on GPU g" in refusal
    assert "one sequence needs 7.0 GiB of KV cache" in refusal  # 28 x 4 x 128 x 2 x 2 bytes x 131072 tokens
    assert "0.5 x 16.0 GiB = 8.0 GiB" in refusal


def test_vllm_defaults_max_model_len_to_the_model_and_fp8_halves_the_cache(tmp_path: Path) -> None:
    shape = _awq(tmp_path, "7B")
    gpu = [GpuSlot("g", 16 * GIB)]
    auto = estimate(shape, Engine.VLLM, {"gpu_memory_utilization": 0.7}, gpu)
    fp8 = estimate(shape, Engine.VLLM, {"gpu_memory_utilization": 0.7, "kv_cache_dtype": "fp8"}, gpu)
    assert auto.refusals == fp8.refusals == ()
    auto_fits = int(auto.notes[0].split("holds ")[1].split()[0])
    fp8_fits = int(fp8.notes[0].split("holds ")[1].split()[0])
    assert fp8_fits in {2 * auto_fits, 2 * auto_fits + 1}


def test_vllm_needs_as_many_gpus_as_tensor_parallel(tmp_path: Path) -> None:
    shape = _awq(tmp_path, "7B")
    footprint = estimate(shape, Engine.VLLM, {"tensor_parallel_size": 2}, [GpuSlot("g", 24 * GIB)])
    assert any("tensor_parallel_size 2 needs 2 GPUs" in r for r in footprint.refusals)


@pytest.mark.parametrize("value", [0, 1.5, "most", "nan", True])
def test_vllm_unreadable_utilization_is_a_refusal(tmp_path: Path, value: object) -> None:
    shape = _awq(tmp_path, "7B")
    footprint = estimate(shape, Engine.VLLM, {"gpu_memory_utilization": value}, [GpuSlot("g", 24 * GIB)])  # type: ignore[dict-item]
    if value is True:  # a bare flag has no number: the default applies
        assert footprint.refusals == ()
    else:
        assert any("gpu-memory-utilization" in r for r in footprint.refusals)


def test_declared_vram_overrides_and_says_so() -> None:
    footprint = declared(Engine.LLAMACPP, 11 * GIB, [GpuSlot("big", 16 * GIB), GpuSlot("small", 8 * GIB)])
    assert footprint.source is FootprintSource.DECLARED
    assert (footprint.on("big"), footprint.on("small"), footprint.total) == (11 * GIB, 11 * GIB, 22 * GIB)


def test_no_gpus_is_an_empty_footprint(qwen7_gguf: ModelShape) -> None:
    assert estimate(qwen7_gguf, Engine.LLAMACPP, {}, []) == Footprint(
        Engine.LLAMACPP, FootprintSource.ESTIMATED, (), 0, 29
    )


def test_a_shape_with_more_blocks_than_layer_sizes_does_not_crash() -> None:
    shape = _shape(block_count=6)  # 4 sizes for 6 blocks: the missing ones count 0
    assert estimate(shape, Engine.LLAMACPP, {}, [GpuSlot("g", 8 * GIB)]).shares[0].weights == 4 * 100 * MIB + 60 * MIB


# ---- the fit check --------------------------------------------------------------------------------------


def test_over_commitment_is_diagnosed_with_the_numbers() -> None:
    big = GpuCapacity("big", vram=16 * GIB)
    placements = [
        Placement("big", "qwen-14b", int(11.2 * GIB), FootprintSource.DECLARED),
        Placement("big", "llama-8b", int(6.1 * GIB), FootprintSource.ESTIMATED),
    ]
    stranger = ForeignProcess("big", pid=4242, used_memory=int(1.4 * GIB), name="/usr/bin/python3")

    (fit,) = check_fit([big], placements, foreign=[stranger])

    assert not fit.fits
    assert fit.problems == (
        "GPU big (16.0 GiB): qwen-14b 11.2 GiB + llama-8b 6.1 GiB + pid 4242 (not managed) 1.4 GiB = 18.7 GiB, "
        "over by 2.7 GiB",
    )
    assert fit.basis == "qwen-14b: declared vram; llama-8b: estimated from its files"


def test_a_fitting_gpu_has_no_problems_and_the_reserve_counts() -> None:
    placements = [Placement("big", "qwen-7b", 14 * GIB, FootprintSource.ESTIMATED)]
    (roomy,) = check_fit([GpuCapacity("big", vram=16 * GIB)], placements)
    (reserved,) = check_fit([GpuCapacity("big", vram=16 * GIB, reserve=3 * GIB)], placements)

    assert roomy.fits
    assert (roomy.capacity, roomy.demand) == (16 * GIB, 14 * GIB)
    assert reserved.problems == ("GPU big (16.0 GiB, 3.0 GiB reserved): qwen-7b 14.0 GiB = 14.0 GiB, over by 1.0 GiB",)


def test_nvml_total_below_the_label_is_the_size() -> None:
    card = GpuCapacity("big", vram=16 * GIB, nvml_total=15 * GIB + 900 * MIB)
    (fit,) = check_fit([card], [Placement("big", "m", 16 * GIB - 50 * MIB, FootprintSource.DECLARED)])
    assert fit.problems[0].startswith("GPU big (15.9 GiB): m 16.0 GiB")


def test_live_check_counts_what_the_plan_frees() -> None:
    """A switch: qwen-7b stops (frees 14 GiB), qwen-14b starts; NVML shows 1 GiB free while qwen-7b still runs."""
    big = GpuCapacity("big", vram=16 * GIB, nvml_total=16 * GIB, nvml_free=1 * GIB)
    starting = [Placement("big", "qwen-14b", 12 * GIB, FootprintSource.ESTIMATED)]

    (fits,) = check_fit([big], starting, releases=[Release("big", "qwen-7b", 14 * GIB)])
    (short,) = check_fit([big], starting, releases=[Release("big", "qwen-7b", 10 * GIB)])
    (nothing_freed,) = check_fit([big], starting)

    assert fits.fits
    assert short.problems == (
        "GPU big (16.0 GiB) now: qwen-14b 12.0 GiB would start, NVML shows 1.0 GiB free "
        "+ 10.0 GiB freed by stopping qwen-7b = 11.0 GiB, short by 1.0 GiB",
    )
    assert not nothing_freed.fits


def test_live_check_leaves_running_models_alone() -> None:
    big = GpuCapacity("big", vram=16 * GIB, nvml_free=2 * GIB)
    running = [Placement("big", "qwen-7b", 13 * GIB, FootprintSource.ESTIMATED, running=True)]
    (fit,) = check_fit([big], running)
    assert fit.fits


def test_foreign_memory_not_reported_is_said_and_counted_zero() -> None:
    small = GpuCapacity("small", vram=4 * GIB)
    placed = [Placement("small", "whisper", 5 * GIB, FootprintSource.DECLARED)]
    (fit,) = check_fit([small], placed, foreign=[ForeignProcess("small", 77, None)])
    assert fit.problems == (
        "GPU small (4.0 GiB): whisper 5.0 GiB + pid 77 (not managed) memory not reported = 5.0 GiB, over by 1.0 GiB",
    )


def test_a_lost_gpu_takes_nothing() -> None:
    lost = GpuCapacity("small", vram=4 * GIB, lost=True)
    (with_work,) = check_fit([lost], [Placement("small", "plex", 1 * GIB, FootprintSource.DECLARED)])
    (idle,) = check_fit([lost], [])
    assert with_work.problems == (
        "GPU small is lost (NVML_ERROR_GPU_IS_LOST): plex cannot run there until it is reset",
    )
    assert idle.fits


def test_each_gpu_gets_its_own_verdict_in_order() -> None:
    gpus = [GpuCapacity("a", vram=8 * GIB), GpuCapacity("b", vram=8 * GIB)]
    placed = [
        Placement("b", "x", 9 * GIB, FootprintSource.DECLARED),
        Placement("a", "y", 1 * GIB, FootprintSource.DECLARED),
        Placement("elsewhere", "z", 99 * GIB, FootprintSource.DECLARED),
    ]
    a, b = check_fit(gpus, placed)
    assert (a.gpu, a.fits, b.gpu, b.fits) == ("a", True, "b", False)


# ---- declared or estimated: what the plan uses ------------------------------------------------------


def _model(**fields: object) -> Model:
    return Model.model_validate({"name": "qwen-7b", "host": "infer", "port": 8000, "source": "/models/q", **fields})


def test_a_declared_vram_wins_over_the_files(qwen7_gguf: ModelShape) -> None:
    footprint = footprint_of(_model(engine="llamacpp", vram="6GiB"), [GpuSlot("big", 16 * GIB)], qwen7_gguf)
    assert (footprint.source, footprint.total) == (FootprintSource.DECLARED, 6 * GIB)


def test_the_estimate_is_used_when_nothing_is_declared(qwen7_gguf: ModelShape) -> None:
    model = _model(engine="llamacpp", context=4096, args={"cache_type_k": "q8_0"})
    footprint = footprint_of(model, [GpuSlot("big", 16 * GIB)], qwen7_gguf)
    assert footprint == estimate(qwen7_gguf, Engine.LLAMACPP, model.args, [GpuSlot("big", 16 * GIB)], context=4096)


def test_unreadable_files_without_vram_are_a_refusal_not_zero() -> None:
    footprint = footprint_of(_model(engine="llamacpp"), [GpuSlot("big", 16 * GIB)], None, unread="no model file")
    assert footprint.total == 0
    (refusal,) = footprint.refusals
    assert refusal.startswith("Model qwen-7b: its files could not be read (no model file) and it declares no 'vram'")
    assert "/models/q" in refusal


def test_vllm_without_readable_files_still_books_its_share() -> None:
    model = _model(engine="vllm", args={"gpu_memory_utilization": 0.88})
    footprint = footprint_of(model, [GpuSlot("gpu0", 24 * GIB)], None, unread="on the GPU host")
    assert footprint.refusals == ()
    assert footprint.on("gpu0") == int(24 * GIB * 0.88)
    assert "not checked" in footprint.notes[0]

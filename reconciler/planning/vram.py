"""How much VRAM a model takes on each GPU, estimated from the shape of its files and its engine's arguments.

Pure: `backends.modelfiles.read_model_shape()` reads a GGUF file or a
safetensors folder into a `ModelShape` (sizes as the files declare them, never
the weights themselves); `estimate()` turns a shape, an engine and its
arguments into a `Footprint` per GPU. The planner compares footprints with
what each GPU holds (`planning.gpufit`), so a placement that cannot fit is
refused in the plan, before anything is stopped. A declared `vram` on the
Model overrides the estimate (`declared()`), and the footprint says which.

What is counted, per engine (sources: llama.cpp `src/llama-model.cpp`,
`src/llama-kv-cache.cpp`; vLLM `vllm/worker/gpu_worker.py`, the engine
arguments documentation):

- llama.cpp (`llama-server`): the weights of the offloaded layers
  (`--n-gpu-layers`; the last N repeating layers, then the output layer as
  layer N+1; the token embeddings stay in host memory), with MoE experts kept
  on the CPU by `--cpu-moe` / `--n-cpu-moe N`; the KV cache for `--ctx-size`
  tokens (shared by every `--parallel` slot) at `--cache-type-k/-v` on the GPU
  of each offloaded layer; a compute buffer (the logits of one micro-batch on
  the GPU with the output layer, the activations on every GPU with layers,
  and without flash attention the K·Q matrix); and a CUDA context per GPU.
  Layers are split across GPUs as `--split-mode layer` does, in proportion to
  `--tensor-split` (default: each GPU's size); `row` splits each layer's
  weights in that proportion and keeps the KV cache and buffers on
  `--main-gpu`; `none` puts everything on `--main-gpu`.
- Ollama: llama.cpp with Ollama's defaults (context 4096, one parallel slot
  per `OLLAMA_NUM_PARALLEL`, `OLLAMA_KV_CACHE_TYPE`, every layer offloaded).
- vLLM: each GPU of the tensor-parallel group holds `gpu_memory_utilization`
  x its total, whatever the model: that is the footprint. Inside it go the
  weights / TP, the profiled activations, CUDA graphs and the CUDA context;
  the rest becomes KV cache, which must hold at least one sequence of
  `max_model_len` tokens, or vLLM refuses to start ("No available memory for
  the cache blocks", "The model's max seq len ... is larger than the maximum
  number of tokens that can be stored in KV cache"). The estimate refuses
  first, with the numbers (`Footprint.refusals`).

The activation, graph and context terms are approximations (documented at
their constants); the weights and the KV cache are exact for the files and
arguments given.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import assert_never

from reconciler.spec.models import Engine, Model

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "DEFAULT_LLAMACPP_CONTEXT",
    "DEFAULT_OLLAMA_CONTEXT",
    "DEFAULT_VLLM_UTILIZATION",
    "Footprint",
    "FootprintSource",
    "GpuShare",
    "GpuSlot",
    "ModelFormat",
    "ModelShape",
    "declared",
    "estimate",
    "footprint_of",
    "gib",
    "kv_cache_bytes",
]

GIB = 1024**3
MIB = 1024**2

# A CUDA context with cuBLAS handles: ~300-500 MiB per process and GPU on current drivers; the high end.
CUDA_CONTEXT_BYTES = 512 * MIB
DEFAULT_LLAMACPP_CONTEXT = 8192  # what planning.containers passes as --ctx-size when the Model says nothing
DEFAULT_OLLAMA_CONTEXT = 4096  # Ollama's default num_ctx
DEFAULT_VLLM_UTILIZATION = 0.9
DEFAULT_UBATCH = 512  # llama.cpp --ubatch-size
DEFAULT_VLLM_BATCHED_TOKENS = 8192  # vLLM profiles a forward pass of this many tokens (V1 default, online serving)
DEFAULT_VLLM_MAX_SEQS = 256
VLLM_BLOCK_TOKENS = 16  # KV cache pages hold 16 tokens: a sequence takes whole pages
# vLLM's profiled activations: about this many bytes per token per unit of hidden size (fp16 hidden states,
# residual, MLP intermediates), plus the sampler's logits (fp32) for every sequence.
VLLM_ACTIVATION_FACTOR = 18
VLLM_CUDA_GRAPHS_BYTES = 512 * MIB  # captured graphs' pool for the default capture sizes

# Bytes per element of a KV cache type, as ggml lays the type out (block bytes / block elements).
_KV_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}


class ModelFormat(enum.StrEnum):
    GGUF = "gguf"
    SAFETENSORS = "safetensors"


class FootprintSource(enum.StrEnum):
    """Where a footprint's number came from; the plan names it."""

    DECLARED = "declared"  # the Model's `vram`
    ESTIMATED = "estimated"  # from the model's files and engine arguments


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A model as its files describe it: the numbers the estimate needs, sizes in bytes as declared."""

    format: ModelFormat
    architecture: str
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int
    key_length: int  # per head
    value_length: int  # per head
    context_length: int  # the longest context the model was made for
    vocab_size: int
    layer_bytes: tuple[int, ...]  # each repeating block, experts included
    input_bytes: int  # token embeddings
    output_bytes: int  # final norm and output head
    layer_expert_bytes: tuple[int, ...] = ()  # the MoE expert tensors within each block; () when dense
    expert_count: int = 0
    expert_used_count: int = 0
    dtype_bytes: float = 2.0  # bytes per element of unquantised activations and of vLLM's "auto" KV cache
    quantization: str | None = None  # GGUF file type, or the safetensors config's quant_method
    type_bytes: Mapping[str, int] = field(default_factory=dict)  # tensor type -> bytes of that type
    path: str = ""
    read_through: str = ""  # the host access the files were read through (ssh://user@host:22); "" when local

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.input_bytes + self.output_bytes

    def expert_bytes(self, layer: int) -> int:
        return self.layer_expert_bytes[layer] if layer < len(self.layer_expert_bytes) else 0


@dataclass(frozen=True, slots=True)
class GpuSlot:
    """One GPU a model is placed on: its name in the spec and its total VRAM in bytes."""

    name: str
    total: int


@dataclass(frozen=True, slots=True)
class GpuShare:
    """What one model takes on one GPU, by term."""

    gpu: str
    weights: int = 0
    kv_cache: int = 0
    compute: int = 0
    overhead: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead


@dataclass(frozen=True, slots=True)
class Footprint:
    """A model's VRAM on each of its GPUs. `refusals` say why the engine would not start as configured."""

    engine: Engine
    source: FootprintSource
    shares: tuple[GpuShare, ...]
    layers_on_gpu: int = 0  # llama.cpp / Ollama: offloaded layers, output layer included
    layers_total: int = 0
    refusals: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    read_through: str = ""  # the estimate's files were read through this host access ("" when local)

    @property
    def total(self) -> int:
        return sum(share.total for share in self.shares)

    def on(self, gpu: str) -> int:
        return sum(share.total for share in self.shares if share.gpu == gpu)


def gib(size: float) -> str:
    """`11.2 GiB`: one decimal, the way diagnostics show sizes."""
    return f"{size / GIB:.1f} GiB"


def declared(engine: Engine, vram: int, gpus: Sequence[GpuSlot]) -> Footprint:
    """The footprint a Model's `vram` declares: that much on each of its GPUs."""
    return Footprint(
        engine=engine,
        source=FootprintSource.DECLARED,
        shares=tuple(GpuShare(gpu=gpu.name, weights=vram) for gpu in gpus),
    )


def footprint_of(
    model: Model, gpus: Sequence[GpuSlot], shape: ModelShape | None, *, unread: str | None = None
) -> Footprint:
    """The footprint the plan uses for `model` on `gpus`: its declared `vram`, else the estimate.

    `shape` is None when the model's files could not be read (`unread` says why). Then a declared
    `vram` is required: without one the footprint carries a refusal saying so, never a silent 0.
    vLLM is the exception: its footprint is `gpu_memory_utilization` x total whatever the files say,
    so only the check that the model fits inside it is skipped, with a note.
    """
    if model.vram is not None:
        return declared(model.engine, model.vram, gpus)
    if shape is not None:
        found = estimate(shape, model.engine, model.args, gpus, context=model.context)
        return replace(found, read_through=shape.read_through) if shape.read_through else found
    why = f" ({unread})" if unread else ""
    if model.engine is Engine.VLLM:
        options = _Options.of(model.args)
        utilization = options.number("gpu-memory-utilization", low=0.01, high=1.0) or DEFAULT_VLLM_UTILIZATION
        return Footprint(
            engine=model.engine,
            source=FootprintSource.ESTIMATED,
            shares=tuple(GpuShare(gpu=g.name, kv_cache=int(g.total * utilization)) for g in gpus),
            refusals=tuple(options.problems),
            notes=(f"the files of {model.name} could not be read{why}: whether the model fits is not checked",),
        )
    refusal = (
        f"Model {model.name}: its files could not be read{why} and it declares no 'vram'; declare 'vram' "
        f"(its footprint per GPU), or make {model.source} readable where the reconciler runs "
        "or through its Docker host's SSH access"
    )
    return Footprint(engine=model.engine, source=FootprintSource.ESTIMATED, shares=(), refusals=(refusal,))


def kv_cache_bytes(shape: ModelShape, tokens: int, *, k_bytes: float, v_bytes: float, layers: int) -> int:
    """The KV cache of `layers` blocks for `tokens` tokens: per token, K and V of every KV head."""
    per_token = shape.head_count_kv * (shape.key_length * k_bytes + shape.value_length * v_bytes)
    return math.ceil(per_token * tokens) * layers


def estimate(
    shape: ModelShape,
    engine: Engine,
    args: Mapping[str, str | int | float | bool],
    gpus: Sequence[GpuSlot],
    *,
    context: int | None = None,
) -> Footprint:
    """The footprint of `shape` served by `engine` with `args` (the Model's `args`) on `gpus`, in order.

    `context` is the Model's `context`; an argument that sets it wins, as on the engine's command line.
    Never raises for odd arguments: an argument it cannot read is named in the footprint's refusals.
    """
    options = _Options.of(args)
    match engine:
        case Engine.VLLM:
            return _vllm(shape, options, gpus, context)
        case Engine.LLAMACPP:
            settings = _LlamaSettings.for_llamacpp(options, context, shape.context_length)
            return _llamacpp(shape, options, gpus, settings)
        case Engine.OLLAMA:
            return _llamacpp(shape, options, gpus, _LlamaSettings.for_ollama(options, context), engine=engine)
        case _:
            assert_never(engine)


# ---- arguments -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Options:
    """Engine arguments with `_` and `-` made alike; what cannot be read is collected, not raised."""

    values: dict[str, str | int | float | bool]
    problems: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, args: Mapping[str, str | int | float | bool]) -> _Options:
        return cls({key.lower().replace("_", "-").lstrip("-"): value for key, value in args.items()})

    def text(self, *names: str) -> str | None:
        for name in names:
            value = self.values.get(name)
            if value is not None and not isinstance(value, bool):
                return str(value).strip().lower()
        return None

    def number(self, *names: str, low: float, high: float) -> float | None:
        raw = self.text(*names)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # also false for NaN
            self.problems.append(f"{names[0]}={raw!r} is not a number from {low:g} to {high:g}")
            return None
        return value

    def integer(self, *names: str, low: int, high: int) -> int | None:
        value = self.number(*names, low=low, high=high)
        return None if value is None else int(value)

    def flag(self, name: str) -> bool:
        value = self.values.get(name)
        return value is True or (isinstance(value, str) and value.strip().lower() in {"1", "true", "on", "yes"})

    def kv_type(self, *names: str) -> float:
        raw = self.text(*names) or "f16"
        if raw not in _KV_TYPE_BYTES:
            self.problems.append(f"{names[0]}={raw!r} is not a KV cache type ({', '.join(_KV_TYPE_BYTES)})")
            return _KV_TYPE_BYTES["f16"]
        return _KV_TYPE_BYTES[raw]


class _Split(enum.StrEnum):
    NONE = "none"
    LAYER = "layer"
    ROW = "row"


@dataclass(frozen=True, slots=True)
class _LlamaSettings:
    context: int
    gpu_layers: int
    k_bytes: float
    v_bytes: float
    flash_attention: bool
    ubatch: int
    split: _Split
    main_gpu: int
    tensor_split: tuple[float, ...]
    cpu_moe_layers: int  # the first N blocks keep their experts in host memory

    @classmethod
    def for_llamacpp(cls, options: _Options, context: int | None, trained: int) -> _LlamaSettings:
        """`trained`: the model's own context length, which `--ctx-size 0` asks for."""
        split_text = options.text("split-mode", "sm") or "layer"
        if split_text not in {s.value for s in _Split}:
            options.problems.append(f"split-mode={split_text!r} is not none, layer or row")
            split_text = "layer"
        cpu_moe = 1 << 30 if options.flag("cpu-moe") else options.integer("n-cpu-moe", low=0, high=1 << 30) or 0
        asked = options.integer("ctx-size", "c", low=0, high=1 << 24)
        return cls(
            context=(trained or DEFAULT_LLAMACPP_CONTEXT)
            if asked == 0
            else asked or context or DEFAULT_LLAMACPP_CONTEXT,
            gpu_layers=_gpu_layers(options),
            k_bytes=options.kv_type("cache-type-k", "ctk"),
            v_bytes=options.kv_type("cache-type-v", "ctv"),
            flash_attention=(options.text("flash-attn", "fa") or "on") not in {"off", "0", "false"},
            ubatch=options.integer("ubatch-size", "ub", low=1, high=1 << 20) or DEFAULT_UBATCH,
            split=_Split(split_text),
            main_gpu=options.integer("main-gpu", "mg", low=0, high=64) or 0,
            tensor_split=_tensor_split(options),
            cpu_moe_layers=cpu_moe,
        )

    @classmethod
    def for_ollama(cls, options: _Options, context: int | None) -> _LlamaSettings:
        # planning.containers turns the Model's args into OLLAMA_<KEY> variables: read them by those keys.
        window = options.integer("context-length", low=1, high=1 << 24) or context or DEFAULT_OLLAMA_CONTEXT
        parallel = options.integer("num-parallel", low=1, high=1024) or 1
        cache = options.kv_type("kv-cache-type")
        return cls(
            context=window * parallel,
            gpu_layers=1 << 30,
            k_bytes=cache,
            v_bytes=cache,
            flash_attention=(options.text("flash-attention") or "1") not in {"0", "false", "off"},
            ubatch=DEFAULT_UBATCH,
            split=_Split.LAYER,
            main_gpu=0,
            tensor_split=(),
            cpu_moe_layers=0,
        )


def _gpu_layers(options: _Options) -> int:
    raw = options.text("n-gpu-layers", "ngl", "gpu-layers")
    if raw in {"all", "auto"}:
        return 1 << 30
    value = options.integer("n-gpu-layers", "ngl", "gpu-layers", low=-1, high=1 << 30)
    return 1 << 30 if value is None or value < 0 else value


def _tensor_split(options: _Options) -> tuple[float, ...]:
    raw = options.text("tensor-split", "ts")
    if raw is None:
        return ()
    try:
        parts = tuple(float(part) for part in raw.replace("/", ",").split(","))
    except ValueError:
        parts = ()
    if not parts or any(not 0 <= part < 1e9 for part in parts) or sum(parts) <= 0:
        options.problems.append(f"tensor-split={raw!r} is not a list of non-negative proportions")
        return ()
    return parts


# ---- llama.cpp and Ollama ------------------------------------------------------------------------


@dataclass(slots=True)
class _Shares:
    """Per-GPU sums while a footprint is built."""

    names: tuple[str, ...]
    weights: list[int]
    kv: list[int]
    compute: list[int]

    @classmethod
    def empty(cls, gpus: Sequence[GpuSlot]) -> _Shares:
        count = len(gpus)
        return cls(tuple(g.name for g in gpus), [0] * count, [0] * count, [0] * count)

    def result(self, *, overhead: int) -> tuple[GpuShare, ...]:
        return tuple(
            GpuShare(gpu=name, weights=w, kv_cache=k, compute=c, overhead=overhead)
            for name, w, k, c in zip(self.names, self.weights, self.kv, self.compute, strict=True)
            if w or k or c
        )


def _proportions(settings: _LlamaSettings, gpus: Sequence[GpuSlot]) -> list[float]:
    raw = list(settings.tensor_split[: len(gpus)]) or [float(g.total) for g in gpus]
    raw += [0.0] * (len(gpus) - len(raw))
    total = sum(raw) or 1.0
    return [part / total for part in raw]


def _device_of(position: int, count: int, proportions: Sequence[float]) -> int:
    """llama.cpp's layer split: the first GPU whose cumulative share passes position/count."""
    point, cumulative = position / count, 0.0
    for device, part in enumerate(proportions):
        cumulative += part
        if point < cumulative:
            return device
    return len(proportions) - 1


def _llamacpp(
    shape: ModelShape,
    options: _Options,
    gpus: Sequence[GpuSlot],
    settings: _LlamaSettings,
    *,
    engine: Engine = Engine.LLAMACPP,
) -> Footprint:
    blocks = shape.block_count
    offloaded = min(settings.gpu_layers, blocks + 1)
    if not gpus:
        return Footprint(engine, FootprintSource.ESTIMATED, (), 0, blocks + 1, tuple(options.problems))
    main = min(settings.main_gpu, len(gpus) - 1)
    proportions = _proportions(settings, gpus)
    shares = _Shares.empty(gpus)
    first = blocks - min(offloaded, blocks)
    positions = [*range(first, blocks), *([blocks] if offloaded > blocks else [])]
    kv_layer = kv_cache_bytes(shape, settings.context, k_bytes=settings.k_bytes, v_bytes=settings.v_bytes, layers=1)
    used: set[int] = set()
    for index, layer in enumerate(positions):
        device = main if settings.split is _Split.NONE else _device_of(index, len(positions), proportions)
        weights = shape.output_bytes if layer == blocks else _on_gpu_weights(shape, layer, settings)
        if settings.split is _Split.ROW:
            for row_device, part in enumerate(proportions):
                shares.weights[row_device] += round(weights * part)
            device = main
        else:
            shares.weights[device] += weights
        if layer < blocks:
            shares.kv[device] += kv_layer
        else:
            shares.compute[device] += 4 * settings.ubatch * shape.vocab_size  # the logits of one micro-batch
        used.add(device)
    for device in used or {main}:  # with nothing offloaded, CUDA still keeps a buffer on the main GPU
        shares.compute[device] += _graph_buffer(shape, settings)
    notes = [f"{offloaded} of {blocks + 1} layers on the GPU, context {settings.context} tokens"]
    if settings.cpu_moe_layers and shape.layer_expert_bytes:
        notes.append(f"MoE experts of {min(settings.cpu_moe_layers, blocks)} blocks stay in host memory")
    return Footprint(
        engine=engine,
        source=FootprintSource.ESTIMATED,
        shares=shares.result(overhead=CUDA_CONTEXT_BYTES),
        layers_on_gpu=offloaded,
        layers_total=blocks + 1,
        refusals=tuple(options.problems),
        notes=tuple(notes),
    )


def _on_gpu_weights(shape: ModelShape, layer: int, settings: _LlamaSettings) -> int:
    weights = shape.layer_bytes[layer] if layer < len(shape.layer_bytes) else 0
    if layer < settings.cpu_moe_layers:
        weights -= shape.expert_bytes(layer)
    return max(weights, 0)


def _graph_buffer(shape: ModelShape, settings: _LlamaSettings) -> int:
    """One GPU's compute buffer, sized for one block's graph of a micro-batch (f32 activations).

    Each GPU with layers keeps one; blocks reuse it, so it does not grow with the number of blocks.
    """
    buffer = 4 * settings.ubatch * 4 * shape.embedding_length
    if not settings.flash_attention:  # the K·Q scores of every head for the whole context
        buffer += 4 * settings.ubatch * settings.context * shape.head_count
    return buffer


# ---- vLLM ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _VllmSettings:
    utilization: float
    tensor_parallel: int
    max_model_len: int
    max_num_seqs: int
    batched_tokens: int
    kv_bytes: float

    @classmethod
    def of(cls, shape: ModelShape, options: _Options, gpus: Sequence[GpuSlot], context: int | None) -> _VllmSettings:
        kv_text = options.text("kv-cache-dtype") or "auto"
        kv_bytes = shape.dtype_bytes if kv_text == "auto" else 1.0 if kv_text.startswith("fp8") else 2.0
        return cls(
            utilization=options.number("gpu-memory-utilization", low=0.01, high=1.0) or DEFAULT_VLLM_UTILIZATION,
            tensor_parallel=options.integer("tensor-parallel-size", "tp", low=1, high=64) or max(len(gpus), 1),
            max_model_len=options.integer("max-model-len", low=1, high=1 << 24) or context or shape.context_length,
            max_num_seqs=options.integer("max-num-seqs", low=1, high=1 << 20) or DEFAULT_VLLM_MAX_SEQS,
            batched_tokens=options.integer("max-num-batched-tokens", low=1, high=1 << 24)
            or DEFAULT_VLLM_BATCHED_TOKENS,
            kv_bytes=kv_bytes,
        )


def _vllm(shape: ModelShape, options: _Options, gpus: Sequence[GpuSlot], context: int | None) -> Footprint:
    settings = _VllmSettings.of(shape, options, gpus, context)
    refusals = list(options.problems)
    tp = settings.tensor_parallel
    if len(gpus) < tp:
        refusals.append(f"tensor_parallel_size {tp} needs {tp} GPUs, the model has {len(gpus)}")
    group = gpus[:tp]
    heads = max(shape.head_count_kv // tp, 1)  # KV heads are split across the group, and replicated below one
    per_token = shape.block_count * heads * (shape.key_length + shape.value_length) * settings.kv_bytes
    sequence_tokens = math.ceil(settings.max_model_len / VLLM_BLOCK_TOKENS) * VLLM_BLOCK_TOKENS
    needed_kv = math.ceil(per_token * sequence_tokens)
    weights = math.ceil(shape.weights_bytes / tp)
    activations = math.ceil(
        settings.batched_tokens * shape.embedding_length * VLLM_ACTIVATION_FACTOR / tp
        + settings.max_num_seqs * shape.vocab_size * 4
    )
    fixed = weights + activations + VLLM_CUDA_GRAPHS_BYTES + CUDA_CONTEXT_BYTES
    shares, notes = [], []
    for gpu in group:
        budget = int(gpu.total * settings.utilization)
        room = budget - fixed
        if room <= 0:
            refusals.append(_no_cache(gpu, settings, budget, weights, activations))
        elif room < needed_kv:
            refusals.append(_short_cache(gpu, settings, budget, room, needed_kv))
        elif per_token:
            notes.append(f"GPU {gpu.name}: KV cache {gib(room)} holds {room // needed_kv} sequences of max_model_len")
        shares.append(
            GpuShare(
                gpu=gpu.name,
                weights=min(weights, budget),
                kv_cache=max(room, 0),
                compute=min(activations + VLLM_CUDA_GRAPHS_BYTES, max(budget - weights, 0)),
                overhead=min(CUDA_CONTEXT_BYTES, max(budget - weights - activations - VLLM_CUDA_GRAPHS_BYTES, 0)),
            )
        )
    source = FootprintSource.ESTIMATED
    return Footprint(Engine.VLLM, source, tuple(shares), refusals=tuple(refusals), notes=tuple(notes))


def _no_cache(gpu: GpuSlot, settings: _VllmSettings, budget: int, weights: int, activations: int) -> str:
    return (
        f"vLLM would find no memory for the KV cache on GPU {gpu.name}: gpu_memory_utilization "
        f"{settings.utilization:g} x {gib(gpu.total)} = {gib(budget)}, but the weights take {gib(weights)}, "
        f"activations and CUDA graphs {gib(activations + VLLM_CUDA_GRAPHS_BYTES)} and the CUDA context "
        f"{gib(CUDA_CONTEXT_BYTES)}; raise gpu_memory_utilization, add GPUs (tensor_parallel_size) "
        f"or use a smaller or quantised model"
    )


def _short_cache(gpu: GpuSlot, settings: _VllmSettings, budget: int, room: int, needed: int) -> str:
    return (
        f"vLLM would refuse max_model_len {settings.max_model_len} on GPU {gpu.name}: one sequence needs "
        f"{gib(needed)} of KV cache, only {gib(room)} is left within gpu_memory_utilization "
        f"{settings.utilization:g} x {gib(gpu.total)} = {gib(budget)}; lower max_model_len, raise "
        f"gpu_memory_utilization or use kv_cache_dtype fp8"
    )

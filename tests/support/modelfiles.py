"""Model files for the VRAM tests: GGUF files written with the `gguf` package, safetensors headers by hand.

Both describe a model of any size while taking almost no disk: tensors are
declared (name, shape, type) and the file is then extended to the length its
tensor table promises, sparsely (`truncate`), so a reader that checks lengths
finds a whole file, and nothing reads the zeros. GGUFWriter's
`add_tensor_info` declares a tensor without its data, which is what makes a
"70B" file of a few kilobytes possible.

Layouts of real models live here too (Qwen2.5 7B/14B/32B, gpt-oss-120b), taken
from their published config.json files, so tests can compare the estimator's
weight term with the sizes their model cards and repositories publish.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

__all__ = [
    "QWEN25",
    "QwenLayout",
    "Tensor",
    "gpt_oss_120b_tensors",
    "qwen_awq_tensors",
    "qwen_bf16_tensors",
    "qwen_gguf_tensors",
    "write_gguf",
    "write_safetensors",
]


@dataclass(frozen=True)
class Tensor:
    """A declared tensor: shape in row-major order (outermost first), and its type."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # a GGML type name (Q4_K, F32, ...) for GGUF; a safetensors dtype (BF16, I32, U8, ...) otherwise


def write_gguf(path: Path, arch: str, metadata: Mapping[str, int | str], tensors: Iterable[Tensor]) -> Path:
    """A GGUF file with this metadata and these tensors declared, extended sparsely to its full length."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    data = 0
    for tensor in tensors:
        kind = gguf.GGMLQuantizationType[tensor.dtype]
        block, size = gguf.GGML_QUANT_SIZES[kind]
        elements = int(np.prod(tensor.shape))
        assert elements % block == 0, f"{tensor.name}: {elements} elements are not whole {kind.name} blocks"
        nbytes = elements // block * size
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float16), nbytes, raw_dtype=kind)
        data += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    start = gguf.GGUFWriter.ggml_pad(path.stat().st_size, writer.data_alignment)
    with path.open("r+b") as handle:
        handle.truncate(start + data)
    return path


_ST_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "U8": 1}


def write_safetensors(path: Path, tensors: Iterable[Tensor], *, extend: bool = True) -> Path:
    """A safetensors file: 8-byte little-endian header length, the JSON header, then (sparse) data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        size = int(np.prod(tensor.shape)) * _ST_BYTES[tensor.dtype]
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        if extend:
            handle.truncate(8 + len(raw) + offset)
    return path


# ---- real layouts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QwenLayout:
    """The numbers of a Qwen2.5 config.json that fix its tensor shapes."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 152064
    context: int = 32768

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def config(self) -> dict[str, Any]:
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "num_hidden_layers": self.layers,
            "hidden_size": self.hidden,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.context,
            "torch_dtype": "bfloat16",
            "tie_word_embeddings": False,
        }


# config.json of Qwen/Qwen2.5-{7B,14B,32B}-Instruct on huggingface.co.
QWEN25 = {
    "7B": QwenLayout(layers=28, hidden=3584, heads=28, kv_heads=4, intermediate=18944),
    "14B": QwenLayout(layers=48, hidden=5120, heads=40, kv_heads=8, intermediate=13824),
    "32B": QwenLayout(layers=64, hidden=5120, heads=40, kv_heads=8, intermediate=27648),
}


def _qwen_linear(q: QwenLayout) -> list[tuple[str, int, int]]:
    """(name, out, in) of each block's matrices, in the Hugging Face names."""
    return [
        ("self_attn.q_proj", q.hidden, q.hidden),
        ("self_attn.k_proj", q.kv_width, q.hidden),
        ("self_attn.v_proj", q.kv_width, q.hidden),
        ("self_attn.o_proj", q.hidden, q.hidden),
        ("mlp.gate_proj", q.intermediate, q.hidden),
        ("mlp.up_proj", q.intermediate, q.hidden),
        ("mlp.down_proj", q.hidden, q.intermediate),
    ]


def _qwen_small(q: QwenLayout, layer: int, dtype: str) -> list[Tensor]:
    prefix = f"model.layers.{layer}"
    return [
        Tensor(f"{prefix}.self_attn.q_proj.bias", (q.hidden,), dtype),
        Tensor(f"{prefix}.self_attn.k_proj.bias", (q.kv_width,), dtype),
        Tensor(f"{prefix}.self_attn.v_proj.bias", (q.kv_width,), dtype),
        Tensor(f"{prefix}.input_layernorm.weight", (q.hidden,), dtype),
        Tensor(f"{prefix}.post_attention_layernorm.weight", (q.hidden,), dtype),
    ]


def qwen_bf16_tensors(q: QwenLayout) -> list[Tensor]:
    """Qwen2.5 in BF16, as the original repositories ship it."""
    tensors = [Tensor("model.embed_tokens.weight", (q.vocab, q.hidden), "BF16")]
    for layer in range(q.layers):
        for name, rows, cols in _qwen_linear(q):
            tensors.append(Tensor(f"model.layers.{layer}.{name}.weight", (rows, cols), "BF16"))
        tensors += _qwen_small(q, layer, "BF16")
    tensors += [Tensor("model.norm.weight", (q.hidden,), "BF16"), Tensor("lm_head.weight", (q.vocab, q.hidden), "BF16")]
    return tensors


def qwen_awq_tensors(q: QwenLayout, group: int = 128) -> list[Tensor]:
    """Qwen2.5 AWQ (4-bit, group 128, GEMM layout): int32 qweight/qzeros packing 8 values, fp16 scales."""
    tensors = [Tensor("model.embed_tokens.weight", (q.vocab, q.hidden), "F16")]
    for layer in range(q.layers):
        for name, rows, cols in _qwen_linear(q):
            prefix = f"model.layers.{layer}.{name}"
            tensors += [
                Tensor(f"{prefix}.qweight", (cols, rows // 8), "I32"),
                Tensor(f"{prefix}.qzeros", (cols // group, rows // 8), "I32"),
                Tensor(f"{prefix}.scales", (cols // group, rows), "F16"),
            ]
        tensors += _qwen_small(q, layer, "F16")
    tensors += [Tensor("model.norm.weight", (q.hidden,), "F16"), Tensor("lm_head.weight", (q.vocab, q.hidden), "F16")]
    return tensors


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's Q4_K_M rule (`use_more_bits`): these blocks keep attn_v and ffn_down at Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def qwen_gguf_tensors(q: QwenLayout) -> list[Tensor]:
    """Qwen2.5 as llama.cpp's convert + quantize Q4_K_M lays it out (GGUF names, GGML types)."""
    tensors = [Tensor("token_embd.weight", (q.vocab, q.hidden), "Q4_K")]
    gguf_names = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    for layer in range(q.layers):
        for gguf_name, (_, rows, cols) in zip(gguf_names, _qwen_linear(q), strict=True):
            upgraded = gguf_name in {"attn_v", "ffn_down"} and _more_bits(layer, q.layers)
            tensors.append(Tensor(f"blk.{layer}.{gguf_name}.weight", (rows, cols), "Q6_K" if upgraded else "Q4_K"))
        tensors += [
            Tensor(f"blk.{layer}.attn_q.bias", (q.hidden,), "F32"),
            Tensor(f"blk.{layer}.attn_k.bias", (q.kv_width,), "F32"),
            Tensor(f"blk.{layer}.attn_v.bias", (q.kv_width,), "F32"),
            Tensor(f"blk.{layer}.attn_norm.weight", (q.hidden,), "F32"),
            Tensor(f"blk.{layer}.ffn_norm.weight", (q.hidden,), "F32"),
        ]
    tensors += [Tensor("output_norm.weight", (q.hidden,), "F32"), Tensor("output.weight", (q.vocab, q.hidden), "Q6_K")]
    return tensors


def qwen_gguf_metadata(q: QwenLayout) -> dict[str, int | str]:
    return {
        "qwen2.block_count": q.layers,
        "qwen2.embedding_length": q.hidden,
        "qwen2.feed_forward_length": q.intermediate,
        "qwen2.attention.head_count": q.heads,
        "qwen2.attention.head_count_kv": q.kv_heads,
        "qwen2.context_length": q.context,
        "qwen2.vocab_size": q.vocab,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_K_M),
    }


def gpt_oss_120b_config() -> dict[str, Any]:
    """config.json of openai/gpt-oss-120b (the numbers the estimate reads)."""
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "num_hidden_layers": 36,
        "hidden_size": 2880,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 2880,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "vocab_size": 201088,
        "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4"},
    }


def gpt_oss_120b_tensors(layers: Sequence[int] = range(36)) -> list[Tensor]:
    """gpt-oss-120b's checkpoint: MXFP4 experts (U8 blocks of 32 values in 16 bytes + U8 scales), the rest BF16."""
    hidden, heads, kv, head_dim, experts, vocab = 2880, 64, 8, 64, 128, 201088
    tensors = [Tensor("model.embed_tokens.weight", (vocab, hidden), "BF16")]
    for layer in layers:
        p = f"model.layers.{layer}"
        tensors += [
            Tensor(f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden), "BF16"),
            Tensor(f"{p}.self_attn.q_proj.bias", (heads * head_dim,), "BF16"),
            Tensor(f"{p}.self_attn.k_proj.weight", (kv * head_dim, hidden), "BF16"),
            Tensor(f"{p}.self_attn.k_proj.bias", (kv * head_dim,), "BF16"),
            Tensor(f"{p}.self_attn.v_proj.weight", (kv * head_dim, hidden), "BF16"),
            Tensor(f"{p}.self_attn.v_proj.bias", (kv * head_dim,), "BF16"),
            Tensor(f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim), "BF16"),
            Tensor(f"{p}.self_attn.o_proj.bias", (hidden,), "BF16"),
            Tensor(f"{p}.self_attn.sinks", (heads,), "BF16"),
            Tensor(f"{p}.mlp.router.weight", (experts, hidden), "BF16"),
            Tensor(f"{p}.mlp.router.bias", (experts,), "BF16"),
            Tensor(f"{p}.mlp.experts.gate_up_proj_blocks", (experts, 2 * hidden, hidden // 32, 16), "U8"),
            Tensor(f"{p}.mlp.experts.gate_up_proj_scales", (experts, 2 * hidden, hidden // 32), "U8"),
            Tensor(f"{p}.mlp.experts.gate_up_proj_bias", (experts, 2 * hidden), "BF16"),
            Tensor(f"{p}.mlp.experts.down_proj_blocks", (experts, hidden, hidden // 32, 16), "U8"),
            Tensor(f"{p}.mlp.experts.down_proj_scales", (experts, hidden, hidden // 32), "U8"),
            Tensor(f"{p}.mlp.experts.down_proj_bias", (experts, hidden), "BF16"),
            Tensor(f"{p}.input_layernorm.weight", (hidden,), "BF16"),
            Tensor(f"{p}.post_attention_layernorm.weight", (hidden,), "BF16"),
        ]
    tensors += [Tensor("model.norm.weight", (hidden,), "BF16"), Tensor("lm_head.weight", (vocab, hidden), "BF16")]
    return tensors

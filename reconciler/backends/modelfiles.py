"""Model files: the shape of a GGUF file or a safetensors folder, read from its headers, for the VRAM estimate.

The planner cannot read files (planning is pure), so whoever observes calls
`read_model_shape(path)` for each Model whose files it can reach, and hands
the `ModelShape`s to the planner, which estimates footprints with
`planning.vram`. Only headers are read, never the weights: a GGUF file's
metadata and tensor table through the `gguf` package's `GGUFReader` (a
memory map; tensor data is never touched), and a safetensors file's 8-byte
little-endian header length and JSON header. This is the only module that
imports `gguf`.

Every failure is the project's error, naming the path: `NotFoundError` (no
such file), `PermissionDenied`, `PermanentError` for a file that is not what
it claims or is cut short (a tensor that ends past the end of the file), and
`TemporaryError` for an I/O error that a later pass may not meet. The hint
says what to do: declare `vram` on the Model, or make the file readable where
the reconciler runs.

Ollama keeps models in its own store: `ollama_model_path()` finds the GGUF
blob of a model name (`qwen2.5:7b`) through the store's manifest.
"""

from __future__ import annotations

import errno
import json
import math
import re
import struct
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, assert_never

import gguf

from reconciler.errors import NotFoundError, PermanentError, PermissionDenied, TemporaryError
from reconciler.planning.vram import ModelFormat, ModelShape
from reconciler.spec.models import Engine, Model

__all__ = ["MAX_SAFETENSORS_HEADER", "model_shape", "ollama_model_path", "read_model_shape"]

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit
_MAX_SHARDS = 1024
_MAX_CONFIG_BYTES = 4 * 1024 * 1024
_HINT = "declare 'vram' on the Model, or make its files readable where the reconciler runs"
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SAFETENSORS_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_SAFETENSORS_INPUT = ("embed_tokens.", "wte.", "word_embeddings.", "embed_in.")
_GGUF_INPUT = ("token_embd.", "position_embd.", "token_types.")
# Bytes per element of the safetensors dtypes (F4 and the like are counted from their offsets instead).
_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}
_OLLAMA_REGISTRY = "registry.ollama.ai"
_OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
_OLLAMA_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def read_model_shape(path: str | Path) -> ModelShape:
    """The shape of the model at `path`: a `.gguf` file (the first part of a split one) or a safetensors folder."""
    where = Path(path)
    try:
        if where.is_dir():
            return _safetensors_folder(where)
        if where.suffix == ".safetensors":
            return _safetensors_folder(where.parent)
        return _gguf_model(where)
    except OSError as exc:
        _raise_os(exc, where)


def model_shape(model: Model) -> ModelShape:
    """The shape of a Model's files, where its engine finds them: a GGUF file (llama.cpp), a folder
    (vLLM), or Ollama's store (`models_dir`, its blob for `source`). Raises as `read_model_shape`.
    """
    match model.engine:
        case Engine.LLAMACPP | Engine.VLLM:
            return read_model_shape(model.source)
        case Engine.OLLAMA:
            if model.models_dir is None:
                raise NotFoundError(
                    f"Ollama model {model.source!r} has no models_dir: its store cannot be read",
                    resource=model.ref,
                    hint=_HINT,
                )
            # planning.containers mounts models_dir at /root/.ollama: the store is its models/ folder.
            return read_model_shape(ollama_model_path(Path(model.models_dir) / "models", model.source))
        case _:
            assert_never(model.engine)


def ollama_model_path(store: str | Path, name: str) -> Path:
    """The GGUF blob of Ollama model `name` (`qwen2.5:7b`, `user/model`, `host/ns/model:tag`) in `store`."""
    root = Path(store)
    base, _, tag = name.partition(":")
    parts = base.split("/")
    if len(parts) == 1:
        parts = [_OLLAMA_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [_OLLAMA_REGISTRY, *parts]
    parts.append(tag or "latest")
    if len(parts) != 4 or not all(_OLLAMA_PART.match(part) and ".." not in part for part in parts):
        raise PermanentError(f"{name!r} is not an Ollama model name", resource=name, hint="e.g. qwen2.5:7b")
    manifest = root.joinpath("manifests", *parts)
    try:
        document = json.loads(_read_limited(manifest, _MAX_CONFIG_BYTES))
    except OSError as exc:
        _raise_os(exc, manifest)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PermanentError(f"{manifest} is not an Ollama manifest", resource=str(manifest)) from exc
    layers = document.get("layers") if isinstance(document, dict) else None
    for layer in layers if isinstance(layers, list) else ():
        digest = layer.get("digest") if isinstance(layer, dict) else None
        if layer.get("mediaType") == _OLLAMA_MODEL_LAYER and isinstance(digest, str):
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                break
            return root / "blobs" / digest.replace(":", "-")
    raise PermanentError(f"{manifest} names no model layer", resource=str(manifest), hint=_HINT)


# ---- errors --------------------------------------------------------------------------------------------


def _raise_os(exc: OSError, where: Path) -> NoReturn:
    resource = str(where)
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        raise NotFoundError(f"no model file at {where}", resource=resource, hint=_HINT) from exc
    if isinstance(exc, PermissionError):
        raise PermissionDenied(f"may not read {where}", resource=resource, hint=_HINT) from exc
    if exc.errno in {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.EINTR}:
        raise TemporaryError(f"reading {where} failed: {exc.strerror}", resource=resource) from exc
    raise PermanentError(f"reading {where} failed: {exc.strerror or type(exc).__name__}", resource=resource) from exc


def _corrupt(where: Path, what: str) -> PermanentError:
    return PermanentError(f"{where} {what}", resource=str(where), hint=_HINT)


def _read_limited(path: Path, limit: int) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


# ---- GGUF ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    """Tensor bytes by where they go, while a model's tensors are read."""

    blocks: int
    layers: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    experts: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    types: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    input: int = 0
    output: int = 0

    def add(self, where: Path, name: str, size: int, kind: str, layer: int | None, *, expert: bool) -> None:
        """Count one tensor: in its block, else as input (embeddings, kept in host memory) or output."""
        if size < 0:
            raise _corrupt(where, f"declares tensor {name[:80]!r} with a negative size")
        self.types[kind] += size
        if layer is None:
            if name.startswith(_GGUF_INPUT) or any(marker in name for marker in _SAFETENSORS_INPUT):
                self.input += size
            else:
                self.output += size
            return
        if not 0 <= layer < self.blocks:
            raise _corrupt(where, f"has tensor {name[:80]!r} of layer {layer}, but the model has {self.blocks}")
        self.layers[layer] += size
        if expert:
            self.experts[layer] += size

    def per_layer(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        layers = tuple(self.layers.get(i, 0) for i in range(self.blocks))
        experts = tuple(self.experts.get(i, 0) for i in range(self.blocks)) if self.experts else ()
        return layers, experts


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    """A scalar or string field's value; the largest element of a numeric array (per-layer head counts)."""
    found = reader.get_field(key)
    if found is None or not found.types:
        return None
    kind = found.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        if len(found.types) > 1 and found.types[1] == gguf.GGUFValueType.STRING:
            return len(found.data)
        values = [found.parts[i][0].item() for i in found.data]
        return max(values) if values else None
    value = found.parts[found.data[0]]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8", errors="replace")
    return value[0].item()


def _int_field(reader: gguf.GGUFReader, where: Path, key: str, default: int | None = None) -> int:
    value = _field(reader, key)
    if value is None:
        if default is None:
            raise _corrupt(where, f"has no {key}")
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1 << 40:
        raise _corrupt(where, f"has an unusable {key}: {str(value)[:40]!r}")
    return int(value)


def _gguf_parts(where: Path) -> list[Path]:
    match = _SPLIT.match(where.name)
    if match is None:
        return [where]
    count = int(match["count"])
    if not 1 <= count <= _MAX_SHARDS:
        raise _corrupt(where, f"claims {count} parts")
    return [where.with_name(f"{match['stem']}-{part:05d}-of-{count:05d}.gguf") for part in range(1, count + 1)]


def _open_gguf(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except OSError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, struct.error) as exc:
        raise _corrupt(path, f"is not a readable GGUF file, or is cut short ({type(exc).__name__})") from exc


def _gguf_model(where: Path) -> ModelShape:
    parts = _gguf_parts(where)
    reader = _open_gguf(parts[0])
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or not re.fullmatch(r"[a-z0-9_.-]{1,64}", arch):
        raise _corrupt(where, "names no usable general.architecture")
    tally = _Tally(blocks=_int_field(reader, where, f"{arch}.block_count"))
    for part in parts:
        for tensor in (reader if part == parts[0] else _open_gguf(part)).tensors:
            layer = int(tensor.name.split(".")[1]) if re.match(r"blk\.\d+\.", tensor.name) else None
            expert = "_exps" in tensor.name
            tally.add(part, tensor.name, int(tensor.n_bytes), tensor.tensor_type.name, layer, expert=expert)
    return _gguf_shape(reader, where, arch, tally)


def _gguf_shape(reader: gguf.GGUFReader, where: Path, arch: str, tally: _Tally) -> ModelShape:
    embedding = _int_field(reader, where, f"{arch}.embedding_length")
    heads = _int_field(reader, where, f"{arch}.attention.head_count")
    head_dim = embedding // heads if heads else 0
    vocab = _field(reader, f"{arch}.vocab_size") or _field(reader, "tokenizer.ggml.tokens")
    file_type = _field(reader, "general.file_type")
    layers, experts = tally.per_layer()
    return ModelShape(
        format=ModelFormat.GGUF,
        architecture=arch,
        block_count=tally.blocks,
        embedding_length=embedding,
        head_count=heads,
        head_count_kv=_int_field(reader, where, f"{arch}.attention.head_count_kv", heads),
        key_length=_int_field(reader, where, f"{arch}.attention.key_length", head_dim),
        value_length=_int_field(reader, where, f"{arch}.attention.value_length", head_dim),
        context_length=_int_field(reader, where, f"{arch}.context_length", 0),
        vocab_size=int(vocab) if isinstance(vocab, int) else 0,
        layer_bytes=layers,
        input_bytes=tally.input,
        output_bytes=tally.output,
        layer_expert_bytes=experts,
        expert_count=_int_field(reader, where, f"{arch}.expert_count", 0),
        expert_used_count=_int_field(reader, where, f"{arch}.expert_used_count", 0),
        quantization=_file_type_name(file_type),
        type_bytes=dict(tally.types),
        path=str(where),
    )


def _file_type_name(value: Any) -> str | None:
    if not isinstance(value, int):
        return None
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(value)


# ---- safetensors ------------------------------------------------------------------------------------------


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            document = json.loads(_read_limited(index, 64 * 1024 * 1024))
            names = sorted(set(document["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise _corrupt(index, "is not a safetensors index (a weight_map of tensor -> file)") from exc
        if not names or len(names) > _MAX_SHARDS or not all(isinstance(n, str) and "/" not in n for n in names):
            raise _corrupt(index, "names no usable shard files")
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise NotFoundError(f"no .safetensors files in {folder}", resource=str(folder), hint=_HINT)
    return files[:_MAX_SHARDS]


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor -> dtype, shape, data_offsets) and where its data starts."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise _corrupt(path, "is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if not 2 <= length <= MAX_SAFETENSORS_HEADER:
            raise _corrupt(path, f"declares a header of {length} bytes")
        raw = handle.read(length)
        size = handle.seek(0, 2)
    if len(raw) != length:
        raise _corrupt(path, "is cut short inside its header")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(path, "has a header that is not JSON") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "has a header that is not a JSON object")
    return header, size - 8 - length


def _tensors(path: Path) -> Iterator[tuple[str, str, int]]:
    """(name, dtype, bytes) of each tensor, checked against its shape and the file's length."""
    header, data_length = _header(path)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = str(entry["dtype"]), list(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) or end < begin:
                raise ValueError
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"describes tensor {name[:80]!r} without dtype, shape and data_offsets") from exc
        if end > data_length:
            raise _corrupt(path, f"is cut short: tensor {name[:80]!r} ends past the end of the file")
        item = _DTYPE_BYTES.get(dtype)
        if item is not None and math.prod(shape) * item != end - begin:
            raise _corrupt(path, f"declares tensor {name[:80]!r} of {end - begin} bytes for shape {shape} {dtype}")
        yield name, dtype, end - begin


def _config(folder: Path) -> Mapping[str, Any]:
    path = folder / "config.json"
    try:
        document = json.loads(_read_limited(path, _MAX_CONFIG_BYTES))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(path, "is not a JSON model config") from exc
    if not isinstance(document, dict):
        raise _corrupt(path, "is not a JSON object")
    text = document.get("text_config")  # multimodal models keep the language model's numbers here
    return {**document, **text} if isinstance(text, dict) else document


def _printable(value: Any, limit: int) -> str:
    """A config's text as it may be shown: printable characters only, cut to `limit`."""
    return "".join(c for c in str(value) if c.isprintable())[:limit]


def _number(config: Mapping[str, Any], where: Path, *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 40:
            raise _corrupt(where / "config.json", f"has an unusable {key}: {str(value)[:40]!r}")
        return value
    if default is None:
        raise _corrupt(where / "config.json", f"has no {keys[0]}")
    return default


def _safetensors_folder(folder: Path) -> ModelShape:
    config = _config(folder)
    tally = _Tally(blocks=_number(config, folder, "num_hidden_layers", "n_layer", "num_layers"))
    for path in _safetensors_files(folder):
        for name, dtype, size in _tensors(path):
            match = _SAFETENSORS_LAYER.search(name)
            layer = int(match.group(1)) if match else None
            tally.add(path, name, size, dtype, layer, expert=".experts." in name)
    hidden = _number(config, folder, "hidden_size", "n_embd", "d_model")
    heads = _number(config, folder, "num_attention_heads", "n_head")
    head_dim = _number(config, folder, "head_dim", default=hidden // heads if heads else 0)
    layers, experts = tally.per_layer()
    quantization = config.get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return ModelShape(
        format=ModelFormat.SAFETENSORS,
        architecture=_printable((config.get("architectures") or [config.get("model_type", "unknown")])[0], 64),
        block_count=tally.blocks,
        embedding_length=hidden,
        head_count=heads,
        head_count_kv=_number(config, folder, "num_key_value_heads", default=heads),
        key_length=head_dim,
        value_length=head_dim,
        context_length=_number(config, folder, "max_position_embeddings", "n_positions", default=0),
        vocab_size=_number(config, folder, "vocab_size", default=0),
        layer_bytes=layers,
        input_bytes=tally.input,
        output_bytes=tally.output,
        layer_expert_bytes=experts,
        expert_count=_number(config, folder, "num_local_experts", "num_experts", "n_routed_experts", default=0),
        expert_used_count=_number(config, folder, "num_experts_per_tok", "experts_per_token", default=0),
        dtype_bytes=4.0 if dtype in {"float32", "float"} else 2.0,
        quantization=_printable(method, 40) if method else None,
        type_bytes=dict(tally.types),
        path=str(folder),
    )

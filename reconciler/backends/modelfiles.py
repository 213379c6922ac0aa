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

A file that sits on a remote host (the model's Docker host) is read through `read_remote_model_shape`,
given that host's files (`RemoteFiles`: over SFTP, `backends.ssh.SftpFiles`). Only the heads are
fetched, into a local sparse copy of the same length that the readers above then check as they
check a local file: a GGUF file's first `REMOTE_FIRST_READ` bytes, grown four-fold up to
`REMOTE_MAX_READ` until its metadata and tensor table are whole; each safetensors file's header;
config.json and the shard index. Nothing past the cap is ever requested.

Ollama keeps models in its own store: `ollama_model_path()` finds the GGUF
blob of a model name (`qwen2.5:7b`) through the store's manifest.
"""

from __future__ import annotations

import errno
import json
import math
import re
import struct
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, Protocol, TypeVar, assert_never

import gguf

from reconciler.errors import BackendError, NotFoundError, PermanentError, PermissionDenied, TemporaryError
from reconciler.planning.vram import ModelFormat, ModelShape
from reconciler.spec.models import Engine, Model

__all__ = [
    "MAX_SAFETENSORS_HEADER",
    "REMOTE_FIRST_READ",
    "REMOTE_MAX_READ",
    "RemoteFiles",
    "model_shape",
    "ollama_model_path",
    "read_model_shape",
    "read_remote_model_shape",
]

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit
_T = TypeVar("_T")
REMOTE_FIRST_READ = 4 * 1024 * 1024
REMOTE_MAX_READ = 64 * 1024 * 1024  # per file: a GGUF head (metadata, tensor table) or a safetensors header
_MAX_REMOTE_FILE = 1 << 40  # a file claiming more is not a model file (the sparse copy must fit on disk)
_MAX_SHARDS = 1024
_MAX_CONFIG_BYTES = 4 * 1024 * 1024
_HINT = "declare 'vram' on the Model, or make its files readable where the reconciler runs or over its host's SSH"
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


def _raise_os(exc: OSError, where: Path | str) -> NoReturn:
    resource = str(where)
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        raise NotFoundError(f"no model file at {where}", resource=resource, hint=_HINT) from exc
    if isinstance(exc, PermissionError):
        raise PermissionDenied(f"may not read {where}", resource=resource, hint=_HINT) from exc
    if exc.errno in {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.EINTR}:
        raise TemporaryError(f"reading {where} failed: {exc.strerror}", resource=resource) from exc
    raise PermanentError(f"reading {where} failed: {exc.strerror or type(exc).__name__}", resource=resource) from exc


def _corrupt(where: Path | str, what: str) -> PermanentError:
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


# ---- files on another host -----------------------------------------------------------------------------


class RemoteFiles(Protocol):
    """A host's files, read in bounded pieces (`backends.ssh.SftpFiles`). Raises OSError for a file."""

    def size(self, path: str) -> int: ...
    def is_dir(self, path: str) -> bool: ...
    def listdir(self, path: str) -> list[str]: ...
    def read(self, path: str, offset: int, length: int) -> bytes: ...


def read_remote_model_shape(
    path: str, files: RemoteFiles, *, label: str, first: int = REMOTE_FIRST_READ, cap: int = REMOTE_MAX_READ
) -> ModelShape:
    """The shape of the model at `path` on a host, as `read_model_shape` gives it for a local path.

    `label` names the host in messages and in the shape's path (`ssh://user@host:22`). Raises as
    `read_model_shape`; a head that does not fit in `cap` bytes is a PermanentError naming the cap.
    """
    remote = PurePosixPath(path)
    with tempfile.TemporaryDirectory(prefix="reconciler-model-") as scratch:
        root = Path(scratch)
        try:
            local = _Mirror(files, root, label, first, cap).model(remote)
            shape = read_model_shape(local)
        except OSError as exc:
            _raise_os(exc, f"{label}{path}")
        except BackendError as exc:
            exc.message = exc.message.replace(str(root), label)
            exc.resource = exc.resource.replace(str(root), label) if exc.resource else exc.resource
            raise
    return replace(shape, path=shape.path.replace(str(root), label, 1), read_through=label)


class _HeadOnly(gguf.GGUFReader):
    """Parses a GGUF head: its metadata and tensor table, not the tensors (their data is not there)."""

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        return None


@dataclass(slots=True)
class _Mirror:
    """Local sparse copies of a remote model's heads, at the same relative paths under `root`."""

    files: RemoteFiles
    root: Path
    label: str  # names the host in errors: ssh://user@host:22
    first: int
    cap: int

    def model(self, path: PurePosixPath) -> Path:
        if ".." in path.parts:
            raise _corrupt(self._named(path), "is not a plain path (it has '..')")
        if self._os(path, lambda: self.files.is_dir(str(path))):
            return self._folder(path)
        if path.suffix == ".safetensors":
            return self._folder(path.parent) / path.name
        for part in _gguf_parts(Path(str(path))):
            self._gguf(PurePosixPath(str(part)))
        return self._local(path)

    def _os(self, path: PurePosixPath, action: Callable[[], _T]) -> _T:
        """`action` on the host's file `path`, its OSError told as the project's error naming that file."""
        try:
            return action()
        except OSError as exc:
            _raise_os(exc, self._named(path))

    def _read(self, path: PurePosixPath, offset: int, length: int) -> bytes:
        return self._os(path, lambda: self.files.read(str(path), offset, length))

    def _local(self, path: PurePosixPath) -> Path:
        return self.root.joinpath(*path.parts[1:]) if path.is_absolute() else self.root.joinpath(*path.parts)

    def _named(self, path: PurePosixPath) -> str:
        return f"{self.label}{path}"

    def _copy(self, path: PurePosixPath, head: bytes, size: int) -> None:
        """Write `head` and extend the copy sparsely to `size`: the readers check offsets against it."""
        local = self._local(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        with local.open("wb") as handle:
            handle.write(head)
            handle.truncate(size)

    def _size(self, path: PurePosixPath) -> int:
        size = self._os(path, lambda: self.files.size(str(path)))
        if size > _MAX_REMOTE_FILE:
            raise _corrupt(self._named(path), f"claims {size} bytes")
        return size

    def _gguf(self, path: PurePosixPath) -> None:
        size = self._size(path)
        want = min(self.first, size, self.cap)
        while True:
            head = self._read(path, 0, want)
            if len(head) < want:
                size = len(head)  # the file shrank while it was read: what there is, is all there is
            if not head.startswith(b"GGUF"):
                break  # not GGUF: the reader says so
            if _gguf_head_within(self._local(path), head):
                break
            if len(head) >= size:
                break  # the whole file: the reader says where it is cut short
            if len(head) >= self.cap:
                raise _corrupt(
                    self._named(path), f"has metadata and a tensor table longer than the {self.cap} bytes read of it"
                )
            want = min(want * 4, size, self.cap)
        self._copy(path, head, size)

    def _folder(self, folder: PurePosixPath) -> Path:
        self._small(folder / "config.json", _MAX_CONFIG_BYTES)
        index = folder / "model.safetensors.index.json"
        names: list[str]
        try:
            self._small(index, min(self.cap, 64 * 1024 * 1024))
        except NotFoundError:
            listed = self._os(folder, lambda: self.files.listdir(str(folder)))
            names = sorted(n for n in listed if n.endswith(".safetensors") and "/" not in n)[:_MAX_SHARDS]
        else:
            names = _index_names(self._local(index))
        for name in names:
            self._safetensors(folder / name)
        return self._local(folder)

    def _small(self, path: PurePosixPath, limit: int) -> None:
        """A whole small file, or its first `limit` + 1 bytes, which the reader refuses as too large."""
        size = self._size(path)
        self._copy(path, self._read(path, 0, min(size, limit + 1)), min(size, limit + 1))

    def _safetensors(self, path: PurePosixPath) -> None:
        size = self._size(path)
        prefix = self._read(path, 0, min(8, size))
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        if length > self.cap - 8:
            raise _corrupt(self._named(path), f"declares a header of {length} bytes, more than the {self.cap} read")
        header = self._read(path, 8, length) if 2 <= length <= size - 8 else b""
        self._copy(path, prefix + header, size)


def _gguf_head_within(scratch: Path, head: bytes) -> bool:
    """Whether `head` holds a whole GGUF metadata and tensor table (parsed from a copy of just `head`)."""
    scratch.parent.mkdir(parents=True, exist_ok=True)
    scratch.write_bytes(head)
    try:
        reader = _HeadOnly(scratch)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, struct.error):
        return False  # cut short inside the head (or malformed: the full read says which)
    finally:
        scratch.unlink()
    return int(reader.data_offset) < len(head)


def _index_names(index: Path) -> list[str]:
    try:
        names = sorted(set(json.loads(_read_limited(index, 64 * 1024 * 1024))["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError):
        return []  # the local reader refuses the same copy, with the reason
    return [n for n in names if isinstance(n, str) and "/" not in n and n not in {"", ".", ".."}][:_MAX_SHARDS]

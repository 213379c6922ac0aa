"""Reading model files (backends/modelfiles.py): real GGUF files written with the `gguf` package, safetensors by hand.

The files declare models of real size while taking a few kilobytes of disk
(tests/support/modelfiles.py extends them sparsely), so the reader meets the
same tensor tables and lengths as with the downloaded files. The published
sizes table checks the estimator's weight term against what the models'
repositories publish.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import gguf
import pytest

from reconciler.backends.modelfiles import model_shape, ollama_model_path, read_model_shape
from reconciler.errors import NotFoundError, PermanentError, PermissionDenied
from reconciler.planning.vram import GpuSlot, ModelFormat, estimate
from reconciler.spec.models import Engine, Model
from tests.support.modelfiles import (
    QWEN25,
    Tensor,
    gpt_oss_120b_config,
    gpt_oss_120b_tensors,
    qwen_awq_tensors,
    qwen_bf16_tensors,
    qwen_gguf_metadata,
    qwen_gguf_tensors,
    write_gguf,
    write_safetensors,
)

GB = 10**9
GIB = 1024**3


def _folder(root: Path, name: str, config: dict[str, object], tensors: list[Tensor]) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    write_safetensors(folder / "model.safetensors", tensors)
    return folder


def _qwen(root: Path, size: str, form: str) -> Path:
    layout = QWEN25[size]
    if form == "Q4_K_M":
        return write_gguf(root / f"qwen2.5-{size}.gguf", "qwen2", qwen_gguf_metadata(layout), qwen_gguf_tensors(layout))
    tensors = qwen_bf16_tensors(layout) if form == "FP16" else qwen_awq_tensors(layout)
    config = layout.config()
    if form == "AWQ":
        config = {**config, "torch_dtype": "float16", "quantization_config": {"quant_method": "awq", "bits": 4}}
    return _folder(root, f"qwen2.5-{size}-{form}", config, tensors)


# Published sizes. Sources:
# - FP16 (BF16): the safetensors files of Qwen/Qwen2.5-{7B,14B,32B}-Instruct on huggingface.co, whose model cards
#   give 7.61B, 14.7B and 32.5B parameters (x 2 bytes: 15.23, 29.54, 65.53 GB).
# - Q4_K_M: bartowski/Qwen2.5-{7B,14B,32B}-Instruct-GGUF file tables (4.68, 8.99, 19.85 GB).
# - AWQ: the safetensors files of Qwen/Qwen2.5-{7B,14B,32B}-Instruct-AWQ (5.58, 9.99, 19.35 GB).
# - gpt-oss-120b: OpenAI's gpt-oss model card, table 1: 116.8B parameters, checkpoint 60.8 GiB (MXFP4 experts).
# Tolerance: 2 %, as published sizes are rounded and repositories carry small extra tensors.
PUBLISHED = [
    ("7B", "FP16", 15.23 * GB),
    ("14B", "FP16", 29.54 * GB),
    ("32B", "FP16", 65.53 * GB),
    ("7B", "Q4_K_M", 4.68 * GB),
    ("14B", "Q4_K_M", 8.99 * GB),
    ("32B", "Q4_K_M", 19.85 * GB),
    ("7B", "AWQ", 5.58 * GB),
    ("14B", "AWQ", 9.99 * GB),
    ("32B", "AWQ", 19.35 * GB),
]
TOLERANCE = 0.02


@pytest.mark.parametrize(("size", "form", "published"), PUBLISHED, ids=[f"{s}-{f}" for s, f, _ in PUBLISHED])
def test_weight_term_matches_published_sizes(tmp_path: Path, size: str, form: str, published: float) -> None:
    shape = read_model_shape(_qwen(tmp_path, size, form))

    assert shape.weights_bytes == pytest.approx(published, rel=TOLERANCE)
    big = GpuSlot("big", 200 * GIB)
    engine = Engine.LLAMACPP if form == "Q4_K_M" else Engine.VLLM
    footprint = estimate(shape, engine, {"tensor_parallel_size": 1}, [big], context=4096)
    on_gpu = footprint.shares[0].weights
    # llama.cpp keeps the token embeddings in host memory; vLLM holds every weight on the GPU.
    expected = shape.weights_bytes - shape.input_bytes if engine is Engine.LLAMACPP else shape.weights_bytes
    assert on_gpu == expected


def test_gpt_oss_120b_weight_term_matches_its_model_card(tmp_path: Path) -> None:
    shape = read_model_shape(_folder(tmp_path, "gpt-oss-120b", gpt_oss_120b_config(), gpt_oss_120b_tensors()))

    assert shape.weights_bytes == pytest.approx(60.8 * GIB, rel=TOLERANCE)
    assert (shape.expert_count, shape.expert_used_count, shape.block_count) == (128, 4, 36)
    assert sum(shape.layer_expert_bytes) > 0.9 * shape.weights_bytes  # "more than 90 % of the weights are experts"
    assert shape.quantization == "mxfp4"
    assert (shape.head_count_kv, shape.key_length) == (8, 64)


def test_gguf_metadata_and_tensor_table_are_read(tmp_path: Path) -> None:
    path = _qwen(tmp_path, "7B", "Q4_K_M")
    assert path.stat().st_blocks * 512 < 1024 * 1024  # a 4.7 GB model in a few kilobytes of disk

    shape = read_model_shape(path)

    assert shape.format is ModelFormat.GGUF
    assert (shape.architecture, shape.block_count, shape.embedding_length) == ("qwen2", 28, 3584)
    assert (shape.head_count, shape.head_count_kv, shape.key_length, shape.value_length) == (28, 4, 128, 128)
    assert (shape.context_length, shape.vocab_size, shape.quantization) == (32768, 152064, "Q4_K_M")
    assert set(shape.type_bytes) == {"Q4_K", "Q6_K", "F32"}
    assert len(shape.layer_bytes) == 28
    assert shape.layer_bytes[0] > shape.layer_bytes[4]  # block 0 keeps attn_v and ffn_down at Q6_K
    assert shape.input_bytes == 152064 * 3584 // 256 * 144  # token_embd at Q4_K: 144 bytes per 256 weights
    assert shape.output_bytes == 152064 * 3584 // 256 * 210 + 3584 * 4  # output at Q6_K + output_norm (F32)


def test_weights_come_from_the_tensor_table_not_from_the_metadata(tmp_path: Path) -> None:
    """Metadata can describe a 70B model while the tensors are tiny: weights follow the tensors, KV the metadata."""
    metadata = {
        "llama.block_count": 2,
        "llama.embedding_length": 8192,
        "llama.attention.head_count": 64,
        "llama.attention.head_count_kv": 8,
        "llama.context_length": 131072,
        "llama.vocab_size": 128256,
    }
    tensors = [Tensor(f"blk.{i}.ffn_down.weight", (32, 256), "Q4_K") for i in range(2)]
    shape = read_model_shape(write_gguf(tmp_path / "tiny.gguf", "llama", metadata, tensors))

    assert shape.layer_bytes == (32 * 144, 32 * 144)
    footprint = estimate(shape, Engine.LLAMACPP, {"ctx_size": 8192}, [GpuSlot("big", 16 * GIB)])
    assert footprint.shares[0].weights == 2 * 32 * 144
    assert footprint.shares[0].kv_cache == 2 * 8192 * 8 * 128 * 2 * 2  # layers x ctx x kv heads x dims x (K+V) x f16


def test_a_split_gguf_is_read_from_all_its_parts(tmp_path: Path) -> None:
    metadata = {"llama.block_count": 2, "llama.embedding_length": 256, "llama.attention.head_count": 2}
    write_gguf(
        tmp_path / "m-00001-of-00002.gguf", "llama", metadata, [Tensor("blk.0.attn_q.weight", (256, 256), "F16")]
    )
    write_gguf(
        tmp_path / "m-00002-of-00002.gguf", "llama", metadata, [Tensor("blk.1.attn_q.weight", (256, 256), "F16")]
    )

    shape = read_model_shape(tmp_path / "m-00001-of-00002.gguf")

    assert shape.layer_bytes == (256 * 256 * 2, 256 * 256 * 2)


def test_sharded_safetensors_are_read_through_their_index(tmp_path: Path) -> None:
    layout = QWEN25["7B"]
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(layout.config()))
    tensors = qwen_bf16_tensors(layout)
    half = len(tensors) // 2
    write_safetensors(folder / "model-00001-of-00002.safetensors", tensors[:half])
    write_safetensors(folder / "model-00002-of-00002.safetensors", tensors[half:])
    write_safetensors(folder / "stray.safetensors", [Tensor("extra.weight", (1024, 1024), "F32")])  # not indexed
    weight_map = {t.name: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, t in enumerate(tensors)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    shape = read_model_shape(folder)

    assert shape.format is ModelFormat.SAFETENSORS
    assert shape.weights_bytes == pytest.approx(15.23 * GB, rel=TOLERANCE)
    assert (shape.block_count, shape.head_count_kv, shape.key_length, shape.context_length) == (28, 4, 128, 32768)


def test_ollama_store_resolves_a_model_name_to_its_gguf_blob(tmp_path: Path) -> None:
    digest = "a" * 64
    manifest = tmp_path / "manifests/registry.ollama.ai/library/qwen2.5/7b"
    manifest.parent.mkdir(parents=True)
    layers = [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "b" * 64},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"},
    ]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    blob = tmp_path / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir()
    write_gguf(blob, "qwen2", qwen_gguf_metadata(QWEN25["7B"]), qwen_gguf_tensors(QWEN25["7B"]))

    path = ollama_model_path(tmp_path, "qwen2.5:7b")

    assert path == blob
    assert read_model_shape(path).block_count == 28


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b/c/d:e", "x:..", "qwen:7b/../../x", "", ":"])
def test_hostile_ollama_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(PermanentError):
        ollama_model_path(tmp_path, name)


# ---- broken and hostile files -----------------------------------------------------------------------


def test_a_missing_file_is_not_found_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as raised:
        read_model_shape(tmp_path / "nope.gguf")
    assert raised.value.hint is not None
    assert "vram" in raised.value.hint
    assert raised.value.resource == str(tmp_path / "nope.gguf")


def test_an_unreadable_file_is_permission_denied(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = write_gguf(tmp_path / "m.gguf", "llama", {"llama.block_count": 1}, [])
    path.chmod(0)
    with pytest.raises(PermissionDenied):
        read_model_shape(path)


def test_a_gguf_cut_short_is_refused(tmp_path: Path) -> None:
    path = _qwen(tmp_path, "7B", "Q4_K_M")
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size - 1_000_000)  # a download that stopped early

    with pytest.raises(PermanentError) as raised:
        read_model_shape(path)
    assert "cut short" in str(raised.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"GGUF", b"not a model at all" * 10, b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, os.urandom(4096)],
    ids=["empty", "magic-only", "text", "huge-counts", "random"],
)
def test_garbage_gguf_is_a_permanent_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(PermanentError):
        read_model_shape(path)


def test_gguf_without_architecture_numbers_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", "llama", {}, [])
    with pytest.raises(PermanentError) as raised:
        read_model_shape(path)
    assert "llama.block_count" in str(raised.value)


def test_gguf_tensor_of_a_layer_beyond_block_count_is_refused(tmp_path: Path) -> None:
    metadata = {"llama.block_count": 1, "llama.embedding_length": 256, "llama.attention.head_count": 2}
    path = write_gguf(tmp_path / "m.gguf", "llama", metadata, [Tensor("blk.7.attn_q.weight", (256, 256), "F16")])
    with pytest.raises(PermanentError):
        read_model_shape(path)


def _raw_safetensors(folder: Path, raw: bytes) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(QWEN25["7B"].config()))
    (folder / "model.safetensors").write_bytes(raw)
    return folder


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        struct.pack("<Q", 2**62) + b"{}",  # a header "larger than the file system"
        struct.pack("<Q", 50) + b"{}",  # cut short inside the header
        struct.pack("<Q", 5) + b"[1,2]",  # not an object
        struct.pack("<Q", 6) + b"\xff\xfe{}{}",  # not UTF-8 JSON
        struct.pack("<Q", 40)
        + json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()[:40],
    ],
    ids=["empty", "huge-header", "short-header", "array", "not-json", "truncated-json"],
)
def test_broken_safetensors_headers_are_refused(tmp_path: Path, raw: bytes) -> None:
    with pytest.raises(PermanentError):
        read_model_shape(_raw_safetensors(tmp_path / "m", raw))


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]},  # past the end of the file
        {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]},  # 8 bytes for 16
        {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
        {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]},
        {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]},
        {"shape": [4], "data_offsets": [0, 16]},
    ],
    ids=["past-end", "wrong-size", "negative-shape", "backwards", "shape-text", "no-dtype"],
)
def test_hostile_tensor_entries_are_refused(tmp_path: Path, entry: dict[str, object]) -> None:
    body = json.dumps({"model.layers.0.w": entry}).encode()
    raw = struct.pack("<Q", len(body)) + body + b"\0" * 16
    with pytest.raises(PermanentError):
        read_model_shape(_raw_safetensors(tmp_path / "m", raw))


def test_a_safetensors_index_naming_files_outside_the_folder_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "m", QWEN25["7B"].config(), [Tensor("model.norm.weight", (8,), "BF16")])
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(PermanentError):
        read_model_shape(folder)


@pytest.mark.parametrize(
    "config",
    ["not json", "[]", json.dumps({"num_hidden_layers": "28"}), json.dumps({"num_hidden_layers": -1}), "{}"],
    ids=["text", "array", "layers-text", "layers-negative", "empty"],
)
def test_broken_configs_are_refused(tmp_path: Path, config: str) -> None:
    folder = _folder(tmp_path, "m", {}, [Tensor("model.norm.weight", (8,), "BF16")])
    (folder / "config.json").write_text(config)
    with pytest.raises(PermanentError):
        read_model_shape(folder)


def test_a_folder_without_safetensors_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN25["7B"].config()))
    with pytest.raises(NotFoundError):
        read_model_shape(tmp_path)


def test_gguf_package_is_the_one_that_wrote_the_file(tmp_path: Path) -> None:
    """The files under test are real GGUF: the package's own reader agrees with ours on the tensor table."""
    path = _qwen(tmp_path, "7B", "Q4_K_M")
    reader = gguf.GGUFReader(path)
    total = sum(int(t.n_bytes) for t in reader.tensors)
    assert total == read_model_shape(path).weights_bytes


def test_config_text_is_made_printable(tmp_path: Path) -> None:
    config = {
        **QWEN25["7B"].config(),
        "architectures": ["Qwen2\x1b[2J" + "x" * 500],
        "quantization_config": {"quant_method": "awq\x07"},
    }
    shape = read_model_shape(_folder(tmp_path, "m", config, [Tensor("model.norm.weight", (8,), "BF16")]))
    assert shape.architecture == ("Qwen2[2J" + "x" * 500)[:64]
    assert shape.quantization == "awq"


def _model(**fields: object) -> Model:
    return Model.model_validate({"name": "m", "host": "h", "port": 8000, **fields})


def test_each_engine_finds_its_files_where_it_would(tmp_path: Path) -> None:
    layout = QWEN25["7B"]
    gguf_file = write_gguf(tmp_path / "q.gguf", "qwen2", qwen_gguf_metadata(layout), qwen_gguf_tensors(layout))
    folder = _qwen(tmp_path, "7B", "AWQ")
    store = tmp_path / "ollama"
    digest = "c" * 64
    manifest = store / "models/manifests/registry.ollama.ai/library/qwen2.5/latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(
        json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"}]})
    )
    (store / "models/blobs").mkdir()
    (store / "models/blobs" / f"sha256-{digest}").symlink_to(gguf_file)

    llamacpp = model_shape(_model(engine="llamacpp", source=str(gguf_file)))
    vllm = model_shape(_model(engine="vllm", source=str(folder)))
    ollama = model_shape(_model(engine="ollama", source="qwen2.5", models_dir=str(store)))

    assert (llamacpp.format, vllm.format, ollama.format) == (
        ModelFormat.GGUF,
        ModelFormat.SAFETENSORS,
        ModelFormat.GGUF,
    )
    assert ollama.weights_bytes == llamacpp.weights_bytes
    with pytest.raises(NotFoundError) as raised:
        model_shape(_model(engine="ollama", source="qwen2.5"))
    assert "models_dir" in str(raised.value)

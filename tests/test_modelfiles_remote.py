"""Model files read through a host's SSH access (backends.modelfiles over backends.ssh's SFTP), against a real sshd.

The files are written with the `gguf` package and by hand (tests/support/modelfiles.py), sparse to
their real length, and read back through OpenSSH's SFTP server. What is asserted: the shape (hence the
estimate) equals the one read locally; a hostile or cut file is a PermanentError naming it, never a
crash; and the bytes the reader fetched (`SftpFiles.bytes_read`) stay within the cap.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.backends.modelfiles import read_model_shape, read_remote_model_shape
from reconciler.backends.ssh import SftpFiles, connect, credentials_from
from reconciler.engine.observe import ModelAccess, Readers, observe, read_model_files, read_model_files_over_ssh
from reconciler.errors import NotFoundError, PermanentError
from reconciler.planning.gpuload import Seat, gpu_load
from reconciler.planning.gpuview import gpu_sight
from reconciler.planning.observed import ModelFiles, Observed
from reconciler.planning.vram import GpuSlot, ModelShape, estimate
from reconciler.spec.models import Engine, Model
from reconciler.spec.state import DesiredState
from tests.support.labs import load, write_tree
from tests.support.modelfiles import (
    QWEN25,
    Tensor,
    qwen_bf16_tensors,
    qwen_gguf_metadata,
    qwen_gguf_tensors,
    write_gguf,
    write_safetensors,
)
from tests.support.sshd import Sshd, sshd_fixture, start_sshd  # noqa: F401

pytestmark = pytest.mark.sshd
GIB = 1024**3


@pytest.fixture(name="files")
def files_fixture(sshd: Sshd) -> Iterator[SftpFiles]:
    with connect(sshd.target, credentials=credentials_from(sshd.env), known_hosts=sshd.known_hosts) as session:
        yield session.files(timeout=20)


def _bare(shape: ModelShape) -> ModelShape:
    """The shape without where it was read from: what the estimate uses."""
    return replace(shape, path="", read_through="")


def _label(sshd: Sshd) -> str:
    return f"ssh://{sshd.target}"


def _qwen_gguf(path: Path) -> Path:
    layout = QWEN25["7B"]
    return write_gguf(path, "qwen2", qwen_gguf_metadata(layout), qwen_gguf_tensors(layout))


def test_a_gguf_read_over_ssh_estimates_as_the_local_file_and_reads_only_its_head(
    tmp_path: Path, sshd: Sshd, files: SftpFiles
) -> None:
    source = _qwen_gguf(tmp_path / "qwen 7b.gguf")
    local = read_model_shape(source)
    remote = read_remote_model_shape(str(source), files, label=_label(sshd), first=1024)  # grows 1K, 4K, 16K ...
    assert remote.path == f"{_label(sshd)}{source}" and remote.read_through == _label(sshd)
    assert _bare(remote) == _bare(local)
    gpus = [GpuSlot("big", 24 * GIB)]
    assert estimate(remote, Engine.LLAMACPP, {}, gpus, context=8192) == estimate(
        local, Engine.LLAMACPP, {}, gpus, context=8192
    )
    assert source.stat().st_size > 4 * GIB  # a real 7B Q4_K_M length (sparse) ...
    assert files.bytes_read <= 1024 + 4096 + 16384 + 65536  # ... of which only the head was fetched


def test_a_head_longer_than_the_cap_is_refused_and_nothing_past_the_cap_is_read(
    tmp_path: Path, sshd: Sshd, files: SftpFiles
) -> None:
    source = _qwen_gguf(tmp_path / "q.gguf")
    with pytest.raises(PermanentError) as caught:
        read_remote_model_shape(str(source), files, label=_label(sshd), first=1024, cap=4096)
    assert "longer than the 4096 bytes" in caught.value.message and str(source) in caught.value.message
    assert files.bytes_read <= 1024 + 4096


def test_a_gguf_claiming_huge_counts_is_refused_within_the_cap(tmp_path: Path, sshd: Sshd, files: SftpFiles) -> None:
    source = tmp_path / "huge.gguf"
    with source.open("wb") as handle:  # version 3, 2^62 tensors and 2^62 metadata entries, then zeros (sparse)
        handle.write(b"GGUF" + struct.pack("<IQQ", 3, 1 << 62, 1 << 62))
        handle.truncate(10 * GIB)
    cap = 1024 * 1024
    with pytest.raises(PermanentError) as caught:
        read_remote_model_shape(str(source), files, label=_label(sshd), first=65536, cap=cap)
    assert _label(sshd) in str(caught.value)
    assert files.bytes_read <= 65536 + 4 * 65536 + cap


@pytest.mark.parametrize("keep", [2000, "head+1000"], ids=["inside-the-head", "inside-the-tensors"])
def test_a_cut_gguf_is_a_permanent_error_naming_it(tmp_path: Path, sshd: Sshd, files: SftpFiles, keep: object) -> None:
    source = _qwen_gguf(tmp_path / "cut.gguf")
    head = read_model_shape(source)  # whole: now cut it
    assert head.block_count
    length = 2000 if keep == 2000 else _data_offset(source) + 1000
    os.truncate(source, length)
    with pytest.raises(PermanentError) as caught:
        read_remote_model_shape(str(source), files, label=_label(sshd))
    assert f"{_label(sshd)}{source}" in str(caught.value)
    assert files.bytes_read <= length


def test_a_split_gguf_is_read_over_ssh_from_all_its_parts(tmp_path: Path, sshd: Sshd, files: SftpFiles) -> None:
    metadata = {"llama.block_count": 2, "llama.embedding_length": 256, "llama.attention.head_count": 2}
    for part in (1, 2):
        tensors = [Tensor(f"blk.{part - 1}.attn_q.weight", (256, 256), "F16")]
        write_gguf(tmp_path / f"m-0000{part}-of-00002.gguf", "llama", metadata, tensors)
    first = tmp_path / "m-00001-of-00002.gguf"
    remote = read_remote_model_shape(str(first), files, label=_label(sshd))
    assert remote.layer_bytes == (256 * 256 * 2, 256 * 256 * 2)
    assert _bare(remote) == _bare(read_model_shape(first))
    (tmp_path / "m-00002-of-00002.gguf").unlink()
    with pytest.raises(NotFoundError) as caught:
        read_remote_model_shape(str(first), files, label=_label(sshd))
    assert f"{_label(sshd)}{tmp_path / 'm-00002-of-00002.gguf'}" in str(caught.value)


def test_an_oversized_config_is_refused_after_reading_one_byte_past_its_limit(
    tmp_path: Path, sshd: Sshd, files: SftpFiles
) -> None:
    folder = tmp_path / "big-config"
    folder.mkdir()
    with (folder / "config.json").open("wb") as handle:
        handle.write(b"{")
        handle.truncate(GIB)
    with pytest.raises(PermanentError) as caught:
        read_remote_model_shape(str(folder), files, label=_label(sshd))
    assert f"{_label(sshd)}{folder / 'config.json'}" in str(caught.value)
    assert files.bytes_read == 4 * 1024 * 1024 + 1


def test_a_path_climbing_out_with_dots_is_refused_before_anything_is_read(
    tmp_path: Path, sshd: Sshd, files: SftpFiles
) -> None:
    source = _qwen_gguf(tmp_path / "q.gguf")
    climbing = f"{tmp_path}/../../..{source}"
    with pytest.raises(PermanentError) as caught:
        read_remote_model_shape(climbing, files, label=_label(sshd))
    assert "'..'" in caught.value.message and files.bytes_read == 0


def _data_offset(path: Path) -> int:
    import gguf  # the test reads the offset as the writer laid it out

    return int(gguf.GGUFReader(path).data_offset)


def _safetensors_folder(root: Path) -> Path:
    layout = QWEN25["7B"]
    folder = root / "qwen; $(touch PWNED) 'x'"  # shell metacharacters: SFTP never hands a path to a shell
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(layout.config()))
    tensors = qwen_bf16_tensors(layout)
    half = len(tensors) // 2
    write_safetensors(folder / "model-00001-of-00002.safetensors", tensors[:half])
    elsewhere = root / "blobs"  # a shard symlinked out of the folder, as the Hugging Face cache does
    elsewhere.mkdir()
    write_safetensors(elsewhere / "second", tensors[half:])
    (folder / "model-00002-of-00002.safetensors").symlink_to(elsewhere / "second")
    return folder


def test_a_safetensors_folder_read_over_ssh_equals_the_local_read(tmp_path: Path, sshd: Sshd, files: SftpFiles) -> None:
    folder = _safetensors_folder(tmp_path)
    local = read_model_shape(folder)
    remote = read_remote_model_shape(str(folder), files, label=_label(sshd))
    assert _bare(remote) == _bare(local)
    headers = sum(8 + _header_length(p) for p in folder.glob("*.safetensors"))
    assert files.bytes_read == headers + (folder / "config.json").stat().st_size
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()


def _header_length(path: Path) -> int:
    with path.open("rb") as handle:
        return int(struct.unpack("<Q", handle.read(8))[0])


def test_a_safetensors_header_length_past_the_cap_is_refused_unread(
    tmp_path: Path, sshd: Sshd, files: SftpFiles
) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN25["7B"].config()))
    with (folder / "model.safetensors").open("wb") as handle:
        handle.write(struct.pack("<Q", (1 << 63) + 5) + b"{")
        handle.truncate(GIB)
    with pytest.raises(PermanentError) as caught:
        read_remote_model_shape(str(folder), files, label=_label(sshd))
    assert "declares a header of" in caught.value.message
    assert files.bytes_read == 8 + (folder / "config.json").stat().st_size


def test_a_missing_remote_file_is_not_found_naming_the_host(tmp_path: Path, sshd: Sshd, files: SftpFiles) -> None:
    with pytest.raises(NotFoundError) as caught:
        read_remote_model_shape(str(tmp_path / "absent.gguf"), files, label=_label(sshd))
    assert f"{_label(sshd)}{tmp_path / 'absent.gguf'}" in str(caught.value)


def test_a_small_safetensors_shard_and_its_folder_are_read_whole(tmp_path: Path, sshd: Sshd, files: SftpFiles) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN25["7B"].config()))
    write_safetensors(folder / "model.safetensors", [Tensor("model.layers.0.mlp.up_proj.weight", (4, 4), "BF16")])
    remote = read_remote_model_shape(str(folder / "model.safetensors"), files, label=_label(sshd))
    assert remote.layer_bytes[0] == 32 and remote.path == f"{_label(sshd)}{folder}"


def _load_of(state: DesiredState, models: dict[str, ModelFiles]) -> tuple[tuple[str, ...], list[str]]:
    """The plan's GPU summary and blocker messages for the Model `qwen` with these files."""
    model = state.get(Model, "qwen")
    assert model is not None
    observed = Observed(models=models)
    seats = [Seat(model, model.gpus, f"container/{model.host}/{model.name}", running=True)]
    found = gpu_load(state, observed, gpu_sight(state, observed), seats, changed=())
    return found.summary, [p.message for p in found.blockers]


# ---- through observe: the model's Docker host, its SSH target, the reason when it cannot be reached -----


def _state(tmp_path: Path, source: str) -> DesiredState:
    tree = tmp_path / "spec"
    write_tree(
        tree,
        f"""\
        kind: DockerHost
        name: gpu-host
        endpoint: unix:///var/run/docker.sock
        node: pve1
        ---
        kind: Model
        name: qwen
        engine: llamacpp
        host: gpu-host
        gpus: [small]
        source: {source}
        port: 8080
        context: 8192
        """,
    )
    return load(tree)


@pytest.fixture(name="chrooted")
def chrooted_fixture(tmp_path: Path) -> Iterator[tuple[Sshd, Path]]:
    """An sshd whose SFTP sees only a root-owned folder under /run: its files are not where the reconciler runs."""
    if os.getuid() != 0:
        pytest.skip("sshd's ChrootDirectory needs root")
    root = Path(tempfile.mkdtemp(prefix="reconciler-host-", dir="/run"))
    server = start_sshd(tmp_path / "sshd", tmp_path / "state" / "known_hosts", extra=(f"ChrootDirectory {root}",))
    try:
        yield server, root
    finally:
        server.stop()
        shutil.rmtree(root)


def test_observe_reads_a_model_only_on_its_host_through_ssh(tmp_path: Path, chrooted: tuple[Sshd, Path]) -> None:
    sshd, root = chrooted
    (root / "models").mkdir()
    on_host = _qwen_gguf(root / "models" / "q7.gguf")
    source = f"/{root.name}-models/q7.gguf"  # the path on the host: not there where the reconciler runs
    (root / f"{root.name}-models").symlink_to("models")
    assert not Path(source).exists()
    state = _state(tmp_path, source)
    found = read_model_files(state.of(Model))
    assert found["qwen"].shape is None
    env = {**sshd.env, "RECONCILER_SSH_HOST_GPU_HOST": str(sshd.target)}
    through = read_model_files_over_ssh(state, found, ModelAccess(env, sshd.known_hosts))
    shape = through["qwen"].shape
    assert shape is not None and through["qwen"].unread is None
    assert _bare(shape) == _bare(read_model_shape(on_host))
    assert shape.path == f"ssh://{sshd.target}{source}"
    assert sshd.known_hosts.exists()  # the host's key was recorded on first use
    seen = observe(
        state, Readers(proxmox=None, docker=None, nvml=None, model_access=ModelAccess(env, sshd.known_hosts))
    )
    assert seen.models["qwen"] == through["qwen"]
    assert observe(state, Readers(proxmox=None, docker=None, nvml=None)).models["qwen"].shape is None  # no access
    summary, blockers = _load_of(state, dict(through))
    assert summary[0].endswith(f"(qwen: estimated from its files, read through ssh://{sshd.target})")
    assert blockers and blockers[0].startswith("GPU small (4.0 GiB): qwen ")  # 7B Q4_K_M: over the GTX 970


def test_an_unreachable_host_leaves_the_model_unread_with_both_reasons(tmp_path: Path, sshd: Sshd) -> None:
    source = str(tmp_path / "not-here" / "q7.gguf")
    state = _state(tmp_path, source)
    found = read_model_files(state.of(Model))
    sshd.stop()
    env = {**sshd.env, "RECONCILER_SSH_HOST_GPU_HOST": str(sshd.target)}
    through = read_model_files_over_ssh(state, found, ModelAccess(env, sshd.known_hosts, timeout=5))
    assert through["qwen"].shape is None
    unread = through["qwen"].unread or ""
    assert f"no model file at {source}" in unread and f"through ssh://{sshd.target}: cannot reach" in unread
    _, blockers = _load_of(state, dict(through))
    (problem,) = blockers
    assert f"{tmp_path / 'spec' / 'spec.yaml'}:" in problem and "declares no 'vram'" in problem
    assert f"through ssh://{sshd.target}: cannot reach" in problem


def test_models_past_the_hosts_time_budget_are_left_unread_with_the_reason(
    tmp_path: Path, chrooted: tuple[Sshd, Path]
) -> None:
    sshd, root = chrooted
    state = _state(tmp_path, f"/{root.name}-absent/q7.gguf")
    env = {**sshd.env, "RECONCILER_SSH_HOST_GPU_HOST": str(sshd.target)}
    found = read_model_files(state.of(Model))
    through = read_model_files_over_ssh(state, found, ModelAccess(env, sshd.known_hosts, budget=0))
    assert f"through ssh://{sshd.target}: not read within 0s" in (through["qwen"].unread or "")


def test_a_host_without_ssh_access_says_so(tmp_path: Path) -> None:
    state = _state(tmp_path, str(tmp_path / "absent.gguf"))
    found = read_model_files(state.of(Model))
    through = read_model_files_over_ssh(state, found, ModelAccess({}, tmp_path / "known_hosts"))
    assert "host gpu-host has no SSH access" in (through["qwen"].unread or "")
    bad = read_model_files_over_ssh(state, found, ModelAccess({"RECONCILER_SSH_HOST_GPU_HOST": "a b;c"}, Path("kh")))
    assert "RECONCILER_SSH_HOST_GPU_HOST is not user@host[:port]" in (bad["qwen"].unread or "")


def test_a_model_with_declared_vram_or_readable_files_is_not_read_over_ssh(tmp_path: Path) -> None:
    source = _qwen_gguf(tmp_path / "here.gguf")
    state = _state(tmp_path, str(source))
    found = read_model_files(state.of(Model))
    assert found["qwen"].shape is not None
    assert read_model_files_over_ssh(state, found, ModelAccess({}, tmp_path / "kh")) == found

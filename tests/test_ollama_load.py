"""An Ollama model is pulled and loaded once its server answers; a model that cannot be had rolls the apply back.

The server is tests.support.ollama's stand-in on loopback, reached over real HTTP by the same code that
talks to a real Ollama; the containers are the in-memory lab's.
"""

from __future__ import annotations

from pathlib import Path

from reconciler.engine.health import ollama_load
from reconciler.engine.journal import RunResult
from tests.support.labs import Harness, load, write_tree
from tests.support.ollama import FakeOllama

SPEC = """\
kind: Lxc
name: llm
node: pve1
vmid: 955
template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
memory: 16GiB
rootfs: {storage: local-lvm, size: 32GiB}
gpus: [big]
docker: {endpoint: "ssh://root@llm.lan"}
---
kind: Model
name: ollama
engine: ollama
host: llm
gpus: [big]
source: llama3.1:8b
vram: 6GiB  # no models_dir: its store cannot be read, so the footprint is declared
port: PORT
probe: {http: /api/tags, timeout: 2s, interval: 10ms}
"""


def test_a_missing_model_is_pulled_then_loaded() -> None:
    with FakeOllama().running() as fake:
        result = ollama_load(fake.url, "llama3.1:8b", timeout=10)
    assert result.healthy, result.detail
    assert (fake.models, fake.loaded) == ({"llama3.1:8b"}, {"llama3.1:8b"})
    assert [r for r in fake.requests if r[0] == "POST"] == [("POST", "/api/pull"), ("POST", "/api/generate")]


def test_a_model_on_disk_is_loaded_without_a_pull() -> None:
    with FakeOllama({"qwen2.5-coder:latest"}).running() as fake:
        result = ollama_load(fake.url, "qwen2.5-coder", timeout=10)  # a bare name is its latest tag
    assert result.healthy, result.detail
    assert ("POST", "/api/pull") not in fake.requests
    assert fake.loaded == {"qwen2.5-coder:latest"}


def test_a_pull_that_fails_says_why() -> None:
    with FakeOllama(pull_error="pull model manifest: file does not exist").running() as fake:
        result = ollama_load(fake.url, "no-such-model:1b", timeout=10)
    assert not result.healthy
    assert result.detail == "ollama pull no-such-model:1b: pull model manifest: file does not exist"
    assert fake.loaded == set()


def test_no_server_is_an_unhealthy_result_not_an_exception() -> None:
    fake = FakeOllama()
    port = fake.port
    with fake.running():
        pass  # started and stopped: nothing listens on the port now
    result = ollama_load(f"http://127.0.0.1:{port}", "llama3.1:8b", timeout=2)
    assert not result.healthy and result.detail.startswith("ollama llama3.1:8b: ")


def test_apply_leaves_the_model_loaded_and_the_journal_says_so(tmp_path: Path) -> None:
    with FakeOllama().running() as fake:
        folder = write_tree(tmp_path / "spec", SPEC.replace("PORT", str(fake.port)))
        harness = Harness(tmp_path, load(folder))
        _, report = harness.apply(load(folder), prober=None)
    assert report is not None and report.result is RunResult.APPLIED, report and report.failure
    assert fake.loaded == {"llama3.1:8b"}
    health = [s.health for s in harness.journal.steps(report.run_id) if s.address == "container/llm/ollama"]
    assert any(h and h[0]["detail"] == "ollama holds llama3.1:8b" for h in health)


def test_a_model_that_cannot_be_pulled_rolls_the_apply_back(tmp_path: Path) -> None:
    with FakeOllama(pull_error="pull model manifest: file does not exist").running() as fake:
        folder = write_tree(tmp_path / "spec", SPEC.replace("PORT", str(fake.port)))
        harness = Harness(tmp_path, load(folder))
        _, report = harness.apply(load(folder), prober=None)
    assert report is not None and report.result is RunResult.ROLLED_BACK and not report.rollback_errors
    assert "pull model manifest: file does not exist" in (report.failure or "")
    assert harness.lab.docker.containers["llm"] == {}, "the container it created is removed again"
    assert 955 not in harness.lab.proxmox.guests, "and so is the guest it was created in"


def test_a_new_model_that_cannot_be_pulled_restores_the_old_server_cleanly(tmp_path: Path) -> None:
    with FakeOllama({"llama3.1:8b"}, pull_error="pull model manifest: file does not exist").running() as fake:
        folder = write_tree(tmp_path / "spec", SPEC.replace("PORT", str(fake.port)))
        harness = Harness(tmp_path, load(folder))
        _, first = harness.apply(load(folder), prober=None)
        assert first is not None and first.result is RunResult.APPLIED
        old_id = harness.lab.docker.containers["llm"]["ollama"].id
        write_tree(folder, SPEC.replace("PORT", str(fake.port)).replace("llama3.1:8b", "llama3.1:70b"))
        _, report = harness.apply(load(folder), prober=None)
    assert report is not None and report.result is RunResult.ROLLED_BACK
    assert report.rollback_errors == [], "the old server is checked as it was, not for the new model"
    restored = harness.lab.docker.containers["llm"]["ollama"]
    assert (restored.id, restored.status) == (old_id, "running")
    assert fake.loaded == {"llama3.1:8b"}

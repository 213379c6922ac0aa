"""inference-vm: normal mode -> deep mode (one 32B model, tensor parallel 2 on both GPUs) by one edit, and back.

Against fakepve over HTTPS, the fake NVML library and a real Docker engine whose containers are the
stand-in model servers (tests/support/reallab.py): the applier's own probes run (no prober), so each
model is checked in phases (starting, ready: /v1/models lists its served name, working: one token), and
the deep model starts only once NVML shows the memory the fast models held freed. A deep mode that fails
its health check is rolled back to the two 7B/14B servers, which answer again.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from reconciler.engine.apply import HealthPolicy
from reconciler.engine.health import Progress
from reconciler.engine.journal import Journal, RunResult
from reconciler.engine.run import ApplyOptions
from reconciler.fakes.lab import fake_gpus
from reconciler.fakes.nvml import FakeProcess, write_state
from reconciler.loop.controller import Controller
from reconciler.loop.events import Outcome, SourceInfo, Trigger
from reconciler.loop.passes import LoopOptions, PassRunner
from reconciler.loop.wiring import LabConnector
from reconciler.planning.plan import Action
from reconciler.sources.git import GitSource
from tests.support.gitrepo import make_repo
from tests.support.reallab import MakeRealLab, RealLab

pytestmark = [pytest.mark.docker, pytest.mark.fakepve, pytest.mark.nvml, pytest.mark.git]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "inference-vm"
GIB = 2**30
FAST = {"qwen-7b", "qwen-14b"}


def _lab(real_lab: MakeRealLab, tmp_path: Path, *, deep_env: str = "") -> RealLab:
    folder = tmp_path / "inference-vm"
    shutil.copytree(EXAMPLE, folder)
    if deep_env:  # the stand-in playing qwen-32b misbehaves as told
        models = folder / "models.yaml"
        text = models.read_text(encoding="utf-8")
        anchor = "exclusive: {group: mode, member: deep}"
        models.write_text(text.replace(anchor, f"env: {{STANDIN_MODE: {deep_env}}}\n{anchor}"), encoding="utf-8")
    lab = real_lab(folder, stand_in=True)
    lab.env["THOR_ROUTER_API_KEY"] = "router-secret-5e1f"
    _, report = lab.apply(prober=None, health_timeout=20)
    assert report is not None and report.result is RunResult.APPLIED, report and report.failure
    return lab


def _mode(lab: RealLab, mode: str, *, freed_after_reads: int = 2) -> None:
    """Edit `active:` (the one commit of a switch) and let the fast models' memory be freed late by the driver."""
    path = lab.spec / "mode.yaml"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("active: fast", f"active: {mode}").replace("active: deep", f"active: {mode}"))
    gpus = fake_gpus(lab.load())
    held = [FakeProcess(7000 + g.index, 21 * GIB, gone=True, release_after=freed_after_reads) for g in gpus]
    write_state(lab.nvml.state, [replace(g, processes=(p,)) for g, p in zip(gpus, held, strict=True)])


def _running(docker_client: Any) -> set[str]:
    return {c.name for c in docker_client.containers.list(filters={"name": "qwen"})}


def _health(lab: RealLab, run_id: int, address: str) -> list[str]:
    journal = lab.journal()
    try:
        return [
            str(h["detail"])
            for step in journal.steps(run_id)
            if step.address == address and step.phase in ("verify", "rollback")
            for h in step.health or ()
        ]
    finally:
        journal.close()


def test_normal_to_deep_and_back_by_one_edit(real_lab: MakeRealLab, tmp_path: Path, docker_client: Any) -> None:
    lab = _lab(real_lab, tmp_path)
    assert _running(docker_client) == FAST

    _mode(lab, "deep")
    plan, report = lab.apply(prober=None, health_timeout=20)
    assert report is not None and report.result is RunResult.APPLIED, report and report.failure
    assert {(c.address, c.action) for c in plan.changes} == {
        ("container/infer/qwen-7b", Action.STOP),
        ("container/infer/qwen-14b", Action.STOP),
        ("container/infer/qwen-32b", Action.START),
    }
    (start,) = [c for c in plan.changes if c.action is Action.START]
    assert start.reason.endswith(  # the plan states the cost: what stops, what starts, the VRAM, the waits
        "switch of group mode to deep: stops qwen-14b (21.6 GiB on gpu1); qwen-7b (21.1 GiB on gpu0);"
        " starts qwen-32b (21.6 GiB on gpu0, 21.6 GiB on gpu1) once NVML shows that memory free,"
        " then waits for starting, ready (/v1/models lists it), working (one token)"
    ), start.reason
    assert _running(docker_client) == {"qwen-32b"}
    assert _health(lab, report.run_id, "container/infer/qwen-32b") == ["working: qwen2.5-32b-instruct answers"]
    assert lab.plan().empty

    _mode(lab, "fast")
    _, report = lab.apply(prober=None, health_timeout=20)
    assert report is not None and report.result is RunResult.APPLIED, report and report.failure
    assert _running(docker_client) == FAST
    assert lab.plan().empty


def test_a_deep_mode_that_fails_health_rolls_back_to_the_fast_models(
    real_lab: MakeRealLab, tmp_path: Path, docker_client: Any
) -> None:
    lab = _lab(real_lab, tmp_path, deep_env="bad-completion")
    _mode(lab, "deep")
    _, report = lab.apply(prober=None, health_timeout=20)
    assert report is not None and report.result is RunResult.ROLLED_BACK, report and report.failure
    assert not report.rollback_errors, report.rollback_errors
    assert "working: POST http://127.0.0.1:8002/v1/chat/completions: status 500" in (report.failure or "")
    assert _running(docker_client) == FAST
    # The fast models were checked through every phase again once restarted.
    assert _health(lab, report.run_id, "container/infer/qwen-7b") == ["working: qwen2.5-7b-instruct answers"]


def test_deep_mode_does_not_start_while_the_fast_models_memory_is_held(
    real_lab: MakeRealLab, tmp_path: Path, docker_client: Any
) -> None:
    lab = _lab(real_lab, tmp_path)
    _mode(lab, "deep", freed_after_reads=10**6)  # the driver never lets go of it
    _, report = lab.apply(prober=None, health_timeout=2)
    assert report is not None and report.result is RunResult.ROLLED_BACK, report and report.failure
    assert "GPU memory not freed" in (report.failure or "") and "GiB needed" in (report.failure or "")
    assert _running(docker_client) == FAST
    qwen_32b = docker_client.containers.get("qwen-32b")
    assert qwen_32b.attrs["State"]["StartedAt"].startswith("0001-"), "the deep model never started"


def test_the_loops_status_shows_the_phase_of_a_switch_while_it_waits(
    real_lab: MakeRealLab, tmp_path: Path, docker_client: Any
) -> None:
    """The deep model's phases stream into the loop's status (what `/status` serves) while the pass runs."""
    repo = make_repo(tmp_path / "lab", EXAMPLE)
    lab = real_lab(repo.path / "specs", stand_in=True)
    lab.env["THOR_ROUTER_API_KEY"] = "router-secret-5e1f"
    seen: list[dict[str, Any]] = []
    controller: Controller | None = None

    def heard(note: Progress) -> None:  # called on the loop's thread, inside the pass: read the status as /status does
        assert controller is not None
        seen.append(controller.status().extra["progress"])

    source = GitSource(str(repo.path), branch="main", path="specs", cache=lab.state_dir)
    apply = ApplyOptions(health=HealthPolicy(max_timeout=20.0, interval=0.2, progress=heard))
    journal = Journal(lab.state_dir / "journal.sqlite")
    runner = PassRunner(source, LabConnector(lab.env), journal, LoopOptions(interval=3600.0, apply=apply))
    controller = Controller(runner, source=SourceInfo(str(repo.path), "main", "specs"), interval=3600.0)
    try:
        first = controller.run_once(Trigger.MANUAL)
        assert first is not None and first.outcome is Outcome.APPLIED, first
        seen.clear()
        repo.write("mode.yaml", (repo.path / "specs" / "mode.yaml").read_text().replace("active: fast", "active: deep"))
        repo.commit("deep mode")
        switched = controller.run_once(Trigger.MANUAL)
        assert switched is not None and switched.outcome is Outcome.APPLIED, switched
    finally:
        controller.stop()
        journal.close()
    deep = [note for note in seen if note and note["subject"] == "infer/qwen-32b"]
    assert [note["phase"] for note in deep][-2:] == ["ready", "working"], seen
    assert all(isinstance(note["elapsed"], float) for note in deep)
    assert controller.status().extra["progress"] is None, "no wait is shown once the pass has ended"

"""The reconcile loop against real things: fakepve over HTTPS, a real Docker engine, the fake NVML, real git.

The loop runs in-process (a Controller over a GitSource and the real backends, as `reconciler run`
builds it) or as the `reconciler run` command itself in a subprocess. Hand-made changes go through
fakepve's API and the Docker engine, as a person would make them; assertions are on what fakepve,
the engine and the journal hold afterwards, and on fakepve's request log and the engine's events to
prove that nothing was written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.engine.apply import HealthPolicy
from reconciler.engine.journal import Journal, RunResult, StepOutcome
from reconciler.engine.run import ApplyOptions
from reconciler.loop.controller import Controller
from reconciler.loop.events import Outcome, PassRecord, SourceInfo, Trigger
from reconciler.loop.passes import LoopOptions, PassRunner
from reconciler.loop.wiring import LabConnector
from reconciler.sources.git import GitSource
from tests.support.gitrepo import GitRepo, make_repo
from tests.support.reallab import MakeRealLab, RealLab
from tests.test_apply_real import docker_writes_since, pve_get, pve_put

pytestmark = [pytest.mark.docker, pytest.mark.fakepve, pytest.mark.nvml, pytest.mark.git]

ROOT = Path(__file__).resolve().parent.parent
LLM_CONFIG = "/nodes/phoenix/lxc/955/config"


class InProcessLoop:
    def __init__(self, lab: RealLab, repo: GitRepo, *, interval: float) -> None:
        self.journal = Journal(lab.state_dir / "journal.sqlite")
        self.connector = LabConnector(lab.env)
        source = GitSource(str(repo.path), branch="main", path="specs", cache=lab.state_dir)
        apply = ApplyOptions(health=HealthPolicy(max_timeout=20.0, interval=0.2))
        self.runner = PassRunner(source, self.connector, self.journal, LoopOptions(interval=interval, apply=apply))
        self.controller = Controller(
            self.runner,
            source=SourceInfo(str(repo.path), "main", "specs"),
            interval=interval,
            suspend_file=lab.state_dir / "suspended",
        )
        self.records: list[PassRecord] = []
        self.controller.subscribe(self.records.append)
        self.thread: threading.Thread | None = None

    def once(self, trigger: Trigger = Trigger.MANUAL) -> PassRecord:
        record = self.controller.run_once(trigger)
        assert record is not None
        return record

    def start(self) -> None:
        self.thread = threading.Thread(target=self.controller.serve, name="loop")
        self.thread.start()

    def wait_for(self, predicate: Callable[[PassRecord], bool], *, deadline: float = 120.0) -> PassRecord:
        end = time.monotonic() + deadline
        seen = 0
        while time.monotonic() < end:
            for record in self.records[seen:]:
                if predicate(record):
                    return record
            seen = len(self.records)
            time.sleep(0.05)
        raise AssertionError(f"no such pass within {deadline}s: {self.records}")

    def close(self) -> None:
        self.controller.stop()
        if self.thread is not None:
            self.thread.join(60)
        self.connector.close()
        self.journal.close()


@pytest.fixture
def loop_lab(real_lab: MakeRealLab, tmp_path: Path) -> Iterator[Callable[..., tuple[RealLab, GitRepo, InProcessLoop]]]:
    made: list[InProcessLoop] = []

    def make(*, interval: float = 3600.0) -> tuple[RealLab, GitRepo, InProcessLoop]:
        repo = make_repo(tmp_path / "lab", ROOT / "specs")
        lab = real_lab(repo.path / "specs", stand_in=True)
        loop = InProcessLoop(lab, repo, interval=interval)
        made.append(loop)
        return lab, repo, loop

    yield make
    for loop in made:
        loop.close()


def test_hand_made_drift_is_corrected_within_one_interval(
    loop_lab: Callable[..., tuple[RealLab, GitRepo, InProcessLoop]], docker_client: Any
) -> None:
    lab, repo, loop = loop_lab(interval=1.0)
    loop.start()
    first = loop.wait_for(lambda r: r.trigger is Trigger.START)
    assert (first.outcome, first.revision) == (Outcome.APPLIED, repo.head()), first.message
    pve_put(lab.pve, LLM_CONFIG, memory=1024)
    docker_client.containers.get("comfyui").stop(timeout=5)
    record = loop.wait_for(lambda r: bool(r.drift))
    if len(record.drift) < 2:  # the two hand-made changes may straddle two passes
        record = loop.wait_for(lambda r: bool(r.drift))
    assert record.outcome is Outcome.APPLIED, record.message
    fixed = {(d.address, d.policy, d.corrected) for r in loop.records for d in r.drift}
    assert ("lxc/llm", "correct", True) in fixed
    assert ("container/image/comfyui", "correct", True) in fixed
    assert pve_get(lab.pve, LLM_CONFIG)["memory"] == 32 * 1024
    docker_client.containers.get("comfyui").reload()
    assert docker_client.containers.get("comfyui").status == "running"
    note = repo.git("notes", "--ref=reconciler", "show", repo.head())
    assert "drift lxc/llm: memory (corrected)" in note


def test_warn_reports_drift_and_writes_nothing(loop_lab: Callable[..., tuple[RealLab, GitRepo, InProcessLoop]]) -> None:
    lab, repo, loop = loop_lab()
    repo.edit("guests.yaml", "tags: [llm]", "tags: [llm]\ndrift: warn")
    repo.commit("llm: drift is only reported")
    assert loop.once(Trigger.START).outcome is Outcome.APPLIED
    pve_put(lab.pve, LLM_CONFIG, memory=2048)
    lab.pve.clear_requests()
    record = loop.once(Trigger.INTERVAL)
    assert record.outcome is Outcome.NO_CHANGES
    assert [(d.address, d.fields, d.policy, d.corrected) for d in record.drift] == [
        ("lxc/llm", ("memory",), "warn", False)
    ]
    assert lab.pve.writes() == []
    assert pve_get(lab.pve, LLM_CONFIG)["memory"] == 2048


def test_suspend_stops_all_writes(
    loop_lab: Callable[..., tuple[RealLab, GitRepo, InProcessLoop]], docker_client: Any
) -> None:
    lab, repo, loop = loop_lab()
    assert loop.once(Trigger.START).outcome is Outcome.APPLIED
    loop.controller.suspend()
    pve_put(lab.pve, LLM_CONFIG, memory=2048)
    docker_client.containers.get("comfyui").stop(timeout=5)
    repo.edit("workloads.yaml", "max_num_seqs: 32", "max_num_seqs: 8")
    sha = repo.commit("qwen: 8 sequences")
    lab.pve.clear_requests()
    since = time.time()
    for trigger in (Trigger.COMMIT, Trigger.INTERVAL, Trigger.MANUAL):
        record = loop.once(trigger)
        assert (record.outcome, record.revision) == (Outcome.SUSPENDED, sha)
    assert set(record.changes) == {"update lxc/llm", "start container/image/comfyui", "replace container/llm/qwen-7b"}
    assert {d.address for d in record.drift if not d.corrected} == {"lxc/llm", "container/image/comfyui"}
    assert lab.pve.writes() == []
    assert docker_writes_since(docker_client, since) == []
    assert pve_get(lab.pve, LLM_CONFIG)["memory"] == 2048

    loop.controller.resume()
    record = loop.once(Trigger.MANUAL)
    assert record.outcome is Outcome.APPLIED, record.message
    assert pve_get(lab.pve, LLM_CONFIG)["memory"] == 32 * 1024


def _daemon(lab: RealLab, repo: GitRepo, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, **lab.env, "RECONCILER_STATE_DIR": str(lab.state_dir), "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "reconciler", "run", "specs", "--repo", str(repo.path), "--health-timeout", "20", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _completed_steps(state_dir: Path) -> int:
    path = state_dir / "journal.sqlite"
    if not path.exists():
        return 0
    journal = Journal(path)
    try:
        run = journal.last_run()
        if run is None:
            return 0
        return sum(s.outcome is StepOutcome.OK and s.phase == "apply" for s in journal.steps(run.id))
    finally:
        journal.close()


def test_sigterm_mid_pass_leaves_a_journal_the_next_start_resumes(
    loop_lab: Callable[..., tuple[RealLab, GitRepo, InProcessLoop]],
) -> None:
    lab, repo, _ = loop_lab()
    lab.pve.pve.slow_network(0.05)  # every request takes a while: the pass is long enough to be interrupted
    lab.pve.pve.time_scale = 1.0
    daemon = _daemon(lab, repo)
    try:
        deadline = time.monotonic() + 120
        while _completed_steps(lab.state_dir) < 1 and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        # One daemon per lab: a second one refuses and names the process holding the state directory.
        second = subprocess.run(
            [sys.executable, "-m", "reconciler", "run", "specs", "--repo", str(repo.path), "--once"],
            cwd=ROOT,
            env={**os.environ, **lab.env, "RECONCILER_STATE_DIR": str(lab.state_dir)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert f"pid {daemon.pid}" in second.stderr and "held by another reconciler" in second.stderr
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=120)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert daemon.returncode == 0, err
    journal = Journal(lab.state_dir / "journal.sqlite")
    try:
        interrupted = journal.last_run()
        assert interrupted is not None and interrupted.result is RunResult.RUNNING
        done = [s for s in journal.steps(interrupted.id) if s.phase == "apply"]
        assert done and all(s.outcome is StepOutcome.OK for s in done)  # the current step ended and was recorded
        assert len(done) < len(interrupted.plan["changes"])
    finally:
        journal.close()

    lab.pve.pve.slow_network(0.0)
    lab.pve.pve.time_scale = 0.0
    again = _daemon(lab, repo, "--once")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, out + err
    journal = Journal(lab.state_dir / "journal.sqlite")
    try:
        resumed = journal.last_run()
        assert resumed is not None and resumed.result is RunResult.APPLIED
        assert resumed.resumed_from == interrupted.id
        previous = journal.run(interrupted.id)
        assert previous is not None and previous.result is RunResult.INTERRUPTED
    finally:
        journal.close()
    assert pve_get(lab.pve, LLM_CONFIG)["memory"] == 32 * 1024


def test_run_once_exits_like_apply(loop_lab: Callable[..., tuple[RealLab, GitRepo, InProcessLoop]]) -> None:
    lab, repo, _ = loop_lab()
    first = _daemon(lab, repo, "--once")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert f"pass 1 (start) {repo.head()[:12]}: applied" in out
    repo.edit("guests.yaml", "memory: 32GiB", "memory: plenty")
    repo.commit("invalid")
    second = _daemon(lab, repo, "--once")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 1
    assert "invalid" in out and "specs/guests.yaml:9:9" in out

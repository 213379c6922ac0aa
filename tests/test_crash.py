"""Crash safety: `reconciler apply` killed with SIGKILL at a random step, then run again, converges.

The apply runs as a subprocess against fakepve (a thread of this test process, so what the killed
process started goes on: a create task it was waiting for finishes without it) and the real Docker
engine. fakepve is slowed down (time_scale, a create that takes a while, latency on every request)
so that a run takes a few seconds and the kill lands inside it. The moment is chosen from the
journal's steps table: after the k-th step has begun (k random), plus a random fraction of a second.

Then apply runs again and must: converge (a second plan is empty), create no guest twice (one
successful create task per vmid), leave exactly one container per workload (nothing duplicated, no
container set aside for a rollback left behind), mark the killed run `interrupted` and record that
the new run `resumed_from` it.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.engine.journal import RunResult
from reconciler.planning.inventory import OLD_SUFFIX
from tests.support.fakepve import PveServer
from tests.support.reallab import RealLab
from tests.test_apply_real import (  # noqa: F401 - lab_of is a fixture
    ROOT,
    change_phoenix,
    cli_apply,
    cli_env,
    containers,
    lab_of,
    output,
    runs,
)

pytestmark = [pytest.mark.docker, pytest.mark.fakepve, pytest.mark.nvml]

SEEDS = [1, 2, 3, 4]


def begun_steps(journal: Path) -> tuple[int, str] | None:
    """(steps begun, result) of the latest run, read as another process would: read-only."""
    if not journal.exists():
        return None
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT id, result FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None
        (count,) = db.execute("SELECT count(*) FROM steps WHERE run_id = ?", (row[0],)).fetchone()
        return int(count), str(row[1])
    except sqlite3.OperationalError:  # the schema is not written yet
        return None
    finally:
        db.close()


def slow_down(server: PveServer) -> None:
    """Every request takes ~40 ms, a CT create 0.6 s, a CT start 0.2 s: a run lasts seconds, not milliseconds."""
    pve = server.pve

    def slow() -> None:
        pve.time_scale = 0.02
        pve.slow_network(2.0)
        pve.ct_secs["create"] = 30
        for ct in pve.cts:
            ct.start_secs = 10

    server.call(slow)


def kill_at_a_random_step(lab: RealLab, spec: Path, rng: random.Random, last: int) -> tuple[int, int]:
    """Start apply, SIGKILL it once its k-th step (1 <= k <= last) has begun; return (k, steps begun then)."""
    journal = lab.state_dir / "journal.sqlite"
    known = len(runs(lab)) if journal.exists() else 0
    target = rng.randint(1, last)
    process = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "apply", str(spec), "--auto-approve", "--health-timeout", "20"],
        cwd=ROOT,
        env=cli_env(lab),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"apply ended (exit {process.returncode}) before step {target}"
            assert time.monotonic() < deadline, f"step {target} never began"
            seen = begun_steps(journal)
            if seen is not None and len(runs(lab)) > known and seen[0] >= target:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    seen = begun_steps(journal)
    assert seen is not None
    return target, seen[0]


def successful_creates(server: PveServer) -> Counter[str]:
    return Counter(
        task["id"]
        for task in server.pve.tasklog
        if task["type"] in ("vzcreate", "qmcreate") and task.get("exitstatus") == "OK"
    )


def assert_converged_after_resume(lab: RealLab, spec: Path, server: PveServer, docker_client: Any) -> None:
    killed = runs(lab)[-1]
    server.call(server.pve.slow_network, 0.0)  # the tasks still running keep their pace; requests are quick again
    resumed = cli_apply(lab, spec)
    assert resumed.returncode == 0, output(resumed)

    history = runs(lab)
    interrupted = next(run for run in history if run.id == killed.id)
    if killed.result is RunResult.RUNNING:
        assert interrupted.result is RunResult.INTERRUPTED
        assert history[-1].resumed_from == killed.id and history[-1].result is RunResult.APPLIED
    assert all(run.result is not RunResult.RUNNING for run in history)

    again = lab.cli("plan", str(spec))
    assert again.returncode == 0 and "No changes" in again.stdout, output(again)
    creates = successful_creates(server)
    assert creates and all(count == 1 for count in creates.values()), creates
    desired = lab.load()
    names = [c.name.lstrip("/") for c in docker_client.containers.list(all=True)]
    assert len(names) == len(set(names))
    assert not [name for name in names if name.endswith(OLD_SUFFIX)]
    assert sorted(containers(docker_client)) == sorted(f"{w.host}/{w.name}" for w in desired.workloads())


@pytest.mark.parametrize("seed", SEEDS)
def test_apply_killed_from_empty_then_run_again_converges(
    seed: int,
    lab_of: Callable[[Path], tuple[RealLab, Path]],  # noqa: F811
    pve_server: PveServer,
    docker_client: Any,
) -> None:
    rng = random.Random(seed)
    lab, spec = lab_of(ROOT / "specs")
    slow_down(pve_server)
    target, begun = kill_at_a_random_step(lab, spec, rng, last=8)  # 9 steps: 5 changes, 4 health checks
    assert runs(lab)[-1].result is RunResult.RUNNING, f"the run ended before the kill (step {target} of {begun})"
    assert_converged_after_resume(lab, spec, pve_server, docker_client)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_apply_killed_while_changing_a_running_lab_then_run_again_converges(
    seed: int,
    lab_of: Callable[[Path], tuple[RealLab, Path]],  # noqa: F811
    pve_server: PveServer,
    docker_client: Any,
) -> None:
    rng = random.Random(seed)
    lab, spec = lab_of(ROOT / "specs")
    first = cli_apply(lab, spec)
    assert first.returncode == 0, output(first)
    change_phoenix(spec)  # stops, a CT update, a VM start, a container replaced
    slow_down(pve_server)
    target, begun = kill_at_a_random_step(lab, spec, rng, last=7)  # 8 steps: 5 changes, 3 health checks
    assert runs(lab)[-1].result is RunResult.RUNNING, f"the run ended before the kill (step {target} of {begun})"
    assert_converged_after_resume(lab, spec, pve_server, docker_client)


def test_apply_killed_while_a_create_task_runs_waits_for_it_then_converges(
    lab_of: Callable[[Path], tuple[RealLab, Path]],  # noqa: F811
    pve_server: PveServer,
    docker_client: Any,
) -> None:
    """The killed run's create task outlives it: the next run finds a guest being made (locked, not yet
    tagged) and must wait for it rather than take it for someone else's guest or make it again."""
    lab, spec = lab_of(ROOT / "specs")
    slow_down(pve_server)
    pve_server.pve.ct_secs["create"] = 200  # 4 s
    kill_at_a_random_step(lab, spec, random.Random(0), last=1)
    assert runs(lab)[-1].result is RunResult.RUNNING
    being_made = pve_server.pve.ct(956)
    assert being_made is not None and being_made.lock == "create", "the create task is not running any more"
    assert_converged_after_resume(lab, spec, pve_server, docker_client)

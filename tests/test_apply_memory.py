"""Apply, verify and roll back on the in-memory lab; assertions are on the lab's state and the journal.

The same applier runs against fakepve and a real Docker engine in
test_apply_real.py; here the faults are cheap to inject and exact.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.engine.apply import Applier, HealthPolicy
from reconciler.engine.journal import RunResult, StepOutcome
from reconciler.engine.lock import state_lock
from reconciler.errors import ConfigError, PlanError, TaskFailed, TemporaryError
from reconciler.planning.plan import Action
from tests.support.labs import Harness, load, write_tree

SPEC = """\
kind: Lxc
name: llm
node: pve1
vmid: 955
template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
cores: 8
memory: 32GiB
rootfs: {storage: local-lvm, size: 64GiB}
network: [{name: eth0, bridge: vmbr0, ip: dhcp}]
features: {nesting: true}
gpus: [big]
docker: {endpoint: "ssh://root@llm.lan"}
---
kind: Model
name: qwen-7b
engine: vllm
host: llm
gpus: [big]
source: /models/Qwen2.5-7B-Instruct
port: 8000
probe: {http: /health, timeout: 2s, interval: 10ms}
---
kind: Container
name: router
host: llm
image: ghcr.io/example/router:1
ports: ["9000:9000"]
"""


def snapshot(harness: Harness) -> tuple[object, object]:
    guests = {vmid: (g.status, dict(g.config), dict(g.pending)) for vmid, g in harness.lab.proxmox.guests.items()}
    containers = {
        host: {n: (c.image, c.status, dict(c.env)) for n, c in cs.items()}
        for host, cs in harness.lab.docker.containers.items()
    }
    return copy.deepcopy(guests), copy.deepcopy(containers)


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    folder = write_tree(tmp_path / "spec", SPEC)
    return Harness(tmp_path, load(folder))


def test_apply_from_empty_converges_and_the_journal_tells_the_story(harness: Harness, tmp_path: Path) -> None:
    desired = load(tmp_path / "spec")
    plan, report = harness.apply(desired)
    assert report is not None and report.result is RunResult.APPLIED and report.exit_code == 0
    assert harness.lab.proxmox.guests[955].status == "running"
    assert {n: c.status for n, c in harness.lab.docker.containers["llm"].items()} == {
        "qwen-7b": "running",
        "router": "running",
    }
    steps = harness.journal.steps(report.run_id)
    assert [s.address for s in steps if s.phase == "apply"] == [c.address for c in plan.changes]
    assert all(s.outcome is StepOutcome.OK for s in steps)
    assert any(s.phase == "verify" and s.health and s.health[0]["healthy"] for s in steps)
    run = harness.journal.last_run()
    assert run is not None and run.result is RunResult.APPLIED and run.plan["summary"] == plan.summary()
    assert harness.plan(desired).empty


def test_a_failing_step_rolls_back_everything_applied_before_it(harness: Harness, tmp_path: Path) -> None:
    desired = load(tmp_path / "spec")
    harness.apply(desired)
    before = snapshot(harness)
    write_tree(tmp_path / "spec", SPEC.replace("cores: 8", "cores: 4").replace("router:1", "router:2"))
    changed = load(tmp_path / "spec")
    harness.lab.docker.fail_next["create_container"] = TemporaryError("engine answered 500", resource="llm/router")
    plan, report = harness.apply(changed)
    assert [c.action for c in plan.changes] == [Action.UPDATE, Action.REPLACE]
    assert report is not None and report.result is RunResult.ROLLED_BACK and report.exit_code == 1
    assert snapshot(harness) == before, "the lab is exactly as it was"
    assert harness.journal.failed_revision(changed.revision or "") is not None
    rollback = [s for s in harness.journal.steps(report.run_id) if s.phase == "rollback"]
    assert [s.address for s in rollback] == ["container/llm/router", "lxc/llm"]
    assert all(s.outcome is StepOutcome.UNDONE for s in rollback)
    with pytest.raises(PlanError, match="failed before"):
        harness.apply(changed)
    _, retried = harness.apply(changed, retry=True)
    assert retried is not None and retried.result is RunResult.APPLIED


def test_a_health_check_that_fails_restores_the_previous_container(harness: Harness, tmp_path: Path) -> None:
    harness.apply(load(tmp_path / "spec"))
    old_id = harness.lab.docker.containers["llm"]["qwen-7b"].id
    write_tree(tmp_path / "spec", SPEC.replace("port: 8000", "port: 8001"))
    harness.options = type(harness.options)(
        health=HealthPolicy(max_timeout=0.2, interval=0.01),
        prober=lambda host, probe, load: harness.lab.probe(host, replace(probe, port=1), load),
    )
    _, report = harness.apply(load(tmp_path / "spec"))
    assert report is not None and report.result is RunResult.ROLLED_BACK
    restored = harness.lab.docker.containers["llm"]
    assert set(restored) == {"qwen-7b", "router"}
    assert restored["qwen-7b"].id == old_id and restored["qwen-7b"].status == "running"
    assert "health check failed" in (report.failure or "")


def test_a_rollback_that_cannot_complete_says_so(harness: Harness, tmp_path: Path) -> None:
    harness.apply(load(tmp_path / "spec"))
    write_tree(tmp_path / "spec", SPEC.replace("cores: 8", "cores: 4").replace("router:1", "router:2"))
    harness.lab.proxmox.fail_next["update_config"] = TemporaryError("can't lock file", resource="lxc/955")
    _, report = harness.apply(load(tmp_path / "spec"))
    assert report is not None and report.result is RunResult.ROLLED_BACK  # the failed first step had nothing to undo
    harness.lab.proxmox.fail_next["start"] = TaskFailed(
        "TASK ERROR: startup for container '955' failed", resource="lxc/955"
    )

    def broken(host: str, spec: object) -> str:
        raise TemporaryError("engine answered 500", resource=host)

    harness.lab.docker.create_container = broken  # type: ignore[method-assign]
    _, report = harness.apply(load(tmp_path / "spec"), retry=True)
    assert report is not None and report.result is RunResult.ROLLBACK_FAILED and report.exit_code == 3
    assert report.rollback_errors and "lxc/llm" in report.rollback_errors[0]


def test_an_interrupted_run_is_resumed_and_its_steps_can_still_be_undone(harness: Harness, tmp_path: Path) -> None:
    desired = load(tmp_path / "spec")
    harness.apply(desired)
    before = snapshot(harness)
    write_tree(tmp_path / "spec", SPEC.replace("cores: 8", "cores: 4").replace("port: 8000", "port: 8001"))
    changed = load(tmp_path / "spec")

    class Killed(BaseException):
        """Stands for SIGKILL: nothing after it runs, not even the rollback."""

    def killed(host: str, spec: object) -> str:
        raise Killed

    original = harness.lab.docker.create_container
    harness.lab.docker.create_container = killed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        harness.apply(changed)
    harness.lab.docker.create_container = original  # type: ignore[method-assign]
    (unfinished,) = harness.journal.unfinished_runs()
    assert harness.lab.proxmox.guests[955].config["cores"] == "4", "the first step had happened"
    assert "qwen-7b" not in harness.lab.docker.containers["llm"], "the old container was set aside"
    # The resumed run fails its health check: the interrupted run's steps are undone as well.
    harness.options = type(harness.options)(
        health=HealthPolicy(max_timeout=0.1, interval=0.01),
        prober=lambda host, probe, load: harness.lab.probe(host, replace(probe, port=1), load),
    )
    plan, report = harness.apply(changed)
    assert [(c.address, c.action) for c in plan.changes] == [("container/llm/qwen-7b", Action.CREATE)]
    assert report is not None and report.result is RunResult.ROLLED_BACK
    assert snapshot(harness) == before
    interrupted = harness.journal.run(unfinished.id)
    assert interrupted is not None and interrupted.result is RunResult.INTERRUPTED
    resumed = harness.journal.last_run()
    assert resumed is not None and resumed.resumed_from == unfinished.id


def test_a_resumed_run_that_succeeds_cleans_up_what_the_interrupted_one_set_aside(
    harness: Harness, tmp_path: Path
) -> None:
    harness.apply(load(tmp_path / "spec"))
    write_tree(tmp_path / "spec", SPEC.replace("router:1", "router:2"))
    changed = load(tmp_path / "spec")

    class Killed(BaseException):
        pass

    original = harness.lab.docker.start_container

    def killed(host: str, name: str) -> None:
        raise Killed

    harness.lab.docker.start_container = killed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        harness.apply(changed)
    harness.lab.docker.start_container = original  # type: ignore[method-assign]
    assert set(harness.lab.docker.containers["llm"]) == {"qwen-7b", "router", "router-reconciler-old"}
    plan, report = harness.apply(changed)
    assert [(c.address, c.action) for c in plan.changes] == [("container/llm/router", Action.START)]
    assert report is not None and report.result is RunResult.APPLIED
    assert set(harness.lab.docker.containers["llm"]) == {"qwen-7b", "router"}
    assert harness.lab.docker.containers["llm"]["router"].image.endswith("router:2")
    assert harness.plan(changed).empty


def test_a_run_killed_after_its_last_step_is_completed_by_the_next_one(harness: Harness, tmp_path: Path) -> None:
    harness.apply(load(tmp_path / "spec"))
    write_tree(tmp_path / "spec", SPEC.replace("cores: 8", "cores: 4"))
    changed = load(tmp_path / "spec")

    class Killed(BaseException):
        """Stands for SIGKILL between the last step and the end of the run."""

    original = harness.journal.end_run

    def killed(*args: object, **kwargs: object) -> None:
        raise Killed

    harness.journal.end_run = killed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        harness.apply(changed)
    harness.journal.end_run = original  # type: ignore[method-assign]
    (unfinished,) = harness.journal.unfinished_runs()
    assert harness.lab.proxmox.guests[955].config["cores"] == "4"

    plan, report = harness.apply(changed)
    assert plan.empty
    assert report is not None and report.result is RunResult.APPLIED, "it completed the interrupted run's work"
    resumed = harness.journal.last_run()
    assert resumed is not None and resumed.resumed_from == unfinished.id and resumed.result is RunResult.APPLIED
    assert not harness.journal.unfinished_runs()


def test_guard_rails_refuse_mass_deletion_and_missing_secrets(harness: Harness, tmp_path: Path) -> None:
    harness.apply(load(tmp_path / "spec"))
    write_tree(tmp_path / "spec", "kind: DockerHost\nname: other\nendpoint: unix:///x.sock\n")
    lab = tmp_path / "spec" / "lab.yaml"
    lab.write_text(lab.read_text().replace("name: test\n", "name: test\nmax_deletes: 2\n", 1))
    plan, report = harness.apply(load(tmp_path / "spec"))
    assert report is None and not plan.applicable
    assert any("deletes or recreates 3" in p.message for p in plan.blockers), plan.blockers
    assert 955 in harness.lab.proxmox.guests
    write_tree(tmp_path / "spec", SPEC + "secret_env: {TOKEN: LAB_TEST_UNSET_TOKEN}\n")
    with pytest.raises(ConfigError, match="LAB_TEST_UNSET_TOKEN"):
        harness.apply(load(tmp_path / "spec"))


def test_secrets_reach_the_container_but_not_the_journal(tmp_path: Path) -> None:
    folder = write_tree(tmp_path / "spec", SPEC + "secret_env: {API_KEY: LAB_TEST_KEY}\n")
    harness = Harness(tmp_path, load(folder))
    desired = load(folder)
    plan = harness.plan(desired)
    applier = Applier(
        proxmox=harness.lab.proxmox,
        docker=harness.lab.docker,
        journal=harness.journal,
        env={"LAB_TEST_KEY": "s3cr3t-value"},
        docker_endpoints={},
        health=HealthPolicy(max_timeout=1, interval=0.01),
        prober=harness.lab.probe,
    )
    report = applier.apply(plan, desired)
    assert report.result is RunResult.APPLIED
    assert harness.lab.docker.containers["llm"]["router"].env["API_KEY"] == "s3cr3t-value"
    harness.journal.close()
    assert b"s3cr3t-value" not in Path(harness.journal.path).read_bytes()
    for wal in Path(harness.journal.path).parent.glob("*-wal"):
        assert b"s3cr3t-value" not in wal.read_bytes()


def test_one_apply_at_a_time(tmp_path: Path) -> None:
    with (
        state_lock(tmp_path),
        pytest.raises(TemporaryError, match="another apply is running"),
        state_lock(tmp_path, wait=0.2),
    ):
        pass
    with state_lock(tmp_path):
        pass  # released on exit


def test_a_growing_disk_is_resized_in_place_and_the_next_plan_is_empty(harness: Harness, tmp_path: Path) -> None:
    harness.apply(load(tmp_path / "spec"))
    volume = harness.lab.proxmox.guests[955].config["rootfs"].split(",")[0]
    write_tree(tmp_path / "spec", SPEC.replace("size: 64GiB", "size: 80GiB"))
    grown = load(tmp_path / "spec")
    plan, report = harness.apply(grown)
    assert [(f.path, f.before, f.after, str(f.timing)) for f in plan.changes[0].fields] == [
        ("rootfs.size", "64G", "80G", "live")
    ]
    assert report is not None and report.result is RunResult.APPLIED
    guest = harness.lab.proxmox.guests[955]
    assert guest.config["rootfs"] == f"{volume},size=80G", "the same volume, grown"
    assert guest.status == "running", "a disk grows online"
    assert ("PUT", "lxc/955/resize") in harness.lab.proxmox.requests
    assert harness.plan(grown).empty


def test_a_shrinking_disk_is_a_blocker_and_nothing_is_written(harness: Harness, tmp_path: Path) -> None:
    harness.apply(load(tmp_path / "spec"))
    before = snapshot(harness)
    write_tree(tmp_path / "spec", SPEC.replace("size: 64GiB", "size: 32GiB"))
    shrunk = load(tmp_path / "spec")
    plan = harness.plan(shrunk)
    assert not plan.applicable
    assert [(b.resource, b.message) for b in plan.blockers] == [
        ("Lxc/llm", "rootfs is 64G and the spec asks for 32G: Proxmox cannot shrink a disk")
    ]
    _, report = harness.apply(shrunk)
    assert report is None, "a plan with a blocker is not applied"
    assert snapshot(harness) == before


def test_a_rollback_keeps_a_grown_disk_and_restores_the_rest(harness: Harness, tmp_path: Path) -> None:
    harness.apply(load(tmp_path / "spec"))
    write_tree(
        tmp_path / "spec",
        SPEC.replace("size: 64GiB", "size: 80GiB")
        .replace("memory: 32GiB", "memory: 24GiB")
        .replace("router:1", "router:2"),
    )
    changed = load(tmp_path / "spec")
    harness.lab.docker.fail_next["create_container"] = TemporaryError("engine answered 500", resource="llm/router")
    _, report = harness.apply(changed)
    assert report is not None and report.result is RunResult.ROLLED_BACK and not report.rollback_errors
    guest = harness.lab.proxmox.guests[955]
    assert guest.config["memory"] == "32768", "the memory change is undone"
    assert guest.config["rootfs"].endswith(",size=80G"), "a disk cannot shrink back: it keeps its new size"


VM_SPEC = """\
kind: Vm
name: audit
node: pve1
vmid: 190
cores: 4
memory: 16GiB
disks:
  - {slot: scsi0, storage: local-lvm, size: 100GiB, discard: true, iothread: true}
network:
  - {name: net0, bridge: vmbr0, model: virtio}
"""


def test_a_running_vms_disk_grows_without_a_restart(tmp_path: Path) -> None:
    harness = Harness(tmp_path, load(write_tree(tmp_path / "spec", VM_SPEC)))
    harness.apply(load(tmp_path / "spec"))
    write_tree(tmp_path / "spec", VM_SPEC.replace("size: 100GiB", "size: 200GiB").replace("cores: 4", "cores: 8"))
    grown = load(tmp_path / "spec")
    plan, report = harness.apply(grown)
    fields = {f.path: str(f.timing) for f in plan.changes[0].fields}
    assert fields == {"scsi0.size": "live", "cores": "restart"}
    assert report is not None and report.result is RunResult.APPLIED
    guest = harness.lab.proxmox.guests[190]
    assert guest.config["scsi0"].endswith("size=200G") and guest.status == "running"
    assert harness.plan(grown).empty


WORKSTATION = """\
---
kind: DockerHost
name: workstation
endpoint: "ssh://me@workstation.lan"
---
kind: Container
name: notebook
host: workstation
image: ghcr.io/example/notebook:1
"""


def test_containers_on_a_host_dropped_from_the_spec_are_reported_until_forgotten(tmp_path: Path) -> None:
    harness = Harness(tmp_path, load(write_tree(tmp_path / "spec", SPEC + WORKSTATION)))
    _, report = harness.apply(load(tmp_path / "spec"))
    assert report is not None and report.result is RunResult.APPLIED
    write_tree(tmp_path / "spec", SPEC)
    harness.lab.docker.containers.pop("workstation")  # as `connect` does: only the spec's hosts are reached
    plan = harness.plan(load(tmp_path / "spec"))
    assert plan.empty, "a host that is not observed gets no changes"
    assert [(w.resource, w.message) for w in plan.warnings] == [
        (
            "container/workstation",
            "Docker host 'workstation' is no longer in the spec; the containers made there (notebook) "
            "are not watched and will not be removed",
        )
    ]

    forgot = subprocess.run(
        [sys.executable, "-m", "reconciler", "forget", "container/workstation", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (forgot.returncode, forgot.stdout) == (0, "forgot container/workstation/notebook\n"), forgot.stderr
    assert not harness.plan(load(tmp_path / "spec")).warnings
    again = subprocess.run(
        [sys.executable, "-m", "reconciler", "forget", "container/workstation", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 1 and "nothing in the inventory" in again.stderr


def test_containers_go_with_the_guest_that_ran_them_and_leave_no_warning(harness: Harness, tmp_path: Path) -> None:
    harness.apply(load(tmp_path / "spec"))
    write_tree(tmp_path / "spec", "kind: DockerHost\nname: other\nendpoint: unix:///var/run/docker.sock\n")
    emptied = load(tmp_path / "spec")
    plan, report = harness.apply(emptied)
    assert not plan.warnings and report is not None and report.result is RunResult.APPLIED
    assert 955 not in harness.lab.proxmox.guests
    assert not [a for a in harness.journal.inventory().owned if a.startswith("container/llm/")]
    assert not harness.plan(emptied).warnings


def test_a_backend_error_during_a_health_check_rolls_back(harness: Harness, tmp_path: Path) -> None:
    harness.apply(load(tmp_path / "spec"))
    old_id = harness.lab.docker.containers["llm"]["qwen-7b"].id
    write_tree(tmp_path / "spec", SPEC.replace("port: 8000", "port: 8001"))

    def engine_gone(host: str, probe: object, load: str | None) -> object:
        raise TemporaryError("Docker engine answered 502", resource=f"{host}/qwen-7b")

    _, report = harness.apply(load(tmp_path / "spec"), prober=engine_gone)
    assert report is not None and report.result is RunResult.ROLLED_BACK and not report.rollback_errors
    assert "health check could not be made: " in (report.failure or "")
    restored = harness.lab.docker.containers["llm"]["qwen-7b"]
    assert (restored.id, restored.status) == (old_id, "running")
    assert set(harness.lab.docker.containers["llm"]) == {"qwen-7b", "router"}

"""Acceptance tests of `reconciler apply` against real things: fakepve over HTTPS and a real Docker engine.

Every apply runs the command itself (`lab.cli`, a subprocess with the lab's environment), the way a
person or a timer runs it. Assertions are on what fakepve and the Docker engine hold afterwards (full
guest configs from `GET .../config`, container ids, images and states), on fakepve's request log and
the engine's event stream (to prove that a second apply writes nothing), and on the journal.

The containers run reallab's stand-in server (`real_lab(spec, stand_in=True)`): the engine test
image, which exits on SIGTERM as real servers do, listens on every container port the spec
publishes, answers its probe paths and has the commands its Docker HEALTHCHECKs run. Model health
failures use the engine image's `broken` tag (404 on /health).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from reconciler.engine.journal import Journal, RunRecord, RunResult, StepOutcome, StepRecord
from reconciler.spec.models import Lxc, Vm, Workload
from tests.support.dockerd import EngineImage
from tests.support.fakepve import PveServer
from tests.support.reallab import MakeRealLab, RealLab

pytestmark = [pytest.mark.docker, pytest.mark.fakepve, pytest.mark.nvml]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [*sorted(p for p in (ROOT / "examples").iterdir() if (p / "lab.yaml").is_file()), ROOT / "specs"]
MANAGED = ".managed"  # `<owner>.managed`: the owner tag is derived from the lab name
SECRET_VALUE = "test-secret-value-7f3a"  # what the examples' secret_env variables hold here
# Container events that mean the engine was asked to change something.
DOCKER_WRITES = {"create", "start", "stop", "kill", "die", "destroy", "rename", "update", "restart", "pause"}

# One machine plays every Docker host of a lab here: one engine, one network address. Two things the
# examples rightly rely on cannot hold on it, so the copies the tests apply differ from the examples in
# exactly these lines (everything else is applied as written):
# - TCP probes name the Docker host's LAN address (memory.jarvis.lan, image.phoenix.lan), which does not
#   resolve here; the copy probes the same port on 127.0.0.1, where the engine publishes it.
# - Two hosts publish the same port (llm-main and safety: 8080; llm and image: 11434), which on one
#   engine collide; the copy moves the second one to another port.
# - Docker HEALTHCHECKs with the default 30 s interval report "healthy" only after 30 s, and the applier
#   waits for it; the copy checks every second to keep the test short.
ADJUSTMENTS: dict[str, list[tuple[str, str | None, str, str]]] = {
    # example -> (file, document name or None for the whole file, old text, new text)
    "four-gpu-phases": [
        ("services.yaml", "redis", 'tcp: "memory.jarvis.lan:6379"', 'tcp: "127.0.0.1:6379"'),
        ("services.yaml", "postgres", 'tcp: "memory.jarvis.lan:5432"', 'tcp: "127.0.0.1:5432"'),
        (
            "services.yaml",
            "redis",
            'test: ["CMD", "redis-cli", "ping"]',
            'test: ["CMD", "redis-cli", "ping"]\n  interval: 1s',
        ),
        (
            "services.yaml",
            "postgres",
            'test: ["CMD", "pg_isready", "-U", "jarvis"]',
            'test: ["CMD", "pg_isready", "-U", "jarvis"]\n  interval: 1s',
        ),
        ("phases/phase-2.yaml", "safety", "port: 8080", "port: 18080"),
    ],
    "phoenix-two-lxc-gpus": [
        ("workloads.yaml", "postgres", 'tcp: "image.phoenix.lan:5432"', 'tcp: "127.0.0.1:5432"'),
        ("workloads.yaml", "postgres", "interval: 10s", "interval: 1s"),
        ("workloads.yaml", "captioner", "port: 11434", "port: 11435"),
    ],
}

# ---- images and labs ----------------------------------------------------------------------------------------


@pytest.fixture
def lab_of(real_lab: MakeRealLab, tmp_path: Path) -> Callable[[Path], tuple[RealLab, Path]]:
    """`lab_of(spec)` -> (lab, copy): a seeded lab for a copy of the spec (adjusted, see ADJUSTMENTS),
    its containers running the stand-in server, its secret variables set."""

    def make(source: Path) -> tuple[RealLab, Path]:
        spec = tmp_path / f"spec-{source.name}"
        shutil.copytree(source, spec)
        for file, document, old, new in ADJUSTMENTS.get(source.name, ()):
            edit(spec / file, old, new, document=document)
        lab = real_lab(spec, stand_in=True)
        desired = lab.load()
        for workload in desired.workloads():
            for variable in workload.secret_env.values():
                lab.env[variable] = SECRET_VALUE
        return lab, spec

    return make


def edit(path: Path, old: str, new: str, *, document: str | None = None) -> None:
    """Replace the first `old` in the file, or in its YAML document `name: document`."""
    docs = path.read_text().split("\n---\n")
    for index, doc in enumerate(docs):
        if document is not None and f"\nname: {document}\n" not in f"\n{doc}":
            continue
        if old in doc:
            docs[index] = doc.replace(old, new, 1)
            path.write_text("\n---\n".join(docs))
            return
    raise AssertionError(f"{old!r} not found in {path} ({document or 'any document'})")


def cli_apply(lab: RealLab, spec: Path, *extra: str, health: str = "20") -> subprocess.CompletedProcess[str]:
    return lab.cli("apply", str(spec), "--auto-approve", "--health-timeout", health, *extra)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def cli_env(lab: RealLab) -> dict[str, str]:
    return {**os.environ, **lab.env, "RECONCILER_STATE_DIR": str(lab.state_dir), "COLUMNS": "200"}


# ---- what the live lab holds ------------------------------------------------------------------------------


def pve_request(server: PveServer, method: str, path: str, params: dict[str, Any]) -> Any:
    """One call to fakepve's API with its token, outside the reconciler: what the API holds, or a hand-made change."""
    response = requests.request(
        method,
        f"{server.url}/api2/json{path}",
        **({"params": params} if method == "GET" else {"data": params}),
        headers={"Authorization": f"PVEAPIToken={server.token}"},
        verify=server.ca_file,
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["data"]


def pve_get(server: PveServer, path: str, **params: Any) -> Any:
    return pve_request(server, "GET", path, params)


def pve_put(server: PveServer, path: str, **params: Any) -> None:
    pve_request(server, "PUT", path, params)


def guests(server: PveServer) -> dict[str, dict[str, Any]]:
    """Every guest as the API shows it: status, full config (digest included) and pending changes."""
    seen = {}
    for row in pve_get(server, "/cluster/resources", type="vm"):
        base = f"/nodes/{row['node']}/{row['type']}/{row['vmid']}"
        seen[f"{row['type']}/{row['vmid']}"] = {
            "status": pve_get(server, f"{base}/status/current")["status"],
            "config": pve_get(server, f"{base}/config"),
            "pending": pve_get(server, f"{base}/pending"),
        }
    return seen


def containers(docker_client: Any) -> dict[str, dict[str, Any]]:
    """Every container the reconciler owns, by spec host and name: id, image, state."""
    seen = {}
    for summary in docker_client.api.containers(all=True):
        if not any(k.endswith(MANAGED) and v == "true" for k, v in (summary.get("Labels") or {}).items()):
            continue
        data = docker_client.api.inspect_container(summary["Id"])
        labels = data["Config"]["Labels"] or {}
        host = next((v for k, v in labels.items() if k.endswith(".host")), "?")
        key = f"{host}/{data['Name'].lstrip('/')}"
        assert key not in seen, f"two containers for {key}"
        seen[key] = {
            "id": data["Id"],
            "image": data["Config"]["Image"],
            "image_id": data["Image"],
            "status": data["State"]["Status"],
        }
    return seen


def snapshot(server: PveServer, docker_client: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return guests(server), containers(docker_client)


def docker_writes_since(docker_client: Any, since: float) -> list[tuple[str, str]]:
    events = docker_client.api.events(since=since, until=time.time(), decode=True, filters={"type": "container"})
    return [
        (event.get("Action", ""), event.get("Actor", {}).get("Attributes", {}).get("name", ""))
        for event in events
        if event.get("Action", "").split(":")[0] in DOCKER_WRITES
    ]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@contextmanager
def journal_of(lab: RealLab) -> Iterator[Journal]:
    journal = Journal(lab.state_dir / "journal.sqlite")
    try:
        yield journal
    finally:
        journal.close()


def runs(lab: RealLab) -> list[RunRecord]:
    with journal_of(lab) as journal:
        return list(reversed(journal.runs(100)))


def steps(lab: RealLab, run_id: int) -> list[StepRecord]:
    with journal_of(lab) as journal:
        return journal.steps(run_id)


# ---- 1. every example, from empty to its desired state --------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_applies_from_empty_and_a_second_apply_writes_nothing(
    example: Path,
    lab_of: Callable[[Path], tuple[RealLab, Path]],
    pve_server: PveServer,
    docker_client: Any,
) -> None:
    lab, spec = lab_of(example)
    desired = lab.load()

    started = time.time()
    first = cli_apply(lab, spec)
    assert first.returncode == 0, output(first)
    assert "Applied (run 1)" in first.stdout, output(first)
    assert ("create", f"{desired.workloads()[0].name}") in docker_writes_since(docker_client, started)

    # What the spec asks for exists, owned, once.
    live_guests = {  # the cloud-init templates clones come from were seeded: they are not the lab's guests
        int(key.split("/")[1]): value
        for key, value in guests(pve_server).items()
        if not value["config"].get("template")
    }
    for guest in [*desired.of(Lxc), *desired.of(Vm)]:
        assert guest.vmid in live_guests, f"{guest.ref} was not created"
        tags = str(live_guests[guest.vmid]["config"].get("tags", "")).replace(",", ";").split(";")
        assert desired.lab.owner in tags, f"{guest.ref} does not carry the owner tag"
    assert len(live_guests) == len(desired.of(Lxc)) + len(desired.of(Vm))
    live_containers = containers(docker_client)
    workloads = [w for w in desired.resources if isinstance(w, Workload)]
    assert sorted(live_containers) == sorted(f"{w.host}/{w.name}" for w in workloads)

    (run,) = runs(lab)
    assert run.result is RunResult.APPLIED and run.revision == desired.revision
    recorded = steps(lab, run.id)
    assert [s.address for s in recorded if s.phase == "apply"] == [c["address"] for c in run.plan["changes"]]
    assert all(s.outcome is StepOutcome.OK for s in recorded), [(s.address, s.outcome, s.error) for s in recorded]

    second_plan = lab.cli("plan", str(spec))
    assert second_plan.returncode == 0, output(second_plan)
    assert "No changes" in second_plan.stdout

    ids = {key: value["id"] for key, value in live_containers.items()}
    pve_server.clear_requests()
    since = time.time()
    again = cli_apply(lab, spec)
    assert again.returncode == 0, output(again)
    assert "Nothing to do." in again.stdout
    assert pve_server.writes() == []
    assert docker_writes_since(docker_client, since) == []
    assert {key: value["id"] for key, value in containers(docker_client).items()} == ids
    assert len(runs(lab)) == 1, "an empty plan records no run"
    assert SECRET_VALUE not in (lab.state_dir / "journal.sqlite").read_bytes().decode("latin-1")


# ---- 2. faults from fakepve: the run converges or is rolled back to exactly what was there --------------------


def change_phoenix(spec: Path) -> None:
    """One edit with steps on every kind of thing: containers stopped and replaced, a CT stopped and updated,
    a VM updated and started (the second GPU moves from the image CT to the desktop VM)."""
    edit(spec / "groups.yaml", "active: image", "active: desktop")
    edit(spec / "guests.yaml", "cores: 8", "cores: 4", document="llm")
    edit(spec / "workloads.yaml", "gpu_memory_utilization: 0.85", "gpu_memory_utilization: 0.8")


class CountingRandom(random.Random):
    """fakepve's source of chance for its flaky network, counting the connections it drops."""

    def __init__(self, seed: int, drop_rate: float) -> None:
        super().__init__(seed)
        self.drop_rate = drop_rate
        self.dropped = 0

    def random(self) -> float:
        value = super().random()
        self.dropped += value < self.drop_rate
        return value


def flaky(server: PveServer) -> None:
    """Drop one connection in five (connection reset before PVE reads the request), from a fixed seed."""
    chance = CountingRandom(11, 0.2)
    server.call(setattr, server.pve, "_random", chance)
    server.call(server.pve.flaky_network, drop_rate=chance.drop_rate)


def release_later(server: PveServer, vmid: int, seconds: float) -> None:
    server.run(server.pve.hold_config_lock(vmid, None))
    threading.Timer(seconds, lambda: server.call(server.pve.release_config_lock, vmid)).start()


FAULTS: dict[str, tuple[Callable[[PveServer], None], set[int]]] = {
    # name -> (inject it, the exit codes the run may end with)
    "task error on start": (
        lambda s: s.pve.fail("POST", "/nodes/phoenix/qemu/960/status/start", error="qemu_exited_code"),
        {1},
    ),
    "CT locked by a backup": (lambda s: s.call(s.pve.snapshot_lock, 956, "backup"), {1}),
    "config lock held": (lambda s: s.run(s.pve.hold_config_lock(955, None)), {1}),
    "config lock released after 1 s": (lambda s: release_later(s, 955, 1.0), {0}),
    "500 on config update": (
        lambda s: s.pve.fail("PUT", "/nodes/phoenix/lxc/955/config", 500, "unable to write lxc config"),
        {1},
    ),
    "flaky network": (flaky, {0, 1}),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_ends_converged_or_rolled_back_to_the_state_before(
    fault: str,
    lab_of: Callable[[Path], tuple[RealLab, Path]],
    pve_server: PveServer,
    docker_client: Any,
) -> None:
    lab, spec = lab_of(ROOT / "specs")
    base = cli_apply(lab, spec)
    assert base.returncode == 0, output(base)
    before = snapshot(pve_server, docker_client)
    change_phoenix(spec)

    inject, outcomes = FAULTS[fault]
    inject(pve_server)
    result = cli_apply(lab, spec)
    if isinstance(pve_server.pve._random, CountingRandom):
        assert pve_server.pve._random.dropped > 0, "the network dropped nothing"
    pve_server.call(pve_server.pve.flaky_network, drop_rate=0.0)
    pve_server.pve.failures.clear()
    pve_server.call(pve_server.pve.unlock, 956)
    pve_server.call(pve_server.pve.release_config_lock, 955)
    assert result.returncode in outcomes, output(result)

    run = runs(lab)[-1]
    recorded = steps(lab, run.id)
    applied = [s for s in recorded if s.phase == "apply"]
    assert applied, "the journal records the steps"
    for step in applied:
        assert step.intent["after"] is not None and step.intent["action"] == step.action
    history = lab.cli("history")
    assert history.returncode == 0
    line = next(text for text in history.stdout.splitlines() if text.split()[0] == str(run.id))

    if result.returncode == 0:
        assert run.result is RunResult.APPLIED and "applied" in line
        assert all(s.outcome is StepOutcome.OK for s in applied)
        again = lab.cli("plan", str(spec))
        assert again.returncode == 0, output(again)
        assert str(pve_server.pve.ct(955).config["cores"]) == "4"
        return

    assert run.result is RunResult.ROLLED_BACK and "rolled-back" in line, output(result)
    assert snapshot(pve_server, docker_client) == before
    failed = [s for s in applied if s.outcome is StepOutcome.FAILED]
    assert len(failed) == 1 and failed[0].error, [(s.address, s.outcome) for s in applied]
    assert all(s.outcome is StepOutcome.UNDONE for s in applied if s is not failed[0])
    rollback = [s for s in recorded if s.phase == "rollback"]
    assert [s.address for s in rollback] == [s.address for s in reversed(applied)]
    assert all(s.outcome is StepOutcome.UNDONE for s in rollback)
    with journal_of(lab) as journal:
        assert journal.failed_revision(run.revision or "") is not None


# ---- 3. a model server that never becomes healthy ---------------------------------------------------------------


def test_a_model_that_never_becomes_healthy_is_rolled_back_to_the_healthy_container(
    lab_of: Callable[[Path], tuple[RealLab, Path]],
    pve_server: PveServer,
    docker_client: Any,
    engine_image: EngineImage,
) -> None:
    source = ROOT / "specs"
    lab, spec = lab_of(source)
    edit(spec / "workloads.yaml", "port: 8000\n", "port: 8000\nprobe: {http: /health, timeout: 10s, interval: 1s}\n")
    base = lab.cli("apply", str(spec), "--auto-approve")
    assert base.returncode == 0, output(base)
    healthy = containers(docker_client)["llm/qwen-7b"]
    assert healthy["status"] == "running" and http_status("http://127.0.0.1:8000/health") == 200
    before = snapshot(pve_server, docker_client)

    edit(spec / "workloads.yaml", "engine: vllm\n", f"engine: vllm\nimage: {engine_image.broken}\n")
    started = time.monotonic()
    result = lab.cli("apply", str(spec), "--auto-approve")  # the spec's own 10 s probe timeout
    assert result.returncode == 1, output(result)
    assert time.monotonic() - started < 60
    assert "Rolled back" in result.stdout and "health check failed" in result.stdout, output(result)

    # The previous container is back: the same one, running, answering.
    restored = containers(docker_client)["llm/qwen-7b"]
    assert restored == healthy
    assert http_status("http://127.0.0.1:8000/health") == 200
    assert snapshot(pve_server, docker_client) == before
    assert not [c for c in containers(docker_client).values() if c["image"] == engine_image.broken]

    run = runs(lab)[-1]
    assert run.result is RunResult.ROLLED_BACK
    verify = [s for s in steps(lab, run.id) if s.phase == "verify" and s.address == "container/llm/qwen-7b"]
    assert verify[-1].outcome is StepOutcome.FAILED and verify[-1].health
    assert not verify[-1].health[0]["healthy"] and "404" in verify[-1].health[0]["detail"]
    with journal_of(lab) as journal:
        assert journal.failed_revision(run.revision or "") is not None

    # The failed revision is not tried again until --retry.
    pve_server.clear_requests()
    refused = lab.cli("apply", str(spec), "--auto-approve")
    assert refused.returncode == 1 and "failed before" in refused.stderr, output(refused)
    assert containers(docker_client)["llm/qwen-7b"] == healthy and pve_server.writes() == []
    assert len(runs(lab)) == 2

    retried = lab.cli("apply", str(spec), "--auto-approve", "--retry", "--health-timeout", "3")
    assert retried.returncode == 1, output(retried)
    assert "Rolled back (run 3)" in retried.stdout, output(retried)
    assert containers(docker_client)["llm/qwen-7b"] == healthy

    # A fix is a new revision: applied at once, and healthy.
    edit(spec / "workloads.yaml", f"image: {engine_image.broken}\n", "")
    edit(spec / "workloads.yaml", "gpu_memory_utilization: 0.85", "gpu_memory_utilization: 0.8")
    fixed = lab.cli("apply", str(spec), "--auto-approve")
    assert fixed.returncode == 0, output(fixed)
    replaced = containers(docker_client)["llm/qwen-7b"]
    assert replaced["id"] != healthy["id"] and replaced["status"] == "running"
    assert http_status("http://127.0.0.1:8000/health") == 200
    assert sorted(containers(docker_client)) == ["image/comfyui", "llm/qwen-7b"], "no old container left"


# ---- 4. a saved plan ----------------------------------------------------------------------------------------------


def test_a_saved_plan_is_executed_exactly_and_refused_once_stale(
    lab_of: Callable[[Path], tuple[RealLab, Path]],
    pve_server: PveServer,
    docker_client: Any,
    tmp_path: Path,
) -> None:
    lab, spec = lab_of(ROOT / "specs")
    base = cli_apply(lab, spec)
    assert base.returncode == 0, output(base)

    change_phoenix(spec)
    saved = tmp_path / "plan.json"
    planned = lab.cli("plan", str(spec), "--out", str(saved))
    assert planned.returncode == 2, output(planned)
    plan = json.loads(saved.read_text())
    applied = lab.cli("apply", str(spec), "--plan", str(saved), "--health-timeout", "20")
    assert applied.returncode == 0, output(applied)
    run = runs(lab)[-1]
    assert run.result is RunResult.APPLIED
    assert run.plan["changes"] == plan["changes"] and run.plan["observed_digest"] == plan["observed_digest"]
    assert [s.address for s in steps(lab, run.id) if s.phase == "apply"] == [c["address"] for c in plan["changes"]]
    assert str(pve_server.pve.ct(955).config["cores"]) == "4"
    assert lab.cli("plan", str(spec)).returncode == 0

    # Planned, then someone changes the CT's memory in the Proxmox UI: the saved plan is stale.
    edit(spec / "guests.yaml", "cores: 4", "cores: 6", document="llm")
    planned = lab.cli("plan", str(spec), "--out", str(saved))
    assert planned.returncode == 2, output(planned)
    pve_put(pve_server, "/nodes/phoenix/lxc/955/config", memory=16384)
    before = snapshot(pve_server, docker_client)
    pve_server.clear_requests()
    stale = lab.cli("apply", str(spec), "--plan", str(saved))
    assert stale.returncode == 1, output(stale)
    assert "stale" in stale.stderr, output(stale)
    assert pve_server.writes() == []
    assert snapshot(pve_server, docker_client) == before
    assert runs(lab)[-1].id == run.id, "a refused plan starts no run"


# ---- 5. guard rails ---------------------------------------------------------------------------------------------

GUARDED_LAB = """\
kind: Lab
name: guarded
nodes: [pve1]
proxmox: {url: "https://pve1.lan:8006", auth: password, user: root@pam}
max_deletes: 1
"""


def guarded_ct(name: str, vmid: int, *, protect: bool = False, extra: str = "") -> str:
    return (
        f"kind: Lxc\nname: {name}\nnode: pve1\nvmid: {vmid}\n"
        "template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst\n"
        f"rootfs: {{storage: local-lvm, size: 8GiB}}\nprotect: {str(protect).lower()}\n{extra}"
    )


def write_guarded(spec: Path, *cts: str) -> None:
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "lab.yaml").write_text(GUARDED_LAB)
    (spec / "guests.yaml").write_text("---\n".join(cts))


def test_guard_rails_protect_max_deletes_and_one_apply_at_a_time(
    real_lab: MakeRealLab, pve_server: PveServer, tmp_path: Path
) -> None:
    spec = tmp_path / "guarded"
    keep, one, two = guarded_ct("keep", 301, protect=True), guarded_ct("one", 302), guarded_ct("two", 303)
    write_guarded(spec, keep, one, two)
    lab = real_lab(spec)
    first = cli_apply(lab, spec)
    assert first.returncode == 0, output(first)
    assert sorted(ct.vmid for ct in pve_server.pve.cts) == [301, 302, 303]

    # Two deletions where the lab allows one: refused before anything is touched, unless --allow-delete.
    write_guarded(spec, keep)
    pve_server.clear_requests()
    refused = cli_apply(lab, spec)
    assert refused.returncode == 1, output(refused)
    assert "deletes or recreates 2" in refused.stderr and "--allow-delete" in refused.stderr, output(refused)
    assert pve_server.writes() == [] and sorted(ct.vmid for ct in pve_server.pve.cts) == [301, 302, 303]
    allowed = cli_apply(lab, spec, "--allow-delete")
    assert allowed.returncode == 0, output(allowed)
    assert [ct.vmid for ct in pve_server.pve.cts] == [301]

    # A protected guest is never recreated, and never deleted, even with --allow-delete.
    write_guarded(spec, guarded_ct("keep", 301, protect=True, extra="unprivileged: false\n"))
    recreate = cli_apply(lab, spec, "--allow-delete")
    assert recreate.returncode == 1, output(recreate)
    assert "protected" in recreate.stderr, output(recreate)
    write_guarded(spec)
    (spec / "guests.yaml").unlink()
    pve_server.clear_requests()
    shown = lab.cli("plan", str(spec))
    assert shown.returncode == 0 and "protected, so kept" in shown.stdout, output(shown)
    removed = cli_apply(lab, spec, "--allow-delete")
    assert removed.returncode == 0, output(removed)
    assert [ct.vmid for ct in pve_server.pve.cts] == [301] and pve_server.writes() == []

    # One apply at a time: a second one started while the first runs says who holds the lock, or waits.
    write_guarded(spec, keep, one)
    pve_server.call(setattr, pve_server.pve, "time_scale", 0.01)
    pve_server.pve.ct_secs["create"] = 300  # the create task takes 3 s
    holder = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "apply", str(spec), "--auto-approve"],
        cwd=ROOT,
        env=cli_env(lab),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not any(r.result is RunResult.RUNNING for r in runs(lab)):
            assert holder.poll() is None and time.monotonic() < deadline, "the first apply did not start"
            time.sleep(0.05)
        busy = cli_apply(lab, spec)
        assert busy.returncode == 1, output(busy)
        assert f"another apply is running (pid {holder.pid})" in busy.stderr, output(busy)
        waited = cli_apply(lab, spec, "--wait", "60")
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
        out, err = holder.communicate()
    assert waited.returncode == 0 and "Nothing to do." in waited.stdout, output(waited)
    assert "Applied" in out, err
    assert sorted(ct.vmid for ct in pve_server.pve.cts) == [301, 302]

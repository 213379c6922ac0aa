"""GPU settings as desired state: planned from what NVML reads, set by apply, restored by a rollback.

Plan and apply run as `reconciler apply` does (`engine.run`), over an in-memory Proxmox and Docker
and the real NVML bindings on the fake libnvidia-ml (a C compiler is the component: skipped
locally without one, a failure under CI). Assertions are on what the fake NVML reads afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reconciler.engine.journal import RunResult
from reconciler.errors import TemporaryError
from reconciler.fakes.lab import fake_gpus
from reconciler.fakes.nvml import FakeNvmlBuildError, build_library, write_state
from reconciler.planning.plan import Action, Backend, Plan
from tests.support.components import missing
from tests.support.labs import Harness, load, write_tree

pytestmark = [pytest.mark.nvml]

SPEC = """\
kind: DockerHost
name: ws
endpoint: unix:///var/run/docker.sock
node: pve1
---
kind: Container
name: router
host: ws
image: registry.lan/router:{tag}
"""


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    try:
        build_library(tmp_path / "work" / "fake-nvml")
    except FakeNvmlBuildError as exc:
        missing("cc", str(exc))
    monkeypatch.setenv("FAKE_NVML_STATE", "")  # the memory lab points it at its state; restored afterwards
    return Harness(tmp_path, load(_tree(tmp_path, watts=300)))


def _tree(tmp_path: Path, *, watts: int, tag: str = "1.0", persistence: bool = True) -> Path:
    folder = write_tree(tmp_path / "spec", SPEC.format(tag=tag))
    lab = (folder / "lab.yaml").read_text()
    extra = f"power_limit: {watts}\npersistence_mode: {str(persistence).lower()}\ncompute_mode: exclusive_process\n"
    (folder / "lab.yaml").write_text(lab.replace("vram: 16GiB\n", "vram: 16GiB\n" + extra, 1))
    return folder


def _as_shipped(harness: Harness, *, root: bool = True) -> None:
    """The GPUs as a fresh host has them: 250 W, persistence off, default compute mode."""
    desired = load(harness.tmp / "spec")
    gpus = [
        g.__class__(**{**_fields(g), "power_limit_w": 250.0, "persistence_mode": False, "compute_mode": 0})
        for g in fake_gpus(desired)
    ]
    write_state(Path(os.environ["FAKE_NVML_STATE"]), gpus, root=root)


def _fields(gpu: object) -> dict[str, object]:
    return {name: getattr(gpu, name) for name in gpu.__dataclass_fields__}  # type: ignore[attr-defined]


def _read(harness: Harness) -> tuple[float | None, bool | None, str | None]:
    big = next(g for g in harness.lab.nvml.observe().gpus if g.pci_bus_id == "0000:01:00.0")
    return big.power_limit, big.persistence_mode, None if big.compute_mode is None else str(big.compute_mode)


def _gpu_change(plan: Plan) -> tuple[str, Action, list[tuple[str, object, object]]]:
    (change,) = [c for c in plan.changes if c.backend is Backend.GPU]
    return change.address, change.action, [(f.path, f.before, f.after) for f in change.fields]


def test_the_plan_shows_the_difference_from_nvml_and_apply_sets_it(harness: Harness) -> None:
    _as_shipped(harness)
    desired = load(harness.tmp / "spec")
    plan = harness.plan(desired)
    assert _gpu_change(plan) == (
        "gpu/big",
        Action.UPDATE,
        [
            ("compute_mode", "default", "exclusive_process"),
            ("persistence_mode", False, True),
            ("power_limit", 250.0, 300.0),
        ],
    )
    _, report = harness.apply(desired)
    assert report is not None and report.result is RunResult.APPLIED, report
    assert _read(harness) == (300.0, True, "exclusive_process")
    assert harness.plan(desired).empty, "a second pass plans nothing"


def test_a_rollback_restores_the_previous_settings(harness: Harness) -> None:
    _as_shipped(harness)
    desired = load(_tree(harness.tmp, watts=320, tag="2.0"))
    harness.lab.docker.fail_next["create_container"] = TemporaryError("engine went away", resource="ws")
    plan, report = harness.apply(desired)
    assert [c.address for c in plan.changes] == ["gpu/big", "container/ws/router"], "settings before the workloads"
    assert report is not None and report.result is RunResult.ROLLED_BACK, report
    assert _read(harness) == (250.0, False, "default")


def test_without_root_apply_says_so_and_changes_nothing(harness: Harness) -> None:
    _as_shipped(harness, root=False)
    desired = load(harness.tmp / "spec")
    _, report = harness.apply(desired)
    assert report is not None and report.result is RunResult.ROLLED_BACK, report
    failed = [step for step in report.steps if not step.ok and step.phase == "apply"]
    assert failed and "needs root on the GPU's host" in str(failed[0].detail)
    assert _read(harness) == (250.0, False, "default")


def test_a_power_limit_outside_the_gpus_range_blocks_the_plan(harness: Harness) -> None:
    _as_shipped(harness)
    desired = load(_tree(harness.tmp, watts=900))
    plan = harness.plan(desired)
    assert not plan.applicable
    assert "power_limit 900 W is outside what the GPU allows (100 to 600 W)" in [b.message for b in plan.blockers]

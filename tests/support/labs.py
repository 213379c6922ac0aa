"""Build spec trees and in-memory labs for engine and planner tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

from reconciler.engine.apply import HealthPolicy
from reconciler.engine.journal import Journal
from reconciler.engine.run import ApplyOptions, apply_pass, plan_pass
from reconciler.fakes.lab import MemoryLab, memory_lab
from reconciler.planning.plan import Plan
from reconciler.spec.state import DesiredState
from reconciler.spec.validate import load_and_validate

__all__ = ["LAB_HEADER", "Harness", "load", "write_tree"]

LAB_HEADER = """\
kind: Lab
name: test
nodes: [pve1]
proxmox: {url: "https://pve1:8006", auth: password, user: root@pam}
---
kind: Gpu
name: big
node: pve1
pci: "0000:01:00"
model: RTX 5070 Ti
vram: 16GiB
---
kind: Gpu
name: small
node: pve1
pci: "0000:02:00"
model: GTX 970
vram: 4GiB
"""


def write_tree(folder: Path, text: str, *, header: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.yaml"):
        old.unlink()
    if header:
        (folder / "lab.yaml").write_text(LAB_HEADER)
    (folder / "spec.yaml").write_text(textwrap.dedent(text))
    return folder


def load(folder: Path) -> DesiredState:
    result = load_and_validate(folder)
    errors = [str(d) for d in result.diagnostics if d.severity == "error"]
    assert not errors, errors
    return result.state


class Harness:
    """A memory lab plus a journal: plan and apply specs the way `reconciler apply` does."""

    def __init__(self, tmp: Path, desired: DesiredState) -> None:
        self.tmp = tmp
        self.lab: MemoryLab = memory_lab(desired, work_dir=tmp / "work")
        self.journal = Journal(tmp / "state" / "journal.sqlite")
        self.options = ApplyOptions(health=HealthPolicy(max_timeout=2.0, interval=0.01), prober=self.lab.probe)

    def plan(self, desired: DesiredState) -> Plan:
        return plan_pass(desired, self.lab.readers, self.journal)

    def apply(self, desired: DesiredState, **options: object):  # type: ignore[no-untyped-def]
        opts = ApplyOptions(**{**self.options.__dict__, **options})  # type: ignore[arg-type]
        endpoints = {name: "unix:///memory.sock" for name in desired.docker_hosts()}
        return apply_pass(
            desired,
            self.lab.readers,
            proxmox=self.lab.proxmox,
            docker=self.lab.docker,
            journal=self.journal,
            env={},
            docker_endpoints=endpoints,
            options=opts,
        )

    def writes(self) -> int:
        requests = [*self.lab.proxmox.requests, *self.lab.docker.requests]
        return sum(1 for method, _ in requests if method != "GET")

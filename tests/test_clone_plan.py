"""A VM's clone template is checked when the plan is made, not first when apply clones it.

Against the in-memory Proxmox (the demo's and the engine tests' lab) and against fakepve with the real
proxmoxer client: the templates come from the same `/cluster/resources` read as the guests, and a
missing template, two templates of one name, or a template on another node with local storage is a
blocker naming the spec file and line, before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.backends.proxmox import ProxmoxBackend, settings_from
from reconciler.planning.observed import Observed
from reconciler.planning.plan import Action, Plan
from reconciler.planning.planner import make_plan
from tests.support.fakepve import PveServer
from tests.support.labs import Harness, load, write_tree

INFER_VM = """\
kind: Vm
name: infer
node: {node}
vmid: 201
cores: 4
memory: 8GiB
disks: [{{slot: scsi0, storage: local-lvm, size: 32GiB}}]
network: [{{bridge: vmbr0}}]
clone: {{template: {template}}}
"""

TWO_NODES = (
    "kind: Lab\nname: test\nnodes: [pve1, pve2]\nproxmox: {url: 'https://pve1:8006', auth: password, user: root@pam}\n"
)


def _blockers(plan: Plan) -> list[str]:
    return [str(b) for b in plan.blockers]


def _spec(tmp_path: Path, *, node: str = "pve1", template: str | int = "ubuntu-ci") -> Path:
    folder = write_tree(tmp_path / "spec", INFER_VM.format(node=node, template=template), header=False)
    (folder / "lab.yaml").write_text(TWO_NODES)
    return folder


def test_a_clone_of_a_template_the_memory_lab_has_plans_without_a_blocker(tmp_path: Path) -> None:
    harness = Harness(tmp_path, load(_spec(tmp_path)))
    plan = harness.plan(load(_spec(tmp_path)))
    assert _blockers(plan) == []
    assert [(c.address, c.action) for c in plan.changes] == [("qemu/infer", Action.CREATE)]


def test_a_missing_template_is_a_blocker_naming_the_file_and_line(tmp_path: Path) -> None:
    desired = load(_spec(tmp_path))
    harness = Harness(tmp_path, desired)
    harness.lab.proxmox.templates_.clear()  # the template was deleted since

    plan = harness.plan(desired)

    (blocker,) = _blockers(plan)
    assert blocker.startswith("Vm/infer: ")
    assert "spec.yaml:9: clone: no VM 'ubuntu-ci' to clone" in blocker
    assert "qm template" in blocker
    applied, report = harness.apply(desired)
    assert report is None and not applied.applicable
    assert harness.writes() == 0  # refused before the clone
    assert 201 not in harness.lab.proxmox.guests


def test_two_templates_of_one_name_are_a_blocker_listing_their_vmids(tmp_path: Path) -> None:
    desired = load(_spec(tmp_path))
    harness = Harness(tmp_path, desired)
    (seeded,) = harness.lab.proxmox.templates_
    harness.lab.proxmox.add_template(seeded + 1, "ubuntu-ci", node="pve2")

    (blocker,) = _blockers(harness.plan(desired))
    assert f"2 VMs are named 'ubuntu-ci' ({seeded}, {seeded + 1}); name the template by VMID" in blocker


def test_a_template_named_by_a_vmid_no_one_has_is_a_blocker(tmp_path: Path) -> None:
    desired = load(_spec(tmp_path, template=9100))
    harness = Harness(tmp_path, desired)
    harness.lab.proxmox.templates_.clear()
    (blocker,) = _blockers(harness.plan(desired))
    assert "clone: no VM 9100 to clone" in blocker


@pytest.fixture
def backend(pve_server: PveServer) -> Iterator[ProxmoxBackend]:
    pve_server.pve.add_node("pve2")
    settings = settings_from(None, pve_server.env("password"))  # type: ignore[arg-type]
    with ProxmoxBackend(settings, backoff=0.01, poll_interval=0.01) as client:
        yield client


@pytest.mark.fakepve
def test_fakepve_templates_are_observed_with_their_storage_and_checked_in_the_plan(
    tmp_path: Path, pve_server: PveServer, backend: ProxmoxBackend
) -> None:
    pve_server.pve.add_template(9000, "ubuntu-ci", node="pve1", disk_gib=3)  # on local-lvm: not shared
    seen = backend.observe()
    assert [(t.vmid, t.name, t.node, t.local_storage) for t in seen.templates] == [(9000, "ubuntu-ci", "pve1", True)]
    assert 9000 not in [g.vmid for g in seen.guests]

    same_node = load(_spec(tmp_path, node="pve1"))
    assert _blockers(make_plan(same_node, Observed(proxmox=seen))) == []

    other_node = load(_spec(tmp_path, node="pve2"))
    (blocker,) = _blockers(make_plan(other_node, Observed(proxmox=seen)))
    assert "template 9000 (ubuntu-ci) is on node pve1 and uses local storage" in blocker
    assert "cannot clone it onto node pve2" in blocker

    missing = load(_spec(tmp_path, template="debian-ci"))
    (blocker,) = _blockers(make_plan(missing, Observed(proxmox=seen)))
    assert "no VM 'debian-ci' to clone" in blocker
    assert pve_server.pve.vm(201) is None

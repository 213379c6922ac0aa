"""Nothing lost silently: volume moves, guest replacements, protection and ownership, against real things.

Every apply runs the CLI (a subprocess) against fakepve over HTTPS and the real Docker engine, and the
assertions are on what fakepve, Docker and the journal hold afterwards.

- A rootfs (or VM disk) asked for on another storage is moved in place by PVE's move_volume (move_disk),
  with its data: the guest is never destroyed.
- A change PVE cannot make in place (an LXC's `unprivileged`) is a replace that the plan shows as destroying the
  guest's volumes; it counts against max_deletes; its create carries every create-time key; and when it
  fails after the destroy, the run ends "rollback incomplete" (exit 3) naming what was lost.
- `protect: true` added to a converged resource is recorded by an apply that changes nothing.
- A plan blocked with no changes says what blocks it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from reconciler.engine.journal import RunResult
from tests.support.fakepve import PveServer
from tests.support.reallab import MakeRealLab, RealLab, _seed_storages
from tests.test_apply_real import (  # noqa: F401 - lab_of is a fixture
    ROOT,
    cli_apply,
    edit,
    journal_of,
    lab_of,
    output,
    runs,
    steps,
)

pytestmark = [pytest.mark.docker, pytest.mark.fakepve, pytest.mark.nvml]


def make_privileged(spec: Path) -> None:
    """An edit PVE cannot make on an existing CT (`unprivileged` is fixed at creation): a replace."""
    edit(spec / "guests.yaml", "cores: 8", "cores: 8\nunprivileged: false", document="llm")


def seed_storage(lab: RealLab, server: PveServer) -> None:
    """Give fakepve the storages the spec names now (after an edit that names a new one)."""
    server.call(_seed_storages, server.pve, lab.load())


def ct_writes(server: PveServer, vmid: int) -> list[tuple[str, str]]:
    return [(m, p) for m, p in server.writes() if f"/lxc/{vmid}" in p or p.endswith("/lxc")]


def test_a_rootfs_moved_to_another_storage_is_moved_in_place_with_its_data(
    lab_of: Callable[[Path], tuple[RealLab, Path]],  # noqa: F811
    pve_server: PveServer,
) -> None:
    lab, spec = lab_of(ROOT / "specs")
    assert cli_apply(lab, spec).returncode == 0
    before = pve_server.pve.ct(955)
    hostname, mac = before.config["hostname"], before.config["net0"]

    edit(spec / "guests.yaml", "rootfs: {storage: local-lvm, size: 64GiB}", "rootfs: {storage: fast-zfs, size: 64GiB}",
         document="llm")  # fmt: skip
    seed_storage(lab, pve_server)
    shown = lab.cli("plan", str(spec), "--json")
    assert shown.returncode == 2, output(shown)
    (change,) = [c for c in json.loads(shown.stdout)["changes"] if c["address"] == "lxc/llm"]
    assert change["action"] == "update-restart", change  # a running CT's volume moves while it is stopped
    assert change["after"]["move"] == {"rootfs": "fast-zfs"} and change["loses"] == []

    pve_server.clear_requests()
    applied = cli_apply(lab, spec)
    assert applied.returncode == 0, output(applied)
    writes = ct_writes(pve_server, 955)
    assert ("POST", "/nodes/phoenix/lxc/955/move_volume") in writes, writes
    assert not any(method == "DELETE" for method, _ in writes), f"the CT was destroyed: {writes}"
    after = pve_server.pve.ct(955)
    assert after is before, "the same CT, never recreated"
    assert after.config["rootfs"].startswith("fast-zfs:subvol-955-disk-") and "size=64G" in after.config["rootfs"]
    assert after.config["hostname"] == hostname and after.config["net0"] == mac and after.status == "running"
    assert not any(key.startswith("unused") for key in after.config), "the old volume is not left behind"
    assert lab.cli("plan", str(spec)).returncode == 0, "converged"


def test_a_vm_disk_moved_to_another_storage_is_moved_online(
    lab_of: Callable[[Path], tuple[RealLab, Path]],  # noqa: F811
    pve_server: PveServer,
) -> None:
    lab, spec = lab_of(ROOT / "specs")
    assert cli_apply(lab, spec).returncode == 0
    edit(spec / "guests.yaml", "storage: local-lvm, size: 128GiB", "storage: fast-zfs, size: 128GiB",
         document="desktop")  # fmt: skip
    seed_storage(lab, pve_server)
    pve_server.clear_requests()
    applied = cli_apply(lab, spec)
    assert applied.returncode == 0, output(applied)
    assert ("POST", "/nodes/phoenix/qemu/960/move_disk") in pve_server.writes()
    assert not any(m == "DELETE" and "/qemu/960" in p for m, p in pve_server.writes())
    assert pve_server.pve.vm(960).config["scsi0"].startswith("fast-zfs:vm-960-disk-")
    assert lab.cli("plan", str(spec)).returncode == 0, "converged"


def test_a_privilege_change_is_a_replace_that_says_what_it_destroys_and_counts_as_a_delete(
    lab_of: Callable[[Path], tuple[RealLab, Path]],  # noqa: F811
    pve_server: PveServer,
) -> None:
    lab, spec = lab_of(ROOT / "specs")
    assert cli_apply(lab, spec).returncode == 0
    make_privileged(spec)
    edit(spec / "lab.yaml", "nodes: [phoenix]", "nodes: [phoenix]\nmax_deletes: 0")

    shown = lab.cli("plan", str(spec))
    assert shown.returncode == 1, output(shown)
    assert "-/+ lxc/llm replace" in shown.stdout, output(shown)
    assert "! destroys rootfs local-lvm:vm-955-disk-0 (64G): its data is lost" in shown.stdout, output(shown)
    assert "deletes or recreates 1 resources (lxc/llm); the lab allows 0" in shown.stdout, output(shown)
    as_json = json.loads(lab.cli("plan", str(spec), "--json").stdout)
    (change,) = [c for c in as_json["changes"] if c["address"] == "lxc/llm"]
    assert change["loses"] == ["rootfs local-lvm:vm-955-disk-0 (64G)"]
    assert any("max_deletes" in b["message"] for b in as_json["blockers"])

    pve_server.clear_requests()
    refused = cli_apply(lab, spec)
    assert refused.returncode == 1 and "--allow-delete" in refused.stderr, output(refused)
    assert pve_server.writes() == []

    allowed = cli_apply(lab, spec, "--allow-delete")
    assert allowed.returncode == 0, output(allowed)
    writes = ct_writes(pve_server, 955)
    assert writes.index(("DELETE", "/nodes/phoenix/lxc/955")) < writes.index(("POST", "/nodes/phoenix/lxc")), writes
    ct = pve_server.pve.ct(955)  # created again from every create-time key (ostemplate included), and running
    assert ct is not None and ct.status == "running" and ct.config["hostname"] == "llm"
    assert str(ct.config.get("unprivileged", 0)) == "0"
    assert lab.cli("plan", str(spec), "--allow-delete").returncode == 0, "converged"


def test_a_replace_whose_create_fails_after_the_destroy_reports_the_loss_not_a_rollback(
    lab_of: Callable[[Path], tuple[RealLab, Path]],  # noqa: F811
    pve_server: PveServer,
) -> None:
    lab, spec = lab_of(ROOT / "specs")
    assert cli_apply(lab, spec).returncode == 0
    make_privileged(spec)
    pve_server.pve.fail("POST", "/nodes/phoenix/lxc", 500, "storage 'local-lvm' is full")

    failed = cli_apply(lab, spec)
    assert failed.returncode == 3, output(failed)
    assert "Every applied step was undone" not in failed.stdout, output(failed)
    assert "ROLLBACK INCOMPLETE" in failed.stdout, output(failed)
    assert "lxc 955 was destroyed and cannot be restored" in failed.stdout, output(failed)
    assert "rootfs local-lvm:vm-955-disk-0 (64G)" in failed.stdout, output(failed)
    assert pve_server.pve.ct(955) is None
    run = runs(lab)[-1]
    assert run.result is RunResult.ROLLBACK_FAILED
    undo = [s for s in steps(lab, run.id) if s.phase == "rollback" and s.address == "lxc/llm"]
    assert undo and "lost with it: rootfs local-lvm:vm-955-disk-0 (64G)" in (undo[0].error or "")


# ---- protect, recorded by the revision that declares it ------------------------------------------------------------

SMALL_LAB = """\
kind: Lab
name: {name}
nodes: [pve1]
proxmox: {{url: "https://pve1.lan:8006", auth: password, user: root@pam}}
max_deletes: 5
"""


def small_ct(name: str, vmid: int, *, extra: str = "") -> str:
    return (
        f"kind: Lxc\nname: {name}\nnode: pve1\nvmid: {vmid}\n"
        "template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst\n"
        f"rootfs: {{storage: local-lvm, size: 8GiB}}\n{extra}"
    )


def write_small(spec: Path, *cts: str, name: str = "small", extra: str = "") -> None:
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "lab.yaml").write_text(SMALL_LAB.format(name=name) + extra)
    if cts:
        (spec / "guests.yaml").write_text("---\n".join(cts))
    elif (spec / "guests.yaml").exists():
        (spec / "guests.yaml").unlink()


def test_protect_added_to_a_converged_guest_is_recorded_and_blocks_its_removal(
    real_lab: MakeRealLab, pve_server: PveServer, tmp_path: Path
) -> None:
    spec = tmp_path / "small"
    write_small(spec, small_ct("keep", 301), small_ct("other", 302))
    lab = real_lab(spec)
    assert cli_apply(lab, spec).returncode == 0

    write_small(spec, small_ct("keep", 301, extra="protect: true\n"), small_ct("other", 302))
    pve_server.clear_requests()
    nothing = cli_apply(lab, spec)
    assert nothing.returncode == 0 and "Nothing to do." in nothing.stdout, output(nothing)
    assert pve_server.writes() == []
    with journal_of(lab) as journal:
        assert 301 in journal.inventory().protected_vmids

    write_small(spec, small_ct("other", 302))
    shown = lab.cli("plan", str(spec))
    assert "lxc/keep: owned but no longer in the spec; protected, so kept" in shown.stdout, output(shown)
    assert "- lxc/keep" not in shown.stdout, output(shown)
    removed = cli_apply(lab, spec, "--allow-delete")
    assert removed.returncode == 0, output(removed)
    assert pve_server.pve.ct(301) is not None, "a protected guest is never deleted"

    # Unprotecting takes effect from its revision too, even one that changes nothing.
    write_small(spec, small_ct("keep", 301, extra="protect: false\n"), small_ct("other", 302))
    assert "Nothing to do." in cli_apply(lab, spec).stdout
    write_small(spec, small_ct("other", 302))
    assert cli_apply(lab, spec).returncode == 0
    assert pve_server.pve.ct(301) is None


def test_a_plan_blocked_with_no_changes_says_what_blocks_it(
    real_lab: MakeRealLab, pve_server: PveServer, tmp_path: Path
) -> None:
    spec = tmp_path / "small"
    write_small(spec, small_ct("keep", 301))
    lab = real_lab(spec)
    assert cli_apply(lab, spec).returncode == 0
    pve_server.call(pve_server.pve.add_node, "pve2")
    write_small(spec, small_ct("keep", 301).replace("node: pve1", "node: pve2"))
    (spec / "lab.yaml").write_text(SMALL_LAB.format(name="small").replace("[pve1]", "[pve1, pve2]"))
    shown = lab.cli("plan", str(spec))
    assert shown.returncode == 1, output(shown)
    assert "No changes" not in shown.stdout, output(shown)
    assert "Blocked, nothing will change: Lxc/keep: is on node 'pve1', the spec says 'pve2'" in shown.stdout


def test_a_moved_volume_is_moved_back_by_a_rollback(
    real_lab: MakeRealLab, pve_server: PveServer, tmp_path: Path
) -> None:
    spec = tmp_path / "small"
    write_small(spec, small_ct("keep", 301))
    lab = real_lab(spec)
    assert cli_apply(lab, spec).returncode == 0
    assert pve_server.pve.ct(301).status == "running"

    write_small(spec, small_ct("keep", 301).replace("storage: local-lvm", "storage: fast-zfs"))
    seed_storage(lab, pve_server)
    pve_server.pve.fail("POST", "/nodes/pve1/lxc/301/status/start", 403, "Permission check failed", times=1)
    failed = cli_apply(lab, spec)
    assert failed.returncode == 1, output(failed)
    assert "Rolled back" in failed.stdout, output(failed)
    moves = [p for m, p in pve_server.writes() if p.endswith("/move_volume")]
    assert len(moves) == 2, pve_server.writes()  # there, and back
    ct = pve_server.pve.ct(301)
    assert ct.config["rootfs"].startswith("local-lvm:") and ct.status == "running"
    assert not any(m == "DELETE" for m, _ in pve_server.writes())
    assert runs(lab)[-1].result is RunResult.ROLLED_BACK

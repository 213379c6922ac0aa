"""Ownership that identifies the lab, and saved plans executed exactly or not at all, against real things.

Each apply runs the CLI against fakepve over HTTPS and the real Docker engine (containers owned by label);
assertions are on what fakepve and the engine hold afterwards, and on fakepve's request log.

- The owner tag and label prefix name the lab (`reconciler-<lab>`). A fresh state directory deletes
  nothing it cannot prove is its own, whatever tag or label it carries: such guests and containers are
  warnings until `--adopt-orphans`, which `plan` previews too.
- Two labs on one cluster never take each other's guests, even when both are told to use one tag.
- A guest made under the old default tag (`reconciler`) and listed in the journal is re-tagged; a container
  so made is recreated with the new labels.
- `apply --plan FILE` refuses a plan whose changes were edited (an `after` value, an added key, a delete
  retargeted at a VM this lab does not own), or made for another lab, revision or format, before anything
  is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.dockerd import EngineImage
from tests.support.fakepve import PveServer
from tests.support.reallab import MakeRealLab
from tests.test_apply_real import cli_apply, guests, output

pytestmark = [pytest.mark.docker, pytest.mark.fakepve, pytest.mark.nvml]

LAB = """\
kind: Lab
name: {name}
nodes: [pve1]
proxmox: {{url: "https://pve1.lan:8006", auth: password, user: root@pam}}
max_deletes: 5
{extra}---
kind: DockerHost
name: ws
endpoint: unix:///var/run/docker.sock
"""


def ct(name: str, vmid: int, *, cores: int = 1) -> str:
    return (
        f"kind: Lxc\nname: {name}\nnode: pve1\nvmid: {vmid}\ncores: {cores}\n"
        "template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst\n"
        "rootfs: {storage: local-lvm, size: 8GiB}\n"
    )


def write_lab(spec: Path, name: str, *cts: str, extra: str = "") -> Path:
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "lab.yaml").write_text(LAB.format(name=name, extra=extra))
    guests_file = spec / "guests.yaml"
    if cts:
        guests_file.write_text("---\n".join(cts))
    elif guests_file.exists():
        guests_file.unlink()
    return spec


def tags_of(server: PveServer, vmid: int) -> set[str]:
    guest = server.pve.guest(vmid)
    return set(str(guest.config.get("tags", "")).replace(",", ";").split(";")) - {""}


def named_containers(docker_client: Any) -> dict[str, dict[str, str]]:
    return {c.name: dict(c.labels) for c in docker_client.containers.list(all=True)}


# ---- ownership -------------------------------------------------------------------------------------------------


def test_a_fresh_state_directory_deletes_nothing_it_cannot_prove_is_its_own(
    real_lab: MakeRealLab, pve_server: PveServer, docker_client: Any, engine_image: EngineImage, tmp_path: Path
) -> None:
    spec = write_lab(tmp_path / "alpha", "alpha", ct("keep", 301))
    lab = real_lab(spec)
    pve = pve_server.pve
    # What a fresh state directory finds: guests and containers with this lab's mark and with the old
    # default mark, that its (empty) journal does not list, and one that is someone else's.
    pve_server.call(pve.add_ct, 310, name="ours-by-tag", node="pve1", status="running",
                    config={"tags": "reconciler-alpha"})  # fmt: skip
    pve_server.call(pve.add_ct, 311, name="old-default", node="pve1", config={"tags": "reconciler"})
    pve_server.call(pve.add_ct, 312, name="someone-else", node="pve1", config={"tags": "reconciler-beta"})
    for name, owner in (("stray", "reconciler-alpha"), ("legacy", "reconciler")):
        docker_client.containers.create(
            engine_image.tag, name=name, labels={f"{owner}.managed": "true", f"{owner}.host": "ws"}
        )

    shown = lab.cli("plan", str(spec))
    assert shown.returncode == 2, output(shown)
    for address in ("lxc/ours-by-tag", "lxc/old-default", "container/ws/stray", "container/ws/legacy"):
        assert f"Warning: {address}: carries" in shown.stdout and "it is not deleted" in shown.stdout, output(shown)
    assert "lxc/someone-else" not in shown.stdout, output(shown)
    assert "to delete" in shown.stdout and "0 to delete" in shown.stdout, output(shown)

    first = cli_apply(lab, spec)
    assert first.returncode == 0, output(first)
    assert sorted(c.vmid for c in pve.cts) == [301, 310, 311, 312]
    assert {"stray", "legacy"} <= set(named_containers(docker_client))
    assert "reconciler-alpha" in tags_of(pve_server, 301)

    # --adopt-orphans takes them over; `plan` shows the same as `apply` will do.
    adopting = lab.cli("plan", str(spec), "--adopt-orphans", "--json")
    assert adopting.returncode == 2, output(adopting)
    deletes = sorted(c["address"] for c in json.loads(adopting.stdout)["changes"] if c["action"] == "delete")
    assert deletes == ["container/ws/legacy", "container/ws/stray", "lxc/old-default", "lxc/ours-by-tag"]
    adopted = cli_apply(lab, spec, "--adopt-orphans")
    assert adopted.returncode == 0, output(adopted)
    assert sorted(c.vmid for c in pve.cts) == [301, 312], "someone else's guest is never touched"
    assert not {"stray", "legacy"} & set(named_containers(docker_client))


def test_two_labs_on_one_cluster_never_take_each_others_guests(
    real_lab: MakeRealLab, pve_server: PveServer, tmp_path: Path
) -> None:
    alpha_spec = write_lab(tmp_path / "alpha", "alpha", ct("a", 301))
    beta_spec = write_lab(tmp_path / "beta", "beta", ct("b", 302))
    alpha, beta = real_lab(alpha_spec), real_lab(beta_spec)
    assert alpha.state_dir != beta.state_dir
    assert cli_apply(alpha, alpha_spec).returncode == 0
    assert cli_apply(beta, beta_spec).returncode == 0
    assert "reconciler-alpha" in tags_of(pve_server, 301) and "reconciler-beta" in tags_of(pve_server, 302)

    # Beta drops its guest: only its own goes; alpha's is not even mentioned.
    write_lab(beta_spec, "beta")
    shown = beta.cli("plan", str(beta_spec))
    assert "- lxc/b delete" in shown.stdout and "lxc/a" not in shown.stdout, output(shown)
    assert cli_apply(beta, beta_spec).returncode == 0
    assert [c.vmid for c in pve_server.pve.cts] == [301]
    assert alpha.cli("plan", str(alpha_spec)).returncode == 0

    # Even told to use alpha's tag, beta cannot prove 301 is its own: a warning, never a delete.
    write_lab(beta_spec, "beta", extra="owner_tag: reconciler-alpha\n")
    pve_server.clear_requests()
    forced = cli_apply(beta, beta_spec, "--allow-delete")
    assert forced.returncode == 0, output(forced)
    assert "lxc/a: carries this lab's owner mark 'reconciler-alpha'" in forced.stdout, output(forced)
    assert pve_server.writes() == [] and [c.vmid for c in pve_server.pve.cts] == [301]


WEB = "kind: Container\nname: web\nhost: ws\nimage: reconciler-test/web:1\n"


def test_what_was_made_under_the_old_default_tag_and_is_in_the_journal_moves_to_the_new_one(
    real_lab: MakeRealLab, pve_server: PveServer, docker_client: Any, tmp_path: Path
) -> None:
    spec = write_lab(tmp_path / "lab", "upgraded", ct("keep", 301), extra="owner_tag: reconciler\n")
    (spec / "web.yaml").write_text(WEB)
    lab = real_lab(spec, stand_in=True)
    assert cli_apply(lab, spec).returncode == 0
    assert tags_of(pve_server, 301) == {"reconciler"}
    assert named_containers(docker_client)["web"]["reconciler.managed"] == "true"

    write_lab(spec, "upgraded", ct("keep", 301))  # the default now: reconciler-upgraded
    shown = lab.cli("plan", str(spec))
    assert shown.returncode == 2 and '~ tags: "reconciler" -> "reconciler-upgraded"' in shown.stdout, output(shown)
    assert "-/+ container/ws/web replace" in shown.stdout, output(shown)  # recreated with the new labels
    assert cli_apply(lab, spec).returncode == 0
    assert tags_of(pve_server, 301) == {"reconciler-upgraded"}
    labels = named_containers(docker_client)["web"]
    assert labels["reconciler-upgraded.managed"] == "true" and "reconciler.managed" not in labels
    assert lab.cli("plan", str(spec)).returncode == 0


# ---- saved plans ----------------------------------------------------------------------------------------------


def tampered(saved: Path, target: Path, edit: Any) -> Path:
    data = json.loads(saved.read_text())
    edit(data)
    assert data != json.loads(saved.read_text()), "an edit that changes nothing tests nothing"
    target.write_text(json.dumps(data))
    return target


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)  # nothing ever writes to it: reading it would wait for ever
    return path


HOSTILE_PLAN_FILES: list[tuple[str, Callable[[Path], Path]]] = [
    ("a FIFO", _fifo),
    ("a device", lambda _: Path("/dev/zero")),  # endless
    ("a folder", lambda path: path.mkdir() or path),
    ("deeply nested JSON", lambda path: _written(path, "[" * 200_000 + "]" * 200_000)),
    (
        "a deeply nested value in a plan",
        lambda path: _written(path, '{"format": 3, "changes": [], "x": ' + "[" * 50_000 + "]" * 50_000 + "}"),
    ),
    (
        "a value nested just below the JSON decoder's limit",  # it would recurse while the plans are compared
        lambda path: _written(path, '{"format": 3, "changes": [{"after": ' + "[" * 900 + "]" * 900 + "}]}"),
    ),
    ("a plan larger than any plan", lambda path: _written(path, '{"format": 3, "x": "' + "a" * (70 << 20) + '"}')),
    ("not UTF-8", lambda path: path.write_bytes(b'{"format": 3, "\xff": 1}') and path),
]


def change_of(data: dict[str, Any], address: str) -> dict[str, Any]:
    return next(c for c in data["changes"] if c["address"] == address)


def retarget_delete(data: dict[str, Any]) -> None:
    delete = change_of(data, "lxc/two")
    delete.update(address="qemu/precious", resource="qemu/precious")
    delete["before"].update(type="qemu", vmid=400, name="precious", status="running")


def test_a_saved_plan_is_executed_exactly_or_refused_before_anything_is_written(
    real_lab: MakeRealLab, pve_server: PveServer, tmp_path: Path
) -> None:
    spec = write_lab(tmp_path / "lab", "saved", ct("keep", 301), ct("two", 302))
    lab = real_lab(spec)
    assert cli_apply(lab, spec).returncode == 0
    pve_server.call(pve_server.pve.add_vm, 400, "precious", node="pve1", status="running")

    write_lab(spec, "saved", ct("keep", 301, cores=2))  # one update, one delete
    saved = tmp_path / "plan.json"
    planned = lab.cli("plan", str(spec), "--out", str(saved))
    assert planned.returncode == 2, output(planned)
    assert json.loads(saved.read_text())["lab"] == "saved"

    edits: list[tuple[str, Any, str]] = [
        ("an after value", lambda d: change_of(d, "lxc/keep")["after"]["config"].update(cores="64"), "differs"),
        (
            "an added key",
            lambda d: change_of(d, "lxc/keep")["after"]["config"].update(hookscript="local:snippets/x.sh"),
            "differs",
        ),
        ("a retargeted delete", retarget_delete, "differs"),
        ("another lab", lambda d: d.update(lab="other"), "for lab 'other'"),
        ("another revision", lambda d: d.update(revision="0123abcd"), "for revision 0123abcd"),
        ("another format", lambda d: d.update(format=1), "plan format 1"),
        (
            "an older reconciler's plan, same shape",
            lambda d: d.update(format=2),
            "plan format 2; this reconciler reads format 3",
        ),
        ("not a plan", lambda d: d.update(changes=[{"address": 1}]), "not a saved plan"),
        ("an added dependency", lambda d: change_of(d, "lxc/two").update(depends_on=["lxc/keep"]), "differs"),
        ("what a delete loses hidden", lambda d: change_of(d, "lxc/two").update(loses=[]), "differs"),
        ("reordered changes", lambda d: d["changes"].reverse(), "differs"),
        ("a dropped change", lambda d: d["changes"].pop(), "differ"),
        ("an added warning", lambda d: d.update(warnings=[{"resource": "x", "message": "y"}]), "warnings differ"),
        ("a change marked drift", lambda d: change_of(d, "lxc/keep").update(drift=True), "differs in drift"),
        ("no format", lambda d: d.pop("format"), "plan format None"),
        ("a format that is text", lambda d: d.update(format="2"), "plan format '2'"),
    ]
    before = guests(pve_server)
    pve_server.clear_requests()
    for what, edit, message in edits:
        bad = tampered(saved, tmp_path / "bad.json", edit)
        refused = lab.cli("apply", str(spec), "--plan", str(bad))
        assert refused.returncode == 1, f"{what}: {output(refused)}"
        assert message in refused.stderr, f"{what}: {output(refused)}"
        assert "Traceback" not in refused.stderr, f"{what}: {output(refused)}"
        assert pve_server.writes() == [], f"{what}: {pve_server.writes()}"
    assert guests(pve_server) == before, "nothing changed on fakepve"
    assert pve_server.pve.vm(400).status == "running"

    for what, make in HOSTILE_PLAN_FILES:
        bad = make(tmp_path / f"hostile-{what.replace(' ', '-')}")
        refused = lab.cli("apply", str(spec), "--plan", str(bad), timeout=60)
        assert refused.returncode == 1 and "is not a saved plan" in refused.stderr, f"{what}: {output(refused)}"
        assert "Traceback" not in refused.stderr, f"{what}: {output(refused)}"
        assert pve_server.writes() == [], f"{what}: {pve_server.writes()}"

    applied = lab.cli("apply", str(spec), "--plan", str(saved), "--health-timeout", "20")
    assert applied.returncode == 0, output(applied)
    assert [c.vmid for c in pve_server.pve.cts] == [301] and str(pve_server.pve.ct(301).config["cores"]) == "2"
    assert pve_server.pve.vm(400).status == "running"

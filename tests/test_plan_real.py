"""Acceptance tests of `reconciler plan` against real things: fakepve over HTTPS, a real Docker engine, the fake NVML.

Every lab is seeded fresh by `real_lab` (tests/support/reallab.py) from a spec tree: every example under
examples/ (each folder with a lab.yaml), each phase tree of an example (`phases/*.yaml.off` switched on in
place of the active phase) and specs/. The trees are discovered, so a new example is covered by itself.

1. Golden plans. `reconciler plan` on the empty lab is compared with tests/golden/<tree>.plan.txt. The
   command runs as a person runs it (a subprocess; NO_COLOR, TERM=dumb, 200 columns: plain unwrapped
   text) and must exit 2 (changes). One part is volatile and normalised before the comparison: the
   revision of a spec tree that is not a git commit (`tree-<hash of its files' names and bytes>`, in
   every container's `reconciler.revision` label) becomes `tree-<revision>`, so an edited comment does
   not change a golden plan. Nothing else varies: GPU UUIDs are derived from the Gpu's node and PCI
   address, spec hashes from the spec, and a plan of an empty lab holds no MAC, volume id, path of this
   machine or fake NVML path. `plan --json --out FILE` must print the same plan as JSON (same summary)
   and save one that `Plan.from_json` reads back equal to the plan computed in-process.
   Regenerate: `RECONCILER_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_plan_real.py -k golden` writes
   them (and passes); review the diff before committing it.
2. Perpetual diffs. Every tree is applied (`lab.apply()`: fakepve and the Docker engine, GPUs through the
   fake NVIDIA hook), then planned again: the plan must be empty and `reconciler plan` must exit 0 saying
   so. Then every exclusive group is switched to another member (one edit), applied, and planned again.
   Docker's cleaned bind mount paths are checked the same way.
3. Single out-of-band changes, made by hand through the APIs as a person would (proxmoxer as root@pam
   for PVE, the docker SDK for containers): each must plan as exactly one change with exactly the
   expected fields, and applying it must leave nothing to change.
4. Where fakepve differs from real PVE (DESIGN.md), the planner is checked against both behaviours: the
   config digest listed by `.../pending` (PVE, LabPve's default) or not (stock fakepve); tags stored as
   written (fakepve's VMs) or normalised (PVE, fakepve's containers); a pending value equal to the current
   one kept (fakepve's VMs) or dropped (PVE's cleanup_pending); a Windows VM's machine version pinned on
   create (PVE) or not (fakepve), seen through a VM made by hand in the UI and adopted.
5. The CLI's errors: an unreachable Proxmox and an invalid spec exit 1 with a clear message, no traceback.

One machine plays every Docker host of a lab here (one engine, one address): APPLY_ADJUSTMENTS lists the
few lines the applied copies change, and why; `probe_here` probes on this machine.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from rich.console import Console

from reconciler.cli.render import print_plan
from reconciler.engine.health import ProbeResult, ollama_load, probe_http, probe_tcp
from reconciler.engine.journal import RunResult
from reconciler.planning.container_run import ContainerProbe
from reconciler.planning.plan import Action, Change, Plan, Timing
from reconciler.planning.pve import normalise_tags, parse_property
from reconciler.spec.models import ExclusiveGroup
from reconciler.spec.placement import member_of
from reconciler.spec.state import DesiredState
from tests.support.fakepve import PveServer
from tests.support.reallab import MakeRealLab, RealLab

pytestmark = [pytest.mark.docker, pytest.mark.fakepve, pytest.mark.nvml]

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE_GOLDEN = os.environ.get("RECONCILER_UPDATE_GOLDEN", "") not in ("", "0")
SECRET_VALUE = "plan-test-secret-1d8c"  # what every secret_env variable of the applied labs holds


# ---- the spec trees -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """A spec tree to plan: an example (or specs/), or one of its phase trees."""

    name: str  # golden file stem: "four-gpu-phases", "four-gpu-phases@phase-8"
    source: Path
    phase: str | None = None  # "phases/phase-8.yaml.off": switched on, every other phase file off

    def materialise(self, into: Path) -> Path:
        """The folder to plan: the source itself, or a copy with the phase switched when there is one."""
        if self.phase is None:
            return self.source
        folder = into / self.name.replace("@", "-")
        shutil.copytree(self.source, folder)
        for phase in (folder / "phases").glob("*.yaml"):
            phase.rename(phase.with_name(phase.name + ".off"))
        chosen = folder / self.phase
        chosen.rename(chosen.with_name(chosen.name.removesuffix(".off")))
        return folder


def _trees() -> list[Tree]:
    trees: list[Tree] = []
    for example in sorted(p for p in (ROOT / "examples").iterdir() if (p / "lab.yaml").is_file()):
        trees.append(Tree(example.name, example))
        for phase in sorted((example / "phases").glob("*.yaml.off")):
            stem = phase.name.removesuffix(".yaml.off")
            trees.append(Tree(f"{example.name}@{stem}", example, f"phases/{phase.name}"))
    trees.append(Tree("specs", ROOT / "specs"))
    return trees


TREES = _trees()


def test_every_example_and_phase_is_covered() -> None:
    """The trees are discovered, not listed: a new example or phase gets a golden plan and the checks below."""
    names = {tree.name for tree in TREES}
    assert {"specs", "phoenix-two-lxc-gpus", "four-gpu-phases", "four-gpu-phases@phase-0"} <= names
    assert len([t for t in TREES if t.phase is None]) == len(list((ROOT / "examples").glob("*/lab.yaml"))) + 1


# ---- helpers -----------------------------------------------------------------------------------------------


def rendered(plan: Plan) -> str:
    """The plan as `reconciler plan` prints it, for assertion messages."""
    buffer = io.StringIO()
    print_plan(Console(file=buffer, width=200, no_color=True, highlight=False, soft_wrap=True), plan)
    return buffer.getvalue()


def normalised(text: str, revision: str | None) -> str:
    """Plan text without its volatile part: the spec tree's content revision (see the module docstring)."""
    assert revision and revision.startswith("tree-"), revision
    return text.replace(revision, "tree-<revision>")


def output(result: Any) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def only_change(plan: Plan) -> Change:
    assert len(plan.changes) == 1, rendered(plan)
    assert plan.applicable, rendered(plan)
    return plan.changes[0]


def pve_api(server: PveServer) -> Any:
    """A proxmoxer client logged in as root@pam, as a person in the UI (or pvesh) would be."""
    from proxmoxer import ProxmoxAPI

    return ProxmoxAPI(
        server.host,
        port=server.port,
        user=server.user,
        password=server.password,
        verify_ssl=server.ca_file,
        service="PVE",
        timeout=30,
    )


# ---- 1. golden plans ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.name)
def test_plan_of_an_empty_lab_matches_its_golden_plan(tree: Tree, real_lab: MakeRealLab, tmp_path: Path) -> None:
    folder = tree.materialise(tmp_path)
    lab = real_lab(folder)
    desired = lab.load()

    saved = tmp_path / "plan.json"
    with ThreadPoolExecutor(max_workers=2) as pool:  # two reads of the same lab, at once to save time
        text_run = pool.submit(lab.cli, "plan", str(folder))
        json_run = pool.submit(lab.cli, "plan", "--json", "--out", str(saved), str(folder))
        text, as_json = text_run.result(), json_run.result()
    assert text.returncode == 2, output(text)
    assert text.stderr == "" and "\x1b" not in text.stdout, output(text)
    got = normalised(text.stdout, desired.revision)
    golden = GOLDEN / f"{tree.name}.plan.txt"
    if UPDATE_GOLDEN:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(got, encoding="utf-8")
    assert golden.is_file(), f"no golden plan {golden}: run with RECONCILER_UPDATE_GOLDEN=1 and review it"
    assert got == golden.read_text(encoding="utf-8"), f"{golden} differs:\n{got}"

    assert as_json.returncode == 2, output(as_json)
    printed = json.loads(as_json.stdout)
    summary = text.stdout.rstrip().splitlines()[-1]
    assert summary.startswith("Plan: ") and printed["summary"] == summary
    assert printed["revision"] == desired.revision
    from_file = Plan.from_json(json.loads(saved.read_text(encoding="utf-8")))
    assert from_file == Plan.from_json(printed)
    in_process = lab.plan(desired)
    assert from_file.to_json() == in_process.to_json()
    assert from_file == Plan.from_json(in_process.to_json())
    assert from_file.summary() == summary and not from_file.empty


# ---- 2. no perpetual diffs ---------------------------------------------------------------------------------

# One engine plays every Docker host of a lab, at one address; two things the examples rightly rely on
# cannot hold on it, so the applied copies differ from the examples in exactly these lines (the golden
# plans above use the examples as written):
# - two hosts publish the same port (llm-main and safety: 8080; llm and image: 11434), which collide on one
#   engine: the copy moves the second one;
# - Docker HEALTHCHECKs report "healthy" only after their interval (30 s by default) and the applier waits
#   for it: the copy checks every second.
# TCP probes of a host's LAN name (memory.jarvis.lan:6379) are probed on this machine by `probe_here`.
APPLY_ADJUSTMENTS: dict[str, list[tuple[str, str, str]]] = {
    # tree -> (file, old text, new text), each old text unique in its file
    "four-gpu-phases": [
        ("phases/phase-2.yaml", "port: 8080\ncontext: 8192", "port: 18080\ncontext: 8192"),
        ("services.yaml", 'test: ["CMD", "redis-cli", "ping"]', 'test: ["CMD", "redis-cli", "ping"]\n  interval: 1s'),
        ("services.yaml", '"pg_isready", "-U", "jarvis"]', '"pg_isready", "-U", "jarvis"]\n  interval: 1s'),
    ],
    "four-gpu-phases@phase-0": [
        ("phases/phase-0.yaml", "port: 8080\ncontext: 4096\nvram: 1536MiB", "port: 18080\ncontext: 4096\nvram: 1536MiB"),
        ("services.yaml", 'test: ["CMD", "redis-cli", "ping"]', 'test: ["CMD", "redis-cli", "ping"]\n  interval: 1s'),
        ("services.yaml", '"pg_isready", "-U", "jarvis"]', '"pg_isready", "-U", "jarvis"]\n  interval: 1s'),
    ],
    "four-gpu-phases@phase-8": [
        ("phases/phase-8.yaml", "port: 8080\ncontext: 8192\nvram: 10GiB", "port: 18080\ncontext: 8192\nvram: 10GiB"),
        ("services.yaml", 'test: ["CMD", "redis-cli", "ping"]', 'test: ["CMD", "redis-cli", "ping"]\n  interval: 1s'),
        ("services.yaml", '"pg_isready", "-U", "jarvis"]', '"pg_isready", "-U", "jarvis"]\n  interval: 1s'),
    ],
    "phoenix-two-lxc-gpus": [
        ("workloads.yaml", "port: 11434\nvram: 6GiB\nmodels_dir: /srv/ollama\nexclusive",
         "port: 11435\nvram: 6GiB\nmodels_dir: /srv/ollama\nexclusive"),
        ("workloads.yaml", "interval: 10s", "interval: 1s"),
    ],
}  # fmt: skip


def probe_here(host: str, probe: ContainerProbe, load: str | None) -> ProbeResult:
    """The applier's probe, made on this machine: every Docker host of the lab is the local engine."""
    if load:
        return ollama_load(f"http://127.0.0.1:{probe.port}", load, timeout=30)
    if probe.http:
        target = urlsplit(probe.http)
        port = target.port or probe.port
        path = target.path or "/"
        return probe_http(f"http://127.0.0.1:{port}{path}", status=probe.status, body=probe.body)
    return probe_tcp(f"127.0.0.1:{str(probe.tcp).rsplit(':', 1)[-1]}")


def appliable(tree: Tree, into: Path) -> Path:
    """A copy of the tree with APPLY_ADJUSTMENTS made (each must still match: the examples may change)."""
    source = tree.materialise(into / "source")
    folder = into / "applied"
    shutil.copytree(source, folder)
    for file, old, new in APPLY_ADJUSTMENTS.get(tree.name, ()):
        path = folder / file
        text = path.read_text(encoding="utf-8")
        assert text.count(old) == 1, f"{tree.name}: {old!r} is not once in {file}; update APPLY_ADJUSTMENTS"
        path.write_text(text.replace(old, new), encoding="utf-8")
    return folder


def apply_lab(real_lab: MakeRealLab, folder: Path) -> RealLab:
    """A lab seeded from the spec and applied: its guests and containers are what the spec says."""
    lab = real_lab(folder, stand_in=True)
    desired = lab.load()
    for workload in desired.workloads():
        for variable in workload.secret_env.values():
            lab.env[variable] = SECRET_VALUE
    plan, report = lab.apply(desired, prober=probe_here, health_timeout=20)
    assert report is not None and report.result is RunResult.APPLIED, (
        f"{report.failure if report else 'not applied'}\n{rendered(plan)}"
    )
    return lab


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.name)
def test_an_applied_lab_plans_no_changes(tree: Tree, real_lab: MakeRealLab, tmp_path: Path) -> None:
    folder = appliable(tree, tmp_path)
    lab = apply_lab(real_lab, folder)

    again = lab.plan()
    assert again.empty and not again.warnings and again.applicable, rendered(again)
    command = lab.cli("plan", str(folder))
    assert command.returncode == 0, output(command)
    assert "No changes. The live state matches the spec." in command.stdout, output(command)

    # Stock fakepve does not list the config digest in `.../pending`; real PVE does (LabPve's default).
    lab.pve.pve.pending_digest = False
    assert lab.plan().empty
    lab.pve.pve.pending_digest = True

    # The other state of the lab: every exclusive group switched to another member (one edit each), applied.
    desired = lab.load()
    groups = desired.of(ExclusiveGroup)
    if not groups:
        return
    for group in groups:
        switch_group(desired, group)
    switched = lab.load()
    plan, report = lab.apply(switched, prober=probe_here, health_timeout=20)
    assert report is not None and report.result is RunResult.APPLIED, f"{report and report.failure}\n{rendered(plan)}"
    assert all(c.action in (Action.START, Action.STOP) for c in plan.changes), rendered(plan)
    again = lab.plan(switched)
    assert again.empty and again.applicable, rendered(again)


def switch_group(desired: DesiredState, group: ExclusiveGroup) -> str:
    """Make another member of the group active, by editing the `active:` line of its document."""
    members = group.members or tuple(
        member_of(r) for r in desired.resources if getattr(r, "exclusive", None) and r.exclusive.group == group.name
    )
    other = sorted(set(members) - {group.active})[0]
    origin = desired.origin(group)
    assert origin is not None
    line = origin.position_of(("active",)).line
    path = Path(origin.file)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert lines[line - 1].startswith(f"active: {group.active}"), lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(f"active: {group.active}", f"active: {other}", 1)
    path.write_text("".join(lines), encoding="utf-8")
    return other


def test_paths_docker_cleans_are_no_difference(real_lab: MakeRealLab, docker_client: Any, tmp_path: Path) -> None:
    """Docker keeps bind mount paths cleaned (`/srv/comfyui/` is kept as `/srv/comfyui`)."""
    folder = appliable(Tree("specs", ROOT / "specs"), tmp_path)
    for file, old, new in [
        ("workloads.yaml", "source: /models/Qwen2.5-7B-Instruct-AWQ", "source: /models/Qwen2.5-7B-Instruct-AWQ/"),
        (
            "workloads.yaml",
            "CLI_ARGS: --listen 0.0.0.0",
            'CLI_ARGS: --listen 0.0.0.0\nvolumes: [{host: "/srv//comfyui/", path: /root/./data/}]',
        ),
    ]:
        text = (folder / file).read_text(encoding="utf-8")
        assert text.count(old) == 1, old
        (folder / file).write_text(text.replace(old, new), encoding="utf-8")
    lab = apply_lab(real_lab, folder)
    mounts = {(m["Source"], m["Destination"]) for m in docker_client.api.inspect_container("comfyui")["Mounts"]}
    assert ("/srv/comfyui", "/root/data") in mounts
    plan = lab.plan()
    assert plan.empty, rendered(plan)


# ---- 3. one change by hand, one change planned ---------------------------------------------------------------


def guest_config(lab: RealLab, kind: str, vmid: int) -> dict[str, Any]:
    node = next(g.node for g in lab.load().guests() if g.vmid == vmid)
    return dict(pve_api(lab.pve).nodes(node)(kind)(vmid).config.get(current=1))


def put_config(lab: RealLab, kind: str, vmid: int, **params: Any) -> None:
    node = next(g.node for g in lab.load().guests() if g.vmid == vmid)
    pve_api(lab.pve).nodes(node)(kind)(vmid).config.put(**params)


def recreate_with_env(docker_client: Any, name: str, old: str, new: str) -> None:
    """`docker rm -f` and create again from the container's own config, one env var changed, labels kept."""
    inspected = docker_client.api.inspect_container(name)
    config = dict(inspected["Config"])
    config["Env"] = [new if item == old else item for item in config["Env"]]
    assert new in config["Env"]
    config["HostConfig"] = inspected["HostConfig"]
    docker_client.api.remove_container(name, force=True)
    created = docker_client.api.create_container_from_config(config, name=name)
    docker_client.api.start(created["Id"])
    assert docker_client.api.inspect_container(name)["Config"]["Labels"] == inspected["Config"]["Labels"]


def test_one_change_by_hand_plans_as_exactly_that_change(
    real_lab: MakeRealLab, docker_client: Any, tmp_path: Path
) -> None:
    """specs/ applied (lxc/llm runs with GPU devices and a bind mount and holds qwen-7b; qemu/desktop is
    stopped, the image LXC has the second GPU). One thing at a time is changed by hand, the way a person
    does it in the UI or with docker; the plan must be exactly that one change, and applying it must leave
    nothing to change (the lab is then ready for the next one)."""
    lab = apply_lab(real_lab, appliable(Tree("specs", ROOT / "specs"), tmp_path))
    llm = guest_config(lab, "lxc", 955)
    live, replace = Timing.LIVE, Timing.REPLACE
    cases: list[tuple[str, Any, str, Action, list[tuple[str, Any, Any, Timing]]]] = [
        ("an LXC's memory", lambda: put_config(lab, "lxc", 955, memory=16384),
         "lxc/llm", Action.UPDATE, [("memory", "16384", "32768", live)]),
        ("a tag added to a VM", lambda: put_config(lab, "qemu", 960, tags="desktop;manual;reconciler-phoenix"),
         "qemu/desktop", Action.UPDATE,
         [("tags", "desktop;manual;reconciler-phoenix", "desktop;reconciler-phoenix", live)]),
        # Removing a device or a mount of a running container waits for its restart (pending); putting it
        # back cancels that at once.
        ("an LXC's GPU device removed", lambda: put_config(lab, "lxc", 955, delete="dev1"),
         "lxc/llm", Action.UPDATE, [("dev1", None, llm["dev1"], live)]),
        ("an LXC's bind mount removed", lambda: put_config(lab, "lxc", 955, delete="mp0"),
         "lxc/llm", Action.UPDATE, [("mp0", None, llm["mp0"], live)]),
        ("a VM's cores", lambda: put_config(lab, "qemu", 960, cores=4),
         "qemu/desktop", Action.UPDATE, [("cores", "4", "8", live)]),
        ("an LXC's cores", lambda: put_config(lab, "lxc", 956, cores=2),
         "lxc/image", Action.UPDATE, [("cores", "2", "6", live)]),
        # features of a running container wait for its restart too: the spec's value is the running one.
        ("an LXC's features", lambda: put_config(lab, "lxc", 956, features="nesting=1"),
         "lxc/image", Action.UPDATE, [("features.keyctl", None, "1", live)]),
        ("a container's env var", lambda: recreate_with_env(
            docker_client, "qwen-7b", "VLLM_NO_USAGE_STATS=1", "VLLM_NO_USAGE_STATS=0"),
         "container/llm/qwen-7b", Action.REPLACE, [("env.VLLM_NO_USAGE_STATS", "0", "1", replace)]),
    ]  # fmt: skip
    for what, change_by_hand, address, action, fields in cases:
        change_by_hand()
        plan = lab.plan()
        assert len(plan.changes) == 1 and plan.applicable, f"{what}:\n{rendered(plan)}"
        (change,) = plan.changes
        assert (change.address, change.action, change.drift) == (address, action, True), f"{what}:\n{rendered(plan)}"
        assert [(f.path, f.before, f.after, f.timing) for f in change.fields] == fields, f"{what}:\n{rendered(plan)}"

        _, report = lab.apply(prober=probe_here, health_timeout=20)
        assert report is not None and report.result is RunResult.APPLIED, f"{what}: {report and report.failure}"
        again = lab.plan()
        assert again.empty, f"after correcting {what}:\n{rendered(again)}"

    # Where fakepve and PVE differ: PVE normalises tags when it stores them; fakepve does for containers but
    # keeps a VM's as written. Either way the same set is the same tags.
    put_config(lab, "qemu", 960, tags="Desktop,RECONCILER-PHOENIX")
    put_config(lab, "lxc", 955, tags="Reconciler-Phoenix LLM")
    assert guest_config(lab, "qemu", 960)["tags"] == "Desktop,RECONCILER-PHOENIX"
    assert guest_config(lab, "lxc", 955)["tags"] == "llm;reconciler-phoenix"
    plan = lab.plan()
    assert plan.empty, rendered(plan)


# ---- 4. where fakepve and PVE differ -------------------------------------------------------------------------


def pending_of(lab: RealLab, kind: str, vmid: int) -> dict[str, Any]:
    node = next(g.node for g in lab.load().guests() if g.vmid == vmid)
    items = pve_api(lab.pve).nodes(node)(kind)(vmid).pending.get()
    return {item["key"]: item for item in items}


def test_a_pending_change_made_by_hand_on_a_running_vm_is_reverted_without_a_restart(
    real_lab: MakeRealLab, tmp_path: Path
) -> None:
    """cores of a running VM go pending until a restart, in PVE and in fakepve. Setting the running value
    again cancels the pending one: no restart is needed, and none must be planned."""
    lab = apply_lab(real_lab, appliable(Tree("inference-vm", ROOT / "examples" / "inference-vm"), tmp_path))
    put_config(lab, "qemu", 200, cores=32)
    pending = pending_of(lab, "qemu", 200)["cores"]
    assert (str(pending["value"]), str(pending["pending"])) == ("48", "32")  # the VM still runs with 48

    lab.pve.clear_requests()
    change = only_change(lab.plan())
    assert not [path for _, path in lab.pve.requests if path.endswith("/config")]  # read from .../pending only
    assert (change.address, change.action) == ("qemu/infer", Action.UPDATE)
    assert [(f.path, f.before, f.after, f.timing) for f in change.fields] == [("cores", "32", "48", Timing.LIVE)]

    lab.pve.clear_requests()
    _, report = lab.apply(prober=probe_here, health_timeout=20)
    assert report is not None and report.result is RunResult.APPLIED, report
    assert lab.pve.writes() == [("PUT", "/nodes/thor/qemu/200/config")]  # no shutdown, no start

    # fakepve keeps the pending value although it equals the current one; PVE's cleanup_pending drops it.
    pending = pending_of(lab, "qemu", 200)["cores"]
    assert str(pending["value"]) == "48" and str(pending.get("pending", "48")) == "48"
    assert lab.plan().empty
    vm = next(vm for vm in lab.pve.pve.vms if vm.vmid == 200)
    lab.pve.call(vm.pending.pop, "cores", None)  # as real PVE leaves it
    assert lab.plan().empty


# The Windows 11 gaming VM of examples/dual-gpu-roles as the PVE UI makes it (the example adopts it): the
# machine version pinned on create (qemu-server pins it for Windows guests), an EFI disk and a TPM state,
# the disk's options in PVE's order, a MAC, a CD drive, and a tag of its own, not the reconciler's.
HAND_MADE_GAMING_VM = {
    "name": "gaming", "ostype": "win11", "machine": "pc-q35-9.2+pve1", "bios": "ovmf", "cpu": "host",
    "cores": 8, "sockets": 1, "numa": 0, "memory": "16384", "balloon": 0, "agent": "1",
    "scsihw": "virtio-scsi-single", "scsi0": "local-lvm:vm-110-disk-1,discard=on,iothread=1,size=256G,ssd=1",
    "efidisk0": "local-lvm:vm-110-disk-0,efitype=4m,pre-enrolled-keys=1,size=4M",
    "tpmstate0": "local-lvm:vm-110-disk-2,size=4M,version=v2.0", "ide2": "none,media=cdrom",
    "net0": "virtio=BC:24:11:5E:7A:01,bridge=vmbr0,firewall=1", "hostpci0": "mapping=rtx5070ti,pcie=1,x-vga=1",
    "boot": "order=scsi0;ide2;net0", "tags": "Gaming,GPU", "smbios1": "uuid=4f1c2b0e-8a5d-4d2e-9f47-0c6f3b9d2a11",
    "vmgenid": "a3c1e5f2-7b9d-4c0e-8f21-5d6b7a8c9e03", "meta": "creation-qemu=9.2.0,ctime=1760000000",
}  # fmt: skip


def test_a_vm_made_in_the_ui_is_adopted_by_its_tags_only(real_lab: MakeRealLab, tmp_path: Path) -> None:
    """What PVE adds to a VM made by hand (a pinned machine version, disks and options the spec does not
    declare, tags in another spelling) is no difference: adopting it changes its tags only. Then its GPU,
    set by raw address by hand, goes back to the spec's PCI mapping."""
    folder = appliable(Tree("dual-gpu-roles", ROOT / "examples" / "dual-gpu-roles"), tmp_path)
    lab = real_lab(folder, stand_in=True)
    lab.pve.call(lab.pve.pve.add_vm, 110, "gaming", node="pve", status="stopped", config=HAND_MADE_GAMING_VM)

    plan = lab.plan()
    guest = next(c for c in plan.changes if c.backend == "proxmox")
    assert [c.address for c in plan.changes if c.backend == "proxmox"] == ["qemu/gaming"], rendered(plan)
    assert guest.action is Action.UPDATE, rendered(plan)
    assert [f.path for f in guest.fields] == ["tags"], rendered(plan)
    assert normalise_tags(guest.fields[0].after) == ("gaming", "gpu", "reconciler-homelab")  # the lab's owner tag

    for workload in lab.load().workloads():
        for variable in workload.secret_env.values():
            lab.env[variable] = SECRET_VALUE
    _, report = lab.apply(prober=probe_here, health_timeout=20)
    assert report is not None and report.result is RunResult.APPLIED, report
    assert guest_config(lab, "qemu", 110)["machine"] == "pc-q35-9.2+pve1"  # left as PVE pinned it
    again = lab.plan()
    assert again.empty, rendered(again)

    # root@pam gives the VM its GPU by raw address in the UI (fakepve would let even a root token do it;
    # PVE lets no token). The spec says mapping: the raw address must go, since PVE refuses a hostpciN
    # with both ("Cannot set both 'host' and 'mapping'"), and the lab's token may send the mapping only.
    put_config(lab, "qemu", 110, hostpci0="0000:01:00,pcie=1,x-vga=1")
    change = only_change(lab.plan())
    assert (change.address, change.action) == ("qemu/gaming", Action.UPDATE)
    assert [(f.path, f.before, f.after) for f in change.fields] == [
        ("hostpci0.mapping", None, "rtx5070ti"),
        ("hostpci0.host", "0000:01:00", None),
    ]
    _, report = lab.apply(prober=probe_here, health_timeout=20)
    assert report is not None and report.result is RunResult.APPLIED, report
    hostpci = parse_property(guest_config(lab, "qemu", 110)["hostpci0"], "host")
    assert hostpci == {"mapping": "rtx5070ti", "pcie": "1", "x-vga": "1"}
    again = lab.plan()
    assert again.empty, rendered(again)


# ---- 5. errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "failed"),
    [("specs", "POST /access/ticket failed"), ("examples/dual-gpu-roles", "GET /version failed")],
    ids=["password-login", "token"],
)
def test_plan_with_proxmox_unreachable_exits_1_naming_it(real_lab: MakeRealLab, tree: str, failed: str) -> None:
    lab = real_lab(ROOT / tree)
    url = lab.pve.url
    lab.pve.stop()
    result = lab.cli("plan", str(ROOT / tree))
    assert result.returncode == 1, output(result)
    assert result.stderr.startswith("error: "), output(result)
    assert f"cannot reach the Proxmox API at {url}: {failed} (Connection refused)" in result.stderr, output(result)
    assert "Traceback" not in result.stderr + result.stdout, output(result)
    assert "Plan:" not in result.stdout, output(result)


def test_plan_of_an_invalid_spec_exits_1_with_file_and_line_and_reads_nothing(
    real_lab: MakeRealLab, tmp_path: Path
) -> None:
    folder = tmp_path / "specs"
    shutil.copytree(ROOT / "specs", folder)
    guests = folder / "guests.yaml"
    lines = guests.read_text(encoding="utf-8").splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line == "cores: 8")  # lxc/llm
    lines[number - 1] = "cores: eight"
    guests.write_text("\n".join(lines) + "\n", encoding="utf-8")
    lab = real_lab(ROOT / "specs")
    lab.pve.clear_requests()

    result = lab.cli("plan", str(folder))
    assert result.returncode == 1, output(result)
    said = result.stdout + result.stderr
    assert f"{guests}:{number}:" in said and "Lxc/llm: error: cores" in said, output(result)
    assert "Traceback" not in result.stderr + result.stdout and "Plan:" not in result.stdout, output(result)

    as_json = lab.cli("plan", "--json", str(folder))
    assert as_json.returncode == 1, output(as_json)
    (diagnostic,) = json.loads(as_json.stdout)["diagnostics"]
    assert (diagnostic["file"], diagnostic["line"], diagnostic["severity"]) == (str(guests), number, "error")
    assert lab.pve.requests == []  # nothing is read for an invalid spec

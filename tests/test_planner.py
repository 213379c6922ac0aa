"""The planner, against in-memory Proxmox and Docker that store configs the way the real ones do.

Each test asserts on the Plan (its changes, fields, order, problems) after
the live state was made by applying, or by hand the way Proxmox stores it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.engine.journal import Journal
from reconciler.engine.run import plan_pass
from reconciler.planning.container_run import ContainerRun
from reconciler.planning.intents import GuestIntent, GuestSeen
from reconciler.planning.inventory import Inventory
from reconciler.planning.observed import GuestKind, NvmlObservation, Observed, ObservedGpu, ProxmoxObservation
from reconciler.planning.ownership import Claim, Ownership
from reconciler.planning.plan import Action, Plan, Timing
from reconciler.planning.planner import make_plan
from tests.support.labs import Harness, load, write_tree

LLM_LXC = """\
kind: Lxc
name: llm
node: pve1
vmid: 955
template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
cores: 8
memory: 32GiB
swap: 512MiB
rootfs: {storage: local-lvm, size: 64GiB}
mounts: [{host: /tank/models, path: /models, readonly: true}]
network: [{name: eth0, bridge: vmbr0, ip: dhcp, vlan: 110}]
features: {nesting: true, keyctl: true}
gpus: [big]
tags: [LLM, Prod]
docker: {endpoint: "ssh://root@llm.lan"}
---
kind: Model
name: qwen-7b
engine: vllm
host: llm
gpus: [big]
source: /models/Qwen2.5-7B-Instruct
port: 8000
context: 16384
args: {gpu_memory_utilization: 0.88, enable_prefix_caching: true}
"""

GAMING_VM = """\
kind: Vm
name: gaming
node: pve1
vmid: 200
cores: 8
memory: 16GiB
machine: q35
bios: ovmf
cpu: host
network: [{name: net0, bridge: vmbr0}]
disks: [{slot: scsi0, storage: local-lvm, size: 128GiB, ssd: true}]
gpus: []
state: running
"""


def actions(plan: Plan) -> list[tuple[str, str]]:
    return [(c.address, str(c.action)) for c in plan.changes]


@pytest.fixture
def lab(tmp_path: Path) -> tuple[Harness, Path]:
    folder = write_tree(tmp_path / "spec", LLM_LXC + "---\n" + GAMING_VM)
    return Harness(tmp_path, load(folder)), folder


def test_empty_lab_plans_guest_before_its_containers(lab: tuple[Harness, Path]) -> None:
    harness, folder = lab
    plan = harness.plan(load(folder))
    assert actions(plan) == [("lxc/llm", "create"), ("qemu/gaming", "create"), ("container/llm/qwen-7b", "create")]
    container = plan.changes[-1]
    assert container.depends_on == ("lxc/llm",)
    assert plan.summary() == "Plan: 3 to create, 0 to change, 0 to delete."
    guest = plan.changes[0].after
    assert isinstance(guest, GuestIntent) and guest.create
    config = guest.config
    assert config["tags"] == "llm;prod;reconciler-test"  # the owner tag names the lab (Lab `test`)
    assert config["dev0"] == "/dev/nvidia0" and config["dev1"] == "/dev/nvidiactl"


def test_after_apply_a_second_plan_is_empty_and_a_second_apply_writes_nothing(lab: tuple[Harness, Path]) -> None:
    harness, folder = lab
    desired = load(folder)
    _, report = harness.apply(desired)
    assert report is not None and report.exit_code == 0
    assert harness.plan(desired).empty
    writes = harness.writes()
    plan, report = harness.apply(desired)
    assert plan.empty and report is None
    assert harness.writes() == writes


def test_one_out_of_band_change_is_exactly_one_field(lab: tuple[Harness, Path]) -> None:
    harness, folder = lab
    desired = load(folder)
    harness.apply(desired)
    guest = harness.lab.proxmox.guests[955]
    guest.config["memory"] = "16384"
    plan = harness.plan(desired)
    assert actions(plan) == [("lxc/llm", "update")]
    (field,) = plan.changes[0].fields
    assert (field.path, field.before, field.after, field.timing) == ("memory", "16384", "32768", Timing.LIVE)
    assert plan.changes[0].drift


def test_tags_compare_normalised_and_pve_additions_are_not_drift(lab: tuple[Harness, Path]) -> None:
    harness, folder = lab
    desired = load(folder)
    harness.apply(desired)
    config = harness.lab.proxmox.guests[955].config
    assert "hwaddr=" in config["net0"] and "vm-955-disk-0" in config["rootfs"]
    config["tags"] = "prod;reconciler-test;llm"  # same set, another order
    assert harness.plan(desired).empty


def test_container_env_drift_replaces_the_container(lab: tuple[Harness, Path]) -> None:
    harness, folder = lab
    desired = load(folder)
    harness.apply(desired)
    from dataclasses import replace

    live = harness.lab.docker.containers["llm"]["qwen-7b"]
    harness.lab.docker.containers["llm"]["qwen-7b"] = replace(
        live, env={**live.env, "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    )
    plan = harness.plan(desired)
    assert actions(plan) == [("container/llm/qwen-7b", "replace")]
    assert [(f.path, f.before, f.after) for f in plan.changes[0].fields] == [
        ("env.CUDA_DEVICE_ORDER", "FASTEST_FIRST", "PCI_BUS_ID")
    ]


def test_adding_a_gpu_to_a_running_vm_is_update_with_restart_never_replace(lab: tuple[Harness, Path]) -> None:
    harness, folder = lab
    harness.apply(load(folder))
    write_tree(
        folder,
        LLM_LXC.replace("gpus: [big]", "gpus: []").replace("gpus: [big]", "gpus: []")
        + "---\n"
        + GAMING_VM.replace("gpus: []", "gpus: [{gpu: big, x_vga: true}]"),
    )
    plan = harness.plan(load(folder))
    vm = next(c for c in plan.changes if c.address == "qemu/gaming")
    assert vm.action is Action.UPDATE_RESTART
    assert [(f.path, f.after, f.timing) for f in vm.fields] == [
        ("hostpci0", "0000:01:00,pcie=1,x-vga=1", Timing.RESTART)
    ]
    assert "2 needs restart" in plan.summary()  # the LXC loses its devN entries: a restart too
    # the GPU leaves the LXC (and its container) before the VM claims it
    order = [c.address for c in plan.changes]
    assert order.index("lxc/llm") < order.index("qemu/gaming")


def test_changing_an_lxc_template_needs_replacement(lab: tuple[Harness, Path]) -> None:
    harness, folder = lab
    harness.apply(load(folder))
    harness.lab.proxmox.guests[955].config["unprivileged"] = "0"
    plan = harness.plan(load(folder))
    change = next(c for c in plan.changes if c.address == "lxc/llm")
    assert change.action is Action.REPLACE
    assert any(f.timing is Timing.REPLACE for f in change.fields)


def test_an_unowned_guest_with_the_spec_vmid_is_a_conflict_unless_adopted(tmp_path: Path) -> None:
    folder = write_tree(tmp_path / "spec", GAMING_VM)
    harness = Harness(tmp_path, load(folder))
    harness.lab.proxmox.create_vm("pve1", 200, config={"name": "gaming", "cores": "8", "memory": "16384"})
    plan = harness.plan(load(folder))
    assert [p.resource for p in plan.conflicts] == ["Vm/gaming"]
    assert not plan.applicable
    write_tree(folder, GAMING_VM + "adopt: true\n")
    adopted = harness.plan(load(folder))
    assert adopted.applicable
    (change,) = adopted.changes
    assert change.action is Action.UPDATE and any(f.path == "tags" for f in change.fields)


def test_owned_guests_and_containers_missing_from_the_spec_are_deleted_unless_protected(tmp_path: Path) -> None:
    protected_vm = GAMING_VM + "protect: true\n"
    folder = write_tree(tmp_path / "spec", LLM_LXC + "---\n" + protected_vm)
    harness = Harness(tmp_path, load(folder))
    harness.apply(load(folder))
    write_tree(folder, protected_vm)
    plan = harness.plan(load(folder))
    deleted = [c.address for c in plan.changes if c.action is Action.DELETE]
    assert deleted == ["container/llm/qwen-7b", "lxc/llm"], "dependents go first"
    write_tree(folder, LLM_LXC)
    plan = harness.plan(load(folder))
    assert plan.empty
    assert any(w.resource == "qemu/gaming" and "protected" in w.message for w in plan.warnings)


def test_drift_policy_warn_reports_and_ignore_is_silent(tmp_path: Path) -> None:
    folder = write_tree(tmp_path / "spec", GAMING_VM + "drift: warn\n")
    harness = Harness(tmp_path, load(folder))
    harness.apply(load(folder))
    harness.lab.proxmox.guests[200].config["cores"] = "4"
    plan = harness.plan(load(folder))
    assert plan.empty and any("drift" in w.message and "cores" in w.message for w in plan.warnings)
    # a spec edit is applied whatever the drift policy
    write_tree(folder, GAMING_VM.replace("cores: 8", "cores: 12") + "drift: warn\n")
    plan = harness.plan(load(folder))
    assert actions(plan) == [("qemu/gaming", "update-restart")]


def test_ignored_fields_are_not_compared(tmp_path: Path) -> None:
    folder = write_tree(tmp_path / "spec", GAMING_VM + "ignore: [memory]\n")
    harness = Harness(tmp_path, load(folder))
    harness.apply(load(folder))
    harness.lab.proxmox.guests[200].config["memory"] = "8192"
    assert harness.plan(load(folder)).empty


def test_exclusive_group_stops_the_old_member_before_starting_the_new(tmp_path: Path) -> None:
    spec = """\
    kind: DockerHost
    name: ws
    endpoint: unix:///var/run/docker.sock
    node: pve1
    ---
    kind: ExclusiveGroup
    name: picker
    active: {active}
    ---
    kind: Model
    name: gpt-oss
    engine: llamacpp
    host: ws
    gpus: [big]
    source: /models/gpt-oss-120b.gguf
    vram: 12GiB
    port: 8002
    exclusive: {{group: picker}}
    ---
    kind: Model
    name: qwen-coder
    engine: llamacpp
    host: ws
    gpus: [big]
    source: /models/qwen3-coder-30b.gguf
    vram: 10GiB
    port: 8002
    exclusive: {{group: picker}}
    """
    folder = write_tree(tmp_path / "spec", spec.format(active="gpt-oss"))
    harness = Harness(tmp_path, load(folder))
    harness.apply(load(folder))
    write_tree(folder, spec.format(active="qwen-coder"))
    plan = harness.plan(load(folder))
    assert actions(plan) == [("container/ws/gpt-oss", "stop"), ("container/ws/qwen-coder", "start")]
    assert plan.changes[1].depends_on == ("container/ws/gpt-oss",)
    started = plan.changes[1].after
    assert isinstance(started, ContainerRun) and started.command is not None
    command = started.command
    for flag in ("--ctx-size", "--n-gpu-layers", "--host", "--port", "--flash-attn", "--parallel", "--fit"):
        assert flag in command
    assert command[command.index("--port") + 1] == "8002" and command[command.index("--fit") + 1] == "off"


def test_gpu_resolution_by_pci_and_the_blocker_when_nvml_cannot(tmp_path: Path) -> None:
    folder = write_tree(tmp_path / "spec", LLM_LXC)
    desired = load(folder)
    proxmox = ProxmoxObservation("9.0", (), ())
    seen = NvmlObservation(True, gpus=(ObservedGpu(0, "GPU-1234", "0000:01:00.0", "RTX", 1, 0, 1),))
    plan = make_plan(desired, Observed(proxmox=proxmox, nvml=seen))
    container = next(c for c in plan.changes if c.backend == "docker")
    assert isinstance(container.after, ContainerRun)
    assert container.after.gpus == ("GPU-1234",)
    assert container.after.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    lost = NvmlObservation(True, gpus=(ObservedGpu(0, "GPU-1234", "0000:01:00.0", "RTX", 1, 0, 1, lost=True),))
    blocked = make_plan(desired, Observed(proxmox=proxmox, nvml=lost))
    assert any("'big'" in b.message and "lost" in b.message for b in blocked.blockers)
    missing = make_plan(
        desired, Observed(proxmox=proxmox, nvml=NvmlObservation(False, error="libnvidia-ml.so.1 not found"))
    )
    assert any("NVML is not available" in b.message for b in missing.blockers)


def test_vllm_tensor_parallel_follows_the_number_of_gpus(tmp_path: Path) -> None:
    folder = write_tree(
        tmp_path / "spec",
        """\
    kind: Vm
    name: infer
    node: pve1
    vmid: 200
    memory: 64GiB
    gpus: [{gpu: big}, {gpu: small}]
    docker: {endpoint: "tcp://infer.lan:2375"}
    ---
    kind: Model
    name: deep
    engine: vllm
    host: infer
    gpus: [big, small]
    source: /models/Qwen2.5-32B-Instruct-AWQ
    port: 8000
    vram: 3GiB
    args: {gpu_memory_utilization: 0.2}
    """,
    )
    harness = Harness(tmp_path, load(folder))
    plan = harness.plan(load(folder))
    after = plan.changes[-1].after
    assert isinstance(after, ContainerRun) and after.command is not None
    command = after.command
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    assert after.ipc == "host"
    assert len(after.gpus) == 2


def test_plan_json_round_trips(lab: tuple[Harness, Path]) -> None:
    harness, folder = lab
    plan = harness.plan(load(folder))
    again = Plan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json()
    assert again.summary() == plan.summary()


def test_secret_env_is_never_in_a_plan(tmp_path: Path) -> None:
    folder = write_tree(tmp_path / "spec", LLM_LXC + "secret_env: {HF_TOKEN: LAB_TEST_HF_TOKEN}\n")
    harness = Harness(tmp_path, load(folder))
    plan = harness.plan(load(folder))
    text = plan.dumps()
    assert "LAB_TEST_HF_TOKEN" in text  # the name of the variable, so people know where it comes from
    assert "HF_TOKEN" in text


@pytest.mark.parametrize(
    ("hostpci", "held"),
    [
        ("mapping=bigger,pcie=1", {"small"}),  # not `big`: names are compared whole, not as substrings
        ("mapping=big", {"big"}),
        ("0000:01:00,pcie=1,x-vga=1", {"big"}),
        ("01:00.0", {"big"}),  # short spelling, one function of the device
        ("0000:02:00.0;0000:02:00.1", {"small"}),
        ("0000:11:00", set()),  # `01:00` is a substring of it, but another device
    ],
)
def test_the_gpus_a_vm_holds_are_read_from_its_parsed_hostpci(tmp_path: Path, hostpci: str, held: set[str]) -> None:
    from reconciler.planning.order import _gpus_in_config

    write_tree(tmp_path, GAMING_VM)
    header = (tmp_path / "lab.yaml").read_text()
    header = header.replace("vram: 16GiB\n", "vram: 16GiB\nmapping: big\n").replace(
        "vram: 4GiB\n", "vram: 4GiB\nmapping: bigger\n"
    )
    (tmp_path / "lab.yaml").write_text(header)
    before = GuestSeen(GuestKind.QEMU, "pve1", 200, "running", config={"hostpci0": hostpci})
    assert _gpus_in_config(before, load(tmp_path)) == held


@pytest.mark.parametrize(
    ("hotplug", "action", "timing"),
    [
        (None, Action.UPDATE_RESTART, Timing.RESTART),  # PVE's default network,disk,usb: memory waits for a restart
        ("network,disk,usb,memory,cpu", Action.UPDATE, Timing.LIVE),
    ],
)
def test_a_running_vms_memory_follows_its_hotplug_setting(
    lab: tuple[Harness, Path], hotplug: str | None, action: Action, timing: Timing
) -> None:
    harness, folder = lab
    desired = load(folder)
    harness.apply(desired)
    vm = harness.lab.proxmox.guests[200]
    assert vm.status == "running"
    if hotplug is not None:
        vm.config["hotplug"] = hotplug
    write_tree(folder, LLM_LXC + "---\n" + GAMING_VM.replace("memory: 16GiB", "memory: 24GiB"))
    plan = harness.plan(load(folder))
    (change,) = plan.changes
    assert change.action is action
    assert [(f.path, f.timing) for f in change.fields] == [("memory.current", timing)]


# ---- ownership and guard rails (planning.ownership) ------------------------------------------------------------


def test_a_mark_alone_never_proves_ownership_the_inventory_does() -> None:
    mine = Ownership("reconciler-lab")
    ours, legacy, foreign = (mine.of_tags(tags) for tags in (["reconciler-lab"], ["Reconciler"], ["reconciler-x"]))
    assert (ours.ours, legacy.legacy, foreign.any) == (True, True, False)
    assert mine.claim(ours, recorded=True) is Claim.MINE and mine.claim(legacy, recorded=True) is Claim.MINE
    assert mine.claim(ours, recorded=False) is Claim.ORPHAN and mine.claim(legacy, recorded=False) is Claim.ORPHAN
    assert mine.claim(foreign, recorded=True) is Claim.FOREIGN  # a reused vmid is not ours without a mark
    adopting = Ownership("reconciler-lab", adopt_orphans=True)
    assert adopting.claim(legacy, recorded=False) is Claim.MINE
    assert adopting.claim(foreign, recorded=False) is Claim.FOREIGN
    assert mine.owns_named(ours, recorded=False) and not mine.owns_named(legacy, recorded=False)
    # A lab whose owner is the old default has no "old" mark: its own tag is the one it sees.
    old = Ownership("reconciler").of_labels({"reconciler.managed": "true"})
    assert old.ours and not old.legacy


def test_a_fresh_journal_turns_deletes_into_orphan_warnings(lab: tuple[Harness, Path], tmp_path: Path) -> None:
    harness, folder = lab
    desired = load(folder)
    harness.apply(desired)
    gone = load(write_tree(tmp_path / "gone", "# nothing but the Lab\n"))
    assert {c.address for c in harness.plan(gone).changes if c.action is Action.DELETE} >= {"lxc/llm"}
    fresh = Journal(tmp_path / "fresh" / "journal.sqlite")
    try:
        assert fresh.inventory() == Inventory()
        plan = plan_pass(gone, harness.lab.readers, fresh)
        assert not [c for c in plan.changes if c.action is Action.DELETE], plan.changes
        assert any(w.resource == "lxc/llm" and "not deleted" in w.message for w in plan.warnings), plan.warnings
        adopted = plan_pass(gone, harness.lab.readers, fresh, adopt_orphans=True, allow_delete=True)
        assert "lxc/llm" in {c.address for c in adopted.changes if c.action is Action.DELETE}
    finally:
        fresh.close()

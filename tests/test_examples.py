"""Every example lab, the default lab in specs/ and every hardware phase of four-gpu-phases validate cleanly.

Each tree under examples/ is found automatically, so a new example is tested without touching
this file. Beyond "no diagnostics", one test per lab checks the thing the lab exists to show
(a group switch that validates, a role that lands on the GPUs of every phase, exactly one
model picked), using the real loader, validator, role placement and container presets.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.planning.containers import desired_container
from reconciler.planning.plan import Plan
from reconciler.spec.diagnostics import Diagnostic
from reconciler.spec.loader import LoadResult
from reconciler.spec.models import (
    Container,
    DockerHost,
    Engine,
    ExclusiveGroup,
    Gpu,
    GpuRole,
    Lab,
    Lxc,
    Model,
    PowerState,
    Vm,
    Workload,
)
from reconciler.spec.placement import member_of, place_role
from reconciler.spec.state import DesiredState
from reconciler.spec.validate import load_and_validate

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCHEMA = ROOT / "schemas" / "reconciler.schema.json"
PHASES = EXAMPLES / "four-gpu-phases" / "phases"
SCHEMA_COMMENT = re.compile(r"^# yaml-language-server: \$schema=(?P<path>\S+)$")

EXAMPLE_TREES = sorted(path for path in EXAMPLES.iterdir() if path.is_dir())
TREES = [*EXAMPLE_TREES, ROOT / "specs"]
PHASE_FILES = sorted(PHASES.glob("phase-*.yaml*"))
# Diagnostics an example is allowed to have, as "Kind/name: message" (none today).
DOCUMENTED: dict[str, set[str]] = {}


def _shown(diagnostics: tuple[Diagnostic, ...]) -> str:
    return "\n".join(str(d) for d in diagnostics)


def _clean(tree: Path) -> LoadResult:
    result = load_and_validate(tree)
    found = {f"{d.resource}: {d.message}" for d in result.diagnostics}
    assert found == DOCUMENTED.get(tree.name, set()), _shown(result.diagnostics)
    assert result.state.resources
    return result


def _phase_name(phase_file: Path) -> str:
    return phase_file.name.split(".", 1)[0]


def _phase_tree(phase_file: Path, into: Path) -> Path:
    """four-gpu-phases with `phase_file` as the one loaded phase: the switch the README describes."""
    tree = into / "four-gpu-phases"
    shutil.copytree(EXAMPLES / "four-gpu-phases", tree, ignore=shutil.ignore_patterns("phase-*"))
    shutil.copyfile(phase_file, tree / "phases" / f"{_phase_name(phase_file)}.yaml")
    return tree


def _switched(tree: Path, group: str, member: str, into: Path) -> Path:
    """A copy of `tree` with one edit: the `active:` line of `group` names `member`."""
    state = load_and_validate(tree).state
    found = state.get(ExclusiveGroup, group)
    assert found is not None, f"no ExclusiveGroup {group!r} in {tree}"
    position = state.position(found, "active")
    assert position is not None
    copy = into / f"{tree.name}-{member}"
    shutil.copytree(tree, copy)
    path = copy / Path(position.file).relative_to(tree)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    line = lines[position.line - 1]
    assert line.startswith("active: "), line
    lines[position.line - 1] = f"active: {member}\n"
    path.write_text("".join(lines), encoding="utf-8")
    return copy


def _running(state: DesiredState, resource: Lxc | Vm | Workload) -> bool:
    """Whether a resource runs in the configuration the spec's groups select."""
    if resource.state is not PowerState.RUNNING:
        return False
    if resource.exclusive is None:
        return True
    group = state.get(ExclusiveGroup, resource.exclusive.group)
    return group is not None and group.active == member_of(resource)


def _gpus_of(state: DesiredState, workload: Workload) -> tuple[str, ...]:
    if workload.role is None:
        return workload.gpus
    role = state.get(GpuRole, workload.role)
    assert role is not None
    return place_role(role, state.of(Gpu))


def _spec_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (path.suffix in (".yaml", ".yml") or ".yaml." in path.name):
            yield path


# ---- every tree -----------------------------------------------------------------------------


def test_examples_are_found() -> None:
    names = {tree.name for tree in EXAMPLE_TREES}
    assert {
        "phoenix-two-lxc-gpus",
        "dual-gpu-roles",
        "inference-vm",
        "four-gpu-phases",
        "single-active-llamacpp",
    } <= names
    assert {_phase_name(p) for p in PHASE_FILES} >= {"phase-0", "phase-2", "phase-8"}


@pytest.mark.parametrize("tree", TREES, ids=lambda p: p.name)
def test_tree_validates_without_diagnostics(tree: Path) -> None:
    result = _clean(tree)
    assert len(result.state.of(Lab)) == 1


@pytest.mark.parametrize("phase_file", PHASE_FILES, ids=_phase_name)
def test_every_phase_validates_as_a_full_tree(phase_file: Path, tmp_path: Path) -> None:
    _clean(_phase_tree(phase_file, tmp_path))


def test_exactly_one_phase_is_loaded() -> None:
    loaded = [p for p in PHASE_FILES if p.suffix == ".yaml"]
    assert [p.name for p in loaded] == ["phase-2.yaml"]
    assert all(p.name.endswith(".yaml.off") for p in PHASE_FILES if p not in loaded)


@pytest.mark.parametrize("tree", EXAMPLE_TREES, ids=lambda p: p.name)
def test_example_has_a_readme_that_says_how_to_switch(tree: Path) -> None:
    readme = (tree / "README.md").read_text(encoding="utf-8")
    assert "seed" in readme.lower()
    assert "active:" in readme or ".yaml.off" in readme


@pytest.mark.parametrize(
    "spec_file",
    [path for folder in (EXAMPLES, ROOT / "specs") for path in _spec_files(folder)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_spec_file_starts_with_the_schema_comment(spec_file: Path) -> None:
    first = spec_file.read_text(encoding="utf-8").splitlines()[0]
    match = SCHEMA_COMMENT.match(first)
    assert match, f"{spec_file.relative_to(ROOT)} must begin with '# yaml-language-server: $schema=...'"
    assert (spec_file.parent / match["path"]).resolve() == SCHEMA
    assert SCHEMA.is_file()


# ---- one test per lab --------------------------------------------------------------------------


def test_phoenix_second_gpu_is_in_the_image_lxc_or_the_desktop_never_both(tmp_path: Path) -> None:
    tree = EXAMPLES / "phoenix-two-lxc-gpus"
    state = _clean(tree).state
    lab = state.lab
    assert lab.proxmox is not None and lab.proxmox.is_root_pam, "LXC devN needs a root@pam password login"
    assert {g.vmid for g in state.of(Lxc)} == {955, 956, 957}
    for lxc in state.of(Lxc):
        assert lxc.features.nesting and lxc.features.keyctl, f"{lxc.name}: Docker inside needs nesting + keyctl"
    assert [(g.model, g.vram) for g in state.of(Gpu)] == [("RTX 5060 Ti", 16 * 1024**3)] * 2
    for member in ("image", "desktop"):
        switched = _switched(tree, "second-gpu", member, tmp_path)
        state = _clean(switched).state
        holders = [
            guest.ref
            for guest in (*state.of(Lxc), *state.of(Vm))
            if _running(state, guest)
            and "rtx5060ti-b" in (guest.gpus if isinstance(guest, Lxc) else [p.gpu for p in guest.gpus])
        ]
        assert holders == (["Lxc/image"] if member == "image" else ["Vm/desktop"])
        llm = [w.name for w in (*state.of(Model), *state.of(Container)) if w.host == "llm" and _running(state, w)]
        assert sorted(llm) == ["ollama", "qwen-7b"], "the LLM container is untouched by the switch"


def test_dual_gpu_roles_priorities_failover_and_the_gaming_switch(tmp_path: Path) -> None:
    tree = EXAMPLES / "dual-gpu-roles"
    state = _clean(tree).state
    roles = {r.name: r for r in state.of(GpuRole)}
    gpus = state.of(Gpu)
    assert roles["primary"].priority > roles["transcode"].priority
    assert place_role(roles["transcode"], gpus) == ("gtx970",)
    assert place_role(roles["transcode"], gpus, available={"rtx5070ti"}) == ("rtx5070ti",), "failover"
    assert place_role(roles["transcode"], gpus, available=set()) == ()
    lab = state.lab
    assert lab.proxmox is not None and not lab.proxmox.is_root_pam
    big = state.get(Gpu, "rtx5070ti")
    assert big is not None and big.mapping is not None, "an API token passes a GPU through by mapping only"
    plex = state.get(Container, "plex")
    assert plex is not None and plex.image.startswith("plexinc/pms-docker")

    assert roles["transcode"].prefer == ("rtx5070ti",), "the big GPU's NVENC while it is free"

    gaming = _clean(_switched(tree, "big-gpu", "gaming", tmp_path)).state
    vm = gaming.get(Vm, "gaming")
    assert vm is not None and vm.gpus[0].x_vga
    assert not _running(gaming, vm), "started by hand when someone plays; the planner respects it (priority)"
    ollama = gaming.get(Model, "ollama")
    assert ollama is not None and not _running(gaming, ollama)
    transcoders = [c for c in gaming.of(Container) if _running(gaming, c)]
    assert {c.name for c in transcoders} == {"plex", "jellyfin"}
    assert all(_gpus_of(gaming, c) == ("gtx970",) for c in transcoders)


def test_inference_vm_deep_mode_spans_both_gpus_with_tensor_parallel_2(tmp_path: Path) -> None:
    tree = EXAMPLES / "inference-vm"
    state = _clean(tree).state
    vm = state.get(Vm, "infer")
    assert vm is not None
    assert (vm.cores, vm.sockets, vm.numa, vm.hugepages, vm.cpu, vm.machine) == (48, 1, True, "any", "host", "q35")
    assert vm.memory == 128 * 1024**3 and vm.network[0].vlan == 110
    assert [(p.gpu, p.pcie, p.all_functions) for p in vm.gpus] == [("gpu0", True, True), ("gpu1", True, True)]
    for model in state.of(Model):
        assert model.engine is Engine.VLLM
        assert 0.85 <= float(model.args["gpu_memory_utilization"]) <= 0.90
        assert model.args["enable_prefix_caching"] is True and model.args["enable_chunked_prefill"] is True
        assert model.args["disable_custom_all_reduce"] is True and "max_num_seqs" in model.args
    fast = sorted((m.port, m.gpus) for m in state.of(Model) if _running(state, m))
    assert fast == [(8000, ("gpu0",)), (8001, ("gpu1",))]

    deep = _clean(_switched(tree, "mode", "deep", tmp_path)).state
    running = [m for m in deep.of(Model) if _running(deep, m)]
    assert [(m.name, m.gpus, m.quantization) for m in running] == [("qwen-32b", ("gpu0", "gpu1"), "awq_marlin")]
    router = deep.get(Container, "router")
    assert router is not None and _running(deep, router)
    container = desired_container(
        running[0], lab=deep.lab, gpu_names=running[0].gpus, gpu_uuids={"gpu0": "GPU-0", "gpu1": "GPU-1"}, revision=None
    )
    command = container.command or ()
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    assert "--disable-custom-all-reduce" in command and container.gpus == ("GPU-0", "GPU-1")


@pytest.mark.parametrize("phase_file", PHASE_FILES, ids=_phase_name)
def test_four_gpu_phases_place_every_role_on_the_gpus_of_the_phase(phase_file: Path, tmp_path: Path) -> None:
    state = _clean(_phase_tree(phase_file, tmp_path)).state
    gpus = state.of(Gpu)
    roles = {r.name: r for r in state.of(GpuRole)}
    priorities = {name: role.priority for name, role in roles.items()}
    assert priorities == {"main-reasoning": 100, "safety": 90, "sensors": 60, "specialist-pool": 40}
    assert roles["sensors"].sharing == "shared"
    expected_gpus = {"phase-0": 1, "phase-2": 3, "phase-8": 4}.get(_phase_name(phase_file))
    if expected_gpus is not None:
        assert len(gpus) == expected_gpus
    for role in roles.values():
        placed = place_role(role, gpus)
        assert placed, f"{_phase_name(phase_file)}: role {role.name} is not placed"
        assert set(placed) <= {g.name for g in gpus}
    # A role-placed workload in an LXC needs the placed GPU among the LXC's devices.
    for workload in (*state.of(Model), *state.of(Container)):
        host = state.get(Lxc, workload.host)
        assert host is not None
        if workload.role is not None:
            assert set(_gpus_of(state, workload)) <= set(host.gpus), f"{workload.ref} on {host.ref}"
    # The CPU layer and the inference LXCs are the same in every phase.
    assert {(g.name, g.vmid) for g in state.of(Lxc)} == {
        ("n8n", 101), ("reasoning", 102), ("memory", 103),
        ("llm-main", 111), ("llm-specialists", 112), ("audio", 113), ("vision", 114), ("safety", 115),
    }  # fmt: skip
    cpu_layer = {c.name for c in state.of(Container) if c.role is None}
    assert cpu_layer == {"n8n", "reasoning-loop", "redis", "postgres", "qdrant"}
    main = state.get(Model, "main")
    assert main is not None and main.engine is Engine.LLAMACPP and main.role == "main-reasoning"


def test_four_gpu_phases_go_from_one_shared_gpu_to_one_gpu_per_role(tmp_path: Path) -> None:
    placements = {}
    for phase_file in PHASE_FILES:
        state = load_and_validate(_phase_tree(phase_file, tmp_path / _phase_name(phase_file))).state
        placements[_phase_name(phase_file)] = {r.name: place_role(r, state.of(Gpu)) for r in state.of(GpuRole)}
    assert set(placements["phase-0"].values()) == {("rtx3070",)}
    assert placements["phase-2"] == {
        "main-reasoning": ("rtx5000ada",), "safety": ("rtx5000ada",),
        "sensors": ("rtx3070",), "specialist-pool": ("rtx5060ti",),
    }  # fmt: skip
    assert len(set(placements["phase-8"].values())) == 4, "phase 8: every role has its own GPU"


def test_single_active_llamacpp_runs_exactly_one_model(tmp_path: Path) -> None:
    tree = EXAMPLES / "single-active-llamacpp"
    state = _clean(tree).state
    assert state.lab.proxmox is None and [h.name for h in state.of(DockerHost)] == ["workstation"]
    (gpu,) = state.of(Gpu)
    assert gpu.vram == 32 * 1024**3
    models = {m.name: m for m in state.of(Model)}
    assert {name: m.port for name, m in models.items()} == {"gpt-oss-120b": 8002, "qwen3-coder-30b": 8001}
    for model in models.values():
        assert model.engine is Engine.LLAMACPP and model.bind == "0.0.0.0"
        assert model.context is not None and model.models_dir is not None
        assert model.exclusive is not None and model.exclusive.group == "picker"
        container = desired_container(model, lab=state.lab, gpu_names=model.gpus, gpu_uuids={}, revision=None)
        command = container.command or ()
        assert command[command.index("--ctx-size") + 1] == str(model.context)
        assert command[command.index("--host") + 1] == "0.0.0.0"
        assert container.volumes and all(volume.readonly for volume in container.volumes)
    assert "F16" in models["gpt-oss-120b"].source
    for member in models:
        picked = _clean(_switched(tree, "picker", member, tmp_path)).state
        assert [m.name for m in picked.of(Model) if _running(picked, m)] == [member]


def test_default_specs_exercise_lxc_vm_models_and_a_group() -> None:
    state = _clean(ROOT / "specs").state
    assert state.of(Lxc) and state.of(Vm) and state.of(Model) and state.of(Container)
    (group,) = state.of(ExclusiveGroup)
    members = {member_of(r) for r in (*state.of(Lxc), *state.of(Vm), *state.of(Container)) if r.exclusive}
    assert group.active in members and len(members) == 2


# ---- from empty (issue 11): every tree plans from an empty lab, keys, clones and provisioning included --------


def _from_empty_plan(tree: Path, tmp_path: Path) -> tuple[DesiredState, Plan]:
    from reconciler.engine.journal import Journal
    from reconciler.engine.run import plan_pass
    from reconciler.fakes.lab import memory_lab

    desired = _clean(tree).state
    journal = Journal(tmp_path / "state" / "journal.sqlite")
    try:
        return desired, plan_pass(desired, memory_lab(desired, work_dir=tmp_path / "work").readers, journal)
    finally:
        journal.close()


@pytest.mark.parametrize("tree", TREES, ids=lambda p: p.name)
def test_tree_plans_from_empty_with_its_keys_clones_and_provisioning(tree: Path, tmp_path: Path) -> None:
    desired, plan = _from_empty_plan(tree, tmp_path)
    assert plan.applicable, [str(p) for p in (*plan.conflicts, *plan.blockers)]
    order = [c.address for c in plan.changes]
    for guest in (*desired.of(Lxc), *desired.of(Vm)):
        kind = "lxc" if isinstance(guest, Lxc) else "qemu"
        create = next((c for c in plan.changes if c.address == f"{kind}/{guest.name}"), None)
        if guest.adopt:
            continue
        assert create is not None and create.after is not None, guest.ref
        if isinstance(guest, Lxc) and guest.ssh_keys:
            assert create.after.config["ssh-public-keys"].startswith("ssh-ed25519 "), guest.ref
        if isinstance(guest, Vm) and guest.clone is not None:
            assert create.after.clone.template == guest.clone.template, guest.ref
            assert create.after.config["sshkeys"].startswith("ssh-ed25519%20"), guest.ref
    for resource in (*desired.of(Lxc), *desired.of(Vm), *desired.of(DockerHost)):
        if not resource.provision or (not isinstance(resource, DockerHost) and not _running(desired, resource)):
            continue
        address = f"provision/{resource.name}"
        assert address in order, f"{resource.ref} provisions but the plan has no {address}"
        change = plan.changes[order.index(address)]
        assert [s.step for s in change.after.steps] == [s.key for s in resource.provision]
        assert all(s.reason == "new" for s in change.after.steps)
        containers = [i for i, c in enumerate(plan.changes) if c.where.host == resource.name]
        assert all(i > order.index(address) for i in containers), f"{address} must come before its containers"
        for guest_address in (f"lxc/{resource.name}", f"qemu/{resource.name}"):
            if guest_address in order:
                assert order.index(guest_address) < order.index(address)


def test_the_inference_vm_is_cloned_from_a_cloud_init_template_and_provisions_docker_the_driver_and_toolkit(
    tmp_path: Path,
) -> None:
    desired, plan = _from_empty_plan(EXAMPLES / "inference-vm", tmp_path)
    vm = desired.get(Vm, "infer")
    assert vm is not None and vm.clone is not None and vm.cloud_init is not None and len(vm.numa_nodes) == 8
    create = next(c for c in plan.changes if c.address == "qemu/infer")
    assert create.after is not None and create.after.clone.storage == "nvme-fast"
    assert create.after.disk_sizes == {"scsi0": "500G"}
    assert create.after.config["ipconfig0"] == "ip=10.0.110.20/24,gw=10.0.110.1"
    assert create.after.config["numa7"] == "cpus=42-47,hostnodes=7,memory=16384,policy=bind"
    steps = next(c for c in plan.changes if c.address == "provision/infer").after.steps  # type: ignore[union-attr]
    assert [s.step for s in steps] == ["docker", "nvidia-driver.sh", "nvidia-container-toolkit"]


def test_the_windows_vm_is_adopted_and_says_so() -> None:
    desired = _clean(EXAMPLES / "dual-gpu-roles").state
    gaming = desired.get(Vm, "gaming")
    assert gaming is not None and gaming.adopt and gaming.clone is None and not gaming.provision
    assert gaming.efidisk0 is not None and gaming.tpmstate0 is not None
    text = (EXAMPLES / "dual-gpu-roles" / "guests.yaml").read_text(encoding="utf-8")
    assert "adopted" in text

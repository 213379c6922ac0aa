"""A change's typed content: what a guest PUT sends (decided once, in planning/intents.py), one container
shape from planner to backend, and JSON only at the plan-file boundary (an older or foreign plan is refused)."""

from __future__ import annotations

import json

import pytest

from reconciler.planning.container_run import ContainerProbe, ContainerRun, ContainerSeen
from reconciler.planning.intents import GuestIntent, GuestSeen, send_keys
from reconciler.planning.observed import ContainerPort, ContainerVolume, GuestKind
from reconciler.planning.plan import PLAN_FORMAT, Action, Backend, Change, FieldChange, Plan, PlanFormatError, Timing
from reconciler.spec.models import PowerState

CONFIG = {
    "cores": "8",
    "scsi0": "local-lvm:vm-200-disk-0,size=64G",
    "scsi1": "tank:vm-200-disk-1,size=32G",
    "tags": "llm;reconciler",
}


def _update(fields: tuple[FieldChange, ...], *, grow: dict[str, str], moves: dict[str, str]) -> Change:
    send = send_keys((f.path for f in fields), CONFIG, grow=grow, moves=moves)
    intent = GuestIntent(
        GuestKind.QEMU,
        "pve1",
        200,
        PowerState.RUNNING,
        config=CONFIG,
        send=send,
        delete=("agent",),
        grow=grow,
        moves=moves,
    )
    seen = GuestSeen(GuestKind.QEMU, "pve1", 200, "running", digest="abc", config={"cores": "4"})
    return Change(
        "qemu/llm", Action.UPDATE_RESTART, "Vm/llm", Backend.PROXMOX, before=seen, after=intent, fields=fields
    )


def test_a_put_sends_the_changed_keys_only_and_leaves_sizes_and_moves_to_their_own_calls() -> None:
    change = _update(
        (
            FieldChange("cores", "4", "8", Timing.RESTART),
            FieldChange("scsi0.size", "32G", "64G", Timing.LIVE),
            FieldChange("scsi1.storage", "local-lvm", "tank", Timing.LIVE),
            FieldChange("tags", "llm", "llm;reconciler", Timing.LIVE),
        ),
        grow={"scsi0": "64G"},
        moves={"scsi1": "tank"},
    )
    intent = GuestIntent.of(change)
    assert (intent.kind, intent.node, intent.vmid, intent.running) == (GuestKind.QEMU, "pve1", 200, True)
    assert dict(intent.send) == {"cores": "8", "tags": "llm;reconciler"}
    assert intent.delete == ("agent",)
    assert dict(intent.grow) == {"scsi0": "64G"} and dict(intent.moves) == {"scsi1": "tank"}


def test_the_intent_survives_a_saved_plan_with_the_same_json_shape() -> None:
    change = _update(
        (FieldChange("scsi0.size", "32G", "64G"), FieldChange("scsi0.cache", None, "none")),
        grow={"scsi0": "64G"},
        moves={},
    )
    data = Plan((change,)).to_json()
    assert data["format"] == PLAN_FORMAT == 3
    after = json.loads(json.dumps(data))["changes"][0]["after"]
    assert list(after) == ["type", "node", "vmid", "state", "config", "delete", "resize"]
    saved = Plan.from_json(json.loads(json.dumps(data))).changes[0]
    assert saved == change
    assert dict(GuestIntent.of(saved).send) == {"scsi0": "local-lvm:vm-200-disk-0,size=64G"}  # its cache changes


def test_a_delete_reads_where_from_before() -> None:
    seen = GuestSeen(GuestKind.LXC, "pve1", 955, "running", name="old")
    change = Change("lxc/old", Action.DELETE, "lxc/old", Backend.PROXMOX, before=seen, after=None)
    intent = GuestIntent.of(change)
    assert (intent.kind, intent.vmid, intent.running, dict(intent.send)) == (GuestKind.LXC, 955, False, {})
    assert seen.to_json() == {"type": "lxc", "node": "pve1", "vmid": 955, "name": "old", "status": "running"}


def test_a_container_is_one_value_and_its_secrets_never_reach_json() -> None:
    run = ContainerRun(
        name="api",
        image="ghcr.io/x/api:1",
        host="ws",
        resource="Container/api",
        env={"LOG": "info"},
        secret_env={"TOKEN": "API_TOKEN"},
        ports=(ContainerPort(host=8080, container=80),),
        volumes=(ContainerVolume("/srv/api", "/data", True),),
        probe=ContainerProbe(http="/health", port=8080),
    )
    change = Change(run.address, Action.CREATE, run.resource, Backend.DOCKER, before=None, after=run)
    assert Plan.from_json(json.loads(json.dumps(Plan((change,)).to_json()))).changes[0] == change
    resolved = run.with_secrets({"API_TOKEN": "s3cret-value"})
    assert resolved.env == {"LOG": "info", "TOKEN": "s3cret-value"}
    assert "s3cret-value" not in json.dumps(resolved.to_json()) and "s3cret-value" not in repr(resolved)
    assert resolved.to_json() == run.to_json()
    with pytest.raises(KeyError):
        run.with_secrets({})  # an unset secret is never sent as nothing
    seen = ContainerSeen("ws", "api", "0123456789ab", "ghcr.io/x/api:0", "running", None, ())
    assert ContainerSeen.from_json(seen.to_json()) == seen


@pytest.mark.parametrize(
    ("plan_file", "found"),
    [
        ({"format": 2, "changes": []}, "2"),  # an older reconciler's plan, same shape otherwise
        ({"changes": []}, "None"),  # no format at all: not a plan of ours
        ({"format": "3", "changes": []}, "'3'"),  # a string is not the format number
        ({"format": 99, "changes": []}, "99"),  # from the future
    ],
)
def test_a_plan_of_another_format_is_refused_with_a_clear_message(plan_file: dict[str, object], found: str) -> None:
    with pytest.raises(PlanFormatError) as refused:
        Plan.from_json(plan_file)
    assert f"plan format {found} is not this reconciler's format 3" in str(refused.value)
    assert "reconciler plan --out" in str(refused.value)


def _gpu_and_provision_plan() -> Plan:
    from reconciler.planning.gpu_values import GpuValues
    from reconciler.planning.provision import RunReason
    from reconciler.planning.provision_intent import DueStep, ProvisionIntent, ProvisionSeen

    uuid = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
    gpu = Change(
        "gpu/big",
        Action.UPDATE,
        "Gpu/big",
        Backend.GPU,
        before=GpuValues(uuid, power_limit=450.0),
        after=GpuValues(uuid, power_limit=350.0, persistence_mode=True),
        fields=(FieldChange("power_limit", 450.0, 350.0),),
    )
    steps = (DueStep("docker", "builtin:docker", "687bdb06fb995501", RunReason.CHANGED),)
    provision = Change(
        "provision/llm",
        Action.UPDATE,
        "Lxc/llm",
        Backend.SSH,
        before=ProvisionSeen({"docker": "0123456789abcdef"}),
        after=ProvisionIntent("Lxc/llm", "root@10.0.0.5:22", steps, inputs={"A": "1"}, timeouts={"docker": 1800.0}),
    )
    return Plan((gpu, provision), lab="homelab")


def test_gpu_settings_and_provisioning_changes_survive_a_saved_plan() -> None:
    plan = _gpu_and_provision_plan()
    assert Plan.from_json(json.loads(plan.dumps())) == plan


@pytest.mark.parametrize(
    ("address", "side", "key", "value", "message"),
    [
        ("gpu/big", "after", "power_limit", "lots", "power_limit must be a number of watts, got str"),
        ("gpu/big", "after", "power_limit", True, "power_limit must be a number of watts, got bool"),
        ("gpu/big", "after", "persistence_mode", "yes", "persistence_mode must be true or false"),
        ("gpu/big", "after", "compute_mode", 3, "compute_mode must be text"),
        ("gpu/big", "after", "uuid", "", "names no GPU UUID"),
        ("gpu/big", "after", "fan_speed", 100, "not a GPU setting: fan_speed"),  # not one the reconciler knows
        ("provision/llm", "after", "steps", "docker", "steps are a list"),
        ("provision/llm", "after", "fresh", "yes", "fresh is true or false"),
        ("provision/llm", "after", "timeouts", {"docker": "forever"}, "timeouts are numbers of seconds"),
        ("provision/llm", "after", "inputs", {"A": 1}, "expected an object of strings"),
        ("provision/llm", "after", "ssh", ["root@x"], "expected text, got list"),
        ("provision/llm", "before", "steps", {"docker": 7}, "expected an object of strings"),
    ],
)
def test_a_tampered_gpu_or_provisioning_change_is_refused(
    address: str, side: str, key: str, value: object, message: str
) -> None:
    """A saved plan's content is read with its types checked: an edited value is refused, never acted on."""
    data = json.loads(_gpu_and_provision_plan().dumps())
    change = next(c for c in data["changes"] if c["address"] == address)
    change[side][key] = value
    with pytest.raises(ValueError, match=message):
        Plan.from_json(data)


def test_a_tampered_provisioning_step_is_refused() -> None:
    data = json.loads(_gpu_and_provision_plan().dumps())
    change = next(c for c in data["changes"] if c["address"] == "provision/llm")
    change["after"]["steps"][0]["reason"] = "because"
    with pytest.raises(ValueError, match="'because' is not a valid RunReason"):
        Plan.from_json(data)

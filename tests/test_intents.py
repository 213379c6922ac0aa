"""What a planned guest change sends to PVE, decided in one place (planning/intents.py)."""

from __future__ import annotations

from reconciler.planning.intents import GuestIntent
from reconciler.planning.observed import GuestKind
from reconciler.planning.plan import Action, Backend, Change, FieldChange, Plan, Timing


def _update(fields: tuple[FieldChange, ...], **after: object) -> Change:
    config = {
        "cores": "8",
        "scsi0": "local-lvm:vm-200-disk-0,size=64G",
        "scsi1": "tank:vm-200-disk-1,size=32G",
        "tags": "llm;reconciler",
    }
    return Change(
        "qemu/llm",
        Action.UPDATE_RESTART,
        "Vm/llm",
        Backend.PROXMOX,
        before={"type": "qemu", "node": "pve1", "vmid": 200, "status": "running", "digest": "abc"},
        after={"type": "qemu", "node": "pve1", "vmid": 200, "state": "running", "config": config, **after},
        fields=fields,
    )


def test_a_put_sends_the_changed_keys_only_and_leaves_sizes_and_moves_to_their_own_calls() -> None:
    change = _update(
        (
            FieldChange("cores", "4", "8", Timing.RESTART),
            FieldChange("scsi0.size", "32G", "64G", Timing.LIVE),
            FieldChange("scsi1.storage", "local-lvm", "tank", Timing.LIVE),
            FieldChange("tags", "llm", "llm;reconciler", Timing.LIVE),
        ),
        resize={"scsi0": "64G"},
        move={"scsi1": "tank"},
        delete=["agent"],
    )
    intent = GuestIntent.of(change)
    assert (intent.kind, intent.node, intent.vmid, intent.running) == (GuestKind.QEMU, "pve1", 200, True)
    assert dict(intent.send) == {"cores": "8", "tags": "llm;reconciler"}
    assert intent.delete == ("agent",)
    assert dict(intent.grow) == {"scsi0": "64G"} and dict(intent.moves) == {"scsi1": "tank"}


def test_the_intent_survives_a_saved_plan() -> None:
    change = _update(
        (FieldChange("scsi0.size", "32G", "64G"), FieldChange("scsi0.cache", None, "none")), resize={"scsi0": "64G"}
    )
    saved = Plan.from_json(Plan((change,)).to_json()).changes[0]
    assert GuestIntent.of(saved) == GuestIntent.of(change)
    assert dict(GuestIntent.of(saved).send) == {"scsi0": "local-lvm:vm-200-disk-0,size=64G"}  # its cache changes


def test_a_delete_reads_where_from_before() -> None:
    change = Change(
        "lxc/old",
        Action.DELETE,
        "lxc/old",
        Backend.PROXMOX,
        before={"type": "lxc", "node": "pve1", "vmid": 955, "status": "running"},
        after=None,
    )
    intent = GuestIntent.of(change)
    assert (intent.kind, intent.vmid, intent.running, dict(intent.send)) == (GuestKind.LXC, 955, False, {})

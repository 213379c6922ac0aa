"""Guest access against fakepve with the real proxmoxer client, and the same against the in-memory Proxmox.

What is asserted is what PVE then holds: a clone of a cloud-init template (full and linked, by VMID and
by name, onto another node) with a cloud-init drive of its own, its disk grown and never shrunk, the
cloud-init keys (`ciuser`, `sshkeys`, `ipconfigN`, `cicustom`) as PVE keeps them, `cipassword` masked
when read back, and an LXC created with `ssh-public-keys` (a create-only parameter PVE does not keep).
fakepve differs from real PVE here in ways LabPve fills in (tests/support/fakepve.py): VM resize had no
effect, a clone pointed at its template's cloud-init drive, and `cipassword` was returned in clear.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reconciler.backends.memory import MemoryProxmox
from reconciler.backends.proxmox import ProxmoxBackend, settings_from
from reconciler.errors import ReconcilerError
from reconciler.planning import pve as props
from reconciler.planning.observed import GuestKind
from reconciler.planning.pve_access import (
    clone_params,
    clone_resizes,
    lxc_create_access,
    resolve_template,
    vm_access_config,
)
from reconciler.spec.models import Lxc, Vm
from tests.support.fakepve import CIPASSWORD_MASK, PveServer

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHqW4d0QSpJgq1k7CwMpIBkJH0kQ0o2oHq0Yl7YbN3yN admin@lab"
TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"


def _backend(server: PveServer) -> ProxmoxBackend:
    return ProxmoxBackend(settings_from(None, server.env("password")), backoff=0.01, poll_interval=0.01)  # type: ignore[arg-type]


@pytest.fixture
def backend(pve_server: PveServer) -> Iterator[ProxmoxBackend]:
    pve_server.pve.add_node("pve2")
    pve_server.pve.add_template(9000, "ubuntu-2404-ci", disk_gib=3)
    with _backend(pve_server) as client:
        yield client


def _vm(**extra: object) -> Vm:
    return Vm.model_validate(
        {
            "name": "infer",
            "node": "pve1",
            "vmid": 201,
            "cores": 4,
            "memory": "8GiB",
            "disks": [{"slot": "scsi0", "storage": "local-lvm", "size": "32GiB"}],
            "network": [{"bridge": "vmbr0"}],
            "clone": {"template": "ubuntu-2404-ci"},
            "cloud_init": {
                "user": "ops",
                "ssh_keys": [KEY],
                "ipconfig": [{"ip": "10.0.110.20/24", "gw": "10.0.110.1"}],
                "nameserver": ["10.0.110.1"],
                "user_data": "local:snippets/infer.yaml",
                "password_env": "INFER_PASSWORD",
            },
            **extra,
        }
    )


def _clone(backend: ProxmoxBackend, spec: Vm) -> None:
    template = resolve_template(spec.clone.template, backend.templates(), node=spec.clone.node)  # type: ignore[union-attr]
    call = clone_params(spec, template)
    backend.clone_vm(call.node, call.vmid, spec.vmid, params=call.params)


@pytest.mark.fakepve
def test_a_full_clone_by_name_gets_its_own_disk_and_cloud_init_drive(
    pve_server: PveServer, backend: ProxmoxBackend
) -> None:
    spec = _vm()
    _clone(backend, spec)

    vm = pve_server.pve.vm(201)
    assert vm is not None and not vm.template and vm.name == "infer"
    assert "base-" not in vm.config["scsi0"]  # a full copy
    assert vm.config["ide2"].split(",")[0] != pve_server.pve.vm(9000).config["ide2"].split(",")[0]
    assert "vm-201" in vm.config["ide2"]


@pytest.mark.fakepve
def test_a_cloned_disk_grows_to_its_size_and_never_shrinks(pve_server: PveServer, backend: ProxmoxBackend) -> None:
    spec = _vm()
    _clone(backend, spec)
    live = backend.observe_guest(GuestKind.QEMU, "pve1", 201).config
    (grow,) = clone_resizes(spec, live)
    assert (grow.disk, grow.size, grow.current, grow.shrink) == ("scsi0", "32G", "3G", False)

    backend.resize(GuestKind.QEMU, "pve1", 201, disk="scsi0", size=grow.size)

    grown = backend.observe_guest(GuestKind.QEMU, "pve1", 201).config
    assert props.parse_property(grown["scsi0"], "file")["size"] == "32G"
    assert clone_resizes(spec, grown) == []
    backend.resize(GuestKind.QEMU, "pve1", 201, disk="scsi0", size="8G")  # the backend never asks to shrink
    with pytest.raises(Exception, match="shrinking disks is not supported"):  # and PVE (LabPve) refuses it
        pve_server.run(
            pve_server.pve._lab_qemu_resize({"node": "pve1", "vmid": 201, "disk": "scsi0", "size": "8G"}, "root@pam")
        )
    assert (
        props.parse_property(backend.observe_guest(GuestKind.QEMU, "pve1", 201).config["scsi0"], "file")["size"]
        == "32G"
    )


@pytest.mark.fakepve
def test_a_linked_clone_by_vmid_and_another_node_needs_shared_storage(
    pve_server: PveServer, backend: ProxmoxBackend
) -> None:
    _clone(backend, _vm(vmid=202, clone={"template": 9000, "full": False}))
    linked = pve_server.pve.vm(202)
    assert linked is not None and linked.node == "pve1"
    # On LVM-thin a linked clone is a thin snapshot of the base volume: its own name, the base's blocks.
    assert linked.config["scsi0"].startswith("local-lvm:vm-202-disk-0")

    with pytest.raises(ReconcilerError, match="uses local storage"):
        _clone(backend, _vm(node="pve2", clone={"template": 9000, "node": "pve1"}))
    assert pve_server.pve.vm(201) is None


@pytest.mark.fakepve
def test_cloud_init_keys_are_kept_as_pve_keeps_them_and_the_password_is_masked(
    pve_server: PveServer, backend: ProxmoxBackend
) -> None:
    spec = _vm()
    _clone(backend, spec)
    config = vm_access_config(spec, {})
    backend.update_config(GuestKind.QEMU, "pve1", 201, config={**config, "cipassword": "s3cret-pw"})

    live = backend.observe_guest(GuestKind.QEMU, "pve1", 201).config
    assert live["ciuser"] == "ops"
    assert live["ipconfig0"] == "ip=10.0.110.20/24,gw=10.0.110.1"
    assert live["cicustom"] == "user=local:snippets/infer.yaml"
    assert props.compare_config(GuestKind.QEMU, config, live) == []  # no drift on the next pass
    assert live["cipassword"] == CIPASSWORD_MASK
    assert "s3cret-pw" not in repr(backend.observe().guests)


@pytest.mark.fakepve
def test_an_lxc_is_created_with_its_public_keys(pve_server: PveServer, backend: ProxmoxBackend) -> None:
    spec = Lxc.model_validate(
        {"name": "llm", "node": "pve1", "vmid": 955, "template": TEMPLATE, "cores": 2, "memory": "2GiB",
         "rootfs": {"storage": "local-lvm", "size": "8GiB"}, "ssh_keys": [KEY]}
    )  # fmt: skip
    config = {**props.lxc_config(spec, gpu_devices=[]), **lxc_create_access(spec, {})}
    backend.create_lxc("pve1", 955, config=config)

    ct = pve_server.pve.ct(955)
    assert ct is not None
    assert "ssh-public-keys" not in ct.config  # create-only: PVE writes it into root's authorized_keys
    writes = [path for method, path in pve_server.requests if method == "POST" and path.endswith("/lxc")]
    assert writes == ["/nodes/pve1/lxc"]


def test_the_memory_proxmox_clones_resizes_and_keeps_keys() -> None:
    memory = MemoryProxmox(["pve1", "pve2"])
    memory.add_template(
        9000, "ubuntu-2404-ci",
        config={"scsi0": "local-lvm:base-9000-disk-0,size=3G", "ide2": "local-lvm:vm-9000-cloudinit,media=cdrom",
                "net0": "virtio=BC:24:11:AA:00:01,bridge=vmbr0"},
    )  # fmt: skip
    spec = _vm(node="pve2", clone={"template": "ubuntu-2404-ci", "full": False})
    template = resolve_template("ubuntu-2404-ci", memory.templates())
    call = clone_params(spec, template)
    memory.clone_vm(call.node, call.vmid, 201, params=call.params)

    live = memory.observe_guest(GuestKind.QEMU, "pve2", 201)
    assert live.name == "infer"
    assert live.config["scsi0"].startswith("local-lvm:vm-201-disk-0")
    assert live.config["ide2"].startswith("local-lvm:vm-201-cloudinit")
    assert live.config["net0"] != "virtio=BC:24:11:AA:00:01,bridge=vmbr0"
    assert [g.vmid for g in memory.observe().guests] == [201]  # a template is not a guest of the lab
    (grow,) = clone_resizes(spec, live.config)
    memory.resize(GuestKind.QEMU, "pve2", 201, disk="scsi0", size=grow.size)
    assert clone_resizes(spec, memory.observe_guest(GuestKind.QEMU, "pve2", 201).config) == []

    lxc = Lxc.model_validate(
        {"name": "llm", "node": "pve1", "vmid": 955, "template": TEMPLATE, "memory": "2GiB",
         "rootfs": {"storage": "local-lvm", "size": "8GiB"}, "ssh_keys": [KEY]}
    )  # fmt: skip
    memory.create_lxc("pve1", 955, config={**props.lxc_config(lxc, gpu_devices=[]), **lxc_create_access(lxc, {})})
    assert memory.authorized_keys[955] == KEY + "\n"
    assert "ssh-public-keys" not in memory.observe_guest(GuestKind.LXC, "pve1", 955).config

"""Issue 11's PVE parameters: rendered by planning/pve_access.py, accepted by fakepve, read back without a diff.

The pure part checks each format against PVE's documented grammar; the fakepve part sends what the
helpers render through the real proxmoxer client and the project's Proxmox backend (fakepve checks
every parameter against PVE's own schema), then compares what fakepve holds with the desired values
using the same `compare_config` the planner uses: no perpetual diff. What fakepve lacks is said where
it matters (see the module docstring of `test_clone_*`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from reconciler.backends.proxmox import ProxmoxBackend, settings_from
from reconciler.errors import BackendError
from reconciler.planning import pve
from reconciler.planning.pve_access import (
    TemplateRow,
    TemplateUnresolved,
    clone_params,
    clone_resizes,
    efidisk_value,
    ipconfig_value,
    lxc_create_access,
    numa_value,
    parse_sshkeys,
    qemu_sshkeys,
    resolve_keys,
    resolve_template,
    secret_create_params,
    tpmstate_value,
    vm_access_config,
)
from reconciler.spec.access import IpConfig, NumaNode, SshKey
from reconciler.spec.models import Lxc, Vm
from tests.support.fakepve import PveServer

TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"


def _key(comment: str) -> str:
    raw = ed25519.Ed25519PrivateKey.generate().public_key()
    return raw.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " " + comment


KEY_A, KEY_B = _key("alice@lab"), _key("bob@lab")


def _vm(**extra: Any) -> Vm:
    base: dict[str, Any] = {
        "name": "infer",
        "node": "pve1",
        "vmid": 200,
        "cores": 4,
        "sockets": 2,
        "memory": "8GiB",
        "numa": True,
        "bios": "ovmf",
        "machine": "q35",
        "disks": [{"slot": "scsi0", "storage": "local-lvm", "size": "8GiB"}],
        "network": [{"bridge": "vmbr0"}],
    }
    return Vm.model_validate({**base, **extra})


FULL_VM = {
    "efidisk0": {"storage": "local-lvm", "pre_enrolled_keys": True},
    "tpmstate0": {"storage": "local-lvm"},
    "numa_nodes": [
        {"cpus": "0-3", "memory": "4GiB", "hostnodes": "0", "policy": "bind"},
        {"cpus": "4-7", "memory": "4GiB", "hostnodes": "1", "policy": "preferred"},
    ],
    "cloud_init": {
        "user": "ops",
        "ssh_keys": [KEY_A, {"file": "keys/team.pub"}],
        "ipconfig": [{"ip": "10.0.0.5/24", "gw": "10.0.0.1", "ip6": "auto"}],
        "nameserver": ["10.0.0.1", "fd00::1"],
        "searchdomain": ["lab.lan", "home.lan"],
        "user_data": "local:snippets/infer.yaml",
        "upgrade": False,
    },
}
FILES = {"keys/team.pub": f"{KEY_B}\n{KEY_A}\n".encode()}


# ---- pure formats ----------------------------------------------------------------------------


def test_keys_from_inline_and_files_come_once_each_in_order() -> None:
    keys = resolve_keys((SshKey(key=KEY_A), SshKey(file="keys/team.pub")), FILES)
    assert keys == (KEY_A, KEY_B)


def test_sshkeys_are_url_encoded_as_pves_urlencoded_format_wants() -> None:
    encoded = qemu_sshkeys((KEY_A, KEY_B))
    assert set(encoded) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-%_.!~*'()")
    assert "%20" in encoded and "%0A" in encoded and "+" not in encoded and "/" not in encoded
    assert unquote(encoded) == f"{KEY_A}\n{KEY_B}\n"
    # PVE keeps the encoded text: comparison ignores order and comments, not the keys.
    assert parse_sshkeys(encoded) == parse_sshkeys(qemu_sshkeys((KEY_B.rsplit(" ", 1)[0], KEY_A)))
    assert not pve.compare_config("qemu", {"sshkeys": encoded}, {"sshkeys": qemu_sshkeys((KEY_B, KEY_A))})
    assert pve.compare_config("qemu", {"sshkeys": encoded}, {"sshkeys": qemu_sshkeys((KEY_A,))})


def test_ipconfig_efidisk_tpmstate_and_numa_render_pves_grammar() -> None:
    assert (
        ipconfig_value(IpConfig(ip="10.0.0.5/24", gw="10.0.0.1", ip6="dhcp")) == "ip=10.0.0.5/24,gw=10.0.0.1,ip6=dhcp"
    )
    assert ipconfig_value(IpConfig(ip6="fd00::5/64", gw6="fd00::1")) == "ip6=fd00::5/64,gw6=fd00::1"
    vm = _vm(**FULL_VM)
    assert vm.efidisk0 is not None and vm.tpmstate0 is not None
    assert efidisk_value(vm.efidisk0) == "local-lvm:1,efitype=4m,pre-enrolled-keys=1"
    assert tpmstate_value(vm.tpmstate0) == "local-lvm:1,version=v2.0"
    node = NumaNode.model_validate({"cpus": "0-5;12-17", "memory": "64GiB", "hostnodes": "0-1", "policy": "interleave"})
    assert numa_value(node) == "cpus=0-5;12-17,hostnodes=0-1,memory=65536,policy=interleave"


def test_a_vms_access_config_declares_every_new_key_and_no_secret() -> None:
    config = vm_access_config(_vm(**FULL_VM), FILES)
    assert config == {
        "efidisk0": "local-lvm:1,efitype=4m,pre-enrolled-keys=1",
        "tpmstate0": "local-lvm:1,version=v2.0",
        "numa0": "cpus=0-3,hostnodes=0,memory=4096,policy=bind",
        "numa1": "cpus=4-7,hostnodes=1,memory=4096,policy=preferred",
        "ciuser": "ops",
        "sshkeys": qemu_sshkeys((KEY_A, KEY_B)),
        "ipconfig0": "ip=10.0.0.5/24,gw=10.0.0.1,ip6=auto",
        "nameserver": "10.0.0.1 fd00::1",
        "searchdomain": "lab.lan home.lan",
        "cicustom": "user=local:snippets/infer.yaml",
        "ciupgrade": "0",
    }


def test_a_password_comes_from_the_environment_only_when_the_call_is_made() -> None:
    vm = _vm(cloud_init={"password_env": "INFER_PW"})
    assert secret_create_params(vm, {"INFER_PW": "s3cret"}) == {"cipassword": "s3cret"}
    with pytest.raises(LookupError, match="INFER_PW is not set") as caught:
        secret_create_params(vm, {})
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in repr(vm_access_config(vm, {}))
    lxc = _lxc(password_env="CT_PW")
    assert secret_create_params(lxc, {"CT_PW": "pw"}) == {"password": "pw"}
    assert secret_create_params(_vm(), {"X": "y"}) == {}


def test_a_template_is_found_by_vmid_or_name_and_only_when_it_is_one() -> None:
    rows = [
        TemplateRow(9000, "debian-12-cloud", "pve1", True),
        TemplateRow(9001, "ubuntu", "pve2", True),
        TemplateRow(9002, "ubuntu", "pve1", True),
        TemplateRow(300, "web", "pve1", False),
    ]
    assert resolve_template("debian-12-cloud", rows).vmid == 9000
    assert resolve_template(9001, rows).node == "pve2"
    assert resolve_template("ubuntu", rows, node="pve1").vmid == 9002
    with pytest.raises(TemplateUnresolved, match="2 VMs are named 'ubuntu'"):
        resolve_template("ubuntu", rows)
    with pytest.raises(TemplateUnresolved, match="not a template"):
        resolve_template(300, rows)
    with pytest.raises(TemplateUnresolved, match="no VM 'gone'"):
        resolve_template("gone", rows)


def test_clone_params_target_another_node_and_storage_only_for_a_full_clone() -> None:
    vm = _vm(clone={"template": 9000, "storage": "fast"})
    call = clone_params(vm, TemplateRow(9000, "t", "pve2", True))
    assert (call.node, call.vmid) == ("pve2", 9000)
    assert call.params == {"newid": "200", "name": "infer", "full": "1", "target": "pve1", "storage": "fast"}
    linked = clone_params(_vm(clone={"template": 9000, "full": False}), TemplateRow(9000, "t", "pve1", True))
    assert linked.params == {"newid": "200", "name": "infer", "full": "0"}


def test_a_cloned_disk_grows_to_its_declared_size_and_never_shrinks() -> None:
    vm = _vm(
        disks=[
            {"slot": "scsi0", "storage": "local-lvm", "size": "32GiB"},
            {"slot": "scsi1", "storage": "xs", "size": "1GiB"},  # a storage id has at least two characters
        ]
    )
    grows = clone_resizes(vm, {"scsi0": "local-lvm:vm-200-disk-0,size=2G", "scsi1": "xs:vm-200-disk-1,size=4G"})
    assert [(g.disk, g.size, g.current, g.shrink) for g in grows] == [
        ("scsi0", "32G", "2G", False),
        ("scsi1", "1G", "4G", True),
    ]
    assert clone_resizes(vm, {"scsi0": "local-lvm:vm-200-disk-0,size=32G"}) == []


def test_efidisk_and_tpmstate_compare_by_storage_and_options_not_by_the_size_pve_gives_them() -> None:
    desired = vm_access_config(_vm(efidisk0={"storage": "local-lvm"}, tpmstate0={"storage": "local-lvm"}), {})
    live = {
        "efidisk0": "local-lvm:vm-200-disk-1,efitype=4m,size=528K",
        "tpmstate0": "local-lvm:vm-200-disk-2,size=4M,version=v2.0",
    }
    assert pve.compare_config("qemu", desired, live) == []
    moved = pve.compare_config("qemu", desired, {**live, "tpmstate0": "other:vm-200-disk-2,size=4M,version=v2.0"})
    # PVE moves a VM's tpmstate0/efidisk0 with move_disk like any disk: in place, never a replace.
    assert [(d.key, d.replace, d.move) for d in moved] == [("tpmstate0", False, True)]


# ---- against fakepve ---------------------------------------------------------------------------


def _lxc(**extra: Any) -> Lxc:
    base = {
        "name": "llm",
        "node": "pve1",
        "vmid": 955,
        "template": TEMPLATE,
        "rootfs": {"storage": "local-lvm", "size": "8GiB"},
    }
    return Lxc.model_validate({**base, **extra})


@pytest.fixture
def backend(pve_server: PveServer) -> Iterator[ProxmoxBackend]:
    settings = settings_from(None, pve_server.env("password"))
    with ProxmoxBackend(settings, backoff=0.01, poll_interval=0.01) as connected:  # type: ignore[arg-type]
        yield connected


def _api(server: PveServer, method: str, path: str, **params: Any) -> Any:
    response = requests.request(
        method,
        f"{server.url}/api2/json{path}",
        **({"params": params} if method == "GET" else {"data": params}),
        headers={"Authorization": f"PVEAPIToken={server.token}"},
        verify=server.ca_file,
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["data"]


@pytest.mark.fakepve
def test_fakepve_accepts_a_vm_with_every_new_key_and_reads_back_no_diff(backend: ProxmoxBackend) -> None:
    vm = _vm(**FULL_VM)
    desired = {**pve.vm_config(vm, hostpci=()), **vm_access_config(vm, FILES)}
    backend.create_vm("pve1", 200, config={**desired, "ide2": "local-lvm:cloudinit"})
    live = backend.observe_guest("qemu", "pve1", 200)
    assert live.config["efidisk0"].startswith("local-lvm:vm-200-disk-")
    assert parse_sshkeys(live.config["sshkeys"]) == parse_sshkeys(desired["sshkeys"])
    assert pve.compare_config("qemu", desired, live.config) == []


@pytest.mark.fakepve
def test_fakepve_refuses_an_unencoded_sshkeys_value(backend: ProxmoxBackend) -> None:
    with pytest.raises(BackendError, match="sshkeys"):
        backend.create_vm("pve1", 201, config={**pve.vm_config(_vm(vmid=201), hostpci=()), "sshkeys": KEY_A})


@pytest.mark.fakepve
def test_an_lxc_is_created_with_ssh_public_keys_which_pve_does_not_keep(
    backend: ProxmoxBackend, pve_server: PveServer
) -> None:
    lxc = _lxc(ssh_keys=[KEY_A, KEY_B])
    config = {**pve.lxc_config(lxc, gpu_devices=()), **lxc_create_access(lxc, {})}
    assert config["ssh-public-keys"] == f"{KEY_A}\n{KEY_B}\n"
    backend.create_lxc("pve1", 955, config=config)
    live = backend.observe_guest("lxc", "pve1", 955)
    assert "ssh-public-keys" not in live.config  # a create parameter, as on real PVE
    assert pve.compare_config("lxc", config, live.config) == []
    created = [r for r in pve_server.requests if r == ("POST", "/nodes/pve1/lxc")]
    assert created


def _template(server: PveServer, backend: ProxmoxBackend) -> None:
    """VM 9000 with a 2 GiB disk and a cloud-init drive, made a template through the API."""
    config = {"name": "debian-12-cloud", "memory": "2048", "scsi0": "local-lvm:2", "ide2": "local-lvm:cloudinit"}
    backend.create_vm("pve1", 9000, config={**config, "net0": "virtio,bridge=vmbr0"})
    upid = _api(server, "POST", "/nodes/pve1/qemu/9000/template")
    if isinstance(upid, str) and upid.startswith("UPID:"):
        backend.wait_for_task(upid, resource="qemu/9000")
    rows = _api(server, "GET", "/cluster/resources", type="vm")
    assert [r.get("template") for r in rows if r["vmid"] == 9000] == [1]


@pytest.mark.fakepve
def test_clone_a_template_then_set_cloud_init_and_plan_its_disk_grow(
    backend: ProxmoxBackend, pve_server: PveServer
) -> None:
    _template(pve_server, backend)
    rows = [
        TemplateRow(int(r["vmid"]), r.get("name"), r["node"], bool(r.get("template")))
        for r in _api(pve_server, "GET", "/cluster/resources", type="vm")
    ]
    vm = _vm(clone={"template": "debian-12-cloud", "storage": "local-lvm"}, cloud_init=FULL_VM["cloud_init"])
    call = clone_params(vm, resolve_template("debian-12-cloud", rows))
    backend.clone_vm(call.node, call.vmid, vm.vmid, params=call.params)
    cloned = backend.observe_guest("qemu", "pve1", 200)
    assert cloned.name == "infer" and "media=cdrom" in cloned.config["ide2"]  # the cloud-init drive came along
    assert cloned.config["scsi0"].startswith("local-lvm:vm-200-disk-")
    # The clone's 2 GiB disk must grow to the declared 8 GiB (the resize call itself: see the next test).
    assert [(g.disk, g.size, g.shrink) for g in clone_resizes(vm, cloned.config)] == [("scsi0", "8G", False)]
    keys = vm_access_config(vm, FILES)
    backend.update_config("qemu", "pve1", 200, config=keys)
    after = backend.observe_guest("qemu", "pve1", 200)
    assert pve.compare_config("qemu", keys, after.config) == []


@pytest.mark.fakepve
def test_a_linked_clone_needs_a_template(backend: ProxmoxBackend, pve_server: PveServer) -> None:
    backend.create_vm("pve1", 9100, config={"name": "plain", "memory": "512", "scsi0": "local-lvm:2"})
    vm = _vm(clone={"template": 9100, "full": False})
    call = clone_params(vm, TemplateRow(9100, "plain", "pve1", True))
    with pytest.raises(BackendError, match=r"[Ll]inked clone"):
        backend.clone_vm(call.node, call.vmid, vm.vmid, params=call.params)
    _template(pve_server, backend)
    call = clone_params(vm, TemplateRow(9000, "debian-12-cloud", "pve1", True))
    backend.clone_vm(call.node, call.vmid, vm.vmid, params=call.params)
    assert backend.observe_guest("qemu", "pve1", 200).config["scsi0"].startswith("local-lvm:vm-200-disk-")


@pytest.mark.fakepve
def test_cloning_into_a_taken_vmid_is_refused_before_the_call(backend: ProxmoxBackend, pve_server: PveServer) -> None:
    _template(pve_server, backend)
    backend.create_vm("pve1", 200, config={"name": "other", "memory": "512"})
    pve_server.clear_requests()
    with pytest.raises(BackendError, match="already taken"):
        backend.clone_vm("pve1", 9000, 200, params={"name": "infer", "full": "1"})
    assert not any(path.endswith("/clone") for _, path in pve_server.requests)


@pytest.mark.fakepve
def test_a_vm_resize_grows_the_cloned_disk(backend: ProxmoxBackend, pve_server: PveServer) -> None:
    """Stock fakepve 0.5 answers `PUT /nodes/{node}/qemu/{vmid}/resize` from the schema and changes nothing;
    LabPve (tests/support/fakepve.py) grows the volume, as PVE does."""
    _template(pve_server, backend)
    backend.clone_vm("pve1", 9000, 200, params={"name": "infer", "full": "1"})
    backend.resize("qemu", "pve1", 200, disk="scsi0", size="8G")
    assert ("PUT", "/nodes/pve1/qemu/200/resize") in pve_server.requests
    assert "size=8G" in backend.observe_guest("qemu", "pve1", 200).config["scsi0"]


@pytest.mark.fakepve
def test_a_cloud_init_password_sent_at_create_is_not_read_back_in_clear(backend: ProxmoxBackend) -> None:
    """Real PVE shows `cipassword` as `**********` (stored hashed): it can never be compared, only set.
    fakepve 0.5 returns it in clear; the backend masks it whatever the server sends."""
    vm = _vm(cloud_init={"user": "ops", "password_env": "INFER_PW"})
    config = {**pve.vm_config(vm, hostpci=()), **vm_access_config(vm, {})}
    backend.create_vm("pve1", 200, config={**config, **secret_create_params(vm, {"INFER_PW": "Pl41n-Secret"})})
    live = backend.observe_guest("qemu", "pve1", 200)
    assert live.config["ciuser"] == "ops" and live.config["cipassword"] == "**********"
    assert "Pl41n-Secret" not in repr(live)

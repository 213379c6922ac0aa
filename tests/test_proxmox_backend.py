"""The Proxmox backend against fakepve with the real proxmoxer client: what it does is what fakepve then holds.

Where fakepve differs from real PVE, the test says which behaviour it covers: fakepve leaves the config
digest out of `.../pending` (LabPve adds it, as PVE does; `pending_digest=False` is the stock fake), lets a
root API token set raw hostpciN and devN (the backend refuses them before sending, as PVE would), and
keeps a VM's tags as sent on a config update (the backend normalises them when it reads).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.backends.proxmox import (
    ENV_CA,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_URL,
    ENV_USER,
    ENV_VERIFY_TLS,
    ConfigChanged,
    ProxmoxBackend,
    ProxmoxSettings,
    settings_from,
)
from reconciler.errors import (
    ConfigError,
    PermanentError,
    PermissionDenied,
    TaskFailed,
    TemporaryError,
)
from reconciler.planning import pve as props
from reconciler.planning.observed import GuestKind, ObservedGuest
from reconciler.spec.models import Lxc, ProxmoxAuth, ProxmoxConnection, Vm
from tests.support.fakepve import PveServer

# pve_pki and pve_server come from tests.support.fakepve, which tests/conftest.py registers as a plugin.

SECRET = "0b9d7c4e-6a61-4f7e-9d3a-5f0e2c1b8a77"
TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
GPU_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


def _backend(server: PveServer, auth: str = "token", **options: float) -> ProxmoxBackend:
    return ProxmoxBackend(settings_from(None, server.env(auth)), backoff=0.01, poll_interval=0.01, **options)  # type: ignore[arg-type]


@pytest.fixture
def token_backend(pve_server: PveServer) -> Iterator[ProxmoxBackend]:
    with _backend(pve_server, "token") as backend:
        yield backend


@pytest.fixture
def root_backend(pve_server: PveServer) -> Iterator[ProxmoxBackend]:
    """A root@pam password login: the only one PVE lets set devN, bind mounts and raw hostpciN."""
    with _backend(pve_server, "password") as backend:
        yield backend


def _lxc() -> Lxc:
    return Lxc.model_validate(
        {
            "name": "llm",
            "node": "pve1",
            "vmid": 955,
            "template": TEMPLATE,
            "cores": 8,
            "memory": "32GiB",
            "swap": "1GiB",
            "rootfs": {"storage": "local-lvm", "size": "64GiB"},
            "mounts": [{"host": "/tank/models", "path": "/models", "readonly": True}],
            "volumes": [{"storage": "local-lvm", "size": "8GiB", "path": "/data"}],
            "network": [{"name": "eth0", "bridge": "vmbr0", "ip": "dhcp", "vlan": 110, "firewall": True}],
            "features": {"nesting": True, "keyctl": True},
            "gpus": ["big"],
            "onboot": True,
            "startup": {"order": 1, "up": "30s"},
            "tags": ["reconciler", "LLM"],
        }
    )


def _vm(vmid: int = 200) -> Vm:
    return Vm.model_validate(
        {
            "name": "infer",
            "node": "pve1",
            "vmid": vmid,
            "cores": 16,
            "sockets": 2,
            "numa": True,
            "hugepages": "1024",
            "cpu": "host",
            "machine": "q35",
            "bios": "ovmf",
            "ostype": "l26",
            "memory": "64GiB",
            "disks": [{"slot": "scsi0", "storage": "local-lvm", "size": "128GiB", "ssd": True, "discard": True}],
            "network": [{"bridge": "vmbr0", "vlan": 110, "firewall": True}],
            "agent": True,
            "onboot": True,
            "tags": ["Reconciler", "inference"],
        }
    )


def _effective(guest: ObservedGuest) -> dict[str, str]:
    """The config the guest will have: current values overlaid with pending ones, as the planner reads it."""
    effective = {**guest.config, **guest.pending}
    for key in guest.pending_delete:
        effective.pop(key, None)
    return effective


def _guest(observation_guests: tuple[ObservedGuest, ...], vmid: int) -> ObservedGuest:
    return next(g for g in observation_guests if g.vmid == vmid)


# ---- settings (no server) ---------------------------------------------------------------------


def test_settings_from_a_full_token() -> None:
    env = {ENV_URL: "https://pve1.lan:8006", ENV_TOKEN: f"ops@pve!reconciler={SECRET}"}
    settings = settings_from(None, env)
    assert (settings.auth, settings.user, settings.token_id, settings.secret) == (
        ProxmoxAuth.TOKEN,
        "ops@pve",
        "reconciler",
        SECRET,
    )
    assert settings.verify is True
    assert not settings.is_root_pam


def test_settings_from_a_bare_secret_use_the_labs_user_and_token_id() -> None:
    connection = ProxmoxConnection(url="https://pve1.lan:8006", user="ops@pve", token_id="gitops", timeout="90s")
    settings = settings_from(connection, {ENV_TOKEN: SECRET})
    assert (settings.user, settings.token_id, settings.secret, settings.timeout) == ("ops@pve", "gitops", SECRET, 90.0)


def test_the_environment_overrides_the_lab() -> None:
    connection = ProxmoxConnection(url="https://old.lan:8006", ca_file="/etc/old-ca.pem", token_id="gitops")
    env = {ENV_URL: "https://new.lan:8006", ENV_TOKEN: SECRET, ENV_CA: "/etc/lab-ca.pem", ENV_VERIFY_TLS: "1"}
    settings = settings_from(connection, env)
    assert (settings.url, settings.ca_file, settings.verify) == (
        "https://new.lan:8006",
        "/etc/lab-ca.pem",
        "/etc/lab-ca.pem",
    )
    settings = settings_from(connection, {**env, ENV_VERIFY_TLS: "0"})
    assert settings.verify is False


def test_a_password_login_from_the_environment() -> None:
    env = {ENV_URL: "https://pve1.lan:8006", ENV_USER: "root@pam", ENV_PASSWORD: "hunter2-long"}
    settings = settings_from(ProxmoxConnection(url="https://pve1.lan:8006", token_id="gitops"), env)
    assert (settings.auth, settings.user, settings.secret) == (ProxmoxAuth.PASSWORD, "root@pam", "hunter2-long")
    assert settings.is_root_pam


def test_the_secret_can_live_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"root@pam!reconciler={SECRET}\n")
    connection = ProxmoxConnection(url="https://pve1.lan:8006", secret_env="LAB_PVE_TOKEN", secret_file=str(path))
    assert settings_from(connection, {}).secret == SECRET
    assert settings_from(connection, {"LAB_PVE_TOKEN": "root@pam!other=abc"}).token_id == "other"
    missing_file = ProxmoxConnection(url="https://pve1.lan:8006", secret_file=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="cannot read the Proxmox secret file"):
        settings_from(missing_file, {})


def test_a_missing_secret_says_which_variable_to_set() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from(ProxmoxConnection(url="https://pve1.lan:8006"), {})
    assert ENV_TOKEN in str(caught.value)
    password = ProxmoxConnection(url="https://pve1.lan:8006", auth="password")
    with pytest.raises(ConfigError) as caught:
        settings_from(password, {})
    assert ENV_PASSWORD in str(caught.value)
    with pytest.raises(ConfigError, match=ENV_URL):
        settings_from(None, {ENV_TOKEN: f"root@pam!x={SECRET}"})


def test_a_bare_secret_without_a_token_id_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from(ProxmoxConnection(url="https://pve1.lan:8006"), {ENV_TOKEN: SECRET})
    assert "token_id" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_only_https_is_accepted() -> None:
    with pytest.raises(ConfigError, match="https"):
        settings_from(None, {ENV_URL: "http://pve1.lan:8006", ENV_TOKEN: f"root@pam!x={SECRET}"})


def test_the_secret_never_shows_in_repr_or_str() -> None:
    settings = settings_from(None, {ENV_URL: "https://pve1.lan:8006", ENV_TOKEN: f"root@pam!x={SECRET}"})
    for text in (repr(settings), str(settings), repr(ProxmoxBackend(settings)), f"{settings}"):
        assert SECRET not in text
    assert "secret='***'" in repr(settings)
    assert isinstance(settings, ProxmoxSettings)


# ---- create and observe -------------------------------------------------------------------------


@pytest.mark.fakepve
def test_create_an_lxc_and_observe_it(pve_server: PveServer, root_backend: ProxmoxBackend) -> None:
    spec = _lxc()
    config = props.lxc_config(spec, gpu_devices=GPU_DEVICES)
    root_backend.create_lxc("pve1", 955, config=config)

    ct = pve_server.pve.ct(955)
    assert ct is not None
    assert ct.config["dev0"] == "/dev/nvidia0"
    assert ct.config["mp0"] == "/tank/models,mp=/models,ro=1"
    assert props.parse_property(ct.config["rootfs"], "volume")["size"] == "64G"
    assert ct.config["tags"] == "llm;reconciler"

    observation = root_backend.observe()
    guest = _guest(observation.guests, 955)
    assert (guest.type, guest.node, guest.name, guest.status) == (GuestKind.LXC, "pve1", "llm", "stopped")
    assert guest.tags == ("llm", "reconciler")
    assert guest.config["hostname"] == "llm"
    assert "hwaddr=" in guest.config["net0"]  # PVE adds the MAC; the planner must not see it as drift
    desired = {k: v for k, v in config.items() if k not in props.CREATE_ONLY["lxc"]}
    assert props.compare_config("lxc", desired, _effective(guest)) == []


@pytest.mark.fakepve
def test_create_a_vm_and_observe_it(pve_server: PveServer, root_backend: ProxmoxBackend) -> None:
    config = props.vm_config(_vm(), hostpci=["0000:01:00,pcie=1,x-vga=1"])
    root_backend.create_vm("pve1", 200, config=config)

    vm = pve_server.pve.vm(200)
    assert vm is not None
    assert vm.config["hostpci0"] == "0000:01:00,pcie=1,x-vga=1"
    assert props.parse_property(vm.config["net0"], "model")["macaddr"].startswith("BC:24:11")

    guest = _guest(root_backend.observe().guests, 200)
    assert (guest.type, guest.name, guest.tags) == (GuestKind.QEMU, "infer", ("inference", "reconciler"))
    assert props.compare_config("qemu", config, _effective(guest)) == []


@pytest.mark.fakepve
def test_a_token_gives_gpus_to_vms_through_a_mapping(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    pve_server.pve.add_pci_mapping("gpu-a", {"pve1": ["0000:01:00"]})
    config = props.vm_config(_vm(), hostpci=["mapping=gpu-a,pcie=1"])
    token_backend.create_vm("pve1", 200, config=config)
    assert pve_server.pve.vm(200).config["hostpci0"] == "mapping=gpu-a,pcie=1"
    [mapping] = token_backend.observe().mappings
    assert (mapping.name, dict(mapping.paths)) == ("gpu-a", {"pve1": ("0000:01:00",)})


@pytest.mark.fakepve
def test_root_only_keys_are_refused_for_a_token_before_anything_is_sent(
    pve_server: PveServer, token_backend: ProxmoxBackend
) -> None:
    """PVE lets only a root@pam password login set devN, bind mounts and raw hostpciN; fakepve lets a token do it."""
    pve_server.clear_requests()
    with pytest.raises(PermissionDenied, match="dev0") as caught:
        token_backend.create_lxc("pve1", 955, config=props.lxc_config(_lxc(), gpu_devices=GPU_DEVICES))
    assert "mp0" in str(caught.value)
    with pytest.raises(PermissionDenied, match="hostpci0"):
        token_backend.create_vm("pve1", 200, config=props.vm_config(_vm(), hostpci=["0000:01:00,pcie=1"]))
    pve_server.pve.add_vm(201, "desk", config={"cores": 2})
    with pytest.raises(PermissionDenied, match="hostpci0"):
        token_backend.update_config("qemu", "pve1", 201, config={"hostpci0": "01:00"})
    assert pve_server.requests == []
    assert pve_server.pve.ct(955) is None
    assert pve_server.pve.vm(200) is None
    assert "hostpci0" not in pve_server.pve.vm(201).config


@pytest.mark.fakepve
def test_creating_on_a_taken_vmid_is_refused(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    pve_server.pve.add_vm(200, "other")
    with pytest.raises(PermanentError, match="already taken"):
        token_backend.create_vm("pve1", 200, config={"name": "infer", "memory": "1024"})
    assert pve_server.writes() == []
    assert pve_server.pve.vm(200).name == "other"


# ---- observe ------------------------------------------------------------------------------------


@pytest.mark.fakepve
def test_observe_reads_the_inventory_once_and_each_guest_once(
    pve_server: PveServer, token_backend: ProxmoxBackend
) -> None:
    pve = pve_server.pve
    for n in range(12):
        pve.add_ct(300 + n, f"ct{n}", status="running" if n % 2 else "stopped")
        pve.add_vm(400 + n, f"vm{n}", status="running" if n % 3 else "stopped", config={"cores": 2, "memory": 2048})
    pve.add_gpu("pve1", "0000:01:00")
    pve_server.clear_requests()

    observation = token_backend.observe()

    assert len(observation.guests) == 24
    requests = pve_server.requests
    assert pve_server.writes() == []
    paths = Counter(path for _, path in requests)
    assert paths["/cluster/resources"] == 1
    assert sum(count for path, count in paths.items() if path.endswith("/pending")) == 24
    assert all(count == 1 for path, count in paths.items())
    assert not any(path.endswith("/config") for path in paths)
    fixed = {"/version", "/nodes", "/nodes/pve1/hardware/pci", "/cluster/mapping/pci", "/cluster/resources"}
    assert set(paths) - {p for p in paths if p.endswith("/pending")} == fixed
    assert len(requests) == 24 + len(fixed)


@pytest.mark.fakepve
def test_observe_limited_to_nodes_and_offline_nodes(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    pve = pve_server.pve
    pve.add_node("pve2")
    pve.add_node("pve3")
    pve.add_ct(301, "a", node="pve1")
    pve.add_ct(302, "b", node="pve2", status="running", config={"tags": "reconciler"})
    pve.add_vm(303, "c", node="pve3")
    pve.set_node_offline("pve2")
    pve_server.clear_requests()

    observation = token_backend.observe(nodes=["pve1", "pve2"])

    assert [(n.name, n.online) for n in observation.nodes] == [("pve1", True), ("pve2", False)]
    assert [g.vmid for g in observation.guests] == [301, 302]
    offline = _guest(observation.guests, 302)
    assert (offline.status, dict(offline.config), offline.tags) == ("unknown", {}, ("reconciler",))
    paths = {path for _, path in pve_server.requests}
    assert "/nodes/pve2/lxc/302/pending" not in paths
    assert "/nodes/pve2/hardware/pci" not in paths
    assert not any("pve3" in path for path in paths)


@pytest.mark.fakepve
def test_pci_devices_of_a_gpu_node_come_back_as_nvidia(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    pve = pve_server.pve
    pve.add_gpu("pve1", "01:00", iommu_group=12)
    pve.add_gpu("pve1", "0000:02:00", device="0x2d04", name="GB206 [GeForce RTX 5060 Ti]", iommu_group=13, audio=False)
    pve.add_node("pve2")

    devices = token_backend.observe().pci_devices

    assert [(d.node, d.address, d.vendor, d.device, d.iommu_group) for d in devices] == [
        ("pve1", "0000:01:00.0", "0x10de", "0x2c05", 12),
        ("pve1", "0000:01:00.1", "0x10de", "0x22e9", 12),
        ("pve1", "0000:02:00.0", "0x10de", "0x2d04", 13),
    ]
    assert devices[0].device_name == "GB203 [GeForce RTX 5070 Ti]"
    assert all(d.vendor == "0x10de" for d in devices)  # the Intel NIC each node has is left out


@pytest.mark.fakepve
def test_pending_changes_of_a_running_vm(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    """A running VM takes cores at its next restart: current and pending values both come from one read."""
    pve_server.pve.add_vm(200, "infer", status="running", config={"cores": 4, "memory": 4096, "agent": "1"})
    token_backend.update_config("qemu", "pve1", 200, config={"cores": "8", "onboot": "1"}, delete=["agent"])

    guest = token_backend.observe_guest("qemu", "pve1", 200)
    assert (guest.config["cores"], guest.config["agent"], guest.config["onboot"]) == ("4", "1", "1")
    assert guest.pending == {"cores": "8"}
    assert guest.pending_delete == {"agent"}
    assert props.compare_config("qemu", {"cores": "8"}, _effective(guest)) == []

    token_backend.reboot("qemu", "pve1", 200)
    guest = _guest(token_backend.observe().guests, 200)
    assert (guest.config["cores"], dict(guest.pending), guest.pending_delete) == ("8", {}, frozenset())
    assert "agent" not in guest.config


@pytest.mark.fakepve
def test_tags_are_normalised_when_read(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    """PVE normalises tags on write; fakepve keeps a VM's as sent on update. Either way they read the same."""
    pve_server.pve.add_vm(200, "infer", config={"cores": 4})
    token_backend.update_config("qemu", "pve1", 200, config={"tags": "Zeta;alpha reconciler"})
    assert pve_server.pve.vm(200).config["tags"] == "Zeta;alpha reconciler"
    assert token_backend.observe_guest("qemu", "pve1", 200).tags == ("alpha", "reconciler", "zeta")


@pytest.mark.fakepve
def test_the_digest_comes_from_the_pending_read(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    """Real PVE lists `digest` in .../pending; stock fakepve does not, and the observation then has none."""
    pve_server.pve.add_ct(955, "llm")
    assert token_backend.observe_guest("lxc", "pve1", 955).digest == pve_server.pve.ct(955).digest()
    pve_server.pve.pending_digest = False
    guest = _guest(token_backend.observe().guests, 955)
    assert guest.digest is None
    assert "digest" not in guest.config


# ---- update -------------------------------------------------------------------------------------


@pytest.mark.fakepve
@pytest.mark.parametrize("kind", ["lxc", "qemu"])
def test_a_stale_digest_is_refused(pve_server: PveServer, token_backend: ProxmoxBackend, kind: str) -> None:
    if kind == "lxc":
        pve_server.pve.add_ct(955, "llm", config={"cores": 2})
    else:
        pve_server.pve.add_vm(955, "llm", config={"cores": 2})
    guest = token_backend.observe_guest(kind, "pve1", 955)
    assert guest.digest
    token_backend.update_config(kind, "pve1", 955, config={"cores": "3"})  # a change by someone else

    with pytest.raises(ConfigChanged) as caught:
        token_backend.update_config(kind, "pve1", 955, config={"cores": "4"}, digest=guest.digest)
    assert caught.value.retryable
    assert isinstance(caught.value, TemporaryError)
    assert caught.value.resource == f"{kind}/955"
    assert str(pve_server.pve.guest(955).config["cores"]) == "3"

    fresh = token_backend.observe_guest(kind, "pve1", 955)
    token_backend.update_config(kind, "pve1", 955, config={"cores": "4"}, digest=fresh.digest)
    assert str(pve_server.pve.guest(955).config["cores"]) == "4"


@pytest.mark.fakepve
def test_an_update_rendered_by_update_value_keeps_the_mac_and_the_volume(
    pve_server: PveServer, root_backend: ProxmoxBackend
) -> None:
    root_backend.create_lxc("pve1", 955, config=props.lxc_config(_lxc(), gpu_devices=GPU_DEVICES))
    before = root_backend.observe_guest("lxc", "pve1", 955)
    volumes = set(pve_server.pve.storages["local-lvm"].get("volumes", {}))
    desired = props.lxc_config(
        _lxc().model_copy(update={"network": (_lxc().network[0].model_copy(update={"bridge": "vmbr1"}),),
                                  "volumes": (_lxc().volumes[0].model_copy(update={"path": "/srv"}),)}),
        gpu_devices=GPU_DEVICES,
    )  # fmt: skip
    desired = {k: v for k, v in desired.items() if k not in props.CREATE_ONLY["lxc"]}
    diffs = props.compare_config("lxc", desired, _effective(before))
    assert sorted(d.key for d in diffs) == ["mp1", "net0"]
    update = {d.key: props.update_value("lxc", d.key, desired[d.key], before.config.get(d.key)) for d in diffs}
    root_backend.update_config("lxc", "pve1", 955, config=update, digest=before.digest)

    after = root_backend.observe_guest("lxc", "pve1", 955)
    assert props.compare_config("lxc", desired, _effective(after)) == []
    net = props.parse_property(after.config["net0"], None)
    assert net["hwaddr"] == props.parse_property(before.config["net0"], None)["hwaddr"]
    assert props.parse_property(after.config["mp1"], "volume")["volume"] == "local-lvm:vm-955-disk-1"
    assert set(pve_server.pve.storages["local-lvm"].get("volumes", {})) == volumes


@pytest.mark.fakepve
@pytest.mark.parametrize(
    ("config", "delete"),
    [({}, ["cores,memory"]), ({"cores\nmemory": "2"}, []), ({"Cores": "2"}, []), ({"": "2"}, []), ({}, ["mp0 "])],
)
def test_a_key_that_is_no_option_name_is_refused_before_sending(
    pve_server: PveServer, token_backend: ProxmoxBackend, config: dict[str, str], delete: list[str]
) -> None:
    """Which keys an update sends is the planner's decision (create-only keys make a replace: test_planner,
    test_data_loss); the backend only refuses a key that would name more than one option (deletes travel
    comma-joined)."""
    pve_server.pve.add_ct(955, "llm", config={"cores": 2, "memory": 2048})
    pve_server.clear_requests()
    with pytest.raises(PermanentError, match="not a Proxmox config option") as caught:
        token_backend.update_config("lxc", "pve1", 955, config=config, delete=delete)
    assert caught.value.resource == "lxc/955"
    assert pve_server.requests == []
    assert (pve_server.pve.ct(955).config["cores"], pve_server.pve.ct(955).config["memory"]) == (2, 2048)  # type: ignore[union-attr]


@pytest.mark.fakepve
def test_an_invalid_value_is_a_permanent_error_with_pves_field_errors(
    pve_server: PveServer, token_backend: ProxmoxBackend
) -> None:
    pve_server.pve.add_ct(955, "llm")
    with pytest.raises(PermanentError) as caught:
        token_backend.update_config("lxc", "pve1", 955, config={"cores": "lots"})
    assert not caught.value.retryable
    assert "400" in str(caught.value)
    assert "cores:" in str(caught.value)
    assert caught.value.resource == "lxc/955"


@pytest.mark.fakepve
def test_nothing_to_change_sends_nothing(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    pve_server.pve.add_ct(955, "llm")
    pve_server.clear_requests()
    token_backend.update_config("lxc", "pve1", 955, config={})
    assert pve_server.requests == []


@pytest.mark.fakepve
def test_a_volume_grows_through_the_resize_call_once(pve_server: PveServer, root_backend: ProxmoxBackend) -> None:
    root_backend.create_lxc("pve1", 955, config=props.lxc_config(_lxc(), gpu_devices=GPU_DEVICES))
    volume = props.parse_property(pve_server.pve.ct(955).config["rootfs"], "volume")["volume"]  # type: ignore[union-attr]
    pve_server.clear_requests()

    root_backend.resize("lxc", "pve1", 955, disk="rootfs", size="80G")
    root_backend.resize("lxc", "pve1", 955, disk="rootfs", size="80G")  # done already: nothing is sent

    rootfs = props.parse_property(pve_server.pve.ct(955).config["rootfs"], "volume")  # type: ignore[union-attr]
    assert (rootfs["volume"], rootfs["size"]) == (volume, "80G")
    assert [w for w in pve_server.writes() if w[1].endswith("/resize")] == [("PUT", "/nodes/pve1/lxc/955/resize")]
    with pytest.raises(PermanentError, match="no volume mp7"):
        root_backend.resize("lxc", "pve1", 955, disk="mp7", size="10G")


# ---- locks, tasks, faults -----------------------------------------------------------------------


@pytest.mark.fakepve
@pytest.mark.parametrize("kind", ["lxc", "qemu"])
def test_a_locked_guest_gives_a_retryable_error(
    pve_server: PveServer, token_backend: ProxmoxBackend, kind: str
) -> None:
    if kind == "lxc":
        pve_server.pve.add_ct(955, "llm")
    else:
        pve_server.pve.add_vm(955, "llm", config={"cores": 2})
    pve_server.pve.snapshot_lock(955, "backup")
    pve_server.clear_requests()

    with pytest.raises(TemporaryError, match="locked") as caught:
        token_backend.start(kind, "pve1", 955)
    assert caught.value.retryable
    assert caught.value.resource == f"{kind}/955"
    assert pve_server.writes() == []  # refused before sending: PVE would fail inside the task

    with pytest.raises(TemporaryError) as caught:
        token_backend.update_config(kind, "pve1", 955, config={"cores": "4"})
    assert caught.value.retryable
    assert not isinstance(caught.value, ConfigChanged)
    assert "500" in str(caught.value)

    pve_server.pve.unlock(955)
    token_backend.start(kind, "pve1", 955)
    assert pve_server.pve.guest(955).status == "running"


@pytest.mark.fakepve
def test_a_held_config_lock_times_out_as_a_retryable_error(
    pve_server: PveServer, token_backend: ProxmoxBackend
) -> None:
    pve_server.pve.add_vm(200, "infer", config={"cores": 2})
    pve_server.run(pve_server.pve.hold_config_lock(200, None))
    with pytest.raises(TemporaryError, match="500") as caught:
        token_backend.update_config("qemu", "pve1", 200, config={"cores": "4"})
    assert caught.value.retryable
    pve_server.call(pve_server.pve.release_config_lock, 200)
    token_backend.update_config("qemu", "pve1", 200, config={"cores": "4"})
    assert pve_server.pve.vm(200).config["cores"] == "4"


@pytest.mark.fakepve
@pytest.mark.parametrize(("kind", "error"), [("lxc", "failed_open_writing"), ("qemu", "qemu_exited_code")])
def test_a_failed_task_names_the_guest(
    pve_server: PveServer, token_backend: ProxmoxBackend, kind: str, error: str
) -> None:
    if kind == "lxc":
        pve_server.pve.add_ct(955, "llm")
    else:
        pve_server.pve.add_vm(955, "llm")
    pve_server.pve.fail("POST", f"/nodes/pve1/{kind}/955/status/start", error=error)
    with pytest.raises(TaskFailed) as caught:
        token_backend.start(kind, "pve1", 955)
    assert caught.value.resource == f"{kind}/955"
    assert caught.value.upid is not None
    assert caught.value.upid.startswith("UPID:pve1:")
    expected = next(e["message"] for e in pve_server.pve.errors_for("POST", f"/nodes/pve1/{kind}/955/status/start")
                    if e["name"] == error)  # fmt: skip
    assert expected in str(caught.value)
    assert not caught.value.retryable
    assert pve_server.pve.guest(955).status == "stopped"


@pytest.mark.fakepve
def test_a_guest_that_cannot_start_fails_its_task(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    pve_server.pve.add_ct(955, "llm").start_error = "unable to open /dev/nvidia0: No such device"
    with pytest.raises(TaskFailed, match="/dev/nvidia0: No such device") as caught:
        token_backend.start("lxc", "pve1", 955)
    assert str(caught.value).startswith("lxc/955: ")


@pytest.mark.fakepve
def test_a_task_that_outlasts_its_timeout_is_a_temporary_error(pve_server: PveServer) -> None:
    pve = pve_server.pve
    pve.add_ct(955, "llm").start_secs = 60
    pve_server.call(setattr, pve, "time_scale", 0.05)  # the start task takes 3 s of real time
    with _backend(pve_server, task_timeout=0.3) as backend, pytest.raises(TemporaryError, match="still running"):
        backend.start("lxc", "pve1", 955)


@pytest.mark.fakepve
def test_power_operations_wait_and_are_idempotent(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    pve = pve_server.pve
    pve.add_vm(200, "infer")
    token_backend.start("qemu", "pve1", 200)
    assert pve.vm(200).status == "running"
    pve_server.clear_requests()
    token_backend.start("qemu", "pve1", 200)
    assert pve_server.writes() == []

    token_backend.shutdown("qemu", "pve1", 200, timeout=30)
    assert pve.vm(200).status == "stopped"
    pve_server.clear_requests()
    token_backend.shutdown("qemu", "pve1", 200)
    token_backend.stop("qemu", "pve1", 200)
    token_backend.reboot("qemu", "pve1", 200)
    assert pve_server.writes() == []


@pytest.mark.fakepve
def test_shutdown_of_a_guest_that_ignores_it(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    vm = pve_server.pve.add_vm(200, "desk", status="running")
    vm.acpi = False
    with pytest.raises(TaskFailed, match="got timeout"):
        token_backend.shutdown("qemu", "pve1", 200, timeout=5, force_stop_after=False)
    assert vm.status == "running"
    token_backend.shutdown("qemu", "pve1", 200, timeout=5, force_stop_after=True)
    assert vm.status == "stopped"


@pytest.mark.fakepve
def test_delete_stops_and_destroys_and_is_idempotent(pve_server: PveServer, root_backend: ProxmoxBackend) -> None:
    root_backend.create_lxc("pve1", 955, config=props.lxc_config(_lxc(), gpu_devices=GPU_DEVICES))
    root_backend.start("lxc", "pve1", 955)
    root_backend.delete("lxc", "pve1", 955)
    assert pve_server.pve.ct(955) is None
    pve_server.clear_requests()
    root_backend.delete("lxc", "pve1", 955)
    assert pve_server.writes() == []

    pve_server.pve.add_vm(200, "infer")
    with pytest.raises(PermanentError, match="qemu/200"):
        root_backend.delete("lxc", "pve1", 200)
    root_backend.delete("qemu", "pve1", 200)
    assert pve_server.pve.vm(200) is None


# ---- transport and credentials ------------------------------------------------------------------


@pytest.mark.fakepve
def test_reads_are_retried_on_server_errors(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    pve_server.pve.fail("GET", "/version", 500, "proxy loop detected", times=2)
    pve_server.clear_requests()
    assert token_backend.observe().version == "9.0.10"
    assert [path for _, path in pve_server.requests].count("/version") == 3


@pytest.mark.fakepve
def test_reads_give_up_with_a_temporary_error(pve_server: PveServer) -> None:
    pve_server.pve.fail("GET", "/version", 503, "service unavailable")
    with _backend(pve_server, read_attempts=2) as backend, pytest.raises(TemporaryError, match="503"):
        backend.observe()


@pytest.mark.fakepve
@pytest.mark.parametrize(
    ("status", "header", "delay"),
    [(429, "7", 7.0), (503, "3", 3.0), (429, None, None), (500, "5", None), (429, "-1", None), (429, "soon", None)],
)
def test_a_rate_limit_puts_its_retry_after_on_the_error(
    pve_server: PveServer, status: int, header: str | None, delay: float | None
) -> None:
    """A proxy's (or a busy pveproxy's) `Retry-After` travels as the error's `delay`, which every retry honours;
    it counts on a 429 or 503 only, and a value that is no number of seconds is ignored."""
    pve_server.pve.rate_limit("GET", "/version", retry_after=header, status=status)
    with _backend(pve_server, read_attempts=1) as backend:
        with pytest.raises(TemporaryError, match=str(status)) as caught:
            backend.observe()
        assert caught.value.retryable
        assert caught.value.delay == delay
        assert backend.observe().version == "9.0.10"  # the limit is over: nothing of it is kept


@pytest.mark.fakepve
def test_the_backends_own_retry_waits_as_long_as_retry_after_asks(
    pve_server: PveServer, token_backend: ProxmoxBackend, caplog: pytest.LogCaptureFixture
) -> None:
    pve_server.pve.rate_limit("PUT", "/nodes/pve1/qemu/200/config", retry_after="1", times=1)
    pve_server.pve.add_vm(200, "infer", config={"cores": 2})
    pve_server.clear_requests()
    with caplog.at_level(logging.INFO, logger="reconciler.backends.proxmox"):
        token_backend.update_config("qemu", "pve1", 200, config={"cores": "4"})
    assert pve_server.pve.vm(200).config["cores"] == "4"
    assert pve_server.writes().count(("PUT", "/nodes/pve1/qemu/200/config")) == 2
    retried = [r for r in caplog.records if r.getMessage() == "proxmox write retried"]
    assert [getattr(r, "delay", 0) >= 1.0 for r in retried] == [True]  # backoff=0.01 alone would wait ~0.01 s


@pytest.mark.fakepve
def test_an_offline_node_is_a_temporary_error(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    pve_server.pve.add_vm(200, "infer", status="running")
    pve_server.pve.set_node_offline("pve1")
    with pytest.raises(TemporaryError, match="595"):
        token_backend.stop("qemu", "pve1", 200)


@pytest.mark.fakepve
def test_missing_privileges_are_permission_denied(pve_server: PveServer) -> None:
    pve = pve_server.pve
    pve.add_vm(200, "infer", config={"cores": 2})
    pve.apitokens["ops@pve!audit"] = SECRET
    pve.grant("ops@pve!audit", "/", "VM.Audit", "Sys.Audit")
    env = {**pve_server.env("token"), ENV_TOKEN: f"ops@pve!audit={SECRET}"}
    with ProxmoxBackend(settings_from(None, env), backoff=0.01) as backend:
        assert [g.vmid for g in backend.observe().guests] == [200]
        with pytest.raises(PermissionDenied, match="403") as caught:
            backend.update_config("qemu", "pve1", 200, config={"cores": "4"})
    assert not caught.value.retryable
    assert caught.value.resource == "qemu/200"


@pytest.mark.fakepve
def test_a_wrong_secret_is_a_config_error_that_does_not_show_it(pve_server: PveServer) -> None:
    wrong = "11111111-2222-4333-8444-555555555555"
    env = {**pve_server.env("token"), ENV_TOKEN: f"root@pam!reconciler={wrong}"}
    with ProxmoxBackend(settings_from(None, env)) as backend, pytest.raises(ConfigError, match="401") as caught:
        backend.observe()
    assert wrong not in str(caught.value)
    assert wrong not in repr(caught.value)

    env = {**pve_server.env("password"), ENV_PASSWORD: "not-the-password"}
    with ProxmoxBackend(settings_from(None, env)) as backend, pytest.raises(ConfigError) as caught:
        backend.observe()
    assert "not-the-password" not in str(caught.value)


@pytest.mark.fakepve
def test_the_secret_stays_out_of_logs(pve_server: PveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pve_server.pve.add_ct(955, "llm")
    with _backend(pve_server, "password") as backend:
        backend.observe()
        backend.update_config("lxc", "pve1", 955, config={"cores": "2"})
    with _backend(pve_server, "token") as backend:
        backend.observe()
    assert caplog.records
    for secret in (pve_server.password, pve_server.token_secret):
        assert secret not in caplog.text


@pytest.mark.fakepve
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # the point of VERIFY_TLS=0
def test_an_untrusted_certificate_is_a_config_error(pve_server: PveServer) -> None:
    env = {k: v for k, v in pve_server.env("token").items() if k != ENV_CA}
    with ProxmoxBackend(settings_from(None, env)) as backend, pytest.raises(ConfigError, match="TLS") as caught:
        backend.observe()
    assert ENV_CA in str(caught.value)
    with ProxmoxBackend(settings_from(None, {**env, ENV_VERIFY_TLS: "0"})) as backend:
        assert backend.observe().version == "9.0.10"


@pytest.mark.fakepve
def test_an_unreachable_server_is_a_temporary_error(pve_server: PveServer) -> None:
    settings = settings_from(None, pve_server.env("token"))
    pve_server.stop()
    with ProxmoxBackend(settings, read_attempts=2, backoff=0.01) as backend, pytest.raises(TemporaryError) as caught:
        backend.observe()
    assert caught.value.retryable
    assert pve_server.token_secret not in str(caught.value)


@pytest.mark.fakepve
def test_reading_a_missing_guest_is_a_temporary_error(pve_server: PveServer, token_backend: ProxmoxBackend) -> None:
    """PVE answers a missing guest's config with 500 (no config file), not 404: the backend cannot tell it from a
    lock timeout without reading the message, so it is a TemporaryError; the inventory says what exists."""
    with pytest.raises(TemporaryError, match="500"):
        token_backend.observe_guest("lxc", "pve1", 999)

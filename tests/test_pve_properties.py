"""planning.pve: Proxmox property strings, normalisers, spec -> config, field-wise comparison and change timing."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.planning import pve
from reconciler.planning.observed import GuestKind
from reconciler.planning.plan import Timing
from reconciler.planning.pve import FieldDiff, PropertyChange
from reconciler.spec.models import Lxc, Vm

# ---- parse / format -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "default_key", "expected"),
    [
        (
            "virtio=BC:24:11:2E:4F:01,bridge=vmbr0,firewall=1",
            "model",
            {"model": "virtio", "macaddr": "BC:24:11:2E:4F:01", "bridge": "vmbr0", "firewall": "1"},
        ),
        ("local-lvm:vm-955-disk-0,size=64G", "volume", {"volume": "local-lvm:vm-955-disk-0", "size": "64G"}),
        ("/tank/models,mp=/models,ro=1", "volume", {"volume": "/tank/models", "mp": "/models", "ro": "1"}),
        ("0000:01:00,pcie=1,x-vga=1", "host", {"host": "0000:01:00", "pcie": "1", "x-vga": "1"}),
        ("mapping=gpu-a,pcie=1", "host", {"mapping": "gpu-a", "pcie": "1"}),
        ("/dev/nvidia0,gid=44", "path", {"path": "/dev/nvidia0", "gid": "44"}),
        ("name=eth0,bridge=vmbr0,ip=dhcp", None, {"name": "eth0", "bridge": "vmbr0", "ip": "dhcp"}),
        ("virtio,bridge=vmbr0", "model", {"model": "virtio", "bridge": "vmbr0"}),
        ("volume=local-lvm:vm-1-disk-0", "volume", {"volume": "local-lvm:vm-1-disk-0"}),
        ("", "volume", {}),
    ],
)
def test_parse_property(value: str, default_key: str | None, expected: dict[str, str]) -> None:
    assert pve.parse_property(value, default_key) == expected


def test_a_value_without_a_key_and_no_default_is_refused() -> None:
    with pytest.raises(ValueError, match="without a key"):
        pve.parse_property("eth0,bridge=vmbr0", None)
    with pytest.raises(ValueError, match="without a key"):
        pve.parse_property("local-lvm:1,extra", "volume")


def test_format_property_puts_the_default_first_and_keeps_the_order() -> None:
    assert pve.format_property({"mp": "/models", "volume": "/tank", "ro": "1"}, "volume") == "/tank,mp=/models,ro=1"
    assert pve.format_property({"model": "virtio", "macaddr": "BC:24:11:00:00:01", "bridge": "vmbr0"}, "model") == (
        "virtio=BC:24:11:00:00:01,bridge=vmbr0"
    )
    assert pve.format_property({"model": "virtio", "bridge": "vmbr0"}, "model") == "virtio,bridge=vmbr0"
    assert pve.format_property({"volume": "a=b"}, "volume") == "volume=a=b"
    assert pve.format_property({}, None) == ""


_KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=8)
_VALUES = st.text(alphabet=st.characters(blacklist_characters=",", blacklist_categories=("Cs",)), max_size=12)


@given(
    fields=st.dictionaries(_KEYS.filter(lambda k: k not in pve.NIC_MODELS), _VALUES, max_size=6),
    default_key=st.sampled_from([None, "volume", "file", "host", "path", "model"]),
    nic=st.none() | st.sampled_from(sorted(pve.NIC_MODELS)),
)
def test_parse_inverts_format(fields: dict[str, str], default_key: str | None, nic: str | None) -> None:
    if default_key == "model" and nic is not None:
        fields = {"model": nic, **fields}
    assert pve.parse_property(pve.format_property(fields, default_key), default_key) == fields


@given(st.lists(st.sampled_from(["name=eth0", "bridge=vmbr0", "ip=dhcp", "tag=110", "firewall=1"]), unique=True))
def test_format_of_parse_keeps_a_canonical_string(parts: list[str]) -> None:
    text = ",".join(parts)
    assert pve.format_property(pve.parse_property(text, None), None) == text


# ---- normalisers --------------------------------------------------------------------------


def test_normalise_tags() -> None:
    assert pve.normalise_tags("B;a ,c") == ("a", "b", "c")
    assert pve.normalise_tags("reconciler;LLM;llm") == ("llm", "reconciler")
    assert pve.normalise_tags(["Z", "y"]) == ("y", "z")
    assert pve.normalise_tags("") == ()


@pytest.mark.parametrize(("text", "value"), [("1", True), ("yes", True), ("On", True), ("true", True), ("0", False),
                                             ("no", False), ("off", False), ("FALSE", False)])  # fmt: skip
def test_parse_bool(text: str, value: bool) -> None:
    assert pve.parse_bool(text) is value


def test_parse_bool_refuses_other_text() -> None:
    with pytest.raises(ValueError, match="not a boolean"):
        pve.parse_bool("maybe")


@pytest.mark.parametrize(
    ("text", "size"),
    [("64G", 64 * 1024**3), ("512M", 512 * 1024**2), ("1T", 1024**4), ("100", 100), ("100K", 102400),
     ("1.5G", 3 * 512 * 1024**2), ("65536M", 64 * 1024**3), ("8g", 8 * 1024**3)],
)  # fmt: skip
def test_parse_pve_size(text: str, size: int) -> None:
    assert pve.parse_pve_size(text) == size


def test_parse_pve_size_refuses_other_units() -> None:
    with pytest.raises(ValueError, match="not a PVE size"):
        pve.parse_pve_size("64GiB")


@given(st.integers(min_value=0, max_value=2**50))
def test_pve_size_round_trip(size: int) -> None:
    assert pve.parse_pve_size(pve.format_pve_size(size)) == size


def test_format_pve_size_uses_the_largest_unit() -> None:
    assert pve.format_pve_size(64 * 1024**3) == "64G"
    assert pve.format_pve_size(1536 * 1024**2) == "1536M"
    assert pve.format_pve_size(1000) == "1000"


@pytest.mark.parametrize(
    ("address", "key"),
    [("01:00", "0000:01:00"), ("01:00.0", "0000:01:00.0"), ("0000:0A:00", "0000:0a:00"),
     ("0000:01:00.1", "0000:01:00.1")],
)  # fmt: skip
def test_pci_address_key(address: str, key: str) -> None:
    assert pve.pci_address_key(address) == key


def test_parse_hotplug() -> None:
    assert pve.parse_hotplug(None) == {"network", "disk", "usb"}
    assert pve.parse_hotplug("1") == {"network", "disk", "usb"}
    assert pve.parse_hotplug("0") == frozenset()
    assert pve.parse_hotplug("disk,memory,cpu") == {"disk", "memory", "cpu"}


# ---- spec -> config -----------------------------------------------------------------------


def _lxc(**overrides: object) -> Lxc:
    fields: dict[str, object] = {
        "name": "llm",
        "node": "pve1",
        "vmid": 955,
        "template": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
        "cores": 8,
        "memory": "32GiB",
        "swap": "512MiB",
        "rootfs": {"storage": "local-lvm", "size": "64GiB"},
        "mounts": [{"host": "/tank/models", "path": "/models", "readonly": True}],
        "volumes": [{"storage": "local-lvm", "size": "8GiB", "path": "/data", "backup": True}],
        "network": [{"name": "eth0", "bridge": "vmbr0", "ip": "dhcp", "vlan": 110, "firewall": True}],
        "features": {"nesting": True, "keyctl": True},
        "onboot": True,
        "startup": {"order": 1, "up": "30s"},
        "tags": ["reconciler", "LLM"],
    }
    fields.update(overrides)
    return Lxc.model_validate(fields)


def _vm(**overrides: object) -> Vm:
    fields: dict[str, object] = {
        "name": "infer",
        "node": "pve1",
        "vmid": 200,
        "cores": 48,
        "sockets": 2,
        "numa": True,
        "hugepages": "1024",
        "cpu": "host",
        "machine": "q35",
        "bios": "ovmf",
        "ostype": "l26",
        "memory": "128GiB",
        "balloon": "0MiB",
        "disks": [{"slot": "scsi0", "storage": "local-lvm", "size": "128GiB", "ssd": True, "discard": True,
                   "iothread": True}],
        "network": [{"bridge": "vmbr0", "vlan": 110, "firewall": True}],
        "agent": True,
        "onboot": True,
        "startup": {"order": 2},
        "tags": ["reconciler"],
    }  # fmt: skip
    fields.update(overrides)
    return Vm.model_validate(fields)


GPU_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


def test_lxc_config() -> None:
    assert pve.lxc_config(_lxc(), gpu_devices=GPU_DEVICES) == {
        "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
        "hostname": "llm",
        "unprivileged": "1",
        "cores": "8",
        "memory": "32768",
        "swap": "512",
        "rootfs": "local-lvm:64",
        "mp0": "/tank/models,mp=/models,ro=1",
        "mp1": "local-lvm:8,mp=/data,backup=1",
        "net0": "name=eth0,bridge=vmbr0,ip=dhcp,tag=110,firewall=1",
        "features": "nesting=1,keyctl=1",
        "dev0": "/dev/nvidia0",
        "dev1": "/dev/nvidiactl",
        "dev2": "/dev/nvidia-uvm",
        "dev3": "/dev/nvidia-uvm-tools",
        "onboot": "1",
        "startup": "order=1,up=30",
        "tags": "llm;reconciler",
    }


def test_lxc_config_declares_only_what_the_spec_sets() -> None:
    config = pve.lxc_config(
        Lxc.model_validate({"name": "test", "node": "pve1", "vmid": 300, "template": "local:vztmpl/x.tar.zst",
                            "rootfs": {"size": "8GiB"}, "hostname": "box", "cpulimit": 1.5}),
        gpu_devices=(),
    )  # fmt: skip
    assert config == {
        "ostemplate": "local:vztmpl/x.tar.zst",
        "hostname": "box",
        "unprivileged": "1",
        "cores": "1",
        "memory": "512",
        "cpulimit": "1.5",
        "rootfs": "local-lvm:8",
    }


def test_vm_config() -> None:
    config = pve.vm_config(_vm(), hostpci=["0000:01:00,pcie=1,x-vga=1", "mapping=gpu-b,pcie=1"])
    assert config == {
        "name": "infer",
        "cores": "48",
        "sockets": "2",
        "numa": "1",
        "hugepages": "1024",
        "cpu": "host",
        "machine": "q35",
        "bios": "ovmf",
        "ostype": "l26",
        "memory": "131072",
        "balloon": "0",
        "scsi0": "local-lvm:128,ssd=1,discard=on,iothread=1",
        "net0": "virtio,bridge=vmbr0,tag=110,firewall=1",
        "hostpci0": "0000:01:00,pcie=1,x-vga=1",
        "hostpci1": "mapping=gpu-b,pcie=1",
        "agent": "1",
        "onboot": "1",
        "startup": "order=2",
        "tags": "reconciler",
    }


def test_vm_net_with_a_mac_renders_model_equals_mac() -> None:
    vm = _vm(network=[{"model": "e1000", "bridge": "vmbr1", "hwaddr": "bc:24:11:00:00:01"}])
    assert pve.vm_config(vm, hostpci=())["net0"] == "e1000=BC:24:11:00:00:01,bridge=vmbr1"


# ---- compare ------------------------------------------------------------------------------


def test_a_config_as_pve_stores_it_compares_equal() -> None:
    desired = {k: v for k, v in pve.lxc_config(_lxc(), gpu_devices=GPU_DEVICES).items() if k != "ostemplate"}
    live = {
        "arch": "amd64",
        "cores": "8",
        "dev0": "/dev/nvidia0",
        "dev1": "/dev/nvidiactl",
        "dev2": "/dev/nvidia-uvm",
        "dev3": "/dev/nvidia-uvm-tools",
        "features": "keyctl=1,nesting=1",
        "hostname": "llm",
        "memory": "32768",
        "mp0": "/tank/models,mp=/models,ro=1",
        "mp1": "local-lvm:vm-955-disk-1,backup=1,mp=/data,size=8G",
        "net0": "name=eth0,bridge=vmbr0,firewall=1,hwaddr=BC:24:11:2E:4F:01,ip=dhcp,tag=110,type=veth",
        "onboot": "1",
        "ostype": "debian",
        "rootfs": "local-lvm:vm-955-disk-0,size=65536M",
        "startup": "order=1,up=30",
        "swap": "512",
        "tags": "llm;reconciler",
        "unprivileged": "1",
    }
    assert pve.compare_config("lxc", desired, live) == []


def test_a_vm_as_pve_stores_it_compares_equal() -> None:
    desired = pve.vm_config(_vm(), hostpci=["01:00,pcie=1", "mapping=gpu-b,pcie=1"])
    live = {
        **desired,
        "scsi0": "local-lvm:vm-200-disk-0,discard=on,iothread=1,size=128G,ssd=1",
        "net0": "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1,tag=110",
        "hostpci0": "0000:01:00,pcie=1",
        "memory": "current=131072",
        "agent": "enabled=1,fstrim_cloned_disks=1",
        "tags": "Reconciler",
        "numa": "yes",
        "smbios1": "uuid=6f3c0d1e-0000-4000-8000-000000000000",
        "vmgenid": "6f3c0d1e-0000-4000-8000-000000000001",
    }
    assert pve.compare_config("qemu", desired, live) == []


@given(cores=st.integers(1, 64), memory=st.integers(1, 512), tags=st.lists(st.sampled_from(["a", "B", "llm"])))
def test_a_rendered_config_equals_itself(cores: int, memory: int, tags: list[str]) -> None:
    lxc = _lxc(cores=cores, memory=f"{memory}GiB", tags=tags)
    assert (
        pve.compare_config(
            "lxc", pve.lxc_config(lxc, gpu_devices=GPU_DEVICES), pve.lxc_config(lxc, gpu_devices=GPU_DEVICES)
        )
        == []
    )
    vm = _vm(cores=cores, memory=f"{memory}GiB", tags=tags)
    assert pve.compare_config("qemu", pve.vm_config(vm, hostpci=["01:00"]), pve.vm_config(vm, hostpci=["01:00"])) == []


@pytest.mark.parametrize(
    ("kind", "key", "desired", "live"),
    [
        (
            "lxc",
            "net0",
            "name=eth0,bridge=vmbr0,ip=dhcp",
            "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth",
        ),
        ("lxc", "net0", "name=eth0,hwaddr=bc:24:11:00:00:01", "hwaddr=BC:24:11:00:00:01,name=eth0"),
        ("lxc", "net0", "name=eth0,firewall=0", "name=eth0"),
        ("lxc", "rootfs", "local-lvm:64", "local-lvm:vm-955-disk-0,size=64G"),
        ("lxc", "rootfs", "local-lvm:vm-955-disk-0,size=64G", "local-lvm:vm-955-disk-0,size=65536M"),
        ("lxc", "mp0", "/tank/models/,mp=/models,ro=yes", "/tank/models,mp=/models/,ro=1"),
        ("lxc", "tags", "B;a", "a;b"),
        ("lxc", "tags", "a b,c", "c;b;a"),
        ("lxc", "onboot", "1", "yes"),
        ("lxc", "onboot", "0", None),
        ("lxc", "unprivileged", "0", None),
        ("lxc", "memory", "4096", "04096"),
        ("lxc", "cpulimit", "2", "2.0"),
        ("lxc", "ostemplate", "local:vztmpl/x.tar.zst", None),
        ("lxc", "features", "nesting=1", "keyctl=1,nesting=1"),
        ("lxc", "startup", "order=1,up=30", "up=30,order=1"),
        ("qemu", "memory", "4096", "current=4096"),
        ("qemu", "net0", "virtio,bridge=vmbr0", "virtio=BC:24:11:00:00:01,bridge=vmbr0"),
        ("qemu", "hostpci0", "01:00,pcie=1", "0000:01:00,pcie=1,x-vga=1"),
        ("qemu", "hostpci0", "mapping=gpu-a,pcie=1", "mapping=gpu-a,pcie=1"),
        ("qemu", "scsi0", "local-lvm:32,discard=ignore", "local-lvm:vm-200-disk-0,size=32G"),
        ("qemu", "agent", "1", "enabled=1,fstrim_cloned_disks=1"),
        ("qemu", "agent", "0", None),
        ("qemu", "sockets", "1", None),
        ("qemu", "numa", "0", None),
    ],
)
def test_equal_by_fields(kind: GuestKind, key: str, desired: str, live: str | None) -> None:
    assert pve.compare_config(kind, {key: desired}, {} if live is None else {key: live}) == []


def test_keys_the_desired_config_does_not_declare_are_not_compared() -> None:
    assert pve.compare_config("qemu", {"cores": "4"}, {"cores": "4", "memory": "9999", "balloon": "0"}) == []


def test_a_declared_sub_field_that_differs_is_reported_by_field() -> None:
    diffs = pve.compare_config(
        "lxc",
        {"net0": "name=eth0,bridge=vmbr1,ip=dhcp", "memory": "2048"},
        {"net0": "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth", "memory": "1024"},
    )
    assert diffs == [
        FieldDiff("memory", "1024", "2048"),
        FieldDiff(
            "net0",
            "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth",
            "name=eth0,bridge=vmbr1,ip=dhcp",
            (PropertyChange("bridge", "vmbr0", "vmbr1"),),
        ),
    ]
    name, before, after = diffs[1].fields[0]  # the planner unpacks field changes
    assert (name, before, after) == ("bridge", "vmbr0", "vmbr1")


def test_a_missing_key_differs_with_no_before() -> None:
    [diff] = pve.compare_config("lxc", {"mp0": "/tank/models,mp=/models,ro=1"}, {})
    assert diff.before is None
    assert diff.fields == (PropertyChange("volume", None, "/tank/models"), PropertyChange("mp", None, "/models"),
                           PropertyChange("ro", None, "1"))  # fmt: skip
    assert not diff.replace


def test_a_volume_on_another_storage_is_moved_not_replaced() -> None:
    [diff] = pve.compare_config("lxc", {"rootfs": "tank:64"}, {"rootfs": "local-lvm:vm-955-disk-0,size=64G"})
    assert diff.move and not diff.replace and not diff.resize
    assert diff.fields == (PropertyChange("volume", "local-lvm:vm-955-disk-0", "tank:64"),)
    [diff] = pve.compare_config("qemu", {"scsi0": "tank:32"}, {"scsi0": "local-lvm:vm-200-disk-0,size=32G"})
    assert diff.move and not diff.replace
    # Moved and grown in one plan: the size is compared across storages too.
    [diff] = pve.compare_config("lxc", {"rootfs": "tank:80"}, {"rootfs": "local-lvm:vm-955-disk-0,size=64G"})
    assert diff.move and diff.resize
    assert PropertyChange("size", "64G", "80G") in diff.fields


def test_a_named_volume_on_another_storage_needs_replacement() -> None:
    live = {"mp0": "local-lvm:vm-955-disk-1,mp=/data,size=8G"}
    [diff] = pve.compare_config("lxc", {"mp0": "tank:vm-955-disk-1,mp=/data"}, live)
    assert diff.replace and not diff.move


def test_the_volumes_a_guest_loses_are_its_storage_volumes_only() -> None:
    config = {
        "rootfs": "local-lvm:vm-955-disk-0,size=64G",
        "mp0": "/tank/models,mp=/models,ro=1",
        "mp1": "tank:subvol-955-disk-1,mp=/data,size=8G",
        "memory": "2048",
    }
    assert pve.guest_volumes("lxc", config) == [
        ("rootfs", "local-lvm:vm-955-disk-0", "64G"),
        ("mp1", "tank:subvol-955-disk-1", "8G"),
    ]
    vm = {"scsi0": "local-lvm:vm-200-disk-0,size=32G", "ide2": "local:iso/debian.iso,media=cdrom", "net0": "virtio"}
    assert pve.guest_volumes("qemu", vm) == [("scsi0", "local-lvm:vm-200-disk-0", "32G")]


def test_a_volume_of_another_size_is_a_resize() -> None:
    [diff] = pve.compare_config("lxc", {"rootfs": "local-lvm:64"}, {"rootfs": "local-lvm:vm-955-disk-0,size=32G"})
    assert diff.resize
    assert not diff.replace
    assert diff.fields == (PropertyChange("size", "32G", "64G"),)


def test_create_only_keys_need_replacement() -> None:
    [diff] = pve.compare_config("lxc", {"unprivileged": "1"}, {})
    assert diff.replace
    assert (diff.before, diff.after) == (None, "1")
    [diff] = pve.compare_config(
        "lxc", {"ostemplate": "local:vztmpl/b.tar.zst"}, {"ostemplate": "local:vztmpl/a.tar.zst"}
    )
    assert diff.replace


def test_booleans_and_numbers_compare_as_values() -> None:
    [diff] = pve.compare_config("qemu", {"numa": "1", "cores": "4"}, {"numa": "0", "cores": "4"})
    assert (diff.key, diff.before, diff.after) == ("numa", "0", "1")
    [diff] = pve.compare_config("lxc", {"cpulimit": "1.5"}, {"cpulimit": "2"})
    assert (diff.key, diff.before, diff.after) == ("cpulimit", "2", "1.5")


def test_a_value_that_does_not_parse_is_compared_as_a_string() -> None:
    assert pve.compare_config("lxc", {"net0": "eth0"}, {"net0": "eth0"}) == []
    [diff] = pve.compare_config("lxc", {"net0": "name=eth0"}, {"net0": "garbage"})
    assert (diff.before, diff.after, diff.fields) == ("garbage", "name=eth0", ())


def test_diffs_come_in_key_order() -> None:
    desired = {"net10": "name=a", "net2": "name=b", "cores": "2"}
    assert [d.key for d in pve.compare_config("lxc", desired, {})] == ["cores", "net2", "net10"]


def test_compare_config_is_fast_for_two_thousand_guests() -> None:
    desired = {k: v for k, v in pve.lxc_config(_lxc(), gpu_devices=GPU_DEVICES).items() if k != "ostemplate"}
    lives = []
    for n in range(2000):
        mac = f"BC:24:11:{n >> 16 & 255:02X}:{n >> 8 & 255:02X}:{n & 255:02X}"
        lives.append({
            **desired,
            "rootfs": f"local-lvm:vm-{1000 + n}-disk-0,size=64G",
            "mp1": f"local-lvm:vm-{1000 + n}-disk-1,backup=1,mp=/data,size=8G",
            "net0": f"name=eth0,bridge=vmbr0,firewall=1,hwaddr={mac},ip=dhcp,tag=110,type=veth",
            "features": "keyctl=1,nesting=1",
        })  # fmt: skip
    started = time.perf_counter()
    assert all(pve.compare_config("lxc", desired, live) == [] for live in lives)
    assert time.perf_counter() - started < 1.0


# ---- update values ------------------------------------------------------------------------


def test_an_update_keeps_what_pve_added() -> None:
    live = "name=eth0,bridge=vmbr0,firewall=1,hwaddr=BC:24:11:2E:4F:01,ip=dhcp,type=veth"
    assert pve.update_value("lxc", "net0", "name=eth0,bridge=vmbr1,ip=dhcp", live) == (
        "name=eth0,bridge=vmbr1,firewall=1,hwaddr=BC:24:11:2E:4F:01,ip=dhcp,type=veth"
    )
    assert pve.update_value("qemu", "net0", "e1000,bridge=vmbr0", "virtio=BC:24:11:00:00:01,bridge=vmbr0") == (
        "e1000=BC:24:11:00:00:01,bridge=vmbr0"
    )


def test_an_update_of_a_volume_keeps_the_volume() -> None:
    live = "local-lvm:vm-955-disk-1,mp=/data,size=8G"
    assert pve.update_value("lxc", "mp1", "local-lvm:8,mp=/srv", live) == "local-lvm:vm-955-disk-1,mp=/srv,size=8G"
    assert pve.update_value("qemu", "scsi0", "local-lvm:32,ssd=1", "local-lvm:vm-200-disk-0,size=32G") == (
        "local-lvm:vm-200-disk-0,size=32G,ssd=1"
    )
    assert pve.update_value("lxc", "mp1", "tank:8,mp=/data", live) == "tank:8,mp=/data"  # a replacement


def test_an_update_of_a_plain_or_new_value_is_the_desired_value() -> None:
    assert pve.update_value("lxc", "memory", "2048", "1024") == "2048"
    assert pve.update_value("lxc", "mp2", "/tank/x,mp=/x,ro=1", None) == "/tank/x,mp=/x,ro=1"
    assert pve.update_value("lxc", "net0", "name=eth0", "garbage") == "name=eth0"


@given(bridge=st.sampled_from(["vmbr0", "vmbr1"]), tag=st.integers(1, 4094), firewall=st.booleans())
def test_an_update_value_compares_equal_to_the_desired_one(bridge: str, tag: int, firewall: bool) -> None:
    desired = f"name=eth0,bridge={bridge},tag={tag},firewall={int(firewall)}"
    live = "name=eth0,bridge=vmbr9,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth"
    sent = pve.update_value("lxc", "net0", desired, live)
    assert pve.compare_config("lxc", {"net0": desired}, {"net0": sent}) == []


# ---- timing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "key", "options", "timing"),
    [
        ("qemu", "hostpci0", {}, Timing.RESTART),
        ("qemu", "cores", {}, Timing.RESTART),
        ("qemu", "sockets", {}, Timing.RESTART),
        ("qemu", "cpu", {}, Timing.RESTART),
        ("qemu", "machine", {}, Timing.RESTART),
        ("qemu", "bios", {}, Timing.RESTART),
        ("qemu", "numa", {}, Timing.RESTART),
        ("qemu", "hugepages", {}, Timing.RESTART),
        ("qemu", "args", {}, Timing.RESTART),
        ("qemu", "agent", {}, Timing.RESTART),
        ("qemu", "memory", {}, Timing.RESTART),
        ("qemu", "memory", {"hotplug": "network,disk,memory"}, Timing.LIVE),
        ("qemu", "balloon", {}, Timing.LIVE),
        ("qemu", "net0", {}, Timing.LIVE),
        ("qemu", "net0", {"hotplug": "disk"}, Timing.RESTART),
        ("qemu", "scsi1", {"new": True}, Timing.LIVE),
        ("qemu", "scsi1", {"delete": True}, Timing.LIVE),
        ("qemu", "scsi0", {}, Timing.RESTART),
        ("qemu", "sata1", {"new": True}, Timing.RESTART),
        ("qemu", "scsi1", {"new": True, "hotplug": "0"}, Timing.RESTART),
        ("qemu", "tags", {}, Timing.LIVE),
        ("qemu", "onboot", {}, Timing.LIVE),
        ("qemu", "name", {}, Timing.LIVE),
        ("lxc", "memory", {}, Timing.LIVE),
        ("lxc", "swap", {}, Timing.LIVE),
        ("lxc", "cores", {}, Timing.LIVE),
        ("lxc", "cpulimit", {}, Timing.LIVE),
        ("lxc", "net0", {}, Timing.LIVE),
        ("lxc", "mp2", {"new": True}, Timing.LIVE),
        ("lxc", "dev0", {"new": True}, Timing.LIVE),
        ("lxc", "mp0", {}, Timing.RESTART),
        ("lxc", "dev0", {}, Timing.RESTART),
        ("lxc", "mp0", {"delete": True}, Timing.RESTART),
        ("lxc", "rootfs", {}, Timing.RESTART),
        ("lxc", "features", {}, Timing.RESTART),
        ("lxc", "tags", {}, Timing.LIVE),
        ("lxc", "ostemplate", {}, Timing.REPLACE),
        ("lxc", "unprivileged", {}, Timing.REPLACE),
        ("lxc", "arch", {}, Timing.REPLACE),
    ],
)
def test_classify_on_a_running_guest(kind: GuestKind, key: str, options: dict[str, object], timing: Timing) -> None:
    assert pve.classify(kind, key, True, **options) is timing  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "key"), [("qemu", "hostpci0"), ("qemu", "memory"), ("lxc", "rootfs"), ("lxc", "mp0")])
def test_on_a_stopped_guest_everything_is_live(kind: GuestKind, key: str) -> None:
    assert pve.classify(kind, key, running=False) is Timing.LIVE


def test_replace_keys_need_replacement_even_when_stopped() -> None:
    assert pve.classify("lxc", "unprivileged", running=False) is Timing.REPLACE
    assert Timing.RESTART.value == "restart"


# ---- what PVE makes of a value: no perpetual diffs -------------------------------------------


@pytest.mark.parametrize(
    ("desired", "live", "differs"),
    [
        ("q35", "pc-q35-9.2+pve1", False),  # PVE pins a Windows VM's machine version on create
        ("q35", "pc-q35-8.1", False),
        ("pc", "pc-i440fx-9.0+pve1", False),
        ("q35", "pc-i440fx-9.0", True),  # another family
        ("pc-q35-9.2", "pc-q35-8.1", True),  # a versioned spec is compared as it is
        ("q35", "pc-q35-9.2+pve1.pxe", True),
    ],
)
def test_an_unversioned_machine_type_is_met_by_any_version_of_it(desired: str, live: str, differs: bool) -> None:
    assert bool(pve.compare_config("qemu", {"machine": desired}, {"machine": live})) is differs


def test_a_mapping_replaces_a_raw_host_address_and_the_update_drops_it() -> None:
    desired, live = "mapping=gpu-a,pcie=1", "0000:01:00,pcie=1,x-vga=1"
    (diff,) = pve.compare_config("qemu", {"hostpci0": desired}, {"hostpci0": live})
    assert ("host", "0000:01:00", None) in diff.fields
    sent = pve.parse_property(pve.update_value("qemu", "hostpci0", desired, live), "host")
    assert sent == {"mapping": "gpu-a", "pcie": "1", "x-vga": "1"}, "PVE refuses both host and mapping"


def test_with_size_of_keeps_a_grown_size_and_the_rest_of_the_old_value() -> None:
    old, now = "local-lvm:vm-955-disk-0,size=64G,backup=0", "local-lvm:vm-955-disk-0,size=80G"
    assert pve.with_size_of("lxc", "rootfs", old, now) == "local-lvm:vm-955-disk-0,size=80G,backup=0"
    assert pve.with_size_of("lxc", "hostname", "llm", "other") == "llm", "not a volume: unchanged"

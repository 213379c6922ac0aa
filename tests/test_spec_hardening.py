"""Issue 7, spec input: each failure found by hostile testing, reproduced, and refused at spec load.

- Injection: every value that reaches a PVE property string (or Docker) is held to PVE's grammar for its
  field; a hostile value is an error with file and line, and nothing reaches fakepve or the Docker engine.
  A property test shows that for any accepted value, the property string pve.py renders parses back to
  the same fields.
- Bounded inputs: symlinks out of the tree, huge files, sizes and durations, a port published twice, a
  tree without a Lab, a file name with a newline.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.planning import pve
from reconciler.planning.pve_access import vm_access_config
from reconciler.spec.diagnostics import MAX_DIAGNOSTICS_PER_FILE, Diagnostic, Severity
from reconciler.spec.grammar import BRIDGE_PATTERN, CPU_TYPE_PATTERN, DNS_NAME_PATTERN, STORAGE_ID_PATTERN
from reconciler.spec.loader import MAX_DOCUMENTS, MAX_KEYS, LoadResult, SpecFile, load_files
from reconciler.spec.models import Lxc, Vm
from reconciler.spec.validate import load_and_validate
from tests.support.dockerd import DockerEngine, EngineImage
from tests.support.fakepve import PveServer

LAB = """kind: Lab
name: lab
nodes: [pve1]
nvml: {enabled: false}
proxmox: {url: "https://pve1.lan:8006", auth: password, user: root@pam}
"""
LXC: dict[str, Any] = {
    "kind": "Lxc",
    "name": "ct",
    "node": "pve1",
    "vmid": 955,
    "template": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
    "rootfs": {"storage": "local-lvm", "size": "8GiB"},
    "state": "stopped",
}
VM: dict[str, Any] = {"kind": "Vm", "name": "vm", "node": "pve1", "vmid": 960, "memory": "4GiB", "state": "stopped"}
HOST = "kind: DockerHost\nname: ws\nendpoint: unix:///var/run/docker.sock\n"
CONTAINER: dict[str, Any] = {"kind": "Container", "name": "app", "host": "ws", "image": "busybox:1"}
MODEL: dict[str, Any] = {
    "kind": "Model",
    "name": "m",
    "host": "ws",
    "engine": "vllm",
    "source": "/models/qwen",
    "port": 8000,
}
runner = CliRunner()


def _tree(folder: Path, *documents: dict[str, Any], lab: str = LAB) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = lab + "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in documents)
    (folder / "lab.yaml").write_text(text, encoding="utf-8")
    return folder


def _span(folder: Path, path: str) -> tuple[int, int]:
    """First and last line of the value at a dotted path in the last document of lab.yaml, as PyYAML sees it."""
    node: Any = list(yaml.compose_all((folder / "lab.yaml").read_text(encoding="utf-8")))[-1]
    for part in path.split("."):
        if isinstance(node, yaml.SequenceNode):
            node = node.value[int(part)]
        else:
            node = next(value for key, value in node.value if key.value == part)
    return node.start_mark.line + 1, node.end_mark.line + 1


def _line_of(folder: Path, needle: str) -> int:
    lines = (folder / "lab.yaml").read_text(encoding="utf-8").splitlines()
    return next(number for number, line in enumerate(lines, 1) if needle in line)


def _errors(result: LoadResult) -> list[Diagnostic]:
    return [d for d in result.diagnostics if d.severity is Severity.ERROR]


def _with(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """`document` with the value at a dotted path (`network.0.bridge`) set, creating what is missing."""
    result = json.loads(json.dumps(document))
    parts = path.split(".")
    here: Any = result
    for part, following in itertools.pairwise(parts):
        key: Any = int(part) if part.isdigit() else part
        if isinstance(here, list):
            while len(here) <= key:
                here.append({})
            here = here[key]
        else:
            here = here.setdefault(key, [] if following.isdigit() else {})
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if isinstance(here, list):
        here.append(value)
    else:
        here[last] = value
    copied: dict[str, Any] = json.loads(json.dumps(result))
    return copied


# ---- injection: every payload of the issue is an error with file and line ------------------------------

MOUNT = {"host": "/tank/models", "path": "/models"}
NIC = {"name": "eth0", "bridge": "vmbr0"}

INJECTIONS: list[tuple[dict[str, Any], str, Any, str]] = [
    (_with(LXC, "mounts", [MOUNT]), "mounts.0.host", "/tank/models,shared=1", "shared=1"),
    (_with(LXC, "mounts", [MOUNT]), "mounts.0.host", "/tank/models\nlxc.mount.entry: /", "lxc.mount.entry"),
    (_with(LXC, "mounts", [MOUNT]), "mounts.0.host", "/tank/../etc", "/tank/../etc"),
    (_with(LXC, "mounts", [MOUNT]), "mounts.0.path", "/models,ro=0", "ro=0"),
    (_with(LXC, "mounts", [MOUNT]), "mounts.0.path", "/../../root", "/../../root"),
    (_with(LXC, "network", [NIC]), "network.0.bridge", "vmbr0,rate=1,firewall=1", "rate=1"),
    (_with(LXC, "network", [NIC]), "network.0.ip", "10.0.0.5/24,gw=10.0.0.66", "gw=10.0.0.66"),
    (_with(LXC, "network", [NIC]), "network.0.gateway", "10.0.0.1,ip6=auto", "ip6=auto"),
    (_with(LXC, "network", [NIC]), "network.0.ip6", "auto,gw6=fe80::1", "gw6=fe80::1"),
    (_with(LXC, "network", [NIC]), "network.0.hwaddr", "BC:24:11:00:00:01,link_down=1", "link_down"),
    (_with(LXC, "network", [NIC]), "network.0.hwaddr", "01:00:5E:00:00:01", "01:00:5E"),  # multicast
    (LXC, "features", {"mount": ["nfs,fuse=1"]}, "fuse=1"),
    (LXC, "nameserver", "1.1.1.1\nsearchdomain: evil", "searchdomain"),
    (LXC, "hostname", "ct\nlxc.apparmor.profile: unconfined", "apparmor"),
    (LXC, "hostname", "../../etc", "../../etc"),
    (LXC, "hostname", "a..b", "a..b"),
    (LXC, "template", "local:vztmpl/../../../../etc/shadow", "etc/shadow"),
    (LXC, "template", "local:vztmpl/debian.tar.zst,size=1", "size=1"),
    (LXC, "rootfs", {"storage": "local-lvm:1,import-from=/dev/sda,x", "size": "8GiB"}, "import-from"),
    (
        _with(LXC, "volumes", [{"storage": "local-lvm", "size": "8GiB", "path": "/srv"}]),
        "volumes.0.storage",
        "local-lvm,shared=1",
        "shared=1",
    ),
    (VM, "cpu", "host\nargs: -device evil", "args"),
    (VM, "cpu", "host,flags=+pcid", "flags"),
    (VM, "ostype", "l26\nhookscript: local:snippets/x", "ostype: Input should be 'other'"),
    (
        _with(VM, "disks", [{"slot": "scsi0", "storage": "local-lvm", "size": "8GiB"}]),
        "disks.0.storage",
        "local-lvm:1,import-from=/dev/sda,x",
        "import-from",
    ),
    (_with(VM, "network", [{"name": "net0"}]), "network.0.bridge", "vmbr0,tag=5", "tag=5"),
]


@pytest.mark.parametrize(
    ("document", "field", "value", "shown"),
    INJECTIONS,
    ids=[f"{d['kind']}-{f}-{i}" for i, (d, f, _, _) in enumerate(INJECTIONS)],
)
def test_a_value_that_would_inject_into_a_property_string_is_an_error_on_its_line(
    tmp_path: Path, document: dict[str, Any], field: str, value: Any, shown: str
) -> None:
    folder = _tree(tmp_path, _with(document, field, value))
    result = load_and_validate(folder)
    (error,) = _errors(result)
    assert error.position is not None and error.position.file == str(folder / "lab.yaml")
    first, last = _span(folder, field)
    assert first <= error.position.line <= last, error
    assert error.message.startswith(field.split(".", 1)[0]), error
    assert shown.splitlines()[0] in str(error) and "\n" not in str(error), "the value is shown, on one line"


DOCKER_INJECTIONS: list[tuple[dict[str, Any], str, Any]] = [
    (CONTAINER, "env", {"LD_PRELOAD=/tmp/evil.so X": "1"}),
    (CONTAINER, "env", {"PATH\nX": "1"}),
    (CONTAINER, "secret_env", {"TOKEN": "RECONCILER_PROXMOX_PASSWORD"}),
    (CONTAINER, "secret_env", {"TOKEN": "RECONCILER_PROXMOX_TOKEN"}),
    (CONTAINER, "secret_env", {"TOKEN": "RECONCILER_WEBHOOK_SECRET"}),
    (CONTAINER, "secret_env", {"TOKEN": "DOCKER_HOST"}),
    (CONTAINER, "secret_env", {"BAD KEY": "LAB_TOKEN"}),
    (CONTAINER, "volumes", [{"host": "/srv/../../etc", "path": "/data"}]),
    (CONTAINER, "volumes", [{"host": "/srv/data", "path": "/data/../../host"}]),
    (CONTAINER, "devices", ["/dev/../etc/shadow:/dev/x"]),
    (CONTAINER, "ports", ["999.1.1.1:8000:8000"]),
    (MODEL, "source", "/models/../../../etc"),
    (MODEL, "source", "../../etc"),
    (MODEL, "models_dir", "/srv/../etc"),
    (MODEL, "bind", "0.0.0.0 --privileged"),
    (MODEL, "image", "vllm/vllm-openai:v0.11.0\nEVIL"),
    (CONTAINER, "image", "Busybox:1 --privileged"),
    (CONTAINER, "network_mode", "host --privileged"),
    (CONTAINER, "probe", {"http": "file:///etc/shadow", "body": "root:[$]"}),
    (CONTAINER, "probe", {"http": "//evil.lan/x"}),
    (CONTAINER, "probe", {"tcp": "db.lan:5432\nx"}),
    (CONTAINER, "healthcheck", {"test": ["CMD", "true"], "interval": "0.5ms"}),
]


@pytest.mark.parametrize(
    ("document", "field", "value"),
    DOCKER_INJECTIONS,
    ids=[f"{d['kind']}-{f}-{i}" for i, (d, f, _) in enumerate(DOCKER_INJECTIONS)],
)
def test_a_value_that_would_reach_docker_unchecked_is_an_error_on_its_line(
    tmp_path: Path, document: dict[str, Any], field: str, value: Any
) -> None:
    folder = _tree(tmp_path, yaml.safe_load(HOST), {**document, field: value})
    result = load_and_validate(folder)
    (error,) = _errors(result)
    assert error.position is not None and error.position.file == str(folder / "lab.yaml")
    assert error.position.line >= _line_of(folder, f"{field}:"), error
    assert error.message.startswith(field), error


def test_secret_env_cannot_name_the_labs_own_proxmox_secret(tmp_path: Path) -> None:
    lab = LAB.replace("user: root@pam}", "user: root@pam, secret_env: PVE_ROOT_PASSWORD}")
    folder = _tree(tmp_path, yaml.safe_load(HOST), {**CONTAINER, "secret_env": {"X": "PVE_ROOT_PASSWORD"}}, lab=lab)
    (error,) = _errors(load_and_validate(folder))
    assert "PVE_ROOT_PASSWORD" in error.message and "Proxmox credentials" in error.message
    assert error.position is not None and error.position.line == _line_of(folder, "X: PVE_ROOT_PASSWORD")


def test_bind_sources_and_mount_paths_are_normalised(tmp_path: Path) -> None:
    mounts = [{"host": "/tank//models/./", "path": "/models/"}]
    folder = _tree(
        tmp_path,
        _with(LXC, "mounts", mounts),
        yaml.safe_load(HOST),
        {**MODEL, "source": "/models//qwen/"},
        {**CONTAINER, "volumes": [{"host": "/srv/./data/", "path": "//data"}]},
    )
    result = load_and_validate(folder)
    assert not _errors(result), result.diagnostics
    lxc, model, container = (result.state.find(ref) for ref in ("Lxc/ct", "Model/m", "Container/app"))
    assert isinstance(lxc, Lxc) and (lxc.mounts[0].host, lxc.mounts[0].path) == ("/tank/models", "/models")
    assert getattr(model, "source", None) == "/models/qwen"
    volumes = getattr(container, "volumes", ())
    assert [(v.host, v.path) for v in volumes] == [("/srv/data", "/data")]


# ---- injection against the real backends: nothing is sent -----------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> Any:
    result = runner.invoke(app, list(args), env={**env, "NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_hostile_property_values_never_reach_fakepve_and_the_benign_ones_do(
    pve_server: PveServer, tmp_path: Path
) -> None:
    env = {**pve_server.env("password"), "RECONCILER_STATE_DIR": str(tmp_path / "state")}
    hostile = _with(_with(LXC, "mounts", [{**MOUNT, "host": "/tank/models,shared=1"}]), "network", [NIC])
    hostile["network"][0]["bridge"] = "vmbr0,rate=1,firewall=1"
    folder = _tree(tmp_path / "hostile", hostile)
    pve_server.clear_requests()
    for command in ("plan", "apply"):
        result = _cli(command, str(folder), "--auto-approve" if command == "apply" else "--json", env=env)
        assert result.exit_code == 1, result.output
        assert f"{folder / 'lab.yaml'}:" in result.output or '"line"' in result.output, result.output
    assert pve_server.requests == [], "an invalid spec reads and writes nothing"

    benign = _tree(tmp_path / "benign", _with(_with(LXC, "mounts", [MOUNT]), "network", [NIC]))
    result = _cli("apply", str(benign), "--auto-approve", env=env)
    assert result.exit_code == 0, result.output
    config = _ct_config(pve_server, 955)
    assert pve.parse_property(config["mp0"], "volume") == {"volume": "/tank/models", "mp": "/models", "ro": "0"}
    assert pve.parse_property(config["net0"], None)["bridge"] == "vmbr0" and "rate" not in config["net0"]


def _ct_config(pve_server: PveServer, vmid: int) -> dict[str, str]:
    import proxmoxer

    api = proxmoxer.ProxmoxAPI(
        pve_server.host,
        port=pve_server.port,
        user=pve_server.user,
        password=pve_server.password,
        verify_ssl=pve_server.ca_file,
    )
    return {k: str(v) for k, v in api.nodes("pve1").lxc(vmid).config.get().items()}


def test_hostile_docker_values_never_reach_the_engine(
    docker_engine: DockerEngine, docker_client: Any, engine_image: EngineImage, tmp_path: Path
) -> None:
    env = {"RECONCILER_DOCKER_HOST_WS": docker_engine.endpoint, "RECONCILER_STATE_DIR": str(tmp_path / "state")}
    lab = "kind: Lab\nname: lab\nnodes: [pve1]\nnvml: {enabled: false}\n"
    cases = {
        "env-key": {"env": {"LD_PRELOAD=/tmp/evil.so X": "1"}},
        "bind-source": {"volumes": [{"host": f"{tmp_path}/../../etc", "path": "/host-etc"}]},
        "secret": {"secret_env": {"TOKEN": "RECONCILER_PROXMOX_PASSWORD"}},
    }
    for name, fields in cases.items():
        container = {**CONTAINER, "name": f"hostile-{name}", "image": engine_image.tag, **fields}
        folder = _tree(tmp_path / name, yaml.safe_load(HOST), container, lab=lab)
        result = _cli("apply", str(folder), "--auto-approve", env={**env, "RECONCILER_PROXMOX_PASSWORD": "s3cret"})
        assert result.exit_code == 1, result.output
        assert f"{folder / 'lab.yaml'}:" in result.output, result.output
        assert docker_client.containers.list(all=True, filters={"name": f"hostile-{name}"}) == []


# ---- property: what is accepted renders to a property string that parses back to the same fields ------------

_HOSTILE = st.text(alphabet=st.sampled_from(list(",=;: \n\t/\\.-_aZ09%é\u2028\x00")), min_size=0, max_size=16)


def _grammar(pattern: str) -> st.SearchStrategy[str]:
    return st.from_regex(pattern, fullmatch=True).filter(lambda s: len(s) <= 40) | _HOSTILE


_PATHS = st.lists(st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True), min_size=1, max_size=4).map(
    lambda parts: "/" + "/".join(parts)
) | _HOSTILE.map(lambda s: "/" + s)
_IPV4 = st.ip_addresses(v=4).map(str)
_LXC_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "mounts.0.host": _PATHS,
    "mounts.0.path": _PATHS,
    "volumes.0.path": _PATHS,
    "volumes.0.storage": _grammar(STORAGE_ID_PATTERN),
    "rootfs.storage": _grammar(STORAGE_ID_PATTERN),
    "network.0.bridge": _grammar(BRIDGE_PATTERN),
    "network.0.ip": st.sampled_from(["dhcp", "manual"])
    | st.builds(lambda a, p: f"{a}/{p}", _IPV4, st.integers(0, 32))
    | _HOSTILE,
    "network.0.gateway": _IPV4 | _HOSTILE,
    "network.0.ip6": st.sampled_from(["auto", "dhcp", "manual"])
    | st.builds(lambda a, p: f"{a}/{p}", st.ip_addresses(v=6).map(str), st.integers(0, 128))
    | _HOSTILE,
    "network.0.hwaddr": st.from_regex(r"[0-9A-F][02468ACE](:[0-9A-F]{2}){5}", fullmatch=True) | _HOSTILE,
    "hostname": _grammar(DNS_NAME_PATTERN),
    "features.mount": st.lists(_grammar(r"[A-Za-z0-9_]+"), min_size=1, max_size=3),
}
_VM_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "cpu": _grammar(CPU_TYPE_PATTERN),
    "disks.0.storage": _grammar(STORAGE_ID_PATTERN),
    "network.0.bridge": _grammar(BRIDGE_PATTERN),
}
_LXC_BASE = {
    **LXC,
    "mounts": [dict(MOUNT)],
    "volumes": [{"storage": "local-lvm", "size": "8GiB", "path": "/srv"}],
    "network": [{"name": "eth0", "bridge": "vmbr0", "ip": "dhcp"}],
}
_VM_BASE = {
    **VM,
    "disks": [{"slot": "scsi0", "storage": "local-lvm", "size": "8GiB", "ssd": True}],
    "network": [{"name": "net0"}],
}


def _expected_lxc(lxc: Lxc) -> dict[str, dict[str, str]]:
    """The fields each property string of `lxc` must parse back to: the accepted values, unchanged."""
    mount, volume, nic = lxc.mounts[0], lxc.volumes[0], lxc.network[0]
    net = {"name": nic.name, "bridge": nic.bridge}
    for key, value in (("ip", nic.ip), ("gw", nic.gateway), ("ip6", nic.ip6), ("hwaddr", nic.hwaddr)):
        if value is not None:
            net[key] = value.upper() if key == "hwaddr" else value
    expected = {
        "rootfs": {"volume": f"{lxc.rootfs.storage}:8"},
        "mp0": {"volume": mount.host, "mp": mount.path, "ro": "0"},
        "mp1": {"volume": f"{volume.storage}:8", "mp": volume.path},
        "net0": net,
    }
    if lxc.features.mount is not None:
        expected["features"] = {"mount": ";".join(lxc.features.mount)}
    return expected


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_any_accepted_value_formats_to_a_property_string_that_parses_back_to_the_same_fields(data: Any) -> None:
    kind = data.draw(st.sampled_from(["lxc", "qemu"]))
    fields = _LXC_FIELDS if kind == "lxc" else _VM_FIELDS
    field = data.draw(st.sampled_from(sorted(fields)))
    value = data.draw(fields[field])
    try:
        spec = (Lxc if kind == "lxc" else Vm).model_validate(
            _with(_LXC_BASE if kind == "lxc" else _VM_BASE, field, value)
        )
    except ValidationError:
        return  # refused at load: it never reaches a property string
    if isinstance(spec, Lxc):
        config = pve.lxc_config(spec, gpu_devices=())
        expected = _expected_lxc(spec)
        if spec.hostname is not None:
            assert config["hostname"] == spec.hostname and "\n" not in spec.hostname
    else:
        config = pve.vm_config(spec, hostpci=())
        expected = {
            "scsi0": {"file": f"{spec.disks[0].storage}:8", "ssd": "1"},
            "net0": {"model": "virtio", "bridge": spec.network[0].bridge},
        }
        if spec.cpu is not None:
            expected["cpu"] = {"cputype": spec.cpu}
            config["cpu"] = "cputype=" + config["cpu"]
    for key, want in expected.items():
        assert pve.parse_property(config[key], pve.default_key_for(kind, key)) == want, (key, config[key])


# ---- sizes and durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "field", "value", "message"),
    [
        (LXC, "memory", "0B", "0B is too small (the least is 16MiB)"),
        (LXC, "memory", "999999999999999999999999TiB", "is too large"),
        (LXC, "rootfs", {"storage": "local-lvm", "size": "1B"}, "1B is too small (the least is 1GiB)"),
        (LXC, "rootfs", {"storage": "local-lvm", "size": "1.5GiB"}, "not a whole number of GiB"),
        (VM, "disks", [{"slot": "scsi0", "storage": "local-lvm", "size": "1536MiB"}], "not a whole number of GiB"),
        (VM, "memory", "1KiB", "too small"),
        (CONTAINER, "shm_size", "0B", "too small"),
        (CONTAINER, "healthcheck", {"test": ["CMD", "true"], "timeout": 0}, "longer than zero"),
        (MODEL, "probe", {"http": "/health", "timeout": 1.0e20}, "too long"),
        (MODEL, "probe", {"http": "/health", "interval": "0s"}, "longer than zero"),
    ],
)
def test_sizes_and_durations_out_of_bounds_are_errors(
    tmp_path: Path, document: dict[str, Any], field: str, value: Any, message: str
) -> None:
    folder = _tree(tmp_path, yaml.safe_load(HOST), {**document, field: value})
    (error,) = _errors(load_and_validate(folder))
    assert message in error.message, error
    assert error.position is not None and error.position.line >= _line_of(folder, f"{field}:")


@pytest.mark.parametrize(
    ("lab", "shown"),
    [
        (LAB.replace("user: root@pam}", "user: root@pam, timeout: 1.0e+20}"), "proxmox.timeout"),
        (LAB.replace("user: root@pam}", "user: root@pam, timeout: 0}"), "proxmox.timeout"),
        (LAB + "---\nkind: DockerHost\nname: ws\nendpoint: unix:///x.sock\ntimeout: 1.0e+300\n", "timeout"),
    ],
    ids=["proxmox-1e20", "proxmox-0", "docker-1e300"],
)
def test_client_timeouts_out_of_bounds_exit_1_with_file_and_line_not_a_traceback(
    pve_server: PveServer, tmp_path: Path, lab: str, shown: str
) -> None:
    folder = _tree(tmp_path, lab=lab)
    pve_server.clear_requests()
    result = _cli("plan", str(folder), env={**pve_server.env("password"), "RECONCILER_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 1, result.output
    assert f"{folder / 'lab.yaml'}:" in result.output and f"error: {shown}" in result.output, result.output
    assert "Traceback" not in result.output and pve_server.requests == []


def test_a_whole_gib_volume_is_sent_as_a_whole_number() -> None:
    lxc = Lxc.model_validate({**LXC, "rootfs": {"storage": "local-lvm", "size": "1TiB"}})
    assert pve.lxc_config(lxc, gpu_devices=())["rootfs"] == "local-lvm:1024"


# ---- other defects ----------------------------------------------------------------------------------------


def test_the_same_host_port_twice_in_one_container_is_an_error(tmp_path: Path) -> None:
    folder = _tree(tmp_path, yaml.safe_load(HOST), {**CONTAINER, "ports": ["8080:80", "127.0.0.1:8080:81", 9000]})
    (error,) = _errors(load_and_validate(folder))
    assert error.message == "host port 8080/tcp is published twice"
    assert error.position is not None and error.position.line == _line_of(folder, "127.0.0.1:8080:81")


def test_the_same_host_port_on_one_docker_host_is_an_error_across_containers(tmp_path: Path) -> None:
    folder = _tree(
        tmp_path,
        yaml.safe_load(HOST),
        {**CONTAINER, "ports": ["8080:80"]},
        {**CONTAINER, "name": "other", "ports": ["[::]:8080:80".replace("[::]", "::")]},
    )
    errors = _errors(load_and_validate(folder))
    assert [e.message for e in errors] == ["port 8080/tcp on host 'ws' is also published by Container/app"]


def test_a_tree_without_a_lab_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "tree"
    folder.mkdir()
    (folder / "host.yaml").write_text(HOST)
    (error,) = _errors(load_and_validate(folder))
    assert error.message == "no Lab document"
    assert str(error.position) == f"{folder / 'host.yaml'}:1:1"


def test_a_file_name_with_a_newline_keeps_each_diagnostic_on_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "tree"
    folder.mkdir()
    (folder / "lab.yaml").write_text(LAB)
    (folder / "evil\nlab.yaml: error: forged.yaml").write_text("kind: Lxc\nname: x\n")
    result = _cli("validate", str(folder), env={})
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if ": error: " in line]
    assert lines and all(line.startswith(str(folder)) for line in lines), result.output
    assert any("evil\\nlab.yaml: error: forged.yaml:" in line for line in lines), result.output
    diagnostic = load_and_validate(folder).diagnostics[0]
    assert "\n" in diagnostic.to_json()["file"], "the JSON form keeps the real name"  # type: ignore[operator]


def test_a_file_name_is_printed_as_it_is_never_as_emoji_or_markup(tmp_path: Path) -> None:
    folder = tmp_path / "tree"
    folder.mkdir()
    (folder / "lab.yaml").write_text(LAB)
    (folder / ":x: [bold]b.yaml").write_text("kind: Lxc\nname: x\n")
    result = _cli("validate", str(folder), env={})
    assert result.exit_code == 1
    assert f"{folder}/:x: [bold]b.yaml:1:1: Lxc/x: error:" in result.output, result.output


# ---- symlinks and huge trees ----------------------------------------------------------------------------------


def test_symlinks_out_of_the_tree_are_refused_and_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "extra.yaml").write_text("kind: DockerHost\nname: outside\nendpoint: unix:///x\n")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "lab.yaml").write_text(LAB)
    (tree / "sub" / "host.yaml").write_text(HOST)
    links = {"root": "/", "etc": "/etc", "self": "/proc/self", "outside": str(outside)}
    for name, target in links.items():
        os.symlink(target, tree / name)
    os.symlink(outside / "extra.yaml", tree / "extra.yaml")
    os.symlink(tree / "sub", tree / "inside")  # a link within the tree is still read (once)
    result = load_and_validate(tree)
    refused = sorted(d.position.file for d in result.diagnostics if d.position and "out of the spec tree" in d.message)
    assert refused == sorted(str(tree / name) for name in [*links, "extra.yaml"])
    assert sorted(r.ref for r in result.state.resources) == ["DockerHost/ws", "Lab/lab"]
    assert len(result.diagnostics) == len(refused) + 1, result.diagnostics  # + the loop through 'inside'


def test_a_file_with_150000_unknown_keys_gives_one_line_not_150000(tmp_path: Path) -> None:
    (tmp_path / "lab.yaml").write_text(LAB + "".join(f"unknown{i}: {i}\n" for i in range(150_000)))
    (error,) = load_and_validate(tmp_path).diagnostics
    assert error.message.startswith("the spec tree holds more than"), error
    assert error.position is not None and error.position.file == str(tmp_path / "lab.yaml")


def test_a_mapping_with_too_many_keys_is_refused_at_its_line(tmp_path: Path) -> None:
    (tmp_path / "lab.yaml").write_text(LAB + "labels:\n" + "".join(f"  k{i}: v\n" for i in range(MAX_KEYS + 1)))
    (error,) = load_and_validate(tmp_path).diagnostics
    assert error.message == f"a mapping has more than {MAX_KEYS} keys"
    assert str(error.position) == f"{tmp_path / 'lab.yaml'}:7:3"


def test_too_many_documents_in_one_file_is_refused_with_its_line() -> None:
    text = LAB + "---\nkind: GpuRole\nname: r\n" * (MAX_DOCUMENTS + 10)
    (error,) = load_files([SpecFile("lab.yaml", text.encode())]).diagnostics
    assert error.message == f"more than {MAX_DOCUMENTS} documents in one file"
    assert error.position is not None and error.position.line == 6 + 3 * (MAX_DOCUMENTS - 1)


def test_many_problems_in_a_file_end_in_one_summary_line() -> None:
    roles = "".join(f"---\nkind: GpuRole\nname: r{i}\nfoo: 1\nbar: 2\n" for i in range(200))
    result = load_files([SpecFile("lab.yaml", (LAB + roles).encode()), SpecFile("b.yaml", b"kind: Nope\n")])
    in_file = [d for d in result.diagnostics if d.position and d.position.file == "lab.yaml"]
    assert len(in_file) == MAX_DIAGNOSTICS_PER_FILE + 1
    assert in_file[-1].message == "... and 175 more document(s) in it were not checked", in_file[-1]
    assert [d.message for d in result.diagnostics if d.position and d.position.file == "b.yaml"] == [
        "unknown kind 'Nope'"
    ]


def test_a_tree_too_large_to_read_is_refused_and_says_what_was_not_read() -> None:
    role = "---\nkind: GpuRole\nname: r{i}\nfailover: [" + ", ".join(["a"] * 200) + "]\n"
    files = [
        SpecFile(f"f{n:02}.yaml", "".join(role.format(i=n * 100 + i) for i in range(100)).encode()) for n in range(20)
    ]
    result = load_files([SpecFile("lab.yaml", LAB.encode()), *files])
    refused = [d for d in result.diagnostics if "spec tree" in d.message]
    assert len(refused) >= 1 and refused[0].position is not None, result.diagnostics[:3]
    assert len(result.diagnostics) <= 3, [str(d) for d in result.diagnostics]


def test_one_document_with_many_problems_ends_in_how_many_more() -> None:
    text = LAB + "---\nkind: GpuRole\nname: r\n" + "".join(f"unknown{i}: 1\n" for i in range(60))
    result = load_files([SpecFile("lab.yaml", text.encode())])
    assert len(result.diagnostics) == MAX_DIAGNOSTICS_PER_FILE + 1
    summary = result.diagnostics[-1]
    assert summary.message == "... and 10 more problems in this file" and summary.severity is Severity.ERROR
    assert summary.position is not None and summary.position.line == 9 + MAX_DIAGNOSTICS_PER_FILE


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("kind: DockerHost\nname: ws\nendpoint: 'ssh://-oProxyCommand=touch /tmp/x@h'\n", "endpoint"),
        ("kind: DockerHost\nname: ws\nendpoint: 'tcp://h:99999'\n", "endpoint"),
        ("kind: DockerHost\nname: ws\nendpoint: 'unix:///run/../etc/docker.sock'\n", "endpoint"),
        ("kind: DockerHost\nname: ws\nendpoint: 'ssh://root@h/\\nx'\n", "endpoint"),
    ],
)
def test_a_docker_endpoint_outside_its_grammar_is_an_error(tmp_path: Path, text: str, field: str) -> None:
    folder = _tree(tmp_path, yaml.safe_load(text))
    (error,) = _errors(load_and_validate(folder))
    assert error.message.startswith(f"{field}: not a Docker endpoint"), error
    assert error.position is not None and error.position.line == _line_of(folder, "endpoint:")


def test_a_proxmox_url_with_credentials_or_a_newline_is_an_error(tmp_path: Path) -> None:
    for number, url in enumerate(["https://root:secret@pve1.lan:8006", "https://pve1.lan:8006\nX-Injected: 1"]):
        lab = LAB.replace('url: "https://pve1.lan:8006"', f"url: {json.dumps(url)}")
        (error,) = _errors(load_and_validate(_tree(tmp_path / str(number), lab=lab)))
        assert error.message.startswith("proxmox.url: not an API address"), error
        assert "secret" not in str(error), "a refused address is shown without its credentials"


def test_a_name_with_a_newline_keeps_the_printed_diagnostic_on_one_line(tmp_path: Path) -> None:
    folder = _tree(tmp_path, {**CONTAINER, "name": "app\nforged: error: x", "image": "busybox\n1"})
    result = _cli("validate", str(folder), env={})
    assert result.exit_code == 1
    printed = [line for line in result.output.splitlines() if line.strip()]
    diagnostics = [line for line in printed if not line.startswith("    ") and not line.startswith("invalid")]
    assert diagnostics and all(line.startswith(f"{folder / 'lab.yaml'}:") for line in diagnostics), result.output
    assert any("Container/app\\nforged: error: x:" in line for line in diagnostics), result.output


def test_the_nvml_library_a_spec_names_must_be_nvml(tmp_path: Path) -> None:
    for number, library in enumerate(["/tmp/evil.so", "relative/libnvidia-ml.so.1", "/usr/lib/../tmp/libnvidia-ml.so"]):
        lab = LAB.replace("nvml: {enabled: false}", f"nvml: {{library: {json.dumps(library)}}}")
        (error,) = _errors(load_and_validate(_tree(tmp_path / str(number), lab=lab)))
        assert error.message.startswith("nvml.library: NVML library"), error


# ---- the same property for the guest-access keys (ipconfigN, numaN, efidisk0, tpmstate0, cicustom, DNS) -----


def _or_with_newline(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A value, or it with a final newline: a Python `$` matches before one, so only a full match refuses it."""
    return strategy | strategy.map(lambda s: s + "\n")


_CPUSETS = _or_with_newline(st.sampled_from(["0", "0-1", "0;1"])) | _HOSTILE
_ACCESS_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "cloud_init.ipconfig.0.ip": _or_with_newline(st.sampled_from(["dhcp", "10.0.0.5/24"])) | _HOSTILE,
    "cloud_init.ipconfig.0.ip6": _or_with_newline(st.sampled_from(["auto", "dhcp", "fd00::5/64"])) | _HOSTILE,
    "cloud_init.searchdomain.0": _or_with_newline(_grammar(DNS_NAME_PATTERN)),
    "cloud_init.nameserver.0": _or_with_newline(_IPV4) | _HOSTILE,
    "cloud_init.user": _or_with_newline(st.just("admin")) | _HOSTILE,
    "cloud_init.user_data": _or_with_newline(st.just("local:snippets/user.yaml")) | _HOSTILE,
    "efidisk0.storage": _or_with_newline(_grammar(STORAGE_ID_PATTERN)),
    "tpmstate0.storage": _or_with_newline(_grammar(STORAGE_ID_PATTERN)),
    "numa_nodes.0.cpus": _CPUSETS,
    "numa_nodes.0.hostnodes": _CPUSETS,
}
_ACCESS_VM = {
    **VM,
    "cores": 2,
    "bios": "ovmf",
    "numa": True,
    "network": [{"name": "net0"}],
    "numa_nodes": [{"cpus": "0-1", "memory": "4GiB"}],
    "efidisk0": {"storage": "local-lvm"},
    "tpmstate0": {"storage": "local-lvm"},
    "cloud_init": {"ipconfig": [{"ip": "dhcp"}]},
}
_ACCESS_KEYS = {  # the sub-fields each property string may hold: anything else was injected
    "ipconfig0": ({"ip", "gw", "ip6", "gw6"}, None),
    "numa0": ({"cpus", "hostnodes", "memory", "policy"}, None),
    "efidisk0": ({"file", "efitype", "pre-enrolled-keys"}, "file"),
    "tpmstate0": ({"file", "version"}, "file"),
    "cicustom": ({"user"}, None),
}


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_any_accepted_guest_access_value_renders_without_control_characters_or_extra_fields(data: Any) -> None:
    field = data.draw(st.sampled_from(sorted(_ACCESS_FIELDS)))
    try:
        spec = Vm.model_validate(_with(_ACCESS_VM, field, data.draw(_ACCESS_FIELDS[field])))
    except ValidationError:
        return  # refused at load
    config = {**pve.vm_config(spec, hostpci=()), **vm_access_config(spec, {})}
    for key, value in config.items():
        assert not any(ord(c) < 32 or c in "\x7f\u2028\u2029" for c in value), (field, key, value)
    for key, (allowed, default_key) in _ACCESS_KEYS.items():
        if key in config:
            assert set(pve.parse_property(config[key], default_key)) <= allowed, (field, key, config[key])


@pytest.mark.parametrize(
    ("document", "field", "mark"),
    [
        ({**LXC, "tags": ["llm", "reconciler-otherlab"]}, "tags", "reconciler-otherlab"),
        ({**VM, "tags": ["Reconciler"]}, "tags", "Reconciler"),
        ({**CONTAINER, "labels": {"reconciler-otherlab.managed": "true"}}, "labels", "reconciler-otherlab.managed"),
        ({**CONTAINER, "labels": {"reconciler.managed": "true"}}, "labels", "reconciler.managed"),
        ({**MODEL, "labels": {"reconciler-lab.resource": "Model/x"}}, "labels", "reconciler-lab.resource"),
    ],
)
def test_a_spec_cannot_write_an_ownership_mark_its_own_labs_or_anothers(
    tmp_path: Path, document: dict[str, Any], field: str, mark: str
) -> None:
    """Another lab's mark on a resource would make that lab see an orphan, and `--adopt-orphans` delete it."""
    folder = _tree(tmp_path / "spec", yaml.safe_load(HOST), document)
    (problem,) = [d for d in _errors(load_and_validate(folder)) if "ownership mark" in d.message]
    assert repr(mark) in problem.message and problem.position is not None
    assert problem.position.line > LAB.count("\n")


def test_plain_tags_and_labels_stay_allowed(tmp_path: Path) -> None:
    folder = _tree(
        tmp_path / "spec",
        yaml.safe_load(HOST),
        {**LXC, "tags": ["llm", "reconcile-me"]},
        {**CONTAINER, "labels": {"com.example.team": "ml", "reconcilers": "x"}},
    )
    assert _errors(load_and_validate(folder)) == []

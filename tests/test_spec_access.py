"""The spec's guest access and provisioning fields (issue 11): what loads, and every hostile value refused at load.

Each case writes a real spec tree (a Lab and one guest) into a temporary folder and loads it the way
`reconciler validate` does; a refused value must be an error diagnostic naming its file and line,
never an exception.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from reconciler.spec.access import BuiltinStep, SshKey, SshTarget, parse_public_keys
from reconciler.spec.diagnostics import Severity
from reconciler.spec.loader import LoadResult
from reconciler.spec.models import DockerHost, Lxc, Vm
from reconciler.spec.validate import load_and_validate

LAB = """\
kind: Lab
name: lab
nodes: [pve1, pve2]
proxmox: {url: "https://pve1.lan:8006", auth: password, user: root@pam, secret_env: PVE_PASSWORD}
"""
LXC = """\
kind: Lxc
name: llm
node: pve1
vmid: 955
template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
rootfs: {storage: local-lvm, size: 8GiB}
docker: {endpoint: "ssh://root@llm.lan"}
"""
VM = """\
kind: Vm
name: infer
node: pve1
vmid: 200
cores: 8
memory: 16GiB
network: [{bridge: vmbr0}]
"""


def _public_key(comment: str = "admin@lab") -> str:
    raw = ed25519.Ed25519PrivateKey.generate().public_key()
    text = raw.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{text} {comment}"


def _load(tmp_path: Path, document: str, files: dict[str, str] | None = None) -> LoadResult:
    (tmp_path / "lab.yaml").write_text(LAB)
    (tmp_path / "guest.yaml").write_text(document)
    for name, content in (files or {}).items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return load_and_validate(tmp_path)


def _errors(result: LoadResult) -> list[str]:
    return [
        f"{d.position.line if d.position else 0}: {d.message}"
        for d in result.diagnostics
        if d.severity is Severity.ERROR
    ]


def _only_error(result: LoadResult, text: str) -> None:
    errors = _errors(result)
    assert len(errors) == 1 and text in errors[0], errors
    diagnostic = next(d for d in result.diagnostics if d.severity is Severity.ERROR)
    assert diagnostic.position is not None and diagnostic.position.file.endswith(("guest.yaml", "lab.yaml"))


# ---- what loads ------------------------------------------------------------------------------


def test_an_lxc_with_keys_inline_and_from_a_file_a_password_variable_and_provisioning_loads(tmp_path: Path) -> None:
    inline, from_file = _public_key("inline"), _public_key("file")
    document = LXC + textwrap.dedent(f"""\
        gpus: []
        ssh_keys:
          - "{inline}"
          - {{file: keys/admin.pub}}
        password_env: LLM_ROOT_PASSWORD
        provision:
          - docker
          - {{script: provision/models.sh, creates: /etc/models-ready, timeout: 10m}}
          - {{script: provision/check.sh, unless: "test -d /models"}}
        """)
    script = "#!/bin/sh\nmkdir -p /models\n"
    result = _load(
        tmp_path,
        document,
        {
            "keys/admin.pub": f"# the admins\n{from_file}\n",
            "provision/models.sh": script,
            "provision/check.sh": "true\n",
        },
    )
    assert _errors(result) == []
    lxc = result.state.get(Lxc, "llm")
    assert lxc is not None
    assert lxc.ssh_keys == (SshKey(key=inline), SshKey(file="keys/admin.pub"))
    assert lxc.password_env == "LLM_ROOT_PASSWORD"
    assert [step.key for step in lxc.provision] == ["docker", "models.sh", "check.sh"]
    assert lxc.provision[0].builtin is BuiltinStep.DOCKER
    assert lxc.provision[1].timeout == 600.0
    assert result.state.files["provision/models.sh"] == script.encode()
    assert parse_public_keys(result.state.files["keys/admin.pub"].decode()) == (from_file,)


def test_a_vm_cloned_from_a_template_with_cloud_init_firmware_volumes_and_numa_nodes_loads(tmp_path: Path) -> None:
    key = _public_key()
    document = VM.replace(
        "network: [{bridge: vmbr0}]", "network: [{bridge: vmbr0}, {name: eth1, bridge: vmbr1}]"
    ) + textwrap.dedent(f"""\
        numa: true
        sockets: 2
        bios: ovmf
        clone: {{template: debian-12-cloud, node: pve2, full: true, storage: local-lvm}}
        cloud_init:
          user: ops
          password_env: INFER_PASSWORD
          ssh_keys: ["{key}"]
          ipconfig: [{{ip: 10.0.0.5/24, gw: 10.0.0.1, ip6: auto}}, {{ip: dhcp}}]
          nameserver: [10.0.0.1, "fd00::1"]
          searchdomain: [lab.lan]
          user_data: local:snippets/infer.yaml
        efidisk0: {{storage: local-lvm, pre_enrolled_keys: true}}
        tpmstate0: {{storage: local-lvm}}
        numa_nodes:
          - {{cpus: 0-7, memory: 8GiB, hostnodes: "0", policy: bind}}
          - {{cpus: 8-15, memory: 8GiB, hostnodes: "1", policy: bind}}
        ssh: ops@10.0.0.5:2222
        """)
    result = _load(tmp_path, document)
    assert _errors(result) == []
    vm = result.state.get(Vm, "infer")
    assert vm is not None and vm.clone is not None and vm.cloud_init is not None
    assert vm.clone.template == "debian-12-cloud" and vm.clone.node == "pve2"
    assert vm.cloud_init.ipconfig[0].ip == "10.0.0.5/24"
    assert vm.ssh == SshTarget(user="ops", host="10.0.0.5", port=2222)
    assert [n.memory for n in vm.numa_nodes] == [8 * 1024**3] * 2


def test_ssh_targets_parse_from_text_and_from_a_docker_endpoint(tmp_path: Path) -> None:
    assert SshTarget.model_validate("root@[fd00::5]:22") == SshTarget(user="root", host="fd00::5", port=22)
    assert str(SshTarget.model_validate("llm.lan")) == "root@llm.lan:22"
    result = _load(tmp_path, LXC + "provision: [docker]\n")  # reached through the docker endpoint
    assert _errors(result) == []


def test_a_dockerhost_may_provision_too(tmp_path: Path) -> None:
    document = 'kind: DockerHost\nname: box\nendpoint: "unix:///run/docker.sock"\nssh: admin@box.lan\nprovision: [nvidia-container-toolkit]\n'
    result = _load(tmp_path, document)
    assert _errors(result) == []
    host = result.state.get(DockerHost, "box")
    assert host is not None and host.provision[0].builtin is BuiltinStep.NVIDIA_CONTAINER_TOOLKIT


def test_editing_a_provisioning_script_changes_a_folders_revision(tmp_path: Path) -> None:
    document = LXC + "provision: [{script: setup.sh}]\n"
    first = _load(tmp_path, document, {"setup.sh": "echo one\n"}).state.revision
    second = _load(tmp_path, document, {"setup.sh": "echo two\n"}).state.revision
    assert first is not None and second is not None and first != second


# ---- hostile values --------------------------------------------------------------------------

HOSTILE_FIELDS = [
    pytest.param('ssh_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA== short"]', "does not parse", id="truncated-key"),
    pytest.param('ssh_keys: ["ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIGeq x"]', "not a ssh-rsa key", id="type-mismatch"),
    pytest.param("ssh_keys: ['command=\"rm -rf /\" ssh-ed25519 AAAA']", "not an OpenSSH public key", id="options"),
    pytest.param('ssh_keys: ["ssh-ed25519 !!!notbase64"]', "does not decode", id="bad-base64"),
    pytest.param("ssh_keys: [{file: ../outside.pub}]", "leaves the spec tree", id="dotdot"),
    pytest.param("ssh_keys: [{file: /etc/passwd}]", "absolute", id="absolute"),
    pytest.param("ssh_keys: [{file: keys/missing.pub}]", "does not exist", id="missing-file"),
    pytest.param("password_env: 'X=1 ; rm'", "password_env", id="password-env"),
    pytest.param("password_env: RECONCILER_PROXMOX_PASSWORD", "reconciler's own", id="password-env-own-secret"),
    pytest.param("provision: [podman]", "provision.0.builtin", id="unknown-builtin"),
    pytest.param("provision: [{script: a.sh, builtin: docker}]", "exactly one", id="both"),
    pytest.param("provision: [{builtin: docker, creates: '/x; reboot'}]", "absolute path", id="creates-injection"),
    pytest.param('provision: [{builtin: docker, unless: "true\\nreboot"}]', "one line", id="unless-newline"),
    pytest.param("provision: [{builtin: docker, creates: /a, unless: 'true'}]", "not both", id="creates-and-unless"),
    pytest.param("provision: [{builtin: docker, timeout: 0s}]", "timeout", id="zero-timeout"),
    pytest.param("provision: [{builtin: docker, timeout: 2d}]", "24h", id="huge-timeout"),
    pytest.param("provision: [docker, docker]", "appears twice", id="duplicate-step"),
    pytest.param("ssh: 'root@host;reboot'", "not a host name", id="ssh-injection"),
    pytest.param("ssh: 'root@llm.lan:70000'", "port", id="ssh-port"),
    # `$` in a Python regex also matches before a final newline: every check must match the whole value.
    pytest.param('ssh: {host: "llm.lan\\n"}', "not a host name", id="ssh-host-trailing-newline"),
]


@pytest.mark.parametrize(("field", "message"), HOSTILE_FIELDS)
def test_hostile_lxc_values_are_refused_at_load(tmp_path: Path, field: str, message: str) -> None:
    _only_error(_load(tmp_path, LXC + field + "\n"), message)


HOSTILE_VM = [
    pytest.param("cloud_init: {ipconfig: [{ip: 'dhcp,gw=1.2.3.4'}]}", "not 'dhcp'", id="ipconfig-injection"),
    pytest.param("cloud_init: {ipconfig: [{ip: 10.0.0.5}]}", "prefix", id="ip-without-prefix"),
    pytest.param("cloud_init: {ipconfig: [{ip: dhcp, gw: 10.0.0.1}]}", "static", id="gw-with-dhcp"),
    pytest.param("cloud_init: {ipconfig: [{ip: 10.0.0.5/24, gw: 10.1.0.1}]}", "not in", id="gw-outside"),
    pytest.param("cloud_init: {ipconfig: [{ip6: 'fd00::5'}]}", "prefix", id="ip6-without-prefix"),
    pytest.param("cloud_init: {ipconfig: [{}, {}]}", "2 ipconfig entries for 1 network", id="too-many-ipconfig"),
    pytest.param("cloud_init: {nameserver: ['1.1.1.1 8.8.8.8']}", "nameserver", id="nameserver-list"),
    pytest.param("cloud_init: {searchdomain: ['lan,foo=1']}", "DNS domain", id="searchdomain"),
    pytest.param('cloud_init: {searchdomain: ["lab.lan\\n"]}', "DNS domain", id="searchdomain-trailing-newline"),
    pytest.param("cloud_init: {user_data: 'local:iso/x.yaml'}", "user_data", id="snippet-content"),
    pytest.param(
        "cloud_init: {user_data: 'local:snippets/x.yaml,meta=local:snippets/y'}", "user_data", id="snippet-inject"
    ),
    pytest.param("cloud_init: {user: 'root,x=1'}", "user", id="ciuser"),
    pytest.param("cloud_init: {password_env: RECONCILER_PROXMOX_TOKEN}", "reconciler's own", id="cipassword-own"),
    pytest.param("cloud_init: {password_env: DOCKER_HOST}", "reconciler's own", id="cipassword-docker-host"),
    pytest.param("clone: {template: 9000, full: false, storage: local-lvm}", "linked clone", id="linked-storage"),
    pytest.param("clone: {template: 200}", "itself", id="clone-self"),
    pytest.param("clone: {template: 9000, node: pve9}", "not declared", id="clone-node"),
    pytest.param("clone: {template: 'tmpl,full=0'}", "not a VMID or a VM name", id="template-name"),
    pytest.param("efidisk0: {storage: 'local,size=1T'}", "efidisk0.storage", id="efidisk-storage"),
    pytest.param("efidisk0: {storage: local, efitype: 8m}", "efitype", id="efitype"),
    pytest.param("tpmstate0: {storage: local, version: v3}", "version", id="tpm-version"),
    pytest.param("numa: true\nnuma_nodes: [{cpus: '0-7,policy=bind', memory: 16GiB}]", "ranges", id="numa-cpus"),
    pytest.param("numa: true\nnuma_nodes: [{cpus: 7-0, memory: 16GiB}]", "backwards", id="numa-backwards"),
    pytest.param(
        'numa: true\nnuma_nodes: [{cpus: "0-7\\n", memory: 16GiB}]', "ranges", id="numa-cpus-trailing-newline"
    ),
    pytest.param(
        'numa: true\nnuma_nodes: [{cpus: 0-7, hostnodes: "0\\n", memory: 16GiB}]',
        "ranges",
        id="numa-hostnodes-trailing-newline",
    ),
    pytest.param("numa: true\nnuma_nodes: [{cpus: 0-7, memory: 8GiB}]", "hold 8192 MiB", id="numa-memory"),
    pytest.param("numa: true\nnuma_nodes: [{cpus: 0-8, memory: 16GiB}]", "does not exist", id="numa-vcpu"),
    pytest.param("numa_nodes: [{cpus: 0-7, memory: 16GiB}]", "numa: true", id="numa-off"),
    pytest.param("numa: true\nnuma_nodes: [{cpus: 0-7, memory: 1.5KiB}]", "whole number of MiB", id="numa-mib"),
    pytest.param("ssh: root@infer.lan\nprovision: [nvidia-userspace]", "own kernel", id="userspace-in-vm"),
    pytest.param("provision: [docker]", "SSH target", id="no-target"),
]


@pytest.mark.parametrize(("field", "message"), HOSTILE_VM)
def test_hostile_vm_values_are_refused_at_load(tmp_path: Path, field: str, message: str) -> None:
    _only_error(_load(tmp_path, VM + field + "\n"), message)


def test_a_key_file_that_is_not_a_public_key_is_refused_where_it_is_named(tmp_path: Path) -> None:
    result = _load(
        tmp_path,
        LXC + "ssh_keys: [{file: keys/id_ed25519}]\n",
        {"keys/id_ed25519": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"},
    )
    _only_error(result, "does not hold OpenSSH public keys")
    assert result.diagnostics[0].position is not None and result.diagnostics[0].position.line == 8


def test_a_symlink_leading_out_of_the_tree_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "key.pub").write_text(_public_key() + "\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    os.symlink(outside / "key.pub", tree / "admin.pub")
    _only_error(_load(tree, LXC + "ssh_keys: [{file: admin.pub}]\n"), "outside the spec tree")


def test_a_script_that_is_a_folder_empty_or_binary_is_refused(tmp_path: Path) -> None:
    (tmp_path / "folder.sh").mkdir()
    _only_error(_load(tmp_path, LXC + "provision: [{script: folder.sh}]\n"), "not a regular file")
    _only_error(_load(tmp_path, LXC + "provision: [{script: empty.sh}]\n", {"empty.sh": "  \n"}), "is empty")
    (tmp_path / "binary.sh").write_bytes(b"\xff\xfe\x00")
    _only_error(_load(tmp_path, LXC + "provision: [{script: binary.sh}]\n"), "not UTF-8")


def test_a_huge_script_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    with (tmp_path / "huge.sh").open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)  # sparse: the reader stops at the limit
    _only_error(_load(tmp_path, LXC + "provision: [{script: huge.sh}]\n"), "larger than")


def test_nvidia_userspace_on_an_lxc_without_gpus_is_a_warning(tmp_path: Path) -> None:
    result = _load(tmp_path, LXC + "provision: [nvidia-userspace]\n")
    assert _errors(result) == []
    assert any("no GPU" in d.message for d in result.diagnostics if d.severity is Severity.WARNING)


# ---- files from a git commit ------------------------------------------------------------------


@pytest.mark.git
def test_a_commits_scripts_and_key_files_are_read_from_the_commit_not_the_working_copy(tmp_path: Path) -> None:
    import shutil
    import subprocess

    from reconciler.sources.git import load_commit
    from tests.support.components import missing

    if shutil.which("git") is None:
        missing("git", "the git command is not on PATH")
    repo = tmp_path / "repo"
    specs = repo / "lab"
    specs.mkdir(parents=True)
    key = _public_key()
    (specs / "lab.yaml").write_text(LAB)
    (specs / "guest.yaml").write_text(
        LXC + "ssh_keys: [{file: keys/admin.pub}]\nprovision: [{script: setup.sh}, {script: linked.sh}]\n"
    )
    (specs / "keys").mkdir()
    (specs / "keys" / "admin.pub").write_text(key + "\n")
    (specs / "setup.sh").write_text("echo committed\n")
    (tmp_path / "secret.sh").write_text("echo outside\n")
    os.symlink(tmp_path / "secret.sh", specs / "linked.sh")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "lab"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)
    (specs / "setup.sh").write_text("echo not committed\n")

    result = load_commit(str(repo), ref="main", path="lab")
    assert result.state.files["setup.sh"] == b"echo committed\n"
    assert parse_public_keys(result.state.files["keys/admin.pub"].decode()) == (key,)
    errors = _errors(result)
    assert len(errors) == 1 and "linked.sh is not a file in main" in errors[0], errors

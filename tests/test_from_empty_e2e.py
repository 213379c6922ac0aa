"""The default lab (specs/) from an empty Proxmox to every health check passing, in one `apply`.

Real things only: fakepve over HTTPS (seeded by `real_lab` with the spec's nodes, GPUs, storages and the
cloud-init template the desktop VM is cloned from), the fake NVML, and one Docker engine per Docker host,
each reached as the spec says, over ssh://: every guest that runs Docker is an OpenSSH server on loopback
(tests/support/sshd.py) whose sessions reach that host's own private dockerd through the docker CLI's
`docker system dial-stdio`, which the docker SDK's ssh transport runs on the remote. The address is the
test's (RECONCILER_SSH_HOST_<NAME>, RECONCILER_DOCKER_HOST_<NAME> = ssh://root@127.0.0.1:PORT); the way is
the spec's. The ssh client finds the test's key and known_hosts through an `ssh` first on PATH that adds
`-F` with the test's config.

Before provisioning, a guest has no engine: its session's DOCKER_HOST names a socket that does not exist.
The built-in `docker` step runs against stand-in package tools (tests/support/standins.py) whose
`systemctl enable --now docker` "starts" the engine: it links that socket to the host's private dockerd.
`nvidia-userspace` installs the version the fake NVML reports. Then the containers are created in their
own host's engine, and health-checked. A second apply runs no step; an edited script runs that step
again, and only that step.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from reconciler.engine.journal import RunResult
from reconciler.fakes.nvml import DEFAULT_DRIVER_VERSION
from reconciler.planning.plan import Action
from reconciler.planning.pve import parse_property
from tests.support.dockerd import DockerEngine, _private_engine
from tests.support.reallab import MakeRealLab, RealLab
from tests.support.sshd import Sshd, start_sshd
from tests.support.standins import make_standins, recorded

ROOT = Path(__file__).resolve().parent.parent
# `systemctl enable --now docker` and `systemctl restart docker` start the host's engine: its socket appears.
_SYSTEMCTL = """#!/bin/sh
printf "%s\\n" "systemctl $*" >> "$STANDIN_LOG"
case " $* " in
  *" docker "*) case " $* " in *" --now "*|*" start "*|*" restart "*) ln -sf "$ENGINE_SOCKET" "$GUEST_DOCKER_SOCKET" ;; esac ;;
esac
exit 0
"""


class Guest:
    """A Docker host of the spec played by an sshd whose sessions reach `engine` once Docker is "started"."""

    def __init__(self, name: str, folder: Path, engine: DockerEngine, known_hosts: Path) -> None:
        self.name = name
        self.folder = folder
        self.engine = engine
        self.log = folder / "standins.log"
        self.root = folder / "guest-root"
        bin_dir = make_standins(folder / "bin")
        (bin_dir / "systemctl").write_text(_SYSTEMCTL)
        socket = folder / "run-docker.sock"
        self.sshd: Sshd = start_sshd(
            folder / "sshd",
            known_hosts,
            set_env={
                "PATH": f"{bin_dir}:/usr/bin:/bin",
                "STANDIN_LOG": str(self.log),
                "RECONCILER_GUEST_ROOT": str(self.root),
                "DOCKER_HOST": f"unix://{socket}",
                "GUEST_DOCKER_SOCKET": str(socket),
                "ENGINE_SOCKET": engine.endpoint.removeprefix("unix://"),
            },
        )


@pytest.fixture
def from_empty(
    real_lab: MakeRealLab, docker_engine: DockerEngine, docker_client: Any, tmp_path: Path, monkeypatch: Any
) -> Iterator[tuple[RealLab, dict[str, Guest]]]:
    """specs/ (copied, so a test may edit a script) on an empty fakepve; `llm` on the session's engine, `image`
    on an engine of its own; each behind its own sshd."""
    spec = tmp_path / "specs"
    shutil.copytree(ROOT / "specs", spec)
    lab = real_lab(spec, stand_in=True)
    with ExitStack() as stack:
        second = stack.enter_context(_private_engine(tmp_path))
        _copy_images(docker_client, second, lab)
        guests = {
            "llm": Guest("llm", tmp_path / "guest-llm", docker_engine, lab.state_dir / "known_hosts"),
            "image": Guest("image", tmp_path / "guest-image", second, lab.state_dir / "known_hosts"),
        }
        for guest in guests.values():
            stack.callback(guest.sshd.stop)
        key = guests["llm"].sshd.client_key
        guests["image"].sshd.authorize(key.with_suffix(".pub").read_text().strip())
        lab.env["RECONCILER_SSH_KEY"] = str(key)
        for guest in guests.values():
            upper = guest.name.upper()
            lab.env[f"RECONCILER_SSH_HOST_{upper}"] = f"root@127.0.0.1:{guest.sshd.port}"
            lab.env[f"RECONCILER_DOCKER_HOST_{upper}"] = f"ssh://root@127.0.0.1:{guest.sshd.port}"
        _ssh_client(tmp_path / "ssh-client", key, monkeypatch)
        try:
            yield lab, guests
        finally:
            gc.collect()  # the leaked ssh transports (see the test's marks) are reported here, not in a later test


def _copy_images(source: Any, engine: DockerEngine, lab: RealLab) -> None:
    """The spec's images (the stand-in, tagged under each name) into the second engine: `docker save | load`."""
    import docker

    from reconciler.planning.containers import desired_container

    desired = lab.load()
    names = {
        desired_container(w, lab=desired.lab, gpu_names=(), gpu_uuids={}, revision=None).image
        for w in desired.workloads()
    }
    target = docker.DockerClient(base_url=engine.endpoint, timeout=120)
    try:
        for name in sorted(names):
            (loaded, *_) = target.images.load(b"".join(source.images.get(name).save()))
            repository, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "latest")
            loaded.tag(repository, tag)
    finally:
        target.close()


def _ssh_client(folder: Path, key: Path, monkeypatch: Any) -> None:
    """An `ssh` first on this process's PATH that reads the test's config: its key, its known_hosts."""
    folder.mkdir()
    config = folder / "config"
    config.write_text(
        f"Host 127.0.0.1\n  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {folder / 'known_hosts'}\n"
        "  StrictHostKeyChecking accept-new\n  BatchMode yes\n  LogLevel ERROR\n"
    )
    real = shutil.which("ssh")
    assert real is not None, "the ssh client is missing (openssh-client)"
    shim = folder / "ssh"
    shim.write_text(f'#!/bin/sh\nexec {real} -F {config} "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{__import__('os').environ['PATH']}")


def _containers(engine: DockerEngine) -> set[str]:
    import docker

    client = docker.DockerClient(base_url=engine.endpoint, timeout=30)
    try:
        return {c.name for c in client.containers.list(all=True) if "reconciler-phoenix.managed" in c.labels}
    finally:
        client.close()


@pytest.mark.sshd
@pytest.mark.fakepve
# Before its `docker` step a host has no engine, and the docker SDK's ssh transport never closes the
# `ssh ... docker system dial-stdio` process and pipes of a `DockerClient(...)` that fails in its constructor.
# backends/docker.py frees them at once (`_free_frames`); Python still says so, as unraisable warnings.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_the_default_lab_comes_up_from_empty_in_one_apply(from_empty: tuple[RealLab, dict[str, Guest]]) -> None:
    lab, guests = from_empty
    plan, report = lab.apply(health_timeout=60.0)

    assert report is not None, [str(p) for p in (*plan.conflicts, *plan.blockers)]
    assert report.result is RunResult.APPLIED, report.failure
    order = [c.address for c in plan.changes]
    for name in ("llm", "image"):
        assert order.index(f"lxc/{name}") < order.index(f"provision/{name}")
    assert order.index("provision/llm") < order.index("container/llm/qwen-7b")
    assert order.index("provision/image") < order.index("container/image/comfyui")
    verified = [s for s in report.steps if s.phase == "verify"]
    assert verified and all(s.ok for s in verified)
    assert {s.address for s in verified} >= {"container/llm/qwen-7b", "container/image/comfyui"}

    # Each host's containers are in its own engine, reached over its own ssh://.
    assert _containers(guests["llm"].engine) >= {"qwen-7b"} and "comfyui" not in _containers(guests["llm"].engine)
    assert _containers(guests["image"].engine) == {"comfyui"}
    for guest in guests.values():
        calls = recorded(guest.log)
        assert "apt-get install -y -q --no-install-recommends docker.io" in calls
        assert "systemctl enable --now docker" in calls
        assert any(c.startswith("installer NVIDIA-Linux-x86_64-" + DEFAULT_DRIVER_VERSION) for c in calls), calls
        assert "nvidia-ctk runtime configure --runtime=docker" in calls
        assert (guest.root / "etc" / "docker" / "daemon.json").is_file()
    # The desktop VM: a clone of the template, its disk grown to the declared 128 GiB, its own cloud-init drive.
    desktop = lab.pve.pve.vm(960)
    assert desktop is not None and not desktop.template
    assert parse_property(desktop.config["scsi0"], "file")["size"] == "128G"
    assert "vm-960-cloudinit" in desktop.config["ide2"] and desktop.config["ciuser"] == "ml"

    steps = {name: len(recorded(guest.log)) for name, guest in guests.items()}
    again, nothing = lab.apply(health_timeout=60.0)
    assert again.empty and nothing is None, [f"{c.address}: {c.reason}" for c in again.changes]
    assert {name: len(recorded(guest.log)) for name, guest in guests.items()} == steps

    script = lab.spec / "provision" / "docker-logs.sh"
    script.write_text(script.read_text().replace('"max-file": "3"', '"max-file": "5"'))
    edited, report = lab.apply(health_timeout=60.0)
    assert [(c.address, c.action) for c in edited.changes] == [
        ("provision/image", Action.UPDATE),
        ("provision/llm", Action.UPDATE),
    ] or [(c.address, c.action) for c in edited.changes] == [
        ("provision/llm", Action.UPDATE),
        ("provision/image", Action.UPDATE),
    ]
    assert all([s.step for s in c.after.steps] == ["docker-logs.sh"] for c in edited.changes)  # type: ignore[union-attr]
    assert report is not None and report.result is RunResult.APPLIED, report.failure
    for name, guest in guests.items():
        new = recorded(guest.log)[steps[name] :]
        assert new == ["systemctl restart docker"], new  # docker-logs.sh alone ran again
        assert '"max-file": "5"' in (guest.root / "etc" / "docker" / "daemon.json").read_text()

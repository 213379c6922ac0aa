"""A lab of real components for end-to-end tests: fakepve over HTTPS, a real Docker engine, the fake NVML.

`real_lab(spec_path)` (fixture factory) seeds fakepve with the spec's nodes, NVIDIA GPUs, PCI mappings
and the storages its guests use (fakepve has only `local` and `local-lvm`), writes the fake NVML state
for the spec's GPUs, points every Docker host of the spec at the test engine
(`RECONCILER_DOCKER_HOST_<NAME>`), tags the engine-shaped test image under every image the spec's
containers use, and creates the host folders they bind-mount (removed afterwards, with the containers).
Guests and Docker hosts that declare `provision:` are all reached at one sshd of the test (as every Docker
host is at one engine: RECONCILER_SSH_HOST_<NAME>, RECONCILER_SSH_KEY), whose sessions find stand-in package
tools first on PATH (`lab.standin_log` says what they were asked); the cloud-init templates the spec's VMs
are cloned from are seeded in fakepve (`LabPve.add_template`).
With `real_lab(spec, stand_in=True)` the image tagged is `stand_in_image`, which can also play plex,
postgres or redis: it listens on every container port of the spec, answers its HTTP probe paths, has
the commands its Docker HEALTHCHECKs run, and exits on SIGTERM.

Then tests plan and apply through the same code as `reconciler plan/apply` (`engine.connect` +
`engine.run`: `lab.plan()`, `lab.apply()`), or run the CLI itself with `lab.cli(...)`, whose output is
plain text (NO_COLOR, TERM=dumb, 200 columns) whatever the terminal the tests run in.

Host ports and host folders belong to the machine, not to a test session: a test holds a file lock
(LOCK_FILE) from its first lab to its teardown, so concurrent sessions on one machine take turns; the
terminal summary says how long this session waited.
"""

from __future__ import annotations

import fcntl
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import pytest

from reconciler.engine.apply import ApplyReport, HealthPolicy
from reconciler.engine.connect import Backends, connect, docker_settings
from reconciler.engine.journal import Journal
from reconciler.engine.run import ApplyOptions, apply_pass, plan_pass
from reconciler.fakes.lab import fake_gpus
from reconciler.fakes.nvml import write_state
from reconciler.planning.containers import desired_container
from reconciler.planning.plan import Plan
from reconciler.spec.models import DockerHost, Gpu, Lxc, Model, Vm
from reconciler.spec.state import DesiredState
from reconciler.spec.validate import load_and_validate
from tests.support.dockerd import DockerEngine, EngineImage
from tests.support.fakepve import PveServer
from tests.support.nvml import FakeNvml
from tests.support.sshd import Sshd, start_sshd
from tests.support.standin_servers import ANSWER
from tests.support.standins import make_standins

__all__ = ["LOCK_FILE", "MakeRealLab", "RealLab", "real_lab", "stand_in_image"]

ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = Path(tempfile.gettempdir()) / "reconciler-real-lab.lock"
# Variables that make rich/click print colour even to a pipe; `RealLab.cli` drops them.
_COLOUR_FORCING = ("FORCE_COLOR", "CLICOLOR_FORCE", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


@dataclass
class RealLab:
    spec: Path
    pve: PveServer
    engine: DockerEngine
    nvml: FakeNvml
    state_dir: Path
    env: dict[str, str]
    created_dirs: list[Path] = field(default_factory=list)
    standin_log: Path | None = None  # what the guests' stand-in package tools were asked (when a guest provisions)

    def load(self) -> DesiredState:
        result = load_and_validate(self.spec)
        errors = [str(d) for d in result.diagnostics if d.severity == "error"]
        assert not errors, errors
        return result.state

    @contextmanager
    def backends(self, desired: DesiredState | None = None) -> Iterator[Backends]:
        with connect(desired or self.load(), self.env) as backends:
            yield backends

    def journal(self) -> Journal:
        return Journal(self.state_dir / "journal.sqlite")

    def plan(self, desired: DesiredState | None = None) -> Plan:
        desired = desired or self.load()
        journal = self.journal()
        try:
            with self.backends(desired) as backends:
                return plan_pass(desired, backends, journal)
        finally:
            journal.close()

    def apply(
        self, desired: DesiredState | None = None, *, health_timeout: float = 20.0, **options: Any
    ) -> tuple[Plan, ApplyReport | None]:
        desired = desired or self.load()
        journal = self.journal()
        endpoints = {name: s.endpoint for name, s in docker_settings(desired, self.env).items()}
        opts = ApplyOptions(health=HealthPolicy(max_timeout=health_timeout, interval=0.2), **options)
        try:
            with self.backends(desired) as backends:
                return apply_pass(
                    desired,
                    backends,
                    proxmox=backends.proxmox,
                    docker=backends.docker,
                    journal=journal,
                    env=self.env,
                    docker_endpoints=endpoints,
                    options=opts,
                )
        finally:
            journal.close()

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `python -m reconciler ARGS` with this lab's environment (state dir included)."""
        env = {key: value for key, value in os.environ.items() if key not in _COLOUR_FORCING}
        env.update(self.env)
        # Plain, unwrapped text whatever the terminal: no colour or escape codes, lines never wrapped.
        env.update(RECONCILER_STATE_DIR=str(self.state_dir), NO_COLOR="1", TERM="dumb", COLUMNS="200")
        return subprocess.run(
            [sys.executable, "-m", "reconciler", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _seed(
    lab: RealLab, desired: DesiredState, engine_image: EngineImage, docker_client: Any, *, stand_in: bool
) -> None:
    pve = lab.pve.pve
    for node in desired.lab.nodes:
        pve.nodes.setdefault(node, {"online": True})
    for gpu in desired.of(Gpu):
        if gpu.pci_function0:
            pve.add_gpu(gpu.node, gpu.pci_function0.rsplit(".", 1)[0])
        if gpu.mapping and gpu.pci_function0:
            pve.add_pci_mapping(gpu.mapping, {gpu.node: [gpu.pci_function0.rsplit(".", 1)[0]]})
    _seed_storages(pve, desired)
    _seed_templates(pve, desired)
    write_state(lab.nvml.state, fake_gpus(desired))
    images: set[str] = set()
    for workload in desired.workloads():
        container = desired_container(workload, lab=desired.lab, gpu_names=(), gpu_uuids={}, revision=None)
        images.add(container.image)
        for volume in container.volumes:
            path = Path(volume.host)
            if isinstance(workload, Model) and path.suffix == ".gguf":
                path = path.parent
            missing = [p for p in (path, *path.parents) if not p.exists()]
            lab.created_dirs.extend(reversed(missing))  # parents first: removed in reverse order
            path.mkdir(parents=True, exist_ok=True)
    image_id = stand_in_image(docker_client, engine_image, desired) if stand_in else engine_image.tag
    for image in images:
        repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
        docker_client.api.tag(image_id, repository, tag or "latest")


def _guests_ssh(lab: RealLab, desired: DesiredState, folder: Path, servers: list[Sshd]) -> None:
    """Every guest and Docker host that provisions is reached at one sshd of this test (as every Docker host
    is at one engine): RECONCILER_SSH_HOST_<NAME>. Its sessions find stand-in package tools first on PATH
    (they record what they were asked), and write what a step installs under a folder of the test."""
    names = [r.name for r in desired.resources if isinstance(r, Lxc | Vm | DockerHost) and r.provision]
    if not names:
        return
    bin_dir = make_standins(folder / "bin")
    server = start_sshd(
        folder / "sshd",
        lab.state_dir / "known_hosts",
        set_env={"PATH": f"{bin_dir}:/usr/bin:/bin", "STANDIN_LOG": str(folder / "standins.log"),
                 "RECONCILER_GUEST_ROOT": str(folder / "guest-root")},
    )  # fmt: skip
    servers.append(server)
    lab.standin_log = folder / "standins.log"
    lab.env["RECONCILER_SSH_KEY"] = str(server.client_key)
    for name in names:
        lab.env[f"RECONCILER_SSH_HOST_{name.upper().replace('-', '_')}"] = f"{server.user}@127.0.0.1:{server.port}"


def _seed_templates(pve: Any, desired: DesiredState) -> None:
    """The cloud-init templates the spec's VMs are cloned from (a 3 GiB base disk the clone grows): by VMID, or
    by name (then VMID 9000 and up)."""
    spare = iter(range(9000, 9100))
    for vm in desired.of(Vm):
        if vm.clone is None:
            continue
        ref = vm.clone.template
        if any(ref in (seen.vmid, seen.name) for seen in pve.vms if seen.template):
            continue
        vmid = ref if isinstance(ref, int) else next(v for v in spare if pve.vm(v) is None)
        name = ref if isinstance(ref, str) else f"template-{vmid}"
        pve.add_template(vmid, name, node=vm.clone.node or vm.node)


def _seed_storages(pve: Any, desired: DesiredState) -> None:
    """The storages the spec's guests use, which fakepve lacks (it has `local` and `local-lvm`).

    Shaped as a lab would have them: a name with `zfs` is a ZFS pool (container volumes are subvols),
    a name starting with `nas` an NFS share (volumes are files: `nas:103/vm-103-disk-0.raw`), any
    other an LVM thin pool.
    """
    names: set[str] = set()
    for guest in desired.of(Lxc):
        names.add(guest.rootfs.storage)
        names.update(volume.storage for volume in guest.volumes)
    for vm in desired.of(Vm):
        names.update(disk.storage for disk in vm.disks)
    for name in sorted(names - set(pve.storages)):
        store: dict[str, Any] = {"active": 1, "files": set(), "volumes": {}, "content": "images,rootdir"}
        if "zfs" in name:
            store.update(type="zfspool", pool=f"rpool/{name}", sparse=1)
        elif name.startswith("nas"):
            store.update(type="nfs", server="nas.lan", export=f"/export/{name}", path=f"/mnt/pve/{name}")
        else:
            store.update(type="lvmthin", vgname=name, thinpool="data")
        pve.storages[name] = store


# The stand-in server: a model server on the port the engine's arguments (--port) or OLLAMA_HOST name, answering
# like vLLM, llama-server or Ollama through every health phase (tests/support/standin_servers.py's `/answer`),
# plus every other container port the spec publishes, since plex, postgres or redis are all played by it; it
# exits on SIGTERM (busybox httpd as PID 1 ignores it, so `docker stop` would wait out its timeout).
_STAND_IN = """#!/bin/sh
trap 'exit 0' TERM INT
port=8000; name=""; engine=vllm
case "$OLLAMA_HOST" in *:*) port="${OLLAMA_HOST##*:}"; engine=ollama;; esac
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift;;
    --served-model-name) name="$2"; shift;;
    --alias) name="$2"; engine=llamacpp; shift;;
  esac
  shift
done
mkdir -p /tmp/s; echo "$engine" > /tmp/s/engine; echo "${STANDIN_MODE:-ok}" > /tmp/s/mode; printf %s "$name" > /tmp/s/served
: > /tmp/s/pulled; : > /tmp/s/loaded
listening=" "
for p in $port $STAND_IN_PORTS; do
  case "$listening" in *" $p "*) continue;; esac
  listening="$listening$p "
  if [ "$p" = "$port" ] && { [ -n "$name" ] || [ "$engine" = ollama ]; }; then
    /bin/busybox nc -ll -p "$p" -e /answer &
  else
    /bin/busybox httpd -f -p "$p" -h "${WWW:-/www}" &
  fi
done
wait
"""


def stand_in_image(docker_client: Any, engine_image: EngineImage, desired: DesiredState) -> str:
    """An image that can play every container of the spec; returns its id.

    Built from the engine image (no registry, classic builder, COPY only): it listens on every container
    port of the spec, answers every HTTP probe path with 200 and a body holding "ok Healthy" (probe
    `body` patterns of the examples match it), and has each command the spec's Docker HEALTHCHECKs run
    (`pg_isready`, `redis-cli`) as a script that exits 0.
    """
    ports: set[int] = set()
    paths = {"/health"}
    commands: set[str] = set()
    for workload in desired.workloads():
        container = desired_container(workload, lab=desired.lab, gpu_names=(), gpu_uuids={}, revision=None)
        ports.update(port.container for port in container.ports)
        if container.probe is not None and container.probe.http:
            paths.add(urlsplit(container.probe.http).path or "/")
        test = list(container.healthcheck.test if container.healthcheck else ())
        if test[:1] == ["CMD"] and len(test) > 1 and "/" not in test[1]:
            commands.add(test[1])
    files: dict[str, tuple[bytes, int]] = {
        "root/stand-in": (_STAND_IN.encode(), 0o755),
        "root/answer": (ANSWER.encode(), 0o755),
    }
    for path in paths:
        name = "root/www" + path + ("index.html" if path.endswith("/") else "")
        files[name] = (b"ok Healthy\n", 0o644)
    for command in commands:
        files[f"root/bin/{command}"] = (b"#!/bin/sh\nexit 0\n", 0o755)
    dockerfile = "\n".join(
        [
            f"FROM {engine_image.tag}",
            "COPY root/ /",
            'ENTRYPOINT ["/bin/sh", "/stand-in"]',
            f'ENV STAND_IN_PORTS="{" ".join(str(p) for p in sorted(ports))}"',
            "",
        ]
    )
    files["Dockerfile"] = (dockerfile.encode(), 0o644)
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    image, _ = docker_client.images.build(fileobj=context, custom_context=True, rm=True, forcerm=True)
    return str(image.id)


class MakeRealLab(Protocol):
    def __call__(self, spec: Path, *, stand_in: bool = False) -> RealLab: ...


_lock_waits: list[float] = []  # seconds each lab of this session waited for the machine lock


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how long this session's labs waited for other sessions' (their time is in the test durations)."""
    waited = sum(_lock_waits)
    if waited >= 1.0:
        terminalreporter.write_line(
            f"real_lab: {waited:.1f}s waiting for labs of other test sessions on this machine ({LOCK_FILE})"
        )


@contextmanager
def _machine_lock() -> Iterator[None]:
    """Labs of concurrent test sessions on one machine take turns.

    Each session has its own fakepve and Docker engine, but the host ports containers publish and the
    host folders they bind-mount (created here, removed afterwards) belong to the machine: two sessions
    applying labs at once would collide on both.
    """
    with LOCK_FILE.open("a") as handle:
        started = time.monotonic()
        fcntl.flock(handle, fcntl.LOCK_EX)
        _lock_waits.append(time.monotonic() - started)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture
def real_lab(
    pve_server: PveServer,
    docker_engine: DockerEngine,
    docker_client: Any,
    engine_image: EngineImage,
    fake_nvml: FakeNvml,
    tmp_path: Path,
) -> Iterator[MakeRealLab]:
    """A factory: `real_lab(spec_folder)` -> a seeded RealLab; `stand_in=True` plays every image of the spec
    with `stand_in_image`. The test holds the machine's lab lock from its first lab to its teardown;
    containers it made are removed afterwards, and the host folders it created."""
    made: list[RealLab] = []
    servers: list[Sshd] = []
    locked = ExitStack()

    def make(spec: Path, *, stand_in: bool = False) -> RealLab:
        if not made:
            locked.enter_context(_machine_lock())
        desired = load_and_validate(spec).state
        auth = "password" if desired.lab.proxmox is not None and desired.lab.proxmox.auth == "password" else "token"
        env = {
            **pve_server.env(auth),
            "RECONCILER_NVML_LIBRARY": str(fake_nvml.library),
            "FAKE_NVML_STATE": str(fake_nvml.state),
        }
        for name in desired.docker_hosts():
            env[f"RECONCILER_DOCKER_HOST_{name.upper().replace('-', '_')}"] = docker_engine.endpoint
        lab = RealLab(spec, pve_server, docker_engine, fake_nvml, tmp_path / f"state-{len(made)}", env)
        made.append(lab)
        _seed(lab, desired, engine_image, docker_client, stand_in=stand_in)
        _guests_ssh(lab, desired, tmp_path / f"guests-{len(made)}", servers)
        return lab

    with locked:
        try:
            yield make
        finally:
            for server in servers:
                server.stop()
        for container in docker_client.containers.list(all=True):
            # Made by a lab: its owner's `<owner>.managed` label (the owner tag is derived from the lab's name).
            if any(key.endswith(".managed") and value == "true" for key, value in container.labels.items()):
                container.remove(force=True)
        for lab in made:
            for path in reversed(lab.created_dirs):
                with suppress(OSError):
                    path.rmdir()

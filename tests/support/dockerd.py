"""A real, private Docker engine for the test session, and a model-server image made without a registry.

Fixtures (session scope):

- `docker_engine`: a `DockerEngine` whose `.endpoint` (``unix:///tmp/rdk-XXXX/docker.sock``) reaches a
  `dockerd` started for this session (vfs storage, no iptables, its own data-root and exec-root), stopped
  at the end (SIGTERM, then SIGKILL). With RECONCILER_TEST_DOCKER_HOST set, that engine is used instead
  and nothing is started or stopped. Where no engine can be had, `components.missing()` skips the test
  (fails it under CI).
- `second_docker_engine`: another private dockerd (always started here), for tests where two Docker hosts
  must be two engines.
- `docker_client`: a raw docker SDK client on that engine, for tests to check what the engine holds
  independently of the backend under test.
- `model_server_image`: images imported from a tar of a folder holding the static busybox; no registry.
  ``reconciler-test/model-server:1`` runs ``busybox httpd -f -p 8000 -h /www`` and serves ``/health``
  (body ``ok``) and ``/v1/models`` (an OpenAI-style model list) as files. ``reconciler-test/model-server:broken``
  runs the same server on ``/www-broken``, where ``/v1/models`` exists but ``/health`` does not: a health
  probe gets HTTP 404 (for rollback tests). Both images have PATH=/bin and every busybox applet in /bin.

Register them for the whole suite with ``pytest_plugins = ["tests.support.dockerd"]`` in tests/conftest.py,
or import the fixtures into a test module.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.components import missing

__all__ = [
    "BUSYBOX",
    "ENV_DOCKER_HOST",
    "DockerEngine",
    "ModelServerImage",
    "docker_client",
    "docker_engine",
    "model_server_image",
    "second_docker_engine",
]

ENV_DOCKER_HOST = "RECONCILER_TEST_DOCKER_HOST"
BUSYBOX = Path(os.environ.get("RECONCILER_TEST_BUSYBOX", "/bin/busybox"))
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
MODEL_SERVER_PORT = 8000


@dataclass(frozen=True)
class DockerEngine:
    """A Docker engine the tests may use. `log` is dockerd's output when this session started it."""

    endpoint: str
    log: Path | None = None
    pid: int | None = None
    startup_seconds: float | None = None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of dockerd's log, for failure messages ("" when the engine is not ours)."""
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class ModelServerImage:
    """The busybox model-server images: `tag` healthy, `broken` answering 404 on the health path."""

    tag: str = "reconciler-test/model-server:1"
    broken: str = "reconciler-test/model-server:broken"
    port: int = MODEL_SERVER_PORT
    health_path: str = "/health"
    models_path: str = "/v1/models"
    healthcheck: tuple[str, ...] = (
        "CMD",
        "/bin/busybox",
        "wget",
        "-q",
        "-O",
        "/dev/null",
        f"http://127.0.0.1:{MODEL_SERVER_PORT}/health",
    )


# ---- the engine ----------------------------------------------------------------------------


def _ping(socket_path: str, timeout: float = 1.0) -> bool:
    """Whether the engine on a unix socket answers GET /_ping with OK."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0] and reply.endswith(b"OK")


def _stop(process: subprocess.Popen[bytes]) -> bool:
    """SIGTERM dockerd, then SIGKILL its process group after STOP_TIMEOUT. True when it stopped by itself."""
    if process.poll() is not None:
        return True
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own session: dockerd and the containerd it started
        process.wait(timeout=STOP_TIMEOUT)
        return False
    return True


def _ip(*args: str) -> bool:
    ip = shutil.which("ip")
    if ip is None:
        return False
    return subprocess.run([ip, *args], capture_output=True, check=False).returncode == 0


def _make_bridge(name: str) -> bool:
    """A bridge of our own, so that concurrent test sessions' engines do not share docker0 and its addresses.

    False (the engine then uses docker0) when `ip` is missing or may not create links.
    """
    ip = shutil.which("ip")
    if ip is None:
        return False
    taken = subprocess.run([ip, "-o", "-4", "addr"], capture_output=True, text=True, check=False).stdout
    for _ in range(20):
        subnet = f"10.{random.randint(200, 249)}.{random.randint(0, 255)}"
        if f" {subnet}." not in taken:
            break
    else:
        return False
    if not _ip("link", "add", "name", name, "type", "bridge"):
        return False
    if _ip("addr", "add", f"{subnet}.1/24", "dev", name) and _ip("link", "set", name, "up"):
        return True
    _ip("link", "del", name)
    return False


def _existing_engine(endpoint: str) -> DockerEngine:
    import docker

    try:
        client = docker.DockerClient(base_url=endpoint, timeout=10)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - any failure means the engine is not usable
        missing("Docker engine", f"{ENV_DOCKER_HOST}={endpoint} does not answer: {type(exc).__name__}: {exc}")
    return DockerEngine(endpoint=endpoint)


@contextlib.contextmanager
def _private_engine(log_dir: Path) -> Iterator[DockerEngine]:
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        missing("Docker engine", "dockerd is not on PATH (apt-get install docker.io)")
    if os.geteuid() != 0:
        missing("Docker engine", "starting a private dockerd needs root")
    # Short paths: a unix socket path must fit in ~100 bytes, and containerd's sockets live under exec-root.
    base = Path(tempfile.mkdtemp(prefix="rdk-", dir="/tmp"))
    socket_path = base / "docker.sock"
    config = base / "daemon.json"
    config.write_text("{}\n")  # never read the machine's /etc/docker/daemon.json
    log = log_dir / "dockerd.log"
    bridge = base.name.replace("-", "")[:15]  # rdkXXXXXXXX: an interface name is at most 15 characters
    has_bridge = _make_bridge(bridge)
    command = [
        dockerd,
        "--iptables=false",
        "--storage-driver=vfs",
        f"--host=unix://{socket_path}",
        f"--data-root={base / 'data'}",
        f"--exec-root={base / 'x'}",
        f"--pidfile={base / 'dockerd.pid'}",
        f"--config-file={config}",
    ]
    if has_bridge:
        command.append(f"--bridge={bridge}")
    # The NVIDIA toolkit's OCI hook, faked: dockerd registers its "nvidia" device driver when the hook is on
    # its PATH, so GPU device requests (by NVML UUID) are accepted and recorded as on a GPU host.
    hooks = base / "hooks"
    hooks.mkdir()
    hook = hooks / "nvidia-container-runtime-hook"
    hook.write_text("#!/bin/sh\ncat >/dev/null\nexit 0\n")
    hook.chmod(0o755)
    environment = {**os.environ, "PATH": f"{hooks}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    started = time.monotonic()
    try:
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=environment,
            )
    except OSError as exc:
        if has_bridge:
            _ip("link", "del", bridge)
        shutil.rmtree(base, ignore_errors=True)
        missing("Docker engine", f"dockerd cannot be started: {exc}")
    engine = DockerEngine(endpoint=f"unix://{socket_path}", log=log, pid=process.pid)
    try:
        deadline = started + START_TIMEOUT
        while not _ping(str(socket_path)):
            if process.poll() is not None:
                missing("Docker engine", f"dockerd exited with {process.returncode}:\n{engine.log_tail()}")
            if time.monotonic() > deadline:
                missing("Docker engine", f"dockerd did not answer in {START_TIMEOUT:.0f}s:\n{engine.log_tail()}")
            time.sleep(0.05)
        engine = DockerEngine(
            endpoint=engine.endpoint, log=log, pid=process.pid, startup_seconds=time.monotonic() - started
        )
        yield engine
    finally:
        clean = _stop(process)
        if has_bridge:
            _ip("link", "del", bridge)
        if clean:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"dockerd had to be killed; its state is left in {base} (log: {log})")


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """A running Docker engine: RECONCILER_TEST_DOCKER_HOST if set, else a private dockerd for the session."""
    endpoint = os.environ.get(ENV_DOCKER_HOST)
    if endpoint:
        yield _existing_engine(endpoint)
        return
    with _private_engine(tmp_path_factory.mktemp("dockerd")) as engine:
        yield engine


@pytest.fixture(scope="session")
def docker_client(docker_engine: DockerEngine) -> Iterator[Any]:
    """A raw docker SDK client on the test engine, to check what the engine holds."""
    import docker

    client = docker.DockerClient(base_url=docker_engine.endpoint, timeout=60)
    yield client
    client.close()


# ---- the model-server image ---------------------------------------------------------------------------


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _add_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    tar.addfile(info)


def _rootfs_tar() -> bytes:
    """A root filesystem: /bin/busybox (+ applet links), /www (healthy) and /www-broken (no /health)."""
    if not BUSYBOX.is_file():
        missing("busybox", f"{BUSYBOX} is missing (apt-get install busybox-static)")
    applets = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True).stdout.split()
    models = json.dumps({"object": "list", "data": [{"id": "test-model", "object": "model", "owned_by": "tests"}]})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in ("bin", "tmp", "www", "www/v1", "www-broken", "www-broken/v1"):
            _add_dir(tar, folder)
        _add_file(tar, "bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                _add_symlink(tar, f"bin/{applet}", "busybox")
        _add_file(tar, "serve", ENGINE_SCRIPT.encode(), mode=0o755)
        _add_file(tar, "www/health", b"ok\n")
        _add_file(tar, "www/v1/models", models.encode())
        _add_file(tar, "www-broken/v1/models", models.encode())
    return buffer.getvalue()


ENGINE_SCRIPT = """#!/bin/sh
# Plays vLLM, llama-server or Ollama: serves /health and /v1/models on the port the engine's
# arguments (--port N) or OLLAMA_HOST name, whatever else the arguments say.
port=8000
case "$OLLAMA_HOST" in *:*) port="${OLLAMA_HOST##*:}";; esac
while [ $# -gt 0 ]; do
  case "$1" in --port) port="$2"; shift;; esac
  shift
done
exec /bin/busybox httpd -f -p "$port" -h "${WWW:-/www}"
"""


@dataclass(frozen=True)
class EngineImage:
    """Images that take an engine's command line: `tag` answers /health, `broken` answers 404 there."""

    tag: str = "reconciler-test/engine:1"
    broken: str = "reconciler-test/engine:broken"


@pytest.fixture(scope="session")
def engine_image(docker_client: Any) -> EngineImage:
    """Import the engine-shaped images; tests `docker tag` them as vllm/llama.cpp/ollama images."""
    image = EngineImage()
    rootfs = _rootfs_tar()
    for tag, root in ((image.tag, "/www"), (image.broken, "/www-broken")):
        repository, _, version = tag.rpartition(":")
        changes = ['ENTRYPOINT ["/bin/sh", "/serve"]', "ENV PATH=/bin", f"ENV WWW={root}"]
        docker_client.api.import_image_from_data(rootfs, repository=repository, tag=version, changes=changes)
        docker_client.api.inspect_image(tag)
    return image


def _httpd_changes(root: str) -> list[str]:
    command = json.dumps(["/bin/busybox", "httpd", "-f", "-p", str(MODEL_SERVER_PORT), "-h", root])
    return [f"CMD {command}", f"EXPOSE {MODEL_SERVER_PORT}", "ENV PATH=/bin"]


@pytest.fixture(scope="session")
def model_server_image(docker_client: Any) -> ModelServerImage:
    """Import the busybox model-server images into the test engine (no registry)."""
    image = ModelServerImage()
    rootfs = _rootfs_tar()
    for tag, root in ((image.tag, "/www"), (image.broken, "/www-broken")):
        repository, _, version = tag.rpartition(":")
        docker_client.api.import_image_from_data(
            rootfs, repository=repository, tag=version, changes=_httpd_changes(root)
        )
        docker_client.api.inspect_image(tag)  # raises when the import did not produce the tag
    return image


@pytest.fixture(scope="session")
def second_docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """Another private dockerd for the session, so that two Docker hosts of a spec are two engines, as in a lab."""
    with _private_engine(tmp_path_factory.mktemp("dockerd-2")) as engine:
        yield engine

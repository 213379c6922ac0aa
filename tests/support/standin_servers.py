"""Stand-in model servers in real Docker: an image that answers like vLLM, llama-server and Ollama.

The image is made without a registry or a build: a tar of a folder holding the static busybox, two shell
scripts and a stand-in `nvidia-smi`, imported with `docker import` (FROM scratch, in effect). busybox
`nc -ll -e` runs the answer script once per connection, which speaks just enough HTTP/1.0:

- vLLM (`--served-model-name NAME`): refuses connections while it "loads", then `/health` 200,
  `/v1/models` lists NAME, `/v1/chat/completions` answers one token.
- llama-server (`--alias NAME`): listens at once; `/health` is 503 `Loading model` until loaded.
- Ollama (`OLLAMA_HOST=0.0.0.0:PORT`): `/` "Ollama is running", `/api/tags`, `/api/pull` (remembered),
  `/api/generate`; `/v1/models` lists what was pulled.

The container's environment chooses how it behaves (`STANDIN_*`, set per test or in a spec's `env`):
STANDIN_LOAD_SECONDS (fractional, default 0) and STANDIN_MODE: `ok`, `loading` (never loads), `exit`
(dies with "CUDA out of memory" when the load would end), `bad-completion` (completion answers 500),
`wrong-name` (lists another model), `huge` (a 2 MiB model list), `not-json` (an HTML model list).
SIGTERM ends it at once, as `docker stop` expects.

`nvidia-smi` answers the two queries DockerBackend.query_gpus makes, from /fake-smi/gpus and
/fake-smi/apps baked into the image (`standin_image(client, gpus=..., apps=...)`).
"""

from __future__ import annotations

import hashlib
import io
import socket
import subprocess
import tarfile
from dataclasses import dataclass
from typing import Any

import pytest

from reconciler.backends.docker import DockerBackend
from reconciler.engine.health import ModelServer
from reconciler.engine.switch import Member
from reconciler.planning.container_run import ContainerRun
from reconciler.planning.gpusight import COMPUTE_APPS_QUERY, GPU_QUERY
from reconciler.planning.observed import ContainerPort
from tests.support.components import missing
from tests.support.dockerd import BUSYBOX

__all__ = ["ANSWER", "MODES", "STANDIN_GPUS", "Servers", "StandinImage", "standin_image", "standin_server_image"]

_REPOSITORY = "reconciler-test/standin-server"

MODES = ("ok", "loading", "exit", "bad-completion", "wrong-name", "huge", "not-json")

# Two RTX 3090 with their memory free (the inference VM's GPUs, seen from inside the VM).
STANDIN_GPUS = (
    "0, GPU-3090a000-0000-0000-0000-000000000000, 00000000:01:00.0, NVIDIA GeForce RTX 3090, 24576, 0, 24576, "
    "0, 35, 20.00, 350.00, 580.105.08\n"
    "1, GPU-3090b000-0000-0000-0000-000000000000, 00000000:02:00.0, NVIDIA GeForce RTX 3090, 24576, 0, 24576, "
    "0, 35, 20.00, 350.00, 580.105.08\n"
)

_SERVE = """#!/bin/sh
trap 'exit 0' TERM INT
port=8000; name=""; engine=""
case "$OLLAMA_HOST" in *:*) port="${OLLAMA_HOST##*:}"; engine=ollama;; esac
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift;;
    --served-model-name) name="$2"; engine=vllm; shift;;
    --alias) name="$2"; engine=llamacpp; shift;;
  esac
  shift
done
engine="${engine:-vllm}"; mode="${STANDIN_MODE:-ok}"; load="${STANDIN_LOAD_SECONDS:-0}"
mkdir -p /tmp/s; rm -f /tmp/s/loaded /tmp/s/pulled
echo "$engine" > /tmp/s/engine; echo "$mode" > /tmp/s/mode; printf %s "$name" > /tmp/s/served; : > /tmp/s/pulled
loading() {
  [ "$mode" = loading ] && { sleep 2147483647 & wait $!; }
  sleep "$load" & wait $!
  if [ "$mode" = exit ]; then echo "torch.OutOfMemoryError: CUDA out of memory" >&2; exit 1; fi
  : > /tmp/s/loaded
}
if [ "$engine" = vllm ]; then
  loading  # vLLM's API server listens only once the model is loaded
  nc -ll -p "$port" -e /answer & wait $!
else
  nc -ll -p "$port" -e /answer &
  loading
  wait
fi
"""

ANSWER = r"""#!/bin/sh
read -r method path version
length=0
while read -r line; do
  line=$(printf %s "$line" | tr -d '\r')
  [ -z "$line" ] && break
  case "$line" in [Cc]ontent-[Ll]ength:*) length="${line#*: }";; esac
done
asked=""
[ "$length" -gt 0 ] 2>/dev/null && asked=$(head -c "$length")
engine=$(cat /tmp/s/engine); mode=$(cat /tmp/s/mode); served=$(cat /tmp/s/served)
[ "$engine" = ollama ] && served=$(cat /tmp/s/pulled)
[ "$mode" = wrong-name ] && served="some-other-model"
loaded=no; [ -e /tmp/s/loaded ] && loaded=yes
status="200 OK"; body="{}"
reply() { printf 'HTTP/1.0 %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "$status" "${#body}" "$body"; exit 0; }
if [ $loaded = no ] && [ "$engine" != ollama ]; then
  status="503 Service Unavailable"; body='{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'; reply
fi
case "${path%%\?*}" in
  /health) [ "$engine" = llamacpp ] && body='{"status":"ok"}';;
  /v1/models)
    if [ "$mode" = huge ]; then
      printf 'HTTP/1.0 200 OK\r\nContent-Length: 2097152\r\nConnection: close\r\n\r\n'
      head -c 2097152 /dev/zero | tr '\0' x; exit 0
    fi
    [ "$mode" = not-json ] && { body='<html>It works</html>'; reply; }
    body="{\"object\":\"list\",\"data\":[{\"id\":\"$served\",\"object\":\"model\",\"owned_by\":\"standin\"}]}";;
  /v1/chat/completions)
    [ "$mode" = bad-completion ] && { status="500 Internal Server Error"; body='{"error":{"message":"CUDA error: an illegal memory access was encountered"}}'; reply; }
    body="{\"id\":\"c1\",\"object\":\"chat.completion\",\"model\":\"$served\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"p\"},\"finish_reason\":\"length\"}]}";;
  /) body='Ollama is running';;
  /api/tags) [ -s /tmp/s/pulled ] && body="{\"models\":[{\"name\":\"$served\"}]}" || body='{"models":[]}';;
  /api/pull) printf %s "$asked" | sed -n 's/.*"model": *"\([^"]*\)".*/\1/p' > /tmp/s/pulled; body='{"status":"success"}';;
  /api/generate) body='{"done":true,"done_reason":"load"}';;
  *) status="404 Not Found"; body='{"error":"not found"}';;
esac
reply
"""

_NVIDIA_SMI = f"""#!/bin/sh
case "$*" in
  "--query-gpu={GPU_QUERY} --format=csv,noheader,nounits") cat /fake-smi/gpus ;;
  "--query-compute-apps={COMPUTE_APPS_QUERY} --format=csv,noheader,nounits") cat /fake-smi/apps ;;
  *) echo "unexpected arguments: $*" >&2; exit 2 ;;
esac
"""


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, *, mode: int = 0o644, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    if link:
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, link, 0o777
        tar.addfile(info)
    elif data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), mode
        tar.addfile(info, io.BytesIO(data))


def _rootfs(gpus: str, apps: str) -> bytes:
    if not BUSYBOX.is_file():
        missing("busybox", f"{BUSYBOX} is missing (apt-get install busybox-static)")
    applets = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in ("bin", "tmp", "usr", "usr/bin", "fake-smi"):
            _add(tar, folder)
        _add(tar, "bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                _add(tar, f"bin/{applet}", link="busybox")
        _add(tar, "serve", _SERVE.encode(), mode=0o755)
        _add(tar, "answer", ANSWER.encode(), mode=0o755)
        _add(tar, "usr/bin/nvidia-smi", _NVIDIA_SMI.encode(), mode=0o755)
        _add(tar, "fake-smi/gpus", gpus.encode())
        _add(tar, "fake-smi/apps", apps.encode())
    return buffer.getvalue()


@dataclass(frozen=True)
class StandinImage:
    """`server` runs the stand-in model server; `tools` (no entrypoint) runs commands, nvidia-smi among them."""

    server: str
    tools: str


def standin_image(docker_client: Any, *, gpus: str = STANDIN_GPUS, apps: str = "") -> StandinImage:
    """Import the stand-in images (tagged by their content) into the engine of `docker_client`."""
    rootfs = _rootfs(gpus, apps)
    version = hashlib.sha256(rootfs).hexdigest()[:12]
    image = StandinImage(f"{_REPOSITORY}:{version}", f"{_REPOSITORY}:{version}-tools")
    for tag, entrypoint in ((image.server, ['ENTRYPOINT ["/bin/sh", "/serve"]']), (image.tools, [])):
        changes = [*entrypoint, "ENV PATH=/bin:/usr/bin"]
        docker_client.api.import_image_from_data(
            rootfs, repository=_REPOSITORY, tag=tag.rpartition(":")[2], changes=changes
        )
        docker_client.api.inspect_image(tag)  # raises when the import did not produce the tag
    return image


@pytest.fixture(scope="session")
def standin_server_image(docker_client: Any) -> StandinImage:
    """The stand-in model-server image in the session's engine, with STANDIN_GPUS behind its nvidia-smi."""
    return standin_image(docker_client)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Servers:
    """Stand-in model-server containers on one engine, made through the real backend; removed afterwards."""

    def __init__(self, backend: DockerBackend, image: StandinImage, host: str = "infer") -> None:
        self.backend, self.image, self.host = backend, image, host
        self.made: list[str] = []

    def make(self, name: str, engine: str = "vllm", *, start: bool = False, **env: str) -> Member:
        port = _free_port()
        command: tuple[str, ...] | None = ("--port", "8000")
        environment = {f"STANDIN_{key.upper()}": value for key, value in env.items()}
        served = f"{name}-model"
        if engine == "vllm":
            command = ("--served-model-name", served, "--port", "8000")
        elif engine == "llamacpp":
            command = ("--alias", served, "--port", "8000")
        else:
            command, served = None, "llama3.1:8b"
            environment["OLLAMA_HOST"] = "0.0.0.0:8000"
        run = ContainerRun(
            name=name,
            image=self.image.server,
            command=command,
            env=environment,
            ports=(ContainerPort(bind="127.0.0.1", host=port, container=8000, protocol="tcp"),),
            restart="no",
        )
        self.backend.create_container(self.host, run)
        self.made.append(name)
        health = "/" if engine == "ollama" else "/health"
        member = Member(self.host, name, ModelServer(f"http://127.0.0.1:{port}", served, health_path=health))
        if start:
            self.backend.start_container(self.host, name)
        return member

    def status(self, name: str) -> str:
        state = self.backend.container_state(self.host, name)
        return state.status if state else "gone"

    def remove(self) -> None:
        for name in self.made:
            self.backend.remove_container(self.host, name, force=True)

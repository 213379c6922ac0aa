"""The Docker backend against a real engine: what it creates is what the engine holds and what observe returns."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from reconciler.backends.docker import (
    REGISTRY_RATE_LIMIT_DELAY,
    ContainerHealthcheck,
    ContainerRun,
    DockerBackend,
    DockerHostSettings,
)
from reconciler.errors import BackendError, NotFoundError, PermanentError, TemporaryError
from reconciler.loop.backoff import Backoff
from reconciler.planning.observed import ContainerPort, ContainerVolume
from tests.support.dockerd import DockerEngine, ModelServerImage

# docker_engine, docker_client and model_server_image come from tests.support.dockerd, which tests/conftest.py
# registers as a plugin (one engine for the whole session).

pytestmark = pytest.mark.docker

HOST = "lab"
SECRET = "s3cret-token-value"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http_get(url: str, *, timeout: float = 20.0) -> tuple[int, bytes]:
    """GET `url`, retrying connection failures until `timeout`; returns (status, body)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def backend(docker_engine: DockerEngine) -> Iterator[DockerBackend]:
    with DockerBackend({HOST: DockerHostSettings(name=HOST, endpoint=docker_engine.endpoint, timeout=30)}) as b:
        yield b


@pytest.fixture
def names(docker_client: Any) -> Iterator[list[str]]:
    """Container names a test creates; every one is force-removed afterwards."""
    created: list[str] = []
    yield created
    for name in created:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.api.remove_container(name, force=True)


def _name(names: list[str], stem: str) -> str:
    name = f"rt-{stem}-{uuid.uuid4().hex[:8]}"
    names.append(name)
    return name


def _plain_run(name: str, image: ModelServerImage, **changes: Any) -> ContainerRun:
    return ContainerRun(name=name, image=image.tag, restart="no", **changes)


def test_created_container_is_observed_with_exactly_its_settings(
    backend: DockerBackend,
    docker_client: Any,
    model_server_image: ModelServerImage,
    names: list[str],
    tmp_path: Path,
) -> None:
    name = _name(names, "full")
    port = _free_port()
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    run = ContainerRun(
        name=name,
        image=model_server_image.tag,
        env={"MODEL_NAME": "test-model", "API_KEY": SECRET},
        labels={"app": "model-server"},
        ports=(ContainerPort(host=port, container=8000, bind="127.0.0.1"),),
        volumes=(ContainerVolume(host=str(tmp_path), path="/models", readonly=True),),
        restart="unless-stopped",
        shm_size=128 * 1024**2,
        ipc="private",
        healthcheck=ContainerHealthcheck(
            test=model_server_image.healthcheck, interval=1.0, timeout=2.0, retries=3, start_period=0.5
        ),
    )

    container_id = backend.create_container(HOST, run)
    backend.start_container(HOST, name)

    # What the engine now holds, read with an independent client.
    raw = docker_client.api.inspect_container(name)
    assert raw["Id"] == container_id
    assert raw["Config"]["Healthcheck"] == {
        "Test": list(model_server_image.healthcheck),
        "Interval": 1_000_000_000,
        "Timeout": 2_000_000_000,
        "StartPeriod": 500_000_000,
        "Retries": 3,
    }
    assert raw["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert raw["State"]["Running"] is True

    # What observe returns.
    observation = backend.observe()[HOST]
    assert observation.reachable
    assert observation.error is None
    assert {model_server_image.tag, model_server_image.broken} <= observation.images
    [seen] = [c for c in observation.containers if c.name == name]
    assert seen.host == HOST
    assert seen.id == container_id
    assert seen.image == model_server_image.tag
    assert seen.image_id == docker_client.api.inspect_image(model_server_image.tag)["Id"]
    assert seen.command == ("/bin/busybox", "httpd", "-f", "-p", "8000", "-h", "/www")  # the image's CMD
    assert seen.entrypoint is None
    assert seen.env == {"PATH": "/bin", "MODEL_NAME": "test-model", "API_KEY": SECRET}
    assert seen.labels == {"app": "model-server", "reconciler.managed": "true"}
    assert seen.ports == (ContainerPort(host=port, container=8000, bind="127.0.0.1", protocol="tcp"),)
    assert seen.volumes == (ContainerVolume(host=str(tmp_path), path="/models", readonly=True),)
    assert seen.gpus == ()
    assert seen.devices == ()
    assert seen.restart == "unless-stopped"
    assert seen.status == "running"
    assert seen.health in {"starting", "healthy"}
    assert seen.restart_count == 0
    assert seen.shm_size == 128 * 1024**2
    assert seen.ipc == "private"
    assert seen.network_mode == "default"

    # The published port answers like a model server, and Docker's own health check agrees.
    status, body = _http_get(f"http://127.0.0.1:{port}/health")
    assert (status, body) == (200, b"ok\n")
    status, body = _http_get(f"http://127.0.0.1:{port}/v1/models")
    assert status == 200
    assert b"test-model" in body
    deadline = time.monotonic() + 30
    while (state := backend.container_state(HOST, name)) is not None and state.health != "healthy":
        assert time.monotonic() < deadline, f"never healthy: {state}"
        time.sleep(0.2)
    assert state is not None
    assert state.health == "healthy"
    # The mount is read-only inside the container.
    exec_id = docker_client.api.exec_create(name, ["/bin/busybox", "touch", "/models/new"])
    docker_client.api.exec_start(exec_id)
    assert docker_client.api.exec_inspect(exec_id)["ExitCode"] != 0
    assert not (tmp_path / "new").exists()


def test_unlabelled_container_is_seen_only_when_its_name_is_of_interest(
    backend: DockerBackend,
    docker_client: Any,
    model_server_image: ModelServerImage,
    names: list[str],
) -> None:
    owned = _name(names, "owned")
    foreign = _name(names, "foreign")
    backend.create_container(HOST, _plain_run(owned, model_server_image))
    docker_client.api.create_container(model_server_image.tag, name=foreign, labels={"someone": "else"})

    def seen(observation_names: Any = ()) -> set[str]:
        return {c.name for c in backend.observe(observation_names)[HOST].containers if c.name in {owned, foreign}}

    assert seen() == {owned}
    assert seen({foreign}) == {owned, foreign}
    assert seen({HOST: {foreign}}) == {owned, foreign}
    assert seen({"another-host": {foreign}}) == {owned}
    [unowned] = [c for c in backend.observe({foreign})[HOST].containers if c.name == foreign]
    assert "reconciler.managed" not in unowned.labels
    assert unowned.status == "created"
    assert unowned.restart == "no"


def test_owner_label_is_configurable(
    docker_engine: DockerEngine, model_server_image: ModelServerImage, names: list[str]
) -> None:
    settings = {HOST: DockerHostSettings(name=HOST, endpoint=docker_engine.endpoint)}
    with DockerBackend(settings, owner_label="alt") as alt, DockerBackend(settings) as default:
        name = _name(names, "alt")
        alt.create_container(HOST, _plain_run(name, model_server_image))
        assert name in {c.name for c in alt.observe()[HOST].containers}
        assert name not in {c.name for c in default.observe()[HOST].containers}
        state = alt.container_state(HOST, name)
        assert state is not None
        assert state.labels == {"alt.managed": "true"}


def test_unreachable_host_is_reported_not_raised(docker_engine: DockerEngine, tmp_path: Path) -> None:
    hosts = {
        HOST: DockerHostSettings(name=HOST, endpoint=docker_engine.endpoint),
        "gone": DockerHostSettings(name="gone", endpoint=f"unix://{tmp_path}/no/docker.sock", timeout=5),
    }
    with DockerBackend(hosts) as backend:
        started = time.monotonic()
        observed = backend.observe()
        assert time.monotonic() - started < 10

    assert set(observed) == {HOST, "gone"}
    assert observed[HOST].reachable
    gone = observed["gone"]
    assert not gone.reachable
    assert gone.containers == ()
    assert gone.error is not None
    assert "gone" in gone.error


def test_unreachable_host_raises_a_temporary_error_on_writes(tmp_path: Path) -> None:
    endpoint = f"unix://{tmp_path}/no/docker.sock"
    with (
        DockerBackend({"gone": DockerHostSettings(name="gone", endpoint=endpoint)}) as backend,
        pytest.raises(TemporaryError) as caught,
    ):
        backend.start_container("gone", "anything")
    assert caught.value.retryable
    assert "gone" in str(caught.value)
    assert caught.value.__cause__ is not None


def test_ensure_image_present_is_a_no_op_and_missing_image_is_named(
    backend: DockerBackend, docker_client: Any, model_server_image: ModelServerImage
) -> None:
    before = docker_client.api.inspect_image(model_server_image.tag)["Id"]
    backend.ensure_image(HOST, model_server_image.tag)
    assert docker_client.api.inspect_image(model_server_image.tag)["Id"] == before

    image = f"reconciler-test/does-not-exist-{uuid.uuid4().hex[:8]}:1"
    with pytest.raises(BackendError) as caught:
        backend.ensure_image(HOST, image)
    assert image in str(caught.value)
    assert caught.value.resource == image
    assert image not in {tag for i in docker_client.api.images() for tag in i.get("RepoTags") or ()}


class _RateLimitingRegistry(BaseHTTPRequestHandler):
    """A registry (distribution API v2) that answers every manifest request as Docker Hub over its pull limit."""

    seen: list[str]

    def _answer(self) -> None:
        self.seen.append(f"{self.command} {self.path}")
        if self.path.rstrip("/") == "/v2":
            body, status = b"{}", 200
        else:
            error = {"code": "TOOMANYREQUESTS", "message": "You have reached your pull rate limit."}
            body, status = json.dumps({"errors": [error]}).encode(), 429
        self.send_response(status)
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 429:
            self.send_header("Retry-After", "21600")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _rate_limiting_registry() -> Iterator[tuple[str, list[str]]]:
    """The registry on 127.0.0.1 (which dockerd reaches over plain HTTP) and the requests it saw."""
    seen: list[str] = []
    handler = type("Handler", (_RateLimitingRegistry,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="rate-limiting-registry", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_registrys_pull_rate_limit_is_a_temporary_error_with_a_delay_the_loop_honours(
    backend: DockerBackend, docker_client: Any
) -> None:
    with _rate_limiting_registry() as (registry, seen):
        image = f"{registry}/lab/model:1"
        with pytest.raises(TemporaryError) as caught:
            backend.ensure_image(HOST, image)
    assert any("/manifests/1" in request for request in seen)  # the engine did ask the registry
    assert caught.value.retryable
    assert caught.value.resource == image
    assert "toomanyrequests" in str(caught.value)
    # The engine keeps the registry's Retry-After to itself (Docker 20.10 answers 500): the backend's floor.
    assert caught.value.delay is not None and caught.value.delay >= REGISTRY_RATE_LIMIT_DELAY
    assert Backoff(base=1.0, cap=3600.0).delay_after(caught.value) >= REGISTRY_RATE_LIMIT_DELAY
    assert image not in {tag for i in docker_client.api.images() for tag in i.get("RepoTags") or ()}


def test_lifecycle_changes_the_engine_state(
    backend: DockerBackend, docker_client: Any, model_server_image: ModelServerImage, names: list[str]
) -> None:
    name = _name(names, "life")
    renamed = _name(names, "renamed")
    backend.create_container(HOST, _plain_run(name, model_server_image))

    def status(container: str) -> str:
        return str(docker_client.api.inspect_container(container)["State"]["Status"])

    assert status(name) == "created"
    backend.start_container(HOST, name)
    assert status(name) == "running"
    backend.start_container(HOST, name)  # already running: nothing to do
    assert status(name) == "running"

    backend.stop_container(HOST, name, timeout=1)
    assert status(name) == "exited"
    backend.stop_container(HOST, name, timeout=1)  # already stopped
    state = backend.container_state(HOST, name)
    assert state is not None
    assert state.status == "exited"

    backend.rename_container(HOST, name, new_name=renamed)
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(name)
    assert status(renamed) == "exited"
    backend.rename_container(HOST, name, new_name=renamed)  # already done
    assert backend.container_state(HOST, name) is None

    backend.start_container(HOST, renamed)
    assert status(renamed) == "running"
    with pytest.raises(PermanentError):
        backend.remove_container(HOST, renamed)  # running, not forced: the engine refuses (409)
    backend.remove_container(HOST, renamed, force=True)
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(renamed)
    backend.remove_container(HOST, renamed, force=True)  # already gone
    assert backend.container_state(HOST, renamed) is None


def test_missing_container_errors_name_host_and_container(backend: DockerBackend) -> None:
    with pytest.raises(NotFoundError) as caught:
        backend.start_container(HOST, "rt-no-such-container")
    assert caught.value.resource == "rt-no-such-container"
    assert repr(HOST) in str(caught.value)
    assert isinstance(caught.value.__cause__, docker.errors.NotFound)
    with pytest.raises(NotFoundError):
        backend.rename_container(HOST, "rt-no-such-container", new_name="rt-no-such-either")


def test_create_is_idempotent_and_refuses_a_different_container_of_that_name(
    backend: DockerBackend, docker_client: Any, model_server_image: ModelServerImage, names: list[str]
) -> None:
    name = _name(names, "again")
    run = _plain_run(name, model_server_image, env={"A": "1"})
    first = backend.create_container(HOST, run)
    assert backend.create_container(HOST, run) == first
    assert len(docker_client.api.containers(all=True, filters={"name": f"^/{name}$"})) == 1

    with pytest.raises(PermanentError) as caught:
        backend.create_container(HOST, _plain_run(name, model_server_image, env={"A": "2"}))
    assert name in str(caught.value)

    foreign = _name(names, "foreign")
    docker_client.api.create_container(model_server_image.tag, name=foreign)
    with pytest.raises(PermanentError):
        backend.create_container(HOST, _plain_run(foreign, model_server_image))


def test_secrets_stay_out_of_errors_and_reprs(
    backend: DockerBackend, model_server_image: ModelServerImage, names: list[str]
) -> None:
    name = _name(names, "secret")
    run = ContainerRun(name=name, image="reconciler-test/absent:1", env={"API_KEY": SECRET})
    assert SECRET not in repr(run)
    with pytest.raises(NotFoundError) as caught:
        backend.create_container(HOST, run)
    assert SECRET not in str(caught.value)
    assert "reconciler-test/absent:1" in str(caught.value)
    assert caught.value.resource == name


def test_broken_image_serves_models_but_not_health(
    backend: DockerBackend, model_server_image: ModelServerImage, names: list[str]
) -> None:
    name = _name(names, "broken")
    port = _free_port()
    run = ContainerRun(
        name=name,
        image=model_server_image.broken,
        ports=(ContainerPort(host=port, container=model_server_image.port, bind="127.0.0.1"),),
        restart="no",
    )
    backend.create_container(HOST, run)
    backend.start_container(HOST, name)
    assert _http_get(f"http://127.0.0.1:{port}/v1/models")[0] == 200
    assert _http_get(f"http://127.0.0.1:{port}{model_server_image.health_path}")[0] == 404


def test_settings_from_a_spec_docker_host() -> None:
    from reconciler.spec.models import DockerHost

    spec = DockerHost(name="ws", endpoint="tcp://ws.lan:2376", tls_verify=True, ca_file="/etc/ca.pem", timeout="90s")
    assert DockerHostSettings.from_spec("ws", spec) == DockerHostSettings(
        name="ws", endpoint="tcp://ws.lan:2376", tls_verify=True, ca_file="/etc/ca.pem", timeout=90.0
    )

"""Docker backend: reads and changes containers on the lab's Docker engines through the docker SDK.

The engine's observe step calls `DockerBackend.observe()` to learn what every
Docker host runs, in the planner's vocabulary (`planning.observed`); the apply
engine calls the write-side methods (`ensure_image`, `create_container`,
`start_container`, ...) to carry out a plan, and the verify step reads
`container_state()`. This is the only module of the project that imports the
`docker` SDK: SDK objects never leave it, and every SDK or transport error is
translated here, by exception type and HTTP status code, into the project's
error tree (`reconciler.errors`), naming the host and the container or image.

Reading costs, per host, one container list call (filtered by the owner label
when no other names matter), one image list call and one inspect per listed
container; hosts are read concurrently and so are the inspects of one host.
An unreachable host is reported as such in its `DockerObservation`, not raised.

Environment values may be secrets: they never appear in a message or a log
line from this module (engine explanations are scrubbed of them and of every
secret `reconciler.redact` holds, endpoints are shown without credentials, and
`ContainerRun`'s repr leaves env values out).
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn, Self, TypeVar

import docker
import docker.errors
import docker.tls
import docker.types
import requests.exceptions

from reconciler import redact
from reconciler.backends.docker_inspect import names_of, observed_from_inspect
from reconciler.backends.ratelimit import retry_after
from reconciler.errors import (
    BackendError,
    ConfigError,
    NotFoundError,
    PermanentError,
    PermissionDenied,
    TemporaryError,
)
from reconciler.planning.container_run import ContainerHealthcheck, ContainerRun
from reconciler.planning.gpusight import COMPUTE_APPS_QUERY, GPU_QUERY, SECTION_MARK, parse_nvidia_smi
from reconciler.planning.observed import DockerObservation, NvmlObservation, ObservedContainer
from reconciler.spec.models import DockerEndpoint, DockerHost

__all__ = [
    "REGISTRY_RATE_LIMIT_DELAY",
    "ContainerHealthcheck",
    "ContainerRun",
    "DockerBackend",
    "DockerHostSettings",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_INSPECT_WORKERS_PER_HOST = 8  # below the SDK's connection pool size (10) so no connection is dropped
_MIN_SECRET_LENGTH = 4  # env values shorter than this are not scrubbed from messages (they would mangle the text)
_NANOSECONDS = 1_000_000_000
_CREATE_SETTLE_SECONDS = 15.0  # how long a name reserved by a create in progress is waited for


# ---- settings and requests -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DockerHostSettings:
    """How to reach one Docker engine. `name` is the host's name in the spec."""

    name: str
    endpoint: str  # unix:///run/docker.sock, tcp://host:2376, ssh://user@host
    tls_verify: bool = False
    ca_file: str | None = None
    timeout: float = 60.0

    @classmethod
    def from_spec(cls, name: str, spec: DockerHost | DockerEndpoint) -> DockerHostSettings:
        """Build from a spec `DockerHost` or the `docker:` endpoint of an Lxc/Vm."""
        return cls(
            name=name,
            endpoint=str(spec.endpoint),
            tls_verify=bool(spec.tls_verify),
            ca_file=spec.ca_file,
            timeout=float(spec.timeout),
        )


# ---- error translation -----------------------------------------------------------------


def _status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _explanation(exc: BaseException) -> str:
    """The engine's own words for an API error, else the exception type (never its full text: it holds URLs)."""
    explanation = getattr(exc, "explanation", None)
    if isinstance(explanation, bytes):
        explanation = explanation.decode("utf-8", "replace")
    if isinstance(explanation, str) and explanation.strip():
        return explanation.strip()
    status = _status_of(exc)
    return f"HTTP {status}" if status is not None else type(exc).__name__


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_transport_failure(exc: BaseException) -> bool:
    return any(
        isinstance(cause, requests.exceptions.ConnectionError | requests.exceptions.Timeout | OSError)
        for cause in _causes(exc)
    )


def _transport_reason(exc: BaseException) -> str:
    """The operating system's words for the deepest socket error under `exc` (no URLs), else a type name."""
    reason = type(exc).__name__
    for cause in _causes(exc):
        if isinstance(cause, OSError) and not isinstance(cause, requests.exceptions.RequestException):
            reason = cause.strerror or type(cause).__name__
    return reason


def _scrub(text: str, secrets: Collection[str]) -> str:
    """The engine's words without this call's env values (plain ones too) or any secret the process holds."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _MIN_SECRET_LENGTH:
            text = text.replace(secret, "***")
    return redact.scrub(text)


def _translate(
    exc: Exception,
    *,
    host: str,
    endpoint: str,
    action: str,
    resource: str,
    secrets: Collection[str] = (),
) -> NoReturn:
    """Raise the project's error for an SDK/transport exception, by type and status code, from `exc`."""
    where = f"docker host {host!r}"
    endpoint = redact.without_userinfo(endpoint)
    api_error = next((c for c in _causes(exc) if isinstance(c, docker.errors.APIError)), None)
    if api_error is not None:
        status = _status_of(api_error)
        message = f"{action} on {where} failed: {_scrub(_explanation(api_error), secrets)}"
        if isinstance(api_error, docker.errors.NotFound) or status == 404:
            raise NotFoundError(message, resource=resource) from exc
        if status in (401, 403):
            raise PermissionDenied(message, resource=resource) from exc
        if status == 429 or _rate_limited(_explanation(api_error)):
            raise TemporaryError(message, resource=resource, delay=_rate_limit_delay(api_error)) from exc
        if status is None or status >= 500:
            raise TemporaryError(message, resource=resource, delay=_retry_after_of(api_error)) from exc
        raise PermanentError(message, resource=resource) from exc
    if isinstance(exc, docker.errors.TLSParameterError):
        raise ConfigError(f"TLS settings for {where} are invalid", resource=resource) from exc
    if any(isinstance(c, requests.exceptions.Timeout | TimeoutError) for c in _causes(exc)):
        raise TemporaryError(f"{action} on {where} timed out (endpoint {endpoint})", resource=resource) from exc
    if _is_transport_failure(exc) or isinstance(exc, requests.exceptions.RequestException):
        raise TemporaryError(
            f"{action} on {where} failed: cannot reach the engine at {endpoint} ({_transport_reason(exc)})",
            resource=resource,
            hint="is the engine running and the endpoint right?",
        ) from exc
    raise PermanentError(f"{action} on {where} failed ({type(exc).__name__})", resource=resource) from exc


REGISTRY_RATE_LIMIT_DELAY = 300.0
"""Seconds to wait at least after a registry's pull rate limit when nothing says how long: a registry counts
pulls over hours (Docker Hub: per 6 h), so retrying sooner only spends more of the allowance."""

_RATE_LIMIT_CODE = "toomanyrequests:"


def _rate_limited(text: str) -> bool:
    """Whether the engine's words carry a registry's TOOMANYREQUESTS.

    That is an error code of the OCI distribution spec, not prose: the engine passes it on only as the
    lower-case prefix of its text (Docker 20.10 answers such a pull with HTTP 500), so the prefix is read.
    """
    return text.lstrip().lower().startswith(_RATE_LIMIT_CODE)


def _retry_after_of(api_error: BaseException) -> float | None:
    response = getattr(api_error, "response", None)
    headers = getattr(response, "headers", None)
    status = _status_of(api_error)
    return retry_after(status, headers) if status is not None and isinstance(headers, Mapping) else None


def _rate_limit_delay(api_error: BaseException) -> float:
    """The engine's `Retry-After` when it sends one, else `REGISTRY_RATE_LIMIT_DELAY`."""
    delay = _retry_after_of(api_error)
    return REGISTRY_RATE_LIMIT_DELAY if delay is None else delay


_SDK_ERRORS: tuple[type[Exception], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    OSError,
)


def _free_frames(exc: BaseException) -> None:
    """Clear the locals of the frames an error and the errors it chains keep (`traceback.clear_frames`)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


def _probe_unix_socket(path: str, timeout: float) -> None:
    """Connect to the engine's socket once, closing it whatever happens; raise OSError when that fails.

    docker SDK 7.1 leaks the socket when a unix connect fails (docker/docker-py#3356); probing first keeps
    an absent or dead engine from leaving sockets behind.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)


# ---- the backend ------------------------------------------------------------------------------


class _DockerEngines:
    """The engines of several Docker hosts: one SDK client per host, made on first use; one call, errors translated."""

    def __init__(
        self,
        hosts: Mapping[str, DockerHostSettings],
        *,
        owner_label: str = "reconciler",
        listed_owners: Collection[str] = (),
    ) -> None:
        self._hosts = dict(hosts)
        for settings in self._hosts.values():
            redact.register_url(settings.endpoint)  # tcp://user:password@host: the password never shows
        self._owner_label = owner_label
        # Other owners whose containers are listed too (never changed by that): the old default owner, so
        # the planner can warn about its orphans.
        self._listed = tuple(f"{owner}.managed" for owner in listed_owners if owner != owner_label)
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def managed_label(self) -> str:
        """The label key marking containers this reconciler owns (its value is "true")."""
        return f"{self._owner_label}.managed"

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(self._hosts)

    # -- clients

    def _settings(self, host: str) -> DockerHostSettings:
        try:
            return self._hosts[host]
        except KeyError:
            raise ConfigError(f"no Docker host named {host!r} is configured", resource=host) from None

    def _client(self, host: str) -> Any:
        with self._lock:
            client = self._clients.get(host)
        if client is not None:
            return client
        settings = self._settings(host)
        kwargs: dict[str, Any] = {"base_url": settings.endpoint, "timeout": settings.timeout}
        if settings.endpoint.startswith("ssh://"):
            if importlib.util.find_spec("paramiko") is None:  # the SDK's ssh adapter imports it even to shell out
                raise ConfigError(
                    f"docker host {host!r} uses ssh://, which needs the paramiko package",
                    resource=host,
                    hint="pip install 'docker[ssh]'",
                )
            kwargs["use_ssh_client"] = True  # the ssh binary: honours ~/.ssh/config, agent, known_hosts
        elif settings.endpoint.startswith("tcp://") and (settings.tls_verify or settings.ca_file):
            try:
                kwargs["tls"] = docker.tls.TLSConfig(ca_cert=settings.ca_file, verify=settings.ca_file or True)
            except docker.errors.TLSParameterError as exc:
                raise ConfigError(f"TLS settings for docker host {host!r} are invalid", resource=host) from exc
        try:
            if settings.endpoint.startswith("unix://"):
                _probe_unix_socket(settings.endpoint.removeprefix("unix://"), settings.timeout)
            client = docker.DockerClient(**kwargs)  # asks the engine for its API version
        except _SDK_ERRORS as exc:
            # The SDK's half-made client (for ssh://, an `ssh ... dial-stdio` process and its pipes) lives on in
            # the failed constructor's frames, which the error keeps: free it now, not at some later GC.
            _free_frames(exc)
            _translate(exc, host=host, endpoint=settings.endpoint, action="connecting", resource=host)
        with self._lock:
            existing = self._clients.setdefault(host, client)
        if existing is not client:
            client.close()
        return existing

    def _call(
        self,
        host: str,
        call: Callable[[Any], _T],
        *,
        action: str,
        resource: str,
        secrets: Collection[str] = (),
    ) -> _T:
        api = self._client(host).api
        try:
            return call(api)
        except _SDK_ERRORS as exc:
            _translate(
                exc,
                host=host,
                endpoint=self._hosts[host].endpoint,
                action=action,
                resource=resource,
                secrets=secrets,
            )

    def close(self) -> None:
        """Close every client; the backend can still be used (clients are made again)."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                client.close()
            except _SDK_ERRORS:  # closing must not fail a shutdown
                log.debug("closing a docker client failed", exc_info=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _DockerReads(_DockerEngines):
    """What the hosts run (containers, images) and which GPUs they have; nothing here changes a host."""

    # -- reading

    def observe(
        self,
        names_of_interest: Collection[str] | Mapping[str, Collection[str]] = (),
    ) -> dict[str, DockerObservation]:
        """What every host runs: owned containers (and unowned ones whose name is of interest) and image tags.

        `names_of_interest` is a set of container names for every host, or a mapping host -> names. Hosts
        are read concurrently; a host that cannot be read comes back with reachable=False and the error.
        """
        if not self._hosts:
            return {}
        with ThreadPoolExecutor(max_workers=len(self._hosts), thread_name_prefix="docker-host") as pool:
            futures = {
                host: pool.submit(self._observe_host, host, self._names_for(host, names_of_interest))
                for host in self._hosts
            }
            return {host: future.result() for host, future in futures.items()}

    @staticmethod
    def _names_for(host: str, names: Collection[str] | Mapping[str, Collection[str]]) -> frozenset[str]:
        if isinstance(names, Mapping):
            return frozenset(names.get(host, ()))
        return frozenset(names)

    def _observe_host(self, host: str, names: frozenset[str]) -> DockerObservation:
        try:
            summaries = self._list(host, names)
            images = self._call(host, lambda api: api.images(), action="listing images", resource=host)
            ids = [str(summary["Id"]) for summary in summaries]
            workers = max(1, min(_INSPECT_WORKERS_PER_HOST, len(ids)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"docker-inspect-{host}") as pool:
                states = list(pool.map(lambda container_id: self.container_state(host, container_id), ids))
            containers = [c for c in states if c is not None]  # None: removed since the list call
        except (BackendError, ConfigError) as exc:
            log.warning("docker host %s cannot be read: %s", host, exc)
            return DockerObservation(host=host, reachable=False, error=str(exc))
        tags = frozenset(
            str(tag) for image in images or () for tag in image.get("RepoTags") or () if tag != "<none>:<none>"
        )
        return DockerObservation(
            host=host,
            reachable=True,
            containers=tuple(sorted(containers, key=lambda c: c.name)),
            images=tags,
        )

    def _list(self, host: str, names: frozenset[str]) -> list[Mapping[str, Any]]:
        """One list call: filtered by the owner label by the engine, or (when names matter) by us."""
        labels = (self.managed_label, *self._listed)
        if not names:
            found: dict[str, Mapping[str, Any]] = {}
            for label in labels:  # the engine ANDs label filters: one call per owner
                result = self._call(
                    host,
                    lambda api, label=label: api.containers(all=True, filters={"label": f"{label}=true"}),  # type: ignore[misc]
                    action="listing containers",
                    resource=host,
                )
                found.update((str(summary["Id"]), summary) for summary in result or ())
            return list(found.values())
        result = self._call(host, lambda api: api.containers(all=True), action="listing containers", resource=host)
        return [
            summary
            for summary in result or ()
            if any((summary.get("Labels") or {}).get(label) == "true" for label in labels) or names_of(summary) & names
        ]

    def container_state(self, host: str, name: str) -> ObservedContainer | None:
        """The container named (or with id) `name` as it is now, or None when there is none."""
        try:
            data = self._call(
                host, lambda api: api.inspect_container(name), action="inspecting container", resource=name
            )
        except NotFoundError:
            return None
        return observed_from_inspect(host, data)

    def _image_present(self, host: str, image: str) -> bool:
        try:
            self._call(host, lambda api: api.inspect_image(image), action="inspecting image", resource=image)
        except NotFoundError:
            return False
        return True

    # -- GPUs, seen through the engine

    def query_gpus(self, host: str, *, image: str, timeout: float = 60.0) -> NvmlObservation:
        """The GPUs of `host`, read by `nvidia-smi` in a short-lived container holding every GPU.

        For a GPU the reconciler's own NVML cannot see (it runs outside the VM or LXC that holds it).
        The NVIDIA container toolkit puts `nvidia-smi` into any image (`utility` capability); `image`
        needs a POSIX `sh`. Reported, not raised: no GPU, no driver or no toolkit on the host, and
        output that is not a GPU list (`available=False` with the reason). Raised: the engine's
        errors (a missing image is `NotFoundError`), translated as for every other call.
        """
        return self._call(
            host,
            lambda api: _query_gpus(api, host, image=image, timeout=timeout, label=f"{self._owner_label}.probe"),
            action="reading GPUs with nvidia-smi",
            resource=f"{host}/gpus",
        )


class DockerBackend(_DockerReads):
    """Reads and changes containers on several Docker engines (reads: `_DockerReads`; engines: `_DockerEngines`)."""

    # -- images

    def ensure_image(self, host: str, image: str) -> None:
        """Make sure `image` is on `host`: nothing when it is there, else pull it (no registry auth)."""
        if self._image_present(host, image):
            return
        log.info("pulling image %s on docker host %s", image, host)
        errors: list[str] = []

        def pull(api: Any) -> None:
            for event in api.pull(image, stream=True, decode=True):
                if isinstance(event, Mapping) and event.get("error"):
                    errors.append(str(event["error"]))

        self._call(host, pull, action=f"image {image} is not on the host; pulling it", resource=image)
        if not self._image_present(host, image):
            detail = "; ".join(errors) if errors else "the engine reported no error"
            if any(_rate_limited(error) for error in errors):
                raise TemporaryError(
                    f"pulling image {image} on docker host {host!r} was refused for now: {detail}",
                    resource=image,
                    delay=REGISTRY_RATE_LIMIT_DELAY,
                )
            raise NotFoundError(
                f"image {image} is not on docker host {host!r} and cannot be pulled: {detail}", resource=image
            )

    # -- containers

    def create_container(self, host: str, spec: ContainerRun) -> str:
        """Create (not start) a container; returns its id. The owner label is added.

        Idempotent: when a container of that name already exists, carries the owner label and matches
        `spec`, its id is returned; any other container of that name is a PermanentError.
        """
        secrets = tuple(spec.env.values())
        labels = {**spec.labels, self.managed_label: "true"}

        def create(api: Any) -> str:
            host_config = api.create_host_config(**self._host_config_args(spec))
            healthcheck = None
            if spec.healthcheck is not None:
                check = spec.healthcheck
                healthcheck = docker.types.Healthcheck(
                    test=list(check.test),
                    interval=round(check.interval * _NANOSECONDS),
                    timeout=round(check.timeout * _NANOSECONDS),
                    retries=check.retries,
                    start_period=round(check.start_period * _NANOSECONDS),
                )
            result = api.create_container(
                image=spec.image,
                name=spec.name,
                command=list(spec.command) if spec.command is not None else None,
                entrypoint=list(spec.entrypoint) if spec.entrypoint is not None else None,
                environment=dict(spec.env),
                labels=labels,
                ports=sorted({(port.container, port.protocol) for port in spec.ports}) or None,
                host_config=host_config,
                healthcheck=healthcheck,
            )
            return str(result["Id"])

        try:
            container_id = self._call(
                host, create, action=f"creating container from image {spec.image}", resource=spec.name, secrets=secrets
            )
        except PermanentError as exc:
            if _status_of(exc.__cause__ or exc) != 409:
                raise
            existing = self._created_meanwhile(host, spec.name)
            if existing is None:
                raise  # a conflict that is not about the name
            if not self._matches(existing, spec, labels):
                raise PermanentError(
                    f"a different container named {spec.name!r} already exists on docker host {host!r}",
                    resource=spec.name,
                ) from exc
            return existing.id
        log.info("created container %s on docker host %s", spec.name, host)
        return container_id

    def _created_meanwhile(self, host: str, name: str) -> ObservedContainer | None:
        """The container holding `name`, waiting a little for one still being created.

        The engine reserves a name when a create begins and shows the container only once it is made (a
        copy of the image's layers, slow on some storage drivers). A create that lost its client (a
        killed apply) goes on, and the next create of that name meets its reservation before its container.
        """
        deadline = time.monotonic() + _CREATE_SETTLE_SECONDS
        while True:
            existing = self.container_state(host, name)
            if existing is not None or time.monotonic() >= deadline:
                return existing
            time.sleep(0.2)

    @staticmethod
    def _host_config_args(spec: ContainerRun) -> dict[str, Any]:
        bindings: dict[str, list[tuple[str, int]]] = {}
        for port in spec.ports:
            bindings.setdefault(f"{port.container}/{port.protocol}", []).append((port.bind, port.host))
        args: dict[str, Any] = {
            "port_bindings": bindings or None,
            "mounts": [
                docker.types.Mount(target=v.path, source=v.host, type="bind", read_only=v.readonly)
                for v in spec.volumes
            ]
            or None,
            "devices": list(spec.devices) or None,
            "restart_policy": {"Name": spec.restart} if spec.restart and spec.restart != "no" else None,
            "shm_size": spec.shm_size,
            "ipc_mode": spec.ipc,
            "network_mode": spec.network_mode,
        }
        if spec.gpus:
            everything = spec.gpus == ("all",)
            args["device_requests"] = [
                docker.types.DeviceRequest(
                    driver="nvidia",
                    count=-1 if everything else 0,
                    device_ids=[] if everything else list(spec.gpus),
                    capabilities=[["gpu"]],
                )
            ]
        return {key: value for key, value in args.items() if value is not None}

    @staticmethod
    def _matches(existing: ObservedContainer, spec: ContainerRun, labels: Mapping[str, str]) -> bool:
        """Whether an existing container is the one `spec` would create (a retried create)."""
        return (
            existing.image == spec.image
            and all(existing.labels.get(k) == v for k, v in labels.items())
            and all(existing.env.get(k) == v for k, v in spec.env.items())
            and (spec.command is None or existing.command == spec.command)
            and (spec.entrypoint is None or existing.entrypoint == spec.entrypoint)
            and set(existing.ports) == set(spec.ports)
            and set(existing.volumes) == set(spec.volumes)
            and tuple(existing.gpus) == tuple(spec.gpus)
            and existing.restart == (spec.restart or "no")
        )

    def start_container(self, host: str, name: str) -> None:
        """Start a container; nothing when it already runs."""
        self._call(host, lambda api: api.start(name), action="starting container", resource=name)
        log.info("started container %s on docker host %s", name, host)

    def stop_container(self, host: str, name: str, *, timeout: float = 10.0) -> None:
        """Stop a container (SIGTERM, then SIGKILL after `timeout` seconds); nothing when it is stopped."""
        self._call(
            host, lambda api: api.stop(name, timeout=max(0, round(timeout))), action="stopping container", resource=name
        )
        log.info("stopped container %s on docker host %s", name, host)

    def remove_container(self, host: str, name: str, *, force: bool = False) -> None:
        """Remove a container (`force`: even a running one); nothing when there is none."""
        try:
            self._call(
                host, lambda api: api.remove_container(name, force=force), action="removing container", resource=name
            )
        except NotFoundError:
            return
        log.info("removed container %s on docker host %s", name, host)

    def rename_container(self, host: str, name: str, *, new_name: str) -> None:
        """Rename a container; nothing when it already carries `new_name` (and `name` is gone)."""
        if name == new_name:
            return
        try:
            self._call(host, lambda api: api.rename(name, new_name), action=f"renaming to {new_name!r}", resource=name)
        except NotFoundError:
            if self.container_state(host, new_name) is not None:
                return  # done by an earlier try
            raise
        log.info("renamed container %s to %s on docker host %s", name, new_name, host)


# ---- reading GPUs through an engine ---------------------------------------------------------------------

_GPU_SCRIPT = (
    f"nvidia-smi --query-gpu={GPU_QUERY} --format=csv,noheader,nounits || exit $?\n"
    f"echo '{SECTION_MARK}'\n"
    f"nvidia-smi --query-compute-apps={COMPUTE_APPS_QUERY} --format=csv,noheader,nounits || true\n"
)
_GPU_OUTPUT_LIMIT = 1024 * 1024  # a GPU list is a few hundred bytes; more is not one
_GPU_OUTPUT_LINES = 4097  # one more than the parser accepts, so a flood is still recognised as one
_NO_COMMAND = 127  # sh: the command is not there


def _query_gpus(api: Any, host: str, *, image: str, timeout: float, label: str) -> NvmlObservation:
    """Create, run, read and remove the probe container (the SDK's low-level client `api`)."""
    container = api.create_container(
        image,
        command=["sh", "-c", _GPU_SCRIPT],
        labels={label: "gpus"},
        network_disabled=True,
        host_config=api.create_host_config(
            network_mode="none",
            device_requests=[docker.types.DeviceRequest(driver="nvidia", count=-1, capabilities=[["gpu", "utility"]])],
        ),
    )
    identifier = container["Id"]
    try:
        api.start(identifier)
        status = int(api.wait(identifier, timeout=timeout).get("StatusCode", -1))
        # `tail` bounds what is read (the engine splits long lines at 16 KiB); more lines are not a GPU list.
        raw = api.logs(identifier, stdout=True, stderr=False, tail=_GPU_OUTPUT_LINES)
        output = raw[:_GPU_OUTPUT_LIMIT].decode("utf-8", "replace")
        errors = api.logs(identifier, stdout=False, stderr=True, tail=5)[-2000:].decode("utf-8", "replace")
    finally:
        api.remove_container(identifier, force=True)
    where = f"nvidia-smi on docker host {host!r}"
    if status == _NO_COMMAND:
        reason = f"{where}: not found in the container; is the NVIDIA container toolkit installed on the host?"
        return NvmlObservation(available=False, error=reason)
    if status != 0:
        said = (errors.strip() or output.strip()).splitlines()[-1:] or ["no message"]
        text = "".join(c for c in said[0] if c.isprintable())[:300]  # a container's words reach a terminal
        return NvmlObservation(available=False, error=f"{where} exited with {status}: {text}")
    try:
        return parse_nvidia_smi(output)
    except ValueError as exc:
        return NvmlObservation(available=False, error=f"{where} printed something that is not a GPU list: {exc}")

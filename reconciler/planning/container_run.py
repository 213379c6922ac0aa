"""A container change's content, typed: THE one definition of a container (`ContainerRun`), and a live one as seen.

The planner builds a `ContainerRun` (`planning.containers.desired_container`) as a container change's
`after`; the applier resolves its secret references from the environment (`with_secrets`) and every
Docker backend (`backends.docker`, `backends.memory`) creates it as it is. It becomes JSON only at
the plan-file and journal boundary (`to_json` / `from_json`), where `env` holds the plain values and
`secret_env` the names of the variables that hold the secret ones: a resolved secret is never written.
`ContainerSeen` is a container change's `before`: the live container as a plan shows it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from reconciler.planning.observed import ContainerPort, ContainerVolume, ObservedContainer
from reconciler.spec.models import PowerState

if TYPE_CHECKING:
    from reconciler.planning.plan import JsonObject

__all__ = ["ContainerHealthcheck", "ContainerProbe", "ContainerRun", "ContainerSeen"]


@dataclass(frozen=True, slots=True)
class ContainerHealthcheck:
    """Docker's own HEALTHCHECK. Durations are seconds; the engine wants nanoseconds."""

    test: tuple[str, ...]  # ("CMD", "wget", "-q", "-O-", "http://127.0.0.1:8000/health") or ("CMD-SHELL", "...")
    interval: float = 30.0
    timeout: float = 10.0
    retries: int = 3
    start_period: float = 0.0

    def to_json(self) -> JsonObject:
        return {
            "test": list(self.test),
            "interval": self.interval,
            "timeout": self.timeout,
            "retries": self.retries,
            "start_period": self.start_period,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ContainerHealthcheck:
        return cls(
            test=_texts(data["test"]) or (),
            interval=_float(data["interval"]),
            timeout=_float(data["timeout"]),
            retries=int(_float(data["retries"])),
            start_period=_float(data["start_period"]),
        )


@dataclass(frozen=True, slots=True)
class ContainerProbe:
    """How the applier checks a started container answers: HTTP (a path is joined to `port`) or TCP."""

    http: str | None = None
    tcp: str | None = None
    status: int = 200
    body: str | None = None  # a regular expression the body must match
    timeout: float = 300.0
    interval: float = 2.0
    port: int | None = None  # the published port a path-only HTTP probe is joined to

    def to_json(self) -> JsonObject:
        return {
            "http": self.http,
            "tcp": self.tcp,
            "status": self.status,
            "body": self.body,
            "timeout": self.timeout,
            "interval": self.interval,
            "port": self.port,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ContainerProbe:
        port = data.get("port")
        return cls(
            http=_text_or_none(data.get("http")),
            tcp=_text_or_none(data.get("tcp")),
            status=int(_float(data.get("status", 200))),
            body=_text_or_none(data.get("body")),
            timeout=_float(data.get("timeout", 300.0)),
            interval=_float(data.get("interval", 2.0)),
            port=None if port is None else int(_float(port)),
        )


@dataclass(frozen=True, slots=True)
class ContainerRun:
    """Everything about one container: what Docker creates, and what the plan and the applier need.

    `env` holds plain values; `secret_env` maps a container variable to the reconciler's environment
    variable holding its secret, resolved into `env` by `with_secrets` only when applying (`env` stays out
    of repr). `gpus` are NVML UUIDs (or ("all",)), `gpu_names` the spec's names for people and ordering.
    """

    name: str
    image: str
    host: str = ""  # the spec's Docker host
    resource: str = ""  # the spec resource: "Model/qwen-7b"
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    secret_env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[ContainerPort, ...] = ()
    volumes: tuple[ContainerVolume, ...] = ()
    gpus: tuple[str, ...] = ()
    gpu_names: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()  # "/dev/dri:/dev/dri" or "/dev/x:/dev/y:rwm"
    restart: str = "unless-stopped"  # no | always | unless-stopped | on-failure
    state: PowerState = PowerState.RUNNING
    shm_size: int | None = None  # bytes
    ipc: str | None = None
    network_mode: str | None = None
    healthcheck: ContainerHealthcheck | None = None
    probe: ContainerProbe | None = None
    load: str | None = None  # the model an Ollama server pulls and loads once it answers
    unresolved_gpus: tuple[str, ...] = ()  # GPUs the planner could not resolve to a UUID (a blocker)

    @property
    def address(self) -> str:
        return f"container/{self.host}/{self.name}"

    def with_secrets(self, environ: Mapping[str, str]) -> ContainerRun:
        """The container to create: its secret references resolved from `environ` (KeyError when one is unset)."""
        resolved = {key: environ[variable] for key, variable in self.secret_env.items()}
        return dataclasses.replace(self, env={**self.env, **resolved})

    def spec_hash(self) -> str:
        """Hash of everything declared, so a removed setting is noticed too."""
        body = self.to_json()
        for volatile in ("labels", "probe", "state", "load"):  # the load label tells a new model
            body.pop(volatile, None)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> JsonObject:
        """The plan's and the journal's view: plain env values only, secrets as the variables that hold them."""
        return {
            "host": self.host,
            "name": self.name,
            "resource": self.resource,
            "image": self.image,
            "command": _list_or_none(self.command),
            "entrypoint": _list_or_none(self.entrypoint),
            "env": {k: v for k, v in self.env.items() if k not in self.secret_env},
            "secret_env": dict(self.secret_env),
            "labels": dict(self.labels),
            "ports": [[p.bind, p.host, p.container, p.protocol] for p in self.ports],
            "volumes": [[v.host, v.path, v.readonly] for v in self.volumes],
            "gpus": list(self.gpus),
            "gpu_names": list(self.gpu_names),
            "devices": list(self.devices),
            "restart": self.restart,
            "state": str(self.state),
            "shm_size": self.shm_size,
            "ipc": self.ipc,
            "network_mode": self.network_mode,
            "healthcheck": self.healthcheck.to_json() if self.healthcheck else None,
            "probe": self.probe.to_json() if self.probe else None,
            "load": self.load,
            "unresolved_gpus": list(self.unresolved_gpus),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ContainerRun:
        health, probe, shm = data.get("healthcheck"), data.get("probe"), data.get("shm_size")
        return cls(
            host=str(data["host"]),
            name=str(data["name"]),
            resource=str(data["resource"]),
            image=str(data["image"]),
            command=_texts(data.get("command")),
            entrypoint=_texts(data.get("entrypoint")),
            env=_strings(data.get("env")),
            secret_env=_strings(data.get("secret_env")),
            labels=_strings(data.get("labels")),
            ports=tuple(_port(p) for p in _items(data.get("ports"))),
            volumes=tuple(_volume(v) for v in _items(data.get("volumes"))),
            gpus=_texts(data.get("gpus")) or (),
            gpu_names=_texts(data.get("gpu_names")) or (),
            devices=_texts(data.get("devices")) or (),
            restart=str(data.get("restart", "unless-stopped")),
            state=PowerState(str(data["state"])),
            shm_size=None if shm is None else int(_float(shm)),
            ipc=_text_or_none(data.get("ipc")),
            network_mode=_text_or_none(data.get("network_mode")),
            healthcheck=ContainerHealthcheck.from_json(_mapping(health)) if health is not None else None,
            probe=ContainerProbe.from_json(_mapping(probe)) if probe is not None else None,
            load=_text_or_none(data.get("load")),
            unresolved_gpus=_texts(data.get("unresolved_gpus")) or (),
        )


@dataclass(frozen=True, slots=True)
class ContainerSeen:
    """A live container as a plan shows it (a container change's `before`); never its env."""

    host: str
    name: str
    id: str
    image: str
    status: str
    health: str | None
    gpus: tuple[str, ...]

    @classmethod
    def of(cls, live: ObservedContainer) -> ContainerSeen:
        return cls(live.host, live.name, live.id[:12], live.image, live.status, live.health, tuple(live.gpus))

    def to_json(self) -> JsonObject:
        return {
            "host": self.host,
            "name": self.name,
            "id": self.id,
            "image": self.image,
            "status": self.status,
            "health": self.health,
            "gpus": list(self.gpus),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ContainerSeen:
        return cls(
            host=str(data["host"]),
            name=str(data["name"]),
            id=str(data["id"]),
            image=str(data["image"]),
            status=str(data["status"]),
            health=_text_or_none(data.get("health")),
            gpus=_texts(data.get("gpus")) or (),
        )


def _port(item: object) -> ContainerPort:
    bind, host, container, protocol = _items(item)
    return ContainerPort(
        bind=str(bind), host=int(_float(host)), container=int(_float(container)), protocol=str(protocol)
    )


def _volume(item: object) -> ContainerVolume:
    host, path, readonly = _items(item)
    if not isinstance(readonly, bool):
        raise ValueError("a volume's readonly is true or false")
    return ContainerVolume(host=str(host), path=str(path), readonly=readonly)


def _items(value: object) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return list(value)


def _mapping(value: object) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    return value


def _texts(value: object) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(item) for item in _items(value))


def _list_or_none(value: tuple[str, ...] | None) -> list[str] | None:
    return None if value is None else list(value)


def _strings(value: object) -> dict[str, str]:
    return {str(k): str(v) for k, v in _mapping(value).items()} if value is not None else {}


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)

"""What a Docker engine's inspect and list answers mean, in the planner's vocabulary (`planning.observed`).

Who calls it: `backends.docker` (the only module that talks to an engine) turns each inspect answer into an
ObservedContainer here. Pure: no SDK, no I/O; the answers are the engine's JSON, read defensively.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from reconciler.planning.observed import ContainerPort, ContainerVolume, ObservedContainer

__all__ = ["names_of", "observed_from_inspect"]


def _tuple_or_none(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(str(item) for item in value)


def _parse_env(entries: Any) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in entries or ():
        key, _, value = str(entry).partition("=")
        env[key] = value
    return env


def _parse_ports(bindings: Any) -> tuple[ContainerPort, ...]:
    ports: list[ContainerPort] = []
    for key, targets in (bindings or {}).items():
        port_text, _, protocol = str(key).partition("/")
        for target in targets or ():
            host_port = str(target.get("HostPort") or "")
            ports.append(
                ContainerPort(
                    host=int(host_port) if host_port.isdigit() else 0,  # 0: the engine picks a port
                    container=int(port_text),
                    bind=str(target.get("HostIp") or "0.0.0.0"),
                    protocol=protocol or "tcp",
                )
            )
    return tuple(sorted(ports, key=lambda p: (p.container, p.protocol, p.host, p.bind)))


def _parse_binds(mounts: Any) -> tuple[ContainerVolume, ...]:
    volumes = [
        ContainerVolume(
            host=str(m.get("Source", "")), path=str(m.get("Destination", "")), readonly=not m.get("RW", True)
        )
        for m in mounts or ()
        if m.get("Type") == "bind"
    ]
    return tuple(sorted(volumes, key=lambda v: (v.path, v.host)))


def _parse_gpus(requests_: Any) -> tuple[str, ...]:
    gpus: list[str] = []
    for request in requests_ or ():
        capabilities = request.get("Capabilities") or []
        is_gpu = request.get("Driver") == "nvidia" or any("gpu" in (group or []) for group in capabilities)
        if not is_gpu:
            continue
        if request.get("Count") == -1:
            return ("all",)
        gpus.extend(str(device) for device in request.get("DeviceIDs") or ())
    return tuple(gpus)


def _parse_devices(devices: Any) -> tuple[str, ...]:
    return tuple(f"{d.get('PathOnHost', '')}:{d.get('PathInContainer', '')}" for d in devices or ())


def observed_from_inspect(host: str, data: Mapping[str, Any]) -> ObservedContainer:
    config = data.get("Config") or {}
    host_config = data.get("HostConfig") or {}
    state = data.get("State") or {}
    health = state.get("Health") or {}
    shm_size = host_config.get("ShmSize")
    return ObservedContainer(
        host=host,
        id=str(data.get("Id", "")),
        name=str(data.get("Name", "")).lstrip("/"),
        image=str(config.get("Image", "")),
        image_id=str(data.get("Image", "")),
        command=_tuple_or_none(config.get("Cmd")),
        entrypoint=_tuple_or_none(config.get("Entrypoint")),
        env=_parse_env(config.get("Env")),
        labels=dict(config.get("Labels") or {}),
        ports=_parse_ports(host_config.get("PortBindings")),
        volumes=_parse_binds(data.get("Mounts")),
        gpus=_parse_gpus(host_config.get("DeviceRequests")),
        devices=_parse_devices(host_config.get("Devices")),
        restart=str((host_config.get("RestartPolicy") or {}).get("Name") or "no"),
        status=str(state.get("Status", "unknown")),
        health=str(health["Status"]) if health.get("Status") else None,
        restart_count=int(data.get("RestartCount") or 0),
        shm_size=int(shm_size) if shm_size is not None else None,
        ipc=host_config.get("IpcMode") or None,
        network_mode=host_config.get("NetworkMode") or None,
        started_at=_started_at(state.get("StartedAt")),
    )


def names_of(summary: Mapping[str, Any]) -> set[str]:
    return {str(name).lstrip("/") for name in summary.get("Names") or ()}


def _started_at(text: Any) -> float | None:
    """Docker's State.StartedAt (RFC 3339, nanoseconds; year 1 when never started) as epoch seconds."""
    if not isinstance(text, str) or not text or text.startswith("0001-"):
        return None
    try:
        return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None

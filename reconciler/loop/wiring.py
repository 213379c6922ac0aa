"""The backends a pass runs against, kept open between passes.

Who calls it: the pass runner, once per pass, with the revision it reconciles to.
`LabConnector` opens the real backends (engine.connect) and keeps them while the
lab's connection settings stay the same, so a drift pass reuses a warm Proxmox
session and Docker clients instead of logging in again; a commit that changes
them (a new Docker host, another Proxmox URL) reopens them. The demo and tests
give their own `Connector` (the in-memory lab).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from reconciler.engine.apply import ContainerBackend, GuestBackend
from reconciler.engine.connect import connect, docker_settings
from reconciler.engine.observe import Readers
from reconciler.spec.state import DesiredState

__all__ = ["Connector", "LabConnector", "Wiring"]


@dataclass(frozen=True)
class Wiring:
    readers: Readers
    proxmox: GuestBackend | None
    docker: ContainerBackend | None
    docker_endpoints: Mapping[str, str]
    env: Mapping[str, str]


class Connector(Protocol):
    def wiring(self, desired: DesiredState) -> Wiring:
        """The backends for this revision. Raises ConfigError for missing settings."""
        ...

    def close(self) -> None: ...


class LabConnector:
    """The real backends, reopened only when the lab's connection settings change."""

    def __init__(self, env: Mapping[str, str], *, state_dir: Path | None = None) -> None:
        self.env = env
        self.state_dir = state_dir  # its known_hosts: model files on a Docker host are read over SSH
        self._stack: ExitStack | None = None
        self._key: str | None = None
        self._wiring: Wiring | None = None

    def wiring(self, desired: DesiredState) -> Wiring:
        hosts = docker_settings(desired, self.env)
        key = hashlib.sha256(
            json.dumps([desired.lab.model_dump(mode="json"), repr(sorted(hosts.items()))], sort_keys=True).encode()
        ).hexdigest()
        if self._wiring is not None and key == self._key:
            return self._wiring
        self.close()
        stack = ExitStack()
        backends = stack.enter_context(connect(desired, self.env, state_dir=self.state_dir))
        self._stack, self._key = stack, key
        self._wiring = Wiring(
            readers=backends,
            proxmox=backends.proxmox,
            docker=backends.docker,
            docker_endpoints={name: s.endpoint for name, s in hosts.items()},
            env=self.env,
        )
        return self._wiring

    def close(self) -> None:
        stack, self._stack, self._wiring, self._key = self._stack, None, None, None
        if stack is not None:
            stack.close()

"""The Docker steps of an apply: do, undo and check one container change.

Called by `engine.apply.Applier` for each change whose backend is Docker. A replace keeps the old
container, stopped and renamed with `OLD_SUFFIX`, until the whole run is healthy (the applier's
finalize removes it), so an undo can bring it back. The check waits for the container to run, be
healthy by Docker's word and answer its probe (and hold its Ollama model, with `load`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, assert_never

from reconciler import redact
from reconciler.engine.health import ProbeResult, endpoint_address, ollama_load, poll, probe_http, probe_tcp
from reconciler.engine.steps import Done, HealthPolicy, host_and_name
from reconciler.engine.switch import SwitchHooks
from reconciler.errors import PlanError
from reconciler.planning.container_run import ContainerProbe, ContainerRun, ContainerSeen
from reconciler.planning.inventory import OLD_SUFFIX
from reconciler.planning.observed import ObservedContainer
from reconciler.planning.plan import Action, Change
from reconciler.spec.models import PowerState

__all__ = ["ContainerBackend", "DockerSteps", "Prober", "resolve_secrets"]

Prober = Callable[[str, ContainerProbe, str | None], ProbeResult]
"""Answers a container's probe instead of the network (the demo's in-memory lab, a test probing the local
engine): the Docker host, the probe, and the Ollama model that must be loaded (None: just the probe)."""


class ContainerBackend(Protocol):
    def container_state(self, host: str, name: str) -> ObservedContainer | None: ...
    def ensure_image(self, host: str, image: str) -> None: ...
    def create_container(self, host: str, spec: ContainerRun) -> str: ...
    def start_container(self, host: str, name: str) -> None: ...
    def stop_container(self, host: str, name: str, *, timeout: float = 10.0) -> None: ...
    def remove_container(self, host: str, name: str, *, force: bool = False) -> None: ...
    def rename_container(self, host: str, name: str, *, new_name: str) -> None: ...


@dataclass
class DockerSteps:
    """Container changes, against one Docker backend (None when the Lab has no Docker host)."""

    docker: ContainerBackend | None
    health: HealthPolicy
    env: Mapping[str, str]
    endpoints: Mapping[str, str]
    sleep: Callable[[float], None] = time.sleep
    prober: Prober | None = None  # the demo's in-memory probes
    switch: SwitchHooks | None = None  # exclusive-group members: wait for VRAM, phased health (engine/switch.py)

    def do(self, change: Change, before: Mapping[str, Any] | None) -> None:
        assert self.docker is not None
        after = change.after
        host, name = host_and_name(change)
        match change.action:
            case Action.CREATE:
                assert isinstance(after, ContainerRun), "a container create has a ContainerRun after"
                self.docker.ensure_image(host, after.image)
                self.docker.create_container(host, resolve_secrets(after, self.env))
                if after.state is PowerState.RUNNING:
                    self._before_start(change)
                    self.docker.start_container(host, name)
            case Action.REPLACE:
                assert isinstance(after, ContainerRun), "a container replace has a ContainerRun after"
                self.docker.ensure_image(host, after.image)  # fail before the old container is touched
                old = self.docker.container_state(host, name)
                if old is not None:
                    if old.status in ("running", "restarting") and _holds_exclusive(old):
                        self.docker.stop_container(host, name, timeout=self.health.shutdown_timeout)
                    self.docker.rename_container(host, name, new_name=name + OLD_SUFFIX)
                self.docker.create_container(host, resolve_secrets(after, self.env))
                if after.state is PowerState.RUNNING:
                    self._before_start(change)
                    self.docker.start_container(host, name)
                if old is not None and old.status in ("running", "restarting"):
                    self.docker.stop_container(host, name + OLD_SUFFIX, timeout=self.health.shutdown_timeout)
            case Action.START:
                self._before_start(change)
                self.docker.start_container(host, name)
            case Action.STOP:
                self.docker.stop_container(host, name, timeout=self.health.shutdown_timeout)
            case Action.DELETE:
                self.docker.stop_container(host, name, timeout=self.health.shutdown_timeout)
                self.docker.rename_container(host, name, new_name=name + OLD_SUFFIX)
            case Action.UPDATE | Action.UPDATE_RESTART:
                raise PlanError("containers are replaced, not updated", resource=change.address)
            case _:
                assert_never(change.action)

    def capture(self, change: Change) -> dict[str, Any] | None:
        """The state to restore: what Docker holds right now."""
        assert self.docker is not None
        host, name = host_and_name(change)
        state = self.docker.container_state(host, name)
        if state is None:
            return None
        return {
            "status": state.status,
            "health": state.health,
            "image": state.image,
            "id": state.id,
            "restart_count": state.restart_count,
        }

    def undo(self, done: Done) -> None:
        assert self.docker is not None
        change = done.change
        host, name = host_and_name(change)
        before = done.before or {}
        was_running = before.get("status") in ("running", "restarting")
        match change.action:
            case Action.CREATE:
                self.docker.remove_container(host, name, force=True)
            case Action.REPLACE | Action.DELETE:
                if change.action is Action.REPLACE:
                    self.docker.remove_container(host, name, force=True)
                if self.docker.container_state(host, name + OLD_SUFFIX) is not None:
                    self.docker.rename_container(host, name + OLD_SUFFIX, new_name=name)
                if was_running:
                    self._before_restart(change)
                    self.docker.start_container(host, name)
            case Action.START:
                self.docker.stop_container(host, name, timeout=self.health.shutdown_timeout)
            case Action.STOP:
                self._before_restart(change)
                self.docker.start_container(host, name)
            case Action.UPDATE | Action.UPDATE_RESTART:
                pass
            case _:
                assert_never(change.action)

    def check_healthy(self, change: Change, probe: ContainerProbe | None, *, load: str | None = None) -> ProbeResult:
        """Running (and Docker-healthy, and answering `probe`); with `load`, also holding that Ollama model."""
        assert self.docker is not None
        host, name = host_and_name(change)
        first = self.docker.container_state(host, name)
        restarts = first.restart_count if first else 0

        def died() -> str | None:
            state = self.docker.container_state(host, name)  # type: ignore[union-attr]
            if state is None:
                return "the container is gone"
            if state.status in ("exited", "dead"):
                return f"the container {state.status} while starting"
            if state.restart_count > restarts or state.status == "restarting":
                return "the container restarted while starting"
            if state.health == "unhealthy":
                return "Docker reports the container unhealthy"
            return None

        def check() -> ProbeResult:
            state = self.docker.container_state(host, name)  # type: ignore[union-attr]
            if state is None or state.status != "running":
                return ProbeResult(False, f"container is {state.status if state else 'gone'}")
            if state.health not in (None, "healthy"):
                return ProbeResult(False, f"Docker health is {state.health}")
            if not probe:
                return ProbeResult(True, "container running" + (" and healthy" if state.health else ""))
            return self._probe(host, probe)

        timeout = probe.timeout if probe else self.health.container_start_timeout
        interval = self.health.interval or (probe.interval if probe else 1.0)
        result = poll(check, timeout=self.health.cap(timeout), interval=interval, still_starting=died, sleep=self.sleep)
        if result.healthy and load:
            # The server answers; the model it is there for must be pulled and sit on its GPUs too.
            result = self._probe(host, replace(probe or ContainerProbe(), timeout=timeout), load)
        return self._phased(change, result, timeout=timeout, interval=interval)

    def _before_start(self, change: Change) -> None:
        """A member of an exclusive group starts once its GPUs have the memory it needs free (engine/switch.py)."""
        if self.switch is not None and isinstance(change.after, ContainerRun):
            timeout, interval = self.health.cap(self.health.vram_timeout), self.health.interval or 1.0
            host, _ = host_and_name(change)
            self.switch.wait_before_start(
                change.address, change.after, host=host, timeout=timeout, interval=interval, sleep=self.sleep
            )

    def _before_restart(self, change: Change) -> None:
        """A rollback starts an old member again once the GPUs it held have its memory free (when it can tell)."""
        if self.switch is not None and isinstance(change.before, ContainerSeen):
            timeout, interval = self.health.cap(self.health.vram_timeout), self.health.interval or 1.0
            self.switch.wait_before_restart(
                change.address,
                host=change.before.host,
                gpus=change.before.gpus,
                timeout=timeout,
                interval=interval,
                sleep=self.sleep,
            )

    def _phased(self, change: Change, result: ProbeResult, *, timeout: float, interval: float) -> ProbeResult:
        """A member that is a model server must also list its model and complete a token (engine/switch.py)."""
        if not result.healthy or self.switch is None or self.prober is not None or self.docker is None:
            return result
        if not isinstance(change.after, ContainerRun):
            return result
        host, name = host_and_name(change)
        address = endpoint_address(self.endpoints.get(host, "unix:///"))
        phased = self.switch.phased(
            self.docker,
            change.address,
            change.after,
            host=host,
            name=name,
            host_address=address,
            timeout=self.health.cap(timeout),
            interval=interval,
            sleep=self.sleep,
        )
        return result if phased is None else phased

    def _probe(self, host: str, probe: ContainerProbe, load: str | None = None) -> ProbeResult:
        """`probe` answered by the container on `host`; with `load`, that Ollama model loaded at `probe.port`."""
        if self.prober is not None:
            return self.prober(host, probe, load)
        address = endpoint_address(self.endpoints.get(host, "unix:///"))
        if load:
            return ollama_load(f"http://{address}:{probe.port}", load, timeout=self.health.cap(probe.timeout))
        if probe.http:
            url = probe.http
            if url.startswith("/"):
                url = f"http://{address}:{probe.port}{url}"
            return probe_http(url, status=probe.status, body=probe.body)
        target = str(probe.tcp)
        return probe_tcp(target if ":" in target else f"{address}:{target}")


def _holds_exclusive(container: ObservedContainer) -> bool:
    """A container that publishes host ports or holds GPUs must stop before its replacement starts."""
    return bool(container.ports or container.gpus)


def resolve_secrets(run: ContainerRun, environ: Mapping[str, str]) -> ContainerRun:
    """The container to create, its secret references resolved from `environ` now (and hidden from every message)."""
    resolved = run.with_secrets(environ)
    for key in run.secret_env:
        redact.register(resolved.env[key])
    return resolved

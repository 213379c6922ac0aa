"""The exclusive switch: stop the old members of a group, wait for their VRAM, start the new, check, or go back.

Who calls it: the applier, before it starts a model that takes GPUs from another member of its exclusive
group (`wait_for_vram`, `member_health`), and `ExclusiveSwitch` as one unit (tests, the benchmark). Why:
a new model started while the driver still holds the old one's memory fails to load (vLLM checks
`gpu_memory_utilization x total` is free at start), and "the container runs" says nothing about a model
that is still loading or answers no completion.

The switch, in order:
  1. stop each old member that runs;
  2. wait until NVML (local, or `nvidia-smi` through the host's engine) shows each GPU of the new
     members with the memory they need free; bounded, and a timeout fails the switch;
  3. start the new members;
  4. wait for their phased health (starting -> ready -> working, engine/health.py).
On a failure it stops the new members, waits for the memory each old member needs (when it says), starts
the old ones again and checks they are healthy again; the
report says `rolled-back`, or `rollback-failed` with what did not come back. Every wait reports its phase
and elapsed time to a `ProgressSink` (the terminal's live line, the loop's status).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from reconciler.backends.nvml import wait_for_free
from reconciler.engine.health import ModelServer, ProbeResult, Progress, ProgressSink, phased_health
from reconciler.errors import NotFoundError, ReconcilerError, TemporaryError
from reconciler.planning.container_run import ContainerRun
from reconciler.planning.observed import NvmlObservation, ObservedContainer, ObservedGpu
from reconciler.planning.plan import Address
from reconciler.spec.state import DesiredState

__all__ = [
    "EngineGpus",
    "ExclusiveSwitch",
    "GpuMemory",
    "GpuQuery",
    "Member",
    "SwitchHooks",
    "SwitchOutcome",
    "SwitchPolicy",
    "SwitchReport",
    "before_start",
    "member_health",
    "model_server_for",
    "vram_needs",
    "wait_for_vram",
]

GIB = 2**30


class Containers(Protocol):
    def container_state(self, host: str, name: str) -> ObservedContainer | None: ...
    def start_container(self, host: str, name: str) -> None: ...
    def stop_container(self, host: str, name: str, *, timeout: float = 10.0) -> None: ...


@runtime_checkable
class GpuMemory(Protocol):
    """What NvmlBackend offers: wait_for_free raises TemporaryError on timeout, PermanentError when lost."""

    def observe(self) -> NvmlObservation: ...

    def wait_for_free(
        self,
        uuid: str,
        needed: int,
        *,
        timeout: float,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> ObservedGpu: ...


@runtime_checkable
class GpuQuery(Protocol):
    """What DockerBackend offers: a host's GPUs read by nvidia-smi through its engine."""

    def query_gpus(self, host: str, *, image: str, timeout: float = 60.0) -> NvmlObservation: ...


@dataclass(frozen=True)
class EngineGpus:
    """GpuMemory read by `nvidia-smi` in a short-lived container on the Docker host that holds the GPUs.

    For GPUs the reconciler's own NVML cannot see (passed through to a VM, or in an LXC).
    """

    docker: GpuQuery
    host: str
    image: str

    def observe(self) -> NvmlObservation:
        return self.docker.query_gpus(self.host, image=self.image)

    def wait_for_free(
        self,
        uuid: str,
        needed: int,
        *,
        timeout: float,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> ObservedGpu:
        return wait_for_free(
            lambda: self.docker.query_gpus(self.host, image=self.image, timeout=max(timeout, 10.0)),
            uuid,
            needed,
            source=f"nvidia-smi on {self.host!r}",
            timeout=timeout,
            interval=interval,
            clock=clock,
            sleep=sleep,
        )


@dataclass(frozen=True)
class Member:
    """One container of an exclusive group: where it runs, what it answers as, what it needs per GPU."""

    host: str
    name: str
    server: ModelServer | None = None  # None: "running" is healthy enough (not a model server)
    gpus: tuple[str, ...] = ()  # NVML UUIDs
    needs: int | None = None  # bytes free needed on each GPU before it starts; None: not waited for

    @property
    def label(self) -> str:
        return f"{self.host}/{self.name}"


@dataclass(frozen=True)
class SwitchPolicy:
    stop_timeout: float = 120.0
    free_timeout: float = 120.0  # how long the driver may take to free a stopped model's memory
    health_timeout: float = 900.0  # large models take minutes to load
    interval: float = 1.0


class SwitchOutcome(enum.StrEnum):
    SWITCHED = "switched"
    ROLLED_BACK = "rolled-back"
    ROLLBACK_FAILED = "rollback-failed"


@dataclass
class SwitchReport:
    outcome: SwitchOutcome = SwitchOutcome.SWITCHED
    failure: str | None = None
    rollback_errors: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # stop, free, start, health, rollback

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": str(self.outcome),
            "failure": self.failure,
            "rollback_errors": list(self.rollback_errors),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


class _Failed(Exception):
    pass


def wait_for_vram(
    gpus: GpuMemory,
    needs: Mapping[str, int],
    *,
    timeout: float,
    interval: float,
    progress: ProgressSink | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ProbeResult:
    """Wait until each GPU (UUID) has the bytes `needs` names free. Unhealthy on timeout or a lost GPU."""
    start = clock()
    unseen: list[str] = []
    for uuid, needed in sorted(needs.items()):

        def pause(seconds: float, uuid: str = uuid, needed: int = needed) -> None:
            if progress is not None:
                progress(Progress(f"gpu/{uuid}", "freeing", clock() - start, f"{needed / GIB:.1f} GiB needed"))
            sleep(seconds)

        remaining = max(timeout - (clock() - start), 0.0)
        try:
            gpus.wait_for_free(uuid, needed, timeout=remaining, interval=interval, clock=clock, sleep=pause)
        except NotFoundError:
            unseen.append(uuid)  # a GPU this reader does not see (passed through to a VM): nothing to wait on
        except ReconcilerError as exc:
            return ProbeResult(False, f"GPU memory not freed: {exc}", clock() - start)
    seen = [f"{u}: {n / GIB:.1f} GiB free" for u, n in sorted(needs.items()) if u not in unseen]
    detail = ", ".join([*seen, *(f"{u}: not seen here, not waited for" for u in unseen)]) or "nothing to wait for"
    return ProbeResult(True, detail, clock() - start)


def vram_needs(after: ContainerRun, *, declared: int | None, totals: Mapping[str, int]) -> dict[str, int]:
    """Bytes that must be free on each GPU (UUID) of a planned container before it starts.

    The declared `vram` when there is one; for vLLM, `gpu_memory_utilization x total`, which vLLM itself
    demands free at start; otherwise nothing (not waited for: the footprint is unknown here).
    """
    uuids = [u for u in after.gpus if u != "all"]
    if declared:
        return dict.fromkeys(uuids, declared)
    command = list(after.command or ())
    if "--served-model-name" not in command:
        return {}
    fraction = 0.9  # vLLM's default
    if "--gpu-memory-utilization" in command[:-1]:
        try:
            fraction = float(command[command.index("--gpu-memory-utilization") + 1])
        except ValueError:
            return {}
    return {u: int(min(max(fraction, 0.0), 1.0) * totals[u]) for u in uuids if u in totals}


def before_start(
    gpus: GpuMemory,
    after: ContainerRun,
    *,
    declared: int | None,
    timeout: float,
    interval: float,
    progress: ProgressSink | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ProbeResult:
    """The applier's hook before it starts a member of an exclusive group: wait for its VRAM to be free."""
    observed = gpus.observe()
    totals = {g.uuid: g.memory_total for g in observed.gpus if not g.lost}
    needs = vram_needs(after, declared=declared, totals=totals)
    return wait_for_vram(gpus, needs, timeout=timeout, interval=interval, progress=progress, sleep=sleep)


def member_health(
    containers: Containers,
    member: Member,
    *,
    timeout: float,
    interval: float,
    progress: ProgressSink | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ProbeResult:
    """Phased health of a member's server, giving up as soon as its container exits or restarts."""
    first = containers.container_state(member.host, member.name)
    restarts = first.restart_count if first else 0

    def died() -> str | None:
        state = containers.container_state(member.host, member.name)
        if state is None:
            return "the container is gone"
        if state.status in ("exited", "dead"):
            return f"the container {state.status} while starting"
        if state.restart_count > restarts or state.status == "restarting":
            return "the container restarted while starting"
        return None

    if member.server is None:
        dead = died()
        return ProbeResult(dead is None, dead or "container running")
    return phased_health(
        member.server,
        timeout=timeout,
        interval=interval,
        subject=member.label,
        still_starting=died,
        progress=progress,
        clock=clock,
        sleep=sleep,
    )


def model_server_for(after: ContainerRun, address: str) -> ModelServer | None:
    """The model server a planned container is, read from its engine's command line; None for any other.

    vLLM names its model `--served-model-name`, llama-server `--alias`; Ollama serves what it loads.
    """
    port = after.probe.port if after.probe is not None else None
    if port is None:
        return None
    base = f"http://{address}:{port}"
    command = list(after.command or ())
    for flag in ("--served-model-name", "--alias"):
        if flag in command[:-1]:
            return ModelServer(base, str(command[command.index(flag) + 1]))
    if after.load:
        return ModelServer(base, after.load, health_path="/")
    return None


class ExclusiveSwitch:
    """Run one switch of an exclusive group; see the module docstring for the order and the rollback."""

    def __init__(
        self,
        containers: Containers,
        gpus: GpuMemory | None,
        *,
        policy: SwitchPolicy | None = None,
        progress: ProgressSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.containers = containers
        self.gpus = gpus
        self.policy = policy or SwitchPolicy()
        self.progress = progress
        self.clock = clock
        self.sleep = sleep

    def run(self, old: Sequence[Member], new: Sequence[Member]) -> SwitchReport:
        report = SwitchReport()
        stopped: list[Member] = []
        started: list[Member] = []
        try:
            with self._timed(report, "stop"):
                for member in old:
                    if self._running(member):
                        stopped.append(member)
                        self._call(self._stop, member, "stopping")
            with self._timed(report, "free"):
                self._wait_free(new)
            with self._timed(report, "start"):
                for member in new:
                    started.append(member)
                    self._call(self._start, member, "starting")
            with self._timed(report, "health"):
                for member in new:
                    self._healthy(member)
        except _Failed as failure:
            report.failure = str(failure)
            with self._timed(report, "rollback"):
                self._rollback(report, stopped, started)
        return report

    def _wait_free(self, new: Sequence[Member]) -> None:
        needs: dict[str, int] = {}
        for member in new:
            for uuid in member.gpus if member.needs is not None else ():
                needs[uuid] = max(needs.get(uuid, 0), member.needs or 0)
        if not needs or self.gpus is None:
            return
        freed = wait_for_vram(
            self.gpus,
            needs,
            timeout=self.policy.free_timeout,
            interval=self.policy.interval,
            progress=self.progress,
            clock=self.clock,
            sleep=self.sleep,
        )
        if not freed.healthy:
            raise _Failed(freed.detail)

    def _healthy(self, member: Member) -> None:
        result = member_health(
            self.containers,
            member,
            timeout=self.policy.health_timeout,
            interval=self.policy.interval,
            progress=self.progress,
            clock=self.clock,
            sleep=self.sleep,
        )
        if not result.healthy:
            raise _Failed(f"{member.label}: {result.detail}")

    def _rollback(self, report: SwitchReport, stopped: list[Member], started: list[Member]) -> None:
        for member in reversed(started):
            try:
                self._stop(member)
            except ReconcilerError as exc:
                report.rollback_errors.append(f"{member.label}: could not be stopped: {exc}")
        for member in stopped:
            try:
                self._wait_free([member])  # the new members' memory first, when the old one declares its own
                self._start(member)
                self._healthy(member)
            except (ReconcilerError, _Failed) as exc:
                report.rollback_errors.append(f"{member.label}: not healthy again: {exc}")
        report.outcome = SwitchOutcome.ROLLBACK_FAILED if report.rollback_errors else SwitchOutcome.ROLLED_BACK

    def _running(self, member: Member) -> bool:
        state = self.containers.container_state(member.host, member.name)
        return state is not None and state.status in ("running", "restarting")

    def _stop(self, member: Member) -> None:
        self.containers.stop_container(member.host, member.name, timeout=self.policy.stop_timeout)

    def _start(self, member: Member) -> None:
        self.containers.start_container(member.host, member.name)

    @staticmethod
    def _call(action: Callable[[Member], None], member: Member, doing: str) -> None:
        try:
            action(member)
        except ReconcilerError as exc:
            raise _Failed(f"{doing} {member.label}: {exc}") from exc

    def _timed(self, report: SwitchReport, step: str) -> _Timer:
        return _Timer(report.seconds, step, self.clock, self.progress)


class _Timer:
    """Adds the seconds a step took to `seconds[step]`, and tells `progress` the step began."""

    def __init__(
        self, seconds: dict[str, float], step: str, clock: Callable[[], float], progress: ProgressSink | None
    ) -> None:
        self.seconds, self.step, self.clock, self.progress = seconds, step, clock, progress

    def __enter__(self) -> None:
        self.start = self.clock()
        if self.progress is not None:
            self.progress(Progress("switch", self.step, 0.0))

    def __exit__(self, *exc_info: object) -> None:
        self.seconds[self.step] = self.seconds.get(self.step, 0.0) + self.clock() - self.start


# ---- the applier's hooks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwitchHooks:
    """What the Docker steps call for the members of exclusive groups (container address -> declared VRAM).

    A member's GPUs are waited on through the local NVML where it sees them, else through `nvidia-smi` on
    its host's engine (`engine`, in the Lab's `images.gpu_query`): a VM's passed-through GPUs, an LXC's on
    another machine.
    """

    members: Mapping[str, int | None]
    gpus: GpuMemory | None = None
    progress: ProgressSink | None = None
    engine: GpuQuery | None = None
    image: str = ""

    @classmethod
    def of(
        cls,
        desired: DesiredState,
        *,
        gpus: GpuMemory | None,
        progress: ProgressSink | None,
        engine: GpuQuery | None = None,
    ) -> SwitchHooks:
        members: dict[str, int | None] = {}
        for workload in desired.workloads():
            address = Address.of(workload)
            if workload.exclusive is not None and address is not None:
                members[str(address)] = int(workload.vram) if workload.vram is not None else None
        return cls(members, gpus, progress, engine, desired.lab.images.gpu_query)

    def reader_for(self, host: str, uuids: Sequence[str]) -> GpuMemory | None:
        """The local NVML when it sees every GPU of `uuids`, else the host's engine (when there is one)."""
        wanted = {u.lower() for u in uuids if u != "all"}
        if self.gpus is not None:
            local = self.gpus.observe()
            if local.available and wanted <= {g.uuid.lower() for g in local.gpus}:
                return self.gpus
        if self.engine is not None and wanted:
            return EngineGpus(self.engine, host, self.image)
        return self.gpus

    def wait_before_start(
        self,
        address: str,
        after: ContainerRun,
        *,
        host: str,
        timeout: float,
        interval: float,
        sleep: Callable[[float], None],
    ) -> None:
        """Raise TemporaryError when the GPUs of a member about to start do not have its memory free in time."""
        if address not in self.members or not after.gpus:
            return
        gpus = self.reader_for(host, after.gpus)
        if gpus is None:
            return
        freed = before_start(
            gpus,
            after,
            declared=self.members[address],
            timeout=timeout,
            interval=interval,
            progress=self.progress,
            sleep=sleep,
        )
        if not freed.healthy:
            raise TemporaryError(freed.detail, resource=address, hint="stop what holds the GPU, or wait longer")

    def wait_before_restart(
        self,
        address: str,
        *,
        host: str,
        gpus: Sequence[str],
        timeout: float,
        interval: float,
        sleep: Callable[[float], None],
    ) -> None:
        """Before a rollback starts an old member again: wait for its declared VRAM on the GPUs it held.

        Only when it can: a member with a declared `vram` and GPUs a reader sees. Raises TemporaryError on
        a timeout (starting it then would fail to load anyway).
        """
        declared = self.members.get(address)
        uuids = [u for u in gpus if u != "all"]
        if not declared or not uuids:
            return
        reader = self.reader_for(host, uuids)
        if reader is None:
            return
        needs = dict.fromkeys(uuids, declared)
        freed = wait_for_vram(reader, needs, timeout=timeout, interval=interval, progress=self.progress, sleep=sleep)
        if not freed.healthy:
            raise TemporaryError(freed.detail, resource=address, hint="stop what holds the GPU, then start it")

    def phased(
        self,
        containers: Containers,
        change_address: str,
        after: ContainerRun,
        *,
        host: str,
        name: str,
        host_address: str,
        timeout: float,
        interval: float,
        sleep: Callable[[float], None],
    ) -> ProbeResult | None:
        """Phased health of a member that is a model server; None for anything else."""
        server = model_server_for(after, host_address) if change_address in self.members else None
        if server is None:
            return None
        member = Member(host, name, server)
        return member_health(
            containers, member, timeout=timeout, interval=interval, progress=self.progress, sleep=sleep
        )

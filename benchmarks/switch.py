"""`make bench`: the reconciler's own overhead in an exclusive switch. Prints figures; asserts nothing.

A switch between two stand-in vLLM servers (tests/support/standin_servers.py) in a private Docker
engine, with GPU memory read through the real nvidia-ml-py bindings over the fake libnvidia-ml: stop
the old member, wait for its VRAM, start the new one, wait through its phased health. The stand-in
"loads" for LOAD seconds (it refuses connections meanwhile, as vLLM does); the overhead is the switch's
total time minus that load time: Docker calls, NVML reads, HTTP checks and the polling granularity.
Goal: under 1 s.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOAD = 3.0
SWITCHES = 6
INTERVAL = 0.25  # the health and VRAM polling interval of the run (SwitchPolicy.interval)


@contextlib.contextmanager
def _engine(work: Path) -> Iterator[str]:
    from tests.support.dockerd import ENV_DOCKER_HOST, _private_engine

    endpoint = os.environ.get(ENV_DOCKER_HOST)
    if endpoint:
        yield endpoint
        return
    with _private_engine(work) as engine:
        yield engine.endpoint


def bench_switch() -> None:
    import docker

    from reconciler.backends.docker import DockerBackend, DockerHostSettings
    from reconciler.backends.nvml import NvmlBackend
    from reconciler.engine.switch import ExclusiveSwitch, Member, SwitchPolicy
    from reconciler.fakes.nvml import STATE_ENV, build_library
    from tests.support.standin_servers import Servers, standin_image

    gib = 2**30
    with tempfile.TemporaryDirectory() as scratch, _engine(Path(scratch)) as endpoint:
        work = Path(scratch)
        nvml = NvmlBackend(library=str(build_library(work / "nvml")))
        os.environ[STATE_ENV] = str(work / "nvml-state.txt")
        client = docker.DockerClient(base_url=endpoint, timeout=60)
        backend = DockerBackend({"infer": DockerHostSettings(name="infer", endpoint=endpoint)})
        servers = Servers(backend, standin_image(client))
        try:
            members = []
            for name in ("fast", "deep"):
                made = servers.make(name, load_seconds=str(LOAD))
                members.append(Member("infer", name, made.server, gpus=("GPU-3090a000",), needs=20 * gib))
            backend.start_container("infer", "fast")
            switch = ExclusiveSwitch(backend, nvml, policy=SwitchPolicy(interval=INTERVAL, health_timeout=60))
            for late_reads in (0, 2):
                _series(switch, members, work / "nvml-state.txt", late_reads)
        finally:
            servers.remove()
            backend.close()
            client.close()


def _series(switch: Any, members: list[Any], state: Path, late_reads: int) -> None:
    """SWITCHES switches back and forth; the driver frees the old model's memory after `late_reads` reads."""
    from reconciler.engine.switch import SwitchOutcome
    from reconciler.fakes.nvml import FakeGpu, FakeProcess, write_state

    gib = 2**30
    overheads: list[float] = []
    for turn in range(SWITCHES):
        old, new = (members[0], members[1]) if turn % 2 == 0 else (members[1], members[0])
        process = FakeProcess(4000 + turn, 21 * gib, gone=True, release_after=late_reads)
        write_state(state, [FakeGpu(0, "GPU-3090a000", "0000:01:00.0", "RTX 3090", 24 * gib, processes=(process,))])
        started = time.perf_counter()
        report = switch.run([old], [new])
        total = time.perf_counter() - started
        if report.outcome is not SwitchOutcome.SWITCHED:
            print(f"switch {turn}: {report.outcome}: {report.failure}")
            return
        overheads.append(total - LOAD)
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items())
        print(f"  switch {turn + 1}: {total:.2f}s total, {total - LOAD:.2f}s overhead ({parts})")
    print(
        f"switch overhead, VRAM freed after {late_reads} NVML reads (total minus the stand-in's {LOAD:g}s load,"
        f" polling every {INTERVAL:g}s): median {statistics.median(overheads):.2f}s, max {max(overheads):.2f}s"
        f" over {SWITCHES} switches (goal: under 1 s)"
    )


def main() -> None:
    try:
        bench_switch()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        print(f"switch benchmark skipped: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()

"""A lab of real components for end-to-end tests: fakepve over HTTPS, a real Docker engine, the fake NVML.

`real_lab(spec_path)` (fixture factory) seeds fakepve with the spec's nodes, NVIDIA GPUs and PCI
mappings, writes the fake NVML state for the spec's GPUs, points every Docker host of the spec at
the test engine (`RECONCILER_DOCKER_HOST_<NAME>`), tags the engine-shaped test image under every
image the spec's containers use, and creates the host folders they bind-mount. Then tests plan
and apply through the same code as `reconciler plan/apply` (`engine.connect` + `engine.run`), or run
the CLI itself with `lab.cli(...)`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reconciler.engine.apply import ApplyReport, HealthPolicy
from reconciler.engine.connect import Backends, connect, docker_settings
from reconciler.engine.journal import Journal
from reconciler.engine.run import ApplyOptions, apply_pass, plan_pass
from reconciler.fakes.lab import fake_gpus
from reconciler.fakes.nvml import write_state
from reconciler.planning.containers import desired_container
from reconciler.planning.plan import Plan
from reconciler.spec.models import Gpu, Model
from reconciler.spec.state import DesiredState
from reconciler.spec.validate import load_and_validate
from tests.support.dockerd import DockerEngine, EngineImage
from tests.support.fakepve import PveServer
from tests.support.nvml import FakeNvml

__all__ = ["RealLab", "real_lab"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RealLab:
    spec: Path
    pve: PveServer
    engine: DockerEngine
    nvml: FakeNvml
    state_dir: Path
    env: dict[str, str]
    created_dirs: list[Path] = field(default_factory=list)

    def load(self) -> DesiredState:
        result = load_and_validate(self.spec)
        errors = [str(d) for d in result.diagnostics if d.severity == "error"]
        assert not errors, errors
        return result.state

    @contextmanager
    def backends(self, desired: DesiredState | None = None) -> Iterator[Backends]:
        with connect(desired or self.load(), self.env) as backends:
            yield backends

    def journal(self) -> Journal:
        return Journal(self.state_dir / "journal.sqlite")

    def plan(self, desired: DesiredState | None = None) -> Plan:
        desired = desired or self.load()
        journal = self.journal()
        try:
            with self.backends(desired) as backends:
                return plan_pass(desired, backends, journal)
        finally:
            journal.close()

    def apply(
        self, desired: DesiredState | None = None, *, health_timeout: float = 20.0, **options: Any
    ) -> tuple[Plan, ApplyReport | None]:
        desired = desired or self.load()
        journal = self.journal()
        endpoints = {name: s.endpoint for name, s in docker_settings(desired, self.env).items()}
        opts = ApplyOptions(health=HealthPolicy(max_timeout=health_timeout, interval=0.2), **options)
        try:
            with self.backends(desired) as backends:
                return apply_pass(
                    desired,
                    backends,
                    proxmox=backends.proxmox,
                    docker=backends.docker,
                    journal=journal,
                    env=self.env,
                    docker_endpoints=endpoints,
                    options=opts,
                )
        finally:
            journal.close()

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `python -m reconciler ARGS` with this lab's environment (state dir included)."""
        env = {**os.environ, **self.env, "RECONCILER_STATE_DIR": str(self.state_dir), "COLUMNS": "200"}
        return subprocess.run(
            [sys.executable, "-m", "reconciler", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _seed(lab: RealLab, desired: DesiredState, engine_image: EngineImage, docker_client: Any) -> None:
    pve = lab.pve.pve
    for node in desired.lab.nodes:
        pve.nodes.setdefault(node, {"online": True})
    for gpu in desired.of(Gpu):
        if gpu.pci_function0:
            pve.add_gpu(gpu.node, gpu.pci_function0.rsplit(".", 1)[0])
        if gpu.mapping and gpu.pci_function0:
            pve.add_pci_mapping(gpu.mapping, {gpu.node: [gpu.pci_function0.rsplit(".", 1)[0]]})
    write_state(lab.nvml.state, fake_gpus(desired))
    images: set[str] = set()
    for workload in desired.workloads():
        container = desired_container(workload, lab=desired.lab, gpu_names=(), gpu_uuids={}, revision=None)
        images.add(container.image)
        for host_path, _, _ in container.volumes:
            path = Path(host_path)
            if isinstance(workload, Model) and path.suffix == ".gguf":
                path = path.parent
            if not path.exists():
                lab.created_dirs.append(path)
                path.mkdir(parents=True, exist_ok=True)
    for image in images:
        repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
        docker_client.api.tag(engine_image.tag, repository, tag or "latest")


@pytest.fixture
def real_lab(
    pve_server: PveServer,
    docker_engine: DockerEngine,
    docker_client: Any,
    engine_image: EngineImage,
    fake_nvml: FakeNvml,
    tmp_path: Path,
) -> Iterator[Callable[[Path], RealLab]]:
    """A factory: `real_lab(spec_folder)` -> a seeded RealLab. Containers it made are removed afterwards."""
    made: list[RealLab] = []

    def make(spec: Path) -> RealLab:
        desired = load_and_validate(spec).state
        auth = "password" if desired.lab.proxmox is not None and desired.lab.proxmox.auth == "password" else "token"
        env = {
            **pve_server.env(auth),
            "RECONCILER_NVML_LIBRARY": str(fake_nvml.library),
            "FAKE_NVML_STATE": str(fake_nvml.state),
        }
        for name in desired.docker_hosts():
            env[f"RECONCILER_DOCKER_HOST_{name.upper().replace('-', '_')}"] = docker_engine.endpoint
        lab = RealLab(spec, pve_server, docker_engine, fake_nvml, tmp_path / f"state-{len(made)}", env)
        _seed(lab, desired, engine_image, docker_client)
        made.append(lab)
        return lab

    yield make
    for container in docker_client.containers.list(all=True, filters={"label": "reconciler.managed=true"}):
        container.remove(force=True)
    for lab in made:
        for path in reversed(lab.created_dirs):
            try:
                path.rmdir()
            except OSError:
                pass

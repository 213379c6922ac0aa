"""The `fake_nvml` fixture: the real nvidia-ml-py bindings over the fake libnvidia-ml.so.1.

The library is compiled once per session (a C compiler is the missing
component: skipped locally, a failure under CI) into the session's temporary
folder; each test gets its own state file, named by FAKE_NVML_STATE for the
test's duration, which starts with no GPUs. Write GPUs with `fake_nvml.set()`,
then read them with `fake_nvml.backend().observe()`.

The fixture is named `fake_nvml`; its function is `fake_nvml_fixture`, so that
importing it does not shadow the test argument (ruff F811). Use it everywhere
once tests/conftest.py lists this module in `pytest_plugins`, or in one test
module with `from tests.support.nvml import fake_nvml_fixture  # noqa: F401`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.backends.nvml import NvmlBackend
from reconciler.fakes.nvml import (
    DEFAULT_DRIVER_VERSION,
    STATE_ENV,
    CompilerNotFound,
    FakeGpu,
    build_library,
    write_state,
)
from tests.support.components import missing

__all__ = ["FakeNvml", "fake_nvml_fixture"]


@dataclass(frozen=True)
class FakeNvml:
    """The built fake library and this test's state file."""

    library: Path
    state: Path

    def set(
        self,
        *gpus: FakeGpu,
        driver_version: str = DEFAULT_DRIVER_VERSION,
        failures: Mapping[str, int] | None = None,
        root: bool = True,
    ) -> None:
        """Replace the GPUs the library reports (seen by the next NVML call); `root=False` refuses Set calls."""
        write_state(self.state, gpus, driver_version=driver_version, failures=failures, root=root)

    def backend(self) -> NvmlBackend:
        return NvmlBackend(library=str(self.library))


def _library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The build is cached by source hash in the session folder: after the first test this only hashes the source.
    try:
        return build_library(tmp_path_factory.getbasetemp() / "fake-nvml")
    except CompilerNotFound as exc:
        missing("cc", str(exc))


@pytest.fixture(name="fake_nvml")
def fake_nvml_fixture(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> FakeNvml:
    """The fake NVML library with this test's state file (no GPUs yet), named by FAKE_NVML_STATE."""
    fake = FakeNvml(library=_library(tmp_path_factory), state=tmp_path / "nvml-state.txt")
    fake.set()
    monkeypatch.setenv(STATE_ENV, str(fake.state))
    return fake

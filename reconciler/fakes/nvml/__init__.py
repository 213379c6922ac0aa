"""Build the fake NVML library (fake_nvml.c) and write the GPU state it reports.

Tests (`tests/support/nvml.py`) and the demo call `build_library()` to compile
a fake `libnvidia-ml.so.1` with the host's C compiler, give its path to
`NvmlBackend(library=...)`, and describe the GPUs with `write_state()` into
the file named by `FAKE_NVML_STATE`. The real nvidia-ml-py bindings then run
over it, so what is tested is the backend plus the real bindings; only the
driver is fake. The library re-reads the file on every call: writing a new
state between two observes is how a test fills VRAM, adds a process or loses
a GPU. The file format is documented at the top of fake_nvml.c.

The library's Set calls (power limit, persistence mode, compute mode) append
`set` lines to the same file, so what a test set is what the next read sees;
`write_state()` starts afresh. A process can be `gone` with its memory
released only after a number of memory reads, which is how a test makes a
switch wait for VRAM to be freed.

The state path is an environment variable, so one process has one fake state
at a time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import quote

__all__ = [
    "DEFAULT_DRIVER_VERSION",
    "LIBRARY_NAME",
    "STATE_ENV",
    "CompilerNotFound",
    "FakeGpu",
    "FakeNvmlBuildError",
    "FakeProcess",
    "build_library",
    "write_state",
]

STATE_ENV = "FAKE_NVML_STATE"
LIBRARY_NAME = "libnvidia-ml.so.1"
DEFAULT_DRIVER_VERSION = "580.105.08"
_CFLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread")
_SOURCE = "fake_nvml.c"


class FakeNvmlBuildError(RuntimeError):
    """The fake library could not be built."""


class CompilerNotFound(FakeNvmlBuildError):
    """No C compiler on PATH (`cc`, or `$CC`)."""


@dataclass(frozen=True, slots=True)
class FakeProcess:
    """A compute process holding VRAM on one fake GPU."""

    pid: int
    used_memory: int | None  # bytes; None: NVML reports "not available"
    name: str | None = None  # answers nvmlSystemGetProcessName; None: NOT_FOUND
    gone: bool = False  # exited: not listed, but its memory stays used for `release_after` memory reads
    release_after: int = 0


@dataclass(frozen=True, slots=True)
class FakeGpu:
    """One GPU as the fake library reports it. A None reading makes its NVML call return NOT_SUPPORTED."""

    index: int
    uuid: str
    pci_bus_id: str  # any form NVML accepts: 0000:01:00.0, 00000000:01:00.0, 01:00.0
    name: str
    memory_total: int | None  # bytes
    memory_used: int = 0
    memory_reserved: int = 0  # driver-reserved; counted as used by nvmlDeviceGetMemoryInfo (v1)
    utilization: int | None = 0  # percent
    temperature: int | None = 40  # Celsius
    power_usage_w: float | None = 20.0
    power_limit_w: float | None = 250.0  # enforced and management limit
    power_min_w: float | None = None  # constraints; None: NOT_SUPPORTED, and setting a limit is too
    power_max_w: float | None = None
    power_default_w: float | None = None
    persistence_mode: bool | None = False
    compute_mode: int | None = 0  # 0 default, 2 prohibited, 3 exclusive process
    lost: bool = False  # every call for this GPU returns NVML_ERROR_GPU_IS_LOST
    processes: tuple[FakeProcess, ...] = ()
    failures: Mapping[str, int] = field(default_factory=dict)  # exported NVML function -> return code

    @property
    def memory_free(self) -> int | None:
        if self.memory_total is None:
            return None
        return max(self.memory_total - self.memory_used - self.memory_reserved, 0)


def build_library(dest_dir: Path, *, compiler: str | None = None) -> Path:
    """Compile fake_nvml.c into `dest_dir/libnvidia-ml.so.1` and return its path.

    A build is skipped when the library there was built from the same source,
    flags and compiler (a `.sha256` stamp beside it). The new library replaces
    the old one atomically, so a process that has the old one loaded keeps it.
    Raises CompilerNotFound without a compiler (`compiler`, else `$CC`, else
    `cc`) and FakeNvmlBuildError when compiling fails.
    """
    name = compiler or os.environ.get("CC") or "cc"
    executable = shutil.which(name)
    if executable is None:
        raise CompilerNotFound(f"no C compiler: {name!r} is not on PATH (install gcc or set CC) to build the fake NVML")
    source = resources.files(__name__).joinpath(_SOURCE)
    digest = hashlib.sha256(source.read_bytes())
    digest.update("\0".join((*_CFLAGS, executable)).encode())
    target = dest_dir / LIBRARY_NAME
    stamp = dest_dir / f"{LIBRARY_NAME}.sha256"
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == digest.hexdigest():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with resources.as_file(source) as source_path, tempfile.TemporaryDirectory(dir=dest_dir) as scratch:
        built = Path(scratch) / LIBRARY_NAME
        result = subprocess.run(
            [executable, *_CFLAGS, "-o", str(built), str(source_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise FakeNvmlBuildError(
                f"{executable} could not compile {_SOURCE} (exit {result.returncode}):\n{result.stderr.strip()}"
            )
        os.replace(built, target)
    stamp.write_text(digest.hexdigest() + "\n")
    return target


def write_state(
    path: Path,
    gpus: Iterable[FakeGpu],
    *,
    driver_version: str = DEFAULT_DRIVER_VERSION,
    failures: Mapping[str, int] | None = None,
    root: bool = True,
) -> None:
    """Write the state the fake library reports, replacing the file atomically.

    `failures` maps exported NVML functions to the code they return for the
    whole system; `{"nvmlInit": 9}` makes init fail with DRIVER_NOT_LOADED.
    `root=False` makes every Set call answer NVML_ERROR_NO_PERMISSION.
    """
    lines = [f"system driver={_text(driver_version)} root={int(root)}{_failures(failures or {})}"]
    processes: list[str] = []
    for gpu in gpus:
        lines.append(
            f"gpu index={gpu.index} uuid={_text(gpu.uuid)} pci_bus_id={_text(gpu.pci_bus_id)} name={_text(gpu.name)}"
            f" memory_total={_number(gpu.memory_total)} memory_used={gpu.memory_used}"
            f" memory_reserved={gpu.memory_reserved} utilization={_number(gpu.utilization)}"
            f" temperature={_number(gpu.temperature)} power_usage_mw={_milliwatts(gpu.power_usage_w)}"
            f" power_limit_mw={_milliwatts(gpu.power_limit_w)} power_min_mw={_milliwatts(gpu.power_min_w)}"
            f" power_max_mw={_milliwatts(gpu.power_max_w)} power_default_mw={_milliwatts(gpu.power_default_w)}"
            f" persistence={_number(_flag(gpu.persistence_mode))} compute_mode={_number(gpu.compute_mode)}"
            f" lost={int(gpu.lost)}{_failures(gpu.failures)}"
        )
        for process in gpu.processes:
            name = "" if process.name is None else f" name={_text(process.name)}"
            gone = f" gone=1 release_after={process.release_after}" if process.gone else ""
            processes.append(
                f"process gpu={gpu.index} pid={process.pid} memory={_number(process.used_memory)}{name}{gone}"
            )
    text = "\n".join([*lines, *processes]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, path)


def _text(value: str) -> str:
    if not value:
        raise ValueError("fake NVML strings must not be empty")
    return quote(value, safe="")


def _number(value: int | None) -> str:
    return "na" if value is None else str(value)


def _flag(value: bool | None) -> int | None:
    return None if value is None else int(value)


def _milliwatts(watts: float | None) -> str:
    return "na" if watts is None else str(round(watts * 1000))


def _failures(failures: Mapping[str, int]) -> str:
    if not failures:
        return ""
    return " fail=" + ",".join(f"{function}:{code}" for function, code in failures.items())

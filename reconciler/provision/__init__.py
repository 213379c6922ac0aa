"""The built-in provisioning steps, shipped as shell scripts in `steps/` (package data).

Who calls it: the engine reads `builtin_scripts()` once per pass and hands them to the planner
(`planning/provision.py`), which hashes each script with its version and inputs, so a new release
whose script changed runs that step again. A version is bumped by hand when a step's meaning changes
without its text changing (what it installs from elsewhere, say).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib import resources
from types import MappingProxyType

from reconciler.planning.provision import BuiltinScript
from reconciler.spec.access import BuiltinStep

__all__ = ["BUILTIN_VERSIONS", "builtin_scripts"]

BUILTIN_VERSIONS: Mapping[BuiltinStep, str] = MappingProxyType(
    {
        BuiltinStep.DOCKER: "1",
        BuiltinStep.NVIDIA_CONTAINER_TOOLKIT: "1",
        BuiltinStep.NVIDIA_USERSPACE: "1",
    }
)


@cache
def builtin_scripts() -> Mapping[BuiltinStep, BuiltinScript]:
    """Each built-in step's script and version; raises if the package lacks one (a broken install)."""
    folder = resources.files(__package__).joinpath("steps")
    return MappingProxyType(
        {
            step: BuiltinScript(step, BUILTIN_VERSIONS[step], folder.joinpath(f"{step.value}.sh").read_bytes())
            for step in BuiltinStep
        }
    )

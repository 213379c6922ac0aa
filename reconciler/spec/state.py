"""DesiredState: the validated resources of one revision, and where each was written.

Produced by the loader, read by the validator, the planner and the CLI. It is
immutable; lookups are by kind and name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from reconciler.spec.diagnostics import Position
from reconciler.spec.models import Container, DockerHost, Lab, Lxc, Model, Resource, Vm

__all__ = ["DesiredState", "Origin"]

R = TypeVar("R", bound=Resource)
PathKey = tuple[str | int, ...]


@dataclass(frozen=True)
class Origin:
    """Where a resource was written: its document, and the position of each value and key in it."""

    file: str
    document: int
    position: Position
    values: Mapping[PathKey, Position] = field(default_factory=dict, repr=False)
    keys: Mapping[PathKey, Position] = field(default_factory=dict, repr=False)

    def position_of(self, path: PathKey) -> Position:
        """The position of the value at `path`, or of its nearest written parent."""
        for end in range(len(path), -1, -1):
            found = self.values.get(path[:end])
            if found is not None:
                return found
        return self.position

    def key_position(self, path: PathKey) -> Position:
        return self.keys.get(path) or self.position_of(path)


@dataclass(frozen=True)
class DesiredState:
    resources: tuple[Resource, ...]
    origins: Mapping[str, Origin] = field(default_factory=dict, repr=False)
    revision: str | None = None
    files: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    """Files the specs name (ssh key files, provisioning scripts), by path relative to the tree: see spec/files.py."""
    _index: dict[str, Resource] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {r.ref: r for r in self.resources})

    @property
    def lab(self) -> Lab:
        labs = self.of(Lab)
        return labs[0] if labs else Lab(name="lab")

    def of(self, cls: type[R]) -> tuple[R, ...]:
        return tuple(r for r in self.resources if isinstance(r, cls))

    def get(self, cls: type[R], name: str) -> R | None:
        found = self._index.get(f"{cls.model_fields['kind'].default}/{name}")
        return found if isinstance(found, cls) else None

    def guests(self) -> tuple[Lxc | Vm, ...]:
        return tuple(r for r in self.resources if isinstance(r, Lxc | Vm))

    def workloads(self) -> tuple[Container | Model, ...]:
        return tuple(r for r in self.resources if isinstance(r, Container | Model))

    def find(self, ref: str) -> Resource | None:
        """The resource named "Kind/name", if the spec has it."""
        return self._index.get(ref)

    def origin(self, resource: Resource) -> Origin | None:
        return self.origins.get(resource.ref)

    def position(self, resource: Resource, *path: str | int) -> Position | None:
        origin = self.origins.get(resource.ref)
        return origin.position_of(tuple(path)) if origin else None

    def docker_hosts(self) -> dict[str, DockerHost | Lxc | Vm]:
        """Every Docker engine of the lab by name: DockerHosts and guests that run one."""
        hosts: dict[str, DockerHost | Lxc | Vm] = {h.name: h for h in self.of(DockerHost)}
        for guest in self.guests():
            if guest.docker is not None:
                hosts.setdefault(guest.name, guest)
        return hosts

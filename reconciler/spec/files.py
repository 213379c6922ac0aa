"""Files the specs name, read from the spec tree and attached to the DesiredState.

Who calls it: `load_and_validate` (a folder on disk, through `tree_reader`) after the loader, and a
git source with a reader over the commit's tree. The specs name public key files (`ssh_keys:
[{file: keys/admin.pub}]`) and provisioning scripts (`provision: [{script: provision/gpu.sh}]`) by
paths relative to the tree's root (or, failing that, to the folder of the document naming them, so
that a repository validated from its top finds `specs/keys/admin.pub` for `specs/guests.yaml`);
their bytes become `DesiredState.files`, so the planner hashes a script's content without doing
I/O, and a plan is made from what the revision holds.

A named file must stay inside the tree: the path is relative with no `..` (checked by the model),
and the reader resolves symlinks and refuses a target outside the root, anything but a regular
file, and more than `MAX_ATTACHED_BYTES`. Nothing here raises on bad input: every problem is a
diagnostic at the line that names the file.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from reconciler.spec.access import SshKey, check_spec_path, parse_public_keys
from reconciler.spec.diagnostics import Diagnostic, Position, Severity
from reconciler.spec.loader import LoadResult
from reconciler.spec.models import DockerHost, Lxc, Resource, Vm
from reconciler.spec.state import DesiredState

__all__ = [
    "MAX_ATTACHED_BYTES",
    "FileReader",
    "Purpose",
    "Reference",
    "UnreadableFile",
    "attach_files",
    "blobs_reader",
    "references",
    "tree_reader",
]

MAX_ATTACHED_BYTES = 1024 * 1024  # a key file or a provisioning script larger than this is a mistake


class UnreadableFile(Exception):
    """A named file cannot be used; the message says why (never a secret, never a path outside the tree)."""


FileReader = Callable[[str], bytes]
"""Reads a file by its path relative to the spec tree; raises UnreadableFile."""


class Purpose(enum.StrEnum):
    SSH_KEYS = "ssh-keys"  # OpenSSH public keys, one a line
    SCRIPT = "script"  # a provisioning script (UTF-8 text)


@dataclass(frozen=True)
class Reference:
    resource: Resource
    where: tuple[str | int, ...]  # the path of the value in the document, for the diagnostic's position
    file: str
    purpose: Purpose


def references(state: DesiredState) -> Iterator[Reference]:
    """Every file the specs name, in document order."""
    for resource in state.resources:
        if isinstance(resource, Lxc):
            yield from _key_files(resource, resource.ssh_keys, ("ssh_keys",))
        if isinstance(resource, Vm) and resource.cloud_init is not None:
            yield from _key_files(resource, resource.cloud_init.ssh_keys, ("cloud_init", "ssh_keys"))
        if isinstance(resource, Lxc | Vm | DockerHost):
            for index, step in enumerate(resource.provision):
                if step.script is not None:
                    yield Reference(resource, ("provision", index, "script"), step.script, Purpose.SCRIPT)


def _key_files(resource: Resource, keys: tuple[SshKey, ...], where: tuple[str, ...]) -> Iterator[Reference]:
    for index, key in enumerate(keys):
        if key.file is not None:
            yield Reference(resource, (*where, index, "file"), key.file, Purpose.SSH_KEYS)


def _check_content(data: bytes, purpose: Purpose) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    if "\0" in text:
        return "holds a NUL byte"
    match purpose:
        case Purpose.SSH_KEYS:
            try:
                parse_public_keys(text)
            except ValueError as exc:
                return f"does not hold OpenSSH public keys: {exc}"
        case Purpose.SCRIPT:
            if not text.strip():
                return "is empty"
    return None


def attach_files(result: LoadResult, read: FileReader) -> LoadResult:
    """`result` with the files its specs name attached, or a diagnostic for each that cannot be used.

    A tree's content revision (`tree-...`) then covers the attached files too, so editing a script
    is a new revision; a commit's SHA covers them already.
    """
    state = result.state
    files: dict[str, bytes] = {}
    problems: dict[str, str] = {}
    found: list[Diagnostic] = []
    for reference in references(state):
        if reference.file not in files and reference.file not in problems:
            try:
                data = _read_near(read, check_spec_path(reference.file), state.position(reference.resource))
            except (UnreadableFile, ValueError) as exc:
                problems[reference.file] = str(exc)
            else:
                problem = _check_content(data, reference.purpose)
                if problem is None:
                    files[reference.file] = data
                else:
                    problems[reference.file] = f"{reference.file} {problem}"
        if reference.file in problems:
            found.append(
                Diagnostic(
                    Severity.ERROR,
                    problems[reference.file],
                    state.position(reference.resource, *reference.where),
                    reference.resource.kind,
                    reference.resource.name,
                    hint="name a file inside the spec tree, relative to its root",
                )
            )
    if not files and not found:
        return result
    revision = state.revision
    if revision is not None and revision.startswith("tree-"):
        digest = hashlib.sha256(revision.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        revision = "tree-" + digest.hexdigest()[:12]
    attached = dataclasses.replace(state, files={**state.files, **files}, revision=revision)
    return LoadResult(attached, (*result.diagnostics, *found))


def _read_near(read: FileReader, name: str, position: Position | None) -> bytes:
    """`name` relative to the tree's root; else relative to the folder of the document naming it (a repository
    validated from its top holds `specs/keys/admin.pub` for the `keys/admin.pub` of `specs/guests.yaml`)."""
    try:
        return read(name)
    except UnreadableFile:
        parts = PurePosixPath(position.file).parent.parts if position is not None else ()
        for start in range(len(parts) - 1, -1, -1):  # the nearest folder first, then the longer paths to it
            try:
                return read(check_spec_path(str(PurePosixPath(*parts[start:], name))))
            except (UnreadableFile, ValueError):
                continue
        raise


def blobs_reader(blobs: Mapping[str, bytes], *, where: str = "the commit") -> FileReader:
    """A reader of files already read (a git commit's small blobs, by path relative to the spec tree)."""

    def read(name: str) -> bytes:
        data = blobs.get(name)
        if data is None:
            raise UnreadableFile(
                f"{name} is not a file in {where} (or is a symlink, or larger than {MAX_ATTACHED_BYTES // 1024} KiB)"
            )
        return data

    return read


def tree_reader(root: Path) -> FileReader:
    """A reader of files under `root` (a spec folder; for a single spec file, its folder)."""
    base = (root if root.is_dir() else root.parent).resolve()

    def read(name: str) -> bytes:
        try:
            path = (base / name).resolve(strict=True)
        except (OSError, RuntimeError):
            raise UnreadableFile(f"{name} does not exist in the spec tree") from None
        if not path.is_relative_to(base):
            raise UnreadableFile(f"{name} leads outside the spec tree (a symlink)")
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):
                raise UnreadableFile(f"{name} is not a regular file")
            with path.open("rb") as handle:
                data = handle.read(MAX_ATTACHED_BYTES + 1)
        except OSError as exc:
            raise UnreadableFile(f"cannot read {name}: {exc.strerror or exc}") from None
        if len(data) > MAX_ATTACHED_BYTES:
            raise UnreadableFile(f"{name} is larger than {MAX_ATTACHED_BYTES // 1024} KiB")
        return data

    return read

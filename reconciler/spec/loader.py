"""Load a tree of YAML spec files into validated models, with a position for everything.

Callers: `reconciler validate/plan/apply` (through `load_tree`) and the git
source (through `load_files`, fed from a commit's blobs). Nothing here raises
on bad input: every problem becomes a Diagnostic with file, line and column,
and all of them are collected. The YAML is composed into nodes by libyaml and
turned into Python values here, which is where duplicate keys, alias bombs
and cycles are caught.

The work is bounded whatever the tree holds, so that a hostile or mistaken
tree is refused quickly instead of taking minutes: symlinks that leave the tree
are reported and never followed; a tree may hold at most `MAX_FILES` spec files
and `MAX_TREE_BYTES`, and all its documents together at most `MAX_TREE_VALUES`
YAML values (counted before anything is built); a file at most `MAX_DOCUMENTS`
documents, a mapping at most `MAX_KEYS` keys; and each file shows at most
`MAX_DIAGNOSTICS_PER_FILE` problems, then one line saying how many more there are.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import stat
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
import yaml.reader
from pydantic import BaseModel, ValidationError

from reconciler.spec.diagnostics import MAX_DIAGNOSTICS_PER_FILE, Diagnostic, Position, Severity, cap_per_file
from reconciler.spec.models import KINDS, Lab, Resource
from reconciler.spec.state import DesiredState, Origin

__all__ = [
    "MAX_DOCUMENTS",
    "MAX_FILES",
    "MAX_FILE_BYTES",
    "MAX_KEYS",
    "MAX_NODES",
    "MAX_TREE_BYTES",
    "MAX_TREE_VALUES",
    "LoadResult",
    "SpecFile",
    "content_revision",
    "load_files",
    "load_tree",
]

MAX_FILE_BYTES = 8 * 1024 * 1024  # a spec file larger than this is a mistake, not a lab
MAX_TREE_BYTES = 16 * 1024 * 1024
MAX_FILES = 2_000  # spec files in one tree
MAX_ENTRIES = 50_000  # folders and files looked at while walking a tree
MAX_TREE_VALUES = 200_000  # YAML events a tree may hold, and values its documents may expand to (~2,000 guests)
MAX_NODES = 200_000  # YAML nodes one document may expand to (alias bombs stop here)
MAX_DOCUMENTS = 5_000  # documents in one file
MAX_KEYS = 1_000  # keys in one mapping
MAX_DEPTH = 64
SPEC_SUFFIXES = (".yaml", ".yml")

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CORE_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "int", "float", "bool", "null"))
_scalar_constructor = yaml.SafeLoader("")

Path_ = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class SpecFile:
    """One file's bytes and the path shown to the user (relative to the tree's root)."""

    path: str
    data: bytes


@dataclass(frozen=True)
class LoadResult:
    state: DesiredState
    diagnostics: tuple[Diagnostic, ...]

    @property
    def ok(self) -> bool:
        return not any(d.severity is Severity.ERROR for d in self.diagnostics)


class _DocumentError(Exception):
    def __init__(self, message: str, node: yaml.Node | None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.node = node
        self.hint = hint


@dataclass
class _Converter:
    """Turns a composed YAML node graph into plain values, recording where each came from."""

    file: str
    tree: _Budget
    values: dict[Path_, Position] = field(default_factory=dict)
    keys: dict[Path_, Position] = field(default_factory=dict)
    budget: int = MAX_NODES

    def position(self, node: yaml.Node) -> Position:
        return Position(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def convert(self, node: yaml.Node, path: Path_ = (), active: frozenset[int] = frozenset()) -> Any:
        self.budget -= 1
        self.tree.values -= 1
        if self.budget < 0:
            raise _DocumentError(
                f"document expands to more than {MAX_NODES} values",
                node,
                "YAML aliases may not be used to inflate a spec",
            )
        if self.tree.values < 0:
            raise _DocumentError(
                f"the spec tree expands to more than {MAX_TREE_VALUES} values",
                node,
                "YAML aliases may not be used to inflate a spec",
            )
        if len(path) > MAX_DEPTH:
            raise _DocumentError(f"nested more than {MAX_DEPTH} levels deep", node)
        if id(node) in active:
            raise _DocumentError("a YAML alias refers to itself", node)
        self.values.setdefault(path, self.position(node))
        if node.tag not in _CORE_TAGS:
            raise _DocumentError(
                f"YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')!r} is not allowed in specs",
                node,
                "write plain values",
            )
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, active | {id(node)})
        if isinstance(node, yaml.SequenceNode):
            inner = active | {id(node)}
            return [self.convert(item, (*path, index), inner) for index, item in enumerate(node.value)]
        try:
            return _scalar_constructor.construct_object(node, deep=True)
        except Exception as exc:  # noqa: BLE001 - libyaml/constructor errors of every kind become diagnostics
            raise _DocumentError(f"cannot read value: {exc}".splitlines()[0], node) from None

    def _mapping(self, node: yaml.MappingNode, path: Path_, active: frozenset[int]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if len(node.value) > MAX_KEYS:
            raise _DocumentError(f"a mapping has more than {MAX_KEYS} keys", node, "a spec needs far fewer")
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _DocumentError("YAML merge keys ('<<') are not supported in specs", key_node)
            if not isinstance(key_node, yaml.ScalarNode):
                raise _DocumentError("a mapping key must be a plain string", key_node)
            key = str(key_node.value)
            if key in result:
                first = self.keys[(*path, key)]
                raise _DocumentError(f"duplicate key {key!r} (first defined at line {first.line})", key_node)
            self.keys[(*path, key)] = self.position(key_node)
            result[key] = self.convert(value_node, (*path, key), active)
        return result


def load_tree(root: Path) -> LoadResult:
    """Load every *.yaml/*.yml under `root` (a file or a folder), following no symlink out of it."""
    files: list[SpecFile] = []
    diagnostics: list[Diagnostic] = []
    total = 0
    for path, problem in _walk(root):
        shown = _display(path, root)
        if problem:
            diagnostics.append(Diagnostic(Severity.ERROR, problem, Position(shown, 1, 1)))
            continue
        data, problem = _read_spec_file(path)
        if problem:
            diagnostics.append(Diagnostic(Severity.ERROR, problem, Position(shown, 1, 1)))
        elif data is not None:
            total += len(data)
            if total > MAX_TREE_BYTES:
                diagnostics.append(_tree_too_large(shown))
                break
            files.append(SpecFile(shown, data))
    result = load_files(files, revision=content_revision(files), empty_hint=str(root), report_empty=not diagnostics)
    return LoadResult(result.state, (*diagnostics, *result.diagnostics))


def _read_spec_file(path: Path) -> tuple[bytes | None, str | None]:
    """A regular file's bytes, never more than the limit (a FIFO or /dev/zero named *.yaml is refused)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file"
        if info.st_size > MAX_FILE_BYTES:
            return None, _too_large(str(path), info.st_size).message
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        return None, f"cannot read file: {exc.strerror or exc}"
    if len(data) > MAX_FILE_BYTES:
        return None, _too_large(str(path), len(data)).message
    return data, None


def content_revision(files: Iterable[SpecFile]) -> str:
    """A revision id for a tree that is not a git commit: a hash of its files' names and bytes."""
    digest = hashlib.sha256()
    for spec_file in sorted(files, key=lambda f: f.path):
        digest.update(spec_file.path.encode() + b"\0" + hashlib.sha256(spec_file.data).digest())
    return "tree-" + digest.hexdigest()[:12]


@dataclass
class _Budget:
    """What is left of a tree's allowance while its files are read (see the module docstring)."""

    events: int = MAX_TREE_VALUES
    values: int = MAX_TREE_VALUES
    bytes: int = MAX_TREE_BYTES
    hints: int = MAX_DIAGNOSTICS_PER_FILE  # "did you mean" suggestions left for the current file
    unchecked: dict[str, int] = field(default_factory=dict)  # documents not validated, per file

    @property
    def spent(self) -> bool:
        return self.events < 0 or self.values < 0 or self.bytes < 0


def load_files(
    files: Iterable[SpecFile], *, revision: str | None = None, empty_hint: str = "", report_empty: bool = True
) -> LoadResult:
    """Validate the documents of `files` into a DesiredState; collect every problem."""
    resources: list[Resource] = []
    origins: dict[str, Origin] = {}
    diagnostics: list[Diagnostic] = []
    ordered = sorted(files, key=lambda f: f.path)
    if len(ordered) > MAX_FILES:
        diagnostics.append(
            Diagnostic(
                Severity.ERROR,
                f"the spec tree has {len(ordered)} spec files, more than {MAX_FILES}; the rest are not read",
                Position(ordered[MAX_FILES].path, 1, 1),
                hint="keep only spec files in the tree",
            )
        )
        ordered = ordered[:MAX_FILES]
    budget = _Budget()
    for index, spec_file in enumerate(ordered):
        budget.bytes -= len(spec_file.data)
        budget.hints = MAX_DIAGNOSTICS_PER_FILE
        if budget.spent:
            diagnostics.append(_tree_too_large(spec_file.path, unread=len(ordered) - index))
            break
        for resource, origin, problems in _load_file(spec_file, budget):
            diagnostics.extend(problems)
            if resource is None or origin is None:
                continue
            if resource.ref in origins:
                first = origins[resource.ref].position
                diagnostics.append(
                    Diagnostic(
                        Severity.ERROR,
                        f"duplicate {resource.kind} named {resource.name!r} (first defined at {first})",
                        origin.position,
                        resource.kind,
                        resource.name,
                        hint="names are unique per kind",
                    )
                )
                continue
            resources.append(resource)
            origins[resource.ref] = origin
    diagnostics.extend(_lab_count(resources, origins, ordered, empty_hint, report=report_empty and not diagnostics))
    state = DesiredState(tuple(resources), origins, revision=revision)
    notes = {name: f"{count} more document(s) in it were not checked" for name, count in budget.unchecked.items()}
    notes = {
        name: note for name, note in notes.items() if any(d.position and d.position.file == name for d in diagnostics)
    }
    return LoadResult(state, cap_per_file(diagnostics, MAX_DIAGNOSTICS_PER_FILE, notes=notes))


def _lab_count(
    resources: list[Resource], origins: Mapping[str, Origin], files: list[SpecFile], empty_hint: str, *, report: bool
) -> list[Diagnostic]:
    """A tree has exactly one Lab: none (when nothing else is wrong) or a second one is an error."""
    first = Position(files[0].path, 1, 1) if files else None
    if not resources:
        if not report:
            return []
        where = f" in {empty_hint}" if empty_hint else ""
        return [
            Diagnostic(Severity.ERROR, f"no spec documents found{where}", first, hint="add YAML files with a 'kind'")
        ]
    labs = [r for r in resources if isinstance(r, Lab)]
    if not labs:
        if not report:
            return []
        return [
            Diagnostic(
                Severity.ERROR,
                "no Lab document",
                origins[resources[0].ref].position,
                hint="add one document with 'kind: Lab' (its connections and defaults)",
            )
        ]
    return [
        Diagnostic(Severity.ERROR, "a spec tree has exactly one Lab", origins[extra.ref].position, "Lab", extra.name)
        for extra in labs[1:]
    ]


def _tree_too_large(path: str, *, unread: int = 0) -> Diagnostic:
    rest = f"; {unread} file(s) from here on are not read" if unread else "; the rest is not read"
    return Diagnostic(
        Severity.ERROR,
        f"the spec tree is too large (more than {MAX_TREE_BYTES // 1024 // 1024} MiB "
        f"or {MAX_TREE_VALUES} YAML values){rest}",
        Position(path, 1, 1),
        hint="keep only spec files in the tree",
    )


def _load_file(
    spec_file: SpecFile, budget: _Budget
) -> Iterator[tuple[Resource | None, Origin | None, list[Diagnostic]]]:
    nodes, problem = _compose(spec_file, budget)
    if problem is not None:
        yield None, None, [problem]
        return
    problems = 0
    for index, node in enumerate(nodes):
        if node is None:
            continue
        if problems >= MAX_DIAGNOSTICS_PER_FILE:  # enough to fix first; the rest would only cost time
            budget.unchecked[spec_file.path] = budget.unchecked.get(spec_file.path, 0) + 1
            continue
        resource, origin, found = _load_document(spec_file.path, index, node, budget)
        problems += len(found)
        yield resource, origin, found


def _compose(spec_file: SpecFile, budget: _Budget) -> tuple[list[yaml.Node], Diagnostic | None]:
    """The file's documents as YAML nodes, or the one problem that stops the file from being read."""
    if len(spec_file.data) > MAX_FILE_BYTES:
        return [], _too_large(spec_file.path, len(spec_file.data))
    try:
        text = spec_file.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = spec_file.data[: exc.start].count(b"\n") + 1
        column = exc.start - (spec_file.data.rfind(b"\n", 0, exc.start) + 1) + 1
        message = f"not UTF-8 text (byte 0x{spec_file.data[exc.start]:02x})"
        return [], Diagnostic(
            Severity.ERROR, message, Position(spec_file.path, line, column), hint="save the file as UTF-8"
        )
    text = text.removeprefix("\ufeff")
    try:
        _prescan(text, budget)
        return list(yaml.compose_all(text, Loader=_Loader)), None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        position = Position(spec_file.path, mark.line + 1, mark.column + 1) if mark else Position(spec_file.path, 1, 1)
        message = " ".join(part for part in (exc.context, exc.problem) if part)
        if "maximum nesting depth" in message:  # libyaml 0.2.6+ stops deep nesting itself, before our check
            return [], Diagnostic(Severity.ERROR, f"nested more than {MAX_DEPTH} levels deep", position)
        return [], Diagnostic(Severity.ERROR, f"YAML syntax error: {message}", position)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        character = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        position = Position(spec_file.path, line, column)
        message = f"unacceptable character {character} in YAML"
        return [], Diagnostic(Severity.ERROR, message, position, hint="remove control characters from the file")
    except _Refused as exc:
        position = Position(spec_file.path, exc.line, exc.column)
        return [], Diagnostic(Severity.ERROR, str(exc), position, hint=exc.hint)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        return [], Diagnostic(Severity.ERROR, f"YAML syntax error: {exc}", Position(spec_file.path, 1, 1))


class _Refused(Exception):
    """A file refused from its event stream, before anything is built from it."""

    def __init__(self, message: str, mark: Any, hint: str | None = None) -> None:  # a yaml.Mark from C or Python
        super().__init__(message)
        self.line: int = mark.line + 1 if mark else 1
        self.column: int = mark.column + 1 if mark else 1
        self.hint = hint


def _prescan(text: str, budget: _Budget) -> None:
    """Refuse what would cost too much from the event stream: deep nesting (before libyaml's recursive
    composer can overflow the C stack), too many documents, and more YAML values than the tree may hold."""
    depth = documents = 0
    for event in yaml.parse(text, Loader=_Loader):
        budget.events -= 1
        if budget.events < 0:
            raise _Refused(
                f"the spec tree holds more than {MAX_TREE_VALUES} YAML values; this file and the rest are not read",
                event.start_mark,
                "a lab needs far fewer; keep only spec files in the tree",
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        elif isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > MAX_DOCUMENTS:
                raise _Refused(f"more than {MAX_DOCUMENTS} documents in one file", event.start_mark, "split the file")


def _load_document(
    file: str, index: int, node: yaml.Node, budget: _Budget
) -> tuple[Resource | None, Origin | None, list[Diagnostic]]:
    converter = _Converter(file, budget)
    start = converter.position(node)
    try:
        data = converter.convert(node)
    except _DocumentError as exc:
        where = converter.position(exc.node) if exc.node is not None else start
        return None, None, [Diagnostic(Severity.ERROR, exc.message, where, hint=exc.hint)]
    except RecursionError:
        return None, None, [Diagnostic(Severity.ERROR, "document is nested too deeply", start)]
    if data is None:
        return None, None, []
    if not isinstance(data, dict):
        return None, None, [Diagnostic(Severity.ERROR, "a spec document must be a mapping with a 'kind'", start)]
    kind = data.get("kind")
    name = data.get("name") if isinstance(data.get("name"), str) else None
    if not isinstance(kind, str) or kind not in KINDS:
        where = converter.values.get(("kind",), start)
        if kind is None:
            message, hint = "document has no 'kind'", f"one of: {', '.join(KINDS)}"
        else:
            message, hint = f"unknown kind {kind!r}", _did_you_mean(str(kind), KINDS) or f"one of: {', '.join(KINDS)}"
        return None, None, [Diagnostic(Severity.ERROR, message, where, None, name, hint)]
    cls = KINDS[kind]
    origin = Origin(file=file, document=index, position=start, values=converter.values, keys=converter.keys)
    try:
        resource = cls.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            budget.hints -= 1
            problems.append(_from_pydantic(error, cls, origin, kind, name, hints=budget.hints >= 0))
        return None, None, problems
    except RecursionError:
        return None, None, [Diagnostic(Severity.ERROR, "document is nested too deeply", start, kind, name)]
    return resource, origin, []


def _from_pydantic(
    error: Mapping[str, Any], cls: type[BaseModel], origin: Origin, kind: str, name: str | None, *, hints: bool = True
) -> Diagnostic:
    loc: Path_ = tuple(part for part in error["loc"] if isinstance(part, str | int))
    field_path = ".".join(str(part) for part in loc) or kind
    if error["type"] == "extra_forbidden" and loc:
        known = _fields_at(cls, loc[:-1]) if hints else set()
        hint = (_did_you_mean(str(loc[-1]), known) or f"known fields: {', '.join(sorted(known))}") if known else None
        return Diagnostic(Severity.ERROR, f"unknown field {field_path!r}", origin.key_position(loc), kind, name, hint)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        return Diagnostic(Severity.ERROR, f"missing field {field_path!r}", origin.position_of(loc[:-1]), kind, name)
    return Diagnostic(Severity.ERROR, f"{field_path}: {message}", origin.position_of(loc), kind, name)


def _fields_at(cls: type[BaseModel], loc: Path_) -> set[str]:
    """The field names of the model found by following `loc` from `cls` (for 'did you mean')."""
    current: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return set()
        current = _model_in(current.model_fields[part].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return set(current.model_fields)
    return set()


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, tuple, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"did you mean {by_lower[close[0]]!r}?" if close else None


def _too_large(path: str, size: int) -> Diagnostic:
    return Diagnostic(
        Severity.ERROR,
        f"file is too large ({size / 1024 / 1024:.1f} MiB; the limit is {MAX_FILE_BYTES // 1024 // 1024} MiB)",
        Position(path, 1, 1),
        hint="split it, or move data that is not spec out of the tree",
    )


_OUTSIDE = "symlink leads out of the spec tree; it is not followed"


def _walk(root: Path) -> Iterator[tuple[Path, str | None]]:
    """Spec files under root in a stable order. Symlinks that leave the tree are reported, never followed;
    symlink loops inside it are reported once; the walk stops after `MAX_ENTRIES` files and folders."""
    if not root.exists():
        yield root, "no such file or folder"
        return
    if root.is_file():
        yield root, None
        return
    inside = Path(os.path.realpath(root))
    seen: set[tuple[int, int]] = set()
    entries = 0
    for directory, subdirs, filenames in os.walk(root, followlinks=True, onerror=None):
        here = Path(directory)
        try:
            info = here.stat()
        except OSError:
            yield here, "cannot read folder (a symlink loop or a dangling link)"
            subdirs[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            yield here, "symlink loop: this folder was already read"
            subdirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        entries += len(subdirs) + len(filenames)
        if entries > MAX_ENTRIES:
            yield here, f"more than {MAX_ENTRIES} files and folders in the spec tree; the rest are not read"
            return
        kept = []
        for name in sorted(d for d in subdirs if not d.startswith(".")):
            if _leaves(here / name, inside):
                yield here / name, _OUTSIDE
            else:
                kept.append(name)
        subdirs[:] = kept
        for filename in sorted(filenames):
            if filename.endswith(SPEC_SUFFIXES) and not filename.startswith("."):
                path = here / filename
                yield path, _OUTSIDE if _leaves(path, inside) else None


def _leaves(path: Path, inside: Path) -> bool:
    """True for a symlink whose target (followed all the way, without reading it) is outside `inside`."""
    return path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(inside)


def _display(path: Path, root: Path) -> str:
    """Paths are shown as the user named the tree, so they can be opened from the same folder."""
    return str(path) if path != root or root.is_dir() else str(root)

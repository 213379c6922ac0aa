"""Read spec files from a git commit: the desired state is what is committed, not what is on disk.

Who calls it: `reconciler validate/plan/apply --ref` (and later the watch loop).
The only module that imports GitPython. A remote URL is fetched into a bare
mirror in the state directory; a local repository is read in place. Files come
from the commit's tree, so an unsaved working copy never reaches a plan; the
revision is the commit's SHA, which the journal, labels and failed-revision
memory all use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import git

from reconciler.errors import ConfigError, TemporaryError
from reconciler.spec.diagnostics import Diagnostic, Position, Severity
from reconciler.spec.files import MAX_ATTACHED_BYTES, attach_files, blobs_reader
from reconciler.spec.loader import MAX_FILE_BYTES, SPEC_SUFFIXES, LoadResult, SpecFile, load_files
from reconciler.spec.validate import validate

__all__ = ["Commit", "load_commit", "read_commit"]


@dataclass(frozen=True)
class Commit:
    sha: str
    files: tuple[SpecFile, ...]
    oversized: tuple[str, ...] = ()
    attachable: Mapping[str, bytes] = field(default_factory=dict, repr=False)  # small other files: keys, scripts


def read_commit(repository: str, *, ref: str = "HEAD", path: str = "", cache: Path | None = None) -> Commit:
    """The spec files under `path` in commit `ref` of `repository` (a local path or a URL)."""
    repo = _open(repository, ref=ref, cache=cache)
    try:
        try:
            commit = repo.commit(ref)
        except (git.BadName, ValueError, git.GitCommandError) as exc:
            raise ConfigError(f"no commit {ref!r} in {repository}", hint="name a branch, tag or commit") from exc
        tree = commit.tree
        folder = PurePosixPath(path.strip("/")) if path.strip("/") else None
        if folder is not None:
            try:
                tree = tree / str(folder)
            except KeyError:
                raise ConfigError(f"{path!r} does not exist in {ref} ({commit.hexsha[:12]})") from None
        files: list[SpecFile] = []
        oversized: list[str] = []
        attachable: dict[str, bytes] = {}
        budget = _ATTACHABLE_TOTAL
        for item in tree.traverse():
            name = str(getattr(item, "path", ""))
            if not isinstance(item, git.Blob) or any(part.startswith(".") for part in PurePosixPath(name).parts):
                continue
            if not name.endswith(SPEC_SUFFIXES):
                # Files a spec may name (ssh keys, provisioning scripts); a symlink's blob is its target, not a file.
                if item.mode != _SYMLINK and item.size <= min(MAX_ATTACHED_BYTES, budget):
                    budget -= item.size
                    attachable[str(PurePosixPath(name).relative_to(folder)) if folder else name] = (
                        item.data_stream.read()
                    )
                continue
            if item.size > MAX_FILE_BYTES:
                oversized.append(name)
                continue
            files.append(SpecFile(name, item.data_stream.read()))
        return Commit(commit.hexsha, tuple(files), tuple(oversized), attachable)
    finally:
        repo.close()


def load_commit(repository: str, *, ref: str = "HEAD", path: str = "", cache: Path | None = None) -> LoadResult:
    """Load and validate the spec tree of a commit; the revision is the commit's SHA."""
    commit = read_commit(repository, ref=ref, path=path, cache=cache)
    result = load_files(commit.files, revision=commit.sha, empty_hint=f"{repository}@{ref}:{path or '/'}")
    result = attach_files(result, blobs_reader(commit.attachable, where=f"{ref} ({commit.sha[:12]})"))
    too_large = tuple(
        Diagnostic(
            Severity.ERROR,
            f"file is too large (the limit is {MAX_FILE_BYTES // 1024 // 1024} MiB)",
            Position(name, 1, 1),
        )
        for name in commit.oversized
    )
    if not result.ok or too_large:
        return LoadResult(result.state, (*too_large, *result.diagnostics))
    return LoadResult(result.state, (*result.diagnostics, *validate(result.state)))


_SYMLINK = 0o120000
_ATTACHABLE_TOTAL = 32 * 1024 * 1024  # what a commit's non-spec files may take in memory; past it they are not read


def _is_local(repository: str) -> bool:
    return "://" not in repository and not repository.startswith("git@")


def _open(repository: str, *, ref: str, cache: Path | None) -> git.Repo:
    if _is_local(repository):
        try:
            return git.Repo(repository, search_parent_directories=True)
        except (git.NoSuchPathError, git.InvalidGitRepositoryError) as exc:
            raise ConfigError(f"{repository} is not a git repository", hint="pass a repository path or URL") from exc
    if cache is None:
        raise ConfigError("a remote repository needs a state directory to keep its mirror")
    mirror = cache / "repos" / hashlib.sha256(repository.encode()).hexdigest()[:16]
    try:
        if not mirror.exists():
            mirror.parent.mkdir(parents=True, exist_ok=True)
            return git.Repo.clone_from(repository, mirror, mirror=True)
        repo = git.Repo(mirror)
        repo.git.fetch("origin", "--prune", "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
        return repo
    except git.GitCommandError as exc:
        # The URL is shown as given; a token embedded in it would be the user's own doing, so strip userinfo.
        shown = repository.split("@", 1)[-1] if "://" in repository else repository
        raise TemporaryError(f"cannot fetch {shown}: git exited with {exc.status}", resource=shown) from None

"""Read spec files from a git commit: the desired state is what is committed, not what is on disk.

Who calls it: `reconciler validate/plan/apply --ref`, and the reconcile loop through `GitSource`
(the branch it follows: head, fetch, signature check, git notes).
The only module that imports GitPython. A remote URL is fetched into a bare
mirror in the state directory; a local repository is read in place. Files come
from the commit's tree, so an unsaved working copy never reaches a plan; the
revision is the commit's SHA, which the journal, labels and failed-revision
memory all use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

import git

from reconciler.errors import ConfigError, TemporaryError
from reconciler.spec.diagnostics import Diagnostic, Position, Severity
from reconciler.spec.files import MAX_ATTACHED_BYTES, attach_files, blobs_reader
from reconciler.spec.loader import MAX_FILE_BYTES, SPEC_SUFFIXES, LoadResult, SpecFile, load_files
from reconciler.spec.validate import validate

__all__ = [
    "NOTES_REF",
    "Commit",
    "GitSource",
    "commit_all",
    "init_repository",
    "load_commit",
    "locate",
    "read_commit",
]


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
    mirror = _mirror_path(repository, cache)
    try:
        if not mirror.exists():
            mirror.parent.mkdir(parents=True, exist_ok=True)
            return git.Repo.clone_from(repository, mirror, mirror=True, env=_QUIET)
        repo = git.Repo(mirror)
        repo.git.fetch(
            "origin",
            "--prune",
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
            env=_QUIET,
            kill_after_timeout=FETCH_TIMEOUT,
        )
        return repo
    except (git.UnsafeProtocolError, git.UnsafeOptionError):
        raise ConfigError(
            f"{_shown(repository)} uses a transport git runs commands for (ext::, --upload-pack)",
            hint="use https://, ssh:// or file://",
        ) from None
    except git.GitCommandError as exc:
        # A token embedded in the URL would be the user's own doing; it is never shown.
        shown = _shown(repository)
        raise TemporaryError(f"cannot fetch {shown}: git exited with {exc.status}", resource=shown) from None


# ---- the loop's source: a branch of a repository, watched, fetched, verified, annotated ------------------

NOTES_REF = "reconciler"
FETCH_TIMEOUT = 120.0  # seconds; a hung remote must not hold a pass forever
# git must never stop to ask for a password in a daemon: credentials come from the environment or an agent.
_QUIET = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", "SSH_ASKPASS": ""}
_NOTE_AUTHOR = {
    "GIT_AUTHOR_NAME": "reconciler",
    "GIT_AUTHOR_EMAIL": "reconciler@localhost",
    "GIT_COMMITTER_NAME": "reconciler",
    "GIT_COMMITTER_EMAIL": "reconciler@localhost",
}


@dataclass(frozen=True)
class GitSource:
    """A branch of a repository, as the loop follows it.

    A local repository is read in place and watched; a remote one is mirrored into
    `cache` (the state directory) and fetched on demand, force-pushes included
    (`+refs/heads/*`). Credentials are whatever git finds in the environment or the
    ssh agent; git is never allowed to prompt.
    """

    repository: str
    branch: str = "main"
    path: str = ""
    cache: Path | None = None

    @property
    def local(self) -> bool:
        return _is_local(self.repository)

    @property
    def shown(self) -> str:
        """The repository as it may be logged: a URL loses any user:password."""
        return _shown(self.repository)

    def location(self) -> Path:
        """Where the commits are read: the local repository, or the mirror of a remote one."""
        if self.local:
            return Path(self.repository)
        if self.cache is None:
            raise ConfigError("a remote repository needs a state directory to keep its mirror")
        return _mirror_path(self.repository, self.cache)

    def git_dir(self) -> Path:
        """The directory holding refs (a linked worktree's refs live in the common dir)."""
        with self._repo() as repo:
            return Path(repo.common_dir).resolve()

    def fetch(self) -> None:
        """Bring the mirror up to date (clone it the first time). A local repository needs nothing."""
        if not self.local:
            _open(self.repository, ref=self.branch, cache=self.cache).close()

    def head(self) -> str:
        """The SHA the branch points at now."""
        with self._repo() as repo:
            try:
                return str(repo.git.rev_parse("--verify", "--quiet", f"refs/heads/{self.branch}^{{commit}}"))
            except git.GitCommandError:
                raise ConfigError(
                    f"branch {self.branch!r} does not exist in {self.shown}", hint="pass --branch with a branch it has"
                ) from None

    def load(self, sha: str) -> LoadResult:
        return load_commit(str(self.location()), ref=sha, path=self.path)

    def verify(self, sha: str, keyring: Path) -> str | None:
        """None when `sha` carries a signature by a key of `keyring`, else why not.

        A directory is a GnuPG home (GPG signing); a file is an ssh allowed-signers file
        (ssh signing). git itself checks the signature, as `git verify-commit` does.
        """
        if keyring.is_dir():
            env = {"GNUPGHOME": str(keyring)}
        elif keyring.is_file():
            env = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "gpg.ssh.allowedSignersFile"}
            env["GIT_CONFIG_VALUE_0"] = str(keyring.resolve())
        else:
            raise ConfigError(
                f"keyring {keyring} does not exist", hint="a GnuPG home folder or an allowed-signers file"
            )
        with self._repo() as repo:
            commit = repo.commit(sha)
            if not commit.gpgsig:
                return f"commit {sha[:12]} is not signed"
            try:
                repo.git.verify_commit(sha, env={**_QUIET, **env})
            except git.GitCommandError as exc:
                detail = _first_line(str(exc.stderr)) or f"git exited with {exc.status}"
                return f"commit {sha[:12]} is not signed by a trusted key: {detail}"
        return None

    def note(self, sha: str, text: str) -> None:
        """Add the result of a pass to the commit's note (`git log --notes=reconciler`); local only."""
        if not self.local:
            return
        with self._repo() as repo:
            try:
                repo.git.notes(f"--ref={NOTES_REF}", "append", "-m", text, sha, env={**_QUIET, **_NOTE_AUTHOR})
            except git.GitCommandError as exc:
                raise TemporaryError(f"cannot write the git note on {sha[:12]}: git exited with {exc.status}") from None

    def read_note(self, sha: str) -> str | None:
        with self._repo() as repo:
            try:
                return str(repo.git.notes(f"--ref={NOTES_REF}", "show", sha))
            except git.GitCommandError:
                return None

    @contextmanager
    def _repo(self) -> Iterator[git.Repo]:
        location = self.location()
        try:
            repo = git.Repo(location, search_parent_directories=self.local)
        except (git.NoSuchPathError, git.InvalidGitRepositoryError) as exc:
            if self.local:
                raise ConfigError(f"{location} is not a git repository", hint="pass a repository path or URL") from exc
            raise ConfigError(f"the mirror of {self.shown} is missing", hint="fetch it first") from exc
        try:
            yield repo
        finally:
            repo.close()


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("cmdline")]
    return lines[0][:200].removeprefix("stderr: ").strip("'") if lines else ""


def _shown(repository: str) -> str:
    """The repository without any user:password, query or fragment a URL may carry (a token hides in any)."""
    if "://" not in repository:
        return repository
    parts = urlsplit(repository)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _mirror_path(repository: str, cache: Path) -> Path:
    return cache / "repos" / hashlib.sha256(repository.encode()).hexdigest()[:16]


def locate(path: Path) -> tuple[Path, str] | None:
    """The top folder of the working copy holding `path`, and `path` inside it (POSIX, "" for the top).

    None when `path` is in no git working copy (or in a bare repository). The CLI asks this to read a
    spec folder from the commit of the repository it lives in.
    """
    folder = path if path.is_dir() else path.parent
    try:
        repo = git.Repo(folder, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    try:
        if repo.working_tree_dir is None:
            return None
        top = Path(repo.working_tree_dir).resolve()
    finally:
        repo.close()
    inside = path.resolve().relative_to(top).as_posix()
    return top, "" if inside == "." else inside


def init_repository(folder: Path, *, branch: str = "main") -> None:
    """A new repository holding what `folder` holds, as one commit (the demo makes its lab's repository so)."""
    git.Repo.init(folder, mkdir=True, initial_branch=branch).close()
    commit_all(folder, "the lab")


def commit_all(folder: Path, message: str) -> str:
    """Commit every change in the working copy of `folder`, as `reconciler`; the new commit's SHA."""
    repo = git.Repo(folder)
    try:
        repo.git.add("-A")
        repo.git.commit("-q", "-m", message, env={**_QUIET, **_NOTE_AUTHOR})
        return str(repo.head.commit.hexsha)
    finally:
        repo.close()

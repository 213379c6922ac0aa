"""Real git repositories for the loop's tests and benchmarks: a working repository made from a spec folder,
commits that edit one file, and a bare repository used as a remote through a file:// URL.

Everything goes through the git command, as a person would do it; nothing is mocked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.components import missing

__all__ = ["GitRepo", "git_available", "make_repo"]

IDENTITY = {
    "GIT_AUTHOR_NAME": "Lab Admin",
    "GIT_AUTHOR_EMAIL": "admin@lab.test",
    "GIT_COMMITTER_NAME": "Lab Admin",
    "GIT_COMMITTER_EMAIL": "admin@lab.test",
}


def git_available() -> None:
    if shutil.which("git") is None:
        missing("git", "the git command is not on PATH")


@dataclass
class GitRepo:
    path: Path
    spec: str = "specs"  # the spec tree inside the repository

    def git(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            ["git", "-C", str(self.path), *args],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **IDENTITY, **(env or {})},
        )
        if result.returncode != 0:
            raise AssertionError(f"git {' '.join(args)}: {result.stderr}")
        return result.stdout.strip()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def edit(self, file: str, old: str, new: str) -> None:
        path = self.path / self.spec / file
        text = path.read_text()
        assert old in text, f"{old!r} not in {path}"
        path.write_text(text.replace(old, new, 1))

    def write(self, file: str, text: str) -> None:
        (self.path / self.spec / file).write_text(text)

    def commit(self, message: str, *args: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message, *args)
        return self.head()


def make_repo(folder: Path, spec: Path, *, branch: str = "main") -> GitRepo:
    """A repository holding a copy of `spec` under specs/, with one commit on `branch`."""
    git_available()
    shutil.copytree(spec, folder / "specs")
    repo = GitRepo(folder)
    repo.git("init", "-q", "-b", branch)
    repo.commit("the lab")
    return repo

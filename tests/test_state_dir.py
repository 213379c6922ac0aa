"""The state directory and its journal: what cannot be used is a clear error naming the file, never a traceback.

Hostile states made on disk as they happen: a state directory that is a file, a journal.sqlite that is
random bytes, a directory, another program's SQLite database, or a journal damaged past its first page.
Every command that touches the state directory (`plan`, `apply`, `history`, `status`, `forget`) is run as
a person runs it and must exit 1 saying which file and what to do; the journal's bytes must be untouched
(it is never deleted or replaced behind the user's back).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reconciler.engine.journal import Journal, RunResult
from reconciler.engine.lock import state_lock
from reconciler.errors import StateError

ROOT = Path(__file__).resolve().parent.parent
LAB = "kind: Lab\nname: state\nnvml: {enabled: false}\n"  # no backend: the commands get as far as the state dir

COMMANDS: list[tuple[str, ...]] = [
    ("history",),
    ("status",),
    ("forget", "container/x"),
    ("plan", "SPEC"),
    ("apply", "SPEC", "--auto-approve"),
]


def run(args: tuple[str, ...], *, state: Path, spec: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECONCILER_", "DOCKER_HOST"))}
    env.update(RECONCILER_STATE_DIR=str(state), NO_COLOR="1", TERM="dumb", COLUMNS="300")
    argv = [str(spec) if a == "SPEC" else a for a in args]
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *argv],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "lab.yaml").write_text(LAB)
    return folder


def good_journal(path: Path, runs: int = 1) -> None:
    journal = Journal(path)
    for number in range(runs):
        run_id = journal.start_run(revision=f"r{number}", plan={"summary": "x" * 200, "changes": []})
        journal.end_run(run_id, RunResult.APPLIED)
    journal.close()


def damaged_past_its_first_page(path: Path) -> None:
    """A journal whose header and schema read fine, and whose data pages are garbage (a torn disk write)."""
    good_journal(path, runs=400)
    assert not path.with_name(path.name + "-wal").exists()  # closed: every page is in the main file
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[3 * page : len(data)] = os.urandom(len(data) - 3 * page)
    path.write_bytes(bytes(data))


def another_programs_database(path: Path) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE runs (name TEXT, duration REAL)")
        db.execute("INSERT INTO runs VALUES ('morning', 31.5)")
    db.close()


BROKEN = {
    "random bytes": lambda path: path.write_bytes(os.urandom(8192)),
    "a directory": lambda path: path.mkdir(),
    "another program's database": another_programs_database,
    "damaged past its first page": damaged_past_its_first_page,
    "empty header, text after": lambda path: path.write_bytes(b"SQLite format 3\x00" + b"not really" * 500),
}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_state_directory_that_is_a_file(command: tuple[str, ...], spec: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a folder\n")
    result = run(command, state=state, spec=spec)
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    assert f"the state directory {state} is a file, not a folder" in result.stderr, said
    assert "--state-dir" in result.stderr and "Traceback" not in said, said
    assert state.read_text() == "not a folder\n"


@pytest.mark.parametrize("broken", list(BROKEN))
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_journal_that_cannot_be_used(broken: str, command: tuple[str, ...], spec: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    journal = state / "journal.sqlite"
    BROKEN[broken](journal)
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    result = run(command, state=state, spec=spec)
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    assert str(journal) in result.stderr and "Traceback" not in said, said
    assert "move it aside" in result.stderr or "cannot be opened" in result.stderr, said
    after = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file() and p.name in before}
    assert after == before  # never deleted, replaced or written into


@pytest.mark.parametrize("broken", list(BROKEN))
def test_the_journal_refuses_what_it_cannot_use_with_a_state_error(broken: str, tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    BROKEN[broken](journal)
    with pytest.raises(StateError) as caught:
        open_and_read(journal)
    assert str(journal) in str(caught.value)
    assert caught.value.retryable is False


def open_and_read(path: Path) -> None:
    journal = Journal(path)
    try:  # damage past the first page shows when the runs are read
        journal.runs(1000)
        journal.inventory()
    finally:
        journal.close()


def test_a_good_journal_still_opens_and_reads(tmp_path: Path) -> None:
    good_journal(tmp_path / "journal.sqlite", runs=3)
    journal = Journal(tmp_path / "journal.sqlite")
    assert [run.revision for run in journal.runs()] == ["r2", "r1", "r0"]
    journal.close()


def test_the_lock_refuses_a_state_directory_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="cannot be made"), state_lock(tmp_path / "file" / "state"):
        pass


@pytest.mark.parametrize("command", [c for c in COMMANDS if c[0] in ("apply", "forget")], ids=lambda c: c[0])
def test_a_lock_file_that_is_a_folder(command: tuple[str, ...], spec: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "apply.lock").mkdir(parents=True)
    result = run(command, state=state, spec=spec)
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    assert f"the lock file {state / 'apply.lock'} cannot be opened" in result.stderr and "Traceback" not in said, said


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda path: path.symlink_to("/dev/null"), id="a device"),
        pytest.param(os.mkfifo, id="a FIFO"),
    ],
)
def test_a_lock_file_that_is_not_a_regular_file(make: Any, spec: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    make(state / "apply.lock")
    result = run(("forget", "container/x"), state=state, spec=spec)
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    assert f"the lock file {state / 'apply.lock'} cannot be" in result.stderr and "Traceback" not in said, said

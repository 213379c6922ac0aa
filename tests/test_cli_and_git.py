"""The CLI's validate, schema and demo commands, and specs read from real git repositories.

Runs `python -m reconciler` in a subprocess, as a user would, and asserts on
exit codes and output; git repositories are real ones made in tmp_path, with
a bare repository as the remote.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rich.console import Console

from reconciler.cli.demo import run_demo
from reconciler.sources.git import load_commit, locate, read_commit
from tests.support.components import missing

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "inference-vm"


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.fixture
def git_bin() -> str:
    found = shutil.which("git")
    if found is None:
        missing("git", "the git command is not on PATH")
    return found


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
        env={
            **os.environ,
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
        },
    ).stdout.strip()


@pytest.fixture
def lab_repo(tmp_path: Path, git_bin: str) -> Path:
    repo = tmp_path / "lab"
    shutil.copytree(EXAMPLE, repo / "specs")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "lab")
    return repo


def test_validate_exit_codes_and_file_line(tmp_path: Path) -> None:
    assert run("validate", str(EXAMPLE)).returncode == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.yaml").write_text("kind: Gpu\nname: big\nnode: pve1\npci: '0000:01:00'\nvram: 16GiB\nmodle: x\n")
    (broken / "b.yaml").write_text("kind: Lab\nname: l\nnodes: [pve1\n")
    result = run("validate", str(broken))
    assert result.returncode == 1
    assert f"{broken}/a.yaml:6:1: Gpu/big: error: unknown field 'modle'" in result.stdout
    assert "did you mean 'model'?" in result.stdout
    assert f"{broken}/b.yaml:" in result.stdout and "YAML syntax error" in result.stdout
    payload = json.loads(run("validate", str(broken), "--json").stdout)
    assert {(d["file"], d["line"], d["severity"]) for d in payload} >= {(f"{broken}/a.yaml", 6, "error")}
    planned = run("plan", str(broken))
    assert planned.returncode == 1 and planned.stdout == "", "stdout is for the plan; the diagnostics go to stderr"
    assert f"{broken}/a.yaml:6:1: Gpu/big: error: unknown field 'modle'" in planned.stderr


def test_schema_command_writes_what_is_committed(tmp_path: Path) -> None:
    assert run("schema", "--out", str(tmp_path)).returncode == 0
    for written in tmp_path.iterdir():
        assert written.read_text() == (ROOT / "schemas" / written.name).read_text()


def test_demo_runs_the_loop_end_to_end_and_leaves_nothing_behind() -> None:
    result = run("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "pass 1 (start)" in out and ": applied in" in out
    assert "pass 2 (commit)" in out and "replace container/llm/qwen-7b" in out
    assert "drift lxc/llm: memory (corrected)" in out  # the change made by hand, corrected by a drift pass
    assert ": rolled-back in" in out
    # What the loopback receiver got from the Lab's generic webhook, and curl of the loop's server.
    assert "the notification it sent" in out and '"events": ["rolled-back"]' in out
    assert re.search(r"\$ curl -s http://127\.0\.0\.1:\d+/status", out) and '"result": "rolled-back"' in out
    assert 'reconciler_passes_total{outcome="applied"} 3.0' in out
    assert 'reconciler_passes_total{outcome="rolled-back"} 1.0' in out
    folder = next(line.split(" in ", 1)[1].split(";")[0] for line in out.splitlines() if "a git repository in" in line)
    assert not Path(folder).exists()


def test_the_demo_leaves_no_thread_and_no_port_behind() -> None:
    before = set(threading.enumerate())
    output = io.StringIO()
    assert run_demo(Console(file=output, width=200), ROOT / "specs") == 0, output.getvalue()
    left = [t for t in threading.enumerate() if t not in before]
    for thread in left:  # a request's thread may still be returning from its last write
        thread.join(5)
    assert [t for t in left if t.is_alive()] == []
    ports = {int(port) for port in re.findall(r"http://127\.0\.0\.1:(\d+)", output.getvalue())}
    assert len(ports) == 2  # the loop's server and the notification receiver
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))  # nothing listens there any more


def test_a_commit_is_read_not_the_working_copy(lab_repo: Path) -> None:
    sha = git(lab_repo, "rev-parse", "HEAD")
    (lab_repo / "specs" / "vm.yaml").write_text("this: is [not committed\n")
    commit = read_commit(str(lab_repo), ref="main", path="specs")
    assert commit.sha == sha
    result = load_commit(str(lab_repo), ref="main", path="specs")
    assert result.ok and result.state.revision == sha
    assert run("validate", str(lab_repo / "specs")).returncode == 1, "the working copy is broken"
    assert run("validate", str(lab_repo / "specs"), "--ref", "main").returncode == 0, "the commit is not"


def test_a_spec_folder_is_located_in_the_working_copy_that_holds_it(lab_repo: Path, tmp_path: Path) -> None:
    top = lab_repo.resolve()
    assert locate(lab_repo / "specs") == (top, "specs")
    assert locate(lab_repo / "specs" / "vm.yaml") == (top, "specs/vm.yaml")
    assert locate(lab_repo) == (top, "")
    outside = tmp_path / "loose"
    outside.mkdir()
    assert locate(outside) is None
    # the top of the working copy reads as the whole commit
    assert run("validate", str(lab_repo), "--ref", "main").returncode == 0


def test_a_remote_branch_is_fetched_into_a_mirror(lab_repo: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(lab_repo), str(remote)], check=True)
    url = f"file://{remote}"
    cache = tmp_path / "state"
    first = load_commit(url, ref="main", path="specs", cache=cache)
    assert first.ok
    models = lab_repo / "specs" / "mode.yaml"
    models.write_text(models.read_text().replace("active: fast", "active: deep"))
    git(lab_repo, "commit", "-q", "-am", "deep mode")
    git(lab_repo, "push", "-q", str(remote), "main")
    second = load_commit(url, ref="main", path="specs", cache=cache)
    assert second.ok and second.state.revision != first.state.revision
    group = next(r for r in second.state.resources if r.kind == "ExclusiveGroup")
    assert group.active == "deep"  # type: ignore[attr-defined]


def test_a_bad_ref_is_a_clear_error(lab_repo: Path) -> None:
    result = run("validate", str(lab_repo / "specs"), "--ref", "no-such-branch")
    assert result.returncode == 1
    assert "no commit 'no-such-branch'" in result.stderr
    assert "Traceback" not in result.stderr
